//! Command line and environment: every flag has an `env=`, and `validate` turns the raw
//! arguments into a plain `ServeConfig` that tests can also build directly.

pub use crate::duration::parse_duration;
use crate::keyvault::{AzureConfig, CredentialConfig};
pub use crate::limit::ReadLimit;
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

#[derive(Parser, Debug)]
#[command(
    name = "kvinject",
    version,
    about = "Azure Key Vault secrets for Kubernetes pods, GitOps-safe"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
    #[arg(long, env = "KVINJECT_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size of the serve variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the mutating admission webhook (TLS) and the admin port (plaintext).
    Serve(ServeArgs),
    /// Write a new CA and a serving certificate for the webhook's Service into a directory,
    /// and print the caBundle (base64) for the MutatingWebhookConfiguration.
    Certs(CertsArgs),
    /// Access policies: check what a namespace and ServiceAccount may use.
    Access {
        #[command(subcommand)]
        command: AccessCommand,
    },
    /// Print the AccessPolicy CustomResourceDefinition (YAML), as the chart ships it.
    Crd,
    /// Check the kvinject references in manifests (files, folders or stdin) before they
    /// reach a cluster: syntax, vaults, access policies, opt-in. Exits 1 on any error.
    Lint(LintArgs),
}

#[derive(Args, Debug)]
pub struct LintArgs {
    /// YAML files or folders; `-` or none: stdin (`helm template ... | kvinject lint`).
    pub paths: Vec<String>,
    /// The vaults kvinject serves (`NAME` or `NAME=URL`, as `serve --vault`); none: any.
    #[arg(long = "vault", value_delimiter = ',')]
    pub vaults: Vec<String>,
    /// Files or folders of AccessPolicy objects, besides those among the inputs.
    #[arg(long = "policy")]
    pub policies: Vec<String>,
    /// Namespace of objects that name none.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The namespaces kvinject acts for (the registration's label), as a label selector.
    #[arg(long, default_value = "kvinject.io/injection=enabled")]
    pub namespace_selector: String,
    /// Print the findings as a JSON array.
    #[arg(long = "json")]
    pub output_json: bool,
    /// Also ask Key Vault, with the same credentials as `serve`, whether each secret exists,
    /// is enabled and not expired, and whether a pinned version exists (needs `--vault`).
    #[arg(long)]
    pub check_vault: bool,
    /// DNS suffix of vaults given by name alone.
    #[arg(long, env = "KVINJECT_VAULT_DNS_SUFFIX", default_value = "vault.azure.net")]
    pub vault_dns_suffix: String,
    /// Bound on one Key Vault read.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub keyvault_timeout: Duration,
    #[command(flatten)]
    pub azure: AzureArgs,
}

#[derive(Subcommand, Debug)]
pub enum AccessCommand {
    /// Ask the cluster (kubeconfig) whether a reference is granted, and by which
    /// AccessPolicy. Exits 0 when allowed, 1 when denied, 2 on error.
    Check(AccessCheckArgs),
}

