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

/// What to do with the lease as read, at time `now` (pure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Ours: renew it.
    Renew,
    /// Free or expired: take it.
    Acquire,
    /// Someone else holds it and it is fresh.
    Wait,
}

pub fn step(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Step {
    let Some(spec) = spec else { return Step::Acquire };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == identity {
        return Step::Renew;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let expired = match &spec.renew_time {
        Some(MicroTime(t)) => now.as_second() >= t.as_second() + duration,
        None => true,
    };
    if holder.is_empty() || expired {
        Step::Acquire
    } else {
        Step::Wait
    }
}

/// Campaigns for and renews the lease forever, publishing whether this replica leads.
/// `follower` is called after each round that saw another replica hold the lease.
pub async fn run(client: Client, config: LeaseConfig, leading: watch::Sender<bool>, follower: impl Fn()) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let renew_every = config.duration / 3;
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        // Every round is bounded: an apiserver that stops answering must not keep this
        // replica believing it leads. A renewal counts from when it was asked for, as the
        // other replicas count the lease from its renewTime.
        let started = tokio::time::Instant::now();
        let ok = match tokio::time::timeout(renew_every, try_once(&api, &config)).await {
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
        // Lead only while the last renewal is younger than the lease duration.
        let lead = last_renewal.is_some_and(|t| now.duration_since(t) < config.duration);
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
async fn try_once(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&config.name).await?;
    let step = step(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &config.identity,
        now,
    );
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

    fn spec(holder: &str, renewed_secs_ago: i64) -> LeaseSpec {
        let now = Timestamp::now();
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                Timestamp::from_second(now.as_second() - renewed_secs_ago).unwrap(),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn steps() {
        let now = Timestamp::now();
        assert_eq!(step(None, "me", now), Step::Acquire);
        assert_eq!(step(Some(&spec("me", 100)), "me", now), Step::Renew);
        assert_eq!(step(Some(&spec("other", 5)), "me", now), Step::Wait);
        assert_eq!(
            step(Some(&spec("other", 16)), "me", now),
            Step::Acquire,
            "expired"
        );
        assert_eq!(step(Some(&spec("", 1)), "me", now), Step::Acquire, "released");
    }
}
