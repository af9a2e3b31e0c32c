//! The rotation controller: follows Key Vault versions of materialized Secrets, updates
//! them, and rolls the workloads that opted in. Runs only on the Lease holder.
//!
//! This file holds the controller itself (its settings, its state and its run loop); each
//! job it does has its own room: `caches` (the watch caches), `sweep` (which references are
//! due and reading them), `write` (a refreshed value into its Secrets), `events`, `guard`
//! (the preconditions of every write), `integrity` (edited and foreign Secrets), `heal`
//! (deleted Secrets and secrets deleted in the vault), `rollout`, `collect` (garbage
//! collection) and `revoke` (grants withdrawn).

mod caches;
mod collect;
pub mod decide;
mod events;
pub mod guard;
pub mod heal;
mod integrity;
pub mod lease;
pub mod listing;
pub mod pods;
mod revoke;
mod rollout;
mod sweep;
mod write;

pub use caches::{Caches, prune, reflect, reflect_secrets, reflect_with, watch_workloads};
use events::publish;
use write::{Written, needed_for};

use crate::{
    access::Policies, keyvault::source::SecretSource, materialize::CachedSecret, metrics::Metrics,
    mutate::InjectConfig, reference::Reference,
};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::{
    Client,
    runtime::{
        events::{Recorder, Reporter},
        reflector,
    },
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

/// Writes of one rotated value: the first, and again on the current Secret after a conflict.
const CONFLICT_TRIES: u32 = 3;
/// The longest wait between checks of a followed secret Key Vault no longer has.
const MISSING_BACKOFF_CAP: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct RotationConfig {
    /// Default interval between version checks of one Secret.
    pub refresh_interval: Duration,
    /// Roll workloads that say nothing (and whose namespace says nothing).
    pub rollout_by_default: bool,
    /// How often every opted-in workload is compared with the versions it consumes.
    pub reconcile_interval: Duration,
    /// Delete a materialized Secret nothing has referred to for this long; `None`: never.
    pub gc_grace: Option<Duration>,
    /// `evict` strategy: how long to wait for a replacement pod to become Ready.
    pub evict_ready_timeout: Duration,
    /// Workloads evicting at once, and workloads restarted per sweep, at most.
    pub max_concurrent_rollouts: usize,
    /// Check references from their vault's listing (when that costs fewer requests).
    pub list_sweep: bool,
    /// With the listing: read each reference with a GET at least this often anyway.
    pub full_refresh_interval: Duration,
    /// Key Vault reads in flight at once during a sweep (per vault, after a first read
    /// showed the vault answers).
    pub keyvault_concurrency: usize,
}

/// A reference due for a check, the Secrets that follow it, and its interval.
type Due<'a> = (&'a Arc<Read>, &'a [Arc<CachedSecret>], Duration);

/// The Secrets that follow each reference, grouped at each sweep. A reference's `Read` is
/// the one its poll state holds (one allocation per followed reference, not one per sweep).
type ByReference = BTreeMap<Arc<Read>, Vec<Arc<CachedSecret>>>;

/// One Key Vault read a sweep makes: a reference, as the identity its Secrets were read
/// with (kvinject's, or a ServiceAccount's).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Read {
    pub reference: Reference,
    /// Boxed: most reads are kvinject's own, and one is kept per followed reference.
    pub identity: Option<Box<crate::identity::WorkloadIdentity>>,
}

impl std::fmt::Display for Read {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.identity {
            None => write!(f, "{}", self.reference),
            Some(i) => write!(f, "{} as {i}", self.reference),
        }
    }
}

/// Per-reference polling state, kept only in memory: a new leader starts each reference
/// one interval (plus jitter) from when it first sees it, so leadership moves cause no
/// burst of Key Vault calls and no rollout.
struct Poll {
    next: Instant,
    failures: u32,
    last_success: Option<Instant>,
    /// What the vault's listing showed at the last read that succeeded (list-based sweep).
    known: Option<listing::Known>,
}

