//! What to do while the shared limiter is unavailable: [`FallbackLimiter`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::limiter::{Decision, Limit, RateLimiter};

/// How a [`FallbackLimiter`] answers while its primary is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailurePolicy {
    /// Keep serving under a local limit of `max(1, count / nodes)` per the same period on each
    /// node: roughly the global limit over the whole fleet, never "no limit". A cost that fits
    /// the limit but not a node's share is denied with `retry_after` as for fail-closed.
    FailOpen,
    /// Deny every request, with `retry_after` set to the primary's remaining cool-down (or
    /// [`FallbackLimiter::with_closed_retry_after`] when it gave none).
    FailClosed,
}

/// A shared limiter (normally a `RedisLimiter`) with a policy for when it is down.
///
/// Every check goes to the `primary`. When it fails with
/// [`RateLimitError::Unavailable`](crate::RateLimitError::Unavailable) (Redis down, timed out,
/// breaker open), the decision comes from the [`FailurePolicy`] instead: a local limit per node
/// (fail-open) or a denial (fail-closed). As soon as the primary answers again, decisions are
/// exact again. Other errors (an invalid limit) are returned as they are.
///
/// A primary built with short timeouts and a circuit breaker (as `RedisLimiter` is) makes a
/// degraded check cost microseconds, not a network timeout.
///
/// ```
/// use std::time::Duration;
/// use ratelimit::{FailurePolicy, FallbackLimiter, Limit, LocalLimiter, RateLimiter};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // A stand-in for the shared limiter: here, another local one.
/// let shared = LocalLimiter::new();
/// let limiter = FallbackLimiter::new(shared, LocalLimiter::new(), 4, FailurePolicy::FailOpen);
/// let d = limiter.check("client-7", &Limit::per_minute(100), 1).await.unwrap();
/// assert!(d.allowed);
/// assert!(!limiter.is_degraded());
/// # }
/// ```
#[derive(Debug)]
pub struct FallbackLimiter<P, L> {
    primary: P,
    local: L,
    nodes: u32,
    policy: FailurePolicy,
    closed_retry_after: Duration,
    degraded: AtomicBool,
    degraded_checks: AtomicU64,
}

impl<P: RateLimiter, L: RateLimiter> FallbackLimiter<P, L> {
    /// `primary` with `local` as the fallback, for a fleet of `nodes` gateway nodes (at least 1)
    /// sharing the primary.
    pub fn new(primary: P, local: L, nodes: u32, policy: FailurePolicy) -> Self {
        FallbackLimiter {
            primary,
            local,
            nodes: nodes.max(1),
            policy,
            closed_retry_after: Duration::from_secs(1),
            degraded: AtomicBool::new(false),
            degraded_checks: AtomicU64::new(0),
        }
    }

    /// The `retry_after` of a fail-closed denial when the primary's error does not say how long
    /// it will be down (default 1 s).
    pub fn with_closed_retry_after(mut self, retry_after: Duration) -> Self {
        self.closed_retry_after = retry_after;
        self
    }

    /// Whether the most recent decision was made without the primary (for `/ready` and metrics).
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// How many decisions were made without the primary since this limiter was built.
    pub fn degraded_checks(&self) -> u64 {
        self.degraded_checks.load(Ordering::Relaxed)
    }

    /// The policy.
    pub fn policy(&self) -> FailurePolicy {
        self.policy
    }

    /// The limit a node enforces locally for `limit` while the primary is down (fail-open).
    pub fn local_limit(&self, limit: &Limit) -> Limit {
        limit.share(self.nodes)
    }

    /// The shared limiter.
    pub fn primary(&self) -> &P {
        &self.primary
    }

    /// The local fallback limiter.
    pub fn local(&self) -> &L {
        &self.local
    }
}

