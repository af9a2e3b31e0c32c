//! kube-apiserver restarts during a stream of admissions and a rotation (reliability issue,
//! part 3). A test binary of its own: cargo runs test binaries one after another, and
//! stopping the apiserver would break every test of the e2e binary running beside it.
//!
//! While the apiserver is down, the stream goes straight to kvinject (as another apiserver
//! replica would send it): the warm path answers from its caches throughout. After the
//! restart, the watches resume (a Secret created afterwards is served warm, with no Key
//! Vault read), the rotation completes, and no Secret is created twice or left half-written.

#[path = "../support/mod.rs"]
mod support;

use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{Pod, Secret},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::{Value, json};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

fn reference(name: &str) -> String {
    format!("akv://{}/{name}", support::testbed().vault_name)
}

fn pod(name: &str, secret: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1",
                                    "env": [{"name": "X", "value": reference(secret)}]}]}})
}

/// What the apiserver would send kvinject for `pod` in `ns`.
fn review(ns: &str, uid: u64, pod: &Value) -> Value {
    let mut object = pod.clone();
    object["metadata"]["namespace"] = json!(ns);
    object["spec"]["serviceAccountName"] = json!("default");
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
           "request": {"uid": format!("restart-{uid}"), "kind": {"group": "", "version": "v1", "kind": "Pod"},
                       "resource": {"group": "", "version": "v1", "resource": "pods"},
                       "operation": "CREATE", "namespace": ns,
                       "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                       "dryRun": false, "object": object}})
}

/// Posts a review to kvinject: (allowed, patched, denial message).
async fn post(http: &reqwest::Client, url: &str, review: &Value) -> Result<(bool, bool, String), String> {
    let res = http
        .post(url)
        .header("content-type", "application/json")
        .body(review.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status();
    let bytes = res.bytes().await.map_err(|e| format!("{status}: {e}"))?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{status}: {e}"))?;
    let response = &body["response"];
    Ok((
        response["allowed"] == json!(true),
        response["patch"].is_string() || response["patch"].is_array(),
        response["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ))
}

/// The tests here stop or freeze the apiserver: one at a time.
static APISERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Lets a frozen apiserver answer again when the test ends, however it ends.
struct ResumeApiserver;
impl Drop for ResumeApiserver {
    fn drop(&mut self) {
        support::testbed_cmd("apiserver-resume");
    }
}

/// Starts the apiserver again when the test ends, however it ends.
struct StartApiserver;
impl Drop for StartApiserver {
    fn drop(&mut self) {
        support::testbed_cmd("apiserver-start");
    }
}

#[tokio::test]
async fn an_apiserver_restart_keeps_the_warm_path_answering_and_watches_resume() {
    let _apiserver = APISERVER.lock().await;
    let mut args = vec![
        "--rotation",
        "true",
        "--refresh-interval",
        "1s",
        "--reconcile-interval",
        "1s",
        "--lease-namespace",
        "default",
        "--lease-duration",
        "3s",
    ];
    let lease = support::unique("lease");
    args.extend(["--lease-name", &lease]);
    let s = support::setup("restart", &args).await;
    let warm = support::unique("restart-warm");
    let rotating = support::unique("restart-rotating");
    support::seed_secret(&warm, &support::distinctive_value()).await;
    support::seed_secret(&rotating, &support::distinctive_value()).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod("warm", &warm)).unwrap(),
    )
    .await
    .expect("materialized while everything is up");
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    let d = json!({"metadata": {"name": "app", "annotations": {"kvinject.io/rollout-on-rotation": "true"}},
                   "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "app"}},
                            "template": {"metadata": {"labels": {"app": "app"}, "annotations": {"kvinject.io/refresh-interval": "1s"}},
                                         "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1",
                                                                  "env": [{"name": "X", "value": reference(&rotating)}]}]}}}});
    deployments
        .create(&PostParams::default(), &serde_json::from_value(d).unwrap())
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(30),
        "the versions recorded on the Deployment",
        || async {
            deployments
                .get("app")
                .await
                .unwrap()
                .metadata
                .annotations
                .is_some_and(|a| a.contains_key("kvinject.io/secret-versions"))
        },
    )
    .await;

    // The stream: warm admissions straight to kvinject, every 20 ms, throughout.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&support::testbed().ca).unwrap()).unwrap();
    let http = reqwest::Client::builder().tls_certs_merge([ca]).build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failures) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let stream = {
        let (http, url, ns) = (http.clone(), s.kvinject.url(), s.ns.clone());
        let (stop, answered, failures) = (stop.clone(), answered.clone(), failures.clone());
        let body = pod("stream", &warm);
        tokio::spawn(async move {
            let mut uid = 0;
            while !stop.load(Ordering::SeqCst) {
                uid += 1;
                match post(&http, &url, &review(&ns, uid, &body)).await {
                    Ok((true, true, _)) => {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    support::testbed_cmd("apiserver-stop");
    let restart = StartApiserver;
    let during = answered.load(Ordering::SeqCst);
    // A new version while the apiserver is away: the controller cannot write it yet.
    let new_value = support::distinctive_value();
    let v2 = support::seed_secret(&rotating, &new_value).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let while_down = answered.load(Ordering::SeqCst) - during;
    drop(restart); // starts the apiserver and waits for /readyz
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    stream.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    eprintln!(
        "{} warm admissions answered, {while_down} of them while the apiserver was down",
        answered.load(Ordering::SeqCst)
    );
    assert!(
        failures.is_empty(),
        "every warm admission was answered, allowed and patched: {} failed, first {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        while_down >= 100,
        "the stream kept going while the apiserver was down ({while_down} answers in 6 s)"
    );

    // The rotation completes once the apiserver is back, and rolls the Deployment once.
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    support::eventually(
        Duration::from_secs(60),
        "the rotation after the restart",
        || async {
            secrets
                .list(&ListParams::default())
                .await
                .map(|l| {
                    l.items.iter().any(|x| {
                        x.metadata
                            .annotations
                            .as_ref()
                            .is_some_and(|a| a.get("kvinject.io/version") == Some(&v2))
                            && x.data
                                .as_ref()
                                .is_some_and(|d| d["value"].0 == new_value.as_bytes())
                    })
                })
                .unwrap_or(false)
        },
    )
    .await;
    support::eventually(Duration::from_secs(60), "the Deployment to roll once", || async {
        Api::<ReplicaSet>::namespaced(s.client.clone(), &s.ns)
            .list(&ListParams::default().labels("app=app"))
            .await
            .map(|l| l.items.len() == 2)
            .unwrap_or(false)
    })
    .await;

    // The Secret watch resumed: a Secret created now is served warm from the cache.
    let after = support::unique("restart-after");
    support::seed_secret(&after, &support::distinctive_value()).await;
    support::eventually(
        Duration::from_secs(30),
        "a first use after the restart",
        || async {
            pods.create(
                &PostParams::default(),
                &serde_json::from_value(pod("after", &after)).unwrap(),
            )
            .await
            .is_ok()
        },
    )
    .await;
    let reads_of = |c: &Value| {
        c["secrets_get_by_name"][after.to_lowercase()]
            .as_u64()
            .unwrap_or(0)
    };
    let reads = reads_of(&support::vault_counters().await);
    support::eventually(
        Duration::from_secs(10),
        "the new Secret in kvinject's cache",
        || async {
            matches!(
                post(
                    &http,
                    &s.kvinject.url(),
                    &review(&s.ns, 0, &pod("warm-after", &after))
                )
                .await,
                Ok((true, true, _))
            )
        },
    )
    .await;
    assert_eq!(
        reads_of(&support::vault_counters().await),
        reads,
        "served from the watch cache: no Key Vault read"
    );

    // One Secret per reference, each whole: value, version and seal.
    let ours = secrets
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=kvinject"))
        .await
        .unwrap()
        .items;
    let mut references: Vec<String> = ours
        .iter()
        .map(|x| x.metadata.annotations.as_ref().unwrap()["kvinject.io/reference"].clone())
        .collect();
    references.sort();
    let mut expected = vec![reference(&warm), reference(&rotating), reference(&after)];
    expected.sort();
    assert_eq!(references, expected, "one Secret per reference");
    for x in &ours {
        let a = x.metadata.annotations.as_ref().unwrap();
        assert!(
            a.contains_key("kvinject.io/version")
                && a.contains_key("kvinject.io/signature")
                && x.data.as_ref().is_some_and(|d| !d["value"].0.is_empty()),
            "Secret {} is whole",
            x.metadata.name.as_deref().unwrap_or("?")
        );
    }
    let logs = s.kvinject.strict_logs();
    assert!(
        !logs.contains("panicked"),
        "nothing panicked: {}",
        s.kvinject.log.display()
    );
}

/// An apiserver that stops answering (SIGSTOP: connections stay open, calls hang) for longer
/// than the lease: the leader's Lease calls time out, it steps down and stops acting (no more
/// Key Vault reads for rotation, its hung sweep cancelled), and its sync age grows, since no
/// one can be seen to lead. When the apiserver answers again, rotation resumes.
#[tokio::test]
async fn a_frozen_apiserver_makes_the_leader_step_down_and_staleness_show() {
    let _apiserver = APISERVER.lock().await;
    let lease = support::unique("lease");
    let args = [
        "--rotation",
        "true",
        "--refresh-interval",
        "1s",
        "--reconcile-interval",
        "1s",
        "--lease-namespace",
        "default",
        "--lease-duration",
        "3s",
        "--lease-name",
        &lease,
    ];
    let s = support::setup("freeze", &args).await;
    let rotating = support::unique("freeze-rotating");
    support::seed_secret(&rotating, &support::distinctive_value()).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let mut p: Pod = serde_json::from_value(pod("uses", &rotating)).unwrap();
    p.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("kvinject.io/refresh-interval".into(), "1s".into());
    pods.create(&PostParams::default(), &p).await.unwrap();
    support::eventually(Duration::from_secs(20), "kvinject to lead", || async {
        s.kvinject.strict_metric("kvinject_rotation_leader", &[]).await == 1.0
    })
    .await;
    let reads = || async {
        support::vault_counters().await["secrets_get_by_name"][rotating.to_lowercase()]
            .as_u64()
            .unwrap_or(0)
    };
    let first = reads().await;
    support::eventually(
        Duration::from_secs(10),
        "the controller checking every second",
        || async { reads().await >= first + 2 },
    )
    .await;

    support::testbed_cmd("apiserver-pause");
    let resume = ResumeApiserver;
    support::eventually(
        Duration::from_secs(10),
        "the leader to step down (lease 3 s)",
        || async { s.kvinject.strict_metric("kvinject_rotation_leader", &[]).await == 0.0 },
    )
    .await;
    let stepped_down = reads().await;
    let age = s
        .kvinject
        .strict_metric("kvinject_secret_sync_age_seconds", &[])
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = s
        .kvinject
        .strict_metric("kvinject_secret_sync_age_seconds", &[])
        .await;
    let reads_since = reads().await - stepped_down;
    drop(resume);
    assert!(
        later >= age + 4.0,
        "the sync age grows while no one can be seen to lead: {age} then {later}"
    );
    assert!(
        reads_since <= 1,
        "a replica that stepped down stops acting: {reads_since} Key Vault reads in 5 s after it did"
    );

    // The apiserver answers again: the controller leads and rotates again.
    support::eventually(Duration::from_secs(20), "kvinject to lead again", || async {
        s.kvinject.strict_metric("kvinject_rotation_leader", &[]).await == 1.0
    })
    .await;
    let v2 = support::seed_secret(&rotating, &support::distinctive_value()).await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    support::eventually(
        Duration::from_secs(20),
        "the rotation after the freeze",
        || async {
            secrets.list(&ListParams::default()).await.is_ok_and(|l| {
                l.items.iter().any(|x| {
                    x.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.get("kvinject.io/version") == Some(&v2))
                })
            })
        },
    )
    .await;
    assert!(
        s.kvinject
            .strict_metric("kvinject_secret_sync_age_seconds", &[])
            .await
            < 5.0,
        "fresh again"
    );
}
