//! Installing like a platform team: the chart lints and renders, the plain manifests are
//! in sync with it, a real apiserver accepts them, and kvinject runs through every step
//! with nothing but the chart's permissions (its ServiceAccount, impersonated).
//!
//! The chart's objects are cluster-wide (one MutatingWebhookConfiguration `kvinject`, the
//! `kvinject` namespace), so these tests take `INSTALL`. Only they use the opt-in label
//! `kvinject.io/injection`; every other test opts in through its own label.

use crate::{
    inject::{self, reference},
    rotation::{deployment, secret_of_pod, version},
    support::{self, Kvinject},
};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{Pod, Secret, ServiceAccount},
    events::v1::Event,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

pub(crate) static INSTALL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NS: &str = "kvinject";
const NAME: &str = "kvinject";
const SA: &str = "system:serviceaccount:kvinject:kvinject";
const OPT_IN: (&str, &str) = ("kvinject.io/injection", "enabled");

pub(crate) fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The test bed's cache of built tools (tests/testbed/build.sh).
fn bed_cache() -> PathBuf {
    std::env::var_os("KVINJECT_TESTBED_CACHE").map_or_else(|| repo().join("target/testbed"), PathBuf::from)
}

/// The bed's helm, built from helm.sh/helm/v3 (a no-op when cached).
pub(crate) fn helm_bin() -> PathBuf {
    let ok = Command::new(repo().join("tests/testbed/build.sh"))
        .arg("helm")
        .status()
        .expect("building helm");
    assert!(ok.success(), "tests/testbed/build.sh helm failed");
    bed_cache().join("bin/helm")
}

fn helm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm_bin())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("running helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn chart_lints_renders_and_the_plain_manifests_are_in_sync() {
    let chart = "deploy/helm/kvinject";
    let values = "deploy/manifests/values.yaml";
    for extra in [
        &[][..],
        &[
            "--set",
            "tls.source=certManager",
            "--set",
            "serviceMonitor.enabled=true",
        ][..],
        &[
            "--set",
            "tls.source=secret",
            "--set",
            "tls.caBundle=Zm9v",
            "--set",
            "webhook.failurePolicy=Ignore",
            "--set",
            "antiAffinity=required",
        ][..],
        &[
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "networkPolicy.from[0].ipBlock.cidr=10.0.0.0/24",
            "--set",
            "admissionPolicy.enabled=false",
            "--set",
            "accessPolicy=off",
            "--set",
            "rotation.enabled=false",
        ][..],
    ] {
        let mut args = vec!["lint", chart, "--strict", "-f", values];
        args.extend_from_slice(extra);
        let (ok, out, err) = helm(&args);
        assert!(
            ok && out.contains("0 chart(s) failed"),
            "helm {args:?}:\n{out}\n{err}"
        );
    }
    let (ok, out, err) = helm(&[
        "template",
        "kvinject",
        chart,
        "-n",
        NS,
        "-f",
        values,
        "--set",
        "tls.source=certManager",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("cert-manager.io/inject-ca-from: kvinject/kvinject")
            && out.contains("kind: Certificate"),
        "{out}"
    );

    // Settings that cannot work fail the render and name the value.
    for (set, want) in [
        ("vaults=null", "vaults: name at least one vault"),
        (
            "webhook.timeoutSeconds=10",
            "webhook.timeoutSeconds: 10 must be 3..9",
        ),
        (
            "webhook.failurePolicy=Sometimes",
            "webhook.failurePolicy: \"Sometimes\" is not Fail or Ignore",
        ),
        (
            "tls.source=secret",
            "tls.caBundle: tls.source=secret needs the CA",
        ),
        ("tls.source=vault", "tls.source: \"vault\" is not one of"),
        (
            "identity.default=workload",
            "identity.default: workload needs identity.perServiceAccount=true",
        ),
        (
            "accessPolicy=maybe",
            "accessPolicy: \"maybe\" is not required or off",
        ),
        (
            "networkPolicy.from=null",
            "networkPolicy.from: say where the apiserver's calls to the webhook come from",
        ),
    ] {
        let (ok, _, err) = helm(&[
            "template", "kvinject", chart, "-n", NS, "-f", values, "--set", set,
        ]);
        assert!(!ok && err.contains(want), "--set {set}: {err}");
    }

    let out = Command::new(repo().join("deploy/render"))
        .arg("--check")
        .env("HELM", helm_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/manifests/kvinject.yaml is not what the chart renders:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Applies the committed plain manifests with server-side apply, as a GitOps tool would.
/// An earlier test's registration (pointed at a local URL) is removed first: `url` and the
/// chart's `service` cannot both be set.
fn apply_manifests() {
    let _ = support::kubectl(
        &[
            "delete",
            "mutatingwebhookconfiguration",
            NAME,
            "--ignore-not-found",
        ],
        None,
    );
    let path = repo().join("deploy/manifests/kvinject.yaml");
    let (ok, out, err) = support::kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=platform-team",
            "-f",
            path.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "the apiserver refused the manifests:\n{out}\n{err}");
}

/// Applies the chart rendered with the plain manifests' values and `sets` (server-side, as
/// `apply_manifests`).
fn apply_chart(sets: &[&str]) {
    let _ = support::kubectl(
        &[
            "delete",
            "mutatingwebhookconfiguration",
            NAME,
            "--ignore-not-found",
        ],
        None,
    );
    let mut args = vec![
        "template",
        "kvinject",
        "deploy/helm/kvinject",
        "-n",
        NS,
        "--include-crds",
        "-f",
        "deploy/manifests/values.yaml",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let (ok, rendered, err) = helm(&args);
    assert!(ok, "helm template: {err}");
    let (ok, out, err) = support::kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=platform-team",
            "-f",
            "-",
        ],
        Some(&rendered),
    );
    assert!(ok, "the apiserver refused the chart:\n{out}\n{err}");
}

/// Points the chart's webhook at a local address (the bed has no Service network). The
/// caBundle goes with the old clientConfig: kvinject's bootstrap must set it again.
async fn point_webhook_at(client: &Client, port: u16) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/webhooks/0/name", "value": "pods.kvinject.io"},
        {"op": "replace", "path": "/webhooks/0/clientConfig", "value": {"url": format!("https://127.0.0.1:{port}/mutate")}}
    ]))
    .unwrap();
    api.patch(NAME, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .expect("pointing the webhook at the local kvinject");
}