#[derive(Args, Debug)]
pub struct AccessCheckArgs {
    /// The pod's namespace.
    #[arg(long, short = 'n')]
    pub namespace: String,
    /// The pod's ServiceAccount.
    #[arg(long, default_value = crate::access::grant::DEFAULT_SERVICE_ACCOUNT)]
    pub service_account: String,
    /// What the reference is used for.
    #[arg(long = "use", value_enum, default_value = "env")]
    pub use_: crate::access::policy::Use,
    /// The reference, akv://<vault>/<secret>[/<version>][#<field>].
    pub reference: String,
}

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Name of the webhook's Service.
    #[arg(long, default_value = "kvinject")]
    pub service: String,
    /// Namespace of the webhook's Service.
    #[arg(long, default_value = "kvinject")]
    pub namespace: String,
    /// Another DNS name or IP address for the certificate (repeat, or separate with commas).
    #[arg(long = "extra-san", value_delimiter = ',')]
    pub extra_sans: Vec<String>,
    /// Directory that receives ca.crt, tls.crt and tls.key (tls.key with mode 0600).
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Lifetime of the serving certificate.
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    pub validity: Duration,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Address of the webhook's TLS listener.
    #[arg(long, env = "KVINJECT_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Address of the plaintext admin listener (/livez, /readyz, /metrics).
    #[arg(long, env = "KVINJECT_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,
    /// Answer every admission within this time (keep it below the webhook's timeoutSeconds).
    #[arg(long, env = "KVINJECT_ADMISSION_DEADLINE", default_value = "6s", value_parser = parse_duration)]
    pub admission_deadline: Duration,
    /// After SIGTERM: report not ready but keep serving this long (while the Service stops
    /// routing to this replica), then drain for up to 10 s and exit.
    #[arg(long, env = "KVINJECT_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    #[command(flatten)]
    pub tenancy: TenancyArgs,
    #[command(flatten)]
    pub vaults: VaultArgs,
    #[command(flatten)]
    pub azure: AzureArgs,
    #[command(flatten)]
    pub rotation: RotationArgs,
}

/// Who kvinject acts for, and how much one tenant may ask of it.
#[derive(Args, Debug)]
pub struct TenancyArgs {
    /// `required`: a reference that no AccessPolicy grants to the pod's namespace and
    /// ServiceAccount is denied. `off`: no check (every pod in an opted-in namespace may use
    /// every secret of every configured vault; logged as a warning at start).
    #[arg(long, env = "KVINJECT_ACCESS_POLICY", value_enum, default_value = "required")]
    pub access_policy: crate::access::Mode,
    /// The namespaces kvinject acts for, as a label selector (the registration's
    /// namespaceSelector): an AdmissionReview for any other namespace is allowed unchanged.
    #[arg(
        long,
        env = "KVINJECT_NAMESPACE_SELECTOR",
        default_value = "kvinject.io/injection=enabled"
    )]
    pub namespace_selector: String,
    /// Namespaces kvinject never acts for, whatever their labels (comma-separated).
    #[arg(
        long = "exclude-namespace",
        env = "KVINJECT_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,kvinject"
    )]
    pub exclude_namespaces: Vec<String>,
    /// The Secret (in --signing-key-namespace) holding the keys that seal materialized
    /// Secrets; created on first start and shared by the replicas.
    #[arg(
        long,
        env = "KVINJECT_SIGNING_KEY_SECRET",
        default_value = "kvinject-signing-key"
    )]
    pub signing_key_secret: String,
    /// kvinject's own namespace, where the signing key lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kvinject")]
    pub signing_key_namespace: String,
    /// How often each replica reads the signing keys again: a key added verifies within one
    /// interval, and a newly named current key signs after three (every replica has it).
    #[arg(long, env = "KVINJECT_SIGNING_KEY_RELOAD_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub signing_key_reload_interval: Duration,
    /// Floor of `kvinject.io/refresh-interval`: a pod asking for less gets this, with an
    /// admission warning.
    #[arg(long, env = "KVINJECT_MIN_REFRESH_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub min_refresh_interval: Duration,
    /// First-use Key Vault reads per namespace: sustained reads per second (a token bucket).
    #[arg(long, env = "KVINJECT_NAMESPACE_READ_RATE", default_value_t = 5.0)]
    pub namespace_read_rate: f64,
    /// First-use Key Vault reads per namespace: the bucket's size (a burst).
    #[arg(long, env = "KVINJECT_NAMESPACE_READ_BURST", default_value_t = 50)]
    pub namespace_read_burst: u32,
}

