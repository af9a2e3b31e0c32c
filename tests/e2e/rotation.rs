//! Rotation on the test bed: a new Key Vault version reaches the materialized Secret and
//! rolls opted-in workloads once; restarts and leadership moves roll nothing.

use crate::{
    inject::{pod, reference},
    support::{self, Kvinject, Setup},
};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{Event, Pod, Secret},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;
use std::time::Duration;

/// Rotation flags for a test: its own Lease, fast reconciles; polling every `refresh`
/// unless a pod asks for less.
pub(crate) fn rotation_args(lease: &str, refresh: &str) -> Vec<String> {
    [
        "--rotation",
        "true",
        "--refresh-interval",
        refresh,
        "--reconcile-interval",
        "1s",
        "--lease-namespace",
        "default",
        "--lease-name",
        lease,
        "--lease-duration",
        "3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A namespace, webhook and kvinject running the rotation controller on its own Lease.
/// The caller holds `VAULT` and `ROTATION`.
pub(crate) async fn rotation_setup(prefix: &str, extra: &[&str]) -> Setup {
    rotation_setup_every(prefix, "1h", extra).await
}

/// `rotation_setup` with checks every `refresh` by default.
pub(crate) async fn rotation_setup_every(prefix: &str, refresh: &str, extra: &[&str]) -> Setup {
    let mut args = rotation_args(&support::unique("lease"), refresh);
    args.extend(extra.iter().map(|s| s.to_string()));
    support::setup(prefix, &args.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// A Deployment `app` of two replicas that rolls by eviction, its pods referring to a new
/// secret (seeded): its Api and the secret's name.
async fn two_evicting_replicas(s: &Setup, app: &str, prefix: &str) -> (Api<Deployment>, String) {
    let name = support::unique(prefix);
    support::seed_secret(&name, &support::distinctive_value()).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    let mut d = deployment(
        app,
        &name,
        json!({"kvinject.io/rollout-on-rotation": "true", "kvinject.io/rollout-strategy": "evict"}),
    );
    d.spec.as_mut().unwrap().replicas = Some(2);
    deployments.create(&PostParams::default(), &d).await.unwrap();
    (deployments, name)
}

pub(crate) fn deployment(name: &str, secret: &str, annotations: serde_json::Value) -> Deployment {
    workload(name, secret, annotations, json!({"replicas": 1}))
}

/// A Deployment, StatefulSet or DaemonSet (`spec_extra` adds to its spec) whose pods refer
/// to `secret` in one env entry and ask for a check every second.
pub(crate) fn workload<K: serde::de::DeserializeOwned>(
    name: &str,
    secret: &str,
    annotations: serde_json::Value,
    spec_extra: serde_json::Value,
) -> K {
    let mut spec = json!({
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {"labels": {"app": name}, "annotations": {"kvinject.io/refresh-interval": "1s"}},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1", "env": [{"name": "X", "value": reference(secret)}]}]}
        }
    });
    spec.as_object_mut()
        .unwrap()
        .extend(spec_extra.as_object().unwrap().clone());
    serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}, "spec": spec}))
        .unwrap()
}

pub(crate) fn template_hash(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get("kvinject.io/secret-versions")
        .cloned()
}

pub(crate) fn stored_hash(d: &Deployment) -> Option<String> {
    d.metadata
        .annotations
        .as_ref()?
        .get("kvinject.io/secret-versions")
        .cloned()
}

async fn materialized(s: &Setup, deployment: &str) -> Secret {
    let name = secret_of_pod(&s.client, &s.ns, &format!("app={deployment}")).await;
    Api::<Secret>::namespaced(s.client.clone(), &s.ns)
        .get(&name)
        .await
        .unwrap()
}

/// The Secret the first env entry of a pod matching `selector` was rewritten to, once
/// such a pod exists.
pub(crate) async fn secret_of_pod(client: &kube::Client, ns: &str, selector: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let secret_of = |p: &Pod| {
        p.spec.as_ref()?.containers[0].env.as_ref()?[0]
            .value_from
            .as_ref()?
            .secret_key_ref
            .as_ref()
            .map(|r| r.name.clone())
    };
    let selector = ListParams::default().labels(selector);
    support::eventually(Duration::from_secs(30), "an injected pod", || async {
        pods.list(&selector)
            .await
            .unwrap()
            .items
            .iter()
            .any(|p| secret_of(p).is_some())
    })
    .await;
    pods.list(&selector)
        .await
        .unwrap()
        .items
        .iter()
        .find_map(secret_of)
        .unwrap()
}

