//! The test bed's vault speaks Key Vault's protocol to the real Azure SDK.

use crate::support;
use azure_security_keyvault_secrets::{ResourceExt, models::SecretClientGetSecretOptions};

#[tokio::test]
async fn the_sdk_reaches_the_bed_vault_through_the_challenge_flow() {
    let _vault = support::VAULT.read().await;
    let name = support::unique("skeleton-secret");
    let (first_value, second_value) = (support::distinctive_value(), support::distinctive_value());
    let v1 = support::seed_secret(&name, &first_value).await;
    let v2 = support::seed_secret(&name, &second_value).await;
    assert_ne!(v1, v2);

    let client = support::secret_client();
    let latest = client
        .get_secret(&name, None)
        .await
        .expect("get latest")
        .into_model()
        .unwrap();
    assert_eq!(latest.value.as_deref(), Some(second_value.as_str()));
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
    assert_eq!(first.value.as_deref(), Some(first_value.as_str()));

    let missing = client
        .get_secret(&support::unique("absent"), None)
        .await
        .expect_err("a missing secret is an error");
    assert_eq!(missing.http_status().map(u16::from), Some(404), "{missing}");
}

/// Exchanges `assertion` for a vault token at the bed's Entra ID as `client_id` would:
/// (status, body).
async fn exchange(client_id: &str, assertion: &str) -> (u16, serde_json::Value) {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&support::testbed().ca).unwrap()).unwrap();
    let http = reqwest::Client::builder().tls_certs_merge([ca]).build().unwrap();
    let form = format!(
        "grant_type=client_credentials&client_id={client_id}&scope=https%3A%2F%2Fvault.kvinject.test%2F.default\
         &client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}"
    );
    let res = http
        .post(format!(
            "{}/testbed-tenant/oauth2/v2.0/token",
            support::testbed().authority
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (
        status,
        serde_json::from_slice(&res.bytes().await.unwrap()).unwrap(),
    )
}

async fn read_with(token: &str, name: &str) -> u16 {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&support::testbed().ca).unwrap()).unwrap();
    let http = reqwest::Client::builder().tls_certs_merge([ca]).build().unwrap();
    let url = format!(
        "{}secrets/{name}/?api-version=2025-07-01",
        support::testbed().vault_url
    );
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The bed's Entra ID checks a federated credential's assertion as Entra ID does, and the
/// vault grants reads per identity, so a refusal in a test is theirs, not kvinject's.
#[tokio::test]
async fn entra_checks_federated_assertions_and_the_vault_checks_each_identitys_access() {
    let _vault = support::VAULT.read().await;
    let client = support::kube().await;
    let ns = support::namespace(&client, "entra", &[]).await;
    let sa: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "api"}})).unwrap();
    kube::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &sa)
        .await
        .unwrap();
    let (a, b) = (support::unique("client-a"), support::unique("client-b"));
    support::federate(&a, &ns, "api").await;
    let (x, y) = (support::unique("only-x"), support::unique("not-y"));
    support::seed_secret(&x, &support::distinctive_value()).await;
    support::seed_secret(&y, &support::distinctive_value()).await;
    support::entra_control(
        "vault-access",
        serde_json::json!({"client_id": a, "secrets": [x]}),
    )
    .await;

    let assertion = support::service_account_token(&client, &ns, "api", "api://AzureADTokenExchange").await;
    let (status, body) = exchange(&a, &assertion).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(read_with(token, &x).await, 200, "A may read x");
    assert_eq!(read_with(token, &y).await, 403, "A may read nothing else");
    let by_client = &support::vault_counters().await["secrets_get_by_client"][&a];
    assert_eq!(
        by_client[x.to_lowercase()],
        1,
        "the vault counts A's read of x: {by_client}"
    );

    // Another client id that has no federated credential for this subject.
    let (status, body) = exchange(&b, &assertion).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS70021"),
        "{body}"
    );
    // A token for another audience (the apiserver's own).
    let other = support::service_account_token(&client, &ns, "api", "https://kubernetes.default.svc").await;
    let (status, body) = exchange(&a, &other).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("Assertion Audience"),
        "{body}"
    );
    // A forged signature.
    // (a character in the middle of the signature: the last one may only carry padding bits)
    let at = assertion.rfind('.').unwrap() + 10;
    let flipped = if &assertion[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{flipped}{}", &assertion[..at], &assertion[at + 1..]);
    let (status, body) = exchange(&a, &forged).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS700027"),
        "{body}"
    );
    support::delete_from_drop::<k8s_openapi::api::core::v1::Namespace>(ns);
}

