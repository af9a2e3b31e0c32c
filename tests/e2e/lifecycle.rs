//! Lifecycle correctness (issue 17) on the test bed, where kube-controller-manager creates
//! Jobs' and StatefulSets' pods and nothing ever becomes Ready: Secrets that every kind of
//! pod template keeps, and what users can keep beyond that.

use crate::{
    heal::heal_setup,
    inject::{create, pod, reference},
    rotation::secret_of_pod,
    support,
};
use k8s_openapi::api::{
    batch::v1::CronJob,
    core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use std::time::Duration;

/// Starts the bed's vault again when the test ends, however it ends.
struct RestartVault;
impl Drop for RestartVault {
    fn drop(&mut self) {
        support::testbed_cmd("vault-start");
    }
}

fn annotations(secret: &Secret) -> std::collections::BTreeMap<String, String> {
    secret.metadata.annotations.clone().unwrap_or_default()
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
    let s = heal_setup("cron", "1s", &["--gc-grace-period", "2s"]).await;
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
    let _restart = RestartVault;
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
    let other = support::namespace(&s.client, "retain-ns", &[("kvinject.test/suite", &s.label)]).await;
    let _grant = support::grant_all(&s.client, &other).await;
    let week = json!({"metadata": {"annotations": {"kvinject.io/gc-grace-period": "168h"}}});
    Api::<Namespace>::all(s.client.clone())
        .patch(&other, &PatchParams::default(), &Patch::Merge(&week))
        .await
        .unwrap();
    support::wait_for_webhook(&s.client, &other).await;

    let secret_of = |p: &Pod| crate::inject::secret_key_ref(p, "X").unwrap();
    let retained_secret = secret_of(
        &create(&s, &pod("r", &[("X", &reference(&retained))], json!({})))
            .await
            .unwrap(),
    );
    let control_secret = secret_of(
        &create(&s, &pod("c", &[("X", &reference(&control))], json!({})))
            .await
            .unwrap(),
    );
    let other_pods: Api<Pod> = Api::namespaced(s.client.clone(), &other);
    let graced_secret = secret_of(
        &other_pods
            .create(
                &PostParams::default(),
                &pod("g", &[("X", &reference(&graced))], json!({})),
            )
            .await
            .unwrap(),
    );
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

    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
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
