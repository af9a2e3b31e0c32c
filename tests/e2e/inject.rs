//! Injection through the real apiserver: env references and registry credentials are
//! rewritten in the stored Pod, and the Secrets hold the vault's values.

use crate::support::{self, Setup};
use azure_security_keyvault_secrets::models::SecretAttributes;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::{Value, json};

pub fn pod(name: &str, env: &[(&str, &str)], annotations: Value) -> Pod {
    let env: Vec<Value> = env.iter().map(|(n, v)| json!({"name": n, "value": v})).collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1", "env": env}]}
    }))
    .unwrap()
}

pub fn reference(name: &str) -> String {
    format!("akv://{}/{name}", support::testbed().vault_name)
}

/// The Secret an env entry of the pod's first container refers to.
pub(crate) fn secret_key_ref(pod: &Pod, env: &str) -> Option<String> {
    pod.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == env)?
        .value_from
        .as_ref()?
        .secret_key_ref
        .as_ref()
        .map(|r| r.name.clone())
}

pub async fn create(s: &Setup, p: &Pod) -> Result<Pod, String> {
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    pods.create(&PostParams::default(), p).await.map_err(|e| match e {
        kube::Error::Api(status) => status.message,
        other => other.to_string(),
    })
}

#[tokio::test]
async fn env_and_registry_credentials_are_materialized_and_rewritten() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("inject", &[]).await;
    let db = support::unique("db-password");
    let acr = support::unique("acr-config");
    let sp = support::unique("sp-secret");
    let (db_value, sp_value) = (support::distinctive_value(), support::distinctive_value());
    let db_version = support::seed_secret(&db, &db_value).await;
    let docker_config = r#"{"auths":{"acr.example":{"auth":"dXNlcjpwYXNz"}}}"#;
    support::seed_secret(&acr, docker_config).await;
    support::seed_secret(&sp, &sp_value).await;

    let p = pod(
        "web",
        &[("DB_PASSWORD", &reference(&db)), ("GREETING", "hello")],
        json!({
            "kvinject.io/image-pull-secrets": reference(&acr),
            "kvinject.io/image-pull-registry": "sp.example",
            "kvinject.io/image-pull-username": "11111111-2222-3333-4444-555555555555",
            "kvinject.io/image-pull-password": reference(&sp),
        }),
    );
    create(&s, &p).await.expect("the pod is admitted");

    let stored = Api::<Pod>::namespaced(s.client.clone(), &s.ns)
        .get("web")
        .await
        .unwrap();
    let env = stored.spec.as_ref().unwrap().containers[0].env.clone().unwrap();
    assert_eq!(env[1].value.as_deref(), Some("hello"), "plain values stay");
    assert!(
        env[0].value.is_none(),
        "the reference is gone from the stored pod: {:?}",
        env[0]
    );
    let secret_name = secret_key_ref(&stored, "DB_PASSWORD").expect("DB_PASSWORD is a secretKeyRef");
    assert_eq!(
        env[0]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .key,
        "value"
    );
    assert_eq!(
        stored.metadata.labels.as_ref().unwrap()["kvinject.io/injected"],
        "true"
    );

    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let materialized = secrets
        .get(&secret_name)
        .await
        .expect("the materialized Secret exists");
    assert_eq!(
        materialized.data.as_ref().unwrap()["value"].0,
        db_value.as_bytes()
    );
    assert_eq!(
        materialized.data.as_ref().unwrap().len(),
        1,
        "the Secret holds nothing but the value"
    );
    let labels = materialized.metadata.labels.clone().unwrap();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "kvinject");
    let annotations = materialized.metadata.annotations.clone().unwrap();
    assert_eq!(annotations["kvinject.io/reference"], reference(&db));
    assert_eq!(annotations["kvinject.io/version"], db_version);

    let pull: Vec<String> = stored
        .spec
        .as_ref()
        .unwrap()
        .image_pull_secrets
        .clone()
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(pull.len(), 2, "{pull:?}");
    let acr_secret = secrets.get(&pull[0]).await.unwrap();
    assert_eq!(
        acr_secret.type_.as_deref(),
        Some("kubernetes.io/dockerconfigjson")
    );
    assert_eq!(
        acr_secret.data.as_ref().unwrap()[".dockerconfigjson"].0,
        docker_config.as_bytes()
    );
    let sp_secret = secrets.get(&pull[1]).await.unwrap();
    let config: Value =
        serde_json::from_slice(&sp_secret.data.as_ref().unwrap()[".dockerconfigjson"].0).unwrap();
    assert_eq!(
        config["auths"]["sp.example"]["username"],
        "11111111-2222-3333-4444-555555555555"
    );
    assert_eq!(config["auths"]["sp.example"]["password"], sp_value.as_str());

    // A second pod with the same references shares the Secrets and reads nothing anew.
    let reads_before = s.kvinject.metric("kvinject_keyvault_requests_total", &[]).await;
    let created_before = s.kvinject.metric("kvinject_secrets_created_total", &[]).await;
    let mut again = p.clone();
    again.metadata.name = Some("web-2".into());
    create(&s, &again).await.expect("the second pod is admitted");
    let stored2 = Api::<Pod>::namespaced(s.client.clone(), &s.ns)
        .get("web-2")
        .await
        .unwrap();
    assert_eq!(secret_key_ref(&stored2, "DB_PASSWORD"), Some(secret_name));
    assert_eq!(
        s.kvinject.metric("kvinject_keyvault_requests_total", &[]).await,
        reads_before,
        "Key Vault reads for a materialized pod"
    );
    assert_eq!(
        s.kvinject.metric("kvinject_secrets_created_total", &[]).await,
        created_before,
        "Secret writes for a materialized pod"
    );
    assert!(
        s.kvinject
            .metric(
                "kvinject_cache_lookups_total",
                &["cache=\"secret\"", "result=\"hit\""]
            )
            .await
            >= 3.0
    );

    let logs = s.kvinject.logs();
    for value in [db_value.as_str(), sp_value.as_str(), "dXNlcjpwYXNz"] {
        assert!(!logs.contains(value), "a secret value reached kvinject's log");
    }
}

