//! Pods that really run, on the bed's node (tests/testbed/node.sh: kube-scheduler, kubelet,
//! containerd): the container's process sees the value, kubelet restarts it and new
//! replicas start while the vault is stopped, files change in place after a rotation, and
//! rollouts reach Ready pods holding the new value.
//!
//! The containers print SHA-256 digests of what they see (`env=<hex>`, `file=<hex>`), never
//! the values, so no value reaches a log; the tests compare the digests with the seeded
//! values'. Pods use hostNetwork and tolerate the node's taint (every other test's pods
//! stay Pending and are reported Ready by hand).

use crate::{
    inject::reference,
    rotation::rotation_setup,
    support::{self, Setup},
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Event, Pod},
};
use kube::{
    Api, Client,
    api::{ListParams, LogParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::{process::Command, time::Duration};

/// The bed's node; a bed without one fails the test (the node needs root).
pub(crate) fn node() -> String {
    support::testbed()
        .node
        .clone()
        .expect("the bed has no node: run the tests as root (tests/testbed/node.sh)")
}

pub(crate) fn digest(value: &str) -> String {
    Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A shell loop that prints what the container sees every second: the digest of `$X`
/// and of the file `/etc/creds/x`.
const PRINT: &str = "while true; do \
    echo \"env=$(printf %s \"$X\" | sha256sum | cut -c1-64)\"; \
    echo \"file=$(sha256sum < /etc/creds/x | cut -c1-64)\"; sleep 1; done";

/// A pod template for the node: env `X` and file `/etc/creds/x` from `secret`,
/// `container_extra` merged into the container.
pub(crate) fn node_template(app: &str, secret: &str, annotations: Value, container_extra: Value) -> Value {
    let mut container = json!({
        "name": "app", "image": "localhost/busybox:bed", "imagePullPolicy": "Never",
        "command": ["sh", "-c", PRINT],
        "env": [{"name": "X", "value": reference(secret)}],
        "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds", "readOnly": true}]
    });
    container
        .as_object_mut()
        .unwrap()
        .extend(container_extra.as_object().unwrap().clone());
    json!({
        "metadata": {"labels": {"app": app}, "annotations": annotations},
        "spec": {
            "hostNetwork": true,
            "nodeSelector": {"kubernetes.io/hostname": node()},
            "tolerations": [{"key": "kvinject.test/node", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            "volumes": [{"name": "creds", "csi": {"driver": "kvinject.io", "volumeAttributes": {"x": reference(secret)}}}]
        }
    })
}

pub(crate) fn node_deployment(app: &str, replicas: i32, template: Value, annotations: Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": app, "annotations": annotations},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app}}, "template": template}
    }))
    .unwrap()
}

pub(crate) fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|c| c.restart_count).sum())
}

pub(crate) async fn ready_pods(s: &Setup, app: &str) -> Vec<Pod> {
    ready_pods_in(&s.client, &s.ns, app).await
}

pub(crate) async fn ready_pods_in(client: &Client, ns: &str, app: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(is_ready)
        .collect()
}

/// The last `env=` and `file=` digests the pod's running container printed.
pub(crate) async fn seen(s: &Setup, pod: &str) -> (Option<String>, Option<String>) {
    seen_in(&s.client, &s.ns, pod).await
}

pub(crate) async fn seen_in(client: &Client, ns: &str, pod: &str) -> (Option<String>, Option<String>) {
    let logs = Api::<Pod>::namespaced(client.clone(), ns)
        .logs(
            pod,
            &LogParams {
                tail_lines: Some(4),
                ..LogParams::default()
            },
        )
        .await
        .unwrap_or_default();
    let last = |key: &str| {
        logs.lines()
            .rev()
            .find_map(|l| l.strip_prefix(key))
            .map(str::to_owned)
    };
    (last("env="), last("file="))
}

/// Waits for `n` Ready pods of `app` whose containers all print `want` for env and file.
async fn ready_with(s: &Setup, app: &str, n: usize, want: &str, within: Duration) -> Vec<Pod> {
    ready_with_in(&s.client, &s.ns, app, n, want, within).await
}

pub(crate) async fn ready_with_in(
    client: &Client,
    ns: &str,
    app: &str,
    n: usize,
    want: &str,
    within: Duration,
) -> Vec<Pod> {
    let want = digest(want);
    let what = format!("{n} Ready pods of {app} seeing the value");
    support::eventually(within, &what, || async {
        let pods = ready_pods_in(client, ns, app).await;
        if pods.len() != n {
            return false;
        }
        for p in &pods {
            let (env, file) = seen_in(client, ns, p.metadata.name.as_deref().unwrap()).await;
            if env.as_deref() != Some(&want) || file.as_deref() != Some(&want) {
                return false;
            }
        }
        true
    })
    .await;
    ready_pods_in(client, ns, app).await
}