pub(crate) fn version(secret: &Secret) -> String {
    secret.metadata.annotations.as_ref().unwrap()["kvinject.io/version"].clone()
}

pub(crate) async fn replica_sets(s: &Setup, app: &str) -> usize {
    Api::<ReplicaSet>::namespaced(s.client.clone(), &s.ns)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items
        .len()
}

#[tokio::test]
async fn a_new_version_updates_the_secret_and_restarts_opted_in_deployments_once() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("rotate", &[]).await;
    let name = support::unique("rotating");
    let (first, second) = (support::distinctive_value(), support::distinctive_value());
    let v1 = support::seed_secret(&name, &first).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    deployments
        .create(
            &PostParams::default(),
            &deployment("opted", &name, json!({"kvinject.io/rollout-on-rotation": "true"})),
        )
        .await
        .unwrap();
    deployments
        .create(&PostParams::default(), &deployment("bystander", &name, json!({})))
        .await
        .unwrap();
    let secret = materialized(&s, "opted").await;
    assert_eq!(version(&secret), v1);

    // First sight records the versions on the workload's metadata and rolls nothing.
    support::eventually(
        Duration::from_secs(20),
        "the baseline on the opted-in Deployment",
        || async { stored_hash(&deployments.get("opted").await.unwrap()).is_some() },
    )
    .await;
    let before = deployments.get("opted").await.unwrap();
    assert_eq!(
        template_hash(&before),
        None,
        "recording the baseline must not touch the pod template"
    );
    assert_eq!(replica_sets(&s, "opted").await, 1);

    let v2 = support::seed_secret(&name, &second).await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let secret_name = secret.metadata.name.clone().unwrap();
    support::eventually(
        Duration::from_secs(20),
        "the Secret to follow the new version",
        || async {
            let now = secrets.get(&secret_name).await.unwrap();
            version(&now) == v2 && now.data.as_ref().unwrap()["value"].0 == second.as_bytes()
        },
    )
    .await;
    support::eventually(
        Duration::from_secs(20),
        "the opted-in Deployment to roll",
        || async { template_hash(&deployments.get("opted").await.unwrap()).is_some() },
    )
    .await;
    support::eventually(Duration::from_secs(30), "a second ReplicaSet", || async {
        replica_sets(&s, "opted").await == 2
    })
    .await;
    let rolled = template_hash(&deployments.get("opted").await.unwrap());

    // Several more sweeps and reconciles: the same versions never roll it again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = deployments.get("opted").await.unwrap();
    assert_eq!(template_hash(&after), rolled, "rolled exactly once");
    assert_eq!(replica_sets(&s, "opted").await, 2);
    assert_eq!(s.kvinject.metric("kvinject_rollouts_total", &[]).await, 1.0);
    let bystander = deployments.get("bystander").await.unwrap();
    assert_eq!(
        template_hash(&bystander),
        None,
        "a Deployment that did not opt in is not rolled"
    );
    assert_eq!(stored_hash(&bystander), None);

    // The new ReplicaSet's pods use the Secret, which already holds the new value.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let new_pods = pods
        .list(&ListParams::default().labels("app=opted"))
        .await
        .unwrap();
    assert!(new_pods.items.iter().any(|p| {
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("kvinject.io/secret-versions"))
            == rolled.as_ref()
    }));

    let events: Api<Event> = Api::namespaced(s.client.clone(), &s.ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == "Rotated") && reasons.iter().any(|r| r == "RolloutOnRotation"),
        "{reasons:?}"
    );
    let logs = s.kvinject.logs();
    assert!(
        !logs.contains(&first) && !logs.contains(&second),
        "a value reached the log"
    );
}

