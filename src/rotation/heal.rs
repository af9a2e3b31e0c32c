//! Self-healing, on the Lease holder.
//! - A materialized Secret deleted while a pod or a workload template still uses it is
//!   recreated from Key Vault: the same name and reference, and the version it held (a
//!   pinned reference: its version). The Secret watch reports deletions at once; each full
//!   pass also checks every workload template's Secrets (deletions before this replica led). `Recreated` on the new Secret, or
//!   `RecreateFailed` (once, then retries with backoff) while it cannot be.
//! - A followed secret that Key Vault no longer has (deleted there) keeps its materialized
//!   value: its Secrets get the `kvinject.io/missing-in-vault-since` annotation and one
//!   `SecretNotFound` Event, the webhook warns new pods, and a gauge counts it; all of that
//!   ends with a `SecretRecovered` Event when Key Vault has it again.

use super::{Controller, Read, collect::References, decide, guard, needed_for, publish};
use crate::{
    identity::WorkloadIdentity,
    inject::FIELD_MANAGER,
    keyvault::source::{FetchError, Fetched, SecretSource},
    materialize::{
        self, CachedSecret,
        seal::{self, Verdict},
    },
    metrics::SecretLabels,
    mutate::Needed,
    reference::Reference,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::events::EventType,
};
use serde_json::json;
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

type Key = (String, String);

/// A Secret that is gone while something uses it, to be recreated.
pub(super) struct Lost {
    needed: Needed,
    /// The version it held when last seen; `None` when only a template's plan knows it.
    version: Option<String>,
    failures: u32,
    next: Instant,
}

/// Of the Secrets just `deleted` and those `planned` for workload templates, the ones that
/// are not `present` now but are `referenced`, with the version each held when deleted
/// (pure). A deleted Secret whose seal says it was not kvinject's is never among them.
pub(super) fn lost_secrets(
    deleted: &[CachedSecret],
    planned: &BTreeMap<Key, Needed>,
    present: &dyn Fn(&Key) -> bool,
    referenced: &dyn Fn(&Key) -> bool,
) -> BTreeMap<Key, (Needed, Option<String>)> {
    let gone_but_used = |k: &Key| !present(k) && referenced(k);
    let mut out: BTreeMap<Key, (Needed, Option<String>)> = planned
        .iter()
        .filter(|(k, _)| gone_but_used(k))
        .map(|(k, n)| (k.clone(), (n.clone(), None)))
        .collect();
    for s in deleted {
        let key = s.key();
        if gone_but_used(&key)
            && s.verdict != Verdict::Foreign
            && let Some(needed) = needed_for(s)
        {
            out.insert(key, (needed, decide::version_of(s).map(str::to_owned)));
        }
    }
    out
}

/// kvinject's Secrets deleted while this replica leads, as its Secret watch reports them:
/// as cached (what each was made from, its version and its seal's verdict), never their data.
#[derive(Clone, Default)]
pub struct Deletions(Arc<Mutex<(bool, Vec<CachedSecret>)>>);

impl Deletions {
    /// Notes a deleted Secret, while the controller leads.
    pub fn record(&self, secret: &CachedSecret) {
        if !secret.managed {
            return;
        }
        if let Ok(mut g) = self.0.lock()
            && g.0
        {
            g.1.push(secret.clone());
        }
    }

    /// Starts (a term begins) or stops (it ends) noting deletions; forgets any noted.
    pub(super) fn set_active(&self, active: bool) {
        if let Ok(mut g) = self.0.lock() {
            *g = (active, Vec::new());
        }
    }

    fn take(&self) -> Vec<CachedSecret> {
        self.0
            .lock()
            .map(|mut g| std::mem::take(&mut g.1))
            .unwrap_or_default()
    }
}

/// One Key Vault read for recreations: the secret (without field), the version the lost
/// Secret held if it follows the current one, and as whom.
type ReadFor = (Reference, Option<String>, Option<WorkloadIdentity>);

fn read_for(needed: &Needed, version: Option<&str>) -> ReadFor {
    let reference = needed.source.reference();
    // A pinned reference carries its version; one that follows asks for the version held.
    let held = version.filter(|_| reference.version.is_none()).map(str::to_owned);
    (reference.secret(), held, needed.identity.clone())
}

