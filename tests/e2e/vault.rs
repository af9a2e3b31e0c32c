//! The test bed's vault speaks Key Vault's protocol to the real Azure SDK.

use crate::support;
use azure_security_keyvault_secrets::{ResourceExt, models::SecretClientGetSecretOptions};

#[tokio::test]
async fn the_sdk_reaches_the_bed_vault_through_the_challenge_flow() {
    let _vault = support::VAULT.read().await;
    let name = support::unique("skeleton-secret");
    let v1 = support::seed_secret(&name, "first").await;
    let v2 = support::seed_secret(&name, "second").await;
    assert_ne!(v1, v2);

    let client = support::secret_client();
    let latest = client
        .get_secret(&name, None)
        .await
        .expect("get latest")
        .into_model()
        .unwrap();
    assert_eq!(latest.value.as_deref(), Some("second"));
    assert_eq!(
        latest.resource_id().unwrap().version.as_deref(),
        Some(v2.as_str())
    );

    let pinned = SecretClientGetSecretOptions {
        secret_version: Some(v1.clone()),
        ..Default::default()
    };
    let first = client
        .get_secret(&name, Some(pinned))
        .await
        .expect("get pinned")
        .into_model()
        .unwrap();
    assert_eq!(first.value.as_deref(), Some("first"));

    let missing = client
        .get_secret(&support::unique("absent"), None)
        .await
        .expect_err("a missing secret is an error");
    assert_eq!(missing.http_status().map(u16::from), Some(404), "{missing}");
}
