//! README claims that had no end-to-end test of their own (issue 18, part 4).

use crate::{
    inject::{create, pod, reference, secret_key_ref},
    rotation::{deployment, replica_sets, rotation_setup, stored_hash, version},
    support,
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_pinned_reference_materializes_the_pinned_versions_value() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("pinned", &[]).await;
    let name = support::unique("pinned");
    let (old, new) = (support::distinctive_value(), support::distinctive_value());
    let v1 = support::seed_secret(&name, &old).await;
    let v2 = support::seed_secret(&name, &new).await;
    let pinned = create(
        &s,
        &pod(
            "pinned",
            &[("X", &format!("{}/{v1}", reference(&name)))],
            json!({}),
        ),
    )
    .await
    .unwrap();
    let current = create(&s, &pod("current", &[("X", &reference(&name))], json!({})))
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let at_v1 = secrets.get(&secret_key_ref(&pinned, "X").unwrap()).await.unwrap();
    let at_v2 = secrets
        .get(&secret_key_ref(&current, "X").unwrap())
        .await
        .unwrap();
    assert_eq!(
        (version(&at_v1), &at_v1.data.unwrap()["value"].0),
        (v1, &old.into_bytes())
    );
    assert_eq!(
        (version(&at_v2), &at_v2.data.unwrap()["value"].0),
        (v2, &new.into_bytes())
    );
}

#[tokio::test]
async fn a_grace_period_of_zero_never_deletes() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("gc-zero", &["--gc-grace-period", "0"]).await;
    let (kept, control) = (support::unique("gc-zero"), support::unique("gc-control"));
    support::seed_secret(&kept, &support::distinctive_value()).await;
    support::seed_secret(&control, &support::distinctive_value()).await;
    // A control namespace with a grace period of its own, so collection visibly runs.
    let other = support::namespace(&s.client, "gc-zero-ns", &[("kvinject.test/suite", &s.label)]).await;
    let _grant = support::grant_all(&s.client, &other).await;
    Api::<Namespace>::all(s.client.clone())
        .patch(
            &other,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"kvinject.io/gc-grace-period": "1s"}}})),
        )
        .await
        .unwrap();
    support::wait_for_webhook(&s.client, &other).await;
    let kept_secret = secret_key_ref(
        &create(&s, &pod("k", &[("X", &reference(&kept))], json!({})))
            .await
            .unwrap(),
        "X",
    )
    .unwrap();
    let other_pods: Api<Pod> = Api::namespaced(s.client.clone(), &other);
    let control_secret = secret_key_ref(
        &other_pods
            .create(
                &PostParams::default(),
                &pod("c", &[("X", &reference(&control))], json!({})),
            )
            .await
            .unwrap(),
        "X",
    )
    .unwrap();
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    Api::<Pod>::namespaced(s.client.clone(), &s.ns)
        .delete("k", &now)
        .await
        .unwrap();
    other_pods.delete("c", &now).await.unwrap();
    let other_secrets: Api<Secret> = Api::namespaced(s.client.clone(), &other);
    support::eventually(
        Duration::from_secs(20),
        "the control Secret collected",
        || async { other_secrets.get_opt(&control_secret).await.unwrap().is_none() },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // two more reconciles
    let secret = Api::<Secret>::namespaced(s.client.clone(), &s.ns)
        .get_opt(&kept_secret)
        .await
        .unwrap()
        .expect("--gc-grace-period 0 never deletes");
    assert!(
        !secret
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("kvinject.io/unreferenced-since"),
        "nor marks"
    );
}

/// Rolls `app` (a Deployment without an opinion of its own) after a rotation, or not.
async fn rolls_without_its_own_annotation(s: &support::Setup, annotations: serde_json::Value) -> bool {
    let name = support::unique("opt");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    deployments
        .create(&PostParams::default(), &deployment("app", &name, annotations))
        .await
        .unwrap();
    let recorded = || async { stored_hash(&deployments.get("app").await.unwrap()).is_some() };
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    support::eventually(Duration::from_secs(30), "a pod", || async {
        !pods
            .list(&kube::api::ListParams::default().labels("app=app"))
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;
    // Opted in or not: what the first sight shows.
    let opted = tokio::time::timeout(Duration::from_secs(5), async {
        while !recorded().await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .is_ok();
    support::seed_secret(&name, &support::distinctive_value()).await;
    if opted {
        support::eventually(Duration::from_secs(20), "the rollout", || async {
            replica_sets(s, "app").await == 2
        })
        .await;
    } else {
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    replica_sets(s, "app").await == 2
}

#[tokio::test]
async fn a_namespace_annotation_opts_its_workloads_into_rollouts() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("ns-opt", &[]).await;
    Api::<Namespace>::all(s.client.clone())
        .patch(
            &s.ns,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"kvinject.io/rollout-on-rotation": "true"}}})),
        )
        .await
        .unwrap();
    assert!(rolls_without_its_own_annotation(&s, json!({})).await);
}

#[tokio::test]
async fn the_global_flag_opts_workloads_in_and_a_workloads_own_false_wins() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    {
        let s = rotation_setup("global-opt", &["--rollout-on-rotation", "true"]).await;
        assert!(rolls_without_its_own_annotation(&s, json!({})).await);
    } // one controller at a time
    let s = rotation_setup("global-out", &["--rollout-on-rotation", "true"]).await;
    assert!(
        !rolls_without_its_own_annotation(&s, json!({"kvinject.io/rollout-on-rotation": "false"})).await,
        "the workload's own `false` wins over the flag"
    );
}

/// Key Vault throttles the first read of a reference with `Retry-After: 1`: kvinject waits
/// that second (it fits the admission deadline) and reads again, and the pod is admitted.
#[tokio::test]
async fn retry_after_is_honoured_when_it_fits_the_deadline() {
    let _vault = support::VAULT.write().await; // a vault fault
    let s = support::setup("retry-after", &[]).await;
    let name = support::unique("throttled");
    support::seed_secret(&name, &support::distinctive_value()).await;
    support::vault_fault(Some(
        json!({"status": 429, "retry_after": 1, "times": 1, "name": name}),
    ))
    .await;
    let _end = support::EndVaultFaults;
    let started = Instant::now();
    create(&s, &pod("throttled", &[("X", &reference(&name))], json!({})))
        .await
        .expect("admitted after waiting Retry-After");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "kvinject waited Retry-After (1 s) first: {took:?}"
    );
    assert_eq!(
        s.kvinject
            .metric("kvinject_keyvault_requests_total", &["result=\"ok\""])
            .await,
        1.0,
        "one read, after the wait"
    );
}
