//! The admission HTTP layer: it only converts. Body -> AdmissionRequest, decision ->
//! AdmissionResponse, always answered with 200 and an AdmissionReview.

pub mod memo;
pub mod tls;

use crate::{inject::Injector, metrics::ResultLabels};
use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::header,
    response::IntoResponse,
    routing::post,
};
use base64::Engine;
use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use memo::{Decided, Memo, Subject};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tracing::{Instrument, info, info_span, warn};

/// AdmissionReviews for pods are bounded by the apiserver's request size (3 MiB by default).
const MAX_BODY: usize = 8 * 1024 * 1024;

#[derive(Clone)]
pub struct WebhookState {
    pub injector: Arc<Injector>,
    /// Answer before the apiserver's timeoutSeconds runs out.
    pub deadline: Duration,
    /// Answers to reviews seen before, while nothing they were decided from has changed;
    /// `None` decides every review (the access-policy bench, which measures deciding).
    pub memo: Option<Arc<Memo>>,
}

impl WebhookState {
    /// With a decision memo on the injector's count of changes.
    pub fn new(injector: Arc<Injector>, deadline: Duration) -> Self {
        let memo = Memo::new(injector.changes().clone(), memo::BUDGET);
        Self {
            injector,
            deadline,
            memo: Some(Arc::new(memo)),
        }
    }
}

pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/mutate", post(mutate_handler))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn mutate_handler(State(state): State<WebhookState>, body: Bytes) -> impl IntoResponse {
    let started = Instant::now();
    let metrics = &state.injector.metrics;
    let keyed = state.memo.as_ref().and_then(|_| memo::key(&body));
    if let (Some(memo), Some(keyed)) = (&state.memo, &keyed) {
        let recalled = memo.recall(&keyed.key);
        metrics.cache("decision", recalled.is_some());
        if let Some(decided) = recalled {
            metrics.cache_hits("secret", decided.secrets);
            let line = Line {
                uid: keyed.uid,
                subject: &decided.subject,
                result: decided.result,
                warnings: decided.warnings,
                reason: "",
            };
            log_admission(&state, started, line);
            return (
                [(header::CONTENT_TYPE, "application/json")],
                decided.answer(keyed.uid),
            );
        }
    }
    let generation = state.memo.as_ref().map_or(0, |m| m.generation());
    let (response, subject, from_caches) = review(&state, &body).await;
    let result = if response.allowed {
        if response.patch.is_some() {
            "patched"
        } else {
            "allowed"
        }
    } else if response.uid.is_empty() {
        "invalid"
    } else {
        "denied"
    };
    let warnings = response.warnings.as_ref().map_or(0, Vec::len);
    let line = Line {
        uid: &response.uid,
        subject: &subject,
        result,
        warnings,
        reason: &response.result.message,
    };
    log_admission(&state, started, line);
    let patch = response
        .patch
        .as_ref()
        .map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes));
    let answered = |uid| Answered {
        uid,
        allowed: response.allowed,
        status: &response.result,
        patch_type: patch.as_ref().map(|_| "JSONPatch"),
        patch: patch.as_deref(),
        audit_annotations: &response.audit_annotations,
        warnings: response.warnings.as_ref(),
    };
    let body = encode(answered(&response.uid));
    if let (Some(memo), Some(keyed), Some(secrets)) = (&state.memo, keyed, from_caches)
        && response.allowed
        && let Some(after_uid) = Decided::after_uid(&encode(answered("")))
    {
        let decided = Decided {
            result,
            after_uid,
            warnings,
            secrets,
            subject,
        };
        memo.remember(keyed.key, decided, generation);
    }
    ([(header::CONTENT_TYPE, "application/json")], body)
}

/// The admission's metrics and its one log line (info when admitted, warn with the reason
/// when not).
///
/// The line carries who the admission is about as fields of its own, not as a span's: the
/// JSON formatter parses a span's fields back from text at every line, which was a large
/// share of the cost of an admission answered from the memo (perf; docs, contributors/benchmarks.md).
fn log_admission(state: &WebhookState, started: Instant, line: Line) {
    let metrics = &state.injector.metrics;
    let Line {
        uid,
        subject,
        result,
        warnings,
        reason,
    } = line;
    metrics.admissions.get_or_create(&ResultLabels { result }).inc();
    metrics.admission_seconds.observe(started.elapsed().as_secs_f64());
    let (namespace, pod, dry_run) = (&*subject.namespace, &*subject.pod, subject.dry_run);
    if result == "patched" || result == "allowed" {
        info!(uid, namespace, pod, dry_run, result, warnings, "admission");
    } else {
        warn!(uid, namespace, pod, dry_run, result, reason, "admission");
    }
}

