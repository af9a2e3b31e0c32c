//! Access policies on the test bed: a namespace gets the secrets an AccessPolicy grants it
//! and nothing more; the apiserver refuses bad policies; a revoked grant denies the next pod
//! without a Key Vault call, and the rotation controller stops refreshing, records an Event
//! and deletes the Secret once its last pod is gone.

use crate::{
    inject::{self, pod},
    rotation::{rotation_args, version},
    support::{self, Kvinject, PolicyGuard, WebhookGuard},
};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;
use std::{process::Command, time::Duration};

/// Namespaces opted in through one test label, with no policy of their own, and a kvinject
/// (access policy required, its default) that the label's registration calls.
struct Tenants {
    client: Client,
    kvinject: Kvinject,
    namespaces: Vec<String>,
    _webhook: WebhookGuard,
}

impl Drop for Tenants {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            support::keep_events(ns);
            support::delete_from_drop::<k8s_openapi::api::core::v1::Namespace>(ns.clone());
        }
    }
}

async fn tenants(prefixes: &[&str], extra: &[&str]) -> Tenants {
    let client = support::kube().await;
    let kvinject = Kvinject::start(extra).await;
    let label = support::unique("access");
    let mut namespaces = Vec::new();
    for prefix in prefixes {
        namespaces.push(support::namespace(&client, prefix, &[("kvinject.test/suite", &label)]).await);
    }
    let webhook =
        support::register_webhook(&client, &label, &kvinject.url(), ("kvinject.test/suite", &label)).await;
    support::wait_for_webhook(&client, &namespaces[0]).await;
    Tenants {
        client,
        kvinject,
        namespaces,
        _webhook: webhook,
    }
}

fn vault() -> String {
    support::testbed().vault_name.clone()
}

fn reference(name: &str) -> String {
    format!("akv://{}/{name}", vault())
}

async fn create(client: &Client, ns: &str, p: &Pod, dry_run: bool) -> Result<Pod, String> {
    let params = PostParams {
        dry_run,
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&params, p)
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) => s.message,
            other => other.to_string(),
        })
}

/// `kvinject access check` against the bed: (exit code, stdout).
fn access_check(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvinject"))
        .args(["access", "check"])
        .args(args)
        .env("KUBECONFIG", &support::testbed().kubeconfig)
        .env("KVINJECT_LOG", "warn")
        .output()
        .expect("running kvinject access check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
    )
}

