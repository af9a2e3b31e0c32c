//! Lifecycle correctness (issue 17) on the test bed, where kube-controller-manager creates
//! Jobs' and StatefulSets' pods and nothing ever becomes Ready: Secrets that every kind of
//! pod template keeps, and what users can keep beyond that.

use crate::{
    heal::heal_setup,
    inject::{create, pod, reference},
    rotation::{
        deployment, replica_sets, rotation_setup, secret_of_pod, stored_hash, template_hash, workload,
    },
    support,
};
use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    batch::v1::CronJob,
    core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use std::time::Duration;

fn annotations(secret: &Secret) -> std::collections::BTreeMap<String, String> {
    secret.metadata.annotations.clone().unwrap_or_default()
}

/// A second namespace of the test `s` opts in, granted every secret, carrying the namespace
/// annotations `annotations`, with its webhook answering. The grant lasts while it is held.
async fn second_namespace(
    s: &support::Setup,
    prefix: &str,
    annotations: serde_json::Value,
) -> (String, support::PolicyGuard) {
    let other = support::namespace(&s.client, prefix, &[("kvinject.test/suite", &s.label)]).await;
    let grant = support::grant_all(&s.client, &other).await;
    let patch = json!({"metadata": {"annotations": annotations}});
    Api::<Namespace>::all(s.client.clone())
        .patch(&other, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    support::wait_for_webhook(&s.client, &other).await;
    (other, grant)
}

/// Creates in `pods`' namespace a pod whose env `X` refers to `secret`, and returns the name
/// of the Secret it was given.
async fn secret_of_new_pod(pods: &Api<Pod>, name: &str, secret: &str) -> String {
    let created = pods
        .create(
            &PostParams::default(),
            &pod(name, &[("X", &reference(secret))], json!({})),
        )
        .await
        .unwrap();
    crate::inject::secret_key_ref(&created, "X").unwrap()
}

/// Deletes every pod matching `selector` at once and waits until they are gone.
async fn delete_pods(pods: &Api<Pod>, selector: &str) {
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    pods.delete_collection(&now, &ListParams::default().labels(selector))
        .await
        .unwrap();
    support::eventually(Duration::from_secs(20), "the pods gone", || async {
        pods.list(&ListParams::default().labels(selector))
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_cronjobs_secret_outlives_its_runs_and_serves_the_next_run_with_the_vault_stopped() {
    let _vault = support::VAULT.write().await;
    let _rotation = support::ROTATION.lock().await;
    // Values read from Key Vault are reused for a second only: the last step needs the
    // reference gone from every cache.
    let s = heal_setup(
        "cron",
        "1s",
        &["--gc-grace-period", "2s", "--value-cache-ttl", "1s"],
    )
    .await;
    let name = support::unique("nightly");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let cronjob: CronJob = serde_json::from_value(json!({
        "metadata": {"name": "nightly"},
        "spec": {"schedule": "0 0 1 1 *", "suspend": true, "jobTemplate": {"spec": {"template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "run", "image": "registry.invalid/run:1", "env": [{"name": "X", "value": reference(&name)}]}]
        }}}}}
    }))
    .unwrap();
    Api::<CronJob>::namespaced(s.client.clone(), &s.ns)
        .create(&PostParams::default(), &cronjob)
        .await
        .unwrap();
    let run = |job: &str| {
        let (ok, _, err) = support::kubectl(
            &["create", "job", "-n", &s.ns, "--from=cronjob/nightly", job],
            None,
        );
        assert!(ok, "{err}");
    };
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);

    // The first run materializes the reference; then the run and its pods go.
    run("run-1");
    let secret_name = secret_of_pod(&s.client, &s.ns, "job-name=run-1").await;
    let (ok, _, err) = support::kubectl(&["delete", "job", "-n", &s.ns, "run-1"], None);
    assert!(ok, "{err}");
    delete_pods(&pods, "job-name=run-1").await;
    // Several reconciles and more than the grace period: the CronJob still refers to it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kept = secrets
        .get_opt(&secret_name)
        .await
        .unwrap()
        .expect("the CronJob's Secret survives the grace period");
    assert!(
        !annotations(&kept).contains_key("kvinject.io/unreferenced-since"),
        "not even marked: the CronJob refers to it"
    );

    // The next run, with Key Vault stopped, starts from the materialized Secret.
    support::testbed_cmd("vault-stop");
    let _restart = support::RestartVault;
    run("run-2");
    assert_eq!(
        secret_of_pod(&s.client, &s.ns, "job-name=run-2").await,
        secret_name,
        "the second run's pod was admitted with the same Secret"
    );

    // Without the CronJob (its Job and pods go with it), the Secret is collected.
    Api::<CronJob>::namespaced(s.client.clone(), &s.ns)
        .delete("nightly", &DeleteParams::background())
        .await
        .unwrap();
    let (ok, _, err) = support::kubectl(
        &["delete", "job", "-n", &s.ns, "run-2", "--ignore-not-found"],
        None,
    );
    assert!(ok, "{err}");
    delete_pods(&pods, "job-name=run-2").await;
    support::eventually(Duration::from_secs(20), "the Secret collected", || async {
        secrets.get_opt(&secret_name).await.unwrap().is_none()
    })
    .await;

    // A pod that needs it now, with Key Vault still stopped, is told what happened.
    let denied = create(&s, &pod("late", &[("X", &reference(&name))], json!({})))
        .await
        .expect_err("no Secret and no Key Vault: denied");
    assert!(
        denied.contains("was materialized, but its Secret was deleted at")
            && denied.contains("could not be reached"),
        "{denied}"
    );
}

#[tokio::test]
async fn retain_until_and_a_namespace_grace_keep_secrets_no_pod_uses() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = heal_setup("retain", "1s", &["--gc-grace-period", "2s"]).await;
    let (retained, graced, control) = (
        support::unique("retained"),
        support::unique("graced"),
        support::unique("control"),
    );
    for n in [&retained, &graced, &control] {
        support::seed_secret(n, &support::distinctive_value()).await;
    }
    // A second namespace that keeps unused Secrets for a week.
    let (other, _grant) =
        second_namespace(&s, "retain-ns", json!({"kvinject.io/gc-grace-period": "168h"})).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let retained_secret = secret_of_new_pod(&pods, "r", &retained).await;
    let control_secret = secret_of_new_pod(&pods, "c", &control).await;
    let other_pods: Api<Pod> = Api::namespaced(s.client.clone(), &other);
    let graced_secret = secret_of_new_pod(&other_pods, "g", &graced).await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let other_secrets: Api<Secret> = Api::namespaced(s.client.clone(), &other);
    let until = |t: k8s_openapi::jiff::Timestamp| json!({"metadata": {"annotations": {"kvinject.io/retain-until": t.to_string()}}});
    let in_an_hour = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(1);
    secrets
        .patch(
            &retained_secret,
            &PatchParams::default(),
            &Patch::Merge(&until(in_an_hour)),
        )
        .await
        .unwrap();

    delete_pods(&pods, "").await;
    delete_pods(&other_pods, "").await;
    support::eventually(
        Duration::from_secs(20),
        "the control Secret collected",
        || async { secrets.get_opt(&control_secret).await.unwrap().is_none() },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = secrets
        .get_opt(&retained_secret)
        .await
        .unwrap()
        .expect("a Secret retained for an hour is kept");
    assert!(!annotations(&kept).contains_key("kvinject.io/unreferenced-since"));
    let marked = other_secrets
        .get_opt(&graced_secret)
        .await
        .unwrap()
        .expect("a namespace with a week's grace keeps its Secret");
    assert!(
        annotations(&marked).contains_key("kvinject.io/unreferenced-since"),
        "marked, and waiting for its namespace's grace period"
    );

    // Once the retention has passed, the usual grace period applies.
    let past = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(1);
    secrets
        .patch(
            &retained_secret,
            &PatchParams::default(),
            &Patch::Merge(&until(past)),
        )
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(20),
        "the formerly retained Secret collected",
        || async { secrets.get_opt(&retained_secret).await.unwrap().is_none() },
    )
    .await;
}

