//! Test support: the running test bed, clients for it, and a kvinject process.
//!
//! The bed comes from the environment that `eval "$(tests/testbed/testbed up)"` sets (the
//! test command does that). Without it, the first test starts one, tied to this test
//! process: its watchdog stops the bed when the process exits, whatever the outcome.
#![allow(dead_code)]

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
        },
        core::v1::{Namespace, ServiceAccount},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use kvinject::keyvault::{AzureConfig, CredentialConfig};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

pub struct TestBed {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub ca: PathBuf,
    pub vault_name: String,
    pub vault_url: String,
    pub authority: String,
    pub webhook_cert: PathBuf,
    pub webhook_key: PathBuf,
    /// The bed's node (tests/testbed/node.sh), where pods that tolerate its taint run;
    /// `None` when the bed runs without one (not root, or KVINJECT_TESTBED_NODE=0).
    pub node: Option<String>,
    /// Every node of the bed, sorted (two when it runs them).
    pub nodes: Vec<String>,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn from_exports(vars: &BTreeMap<String, String>) -> TestBed {
    let get = |k: &str| {
        vars.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("the test bed did not export {k}"))
    };
    TestBed {
        dir: get("KVINJECT_TESTBED_DIR").into(),
        kubeconfig: get("KUBECONFIG").into(),
        ca: get("KVINJECT_TESTBED_CA").into(),
        vault_name: get("KVINJECT_VAULT_NAME"),
        vault_url: get("KVINJECT_VAULT_URL"),
        authority: get("KVINJECT_VAULT_AUTHORITY"),
        webhook_cert: get("KVINJECT_TESTBED_WEBHOOK_CERT").into(),
        webhook_key: get("KVINJECT_TESTBED_WEBHOOK_KEY").into(),
        node: vars
            .get("KVINJECT_TESTBED_NODE_NAME")
            .filter(|n| !n.is_empty())
            .cloned(),
        nodes: {
            let mut n: Vec<String> = vars
                .get("KVINJECT_TESTBED_NODE_NAMES")
                .map(|n| n.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default();
            n.sort();
            n
        },
    }
}

/// The running test bed, started at most once per test process.
pub fn testbed() -> &'static TestBed {
    static BED: OnceLock<TestBed> = OnceLock::new();
    BED.get_or_init(|| {
        let keys = [
            "KVINJECT_TESTBED_DIR",
            "KUBECONFIG",
            "KVINJECT_TESTBED_CA",
            "KVINJECT_VAULT_NAME",
            "KVINJECT_VAULT_URL",
            "KVINJECT_VAULT_AUTHORITY",
            "KVINJECT_TESTBED_WEBHOOK_CERT",
            "KVINJECT_TESTBED_WEBHOOK_KEY",
        ];
        let optional = ["KVINJECT_TESTBED_NODE_NAME", "KVINJECT_TESTBED_NODE_NAMES"];
        let from_env: BTreeMap<String, String> = keys
            .iter()
            .chain(&optional)
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        if keys.iter().all(|k| from_env.contains_key(*k)) {
            return from_exports(&from_env);
        }
        let out = Command::new(repo().join("tests/testbed/testbed"))
            .args(["up", "--owner-pid", &std::process::id().to_string()])
            .stderr(Stdio::inherit())
            .output()
            .expect("running tests/testbed/testbed up");
        assert!(out.status.success(), "tests/testbed/testbed up failed");
        let vars = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        from_exports(&vars)
    })
}

/// Runs a test bed command (vault-stop, vault-start, ...).
pub fn testbed_cmd(arg: &str) {
    let status = Command::new(repo().join("tests/testbed/testbed"))
        .arg(arg)
        .env("KVINJECT_TESTBED_DIR", &testbed().dir)
        .status()
        .expect("running tests/testbed/testbed");
    assert!(status.success(), "tests/testbed/testbed {arg} failed");
}

pub async fn kube() -> Client {
    Client::try_from(bed_config().await).expect("kube client")
}

/// A client that shows each answer as the apiserver gave it: without kube's own retry of
/// 429, 503 and 504 (which holds an eviction a PodDisruptionBudget refuses until it is
/// allowed), as kvinject runs (`app::apiserver_client`).
pub async fn kube_without_retry() -> Client {
    let mut config = bed_config().await;
    config.default_retry = false;
    Client::try_from(config).expect("kube client")
}

