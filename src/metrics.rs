//! Prometheus metrics, served on the admin port at /metrics. Labels carry results and
//! vault names, never a value. Key Vault secret names appear in one gauge only
//! (`kvinject_keyvault_secret_missing`), for references that are committed to git anyway.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VaultLabels {
    pub vault: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct SecretLabels {
    pub vault: String,
    pub secret: String,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub admissions: Family<ResultLabels, Counter>,
    pub admission_seconds: Histogram,
    pub keyvault_requests: Family<ResultLabels, Counter>,
    pub cache: Family<CacheLabels, Counter>,
    pub secrets_created: Counter,
    pub vault_up: Family<VaultLabels, Gauge>,
    pub rotations: Counter,
    pub rollouts: Counter,
    pub sync_age_seconds: Gauge,
    pub secrets_collected: Counter,
    pub certificate_expiry: Gauge,
    pub access_mode: Family<ModeLabels, Gauge>,
    pub access_policies: Gauge,
    pub access_denials: Counter,
    pub access_revoked: Gauge,
    pub rotation_leader: Gauge,
    pub runtime_tasks: Gauge,
    pub resident_memory: Gauge,
    pub keyvault_list_pages: Counter,
    pub secrets_recreated: Counter,
    pub rollouts_halted: Counter,
    pub sweep_age_seconds: Gauge,
    /// Unix time of the oldest successful check among followed references (0: none yet),
    /// set by the controller; the sync-age gauge is computed from it at each scrape, so it
    /// grows while a sweep hangs.
    pub oldest_success: Arc<AtomicI64>,
    /// Unix time the controller last completed a sweep, or started leading (0: not leading).
    pub last_sweep: Arc<AtomicI64>,
    pub keyvault_secret_missing: Family<SecretLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kvinject");
        let admissions = Family::<ResultLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission reviews answered, by result (patched, allowed, denied, invalid)",
            admissions.clone(),
        );
        let admission_seconds =
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        registry.register(
            "admission_duration_seconds",
            "Time to answer one admission review",
            admission_seconds.clone(),
        );
        let keyvault_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "keyvault_requests",
            "Key Vault secret reads, by result",
            keyvault_requests.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Lookups in the materialized-Secret, value and decision caches, by hit or miss",
            cache.clone(),
        );
        let secrets_created = Counter::default();
        registry.register(
            "secrets_created",
            "Materialized Secrets created",
            secrets_created.clone(),
        );
        let vault_up = Family::<VaultLabels, Gauge>::default();
        registry.register(
            "keyvault_up",
            "1 when the last call to the vault got an answer, 0 when it could not be reached",
            vault_up.clone(),
        );
        let rotations = Counter::default();
        registry.register(
            "rotations",
            "Materialized Secrets updated to a new Key Vault version",
            rotations.clone(),
        );
        let rollouts = Counter::default();
        registry.register(
            "rollouts",
            "Workloads rolled because a Secret they use has a new version",
            rollouts.clone(),
        );
        let sync_age_seconds = Gauge::default();
        registry.register(
            "secret_sync_age_seconds",
            "Age of the oldest successful version check among followed references (staleness)",
            sync_age_seconds.clone(),
        );
        let secrets_collected = Counter::default();
        registry.register(
            "secrets_collected",
            "Materialized Secrets deleted after nothing referred to them for the grace period",
            secrets_collected.clone(),
        );
        let certificate_expiry = Gauge::default();
        registry.register(
            "webhook_certificate_expiry_timestamp_seconds",
            "When the serving certificate in use expires (Unix time)",
            certificate_expiry.clone(),
        );
        let access_mode = Family::<ModeLabels, Gauge>::default();
        registry.register(
            "access_policy_mode",
            "1 for the --access-policy mode in force (required: AccessPolicy objects grant references; off: no check)",
            access_mode.clone(),
        );
        let access_policies = Gauge::default();
        registry.register(
            "access_policies",
            "AccessPolicy objects in the cache",
            access_policies.clone(),
        );
        let access_denials = Counter::default();
        registry.register(
            "access_denials",
            "Pods denied because no AccessPolicy grants a reference they use",
            access_denials.clone(),
        );
        let access_revoked = Gauge::default();
        registry.register(
            "access_revoked_secrets",
            "Materialized Secrets whose grant was revoked: no longer refreshed, deleted once no pod uses them",
            access_revoked.clone(),
        );
        let rotation_leader = Gauge::default();
        registry.register(
            "rotation_leader",
            "1 while this replica holds the rotation Lease (the controller acts), 0 otherwise",
            rotation_leader.clone(),
        );
        let runtime_tasks = Gauge::default();
        registry.register(
            "runtime_alive_tasks",
            "Tasks alive in the async runtime, at the time of the scrape (a leak shows as growth)",
            runtime_tasks.clone(),
        );
        let resident_memory = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident set size of the process, at the time of the scrape",
            resident_memory.clone(),
        );
        let keyvault_list_pages = Counter::default();
        registry.register(
            "keyvault_list_pages",
            "Pages of vault listings read by rotation sweeps (one request each, 25 secrets a page)",
            keyvault_list_pages.clone(),
        );
        let secrets_recreated = Counter::default();
        registry.register(
            "secrets_recreated",
            "Materialized Secrets recreated from Key Vault after they were deleted while a pod or a workload still used them",
            secrets_recreated.clone(),
        );
        let rollouts_halted = Counter::default();
        registry.register(
            "rollouts_halted",
            "Evict rollouts stopped because a replacement pod did not become Ready in time",
            rollouts_halted.clone(),
        );
        let sweep_age_seconds = Gauge::default();
        registry.register(
            "rotation_sweep_age_seconds",
            "On the Lease holder: seconds since the rotation controller last completed a sweep (it should stay near 1); 0 elsewhere",
            sweep_age_seconds.clone(),
        );
        let keyvault_secret_missing = Family::<SecretLabels, Gauge>::default();
        registry.register(
            "keyvault_secret_missing",
            "1 per followed Key Vault secret that the vault no longer has (deleted there); its materialized Secrets keep their value",
            keyvault_secret_missing.clone(),
        );
        Self {
            registry: Arc::new(registry),
            admissions,
            admission_seconds,
            keyvault_requests,
            cache,
            secrets_created,
            vault_up,
            rotations,
            rollouts,
            sync_age_seconds,
            secrets_collected,
            certificate_expiry,
            access_mode,
            access_policies,
            access_denials,
            access_revoked,
            rotation_leader,
            runtime_tasks,
            resident_memory,
            keyvault_list_pages,
            secrets_recreated,
            rollouts_halted,
            sweep_age_seconds,
            oldest_success: Arc::new(AtomicI64::new(0)),
            last_sweep: Arc::new(AtomicI64::new(0)),
            keyvault_secret_missing,
        }
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The resident set size from `/proc/self/status` (Linux), in bytes.
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl Metrics {
    pub fn encode(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.runtime_tasks
                .set(i64::try_from(runtime.metrics().num_alive_tasks()).unwrap_or(i64::MAX));
        }
        if let Some(rss) = resident_bytes() {
            self.resident_memory.set(rss);
        }
        let now = unix_now();
        let oldest = self.oldest_success.load(Ordering::Relaxed);
        if oldest > 0 {
            self.sync_age_seconds.set((now - oldest).max(0));
        }
        self.sweep_age_seconds.set(self.sweep_age(now).unwrap_or(0));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Stops reporting a sync age (another replica leads and reports its own).
    pub fn forget_sync(&self) {
        self.oldest_success.store(0, Ordering::Relaxed);
        self.sync_age_seconds.set(0);
    }

    /// Seconds since the rotation controller last completed a sweep, while it leads.
    pub fn sweep_age(&self, now: i64) -> Option<i64> {
        let last = self.last_sweep.load(Ordering::Relaxed);
        (last > 0).then(|| (now - last).max(0))
    }

    /// Counts one Key Vault read by its result (`ok` or the error's label).
    pub fn keyvault_read<T>(&self, result: &Result<T, crate::keyvault::source::FetchError>) -> &'static str {
        let label = result
            .as_ref()
            .map_or_else(crate::keyvault::source::FetchError::metric_label, |_| "ok");
        self.keyvault_requests
            .get_or_create(&ResultLabels { result: label })
            .inc();
        label
    }

    /// Sets the expiry gauge from the serving certificate in use (PEM); unreadable: unchanged.
    pub fn serving_certificate(&self, pem: &str) {
        if let Some(t) = crate::certs::not_after(pem) {
            self.certificate_expiry.set(t);
        }
    }

    /// `count` hits at once (a remembered decision counts the Secrets it used).
    pub fn cache_hits(&self, cache: &'static str, count: u64) {
        self.cache
            .get_or_create(&CacheLabels { cache, result: "hit" })
            .inc_by(count);
    }

    pub fn cache(&self, cache: &'static str, hit: bool) {
        self.cache
            .get_or_create(&CacheLabels {
                cache,
                result: if hit { "hit" } else { "miss" },
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' metric helper tells "declared, no sample yet" (0) from "not declared"
    /// (a failure) by the `# TYPE` lines: families must be declared before their first sample.
    #[test]
    fn families_are_declared_before_their_first_sample() {
        let text = Metrics::default().encode();
        for declared in [
            "# TYPE kvinject_keyvault_requests counter",
            "# TYPE kvinject_admissions counter",
            "# TYPE kvinject_keyvault_secret_missing gauge",
        ] {
            assert!(text.contains(declared), "{declared} in:\n{text}");
        }
        assert!(
            !text.contains("kvinject_keyvault_requests_total{"),
            "and no sample yet"
        );
    }
}
