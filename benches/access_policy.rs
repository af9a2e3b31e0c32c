//! Warm admission with 1,000 AccessPolicy objects in the cache against warm admission with
//! one, side by side in the same run.
//!
//! Both sides answer the same AdmissionReview (a pod with three env references and a
//! registry credential) through the webhook's router, in process: every Secret the pod needs
//! is already materialized, so neither side calls Key Vault or the apiserver (checked), and
//! what differs is only the access check. TLS and the apiserver add the same constant to
//! both sides on a real cluster, so this in-process ratio is the stricter one.
//!
//! The 1,000 policies are what a shared cluster holds: 900 grant one team namespace each
//! (by name) and 100 grant by a namespace label selector that the pod's namespace does not
//! match; one of the named ones grants the pod's namespace.
//!
//! Run: `cargo bench --bench access_policy` (KVINJECT_BENCH_ROUNDS, default 30, of
//! KVINJECT_BENCH_ADMISSIONS, default 2000, admissions per side; rounds alternate sides).

use async_trait::async_trait;
use axum::{Router, body::Body, http::Request};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::runtime::{reflector::store::Writer, watcher};
use kvinject::{
    access::{NamespaceLabels, Policies, grant::Index, policy::AccessPolicy},
    inject::{Injector, SecretWriter, ServiceAccounts, WriteError},
    keyvault::source::{FetchError, Fetched, SecretSource},
    materialize,
    metrics::Metrics,
    mutate::{self, InjectConfig},
    reference::Reference,
    scope::Scope,
    webhook::{WebhookState, router},
};
use serde_json::json;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tower::ServiceExt;

const NAMESPACE: &str = "team-7";
const VERSION: &str = "0123456789abcdef0123456789abcdef";
const ALLOWED: &[u8] = br#""allowed":true"#;
const PATCHED: &[u8] = br#""patch":""#;

/// Counts calls; the warm path must make none.
#[derive(Default)]
struct NoCalls(AtomicUsize);

#[async_trait]
impl SecretSource for NoCalls {
    async fn fetch(
        &self,
        r: &Reference,
        _: Option<&kvinject::identity::WorkloadIdentity>,
    ) -> Result<Fetched, FetchError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err(FetchError::NotFound(r.to_string()))
    }
    async fn probe(&self, _: &str) -> Result<(), FetchError> {
        Ok(())
    }
}

#[async_trait]
impl SecretWriter for NoCalls {
    async fn create(&self, _: Secret) -> Result<(), WriteError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn policy(name: &str, spec: serde_json::Value) -> AccessPolicy {
    AccessPolicy::new(name, serde_json::from_value(spec).unwrap())
}

fn policies(n: usize) -> Vec<AccessPolicy> {
    let mut all = vec![policy(
        "team-7",
        json!({"vault": "main", "secrets": ["team-7-*"], "namespaces": {"names": [NAMESPACE]}}),
    )];
    for i in 1..n {
        all.push(if i % 10 == 0 {
            policy(
                &format!("selected-{i}"),
                json!({"vault": "main", "secrets": [format!("shared-{i}-*")],
                       "namespaces": {"selector": {"matchLabels": {"tier": format!("t{i}")}}}}),
            )
        } else {
            let ns = format!("team-{}", i + 1000);
            policy(
                &format!("p-{i}"),
                json!({"vault": "main", "secrets": [format!("{ns}-*")], "namespaces": {"names": [ns]}}),
            )
        });
    }
    all
}

fn review() -> serde_json::Value {
    let env: Vec<_> = (0..3)
        .map(|i| json!({"name": format!("S{i}"), "value": format!("akv://main/team-7-s{i}")}))
        .collect();
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE", "namespace": NAMESPACE, "userInfo": {}, "dryRun": false,
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "annotations": {"kvinject.io/image-pull-secrets": "akv://main/team-7-acr"}},
                "spec": {"serviceAccountName": "web", "containers": [{"name": "c", "image": "i", "env": env}]}},
        }
    })
}