/// Kills the container's process from the runtime, as an OOM kill or a crash would.
fn kill_container(p: &Pod) {
    let id = p.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0]
        .container_id
        .clone()
        .unwrap();
    let id = id.strip_prefix("containerd://").unwrap();
    let node = p.spec.as_ref().unwrap().node_name.as_deref().unwrap();
    let sock = support::testbed()
        .dir
        .join("nodes")
        .join(node)
        .join("containerd.sock");
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&sock)
        .args(["-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", id])
        .output()
        .expect("running ctr");
    assert!(
        out.status.success(),
        "ctr tasks kill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates Deployment `app` (`replicas` pods of `template`, the Deployment annotated with
/// `annotations`) and waits until that many of its pods run Ready and print `value`.
async fn deployed(
    s: &Setup,
    app: &str,
    replicas: i32,
    template: Value,
    annotations: Value,
    value: &str,
) -> (Api<Deployment>, Vec<Pod>) {
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    deployments
        .create(
            &PostParams::default(),
            &node_deployment(app, replicas, template, annotations),
        )
        .await
        .unwrap();
    let ready = ready_with(
        s,
        app,
        usize::try_from(replicas).unwrap(),
        value,
        Duration::from_secs(60),
    )
    .await;
    (deployments, ready)
}

#[tokio::test]
async fn a_running_container_sees_its_value_in_env_and_in_a_file() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("node-values", &[]).await;
    let name = support::unique("node-value");
    let value = support::distinctive_value();
    support::seed_secret(&name, &value).await;
    let mut pod = node_template("single", &name, json!({}), json!({}));
    pod["metadata"]["name"] = json!("single");
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap())
        .await
        .expect("admitted");
    let want = digest(&value);
    support::eventually(
        Duration::from_secs(60),
        "the container to print what it sees",
        || async { seen(&s, "single").await == (Some(want.clone()), Some(want.clone())) },
    )
    .await;
    let running = pods.get("single").await.unwrap();
    assert_eq!(
        running.spec.as_ref().unwrap().node_name.as_deref(),
        Some(node().as_str())
    );
    support::eventually(
        Duration::from_secs(20),
        "kubelet to report the pod Ready",
        || async { is_ready(&pods.get("single").await.unwrap()) },
    )
    .await;
}

#[tokio::test]
async fn with_the_vault_stopped_kubelet_restarts_a_killed_container_and_new_replicas_start() {
    let _vault = support::VAULT.write().await; // no other test may use the vault meanwhile
    let s = support::setup("node-offline", &[]).await;
    let name = support::unique("node-offline");
    let value = support::distinctive_value();
    support::seed_secret(&name, &value).await;
    let template = node_template("offline", &name, json!({}), json!({}));
    let (deployments, first) = deployed(&s, "offline", 1, template, json!({}), &value).await;

    support::testbed_cmd("vault-stop");
    let _restart = support::RestartVault;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let pod_name = first[0].metadata.name.clone().unwrap();
    kill_container(&first[0]);
    support::eventually(
        Duration::from_secs(60),
        "kubelet to restart the killed container",
        || async {
            let p = pods.get(&pod_name).await.unwrap();
            restarts(&p) >= 1 && is_ready(&p)
        },
    )
    .await;
    let want = digest(&value);
    support::eventually(
        Duration::from_secs(30),
        "the restarted container to see the value",
        || async { seen(&s, &pod_name).await == (Some(want.clone()), Some(want.clone())) },
    )
    .await;

    // Scaling up admits new pods from what was materialized; they start and see the value.
    deployments
        .patch(
            "offline",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    ready_with(&s, "offline", 3, &value, Duration::from_secs(90)).await;
}

#[tokio::test]
async fn after_a_rotation_the_file_changes_in_place_and_the_container_keeps_running() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("node-files", &[]).await;
    let name = support::unique("node-rotated");
    let (first, second) = (support::distinctive_value(), support::distinctive_value());
    support::seed_secret(&name, &first).await;
    let template = node_template(
        "files",
        &name,
        json!({"kvinject.io/refresh-interval": "1s"}),
        json!({}),
    );
    let (_, before) = deployed(&s, "files", 1, template, json!({}), &first).await;
    let pod_name = before[0].metadata.name.clone().unwrap();

    support::seed_secret(&name, &second).await;
    let (old, new) = (digest(&first), digest(&second));
    // kubelet refreshes Secret volumes within its sync period (5 s on the bed) plus its
    // cache's TTL; kvinject's check runs every second here.
    support::eventually(
        Duration::from_secs(90),
        "the file to hold the new value",
        || async { seen(&s, &pod_name).await.1.as_deref() == Some(new.as_str()) },
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let after = pods.get(&pod_name).await.unwrap();
    assert_eq!(restarts(&after), 0, "the container was not restarted");
    assert_eq!(after.metadata.uid, before[0].metadata.uid, "the same pod");
    assert_eq!(
        seen(&s, &pod_name).await.0.as_deref(),
        Some(old.as_str()),
        "the env of a running process cannot change: it still holds the value it started with"
    );
}

#[tokio::test]
async fn a_rotation_with_the_restart_strategy_rolls_to_ready_pods_holding_the_new_value() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("node-roll", &[]).await;
    let name = support::unique("node-roll");
    let (first, second) = (support::distinctive_value(), support::distinctive_value());
    support::seed_secret(&name, &first).await;
    let template = node_template(
        "roll",
        &name,
        json!({"kvinject.io/refresh-interval": "1s"}),
        json!({}),
    );
    let rolled = json!({"kvinject.io/rollout-on-rotation": "true"});
    let (_, before) = deployed(&s, "roll", 2, template, rolled, &first).await;

    support::seed_secret(&name, &second).await;
    let after = ready_with(&s, "roll", 2, &second, Duration::from_secs(120)).await;
    for p in &after {
        assert!(
            before.iter().all(|b| b.metadata.uid != p.metadata.uid),
            "every pod was replaced"
        );
    }
    assert_eq!(s.kvinject.metric("kvinject_rollouts_total", &[]).await, 1.0);
}

