//! Reading one secret from Key Vault, with errors a pod's author can act on.

use super::{Attempts, Connector, SecretValue, SetupError};
use crate::{identity::WorkloadIdentity, reference::Reference};
pub use crate::{materialize::value::Fetched, rotation::listing::Listed};
use async_trait::async_trait;
use azure_core::error::ErrorKind;
use azure_security_keyvault_secrets::{ResourceExt, SecretClient, models::SecretClientGetSecretOptions};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};
use time::OffsetDateTime;

/// Every secret of a vault, by lower-case name (Key Vault names are case-insensitive), and
/// how many pages (requests) the listing took.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub items: HashMap<String, Listed>,
    pub pages: usize,
}

/// Why a secret could not be read. Messages never contain a value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("Key Vault secret {0} was not found")]
    NotFound(String),
    #[error("{who} may not read Key Vault secret {reference} (403 {code})")]
    Forbidden {
        who: String,
        reference: String,
        code: String,
    },
    #[error("Entra ID refused {identity}: {detail}")]
    Refused { identity: String, detail: String },
    #[error("Key Vault secret {0} is disabled")]
    Disabled(String),
    #[error("Key Vault secret {reference} expired at {at}")]
    Expired { reference: String, at: String },
    #[error("Key Vault secret {reference} is not valid before {at}")]
    NotYetValid { reference: String, at: String },
    #[error("Key Vault `{vault}` could not be reached: {detail}")]
    Unreachable { vault: String, detail: String },
    #[error("Key Vault `{vault}` did not answer within {0:?}", .timeout)]
    Timeout { vault: String, timeout: Duration },
    #[error("kvinject could not authenticate to Key Vault `{vault}`: {detail}")]
    Auth { vault: String, detail: String },
    #[error("Key Vault `{vault}` is throttling kvinject (429){}", .retry_after.map(|d| format!("; retry after {d:?}")).unwrap_or_default())]
    Throttled {
        vault: String,
        retry_after: Option<Duration>,
    },
    #[error("Key Vault `{vault}` answered unexpectedly: {detail}")]
    Other { vault: String, detail: String },
}

impl FetchError {
    /// The `result` label of the Key Vault request metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            FetchError::NotFound(_) => "not_found",
            FetchError::Forbidden { .. } => "forbidden",
            FetchError::Refused { .. } => "identity_refused",
            FetchError::Disabled(_) => "disabled",
            FetchError::Expired { .. } => "expired",
            FetchError::NotYetValid { .. } => "not_yet_valid",
            FetchError::Unreachable { .. } => "unreachable",
            FetchError::Timeout { .. } => "timeout",
            FetchError::Auth { .. } => "auth",
            FetchError::Throttled { .. } => "throttled",
            FetchError::Other { .. } => "error",
        }
    }

    /// How long Key Vault asked kvinject to wait, when it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True for a failure that may pass by itself, so that another attempt may succeed.
    pub fn may_pass(&self) -> bool {
        matches!(
            self,
            FetchError::Unreachable { .. } | FetchError::Timeout { .. } | FetchError::Throttled { .. }
        )
    }

    /// True when the vault itself could not be used, as opposed to an answer about the secret.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            FetchError::Unreachable { .. }
                | FetchError::Timeout { .. }
                | FetchError::Auth { .. }
                | FetchError::Throttled { .. }
        )
    }
}

/// Where values come from: Key Vault in production.
#[async_trait]
pub trait SecretSource: Send + Sync {
    /// Reads `reference` as `identity` (a ServiceAccount's), or as kvinject.
    async fn fetch(
        &self,
        reference: &Reference,
        identity: Option<&WorkloadIdentity>,
    ) -> Result<Fetched, FetchError>;
    /// A cheap call that tells whether `vault` answers at all.
    async fn probe(&self, vault: &str) -> Result<(), FetchError>;
    /// Lists `vault`'s secrets (attributes only), as kvinject's identity, every page.
    async fn list(&self, vault: &str) -> Result<Listing, FetchError> {
        Err(FetchError::Other {
            vault: vault.to_owned(),
            detail: "this source cannot list a vault".into(),
        })
    }
}