async fn bed_config() -> Config {
    let bed = testbed();
    let kubeconfig = Kubeconfig::read_from(&bed.kubeconfig).expect("reading the test bed kubeconfig");
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig")
}

/// How kvinject (and the tests) reach the test bed's vault: a service principal against
/// the bed's token endpoint, trusting the bed's CA.
pub fn azure_config() -> AzureConfig {
    let bed = testbed();
    AzureConfig {
        credential: CredentialConfig::ClientSecret {
            tenant_id: "testbed-tenant".into(),
            client_id: "kvinject-tests".into(),
            secret: azure_core::credentials::Secret::new("testbed-client-secret"),
        },
        ca_bundle: Some(bed.ca.clone()),
        authority_host: Some(bed.authority.clone()),
        attempt_timeout: Duration::from_secs(3),
        max_retries: 1,
    }
}

pub fn secret_client() -> azure_security_keyvault_secrets::SecretClient {
    secret_client_of(&testbed().vault_url)
}

/// A client of the bed's vault at `url` (each vault host is a vault of its own there).
pub fn secret_client_of(url: &str) -> azure_security_keyvault_secrets::SecretClient {
    azure_config()
        .connect()
        .expect("azure setup")
        .secret_client(url)
        .expect("secret client")
}

/// The URL of the bed's vault named `vault` (`other`: one no test but its own uses).
pub fn vault_url_of(vault: &str) -> String {
    let bed = testbed();
    bed.vault_url
        .replacen(&format!("//{}.", bed.vault_name), &format!("//{vault}."), 1)
}

/// An HTTP client that trusts the bed's CA, for its test-control endpoints.
fn bed_http() -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&testbed().ca).unwrap()).unwrap();
    reqwest::Client::builder().tls_certs_merge([ca]).build().unwrap()
}

/// Writes a new version of `name` in the bed's vault and returns that version's id.
pub async fn seed_secret(name: &str, value: &str) -> String {
    seed_secret_in(&testbed().vault_url, name, value).await
}

/// Like `seed_secret`, in the bed's vault at `url`.
pub async fn seed_secret_in(url: &str, name: &str, value: &str) -> String {
    use azure_security_keyvault_secrets::{ResourceExt, models::SetSecretParameters};
    record_seeded(value);
    let params = SetSecretParameters {
        value: Some(value.to_owned()),
        ..Default::default()
    };
    let secret = secret_client_of(url)
        .set_secret(name, params.try_into().unwrap(), None)
        .await
        .unwrap_or_else(|e| panic!("seeding secret {name}: {e}"))
        .into_model()
        .unwrap();
    secret.resource_id().unwrap().version.expect("a version")
}

/// Writes a new version with explicit attributes (enabled, expiry, not-before).
/// Remembers a value seeded in the vault, for the suite-wide scan (tests/scan-values) that
/// proves no value reached kvinject's logs, Events or metrics.
pub fn record_seeded(value: &str) {
    use std::io::Write;
    let path = testbed().dir.join("seeded-values.jsonl");
    // One write of the whole line: tests seed from many threads at once, and a line
    // written in pieces could interleave with another (the scan would then fail to parse).
    let line = format!("{}\n", serde_json::Value::from(value));
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(line.as_bytes());
    }
}

pub async fn seed_secret_with(
    name: &str,
    value: &str,
    attributes: azure_security_keyvault_secrets::models::SecretAttributes,
) -> String {
    use azure_security_keyvault_secrets::{ResourceExt, models::SetSecretParameters};
    record_seeded(value);
    let params = SetSecretParameters {
        value: Some(value.to_owned()),
        secret_attributes: Some(attributes),
        ..Default::default()
    };
    let secret = secret_client()
        .set_secret(name, params.try_into().unwrap(), None)
        .await
        .expect("seeding")
        .into_model()
        .unwrap();
    secret.resource_id().unwrap().version.expect("a version")
}

/// The bed vault's request counters (secrets_get, tokens, assertion_tokens, ...).
pub async fn vault_counters() -> serde_json::Value {
    let http = bed_http();
    let res = http
        .get(format!("{}/_testbed/counters", testbed().authority))
        .send()
        .await
        .expect("vault counters");
    serde_json::from_slice(&res.bytes().await.unwrap()).unwrap()
}

