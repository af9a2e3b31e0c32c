//! Trust boundaries on the test bed, as an attacker inside the cluster would probe them:
//! labelled Secrets kvinject did not seal, hand-edited values, AdmissionReviews POSTed
//! straight to the webhook port, refresh intervals meant to hammer Key Vault, and floods of
//! first-use reads.

use crate::{
    inject::{self, pod},
    rotation::{rotation_args, rotation_setup, rotation_setup_every, version},
    support,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use std::time::Duration;

/// GETs the bed's vault answered for one secret name (any version), from its own counters.
async fn reads_of(name: &str) -> u64 {
    support::vault_counters().await["secrets_get_by_name"][name.to_lowercase()]
        .as_u64()
        .unwrap_or(0)
}

/// A labelled Secret with a reference annotation and a value of the attacker's choosing.
fn forged(name: &str, reference: &str, value: &str) -> Secret {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "kvinject"},
                     "annotations": {"kvinject.io/reference": reference}},
        "type": "Opaque",
        "data": {"value": base64_of(value)},
    }))
    .unwrap()
}

fn base64_of(v: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(v)
}

async fn events_for(client: &Client, ns: &str, reason: &str, name: &str) -> usize {
    support::events_about(client, ns, reason, name).await.len()
}

#[tokio::test]
async fn labelled_secrets_kvinject_did_not_seal_are_never_filled_used_or_deleted() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup_every("trust", "2s", &[]).await;
    let prod = support::unique("prod-admin");
    let prod_value = support::unique("production-value");
    support::seed_secret(&prod, &prod_value).await;

    // 1. A namespace that is not opted in, a Secret shaped like kvinject's, no version.
    let outside = support::namespace(&s.client, "outside", &[]).await;
    let _outside = support::NamespaceGuard(outside.clone());
    let bait: Secret = serde_json::from_value(json!({
        "metadata": {"name": "bait", "labels": {"app.kubernetes.io/managed-by": "kvinject"},
                     "annotations": {"kvinject.io/reference": inject::reference(&prod)}},
        "type": "Opaque",
    }))
    .unwrap();
    let outside_secrets: Api<Secret> = Api::namespaced(s.client.clone(), &outside);
    outside_secrets
        .create(&PostParams::default(), &bait)
        .await
        .unwrap();

    // 2. In the opted-in namespace, a Secret under the very name kvinject would use, with a
    //    value of the attacker's choosing (the name is computable; a dry run shows it).
    let p = pod("victim", &[("DB", &inject::reference(&prod))], json!({}));
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let dry = pods
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &p,
        )
        .await
        .unwrap();
    let name = inject::secret_key_ref(&dry, "DB").expect("the dry run shows the Secret's name");
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    secrets
        .create(
            &PostParams::default(),
            &forged(&name, &inject::reference(&prod), "attacker-chosen"),
        )
        .await
        .unwrap();
    let reads_before = reads_of(&prod).await;

    let denied = inject::create(&s, &p)
        .await
        .expect_err("a pod must not get a forged Secret");
    assert!(
        denied.contains(&format!(
            "Secret {}/{name} carries kvinject's label but was not created by kvinject",
            s.ns
        )),
        "{denied}"
    );

    // Three refresh intervals (2 s) and more: neither forged Secret is filled or rewritten,
    // nothing read Key Vault for them, and each got one Event.
    support::eventually(
        Duration::from_secs(20),
        "ForeignSecret Events on both forged Secrets",
        || async {
            events_for(&s.client, &outside, "ForeignSecret", "bait").await >= 1
                && events_for(&s.client, &s.ns, "ForeignSecret", &name).await >= 1
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        outside_secrets.get("bait").await.unwrap().data.is_none(),
        "the bait was filled with a Key Vault value"
    );
    let kept = secrets.get(&name).await.unwrap();
    assert_eq!(
        kept.data.unwrap()["value"].0,
        b"attacker-chosen",
        "kvinject wrote into a Secret it did not make"
    );
    assert_eq!(
        reads_of(&prod).await,
        reads_before,
        "Key Vault was read for a forged Secret"
    );
    assert_eq!(
        events_for(&s.client, &outside, "ForeignSecret", "bait").await,
        1,
        "one Event, not one per sweep"
    );

    // Deleting the forgery lets kvinject make the real one: the next pod gets the real value.
    secrets.delete(&name, &Default::default()).await.unwrap();
    support::eventually(
        Duration::from_secs(10),
        "the forged Secret to be gone",
        || async { secrets.get_opt(&name).await.unwrap().is_none() },
    )
    .await;
    inject::create(&s, &p)
        .await
        .expect("admitted once the forgery is gone");
    assert_eq!(
        secrets.get(&name).await.unwrap().data.unwrap()["value"].0,
        prod_value.as_bytes()
    );
    assert!(
        !s.kvinject.logs().contains(&prod_value),
        "a secret value reached kvinject's log"
    );
}