#[tokio::test]
async fn restarts_and_lease_moves_roll_nothing_and_only_the_holder_polls() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let lease = support::unique("lease");
    let args = rotation_args(&lease, "1h");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut s = support::setup("leader", &args).await;
    let name = support::unique("steady");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    deployments
        .create(
            &PostParams::default(),
            &deployment(
                "steady",
                &name,
                json!({"kvinject.io/rollout-on-rotation": "true"}),
            ),
        )
        .await
        .unwrap();
    let in_use = materialized(&s, "steady").await.metadata.name.unwrap();
    support::eventually(Duration::from_secs(20), "the baseline", || async {
        stored_hash(&deployments.get("steady").await.unwrap()).is_some()
    })
    .await;

    // A second replica on the same Lease: it waits while the first polls.
    let follower = Kvinject::start(&args).await;
    let from = s.kvinject.metric("kvinject_keyvault_requests_total", &[]).await;
    support::eventually(Duration::from_secs(10), "the holder polling on", || async {
        s.kvinject.metric("kvinject_keyvault_requests_total", &[]).await >= from + 2.0
    })
    .await;
    assert_eq!(
        follower.metric("kvinject_keyvault_requests_total", &[]).await,
        0.0,
        "the follower does not poll"
    );

    // The leader restarts: the follower takes over within the lease duration; nothing rolls.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(s.client.clone(), "default");
    let holder = || async {
        leases
            .get(&lease)
            .await
            .ok()
            .and_then(|l| l.spec?.holder_identity)
    };
    let before = holder().await.expect("a holder");
    assert_eq!(s.kvinject.metric("kvinject_rotation_leader", &[]).await, 1.0);
    s.kvinject.restart(&args).await;
    support::eventually(Duration::from_secs(15), "the Lease to move", || async {
        holder().await.is_some_and(|h| h != before)
    })
    .await;
    support::eventually(Duration::from_secs(5), "exactly one replica leading", || async {
        follower.metric("kvinject_rotation_leader", &[]).await
            + s.kvinject.metric("kvinject_rotation_leader", &[]).await
            == 1.0
    })
    .await;
    support::eventually(
        Duration::from_secs(15),
        "a replica to poll again after the restart",
        || async {
            follower.metric("kvinject_keyvault_requests_total", &[]).await
                + s.kvinject.metric("kvinject_keyvault_requests_total", &[]).await
                >= 2.0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steady = deployments.get("steady").await.unwrap();
    assert_eq!(
        template_hash(&steady),
        None,
        "no rollout after a restart or a leader change"
    );
    assert_eq!(replica_sets(&s, "steady").await, 1);
    assert_eq!(
        follower.metric("kvinject_rollouts_total", &[]).await
            + s.kvinject.metric("kvinject_rollouts_total", &[]).await,
        0.0
    );
    // A new leader acts only on synced caches: a Secret in use is never marked for collection.
    let secret = Api::<Secret>::namespaced(s.client.clone(), &s.ns)
        .get(&in_use)
        .await
        .unwrap();
    assert!(
        !secret
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("kvinject.io/unreferenced-since")
    );
}

#[tokio::test]
async fn with_the_vault_stopped_secrets_stay_and_staleness_rises() {
    let _vault = support::VAULT.write().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("stale", &[]).await;
    let name = support::unique("stale");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    deployments
        .create(
            &PostParams::default(),
            &deployment("stale", &name, json!({"kvinject.io/rollout-on-rotation": "true"})),
        )
        .await
        .unwrap();
    let before = materialized(&s, "stale").await;
    // Five more references from the same vault, all checked every second (a sweep reads
    // them concurrently).
    let others: Vec<String> = (0..5).map(|i| format!("{name}-{i}")).collect();
    for o in &others {
        support::seed_secret(o, &support::distinctive_value()).await;
    }
    let (env_names, refs): (Vec<String>, Vec<String>) = others
        .iter()
        .enumerate()
        .map(|(i, o)| (format!("O{i}"), reference(o)))
        .unzip();
    let env: Vec<(&str, &str)> = env_names
        .iter()
        .map(String::as_str)
        .zip(refs.iter().map(String::as_str))
        .collect();
    let many = pod("many", &env, json!({"kvinject.io/refresh-interval": "1s"}));
    let many = Api::<Pod>::namespaced(s.client.clone(), &s.ns)
        .create(&PostParams::default(), &many)
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let mut kept = Vec::new();
    for e in many.spec.unwrap().containers[0].env.clone().unwrap() {
        kept.push(
            secrets
                .get(&e.value_from.unwrap().secret_key_ref.unwrap().name)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // the controller follows all six

    support::testbed_cmd("vault-stop");
    let _restart = support::RestartVault;
    support::eventually(Duration::from_secs(20), "staleness above 4 s", || async {
        s.kvinject.metric("kvinject_secret_sync_age_seconds", &[]).await > 4.0
    })
    .await;
    // How many reads an outage costs is unit-tested (rotation::tests, with a vault double);
    // here: none of the six Secrets lost or changed its value.
    for k in &kept {
        let now = secrets.get(&k.metadata.name.clone().unwrap()).await.unwrap();
        assert_eq!((version(&now), now.data), (version(k), k.data.clone()));
    }
    let after = Api::<Secret>::namespaced(s.client.clone(), &s.ns)
        .get(&before.metadata.name.clone().unwrap())
        .await
        .unwrap();
    assert_eq!(
        after.data, before.data,
        "a failed check never blanks or changes the Secret"
    );
    assert_eq!(version(&after), version(&before));
    assert!(
        s.kvinject
            .metric("kvinject_keyvault_requests_total", &["result=\"unreachable\""])
            .await
            >= 1.0
    );
    let events: Api<Event> = Api::namespaced(s.client.clone(), &s.ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "KeyVaultUnreachable"), "{reasons:?}");
}

#[tokio::test]
async fn unreferenced_secrets_are_collected_after_the_grace_period_and_foreign_ones_never() {
    use crate::inject::{create, pod};
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("gc", &["--gc-grace-period", "3s"]).await;
    let (gone, kept) = (support::unique("gc-gone"), support::unique("gc-kept"));
    support::seed_secret(&gone, &support::distinctive_value()).await;
    support::seed_secret(&kept, &support::distinctive_value()).await;
    let secret_of = |p: &Pod| {
        p.spec.as_ref().unwrap().containers[0].env.as_ref().unwrap()[0]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name
            .clone()
    };
    let gone_secret = secret_of(
        &create(&s, &pod("uses-gone", &[("X", &reference(&gone))], json!({})))
            .await
            .unwrap(),
    );
    let kept_secret = secret_of(
        &create(&s, &pod("uses-kept", &[("X", &reference(&kept))], json!({})))
            .await
            .unwrap(),
    );
    // A Deployment scaled to zero still refers to `kept` through its template.
    let mut d = deployment("idle", &kept, json!({}));
    d.spec.as_mut().unwrap().replicas = Some(0);
    Api::<Deployment>::namespaced(s.client.clone(), &s.ns)
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    // A Secret kvinject did not create, named like one of its own.
    let foreign: Secret = serde_json::from_value(
        json!({"metadata": {"name": "kvi-foreign-0000000000"}, "stringData": {"value": "mine"}}),
    )
    .unwrap();
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    secrets.create(&PostParams::default(), &foreign).await.unwrap();

    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    for name in ["uses-gone", "uses-kept"] {
        pods.delete(name, &Default::default()).await.unwrap();
    }
    support::eventually(
        Duration::from_secs(30),
        "the unreferenced Secret to be collected",
        || async { secrets.get_opt(&gone_secret).await.unwrap().is_none() },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await; // more than the grace period again
    let kept_now = secrets
        .get(&kept_secret)
        .await
        .expect("a Secret a workload template refers to is kept");
    assert!(
        !kept_now
            .metadata
            .annotations
            .unwrap()
            .contains_key("kvinject.io/unreferenced-since")
    );
    let foreign_now = secrets
        .get("kvi-foreign-0000000000")
        .await
        .expect("a foreign Secret is never deleted");
    assert!(
        foreign_now.metadata.annotations.unwrap_or_default().is_empty(),
        "a foreign Secret is never annotated"
    );
    // Per object above (gone, kept, foreign); the total of this cluster-wide controller may
    // also count other tests' Secrets whose pods went.
    assert!(s.kvinject.metric("kvinject_secrets_collected_total", &[]).await >= 1.0);

    // The next pod that needs the collected Secret gets it created again.
    create(
        &s,
        &pod("uses-gone-again", &[("X", &reference(&gone))], json!({})),
    )
    .await
    .unwrap();
    assert!(
        secrets.get_opt(&gone_secret).await.unwrap().is_some(),
        "re-materialized after collection"
    );
}

#[tokio::test]
async fn evict_replaces_pods_without_touching_the_deployment_spec() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("evict", &["--evict-ready-timeout", "20s"]).await;
    // These pods never run (their image does not exist, and they do not tolerate the bed
    // node's taint): the test reports them Ready as kubelet would. It is about the
    // Deployment's spec staying untouched; node::evict_waits_for_ready_replacements_...
    // evicts real pods that must pass their readiness probe.
    let _kubelet = support::ReadyPods::start(&s.client, &s.ns);
    let (deployments, name) = two_evicting_replicas(&s, "gitops", "evicting").await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let selector = ListParams::default().labels("app=gitops");
    support::eventually(Duration::from_secs(30), "two pods", || async {
        pods.list(&selector).await.unwrap().items.len() == 2
    })
    .await;
    let initial: Vec<String> = pods
        .list(&selector)
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    support::eventually(Duration::from_secs(20), "the baseline", || async {
        stored_hash(&deployments.get("gitops").await.unwrap()).is_some()
    })
    .await;
    let before = deployments.get("gitops").await.unwrap();

    support::seed_secret(&name, &support::distinctive_value()).await;
    support::eventually(
        Duration::from_secs(60),
        "every original pod to be evicted and replaced",
        || async {
            let now: Vec<String> = pods
                .list(&selector)
                .await
                .unwrap()
                .items
                .iter()
                .map(|p| p.metadata.name.clone().unwrap())
                .collect();
            now.len() == 2 && now.iter().all(|n| !initial.contains(n))
        },
    )
    .await;
    support::eventually(
        Duration::from_secs(20),
        "the rolled versions to be recorded",
        || async { stored_hash(&deployments.get("gitops").await.unwrap()) != stored_hash(&before) },
    )
    .await;
    let after = deployments.get("gitops").await.unwrap();
    assert_eq!(
        after.spec, before.spec,
        "the Deployment's spec is untouched: no GitOps drift"
    );
    // (metadata.generation may move: the apiserver bumps a Deployment's generation when its
    // annotations change, and the recorded versions are an annotation. No ReplicaSet follows.)
    assert_eq!(
        template_hash(&after),
        None,
        "the pod template carries no rollout annotation"
    );
    assert_eq!(
        replica_sets(&s, "gitops").await,
        1,
        "no new ReplicaSet: pods were evicted, not rolled"
    );
    let events: Api<Event> = Api::namespaced(s.client.clone(), &s.ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    // (The recorder folds repeated reasons on one object into a series: one Evicted event.)
    assert!(reasons.iter().any(|r| r == "Evicted"), "{reasons:?}");
    assert!(
        !reasons.iter().any(|r| r == "RolloutHalted"),
        "every replacement became Ready: {reasons:?}"
    );
    assert_eq!(s.kvinject.metric("kvinject_rollouts_total", &[]).await, 1.0);
}

#[tokio::test]
async fn secrets_rotated_together_roll_a_workload_once() {
    use crate::inject::{create, pod};
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("together", &[]).await;
    let (a, b) = (support::unique("pair-a"), support::unique("pair-b"));
    support::seed_secret(&a, &support::distinctive_value()).await;
    support::seed_secret(&b, &support::distinctive_value()).await;
    // `a` is polled every second (a pod asks for it); `b` only hourly.
    create(
        &s,
        &pod(
            "fast",
            &[("A", &reference(&a))],
            json!({"kvinject.io/refresh-interval": "1s"}),
        ),
    )
    .await
    .unwrap();
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "pair", "annotations": {"kvinject.io/rollout-on-rotation": "true"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "pair"}}, "template": {
            "metadata": {"labels": {"app": "pair"}},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1", "env": [
                {"name": "A", "value": reference(&a)}, {"name": "B", "value": reference(&b)}]}]}}}
    }))
    .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    deployments.create(&PostParams::default(), &d).await.unwrap();
    support::eventually(Duration::from_secs(30), "the baseline", || async {
        stored_hash(&deployments.get("pair").await.unwrap()).is_some()
    })
    .await;

    // `b` first: `a`'s check (any second now) brings `b`'s along, and finds its new version
    // whenever it runs. (The other order raced: `a` could be checked before `b` changed.)
    let b2 = support::seed_secret(&b, &support::distinctive_value()).await;
    support::seed_secret(&a, &support::distinctive_value()).await;
    support::eventually(Duration::from_secs(20), "the rollout", || async {
        template_hash(&deployments.get("pair").await.unwrap()).is_some()
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let b_secret = secrets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|x| {
            x.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("kvinject.io/reference"))
                == Some(&reference(&b))
        })
        .expect("b's Secret");
    assert_eq!(
        version(&b_secret),
        b2,
        "b was checked together with a, long before its hourly interval"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        replica_sets(&s, "pair").await,
        2,
        "one rollout for two rotations: one new ReplicaSet"
    );
    assert_eq!(
        s.kvinject.metric("kvinject_rollouts_total", &[]).await,
        1.0,
        "one rollout for two rotations"
    );
}

