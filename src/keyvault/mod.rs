//! Key Vault access: credentials, the HTTP transport (CA bundle, timeouts, retries) and the
//! secret client. Values travel as [`SecretValue`], whose Debug and Display are redacted.

pub mod source;

pub use crate::materialize::value::SecretValue;

use azure_core::{
    cloud::{CloudConfiguration, CustomConfiguration},
    credentials::{Secret, TokenCredential},
    http::{ClientOptions, RetryOptions, Transport},
};
use azure_identity::{
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

/// Which identity kvinject uses towards Entra ID.
#[derive(Clone)]
pub enum CredentialConfig {
    /// Azure workload identity: AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID, AZURE_TENANT_ID.
    WorkloadIdentity,
    /// A system-assigned managed identity, or a user-assigned one by client id.
    ManagedIdentity { client_id: Option<String> },
    /// A service principal with a client secret.
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: Secret,
    },
}

impl fmt::Debug for CredentialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WorkloadIdentity => f.write_str("WorkloadIdentity"),
            Self::ManagedIdentity { client_id } => f
                .debug_struct("ManagedIdentity")
                .field("client_id", client_id)
                .finish(),
            Self::ClientSecret {
                tenant_id, client_id, ..
            } => f
                .debug_struct("ClientSecret")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("secret", &"<redacted>")
                .finish(),
        }
    }
}

/// How kvinject reaches Entra ID and Key Vault.
#[derive(Clone, Debug)]
pub struct AzureConfig {
    pub credential: CredentialConfig,
    /// Extra PEM CA certificates to trust (an emulator, a TLS-inspecting proxy).
    pub ca_bundle: Option<PathBuf>,
    /// Entra ID authority host, for sovereign clouds and emulators.
    pub authority_host: Option<String>,
    /// Bound on one HTTP attempt, connection included.
    pub attempt_timeout: Duration,
    /// Retries after the first attempt; they all fit in the admission budget.
    pub max_retries: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read the CA bundle {path}: {source}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA bundle {path} holds no usable PEM certificate: {source}")]
    ParseCa {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
    #[error("cannot set up the Azure credential ({what}): {source}")]
    Credential {
        what: &'static str,
        #[source]
        source: azure_core::Error,
    },
    #[error("cannot set up a Key Vault client for {url}: {source}")]
    Client {
        url: String,
        #[source]
        source: azure_core::Error,
    },
}

impl AzureConfig {
    fn transport(&self) -> Result<Transport, SetupError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(self.attempt_timeout)
            .timeout(self.attempt_timeout)
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(path) = &self.ca_bundle {
            let pem = std::fs::read(path).map_err(|source| SetupError::ReadCa {
                path: path.clone(),
                source,
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| SetupError::ParseCa {
                    path: path.clone(),
                    source,
                })?;
            builder = builder.tls_certs_merge(certs);
        }
        Ok(Transport::new(Arc::new(
            builder.build().map_err(SetupError::Http)?,
        )))
    }

    /// The options of every Azure call: no SDK retries. kvinject retries itself
    /// (`source::KeyVault`), within the admission budget: the SDK's policy sleeps a 429's
    /// whole Retry-After, however long, and hides each attempt's cause.
    fn client_options(&self, transport: &Transport) -> ClientOptions {
        let mut options = ClientOptions {
            transport: Some(transport.clone()),
            retry: RetryOptions::none(),
            ..Default::default()
        };
        if let Some(host) = &self.authority_host {
            let mut custom = CustomConfiguration::default();
            custom.authority_host = host.clone();
            options.cloud = Some(Arc::new(CloudConfiguration::from(custom)));
        }
        options
    }

    /// Builds the token credential and a factory for per-vault secret clients.
    pub fn connect(&self) -> Result<Connector, SetupError> {
        let transport = self.transport()?;
        let client_options = self.client_options(&transport);
        let credential: Arc<dyn TokenCredential> = match &self.credential {
            CredentialConfig::WorkloadIdentity => {
                let mut o = WorkloadIdentityCredentialOptions::default();
                o.credential_options.client_options = client_options.clone();
                WorkloadIdentityCredential::new(Some(o)).map_err(|source| SetupError::Credential {
                    what: "workload identity",
                    source,
                })?
            }
            CredentialConfig::ManagedIdentity { client_id } => {
                let o = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options: client_options.clone(),
                };
                ManagedIdentityCredential::new(Some(o)).map_err(|source| SetupError::Credential {
                    what: "managed identity",
                    source,
                })?
            }
            CredentialConfig::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => {
                let o = ClientSecretCredentialOptions {
                    client_options: client_options.clone(),
                };
                ClientSecretCredential::new(tenant_id, client_id.clone(), secret.clone(), Some(o)).map_err(
                    |source| SetupError::Credential {
                        what: "client secret",
                        source,
                    },
                )?
            }
        };
        Ok(Connector {
            credential,
            client_options,
            attempts: Attempts {
                timeout: self.attempt_timeout,
                retries: self.max_retries,
            },
        })
    }
}

/// How kvinject tries one Key Vault call: attempts of at most `timeout`, and `retries` more
/// after a failure that may pass (a timeout, a transport error, a 5xx, a 429).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempts {
    pub timeout: Duration,
    pub retries: u32,
}

/// Makes secret clients that share one credential (and its token cache) and one transport.
#[derive(Clone)]
pub struct Connector {
    credential: Arc<dyn TokenCredential>,
    client_options: ClientOptions,
    pub attempts: Attempts,
}

impl Connector {
    pub fn secret_client(&self, vault_url: &str) -> Result<SecretClient, SetupError> {
        self.secret_client_with(vault_url, self.credential.clone())
    }

    /// A secret client that authenticates with `credential` (a workload identity's).
    pub fn secret_client_with(
        &self,
        vault_url: &str,
        credential: Arc<dyn TokenCredential>,
    ) -> Result<SecretClient, SetupError> {
        let options = SecretClientOptions {
            client_options: self.client_options.clone(),
            ..Default::default()
        };
        SecretClient::new(vault_url, credential, Some(options)).map_err(|source| SetupError::Client {
            url: vault_url.to_owned(),
            source,
        })
    }

    /// A credential that exchanges `assertion` (a ServiceAccount token) at Entra ID for
    /// `client_id` in `tenant_id`, through the same transport and authority as kvinject's own.
    pub fn assertion_credential<C: azure_identity::ClientAssertion + 'static>(
        &self,
        tenant_id: &str,
        client_id: &str,
        assertion: C,
    ) -> Result<Arc<dyn TokenCredential>, SetupError> {
        let options = azure_identity::ClientAssertionCredentialOptions {
            client_options: self.client_options.clone(),
        };
        let credential = azure_identity::ClientAssertionCredential::new(
            tenant_id.to_owned(),
            client_id.to_owned(),
            assertion,
            Some(options),
        )
        .map_err(|source| SetupError::Credential {
            what: "workload identity of a ServiceAccount",
            source,
        })?;
        Ok(credential)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_and_credentials_never_print() {
        let v = SecretValue::new("hunter2");
        assert_eq!(format!("{v:?} {v}"), "<redacted> <redacted>");
        let c = CredentialConfig::ClientSecret {
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret: Secret::new("hunter2"),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
