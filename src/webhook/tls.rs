//! Serving certificate loading and hot reload. Files are re-read on a timer and compared by
//! hash: inotify on single files misses Kubernetes' `..data` symlink swap. A new pair is
//! swapped in only when both parse; on error the old configuration stays.

use crate::metrics::Metrics;
use axum_server::tls_rustls::RustlsConfig;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use sha2::{Digest, Sha256};
use std::{io, path::PathBuf, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate {cert} and key {key} do not form a usable TLS configuration: {source}")]
    Invalid {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--client-ca {path}: {detail}")]
    ClientCa { path: PathBuf, detail: String },
}

/// How the webhook port serves TLS: HTTP/2 and HTTP/1.1, and with a client CA, only to
/// clients that present a certificate it signed (the apiserver, through its admission
/// kubeconfig).
#[derive(Clone, Default)]
pub struct ServerTls {
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl ServerTls {
    /// `client_ca`: PEM CA certificates that sign the clients allowed in.
    pub fn new(client_ca: Option<(&std::path::Path, &[u8])>) -> Result<Self, TlsError> {
        let Some((path, pem)) = client_ca else {
            return Ok(Self::default());
        };
        let invalid = |detail: String| TlsError::ClientCa {
            path: path.to_owned(),
            detail,
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| invalid(e.to_string()))?;
            roots.add(cert).map_err(|e| invalid(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(invalid("holds no PEM certificate".into()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            client_verifier: Some(verifier),
        })
    }

    fn server_config(&self, cert: &[u8], key: &[u8]) -> io::Result<Arc<ServerConfig>> {
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let builder = match &self.client_verifier {
            Some(v) => builder.with_client_cert_verifier(v.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A serving configuration for the PEM pair.
    pub fn load(&self, cert: &[u8], key: &[u8]) -> io::Result<RustlsConfig> {
        Ok(RustlsConfig::from_config(self.server_config(cert, key)?))
    }

    /// Swaps the PEM pair in `config`; on error `config` is unchanged.
    pub fn reload(&self, config: &RustlsConfig, cert: &[u8], key: &[u8]) -> io::Result<()> {
        config.reload_from_config(self.server_config(cert, key)?);
        Ok(())
    }
}

#[derive(Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server: ServerTls,
}

impl CertFiles {
    async fn read(&self) -> Result<(Vec<u8>, Vec<u8>, [u8; 32]), TlsError> {
        let cert = tokio::fs::read(&self.cert)
            .await
            .map_err(|source| TlsError::Read {
                path: self.cert.clone(),
                source,
            })?;
        let key = tokio::fs::read(&self.key)
            .await
            .map_err(|source| TlsError::Read {
                path: self.key.clone(),
                source,
            })?;
        let mut h = Sha256::new();
        h.update(&cert);
        h.update([0]);
        h.update(&key);
        Ok((cert, key, h.finalize().into()))
    }

    fn invalid(&self, source: std::io::Error) -> TlsError {
        TlsError::Invalid {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        }
    }

    /// Loads the initial configuration; fails when the files are missing or broken.
    pub async fn load(&self) -> Result<(RustlsConfig, [u8; 32]), TlsError> {
        let (cert, key, hash) = self.read().await?;
        let config = self.server.load(&cert, &key).map_err(|e| self.invalid(e))?;
        Ok((config, hash))
    }

    /// Re-reads the files every `interval` until `stop` fires, swapping in a changed pair.
    /// The expiry of the certificate in use goes to the `metrics` gauge.
    pub async fn watch(
        self,
        config: RustlsConfig,
        mut hash: [u8; 32],
        interval: Duration,
        stop: CancellationToken,
        metrics: Metrics,
    ) {
        self.record_expiry(&metrics).await;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload_if_changed(&config, hash).await {
                Ok(Some(new)) => {
                    hash = new;
                    info!(cert = %self.cert.display(), "reloaded the serving certificate");
                    self.record_expiry(&metrics).await;
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "kept the previous serving certificate"),
            }
        }
    }

    async fn record_expiry(&self, metrics: &Metrics) {
        if let Ok(pem) = tokio::fs::read_to_string(&self.cert).await {
            metrics.serving_certificate(&pem);
        }
    }

    /// Returns the new hash when the files changed and were swapped in.
    pub async fn reload_if_changed(
        &self,
        config: &RustlsConfig,
        hash: [u8; 32],
    ) -> Result<Option<[u8; 32]>, TlsError> {
        let (cert, key, new) = self.read().await?;
        if new == hash {
            return Ok(None);
        }
        self.server
            .reload(config, &cert, &key)
            .map_err(|e| self.invalid(e))?;
        Ok(Some(new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{os::unix::fs::symlink, path::Path};

    fn cert() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    /// Lays the files out as a Kubernetes Secret volume does: tls.crt -> ..data/tls.crt,
    /// ..data -> ..<generation>, and a new generation swaps the ..data symlink atomically.
    fn publish(dir: &Path, generation: u32, cert: &str, key: &str) {
        let g = dir.join(format!("..gen{generation}"));
        std::fs::create_dir(&g).unwrap();
        std::fs::write(g.join("tls.crt"), cert).unwrap();
        std::fs::write(g.join("tls.key"), key).unwrap();
        let tmp = dir.join("..data_tmp");
        symlink(&g, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        for f in ["tls.crt", "tls.key"] {
            if !dir.join(f).exists() {
                symlink(dir.join("..data").join(f), dir.join(f)).unwrap();
            }
        }
    }

    fn client_trusting(pem: &str) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(pem.as_bytes()).unwrap();
        // no pooled connections: each request is a new TLS handshake
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn reloads_on_symlink_swap_and_keeps_the_old_pair_when_the_new_one_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = cert();
        let (cert_b, key_b) = cert();
        publish(dir.path(), 1, &cert_a, &key_a);
        let files = CertFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            server: ServerTls::default(),
        };
        let (config, hash) = files.load().await.unwrap();

        let handle: axum_server::Handle<std::net::SocketAddr> = axum_server::Handle::new();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server =
            axum_server::bind_rustls("127.0.0.1:0".parse().unwrap(), config.clone()).handle(handle.clone());
        tokio::spawn(server.serve(app.into_make_service()));
        let url = format!("https://localhost:{}/", handle.listening().await.unwrap().port());
        let (a, b) = (client_trusting(&cert_a), client_trusting(&cert_b));
        assert!(a.get(&url).send().await.is_ok(), "serves A");
        assert!(b.get(&url).send().await.is_err());

        assert_eq!(
            files.reload_if_changed(&config, hash).await.unwrap(),
            None,
            "unchanged files are not reloaded"
        );
        publish(dir.path(), 2, &cert_b, &key_b);
        let hash = files
            .reload_if_changed(&config, hash)
            .await
            .unwrap()
            .expect("the swap is seen");
        assert!(b.get(&url).send().await.is_ok(), "serves B after the swap");
        assert!(a.get(&url).send().await.is_err());

        publish(dir.path(), 3, "not a certificate", &key_a);
        let err = files.reload_if_changed(&config, hash).await.unwrap_err();
        assert!(matches!(err, TlsError::Invalid { .. }), "{err}");
        assert!(
            b.get(&url).send().await.is_ok(),
            "a broken pair keeps the old one"
        );
        handle.shutdown();
    }

    #[tokio::test]
    async fn missing_files_are_named() {
        let files = CertFiles {
            cert: "/nonexistent/tls.crt".into(),
            key: "/nonexistent/tls.key".into(),
            server: ServerTls::default(),
        };
        let err = files.load().await.unwrap_err().to_string();
        assert!(err.contains("/nonexistent/tls.crt"), "{err}");
    }
}