#[tokio::test]
async fn a_dry_run_writes_nothing_and_returns_the_same_rewrite() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("dryrun", &[]).await;
    let name = support::unique("dry");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let p = pod("dry", &[("X", &reference(&name))], json!({}));
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let dry = pods
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &p,
        )
        .await
        .expect("dry run admitted");
    let secret_name = secret_key_ref(&dry, "X").expect("the dry run shows the rewrite");
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    assert!(
        secrets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .all(|x| x.metadata.name.as_deref() != Some(&secret_name)),
        "a dry run wrote a Secret"
    );
    assert!(pods.get_opt("dry").await.unwrap().is_none());
    let reads = support::vault_counters().await["secrets_get_by_name"][name.to_lowercase()]
        .as_u64()
        .unwrap_or(0);
    assert!(reads >= 1, "a dry run reads Key Vault (to give the same answer)");
    let real = pods.create(&PostParams::default(), &p).await.unwrap();
    assert_eq!(
        secret_key_ref(&real, "X"),
        Some(secret_name.clone()),
        "same rewrite as the dry run"
    );
    assert!(secrets.get_opt(&secret_name).await.unwrap().is_some());
}

#[tokio::test]
async fn bad_input_is_denied_with_what_and_where_and_writes_nothing() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("bad", &[]).await;
    let vault = support::testbed().vault_name.clone();
    let disabled = support::unique("disabled");
    support::seed_secret_with(
        &disabled,
        &support::distinctive_value(),
        SecretAttributes {
            enabled: Some(false),
            ..Default::default()
        },
    )
    .await;
    let expired = support::unique("expired");
    let past = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    support::seed_secret_with(
        &expired,
        &support::distinctive_value(),
        SecretAttributes {
            expires: Some(past),
            ..Default::default()
        },
    )
    .await;
    let forbidden = support::unique("forbidden");
    support::seed_secret(&forbidden, &support::distinctive_value()).await;
    support::vault_control(&format!("forbid/{forbidden}")).await;
    let not_docker = support::unique("not-docker");
    let not_docker_value = support::distinctive_value();
    support::seed_secret(&not_docker, &not_docker_value).await;

    let env_cases = [
        (
            format!("akv://{vault}"),
            "container `app` env `V`: `akv://".to_string() + &vault + "` has no secret name",
        ),
        (
            format!("akv://{vault}/bad_name"),
            "container `app` env `V`: secret name `bad_name` must be 1 to 127 characters".into(),
        ),
        (
            format!("akv://{vault}/a%2F..%2Fb"),
            "container `app` env `V`: secret name `a%2F..%2Fb` must be".into(),
        ),
        (
            "akv://elsewhere/db".into(),
            "container `app` env `V`: vault `elsewhere` is not configured in kvinject".into(),
        ),
        (
            format!("akv://{vault}/{}", support::unique("absent")),
            "was not found".into(),
        ),
        (
            format!("akv://{vault}/{forbidden}"),
            "may not read Key Vault secret".into(),
        ),
        (format!("akv://{vault}/{disabled}"), "is disabled".into()),
        (format!("akv://{vault}/{expired}"), "expired at".into()),
    ];
    for (i, (value, want)) in env_cases.iter().enumerate() {
        let err = create(&s, &pod(&format!("bad-{i}"), &[("V", value)], json!({})))
            .await
            .expect_err(value);
        assert!(
            err.contains("kvinject.io") && err.contains(want.as_str()),
            "{value}: {err}"
        );
    }
    // One good reference beside a bad one: the pod is denied and the good one is not written.
    let good = support::unique("good");
    support::seed_secret(&good, &support::distinctive_value()).await;
    let mixed = pod(
        "mixed",
        &[
            ("GOOD", &format!("akv://{vault}/{good}")),
            ("BAD", &format!("akv://{vault}/{}", support::unique("absent"))),
        ],
        json!({}),
    );
    let err = create(&s, &mixed)
        .await
        .expect_err("a pod with one missing reference");
    assert!(err.contains("was not found"), "{err}");
    let err = create(
        &s,
        &pod(
            "bad-pull",
            &[],
            json!({"kvinject.io/image-pull-secrets": format!("akv://{vault}/{not_docker}")}),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("annotation `kvinject.io/image-pull-secrets`")
            && err.contains("is not a docker config JSON"),
        "{err}"
    );
    assert!(
        !err.contains(&not_docker_value),
        "a denial echoed the value: {err}"
    );

    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    assert!(
        pods.list(&ListParams::default()).await.unwrap().items.is_empty(),
        "no denied pod was stored"
    );
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let ours = secrets
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=kvinject"))
        .await
        .unwrap();
    assert!(
        ours.items.is_empty(),
        "a denied pod left Secrets behind: {:?}",
        ours.items.iter().map(|x| &x.metadata.name).collect::<Vec<_>>()
    );
    support::vault_control(&format!("allow/{forbidden}")).await;
}