#[derive(Args, Debug)]
pub struct RotationArgs {
    /// Run the rotation controller (on the replica holding the Lease).
    #[arg(long, env = "KVINJECT_ROTATION", default_value_t = true, action = clap::ArgAction::Set)]
    pub rotation: bool,
    /// Default interval between version checks of a Secret (pods can ask for less with
    /// the kvinject.io/refresh-interval annotation).
    #[arg(long, env = "KVINJECT_REFRESH_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub refresh_interval: Duration,
    /// Roll workloads that do not say otherwise (kvinject.io/rollout-on-rotation on the
    /// workload or its namespace wins).
    #[arg(long, env = "KVINJECT_ROLLOUT_ON_ROTATION", default_value_t = false, action = clap::ArgAction::Set)]
    pub rollout_on_rotation: bool,
    /// How often every opted-in workload is compared with the versions it uses.
    #[arg(long, env = "KVINJECT_RECONCILE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// Delete a materialized Secret that no pod and no workload template in its namespace
    /// has referred to for this long (`0` never deletes).
    #[arg(long, env = "KVINJECT_GC_GRACE_PERIOD", default_value = "1h", value_parser = parse_duration)]
    pub gc_grace_period: Duration,
    /// On the Lease holder, /livez fails when the rotation controller has not completed a
    /// sweep for this long (a hung call), so the container is restarted and another replica
    /// leads (`0`: never).
    #[arg(long, env = "KVINJECT_ROTATION_STUCK_AFTER", default_value = "10m", value_parser = parse_duration)]
    pub rotation_stuck_after: Duration,
    /// `evict` strategy: how long to wait for each replacement pod to become Ready.
    #[arg(long, env = "KVINJECT_EVICT_READY_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub evict_ready_timeout: Duration,
    /// Rollouts across the cluster: at most this many workloads evicting at once, and at
    /// most this many restarted per sweep (one second); the others wait for the next sweep.
    #[arg(long, env = "KVINJECT_MAX_CONCURRENT_ROLLOUTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_rollouts: u32,
    /// Key Vault reads in flight at once during a rotation sweep, per vault (after a first
    /// read showed the vault answers).
    #[arg(long, env = "KVINJECT_KEYVAULT_CONCURRENCY", default_value_t = 8)]
    pub keyvault_concurrency: usize,
    /// Check a vault's secrets for new versions from its paged listing (25 per request), and
    /// read only what changed; `false`: one read per referenced secret at every check.
    #[arg(long, env = "KVINJECT_LIST_SWEEP", default_value_t = true, action = clap::ArgAction::Set)]
    pub list_sweep: bool,
    /// With the listing: read every referenced secret anyway at least this often (the
    /// listing shows only the current version's attributes).
    #[arg(long, env = "KVINJECT_FULL_REFRESH_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub full_refresh_interval: Duration,
    /// Namespace of the leader-election Lease (kvinject's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kvinject")]
    pub lease_namespace: String,
    #[arg(long, env = "KVINJECT_LEASE_NAME", default_value = "kvinject-rotation")]
    pub lease_name: String,
    /// How long a leader may go without renewing before another replica takes over.
    #[arg(long, env = "KVINJECT_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease (its pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

#[derive(Args, Debug)]
pub struct VaultArgs {
    /// A vault references may name: `NAME` (https://NAME.<dns suffix>/) or `NAME=URL`
    /// (a private endpoint, another cloud, an emulator). Repeat, or separate with commas.
    #[arg(
        long = "vault",
        env = "KVINJECT_VAULTS",
        value_delimiter = ',',
        required = true
    )]
    pub vaults: Vec<String>,
    /// DNS suffix of vaults given by name alone (vault.azure.cn, vault.usgovcloudapi.net, ...).
    #[arg(long, env = "KVINJECT_VAULT_DNS_SUFFIX", default_value = "vault.azure.net")]
    pub vault_dns_suffix: String,
    /// Bound on one Key Vault HTTP attempt.
    #[arg(long, env = "KVINJECT_KEYVAULT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub keyvault_timeout: Duration,
    /// Retries after a failed Key Vault attempt (all within the admission deadline).
    #[arg(long, env = "KVINJECT_KEYVAULT_RETRIES", default_value_t = 1)]
    pub keyvault_retries: u32,
    /// How long a value read from Key Vault is reused for new materializations.
    #[arg(long, env = "KVINJECT_VALUE_CACHE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub value_cache_ttl: Duration,
    /// How often each vault is asked whether it answers (feeds warnings and keyvault_up).
    #[arg(long, env = "KVINJECT_VAULT_PROBE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub vault_probe_interval: Duration,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum CredentialKind {
    /// Workload identity when AZURE_FEDERATED_TOKEN_FILE is set, a client secret when
    /// AZURE_CLIENT_SECRET is set, a managed identity otherwise.
    Auto,
    WorkloadIdentity,
    ManagedIdentity,
    ClientSecret,
}

