//! Key Vault unreachable: what was materialized keeps working, across a kvinject restart.

use crate::{
    inject::{create, pod, reference},
    support::{self, Kvinject},
};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn with_the_vault_down_materialized_pods_are_admitted_with_a_warning_and_new_references_denied() {
    let _vault = support::VAULT.write().await; // no other test may use the vault meanwhile
    let mut s = support::setup("outage", &[]).await;
    let known = support::unique("offline-known");
    let never = support::unique("offline-never");
    support::seed_secret(&known, &support::distinctive_value()).await;
    support::seed_secret(&never, &support::distinctive_value()).await;
    create(&s, &pod("before", &[("X", &reference(&known))], json!({})))
        .await
        .expect("admitted while the vault is up");

    support::testbed_cmd("vault-stop");
    let _restart = support::RestartVault;
    let up = |k: &Kvinject| {
        let port = k.admin_port;
        async move {
            let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            text.lines()
                .any(|l| l.starts_with("kvinject_keyvault_up{") && l.ends_with(" 0"))
        }
    };
    support::eventually(Duration::from_secs(15), "kvinject to see the vault down", || {
        up(&s.kvinject)
    })
    .await;

    // Scale-out and re-creation keep working, and the client is told why values may be old.
    let manifest = |name: &str, r: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": s.ns},
               "spec": {"containers": [{"name": "app", "image": "registry.invalid/a", "env": [{"name": "X", "value": r}]}]}})
        .to_string()
    };
    let (ok, _, stderr) = support::kubectl(
        &["create", "-f", "-"],
        Some(&manifest("during", &reference(&known))),
    );
    assert!(
        ok,
        "a materialized reference is admitted while the vault is down: {stderr}"
    );
    assert!(
        stderr.contains("Warning:") && stderr.contains("Key Vault is unreachable"),
        "kubectl shows the outage warning: {stderr}"
    );

    let err = create(&s, &pod("new", &[("X", &reference(&never))], json!({})))
        .await
        .expect_err("a never-materialized reference is denied");
    assert!(
        err.contains("was never materialized") && err.contains("could not be reached"),
        "{err}"
    );

    // kvinject restarts during the outage: its cache rebuilds from the apiserver.
    s.kvinject.restart(&[]).await;
    create(&s, &pod("after-restart", &[("X", &reference(&known))], json!({})))
        .await
        .expect("admitted by a restarted kvinject while the vault is down");
    assert_eq!(
        s.kvinject.metric("kvinject_keyvault_requests_total", &[]).await,
        0.0,
        "the restarted kvinject read nothing from Key Vault"
    );
    assert!(
        s.kvinject
            .metric(
                "kvinject_cache_lookups_total",
                &["cache=\"secret\"", "result=\"hit\""]
            )
            .await
            >= 1.0
    );
}