#[tokio::test]
async fn pods_without_references_or_opted_out_are_stored_unchanged_and_embedded_schemes_warn() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("plain", &[]).await;
    let plain = pod("plain", &[("A", "b")], json!({}));
    let stored = create(&s, &plain).await.unwrap();
    assert!(
        stored.metadata.labels.unwrap_or_default().is_empty(),
        "a pod without references got a patch"
    );
    let opted_out = pod(
        "out",
        &[("A", "akv://elsewhere/x")],
        json!({"kvinject.io/inject": "false"}),
    );
    let stored = create(&s, &opted_out)
        .await
        .expect("an opted-out pod is not looked at");
    assert_eq!(
        stored.spec.unwrap().containers[0].env.as_ref().unwrap()[0]
            .value
            .as_deref(),
        Some("akv://elsewhere/x")
    );

    let manifest = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "embedded", "namespace": s.ns},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/a", "env": [{"name": "DOC", "value": "see akv://kvtest/x"}]}]}});
    let (ok, _, stderr) = support::kubectl(&["create", "-f", "-"], Some(&manifest.to_string()));
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("Warning:") && stderr.contains("container `app` env `DOC` contains akv://"),
        "kubectl shows the warning: {stderr}"
    );
}

#[tokio::test]
async fn concurrent_first_use_reads_key_vault_once_and_creates_one_secret() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("flight", &[]).await;
    let name = support::unique("shared");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let r = reference(&name);
    let pods: Vec<Pod> = (0..8)
        .map(|i| pod(&format!("p{i}"), &[("X", &r)], json!({})))
        .collect();
    let results = futures::future::join_all(pods.iter().map(|p| create(&s, p))).await;
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(
        s.kvinject
            .metric("kvinject_keyvault_requests_total", &["result=\"ok\""])
            .await,
        1.0,
        "Key Vault reads"
    );
    assert_eq!(
        s.kvinject.metric("kvinject_secrets_created_total", &[]).await,
        1.0,
        "Secret creates"
    );
    assert_eq!(
        s.kvinject
            .metric("kvinject_admissions_total", &["result=\"patched\""])
            .await,
        8.0
    );
}

