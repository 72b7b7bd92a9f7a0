//! GCRA arithmetic shared by the limiters.
//!
//! State per bucket is one instant, the TAT (theoretical arrival time): the moment the bucket
//! is full again. With emission interval `T` and burst `count`, a check of `cost` at `now`:
//!
//! ```text
//! tat     = max(stored TAT or now, now)
//! new_tat = tat + cost × T
//! allowed = new_tat − now ≤ count × T              (then store new_tat)
//! retry   = new_tat − count × T − now              (when denied)
//! remaining   = ⌊(count × T − (TAT − now)) / T⌋    (TAT after the decision)
//! reset_after = (count − remaining) × T
//! ```
//!
//! governor implements exactly this (its `tau` is `(count − 1) × T`); the Redis limiter's Lua
//! script does too, in whole microseconds. [`Gcra::check`] is the reference model the tests
//! compare both against.

use std::time::Duration;

use crate::error::Result;
use crate::limiter::{Decision, Limit};

/// The parameters of one [`Limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// Emission interval, whole microseconds.
    t: Duration,
    count: u32,
}

impl Gcra {
    /// The GCRA of `limit`; fails for an invalid limit.
    pub(crate) fn new(limit: &Limit) -> Result<Gcra> {
        Ok(Gcra {
            t: limit.emission_interval()?,
            count: limit.count,
        })
    }

    /// The emission interval.
    pub(crate) fn t(&self) -> Duration {
        self.t
    }

    /// `count × T`: how far ahead of now the TAT may run.
    pub(crate) fn window(&self) -> Duration {
        self.t.saturating_mul(self.count)
    }

    /// Units that could pass now with the TAT `backlog` ahead of now.
    pub(crate) fn remaining(&self, backlog: Duration) -> u32 {
        let free = self.window().saturating_sub(backlog);
        let units = free.as_nanos() / self.t.as_nanos().max(1);
        u32::try_from(units).unwrap_or(u32::MAX).min(self.count)
    }

    /// The decision reporting `remaining` units.
    pub(crate) fn decision_with_remaining(
        &self,
        allowed: bool,
        remaining: u32,
        retry_after: Option<Duration>,
    ) -> Decision {
        let remaining = remaining.min(self.count);
        Decision {
            allowed,
            limit: self.count,
            remaining,
            reset_after: self.t.saturating_mul(self.count - remaining),
            retry_after: if allowed { None } else { retry_after },
        }
    }

    /// The decision when, after it, the TAT is `backlog` ahead of now.
    pub(crate) fn decision(
        &self,
        allowed: bool,
        backlog: Duration,
        retry_after: Option<Duration>,
    ) -> Decision {
        self.decision_with_remaining(allowed, self.remaining(backlog), retry_after)
    }