#[async_trait]
impl<P: RateLimiter, L: RateLimiter> RateLimiter for FallbackLimiter<P, L> {
    fn name(&self) -> &'static str {
        "fallback"
    }

    async fn check(&self, key: &str, limit: &Limit, cost: u32) -> Result<Decision> {
        let err = match self.primary.check(key, limit, cost).await {
            Ok(decision) => {
                self.degraded.store(false, Ordering::Relaxed);
                return Ok(decision);
            }
            Err(e) if e.is_unavailable() => e,
            Err(e) => return Err(e),
        };
        self.degraded.store(true, Ordering::Relaxed);
        self.degraded_checks.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %err, policy = ?self.policy, "rate limit decided without the primary");
        match self.policy {
            FailurePolicy::FailOpen => {
                let share = self.local_limit(limit);
                if cost > share.count && cost <= limit.count {
                    // Fits the global limit but not a node's share: it can only pass once the
                    // primary is back.
                    return Ok(Decision {
                        retry_after: Some(err.retry_after().unwrap_or(self.closed_retry_after)),
                        ..Decision::over_capacity(&share)
                    });
                }
                self.local.check(key, &share, cost).await
            }
            FailurePolicy::FailClosed => Ok(Decision {
                allowed: false,
                limit: limit.count,
                remaining: 0,
                reset_after: Duration::ZERO,
                retry_after: Some(err.retry_after().unwrap_or(self.closed_retry_after)),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::error::RateLimitError;
    use crate::local::LocalLimiter;
    use governor::clock::FakeRelativeClock;
    use std::sync::Arc;

    /// A primary that is up (a local limiter) or down (Unavailable), by a switch.
    #[derive(Debug)]
    struct Switchable {
        up: AtomicBool,
        inner: LocalLimiter<FakeRelativeClock>,
    }

    #[async_trait]
    impl RateLimiter for Switchable {
        fn name(&self) -> &'static str {
            "switchable"
        }
        async fn check(&self, key: &str, limit: &Limit, cost: u32) -> Result<Decision> {
            if self.up.load(Ordering::SeqCst) {
                self.inner.check(key, limit, cost).await
            } else {
                Err(RateLimitError::unavailable(
                    "test",
                    Some(Duration::from_millis(1500)),
                    "down",
                ))
            }
        }
    }

    fn setup(
        policy: FailurePolicy,
    ) -> (
        Arc<Switchable>,
        FallbackLimiter<Arc<Switchable>, LocalLimiter<FakeRelativeClock>>,
    ) {
        let clock = FakeRelativeClock::default();
        let primary = Arc::new(Switchable {
            up: AtomicBool::new(true),
            inner: LocalLimiter::with_clock(clock.clone()),
        });
        let l = FallbackLimiter::new(
            Arc::clone(&primary),
            LocalLimiter::with_clock(clock),
            4,
            policy,
        );
        (primary, l)
    }

    async fn admitted(l: &dyn RateLimiter, key: &str, limit: &Limit, tries: u32) -> u32 {
        let mut n = 0;
        for _ in 0..tries {
            if l.check(key, limit, 1).await.unwrap().allowed {
                n += 1;
            }
        }
        n
    }

    #[tokio::test]
    async fn fail_open_uses_a_node_share_then_returns_to_exact() {
        let (primary, l) = setup(FailurePolicy::FailOpen);
        let limit = Limit::per_minute(50);
        assert_eq!(admitted(&l, "a", &limit, 10).await, 10);
        assert!(!l.is_degraded());

        primary.up.store(false, Ordering::SeqCst);
        let d = l.check("b", &limit, 1).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.limit, 12, "50 / 4 nodes");
        assert!(l.is_degraded());
        assert_eq!(admitted(&l, "b", &limit, 20).await, 11);
        assert_eq!(l.degraded_checks(), 21);
        // A cost over the share (within the limit) waits for the primary; nothing is charged.
        let d = l.check("c", &limit, 13).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_millis(1500)));
        assert_eq!(admitted(&l, "c", &limit, 12).await, 12);
        // A cost over the limit itself is over capacity as always.
        let d = l.check("c", &limit, 51).await.unwrap();
        assert_eq!(d, Decision::over_capacity(&Limit::per_minute(12)));
        // A tiny limit still allows one per period, never zero.
        assert_eq!(admitted(&l, "d", &Limit::per_minute(3), 5).await, 1);

        primary.up.store(true, Ordering::SeqCst);
        assert_eq!(
            admitted(&l, "a", &limit, 50).await,
            40,
            "the primary's state, exact"
        );
        assert!(!l.is_degraded());
    }

    #[tokio::test]
    async fn fail_closed_denies_with_the_cool_down() {
        let (primary, l) = setup(FailurePolicy::FailClosed);
        let limit = Limit::per_minute(50);
        primary.up.store(false, Ordering::SeqCst);
        let d = l.check("a", &limit, 1).await.unwrap();
        assert_eq!(
            d,
            Decision {
                allowed: false,
                limit: 50,
                remaining: 0,
                reset_after: Duration::ZERO,
                retry_after: Some(Duration::from_millis(1500)),
            }
        );
        assert!(l.is_degraded());
        primary.up.store(true, Ordering::SeqCst);
        assert!(l.check("a", &limit, 1).await.unwrap().allowed);
        assert!(!l.is_degraded());
    }

    #[tokio::test]
    async fn other_errors_pass_through() {
        let (_primary, l) = setup(FailurePolicy::FailOpen);
        let err = l.check("a", &Limit::per_minute(0), 1).await.unwrap_err();
        assert!(matches!(err, RateLimitError::InvalidLimit(_)));
        assert!(!l.is_degraded());
    }
}