#[tokio::test]
async fn a_malformed_admission_review_gets_an_invalid_response() {
    let s = support::setup("invalid", &[]).await;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&support::testbed().ca).unwrap()).unwrap();
    let http = reqwest::Client::builder().tls_certs_merge([ca]).build().unwrap();
    let res = http
        .post(s.kvinject.url())
        .header("content-type", "application/json")
        .body("{\"kind\": 42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap();
    assert_eq!(body["response"]["allowed"], false);
    assert_eq!(body["response"]["status"]["reason"], "InvalidRequest");
    assert!(
        body["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not an AdmissionReview"),
        "{body}"
    );
}

/// A ReplicaSet's pods reach the webhook identical but for their uid and the name of the
/// token volume the apiserver adds to each. Once the Secrets are materialized, such a burst
/// is answered from the decision memo, and every pod is created whole: its own token volume
/// mounted, the reference rewritten.
#[tokio::test]
async fn a_burst_of_alike_pods_is_answered_from_memory_and_each_pod_is_whole() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("burst", &[]).await;
    let name = support::unique("burst");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let warm = create(&s, &pod("warm", &[("X", &reference(&name))], json!({})))
        .await
        .unwrap();
    let secret_name = secret_key_ref(&warm, "X").unwrap();
    let mut template = pod("unused", &[("X", &reference(&name))], json!({}));
    template.metadata.name = None;
    template.metadata.generate_name = Some("burst-".into());
    let hits = || {
        s.kvinject.metric(
            "kvinject_cache_lookups_total",
            &["cache=\"decision\"", "result=\"hit\""],
        )
    };
    // Five pods in well under a second share at most one second boundary: at least three
    // of them have the same managedFields time, and all but the first are answered from
    // memory, once the warm pod's Secret is in kvinject's watch cache (a change to it
    // empties the memo).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let burst = loop {
        let before = hits().await;
        let mut burst = Vec::new();
        for _ in 0..5 {
            burst.push(create(&s, &template).await.unwrap());
        }
        if hits().await - before >= 2.0 {
            break burst;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no burst of alike pods was answered from memory"
        );
    };
    let mut token_volumes = std::collections::BTreeSet::new();
    for p in &burst {
        assert_eq!(secret_key_ref(p, "X").as_deref(), Some(secret_name.as_str()));
        let spec = p.spec.as_ref().unwrap();
        let token = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name.starts_with("kube-api-access-"))
            .expect("the token volume");
        let mounts = spec.containers[0].volume_mounts.as_ref().unwrap();
        assert!(
            mounts.iter().any(|m| m.name == token.name),
            "its own token volume is mounted"
        );
        token_volumes.insert(token.name.clone());
    }
    assert_eq!(
        token_volumes.len(),
        burst.len(),
        "each pod has its own token volume"
    );
}
