//! The in-process limiter: governor's keyed GCRA, one governor limiter per distinct [`Limit`].

use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use governor::Quota;
use governor::clock::{Clock as GovernorClock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;

use crate::error::{RateLimitError, Result};
use crate::gcra::Gcra;
use crate::limiter::{Decision, Limit, RateLimiter, validate};

/// governor's keyed limiter for one [`Limit`], reporting its state after each allowed check.
type Keyed<C> =
    governor::RateLimiter<String, DashMapStateStore<String>, C, StateInformationMiddleware>;

/// A clock the local limiter can run on: governor's [`Clock`](governor::clock::Clock) trait,
/// cloneable and shareable between threads. Implemented by governor's `DefaultClock` (quanta, monotonic) and
/// by its [`FakeRelativeClock`](governor::clock::FakeRelativeClock) for tests.
pub trait LocalClock: GovernorClock<Instant: Send + Sync> + Clone + Send + Sync + 'static {}

impl<C> LocalClock for C where C: GovernorClock<Instant: Send + Sync> + Clone + Send + Sync + 'static
{}

/// An in-process [`RateLimiter`]: exact for one process, nothing shared between nodes.
///
/// Built on governor's keyed limiter (GCRA on a sharded map, no global lock): one governor
/// limiter per distinct [`Limit`], created on first use, each keyed by the caller's key. A check
/// costs well under a microsecond (`benches/local.rs`).
///
/// The per-key state grows with every key seen; call [`cleanup`](Self::cleanup) now and then
/// (or spawn [`cleanup_task`](Self::cleanup_task)) to drop keys whose bucket is full again, which
/// are indistinguishable from keys never seen.
///
/// Cheap to clone; clones share the same state. Generic over the clock only for tests: use
/// [`LocalLimiter::new`] for the real clock, [`LocalLimiter::with_clock`] with governor's
/// [`FakeRelativeClock`](governor::clock::FakeRelativeClock) to move time by hand.
///
/// ```
/// use ratelimit::{Limit, LocalLimiter};
///
/// let limiter = LocalLimiter::new();
/// let limit = Limit::per_minute(2);
/// assert!(limiter.check_now("key-1", &limit, 1).unwrap().allowed);
/// assert!(limiter.check_now("key-1", &limit, 1).unwrap().allowed);
/// let denied = limiter.check_now("key-1", &limit, 1).unwrap();
/// assert!(!denied.allowed);
/// assert!(denied.retry_after.unwrap().as_secs() <= 30);
/// ```
pub struct LocalLimiter<C: LocalClock = DefaultClock> {
    inner: Arc<Inner<C>>,
}

struct Inner<C: LocalClock> {
    clock: C,
    buckets: DashMap<Limit, Bucket<C>>,
}

struct Bucket<C: LocalClock> {
    limit: Limit,
    gcra: Gcra,
    limiter: Keyed<C>,
}

impl<C: LocalClock> Clone for LocalLimiter<C> {
    fn clone(&self) -> Self {
        LocalLimiter {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C: LocalClock> std::fmt::Debug for LocalLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("limits", &self.inner.buckets.len())
            .field("keys", &self.tracked_keys())
            .finish()
    }
}

impl LocalLimiter {
    /// A limiter on governor's default (monotonic) clock.
    pub fn new() -> LocalLimiter {
        LocalLimiter::with_clock(DefaultClock::default())
    }
}

impl Default for LocalLimiter {
    fn default() -> Self {
        LocalLimiter::new()
    }
}

impl<C: LocalClock> LocalLimiter<C> {
    /// A limiter on `clock` (governor's `FakeRelativeClock` in tests).
    pub fn with_clock(clock: C) -> LocalLimiter<C> {
        LocalLimiter {
            inner: Arc::new(Inner {
                clock,
                buckets: DashMap::new(),
            }),
        }
    }

    /// [`RateLimiter::check`], synchronously: charges `cost` units to `key` under `limit` if
    /// they fit now. Never blocks and does no I/O.
    pub fn check_now(&self, key: &str, limit: &Limit, cost: u32) -> Result<Decision> {
        if validate(limit, cost)?.is_none() {
            return Ok(Decision::over_capacity(limit));
        }
        let n = NonZeroU32::new(cost)
            .ok_or_else(|| RateLimitError::InvalidArgument("cost must be at least 1".into()))?;
        if let Some(bucket) = self.inner.buckets.get(limit) {
            return Ok(bucket.check(key, n, &self.inner.clock));
        }
        let bucket = Bucket::new(limit, self.inner.clock.clone())?;
        let bucket = self.inner.buckets.entry(*limit).or_insert(bucket);
        Ok(bucket.check(key, n, &self.inner.clock))
    }

    /// Drops the state of keys whose bucket is full again (governor's `retain_recent`), returns
    /// the memory (`shrink_to_fit`), and forgets limits with no key left. Returns how many keys
    /// are still tracked. Cheap enough to run every few seconds; the state only grows between
    /// calls.
    pub fn cleanup(&self) -> usize {
        for bucket in self.inner.buckets.iter() {
            bucket.limiter.retain_recent();
            bucket.limiter.shrink_to_fit();
        }
        self.inner.buckets.retain(|_, b| !b.limiter.is_empty());
        self.inner.buckets.shrink_to_fit();
        self.tracked_keys()
    }

    /// A task running [`cleanup`](Self::cleanup) every `every` until the last clone of this
    /// limiter is dropped; spawn it on the runtime (`tokio::spawn(limiter.cleanup_task(..))`).
    pub fn cleanup_task(&self, every: Duration) -> impl Future<Output = ()> + Send + 'static {
        let weak: Weak<Inner<C>> = Arc::downgrade(&self.inner);
        let every = every.max(Duration::from_millis(1));
        async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let kept = LocalLimiter { inner }.cleanup();
                tracing::debug!(keys = kept, "rate limiter cleanup");
            }
        }
    }

    /// How many keys have state, over all limits (an estimate under concurrent checks).
    pub fn tracked_keys(&self) -> usize {
        self.inner.buckets.iter().map(|b| b.limiter.len()).sum()
    }

    /// The clock this limiter runs on.
    pub fn clock(&self) -> &C {
        &self.inner.clock
    }
}