/// A kubeconfig that acts as the chart's ServiceAccount (admin credentials, impersonating
/// the ServiceAccount and its groups).
fn service_account_kubeconfig() -> PathBuf {
    let bed = support::testbed();
    let admin = std::fs::read_to_string(&bed.kubeconfig).unwrap();
    assert!(admin.contains("\n  user:\n"), "unexpected bed kubeconfig layout");
    let impersonating = admin.replace(
        "\n  user:\n",
        &format!("\n  user:\n    as: {SA}\n    as-groups: [system:serviceaccounts, \"system:serviceaccounts:{NS}\", system:authenticated]\n"),
    );
    let path = bed.dir.join("kubeconfig-kvinject-sa");
    std::fs::write(&path, impersonating).unwrap();
    path
}

/// kvinject as the chart runs it: bootstrap TLS, its ServiceAccount's permissions only.
async fn start_as_chart(port: u16, extra: &[&str]) -> Kvinject {
    let kubeconfig = service_account_kubeconfig();
    let mut args = vec![
        "--tls-source",
        "bootstrap",
        "--tls-namespace",
        NS,
        "--tls-extra-san",
        "127.0.0.1",
        "--webhook-configuration",
        NAME,
        // The chart's scope and signing-key home (its Deployment sets them through env).
        "--namespace-selector",
        "kvinject.io/injection=enabled",
        "--signing-key-namespace",
        NS,
    ];
    args.extend_from_slice(extra);
    Kvinject::start_with_env(
        port,
        support::free_port(),
        &args,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await
}

async fn fresh_bootstrap(client: &Client) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let _ = secrets.delete("kvinject-tls", &DeleteParams::default()).await;
    support::eventually(
        Duration::from_secs(10),
        "the old bootstrap Secret to go",
        || async { secrets.get_opt("kvinject-tls").await.unwrap().is_none() },
    )
    .await;
}

async fn bootstrap_secret(client: &Client) -> (String, String) {
    let s = Api::<Secret>::namespaced(client.clone(), NS)
        .get("kvinject-tls")
        .await
        .unwrap();
    let get = |k: &str| String::from_utf8(s.data.as_ref().unwrap()[k].0.clone()).unwrap();
    (get("ca.crt"), get("tls.crt"))
}

async fn ca_bundle(client: &Client) -> Option<String> {
    let mwc = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(NAME)
        .await
        .unwrap();
    mwc.webhooks?[0]
        .client_config
        .ca_bundle
        .as_ref()
        .map(|b| String::from_utf8(b.0.clone()).unwrap())
}

/// The certificate (PEM) kvinject presents on `port`.
async fn served_certificate(port: u16) -> String {
    let http = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = http
        .get(format!("https://127.0.0.1:{port}/mutate"))
        .send()
        .await
        .expect("connecting to the webhook");
    let der = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("no peer certificate");
    kvinject::certs::pem_cert(der)
}

/// The apiserver words every RBAC refusal "... is forbidden: User ... cannot ...". (A bare
/// "403" is no sign: it turns up inside Key Vault version ids.)
fn no_permission_errors(k: &Kvinject) {
    let logs = k.logs().to_lowercase();
    assert!(
        !logs.contains("forbidden"),
        "kvinject hit a permission error:\n{}",
        k.logs()
    );
}