#[derive(Args, Debug)]
pub struct AzureArgs {
    /// Which Entra ID credential kvinject uses.
    #[arg(long, env = "KVINJECT_AZURE_CREDENTIAL", value_enum, default_value = "auto")]
    pub azure_credential: CredentialKind,
    /// Who reads Key Vault for pods whose ServiceAccount says nothing (its
    /// `kvinject.io/identity` annotation wins): `kvinject` (kvinject's own identity) or
    /// `workload` (the ServiceAccount's federated Azure identity, named by its
    /// `azure.workload.identity/client-id` annotation).
    #[arg(
        long,
        env = "KVINJECT_DEFAULT_IDENTITY",
        value_enum,
        default_value = "kvinject"
    )]
    pub default_identity: crate::identity::Mode,
    /// With `--default-identity workload`: namespaces whose ServiceAccounts may still say
    /// `kvinject.io/identity: kvinject` and read as kvinject's own identity. Elsewhere that
    /// annotation is refused: a tenant may set it, and kvinject's identity reads every vault.
    #[arg(
        long = "own-identity-namespace",
        env = "KVINJECT_OWN_IDENTITY_NAMESPACES",
        value_delimiter = ','
    )]
    pub own_identity_namespaces: Vec<String>,
    /// Tenant of the service principal (client-secret) or workload identity.
    #[arg(long, env = "AZURE_TENANT_ID")]
    pub azure_tenant_id: Option<String>,
    /// Client id of the service principal, workload identity or user-assigned identity.
    #[arg(long, env = "AZURE_CLIENT_ID")]
    pub azure_client_id: Option<String>,
    /// The service principal's secret. Prefer the environment over the command line.
    #[arg(long, env = "AZURE_CLIENT_SECRET", hide_env_values = true)]
    pub azure_client_secret: Option<String>,
    /// Extra PEM CA certificates to trust for Entra ID and Key Vault.
    #[arg(long, env = "KVINJECT_AZURE_CA_BUNDLE")]
    pub azure_ca_bundle: Option<PathBuf>,
    /// Entra ID authority host (sovereign clouds, emulators).
    #[arg(long, env = "AZURE_AUTHORITY_HOST")]
    pub azure_authority_host: Option<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum TlsSource {
    /// Read --tls-cert and --tls-key (a mounted Secret: `kvinject certs`, cert-manager).
    Files,
    /// Keep a CA and serving certificate in --tls-secret, renew them, and set the caBundle
    /// of --webhook-configuration.
    Bootstrap,
}

