//! Leader election on a coordination.k8s.io Lease: exactly one replica runs the rotation
//! controller. A replica that cannot renew within the lease duration stops leading; another
//! takes over once the lease has expired.

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    pub duration: Duration,
}

/// What to do with the lease as read (pure). `expired`: whether the record has stood
/// unchanged for its duration on this replica's own clock (`Observer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Ours: renew it.
    Renew,
    /// Free or expired: take it.
    Acquire,
    /// Someone else holds it and it is fresh.
    Wait,
}

pub fn step(spec: Option<&LeaseSpec>, identity: &str, expired: bool) -> Step {
    let Some(spec) = spec else { return Step::Acquire };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == identity {
        return Step::Renew;
    }
    if holder.is_empty() || expired {
        Step::Acquire
    } else {
        Step::Wait
    }
}

/// When this replica first saw the lease record as it is now, on its own monotonic clock.
/// Another replica's `renewTime` is never compared with this one's wall clock: clocks that
/// disagree by seconds would let two replicas lead at once, or none. A record counts as
/// expired once it has not changed for its `leaseDurationSeconds` since it was seen, as
/// client-go's leader election does.
#[derive(Debug, Default)]
pub struct Observer {
    seen: Option<(String, tokio::time::Instant)>,
}

impl Observer {
    pub fn expired(&mut self, spec: &LeaseSpec, now: tokio::time::Instant) -> bool {
        let record = format!(
            "{:?}\n{:?}\n{:?}",
            spec.holder_identity, spec.renew_time, spec.lease_transitions
        );
        let duration = Duration::from_secs(
            spec.lease_duration_seconds
                .unwrap_or(15)
                .max(1)
                .unsigned_abs()
                .into(),
        );
        match &self.seen {
            Some((seen, at)) if *seen == record => now.duration_since(*at) >= duration,
            _ => {
                self.seen = Some((record, now));
                false
            }
        }
    }
}

/// How long a holder keeps leading without a renewal: two thirds of the duration, so it
/// has stopped well before any other replica can count the lease as expired.
pub fn lead_for(duration: Duration) -> Duration {
    duration * 2 / 3
}

/// Campaigns for and renews the lease forever, publishing whether this replica leads.
/// `follower` is called after each round that saw another replica hold the lease.
pub async fn run(client: Client, config: LeaseConfig, leading: watch::Sender<bool>, follower: impl Fn()) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let renew_every = config.duration / 3;
    let mut last_renewal: Option<tokio::time::Instant> = None;
    let mut observer = Observer::default();
    loop {
        // Every round is bounded: an apiserver that stops answering must not keep this
        // replica believing it leads. A renewal counts from when it was asked for, as the
        // other replicas count the lease from its renewTime.
        let started = tokio::time::Instant::now();
        let ok = match tokio::time::timeout(renew_every, try_once(&api, &config, &mut observer)).await {
            Ok(Ok(held)) => {
                if !held {
                    follower();
                }
                held
            }
            Ok(Err(e)) => {
                warn!(error = %e, lease = %config.name, "lease call failed");
                false
            }
            Err(_) => {
                warn!(lease = %config.name, timeout = ?renew_every, "lease call did not answer in time");
                false
            }
        };
        let now = tokio::time::Instant::now();
        if ok {
            last_renewal = Some(started);
        }
        // Lead only while the last renewal is younger than two thirds of the duration.
        let lead = last_renewal.is_some_and(|t| now.duration_since(t) < lead_for(config.duration));
        if *leading.borrow() != lead {
            info!(identity = %config.identity, leading = lead, "rotation leadership changed");
        }
        leading.send_replace(lead);
        let pause = if lead {
            renew_every
        } else {
            renew_every.max(Duration::from_secs(1))
        };
        tokio::time::sleep(pause.saturating_sub(now.duration_since(started))).await;
    }
}

/// One read-and-write round; true when this replica holds the lease afterwards.
async fn try_once(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observer: &mut Observer,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&config.name).await?;
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let expired = spec.is_some_and(|s| observer.expired(s, tokio::time::Instant::now()));
    let step = step(spec, &config.identity, expired);
    let mut lease = match (step, current) {
        (Step::Wait, _) => return Ok(false),
        (_, Some(l)) => l,
        (_, None) => {
            let mut l = Lease::default();
            l.metadata.name = Some(config.name.clone());
            l
        }
    };
    let mut spec = lease.spec.take().unwrap_or_default();
    if step == Step::Acquire {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions =
            Some(spec.lease_transitions.unwrap_or(0) + i32::from(lease.metadata.resource_version.is_some()));
    }
    spec.lease_duration_seconds = Some(config.duration.as_secs().try_into().unwrap_or(15));
    spec.renew_time = Some(MicroTime(now));
    lease.spec = Some(spec);
    // resourceVersion makes the write conditional: two replicas cannot both win.
    let result = if lease.metadata.resource_version.is_some() {
        api.replace(&config.name, &PostParams::default(), &lease).await
    } else {
        api.create(&PostParams::default(), &lease).await
    };
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record renewed at `renewed` (a wall-clock second: only its changes matter).
    fn spec(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn steps() {
        assert_eq!(step(None, "me", false), Step::Acquire);
        assert_eq!(step(Some(&spec("me", 1)), "me", false), Step::Renew);
        assert_eq!(step(Some(&spec("other", 1)), "me", false), Step::Wait);
        assert_eq!(
            step(Some(&spec("other", 1)), "me", true),
            Step::Acquire,
            "expired"
        );
        assert_eq!(step(Some(&spec("", 1)), "me", false), Step::Acquire, "released");
    }

    #[test]
    fn expiry_is_counted_on_the_local_clock_from_when_the_record_last_changed() {
        let t0 = tokio::time::Instant::now();
        let mut observer = Observer::default();
        // A renewTime far in the past by this replica's wall clock (another node's clock is
        // behind): not expired at first sight, nor before the duration has passed here.
        let old = spec("other", 1_000_000);
        assert!(!observer.expired(&old, t0));
        assert!(!observer.expired(&old, t0 + Duration::from_secs(14)));
        assert!(observer.expired(&old, t0 + Duration::from_secs(15)));
        // A renewal (far in the future by this clock, too) starts the count again.
        let renewed = spec("other", 9_000_000_000);
        assert!(!observer.expired(&renewed, t0 + Duration::from_secs(16)));
        assert!(!observer.expired(&renewed, t0 + Duration::from_secs(30)));
        assert!(observer.expired(&renewed, t0 + Duration::from_secs(31)));
    }

    #[test]
    fn a_holder_stops_leading_well_before_others_can_take_over() {
        let duration = Duration::from_secs(15);
        assert_eq!(lead_for(duration), Duration::from_secs(10));
        assert!(lead_for(duration) < duration);
    }
}