/// Key Vault through the Azure SDK, one client per configured vault, and per workload
/// identity once one reads.
pub struct KeyVault {
    clients: BTreeMap<String, SecretClient>,
    /// The whole budget of one read, retries included.
    timeout: Duration,
    attempts: Attempts,
    urls: BTreeMap<String, String>,
    connector: Connector,
    /// Mints ServiceAccount tokens for workload identities; `None`: none may be used.
    kube: Option<kube::Client>,
    /// Each identity's clients, sharing its credential (and token cache).
    per_identity: Mutex<HashMap<WorkloadIdentity, Arc<BTreeMap<String, SecretClient>>>>,
}

impl KeyVault {
    /// `vaults` maps each vault name used in references to its URL.
    pub fn new(
        connector: &Connector,
        vaults: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<Arc<Self>, SetupError> {
        Self::build(connector, vaults, timeout, None).map(Arc::new)
    }

    /// Like `new`, and able to read as workload identities: ServiceAccount tokens come from
    /// `kube` (TokenRequest).
    pub fn with_workload_identities(
        connector: &Connector,
        vaults: &BTreeMap<String, String>,
        timeout: Duration,
        kube: kube::Client,
    ) -> Result<Arc<Self>, SetupError> {
        Self::build(connector, vaults, timeout, Some(kube)).map(Arc::new)
    }

    fn build(
        connector: &Connector,
        vaults: &BTreeMap<String, String>,
        timeout: Duration,
        kube: Option<kube::Client>,
    ) -> Result<Self, SetupError> {
        let clients = vaults
            .iter()
            .map(|(name, url)| Ok((name.clone(), connector.secret_client(url)?)))
            .collect::<Result<_, SetupError>>()?;
        Ok(Self {
            clients,
            timeout,
            attempts: connector.attempts,
            urls: vaults.clone(),
            connector: connector.clone(),
            kube,
            per_identity: Mutex::new(HashMap::new()),
        })
    }

    /// The clients of `identity`, made on first use.
    fn identity_clients(
        &self,
        identity: &WorkloadIdentity,
    ) -> Result<Arc<BTreeMap<String, SecretClient>>, FetchError> {
        let refused = |detail: String| FetchError::Refused {
            identity: identity.to_string(),
            detail,
        };
        if let Some(c) = self
            .per_identity
            .lock()
            .ok()
            .and_then(|m| m.get(identity).cloned())
        {
            return Ok(c);
        }
        let Some(kube) = &self.kube else {
            return Err(refused(
                "kvinject is not set up to read as workload identities".into(),
            ));
        };
        let assertion = ServiceAccountToken {
            kube: kube.clone(),
            namespace: identity.namespace.clone(),
            name: identity.service_account.clone(),
        };
        let credential = self
            .connector
            .assertion_credential(&identity.tenant_id, &identity.client_id, assertion)
            .map_err(|e| refused(e.to_string()))?;
        let clients = self
            .urls
            .iter()
            .map(|(name, url)| {
                Ok((
                    name.clone(),
                    self.connector.secret_client_with(url, credential.clone())?,
                ))
            })
            .collect::<Result<BTreeMap<_, _>, SetupError>>()
            .map_err(|e| refused(e.to_string()))?;
        let clients = Arc::new(clients);
        if let Ok(mut m) = self.per_identity.lock() {
            m.insert(identity.clone(), clients.clone());
        }
        Ok(clients)
    }

    fn client(&self, vault: &str) -> Result<&SecretClient, FetchError> {
        self.clients.get(vault).ok_or_else(|| FetchError::Other {
            vault: vault.to_owned(),
            detail: "no client for this vault".into(),
        })
    }
}

/// A client assertion that is a fresh token of a ServiceAccount for Entra ID's audience,
/// minted through the TokenRequest API (10 minutes): what kubelet would project.
#[derive(Clone)]
struct ServiceAccountToken {
    kube: kube::Client,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for ServiceAccountToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServiceAccountToken({}/{})", self.namespace, self.name)
    }
}