#[derive(Args, Debug)]
pub struct TlsArgs {
    /// Where the serving certificate comes from.
    #[arg(long, env = "KVINJECT_TLS_SOURCE", value_enum, default_value = "files")]
    pub tls_source: TlsSource,
    /// bootstrap: the Secret (in --tls-namespace) that holds the CA and serving certificate.
    #[arg(long, env = "KVINJECT_TLS_SECRET", default_value = "kvinject-tls")]
    pub tls_secret: String,
    /// bootstrap: kvinject's own namespace (the Service's and the Secret's).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kvinject")]
    pub tls_namespace: String,
    /// bootstrap: the Service the apiserver calls; the certificate covers its DNS names.
    #[arg(long, env = "KVINJECT_TLS_SERVICE", default_value = "kvinject")]
    pub tls_service: String,
    /// bootstrap: more DNS names or IP addresses for the certificate (comma-separated).
    #[arg(
        long = "tls-extra-san",
        env = "KVINJECT_TLS_EXTRA_SANS",
        value_delimiter = ','
    )]
    pub tls_extra_sans: Vec<String>,
    /// bootstrap: the MutatingWebhookConfiguration whose caBundle kvinject keeps current
    /// (empty: leave it alone).
    #[arg(long, env = "KVINJECT_WEBHOOK_CONFIGURATION", default_value = "kvinject")]
    pub webhook_configuration: String,
    /// bootstrap: lifetime of the serving certificate (renewed with a third left).
    #[arg(long, env = "KVINJECT_TLS_SERVING_VALIDITY", default_value = "8760h", value_parser = parse_duration)]
    pub tls_serving_validity: Duration,
    /// bootstrap: lifetime of the CA (renewed with a third left; the old one stays trusted
    /// until it expires).
    #[arg(long, env = "KVINJECT_TLS_CA_VALIDITY", default_value = "87600h", value_parser = parse_duration)]
    pub tls_ca_validity: Duration,
    /// PEM certificate chain of the webhook's serving certificate.
    #[arg(long, env = "KVINJECT_TLS_CERT", default_value = "/etc/kvinject/tls/tls.crt")]
    pub tls_cert: PathBuf,
    /// PEM private key of the webhook's serving certificate.
    #[arg(long, env = "KVINJECT_TLS_KEY", default_value = "/etc/kvinject/tls/tls.key")]
    pub tls_key: PathBuf,
    /// PEM CA certificates: the webhook port then requires a client certificate they
    /// signed (the apiserver's, from its admission kubeconfig; see docs/src/operators/security.md).
    #[arg(long, env = "KVINJECT_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// How often the certificate files (or the bootstrap Secret) are re-read; a changed
    /// pair is swapped in without a restart.
    #[arg(long, env = "KVINJECT_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
}

/// Validated configuration for `kvinject serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub access_policy: crate::access::Mode,
    /// Who reads Key Vault for ServiceAccounts that say nothing, the tenant of workload
    /// identities that name none, and where kvinject's own identity may be asked for.
    pub identity: crate::identity::Settings,
    /// Clients of the webhook port must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
    /// The namespaces kvinject acts for.
    pub scope: crate::scope::Scope,
    /// (namespace, name) of the signing-key Secret.
    pub signing_key: (String, String),
    pub signing_key_reload: Duration,
    pub min_refresh_interval: Duration,
    pub namespace_reads: ReadLimit,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tls: TlsConfig,
    pub tls_reload_interval: Duration,
    pub admission_deadline: Duration,
    pub shutdown_delay: Duration,
    /// Vault name -> URL.
    pub vaults: BTreeMap<String, String>,
    pub azure: AzureConfig,
    /// Bound on one Key Vault read, retries included.
    pub keyvault_budget: Duration,
    pub value_cache_ttl: Duration,
    pub vault_probe_interval: Duration,
    /// `None` when the rotation controller is off.
    pub rotation: Option<RotationSettings>,
}

#[derive(Debug, Clone)]
pub enum TlsConfig {
    Files { cert: PathBuf, key: PathBuf },
    Bootstrap(crate::certs::bootstrap::BootstrapConfig),
}

#[derive(Debug, Clone)]
pub struct RotationSettings {
    pub controller: crate::rotation::RotationConfig,
    pub lease: crate::rotation::lease::LeaseConfig,
    /// /livez fails on the Lease holder after this long without a completed sweep.
    pub stuck_after: Option<Duration>,
}

