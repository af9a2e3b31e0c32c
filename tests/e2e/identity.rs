//! Reading Key Vault as the workload: a ServiceAccount annotated `kvinject.io/identity:
//! workload` has its pods' secrets read as its own federated Azure identity. The bed's Entra
//! ID checks the ServiceAccount token like Entra ID, and its vault decides per identity, so
//! every refusal here is theirs.

use crate::{
    inject::{self, pod},
    rotation::{rotation_setup, version},
    support::{self, Setup},
};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;
use std::time::Duration;

async fn service_account(s: &Setup, name: &str, annotations: serde_json::Value) {
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}})).unwrap();
    Api::<ServiceAccount>::namespaced(s.client.clone(), &s.ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
}

fn as_sa(name: &str, sa: &str, env: &[(&str, &str)], annotations: serde_json::Value) -> Pod {
    let mut p = pod(name, env, annotations);
    p.spec.as_mut().unwrap().service_account_name = Some(sa.to_owned());
    p
}

async fn reads_by(client_id: &str, secret: &str) -> u64 {
    support::vault_counters().await["secrets_get_by_client"][client_id][secret.to_lowercase()]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn each_service_account_reads_as_its_own_identity_and_never_shares_a_value() {
    // Exclusive: the vault and its token endpoint are stopped midway.
    let _vault = support::VAULT.write().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("identity", &[]).await;
    let (a, b) = (support::unique("client-a"), support::unique("client-b"));
    let workload = |client_id: &str| json!({"kvinject.io/identity": "workload", "azure.workload.identity/client-id": client_id});
    service_account(&s, "a", workload(&a)).await;
    service_account(&s, "b", workload(&b)).await;
    service_account(&s, "c", workload(&a)).await; // claims A, but A trusts only `a`
    service_account(&s, "d", json!({"kvinject.io/identity": "workload"})).await;
    support::federate(&a, &s.ns, "a").await;
    support::federate(&b, &s.ns, "b").await;
    let x = support::unique("only-a");
    let first = support::seed_secret(&x, &support::unique("value-of-x")).await;
    support::entra_control("vault-access", json!({"client_id": a, "secrets": [x]})).await;
    support::entra_control("vault-access", json!({"client_id": b, "secrets": []})).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let created = |p: Pod| {
        let pods = pods.clone();
        async move {
            pods.create(&PostParams::default(), &p)
                .await
                .map_err(|e| match e {
                    kube::Error::Api(s) => s.message,
                    other => other.to_string(),
                })
        }
    };

    // `a` reads x as A: the vault counts A's read, and the Secret says whose it is.
    let stored = created(as_sa(
        "app-a",
        "a",
        &[("X", &inject::reference(&x))],
        json!({"kvinject.io/refresh-interval": "1s"}),
    ))
    .await
    .expect("ServiceAccount a may read x");
    let a_secret = inject::secret_key_ref(&stored, "X").unwrap();
    assert!(reads_by(&a, &x).await >= 1, "the vault saw A read x");
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let materialized = secrets.get(&a_secret).await.unwrap();
    let annotations = materialized.metadata.annotations.clone().unwrap();
    assert_eq!(annotations["kvinject.io/service-account"], "a");
    assert_eq!(annotations["kvinject.io/client-id"], a);

    // `b` is federated, but Key Vault gives B nothing: refused by the vault, named.
    let denied = created(as_sa("app-b", "b", &[("X", &inject::reference(&x))], json!({})))
        .await
        .expect_err("b may not");
    assert!(
        denied.contains(&format!(
            "ServiceAccount `{}/b` (client id {b}) may not read",
            s.ns
        )),
        "{denied}"
    );
    assert!(denied.contains("403"), "{denied}");
    // `c` claims A without a federated credential for its subject: refused by Entra ID.
    let denied = created(as_sa("app-c", "c", &[("X", &inject::reference(&x))], json!({})))
        .await
        .expect_err("c may not");
    assert!(
        denied.contains(&format!("Entra ID refused ServiceAccount `{}/c`", s.ns)),
        "{denied}"
    );
    assert!(denied.contains("AADSTS70021"), "{denied}");
    // `d` opted in without saying which identity: told what to add.
    let denied = created(as_sa("app-d", "d", &[("X", &inject::reference(&x))], json!({})))
        .await
        .expect_err("d");
    assert!(
        denied.contains("has no `azure.workload.identity/client-id` annotation"),
        "{denied}"
    );
    // No Secret was made for b or c, and a's is theirs to use by no name.
    let all = secrets
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=kvinject"))
        .await
        .unwrap();
    let readers: Vec<String> = all
        .items
        .iter()
        .filter_map(|s| {
            s.metadata
                .annotations
                .as_ref()?
                .get("kvinject.io/service-account")
                .cloned()
        })
        .collect();
    assert_eq!(
        readers,
        vec!["a".to_owned()],
        "only a's identity materialized anything"
    );
    // kvinject's own identity reads the same reference into a Secret of its own.
    let default = created(pod("app-default", &[("X", &inject::reference(&x))], json!({})))
        .await
        .unwrap();
    assert_ne!(
        inject::secret_key_ref(&default, "X").unwrap(),
        a_secret,
        "identities never share a Secret"
    );

    // Rotation reads with A's token too.
    let reads_before = reads_by(&a, &x).await;
    let second = support::seed_secret(&x, &support::unique("rotated")).await;
    support::eventually(
        Duration::from_secs(20),
        "a's Secret to follow the new version",
        || async { version(&secrets.get(&a_secret).await.unwrap()) == second },
    )
    .await;
    assert_ne!(first, second);
    assert!(reads_by(&a, &x).await > reads_before, "the rotation read x as A");

    // With the vault and its token endpoint stopped, a's materialized reference still admits.
    support::testbed_cmd("vault-stop");
    let offline = created(as_sa("app-a-2", "a", &[("X", &inject::reference(&x))], json!({}))).await;
    support::testbed_cmd("vault-start");
    let offline = offline.expect("a materialized reference admits while Key Vault and Entra ID are down");
    assert_eq!(inject::secret_key_ref(&offline, "X").unwrap(), a_secret);
    assert!(
        !s.kvinject.logs().contains("value-of-x"),
        "a secret value reached kvinject's log"
    );
}