#[tokio::test]
async fn statefulsets_and_daemonsets_roll_like_deployments() {
    use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("kinds", &[]).await;
    let name = support::unique("kinds");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let statefulsets: Api<StatefulSet> = Api::namespaced(s.client.clone(), &s.ns);
    let daemonsets: Api<DaemonSet> = Api::namespaced(s.client.clone(), &s.ns);
    statefulsets
        .create(
            &PostParams::default(),
            &workload(
                "db",
                &name,
                json!({"kvinject.io/rollout-on-rotation": "true"}),
                json!({"replicas": 1, "serviceName": "db"}),
            ),
        )
        .await
        .unwrap();
    // The DaemonSet's pods do not tolerate the bed node's taint, so it has none; its
    // template still names the Secret the StatefulSet's pod materialized.
    daemonsets
        .create(
            &PostParams::default(),
            &workload(
                "agent",
                &name,
                json!({"kvinject.io/rollout-on-rotation": "true"}),
                json!({}),
            ),
        )
        .await
        .unwrap();
    let secret = materialized(&s, "db").await;

    let recorded = |a: Option<&std::collections::BTreeMap<String, String>>| {
        a.is_some_and(|a| a.contains_key("kvinject.io/secret-versions"))
    };
    support::eventually(
        Duration::from_secs(20),
        "the baselines on both workloads",
        || async {
            recorded(
                statefulsets
                    .get("db")
                    .await
                    .unwrap()
                    .metadata
                    .annotations
                    .as_ref(),
            ) && recorded(
                daemonsets
                    .get("agent")
                    .await
                    .unwrap()
                    .metadata
                    .annotations
                    .as_ref(),
            )
        },
    )
    .await;

    let v2 = support::seed_secret(&name, &support::distinctive_value()).await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    support::eventually(
        Duration::from_secs(20),
        "the Secret to follow the new version",
        || async { version(&secrets.get(&secret.metadata.name.clone().unwrap()).await.unwrap()) == v2 },
    )
    .await;
    support::eventually(Duration::from_secs(20), "both pod templates to roll", || async {
        let sts = statefulsets
            .get("db")
            .await
            .unwrap()
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap();
        let ds = daemonsets
            .get("agent")
            .await
            .unwrap()
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap();
        recorded(sts.annotations.as_ref()) && recorded(ds.annotations.as_ref())
    })
    .await;
    assert_eq!(s.kvinject.metric("kvinject_rollouts_total", &[]).await, 2.0);
}

