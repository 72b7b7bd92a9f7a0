//! Quotas: amounts counted over calendar windows (UTC day, UTC month) against a limit.
//!
//! The port is [`QuotaStore`]. Amounts are integers: request counts, or spend in micro-units
//! of a currency (the caller converts). Implementations:
//!
//! * [`MemoryQuotaStore`]: in-process only; lost on restart.
//! * `SqlQuotaStore` (features `sqlite` / `postgres`): in-process counters as the hot path,
//!   persisted to the `quota_counters` table as deltas every flush interval (1 s by default),
//!   reloaded on first use after a restart. A crash loses at most one flush interval of
//!   increments.
//! * `RedisQuotaStore` (feature `redis` plus a SQL feature): counters in Redis, exact across
//!   every node, synced to SQL as deltas; seeded back from SQL if Redis loses them.

use async_trait::async_trait;
use std::sync::Arc;

use crate::clock::UnixMillis;
use crate::error::Result;

mod memory;
#[cfg(all(feature = "redis", any(feature = "sqlite", feature = "postgres")))]
mod redis;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
mod window;

pub use memory::MemoryQuotaStore;
#[cfg(all(feature = "redis", any(feature = "sqlite", feature = "postgres")))]
pub use redis::{QuotaCharge, RateLimitedConsume, RedisQuotaOptions, RedisQuotaStore};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sql::{QuotaDb, SqlQuotaStore};
pub use window::Window;

/// The answer to one [`QuotaStore::consume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaDecision {
    /// Whether the amount fit and was counted. A denied amount is not counted.
    pub allowed: bool,
    /// The amount used in the window, after this decision.
    pub used: u64,
    /// The limit the decision was made against.
    pub limit: u64,
    /// When the window ends and the count starts again from zero (Unix ms, exclusive).
    pub reset_at: UnixMillis,
}

impl QuotaDecision {
    /// What is left in the window: `limit - used`, at least 0.
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

/// Counters of amounts per subject over calendar windows.
///
/// Contract, held by every implementation (`tests/quota_suite.rs`):
/// * [`consume`](Self::consume) adds `amount` to the subject's counter for the `window`
///   containing `now` if the total stays within `limit`, atomically; otherwise it adds nothing
///   (a denied consumption does not count). `amount == 0` asks without counting (allowed while
///   `used <= limit`);
/// * counters of different subjects, windows (day / month) and window instances (yesterday /
///   today) are independent; a new window starts from zero;
/// * the limit is the caller's: it may change between calls (a key's quota was raised);
///   limits above [`MAX_AMOUNT`] act as `MAX_AMOUNT`;
/// * subjects should be identifiers (a key id), never secrets: they are stored as they are.
#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    /// A short name for logs and metrics (`memory`, `sqlite`, `postgres`, `redis`).
    fn name(&self) -> &'static str;

    /// Counts `amount` for `subject` in the `window` containing `now`, if it fits in `limit`.
    async fn consume(
        &self,
        subject: &str,
        window: Window,
        amount: u64,
        limit: u64,
        now: UnixMillis,
    ) -> Result<QuotaDecision>;

    /// The amount `subject` used in the `window` containing `now`.
    async fn usage(&self, subject: &str, window: Window, now: UnixMillis) -> Result<u64>;

    /// Makes every amount counted so far durable (a write-behind flush). Call it on shutdown.
    async fn flush(&self) -> Result<()>;
}

#[async_trait]
impl<Q: QuotaStore + ?Sized> QuotaStore for Arc<Q> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    async fn consume(
        &self,
        subject: &str,
        window: Window,
        amount: u64,
        limit: u64,
        now: UnixMillis,
    ) -> Result<QuotaDecision> {
        (**self).consume(subject, window, amount, limit, now).await
    }

    async fn usage(&self, subject: &str, window: Window, now: UnixMillis) -> Result<u64> {
        (**self).usage(subject, window, now).await
    }

    async fn flush(&self) -> Result<()> {
        (**self).flush().await
    }
}

/// The largest amount a counter can hold, `2^53 − 1` (about 9 × 10^15: nine billion currency
/// units in micro-units). Larger limits act as this one, so every store (Lua's numbers are
/// doubles) counts exactly the same.
pub const MAX_AMOUNT: u64 = (1 << 53) - 1;

/// One counter: a subject in one window instance.
#[derive(Debug, Clone)]
pub(crate) struct CounterKey {
    pub(crate) subject: String,
    pub(crate) window: Window,
    /// [`Window::window_start`], Unix ms.
    pub(crate) start: UnixMillis,
}

impl CounterKey {
    pub(crate) fn new(subject: &str, window: Window, now: UnixMillis) -> CounterKey {
        CounterKey {
            subject: subject.to_owned(),
            window,
            start: window.window_start(now),
        }
    }
}

/// A counter's identity as the stores' maps find it: a [`CounterKey`], or a [`CounterRef`]
/// borrowing the caller's subject, so that counting into a known counter copies nothing.
pub(crate) trait CounterId {
    /// Subject, window, window start.
    fn parts(&self) -> (&str, Window, UnixMillis);

