//! One rotation sweep over many materialized Secrets, against the test bed, side by side
//! with a baseline in the same run: polling Key Vault once per Secret, as a controller
//! without kvinject's per-reference grouping would.
//!
//! Run with `tests/bench` (it starts the bed). Sizes: KVINJECT_BENCH_SECRETS (default
//! 10000) Secrets over KVINJECT_BENCH_NAMESPACES (default 10) namespaces, each namespace
//! materializing the same SECRETS/NAMESPACES Key Vault secrets.

#[path = "../tests/support/mod.rs"]
mod support;

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api,
    api::PostParams,
    runtime::{WatchStreamExt, reflector, watcher},
};
use kvinject::{
    keyvault::{
        SecretValue,
        source::{Fetched, KeyVault, SecretSource},
    },
    materialize,
    metrics::Metrics,
    mutate::{InjectConfig, Needed, Source},
    reference::Reference,
    rotation::{self, RotationConfig},
};
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn counter(metrics: &Metrics, name: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main]
async fn main() {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .unwrap();
    let total = env_usize("KVINJECT_BENCH_SECRETS", 10_000);
    let namespaces = env_usize("KVINJECT_BENCH_NAMESPACES", 10).max(1);
    let distinct = (total / namespaces).max(1);
    let concurrency = env_usize("KVINJECT_BENCH_CONCURRENCY", 8).max(1);
    let bed = support::testbed();
    // The keys the controller below verifies with: the Secrets are sealed as kvinject would.
    let keys = kvinject::materialize::seal::Keys::default();
    let client = support::kube().await;
    println!(
        "rotation sweep benchmark: {total} materialized Secrets = {distinct} Key Vault secrets x {namespaces} namespaces, {concurrency} reads in flight"
    );

    // Key Vault: `distinct` secrets.
    let run = support::unique("bench");
    let started = Instant::now();
    let versions: BTreeMap<String, String> = stream::iter((0..distinct).map(|i| format!("{run}-{i}")))
        .map(|name| async move {
            let v = support::seed_secret(&name, "benchmark-value").await;
            (name, v)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    println!(
        "setup: seeded {distinct} Key Vault secrets in {:.1?}",
        started.elapsed()
    );

    // The apiserver: `total` materialized Secrets, as the webhook would have written them.
    let started = Instant::now();
    let mut ns_names = Vec::new();
    for n in 0..namespaces {
        let name = format!("{run}-ns{n}");
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        ns_names.push(name);
    }
    let work: Vec<(String, String, String)> = ns_names
        .iter()
        .flat_map(|ns| {
            versions
                .iter()
                .map(move |(name, v)| (ns.clone(), name.clone(), v.clone()))
        })
        .collect();
    stream::iter(work)
        .map(|(ns, name, version)| {
            let client = client.clone();
            let vault = bed.vault_name.clone();
            let keys = keys.clone();
            async move {
                let source = Source::Env(Reference {
                    vault,
                    name,
                    version: None,
                    field: None,
                });
                let needed = Needed {
                    secret_name: source.secret_name(),
                    source,
                    identity: None,
                };
                let fetched = Fetched {
                    value: SecretValue::new("benchmark-value"),
                    version,
                };
                let secret = materialize::desired_secret(&ns, &needed, &fetched, &keys).unwrap();
                Api::<Secret>::namespaced(client, &ns)
                    .create(&PostParams::default(), &secret)
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .expect("creating the Secrets");
    println!("setup: created {total} Secrets in {:.1?}", started.elapsed());

    // kvinject's controller, with its caches synced.
    let rss_before = rss_kib();
    let (store, writer) = reflector::store();
    let watch = reflector(
        writer,
        watcher(
            Api::<Secret>::all(client.clone()),
            watcher::Config::default().labels(materialize::SELECTOR),
        ),
    )
    .default_backoff()
    .for_each(|_| async {});
    tokio::spawn(watch);
    let (namespaces, namespace_watch) = rotation::reflect(Api::<Namespace>::all(client.clone()));
    tokio::spawn(namespace_watch);
    let (caches, drive) = rotation::watch_workloads(&client, store.clone(), namespaces);
    tokio::spawn(drive);
    store.wait_until_ready().await.unwrap();
    while store.state().len() < total {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connector = support::azure_config().connect().unwrap();
    let vaults = BTreeMap::from([(bed.vault_name.clone(), bed.vault_url.clone())]);
    let source = KeyVault::new(&connector, &vaults, Duration::from_secs(10)).unwrap();
    let metrics = Metrics::default();
    let config = RotationConfig {
        refresh_interval: Duration::from_millis(1),
        rollout_by_default: false,
        reconcile_interval: Duration::from_secs(3600),
        gc_grace: None,
        evict_ready_timeout: Duration::from_secs(1),
        keyvault_concurrency: concurrency,
    };
    let inject = InjectConfig {
        vaults: [bed.vault_name.clone()].into(),
        keys: keys.clone(),
        ..Default::default()
    };
    let mut controller = rotation::Controller::new(
        client.clone(),
        config.clone(),
        inject.clone(),
        source.clone(),
        caches.clone(),
        metrics.clone(),
        "bench",
    );
    controller.sweep().await; // first sight: schedules every reference
    tokio::time::sleep(Duration::from_millis(10)).await;
    let rss_cached = rss_kib();

    // The same sweep with one Key Vault read at a time (the previous behaviour).
    let serial_metrics = Metrics::default();
    let serial_config = RotationConfig {
        keyvault_concurrency: 1,
        ..config
    };
    let mut serial = rotation::Controller::new(
        client.clone(),
        serial_config,
        inject,
        source.clone(),
        caches,
        serial_metrics.clone(),
        "bench-serial",
    );
    serial.sweep().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = Instant::now();
    serial.sweep().await;
    let serial_time = started.elapsed();

    // The measured sweep: every reference due, nothing changed in Key Vault.
    let reads_before = counter(&metrics, "kvinject_keyvault_requests_total");
    let started = Instant::now();
    controller.sweep().await;
    let sweep_time = started.elapsed();
    let reads = counter(&metrics, "kvinject_keyvault_requests_total") - reads_before;
    let writes = counter(&metrics, "kvinject_rotations_total")
        + counter(&metrics, "kvinject_rollouts_total")
        + counter(&metrics, "kvinject_secrets_collected_total");

    // Baseline, same run, same vault: one Key Vault read per Secret.
    let started = Instant::now();
    for s in store.state() {
        let r =
            Reference::parse(&s.metadata.annotations.as_ref().unwrap()[materialize::REFERENCE_ANNOTATION])
                .unwrap()
                .unwrap();
        source.fetch(&r, None).await.expect("baseline read");
    }
    let baseline_time = started.elapsed();
    let baseline_reads = store.state().len() as f64;

    println!();
    println!("| measure | kvinject sweep | baseline (per-Secret polling) | ratio |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| Key Vault requests per sweep | {reads:.0} | {baseline_reads:.0} | {:.1}x fewer |",
        baseline_reads / reads.max(1.0)
    );
    println!(
        "| sweep time | {:.2?} | {:.2?} | {:.1}x faster |",
        sweep_time,
        baseline_time,
        baseline_time.as_secs_f64() / sweep_time.as_secs_f64().max(1e-9)
    );
    println!(
        "| sweep time, one read at a time | {:.2?} | {:.2?} | {:.1}x faster |",
        serial_time,
        baseline_time,
        baseline_time.as_secs_f64() / serial_time.as_secs_f64().max(1e-9)
    );
    println!("| apiserver writes, nothing changed | {writes:.0} | - | - |");
    println!(
        "| controller cache memory (RSS growth) | {} KiB for {total} Secrets ({:.2} KiB per Secret) | - | - |",
        rss_cached.saturating_sub(rss_before),
        rss_cached.saturating_sub(rss_before) as f64 / total as f64
    );
    assert_eq!(
        reads as usize, distinct,
        "one Key Vault request per distinct secret"
    );
    assert_eq!(writes, 0.0, "no apiserver writes when nothing changed");

    for ns in ns_names {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&ns, &Default::default())
            .await;
    }
}