#[tokio::test]
async fn an_eviction_the_budget_refuses_ends_at_its_deadline_with_an_event() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("budget", &["--evict-ready-timeout", "3s"]).await;
    // Reported Ready by hand, as in the test above: this is about the eviction API's answer.
    let _kubelet = support::ReadyPods::start(&s.client, &s.ns);
    let (deployments, name) = two_evicting_replicas(&s, "budgeted", "budgeted").await;
    // A budget that allows no eviction at all: the eviction API answers 429 to each.
    let budget: k8s_openapi::api::policy::v1::PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "budgeted"},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "budgeted"}}}
    }))
    .unwrap();
    let budgets =
        Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(s.client.clone(), &s.ns);
    budgets.create(&PostParams::default(), &budget).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let selector = ListParams::default().labels("app=budgeted");
    support::eventually(
        Duration::from_secs(30),
        "two Ready pods and the budget computed",
        || async {
            let status = budgets.get("budgeted").await.unwrap().status.unwrap_or_default();
            pods.list(&selector).await.unwrap().items.len() == 2 && status.current_healthy == 2
        },
    )
    .await;
    let initial: Vec<_> = pods
        .list(&selector)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.uid)
        .collect();
    support::eventually(Duration::from_secs(20), "the baseline", || async {
        stored_hash(&deployments.get("budgeted").await.unwrap()).is_some()
    })
    .await;

    support::seed_secret(&name, &support::distinctive_value()).await;
    // kvinject retries the refused eviction every 2 s for 30 s (its floor), then says so and
    // leaves the rollout to a later pass. (kube's own retry of 429s, which kvinject turns off,
    // held the one call for minutes, so no Event came in this time.)
    support::eventually(Duration::from_secs(60), "an EvictionFailed Event", || async {
        !support::events_about(&s.client, &s.ns, "EvictionFailed", "budgeted")
            .await
            .is_empty()
    })
    .await;
    let note = support::events_about(&s.client, &s.ns, "EvictionFailed", "budgeted").await[0]
        .note
        .clone()
        .unwrap_or_default();
    assert!(
        note.contains("429") || note.contains("disruption budget"),
        "{note}"
    );
    let now: Vec<_> = pods
        .list(&selector)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.uid)
        .collect();
    assert_eq!(now, initial, "the budget held: no pod was evicted");
}