/// The value to recreate with: the version the Secret held (so running pods and the new
/// Secret agree, and a later rotation rolls as usual), or the current one when that
/// version cannot be read (disabled, say).
async fn read_for_recreation(source: &dyn SecretSource, read: &ReadFor) -> Result<Fetched, FetchError> {
    let (reference, held, identity) = read;
    let Some(version) = held else {
        return source.fetch(reference, identity.as_ref()).await;
    };
    let pinned = Reference {
        version: Some(version.clone()),
        ..reference.clone()
    };
    match source.fetch(&pinned, identity.as_ref()).await {
        Err(e) if !e.is_outage() => {
            debug!(%reference, %version, error = %e, "the version last held cannot be read; recreating with the current one");
            source.fetch(reference, identity.as_ref()).await
        }
        other => other,
    }
}

/// The backoff after `failures` failed attempts, never longer than `cap`.
fn backoff(failures: u32, cap: Duration) -> Duration {
    Duration::from_secs(2u64.saturating_pow(failures.min(8))).min(cap)
}

/// A Secret that may not exist (any more), for Events about it.
fn secret_ref(key: &Key) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        namespace: Some(key.0.clone()),
        name: Some(key.1.clone()),
        ..Default::default()
    }
}

fn missing_since(secret: &CachedSecret) -> Option<&str> {
    secret.annotation(materialize::MISSING_ANNOTATION)
}

impl Controller {
    /// Notes the Secrets deleted since the last pass that are gone while a pod or a
    /// workload uses them, and (at a full pass, which also covers deletions made before this
    /// replica led) those an existing pod uses and a workload template says how to make;
    /// they are due at once. `all`: every labelled Secret in the cache; `full`: the
    /// references of a full pass (`None` between full passes).
    pub(super) fn find_lost(&mut self, all: &[Arc<CachedSecret>], full: Option<&References>, now: Instant) {
        let deleted = self.deletions.take();
        let computed;
        let references = match full {
            Some(r) => r,
            None if deleted.is_empty() => return,
            None => {
                computed = self.references();
                &computed
            }
        };
        // Borrowed: no copy of every cached Secret's name at each full pass.
        let present: HashSet<(&str, &str)> = all
            .iter()
            .map(|s| (s.namespace.as_str(), s.name.as_str()))
            .collect();
        // From templates, only what existing pods use: their Secret certainly existed (a pod
        // was admitted with it), while a template whose pods never ran may have Secrets that
        // were never made (or never could be), which is no loss to repair.
        let planned: BTreeMap<Key, Needed> = match full {
            Some(r) => r
                .templates
                .iter()
                .filter(|(k, _)| r.pods.contains(*k))
                .map(|(k, (n, _))| (k.clone(), n.clone()))
                .collect(),
            None => BTreeMap::new(),
        };
        let lost = lost_secrets(
            &deleted,
            &planned,
            &|k| present.contains(&(k.0.as_str(), k.1.as_str())),
            &|k| references.contains(k),
        );
        for (key, (needed, version)) in lost {
            // A revoked grant is no reason to bring a value back.
            if self.lost.contains_key(&key) || self.revoked_for(&key.0, &needed) {
                continue;
            }
            info!(secret = %key.1, namespace = %key.0, reference = %needed.source.reference(), "a Secret in use was deleted; recreating it");
            self.lost.insert(
                key,
                Lost {
                    needed,
                    version,
                    failures: 0,
                    next: now,
                },
            );
        }
    }

    /// Who still uses the Secret `key` (a pod, or `Kind/name` of a workload), read from the
    /// caches now; `None` when nothing does.
    fn user_of(&self, key: &Key) -> Option<String> {
        if let Some(pod) = self
            .caches
            .pods
            .state()
            .iter()
            .find(|p| p.namespace == key.0 && p.uses(&key.1))
        {
            return Some(format!("pod {}", pod.name));
        }
        self.template_needs(Some(&key.0))
            .remove(key)
            .map(|(_, workload)| workload)
    }

