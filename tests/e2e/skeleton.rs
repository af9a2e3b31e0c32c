//! The walking skeleton: the apiserver really calls `kvinject serve` and applies its patch.

use crate::support::{self, Kvinject};
use azure_security_keyvault_secrets::{ResourceExt, models::SecretClientGetSecretOptions};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn apiserver_applies_the_webhook_patch_to_a_created_pod() {
    let client = support::kube().await;
    let kvinject = Kvinject::start(&[]).await;
    let label = support::unique("skeleton");
    let ns = support::namespace(&client, "skeleton", &[("kvinject.test/suite", &label)]).await;
    let _webhook = support::register_webhook(&client, &label, &kvinject.url(), ("kvinject.test/suite", &label)).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
    }))
    .unwrap();
    // The apiserver picks up a new webhook configuration asynchronously: probe with dry runs.
    let dry = PostParams { dry_run: true, ..Default::default() };
    support::eventually(Duration::from_secs(20), "the apiserver to call the webhook", || async {
        let created = pods.create(&dry, &pod).await.expect("dry-run create");
        created.metadata.labels.unwrap_or_default().contains_key("kvinject.io/injected")
    })
    .await;

    pods.create(&PostParams::default(), &pod).await.expect("creating the pod");
    let stored = pods.get("web").await.expect("reading the pod back");
    let labels = stored.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("kvinject.io/injected").map(String::as_str), Some("true"), "stored pod labels: {labels:?}");
    assert!(kvinject.logs().contains("\"result\":\"patched\""), "kvinject's log records the admission:\n{}", kvinject.logs());
}

#[tokio::test]
async fn the_sdk_reaches_the_bed_vault_through_the_challenge_flow() {
    let name = support::unique("skeleton-secret");
    let v1 = support::seed_secret(&name, "first").await;
    let v2 = support::seed_secret(&name, "second").await;
    assert_ne!(v1, v2);

    let client = support::secret_client();
    let latest = client.get_secret(&name, None).await.expect("get latest").into_model().unwrap();
    assert_eq!(latest.value.as_deref(), Some("second"));
    assert_eq!(latest.resource_id().unwrap().version.as_deref(), Some(v2.as_str()));

    let pinned = SecretClientGetSecretOptions { secret_version: Some(v1.clone()), ..Default::default() };
    let first = client.get_secret(&name, Some(pinned)).await.expect("get pinned").into_model().unwrap();
    assert_eq!(first.value.as_deref(), Some("first"));

    let missing = client.get_secret(&support::unique("absent"), None).await.expect_err("a missing secret is an error");
    assert_eq!(missing.http_status().map(u16::from), Some(404), "{missing}");
}
