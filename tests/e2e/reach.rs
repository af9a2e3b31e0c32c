//! Reach: one field of a JSON secret, and denials that point at every place a reference is
//! used, through the real apiserver.

use crate::{
    inject::{self, pod},
    rotation::{rotation_setup, version},
    support,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::ListParams};
use serde_json::json;
use std::time::Duration;

async fn reads_of(name: &str) -> u64 {
    support::vault_counters().await["secrets_get_by_name"][name.to_lowercase()]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn fields_of_one_json_secret_are_materialized_from_one_read_and_follow_rotation() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup("json", &[]).await;
    let name = support::unique("db-creds");
    let password = support::unique("pw");
    support::seed_secret(
        &name,
        &json!({"username": "app", "password": password, "db": {"port": 5432}}).to_string(),
    )
    .await;
    let field = |f: &str| format!("{}#{f}", inject::reference(&name));
    let p = pod(
        "app",
        &[
            ("USER", &field("username")),
            ("PASSWORD", &field("password")),
            ("PORT", &field("db.port")),
        ],
        json!({"kvinject.io/refresh-interval": "1s"}),
    );
    let stored = inject::create(&s, &p).await.expect("fields of a JSON secret");
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let value = |env: &str| {
        let (secrets, name) = (secrets.clone(), inject::secret_key_ref(&stored, env).unwrap());
        async move {
            String::from_utf8(secrets.get(&name).await.unwrap().data.unwrap()["value"].0.clone()).unwrap()
        }
    };
    assert_eq!(value("USER").await, "app");
    assert_eq!(value("PASSWORD").await, password);
    assert_eq!(value("PORT").await, "5432", "a number as its JSON text");
    assert_eq!(reads_of(&name).await, 1, "three fields, one Key Vault read");

    // A field the secret lacks, and a secret that is not JSON: denied, naming the env var,
    // the reference and the field, never the value.
    let denied = inject::create(&s, &pod("missing", &[("X", &field("db.user"))], json!({})))
        .await
        .unwrap_err();
    assert!(
        denied.contains(&format!(
            "container `app` env `X`: the JSON value of {} has no field `db.user`",
            field("db.user")
        )),
        "{denied}"
    );
    let plain = support::unique("plain");
    let plain_value = support::distinctive_value();
    support::seed_secret(&plain, &plain_value).await;
    let denied = inject::create(
        &s,
        &pod(
            "plain",
            &[("Y", &format!("{}#a", inject::reference(&plain)))],
            json!({}),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        denied.contains("container `app` env `Y`") && denied.contains("is not JSON"),
        "{denied}"
    );
    assert!(
        !denied.contains(&plain_value),
        "a denial echoed the value: {denied}"
    );

    // Rotation re-extracts the field; a new version without it keeps the old value.
    let user_secret = inject::secret_key_ref(&stored, "USER").unwrap();
    let without = support::seed_secret(&name, &json!({"password": "x"}).to_string()).await;
    support::eventually(
        Duration::from_secs(20),
        "a RotationRefused Event for the missing field",
        || async {
            let refused = support::events_about(&s.client, &s.ns, "RotationRefused", &user_secret).await;
            refused.iter().any(|e| {
                e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("has no field `username`"))
            })
        },
    )
    .await;
    assert_eq!(value("USER").await, "app", "the old value is kept");
    assert_ne!(version(&secrets.get(&user_secret).await.unwrap()), without);
    let with = support::seed_secret(
        &name,
        &json!({"username": "app2", "password": "y", "db": {"port": 1}}).to_string(),
    )
    .await;
    support::eventually(
        Duration::from_secs(20),
        "the field to follow the new version",
        || async { version(&secrets.get(&user_secret).await.unwrap()) == with },
    )
    .await;
    assert_eq!(value("USER").await, "app2");
    assert!(
        !s.kvinject.logs().contains(&password),
        "a secret value reached kvinject's log"
    );
}

