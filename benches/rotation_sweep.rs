//! One rotation sweep over many materialized Secrets, against the test bed, three ways in
//! the same run: from the vault's paged listing (kvinject's default), one GET per distinct
//! secret (`--list-sweep false`), and polling Key Vault once per Secret, as a controller
//! without kvinject's per-reference grouping would.
//!
//! Run with `tests/bench` (it starts the bed). Sizes: KVINJECT_BENCH_SECRETS (default
//! 10000) Secrets over KVINJECT_BENCH_NAMESPACES (default 10) namespaces, each namespace
//! materializing the same SECRETS/NAMESPACES Key Vault secrets.

#[path = "../tests/support/mod.rs"]
mod support;

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Secret},
};
use kube::{Api, api::PostParams, runtime::WatchStreamExt};
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

/// The bench's own vault on the bed (each host is a vault of its own there), so that its
/// listing holds the bench's secrets only, whatever the tests left in `kvtest`.
const VAULT: &str = "other";

fn vault_url() -> String {
    support::vault_url_of(VAULT)
}

fn vault_client() -> azure_security_keyvault_secrets::SecretClient {
    support::secret_client_of(&vault_url())
}

/// Sets `name` in the bench's vault; returns the new version.
async fn seed(name: &str, value: &str) -> String {
    support::seed_secret_in(&vault_url(), name, value).await
}

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
            let v = seed(&name, "benchmark-value").await;
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
            let vault = VAULT.to_owned();
            let keys = keys.clone();
            async move {
                let source = Source::Env(Reference {
                    vault,
                    name,
                    version: None,
                    field: None,
                });
                let needed = Needed::own_read(source);
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
    // Workloads, as in a cluster: one opted-in Deployment per namespace (scaled to zero)
    // whose template refers to every secret, so the sweep also reconciles workloads and
    // collection finds every Secret referenced.
    for ns in &ns_names {
        let env: Vec<serde_json::Value> = versions
            .keys()
            .enumerate()
            .map(|(i, name)| serde_json::json!({"name": format!("S{i}"), "value": format!("akv://{VAULT}/{name}")}))
            .collect();
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "consumer", "annotations": {"kvinject.io/rollout-on-rotation": "true"}},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "consumer"}}, "template": {
                "metadata": {"labels": {"app": "consumer"}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1", "env": env}]}}}
        }))
        .unwrap();
        Api::<Deployment>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &d)
            .await
            .unwrap();
    }

    // kvinject's controller, with its caches synced.
    let rss_before = rss_kib();
    let (store, events) = rotation::reflect_secrets(&client, keys.clone());
    tokio::spawn(events.default_backoff().for_each(|_| async {}));
    let (namespaces, namespace_watch) =
        rotation::reflect(Api::<Namespace>::all(client.clone()), Default::default());
    tokio::spawn(namespace_watch);
    let (caches, drive) = rotation::watch_workloads(&client, store.clone(), namespaces);
    tokio::spawn(drive);
    store.wait_until_ready().await.unwrap();
    // Only this run's Secrets count: the bed may hold other tests' Secrets.
    let ours = |s: &kvinject::materialize::CachedSecret| s.namespace.starts_with(&run);
    while store.state().iter().filter(|s| ours(s)).count() < total {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connector = support::azure_config().connect().unwrap();
    let vaults = BTreeMap::from([(VAULT.to_owned(), vault_url())]);
    let source = KeyVault::new(&connector, &vaults, Duration::from_secs(10)).unwrap();
    let config = RotationConfig {
        refresh_interval: Duration::from_millis(1),
        rollout_by_default: false,
        // Every sweep is a full one: workloads reconciled, garbage collection on.
        reconcile_interval: Duration::ZERO,
        gc_grace: Some(Duration::from_secs(3600)),
        evict_ready_timeout: Duration::from_secs(1),
        max_concurrent_rollouts: 5,
        keyvault_concurrency: concurrency,
        list_sweep: true,
        full_refresh_interval: Duration::from_secs(3600),
    };
    let inject = InjectConfig {
        vaults: [VAULT.to_owned()].into(),
        keys: keys.clone(),
        ..Default::default()
    };
    let controller = |name: &str, config: RotationConfig, metrics: &Metrics| {
        rotation::Controller::new(
            client.clone(),
            config,
            inject.clone(),
            source.clone(),
            caches.clone(),
            metrics.clone(),
            name,
        )
    };
    // Writes, from the apiserver's own state: the bench's Secrets and Deployments whose
    // resourceVersion changed.
    let versions_now = || async {
        let mut out = BTreeMap::new();
        for ns in &ns_names {
            for s in Api::<Secret>::namespaced(client.clone(), ns)
                .list(&Default::default())
                .await
                .unwrap()
            {
                out.insert(
                    format!("{ns}/secret/{}", s.metadata.name.unwrap_or_default()),
                    s.metadata.resource_version,
                );
            }
            for d in Api::<Deployment>::namespaced(client.clone(), ns)
                .list(&Default::default())
                .await
                .unwrap()
            {
                out.insert(
                    format!("{ns}/deployment/{}", d.metadata.name.unwrap_or_default()),
                    d.metadata.resource_version,
                );
            }
        }
        out
    };
    // Requests on the wire, from the bed vault's own counters (GETs and list pages).
    let wire = || async {
        let c = support::vault_counters().await;
        (
            c["secrets_get"].as_f64().unwrap_or(0.0),
            c["secrets_list"].as_f64().unwrap_or(0.0),
        )
    };
    // A sweep in which every reference is due; returns (GETs, list pages, time).
    async fn measured<F, Fut>(c: &mut rotation::Controller, wire: F) -> (f64, f64, Duration)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = (f64, f64)>,
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (g0, l0) = wire().await;
        let started = Instant::now();
        c.sweep().await;
        let took = started.elapsed();
        let (g1, l1) = wire().await;
        (g1 - g0, l1 - l0, took)
    }

    // kvinject's sweep from the vault's listing (the default).
    let metrics = Metrics::default();
    let mut listed = controller("bench-list", config.clone(), &metrics);
    // The listing's `updated` has whole seconds: a read in the second the secrets were set
    // cannot vouch for them, and the next sweep reads them again (small sizes set up within
    // a second). Read in a later second, as a real sweep would be.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    listed.sweep().await; // first sight: schedules every reference
    tokio::time::sleep(Duration::from_millis(10)).await;
    let rss_cached = rss_kib();
    let (first_gets, first_pages, _) = measured(&mut listed, wire).await; // reads each once
    let before = versions_now().await;
    let (list_gets, list_pages, list_time) = measured(&mut listed, wire).await;
    let after = versions_now().await;
    let writes = before.iter().filter(|(k, rv)| after.get(*k) != Some(*rv)).count();
    // One secret gets a new version: the listing shows it, and only it is read.
    let changed = versions.keys().next().unwrap().clone();
    seed(&changed, "benchmark-value-2").await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later second than the reads
    let (changed_gets, changed_pages, _) = measured(&mut listed, wire).await;
    let rotated = counter(&metrics, "kvinject_rotations_total");

    // The same controller reading each distinct secret with a GET (--list-sweep false).
    let mut per_secret = controller(
        "bench-get",
        RotationConfig {
            list_sweep: false,
            ..config.clone()
        },
        &Metrics::default(),
    );
    per_secret.sweep().await;
    let (get_gets, get_pages, get_time) = measured(&mut per_secret, wire).await;

    // Baseline, same run, same vault: one Key Vault read per Secret.
    let (g0, _) = wire().await;
    let started = Instant::now();
    for s in store.state().iter().filter(|s| ours(s)) {
        let r = Reference::parse(s.annotation(materialize::REFERENCE_ANNOTATION).unwrap())
            .unwrap()
            .unwrap();
        source.fetch(&r, None).await.expect("baseline read");
    }
    let baseline_time = started.elapsed();
    let baseline_reads = wire().await.0 - g0;

    let list_requests = list_gets + list_pages;
    let get_requests = get_gets + get_pages;
    println!();
    println!(
        "Key Vault requests per sweep, nothing changed, counted by the bed's vault ({distinct} referenced secrets; the vault lists {list_pages:.0} pages):"
    );
    println!("| sweep | requests | per distinct secret | time |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| from the listing (kvinject's default) | {list_requests:.0} ({list_pages:.0} list pages, {list_gets:.0} GETs) | {:.3} | {list_time:.2?} |",
        list_requests / distinct as f64
    );
    println!(
        "| one GET per distinct secret (--list-sweep false) | {get_requests:.0} | {:.3} | {get_time:.2?} |",
        get_requests / distinct as f64
    );
    println!(
        "| per-Secret polling (baseline) | {baseline_reads:.0} | {:.3} | {baseline_time:.2?} |",
        baseline_reads / distinct as f64
    );
    println!(
        "first listing sweep (reads each once): {first_gets:.0} GETs + {first_pages:.0} pages; after one new version: {changed_gets:.0} GET + {changed_pages:.0} pages, {rotated:.0} Secrets rotated"
    );
    println!(
        "controller cache memory (RSS growth): {} KiB for {total} Secrets ({:.2} KiB per Secret)",
        rss_cached.saturating_sub(rss_before),
        rss_cached.saturating_sub(rss_before) as f64 / total as f64
    );
    assert_eq!(
        get_gets as usize, distinct,
        "one GET per distinct secret without the listing"
    );
    assert_eq!(list_gets, 0.0, "nothing changed: no GET with the listing");
    assert_eq!(changed_gets, 1.0, "one new version: one GET");
    assert_eq!(
        rotated as usize,
        ns_names.len(),
        "the new version reached its Secret in every namespace"
    );
    println!(
        "apiserver writes in the sweep where nothing changed (resourceVersions of the bench's Secrets and Deployments): {writes}"
    );
    assert_eq!(writes, 0, "no apiserver writes when nothing changed");

    // The bench's vault is left as empty as it was found.
    let vault = vault_client();
    for name in versions.keys() {
        let _ = vault.delete_secret(name, None).await;
    }
    for ns in ns_names {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&ns, &Default::default())
            .await;
    }
}