#[tokio::test]
async fn a_hand_edited_value_is_restored_from_key_vault() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("edited", &[]).await;
    let name = support::unique("edited");
    let value = support::unique("real-value");
    let first = support::seed_secret(&name, &value).await;
    // A newer version exists by the time of the edit: the restore brings back the version
    // the Secret records, not whatever is latest.
    let p = pod("app", &[("X", &inject::reference(&name))], json!({}));
    let stored = inject::create(&s, &p).await.unwrap();
    let secret_name = inject::secret_key_ref(&stored, "X").expect("X is a secretKeyRef");
    support::seed_secret(&name, &support::unique("newer")).await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let patch = json!({"data": {"value": base64_of("edited-by-hand")}});
    secrets
        .patch(&secret_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();

    support::eventually(
        Duration::from_secs(10),
        "the hand-edited value to be restored",
        || async { secrets.get(&secret_name).await.unwrap().data.unwrap()["value"].0 == value.as_bytes() },
    )
    .await;
    assert_eq!(
        version(&secrets.get(&secret_name).await.unwrap()),
        first,
        "the recorded version, not the latest"
    );
    support::eventually(Duration::from_secs(10), "a Restored Event", || async {
        events_for(&s.client, &s.ns, "Restored", &secret_name).await >= 1
    })
    .await;
}

/// The key id a Secret's `kvinject.io/signature` names.
fn signed_with(secret: &Secret) -> String {
    let signature = secret.metadata.annotations.as_ref().unwrap()["kvinject.io/signature"].clone();
    signature.split(':').nth(1).unwrap().to_owned()
}

#[tokio::test]
async fn rotating_the_signing_key_seals_every_secret_again_and_keeps_its_value() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    // A signing key of this test's own, so the other tests' kvinjects keep theirs.
    let key_secret = support::unique("signing-key");
    let mut args = rotation_args(&support::unique("lease"), "1h");
    args.extend(["--signing-key-secret".to_owned(), key_secret.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut s = support::setup("resealed", &args).await;
    let name = support::unique("resealed");
    let value = support::unique("kept-value");
    support::seed_secret(&name, &value).await;
    let stored = inject::create(&s, &pod("app", &[("X", &inject::reference(&name))], json!({})))
        .await
        .unwrap();
    let secret_name = inject::secret_key_ref(&stored, "X").expect("X is a secretKeyRef");
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let before = secrets.get(&secret_name).await.unwrap();
    let old_key = signed_with(&before);

    // The documented rotation: add a key, make it current, restart kvinject.
    let keys: Api<Secret> = Api::namespaced(s.client.clone(), "default");
    let patch = json!({
        "metadata": {"annotations": {"kvinject.io/current-key": "k-next"}},
        "data": {"k-next": base64_of(&"n".repeat(32))},
    });
    keys.patch(&key_secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    s.kvinject.restart(&args).await;

    support::eventually(
        Duration::from_secs(45),
        "the Secret sealed with the new key",
        || async { signed_with(&secrets.get(&secret_name).await.unwrap()) == "k-next" },
    )
    .await;
    let after = secrets.get(&secret_name).await.unwrap();
    assert_ne!(old_key, "k-next");
    assert!(
        after.data.as_ref().unwrap()["value"].0 == value.as_bytes(),
        "the value is the one it held (kvinject keeps no values in its cache, and reads the Secret to seal it)"
    );
    assert_eq!(version(&after), version(&before), "same version");
    assert_eq!(
        events_for(&s.client, &s.ns, "Restored", &secret_name).await,
        0,
        "not a restore"
    );
    assert_eq!(
        events_for(&s.client, &s.ns, "ForeignSecret", &secret_name).await,
        0
    );
    // Pods still get it: the new seal verifies.
    let again = inject::create(&s, &pod("again", &[("X", &inject::reference(&name))], json!({})))
        .await
        .unwrap();
    assert_eq!(
        inject::secret_key_ref(&again, "X").as_deref(),
        Some(secret_name.as_str())
    );
    let _ = keys.delete(&key_secret, &Default::default()).await;
}

#[tokio::test]
async fn a_review_posted_for_a_namespace_kvinject_does_not_act_for_writes_nothing() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("post", &[]).await;
    let name = support::unique("prod-db");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let outside = support::namespace(&s.client, "unlabelled", &[]).await;
    let _outside = support::NamespaceGuard(outside.clone());
    for ns in ["kube-system", "kvinject", outside.as_str()] {
        let answer = support::post_review(&s.kvinject, &support::review(ns, &inject::reference(&name))).await;
        let response = &answer["response"];
        assert_eq!(response["uid"], "forged-1");
        assert_eq!(response["allowed"], true, "{answer}");
        assert!(
            response.get("patch").is_none(),
            "no patch for namespace {ns}: {answer}"
        );
        assert!(
            response["warnings"][0]
                .as_str()
                .unwrap()
                .contains("does not act for namespace"),
            "{answer}"
        );
    }
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &outside);
    assert!(
        secrets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let system: Api<Secret> = Api::namespaced(s.client.clone(), "kube-system");
    let labelled = system
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=kvinject"))
        .await
        .unwrap();
    assert!(labelled.items.is_empty(), "kvinject wrote into kube-system");
    assert_eq!(
        reads_of(&name).await,
        0,
        "Key Vault was read for a review kvinject does not act on"
    );

    // The same POST for the opted-in namespace does what the apiserver would have asked.
    let answer = support::post_review(&s.kvinject, &support::review(&s.ns, &inject::reference(&name))).await;
    assert!(answer["response"]["patch"].is_string(), "{answer}");
}

#[tokio::test]
async fn a_pod_asking_for_a_check_every_millisecond_gets_the_floor() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("floor", &["--min-refresh-interval", "3s"]).await;
    let name = support::unique("hammered");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "greedy", "annotations": {"kvinject.io/refresh-interval": "1ms"}},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/x", "env": [{"name": "X", "value": inject::reference(&name)}]}]}
    });
    let (ok, _, err) = support::kubectl(&["-n", &s.ns, "create", "-f", "-"], Some(&manifest.to_string()));
    assert!(ok, "{err}");
    assert!(
        err.contains("1ms is below the floor of 3s"),
        "the admission warning: {err}"
    );
    let start = reads_of(&name).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let reads = reads_of(&name).await - start;
    // At most one check per 3 s floor (plus one at the edge), where 1 ms would be thousands.
    assert!(reads <= 4, "{reads} Key Vault reads in 10 s with a 3 s floor");
}