/// An admission's log line.
struct Line<'a> {
    uid: &'a str,
    subject: &'a Subject,
    result: &'static str,
    warnings: usize,
    /// Why it was not admitted.
    reason: &'a str,
}

/// Parses the body and decides; never fails: a body that is not an AdmissionReview for a
/// pod gets an `invalid` response naming what is wrong. The decision runs in a span of the
/// request (uid, namespace, pod, dry run), made once with all its fields, which are cheaper
/// to set at once than one by one. Also returns who the admission is about, and, for a
/// decision made from the caches alone, the materialized Secrets it used (`Admitted`).
async fn review(state: &WebhookState, body: &[u8]) -> (AdmissionResponse, Subject, Option<u64>) {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            let invalid = AdmissionResponse::invalid(format!("request body is not an AdmissionReview: {e}"));
            return (invalid, Subject::default(), None);
        }
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            let invalid =
                AdmissionResponse::invalid(format!("AdmissionReview carries no usable request: {e}"));
            return (invalid, Subject::default(), None);
        }
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    let pod_name = request
        .object
        .as_ref()
        .and_then(|p| p.metadata.name.as_deref().or(p.metadata.generate_name.as_deref()))
        .unwrap_or("");
    let span = info_span!(
        "admission",
        uid = request.uid.as_str(),
        namespace = namespace.as_str(),
        pod = pod_name,
        dry_run = request.dry_run
    );
    let subject = Subject {
        namespace: namespace.as_str().into(),
        pod: pod_name.into(),
        dry_run: request.dry_run,
    };
    let response = AdmissionResponse::from(&request);
    let Some(pod) = request.object.as_ref() else {
        return (
            response.deny("the AdmissionReview has no pod object"),
            subject,
            None,
        );
    };
    // A pod from the apiserver always has a name or generateName: only an empty metadata
    // needs the second look at the body.
    if pod.metadata == Default::default() && !has_metadata(body) {
        return (
            response.deny("the pod object in the AdmissionReview has no metadata"),
            subject,
            None,
        );
    }
    let injector = &state.injector;
    let decide = match (&request.operation, request.sub_resource.as_deref()) {
        (Operation::Create, None) => injector.admit(&namespace, pod, request.dry_run).boxed(),
        (Operation::Update, Some("ephemeralcontainers")) => {
            // The subresource keeps only `spec.ephemeralContainers` of what it is sent, after
            // admission: the rest of the object (a mirror annotation, another
            // serviceAccountName) is the caller's word and is judged from the stored pod.
            let Some(stored) = request.old_object.as_ref() else {
                return (
                    response.deny("the AdmissionReview for pods/ephemeralcontainers has no oldObject"),
                    subject,
                    None,
                );
            };
            let judged = crate::mutate::with_ephemeral_containers_of(stored, pod);
            async move {
                injector
                    .admit_ephemeral(&namespace, &judged, request.dry_run)
                    .await
            }
            .boxed()
        }
        // Not what kvinject registers for: nothing to decide.
        _ => return (response, subject, None),
    };
    let decision = tokio::time::timeout(state.deadline, decide)
        .instrument(span.clone())
        .await;
    let admitted = match decision {
        Err(_) => {
            let late = response.deny(format!(
                "kvinject could not decide within {:?}; Key Vault or the apiserver is slow",
                state.deadline
            ));
            return (late, subject, None);
        }
        Ok(Err(denied)) => return (response.deny(denied.to_string()), subject, None),
        Ok(Ok(a)) => a,
    };
    let mut response = response;
    if !admitted.warnings.is_empty() {
        // The apiserver drops a warning that holds a control character (a newline from an
        // SDK message, say) without a word: each goes out on one line.
        response.warnings = Some(
            admitted
                .warnings
                .iter()
                .map(|w| crate::keyvault::source::one_line(w))
                .collect(),
        );
    }
    let answer = match admitted.patch {
        None => response,
        Some(patch) => match response.clone().with_patch(patch) {
            Ok(r) => r,
            Err(e) => {
                return (
                    response.deny(format!("kvinject could not encode its patch: {e}")),
                    subject,
                    None,
                );
            }
        },
    };
    (answer, subject, admitted.from_caches)
}