impl ServeArgs {
    pub fn validate(self) -> anyhow::Result<ServeConfig> {
        let vaults = parse_vaults(&self.vaults.vaults, &self.vaults.vault_dns_suffix)?;
        let azure = AzureConfig {
            credential: credential(
                &self.azure,
                std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some(),
            )?,
            ca_bundle: self.azure.azure_ca_bundle,
            authority_host: self.azure.azure_authority_host,
            attempt_timeout: self.vaults.keyvault_timeout,
            max_retries: self.vaults.keyvault_retries,
        };
        // The whole Key Vault budget, retries included, must fit in one admission.
        let budget = self.vaults.keyvault_timeout * (self.vaults.keyvault_retries + 1)
            + Duration::from_secs(1) * self.vaults.keyvault_retries;
        if budget >= self.admission_deadline {
            bail!(
                "--keyvault-timeout {:?} with {} retries can take {:?}, which does not fit in --admission-deadline {:?}",
                self.vaults.keyvault_timeout,
                self.vaults.keyvault_retries,
                budget,
                self.admission_deadline
            );
        }
        Ok(ServeConfig {
            access_policy: self.tenancy.access_policy,
            identity: crate::identity::Settings {
                default: self.azure.default_identity,
                tenant: self.azure.azure_tenant_id.clone(),
                own_identity_namespaces: self.azure.own_identity_namespaces.iter().cloned().collect(),
            },
            client_ca: self.tls.client_ca.clone(),
            scope: crate::scope::Scope::new(
                &self.tenancy.namespace_selector,
                self.tenancy.exclude_namespaces.clone(),
            )
            .map_err(|e| anyhow::anyhow!("--namespace-selector: {e}"))?,
            signing_key: (
                self.tenancy.signing_key_namespace.clone(),
                self.tenancy.signing_key_secret.clone(),
            ),
            signing_key_reload: {
                let reload = self.tenancy.signing_key_reload_interval;
                if reload.is_zero() || reload > Duration::from_secs(3600) {
                    bail!("--signing-key-reload-interval must be above 0 and at most 1h (got {reload:?})");
                }
                reload
            },
            min_refresh_interval: self.tenancy.min_refresh_interval,
            namespace_reads: ReadLimit::new(
                self.tenancy.namespace_read_rate,
                self.tenancy.namespace_read_burst,
            )?,
            listen: self.listen,
            admin_listen: self.admin_listen,
            tls: self.tls.validate()?,
            tls_reload_interval: self.tls.tls_reload_interval,
            admission_deadline: self.admission_deadline,
            shutdown_delay: self.shutdown_delay,
            vaults,
            azure,
            keyvault_budget: budget,
            value_cache_ttl: self.vaults.value_cache_ttl,
            vault_probe_interval: self.vaults.vault_probe_interval,
            rotation: self.rotation.validate()?,
        })
    }
}

impl TlsArgs {
    fn validate(&self) -> anyhow::Result<TlsConfig> {
        Ok(match self.tls_source {
            TlsSource::Files => TlsConfig::Files {
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
            },
            TlsSource::Bootstrap => {
                let names = crate::certs::SubjectNames::for_service(
                    &self.tls_service,
                    &self.tls_namespace,
                    &self.tls_extra_sans,
                )
                .context("--tls-service, --tls-namespace or --tls-extra-san")?;
                if self.tls_ca_validity < self.tls_serving_validity {
                    bail!(
                        "--tls-ca-validity {:?} is shorter than --tls-serving-validity {:?}",
                        self.tls_ca_validity,
                        self.tls_serving_validity
                    );
                }
                // Renewal starts with a third of the lifetime left; several checks must fit in it.
                if self.tls_serving_validity < Duration::from_secs(30)
                    || self.tls_serving_validity < self.tls_reload_interval * 6
                {
                    bail!(
                        "--tls-serving-validity {:?} is too short; use 30s or more, and at least six --tls-reload-interval ({:?})",
                        self.tls_serving_validity,
                        self.tls_reload_interval
                    );
                }
                TlsConfig::Bootstrap(crate::certs::bootstrap::BootstrapConfig {
                    namespace: self.tls_namespace.clone(),
                    secret: self.tls_secret.clone(),
                    webhook_configuration: Some(self.webhook_configuration.clone()).filter(|n| !n.is_empty()),
                    names,
                    lifetimes: crate::certs::Lifetimes {
                        ca: self.tls_ca_validity,
                        serving: self.tls_serving_validity,
                    },
                    check_interval: self.tls_reload_interval,
                })
            }
        })
    }
}