/// Exchanges a client secret for a vault token at the bed's Entra ID: (status, body).
async fn token_for(tenant: &str, client_id: &str, secret: &str, scope: &str) -> (u16, serde_json::Value) {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&support::testbed().ca).unwrap()).unwrap();
    let http = reqwest::Client::builder().tls_certs_merge([ca]).build().unwrap();
    let res = http
        .post(format!(
            "{}/{tenant}/oauth2/v2.0/token",
            support::testbed().authority
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&client_id={client_id}&client_secret={secret}&scope={}",
            scope.replace(':', "%3A").replace('/', "%2F")
        ))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (
        status,
        serde_json::from_slice(&res.bytes().await.unwrap()).unwrap(),
    )
}

/// The bed is no friendlier than Azure when nothing fails: Entra ID checks the tenant and
/// the client secret; the vault takes only tokens Entra ID issued for it, and refuses values
/// above Key Vault's 25 KB limit.
#[tokio::test]
async fn the_bed_refuses_what_azure_refuses() {
    let _vault = support::VAULT.read().await;
    let vault_scope = "https://vault.kvinject.test/.default";
    let (status, body) = token_for("testbed-tenant", "kvinject-tests", "wrong-secret", vault_scope).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215"),
        "{body}"
    );
    let (status, body) = token_for("testbed-tenant", "nobody", "testbed-client-secret", vault_scope).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS700016"),
        "{body}"
    );
    let (status, body) = token_for(
        "other-tenant",
        "kvinject-tests",
        "testbed-client-secret",
        vault_scope,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS90002"),
        "{body}"
    );

    // A token for another resource, and one Entra ID never issued, are 401s with the challenge.
    let name = support::unique("strict");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let (status, body) = token_for(
        "testbed-tenant",
        "kvinject-tests",
        "testbed-client-secret",
        "https://management.kvinject.test/.default",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let elsewhere = body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        read_with(&elsewhere, &name).await,
        401,
        "a token for another resource"
    );
    assert_eq!(
        read_with("testbed.0123456789abcdef", &name).await,
        401,
        "a token never issued"
    );
    let (status, body) = token_for(
        "testbed-tenant",
        "kvinject-tests",
        "testbed-client-secret",
        vault_scope,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        read_with(body["access_token"].as_str().unwrap(), &name).await,
        200,
        "the right token"
    );
    let admin =
        std::env::var("KVINJECT_VAULT_ADMIN_TOKEN").expect("testbed env exports KVINJECT_VAULT_ADMIN_TOKEN");
    assert_eq!(
        read_with(&admin, &name).await,
        200,
        "the admin token of `testbed up`"
    );

    // Key Vault's limit on a value: 25 KB.
    use azure_security_keyvault_secrets::models::SetSecretParameters;
    let client = support::secret_client();
    let at_limit = SetSecretParameters {
        value: Some("x".repeat(25 * 1024)),
        ..Default::default()
    };
    client
        .set_secret(&support::unique("at-limit"), at_limit.try_into().unwrap(), None)
        .await
        .expect("25 KB is accepted");
    let over = SetSecretParameters {
        value: Some("x".repeat(25 * 1024 + 1)),
        ..Default::default()
    };
    let err = client
        .set_secret(&support::unique("over-limit"), over.try_into().unwrap(), None)
        .await
        .expect_err("more than 25 KB is refused");
    assert_eq!(err.http_status().map(u16::from), Some(400), "{err}");
}