impl<C: LocalClock> Bucket<C> {
    fn new(limit: &Limit, clock: C) -> Result<Bucket<C>> {
        let gcra = Gcra::new(limit)?;
        let burst = NonZeroU32::new(limit.count)
            .ok_or_else(|| RateLimitError::InvalidLimit(format!("{limit}: zero count")))?;
        let quota = Quota::with_period(gcra.t())
            .ok_or_else(|| RateLimitError::InvalidLimit(format!("{limit}: zero interval")))?
            .allow_burst(burst);
        Ok(Bucket {
            limit: *limit,
            gcra,
            limiter: governor::RateLimiter::new(quota, DashMapStateStore::default(), clock),
        })
    }

    fn check(&self, key: &str, n: NonZeroU32, clock: &C) -> Decision {
        match self.limiter.check_key_n(&key.to_owned(), n) {
            Ok(Ok(state)) => {
                self.gcra
                    .decision_with_remaining(true, state.remaining_burst_capacity(), None)
            }
            Ok(Err(not_until)) => {
                let retry = not_until.wait_time_from(clock.now());
                // The stored TAT is `retry + (count - n) × T` ahead of now (see `gcra`).
                let unused = self.gcra.window().saturating_sub(self.gcra.t() * n.get());
                self.gcra
                    .decision(false, retry.saturating_add(unused), Some(retry))
            }
            // `validate` already turned these away.
            Err(_insufficient) => Decision::over_capacity(&self.limit),
        }
    }
}

#[async_trait]
impl<C: LocalClock> RateLimiter for LocalLimiter<C> {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn check(&self, key: &str, limit: &Limit, cost: u32) -> Result<Decision> {
        self.check_now(key, limit, cost)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;

    #[test]
    fn cleanup_forgets_full_buckets() {
        let clock = FakeRelativeClock::default();
        let l = LocalLimiter::with_clock(clock.clone());
        let limit = Limit::per_second(10);
        let other = Limit::per_minute(10);
        for i in 0..100 {
            assert!(l.check_now(&format!("k{i}"), &limit, 1).unwrap().allowed);
        }
        assert!(l.check_now("x", &other, 1).unwrap().allowed);
        assert_eq!(l.tracked_keys(), 101);
        assert_eq!(l.cleanup(), 101, "nothing is full yet");
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            l.cleanup(),
            1,
            "only the per-minute key still has a partial bucket"
        );
        assert_eq!(
            l.inner.buckets.len(),
            1,
            "the per-second limit is forgotten"
        );
        clock.advance(Duration::from_secs(60));
        assert_eq!(l.cleanup(), 0);
        assert_eq!(l.inner.buckets.len(), 0);
        // Forgotten state is a fresh state.
        let d = l.check_now("k1", &limit, 10).unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn cleanup_task_runs_and_stops_with_the_limiter() {
        let clock = FakeRelativeClock::default();
        let l = LocalLimiter::with_clock(clock.clone());
        assert!(l.check_now("k", &Limit::per_second(1), 1).unwrap().allowed);
        let task = tokio::spawn(l.cleanup_task(Duration::from_secs(10)));
        clock.advance(Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(11)).await; // paused runtime: advances at once
        assert_eq!(l.tracked_keys(), 0);
        drop(l);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(task.is_finished());
    }

    proptest! {
        /// governor, driven through `LocalLimiter` on a fake clock, decides exactly as the
        /// reference model in `gcra` (which the Redis script transcribes), decision by decision.
        #[test]
        fn governor_matches_the_model(
            count in 1u32..40,
            per_ms in 1u64..3_000,
            steps in proptest::collection::vec((0u64..2_000_000, 1u32..50, 0usize..3), 1..100),
        ) {
            let limit = Limit::new(count, Duration::from_millis(per_ms));
            let g = Gcra::new(&limit).unwrap();
            let clock = FakeRelativeClock::default();
            clock.advance(Duration::from_micros(1));
            let l = LocalLimiter::with_clock(clock.clone());
            let mut now = 1u64;
            let mut tats: [Option<u64>; 3] = [None; 3];
            for (advance_us, cost, key) in steps {
                clock.advance(Duration::from_micros(advance_us));
                now += advance_us;
                let got = l.check_now(&format!("key{key}"), &limit, cost).unwrap();
                if cost > count {
                    prop_assert_eq!(got, Decision::over_capacity(&limit));
                    continue;
                }
                let (tat, want) = g.check(tats[key], now, cost);
                tats[key] = Some(tat);
                prop_assert_eq!(got, want);
            }
        }
    }
}