#[tokio::test]
async fn evict_waits_for_ready_replacements_and_one_that_never_becomes_ready_halts_the_roll() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("node-evict", &["--evict-ready-timeout", "30s"]).await;
    let name = support::unique("node-evict");
    let (first, second, bad) = (
        support::distinctive_value(),
        support::distinctive_value(),
        support::distinctive_value(),
    );
    support::seed_secret(&name, &first).await;
    // Ready unless the value is the bad one: the container marks itself ready by a file,
    // and kubelet's readiness probe looks for it.
    let ready_unless_bad = format!(
        "[ \"$(printf %s \"$X\" | sha256sum | cut -c1-64)\" = {} ] || touch /tmp/ready; {PRINT}",
        digest(&bad)
    );
    let template = node_template(
        "evict",
        &name,
        json!({"kvinject.io/refresh-interval": "1s"}),
        json!({
            "command": ["sh", "-c", ready_unless_bad],
            "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1,
                               "timeoutSeconds": 5, "failureThreshold": 3}
        }),
    );
    let evicted = json!({"kvinject.io/rollout-on-rotation": "true", "kvinject.io/rollout-strategy": "evict"});
    let (_, originals) = deployed(&s, "evict", 2, template, evicted, &first).await;

    // A good value: each eviction waits for the previous replacement to be Ready. Sampled
    // every 200 ms: when the last original is seen evicted, a replacement is already Ready.
    support::seed_secret(&name, &second).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let is_original = |p: &Pod| originals.iter().any(|o| o.metadata.uid == p.metadata.uid);
    let mut ready_at_last_eviction = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let now = pods
            .list(&ListParams::default().labels("app=evict"))
            .await
            .unwrap()
            .items;
        let originals_serving = now
            .iter()
            .filter(|p| is_original(p) && p.metadata.deletion_timestamp.is_none())
            .count();
        let ready_replacements = now.iter().filter(|p| !is_original(p) && is_ready(p)).count();
        if originals_serving == 0 && ready_at_last_eviction.is_none() {
            ready_at_last_eviction = Some(ready_replacements);
        }
        if originals_serving == 0 && ready_replacements == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the evictions"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        ready_at_last_eviction >= Some(1),
        "the last original was evicted only once a replacement was Ready: {ready_at_last_eviction:?}"
    );
    let replaced = ready_with(&s, "evict", 2, &second, Duration::from_secs(30)).await;
    let halted = || async {
        Api::<Event>::namespaced(s.client.clone(), &s.ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("RolloutHalted"))
    };
    assert!(
        !halted().await,
        "every replacement of the good value became Ready in time"
    );

    // A value the app cannot start with: the first replacement never becomes Ready, and the
    // roll stops there, with the other pod still serving.
    support::seed_secret(&name, &bad).await;
    support::eventually(Duration::from_secs(120), "a RolloutHalted Event", halted).await;
    let now = pods
        .list(&ListParams::default().labels("app=evict"))
        .await
        .unwrap()
        .items;
    let survivors: Vec<_> = replaced
        .iter()
        .filter(|r| {
            now.iter()
                .any(|p| p.metadata.uid == r.metadata.uid && is_ready(p))
        })
        .collect();
    let states: Vec<String> = now
        .iter()
        .map(|p| {
            format!(
                "{} ready={} deleting={} restarts={}",
                p.metadata.name.as_deref().unwrap_or_default(),
                is_ready(p),
                p.metadata.deletion_timestamp.is_some(),
                restarts(p)
            )
        })
        .collect();
    assert_eq!(
        survivors.len(),
        1,
        "one pod of the previous value is left serving: {states:?}"
    );
    assert_eq!(
        ready_pods(&s, "evict").await.len(),
        1,
        "the replacement is not Ready"
    );
}