pub struct Controller {
    client: Client,
    config: RotationConfig,
    inject: InjectConfig,
    source: Arc<dyn SecretSource>,
    caches: Caches,
    metrics: Metrics,
    recorder: Recorder,
    polls: HashMap<Arc<Read>, Poll>,
    last_full_reconcile: Option<Instant>,
    /// Workloads with an eviction rollout under way (`kind/namespace/name`).
    evicting: Arc<std::sync::Mutex<BTreeSet<String>>>,
    /// Workloads restarted in this sweep (paced by `max_concurrent_rollouts`).
    restarts: std::sync::atomic::AtomicUsize,
    /// Namespaces with a rollout that waited for its turn: reconciled at the next sweep.
    deferred: std::sync::Mutex<BTreeSet<String>>,
    /// The Secrets this sweep wrote, at the resourceVersion each write returned: rollouts
    /// wait for the cache to hold them, so versions written together roll a workload once.
    written: std::sync::Mutex<Vec<(String, String, String)>>,
    leading: Option<watch::Receiver<bool>>,
    /// `None` with `--access-policy off`.
    access: Option<Policies>,
    /// Secrets (`namespace`, `name`) known to be revoked, so each gets one Event.
    revoked: BTreeSet<(String, String)>,
    /// Foreign Secrets already reported, so each gets one Event.
    foreign: BTreeSet<(String, String)>,
    /// Annotations that do not parse (retain-until, gc-grace-period), already reported: one
    /// Warning Event per object and value.
    bad_annotations: std::sync::Mutex<BTreeSet<String>>,
    /// Which identity each ServiceAccount's pods read as; `None`: kvinject's, always.
    identities: Option<crate::accounts::ServiceAccounts>,
    /// Per reference read in this sweep after a listing: the `updated` it showed.
    listed_updated: HashMap<Arc<Read>, Option<i64>>,
    /// Pages each vault's last listing took.
    list_pages: HashMap<String, usize>,
    /// kvinject's Secrets deleted while this replica leads.
    deletions: heal::Deletions,
    /// Secrets deleted while something uses them, to recreate.
    lost: BTreeMap<(String, String), heal::Lost>,
    /// Followed Key Vault secrets the vault no longer has, as the gauge shows them.
    missing: BTreeSet<crate::metrics::SecretLabels>,
    /// The namespaces kvinject acts for; `None`: every namespace (tests, benchmarks).
    scope: Option<crate::scope::Scope>,
    /// Key Vault reads a tenant can cause (a restore of a value it edited, a recreation of
    /// a Secret it deleted), per namespace: the same budget as first uses at admission.
    reads: crate::limit::ReadBuckets,
}