/// GETs the bed's vault answered for one secret name (any version), from its own counters.
async fn reads_of(name: &str) -> u64 {
    let counters = support::vault_counters().await;
    counters["secrets_get_by_name"][name.to_lowercase()]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn each_namespace_gets_the_secrets_its_policy_grants_and_nothing_else() {
    let _vault = support::VAULT.read().await;
    let t = tenants(&["team-a", "team-b"], &[]).await;
    let (team_a, team_b) = (&t.namespaces[0], &t.namespaces[1]);
    let run = support::unique("acc");
    let (a_secret, b_secret) = (format!("{run}-team-a-db"), format!("{run}-team-b-db"));
    let a_value = support::unique("value-of-team-a");
    support::seed_secret(&a_secret, &a_value).await;
    support::seed_secret(&b_secret, &support::unique("value-of-team-b")).await;
    // Upper case in the pattern: Key Vault names are case-insensitive, and so is the grant.
    let policy_name = format!("{run}-team-a");
    let _policy = support::access_policy(
        &t.client,
        &policy_name,
        json!({"vault": vault(), "secrets": [format!("{}-TEAM-A-*", run.to_uppercase())], "namespaces": {"names": [team_a]}}),
    )
    .await;
    let own = pod("own", &[("DB", &reference(&a_secret))], json!({}));
    support::eventually(Duration::from_secs(10), "kvinject to load the policy", || async {
        create(&t.client, team_a, &own, true).await.is_ok()
    })
    .await;

    // team-a gets its own secret.
    let own = create(&t.client, team_a, &own, false)
        .await
        .expect("team-a's pod using a granted secret is admitted");
    let secret = Api::<Secret>::namespaced(t.client.clone(), team_a)
        .get(&inject::secret_key_ref(&own, "DB").unwrap())
        .await
        .unwrap();
    assert_eq!(secret.data.unwrap()["value"].0, a_value.as_bytes());

    // team-a reaching for team-b's secret: denied, naming the place, the reference, the
    // namespace and the ServiceAccount; a dry run answers the same and nothing is written.
    let reads_before = reads_of(&b_secret).await;
    let foreign = pod(
        "foreign",
        &[("PLAIN", "x"), ("OTHER_DB", &reference(&b_secret))],
        json!({}),
    );
    let want = format!(
        "container `app` env `OTHER_DB`: {} is not granted to ServiceAccount `default` in namespace `{team_a}`: no AccessPolicy grants it for env",
        reference(&b_secret)
    );
    let denied = create(&t.client, team_a, &foreign, false)
        .await
        .expect_err("a team-b secret in team-a");
    assert!(denied.contains(&want), "{denied}");
    let dry = create(&t.client, team_a, &foreign, true)
        .await
        .expect_err("the same pod as a dry run");
    assert!(dry.contains(&want), "a dry run answers the same: {dry}");
    assert_eq!(
        reads_of(&b_secret).await,
        reads_before,
        "a denied reference is never read from Key Vault"
    );
    let secrets = Api::<Secret>::namespaced(t.client.clone(), team_a)
        .list(&ListParams::default())
        .await
        .unwrap();
    let references: Vec<String> = secrets
        .items
        .iter()
        .filter_map(|s| {
            s.metadata
                .annotations
                .as_ref()?
                .get("kvinject.io/reference")
                .cloned()
        })
        .collect();
    assert_eq!(
        references,
        vec![reference(&a_secret)],
        "only the granted secret was materialized in team-a"
    );

    // team-b reaching for team-a's secret: denied too.
    let denied = create(
        &t.client,
        team_b,
        &pod("sneaky", &[("DB", &reference(&a_secret))], json!({})),
        false,
    )
    .await
    .expect_err("team-a's secret in team-b");
    assert!(
        denied.contains(&format!("namespace `{team_b}`: no AccessPolicy grants it")),
        "{denied}"
    );

    // Registry credentials are a use of their own: granted (the policy says nothing of uses).
    let acr = format!("{run}-team-a-acr");
    support::seed_secret(&acr, r#"{"auths":{"acr.example":{"auth":"dTpw"}}}"#).await;
    let pull = pod(
        "pull",
        &[],
        json!({"kvinject.io/image-pull-secrets": reference(&acr)}),
    );
    create(&t.client, team_a, &pull, false)
        .await
        .expect("a granted registry credential is admitted");

    // The platform team's check command says the same, and which policy decided.
    let (code, out) = access_check(&["--namespace", team_a, &reference(&a_secret)]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("granted by AccessPolicy {policy_name}")),
        "{out}"
    );
    let (code, out) = access_check(&["--namespace", team_b, &reference(&a_secret)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("denied: ") && out.contains("no AccessPolicy grants it for env"),
        "{out}"
    );
    let (code, _) = access_check(&["--namespace", team_a, "not-a-reference"]);
    assert_eq!(code, 2, "bad input is an error, not a decision");

    assert!(t.kvinject.metric("kvinject_access_denials_total", &[]).await >= 3.0);
    assert_eq!(
        t.kvinject
            .metric("kvinject_access_policy_mode", &["mode=\"required\""])
            .await,
        1.0
    );
    let logs = t.kvinject.logs();
    assert!(!logs.contains(&a_value), "a secret value reached kvinject's log");
}

#[tokio::test]
async fn a_grant_limited_to_one_service_account_admits_only_its_pods() {
    let _vault = support::VAULT.read().await;
    let t = tenants(&["sa"], &[]).await;
    let ns = &t.namespaces[0];
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("api".into());
    Api::<ServiceAccount>::namespaced(t.client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let secret = support::unique("api-token");
    support::seed_secret(&secret, &support::distinctive_value()).await;
    let policy_name = support::unique("api-only");
    let _policy = support::access_policy(
        &t.client,
        &policy_name,
        json!({"vault": vault(), "secrets": [secret], "namespaces": {"names": [ns]}, "serviceAccounts": ["api"], "uses": ["env"]}),
    )
    .await;

    let mut as_api = pod("as-api", &[("TOKEN", &reference(&secret))], json!({}));
    as_api.spec.as_mut().unwrap().service_account_name = Some("api".into());
    support::eventually(
        Duration::from_secs(10),
        "a pod of ServiceAccount api to be admitted",
        || async { create(&t.client, ns, &as_api, true).await.is_ok() },
    )
    .await;
    create(&t.client, ns, &as_api, false)
        .await
        .expect("ServiceAccount api is granted");

    // The same reference from the namespace's default ServiceAccount: denied, and the
    // denial says that a grant exists for other ServiceAccounts.
    let denied = create(
        &t.client,
        ns,
        &pod("as-default", &[("TOKEN", &reference(&secret))], json!({})),
        false,
    )
    .await
    .expect_err("ServiceAccount default is not granted");
    assert!(denied.contains("ServiceAccount `default`"), "{denied}");
    assert!(
        denied.contains("it is granted in this namespace to other ServiceAccounts only"),
        "{denied}"
    );
    // Not which ServiceAccount (whose pods to impersonate), nor the policy's name: those
    // are for the platform, through `kvinject access check`.
    assert!(
        !denied.contains("ServiceAccounts api") && !denied.contains(&policy_name),
        "{denied}"
    );
    let (code, out) = access_check(&[
        "--namespace",
        ns,
        "--service-account",
        "default",
        &reference(&secret),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "AccessPolicy {policy_name} grants it only to ServiceAccounts api"
        )),
        "{out}"
    );

    // The same secret as a registry credential: the policy grants env only.
    let mut pull = pod(
        "pull",
        &[],
        json!({"kvinject.io/image-pull-secrets": reference(&secret)}),
    );
    pull.spec.as_mut().unwrap().service_account_name = Some("api".into());
    let denied = create(&t.client, ns, &pull, false)
        .await
        .expect_err("imagePull is not granted");
    assert!(
        denied.contains("annotation `kvinject.io/image-pull-secrets`") && denied.contains("for imagePull"),
        "{denied}"
    );
}

#[tokio::test]
async fn the_apiserver_refuses_empty_grants_and_bad_patterns_with_a_message() {
    support::ensure_crd();
    let vault = vault();
    let name = support::unique("bad-policy");
    let cases = [
        (
            "secrets: []",
            format!("{{vault: {vault}, secrets: [], namespaces: {{names: [a]}}}}"),
            "grant at least one secret name or pattern",
        ),
        (
            "a space in a pattern",
            format!("{{vault: {vault}, secrets: [\"team a\"], namespaces: {{names: [a]}}}}"),
            "spec.secrets[0]",
        ),
        (
            "a regex, not a glob",
            format!("{{vault: {vault}, secrets: [\"team-a-.*\"], namespaces: {{names: [a]}}}}"),
            "should match",
        ),
        (
            "no namespaces",
            format!("{{vault: {vault}, secrets: [x], namespaces: {{}}}}"),
            "name the namespaces granted",
        ),
        (
            "names: []",
            format!("{{vault: {vault}, secrets: [x], namespaces: {{names: []}}}}"),
            "name at least one namespace",
        ),
        (
            "serviceAccounts: []",
            format!("{{vault: {vault}, secrets: [x], namespaces: {{names: [a]}}, serviceAccounts: []}}"),
            "name at least one ServiceAccount",
        ),
        (
            "an unknown use",
            format!("{{vault: {vault}, secrets: [x], namespaces: {{names: [a]}}, uses: [files]}}"),
            "spec.uses[0]",
        ),
        (
            "In without values",
            format!(
                "{{vault: {vault}, secrets: [x], namespaces: {{selector: {{matchExpressions: [{{key: team, operator: In}}]}}}}}}"
            ),
            "In and NotIn need values",
        ),
        (
            "no vault",
            "{secrets: [x], namespaces: {names: [a]}}".to_owned(),
            "spec.vault: Required value",
        ),
    ];
    for (what, spec, want) in cases {
        let manifest = format!(
            "apiVersion: kvinject.io/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: {name}}}\nspec: {spec}\n"
        );
        let (ok, out, err) = support::kubectl(&["apply", "-f", "-"], Some(&manifest));
        assert!(!ok, "{what}: the apiserver accepted it: {out}");
        assert!(err.contains(want), "{what}: {err}");
    }
    // A good one is accepted, so the refusals above are about what they name.
    let manifest = format!(
        "apiVersion: kvinject.io/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: {name}}}\nspec: {{vault: {vault}, secrets: [\"team-a-*\"], namespaces: {{names: [a]}}}}\n"
    );
    let (ok, out, err) = support::kubectl(&["apply", "-f", "-"], Some(&manifest));
    let _guard = PolicyGuard(name);
    assert!(ok, "a valid policy: {out}{err}");
}

#[tokio::test]
async fn a_revoked_grant_denies_at_once_then_the_secret_stops_rotating_and_goes_with_its_last_pod() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let args = rotation_args(&support::unique("lease"), "1h");
    let t = tenants(&["revoke"], &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let ns = &t.namespaces[0];
    let name = support::unique("revoked");
    let first_version = support::seed_secret(&name, &support::unique("before")).await;
    let policy = support::access_policy(
        &t.client,
        &support::unique("revocable"),
        json!({"vault": vault(), "secrets": [name], "namespaces": {"names": [ns]}}),
    )
    .await;
    // A pod that asks for a check every second: rotation would reach it at once.
    let first = pod(
        "first",
        &[("X", &reference(&name))],
        json!({"kvinject.io/refresh-interval": "1s"}),
    );
    support::eventually(
        Duration::from_secs(10),
        "the granted pod to be admitted",
        || async { create(&t.client, ns, &first, true).await.is_ok() },
    )
    .await;
    let stored = create(&t.client, ns, &first, false)
        .await
        .expect("admitted while granted");
    let secret_name = inject::secret_key_ref(&stored, "X").unwrap();
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), ns);
    assert_eq!(version(&secrets.get(&secret_name).await.unwrap()), first_version);

    // Revoke: the next pod is denied although the Secret is materialized, without reading Key
    // Vault (its own counter for this name stays put).
    drop(policy);
    let second = pod("second", &[("X", &reference(&name))], json!({}));
    support::eventually(
        Duration::from_secs(10),
        "the revocation to reach admission",
        || async { create(&t.client, ns, &second, true).await.is_err() },
    )
    .await;
    let reads_before = reads_of(&name).await;
    let denied = create(&t.client, ns, &second, false).await.expect_err("revoked");
    assert!(denied.contains("no AccessPolicy grants it"), "{denied}");
    assert_eq!(
        reads_of(&name).await,
        reads_before,
        "a denial on the warm path reads nothing from Key Vault"
    );

    // The controller records the revocation, and no longer follows Key Vault.
    support::eventually(
        Duration::from_secs(20),
        "an AccessRevoked Event on the Secret",
        || async {
            !support::events_about(&t.client, ns, "AccessRevoked", &secret_name)
                .await
                .is_empty()
        },
    )
    .await;
    assert!(t.kvinject.metric("kvinject_access_revoked_secrets", &[]).await >= 1.0);
    let reads_at_revocation = reads_of(&name).await;
    support::seed_secret(&name, &support::unique("after")).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // four refresh intervals of the pod
    assert_eq!(
        version(&secrets.get(&secret_name).await.unwrap()),
        first_version,
        "a revoked Secret is not rotated"
    );
    assert_eq!(
        reads_of(&name).await,
        reads_at_revocation,
        "a revoked Secret is not read from Key Vault"
    );

    // The running pod keeps its Secret; once it is gone, so is the Secret (no grace period).
    assert!(secrets.get_opt(&secret_name).await.unwrap().is_some());
    Api::<Pod>::namespaced(t.client.clone(), ns)
        .delete(
            "first",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(20),
        "the revoked Secret to be deleted after its last pod",
        || async { secrets.get_opt(&secret_name).await.unwrap().is_none() },
    )
    .await;
}