/// Whether `request.object.metadata` is an object. The typed pod defaults a missing one,
/// and a patch that adds under `/metadata` would then not apply to what was sent. The
/// apiserver always sends it; a hand-made review may not.
fn has_metadata(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Review {
        request: Request,
    }
    #[derive(serde::Deserialize)]
    struct Request {
        object: Object,
    }
    #[derive(serde::Deserialize)]
    struct Object {
        metadata: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Review>(body).is_ok_and(|r| r.request.object.metadata.is_some())
}

/// The AdmissionReview kvinject answers, as the apiserver reads it: `patch` in its
/// documented form, a base64 string (the apiserver's `[]byte`; kube-rs would write a JSON
/// array of numbers), and always `admission.k8s.io/v1` `AdmissionReview`, whatever type a
/// caller wrote (kube-rs echoes the request's `kind`, so a misspelled one came back; found
/// by fuzzing). Serialized once, straight from the response.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: Answered<'a>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Answered<'a> {
    uid: &'a str,
    allowed: bool,
    status: &'a kube::core::Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "std::collections::HashMap::is_empty")]
    audit_annotations: &'a std::collections::HashMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warnings: Option<&'a Vec<String>>,
}

fn encode(response: Answered) -> Vec<u8> {
    let answer = Answer {
        api_version: "admission.k8s.io/v1",
        kind: "AdmissionReview",
        response,
    };
    serde_json::to_vec(&answer).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    //! Router tests of the HTTP layer. Key Vault and the apiserver are replaced here by
    //! in-process doubles (a counting SecretSource and a recording SecretWriter): these are
    //! unit tests of conversion and single-flight; tests/e2e covers the real ones.
    use super::*;
    use crate::{
        inject::{SecretWriter, WriteError},
        keyvault::{
            SecretValue,
            source::{FetchError, Fetched, SecretSource},
        },
        metrics::Metrics,
        mutate::InjectConfig,
        reference::Reference,
    };
    use async_trait::async_trait;
    use axum::{body::Body, http::Request};
    use http_body_util::BodyExt;
    use k8s_openapi::api::core::v1::Secret;
    use kube::runtime::reflector::store::Writer;
    use serde_json::{Value, json};
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };
    use tower::ServiceExt;

    #[test]
    fn a_pod_without_metadata_is_told_so() {
        // Found by the admission fuzz target: the typed pod defaulted the missing metadata,
        // and the patch added under /metadata, which the sent object did not have.
        let review = |object: Value| {
            serde_json::to_vec(
                &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {"uid": "u", "object": object}}),
            )
            .unwrap()
        };
        assert!(!has_metadata(&review(
            json!({"kind": "Pod", "spec": {"containers": []}})
        )));
        assert!(!has_metadata(&review(json!({"kind": "Pod", "metadata": null}))));
        assert!(has_metadata(&review(json!({"kind": "Pod", "metadata": {}}))));
    }

    #[derive(Default)]
    struct CountingSource(AtomicUsize);
    #[async_trait]
    impl SecretSource for CountingSource {
        async fn fetch(
            &self,
            r: &Reference,
            _: Option<&crate::identity::WorkloadIdentity>,
        ) -> Result<Fetched, FetchError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            match r.name.as_str() {
                "missing" => Err(FetchError::NotFound(r.to_string())),
                _ => Ok(Fetched {
                    value: SecretValue::new("s3cret"),
                    version: "0123456789abcdef0123456789abcdef".into(),
                }),
            }
        }
        async fn probe(&self, _: &str) -> Result<(), FetchError> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct RecordingWriter(Mutex<Vec<Secret>>);
    #[async_trait]
    impl SecretWriter for RecordingWriter {
        async fn create(&self, secret: Secret) -> Result<(), WriteError> {
            self.0.lock().unwrap().push(secret);
            Ok(())
        }
    }

    struct Harness {
        app: Router,
        source: Arc<CountingSource>,
        writer: Arc<RecordingWriter>,
        injector: Arc<Injector>,
        /// The Secret cache, fed by hand here as the watch feeds it in `serve`.
        secrets: Writer<crate::materialize::CachedSecret>,
        keys: crate::materialize::seal::Keys,
    }

    impl Harness {
        /// What the Secret watch does with a Secret the apiserver reports: into the cache,
        /// then one change counted.
        async fn watch_sees(&mut self, secret: &Secret, deleted: bool) {
            let cached = crate::materialize::CachedSecret::new(&self.keys, secret);
            if deleted {
                self.secrets
                    .apply_watcher_event(&kube::runtime::watcher::Event::Delete(cached.clone()));
                self.injector.changes().bump();
                self.injector.forget(&cached).await;
            } else {
                self.secrets
                    .apply_watcher_event(&kube::runtime::watcher::Event::Apply(cached));
                self.injector.changes().bump();
            }
        }

        fn metric(&self, line_start: &str) -> f64 {
            let text = self.injector.metrics.encode();
            text.lines()
                .find(|l| l.starts_with(line_start))
                .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
        }
    }

    fn harness() -> Harness {
        let source = Arc::new(CountingSource::default());
        let writer = Arc::new(RecordingWriter::default());
        let secrets = Writer::<crate::materialize::CachedSecret>::default();
        let config = InjectConfig {
            vaults: ["main".to_string()].into(),
            ..Default::default()
        };
        let keys = config.keys.clone();
        let injector = Arc::new(Injector::new(
            config,
            source.clone(),
            writer.clone(),
            secrets.as_reader(),
            Duration::from_secs(60),
            Metrics::default(),
        ));
        let app = router(WebhookState::new(injector.clone(), Duration::from_secs(5)));
        Harness {
            app,
            source,
            writer,
            injector,
            secrets,
            keys,
        }
    }

    async fn post_bytes(app: &Router, body: String) -> Vec<u8> {
        let req = Request::post("/mutate")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status().as_u16(), 200);
        res.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    fn with_uid(review: &Value, uid: &str) -> String {
        let mut review = review.clone();
        review["request"]["uid"] = json!(uid);
        review.to_string()
    }

    #[tokio::test]
    async fn the_same_review_again_gets_the_same_answer_until_a_cache_changes() {
        let mut h = harness();
        let review = review_of(pod_with("akv://main/db"), false);
        let decisions = |h: &Harness| {
            (
                h.metric(r#"kvinject_cache_lookups_total{cache="decision",result="hit"}"#),
                h.metric(r#"kvinject_cache_lookups_total{cache="decision",result="miss"}"#),
            )
        };
        // First use: read and created, so not remembered (the watch has not seen it).
        let first = post_bytes(&h.app, with_uid(&review, "u-1")).await;
        let created = h.writer.0.lock().unwrap()[0].clone();
        h.watch_sees(&created, false).await;
        // Decided from the caches, remembered; then answered from the memo.
        let decided = post_bytes(&h.app, with_uid(&review, "u-2")).await;
        assert_eq!(decisions(&h), (0.0, 2.0));
        let recalled = post_bytes(&h.app, with_uid(&review, "u-3")).await;
        assert_eq!(decisions(&h), (1.0, 2.0));
        let as_text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        assert_eq!(
            as_text(&recalled),
            as_text(&decided).replace("\"u-2\"", "\"u-3\"")
        );
        assert_eq!(as_text(&first), as_text(&decided).replace("\"u-2\"", "\"u-1\""));
        assert_eq!(
            h.metric(r#"kvinject_cache_lookups_total{cache="secret",result="hit"}"#),
            2.0,
            "a remembered decision counts the Secret it used"
        );
        // Another pod, another decision.
        post_bytes(&h.app, review_of(pod_with("akv://main/db2"), false).to_string()).await;
        assert_eq!(decisions(&h).0, 1.0);

        // The vault goes down: the next admission warns, not the remembered answer.
        h.injector
            .health
            .record("main", Some("connection refused".into()), &h.injector.metrics);
        let (_, body) = post(&h.app, with_uid(&review, "u-4")).await;
        let warnings = body["response"]["warnings"].to_string();
        assert!(warnings.contains("Key Vault is unreachable"), "{body}");
        assert_eq!(decisions(&h).0, 1.0);

        // The Secret is deleted: decided again, and created again.
        h.injector.health.record("main", None, &h.injector.metrics);
        h.watch_sees(&created, true).await;
        let (_, body) = post(&h.app, with_uid(&review, "u-5")).await;
        assert_eq!(body["response"]["allowed"], true);
        assert_eq!(decisions(&h).0, 1.0);
        let names: Vec<_> = h
            .writer
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.metadata.name.clone())
            .collect();
        assert_eq!(names.len(), 3, "db, db2 and db again: {names:?}");
        assert_eq!(names[2], created.metadata.name);
    }

    #[tokio::test]
    async fn a_denial_is_decided_every_time() {
        let h = harness();
        let review = review_of(pod_with("akv://elsewhere/db"), false);
        for uid in ["u-1", "u-2", "u-3"] {
            let (_, body) = post(&h.app, with_uid(&review, uid)).await;
            assert_eq!(body["response"]["allowed"], false);
            assert_eq!(body["response"]["uid"], uid);
        }
        assert_eq!(
            h.metric(r#"kvinject_cache_lookups_total{cache="decision",result="hit"}"#),
            0.0
        );
    }

    async fn post(app: &Router, body: impl Into<Body>) -> (u16, Value) {
        let req = Request::post("/mutate")
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn review_of(pod: Value, dry_run: bool) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE", "namespace": "ns", "userInfo": {}, "dryRun": dry_run,
                "object": pod,
            }
        })
    }

    fn pod_with(value: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
               "spec": {"containers": [{"name": "c", "image": "i", "env": [{"name": "DB", "value": value}]}]}})
    }

    fn patched(pod: &Value, response: &Value) -> Value {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().expect("patch is a base64 string"))
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &patch).unwrap();
        doc
    }

    #[tokio::test]
    async fn a_reference_becomes_a_secret_key_ref_and_a_secret() {
        let h = harness();
        let pod = pod_with("akv://main/db");
        let (status, body) = post(&h.app, review_of(pod.clone(), false).to_string()).await;
        assert_eq!(status, 200);
        assert_eq!(body["response"]["allowed"], true, "{body}");
        assert_eq!(body["response"]["patchType"], "JSONPatch");
        let doc = patched(&pod, &body["response"]);
        let secret_name = doc["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        let written = h.writer.0.lock().unwrap().clone();
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].metadata.name.as_deref(), Some(secret_name.as_str()));
        assert_eq!(written[0].data.as_ref().unwrap()["value"].0, b"s3cret");
        assert!(
            !body.to_string().contains("s3cret"),
            "the value must not travel in the admission response"
        );
    }

    #[tokio::test]
    async fn a_dry_run_returns_the_same_patch_and_writes_nothing() {
        let h = harness();
        let pod = pod_with("akv://main/db");
        let (_, dry) = post(&h.app, review_of(pod.clone(), true).to_string()).await;
        assert!(h.writer.0.lock().unwrap().is_empty(), "a dry run wrote a Secret");
        let (_, real) = post(&h.app, review_of(pod, false).to_string()).await;
        assert_eq!(dry["response"]["patch"], real["response"]["patch"]);
        assert_eq!(h.writer.0.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_first_uses_share_one_fetch_and_one_create() {
        let h = harness();
        let body = review_of(pod_with("akv://main/shared"), false).to_string();
        let answers = futures::future::join_all((0..20).map(|_| post(&h.app, body.clone()))).await;
        assert!(
            answers
                .iter()
                .all(|(s, b)| *s == 200 && b["response"]["allowed"] == true)
        );
        assert_eq!(h.source.0.load(Ordering::SeqCst), 1, "Key Vault reads");
        assert_eq!(h.writer.0.lock().unwrap().len(), 1, "Secret creates");
    }

    #[tokio::test]
    async fn denials_carry_the_reason_and_the_uid() {
        let h = harness();
        for (value, want) in [
            (
                "akv://elsewhere/db",
                "container `c` env `DB`: vault `elsewhere` is not configured",
            ),
            (
                "akv://main/missing",
                "Key Vault secret akv://main/missing was not found",
            ),
            (
                "akv://main/bad_name",
                "secret name `bad_name` must be 1 to 127 characters",
            ),
        ] {
            let (status, body) = post(&h.app, review_of(pod_with(value), false).to_string()).await;
            assert_eq!(status, 200);
            assert_eq!(body["response"]["uid"], "u-1");
            assert_eq!(body["response"]["allowed"], false);
            let message = body["response"]["status"]["message"].as_str().unwrap();
            assert!(message.contains(want), "{message:?} should contain {want:?}");
        }
        assert!(h.writer.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_key_vault_answer_names_every_place_the_reference_is_used() {
        let h = harness();
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {
                "initContainers": [{"name": "init", "image": "i", "env": [{"name": "A", "value": "akv://main/missing"}]}],
                "containers": [{"name": "c", "image": "i", "env": [
                    {"name": "B", "value": "akv://main/missing"}, {"name": "OK", "value": "akv://main/db"},
                    {"name": "C", "value": "akv://main/missing"}]}]}});
        let (_, body) = post(&h.app, review_of(pod, false).to_string()).await;
        let message = body["response"]["status"]["message"].as_str().unwrap();
        assert_eq!(
            message,
            "init container `init` env `A`, container `c` env `B`, container `c` env `C`: \
             Key Vault secret akv://main/missing was not found"
        );
    }

    #[tokio::test]
    async fn a_denied_pod_leaves_no_secret_behind() {
        let h = harness();
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "env": [
                {"name": "GOOD", "value": "akv://main/db"}, {"name": "BAD", "value": "akv://main/missing"}]}]}});
        let (_, body) = post(&h.app, review_of(pod, false).to_string()).await;
        assert_eq!(body["response"]["allowed"], false);
        assert!(
            body["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("akv://main/missing was not found"),
            "{body}"
        );
        assert!(
            h.writer.0.lock().unwrap().is_empty(),
            "the good reference's Secret was written for a denied pod"
        );
    }

    #[tokio::test]
    async fn a_pod_without_references_is_allowed_without_a_patch() {
        let h = harness();
        let (_, body) = post(&h.app, review_of(pod_with("plain"), false).to_string()).await;
        assert_eq!(body["response"]["allowed"], true);
        assert!(body["response"].get("patch").is_none(), "{body}");
    }

    #[tokio::test]
    async fn garbage_gets_an_invalid_review_not_an_error_status() {
        let h = harness();
        for body in [
            "",
            "not json",
            "{}",
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        ] {
            let (status, review) = post(&h.app, body.to_owned()).await;
            assert_eq!(status, 200, "body {body:?}");
            assert_eq!(review["response"]["allowed"], false, "body {body:?}");
            assert_eq!(
                review["response"]["status"]["reason"], "InvalidRequest",
                "body {body:?}"
            );
            assert!(
                review["response"]["status"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("AdmissionReview"),
                "body {body:?}: {review}"
            );
        }
    }

    #[tokio::test]
    async fn the_answer_is_a_v1_admission_review_whatever_the_request_called_itself() {
        let h = harness();
        let mut r = review_of(pod_with("plain"), false);
        r["kind"] = "AdmissmonReview".into();
        r["apiVersion"] = "admission.k8s.io/v1beta1".into();
        let (_, body) = post(&h.app, r.to_string()).await;
        assert_eq!(
            (body["apiVersion"].as_str(), body["kind"].as_str()),
            (Some("admission.k8s.io/v1"), Some("AdmissionReview"))
        );
        assert_eq!(body["response"]["uid"], "u-1");
    }

    #[tokio::test]
    async fn a_review_without_a_pod_is_denied_by_uid() {
        let h = harness();
        let mut r = review_of(Value::Null, false);
        r["request"].as_object_mut().unwrap().remove("object");
        let (status, body) = post(&h.app, r.to_string()).await;
        assert_eq!(status, 200);
        assert_eq!(body["response"]["uid"], "u-1");
        assert_eq!(body["response"]["allowed"], false);
    }
}