#[tokio::test]
async fn the_apiserver_accepts_the_manifests_and_kvinject_works_on_the_charts_permissions_alone() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let _install = INSTALL.lock().await;
    let client = support::kube().await;
    // The chart with ServiceAccounts allowed to read as their own Azure identity: kvinject
    // may then mint their tokens, within the chart's admission policy.
    apply_chart(&["identity.perServiceAccount=true"]);

    // What the apiserver stored is what the chart promises.
    let mwc = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(NAME)
        .await
        .unwrap();
    let w = &mwc.webhooks.as_ref().unwrap()[0];
    assert_eq!(w.side_effects, "NoneOnDryRun");
    assert_eq!(w.admission_review_versions, vec!["v1"]);
    assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
    assert!(w.timeout_seconds.unwrap() < 10);
    assert_eq!(w.reinvocation_policy.as_deref(), Some("IfNeeded"));
    let rule = &w.rules.as_ref().unwrap()[0];
    assert_eq!(
        (rule.operations.as_deref(), rule.resources.as_deref()),
        (Some(&["CREATE".to_owned()][..]), Some(&["pods".to_owned()][..]))
    );
    let excluded = &w
        .namespace_selector
        .as_ref()
        .unwrap()
        .match_expressions
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        (excluded.key.as_str(), excluded.operator.as_str()),
        ("kubernetes.io/metadata.name", "NotIn")
    );
    assert!(
        excluded
            .values
            .as_ref()
            .unwrap()
            .iter()
            .any(|v| v == "kube-system")
            && excluded.values.as_ref().unwrap().iter().any(|v| v == NS)
    );
    let d = Api::<Deployment>::namespaced(client.clone(), NS)
        .get(NAME)
        .await
        .unwrap();
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod_spec = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod_spec.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let sc = pod_spec.containers[0].security_context.as_ref().unwrap();
    assert_eq!(
        (sc.read_only_root_filesystem, sc.allow_privilege_escalation),
        (Some(true), Some(false))
    );
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    assert!(
        pod_spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .contains_key("memory")
    );
    assert!(pod_spec.affinity.as_ref().unwrap().pod_anti_affinity.is_some());
    // The defaults the README states: requests, a memory limit and no CPU limit (admission
    // bursts are not throttled), UID 65532 with the runtime's seccomp profile, rolling
    // without ever going below the replicas, and a deadline of timeoutSeconds - 2.
    let resources = pod_spec.containers[0].resources.as_ref().unwrap();
    let requests = resources.requests.as_ref().unwrap();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "{requests:?}"
    );
    assert!(
        !resources.limits.as_ref().unwrap().contains_key("cpu"),
        "no CPU limit"
    );
    let psc = pod_spec.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    let rolling = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .unwrap();
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
    );
    let deadline = pod_spec.containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "KVINJECT_ADMISSION_DEADLINE")
        .and_then(|e| e.value.clone());
    assert_eq!(
        deadline,
        Some(format!("{}s", w.timeout_seconds.unwrap() - 2)),
        "the deadline is the webhook's timeoutSeconds - 2"
    );
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
        .get(NAME)
        .await
        .unwrap();
    assert_eq!(
        pdb.spec.unwrap().min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .get(NAME)
        .await
        .unwrap();
    assert_eq!(
        sa.metadata
            .labels
            .as_ref()
            .unwrap()
            .get("azure.workload.identity/use")
            .map(String::as_str),
        Some("true")
    );
    assert!(
        sa.metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key("azure.workload.identity/client-id")
    );

    // kvinject as the chart runs it, pointed at by the chart's registration.
    fresh_bootstrap(&client).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let _ = leases.delete("kvinject-rotation", &DeleteParams::default()).await;
    let port = support::free_port();
    point_webhook_at(&client, port).await;
    let k = start_as_chart(
        port,
        &[
            "--rotation",
            "true",
            "--lease-namespace",
            NS,
            "--lease-name",
            "kvinject-rotation",
            "--lease-duration",
            "3s",
            "--refresh-interval",
            "1h",
            "--reconcile-interval",
            "1s",
            "--gc-grace-period",
            "2s",
            "--evict-ready-timeout",
            "1s",
            "--identity",
            "kvinject-sa-test",
        ],
    )
    .await;

    // Self-bootstrap: the Secret exists and the registration trusts its CA.
    let (ca, _) = bootstrap_secret(&client).await;
    support::eventually(
        Duration::from_secs(10),
        "the webhook caBundle to carry the bootstrapped CA",
        || async { ca_bundle(&client).await.as_deref() == Some(ca.as_str()) },
    )
    .await;

    let ns = support::namespace(&client, "install", &[OPT_IN]).await;
    let _guard = support::NamespaceGuard(ns.clone());
    // The chart requires access policies: kvinject reads them with the chart's RBAC.
    let _policy = support::grant_all(&client, &ns).await;
    support::wait_for_webhook(&client, &ns).await;

    // Inject.
    let (rolled, evicted, collected) = (
        support::unique("rolled"),
        support::unique("evicted"),
        support::unique("collected"),
    );
    for s in [&rolled, &evicted, &collected] {
        support::seed_secret(s, &support::distinctive_value()).await;
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pp = PostParams::default();
    deployments
        .create(
            &pp,
            &deployment(
                "restart",
                &rolled,
                json!({"kvinject.io/rollout-on-rotation": "true"}),
            ),
        )
        .await
        .unwrap();
    deployments
        .create(
            &pp,
            &deployment(
                "evict",
                &evicted,
                json!({"kvinject.io/rollout-on-rotation": "true", "kvinject.io/rollout-strategy": "evict"}),
            ),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut gc_pod = inject::pod("collected", &[("X", &reference(&collected))], json!({}));
    gc_pod.metadata.labels = Some([("app".to_owned(), "collected".to_owned())].into());
    pods.create(&pp, &gc_pod)
        .await
        .expect("a pod is admitted through the chart's webhook");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let rolled_secret = secret_of_pod(&client, &ns, "app=restart").await;
    let evicted_secret = secret_of_pod(&client, &ns, "app=evict").await;
    let collected_secret = secret_of_pod(&client, &ns, "app=collected").await;
    let before = version(&secrets.get(&rolled_secret).await.unwrap());

    // Lease, and the versions each workload runs recorded on it (patching workloads).
    support::eventually(
        Duration::from_secs(20),
        "kvinject to hold the rotation Lease",
        || async {
            leases
                .get_opt("kvinject-rotation")
                .await
                .unwrap()
                .and_then(|l| l.spec?.holder_identity)
                .as_deref()
                == Some("kvinject-sa-test")
        },
    )
    .await;
    for name in ["restart", "evict"] {
        support::eventually(
            Duration::from_secs(20),
            &format!("the versions {name} runs to be recorded"),
            || async {
                deployments
                    .get(name)
                    .await
                    .unwrap()
                    .metadata
                    .annotations
                    .unwrap_or_default()
                    .contains_key("kvinject.io/secret-versions")
            },
        )
        .await;
    }

    // Rotate and roll (restart, evict).
    support::seed_secret(&rolled, &support::distinctive_value()).await;
    support::seed_secret(&evicted, &support::distinctive_value()).await;
    support::eventually(
        Duration::from_secs(30),
        "the rotated Secret to carry the new version",
        || async { version(&secrets.get(&rolled_secret).await.unwrap()) != before },
    )
    .await;
    support::eventually(
        Duration::from_secs(30),
        "the restart strategy to roll the Deployment",
        || async {
            let d = deployments.get("restart").await.unwrap();
            d.spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap_or_default()
                .contains_key("kvinject.io/secret-versions")
        },
    )
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    support::eventually(
        Duration::from_secs(30),
        "an Evicted event for the evict strategy",
        || async {
            events
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("Evicted"))
        },
    )
    .await;
    assert!(secrets.get_opt(&evicted_secret).await.unwrap().is_some());

    // Garbage collection: the pod goes, its Secret follows after the grace period.
    pods.delete(
        "collected",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    support::eventually(
        Duration::from_secs(30),
        "the unreferenced Secret to be collected",
        || async { secrets.get_opt(&collected_secret).await.unwrap().is_none() },
    )
    .await;

    no_permission_errors(&k);

    // The chart's ValidatingAdmissionPolicies contain the ServiceAccount itself: what its RBAC
    // allows, the apiserver still refuses outside kvinject's own objects. Their expressions
    // type-check against every kind they match (a warning there is a rule that can fail).
    for policy in [
        "kvinject-secrets",
        "kvinject-workloads",
        "kvinject-workloads-statefulsets",
        "kvinject-workloads-daemonsets",
        "kvinject-replicas",
        "kvinject-tokens",
        "kvinject-webhook",
    ] {
        type_checked(policy).await;
        let (_, out, _) = support::kubectl(
            &[
                "get",
                "validatingadmissionpolicy",
                policy,
                "-o",
                "jsonpath={.status.typeChecking.expressionWarnings}",
            ],
            None,
        );
        assert!(
            out.trim().is_empty(),
            "{policy} has type-checking warnings: {out}"
        );
    }
    let as_kvinject = service_account_client().await;
    let unlabelled: Secret =
        serde_json::from_value(json!({"metadata": {"name": "not-kvinjects"}, "stringData": {"x": "y"}}))
            .unwrap();
    let refused = Api::<Secret>::namespaced(as_kvinject.clone(), &ns)
        .create(&pp, &unlabelled)
        .await;
    let message = format!("{refused:?}");
    assert!(
        message.contains("may write only Secrets labelled app.kubernetes.io/managed-by=kvinject"),
        "an unlabelled Secret written as kvinject's ServiceAccount: {message}"
    );
    let as_kvinject_deployments: Api<Deployment> = Api::namespaced(as_kvinject.clone(), &ns);
    let image = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "evil.invalid/miner:1"}]}}}});
    let refused = as_kvinject_deployments
        .patch("restart", &PatchParams::default(), &Patch::Strategic(&image))
        .await;
    let message = format!("{refused:?}");
    assert!(
        message.contains("may change only the annotations its rollouts write"),
        "an image change as kvinject's ServiceAccount: {message}"
    );
    // Tokens: kvinject's ServiceAccount may mint ServiceAccount tokens for Entra ID's
    // audience only (the chart's admission policy), and a ServiceAccount reading as its own
    // identity works on the chart's permissions.
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "wi", "annotations": {
        "kvinject.io/identity": "workload", "azure.workload.identity/client-id": "install-wi"}}}))
    .unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&pp, &sa)
        .await
        .unwrap();
    support::federate("install-wi", &ns, "wi").await;
    let wi_secret = support::unique("wi");
    support::seed_secret(&wi_secret, &support::distinctive_value()).await;
    let mut wi_pod = inject::pod("as-wi", &[("X", &reference(&wi_secret))], json!({}));
    wi_pod.spec.as_mut().unwrap().service_account_name = Some("wi".into());
    pods.create(&pp, &wi_pod)
        .await
        .expect("a ServiceAccount reads as its own identity on the chart's permissions");
    let token_for = |audience: &str, seconds: i64| k8s_openapi::api::authentication::v1::TokenRequest {
        spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(seconds),
            ..Default::default()
        },
        ..Default::default()
    };
    let as_kvinject_sas: Api<ServiceAccount> = Api::namespaced(as_kvinject.clone(), &ns);
    let refused = as_kvinject_sas
        .create_token_request("wi", &pp, &token_for("https://kubernetes.default.svc", 600))
        .await;
    let message = format!("{refused:?}");
    assert!(
        message.contains("only for the audience api://AzureADTokenExchange"),
        "another audience: {message}"
    );
    let refused = as_kvinject_sas
        .create_token_request("wi", &pp, &token_for("api://AzureADTokenExchange", 86400))
        .await;
    assert!(
        format!("{refused:?}").contains("at most 1 hour"),
        "a day-long token: {refused:?}"
    );
    as_kvinject_sas
        .create_token_request("wi", &pp, &token_for("api://AzureADTokenExchange", 600))
        .await
        .expect("a token for Entra ID's audience");

    let own = json!({"metadata": {"annotations": {"kvinject.io/rollout-halted": "probe"}}});
    as_kvinject_deployments
        .patch("restart", &PatchParams::default(), &Patch::Merge(&own))
        .await
        .expect("an annotation its rollouts write is kvinject's to change");
}