/// Calls one of the bed vault's test-control endpoints (`forbid/NAME`, `allow/NAME`).
pub async fn vault_control(path: &str) {
    let http = bed_http();
    let res = http
        .post(format!("{}/_testbed/{path}", testbed().authority))
        .send()
        .await
        .expect("vault control");
    assert!(
        res.status().is_success(),
        "vault control {path}: {}",
        res.status()
    );
}

/// Starts a fault of the bed's vault or token endpoint (kvstandin.py lists them), replacing
/// any fault in force; `None` ends every fault.
pub async fn vault_fault(fault: Option<serde_json::Value>) {
    let http = bed_http();
    let url = format!("{}/_testbed/fault", testbed().authority);
    let res = match &fault {
        Some(f) => http
            .post(url)
            .header("content-type", "application/json")
            .body(f.to_string()),
        None => http.delete(url),
    }
    .send()
    .await
    .expect("vault fault control");
    assert!(
        res.status().is_success(),
        "vault fault {fault:?}: {}",
        res.status()
    );
}

/// Ends every fault of the bed's vault, from a `Drop` (no async runtime there).
/// Starts the bed's vault again when dropped, however the test ends.
pub struct RestartVault;
impl Drop for RestartVault {
    fn drop(&mut self) {
        testbed_cmd("vault-start");
    }
}

/// Ends the bed's vault faults when dropped, however the test ends.
pub struct EndVaultFaults;
impl Drop for EndVaultFaults {
    fn drop(&mut self) {
        end_vault_faults_blocking();
    }
}

/// Deletes a namespace (the test's own) when dropped, however the test ends.
pub struct NamespaceGuard(pub String);
impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        delete_from_drop::<k8s_openapi::api::core::v1::Namespace>(self.0.clone());
    }
}

pub fn end_vault_faults_blocking() {
    let bed = testbed();
    let _ = Command::new("curl")
        .args(["-sf", "-X", "DELETE", "--cacert"])
        .arg(&bed.ca)
        .arg(format!("{}/_testbed/fault", bed.authority))
        .status();
}

/// A value no test output would contain by chance: 24 random hex digits after a marker.
pub fn distinctive_value() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("kvv-{hex}")
}

/// Calls a test-control endpoint of the bed's Entra ID with a JSON body (`federate`,
/// `vault-access`).
pub async fn entra_control(path: &str, body: serde_json::Value) {
    let http = bed_http();
    let res = http
        .post(format!("{}/_testbed/{path}", testbed().authority))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("entra control");
    assert!(
        res.status().is_success(),
        "entra control {path}: {}",
        res.status()
    );
}

/// A federated identity credential: Entra ID's client `client_id` trusts ServiceAccount
/// `namespace/name` (its token's subject).
pub async fn federate(client_id: &str, namespace: &str, name: &str) {
    let subject = format!("system:serviceaccount:{namespace}:{name}");
    entra_control(
        "federate",
        serde_json::json!({"client_id": client_id, "subject": subject}),
    )
    .await;
}

/// A token of ServiceAccount `namespace/name` for `audience`, from the apiserver's
/// TokenRequest API (what kubelet projects for workload identity).
pub async fn service_account_token(client: &Client, namespace: &str, name: &str, audience: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let answer = api
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for {namespace}/{name}: {e}"));
    answer.status.expect("a token").token
}

pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{:x}{}",
        nanos % 0xfffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates a namespace with `labels` and waits for its default ServiceAccount, which the
/// ServiceAccount admission plugin needs before any pod can be created there.
pub async fn namespace(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> String {
    let name = unique(prefix);
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.clone());
    ns.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("creating a namespace");
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    eventually(Duration::from_secs(30), "the default ServiceAccount", || async {
        sas.get_opt("default").await.ok().flatten().is_some()
    })
    .await;
    name
}

/// Polls `check` until it is true, failing the test after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Tests that only use the vault hold this shared; a test that stops it holds it alone.
pub static VAULT: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A rotation controller acts on the whole cluster: tests that run one hold this, so
/// their assertions see only their own controllers. Take it after `VAULT`.
pub static ROTATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running `kvinject serve`, killed on drop. Its log goes to the test bed's log folder.
pub struct Kvinject {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub log: PathBuf,
}

