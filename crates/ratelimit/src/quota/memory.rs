//! The in-process quota store.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use async_trait::async_trait;
use dashmap::DashMap;

use super::{Counter, CounterId, CounterKey, CounterRef, QuotaDecision, QuotaStore, Window};
use crate::clock::UnixMillis;
use crate::error::Result;

/// How long after its window ended a counter is still kept (so `usage` of yesterday works).
const KEEP_ENDED: i64 = 2 * 86_400_000;

/// A [`QuotaStore`] in process memory: exact on one node, lost on restart. Counters of windows
/// that ended more than two days before the latest `now` seen are dropped, so memory follows
/// the number of active subjects. Cheap to clone; clones share the counters.
///
/// ```
/// use ratelimit::{MemoryQuotaStore, QuotaStore, Window};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let quotas = MemoryQuotaStore::new();
/// let now = 1_795_392_000_000; // 2026-11-23T00:00Z
/// let d = quotas.consume("key-1", Window::Day, 1, 2, now).await.unwrap();
/// assert!(d.allowed && d.used == 1 && d.reset_at == now + 86_400_000);
/// assert!(quotas.consume("key-1", Window::Day, 1, 2, now).await.unwrap().allowed);
/// assert!(!quotas.consume("key-1", Window::Day, 1, 2, now).await.unwrap().allowed);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryQuotaStore {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    counters: DashMap<CounterKey, Counter>,
    /// The day (Unix days) of the last pruning.
    pruned_day: AtomicI64,
}

impl MemoryQuotaStore {
    /// An empty store.
    pub fn new() -> MemoryQuotaStore {
        MemoryQuotaStore::default()
    }

    /// How many counters are held.
    pub fn counters(&self) -> usize {
        self.inner.counters.len()
    }

    /// Drops counters of windows that ended more than two days before `now`. Runs by itself
    /// once per day of `now` seen by [`consume`](QuotaStore::consume).
    pub fn prune(&self, now: UnixMillis) {
        self.inner
            .counters
            .retain(|k, _| k.end().saturating_add(KEEP_ENDED) > now);
    }

    fn prune_daily(&self, now: UnixMillis) {
        let day = now.div_euclid(86_400_000);
        let last = self.inner.pruned_day.load(Ordering::Relaxed);
        if day > last
            && self
                .inner
                .pruned_day
                .compare_exchange(last, day, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.prune(now);
        }
    }
}

#[async_trait]
impl QuotaStore for MemoryQuotaStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn consume(
        &self,
        subject: &str,
        window: Window,
        amount: u64,
        limit: u64,
        now: UnixMillis,
    ) -> Result<QuotaDecision> {
        self.prune_daily(now);
        let id = CounterRef::new(subject, window, now);
        let count = |counter: &mut Counter| {
            let decision = counter.consume(&id, amount, limit);
            counter.pending = 0; // nothing to flush
            decision
        };
        // The subject is copied only for a counter's first use.
        let mut decision = match self.inner.counters.get_mut(&id as &dyn CounterId) {
            Some(mut counter) => count(&mut counter),
            None => count(&mut self.inner.counters.entry(id.to_key()).or_default()),
        };
        decision.limit = limit;
        Ok(decision)
    }

    async fn usage(&self, subject: &str, window: Window, now: UnixMillis) -> Result<u64> {
        let id = CounterRef::new(subject, window, now);
        Ok(self
            .inner
            .counters
            .get(&id as &dyn CounterId)
            .map_or(0, |c| c.used))
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn prunes_ended_windows_once_a_day() {
        let s = MemoryQuotaStore::new();
        let day = 86_400_000;
        let t0 = 1_795_392_000_000; // 2026-11-23
        s.consume("a", Window::Day, 1, 10, t0).await.unwrap();
        s.consume("a", Window::Month, 1, 10, t0).await.unwrap();
        s.consume("b", Window::Day, 1, 10, t0 + day).await.unwrap();
        assert_eq!(s.counters(), 3);
        assert_eq!(
            s.usage("a", Window::Day, t0).await.unwrap(),
            1,
            "yesterday kept"
        );
        s.consume("b", Window::Day, 1, 10, t0 + 3 * day)
            .await
            .unwrap();
        assert_eq!(
            s.counters(),
            3,
            "a/day (ended 2 days ago) dropped; b/day and a/month stay"
        );
        assert_eq!(s.usage("a", Window::Day, t0).await.unwrap(), 0);
        assert_eq!(s.usage("a", Window::Month, t0).await.unwrap(), 1);
    }
}