/// Waits until the apiserver has type-checked the ValidatingAdmissionPolicy `policy`.
async fn type_checked(policy: &str) {
    support::eventually(
        Duration::from_secs(20),
        &format!("{policy} to be type-checked"),
        || async {
            let (ok, out, _) = support::kubectl(
                &[
                    "get",
                    "validatingadmissionpolicy",
                    policy,
                    "-o",
                    "jsonpath={.status.typeChecking}",
                ],
                None,
            );
            ok && !out.is_empty()
        },
    )
    .await;
}

/// The apiserver's refusal of a request, as its message (or the whole error).
fn refusal<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(s)) => s.message,
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn the_charts_policies_fence_kvinjects_own_permissions() {
    let _install = INSTALL.lock().await;
    let client = support::kube().await;
    apply_chart(&["identity.perServiceAccount=true"]);
    for policy in ["kvinject-secrets", "kvinject-webhook", "kvinject-tokens"] {
        type_checked(policy).await;
    }
    // The webhook port admits only where the apiserver's calls come from, by default.
    let policy = Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(client.clone(), NS)
        .get(NAME)
        .await
        .expect("the chart's NetworkPolicy is on by default");
    let ingress = policy.spec.unwrap().ingress.unwrap();
    let webhook = ingress
        .iter()
        .find(|r| {
            r.ports.iter().flatten().any(|p| {
                p.port
                    == Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                        "webhook".into(),
                    ))
            })
        })
        .expect("a rule for the webhook port");
    assert!(
        webhook.from.as_ref().is_some_and(|f| !f.is_empty()),
        "{webhook:?}"
    );
    let as_kvinject = service_account_client().await;
    let pp = PostParams::default();
    let opted = support::namespace(&client, "fenced", &[OPT_IN]).await;
    let outside = support::namespace(&client, "unfenced", &[]).await;
    let _cleanup = [opted.clone(), outside.clone()].map(support::NamespaceGuard);
    let labelled = |type_: &str, annotations: serde_json::Value| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": support::unique("kvi-fenced"), "labels": {"app.kubernetes.io/managed-by": "kvinject"}, "annotations": annotations},
            "type": type_,
            "data": {"value": "eA==", "tls.crt": "eA==", "tls.key": "eA=="},
        }))
        .unwrap()
    };
    let ours = json!({"kvinject.io/reference": "akv://main/x", "kvinject.io/signature": "v1:k:a:b"});
    // The policies are in force (eventually: a binding takes a moment to apply).
    support::eventually(
        Duration::from_secs(20),
        "the Secrets policy to refuse kube-system",
        || async {
            let s = labelled("Opaque", ours.clone());
            refusal(
                Api::<Secret>::namespaced(as_kvinject.clone(), "kube-system")
                    .create(&pp, &s)
                    .await,
            )
            .contains("may not write Secrets in namespaces kvinject never acts for")
        },
    )
    .await;
    // A labelled service-account token in kube-system: refused, whatever its label says.
    let token: Secret = serde_json::from_value(json!({
        "metadata": {"name": support::unique("kvi-token"), "labels": {"app.kubernetes.io/managed-by": "kvinject"},
                     "annotations": {"kubernetes.io/service-account.name": "default", "kvinject.io/reference": "akv://main/x", "kvinject.io/signature": "v1:k:a:b"}},
        "type": "kubernetes.io/service-account-token",
    }))
    .unwrap();
    let message = refusal(
        Api::<Secret>::namespaced(as_kvinject.clone(), "kube-system")
            .create(&pp, &token)
            .await,
    );
    assert!(
        message.contains("kvinject's ServiceAccount may"),
        "a labelled token in kube-system: {message}"
    );
    let in_opted: Api<Secret> = Api::namespaced(as_kvinject.clone(), &opted);
    let message = refusal(
        in_opted
            .create(&pp, &labelled("kubernetes.io/tls", ours.clone()))
            .await,
    );
    assert!(
        message.contains("only Secrets of type Opaque or kubernetes.io/dockerconfigjson"),
        "{message}"
    );
    let message = refusal(in_opted.create(&pp, &labelled("Opaque", json!({}))).await);
    assert!(
        message.contains("carry kvinject.io/reference and kvinject.io/signature"),
        "{message}"
    );
    let mut app_named = labelled("Opaque", ours.clone());
    app_named.metadata.name = Some(support::unique("app-config"));
    let message = refusal(in_opted.create(&pp, &app_named).await);
    assert!(message.contains("only Secrets named kvi-"), "{message}");
    let message = refusal(
        Api::<Secret>::namespaced(as_kvinject.clone(), &outside)
            .create(&pp, &labelled("Opaque", ours.clone()))
            .await,
    );
    assert!(
        message
            .contains("create and change Secrets only in namespaces labelled kvinject.io/injection=enabled"),
        "a namespace that did not opt in: {message}"
    );
    in_opted
        .create(&pp, &labelled("Opaque", ours.clone()))
        .await
        .expect("a Secret shaped as kvinject writes them");

    // Its MutatingWebhookConfiguration: the caBundle, nothing else.
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(as_kvinject.clone());
    let change = |field: serde_json::Value| {
        let mut w = json!({"name": "pods.kvinject.io"});
        w.as_object_mut()
            .unwrap()
            .extend(field.as_object().unwrap().clone());
        json!({"webhooks": [w]})
    };
    let message = refusal(
        webhooks
            .patch(
                NAME,
                &PatchParams::default(),
                &Patch::Strategic(change(json!({"failurePolicy": "Ignore"}))),
            )
            .await,
    );
    assert!(
        message.contains("may change only the caBundle"),
        "failurePolicy: {message}"
    );
    let selector = json!({"namespaceSelector": {"matchLabels": {"anything": "goes"}}});
    let message = refusal(
        webhooks
            .patch(NAME, &PatchParams::default(), &Patch::Strategic(change(selector)))
            .await,
    );
    assert!(
        message.contains("may change only the caBundle"),
        "namespaceSelector: {message}"
    );
    let ca = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        std::fs::read(&support::testbed().ca).unwrap(),
    );
    webhooks
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Strategic(change(json!({"clientConfig": {"caBundle": ca}}))),
        )
        .await
        .expect("the caBundle is kvinject's to keep current");

    // Workloads: kvinject.io/ annotations, nothing else, not its owners.
    let deployment = deployment("fenced", "kvi-none", json!({}));
    Api::<Deployment>::namespaced(client.clone(), &opted)
        .create(&pp, &deployment)
        .await
        .unwrap();
    let as_kvinject_deployments: Api<Deployment> = Api::namespaced(as_kvinject.clone(), &opted);
    for (what, patch) in [
        ("minReadySeconds", json!({"spec": {"minReadySeconds": 30}})),
        (
            "strategy",
            json!({"spec": {"strategy": {"type": "Recreate", "rollingUpdate": null}}}),
        ),
        (
            "progressDeadlineSeconds",
            json!({"spec": {"progressDeadlineSeconds": 1}}),
        ),
        (
            "ownerReferences",
            json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "00000000-0000-0000-0000-000000000001"}]}}),
        ),
        (
            "finalizers",
            json!({"metadata": {"finalizers": ["example.com/hold"]}}),
        ),
        // kvinject.io/ annotations it does not write: what the template's pods get.
        (
            "a template's image-pull-secrets",
            json!({"spec": {"template": {"metadata": {"annotations": {"kvinject.io/image-pull-secrets": "akv://main/x"}}}}}),
        ),
        (
            "another kvinject.io/ annotation",
            json!({"metadata": {"annotations": {"kvinject.io/rollout-strategy": "evict"}}}),
        ),
    ] {
        let message = refusal(
            as_kvinject_deployments
                .patch("fenced", &PatchParams::default(), &Patch::Merge(&patch))
                .await,
        );
        assert!(
            message.contains("may change only the annotations its rollouts write"),
            "{what}: {message}"
        );
    }
    as_kvinject_deployments
        .patch(
            "fenced",
            &PatchParams::default(),
            &Patch::Merge(&json!({
                "metadata": {"annotations": {"kvinject.io/secret-versions": "x", "kvinject.io/secret-names": "y"}},
                "spec": {"template": {"metadata": {"annotations": {"kvinject.io/secret-versions": "x"}}}}
            })),
        )
        .await
        .expect("the annotations a rollout writes");

    // Tokens only in namespaces that opted in.
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "wi"}})).unwrap();
    for ns in [&opted, &outside] {
        Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .create(&pp, &sa)
            .await
            .unwrap();
    }
    let request = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
            audiences: vec!["api://AzureADTokenExchange".to_owned()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let message = refusal(
        Api::<ServiceAccount>::namespaced(as_kvinject.clone(), &outside)
            .create_token_request("wi", &pp, &request)
            .await,
    );
    assert!(
        message.contains("only in namespaces that opted in to kvinject"),
        "{message}"
    );
    Api::<ServiceAccount>::namespaced(as_kvinject.clone(), &opted)
        .create_token_request("wi", &pp, &request)
        .await
        .expect("a token in an opted-in namespace");
}