#[async_trait]
impl azure_identity::ClientAssertion for ServiceAccountToken {
    async fn secret(
        &self,
        _: Option<azure_core::http::ClientMethodOptions<'_>>,
    ) -> azure_core::Result<String> {
        use k8s_openapi::api::{
            authentication::v1::{TokenRequest, TokenRequestSpec},
            core::v1::ServiceAccount,
        };
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![crate::identity::TOKEN_AUDIENCE.to_owned()],
                expiration_seconds: Some(600),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: kube::Api<ServiceAccount> = kube::Api::namespaced(self.kube.clone(), &self.namespace);
        let answer = api
            .create_token_request(&self.name, &Default::default(), &request)
            .await
            .map_err(|e| {
                azure_core::Error::with_message(
                    ErrorKind::Credential,
                    format!(
                        "requesting a token of ServiceAccount {}/{}: {e}",
                        self.namespace, self.name
                    ),
                )
            })?;
        answer.status.map(|s| s.token).ok_or_else(|| {
            azure_core::Error::with_message(ErrorKind::Credential, "the TokenRequest answer carries no token")
        })
    }
}

#[async_trait]
impl SecretSource for KeyVault {
    async fn fetch(
        &self,
        reference: &Reference,
        identity: Option<&WorkloadIdentity>,
    ) -> Result<Fetched, FetchError> {
        let clients = identity.map(|i| self.identity_clients(i)).transpose()?;
        let client = match &clients {
            Some(c) => c.get(&reference.vault).ok_or_else(|| FetchError::Other {
                vault: reference.vault.clone(),
                detail: "no client for this vault".into(),
            })?,
            None => self.client(&reference.vault)?,
        };
        let options = SecretClientGetSecretOptions {
            secret_version: reference.version.clone(),
            ..Default::default()
        };
        let what = reference.to_string();
        let secret = self
            .attempt(&reference.vault, &what, || async {
                let response = client.get_secret(&reference.name, Some(options.clone())).await?;
                response.into_model()
            })
            .await
            .map_err(|e| as_reader(e, identity))?;
        let r = reference.to_string();
        if let Some(attrs) = &secret.attributes {
            let now = OffsetDateTime::now_utc();
            if attrs.enabled == Some(false) {
                return Err(FetchError::Disabled(r));
            }
            if let Some(exp) = attrs.expires.filter(|exp| *exp <= now) {
                return Err(FetchError::Expired {
                    reference: r,
                    at: exp.to_string(),
                });
            }
            if let Some(nbf) = attrs.not_before.filter(|nbf| *nbf > now) {
                return Err(FetchError::NotYetValid {
                    reference: r,
                    at: nbf.to_string(),
                });
            }
        }
        let version = secret
            .resource_id()
            .ok()
            .and_then(|id| id.version)
            .ok_or_else(|| FetchError::Other {
                vault: reference.vault.clone(),
                detail: format!("the answer for {r} carries no version id"),
            })?;
        let value = secret.value.ok_or_else(|| FetchError::Other {
            vault: reference.vault.clone(),
            detail: format!("the answer for {r} carries no value"),
        })?;
        Ok(Fetched {
            value: SecretValue::new(value),
            version,
        })
    }

    async fn probe(&self, vault: &str) -> Result<(), FetchError> {
        use futures::TryStreamExt;
        let client = self.client(vault)?;
        let listed = self
            .attempt(vault, "(listing)", || async {
                let mut pages = client.list_secret_properties(None)?.into_pages();
                pages.try_next().await.map(|_| ())
            })
            .await;
        match listed {
            // an answer, even a refusal, means the vault is there
            Err(FetchError::Forbidden { .. } | FetchError::NotFound(_)) => Ok(()),
            other => other,
        }
    }