    /// When this counter's window ends.
    fn end(&self) -> UnixMillis {
        let (_, window, start) = self.parts();
        window.window_end(start)
    }
}

/// A [`CounterKey`] that borrows its subject.
pub(crate) struct CounterRef<'a> {
    subject: &'a str,
    window: Window,
    start: UnixMillis,
}

impl<'a> CounterRef<'a> {
    pub(crate) fn new(subject: &'a str, window: Window, now: UnixMillis) -> CounterRef<'a> {
        CounterRef {
            subject,
            window,
            start: window.window_start(now),
        }
    }

    /// The owned key, to insert a counter under.
    pub(crate) fn to_key(&self) -> CounterKey {
        CounterKey {
            subject: self.subject.to_owned(),
            window: self.window,
            start: self.start,
        }
    }
}

impl CounterId for CounterKey {
    fn parts(&self) -> (&str, Window, UnixMillis) {
        (&self.subject, self.window, self.start)
    }
}

impl CounterId for CounterRef<'_> {
    fn parts(&self) -> (&str, Window, UnixMillis) {
        (self.subject, self.window, self.start)
    }
}

// A key and its borrowed form hash and compare by the same parts, as `Borrow` requires.
impl<'a> std::borrow::Borrow<dyn CounterId + 'a> for CounterKey {
    fn borrow(&self) -> &(dyn CounterId + 'a) {
        self
    }
}

impl std::hash::Hash for dyn CounterId + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn CounterId + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn CounterId + '_ {}

impl std::hash::Hash for CounterKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for CounterKey {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for CounterKey {}

/// `used + amount` when it fits in `limit`.
pub(crate) fn try_add(used: u64, amount: u64, limit: u64) -> Option<u64> {
    used.checked_add(amount).filter(|total| *total <= limit)
}

/// An in-process counter with the decision logic shared by the memory and SQL stores.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counter {
    /// The total as this process knows it.
    pub(crate) used: u64,
    /// Counted here, not yet written to the database.
    pub(crate) pending: u64,
    /// Flushes since the counter was last used.
    pub(crate) idle: u32,
    /// Created while the database was down, so its stored total is not known: `used` holds only
    /// this process's increments until a flush succeeds (SQL store only).
    pub(crate) unloaded: bool,
}

impl Counter {
    pub(crate) fn consume(
        &mut self,
        key: &dyn CounterId,
        amount: u64,
        limit: u64,
    ) -> QuotaDecision {
        self.idle = 0;
        let allowed = match try_add(self.used, amount, limit.min(MAX_AMOUNT)) {
            Some(total) => {
                self.used = total;
                self.pending = self.pending.saturating_add(amount);
                true
            }
            None => false,
        };
        QuotaDecision {
            allowed,
            used: self.used,
            limit,
            reset_at: key.end(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding() {
        assert_eq!(try_add(0, 5, 5), Some(5));
        assert_eq!(try_add(1, 5, 5), None);
        assert_eq!(try_add(5, 0, 5), Some(5));
        assert_eq!(try_add(6, 0, 5), None);
        assert_eq!(try_add(u64::MAX, 1, u64::MAX), None);
        assert_eq!(try_add(0, u64::MAX, u64::MAX), Some(u64::MAX));
    }

    #[test]
    fn a_counter_is_found_by_its_borrowed_id() {
        let map: dashmap::DashMap<CounterKey, u64> = dashmap::DashMap::new();
        let now = 1_795_392_000_000 + 5_000;
        map.insert(CounterKey::new("req:key-1", Window::Day, now), 7);
        let found = |subject: &str, window: Window, at: UnixMillis| {
            map.get(&CounterRef::new(subject, window, at) as &dyn CounterId)
                .map(|v| *v)
        };
        // Same subject and window instance (a later instant of the same day): found.
        assert_eq!(found("req:key-1", Window::Day, now + 60_000), Some(7));
        // Another subject, window kind or instance: not.
        assert_eq!(found("req:key-2", Window::Day, now), None);
        assert_eq!(found("req:key-1", Window::Month, now), None);
        assert_eq!(found("req:key-1", Window::Day, now + 86_400_000), None);
        let key = CounterRef::new("req:key-1", Window::Day, now).to_key();
        assert_eq!(key, CounterKey::new("req:key-1", Window::Day, now));
        assert_eq!(map.get(&key).map(|v| *v), Some(7));
    }

    #[test]
    fn counter_counts_only_what_fits() {
        let key = CounterKey::new("k", Window::Day, 1_000);
        let mut c = Counter::default();
        let d = c.consume(&key, 3, 5);
        assert!(d.allowed);
        assert_eq!((d.used, d.remaining(), d.reset_at), (3, 2, 86_400_000));
        assert!(!c.consume(&key, 3, 5).allowed);
        assert_eq!((c.used, c.pending), (3, 3));
        assert!(c.consume(&key, 2, 5).allowed);
        assert_eq!((c.used, c.pending), (5, 5));
    }
}