impl Kvinject {
    /// kvinject configured for the bed's vault, as a service principal, on free ports. A
    /// port found free can be taken by another process before kvinject binds it: kvinject
    /// then exits at once, and it is started again on other ports (three tries).
    pub async fn start(extra: &[&str]) -> Kvinject {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start_with_env(free_port(), free_port(), extra, &[]).await {
                Ok(k) => return k,
                Err(log) if log.contains("in use") => last = log,
                Err(log) => panic!("kvinject exited before it was ready:\n{log}"),
            }
        }
        panic!("kvinject found no free ports in three tries:\n{last}")
    }

    /// kvinject for the bed's vault with the service principal credential.
    pub async fn start_on(port: u16, admin_port: u16, extra: &[&str]) -> Kvinject {
        Self::start_with_env(port, admin_port, extra, &[]).await
    }

    /// Like `start_on`, with more environment (`KUBECONFIG` replaces the bed's admin one).
    pub async fn start_with_env(
        port: u16,
        admin_port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Kvinject {
        Self::try_start_with_env(port, admin_port, extra, env)
            .await
            .unwrap_or_else(|log| panic!("kvinject exited before it was ready:\n{log}"))
    }

    async fn try_start_with_env(
        port: u16,
        admin_port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Kvinject, String> {
        let mut args = vec![
            "--azure-credential",
            "client-secret",
            "--azure-tenant-id",
            "testbed-tenant",
            "--azure-client-id",
            "kvinject-tests",
        ];
        args.extend_from_slice(extra);
        let mut env = env.to_vec();
        env.push(("AZURE_CLIENT_SECRET", "testbed-client-secret"));
        Self::try_spawn(port, admin_port, &args, &env).await
    }

    /// kvinject for the bed's vault and CA; the credential comes from `args` and `env`.
    pub async fn spawn(port: u16, admin_port: u16, args: &[&str], env: &[(&str, &str)]) -> Kvinject {
        Self::try_spawn(port, admin_port, args, env)
            .await
            .unwrap_or_else(|log| panic!("kvinject exited before it was ready:\n{log}"))
    }

    /// Like `spawn`; `Err` with kvinject's log when it exits before it is ready.
    async fn try_spawn(
        port: u16,
        admin_port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Kvinject, String> {
        // kvinject watches AccessPolicy objects unless told `--access-policy off`.
        ensure_crd();
        let bed = testbed();
        let log = bed.dir.join("logs").join(format!("{}.log", unique("kvinject")));
        let file = std::fs::File::create(&log).unwrap();
        // KVINJECT_BIN: another build of it (tests/bench footprint measures the dist one).
        let binary =
            std::env::var("KVINJECT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kvinject").to_owned());
        let child = Command::new(binary)
            .arg("serve")
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin_port}"),
            ])
            // The bed's serving certificate, unless the test brings its own.
            .args(if args.contains(&"--tls-cert") {
                vec![]
            } else {
                vec![
                    "--tls-cert".as_ref(),
                    bed.webhook_cert.as_os_str(),
                    "--tls-key".as_ref(),
                    bed.webhook_key.as_os_str(),
                ]
            })
            .args(["--vault", &format!("{}={}", bed.vault_name, bed.vault_url)])
            .arg("--azure-ca-bundle")
            .arg(&bed.ca)
            .args([
                "--azure-authority-host",
                &bed.authority,
                "--vault-probe-interval",
                "1s",
            ])
            .args(args)
            // Each test's kvinject would run a cluster-wide controller: only tests that
            // are about rotation turn it on.
            .args(if args.contains(&"--rotation") {
                &[][..]
            } else {
                &["--rotation", "false"][..]
            })
            .args(test_defaults(args))
            .env_remove("AZURE_FEDERATED_TOKEN_FILE")
            .env("KUBECONFIG", &bed.kubeconfig)
            .env("KVINJECT_LOG", "info,kvinject=debug")
            .envs(env.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("starting kvinject");
        let mut k = Kvinject {
            child,
            port,
            admin_port,
            log,
        };
        let url = format!("http://127.0.0.1:{admin_port}/readyz");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(&url)
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                return Ok(k);
            }
            if k.exited().is_some() {
                return Err(k.strict_logs());
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 30s waiting for kvinject to be ready (log: {})",
                k.log.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/mutate", self.port)
    }

    /// kvinject's log; a log that cannot be read fails the test (a check that nothing leaked
    /// must not pass without looking).
    pub fn logs(&self) -> String {
        self.strict_logs()
    }

    /// Like `metric`, but a metric that is not exported at all fails the test, by name.
    pub async fn strict_metric(&self, name: &str, filters: &[&str]) -> f64 {
        self.metric_if_exported(name, filters)
            .await
            .unwrap_or_else(|| panic!("kvinject exports no metric {name} with {filters:?}"))
    }

    /// The sum of a metric's samples, or `None` while kvinject exports none.
    pub async fn metric_if_exported(&self, name: &str, filters: &[&str]) -> Option<f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .await
            .expect("scraping kvinject's /metrics")
            .text()
            .await
            .expect("reading kvinject's /metrics");
        let samples: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
            })
            .filter(|l| filters.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .collect();
        (!samples.is_empty()).then(|| samples.iter().sum())
    }

    /// kvinject's log; a log that cannot be read fails the test.
    pub fn strict_logs(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| panic!("reading kvinject's log {}: {e}", self.log.display()))
    }

    /// The sum of a metric's samples whose line contains every one of `filters`: 0 when the
    /// metric is declared (its `# TYPE` line) but has no such sample yet, as a counter family
    /// before its first increment. A metric kvinject does not declare at all (renamed, say)
    /// fails the test, by name, so a check for zero cannot pass by accident.
    pub async fn metric(&self, name: &str, filters: &[&str]) -> f64 {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .await
            .expect("scraping kvinject's /metrics")
            .text()
            .await
            .expect("reading kvinject's /metrics");
        let base = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            text.lines().any(|l| l
                .strip_prefix("# TYPE ")
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|declared| declared == name || declared == base)),
            "kvinject declares no metric {name}"
        );
        text.lines()
            .filter(|l| {
                l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
            })
            .filter(|l| filters.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sends SIGTERM and waits for the process; returns its exit status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        self.send_sigterm();
        let status = self.child.wait().expect("waiting for kvinject");
        (status, started.elapsed())
    }

    /// Sends SIGTERM and returns at once.
    pub fn send_sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("checking on kvinject")
    }

    pub async fn ready(&self) -> bool {
        let url = format!("http://127.0.0.1:{}/readyz", self.admin_port);
        reqwest::get(url)
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    }

    /// Kills the process (a crash, as seen from outside) and starts a fresh one on the
    /// same ports, so the webhook registration stays valid.
    pub async fn restart(&mut self, extra: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Kvinject::start_on(self.port, self.admin_port, extra).await;
    }
}

