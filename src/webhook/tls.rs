//! Serving certificate loading and hot reload. Files are re-read on a timer and compared by
//! hash: inotify on single files misses Kubernetes' `..data` symlink swap. A new pair is
//! swapped in only when both parse; on error the old configuration stays.

use axum_server::tls_rustls::RustlsConfig;
use sha2::{Digest, Sha256};
use std::{path::PathBuf, time::Duration};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, #[source] source: std::io::Error },
    #[error("certificate {cert} and key {key} do not form a usable TLS configuration: {source}")]
    Invalid { cert: PathBuf, key: PathBuf, #[source] source: std::io::Error },
}

#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    async fn read(&self) -> Result<(Vec<u8>, Vec<u8>, [u8; 32]), TlsError> {
        let cert = tokio::fs::read(&self.cert).await.map_err(|source| TlsError::Read { path: self.cert.clone(), source })?;
        let key = tokio::fs::read(&self.key).await.map_err(|source| TlsError::Read { path: self.key.clone(), source })?;
        let mut h = Sha256::new();
        h.update(&cert);
        h.update([0]);
        h.update(&key);
        Ok((cert, key, h.finalize().into()))
    }

    fn invalid(&self, source: std::io::Error) -> TlsError {
        TlsError::Invalid { cert: self.cert.clone(), key: self.key.clone(), source }
    }

    /// Loads the initial configuration; fails when the files are missing or broken.
    pub async fn load(&self) -> Result<(RustlsConfig, [u8; 32]), TlsError> {
        let (cert, key, hash) = self.read().await?;
        let config = RustlsConfig::from_pem(cert, key).await.map_err(|e| self.invalid(e))?;
        Ok((config, hash))
    }

    /// Re-reads the files every `interval` until `stop` fires, swapping in a changed pair.
    pub async fn watch(self, config: RustlsConfig, mut hash: [u8; 32], interval: Duration, stop: CancellationToken) {
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
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "kept the previous serving certificate"),
            }
        }
    }

    /// Returns the new hash when the files changed and were swapped in.
    pub async fn reload_if_changed(&self, config: &RustlsConfig, hash: [u8; 32]) -> Result<Option<[u8; 32]>, TlsError> {
        let (cert, key, new) = self.read().await?;
        if new == hash {
            return Ok(None);
        }
        config.reload_from_pem(cert, key).await.map_err(|e| self.invalid(e))?;
        Ok(Some(new))
    }
}