/// A client acting as the chart's ServiceAccount.
async fn service_account_client() -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(service_account_kubeconfig()).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    Client::try_from(config).unwrap()
}

#[tokio::test]
async fn replicas_starting_together_share_one_bootstrapped_certificate_and_renew_it_in_place() {
    let _install = INSTALL.lock().await;
    let client = support::kube().await;
    apply_manifests();
    fresh_bootstrap(&client).await;
    let (a_port, b_port) = (support::free_port(), support::free_port());
    point_webhook_at(&client, a_port).await;
    let flags = ["--tls-serving-validity", "30s", "--tls-reload-interval", "1s"];
    let (a, b) = tokio::join!(start_as_chart(a_port, &flags), start_as_chart(b_port, &flags));

    let writes = |k: &Kvinject| k.logs().matches("wrote new webhook certificates").count();
    assert_eq!(
        writes(&a) + writes(&b),
        1,
        "exactly one replica creates the certificates; the other reads them"
    );
    let (ca, first) = bootstrap_secret(&client).await;
    assert_eq!(served_certificate(a_port).await, first);
    assert_eq!(served_certificate(b_port).await, first);

    let ns = support::namespace(&client, "bootstrap", &[OPT_IN]).await;
    let _guard = support::NamespaceGuard(ns.clone());
    support::wait_for_webhook(&client, &ns).await;

    // With a third of its 30 s left, the serving certificate is renewed by the same CA and
    // both replicas swap it in; the apiserver keeps trusting them throughout.
    support::eventually(
        Duration::from_secs(40),
        "the serving certificate to be renewed",
        || async { bootstrap_secret(&client).await.1 != first },
    )
    .await;
    let (ca_after, renewed) = bootstrap_secret(&client).await;
    assert_eq!(ca_after, ca, "a serving renewal keeps the CA");
    for port in [a_port, b_port] {
        support::eventually(
            Duration::from_secs(10),
            "each replica to serve the renewed certificate",
            || async { served_certificate(port).await == renewed },
        )
        .await;
    }
    assert_eq!(ca_bundle(&client).await.as_deref(), Some(ca.as_str()));
    support::wait_for_webhook(&client, &ns).await;
    no_permission_errors(&a);
    no_permission_errors(&b);
}