impl Drop for Kvinject {
    fn drop(&mut self) {
        // Its /metrics, kept beside its log for the suite-wide scan for values.
        let _ = std::fs::write(self.log.with_extension("metrics"), scrape(self.admin_port));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Flags every test's kvinject gets unless the test sets them itself: it acts for the test
/// namespaces (each carries the label key `kvinject.test/suite`), keeps its signing key in
/// `default` (one key for every test's kvinject, as replicas share one), and lets pods ask
/// for one-second checks.
fn test_defaults(args: &[&str]) -> Vec<&'static str> {
    let defaults: [(&str, &str); 3] = [
        ("--namespace-selector", "kvinject.test/suite"),
        ("--signing-key-namespace", "default"),
        ("--min-refresh-interval", "1s"),
    ];
    defaults
        .iter()
        .filter(|(flag, _)| !args.contains(flag))
        .flat_map(|(flag, value)| [*flag, *value])
        .collect()
}

/// A plain HTTP GET of /metrics on 127.0.0.1:`port` (no async runtime: used from `Drop`).
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

/// Waits until the apiserver calls the webhook for namespace `ns`: a dry-run pod naming a
/// vault kvinject does not know is denied by kvinject once the registration is live.
pub async fn wait_for_webhook(client: &Client, ns: &str) {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let probe: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "webhook-probe"},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/x", "env": [{"name": "X", "value": "akv://not-configured/x"}]}]}
    }))
    .unwrap();
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually(Duration::from_secs(20), "the apiserver to call the webhook", || async {
        matches!(pods.create(&dry, &probe).await, Err(kube::Error::Api(s)) if s.message.contains("not configured in kvinject"))
    })
    .await;
}

