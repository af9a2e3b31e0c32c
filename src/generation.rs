//! A count of the changes to what an admission decision reads: kvinject's Secrets, the
//! namespaces, the ServiceAccounts, the access policies and the vaults' health. Each of
//! those caches bumps it *after* it has applied a change, so a decision that read the count
//! before it read the caches, and finds the count unchanged later, was made from the caches
//! as they still are (the webhook's decision memo, `webhook::memo`, relies on this).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

#[derive(Clone, Debug, Default)]
pub struct Generation(Arc<AtomicU64>);

impl Generation {
    /// The count now. Read it before reading the caches it covers.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Records one change. Call it after the change is visible in its cache.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_count() {
        let a = Generation::default();
        let b = a.clone();
        let before = a.current();
        b.bump();
        assert_eq!(a.current(), before + 1);
    }
}
