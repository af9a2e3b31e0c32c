//! The admission shell around the pure planner: for each Secret a pod needs, reuse the
//! materialized one (no call at all), or read Key Vault once and create it.

use crate::{
    access::{
        NamespaceLabels, Policies,
        direct::{self, DirectDenied},
        grant::{self, AccessDenied, Subject},
    },
    generation::Generation,
    identity::{IdentityError, WorkloadIdentity},
    keyvault::source::{FetchError, Fetched, SecretSource},
    limit::{ReadBuckets, ReadLimit},
    materialize::{self, CachedSecret, ValueError, seal::Verdict},
    metrics::{Metrics, VaultLabels},
    mutate::{self, Denial, InjectConfig, Needed},
    reference::Reference,
    scope::Scope,
};
use async_trait::async_trait;
use json_patch::Patch;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::runtime::reflector::{ObjectRef, Store};
use moka::future::Cache;
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tracing::{debug, warn};

mod kube_writer;

pub use crate::{accounts::ServiceAccounts, materialize::FIELD_MANAGER};
pub use kube_writer::KubeWriter;
/// The annotation kubelet puts on the mirror pods of static pods.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What an admission is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Review {
    /// A pod being created: rewritten.
    Create,
    /// Containers added to a running pod: checked, never rewritten.
    EphemeralContainers,
}

/// Creates materialized Secrets.
#[async_trait]
pub trait SecretWriter: Send + Sync {
    async fn create(&self, secret: Secret) -> Result<(), WriteError>;

    /// What the apiserver holds under a name of kvinject's shape that the watch cache does
    /// not know (a pod names it itself). Unless told otherwise: nothing, which denies.
    async fn find(&self, _namespace: &str, _name: &str) -> Result<direct::Found, WriteError> {
        Ok(direct::Found::Absent)
    }

    /// Clears the garbage-collection mark of a Secret a pod is about to use, as a write
    /// conditional on `resource_version` (what the cache showed): `false` when the Secret is
    /// gone. Unless told otherwise: it is gone, and is made again.
    async fn unmark(
        &self,
        _namespace: &str,
        _name: &str,
        _resource_version: &str,
    ) -> Result<bool, WriteError> {
        Ok(false)
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "Secret {namespace}/{name} already exists and was not created by kvinject for {reference}; kvinject never takes over a Secret it did not create"
    )]
    NotOurs {
        namespace: String,
        name: String,
        reference: String,
    },
    #[error("creating Secret {namespace}/{name} failed: {detail}")]
    Api {
        namespace: String,
        name: String,
        detail: String,
    },
}

/// Why a pod is denied.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Denied {
    #[error(transparent)]
    Plan(#[from] Denial),
    #[error(transparent)]
    Access(#[from] AccessDenied),
    #[error(transparent)]
    Direct(#[from] DirectDenied),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{places}: {denied}")]
    At {
        places: String,
        #[source]
        denied: Box<Denied>,
    },
    #[error(
        "{reference} {} in namespace {namespace}, and {source}",
        .deleted_at.as_ref().map_or_else(
            || "was never materialized".to_owned(),
            |at| format!("was materialized, but its Secret was deleted at {at} (collected once nothing used it, or by hand)")
        )
    )]
    Unavailable {
        reference: String,
        namespace: String,
        /// When this replica saw the reference's Secret deleted, if it did.
        deleted_at: Option<String>,
        #[source]
        source: Box<FetchError>,
    },
    #[error("{0}")]
    Fetch(#[source] FetchError),
    #[error(transparent)]
    Value(#[from] ValueError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(
        "Secret {namespace}/{name} carries kvinject's label but was not created by kvinject, or was changed by hand; kvinject will not hand it to a pod. Delete it: the next pod gets a fresh one"
    )]
    Foreign { namespace: String, name: String },
    #[error(
        "Secret {namespace}/{name} was changed by hand; kvinject does not hand the edited value to a pod, and its rotation controller is restoring it from Key Vault (within a reconcile interval). Retry shortly"
    )]
    BeingRestored { namespace: String, name: String },
    #[error(
        "the pod carries akv:// references or names Secrets of kvinject's shape, and kvinject could not read namespace {namespace} to tell whether it acts there: {detail}"
    )]
    ScopeUnknown { namespace: String, detail: String },
    #[error(
        "Secret {namespace}/{name}, which the pod names itself, was being deleted as unused while the pod was admitted; retry: a pod with the akv:// reference gets it made again"
    )]
    Collected { namespace: String, name: String },
    #[error(
        "Secret {namespace}/{name} is kvinject's, but it was made for another reference or identity than {reference} for this pod; kvinject will not hand it out. Delete it: the next pod gets a fresh one"
    )]
    Mismatch {
        namespace: String,
        name: String,
        reference: String,
    },
    #[error(
        "namespace {namespace} asked Key Vault for more new references than its limit ({rate}/s, bursts of {burst}, --namespace-read-rate/--namespace-read-burst); {reference} was not read. Retry shortly"
    )]
    RateLimited {
        namespace: String,
        reference: String,
        rate: f64,
        burst: u32,
    },
}