    /// Attempts the recreations that are due. Each is checked again against the caches
    /// before the reads and after them: a Secret that exists again (a new pod's admission
    /// made it) or that nothing uses any more is dropped, so garbage collection and
    /// recreation never act on one Secret at once. Key Vault is read once per secret
    /// version and identity, however many namespaces lost it, `keyvault_concurrency` at a
    /// time after a first read of each vault alone: when a vault cannot be reached, its
    /// other reads wait (one failed call per vault per pass).
    pub(super) async fn recreate_due(&mut self, now: Instant) {
        let due: Vec<Key> = self
            .lost
            .iter()
            .filter(|(_, l)| l.next <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut todo: Vec<(Key, Needed, Option<String>)> = Vec::new();
        for key in due {
            let Some((needed, version)) = self.lost.get(&key).map(|l| (l.needed.clone(), l.version.clone()))
            else {
                continue;
            };
            // Deleting Secrets again and again must not spend the vault's budget: one read
            // per namespace's budget, or the next sweep.
            if self.still_lost(&key, &needed).is_some() && self.reads.take(&key.0) {
                todo.push((key, needed, version));
            }
        }
        if todo.is_empty() {
            return;
        }
        let reads: BTreeSet<ReadFor> = todo.iter().map(|(_, n, v)| read_for(n, v.as_deref())).collect();
        let results = self.read_all(reads).await;
        for (key, needed, version) in todo {
            // The reads may have taken a while: look again.
            let Some(user) = self.still_lost(&key, &needed) else {
                continue;
            };
            let vault = &needed.source.reference().vault;
            let fetched = match results.get(&read_for(&needed, version.as_deref())) {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    self.recreate_failed(&key, &user, &e.to_string(), now).await;
                    continue;
                }
                None => {
                    let why = format!("Key Vault `{vault}` could not be reached");
                    self.recreate_failed(&key, &user, &why, now).await;
                    continue;
                }
            };
            match self.create_lost(&key, &needed, fetched, &user).await {
                Ok(()) => {
                    self.lost.remove(&key);
                }
                Err(why) => self.recreate_failed(&key, &user, &why, now).await,
            }
        }
    }

    /// Reads each of `reads`, vault by vault: the first alone, the rest concurrently unless
    /// it showed the vault cannot be reached (those are absent from the answer).
    async fn read_all(&self, reads: BTreeSet<ReadFor>) -> BTreeMap<ReadFor, Result<Fetched, FetchError>> {
        let mut by_vault: BTreeMap<String, Vec<ReadFor>> = BTreeMap::new();
        for r in reads {
            by_vault.entry(r.0.vault.clone()).or_default().push(r);
        }
        let mut out = BTreeMap::new();
        let concurrency = self.config.keyvault_concurrency.max(1);
        for (_, reads) in by_vault {
            let mut reads = reads.into_iter();
            let Some(first) = reads.next() else {
                continue;
            };
            let result = read_for_recreation(self.source.as_ref(), &first).await;
            self.metrics.keyvault_read(&result);
            let outage = result.as_ref().err().is_some_and(FetchError::is_outage);
            out.insert(first, result);
            if outage {
                continue;
            }
            let source = self.source.clone();
            let rest: Vec<(ReadFor, Result<Fetched, FetchError>)> = futures::stream::iter(reads)
                .map(move |r| {
                    let source = source.clone();
                    async move {
                        let result = read_for_recreation(source.as_ref(), &r).await;
                        (r, result)
                    }
                })
                .buffer_unordered(concurrency)
                .collect()
                .await;
            for (r, result) in rest {
                self.metrics.keyvault_read(&result);
                out.insert(r, result);
            }
        }
        out
    }

    /// Who still uses the lost Secret `key`, when it is still gone, still used and still
    /// granted; otherwise forgets it and answers `None`.
    fn still_lost(&mut self, key: &Key, needed: &Needed) -> Option<String> {
        let object = kube::runtime::reflector::ObjectRef::<CachedSecret>::new(&key.1).within(&key.0);
        let terminating = self
            .caches
            .namespaces
            .get(&kube::runtime::reflector::ObjectRef::new(&key.0))
            .is_none_or(|n| n.metadata.deletion_timestamp.is_some());
        let why_not = if self.caches.secrets.get(&object).is_some() {
            Some("it exists again")
        } else if terminating {
            // A namespace being deleted takes its Secrets and pods with it. (Kubernetes
            // with ordered namespace deletion removes the pods first; older ones may not.)
            Some("its namespace is gone or being deleted")
        } else if self.revoked_for(&key.0, needed) {
            Some("its grant was revoked")
        } else {
            match self.hold(&key.0, needed) {
                // Kept: decided once the policies are listed.
                Some(guard::Hold::Wait(why)) => {
                    debug!(secret = %key.1, namespace = %key.0, why, "not recreated yet");
                    return None;
                }
                Some(guard::Hold::Refuse(why)) => {
                    debug!(secret = %key.1, namespace = %key.0, why, "not recreated");
                    self.lost.remove(key);
                    return None;
                }
                None => None,
            }
        };
        let user = match why_not {
            Some(_) => None,
            None => self.user_of(key),
        };
        if user.is_none() {
            let why = why_not.unwrap_or("nothing uses it any more");
            debug!(secret = %key.1, namespace = %key.0, why, "not recreated");
            self.lost.remove(key);
        }
        user
    }

