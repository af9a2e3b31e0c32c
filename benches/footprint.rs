//! The resource footprint of one `kvinject serve` process (the dist binary that ships, when
//! run by `tests/bench footprint`; rotation controller on), for the chart's requests and
//! limits. Same run, side by side: the process idle after start (baseline), then under a
//! burst of pod admissions through the real apiserver, then once a large number of
//! materialized Secrets sit in its caches.
//!
//! Run with `tests/bench footprint`. Sizes: KVINJECT_BENCH_PODS (default 2000) pods over
//! KVINJECT_BENCH_REFS (default 100) Key Vault secrets, created KVINJECT_BENCH_PARALLEL
//! (default 8) at a time; KVINJECT_BENCH_SECRETS (default 10000) extra materialized
//! Secrets. The defaults are the sizes of the memory goal (issue 14).

#[path = "../tests/support/mod.rs"]
mod support;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{Api, api::PostParams};
use kvinject::{
    keyvault::{SecretValue, source::Fetched},
    materialize,
    mutate::{Needed, Source},
    reference::Reference,
};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The KiB figures `names` (`VmRSS:`, `RssAnon:`, ...) of a process's status, in order;
/// 0 for one it does not show.
fn status_kib<const N: usize>(pid: u32, names: [&str; N]) -> [u64; N] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    names.map(|name| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    })
}

/// (RssAnon KiB, RssFile KiB) of a process: what it allocated, and the pages of files
/// (its own code) it has mapped.
fn split(pid: u32) -> (u64, u64) {
    let [anon, file] = status_kib(pid, ["RssAnon:", "RssFile:"]);
    (anon, file)
}

