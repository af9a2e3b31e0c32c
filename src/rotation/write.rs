//! Writing a refreshed value: what a read means for the Secrets that follow the reference,
//! and the conditional write of each (the guard's preconditions first).

use super::{CONFLICT_TRIES, Controller, MISSING_BACKOFF_CAP, Poll, Read, decide, listing};
use crate::{
    inject::FIELD_MANAGER,
    keyvault::source::{FetchError, Fetched},
    materialize::{self, CachedSecret},
    mutate::Needed,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::PostParams, runtime::events::EventType};
use std::{collections::BTreeSet, sync::Arc, time::Duration};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How a write of a Secret's value went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Written {
    Yes,
    /// The value cannot be used (too large, not the JSON a field needs, ...): retrying the
    /// same version would not help.
    Refused,
    /// The apiserver did not take it: worth retrying soon.
    Failed,
}

/// How long rollouts wait for the cache to show the values a sweep wrote.
const WRITTEN_VISIBLE_WITHIN: Duration = Duration::from_secs(5);

impl Controller {
    /// Waits (up to `WRITTEN_VISIBLE_WITHIN`) until the Secret cache holds every write this
    /// sweep made: rollouts compare the versions the cache shows, and one that saw only the
    /// first of two values rotated together would roll the workload twice.
    pub(super) async fn await_written(&self) {
        let written = match self.written.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => return,
        };
        if written.is_empty() {
            return;
        }
        let deadline = Instant::now() + WRITTEN_VISIBLE_WITHIN;
        let visible = |(ns, name, rv): &(String, String, String)| {
            let object = kube::runtime::reflector::ObjectRef::<CachedSecret>::new(name).within(ns);
            // The write itself, or anything after it: the Secret changed again (resource
            // versions are opaque, but etcd's are numbers: a larger one is later), or is gone.
            self.caches.secrets.get(&object).is_none_or(|s| {
                s.resource_version == *rv || s.resource_version.parse::<u64>().ok() > rv.parse().ok()
            })
        };
        while !written.iter().all(visible) {
            if Instant::now() >= deadline {
                debug!("the Secret cache has not shown every write yet; rolling on what it shows");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    /// Records the result of reading `reference` (one Key Vault call) and updates the
    /// Secrets that follow it; returns the namespaces where a Secret changed, and whether
    /// the vault itself could not be used.
    pub(super) async fn apply(
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
    pub(super) async fn update(&self, secret: &CachedSecret, fetched: &Fetched) -> Written {
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
    pub(super) async fn write_value(
        &self,
        secret: &CachedSecret,
        fetched: &Fetched,
        restored: bool,
    ) -> Written {
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
                Ok(stored) => {
                    if let (Some(rv), Ok(mut written)) =
                        (stored.metadata.resource_version, self.written.lock())
                    {
                        written.push((ns.clone(), name.clone(), rv));
                    }
                    return Written::Yes;
                }
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
}

/// Rebuilds what a materialized Secret was made from, out of its own metadata: only when
/// that metadata gives back its name (`CachedSecret::made_for`), so an annotation edited by
/// hand (a registry host, a user name, a ServiceAccount) never steers what is written.
pub(super) fn needed_for(secret: &CachedSecret) -> Option<Needed> {
    let (source, identity) = secret.made_for()?;
    Some(Needed {
        secret_name: secret.name.clone(),
        source,
        identity,
    })
}