/// What the webhook answers for an admitted pod.
#[derive(Debug, Default)]
pub struct Admitted {
    pub patch: Option<Patch>,
    pub warnings: Vec<String>,
    /// `Some(materialized Secrets used)` when decided from the watch caches alone: no Key
    /// Vault read, no Secret to create, no GET. Only such a decision may be remembered
    /// (`webhook::memo`); `None` for everything else.
    pub from_caches: Option<u64>,
}

/// A materialized Secret, as the webhook sees it.
struct Found {
    /// In the watch cache, not only among this process's own creations.
    cached: bool,
    version: String,
    verdict: Verdict,
    /// When Key Vault was first found not to have its secret any more.
    missing_since: Option<String>,
    /// The resourceVersion it had when garbage collection marked it unreferenced, if it is
    /// marked: a pod about to use it clears the mark on that version.
    marked_at: Option<String>,
}

/// One needed Secret, before anything is written.
enum Prepared {
    /// Already there; with a warning when its vault is unreachable or no longer has it.
    /// `cached`: found in the watch cache (not only in this process's own creations).
    Materialized { warning: Option<String>, cached: bool },
    /// To be created.
    Missing(Box<Secret>),
}

/// The last thing each vault told us: `None` when it answered, or why it could not be used.
/// A change is counted in `changes`: admissions served from the caches warn about outages.
#[derive(Clone)]
pub struct VaultHealth {
    outages: Arc<Mutex<BTreeMap<String, Option<String>>>>,
    changes: Generation,
}

impl VaultHealth {
    /// No vault heard from yet; each change counted in `changes`.
    pub fn counting(changes: Generation) -> Self {
        Self {
            outages: Arc::default(),
            changes,
        }
    }

    pub fn record(&self, vault: &str, outage: Option<String>, metrics: &Metrics) {
        metrics
            .vault_up
            .get_or_create(&VaultLabels {
                vault: vault.to_owned(),
            })
            .set(i64::from(outage.is_none()));
        if let Ok(mut map) = self.outages.lock() {
            let before = map.insert(vault.to_owned(), outage.clone());
            if before.flatten() != outage {
                self.changes.bump();
            }
        }
    }
    pub fn outage(&self, vault: &str) -> Option<String> {
        self.outages
            .lock()
            .ok()
            .and_then(|m| m.get(vault).cloned().flatten())
    }
}

pub struct Injector {
    config: InjectConfig,
    source: Arc<dyn SecretSource>,
    writer: Arc<dyn SecretWriter>,
    store: Store<CachedSecret>,
    /// Resolved values; concurrent first reads of one reference share one Key Vault call.
    /// Keyed by who reads, too: one ServiceAccount's value never serves another's.
    values: Cache<(Reference, Option<WorkloadIdentity>), Fetched>,
    /// Secrets this process created, until the watch cache shows them; concurrent first
    /// uses in one namespace share one create.
    created: Cache<(String, String), ()>,
    pub metrics: Metrics,
    pub health: VaultHealth,
    /// `None` with `--access-policy off`.
    access: Option<Policies>,
    /// Namespace labels, for the scope and the access policies.
    namespaces: Option<NamespaceLabels>,
    /// `None`: every namespace the apiserver sends (router tests).
    scope: Option<Scope>,
    /// First-use Key Vault reads per namespace.
    reads: ReadBuckets,
    /// Which identity reads for a pod's ServiceAccount; `None`: always kvinject's.
    identities: Option<ServiceAccounts>,
    /// When each of kvinject's Secrets was seen deleted (a week at most), so a denial can say
    /// a reference was materialized and collected rather than never materialized.
    deleted: Cache<(String, String), String>,
    /// Counts the changes to what `admit` reads (`with_changes`).
    changes: Generation,
}