#[tokio::test]
async fn a_namespace_gives_every_pod_its_registry_credentials() {
    let _vault = support::VAULT.read().await;
    let s = support::setup("nspull", &[]).await;
    let (shared, own) = (support::unique("ns-acr"), support::unique("own-acr"));
    for name in [&shared, &own] {
        support::seed_secret(name, r#"{"auths":{"acr.example":{"auth":"dTpw"}}}"#).await;
    }
    let patch =
        json!({"metadata": {"annotations": {"kvinject.io/image-pull-secrets": inject::reference(&shared)}}});
    Api::<k8s_openapi::api::core::v1::Namespace>::all(s.client.clone())
        .patch(
            &s.ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let pull = |p: &k8s_openapi::api::core::v1::Pod| -> Vec<String> {
        p.spec
            .as_ref()
            .unwrap()
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|r| r.name.clone())
            .collect()
    };
    // The namespace cache catches up within a moment: dry runs show when.
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(s.client.clone(), &s.ns);
    support::eventually(
        Duration::from_secs(10),
        "the namespace's credentials on a new pod",
        || async {
            let dry = kube::api::PostParams {
                dry_run: true,
                ..Default::default()
            };
            pods.create(&dry, &pod("probe", &[], json!({})))
                .await
                .map(|p| pull(&p).len() == 1)
                .unwrap_or(false)
        },
    )
    .await;
    let bare = pod("bare", &[], json!({}));
    let stored = inject::create(&s, &bare).await.unwrap();
    assert_eq!(
        pull(&stored).len(),
        1,
        "a pod without annotations gets the namespace's"
    );
    // A pod with its own list: both, each once (the namespace's named again is not doubled).
    let both = format!("{},{}", inject::reference(&own), inject::reference(&shared));
    let stored = inject::create(
        &s,
        &pod("both", &[], json!({"kvinject.io/image-pull-secrets": both})),
    )
    .await
    .unwrap();
    let names = pull(&stored);
    assert_eq!(names.len(), 2, "{names:?}");
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    for name in names {
        assert_eq!(
            secrets.get(&name).await.unwrap().type_.as_deref(),
            Some("kubernetes.io/dockerconfigjson")
        );
    }
}

/// `kvinject lint` as GitOps CI runs it: on a folder, and on `helm template | kvinject lint -`.
#[test]
fn lint_checks_a_repository_and_exits_by_what_it_found() {
    use std::{io::Write, process::Stdio};
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lint");
    let lint = |args: &[&str], stdin: Option<&str>| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kvinject"))
            .arg("lint")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.unwrap_or_default().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = lint(&[repo.to_str().unwrap(), "--vault", "main"], None);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("helm-output.yaml:3: Deployment/shop/api: error: container `api` env `STRIPE_KEY`"),
        "{out}"
    );
    assert!(out.contains("broken.yaml:2: error: not YAML"), "{out}");
    assert_eq!(out.lines().count(), 6, "{out}");
    let (code, out) = lint(
        &["-", "--vault", "main", "--json"],
        Some(&std::fs::read_to_string(repo.join("kustomize-output.yaml")).unwrap()),
    );
    assert_eq!(code, Some(1));
    let findings: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(findings[0]["file"], "<stdin>");
    // Without the helm output's AccessPolicy, no grant is checked: opt-in and vault remain.
    assert_eq!(findings.as_array().unwrap().len(), 2, "{out}");
    let clean = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, env: [{name: X, value: akv://main/x}]}]}\n";
    assert_eq!(
        lint(&["--vault", "main"], Some(clean)).0,
        Some(0),
        "a clean input exits 0"
    );
    assert_eq!(
        lint(&["no/such/file.yaml"], None).0,
        Some(2),
        "an unreadable input is not a verdict"
    );
}

#[tokio::test]
async fn secrets_as_files_are_projected_and_rotate_in_place_without_a_rollout() {
    use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    // Rollouts on for every workload: file-only users must still not roll.
    let s = rotation_setup("files", &["--rollout-on-rotation", "true"]).await;
    let name = support::unique("token");
    let (first_value, second_value) = (support::distinctive_value(), support::distinctive_value());
    support::seed_secret(&name, &first_value).await;
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "files"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "files"}}, "template": {
            "metadata": {"labels": {"app": "files"}, "annotations": {"kvinject.io/refresh-interval": "1s"}},
            "spec": {
                "volumes": [{"name": "creds", "csi": {"driver": "kvinject.io", "volumeAttributes": {"token": inject::reference(&name)}}}],
                "containers": [{"name": "app", "image": "registry.invalid/app:1", "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds", "readOnly": true}]}]}}}
    }))
    .unwrap();
    Api::<Deployment>::namespaced(s.client.clone(), &s.ns)
        .create(&Default::default(), &deployment)
        .await
        .unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let projected = || async {
        let list = pods
            .list(&ListParams::default().labels("app=files"))
            .await
            .unwrap();
        list.items.first().and_then(|p| {
            let v = &p.spec.as_ref()?.volumes.as_ref()?[0];
            Some(
                v.projected.as_ref()?.sources.as_ref()?[0]
                    .secret
                    .as_ref()?
                    .name
                    .clone(),
            )
        })
    };
    support::eventually(
        Duration::from_secs(20),
        "the Deployment's pod with a projected volume",
        || async { projected().await.is_some() },
    )
    .await;
    let secret_name = projected().await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    assert_eq!(
        secrets.get(&secret_name).await.unwrap().data.unwrap()["value"].0,
        first_value.as_bytes()
    );
    // A few reconcile intervals with the first version: a workload that counted this Secret
    // would have its versions recorded now, and roll at the rotation below.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let recorded = Api::<Deployment>::namespaced(s.client.clone(), &s.ns)
        .get("files")
        .await
        .unwrap();
    assert!(
        !recorded
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("kvinject.io/secret-versions"),
        "a Secret used only as files does not decide rollouts"
    );
    let second = support::seed_secret(&name, &second_value).await;
    support::eventually(
        Duration::from_secs(20),
        "the file's Secret to carry the new value",
        || async { version(&secrets.get(&secret_name).await.unwrap()) == second },
    )
    .await;
    assert_eq!(
        secrets.get(&secret_name).await.unwrap().data.unwrap()["value"].0,
        second_value.as_bytes()
    );
    tokio::time::sleep(Duration::from_secs(4)).await; // four reconcile intervals
    let replica_sets = Api::<ReplicaSet>::namespaced(s.client.clone(), &s.ns)
        .list(&ListParams::default().labels("app=files"))
        .await
        .unwrap();
    assert_eq!(
        replica_sets.items.len(),
        1,
        "a file-only use rolls nothing: kubelet updates the file in place"
    );

    // A bad attribute is denied, naming the volume.
    let mut bad = pod("bad", &[], json!({}));
    bad.spec.as_mut().unwrap().volumes =
        Some(vec![serde_json::from_value(json!({"name": "creds", "csi": {"driver": "kvinject.io", "volumeAttributes": {"a/b": inject::reference(&name)}}})).unwrap()]);
    let denied = inject::create(&s, &bad).await.unwrap_err();
    assert!(
        denied.contains("volume `creds`: `a/b` is not a file name"),
        "{denied}"
    );
}