#[tokio::test]
async fn retention_annotations_that_do_not_parse_keep_secrets_and_say_so_once() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = heal_setup("bad-retain", "1s", &["--gc-grace-period", "2s"]).await;
    let (kept, graced) = (support::unique("kept"), support::unique("graced"));
    for n in [&kept, &graced] {
        support::seed_secret(n, &support::distinctive_value()).await;
    }
    // A namespace whose grace period is written wrong.
    let (other, _grant) =
        second_namespace(&s, "bad-grace", json!({"kvinject.io/gc-grace-period": "a week"})).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let kept_secret = secret_of_new_pod(&pods, "k", &kept).await;
    let other_pods: Api<Pod> = Api::namespaced(s.client.clone(), &other);
    let graced_secret = secret_of_new_pod(&other_pods, "g", &graced).await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let other_secrets: Api<Secret> = Api::namespaced(s.client.clone(), &other);
    let next_week = json!({"metadata": {"annotations": {"kvinject.io/retain-until": "next week"}}});
    secrets
        .patch(&kept_secret, &PatchParams::default(), &Patch::Merge(&next_week))
        .await
        .unwrap();
    delete_pods(&pods, "").await;
    delete_pods(&other_pods, "").await;

    support::eventually(
        Duration::from_secs(20),
        "a BadAnnotation Event on the Secret",
        || async {
            !support::events_about(&s.client, &s.ns, "BadAnnotation", &kept_secret)
                .await
                .is_empty()
        },
    )
    .await;
    // Events about a Namespace (cluster-scoped) are recorded in `default`.
    support::eventually(
        Duration::from_secs(20),
        "a BadAnnotation Event on the Namespace",
        || async {
            !support::events_about(&s.client, "default", "BadAnnotation", &other)
                .await
                .is_empty()
        },
    )
    .await;
    // Many sweeps and twice the grace period later: both Secrets are still there.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        secrets.get_opt(&kept_secret).await.unwrap().is_some(),
        "a retain-until that does not parse keeps the Secret"
    );
    assert!(
        other_secrets.get_opt(&graced_secret).await.unwrap().is_some(),
        "a grace period that does not parse collects nothing in its namespace"
    );
    let on_secret = support::events_about(&s.client, &s.ns, "BadAnnotation", &kept_secret).await;
    assert_eq!(on_secret.len(), 1, "one Event, not one per sweep");
    let note = on_secret[0].note.clone().unwrap_or_default();
    assert!(note.contains("`next week` is not an RFC 3339 time"), "{note}");
    let on_namespace = support::events_about(&s.client, "default", "BadAnnotation", &other).await;
    assert_eq!(on_namespace.len(), 1);
    let note = on_namespace[0].note.clone().unwrap_or_default();
    assert!(note.contains("`a week` is not a duration"), "{note}");

    // Fixed: the usual rules apply again.
    let past = json!({"metadata": {"annotations": {"kvinject.io/retain-until": "2020-01-01T00:00:00Z"}}});
    secrets
        .patch(&kept_secret, &PatchParams::default(), &Patch::Merge(&past))
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(20),
        "the Secret collected once its retain-until is a past time",
        || async { secrets.get_opt(&kept_secret).await.unwrap().is_none() },
    )
    .await;
}