impl RotationArgs {
    fn validate(self) -> anyhow::Result<Option<RotationSettings>> {
        if !self.rotation {
            return Ok(None);
        }
        if self.lease_duration < Duration::from_secs(2) {
            bail!(
                "--lease-duration {:?} is too short; use 2s or more",
                self.lease_duration
            );
        }
        let identity = match self.identity {
            Some(id) if !id.is_empty() => id,
            _ => std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .map(|h| format!("{h}-{}", std::process::id()))
                .unwrap_or_else(|| format!("kvinject-{}", std::process::id())),
        };
        Ok(Some(RotationSettings {
            controller: crate::rotation::RotationConfig {
                refresh_interval: self.refresh_interval,
                rollout_by_default: self.rollout_on_rotation,
                reconcile_interval: self.reconcile_interval,
                gc_grace: (!self.gc_grace_period.is_zero()).then_some(self.gc_grace_period),
                evict_ready_timeout: self.evict_ready_timeout,
                max_concurrent_rollouts: self.max_concurrent_rollouts as usize,
                keyvault_concurrency: self.keyvault_concurrency,
                list_sweep: self.list_sweep,
                full_refresh_interval: self.full_refresh_interval,
            },
            stuck_after: (!self.rotation_stuck_after.is_zero()).then_some(self.rotation_stuck_after),
            lease: crate::rotation::lease::LeaseConfig {
                namespace: self.lease_namespace,
                name: self.lease_name,
                identity,
                duration: self.lease_duration,
            },
        }))
    }
}

/// `NAME` or `NAME=URL` entries into name -> URL. URLs must be https: the SDK's bearer
/// policy refuses to send a token over http.
pub fn parse_vaults(entries: &[String], dns_suffix: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut vaults = BTreeMap::new();
    for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let (name, url) = match entry.split_once('=') {
            Some((name, url)) => (name.trim(), url.trim().to_owned()),
            None => (
                entry,
                format!("https://{entry}.{}/", dns_suffix.trim_matches('.')),
            ),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("--vault `{entry}`: the name may hold only letters, digits and '-'");
        }
        let parsed =
            reqwest::Url::parse(&url).with_context(|| format!("--vault `{entry}`: `{url}` is not a URL"))?;
        if parsed.scheme() != "https" || parsed.host_str().is_none() {
            bail!(
                "--vault `{entry}`: `{url}` must be an https:// URL (Key Vault tokens are never sent over http)"
            );
        }
        if vaults.insert(name.to_owned(), url).is_some() {
            bail!("--vault `{name}` is given twice");
        }
    }
    if vaults.is_empty() {
        bail!("--vault: configure at least one vault");
    }
    Ok(vaults)
}