    async fn list(&self, vault: &str) -> Result<Listing, FetchError> {
        self.list_pages(vault).await
    }
}

impl KeyVault {
    /// Every page of `vault`'s listing, each page bounded by the attempt timeout. One failed
    /// page fails the listing (the caller reads secret by secret instead).
    async fn list_pages(&self, vault: &str) -> Result<Listing, FetchError> {
        use futures::TryStreamExt;
        let client = self.client(vault)?;
        let failed = |e: azure_core::Error| classify(vault, "(listing)", &e);
        let mut pages = client.list_secret_properties(None).map_err(failed)?.into_pages();
        let mut listing = Listing::default();
        loop {
            let page = match tokio::time::timeout(self.attempts.timeout, pages.try_next()).await {
                Err(_) => {
                    return Err(FetchError::Timeout {
                        vault: vault.to_owned(),
                        timeout: self.attempts.timeout,
                    });
                }
                Ok(Err(e)) => return Err(failed(e)),
                Ok(Ok(None)) => return Ok(listing),
                Ok(Ok(Some(page))) => page.into_model().map_err(failed)?,
            };
            listing.pages += 1;
            for item in page.value {
                let Ok(id) = item.resource_id() else { continue };
                let a = item.attributes.unwrap_or_default();
                listing.items.insert(
                    id.name.to_ascii_lowercase(),
                    Listed {
                        updated: a.updated.map(OffsetDateTime::unix_timestamp),
                        enabled: a.enabled.unwrap_or(true),
                        expires: a.expires.map(OffsetDateTime::unix_timestamp),
                    },
                );
            }
        }
    }

    async fn attempt<T, F, Fut>(&self, vault: &str, what: &str, call: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = azure_core::Result<T>>,
    {
        attempt(self.attempts, self.timeout, vault, what, call).await
    }
}

/// Runs `call` in attempts of at most `attempts.timeout` each, and tries again after a
/// failure that may pass, as long as the next attempt fits in `budget`. A 429's Retry-After
/// is waited for only when it fits; otherwise the throttling is the answer.
async fn attempt<T, F, Fut>(
    attempts: Attempts,
    budget: Duration,
    vault: &str,
    what: &str,
    mut call: F,
) -> Result<T, FetchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = azure_core::Result<T>>,
{
    let started = tokio::time::Instant::now();
    let mut retry = 0;
    loop {
        let timeout = || FetchError::Timeout {
            vault: vault.to_owned(),
            timeout: attempts.timeout,
        };
        let (failed, may_pass) = match tokio::time::timeout(attempts.timeout, call()).await {
            Ok(Ok(answer)) => return Ok(answer),
            // The HTTP client's own bound on the attempt may fire first: still a timeout.
            Ok(Err(e)) if timed_out(&e) => (timeout(), true),
            Ok(Err(e)) => {
                let failed = classify(vault, what, &e);
                // Entra ID down for a moment is worth another try; a refusal is not.
                let may_pass =
                    failed.may_pass() || (matches!(failed, FetchError::Auth { .. }) && transient(&e));
                (failed, may_pass)
            }
            Err(_) => (timeout(), true),
        };
        if retry >= attempts.retries || !may_pass {
            return Err(failed);
        }
        let wait = failed.retry_after().unwrap_or_else(|| backoff(retry));
        if started.elapsed() + wait + attempts.timeout > budget {
            return Err(failed);
        }
        tokio::time::sleep(wait).await;
        retry += 1;
    }
}

/// Whether a transport error is the HTTP client giving up on a silent peer.
fn timed_out(e: &azure_core::Error) -> bool {
    matches!(e.kind(), ErrorKind::Io | ErrorKind::Connection)
        && chain(e).any(|error| {
            error
                .downcast_ref::<reqwest::Error>()
                .is_some_and(reqwest::Error::is_timeout)
                || error
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        })
}

/// Whether an error has a transport failure, a 5xx or a 429 anywhere in its chain (under a
/// credential error: Entra ID's token endpoint was unreachable or failing, not refusing).
fn transient(e: &azure_core::Error) -> bool {
    chain(e).any(|error| {
        let status = match error
            .downcast_ref::<azure_core::Error>()
            .map(azure_core::Error::kind)
        {
            Some(ErrorKind::Io | ErrorKind::Connection) => return true,
            Some(ErrorKind::HttpResponse { status, .. }) => u16::from(*status),
            _ => 0,
        };
        status >= 500 || status == 429 || error.downcast_ref::<reqwest::Error>().is_some()
    })
}

/// The pause before retry `n` (from 0): 200 ms, doubling, at most 1 s.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << n.min(3))).min(Duration::from_secs(1))
}

