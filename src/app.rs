//! Wiring: listeners, background tasks and one shutdown signal. Any task ending is fatal.

use crate::{admin, config::ServeConfig, webhook};
use anyhow::Context;
use std::{future::IntoFuture, time::Duration};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// How long in-flight requests get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);

pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let ready = admin::Readiness::default();

    let files = webhook::tls::CertFiles { cert: config.tls_cert.clone(), key: config.tls_key.clone() };
    let (tls, hash) = files.load().await.context("loading the webhook's serving certificate")?;

    let handle = axum_server::Handle::new();
    let webhook_server = axum_server::bind_rustls(config.listen, tls.clone())
        .handle(handle.clone())
        .serve(webhook::router().into_make_service());

    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin port {}", config.admin_listen))?;
    // The admin port outlives the drain, so /readyz can say "not ready" meanwhile.
    let admin_server = axum::serve(admin_listener, admin::router(ready.clone())).into_future();

    let reload = files.watch(tls, hash, config.tls_reload_interval, stop.clone());

    tokio::spawn({
        let (stop, handle, ready) = (stop.clone(), handle.clone(), ready.clone());
        async move {
            wait_for_signal().await;
            info!("shutting down");
            ready.set_not_ready();
            stop.cancel();
            handle.graceful_shutdown(Some(DRAIN));
        }
    });

    let mark_ready = {
        let (handle, ready) = (handle.clone(), ready.clone());
        async move {
            if let Some(addr) = handle.listening().await {
                info!(%addr, admin = %config.admin_listen, "serving");
                ready.set_ready();
            }
            std::future::pending::<()>().await
        }
    };

    // The webhook server returns once a graceful shutdown has drained it.
    tokio::select! {
        r = webhook_server => r.context("webhook server")?,
        r = admin_server => r.context("admin server")?,
        _ = reload => {},
        _ = mark_ready => {},
    }
    if stop.is_cancelled() {
        return Ok(());
    }
    error!("a serving task ended unexpectedly");
    anyhow::bail!("a serving task ended unexpectedly")
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}
