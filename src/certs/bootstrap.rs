//! Self-bootstrapped webhook TLS: the CA and serving certificate live in one Secret in
//! kvinject's namespace, and the MutatingWebhookConfiguration's caBundle is kept equal to
//! its CA bundle. Every replica runs this; they agree through the apiserver:
//! - creating the Secret is first-writer-wins (409 -> read the winner's),
//! - replacing it carries the resourceVersion (409 -> read again),
//! - a replica swaps in a certificate only after the caBundle trusts its CA.

use super::{CertError, Lifetimes, Material, Plan, SubjectNames, plan};
use crate::{materialize::FIELD_MANAGER, metrics::Metrics};
use axum_server::tls_rustls::RustlsConfig;
use base64::Engine;
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Marks the Secret as kvinject's own; a Secret of that name without it is never touched.
pub const TLS_LABEL: &str = "kvinject.io/webhook-tls";

#[derive(Clone, Debug)]
pub struct BootstrapConfig {
    pub namespace: String,
    pub secret: String,
    /// The MutatingWebhookConfiguration whose caBundle follows the Secret (None: leave it).
    pub webhook_configuration: Option<String>,
    pub names: SubjectNames,
    pub lifetimes: Lifetimes,
    pub check_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "Secret {namespace}/{name} exists but was not created by kvinject (no {TLS_LABEL} label); delete it or choose another --tls-secret"
    )]
    Foreign { namespace: String, name: String },
    #[error("Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} kept changing under us; giving up for now")]
    Contended { namespace: String, name: String },
    #[error("MutatingWebhookConfiguration {name}: {source}")]
    Webhook {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Cert(#[from] CertError),
}

pub struct Bootstrap {
    config: BootstrapConfig,
    secrets: Api<Secret>,
    webhooks: Api<MutatingWebhookConfiguration>,
    /// The configuration was missing at the last check (and that was logged).
    missing: AtomicBool,
}

fn material(secret: &Secret) -> Material {
    let get = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    Material {
        ca_bundle: get("ca.crt"),
        ca_key: get("ca.key"),
        cert: get("tls.crt"),
        key: get("tls.key"),
    }
}

fn to_secret(config: &BootstrapConfig, m: &Material, resource_version: Option<String>) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(config.secret.clone());
    s.metadata.namespace = Some(config.namespace.clone());
    s.metadata.resource_version = resource_version;
    s.metadata.labels = Some(
        [
            (TLS_LABEL.to_owned(), "true".to_owned()),
            ("app.kubernetes.io/name".to_owned(), "kvinject".to_owned()),
        ]
        .into(),
    );
    s.type_ = Some("kubernetes.io/tls".into());
    s.data = Some(
        [
            ("ca.crt", &m.ca_bundle),
            ("ca.key", &m.ca_key),
            ("tls.crt", &m.cert),
            ("tls.key", &m.key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
        .collect(),
    );
    s
}

/// Whether the caBundle now trusts the CA, or there is nothing to publish to.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    Unchanged,
    Patched(usize),
    NoConfiguration,
}

impl Bootstrap {
    pub fn new(client: Client, config: BootstrapConfig) -> Self {
        Bootstrap {
            secrets: Api::namespaced(client.clone(), &config.namespace),
            webhooks: Api::all(client),
            config,
            missing: AtomicBool::new(false),
        }
    }

    fn api_err(&self, source: kube::Error) -> BootstrapError {
        BootstrapError::Api {
            namespace: self.config.namespace.clone(),
            name: self.config.secret.clone(),
            source,
        }
    }

    /// Returns usable certificates from the Secret, creating or renewing them as needed.
    pub async fn ensure_secret(&self, now: OffsetDateTime) -> Result<Material, BootstrapError> {
        for _ in 0..5 {
            let current = self
                .secrets
                .get_opt(&self.config.secret)
                .await
                .map_err(|e| self.api_err(e))?;
            if let Some(s) = &current
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(TLS_LABEL))
                    .is_none()
            {
                return Err(BootstrapError::Foreign {
                    namespace: self.config.namespace.clone(),
                    name: self.config.secret.clone(),
                });
            }
            let existing = current.as_ref().map(material);
            let (new, reason) = match plan(existing.as_ref(), &self.config.names, now, self.config.lifetimes)?
            {
                // plan() keeps only what exists
                Plan::Keep => return existing.ok_or_else(|| self.contended()),
                Plan::Replace(m, r) => (m, r),
            };
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..Default::default()
            };
            let written = match current {
                None => {
                    self.secrets
                        .create(&params, &to_secret(&self.config, &new, None))
                        .await
                }
                Some(s) => {
                    self.secrets
                        .replace(
                            &self.config.secret,
                            &params,
                            &to_secret(&self.config, &new, s.metadata.resource_version),
                        )
                        .await
                }
            };
            match written {
                Ok(_) => {
                    info!(secret = %self.config.secret, namespace = %self.config.namespace, %reason, "wrote new webhook certificates");
                    return Ok(new);
                }
                // Another replica wrote first: use what it wrote.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(self.api_err(e)),
            }
        }
        Err(self.contended())
    }

    fn contended(&self) -> BootstrapError {
        BootstrapError::Contended {
            namespace: self.config.namespace.clone(),
            name: self.config.secret.clone(),
        }
    }

    /// Makes every webhook of the configuration trust `bundle`. Each replaced entry is
    /// guarded by a `test` of its name, so a concurrent edit fails instead of landing on
    /// the wrong webhook.
    pub async fn publish_ca(&self, bundle: &str) -> Result<Published, BootstrapError> {
        let Some(name) = &self.config.webhook_configuration else {
            return Ok(Published::NoConfiguration);
        };
        let err = |source| BootstrapError::Webhook {
            name: name.clone(),
            source,
        };
        let Some(current) = self.webhooks.get_opt(name).await.map_err(err)? else {
            return Ok(Published::NoConfiguration);
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(bundle);
        let mut ops = Vec::new();
        for (i, w) in current.webhooks.iter().flatten().enumerate() {
            if w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(bundle.as_bytes()) {
                ops.push(
                    serde_json::json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": w.name}),
                );
                ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
            }
        }
        if ops.is_empty() {
            return Ok(Published::Unchanged);
        }
        let patched = ops.len() / 2;
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
            .map_err(|e| err(kube::Error::SerdeError(e)))?;
        self.webhooks
            .patch(
                name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..Default::default()
                },
                &Patch::Json::<()>(patch),
            )
            .await
            .map_err(err)?;
        Ok(Published::Patched(patched))
    }

    /// One round: ensure the Secret, publish its CA, and return the pair to serve. Errors
    /// in publishing keep the caller on its current pair.
    async fn round(&self, now: OffsetDateTime) -> Result<Material, BootstrapError> {
        let m = self.ensure_secret(now).await?;
        let published = self.publish_ca(&m.ca_bundle).await?;
        let missing = published == Published::NoConfiguration && self.config.webhook_configuration.is_some();
        // Said once, not every check, until the configuration shows up.
        if missing && !self.missing.swap(true, Ordering::Relaxed) {
            warn!(configuration = ?self.config.webhook_configuration, "the MutatingWebhookConfiguration does not exist yet; its caBundle will be set once it does");
        }
        if !missing {
            self.missing.store(false, Ordering::Relaxed);
        }
        if let Published::Patched(n) = published {
            info!(webhooks = n, configuration = ?self.config.webhook_configuration, "published the webhook CA bundle");
        }
        Ok(m)
    }

    /// The first round, at start: failing here fails the process (and its readiness).
    pub async fn start(
        self,
        metrics: &Metrics,
        server: crate::webhook::tls::ServerTls,
    ) -> Result<(RustlsConfig, Running), BootstrapError> {
        let m = self.round(OffsetDateTime::now_utc()).await?;
        let tls = server
            .load(m.cert.as_bytes(), m.key.as_bytes())
            .map_err(|_| CertError::BadCert {
                what: "the bootstrapped serving certificate",
            })?;
        metrics.serving_certificate(&m.cert);
        Ok((
            tls.clone(),
            Running {
                bootstrap: self,
                tls,
                serving: m,
                server,
            },
        ))
    }
}

/// The certificates being served, kept in step with the Secret.
pub struct Running {
    bootstrap: Bootstrap,
    tls: RustlsConfig,
    serving: Material,
    server: crate::webhook::tls::ServerTls,
}

impl Running {
    pub async fn run(mut self, metrics: Metrics, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.bootstrap.config.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let m = match self.bootstrap.round(OffsetDateTime::now_utc()).await {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "keeping the current webhook certificate");
                    continue;
                }
            };
            if m.cert == self.serving.cert && m.key == self.serving.key {
                continue;
            }
            match self.server.reload(&self.tls, m.cert.as_bytes(), m.key.as_bytes()) {
                Ok(()) => {
                    info!("serving the renewed webhook certificate");
                    metrics.serving_certificate(&m.cert);
                    self.serving = m;
                }
                Err(_) => warn!("the renewed webhook certificate does not load; keeping the current one"),
            }
        }
    }
}