pub(crate) fn credential(args: &AzureArgs, federated_token_file: bool) -> anyhow::Result<CredentialConfig> {
    let kind = match args.azure_credential {
        CredentialKind::Auto if federated_token_file => CredentialKind::WorkloadIdentity,
        CredentialKind::Auto if args.azure_client_secret.is_some() => CredentialKind::ClientSecret,
        CredentialKind::Auto => CredentialKind::ManagedIdentity,
        k => k,
    };
    Ok(match kind {
        CredentialKind::WorkloadIdentity => CredentialConfig::WorkloadIdentity,
        CredentialKind::ManagedIdentity => CredentialConfig::ManagedIdentity {
            client_id: args.azure_client_id.clone(),
        },
        _ => CredentialConfig::ClientSecret {
            tenant_id: args
                .azure_tenant_id
                .clone()
                .context("--azure-credential client-secret needs --azure-tenant-id (AZURE_TENANT_ID)")?,
            client_id: args
                .azure_client_id
                .clone()
                .context("--azure-credential client-secret needs --azure-client-id (AZURE_CLIENT_ID)")?,
            secret: args
                .azure_client_secret
                .clone()
                .context("--azure-credential client-secret needs AZURE_CLIENT_SECRET")?
                .into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vaults() {
        let v = |e: &[&str]| {
            parse_vaults(
                &e.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "vault.azure.net",
            )
        };
        let got = v(&["main", "emu=https://kv.example:8443/"]).unwrap();
        assert_eq!(got["main"], "https://main.vault.azure.net/");
        assert_eq!(got["emu"], "https://kv.example:8443/");
        assert_eq!(
            parse_vaults(&["x".into()], ".vault.azure.cn.").unwrap()["x"],
            "https://x.vault.azure.cn/"
        );
        for (bad, want) in [
            (&["a=http://kv.example/"][..], "must be an https:// URL"),
            (&["a.b"][..], "only letters, digits"),
            (&["a", "a=https://x/"][..], "given twice"),
            (&[""][..], "at least one vault"),
            (&["a=not a url"][..], "is not a URL"),
        ] {
            let err = format!("{:#}", v(bad).unwrap_err());
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }

    #[test]
    fn credential_choice() {
        let args = |kind, secret: Option<&str>| AzureArgs {
            azure_credential: kind,
            azure_tenant_id: Some("t".into()),
            azure_client_id: Some("c".into()),
            azure_client_secret: secret.map(Into::into),
            azure_ca_bundle: None,
            azure_authority_host: None,
            default_identity: crate::identity::Mode::Kvinject,
            own_identity_namespaces: Vec::new(),
        };
        assert!(matches!(
            credential(&args(CredentialKind::Auto, None), true).unwrap(),
            CredentialConfig::WorkloadIdentity
        ));
        assert!(matches!(
            credential(&args(CredentialKind::Auto, Some("s")), false).unwrap(),
            CredentialConfig::ClientSecret { .. }
        ));
        assert!(matches!(
            credential(&args(CredentialKind::Auto, None), false).unwrap(),
            CredentialConfig::ManagedIdentity { .. }
        ));
        let err = credential(&args(CredentialKind::ClientSecret, None), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("AZURE_CLIENT_SECRET"), "{err}");
    }

    fn serve(args: &[&str]) -> anyhow::Result<ServeConfig> {
        let mut argv = vec![
            "kvinject",
            "serve",
            "--vault",
            "main",
            "--azure-credential",
            "managed-identity",
        ];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(a) => a.validate(),
            _ => unreachable!("parsed serve"),
        }
    }

    #[test]
    fn tls_sources() {
        assert!(matches!(serve(&[]).unwrap().tls, TlsConfig::Files { .. }));
        let boot = serve(&[
            "--tls-source",
            "bootstrap",
            "--tls-namespace",
            "platform",
            "--tls-extra-san",
            "10.0.0.5,hooks.example.com",
        ])
        .unwrap();
        let TlsConfig::Bootstrap(b) = boot.tls else {
            panic!("not bootstrap")
        };
        assert!(b.names.dns.contains("kvinject.platform.svc") && b.names.dns.contains("hooks.example.com"));
        assert_eq!(b.webhook_configuration.as_deref(), Some("kvinject"));
        for (args, want) in [
            (
                &["--tls-serving-validity", "20s"][..],
                "--tls-serving-validity 20s is too short",
            ),
            (
                &["--tls-serving-validity", "1m", "--tls-reload-interval", "20s"][..],
                "at least six --tls-reload-interval",
            ),
            (
                &["--tls-ca-validity", "1h", "--tls-serving-validity", "2h"][..],
                "shorter than --tls-serving-validity",
            ),
            (
                &["--tls-extra-san", "not a name"][..],
                "`not a name` is neither a DNS name nor an IP address",
            ),
        ] {
            let mut all = vec!["--tls-source", "bootstrap"];
            all.extend_from_slice(args);
            let err = format!("{:#}", serve(&all).unwrap_err());
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_signing_key_reload_interval_is_bounded() {
        assert_eq!(serve(&[]).unwrap().signing_key_reload, Duration::from_secs(30));
        for bad in ["0s", "2h"] {
            let err = format!(
                "{:#}",
                serve(&["--signing-key-reload-interval", bad]).unwrap_err()
            );
            assert!(
                err.contains("--signing-key-reload-interval must be above 0 and at most 1h"),
                "{err}"
            );
        }
    }
}
