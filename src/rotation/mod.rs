//! The rotation controller: follows Key Vault versions of materialized Secrets, updates
//! them, and rolls the workloads that opted in. Runs only on the Lease holder.

mod collect;
pub mod decide;
pub mod guard;
pub mod heal;
mod integrity;
pub mod lease;
pub mod listing;
pub mod pods;
mod revoke;
mod rollout;

use crate::{
    access::Policies,
    generation::Generation,
    inject::FIELD_MANAGER,
    keyvault::source::{FetchError, Fetched, SecretSource},
    materialize::{self, CachedSecret, seal::Verdict},
    metrics::Metrics,
    mutate::{InjectConfig, Needed},
    reference::Reference,
};
use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::{Namespace, Pod, PodTemplateSpec, Secret},
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource,
    api::PostParams,
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    future::Future,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

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

/// Watch-backed caches the controller decides from.
#[derive(Clone)]
pub struct Caches {
    pub secrets: Store<CachedSecret>,
    /// Injected pods, as much of them as the controller decides from.
    pub pods: Store<pods::PodUse>,
    pub deployments: Store<Deployment>,
    pub statefulsets: Store<StatefulSet>,
    pub daemonsets: Store<DaemonSet>,
    /// Pod templates that only count as references (collection and recreation): bare and
    /// old ReplicaSets, Jobs and CronJobs. Stored without their status.
    pub replicasets: Store<ReplicaSet>,
    pub jobs: Store<Job>,
    pub cronjobs: Store<CronJob>,
    pub namespaces: Store<Namespace>,
}

impl Caches {
    /// Waits until every cache has listed once: acting on a partial view would, for one,
    /// make garbage collection think nothing refers to anything.
    pub async fn wait_ready(&self) {
        let _ = futures::join!(
            self.secrets.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.deployments.wait_until_ready(),
            self.statefulsets.wait_until_ready(),
            self.daemonsets.wait_until_ready(),
            self.replicasets.wait_until_ready(),
            self.jobs.wait_until_ready(),
            self.cronjobs.wait_until_ready(),
            self.namespaces.wait_until_ready(),
        );
    }
}

/// What no cache of kvinject reads: managed fields (often the largest part of an object's
/// metadata) and the last-applied annotation; each object drops them before it is stored.
pub fn prune<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A watch-backed cache of every `K` matching `config`, and the future that keeps it.
/// Objects are stored pruned (`prune`).
pub fn reflect_with<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    reflect_modified(api, config, prune)
}

/// Like `reflect_with`, with `modify` applied to each object before it is stored.
fn reflect_modified<K>(
    api: Api<K>,
    config: watcher::Config,
    modify: impl FnMut(&mut K) + Send + 'static,
) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let fut = drive(reflector::reflector(writer, watcher(api, config).modify(modify)));
    (store, fut)
}

/// Keeps a reflector's stream going, with backoff; failures are logged.
fn drive<K: Send + 'static>(
    events: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
) -> BoxFuture<'static, ()> {
    Box::pin(events.default_backoff().for_each(|e| async move {
        if let Err(e) = e {
            warn!(error = %e, "watch failed; retrying");
        }
    }))
}