#[tokio::test]
async fn first_use_reads_are_bounded_per_namespace() {
    let _vault = support::VAULT.read().await;
    let s = support::setup(
        "budget",
        &["--namespace-read-rate", "0.01", "--namespace-read-burst", "2"],
    )
    .await;
    let names: Vec<String> = (0..3).map(|i| support::unique(&format!("burst{i}"))).collect();
    for n in &names {
        support::seed_secret(n, &support::distinctive_value()).await;
    }
    for (i, n) in names.iter().enumerate().take(2) {
        inject::create(
            &s,
            &pod(&format!("p{i}"), &[("X", &inject::reference(n))], json!({})),
        )
        .await
        .expect("within the burst");
    }
    let denied = inject::create(&s, &pod("p2", &[("X", &inject::reference(&names[2]))], json!({})))
        .await
        .expect_err("past the burst");
    assert!(
        denied.contains(&format!(
            "namespace {} asked Key Vault for more new references than its limit",
            s.ns
        )),
        "{denied}"
    );
    assert!(denied.contains("0.01/s, bursts of 2"), "{denied}");
    assert_eq!(reads_of(&names[2]).await, 0);
    // Materialized references cost nothing from the budget.
    inject::create(
        &s,
        &pod("again", &[("X", &inject::reference(&names[0]))], json!({})),
    )
    .await
    .expect("a materialized reference needs no read");
}

#[tokio::test]
async fn with_a_client_ca_only_the_apiserver_reaches_the_webhook() {
    let _vault = support::VAULT.read().await;
    let pki = support::testbed().dir.join("pki");
    let client_ca = pki.join("webhook-client-ca.crt");
    // setup waits until the apiserver's calls get through: the apiserver presents the client
    // certificate its AdmissionConfiguration names.
    let s = support::setup("mtls", &["--client-ca", client_ca.to_str().unwrap()]).await;
    let name = support::unique("mtls");
    support::seed_secret(&name, &support::distinctive_value()).await;
    inject::create(
        &s,
        &pod(
            "through-the-apiserver",
            &[("X", &inject::reference(&name))],
            json!({}),
        ),
    )
    .await
    .expect("the apiserver reaches a webhook that requires its client certificate");

    let ca = reqwest::Certificate::from_pem(&std::fs::read(&support::testbed().ca).unwrap()).unwrap();
    let body = support::review(&s.ns, &inject::reference(&name)).to_string();
    let anonymous = reqwest::Client::builder()
        .tls_certs_merge([ca.clone()])
        .build()
        .unwrap();
    let refused = anonymous.post(s.kvinject.url()).body(body.clone()).send().await;
    assert!(
        refused.is_err(),
        "a POST without a client certificate was answered: {refused:?}"
    );
    // A certificate the cluster's CA signed (the bed's admin) is not the apiserver's either.
    let mut admin = std::fs::read(pki.join("admin.crt")).unwrap();
    admin.extend(std::fs::read(pki.join("admin.key")).unwrap());
    let other = reqwest::Client::builder()
        .tls_certs_merge([ca])
        .identity(reqwest::Identity::from_pem(&admin).unwrap())
        .build()
        .unwrap();
    let refused = other.post(s.kvinject.url()).body(body).send().await;
    assert!(
        refused.is_err(),
        "a POST with a certificate from another CA was answered: {refused:?}"
    );
}