#[tokio::test]
async fn with_access_policy_off_every_configured_secret_is_usable_and_kvinject_says_so() {
    let _vault = support::VAULT.read().await;
    let t = tenants(&["open"], &["--access-policy", "off"]).await;
    let name = support::unique("open");
    support::seed_secret(&name, &support::distinctive_value()).await;
    create(
        &t.client,
        &t.namespaces[0],
        &pod("open", &[("X", &reference(&name))], json!({})),
        false,
    )
    .await
    .expect("no policy needed with --access-policy off");
    assert_eq!(
        t.kvinject
            .metric("kvinject_access_policy_mode", &["mode=\"off\""])
            .await,
        1.0
    );
    assert!(
        t.kvinject.logs().contains("--access-policy off"),
        "the start warning"
    );
}

/// The same review again (a ReplicaSet's next pod reaches admission byte-identical, but for
/// its uid) is answered from the webhook's decision memo, and only while nothing it was
/// decided from has changed: a Secret deleted by hand is created again by the next review,
/// and a revoked grant denies the next one.
#[tokio::test]
async fn a_review_answered_from_memory_is_decided_again_once_its_secret_or_grant_changes() {
    let _vault = support::VAULT.read().await;
    let t = tenants(&["memo"], &[]).await;
    let ns = &t.namespaces[0];
    let name = support::unique("memo");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let policy = support::access_policy(
        &t.client,
        &support::unique("memo"),
        json!({"vault": vault(), "secrets": [name], "namespaces": {"names": [ns]}}),
    )
    .await;
    let review = |uid: &str| {
        let mut r = support::review(ns, &reference(&name));
        r["request"]["uid"] = json!(uid);
        r
    };
    let hits = || {
        t.kvinject.metric(
            "kvinject_cache_lookups_total",
            &["cache=\"decision\"", "result=\"hit\""],
        )
    };
    // Materialized by the first review once the grant is loaded; then answered from the caches.
    support::eventually(
        Duration::from_secs(10),
        "the granted review to be patched",
        || async { post_patched(&t.kvinject, &review("first")).await },
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), ns);
    // Created before the first review was answered.
    let listed = secrets
        .list(&ListParams::default().labels(kvinject::materialize::SELECTOR))
        .await
        .unwrap();
    let secret_name = listed.items[0].metadata.name.clone().unwrap();
    // Answered from memory once the Secret is in kvinject's watch cache (until then it
    // is decided from this process's own creation, which is not remembered).
    support::eventually(
        Duration::from_secs(10),
        "the same review again to be answered from memory",
        || async {
            let before = hits().await;
            let decided = support::post_review(&t.kvinject, &review("decided")).await;
            let recalled = support::post_review(&t.kvinject, &review("recalled")).await;
            hits().await > before
                && recalled["response"]["uid"] == "recalled"
                && recalled["response"]["patch"] == decided["response"]["patch"]
        },
    )
    .await;

    // Deleted by hand: the next review creates it again, it is not answered from memory.
    secrets
        .delete(&secret_name, &DeleteParams::default())
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(10),
        "the Secret to be created again by a review",
        || async {
            post_patched(&t.kvinject, &review("again")).await
                && secrets.get_opt(&secret_name).await.ok().flatten().is_some()
        },
    )
    .await;

    // Revoked: the next review is denied, however often it was answered before.
    for uid in ["warm-1", "warm-2"] {
        assert!(post_patched(&t.kvinject, &review(uid)).await);
    }
    drop(policy);
    support::eventually(
        Duration::from_secs(10),
        "the revocation to reach the remembered review",
        || async {
            let answer = support::post_review(&t.kvinject, &review("revoked")).await;
            answer["response"]["allowed"] == false
                && answer["response"]["status"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("no AccessPolicy grants it")
        },
    )
    .await;
}

async fn post_patched(k: &Kvinject, review: &serde_json::Value) -> bool {
    let answer = support::post_review(k, review).await;
    answer["response"]["allowed"] == true && answer["response"]["patch"].is_string()
}