impl Controller {
    pub fn new(
        client: Client,
        config: RotationConfig,
        inject: InjectConfig,
        source: Arc<dyn SecretSource>,
        caches: Caches,
        metrics: Metrics,
        identity: &str,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "kvinject".into(),
                instance: Some(identity.to_owned()),
            },
        );
        Self {
            client,
            config,
            inject,
            source,
            caches,
            metrics,
            recorder,
            polls: HashMap::new(),
            last_full_reconcile: None,
            evicting: Default::default(),
            restarts: Default::default(),
            deferred: Default::default(),
            written: Default::default(),
            leading: None,
            access: None,
            revoked: BTreeSet::new(),
            foreign: BTreeSet::new(),
            bad_annotations: Default::default(),
            identities: None,
            listed_updated: HashMap::new(),
            list_pages: HashMap::new(),
            deletions: heal::Deletions::default(),
            lost: BTreeMap::new(),
            missing: BTreeSet::new(),
            scope: None,
            reads: Default::default(),
        }
    }

    /// Recreates Secrets `deletions` reports (fed by the Secret watch) when still in use.
    pub fn with_deletions(mut self, deletions: heal::Deletions) -> Self {
        self.deletions = deletions;
        self
    }

    /// Names workloads' Secrets as the webhook does for pods of their ServiceAccount.
    pub fn with_identities(mut self, identities: crate::accounts::ServiceAccounts) -> Self {
        self.identities = Some(identities);
        self
    }

    /// A namespace's annotations, from the cache.
    fn namespace_annotations(&self, ns: &str) -> BTreeMap<String, String> {
        self.caches
            .namespaces
            .get(&reflector::ObjectRef::new(ns))
            .and_then(|n| n.metadata.annotations.clone())
            .unwrap_or_default()
    }

    /// The identity a workload's pods read as (from the ServiceAccount cache).
    fn template_identity(
        &self,
        ns: &str,
        template: &PodTemplateSpec,
    ) -> Result<Option<crate::identity::WorkloadIdentity>, crate::identity::IdentityError> {
        let sa = template
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty());
        self.identity_of(ns, sa.unwrap_or(crate::access::grant::DEFAULT_SERVICE_ACCOUNT))
    }

    /// The identity pods of ServiceAccount `ns/sa` read Key Vault as, from the cache: an
    /// error is never taken for kvinject's own.
    pub(super) fn identity_of(
        &self,
        ns: &str,
        sa: &str,
    ) -> Result<Option<crate::identity::WorkloadIdentity>, crate::identity::IdentityError> {
        match &self.identities {
            // One the cache does not hold (not created yet, or deleted) is not one that says
            // nothing: no pod of it can be admitted either.
            Some(identities) if !identities.knows(ns, sa) => {
                Err(crate::identity::IdentityError::Unreadable {
                    namespace: ns.to_owned(),
                    service_account: sa.to_owned(),
                    detail: "kvinject's ServiceAccount cache does not hold it".to_owned(),
                })
            }
            Some(identities) => identities.cached(ns, sa),
            None => Ok(None),
        }
    }

    /// Follows grants: a Secret that no AccessPolicy grants any more is left alone by
    /// refreshes and deleted once no pod uses it.
    pub fn with_access(mut self, policies: Option<Policies>) -> Self {
        self.access = policies;
        self
    }

    /// Runs while `leading` says so; a replica that loses the lease stops and waits.
    pub async fn run(mut self, mut leading: watch::Receiver<bool>) {
        self.leading = Some(leading.clone());
        self.caches.wait_ready().await;
        // Which identity each ServiceAccount reads as: before any write or any look at what
        // templates need (a ServiceAccount the cache does not hold yet is no identity).
        if let Some(identities) = &self.identities {
            let _ = identities.store.wait_until_ready().await;
        }
        loop {
            while !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    return;
                }
            }
            info!("leading: rotation controller started");
            // A new term starts from what the apiserver says, not from a previous term.
            self.polls.clear();
            self.lost.clear();
            self.deletions.set_active(true);
            self.last_full_reconcile = None;
            let heartbeat = self.metrics.last_sweep.clone();
            heartbeat.store(crate::metrics::unix_now(), Ordering::Relaxed);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while *leading.borrow() {
                tokio::select! {
                    _ = tick.tick() => {
                        // Losing the Lease ends a sweep where it is (a hung call included):
                        // another replica acts now.
                        let mut lost = leading.clone();
                        tokio::select! {
                            _ = self.sweep() => heartbeat.store(crate::metrics::unix_now(), Ordering::Relaxed),
                            _ = lost.wait_for(|l| !*l) => warn!("lost the lease during a sweep; the sweep was cancelled"),
                        }
                    }
                    _ = leading.changed() => {}
                }
            }
            self.deletions.set_active(false);
            // The sweep age is the holder's; the sync age keeps growing here until another
            // replica is seen to lead (lease::run then forgets it): with no leader at all
            // (an apiserver that does not answer), staleness shows.
            heartbeat.store(0, Ordering::Relaxed);
            info!("lost the lease: rotation controller stopped");
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyvault::{
        SecretValue,
        source::{FetchError, Fetched},
    };
    use crate::{
        materialize,
        mutate::{Needed, Source},
    };
    use kube::runtime::{reflector::Store, watcher};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A Key Vault double: this tests the sweep's scheduling, which the real vault cannot
    /// show deterministically (how many reads are in flight, and which reads an outage
    /// prevents). Every read takes 20 ms; it fails as unreachable while `down`.
    #[derive(Default)]
    struct CountingVault {
        down: AtomicBool,
        calls: AtomicUsize,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
    }

    const VERSION: &str = "0123456789abcdef0123456789abcdef";

    #[async_trait::async_trait]
    impl SecretSource for CountingVault {
        async fn fetch(
            &self,
            reference: &Reference,
            _: Option<&crate::identity::WorkloadIdentity>,
        ) -> Result<Fetched, FetchError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(FetchError::Unreachable {
                    vault: reference.vault.clone(),
                    detail: "stopped".into(),
                });
            }
            Ok(Fetched {
                value: SecretValue::new("unchanged"),
                version: VERSION.into(),
            })
        }
        async fn probe(&self, _: &str) -> Result<(), FetchError> {
            Ok(())
        }
    }

    fn store_of<K>(items: Vec<K>) -> Store<K>
    where
        K: reflector::Lookup<DynamicType = ()> + Clone,
    {
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for i in items {
            writer.apply_watcher_event(&watcher::Event::InitApply(i));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        store
    }

    /// A controller over materialized Secrets for `refs` (vault, name), all due at once,
    /// whose apiserver is an address nothing listens on (no write is expected).
    fn controller(refs: &[(&str, &str)], source: Arc<CountingVault>, concurrency: usize) -> Controller {
        let inject = InjectConfig {
            vaults: ["v".to_owned(), "w".to_owned()].into(),
            ..Default::default()
        };
        let secrets = refs
            .iter()
            .map(|(vault, name)| {
                let source = Source::Env(Reference {
                    vault: (*vault).into(),
                    name: (*name).into(),
                    version: None,
                    field: None,
                });
                let needed = Needed::own_read(source);
                materialize::desired_secret(
                    "ns",
                    &needed,
                    &Fetched {
                        value: SecretValue::new("unchanged"),
                        version: VERSION.into(),
                    },
                    &inject.keys,
                )
                .map(|s| CachedSecret::new(&inject.keys, &s))
                .unwrap()
            })
            .collect();
        let caches = Caches {
            secrets: store_of(secrets),
            pods: store_of(vec![]),
            deployments: store_of(vec![]),
            statefulsets: store_of(vec![]),
            daemonsets: store_of(vec![]),
            replicasets: store_of(vec![]),
            jobs: store_of(vec![]),
            cronjobs: store_of(vec![]),
            namespaces: store_of(vec![]),
        };
        let client = Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        let config = RotationConfig {
            refresh_interval: Duration::from_millis(1),
            rollout_by_default: false,
            reconcile_interval: Duration::from_secs(3600),
            gc_grace: None,
            evict_ready_timeout: Duration::from_secs(1),
            max_concurrent_rollouts: 5,
            keyvault_concurrency: concurrency,
            list_sweep: true,
            full_refresh_interval: Duration::from_secs(3600),
        };
        Controller::new(client, config, inject, source, caches, Metrics::default(), "test")
    }

    #[tokio::test]
    async fn a_sweep_reads_a_vault_concurrently_after_a_first_read_alone() {
        let vault = Arc::new(CountingVault::default());
        let refs: Vec<(&str, String)> = (0..6).map(|i| ("v", format!("s{i}"))).collect();
        let refs: Vec<(&str, &str)> = refs.iter().map(|(v, n)| (*v, n.as_str())).collect();
        let mut c = controller(&refs, vault.clone(), 4);
        c.sweep().await; // first sight schedules
        tokio::time::sleep(Duration::from_millis(5)).await;
        c.sweep().await;
        assert_eq!(vault.calls.load(Ordering::SeqCst), 6, "one read per reference");
        assert_eq!(
            vault.max_in_flight.load(Ordering::SeqCst),
            4,
            "the five after the first, four at a time"
        );
    }

    #[tokio::test]
    async fn an_unreachable_vault_costs_one_read_per_sweep_until_it_answers() {
        let vault = Arc::new(CountingVault::default());
        vault.down.store(true, Ordering::SeqCst);
        let refs: Vec<(&str, String)> = (0..6)
            .map(|i| ("v", format!("s{i}")))
            .chain((0..3).map(|i| ("w", format!("t{i}"))))
            .collect();
        let refs: Vec<(&str, &str)> = refs.iter().map(|(v, n)| (*v, n.as_str())).collect();
        let mut c = controller(&refs, vault.clone(), 8);
        c.sweep().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        c.sweep().await;
        assert_eq!(
            vault.calls.load(Ordering::SeqCst),
            2,
            "one failed read per vault; the rest wait"
        );
        assert!(
            c.polls.values().all(|p| p.failures == 1),
            "every reference of a down vault backs off"
        );
        // Backoff is capped at the (here 1 ms) interval: the next sweep tries again, still
        // once per vault.
        tokio::time::sleep(Duration::from_millis(5)).await;
        c.sweep().await;
        assert_eq!(vault.calls.load(Ordering::SeqCst), 4);
        // The vault answers again: every reference is read in the next sweep.
        vault.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        c.sweep().await;
        assert_eq!(vault.calls.load(Ordering::SeqCst), 4 + 9);
        assert!(c.polls.values().all(|p| p.failures == 0));
    }

    #[test]
    fn a_secret_rebuilds_into_the_same_secret_for_a_new_value() {
        for source in [
            Source::Env(Reference {
                vault: "v".into(),
                name: "db".into(),
                version: None,
                field: None,
            }),
            Source::DockerConfig(Reference {
                vault: "v".into(),
                name: "acr".into(),
                version: None,
                field: None,
            }),
            Source::RegistryLogin {
                registry: "r.example".into(),
                username: "u".into(),
                password: Reference {
                    vault: "v".into(),
                    name: "sp".into(),
                    version: None,
                    field: None,
                },
            },
        ] {
            let needed = Needed::own_read(source);
            let value = |v: &str| Fetched {
                value: SecretValue::new(v),
                version: format!("{v:0>32}"),
            };
            let old = materialize::desired_secret(
                "ns",
                &needed,
                &value(r#"{"auths":{"a":{}}}"#),
                &Default::default(),
            )
            .unwrap();
            let old = CachedSecret::with_verdict(&old, materialize::seal::Verdict::Genuine);
            assert_eq!(needed_for(&old), Some(needed.clone()));
        }
    }
}