#[tokio::test]
async fn kvinjects_own_namespace_and_kube_system_are_never_sent_to_the_webhook() {
    let _install = INSTALL.lock().await;
    let client = support::kube().await;
    apply_manifests();
    // kvinject is stopped: nothing listens where the registration points.
    point_webhook_at(&client, support::free_port()).await;
    let opted_in = support::namespace(&client, "stopped", &[OPT_IN]).await;
    let _guard = support::NamespaceGuard(opted_in.clone());
    // Even carrying the opt-in label, kvinject's own namespace stays excluded.
    let (ok, _, err) = support::kubectl(
        &[
            "label",
            "namespace",
            NS,
            "kvinject.io/injection=enabled",
            "--overwrite",
        ],
        None,
    );
    assert!(ok, "{err}");

    let name = support::unique("restart-me");
    for ns in [NS, "kube-system"] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.create(
            &PostParams::default(),
            &inject::pod(&name, &[("X", &reference("x"))], json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("a pod in {ns} must not need kvinject: {e}"));
        pods.delete(
            &name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    // The registration is live: an opted-in namespace's pod is refused (failurePolicy Fail).
    let refused = Api::<Pod>::namespaced(client.clone(), &opted_in)
        .create(
            &PostParams::default(),
            &inject::pod(&name, &[("X", &reference("x"))], json!({})),
        )
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.message.contains("failed calling webhook")),
        "{refused:?}"
    );

    let (ok, _, err) = support::kubectl(&["label", "namespace", NS, "kvinject.io/injection-"], None);
    assert!(ok, "{err}");
}

