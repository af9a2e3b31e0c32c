//! How kvinject runs: the credential a cluster gives it, pods created by controllers, and
//! shutdown.

use crate::{
    inject::{create, pod, reference},
    support::{self, Kvinject},
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn workload_identity_is_chosen_when_a_federated_token_file_is_mounted() {
    let _vault = support::VAULT.read().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("azure-identity-token");
    // What the workload identity webhook mounts: a projected ServiceAccount token for Entra
    // ID's audience, whose subject a federated credential of the client id trusts. The bed's
    // Entra ID checks its signature against the apiserver's keys, as Entra ID does.
    let client = support::kube().await;
    let token =
        support::service_account_token(&client, "default", "default", "api://AzureADTokenExchange").await;
    std::fs::write(&token_file, token).unwrap();
    support::federate("kvinject-workload", "default", "default").await;
    let token_path = token_file.to_str().unwrap().to_owned();
    // Only this test authenticates with a client assertion; kvinject's first token (its
    // vault probe may fetch it before the pod arrives) moves this counter.
    let before = support::vault_counters().await["assertion_tokens"]
        .as_u64()
        .unwrap();
    let kvinject = Kvinject::spawn(
        support::free_port(),
        support::free_port(),
        &[],
        &[
            ("AZURE_FEDERATED_TOKEN_FILE", &token_path),
            ("AZURE_TENANT_ID", "testbed-tenant"),
            ("AZURE_CLIENT_ID", "kvinject-workload"),
        ],
    )
    .await;
    let s = support::setup_for("wi", kvinject).await;
    let name = support::unique("wi");
    support::seed_secret(&name, &support::distinctive_value()).await;
    create(&s, &pod("wi", &[("X", &reference(&name))], json!({})))
        .await
        .expect("admitted with workload identity");
    let after = support::vault_counters().await["assertion_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        after > before,
        "kvinject got its token with the federated token (client assertion)"
    );
}

#[tokio::test]
async fn pods_a_deployment_creates_are_rewritten() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("deploy", &[]).await;
    let name = support::unique("deploy");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1", "env": [{"name": "X", "value": reference(&name)}]}]}
            }
        }
    }))
    .unwrap();
    Api::<Deployment>::namespaced(s.client.clone(), &s.ns)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    support::eventually(Duration::from_secs(30), "the ReplicaSet's two pods", || async {
        pods.list(&ListParams::default().labels("app=web"))
            .await
            .map(|l| l.items.len() == 2)
            .unwrap_or(false)
    })
    .await;
    for p in pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
    {
        let env = &p.spec.unwrap().containers[0].env.clone().unwrap()[0];
        assert!(
            env.value.is_none()
                && env
                    .value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref())
                    .is_some(),
            "{env:?}"
        );
    }
    assert_eq!(
        s.kvinject.metric("kvinject_secrets_created_total", &[]).await,
        1.0,
        "one Secret for both replicas"
    );
    // The Deployment in git, and in the cluster, still holds only the reference.
    let stored = Api::<Deployment>::namespaced(s.client.clone(), &s.ns)
        .get("web")
        .await
        .unwrap();
    let template_env = &stored.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap()[0];
    assert_eq!(template_env.value.as_deref(), Some(reference(&name).as_str()));
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    let mut kvinject = Kvinject::start(&[]).await;
    let (status, took) = kvinject.terminate();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        kvinject.logs()
    );
    assert!(took < Duration::from_secs(12), "shutdown took {took:?}");
    assert!(kvinject.logs().contains("shutting down"));
}

#[tokio::test]
async fn after_sigterm_it_is_not_ready_but_keeps_answering_for_the_shutdown_delay() {
    let mut s = support::setup("shutdown", &["--shutdown-delay", "3s"]).await;
    let started = std::time::Instant::now();
    s.kvinject.send_sigterm();
    support::eventually(Duration::from_secs(2), "/readyz to say not ready", || async {
        !s.kvinject.ready().await
    })
    .await;
    // The apiserver still reaches it: kvinject itself answers (and denies) this probe.
    support::wait_for_webhook(&s.client, &s.ns).await;
    assert!(
        s.kvinject.exited().is_none() && started.elapsed() < Duration::from_secs(3),
        "the probe was answered within the delay"
    );
    let mut status = None;
    support::eventually(
        Duration::from_secs(15),
        "kvinject to exit after the delay",
        || {
            status = s.kvinject.exited();
            let done = status.is_some();
            async move { done }
        },
    )
    .await;
    assert!(status.unwrap().success());
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "exited before the delay: {:?}",
        started.elapsed()
    );
}
