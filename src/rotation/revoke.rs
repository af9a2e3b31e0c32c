//! Revoked grants: a materialized Secret that no AccessPolicy grants to its namespace any
//! more is no longer refreshed from Key Vault, gets one `AccessRevoked` Event, and is
//! deleted as soon as no pod uses it (no grace period: new pods are denied anyway).
//! Running pods keep running.

use super::{Controller, needed_for};
use crate::{access::grant::use_of, materialize::CachedSecret, mutate::Needed};
use kube::runtime::{events::EventType, reflector::ObjectRef};
use std::{collections::BTreeSet, sync::Arc};
use tracing::{info, warn};

type Key = (String, String);

impl Controller {
    /// kvinject's Secrets that no policy grants to their namespace, for any ServiceAccount,
    /// any more. None while access is off or the policies have not been listed yet.
    pub(super) fn revoked_now(&self, secrets: &[Arc<CachedSecret>]) -> BTreeSet<Key> {
        if self.access.as_ref().and_then(|p| p.loaded()).is_none() {
            return BTreeSet::new();
        }
        secrets
            .iter()
            .filter(|s| s.managed)
            .filter_map(|s| {
                let needed = needed_for(s)?;
                self.revoked_for(&s.namespace, &needed).then(|| s.key())
            })
            .collect()
    }

    /// Whether no policy grants what `needed` is made from to namespace `ns` any more
    /// (false while access is off or the policies have not been listed yet).
    pub(super) fn revoked_for(&self, ns: &str, needed: &Needed) -> bool {
        let Some(index) = self.access.as_ref().and_then(|p| p.loaded()) else {
            return false;
        };
        let labels = self
            .caches
            .namespaces
            .get(&ObjectRef::new(ns))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        !index.grants_namespace(ns, &labels, needed.source.reference(), use_of(&needed.source))
    }

    /// Records newly revoked Secrets, and deletes the revoked ones no pod uses.
    pub(super) async fn retire_revoked(&mut self, secrets: &[Arc<CachedSecret>], revoked: BTreeSet<Key>) {
        self.metrics
            .access_revoked
            .set(i64::try_from(revoked.len()).unwrap_or(i64::MAX));
        for secret in secrets
            .iter()
            .filter(|s| revoked.contains(&s.key()) && !self.revoked.contains(&s.key()))
        {
            let reference = needed_for(secret)
                .map(|n| n.source.reference().to_string())
                .unwrap_or_default();
            info!(secret = %secret.name, namespace = %secret.namespace, %reference, "access revoked");
            let note = format!(
                "{reference}: no AccessPolicy grants it to this namespace any more; no longer refreshed from Key Vault, deleted once no pod uses it"
            );
            self.secret_event(secret, EventType::Warning, "AccessRevoked", note)
                .await;
        }
        if revoked.is_empty() {
            self.revoked.clear();
            return;
        }
        let in_use = self.used_by_pods(None);
        for secret in secrets
            .iter()
            .filter(|s| revoked.contains(&s.key()) && !in_use.contains(&s.key()))
        {
            let (ns, name) = secret.key();
            match self.delete_as_read(secret).await {
                Ok(true) => {
                    info!(secret = %name, namespace = %ns, "deleted: access revoked and no pod uses it")
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(secret = %name, namespace = %ns, error = %e, "deleting a revoked Secret; retrying next sweep")
                }
            }
        }
        self.revoked = revoked;
    }
}
