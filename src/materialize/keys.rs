//! The signing keys' home: a Secret in kvinject's own namespace, created by the first
//! replica that starts and read by the others, like the bootstrap certificate.
//!
//! Layout: `data` maps key ids to 32 random bytes; the annotation `kvinject.io/current-key`
//! names the one that signs. Every key in the Secret verifies. Each replica reads the Secret
//! again every `--signing-key-reload-interval`, so rotating needs no restart and goes in two
//! phases: a key added is verified by every replica within one interval; a replica switches
//! its signing to a newly named current key only once that key has been in its own view for
//! `DISTRIBUTION_INTERVALS` intervals, so no peer that reads on the same schedule sees the
//! new seals as foreign. The rotation controller then re-seals every Secret still signed with
//! another key, and the old key can be removed.

use super::seal::{self, Keys};
use anyhow::{Context, bail};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, Client, api::PostParams};
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};
use tracing::{info, warn};

/// Label on the signing-key Secret: a Secret of that name without it is not kvinject's.
pub const KEY_LABEL: &str = "kvinject.io/signing-key";
pub const CURRENT_ANNOTATION: &str = "kvinject.io/current-key";

/// Reads the keys from `namespace/name`, creating the Secret with a first key when absent.
pub async fn load_or_create(client: &Client, namespace: &str, name: &str) -> anyhow::Result<Keys> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match api
        .get_opt(name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{name}"))?
    {
        Some(s) => s,
        None => {
            let id = format!("k{}", k8s_openapi::jiff::Timestamp::now().as_second());
            let mut s = Secret::default();
            s.metadata.name = Some(name.to_owned());
            s.metadata.labels = Some(BTreeMap::from([(KEY_LABEL.to_owned(), "true".to_owned())]));
            s.metadata.annotations = Some(BTreeMap::from([(CURRENT_ANNOTATION.to_owned(), id.clone())]));
            s.data = Some(BTreeMap::from([(id, ByteString(seal::random_key()))]));
            match api.create(&PostParams::default(), &s).await {
                Ok(created) => {
                    info!(secret = %name, %namespace, "created the signing key for materialized Secrets");
                    created
                }
                // Another replica was first: use its key.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    api.get(name).await.context("reading the signing key")?
                }
                Err(e) => return Err(e).with_context(|| format!("creating Secret {namespace}/{name}")),
            }
        }
    };
    keys_of(&secret).with_context(|| format!("Secret {namespace}/{name}"))
}

/// How many reload intervals a newly named current key waits, in a running replica, before
/// it signs: every peer reading on the same schedule has read it by then.
pub const DISTRIBUTION_INTERVALS: u32 = 3;

/// Which key a replica signs with as the Secret changes under it: pure.
#[derive(Debug)]
pub struct Rollover {
    /// When this replica first saw each key id (`None`: present when it started, taken as
    /// distributed).
    known_since: BTreeMap<String, Option<Instant>>,
    signing: String,
    delay: Duration,
}

impl Rollover {
    /// At start: the Secret's current key signs.
    pub fn at_start(current: &str, ids: &[String], delay: Duration) -> Self {
        Rollover {
            known_since: ids.iter().map(|id| (id.clone(), None)).collect(),
            signing: current.to_owned(),
            delay,
        }
    }

    /// The Secret now names `current` and holds `ids`, at `now`: the key to sign with. A key
    /// new to this replica signs once it has been known for the delay; until then the one
    /// signing keeps signing (unless it was removed: then there is nothing else to sign
    /// with).
    pub fn observe(&mut self, current: &str, ids: &[String], now: Instant) -> &str {
        self.known_since.retain(|id, _| ids.contains(id));
        for id in ids {
            self.known_since.entry(id.clone()).or_insert(Some(now));
        }
        let distributed = match self.known_since.get(current) {
            Some(None) => true,
            Some(Some(since)) => now.duration_since(*since) >= self.delay,
            None => false,
        };
        if distributed || !self.known_since.contains_key(&self.signing) {
            self.signing = current.to_owned();
        }
        &self.signing
    }
}