/// The SDK's words that say nothing about what failed.
const SDK_NOISE: [&str; 3] = [
    "non-transport error occurred which will not be retried",
    "retry policy expired and the request will no longer be retried",
    "error converting `reqwest` request into a byte stream",
];

/// The messages of an error and its sources, each once, on one line (admission warnings
/// must not hold control characters), without the SDK's boilerplate and troubleshooting
/// links. An HTTP status met on the way (Entra ID's, under a credential error) is named.
fn messages(e: &azure_core::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for error in chain(e) {
        if let Some(ErrorKind::HttpResponse { status, .. }) = error
            .downcast_ref::<azure_core::Error>()
            .map(azure_core::Error::kind)
        {
            let status = format!("HTTP {}", u16::from(*status));
            if !parts.contains(&status) {
                parts.push(status);
            }
        }
        let mut text = error.to_string();
        if let Some(at) = text.find("To troubleshoot, visit") {
            text.truncate(at);
        }
        for noise in SDK_NOISE {
            text = text.replace(noise, " ");
        }
        let text = one_line(&text);
        let text = text.trim_matches(|c: char| c == ':' || c == '.' || c.is_whitespace());
        if !text.is_empty() && !parts.iter().any(|p| p.contains(text)) {
            parts.push(text.to_owned());
        }
    }
    parts.join(": ")
}

/// An error and its sources, outermost first.
fn chain(e: &azure_core::Error) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |e| e.source())
}

/// `text` with control characters replaced and runs of whitespace collapsed.
pub fn one_line(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Names who was refused: a workload identity's refusals (by Entra ID, or Key Vault's 401
/// and 403) concern that identity alone, never the vault as a whole.
fn as_reader(e: FetchError, identity: Option<&WorkloadIdentity>) -> FetchError {
    let Some(identity) = identity else { return e };
    match e {
        FetchError::Forbidden { reference, code, .. } => FetchError::Forbidden {
            who: identity.to_string(),
            reference,
            code,
        },
        FetchError::Auth { detail, .. } => FetchError::Refused {
            identity: identity.to_string(),
            detail,
        },
        other => other,
    }
}

/// Maps an SDK error to what happened. Only status, error code and the SDK's own message
/// are used: a response body is never copied into the error.
fn classify(vault: &str, reference: &str, e: &azure_core::Error) -> FetchError {
    let vault = vault.to_owned();
    match e.kind() {
        ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            let code = error_code.clone().unwrap_or_default();
            let body_says_disabled = raw_response
                .as_ref()
                .map(|r| String::from_utf8_lossy(r.body()).contains("SecretDisabled"))
                .unwrap_or(false);
            match u16::from(*status) {
                404 => FetchError::NotFound(reference.to_owned()),
                403 if body_says_disabled => FetchError::Disabled(reference.to_owned()),
                403 => FetchError::Forbidden {
                    who: "kvinject's identity".to_owned(),
                    reference: reference.to_owned(),
                    code,
                },
                401 => FetchError::Auth {
                    vault,
                    detail: format!("401 {code}"),
                },
                429 => FetchError::Throttled {
                    vault,
                    retry_after: raw_response
                        .as_ref()
                        .and_then(|r| {
                            r.headers()
                                .get_optional_str(&azure_core::http::headers::RETRY_AFTER)
                        })
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs),
                },
                s if s >= 500 => FetchError::Unreachable {
                    vault,
                    detail: format!("HTTP {s} {code}"),
                },
                s => FetchError::Other {
                    vault,
                    detail: format!("HTTP {s} {code}"),
                },
            }
        }
        ErrorKind::Connection | ErrorKind::Io => FetchError::Unreachable {
            vault,
            detail: messages(e),
        },
        // The SDK wraps Entra ID's answer (an AADSTS code and its description, never a
        // secret) in layers: keep every layer's message.
        ErrorKind::Credential => FetchError::Auth {
            vault,
            detail: messages(e),
        },
        _ => FetchError::Other {
            vault,
            detail: messages(e),
        },
    }
}