/// A namespace opted in through its own label, a kvinject process and a registration
/// that sends that namespace's pods to it.
pub struct Setup {
    pub client: Client,
    pub ns: String,
    pub kvinject: Kvinject,
    pub webhook: WebhookGuard,
    pub label: String,
    pub policy: PolicyGuard,
}

impl Drop for Setup {
    /// Deletes the test's namespace, so later tests' controllers do not see its Secrets.
    fn drop(&mut self) {
        keep_events(&self.ns);
        delete_from_drop::<Namespace>(self.ns.clone());
    }
}

/// The Events in `ns` with `reason` about the object named `name`.
pub async fn events_about(
    client: &Client,
    ns: &str,
    reason: &str,
    name: &str,
) -> Vec<k8s_openapi::api::events::v1::Event> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let list = events.list(&Default::default()).await.expect("listing Events");
    list.items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect()
}

/// Saves a namespace's Events beside kvinject's logs before the namespace goes, for the
/// suite-wide scan for values (tests/scan-values).
pub fn keep_events(ns: &str) {
    let (ok, out, _) = kubectl(&["get", "events.events.k8s.io", "-n", ns, "-o", "json"], None);
    if ok {
        let _ = std::fs::write(
            testbed()
                .dir
                .join("logs")
                .join(format!("kvinject-events-{ns}.json")),
            out,
        );
    }
}

/// Deletes a cluster-scoped object from a `Drop`. Drop cannot await, and the test's runtime
/// is blocked there: a short-lived thread with its own runtime and its own client (one tied
/// to the test's runtime would deadlock) does the delete.
pub fn delete_from_drop<K>(name: String)
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let api: Api<K> = Api::all(kube().await);
            let _ = api.delete(&name, &DeleteParams::default()).await;
        });
    })
    .join();
}

pub async fn setup(prefix: &str, extra: &[&str]) -> Setup {
    setup_for(prefix, Kvinject::start(extra).await).await
}

/// Like `setup`, with a kvinject process the test started itself.
pub async fn setup_for(prefix: &str, kvinject: Kvinject) -> Setup {
    let client = kube().await;
    let label = unique(prefix);
    let ns = namespace(&client, prefix, &[("kvinject.test/suite", &label)]).await;
    let policy = grant_all(&client, &ns).await;
    let webhook = register_webhook(&client, &label, &kvinject.url(), ("kvinject.test/suite", &label)).await;
    wait_for_webhook(&client, &ns).await;
    Setup {
        client,
        ns,
        kvinject,
        webhook,
        label,
        policy,
    }
}

/// Installs the AccessPolicy CustomResourceDefinition the chart ships (once per test
/// process; server-side apply, so a test that applies the chart's manifests agrees).
pub fn ensure_crd() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let crd = repo().join("deploy/helm/kvinject/crds/accesspolicies.kvinject.io.yaml");
        let (ok, out, err) = kubectl(
            &[
                "apply",
                "--server-side",
                "--field-manager=kvinject-tests",
                "-f",
                crd.to_str().unwrap(),
            ],
            None,
        );
        assert!(ok, "applying the AccessPolicy CRD:\n{out}\n{err}");
        let (ok, out, err) = kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                "crd/accesspolicies.kvinject.io",
            ],
            None,
        );
        assert!(
            ok,
            "the AccessPolicy CRD did not become established:\n{out}\n{err}"
        );
    });
}

/// Creates the AccessPolicy `name`, deleted when the guard drops.
pub async fn access_policy(client: &Client, name: &str, spec: serde_json::Value) -> PolicyGuard {
    use kvinject::access::policy::AccessPolicy;
    ensure_crd();
    let spec = serde_json::from_value(spec).expect("an AccessPolicy spec");
    Api::<AccessPolicy>::all(client.clone())
        .create(&PostParams::default(), &AccessPolicy::new(name, spec))
        .await
        .unwrap_or_else(|e| panic!("creating AccessPolicy {name}: {e}"));
    PolicyGuard(name.to_owned())
}

/// Grants namespace `ns` every secret of the bed's vault, for both uses: what tests that are
/// not about access policies run under (kvinject runs with `--access-policy required`).
pub async fn grant_all(client: &Client, ns: &str) -> PolicyGuard {
    let spec =
        serde_json::json!({"vault": testbed().vault_name, "secrets": ["*"], "namespaces": {"names": [ns]}});
    access_policy(client, &format!("all-{ns}"), spec).await
}