/// Reads the key Secret every `interval` and applies it to `keys` (shared by everything
/// that seals or verifies), switching the signing key as `Rollover` says. A read that fails
/// or a Secret that became unusable keeps the keys as they are, with a warning.
pub async fn follow(client: Client, namespace: String, name: String, keys: Keys, interval: Duration) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut rollover = Rollover::at_start(&keys.current_id(), &keys.ids(), interval * DISTRIBUTION_INTERVALS);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let read = match api.get_opt(&name).await {
            Ok(Some(secret)) => parsed(&secret),
            Ok(None) => Err(anyhow::anyhow!("it no longer exists")),
            Err(e) => Err(e.into()),
        };
        let (current, material) = match read {
            Ok(r) => r,
            Err(e) => {
                warn!(secret = %name, %namespace, error = %format!("{e:#}"), "reading the signing keys again; keeping the ones loaded");
                continue;
            }
        };
        let ids: Vec<String> = material.keys().cloned().collect();
        let (was_signing, had) = (keys.current_id(), keys.ids());
        let signing = rollover.observe(&current, &ids, Instant::now()).to_owned();
        if let Err(e) = keys.replace(&signing, material) {
            warn!(secret = %name, %namespace, error = %e, "the signing keys changed into an unusable set; keeping the ones loaded");
            continue;
        }
        if had != ids {
            info!(secret = %name, %namespace, ?ids, "signing keys changed; every one verifies");
        }
        if was_signing != signing {
            info!(secret = %name, %namespace, key = %signing, "signing with a new key");
        } else if signing != current {
            info!(secret = %name, %namespace, key = %current, "a new current key; signing with it once every replica has read it");
        }
    }
}

fn keys_of(secret: &Secret) -> anyhow::Result<Keys> {
    let (current, material) = parsed(secret)?;
    Ok(Keys::new(&current, material)?)
}

/// The current key's id and the material by id, of a Secret that is kvinject's.
fn parsed(secret: &Secret) -> anyhow::Result<(String, BTreeMap<String, Vec<u8>>)> {
    let labelled = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(KEY_LABEL))
        .map(String::as_str)
        == Some("true");
    if !labelled {
        bail!(
            "exists but was not created by kvinject (no {KEY_LABEL} label); delete it or choose another --signing-key-secret"
        );
    }
    let current = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CURRENT_ANNOTATION))
        .cloned()
        .unwrap_or_default();
    let material = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    Ok((current, material))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_new_current_key_signs_only_once_every_peer_has_had_it_for_the_delay() {
        let t0 = Instant::now();
        let delay = Duration::from_secs(90);
        let mut r = Rollover::at_start("k1", &ids(&["k1"]), delay);
        assert_eq!(r.observe("k1", &ids(&["k1"]), t0), "k1");
        // Both steps at once (k2 added and named current): k1 signs until the delay passed.
        assert_eq!(r.observe("k2", &ids(&["k1", "k2"]), t0), "k1");
        assert_eq!(r.observe("k2", &ids(&["k1", "k2"]), t0 + delay / 2), "k1");
        assert_eq!(r.observe("k2", &ids(&["k1", "k2"]), t0 + delay), "k2");
        // Two phases: k3 added first, named current after the delay: it signs at once.
        assert_eq!(r.observe("k2", &ids(&["k1", "k2", "k3"]), t0 + delay), "k2");
        assert_eq!(r.observe("k3", &ids(&["k2", "k3"]), t0 + delay * 2), "k3");
        // The signing key removed before its successor is distributed: nothing else signs.
        let mut r = Rollover::at_start("k1", &ids(&["k1"]), delay);
        assert_eq!(r.observe("k2", &ids(&["k2"]), t0), "k2");
        // A replica that starts with k2 current and k1 beside it signs with k2: the keys in
        // the Secret when it started count as distributed (the two-phase procedure).
        let mut r = Rollover::at_start("k2", &ids(&["k1", "k2"]), delay);
        assert_eq!(r.observe("k2", &ids(&["k1", "k2"]), t0), "k2");
    }

    #[test]
    fn the_secret_must_be_kvinjects_and_name_a_current_key() {
        let mut s = Secret {
            data: Some(BTreeMap::from([("k1".to_owned(), ByteString(vec![1; 32]))])),
            ..Default::default()
        };
        s.metadata.annotations = Some(BTreeMap::from([(CURRENT_ANNOTATION.to_owned(), "k1".to_owned())]));
        assert!(
            keys_of(&s)
                .unwrap_err()
                .to_string()
                .contains("was not created by kvinject")
        );
        s.metadata.labels = Some(BTreeMap::from([(KEY_LABEL.to_owned(), "true".to_owned())]));
        assert_eq!(keys_of(&s).unwrap().current_id(), "k1");
        s.metadata.annotations = Some(BTreeMap::from([(CURRENT_ANNOTATION.to_owned(), "k2".to_owned())]));
        assert!(format!("{:#}", keys_of(&s).unwrap_err()).contains("current signing key `k2`"));
    }
}