impl Injector {
    pub fn new(
        config: InjectConfig,
        source: Arc<dyn SecretSource>,
        writer: Arc<dyn SecretWriter>,
        store: Store<CachedSecret>,
        value_ttl: Duration,
        metrics: Metrics,
    ) -> Self {
        let changes = Generation::default();
        Self {
            config,
            source,
            writer,
            store,
            values: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(value_ttl)
                .build(),
            // Only bridges the watch's lag after a create; deletions are forgotten at once.
            created: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            metrics,
            health: VaultHealth::counting(changes.clone()),
            access: None,
            namespaces: None,
            scope: None,
            reads: ReadBuckets::default(),
            identities: None,
            deleted: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(7 * 24 * 3600))
                .build(),
            changes,
        }
    }

    /// The count that the caches `admit` reads bump after each change: the watches of
    /// kvinject's Secrets, namespaces, ServiceAccounts and access policies are given it, and
    /// the vaults' health counts on it. Call before anything clones `health`.
    pub fn with_changes(mut self, changes: Generation) -> Self {
        self.health = VaultHealth::counting(changes.clone());
        self.changes = changes;
        self
    }

    pub fn changes(&self) -> &Generation {
        &self.changes
    }

    /// Reads as a pod's ServiceAccount's Azure identity where it (or the default) says so.
    pub fn with_identities(mut self, identities: ServiceAccounts) -> Self {
        self.identities = Some(identities);
        self
    }

    /// Checks every reference against the access policies before anything else.
    pub fn with_access(mut self, policies: Policies) -> Self {
        self.access = Some(policies);
        self
    }

    /// Where namespace labels come from (scope and policy selectors).
    pub fn with_namespaces(mut self, namespaces: NamespaceLabels) -> Self {
        self.namespaces = Some(namespaces);
        self
    }

    /// Acts only for the namespaces `scope` selects; others are allowed unchanged.
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// Bounds first-use Key Vault reads per namespace.
    pub fn with_read_limit(mut self, limit: ReadLimit) -> Self {
        self.reads = ReadBuckets::new(limit);
        self
    }

    pub fn source(&self) -> &Arc<dyn SecretSource> {
        &self.source
    }

    pub fn vaults(&self) -> impl Iterator<Item = &String> {
        self.config.vaults.iter()
    }

    /// Decides for one pod in `namespace`. Every Secret the pod needs is resolved and
    /// checked first; only when all are good are the missing ones created, so a denied pod
    /// leaves nothing behind. On a dry run nothing is written, and the answer is the same.
    pub async fn admit(&self, namespace: &str, pod: &Pod, dry_run: bool) -> Result<Admitted, Denied> {
        self.decide(namespace, pod, dry_run, Review::Create).await
    }

    /// Decides for containers added to a running pod (`pods/ephemeralcontainers`): nothing
    /// is rewritten, and every Secret the pod then names must be one kvinject would hand
    /// its ServiceAccount.
    pub async fn admit_ephemeral(
        &self,
        namespace: &str,
        pod: &Pod,
        dry_run: bool,
    ) -> Result<Admitted, Denied> {
        self.decide(namespace, pod, dry_run, Review::EphemeralContainers)
            .await
    }

    async fn decide(
        &self,
        namespace: &str,
        pod: &Pod,
        dry_run: bool,
        review: Review,
    ) -> Result<Admitted, Denied> {
        // kubelet's mirror of a static pod: the apiserver lets it name no Secret, and
        // kubelet would not run a rewritten one.
        if pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
        {
            return Ok(Admitted {
                patch: None,
                warnings: vec![
                    "kvinject leaves mirror pods (static pods run by kubelet) unchanged: their akv:// references are not resolved".to_owned(),
                ],
                from_caches: None,
            });
        }
        // Whether kvinject has any part in this pod: references to resolve, or Secrets of
        // kvinject's shape it names itself. Such a pod is never decided on labels that could
        // not be read.
        let concerns_kvinject = mutate::carries_references(pod)
            || direct::secrets_named(pod)
                .iter()
                .any(|n| direct::is_kvinject_name(n.name));
        let scope_unknown = |e: kube::Error| Denied::ScopeUnknown {
            namespace: namespace.to_owned(),
            detail: e.to_string(),
        };
        let (mut labels, mut namespace_annotations) = match &self.namespaces {
            Some(n) => match n.get(namespace).await {
                Ok(read) => read,
                Err(e) if concerns_kvinject => return Err(scope_unknown(e)),
                Err(e) => {
                    warn!(namespace, error = %e, "reading a namespace's labels; deciding without them");
                    Default::default()
                }
            },
            None => Default::default(),
        };
        // The apiserver sends only the namespaces the registration selects, and a pod with
        // references that is let through unchanged would keep its akv:// text (one naming
        // kvinject's Secrets would skip the check of who may): when the cache says "not
        // selected" (it may lag a label just set), ask the apiserver, and deny when that
        // cannot be answered.
        if let (Some(scope), Some(namespaces)) = (&self.scope, &self.namespaces)
            && !scope.includes(namespace, &labels)
            && concerns_kvinject
        {
            (labels, namespace_annotations) = namespaces.read(namespace).await.map_err(scope_unknown)?;
        }
        // Anything that reaches the port can POST a review naming any namespace: act only
        // for the ones the registration selects.
        if let Some(scope) = &self.scope
            && !scope.includes(namespace, &labels)
        {
            warn!(
                namespace,
                "a review for a namespace kvinject does not act for; left unchanged"
            );
            let why = format!(
                "kvinject does not act for namespace {namespace} (not selected by its namespace selector, or excluded); the pod is left unchanged"
            );
            return Ok(Admitted {
                patch: None,
                warnings: vec![why],
                from_caches: None,
            });
        }
        let identity = match &self.identities {
            Some(identities) => identities.of(namespace, grant::service_account_of(pod)).await,
            None => Ok(None),
        };
        // Registry credentials the namespace gives every pod.
        let effective = mutate::with_namespace_pull_secrets(pod, &namespace_annotations);
        let pod = effective.as_ref().unwrap_or(pod);
        // A ServiceAccount whose identity cannot be told is refused only when its pod asks
        // kvinject for something: a pod without references is none of its business.
        let (identity, unknown_identity) = match identity {
            Ok(identity) => (identity, None),
            Err(e) if mutate::carries_references(pod) => {
                // What is wrong with the pod itself first: it holds whoever reads.
                mutate::plan_as(pod, &self.config, None)?;
                return Err(e.into());
            }
            Err(e) => (None, Some(e)),
        };
        let plan = match review {
            Review::Create => mutate::plan_as(pod, &self.config, identity.as_ref())?,
            Review::EphemeralContainers => {
                mutate::refuse_ephemeral_references(pod)?;
                mutate::Plan::default()
            }
        };
        // Before any read or write, on the warm path too: a materialized Secret is no
        // reason to hand a reference to someone the policies no longer grant it to.
        let subject = Subject {
            namespace,
            labels: &labels,
            service_account: grant::service_account_of(pod),
        };
        let grants = self.access.as_ref().map(Policies::current);
        if let Some(grants) = &grants
            && let Err(denied) = grant::check_plan(grants, &subject, &plan)
        {
            self.metrics.access_denials.inc();
            return Err(denied.into());
        }
        // kvinject's Secrets reach a pod only where its plan puts them, whatever the pod
        // names itself (opted out with kvinject.io/inject: "false" included).
        // Containers added to a running pod can name Secrets only in env (they mount the
        // pod's volumes, judged when it was created): only they are judged, so a debug
        // container is not refused over what the pod itself was admitted with.
        let only_added = match review {
            Review::EphemeralContainers => Some(mutate::only_ephemeral_containers(pod)),
            Review::Create => None,
        };
        let named_by = only_added.as_ref().unwrap_or(pod);
        let (found, asked_apiserver) = self.find_named(namespace, named_by, &plan).await?;
        if let Some(e) = unknown_identity
            && found.values().any(|f| !matches!(f, direct::Found::Theirs))
        {
            return Err(e.into());
        }
        let asking = direct::Asking {
            subject: &subject,
            identity: identity.as_ref(),
            grants: grants.as_deref(),
            dry_run,
        };
        if let Err(denied) = direct::check(named_by, &plan, &asking, |name| {
            found.get(name).cloned().unwrap_or(direct::Found::Theirs)
        }) {
            self.metrics.access_denials.inc();
            return Err(denied.into());
        }
        let prepared =
            futures::future::join_all(plan.needed.iter().map(|n| self.prepare(namespace, n, dry_run))).await;
        let mut warnings = plan.warnings;
        let mut missing = Vec::new();
        let mut all_cached = true;
        for (p, needed) in prepared.into_iter().zip(&plan.needed) {
            // Name every place in the pod that uses the reference the answer is about.
            let p = p.map_err(|e| match plan.locations.get(&needed.secret_name) {
                Some(places) => Denied::At {
                    places: places.join(", "),
                    denied: Box::new(e),
                },
                None => e,
            });
            match p? {
                Prepared::Materialized { warning, cached } => {
                    warnings.extend(warning);
                    all_cached &= cached;
                }
                Prepared::Missing(secret) => missing.push(*secret),
            }
        }
        // Whether the memo may keep this decision: what it read came from the watch caches
        // alone. Looked up again after deciding: a cache that learned of an object since
        // then has also moved `changes`, so such a decision is not kept anyway.
        let mut from_caches = (missing.is_empty()
            && all_cached
            && !asked_apiserver
            && self.namespaces.as_ref().is_none_or(|n| n.knows(namespace))
            && self
                .identities
                .as_ref()
                .is_none_or(|i| i.knows(namespace, grant::service_account_of(pod))))
        .then(|| u64::try_from(plan.needed.len()).unwrap_or(u64::MAX));
        // kvinject's Secrets the pod names itself (allowed above) are used as much as the
        // plan's: the pod is labelled as one kvinject admitted, so the controller counts them,
        // and a garbage-collection mark on one is cleared as for the plan's own.
        let named_ours: Vec<&CachedSecret> = found
            .values()
            .filter_map(|f| match f {
                direct::Found::Ours(s) => Some(s),
                _ => None,
            })
            .collect();
        if !dry_run {
            for s in &named_ours {
                if s.annotation(crate::rotation::decide::UNREFERENCED_ANNOTATION)
                    .is_some()
                    && !self
                        .writer
                        .unmark(namespace, &s.name, &s.resource_version)
                        .await?
                {
                    return Err(Denied::Collected {
                        namespace: namespace.to_owned(),
                        name: s.name.clone(),
                    });
                }
            }
        }
        // A decision that wrote is not one the memo may repeat.
        if named_ours.iter().any(|s| {
            s.annotation(crate::rotation::decide::UNREFERENCED_ANNOTATION)
                .is_some()
        }) {
            from_caches = None;
        }
        let patch = match review {
            Review::Create if !named_ours.is_empty() => mutate::labelled_injected(pod, plan.patch),
            _ => plan.patch,
        };
        if !dry_run {
            futures::future::try_join_all(missing.into_iter().map(|s| self.create(namespace, s))).await?;
        }
        Ok(Admitted {
            patch,
            warnings,
            from_caches,
        })
    }

    /// What each Secret `pod` names itself (and the plan does not make) is: one of
    /// kvinject's from the watch cache, the namespace's own, or, for a name of kvinject's
    /// shape the cache does not know, what the apiserver says (also whether it was asked).
    async fn find_named(
        &self,
        namespace: &str,
        pod: &Pod,
        plan: &mutate::Plan,
    ) -> Result<(BTreeMap<String, direct::Found>, bool), Denied> {
        let mut found = BTreeMap::new();
        let mut asked = false;
        for named in direct::secrets_named(pod) {
            if found.contains_key(named.name) || plan.needed.iter().any(|n| n.secret_name == named.name) {
                continue;
            }
            let object = ObjectRef::<CachedSecret>::new(named.name).within(namespace);
            let f = match self.store.get(&object).filter(|s| s.managed) {
                Some(secret) => {
                    let mut secret = (*secret).clone();
                    secret.verdict = secret.verdict_with(&self.config.keys);
                    direct::Found::Ours(secret)
                }
                None if !direct::is_kvinject_name(named.name) => direct::Found::Theirs,
                None => {
                    asked = true;
                    self.writer.find(namespace, named.name).await?
                }
            };
            found.insert(named.name.to_owned(), f);
        }
        Ok((found, asked))
    }

    /// Finds the Secret for `needed`, or reads Key Vault and builds it. No writes.
    async fn prepare(&self, namespace: &str, needed: &Needed, dry_run: bool) -> Result<Prepared, Denied> {
        let key = (namespace.to_owned(), needed.secret_name.clone());
        let reference = needed.source.reference();
        let mut found = self.materialized(&key, needed)?;
        // Marked unreferenced: garbage collection may be deleting it right now. Clearing the
        // mark on the version it was marked at changes that version, so a delete in flight
        // (conditional on it) fails; and one that came first leaves nothing to clear, and
        // the Secret is made again below.
        if let Some(marked_at) = found.as_ref().and_then(|f| f.marked_at.clone())
            && !dry_run
        {
            match self
                .writer
                .unmark(namespace, &needed.secret_name, &marked_at)
                .await?
            {
                true => found.iter_mut().for_each(|f| f.cached = false),
                false => found = None,
            }
        }
        if let Some(found) = found {
            self.metrics.cache("secret", true);
            let Found {
                cached,
                version,
                verdict,
                missing_since,
                marked_at: _,
            } = found;
            let mut warning = self.health.outage(&reference.vault).map(|why| {
                format!("{reference}: Key Vault is unreachable ({why}); using the materialized Secret {} (version {version})", needed.secret_name)
            });
            if let Some(since) = missing_since {
                warning = Some(format!(
                    "{reference}: Key Vault no longer has this secret (not found since {since}; deleted in the vault?); using the materialized Secret {} (version {version})",
                    needed.secret_name
                ));
            }
            // A value someone wrote by hand is never handed to a pod, not even for a moment.
            if verdict == Verdict::Edited {
                return Err(Denied::BeingRestored {
                    namespace: namespace.to_owned(),
                    name: needed.secret_name.clone(),
                });
            }
            return Ok(Prepared::Materialized { warning, cached });
        }
        self.metrics.cache("secret", false);
        let fetched = match self.fetch(namespace, reference, needed.identity.as_ref()).await? {
            Ok(f) => f,
            Err(e) if e.is_outage() => {
                return Err(Denied::Unavailable {
                    reference: reference.to_string(),
                    namespace: namespace.to_owned(),
                    deleted_at: self.deleted.get(&key).await,
                    source: Box::new(e),
                });
            }
            Err(e) => return Err(Denied::Fetch(e)),
        };
        Ok(Prepared::Missing(Box::new(materialize::desired_secret(
            namespace,
            needed,
            &fetched,
            &self.config.keys,
        )?)))
    }

    /// Creates `secret`; concurrent first uses in one namespace share one create.
    async fn create(&self, namespace: &str, secret: Secret) -> Result<(), Denied> {
        let key = (
            namespace.to_owned(),
            secret.metadata.name.clone().unwrap_or_default(),
        );
        let (writer, metrics) = (self.writer.clone(), self.metrics.clone());
        self.created
            .try_get_with(key, async move {
                writer.create(secret).await?;
                metrics.secrets_created.inc();
                Ok::<_, WriteError>(())
            })
            .await
            .map_err(|e: Arc<WriteError>| Denied::Write((*e).clone()))
    }

    /// Drops the cached values of `secret`'s Key Vault secret once the rotation controller
    /// (on any replica) has marked it missing in the vault: a first use elsewhere then asks
    /// Key Vault, and is denied while the secret is gone, rather than served a deleted value.
    pub async fn forget_missing(&self, secret: &CachedSecret) {
        if secret.annotation(materialize::MISSING_ANNOTATION).is_none() {
            return;
        }
        let Some(Ok(reference)) = secret
            .annotation(materialize::REFERENCE_ANNOTATION)
            .and_then(Reference::parse)
        else {
            return;
        };
        let secret = reference.secret();
        let stale: Vec<_> = self
            .values
            .iter()
            .filter(|(k, _)| k.0.vault == secret.vault && k.0.name.eq_ignore_ascii_case(&secret.name))
            .map(|(k, _)| (*k).clone())
            .collect();
        for key in stale {
            self.values.invalidate(&key).await;
        }
    }

    /// Forgets that this process created `secret` (it was deleted).
    pub async fn forget(&self, secret: &CachedSecret) {
        let key = secret.key();
        self.created.invalidate(&key).await;
        self.deleted
            .insert(key, k8s_openapi::jiff::Timestamp::now().to_string())
            .await;
    }

    /// The version of the materialized Secret, what its seal says and whether Key Vault
    /// still has its secret, from the watch cache or our own creations. A Secret of that
    /// name that kvinject did not seal is an error: it is never handed to a pod.
    fn materialized(&self, key: &(String, String), needed: &Needed) -> Result<Option<Found>, Denied> {
        let object = ObjectRef::<CachedSecret>::new(&key.1).within(&key.0);
        if let Some(secret) = self.store.get(&object).filter(|s| s.managed) {
            let verdict = secret.verdict_with(&self.config.keys);
            if verdict == Verdict::Foreign {
                return Err(Denied::Foreign {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                });
            }
            // The name alone is not enough: what the seal says it holds, and for whom, must
            // be what the plan asks for.
            if secret.made_for() != Some((needed.source.clone(), needed.identity.clone())) {
                return Err(Denied::Mismatch {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    reference: needed.source.reference().to_string(),
                });
            }
            let annotation = |name: &str| secret.annotation(name).map(str::to_owned);
            return Ok(Some(Found {
                cached: true,
                version: annotation(materialize::VERSION_ANNOTATION).unwrap_or_default(),
                verdict,
                missing_since: annotation(materialize::MISSING_ANNOTATION),
                marked_at: secret
                    .annotation(crate::rotation::decide::UNREFERENCED_ANNOTATION)
                    .map(|_| secret.resource_version.clone()),
            }));
        }
        Ok(self.created.contains_key(key).then(|| Found {
            cached: false,
            version: "just created".to_owned(),
            verdict: Verdict::Genuine,
            missing_since: None,
            marked_at: None,
        }))
    }

    /// Reads `reference` for a first use in `namespace`: from the value cache, or from Key
    /// Vault within the namespace's read budget (the outer error).
    async fn fetch(
        &self,
        namespace: &str,
        reference: &Reference,
        identity: Option<&WorkloadIdentity>,
    ) -> Result<Result<Fetched, FetchError>, Denied> {
        // One read per secret, whatever fields of it pods use.
        let key = (reference.secret(), identity.cloned());
        if let Some(hit) = self.values.get(&key).await {
            self.metrics.cache("value", true);
            return Ok(Ok(hit));
        }
        self.metrics.cache("value", false);
        if !self.reads.take(namespace) {
            let ReadLimit { rate, burst } = self.reads.limit;
            return Err(Denied::RateLimited {
                namespace: namespace.to_owned(),
                reference: reference.to_string(),
                rate,
                burst,
            });
        }
        Ok(self.read(key).await)
    }

    async fn read(&self, key: (Reference, Option<WorkloadIdentity>)) -> Result<Fetched, FetchError> {
        let (source, metrics, health) = (self.source.clone(), self.metrics.clone(), self.health.clone());
        let (r, identity) = key.clone();
        self.values
            .try_get_with(key, async move {
                let result = source.fetch(&r, identity.as_ref()).await;
                let label = metrics.keyvault_read(&result);
                let outage = result
                    .as_ref()
                    .err()
                    .filter(|e| e.is_outage())
                    .map(ToString::to_string);
                health.record(&r.vault, outage, &metrics);
                debug!(reference = %r, result = label, "read Key Vault");
                result
            })
            .await
            .map_err(|e: Arc<FetchError>| (*e).clone())
    }

    /// Asks each vault whether it answers, so admissions served from materialized Secrets
    /// can warn about an outage without calling Key Vault themselves.
    pub async fn probe_vaults(&self) {
        for vault in self.config.vaults.iter() {
            let outage = self.source.probe(vault).await.err().map(|e| e.to_string());
            if let Some(why) = &outage {
                warn!(vault = %vault, error = %why, "Key Vault unreachable");
            }
            self.health.record(vault, outage, &self.metrics);
        }
    }
}
