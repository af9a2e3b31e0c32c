//! Self-healing on the test bed (issue 15): a materialized Secret deleted while a pod or a
//! workload uses it comes back from Key Vault; one nothing uses stays deleted; a secret
//! deleted in the vault is reported and its materialized value kept until it is recovered.

use crate::{
    inject::{create, pod, reference},
    rotation::{deployment, secret_of_pod, version},
    support::{self, Setup},
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use std::time::{Duration, Instant};

/// The issue's settings: full reconcile every `reconcile`, Key Vault checked every 10 s
/// unless a pod asks for less; the test's own Lease.
pub(crate) async fn heal_setup(prefix: &str, reconcile: &str, extra: &[&str]) -> Setup {
    let lease = support::unique("lease");
    let mut args = vec![
        "--rotation",
        "true",
        "--refresh-interval",
        "10s",
        "--reconcile-interval",
        reconcile,
        "--lease-namespace",
        "default",
        "--lease-name",
        &lease,
        "--lease-duration",
        "3s",
    ];
    args.extend_from_slice(extra);
    let s = support::setup(prefix, &args).await;
    support::eventually(Duration::from_secs(20), "kvinject to lead", || async {
        s.kvinject.strict_metric("kvinject_rotation_leader", &[]).await == 1.0
    })
    .await;
    s
}

fn annotation<'a>(secret: &'a Secret, name: &str) -> Option<&'a str> {
    secret
        .metadata
        .annotations
        .as_ref()?
        .get(name)
        .map(String::as_str)
}

/// Starts the bed's vault again when the test ends, however it ends.
#[tokio::test]
async fn a_secret_deleted_by_hand_comes_back_within_a_reconcile_interval() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = heal_setup("heal", "5s", &[]).await;
    let name = support::unique("heal-a");
    let value = support::distinctive_value();
    support::seed_secret(&name, &value).await;
    Api::<Deployment>::namespaced(s.client.clone(), &s.ns)
        .create(&PostParams::default(), &deployment("heal", &name, json!({})))
        .await
        .unwrap();
    let secret_name = secret_of_pod(&s.client, &s.ns, "app=heal").await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let before = secrets.get(&secret_name).await.unwrap();

    secrets
        .delete(&secret_name, &DeleteParams::default())
        .await
        .unwrap();
    let deleted_at = Instant::now();
    support::eventually(
        Duration::from_secs(5),
        "the deleted Secret back within one reconcile interval (5 s)",
        || async { secrets.get_opt(&secret_name).await.unwrap().is_some() },
    )
    .await;
    let took = deleted_at.elapsed();
    let after = secrets.get(&secret_name).await.unwrap();
    assert_eq!(after.data, before.data, "the same value");
    assert_eq!(version(&after), version(&before), "the same version");
    assert_eq!(
        annotation(&after, "kvinject.io/reference"),
        annotation(&before, "kvinject.io/reference")
    );
    assert_ne!(
        after.metadata.uid, before.metadata.uid,
        "a new object, not the old one"
    );
    support::eventually(Duration::from_secs(5), "a Recreated Event", || async {
        !support::events_about(&s.client, &s.ns, "Recreated", &secret_name)
            .await
            .is_empty()
    })
    .await;
    let events = support::events_about(&s.client, &s.ns, "Recreated", &secret_name).await;
    let note = events[0].note.clone().unwrap_or_default();
    assert!(
        note.contains(&reference(&name)) && (note.contains("Deployment/heal") || note.contains("pod heal-")),
        "the Event names the reference and who uses it: {note}"
    );
    // (Counted too; the Event above is the per-object evidence, as other tests' Secrets may
    // count in this cluster-wide controller's total.)
    assert!(
        s.kvinject
            .strict_metric("kvinject_secrets_recreated_total", &[])
            .await
            >= 1.0
    );
    // A new pod of the Deployment starts with it: the webhook finds it materialized.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), &s.ns);
    create(&s, &pod("after-heal", &[("X", &reference(&name))], json!({})))
        .await
        .expect("admitted");
    assert!(pods.get_opt("after-heal").await.unwrap().is_some());
    eprintln!("recreated {took:?} after the deletion (reconcile interval 5 s)");
}

