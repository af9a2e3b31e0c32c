//! Per-namespace token buckets for first-use Key Vault reads, so one tenant cannot spend
//! the vault's throttling budget (Key Vault answers 429 per vault, for everyone) or
//! kvinject's time. The arithmetic is pure (`Bucket::take_at`); `ReadBuckets` keeps one
//! bucket per namespace behind a lock.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// A token bucket's shape: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadLimit {
    pub rate: f64,
    pub burst: u32,
}

impl ReadLimit {
    pub fn new(rate: f64, burst: u32) -> anyhow::Result<Self> {
        if !(rate.is_finite() && rate > 0.0) || burst == 0 {
            anyhow::bail!("--namespace-read-rate must be above 0 and --namespace-read-burst at least 1");
        }
        Ok(ReadLimit { rate, burst })
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Refills for the time since the last take, then takes one token if there is one.
    fn take_at(&mut self, limit: ReadLimit, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.rate).min(f64::from(limit.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One bucket per namespace; a namespace's first read finds a full bucket.
#[derive(Debug)]
pub struct ReadBuckets {
    pub limit: ReadLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Default for ReadBuckets {
    /// Generous enough never to bind in tests that do not set a limit.
    fn default() -> Self {
        Self::new(ReadLimit {
            rate: 1000.0,
            burst: 1000,
        })
    }
}

impl ReadBuckets {
    pub fn new(limit: ReadLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one read for `namespace`; false when its budget is spent.
    pub fn take(&self, namespace: &str) -> bool {
        self.take_at(namespace, Instant::now())
    }

    fn take_at(&self, namespace: &str, now: Instant) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        // Idle namespaces' buckets are full again: forget them, so the map stays small.
        if buckets.len() > 10_000 {
            let full = Duration::from_secs_f64(f64::from(self.limit.burst) / self.limit.rate);
            buckets.retain(|_, b| now.saturating_duration_since(b.at) < full);
        }
        let limit = self.limit;
        buckets
            .entry(namespace.to_owned())
            .or_insert(Bucket {
                tokens: f64::from(limit.burst),
                at: now,
            })
            .take_at(limit, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_namespace() {
        let buckets = ReadBuckets::new(ReadLimit { rate: 2.0, burst: 3 });
        let t0 = Instant::now();
        let takes = |ns: &str, at: Instant, n: usize| (0..n).filter(|_| buckets.take_at(ns, at)).count();
        assert_eq!(takes("a", t0, 5), 3, "the burst");
        assert_eq!(takes("b", t0, 2), 2, "another namespace has its own bucket");
        assert_eq!(
            takes("a", t0 + Duration::from_millis(500), 5),
            1,
            "2/s refills one in 500 ms"
        );
        assert_eq!(
            takes("a", t0 + Duration::from_secs(60), 10),
            3,
            "never more than the burst"
        );
    }
}