/// A router whose caches hold every Secret the review's pod needs, and `n` policies.
fn warm_router(n: usize, calls: Arc<NoCalls>) -> Router {
    let config = InjectConfig {
        vaults: ["main".to_owned()].into(),
        ..Default::default()
    };
    let pod = serde_json::from_value(review()["request"]["object"].clone()).unwrap();
    let plan = mutate::plan(&pod, &config).unwrap();
    let mut secrets = Writer::<materialize::CachedSecret>::default();
    secrets.apply_watcher_event(&watcher::Event::Init);
    for needed in &plan.needed {
        let fetched = Fetched {
            value: kvinject::keyvault::SecretValue::new(r#"{"auths":{"r.example":{}}}"#),
            version: VERSION.into(),
        };
        let secret = materialize::desired_secret(NAMESPACE, needed, &fetched, &config.keys).unwrap();
        let cached = materialize::CachedSecret::new(&config.keys, &secret);
        secrets.apply_watcher_event(&watcher::Event::InitApply(cached));
    }
    secrets.apply_watcher_event(&watcher::Event::InitDone);
    let mut namespaces = Writer::<Namespace>::default();
    let mut ns = Namespace::default();
    ns.metadata.name = Some(NAMESPACE.into());
    ns.metadata.labels = Some([("team".to_owned(), "7".to_owned())].into());
    namespaces.apply_watcher_event(&watcher::Event::Apply(ns));
    let handle = Policies::default();
    handle.replace(Index::new(&policies(n)));
    let injector = Injector::new(
        config,
        calls.clone(),
        calls,
        secrets.as_reader(),
        Duration::from_secs(60),
        Metrics::default(),
    )
    .with_namespaces(NamespaceLabels::new(namespaces.as_reader(), None))
    .with_scope(Scope::new("team", []).unwrap())
    .with_identities(ServiceAccounts {
        store: Writer::<k8s_openapi::api::core::v1::ServiceAccount>::default().as_reader(),
        client: None,
        settings: Default::default(),
    })
    .with_access(handle);
    // The memo off: this measures deciding, and every round sends one review again.
    router(WebhookState {
        injector: Arc::new(injector),
        deadline: Duration::from_secs(5),
        memo: None,
    })
}

/// Answers `count` reviews one after another; the time per admission.
async fn round(app: &Router, body: &str, count: usize) -> Duration {
    let started = Instant::now();
    for _ in 0..count {
        let req = Request::post("/mutate")
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()));
        let res = app.clone().oneshot(req.unwrap()).await.unwrap();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        assert!(
            bytes.windows(ALLOWED.len()).any(|w| w == ALLOWED)
                && bytes.windows(PATCHED.len()).any(|w| w == PATCHED),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
    }
    started.elapsed() / count as u32
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rounds = env_usize("KVINJECT_BENCH_ROUNDS", 30).max(1);
    let count = env_usize("KVINJECT_BENCH_ADMISSIONS", 2000).max(1);
    let body = review().to_string();
    let calls = Arc::new(NoCalls::default());
    let (one, many) = (warm_router(1, calls.clone()), warm_router(1000, calls.clone()));
    // Warm both (allocators, caches), then alternate so drift on a shared machine hits both.
    round(&one, &body, count / 10 + 1).await;
    round(&many, &body, count / 10 + 1).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        if i % 2 == 0 {
            a.push(round(&one, &body, count).await);
            b.push(round(&many, &body, count).await);
        } else {
            b.push(round(&many, &body, count).await);
            a.push(round(&one, &body, count).await);
        }
    }
    assert_eq!(
        calls.0.load(Ordering::SeqCst),
        0,
        "the warm path called Key Vault or the apiserver"
    );
    let (a, b) = (median(a), median(b));
    let ratio = b.as_secs_f64() / a.as_secs_f64();
    println!(
        "access policy benchmark: warm admissions (3 env references + 1 registry credential), {rounds} rounds of {count} per side, median per admission"
    );
    println!("| policies in the cache | per admission | ratio |");
    println!("| --- | --- | --- |");
    println!("| 1 (baseline) | {a:?} | 1.00 |");
    println!("| 1,000 | {b:?} | {ratio:.3} |");
    println!("Key Vault and apiserver calls on both sides: 0");
}