#[tokio::test]
async fn bootstrap_never_overwrites_a_secret_it_did_not_create() {
    let client = support::kube().await;
    let ns = support::namespace(&client, "foreign-tls", &[]).await;
    let _guard = support::NamespaceGuard(ns.clone());
    let foreign: Secret = serde_json::from_value(
        json!({"metadata": {"name": "kvinject-tls"}, "stringData": {"tls.crt": "someone else's"}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();

    let bed = support::testbed();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvinject"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--rotation",
        "false",
        "--vault",
        &format!("{}={}", bed.vault_name, bed.vault_url),
    ])
    .args([
        "--azure-credential",
        "managed-identity",
        "--tls-source",
        "bootstrap",
        "--tls-namespace",
        &ns,
        "--webhook-configuration",
        "",
    ])
    .env("KUBECONFIG", &bed.kubeconfig);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("kvinject must exit, not hang")
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "Secret {ns}/kvinject-tls exists but was not created by kvinject"
        )),
        "{stderr}"
    );
    let kept = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("kvinject-tls")
        .await
        .unwrap();
    assert_eq!(
        kept.data.unwrap()["tls.crt"].0,
        b"someone else's",
        "the foreign Secret was changed"
    );
}

#[tokio::test]
async fn certificates_from_kvinject_certs_are_trusted_by_the_apiserver() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvinject"))
        .args([
            "certs",
            "--service",
            "kvinject",
            "--namespace",
            "platform",
            "--extra-san",
            "127.0.0.1",
            "--out-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ca_bundle = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let k = Kvinject::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .await;

    // A registration whose caBundle is exactly the line `kvinject certs` printed.
    let client = support::kube().await;
    let label = support::unique("certs");
    let ns = support::namespace(&client, "certs", &[("kvinject.test/suite", &label)]).await;
    let _guard = support::NamespaceGuard(ns.clone());
    let _webhook =
        support::register_webhook(&client, &label, &k.url(), ("kvinject.test/suite", &label)).await;
    let patch: json_patch::Patch = serde_json::from_value(
        json!([{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": ca_bundle}]),
    )
    .unwrap();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(&label, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .unwrap();
    support::wait_for_webhook(&client, &ns).await;
}

/// The chart's optional objects (cert-manager's Issuer and Certificates, the
/// ServiceMonitor) against the real CustomResourceDefinitions, taken from the
/// cert-manager and prometheus-operator modules. Neither controller runs on the bed, so
/// this checks the objects, not issuance; a server-side dry run validates them against
/// each CRD's schema without creating a second live webhook registration.
#[tokio::test]
async fn optional_cert_manager_and_service_monitor_objects_match_their_crds() {
    let ok = Command::new(repo().join("tests/testbed/build.sh"))
        .arg("crds")
        .status()
        .unwrap();
    assert!(ok.success(), "tests/testbed/build.sh crds failed");
    let crds = bed_cache().join("crds/current");
    // kubectl reads a symlink as a file: give it the directory itself.
    let crds = crds.canonicalize().unwrap();
    let (ok, out, err) = support::kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=platform-team",
            "-f",
            crds.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    let names = [
        "certificates.cert-manager.io",
        "issuers.cert-manager.io",
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ]
    .map(|c| format!("crd/{c}"));
    let mut wait = vec!["wait", "--for", "condition=Established", "--timeout=60s"];
    wait.extend(names.iter().map(String::as_str));
    let (ok, out, err) = support::kubectl(&wait, None);
    assert!(ok, "{out}{err}");

    let client = support::kube().await;
    let ns = support::namespace(&client, "optional", &[]).await;
    let _guard = support::NamespaceGuard(ns.clone());
    for extra in [
        &[][..],
        &[
            "--set",
            "tls.certManager.issuerRef.name=corp-ca",
            "--set",
            "tls.certManager.issuerRef.kind=ClusterIssuer",
        ][..],
    ] {
        // Its own release name: the cluster-scoped objects must not meet the other tests'.
        let mut args = vec![
            "template",
            "kvinject-cm",
            "deploy/helm/kvinject",
            "-n",
            &ns,
            "-f",
            "deploy/manifests/values.yaml",
            "--set",
            "createNamespace=false",
            "--set",
            "tls.source=certManager",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
        ];
        args.extend_from_slice(extra);
        let (ok, rendered, err) = helm(&args);
        assert!(ok, "{err}");
        let kinds = ["kind: Certificate", "kind: ServiceMonitor"];
        assert!(kinds.iter().all(|k| rendered.contains(k)), "{rendered}");
        let (ok, out, err) = support::kubectl(
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--field-manager=platform-team",
                "-f",
                "-",
            ],
            Some(&rendered),
        );
        assert!(
            ok,
            "the apiserver refused the cert-manager rendering ({extra:?}):\n{out}\n{err}"
        );
        assert!(
            out.contains("certificate.cert-manager.io/kvinject-cm serverside-applied (server dry run)"),
            "{out}"
        );
        assert!(
            out.contains(
                "servicemonitor.monitoring.coreos.com/kvinject-cm serverside-applied (server dry run)"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "prometheusrule.monitoring.coreos.com/kvinject-cm serverside-applied (server dry run)"
            ),
            "{out}"
        );
    }

    // The dry run does check the schema: a misspelled field is refused.
    let typo = format!(
        "apiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata: {{name: typo, namespace: {ns}}}\nspec:\n  secretName: x\n  dnsNamez: [a]\n  issuerRef: {{name: x}}\n"
    );
    let (ok, _, err) = support::kubectl(
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        Some(&typo),
    );
    assert!(!ok && err.contains("dnsNamez"), "{err}");
}

/// The chart's alerts, tested by promtool (built from its Go module) with synthetic series:
/// each fires when it should and stays quiet otherwise (tests/alerts/kvinject.test.yaml).
#[test]
fn the_charts_alerts_fire_when_they_should() {
    let ok = Command::new(repo().join("tests/testbed/build.sh"))
        .arg("promtool")
        .status()
        .expect("building promtool");
    assert!(ok.success(), "tests/testbed/build.sh promtool failed");
    let (ok, rendered, err) = helm(&[
        "template",
        "kvinject",
        "deploy/helm/kvinject",
        "-n",
        NS,
        "-f",
        "deploy/manifests/values.yaml",
        "--set",
        "prometheusRule.enabled=true",
        "-s",
        "templates/prometheusrule.yaml",
    ]);
    assert!(ok, "{err}");
    let rule: serde_json::Value = serde_yaml::from_str(&rendered).expect("the PrometheusRule is YAML");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&rule["spec"]).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        repo().join("tests/alerts/kvinject.test.yaml"),
        dir.path().join("kvinject.test.yaml"),
    )
    .unwrap();
    let out = Command::new(bed_cache().join("bin/promtool"))
        .args(["test", "rules", "kvinject.test.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("SUCCESS"),
        "promtool test rules:\n{text}"
    );
}

#[tokio::test]
async fn the_charts_permissions_cover_kvinjects_live_reads_of_namespaces_and_service_accounts() {
    // In process, as the chart's ServiceAccount: the namespace and the ServiceAccount are not
    // in kvinject's caches yet (both were just created), so each is read from the apiserver.
    // A read the chart does not allow must deny, and must not be taken for "nothing said".
    let _install = INSTALL.lock().await;
    let admin = support::kube().await;
    apply_manifests();
    let ns = support::namespace(&admin, "liveread", &[("kvinject.test/suite", "x")]).await;
    let _ns = support::NamespaceGuard(ns.clone());
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("own-identity".into());
    sa.metadata.annotations = Some([("kvinject.io/identity".to_owned(), "workload".to_owned())].into());
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let chart = service_account_client().await;
    let with_reference = |sa: &str| {
        let mut p = inject::pod("app", &[("X", &reference("live-read"))], json!({}));
        p.metadata.namespace = Some(ns.clone());
        p.spec.as_mut().unwrap().service_account_name = Some(sa.to_owned());
        p
    };
    // The namespace's labels read live: kvinject acts (its vault here is the in-process
    // EmptyVault double, which has nothing: the test is about the apiserver reads).
    let err = crate::isolation::decide_in_process(chart.clone(), None, None, &with_reference("default"))
        .await
        .expect_err("kvinject decides for the opted-in namespace");
    assert!(
        err.contains("live-read") && !err.contains("could not read"),
        "{err}"
    );
    // The ServiceAccount read live: its annotation is what decides the identity.
    let err = crate::isolation::decide_in_process(
        chart,
        None,
        Some(Default::default()),
        &with_reference("own-identity"),
    )
    .await
    .expect_err("a workload identity without a client id");
    assert!(
        err.contains("has no `azure.workload.identity/client-id` annotation"),
        "{err}"
    );
}