/// The versions kvinject recorded on a StatefulSet's metadata.
fn recorded(ss: &StatefulSet) -> Option<String> {
    ss.metadata
        .annotations
        .as_ref()?
        .get("kvinject.io/secret-versions")
        .cloned()
}

#[tokio::test]
async fn an_evict_rollout_whose_replacement_never_becomes_ready_stops_after_one_pod() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("ss-evict", &["--evict-ready-timeout", "3s"]).await;
    let name = support::unique("ss-evict");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let sets: Api<StatefulSet> = Api::namespaced(s.client.clone(), &s.ns);
    let ss: StatefulSet = workload(
        "db",
        &name,
        json!({"kvinject.io/rollout-on-rotation": "true", "kvinject.io/rollout-strategy": "evict"}),
        json!({"replicas": 3, "serviceName": "db", "podManagementPolicy": "Parallel"}),
    );
    sets.create(&PostParams::default(), &ss).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let selector = ListParams::default().labels("app=db");
    let uids = || async {
        pods.list(&selector)
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|p| p.metadata.uid)
            .collect::<Vec<_>>()
    };
    support::eventually(Duration::from_secs(30), "three pods", || async {
        uids().await.len() == 3
    })
    .await;
    let original = uids().await;
    support::eventually(Duration::from_secs(20), "the baseline", || async {
        recorded(&sets.get("db").await.unwrap()).is_some()
    })
    .await;

    support::seed_secret(&name, &support::distinctive_value()).await;
    support::eventually(Duration::from_secs(30), "a RolloutHalted Event", || async {
        !support::events_about(&s.client, &s.ns, "RolloutHalted", "db")
            .await
            .is_empty()
    })
    .await;
    // Three more timeouts: nothing else is evicted.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let now = uids().await;
    let kept = original.iter().filter(|u| now.contains(u)).count();
    assert_eq!(
        kept, 2,
        "exactly one pod was evicted (its replacement has a new UID, the same name)"
    );
    let note = support::events_about(&s.client, &s.ns, "RolloutHalted", "db").await[0]
        .note
        .clone()
        .unwrap_or_default();
    assert!(note.contains("became Ready within 3s"), "{note}");
    assert_eq!(
        s.kvinject
            .strict_metric("kvinject_rollouts_halted_total", &[])
            .await,
        1.0
    );
    assert_eq!(
        s.kvinject.strict_metric("kvinject_rollouts_total", &[]).await,
        0.0
    );
    let halted = sets.get("db").await.unwrap();
    assert!(
        halted
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("kvinject.io/rollout-halted")),
        "the halt is recorded on the StatefulSet"
    );

    // The next version resumes the rollout (and, still with no Ready replacement, halts again
    // after one more pod).
    support::seed_secret(&name, &support::distinctive_value()).await;
    support::eventually(Duration::from_secs(30), "one more pod evicted", || async {
        let now = uids().await;
        original.iter().filter(|u| now.contains(u)).count() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let now = uids().await;
    assert_eq!(
        original.iter().filter(|u| now.contains(u)).count(),
        1,
        "and no further one"
    );
}

#[tokio::test]
async fn a_rotated_registry_credential_updates_its_secret_and_rolls_nothing() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("pull-roll", &[]).await;
    let (env, config) = (support::unique("pull-env"), support::unique("pull-config"));
    support::seed_secret(&env, &support::distinctive_value()).await;
    support::seed_secret(&config, r#"{"auths":{"acr.example":{"auth":"dXNlcjpvbGQ="}}}"#).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    let mut d = deployment("pulls", &env, json!({"kvinject.io/rollout-on-rotation": "true"}));
    d.spec
        .as_mut()
        .unwrap()
        .template
        .metadata
        .as_mut()
        .unwrap()
        .annotations
        .as_mut()
        .unwrap()
        .insert("kvinject.io/image-pull-secrets".into(), reference(&config));
    deployments.create(&PostParams::default(), &d).await.unwrap();
    let pod = {
        let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
        support::eventually(Duration::from_secs(30), "an injected pod", || async {
            pods.list(&ListParams::default().labels("app=pulls"))
                .await
                .unwrap()
                .items
                .iter()
                .any(|p| p.spec.as_ref().is_some_and(|s| s.image_pull_secrets.is_some()))
        })
        .await;
        pods.list(&ListParams::default().labels("app=pulls"))
            .await
            .unwrap()
            .items[0]
            .clone()
    };
    let pull_secret = pod.spec.unwrap().image_pull_secrets.unwrap()[0].name.clone();
    support::eventually(Duration::from_secs(20), "the baseline", || async {
        stored_hash(&deployments.get("pulls").await.unwrap()).is_some()
    })
    .await;

    let v2 = support::seed_secret(&config, r#"{"auths":{"acr.example":{"auth":"dXNlcjpuZXc="}}}"#).await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    support::eventually(Duration::from_secs(20), "the pull Secret rotated", || async {
        crate::rotation::version(&secrets.get(&pull_secret).await.unwrap()) == v2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // several reconciles
    assert_eq!(
        replica_sets(&s, "pulls").await,
        1,
        "no rollout for a registry credential"
    );
    assert_eq!(
        s.kvinject.strict_metric("kvinject_rollouts_total", &[]).await,
        0.0
    );
    assert!(template_hash(&deployments.get("pulls").await.unwrap()).is_none());
}

#[tokio::test]
async fn adding_a_reference_in_git_makes_exactly_one_new_replicaset() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("git-add", &[]).await;
    let (first, second) = (support::unique("git-first"), support::unique("git-second"));
    support::seed_secret(&first, &support::distinctive_value()).await;
    support::seed_secret(&second, &support::distinctive_value()).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    deployments
        .create(
            &PostParams::default(),
            &deployment("app", &first, json!({"kvinject.io/rollout-on-rotation": "true"})),
        )
        .await
        .unwrap();
    support::eventually(Duration::from_secs(30), "the baseline", || async {
        stored_hash(&deployments.get("app").await.unwrap()).is_some()
    })
    .await;
    let before = stored_hash(&deployments.get("app").await.unwrap());

    // The change a GitOps tool applies: one more env reference in the pod template (a
    // patch, as the Deployment's controller and kvinject write the object meanwhile).
    let add = json!([{"op": "add", "path": "/spec/template/spec/containers/0/env/-",
                      "value": {"name": "Y", "value": reference(&second)}}]);
    deployments
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(add).unwrap()),
        )
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(30),
        "the new set of versions recorded",
        || async { stored_hash(&deployments.get("app").await.unwrap()) != before },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // several reconciles
    assert_eq!(
        replica_sets(&s, "app").await,
        2,
        "the spec change's ReplicaSet, and no second one"
    );
    assert_eq!(
        s.kvinject.strict_metric("kvinject_rollouts_total", &[]).await,
        0.0
    );
    assert!(
        template_hash(&deployments.get("app").await.unwrap()).is_none(),
        "kvinject did not touch the template"
    );
}