#[tokio::test]
async fn with_the_vault_stopped_recreation_fails_visibly_and_succeeds_when_it_returns() {
    let _vault = support::VAULT.write().await;
    let _rotation = support::ROTATION.lock().await;
    let s = heal_setup("heal-down", "5s", &[]).await;
    let name = support::unique("heal-down");
    support::seed_secret(&name, &support::distinctive_value()).await;
    Api::<Deployment>::namespaced(s.client.clone(), &s.ns)
        .create(&PostParams::default(), &deployment("down", &name, json!({})))
        .await
        .unwrap();
    let secret_name = secret_of_pod(&s.client, &s.ns, "app=down").await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let before = secrets.get(&secret_name).await.unwrap();

    support::testbed_cmd("vault-stop");
    let restart = support::RestartVault;
    secrets
        .delete(&secret_name, &DeleteParams::default())
        .await
        .unwrap();
    support::eventually(Duration::from_secs(15), "a RecreateFailed Event", || async {
        !support::events_about(&s.client, &s.ns, "RecreateFailed", &secret_name)
            .await
            .is_empty()
    })
    .await;
    // Retries back off and are not recorded again.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let failed = support::events_about(&s.client, &s.ns, "RecreateFailed", &secret_name).await;
    assert_eq!(failed.len(), 1, "one Event for the failure, not one per retry");
    let note = failed[0].note.clone().unwrap_or_default();
    assert!(
        note.contains(&reference(&name)) && note.contains("could not be reached"),
        "the Event says why: {note}"
    );
    assert_eq!(
        failed[0].regarding.as_ref().and_then(|r| r.namespace.as_deref()),
        Some(s.ns.as_str()),
        "recorded in the Secret's namespace"
    );
    assert!(secrets.get_opt(&secret_name).await.unwrap().is_none());
    assert!(
        s.kvinject.logs().contains("could not recreate a deleted Secret"),
        "the retries are logged"
    );

    drop(restart); // the vault returns
    let returned = Instant::now();
    support::eventually(
        Duration::from_secs(5 + 1),
        "the Secret back within one reconcile interval of the vault's return",
        || async { secrets.get_opt(&secret_name).await.unwrap().is_some() },
    )
    .await;
    eprintln!("recreated {:?} after the vault returned", returned.elapsed());
    let after = secrets.get(&secret_name).await.unwrap();
    assert_eq!(
        (after.data.clone(), version(&after)),
        (before.data.clone(), version(&before))
    );
    support::eventually(Duration::from_secs(5), "a Recreated Event", || async {
        !support::events_about(&s.client, &s.ns, "Recreated", &secret_name)
            .await
            .is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_secret_nothing_uses_is_not_recreated_even_when_unused_mid_recreation() {
    let _vault = support::VAULT.write().await; // a vault fault below
    let _rotation = support::ROTATION.lock().await;
    let s = heal_setup("heal-gc", "1s", &["--gc-grace-period", "2s"]).await;
    let (kept, unused) = (support::unique("heal-kept"), support::unique("heal-unused"));
    support::seed_secret(&kept, &support::distinctive_value()).await;
    support::seed_secret(&unused, &support::distinctive_value()).await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let secret_of = |p: &k8s_openapi::api::core::v1::Pod| crate::inject::secret_key_ref(p, "X").unwrap();
    let kept_secret = secret_of(
        &create(&s, &pod("keeps", &[("X", &reference(&kept))], json!({})))
            .await
            .unwrap(),
    );
    let unused_secret = secret_of(
        &create(&s, &pod("leaves", &[("X", &reference(&unused))], json!({})))
            .await
            .unwrap(),
    );
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let now_deleted = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };

    // No pod uses it any more: garbage collection deletes it after its grace period, and
    // nothing brings it back.
    pods.delete("leaves", &now_deleted).await.unwrap();
    support::eventually(Duration::from_secs(20), "the unused Secret collected", || async {
        secrets.get_opt(&unused_secret).await.unwrap().is_none()
    })
    .await;

    // A Secret in use is deleted, and its only pod goes while kvinject reads the vault to
    // recreate it (every vault answer takes 1.5 s now).
    support::vault_fault(Some(json!({"latency": 1.5}))).await;
    let _end = support::EndVaultFaults;
    secrets
        .delete(&kept_secret, &DeleteParams::default())
        .await
        .unwrap();
    support::eventually(Duration::from_secs(10), "the recreation to start", || async {
        s.kvinject
            .strict_logs()
            .lines()
            .any(|l| l.contains("recreating it") && l.contains(&kept_secret))
    })
    .await;
    pods.delete("keeps", &now_deleted).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await; // the read ends; more than the grace period
    support::vault_fault(None).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    for gone in [&kept_secret, &unused_secret] {
        assert!(
            secrets.get_opt(gone).await.unwrap().is_none(),
            "{gone}: nothing uses it, so it is not recreated"
        );
        assert!(
            support::events_about(&s.client, &s.ns, "Recreated", gone)
                .await
                .is_empty()
        );
    }
    let left: Vec<String> = secrets
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=kvinject"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|x| x.metadata.name)
        .collect();
    assert!(
        left.is_empty(),
        "nothing of this namespace was recreated, to be collected again: {left:?}"
    );
}

#[tokio::test]
async fn a_secret_deleted_in_the_vault_is_reported_kept_and_recovered() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = heal_setup("heal-kv", "1s", &[]).await;
    let name = support::unique("heal-kv");
    let value = support::distinctive_value();
    support::seed_secret(&name, &value).await;
    Api::<Deployment>::namespaced(s.client.clone(), &s.ns)
        .create(&PostParams::default(), &deployment("kv", &name, json!({})))
        .await
        .unwrap();
    let secret_name = secret_of_pod(&s.client, &s.ns, "app=kv").await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let before = secrets.get(&secret_name).await.unwrap();
    let vault = support::testbed().vault_name.clone();
    let gauge = [format!("vault=\"{vault}\""), format!("secret=\"{name}\"")];
    let gauge: Vec<&str> = gauge.iter().map(String::as_str).collect();

    let client = support::secret_client();
    client
        .delete_secret(&name, None)
        .await
        .expect("deleting in the vault");
    support::eventually(Duration::from_secs(15), "the Secret marked missing", || async {
        let now = secrets.get(&secret_name).await.unwrap();
        annotation(&now, "kvinject.io/missing-in-vault-since").is_some()
    })
    .await;
    let reads_at = |c: serde_json::Value| c["secrets_get_by_name"][name.to_ascii_lowercase()].as_u64();
    let reads_before = reads_at(support::vault_counters().await).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(8)).await; // the pods ask for a check every second
    let reads_during = reads_at(support::vault_counters().await).unwrap_or(0) - reads_before;
    assert!(
        reads_during <= 4,
        "checks back off while the secret is gone: {reads_during} reads in 8 s at a 1 s interval"
    );
    let now = secrets.get(&secret_name).await.unwrap();
    assert_eq!(now.data, before.data, "the value is kept, never blanked");
    assert_eq!(version(&now), version(&before));
    let not_found = support::events_about(&s.client, &s.ns, "SecretNotFound", &secret_name).await;
    assert_eq!(not_found.len(), 1, "one Event per change, not per check");
    assert!(
        not_found[0]
            .note
            .as_deref()
            .unwrap_or_default()
            .contains(&reference(&name)),
        "{:?}",
        not_found[0].note
    );
    assert_eq!(
        s.kvinject
            .strict_metric("kvinject_keyvault_secret_missing", &gauge)
            .await,
        1.0
    );

    // A new pod that uses the reference is admitted from the materialized Secret, and the
    // client is told.
    let manifest = |pod: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": s.ns},
               "spec": {"containers": [{"name": "app", "image": "registry.invalid/a", "env": [{"name": "X", "value": reference(&name)}]}]}})
        .to_string()
    };
    let (ok, _, stderr) = support::kubectl(&["create", "-f", "-"], Some(&manifest("while-gone")));
    assert!(ok, "admitted from the materialized Secret: {stderr}");
    assert!(
        stderr.contains("Warning:") && stderr.contains("Key Vault no longer has this secret"),
        "kubectl shows the warning: {stderr}"
    );
    // A namespace that never materialized it is denied, as before (once its grant is
    // loaded, it is denied for the missing secret).
    let (other, _grant) = other_namespace(&s).await;
    let other_pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), &other);
    support::eventually(
        Duration::from_secs(10),
        "a pod in another namespace denied because the secret is not found",
        || async {
            match other_pods
                .create(
                    &PostParams::default(),
                    &pod("never", &[("X", &reference(&name))], json!({})),
                )
                .await
            {
                Ok(_) => panic!("a reference never materialized in {other} was admitted"),
                Err(e) => e.to_string().contains("was not found"),
            }
        },
    )
    .await;

    // Recovered in the vault: the mark, the gauge and the warning end, with no restart.
    client
        .recover_deleted_secret(&name, None)
        .await
        .expect("recovering in the vault");
    support::eventually(Duration::from_secs(70), "the mark removed", || async {
        let now = secrets.get(&secret_name).await.unwrap();
        annotation(&now, "kvinject.io/missing-in-vault-since").is_none()
    })
    .await;
    assert!(
        !support::events_about(&s.client, &s.ns, "SecretRecovered", &secret_name)
            .await
            .is_empty()
    );
    support::eventually(Duration::from_secs(5), "the gauge gone", || async {
        s.kvinject
            .metric_if_exported("kvinject_keyvault_secret_missing", &gauge)
            .await
            .is_none()
    })
    .await;
    let (ok, _, stderr) = support::kubectl(&["create", "-f", "-"], Some(&manifest("after-recovery")));
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("no longer has"), "the warning stopped: {stderr}");

    // A mark set by hand (anyone who may edit the namespace's Secrets) is no mark: no
    // warning, no gauge (which would alert on the reference for every namespace).
    let forged =
        json!({"metadata": {"annotations": {"kvinject.io/missing-in-vault-since": "2026-01-01T00:00:00Z"}}});
    secrets
        .patch(
            &secret_name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&forged),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // the watch, and a few checks
    let (ok, _, stderr) = support::kubectl(&["create", "-f", "-"], Some(&manifest("forged-mark")));
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("no longer has"), "a forged mark warns: {stderr}");
    assert_eq!(
        s.kvinject
            .metric_if_exported("kvinject_keyvault_secret_missing", &gauge)
            .await,
        None,
        "a forged mark raises the gauge"
    );

    // And a later rotation still works.
    let v2 = support::seed_secret(&name, &support::distinctive_value()).await;
    support::eventually(
        Duration::from_secs(15),
        "the new version materialized",
        || async { version(&secrets.get(&secret_name).await.unwrap()) == v2 },
    )
    .await;
}