    /// Creates the Secret `key` again from `fetched`; the error says why it could not be.
    async fn create_lost(
        &self,
        key: &Key,
        needed: &Needed,
        fetched: &Fetched,
        user: &str,
    ) -> Result<(), String> {
        let desired = materialize::desired_secret(&key.0, needed, fetched, &self.inject.keys)
            .map_err(|e| e.to_string())?;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &key.0);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let reference = needed.source.reference();
        match api.create(&params, &desired).await {
            Ok(created) => {
                self.metrics.secrets_recreated.inc();
                info!(secret = %key.1, namespace = %key.0, %reference, version = %fetched.version, %user, "recreated a deleted Secret");
                let note = format!(
                    "{reference}: the Secret was deleted while {user} still used it; recreated from Key Vault (version {})",
                    fetched.version
                );
                self.event(&created, EventType::Normal, "Recreated", note).await;
                Ok(())
            }
            // Someone was first (a new pod's admission): nothing left to do.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!(secret = %key.1, namespace = %key.0, "exists again; not recreated");
                Ok(())
            }
            Err(e) => Err(format!("creating it failed: {e}")),
        }
    }

    /// Backs off a recreation; its first failure is recorded as a `RecreateFailed` Event.
    async fn recreate_failed(&mut self, key: &Key, user: &str, why: &str, now: Instant) {
        let cap = self.config.reconcile_interval;
        let Some(lost) = self.lost.get_mut(key) else {
            return;
        };
        lost.failures += 1;
        let wait = backoff(lost.failures, cap);
        lost.next = now + wait;
        let reference = lost.needed.source.reference().to_string();
        warn!(secret = %key.1, namespace = %key.0, %reference, error = %why, retry_in = ?wait, "could not recreate a deleted Secret");
        if lost.failures == 1 {
            let note = format!(
                "{reference}: the Secret was deleted while {user} still uses it, and could not be recreated: {why}; retrying"
            );
            publish(
                &self.recorder,
                &secret_ref(key),
                EventType::Warning,
                "RecreateFailed",
                note,
            )
            .await;
        }
    }

    /// Keeps the gauge of secrets Key Vault no longer has in step with the annotations on
    /// the Secrets that follow them.
    pub(super) fn count_missing(&mut self, by_reference: &super::ByReference) {
        let now: BTreeSet<SecretLabels> = by_reference
            .iter()
            .filter(|(_, secrets)| secrets.iter().any(|s| missing_since(s).is_some()))
            .map(|(r, _)| SecretLabels {
                vault: r.reference.vault.clone(),
                secret: r.reference.name.clone(),
            })
            .collect();
        for gone in self.missing.difference(&now) {
            self.metrics.keyvault_secret_missing.remove(gone);
        }
        for labels in &now {
            self.metrics.keyvault_secret_missing.get_or_create(labels).set(1);
        }
        self.missing = now;
    }

    /// Key Vault answered that `reference` does not exist: each Secret that follows it
    /// keeps its value and is marked, with one `SecretNotFound` Event when first found so.
    pub(super) async fn report_missing(&self, reference: &Read, secrets: &[Arc<CachedSecret>]) {
        let since = k8s_openapi::jiff::Timestamp::now().to_string();
        for secret in secrets.iter().filter(|s| missing_since(s).is_none()) {
            let mark = seal::Missing {
                namespace: &secret.namespace,
                name: &secret.name,
                reference: secret
                    .annotation(materialize::REFERENCE_ANNOTATION)
                    .unwrap_or_default(),
                version: decide::version_of(secret).unwrap_or_default(),
                since: &since,
            };
            let Some(signature) = seal::missing_mark(&self.inject.keys, &mark) else {
                continue;
            };
            let patch = json!({"metadata": {"annotations": {
                materialize::MISSING_ANNOTATION: since,
                materialize::MISSING_SEAL_ANNOTATION: signature,
            }}});
            if let Err(e) = self.patch_secret(secret, &patch).await {
                warn!(secret = %secret.name, namespace = %secret.namespace, error = %e, "could not mark a Secret whose Key Vault secret is gone; retrying at the next check");
                continue;
            }
            let version = decide::version_of(secret).unwrap_or("?");
            warn!(secret = %secret.name, namespace = %secret.namespace, %reference, %version, "Key Vault no longer has the secret; keeping the materialized value");
            let note = format!(
                "{reference}: Key Vault no longer has this secret (deleted in the vault?); keeping version {version}; new pods still get it, with a warning"
            );
            self.secret_event(secret, EventType::Warning, "SecretNotFound", note)
                .await;
        }
    }

    /// Key Vault has `reference` again: the marks end, each with a `SecretRecovered` Event.
    /// Secrets about to be updated to `version` lose the mark with the update itself.
    pub(super) async fn report_found(&self, reference: &Read, secrets: &[Arc<CachedSecret>], version: &str) {
        for secret in secrets.iter().filter(|s| missing_since(s).is_some()) {
            if decide::version_of(secret) == Some(version) {
                let patch = json!({"metadata": {"annotations": {
                    materialize::MISSING_ANNOTATION: null,
                    materialize::MISSING_SEAL_ANNOTATION: null,
                }}});
                if let Err(e) = self.patch_secret(secret, &patch).await {
                    warn!(secret = %secret.name, namespace = %secret.namespace, error = %e, "could not unmark a Secret whose Key Vault secret is back; retrying at the next check");
                    continue;
                }
            }
            info!(secret = %secret.name, namespace = %secret.namespace, %reference, "Key Vault has the secret again");
            let note = format!("{reference}: Key Vault has this secret again (version {version})");
            self.secret_event(secret, EventType::Normal, "SecretRecovered", note)
                .await;
        }
    }

    async fn patch_secret(
        &self,
        secret: &CachedSecret,
        patch: &serde_json::Value,
    ) -> Result<Secret, kube::Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &secret.namespace);
        api.patch(&secret.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{materialize::seal, mutate::Source};
    use serde_json::json;

    /// A deleted Secret as the watch reports it, sealed with `keys` (and checked with the
    /// keys `Keys::default()` makes: fresh ones, so only a test's own `keys` verify).
    /// The Secret is named as kvinject names it (`kvi-N` stands for it in `key`): only
    /// then does it describe itself.
    fn secret(keys: &seal::Keys, ns: &str, short: &str, reference: &str, version: &str) -> Secret {
        let name = Source::Env(Reference::parse(reference).unwrap().unwrap()).secret_name();
        assert_eq!(real(short), name, "{short} stands for {reference}");
        let mut s: Secret = serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": {materialize::MANAGED_BY_LABEL: materialize::MANAGED_BY}, "annotations": {
                materialize::REFERENCE_ANNOTATION: reference,
                materialize::VERSION_ANNOTATION: version,
            }},
            "type": "Opaque",
            "data": {"value": "c2VjcmV0"},
        }))
        .unwrap();
        seal::seal(keys, &mut s);
        s
    }

    fn needed(name: &str, reference: &str) -> Needed {
        Needed {
            secret_name: name.into(),
            source: Source::Env(Reference::parse(reference).unwrap().unwrap()),
            identity: None,
        }
    }

    /// `kvi-1` to `kvi-4`: the names of `akv://v/one` to `akv://v/four`.
    fn real(short: &str) -> String {
        let reference = match short {
            "kvi-1" => "akv://v/one",
            "kvi-2" => "akv://v/two",
            "kvi-3" => "akv://v/three",
            "kvi-4" => "akv://v/four",
            other => return other.to_owned(),
        };
        Source::Env(Reference::parse(reference).unwrap().unwrap()).secret_name()
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.into(), real(name))
    }

    #[test]
    fn only_gone_secrets_that_something_uses_are_lost() {
        let keys = seal::Keys::default();
        let deleted = [
            secret(&keys, "a", "kvi-1", "akv://v/one", "v1"),
            secret(&keys, "a", "kvi-2", "akv://v/two", "v7"),
            secret(&keys, "a", "kvi-3", "akv://v/three", "v3"),
        ];
        let planned = BTreeMap::from([
            (key("a", "kvi-1"), needed("kvi-1", "akv://v/one")),
            (key("b", "kvi-4"), needed("kvi-4", "akv://v/four")),
        ]);
        // kvi-3 is there again; kvi-2 is gone and a pod uses it; kvi-1 is gone and a
        // template uses it; kvi-4 was not deleted just now but a template plans it.
        let present = |k: &Key| k == &key("a", "kvi-3");
        let referenced = BTreeSet::from([
            key("a", "kvi-1"),
            key("a", "kvi-2"),
            key("a", "kvi-3"),
            key("b", "kvi-4"),
        ]);
        let deleted = deleted.map(|s| CachedSecret::new(&keys, &s));
        let lost = lost_secrets(&deleted, &planned, &present, &|k| referenced.contains(k));
        let summary: Vec<(Key, String, Option<String>)> = lost
            .into_iter()
            .map(|(k, (n, v))| (k, n.source.reference().to_string(), v))
            .collect();
        assert_eq!(
            summary,
            vec![
                (key("a", "kvi-1"), "akv://v/one".into(), Some("v1".into())),
                (key("a", "kvi-2"), "akv://v/two".into(), Some("v7".into())),
                (key("b", "kvi-4"), "akv://v/four".into(), None),
            ],
            "the version the deleted Secret held wins over a plan's none"
        );
    }

    #[test]
    fn a_gone_secret_nothing_uses_is_not_lost() {
        let keys = seal::Keys::default();
        let deleted = [CachedSecret::new(
            &keys,
            &secret(&keys, "a", "kvi-1", "akv://v/one", "v1"),
        )];
        let lost = lost_secrets(&deleted, &BTreeMap::new(), &|_| false, &|_| false);
        assert!(lost.is_empty());
    }

    #[test]
    fn a_deleted_secret_kvinject_did_not_seal_is_never_lost() {
        let keys = seal::Keys::default();
        let forged = secret(&seal::Keys::default(), "a", "kvi-1", "akv://v/one", "v1");
        let referenced = BTreeSet::from([key("a", "kvi-1")]);
        let lost = lost_secrets(
            &[CachedSecret::new(&keys, &forged)],
            &BTreeMap::new(),
            &|_| false,
            &|k| referenced.contains(k),
        );
        assert!(lost.is_empty());
    }

    #[test]
    fn deletions_are_noted_only_while_leading() {
        let keys = seal::Keys::default();
        let deletions = Deletions::default();
        let s = CachedSecret::new(&keys, &secret(&keys, "a", "kvi-1", "akv://v/one", "v1"));
        deletions.record(&s);
        assert!(deletions.take().is_empty(), "not leading: nothing noted");
        deletions.set_active(true);
        deletions.record(&s);
        let taken = deletions.take();
        assert_eq!(taken, vec![s]);
        assert_eq!(
            taken[0].verdict,
            Verdict::Genuine,
            "as its seal said when deleted"
        );
        assert!(deletions.take().is_empty(), "taken once");
    }

    #[test]
    fn one_read_serves_every_namespace_that_lost_the_same_version() {
        let env = needed("kvi-1", "akv://v/one");
        let field = needed("kvi-2", "akv://v/one#user");
        assert_eq!(
            read_for(&env, Some("v1")),
            read_for(&field, Some("v1")),
            "fields share a read"
        );
        assert_ne!(read_for(&env, Some("v1")), read_for(&env, Some("v2")));
        let v = "0123456789abcdef0123456789abcdef";
        let pinned = needed("kvi-3", &format!("akv://v/one/{v}"));
        assert_eq!(
            read_for(&pinned, Some(v)).1,
            None,
            "a pinned reference carries its version itself"
        );
        assert_eq!(read_for(&pinned, Some(v)).0.version.as_deref(), Some(v));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cap = Duration::from_secs(5);
        let waits: Vec<u64> = (1..=4).map(|f| backoff(f, cap).as_secs()).collect();
        assert_eq!(waits, vec![2, 4, 5, 5]);
    }
}