/// `kvinject lint --check-vault` asks the bed's vault, with `serve`'s credentials.
#[tokio::test]
async fn lint_check_vault_reports_what_key_vault_says_of_each_reference() {
    let _vault = support::VAULT.read().await;
    let bed = support::testbed();
    let (present, disabled) = (support::unique("lint-ok"), support::unique("lint-off"));
    support::seed_secret(&present, r#"{"k": "v"}"#).await;
    let off = azure_security_keyvault_secrets::models::SecretAttributes {
        enabled: Some(false),
        ..Default::default()
    };
    support::seed_secret_with(&disabled, &support::distinctive_value(), off).await;
    let missing = support::unique("lint-missing");
    let v = &bed.vault_name;
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: team}}\nspec:\n  containers:\n  - name: c\n    env:\n\
         \x20   - {{name: OK, value: 'akv://{v}/{present}#k'}}\n\
         \x20   - {{name: GONE, value: 'akv://{v}/{missing}'}}\n\
         \x20   - {{name: OFF, value: 'akv://{v}/{disabled}'}}\n\
         \x20   - {{name: OLD, value: 'akv://{v}/{present}/0123456789abcdef0123456789abcdef'}}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, manifest).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvinject"))
        .args([
            "lint",
            file.to_str().unwrap(),
            "--check-vault",
            "--vault",
            &format!("{v}={}", bed.vault_url),
        ])
        .args([
            "--azure-credential",
            "client-secret",
            "--azure-tenant-id",
            "testbed-tenant",
            "--azure-client-id",
            "kvinject-tests",
        ])
        .arg("--azure-ca-bundle")
        .arg(&bed.ca)
        .args(["--azure-authority-host", &bed.authority])
        .env("AZURE_CLIENT_SECRET", "testbed-client-secret")
        .env_remove("AZURE_FEDERATED_TOKEN_FILE")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "container `c` env `GONE`: Key Vault secret akv://{v}/{missing} was not found"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "container `c` env `OFF`: Key Vault secret akv://{v}/{disabled} is disabled"
        )),
        "{text}"
    );
    assert!(
        text.contains("container `c` env `OLD`: Key Vault secret")
            && text.contains("/0123456789abcdef0123456789abcdef was not found"),
        "{text}"
    );
    assert!(
        !text.contains("env `OK`"),
        "an existing secret and field is fine: {text}"
    );
    assert_eq!(text.lines().count(), 3, "{text}");
}