/// A second namespace the test's webhook acts for, granted the bed's vault.
async fn other_namespace(s: &Setup) -> (String, support::PolicyGuard) {
    let ns = support::namespace(&s.client, "heal-other", &[("kvinject.test/suite", &s.label)]).await;
    let grant = support::grant_all(&s.client, &ns).await;
    support::wait_for_webhook(&s.client, &ns).await;
    (ns, grant)
}

#[tokio::test]
async fn a_mistaken_delete_by_label_brings_back_env_and_registry_secrets_of_a_bare_pod() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = heal_setup("heal-label", "5s", &[]).await;
    let (env, config, password) = (
        support::unique("heal-env"),
        support::unique("heal-acr"),
        support::unique("heal-sp"),
    );
    support::seed_secret(&env, &support::distinctive_value()).await;
    support::seed_secret(&config, r#"{"auths":{"acr.example":{"auth":"dXNlcjpwYXNz"}}}"#).await;
    support::seed_secret(&password, &support::distinctive_value()).await;
    let created = create(
        &s,
        &pod(
            "bare",
            &[("X", &reference(&env))],
            json!({
                "kvinject.io/image-pull-secrets": reference(&config),
                "kvinject.io/image-pull-registry": "sp.example",
                "kvinject.io/image-pull-username": "11111111-2222-3333-4444-555555555555",
                "kvinject.io/image-pull-password": reference(&password),
            }),
        ),
    )
    .await
    .unwrap();
    let mut names: Vec<String> = created
        .spec
        .as_ref()
        .unwrap()
        .image_pull_secrets
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect();
    names.push(crate::inject::secret_key_ref(&created, "X").unwrap());
    assert_eq!(names.len(), 3, "two pull Secrets and one env Secret: {names:?}");
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let mut before = Vec::new();
    for n in &names {
        before.push(secrets.get(n).await.unwrap());
    }

    let (ok, _, err) = support::kubectl(
        &[
            "delete",
            "secret",
            "-n",
            &s.ns,
            "-l",
            "app.kubernetes.io/managed-by=kvinject",
        ],
        None,
    );
    assert!(ok, "{err}");
    support::eventually(Duration::from_secs(5), "all three back", || async {
        let mut all = true;
        for n in &names {
            all &= secrets.get_opt(n).await.unwrap().is_some();
        }
        all
    })
    .await;
    for (n, old) in names.iter().zip(&before) {
        let now = secrets.get(n).await.unwrap();
        assert_eq!(
            (now.type_.clone(), now.data.clone(), version(&now)),
            (old.type_.clone(), old.data.clone(), version(old)),
            "{n}: the same kind of Secret with the same value"
        );
        assert_eq!(
            annotation(&now, "kvinject.io/reference"),
            annotation(old, "kvinject.io/reference")
        );
    }
    for n in &names {
        assert!(
            !support::events_about(&s.client, &s.ns, "Recreated", n)
                .await
                .is_empty(),
            "{n}: a Recreated Event"
        );
    }
}
