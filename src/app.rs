//! Wiring: clients, caches, listeners, background tasks and one shutdown signal. Any task
//! ending is fatal.

use crate::{
    access::{self, NamespaceLabels, Policies},
    admin,
    certs::bootstrap::Bootstrap,
    config::{ServeConfig, TlsConfig},
    generation::Generation,
    inject::{Injector, KubeWriter, ServiceAccounts},
    keyvault::source::KeyVault,
    materialize,
    metrics::{Metrics, ModeLabels},
    mutate::InjectConfig,
    rotation,
    webhook::{self, WebhookState},
};
use anyhow::Context;
use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use std::{future::IntoFuture, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How long in-flight requests get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);

/// kvinject's client of the apiserver, without kube's own retry. kube 5 retries a 429, 503
/// or 504 inside one call, up to 15 times with a backoff that grows to 1000 s: an eviction a
/// PodDisruptionBudget refuses (429) then blocks for minutes, past the rollout's deadline and
/// past a lost Lease, and a refused write waits unseen. Each caller retries as it decides
/// instead: evictions every 2 s until their deadline, rotation writes on their next pass,
/// admissions within their deadline, watches with the watcher's backoff.
async fn apiserver_client() -> anyhow::Result<kube::Client> {
    let mut config = kube::Config::infer().await?;
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let ready = admin::Readiness::default();
    let metrics = Metrics::default();

    let client = apiserver_client()
        .await
        .context("connecting to the Kubernetes API")?;
    let server_tls = match &config.client_ca {
        Some(path) => {
            let pem =
                std::fs::read(path).with_context(|| format!("reading --client-ca {}", path.display()))?;
            info!(client_ca = %path.display(), "the webhook port requires client certificates");
            webhook::tls::ServerTls::new(Some((path, &pem)))?
        }
        None => webhook::tls::ServerTls::default(),
    };
    // The serving certificate, and the task that keeps it current.
    let (tls, reload): (_, futures::future::BoxFuture<'static, ()>) = match config.tls.clone() {
        TlsConfig::Files { cert, key } => {
            let files = webhook::tls::CertFiles {
                cert,
                key,
                server: server_tls.clone(),
            };
            let (tls, hash) = files
                .load()
                .await
                .context("loading the webhook's serving certificate")?;
            (
                tls.clone(),
                Box::pin(files.watch(
                    tls,
                    hash,
                    config.tls_reload_interval,
                    stop.clone(),
                    metrics.clone(),
                )),
            )
        }
        TlsConfig::Bootstrap(b) => {
            let (tls, running) = Bootstrap::new(client.clone(), b)
                .start(&metrics, server_tls.clone())
                .await
                .context("bootstrapping the webhook's certificates")?;
            (tls, Box::pin(running.run(metrics.clone(), stop.clone())))
        }
    };

    let connector = config.azure.connect().context("setting up Key Vault access")?;
    // Workload identities mint their ServiceAccounts' tokens through the apiserver.
    let source = KeyVault::with_workload_identities(
        &connector,
        &config.vaults,
        config.keyvault_budget,
        client.clone(),
    )
    .context("setting up Key Vault clients")?;
    for (name, url) in &config.vaults {
        info!(vault = %name, %url, "vault configured");
    }
    // The keys that seal kvinject's Secrets, shared by every replica.
    let (key_namespace, key_secret) = &config.signing_key;
    let keys = materialize::keys::load_or_create(&client, key_namespace, key_secret)
        .await
        .context("loading the signing key for materialized Secrets")?;
    // Followed while serving: a key added verifies, and a new current key signs, without a
    // restart (in two phases: see keys.rs).
    let follow_keys = materialize::keys::follow(
        client.clone(),
        key_namespace.clone(),
        key_secret.clone(),
        keys.clone(),
        config.signing_key_reload,
    );
    let inject_config = InjectConfig {
        vaults: config.vaults.keys().cloned().collect(),
        keys: keys.clone(),
        min_refresh_interval: config.min_refresh_interval,
    };

    // A watch-backed cache of kvinject's own Secrets: materialized references are admitted
    // from it with no call at all, and it rebuilds from the apiserver after a restart.
    // Each is kept as its metadata and its seal's verdict, checked once per change: never
    // its value (the rotation controller reads a Secret before it writes one).
    let (store, secret_events) = rotation::reflect_secrets(&client, keys.clone());
    // Every cache an admission decision reads counts its changes here, after applying them;
    // the webhook's decision memo holds only while the count stands.
    let changes = Generation::default();

    // Namespace labels: which namespaces kvinject acts for, which ones access policies
    // select, and the rotation controller's rollout opt-ins.
    let (namespaces, namespace_watch) =
        rotation::reflect(Api::<Namespace>::all(client.clone()), changes.clone());
    // ServiceAccounts: which identity each one's pods read Key Vault as.
    let (service_accounts, service_account_watch) =
        rotation::reflect(Api::<ServiceAccount>::all(client.clone()), changes.clone());
    let identities = ServiceAccounts {
        store: service_accounts.clone(),
        client: Some(client.clone()),
        settings: Arc::new(config.identity.clone()),
    };

    // Access policies: a watch cache, compiled into an index the admission check reads.
    metrics
        .access_mode
        .get_or_create(&ModeLabels {
            mode: config.access_policy.as_str(),
        })
        .set(1);
    let (policies, policies_ready, policy_watch): (
        Option<Policies>,
        BoxFuture<'static, ()>,
        BoxFuture<'static, ()>,
    ) = match config.access_policy {
        access::Mode::Required => {
            let (policies, policy_store, drive) = access::watch(&client, &metrics, &changes);
            let ready = {
                let namespaces = namespaces.clone();
                Box::pin(async move {
                    let _ = futures::join!(policy_store.wait_until_ready(), namespaces.wait_until_ready());
                })
            };
            (Some(policies), ready, Box::pin(drive))
        }
        access::Mode::Off => {
            warn!(
                "--access-policy off: every pod in an opted-in namespace may use every secret of every configured vault"
            );
            (
                None,
                Box::pin(std::future::ready(())),
                Box::pin(std::future::pending()),
            )
        }
    };

    let mut injector = Injector::new(
        inject_config.clone(),
        source.clone(),
        Arc::new(KubeWriter {
            client: client.clone(),
            keys: keys.clone(),
        }),
        store.clone(),
        config.value_cache_ttl,
        metrics.clone(),
    )
    .with_namespaces(NamespaceLabels::new(namespaces.clone(), Some(client.clone())))
    .with_scope(config.scope.clone())
    .with_read_limit(config.namespace_reads)
    .with_identities(identities.clone())
    .with_changes(changes.clone());
    if let Some(policies) = &policies {
        injector = injector.with_access(policies.clone());
    }
    let injector = Arc::new(injector);
    // Deletions the watch sees, for the rotation controller to recreate what is still used.
    let deletions = rotation::heal::Deletions::default();
    let watch = {
        let (injector, deletions) = (injector.clone(), deletions.clone());
        secret_events.default_backoff().for_each(move |event| {
            let (injector, deletions) = (injector.clone(), deletions.clone());
            // The store has this event already.
            if event.is_ok() {
                changes.bump();
            }
            async move {
                match event {
                    // A collected Secret must be created again by the next pod that needs it.
                    Ok(watcher::Event::Delete(secret)) => {
                        deletions.record(&secret);
                        injector.forget(&secret).await
                    }
                    // Marked missing in Key Vault: its value is not reused for a first use.
                    Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => {
                        injector.forget_missing(&secret).await
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "watching kvinject's Secrets; retrying"),
                }
            }
        })
    };

    // The rotation controller: every replica campaigns; only the Lease holder works.
    let stuck_after = config.rotation.as_ref().and_then(|r| r.stuck_after);
    let rotation: futures::future::BoxFuture<'static, ()> = match config.rotation.clone() {
        None => Box::pin(std::future::pending()),
        Some(settings) => {
            let (caches, watches) = rotation::watch_workloads(&client, store.clone(), namespaces.clone());
            let (leading_tx, leading_rx) = tokio::sync::watch::channel(false);
            let identity = settings.lease.identity.clone();
            info!(%identity, lease = %settings.lease.name, namespace = %settings.lease.namespace, "rotation controller campaigning");
            let controller = rotation::Controller::new(
                client.clone(),
                settings.controller,
                inject_config,
                source,
                caches,
                metrics.clone(),
                &identity,
            )
            .with_access(policies.clone())
            .with_scope(config.scope.clone())
            .with_read_limit(config.namespace_reads)
            .with_deletions(deletions)
            .with_identities(ServiceAccounts {
                client: None,
                ..identities.clone()
            });
            // Another replica leads: this one's view of staleness is no one's concern.
            let follower = {
                let metrics = metrics.clone();
                move || metrics.forget_sync()
            };
            let lease = rotation::lease::run(client.clone(), settings.lease, leading_tx, follower);
            // Whether this replica leads, for the no-Lease-holder alert.
            let leader_gauge = {
                let (mut leading, metrics) = (leading_rx.clone(), metrics.clone());
                async move {
                    while leading.changed().await.is_ok() {
                        metrics
                            .rotation_leader
                            .set(i64::from(*leading.borrow_and_update()));
                    }
                }
            };
            Box::pin(async move {
                tokio::join!(watches, lease, controller.run(leading_rx), leader_gauge);
            })
        }
    };

    let prober = {
        let (injector, interval) = (injector.clone(), config.vault_probe_interval);
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                injector.probe_vaults().await;
            }
        }
    };

    let handle = axum_server::Handle::new();
    let state = WebhookState::new(injector, config.admission_deadline);
    let webhook_server = axum_server::bind_rustls(config.listen, tls.clone())
        .handle(handle.clone())
        .serve(webhook::router(state).into_make_service());

    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin port {}", config.admin_listen))?;
    // The admin port outlives the drain, so /readyz can say "not ready" meanwhile.
    let admin_server =
        axum::serve(admin_listener, admin::router(ready.clone(), metrics, stuck_after)).into_future();

    tokio::spawn({
        let (stop, handle, ready, delay) =
            (stop.clone(), handle.clone(), ready.clone(), config.shutdown_delay);
        async move {
            wait_for_signal().await;
            // Not ready at once, but still serving while the Service's endpoints drop this
            // replica: the apiserver may still send it admissions meanwhile.
            info!(delay = ?delay, "shutting down: not ready, still serving for the delay");
            ready.set_not_ready();
            tokio::time::sleep(delay).await;
            stop.cancel();
            handle.graceful_shutdown(Some(DRAIN));
        }
    });

    // Ready once the webhook listens and the Secret, namespace and policy caches have synced.
    let namespaces_ready = namespaces.clone();
    let mark_ready = {
        let (handle, ready) = (handle.clone(), ready.clone());
        async move {
            let addr = handle.listening().await;
            policies_ready.await;
            let _ = namespaces_ready.wait_until_ready().await;
            let _ = service_accounts.wait_until_ready().await;
            if store.wait_until_ready().await.is_ok() {
                info!(addr = ?addr, admin = %config.admin_listen, "serving");
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
        _ = follow_keys => {},
        _ = mark_ready => {},
        _ = watch => {},
        _ = namespace_watch => {},
        _ = service_account_watch => {},
        _ = policy_watch => {},
        _ = prober => {},
        _ = rotation => {},
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