#[tokio::test]
async fn an_on_delete_statefulset_gets_an_event_not_a_false_rollout() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("ondelete", &[]).await;
    let name = support::unique("ondelete");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let sets: Api<StatefulSet> = Api::namespaced(s.client.clone(), &s.ns);
    let ss: StatefulSet = workload(
        "od",
        &name,
        json!({"kvinject.io/rollout-on-rotation": "true"}),
        json!({"replicas": 1, "serviceName": "od", "updateStrategy": {"type": "OnDelete"}}),
    );
    sets.create(&PostParams::default(), &ss).await.unwrap();
    support::eventually(Duration::from_secs(30), "the baseline", || async {
        recorded(&sets.get("od").await.unwrap()).is_some()
    })
    .await;
    let before = sets.get("od").await.unwrap();
    support::seed_secret(&name, &support::distinctive_value()).await;
    support::eventually(Duration::from_secs(30), "a RolloutNotApplied Event", || async {
        !support::events_about(&s.client, &s.ns, "RolloutNotApplied", "od")
            .await
            .is_empty()
    })
    .await;
    let after = sets.get("od").await.unwrap();
    assert_eq!(after.spec, before.spec, "the template is left alone");
    assert_eq!(
        recorded(&after),
        recorded(&before),
        "its pods still run the old versions: not recorded as rolled"
    );
    assert_eq!(
        s.kvinject.strict_metric("kvinject_rollouts_total", &[]).await,
        0.0
    );
}