/// Deletes its AccessPolicy when dropped.
pub struct PolicyGuard(pub String);

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        delete_from_drop::<kvinject::access::policy::AccessPolicy>(self.0.clone());
    }
}

/// Runs kubectl against the bed, returning (success, stdout, stderr).
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", &testbed().kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubectl");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Registers `url` for pod CREATE (and ephemeral containers) in namespaces labelled `label=value`, as the chart does.
pub async fn register_webhook(client: &Client, name: &str, url: &str, label: (&str, &str)) -> WebhookGuard {
    let ca = std::fs::read(&testbed().ca).unwrap();
    let webhook = MutatingWebhook {
        name: format!("{name}.kvinject.io"),
        admission_review_versions: vec!["v1".into()],
        client_config: WebhookClientConfig {
            url: Some(url.to_owned()),
            ca_bundle: Some(ByteString(ca)),
            service: None,
        },
        rules: Some(vec![
            RuleWithOperations {
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            },
            RuleWithOperations {
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["UPDATE".into()]),
                resources: Some(vec!["pods/ephemeralcontainers".into()]),
                scope: Some("Namespaced".into()),
            },
        ]),
        namespace_selector: Some(LabelSelector {
            match_labels: Some([(label.0.to_owned(), label.1.to_owned())].into()),
            ..Default::default()
        }),
        side_effects: "NoneOnDryRun".into(),
        failure_policy: Some("Fail".into()),
        timeout_seconds: Some(8),
        reinvocation_policy: Some("IfNeeded".into()),
        ..Default::default()
    };
    let mut config = MutatingWebhookConfiguration::default();
    config.metadata.name = Some(name.to_owned());
    config.webhooks = Some(vec![webhook]);
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    api.create(&PostParams::default(), &config)
        .await
        .expect("registering the webhook");
    WebhookGuard {
        name: name.to_owned(),
    }
}

/// Deletes its MutatingWebhookConfiguration when dropped, so one test's webhook never
/// outlives it.
pub struct WebhookGuard {
    name: String,
}

impl Drop for WebhookGuard {
    fn drop(&mut self) {
        delete_from_drop::<MutatingWebhookConfiguration>(self.name.clone());
    }
}

/// Reports every pod of a namespace Running and Ready, as kubelet would once its containers
/// pass their readiness checks, for pods that never run: they do not tolerate the bed node's
/// taint (tests/testbed/node.sh) and their images do not exist. Running matters to the
/// eviction API: it ignores PodDisruptionBudgets for Pending pods. Stops when dropped.
pub struct ReadyPods(tokio::task::JoinHandle<()>);

impl ReadyPods {
    pub fn start(client: &Client, ns: &str) -> ReadyPods {
        use k8s_openapi::api::core::v1::Pod;
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        ReadyPods(tokio::spawn(async move {
            let ready = serde_json::json!({"status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}
            ]}});
            loop {
                if let Ok(list) = pods.list(&Default::default()).await {
                    for p in list
                        .items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                    {
                        let is_ready = p
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                        if !is_ready {
                            let _ = pods
                                .patch_status(
                                    p.metadata.name.as_deref().unwrap_or_default(),
                                    &kube::api::PatchParams::default(),
                                    &kube::api::Patch::Merge(&ready),
                                )
                                .await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }))
    }
}

impl Drop for ReadyPods {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// AdmissionReview for a pod in `namespace` that uses `reference`, as anyone who can reach
/// the webhook port could POST it.
pub fn review(namespace: &str, reference: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "forged-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE", "namespace": namespace, "userInfo": {"username": "mallory"}, "dryRun": false,
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                       "spec": {"containers": [{"name": "c", "image": "i", "env": [{"name": "X", "value": reference}]}]}},
        }
    })
}

pub async fn post_review(k: &Kvinject, body: &serde_json::Value) -> serde_json::Value {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&testbed().ca).unwrap()).unwrap();
    let http = reqwest::Client::builder().tls_certs_merge([ca]).build().unwrap();
    let res = http
        .post(k.url())
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("posting to the webhook");
    assert_eq!(res.status(), 200);
    serde_json::from_slice(&res.bytes().await.unwrap()).unwrap()
}