/// A watch event with its object turned into what the cache keeps.
fn map_event<K, T>(event: watcher::Event<K>, f: impl Fn(K) -> T) -> watcher::Event<T> {
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(f(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(f(o)),
        watcher::Event::InitApply(o) => watcher::Event::InitApply(f(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// kvinject's own Secrets (by its label), each kept as a `CachedSecret`: its seal checked
/// with `keys` once per change, its value never held. Returns the cache and the watch's
/// events (as kept), which the caller drives.
pub fn reflect_secrets(
    client: &Client,
    keys: materialize::seal::Keys,
) -> (
    Store<CachedSecret>,
    impl futures::Stream<Item = watcher::Result<watcher::Event<CachedSecret>>> + Send + use<>,
) {
    let (store, writer) = reflector::store();
    let api = Api::<Secret>::all(client.clone());
    let events = watcher(api, watcher::Config::default().labels(materialize::SELECTOR))
        .map(move |e| e.map(|e| map_event(e, |s| CachedSecret::new(&keys, &s))));
    (store, reflector::reflector(writer, events))
}

/// `reflect_with` for every object of the API, counting each change in `changes` once the
/// cache holds it (the webhook decides from these caches: `generation`).
pub fn reflect<K>(api: Api<K>, changes: Generation) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    // The reflector has applied an event to the store when it hands it on.
    let events = reflector::reflector(writer, watcher(api, watcher::Config::default()).modify(prune))
        .inspect(move |event| {
            if event.is_ok() {
                changes.bump();
            }
        });
    (store, drive(events))
}

/// Starts the reflectors the controller needs (besides the Secret and Namespace stores it
/// shares with the webhook) and returns them with the future that drives them.
pub fn watch_workloads(
    client: &Client,
    secrets: Store<CachedSecret>,
    namespaces: Store<Namespace>,
) -> (Caches, impl Future<Output = ()> + Send + use<>) {
    // Injected pods, each kept as the Secrets it uses and the interval it asks for.
    let (pods, p) = {
        let (store, writer) = reflector::store();
        let api = Api::<Pod>::all(client.clone());
        let config = watcher::Config::default().labels(&format!("{}=true", crate::mutate::INJECTED_LABEL));
        let events = watcher(api, config).map(|e| e.map(|e| map_event(e, pods::PodUse::from)));
        (store, drive(reflector::reflector(writer, events)))
    };
    // Workloads: no status, and the pod template whole only where it can use kvinject's
    // Secrets.
    let (deployments, d) = reflect_templates(Api::<Deployment>::all(client.clone()), |o| {
        o.status = None;
        o.spec.as_mut().map(|s| &mut s.template)
    });
    let (statefulsets, s) = reflect_templates(Api::<StatefulSet>::all(client.clone()), |o| {
        o.status = None;
        o.spec.as_mut().map(|s| &mut s.template)
    });
    let (daemonsets, ds) = reflect_templates(Api::<DaemonSet>::all(client.clone()), |o| {
        o.status = None;
        o.spec.as_mut().map(|s| &mut s.template)
    });
    let (replicasets, rs) = reflect_templates(Api::<ReplicaSet>::all(client.clone()), |o| {
        o.status = None;
        o.spec.as_mut().and_then(|s| s.template.as_mut())
    });
    let (jobs, j) = reflect_templates(Api::<Job>::all(client.clone()), |o| {
        o.status = None;
        o.spec.as_mut().map(|s| &mut s.template)
    });
    let (cronjobs, cj) = reflect_templates(Api::<CronJob>::all(client.clone()), |o| {
        o.status = None;
        o.spec
            .as_mut()
            .and_then(|s| s.job_template.spec.as_mut())
            .map(|s| &mut s.template)
    });
    let caches = Caches {
        secrets,
        pods,
        deployments,
        statefulsets,
        daemonsets,
        replicasets,
        jobs,
        cronjobs,
        namespaces,
    };
    let drive = async move {
        futures::future::join_all([p, d, s, ds, rs, j, cj]).await;
    };
    (caches, drive)
}

/// A cache of a kind with a pod template (Deployments, StatefulSets, DaemonSets, and those
/// whose templates only keep Secrets from collection: ReplicaSets, Jobs, CronJobs). `strip`
/// drops an object's status and gives its pod template, which is cut to a skeleton (its
/// ServiceAccount, nothing else) when it mentions nothing of kvinject's (an `akv://`
/// reference or a `kvinject.io/` annotation: a conservative text search over its JSON).
/// Such a workload consumes no Secret of kvinject's but the registry credentials its
/// namespace may give every pod, which the skeleton still plans; so what is kept depends on
/// the template alone, never on what the namespace cache held when the watch saw it, and
/// most workloads of a cluster cost little more than their metadata.
fn reflect_templates<K>(
    api: Api<K>,
    strip: fn(&mut K) -> Option<&mut PodTemplateSpec>,
) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    reflect_modified(api, watcher::Config::default(), move |o: &mut K| {
        prune(o);
        let Some(template) = strip(o) else { return };
        let mentions_kvinject =
            serde_json::to_string(template).is_ok_and(|j| j.contains("akv://") || j.contains("kvinject.io/"));
        if !mentions_kvinject {
            *template = skeleton(template);
        }
    })
}

/// What planning a template that mentions nothing of kvinject's reads: the ServiceAccount
/// its pods run as (for the identity of a namespace's registry credentials).
fn skeleton(template: &PodTemplateSpec) -> PodTemplateSpec {
    let service_account = template
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone());
    PodTemplateSpec {
        metadata: None,
        spec: Some(k8s_openapi::api::core::v1::PodSpec {
            service_account_name: service_account,
            ..Default::default()
        }),
    }
}

/// How a write of a Secret's value went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Written {
    Yes,
    /// The value cannot be used (too large, not the JSON a field needs, ...): retrying the
    /// same version would not help.
    Refused,
    /// The apiserver did not take it: worth retrying soon.
    Failed,
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
    identities: Option<crate::inject::ServiceAccounts>,
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
    pub fn with_identities(mut self, identities: crate::inject::ServiceAccounts) -> Self {
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

    /// One pass: poll the references that are due, update their Secrets, then roll.
    /// `run` calls it every second while this replica leads; benchmarks call it directly.
    pub async fn sweep(&mut self) {
        let now = Instant::now();
        // Only Secrets kvinject sealed: one that merely carries the label is never filled,
        // rotated or deleted (its Event is recorded below).
        let all = self.caches.secrets.state();
        let secrets: Vec<Arc<CachedSecret>> = all
            .iter()
            .filter(|s| s.managed && s.verdict != Verdict::Foreign)
            .cloned()
            .collect();
        // A Secret whose grant was revoked is never read for again.
        let revoked = self.revoked_now(&secrets);
        let mut by_reference = ByReference::new();
        for s in secrets.iter().filter(|s| s.managed) {
            if !revoked.is_empty() && revoked.contains(&s.key()) {
                continue;
            }
            if let Some(reference) = decide::followed_reference(s).map(|r| r.secret()) {
                // Read as a workload's identity only when the Secret says whose.
                let identity = s
                    .annotation(materialize::CLIENT_ID_ANNOTATION)
                    .and_then(|_| needed_for(s))
                    .and_then(|n| n.identity);
                let read = Read {
                    reference,
                    identity: identity.map(Box::new),
                };
                let read = match self.polls.get_key_value(&read) {
                    Some((shared, _)) => shared.clone(),
                    None => Arc::new(read),
                };
                by_reference.entry(read).or_default().push(s.clone());
            }
        }
        self.count_missing(&by_reference);
        self.polls.retain(|r, _| by_reference.contains_key(r));
        let asked = decide::requested_intervals(
            self.caches.pods.state().iter().map(AsRef::as_ref),
            self.inject.min_refresh_interval,
        );
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        let mut checked: BTreeSet<Arc<Read>> = BTreeSet::new();
        // Vaults that could not be reached in this sweep: their other references wait too.
        let mut down: BTreeSet<String> = BTreeSet::new();
        // For a reference shared by several Secrets and pods, the shortest interval wins.
        let default = self.config.refresh_interval;
        let interval_of = |secrets: &[Arc<CachedSecret>]| {
            secrets
                .iter()
                .filter(|_| !asked.is_empty())
                .filter_map(|s| asked.get(&s.key()))
                .fold(default, |a, b| a.min(*b))
        };
        let mut due: Vec<Due<'_>> = Vec::new();
        for (reference, secrets) in &by_reference {
            let interval = interval_of(secrets);
            let poll = self.polls.entry(reference.clone()).or_insert_with(|| Poll {
                next: now + interval + decide::jitter(&reference.to_string(), interval),
                failures: 0,
                last_success: Some(now),
                known: None,
            });
            if poll.next <= now {
                checked.insert(reference.clone());
                due.push((reference, secrets.as_slice(), interval));
            }
        }
        if self.config.list_sweep {
            let listed;
            (due, listed) = self
                .narrow_by_listing(due, &by_reference, &interval_of, now)
                .await;
            // Every reference of a listed vault was checked, read or not.
            checked.extend(
                by_reference
                    .keys()
                    .filter(|r| listed.contains(&r.reference.vault))
                    .cloned(),
            );
            checked.extend(due.iter().map(|(r, _, _)| (*r).clone()));
        }
        self.check_all(due, &mut down, &mut dirty, now).await;
        self.listed_updated.clear();
        // Secrets rotated together should roll a workload once: when something changed,
        // check at once the other references used in the same namespaces.
        let peers: Vec<Due<'_>> = by_reference
            .iter()
            .filter(|(r, secrets)| {
                !checked.contains(*r)
                    && !down.contains(&r.reference.vault)
                    && secrets.iter().any(|s| dirty.contains(&s.namespace))
            })
            .map(|(r, secrets)| (r, secrets.as_slice(), interval_of(secrets)))
            .collect();
        self.check_all(peers, &mut down, &mut dirty, now).await;
        let end = Instant::now();
        let stalest = self
            .polls
            .values()
            .filter_map(|p| p.last_success)
            .map(|t| end.duration_since(t).as_secs())
            .max()
            .unwrap_or(0);
        let unix = crate::metrics::unix_now();
        self.metrics.oldest_success.store(
            unix - i64::try_from(stalest).unwrap_or(i64::MAX).min(unix),
            Ordering::Relaxed,
        );

        let full = self
            .last_full_reconcile
            .is_none_or(|t| now.duration_since(t) >= self.config.reconcile_interval);
        if full {
            self.last_full_reconcile = Some(now);
        }
        // One look at what refers to kvinject's Secrets, for recreation and collection.
        let references = full.then(|| self.references());
        self.find_lost(&all, references.as_ref(), now);
        self.recreate_due(now).await;
        self.restarts.store(0, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut deferred) = self.deferred.lock() {
            dirty.append(&mut deferred);
        }
        self.reconcile_workloads(if full { None } else { Some(&dirty) })
            .await;
        if let Some(references) = &references {
            self.collect_garbage(&secrets, references).await;
        }
        self.retire_revoked(&secrets, revoked).await;
        // Restores read Key Vault: once per reconcile interval, not every second.
        if full {
            self.guard_integrity(&all).await;
        }
    }

    /// For each vault with a reference due, where listing costs less than reading each
    /// reference: lists the vault once and keeps, of all its references (due or not), those
    /// the listing cannot vouch for (`listing::needs_read`); the others count as checked now.
    /// A vault whose listing fails keeps its due references as they are (read one by one).
    async fn narrow_by_listing<'a>(
        &mut self,
        due: Vec<Due<'a>>,
        by_reference: &'a ByReference,
        interval_of: &(dyn Fn(&[Arc<CachedSecret>]) -> Duration + Sync),
        now: Instant,
    ) -> (Vec<Due<'a>>, BTreeSet<String>) {
        let due_vaults: BTreeSet<String> = due.iter().map(|(r, _, _)| r.reference.vault.clone()).collect();
        let vaults: BTreeSet<String> = due_vaults
            .iter()
            .filter(|v| self.listable(v, by_reference))
            .cloned()
            .collect();
        let mut kept: Vec<Due<'a>> = due
            .into_iter()
            .filter(|(r, _, _)| !vaults.contains(&r.reference.vault))
            .collect();
        let unix_now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut listed = BTreeSet::new();
        for vault in &vaults {
            let listing = match self.source.list(vault).await {
                Ok(l) => l,
                Err(e) => {
                    debug!(vault = %vault, error = %e, "could not list the vault; reading secret by secret");
                    for (r, secrets) in by_reference.iter().filter(|(r, _)| &r.reference.vault == vault) {
                        if self.polls.get(r).is_some_and(|p| p.next <= now) {
                            kept.push((r, secrets.as_slice(), interval_of(secrets)));
                        }
                    }
                    continue;
                }
            };
            self.metrics.keyvault_list_pages.inc_by(listing.pages as u64);
            self.list_pages.insert(vault.clone(), listing.pages);
            listed.insert(vault.clone());
            let before = kept.len();
            for (r, secrets) in by_reference.iter().filter(|(r, _)| &r.reference.vault == vault) {
                let listed = listing.items.get(&r.reference.name.to_ascii_lowercase());
                // A reference whose last reads failed keeps its backoff while the listing
                // still does not show it (deleted in the vault); once listed again
                // (recovered), it is read at once.
                if listed.is_none() && self.polls.get(r).is_some_and(|p| p.failures > 0 && p.next > now) {
                    continue;
                }
                let interval = interval_of(secrets);
                if listing::needs_read(
                    self.polls.get(r).and_then(|p| p.known.as_ref()),
                    listed,
                    unix_now,
                    self.config.full_refresh_interval,
                ) {
                    self.listed_updated
                        .insert(r.clone(), listed.and_then(|l| l.updated));
                    kept.push((r, secrets.as_slice(), interval));
                } else if let Some(poll) = self.polls.get_mut(r) {
                    poll.next = now + interval;
                    poll.failures = 0;
                    poll.last_success = Some(now);
                }
            }
            debug!(vault = %vault, pages = listing.pages, items = listing.items.len(), to_read = kept.len() - before, "checked from the listing");
        }
        (kept, listed)
    }

    /// Whether `vault` (with a reference due) is checked from its listing.
    fn listable(&self, vault: &str, by_reference: &ByReference) -> bool {
        listing::worth_listing(
            by_reference.keys().filter(|r| r.reference.vault == vault).count(),
            self.list_pages.get(vault).copied(),
        )
    }

    /// Counts a check skipped because its vault is down in this sweep as a failure.
    fn postpone(&mut self, reference: &Read, interval: Duration, now: Instant) {
        if let Some(poll) = self.polls.get_mut(reference) {
            poll.failures += 1;
            poll.next = now + Duration::from_secs(2u64.saturating_pow(poll.failures.min(8))).min(interval);
        }
    }

    /// Checks `due` references, vault by vault. A vault's first reference is read alone:
    /// when the vault cannot be reached, its other references wait (one failed call per
    /// vault per sweep); otherwise they are read `keyvault_concurrency` at a time. Updates
    /// are written one by one afterwards. Adds to `down` and `dirty`.
    async fn check_all(
        &mut self,
        due: Vec<Due<'_>>,
        down: &mut BTreeSet<String>,
        dirty: &mut BTreeSet<String>,
        now: Instant,
    ) {
        let mut by_vault: BTreeMap<&str, Vec<Due<'_>>> = BTreeMap::new();
        for d in due {
            by_vault.entry(d.0.reference.vault.as_str()).or_default().push(d);
        }
        for (vault, refs) in by_vault {
            let mut refs = refs.into_iter();
            let Some((first, secrets, interval)) = refs.next() else {
                continue;
            };
            if down.contains(vault) {
                for (r, _, interval) in std::iter::once((first, secrets, interval)).chain(refs) {
                    self.postpone(r, interval, now);
                }
                continue;
            }
            let result = self
                .source
                .fetch(&first.reference, first.identity.as_deref())
                .await;
            let (changed, outage) = self.apply(first, secrets, interval, now, result).await;
            dirty.extend(changed);
            if outage {
                down.insert(vault.to_owned());
                for (r, _, interval) in refs {
                    self.postpone(r, interval, now);
                }
                continue;
            }
            // Owned inputs: the futures must not borrow from the sweep's state.
            let rest: Vec<(Arc<Read>, Vec<Arc<CachedSecret>>, Duration)> =
                refs.map(|(r, s, i)| (r.clone(), s.to_vec(), i)).collect();
            let source = self.source.clone();
            let fetched: Vec<_> = futures::stream::iter(rest)
                .map(move |(r, secrets, interval)| {
                    let source = source.clone();
                    async move {
                        let result = source.fetch(&r.reference, r.identity.as_deref()).await;
                        (r, secrets, interval, result)
                    }
                })
                .buffer_unordered(self.config.keyvault_concurrency.max(1))
                .collect()
                .await;
            for (r, secrets, interval, result) in fetched {
                let (changed, outage) = self.apply(&r, &secrets, interval, now, result).await;
                dirty.extend(changed);
                if outage {
                    down.insert(vault.to_owned());
                }
            }
        }
    }

    /// Records the result of reading `reference` (one Key Vault call) and updates the
    /// Secrets that follow it; returns the namespaces where a Secret changed, and whether
    /// the vault itself could not be used.
    async fn apply(
        &mut self,
        reference: &Arc<Read>,
        secrets: &[Arc<CachedSecret>],
        interval: Duration,
        now: Instant,
        result: Result<Fetched, crate::keyvault::source::FetchError>,
    ) -> (BTreeSet<String>, bool) {
        let mut changed = BTreeSet::new();
        let mut outage = false;
        self.metrics.keyvault_read(&result);
        let poll = self.polls.entry(reference.clone()).or_insert(Poll {
            next: now,
            failures: 0,
            last_success: None,
            known: None,
        });
        match result {
            Ok(fetched) => {
                let failures = std::mem::take(&mut poll.failures);
                poll.last_success = Some(now);
                poll.next = now + interval;
                poll.known = Some(listing::Known {
                    updated: self.listed_updated.get(reference).copied().flatten(),
                    read_at: time::OffsetDateTime::now_utc().unix_timestamp(),
                });
                self.report_found(reference, secrets, &fetched.version).await;
                let mut failed = false;
                for secret in secrets
                    .iter()
                    .filter(|s| decide::version_of(s) != Some(fetched.version.as_str()))
                {
                    match self.update(secret, &fetched).await {
                        Written::Yes => {
                            changed.insert(secret.namespace.clone());
                        }
                        Written::Failed => failed = true,
                        Written::Refused => {}
                    }
                }
                // A write the apiserver did not take is tried again at a coming sweep,
                // backing off, not a whole interval later; and read again then, whatever
                // the vault's listing shows.
                if failed && let Some(poll) = self.polls.get_mut(reference) {
                    poll.failures = failures + 1;
                    poll.next =
                        now + Duration::from_secs(2u64.saturating_pow(poll.failures.min(8))).min(interval);
                    poll.known = None;
                }
            }
            Err(e) => {
                outage = e.is_outage();
                // Keep the last values; retry sooner than the interval, backing off, or when
                // Key Vault said to (429 Retry-After).
                poll.failures += 1;
                // A secret deleted in the vault is a state, not a blip: its checks back off
                // past a short interval, up to a minute.
                let cap = match e {
                    FetchError::NotFound(_) => interval.max(MISSING_BACKOFF_CAP),
                    _ => interval,
                };
                let backoff = Duration::from_secs(2u64.saturating_pow(poll.failures.min(8))).min(cap);
                let wait = e.retry_after().map_or(backoff, |d| d.max(Duration::from_secs(1)));
                poll.next = now + wait;
                let first = poll.failures == 1;
                warn!(reference = %reference, error = %e, retry_in = ?wait, "could not check for a new version; keeping the materialized value");
                if matches!(e, FetchError::NotFound(_)) {
                    // Deleted in the vault: reported once per change, not per failure.
                    self.report_missing(reference, secrets).await;
                } else if first {
                    // An answer about this secret or this identity is not an outage.
                    let reason = if e.is_outage() {
                        "KeyVaultUnreachable"
                    } else {
                        "KeyVaultRefused"
                    };
                    for secret in secrets {
                        self.secret_event(
                            secret,
                            EventType::Warning,
                            reason,
                            format!(
                                "{reference}: {e}; keeping version {}",
                                decide::version_of(secret).unwrap_or("?")
                            ),
                        )
                        .await;
                    }
                }
            }
        }
        (changed, outage)
    }

    /// Writes the new value and version into `secret`, with a `Rotated` Event.
    async fn update(&self, secret: &CachedSecret, fetched: &Fetched) -> Written {
        let written = self.write_value(secret, fetched, false).await;
        if written != Written::Yes {
            return written;
        }
        let reference = needed_for(secret)
            .map(|n| n.source.reference().to_string())
            .unwrap_or_default();
        let from = decide::version_of(secret).unwrap_or("?").to_owned();
        info!(secret = %secret.name, namespace = %secret.namespace, %reference, %from, to = %fetched.version, "rotated");
        self.metrics.rotations.inc();
        let note = format!("{reference}: version {from} -> {}", fetched.version);
        self.secret_event(secret, EventType::Normal, "Rotated", note)
            .await;
        Written::Yes
    }

    /// Replaces `secret`'s value and version with `fetched`, sealed. A value that cannot be
    /// used keeps the old one, with a `RotationRefused` Event.
    /// `restored`: the value puts back one edited by hand (recorded, so the workloads that
    /// may have started on the edited value roll once).
    async fn write_value(&self, secret: &CachedSecret, fetched: &Fetched, restored: bool) -> Written {
        let (ns, name) = (&secret.namespace, &secret.name);
        let Some(needed) = needed_for(secret) else {
            return Written::Refused;
        };
        // The same preconditions as admission, for every write into a tenant's Secret.
        if let Some(hold) = self.hold(ns, &needed) {
            debug!(secret = %name, namespace = %ns, ?hold, "not written");
            return Written::Refused;
        }
        let desired = match materialize::desired_secret(ns, &needed, fetched, &self.inject.keys) {
            Ok(d) => d,
            Err(e) => {
                let note = format!(
                    "{e}; keeping version {}",
                    decide::version_of(secret).unwrap_or("?")
                );
                self.secret_event(secret, EventType::Warning, "RotationRefused", note)
                    .await;
                return Written::Refused;
            }
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let followed = secret.annotation(materialize::REFERENCE_ANNOTATION);
        fn reference(s: &Secret) -> Option<&str> {
            s.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(materialize::REFERENCE_ANNOTATION))
                .map(String::as_str)
        }
        // The cache holds no value, so each write is made on the Secret as it is now: read,
        // then replaced on its resourceVersion. When someone else wrote it in between (409),
        // it is read and written again, so their change (a label, say) stays; three tries,
        // then the next check.
        for attempt in 1..=CONFLICT_TRIES {
            let mut updated = match api.get(name).await {
                // Still kvinject's Secret for the same reference: written.
                Ok(current) if materialize::is_managed(&current) && reference(&current) == followed => {
                    current
                }
                Ok(_) => {
                    warn!(secret = %name, namespace = %ns, "the Secret changed owner or reference meanwhile; not written");
                    return Written::Refused;
                }
                Err(e) => {
                    warn!(secret = %name, namespace = %ns, error = %e, "could not read the Secret to write it; retrying at the next sweep");
                    return Written::Failed;
                }
            };
            updated.data = desired.data.clone();
            updated.type_ = desired.type_.clone();
            updated
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .extend(desired.metadata.annotations.clone().unwrap_or_default());
            // A value read from Key Vault just now: its secret is not missing there.
            if let Some(a) = updated.metadata.annotations.as_mut() {
                a.remove(materialize::MISSING_ANNOTATION);
                a.remove(materialize::MISSING_SEAL_ANNOTATION);
                if restored {
                    let now = k8s_openapi::jiff::Timestamp::now().to_string();
                    a.insert(materialize::RESTORED_ANNOTATION.to_owned(), now);
                } else {
                    a.remove(materialize::RESTORED_ANNOTATION);
                }
            }
            updated.metadata.managed_fields = None;
            match api.replace(name, &params, &updated).await {
                Ok(_) => return Written::Yes,
                Err(kube::Error::Api(status)) if status.code == 409 && attempt < CONFLICT_TRIES => {
                    debug!(secret = %name, namespace = %ns, attempt, "conflict; writing again on the current Secret");
                }
                Err(e) => {
                    warn!(secret = %name, namespace = %ns, error = %e, "could not update the Secret; retrying at the next sweep");
                    return Written::Failed;
                }
            }
        }
        Written::Failed
    }

    /// An Event on one of kvinject's Secrets, as the cache knows it.
    async fn secret_event(&self, secret: &CachedSecret, type_: EventType, reason: &str, note: String) {
        publish(&self.recorder, &secret.object_reference(), type_, reason, note).await;
    }

    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        publish(&self.recorder, &object.object_ref(&()), type_, reason, note).await;
    }
}

async fn publish(
    recorder: &Recorder,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Rotate".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, regarding).await {
        warn!(error = %e, reason, "could not record an event");
    }
}

/// Rebuilds what a materialized Secret was made from, out of its own metadata: only when
/// that metadata gives back its name (`CachedSecret::made_for`), so an annotation edited by
/// hand (a registry host, a user name, a ServiceAccount) never steers what is written.
fn needed_for(secret: &CachedSecret) -> Option<Needed> {
    let (source, identity) = secret.made_for()?;
    Some(Needed {
        secret_name: secret.name.clone(),
        source,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyvault::{SecretValue, source::FetchError};
    use crate::mutate::Source;
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