#[cfg(test)]
mod tests {
    //! Classification of SDK errors. Key Vault's 429, 5xx and disabled answers are built
    //! here as the SDK reports them: the test bed's vault does not throttle.
    use super::*;
    use azure_core::http::{
        RawResponse, StatusCode,
        headers::{Headers, RETRY_AFTER},
    };

    fn http_error(status: u16, headers: Headers, body: &str) -> azure_core::Error {
        let status = StatusCode::from(status);
        let raw = RawResponse::from_bytes(status, headers, body.to_owned());
        azure_core::Error::with_message(
            ErrorKind::HttpResponse {
                status,
                error_code: Some("Code".into()),
                raw_response: Some(Box::new(raw)),
            },
            "failed",
        )
    }

    const ATTEMPTS: Attempts = Attempts {
        timeout: Duration::from_secs(1),
        retries: 1,
    };
    const BUDGET: Duration = Duration::from_secs(3);

    /// Runs the retry loop on answers given in turn (a double of the SDK call: the loop's
    /// arithmetic, in paused time; the bed checks the same faults end to end, tests/e2e/faults.rs).
    async fn attempts_on(
        answers: Vec<Option<azure_core::Error>>,
    ) -> (Result<(), FetchError>, usize, Duration) {
        let answers = std::sync::Mutex::new(answers.into_iter());
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let result = attempt(ATTEMPTS, BUDGET, "v", "akv://v/s", || {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let next = answers.lock().unwrap().next();
            async move {
                match next {
                    Some(Some(e)) => Err(e),
                    Some(None) => Ok(()),
                    None => std::future::pending().await, // hangs: a vault that never answers
                }
            }
        })
        .await;
        (result, calls.into_inner(), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_read_waits_for_retry_after_only_when_it_fits() {
        let throttled = |secs: &str| {
            let mut h = Headers::new();
            h.insert(RETRY_AFTER, secs.to_owned());
            Some(http_error(429, h, "{}"))
        };
        // Retry-After 7 s does not fit in 3 s: the throttling is the answer, at once.
        let (result, calls, took) = attempts_on(vec![throttled("7"), None]).await;
        assert_eq!(result.unwrap_err().metric_label(), "throttled");
        assert_eq!((calls, took), (1, Duration::ZERO));
        // Retry-After 1 s fits: one wait of 1 s, then the read.
        let (result, calls, took) = attempts_on(vec![throttled("1"), None]).await;
        assert!(result.is_ok());
        assert_eq!((calls, took), (2, Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_vault_that_does_not_answer_is_named_as_a_timeout_within_the_budget() {
        let (result, calls, took) = attempts_on(vec![]).await;
        let e = result.unwrap_err();
        assert_eq!(e.to_string(), "Key Vault `v` did not answer within 1s");
        assert_eq!(calls, 2);
        assert!(took <= BUDGET, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn answers_about_the_secret_are_not_retried_and_outages_are() {
        let (result, calls, _) = attempts_on(vec![Some(http_error(404, Headers::new(), "{}"))]).await;
        assert_eq!((result.unwrap_err().metric_label(), calls), ("not_found", 1));
        let (result, calls, _) = attempts_on(vec![Some(http_error(503, Headers::new(), "{}")), None]).await;
        assert!(result.is_ok());
        assert_eq!(calls, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn entra_id_failing_for_a_moment_is_tried_again_and_a_refusal_is_not() {
        let auth = |inner: azure_core::Error| {
            Some(azure_core::Error::with_error(
                ErrorKind::Credential,
                inner,
                "ClientSecretCredential authentication failed",
            ))
        };
        let reset = azure_core::Error::with_message(ErrorKind::Io, "connection reset");
        let (result, calls, _) = attempts_on(vec![auth(reset), None]).await;
        assert!(result.is_ok());
        assert_eq!(calls, 2);
        let refused = http_error(401, Headers::new(), r#"{"error":"invalid_client"}"#);
        let (result, calls, _) = attempts_on(vec![auth(refused), None]).await;
        assert_eq!((result.unwrap_err().metric_label(), calls), ("auth", 1));
    }

    #[test]
    fn error_details_are_one_line_without_the_sdk_boilerplate() {
        let inner = azure_core::Error::with_message(
            ErrorKind::HttpResponse {
                status: StatusCode::from(500),
                error_code: None,
                raw_response: None,
            },
            "AADSTS90033: A transient error has occurred.",
        );
        let e = azure_core::Error::with_error(
            ErrorKind::Credential,
            inner,
            "ClientSecretCredential authentication failed. retry policy expired and the request will no longer be retried\nTo troubleshoot, visit https://aka.ms/azsdk/rust/identity/troubleshoot#client-secret",
        );
        let wrapped = azure_core::Error::with_error(
            ErrorKind::Credential,
            e,
            "non-transport error occurred which will not be retried",
        );
        let text = messages(&wrapped);
        assert_eq!(
            text,
            "ClientSecretCredential authentication failed: HTTP 500: AADSTS90033: A transient error has occurred"
        );
        assert_eq!(one_line("a\n\tb  c\r"), "a b c");
    }

    #[test]
    fn classifies_what_key_vault_answers() {
        let mut retry = Headers::new();
        retry.insert(RETRY_AFTER, "7");
        let cases = [
            (http_error(404, Headers::new(), "{}"), "not_found"),
            (
                http_error(
                    403,
                    Headers::new(),
                    r#"{"error":{"code":"Forbidden","innererror":{"code":"SecretDisabled"}}}"#,
                ),
                "disabled",
            ),
            (
                http_error(403, Headers::new(), r#"{"error":{"code":"Forbidden"}}"#),
                "forbidden",
            ),
            (http_error(401, Headers::new(), "{}"), "auth"),
            (http_error(503, Headers::new(), "{}"), "unreachable"),
            (http_error(429, retry, "{}"), "throttled"),
            (
                azure_core::Error::with_message(ErrorKind::Connection, "refused"),
                "unreachable",
            ),
        ];
        for (error, want) in cases {
            assert_eq!(classify("v", "akv://v/s", &error).metric_label(), want, "{error}");
        }
        let mut retry = Headers::new();
        retry.insert(RETRY_AFTER, "7");
        let throttled = classify("v", "akv://v/s", &http_error(429, retry, "{}"));
        assert_eq!(throttled.retry_after(), Some(Duration::from_secs(7)));
        assert!(throttled.is_outage());
        assert_eq!(
            throttled.to_string(),
            "Key Vault `v` is throttling kvinject (429); retry after 7s"
        );
    }
}
