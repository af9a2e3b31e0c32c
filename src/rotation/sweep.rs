//! The sweep and its schedule: which followed references are due, narrowed by the vault's
//! listing where that is cheaper, read with bounded concurrency, and when each is due next.

use super::{ByReference, Controller, Due, Poll, Read, decide, listing, needed_for};
use crate::materialize::{self, CachedSecret, seal::Verdict};
use futures::StreamExt;
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use tokio::time::Instant;
use tracing::debug;

impl Controller {
    /// One pass: poll the references that are due, update their Secrets, then roll.
    /// `run` calls it every second while this replica leads; benchmarks call it directly.
    pub async fn sweep(&mut self) {
        let now = Instant::now();
        // Only Secrets kvinject sealed: one that merely carries the label is never filled,
        // rotated or deleted (its Event is recorded below).
        let all = self.caches.secrets.state();
        let secrets: Vec<Arc<CachedSecret>> = all
            .iter()
            .filter(|s| s.managed && s.verdict_with(&self.inject.keys) != Verdict::Foreign)
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
        self.await_written().await;
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
    pub(super) async fn narrow_by_listing<'a>(
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
    pub(super) fn listable(&self, vault: &str, by_reference: &ByReference) -> bool {
        listing::worth_listing(
            by_reference.keys().filter(|r| r.reference.vault == vault).count(),
            self.list_pages.get(vault).copied(),
        )
    }

    /// Counts a check skipped because its vault is down in this sweep as a failure.
    pub(super) fn postpone(&mut self, reference: &Read, interval: Duration, now: Instant) {
        if let Some(poll) = self.polls.get_mut(reference) {
            poll.failures += 1;
            poll.next = now + Duration::from_secs(2u64.saturating_pow(poll.failures.min(8))).min(interval);
        }
    }

    /// Checks `due` references, vault by vault. A vault's first reference is read alone:
    /// when the vault cannot be reached, its other references wait (one failed call per
    /// vault per sweep); otherwise they are read `keyvault_concurrency` at a time. Updates
    /// are written one by one afterwards. Adds to `down` and `dirty`.
    pub(super) async fn check_all(
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
}