/// (VmRSS KiB, VmHWM KiB, CPU seconds) of a process.
fn usage(pid: u32) -> (u64, u64, f64) {
    let [rss, hwm] = status_kib(pid, ["VmRSS:", "VmHWM:"]);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = rest.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + rest.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (rss, hwm, ticks / 100.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::main]
async fn main() {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .unwrap();
    let pods_total = env_usize("KVINJECT_BENCH_PODS", 2000);
    let refs = env_usize("KVINJECT_BENCH_REFS", 100).max(1);
    let parallel = env_usize("KVINJECT_BENCH_PARALLEL", 8).max(1);
    let extra_secrets = env_usize("KVINJECT_BENCH_SECRETS", 10000);
    let lease = support::unique("bench-lease");
    // KVINJECT_BENCH_ROTATION=false: the webhook alone, to see what the controller adds.
    let rotation = if std::env::var("KVINJECT_BENCH_ROTATION").as_deref() == Ok("false") {
        "false"
    } else {
        "true"
    };
    let kvinject = support::Kvinject::start(&[
        "--rotation",
        rotation,
        "--lease-namespace",
        "default",
        "--lease-name",
        &lease,
        "--refresh-interval",
        "1h",
        "--gc-grace-period",
        "0",
        // The burst's 100 first uses in one namespace are the workload measured here, not
        // the per-namespace read budget (which refused most of them once the bed's vault
        // answered in 0.4 ms rather than 44).
        "--namespace-read-rate",
        "1000",
        "--namespace-read-burst",
        "1000",
    ])
    .await;
    let s = support::setup_for("footprint", kvinject).await;
    let pid = s.kvinject.pid();
    println!(
        "footprint benchmark: {pods_total} pods over {refs} Key Vault secrets, {parallel} at a time; then {extra_secrets} more materialized Secrets"
    );

    let run = support::unique("fp");
    stream::iter(0..refs)
        .for_each_concurrent(16, |i| {
            let run = run.clone();
            async move {
                support::seed_secret(&format!("{run}-{i}"), &support::distinctive_value()).await;
            }
        })
        .await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let (idle_rss, _, idle_cpu) = usage(pid);
    let idle_split = split(pid);

    // A burst of admissions: each pod has 3 references, so most are cache hits.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let started = Instant::now();
    let (cpu_before, denied) = (usage(pid).2, std::sync::atomic::AtomicUsize::new(0));
    stream::iter(0..pods_total)
        .for_each_concurrent(parallel, |i| {
            let (pods, run, denied) = (pods.clone(), run.clone(), &denied);
            async move {
                let env: Vec<_> = (0..3).map(|j| serde_json::json!({"name": format!("S{j}"), "value": format!("akv://{}/{run}-{}", support::testbed().vault_name, (i + j) % refs)})).collect();
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("p{i}")},
                    "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1", "env": env}]}
                }))
                .unwrap();
                if pods.create(&PostParams::default(), &pod).await.is_err() {
                    denied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
        .await;
    let burst = started.elapsed();
    let (burst_rss, burst_hwm, cpu_after) = usage(pid);
    let burst_split = split(pid);
    let burst_cpu = cpu_after - cpu_before;

    // Many materialized Secrets in its caches, written directly as if admitted earlier: made
    // and sealed as kvinject makes them, with the signing key it loaded.
    let keys = kvinject::materialize::keys::load_or_create(&s.client, "default", "kvinject-signing-key")
        .await
        .expect("kvinject's signing key");
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    stream::iter(0..extra_secrets)
        .for_each_concurrent(16, |i| {
            let (secrets, keys, ns) = (secrets.clone(), keys.clone(), s.ns.clone());
            async move {
                let source = Source::Env(Reference {
                    vault: support::testbed().vault_name.clone(),
                    name: format!("bench-{i}"),
                    version: None,
                    field: None,
                });
                let needed = Needed::own_read(source);
                let fetched = Fetched {
                    value: SecretValue::new("benchmark-value-of-a-typical-length-0123456789"),
                    version: format!("{i:032x}"),
                };
                let secret = materialize::desired_secret(&ns, &needed, &fetched, &keys).unwrap();
                secrets
                    .create(&PostParams::default(), &secret)
                    .await
                    .expect("creating a Secret");
            }
        })
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cached_rss, hwm, _) = usage(pid);
    let cached_split = split(pid);

    println!();
    println!(
        "| measure | idle (baseline) | after the burst | with {extra_secrets} more Secrets cached | ratio to idle |"
    );
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| RSS | {} | {} | {} | {:.2}x |",
        mib(idle_rss),
        mib(burst_rss),
        mib(cached_rss),
        cached_rss as f64 / idle_rss.max(1) as f64
    );
    println!(
        "| of which allocated (RssAnon) | {} | {} | {} | {:.2}x |",
        mib(idle_split.0),
        mib(burst_split.0),
        mib(cached_split.0),
        cached_split.0 as f64 / idle_split.0.max(1) as f64
    );
    println!(
        "| of which mapped code (RssFile) | {} | {} | {} | {:.2}x |",
        mib(idle_split.1),
        mib(burst_split.1),
        mib(cached_split.1),
        cached_split.1 as f64 / idle_split.1.max(1) as f64
    );
    println!(
        "| peak RSS (VmHWM) | - | {} | {} | {:.2}x |",
        mib(burst_hwm),
        mib(hwm),
        hwm as f64 / idle_rss.max(1) as f64
    );
    println!(
        "| CPU | {idle_cpu:.2} s to start | {burst_cpu:.2} s for {pods_total} admissions in {burst:.1?} ({:.0} admissions/s, {:.2} cores, {:.2} ms CPU each) | - | - |",
        pods_total as f64 / burst.as_secs_f64(),
        burst_cpu / burst.as_secs_f64(),
        burst_cpu * 1000.0 / pods_total as f64
    );
    println!(
        "| growth per injected pod (the burst, with its {refs} Secrets) | - | {:.2} KiB | - | - |",
        burst_rss.saturating_sub(idle_rss) as f64 / pods_total.max(1) as f64
    );
    println!(
        "| cache growth per extra Secret | - | - | {:.2} KiB | - |",
        cached_rss.saturating_sub(burst_rss) as f64 / extra_secrets.max(1) as f64
    );
    let denied = denied.into_inner();
    assert_eq!(denied, 0, "{denied} pods were refused");
    assert!(
        s.kvinject.logs().contains("serving"),
        "kvinject log: {}",
        s.kvinject.log.display()
    );
}