    /// The reference check, in microseconds: `(TAT to store, decision)` for a check of
    /// `cost` (1..=count) at `now` against the stored `tat`. The Lua script is a transcription.
    #[cfg(test)]
    pub(crate) fn check(&self, tat: Option<u64>, now: u64, cost: u32) -> (u64, Decision) {
        let t = u64::try_from(self.t.as_micros()).unwrap_or(u64::MAX);
        let window = t * u64::from(self.count);
        let tat = tat.unwrap_or(now).max(now);
        let new_tat = tat + u64::from(cost) * t;
        if new_tat - now <= window {
            let d = self.decision(true, Duration::from_micros(new_tat - now), None);
            (new_tat, d)
        } else {
            let retry = Duration::from_micros(new_tat - window - now);
            let d = self.decision(false, Duration::from_micros(tat - now), Some(retry));
            (tat, d)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1000;

    fn gcra(count: u32, per_ms: u64) -> Gcra {
        Gcra::new(&Limit::new(count, Duration::from_millis(per_ms))).unwrap()
    }

    #[test]
    fn burst_then_one_per_interval() {
        let g = gcra(5, 1000); // T = 200 ms
        let mut tat = None;
        let now = 1_000_000 * MS;
        for expected_remaining in [4, 3, 2, 1, 0] {
            let (t, d) = g.check(tat, now, 1);
            assert!(d.allowed);
            assert_eq!(d.remaining, expected_remaining);
            assert_eq!(
                d.reset_after,
                Duration::from_millis(200 * u64::from(5 - expected_remaining))
            );
            assert_eq!(d.retry_after, None);
            tat = Some(t);
        }
        let (t, d) = g.check(tat, now, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_millis(200)));
        assert_eq!(d.remaining, 0);
        assert_eq!(d.reset_after, Duration::from_secs(1));
        assert_eq!(Some(t), tat, "a denial stores nothing new");
        // 199 ms later: still no; 200 ms: yes.
        assert!(!g.check(tat, now + 199 * MS, 1).1.allowed);
        let (_, d) = g.check(tat, now + 200 * MS, 1);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        // Cost 3 after a full idle period: allowed, 2 left.
        let (t, d) = g.check(tat, now + 5000 * MS, 3);
        assert!(d.allowed);
        assert_eq!(d.remaining, 2);
        // Cost 3 again right away: needs one more unit, i.e. 200 ms.
        let (_, d) = g.check(Some(t), now + 5000 * MS, 3);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_millis(200)));
        assert_eq!(d.remaining, 2);
    }

    #[test]
    fn remaining_rounds_down_and_reset_rounds_up() {
        let g = gcra(5, 1000);
        assert_eq!(g.remaining(Duration::ZERO), 5);
        assert_eq!(g.remaining(Duration::from_millis(1)), 4);
        assert_eq!(g.remaining(Duration::from_millis(200)), 4);
        assert_eq!(g.remaining(Duration::from_millis(201)), 3);
        assert_eq!(g.remaining(Duration::from_secs(1)), 0);
        assert_eq!(g.remaining(Duration::from_secs(7)), 0);
        let d = g.decision(true, Duration::from_millis(201), None);
        assert_eq!(d.reset_after, Duration::from_millis(400));
    }

    proptest! {
        /// Invariants of the model over random sequences of checks: the TAT never runs more
        /// than a window ahead; allowed checks advance it by exactly cost × T; a denial's
        /// retry_after is exact (one microsecond earlier is denied, then it passes); no window
        /// of `per` admits more than count + (elapsed / T) units.
        #[test]
        fn model_invariants(
            count in 1u32..50,
            per_ms in 1u64..5_000,
            steps in proptest::collection::vec((0u64..3_000_000, 1u32..60), 1..80),
        ) {
            let g = gcra(count, per_ms);
            let t = u64::try_from(g.t().as_micros()).unwrap();
            let window = t * u64::from(count);
            let mut now = 1_000_000_000u64;
            let start = now;
            let mut tat: Option<u64> = None;
            let mut admitted: u64 = 0;
            for (advance, cost) in steps {
                now += advance;
                if cost > count {
                    continue;
                }
                let (new_tat, d) = g.check(tat, now, cost);
                prop_assert!(new_tat <= now + window);
                prop_assert_eq!(d.limit, count);
                prop_assert!(d.remaining <= count);
                prop_assert_eq!(d.reset_after, g.t() * (count - d.remaining));
                if d.allowed {
                    prop_assert_eq!(new_tat, tat.unwrap_or(now).max(now) + u64::from(cost) * t);
                    prop_assert!(d.retry_after.is_none());
                    admitted += u64::from(cost);
                } else {
                    prop_assert_eq!(Some(new_tat), tat);
                    let retry = u64::try_from(d.retry_after.unwrap().as_micros()).unwrap();
                    prop_assert!(retry > 0);
                    prop_assert!(!g.check(tat, now + retry - 1, cost).1.allowed);
                    prop_assert!(g.check(tat, now + retry, cost).1.allowed);
                }
                tat = Some(new_tat);
                // GCRA's bound: burst plus what replenished since the start.
                prop_assert!(admitted <= u64::from(count) + (now - start) / t);
            }
        }
    }
}
