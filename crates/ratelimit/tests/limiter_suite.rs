//! The `RateLimiter` contract: one behaviour suite ([`check_limiter`]) run against the local
//! limiter and the Redis limiter (`TOLLGATE_TEST_REDIS_URL`), both on governor's fake clock;
//! then what only the shared limiter promises: several instances on one Redis admit exactly the
//! limit, the server's clock, failing fast on a dead Redis.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use futures_util::future::join_all;
use governor::clock::FakeRelativeClock;
use ratelimit::{Decision, Limit, LocalLimiter, RateLimitError, RateLimiter};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn allowed(limit: u32, remaining: u32, reset_after: Duration) -> Decision {
    Decision {
        allowed: true,
        limit,
        remaining,
        reset_after,
        retry_after: None,
    }
}

fn denied(limit: u32, remaining: u32, reset_after: Duration, retry: Duration) -> Decision {
    Decision {
        allowed: false,
        limit,
        remaining,
        reset_after,
        retry_after: Some(retry),
    }
}

async fn check(l: &dyn RateLimiter, key: &str, limit: &Limit, cost: u32) -> Decision {
    l.check(key, limit, cost)
        .await
        .unwrap_or_else(|e| panic!("{} check {key} {limit} x{cost}: {e}", l.name()))
}

async fn admitted(l: &dyn RateLimiter, key: &str, limit: &Limit, tries: u32) -> u32 {
    let mut n = 0;
    for _ in 0..tries {
        n += u32::from(check(l, key, limit, 1).await.allowed);
    }
    n
}

/// The behaviour every `RateLimiter` must have. `clock` is the limiter's time: moving it is the
/// only way time passes here.
async fn check_limiter(l: &dyn RateLimiter, clock: &FakeRelativeClock) {
    let five = Limit::per_second(5); // T = 200 ms

    // A fresh key passes a burst of `count`, each decision exact.
    for remaining in (0..5).rev() {
        let want = allowed(5, remaining, ms(200) * (5 - remaining));
        assert_eq!(check(l, "burst", &five, 1).await, want, "{}", l.name());
    }
    // Then it is denied until one interval has passed; a denial charges nothing.
    for _ in 0..3 {
        assert_eq!(
            check(l, "burst", &five, 1).await,
            denied(5, 0, ms(1000), ms(200))
        );
    }
    // retry_after is exact: a millisecond early is still too early.
    clock.advance(ms(199));
    assert_eq!(
        check(l, "burst", &five, 1).await,
        denied(5, 0, ms(1000), ms(1))
    );
    clock.advance(ms(1));
    assert_eq!(check(l, "burst", &five, 1).await, allowed(5, 0, ms(1000)));
    assert!(!check(l, "burst", &five, 1).await.allowed);

    // Partial refill: after 500 ms, 2.5 units are back; remaining counts whole units and
    // reset_after rounds up to whole intervals.
    clock.advance(ms(500));
    assert_eq!(check(l, "burst", &five, 1).await, allowed(5, 1, ms(800)));
    assert_eq!(check(l, "burst", &five, 1).await, allowed(5, 0, ms(1000)));
    assert_eq!(
        check(l, "burst", &five, 1).await,
        denied(5, 0, ms(1000), ms(100))
    );

    // A long idle period refills the bucket, never beyond the burst.
    clock.advance(Duration::from_secs(3600));
    assert_eq!(admitted(l, "burst", &five, 8).await, 5);

    // Costs: all units at once or nothing.
    clock.advance(Duration::from_secs(1));
    assert_eq!(check(l, "cost", &five, 3).await, allowed(5, 2, ms(600)));
    assert_eq!(
        check(l, "cost", &five, 3).await,
        denied(5, 2, ms(600), ms(200))
    );
    assert_eq!(check(l, "cost", &five, 2).await, allowed(5, 0, ms(1000)));
    // A cost above the burst can never pass: denied without retry_after, charging nothing.
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        check(l, "cost", &five, 6).await,
        Decision::over_capacity(&five)
    );
    assert_eq!(check(l, "cost", &five, 5).await, allowed(5, 0, ms(1000)));

    // Invalid input.
    for (limit, cost) in [
        (five, 0),
        (Limit::per_second(0), 1),
        (Limit::new(5, Duration::ZERO), 1),
        (Limit::per_second(2_000_000), 1),
    ] {
        let err = l.check("invalid", &limit, cost).await.unwrap_err();
        assert!(
            matches!(
                err,
                RateLimitError::InvalidArgument(_) | RateLimitError::InvalidLimit(_)
            ),
            "{limit} x{cost}: {err}"
        );
        assert!(!err.is_retryable());
    }

    // Keys are independent; so are two limits on one key.
    let two = Limit::per_minute(2);
    assert_eq!(admitted(l, "a", &two, 3).await, 2);
    assert_eq!(admitted(l, "b", &two, 3).await, 2);
    assert_eq!(admitted(l, "a", &Limit::per_minute(3), 4).await, 3);
    assert_eq!(admitted(l, "a", &two, 1).await, 0);

    // An interval that is not a whole number of milliseconds: 3/s, T = 333 333 µs.
    let three = Limit::per_second(3);
    assert_eq!(admitted(l, "thirds", &three, 3).await, 3);
    let d = check(l, "thirds", &three, 1).await;
    assert_eq!(d.retry_after, Some(Duration::from_micros(333_333)));
    clock.advance(Duration::from_micros(333_333));
    assert!(check(l, "thirds", &three, 1).await.allowed);

    // Long periods: 2 per hour, the next one in 30 minutes.
    let hourly = Limit::per_hour(2);
    assert_eq!(admitted(l, "hourly", &hourly, 2).await, 2);
    assert_eq!(
        check(l, "hourly", &hourly, 1).await,
        denied(2, 0, Duration::from_secs(3600), Duration::from_secs(1800))
    );

    // Concurrent checks are atomic: 100 at once against 10/min admit exactly 10.
    let ten = Limit::per_minute(10);
    let decisions = join_all((0..100).map(|_| l.check("concurrent", &ten, 1))).await;
    let passed = decisions
        .iter()
        .filter(|d| d.as_ref().unwrap().allowed)
        .count();
    assert_eq!(passed, 10);
}

#[tokio::test]
async fn local_limiter_suite() {
    let clock = FakeRelativeClock::default();
    let limiter = LocalLimiter::with_clock(clock.clone());
    check_limiter(&limiter, &clock).await;
}

#[cfg(feature = "redis")]
mod redis {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::common::{random_prefix, redis_options, redis_url_or_skip};
    use ratelimit::{
        FailurePolicy, FallbackLimiter, RedisBackend, RedisLimiter, RedisOptions, TimeSource,
    };

    fn limiter(url: &str) -> RedisLimiter {
        let backend = RedisBackend::connect(redis_options(url)).unwrap();
        RedisLimiter::new(backend).with_prefix(random_prefix())
    }

    #[tokio::test]
    async fn redis_limiter_suite() {
        let Some(url) = redis_url_or_skip("redis limiter suite") else {
            return;
        };
        let clock = FakeRelativeClock::default();
        let limiter = limiter(&url).with_time_source(TimeSource::Clock(Arc::new(clock.clone())));
        check_limiter(&limiter, &clock).await;
    }

    /// Four limiters with pools of their own on one Redis, as four gateway nodes: a concurrent
    /// burst of 200 checks against 50/min admits exactly 50 (the burst fits in the bucket and
    /// takes far less than the 1.2 s one unit needs to come back).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_instances_share_one_limit_exactly() {
        let Some(url) = redis_url_or_skip("redis shared limit") else {
            return;
        };
        let prefix = random_prefix();
        let nodes: Vec<Arc<RedisLimiter>> = (0..4)
            .map(|_| Arc::new(limiter(&url).with_prefix(prefix.clone())))
            .collect();
        for node in &nodes {
            node.backend().ping().await.unwrap(); // connect before the clock matters
        }
        let limit = Limit::per_minute(50);
        let started = Instant::now();
        let tasks = (0..200).map(|i| {
            let node = Arc::clone(&nodes[i % 4]);
            tokio::spawn(async move { node.check("shared-key", &limit, 1).await })
        });
        let results = join_all(tasks).await;
        let elapsed = started.elapsed();
        let passed = results
            .into_iter()
            .filter(|r| r.as_ref().unwrap().as_ref().unwrap().allowed)
            .count();
        // Time is Redis's: if the burst took longer than an interval (a very slow machine),
        // GCRA rightly let a few more through.
        let replenished = usize::try_from(elapsed.as_millis() / 1200).unwrap();
        assert!(
            (50..=50 + replenished).contains(&passed),
            "{passed} admitted in {elapsed:?}"
        );
        if replenished == 0 {
            assert_eq!(passed, 50);
        }
    }

    /// On the server's clock (no injected time): a burst, then a denial whose retry_after is
    /// one interval less the time the burst took.
    #[tokio::test]
    async fn server_time() {
        let Some(url) = redis_url_or_skip("redis server time") else {
            return;
        };
        let l = limiter(&url);
        let limit = Limit::per_minute(3); // T = 20 s
        assert_eq!(admitted(&l, "k", &limit, 3).await, 3);
        let d = check(&l, "k", &limit, 1).await;
        assert!(!d.allowed);
        let retry = d.retry_after.unwrap();
        assert!(
            retry > Duration::from_secs(19) && retry <= Duration::from_secs(20),
            "{retry:?}"
        );
        assert_eq!(d.reset_after, Duration::from_secs(60));
        // The bucket's key expires when the bucket is full again.
        assert!(l.bucket_key("k", &limit).unwrap().ends_with("3/20000000:k"));
    }

    /// Nothing listens: checks fail with a retryable Unavailable quickly, then at once when the
    /// breaker opens; a fallback limiter keeps answering.
    #[tokio::test]
    async fn unreachable_redis_fails_fast() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(); // bound, then freed: nothing listens there
        let url = format!("redis://127.0.0.1:{port}");
        let l = RedisLimiter::new(RedisBackend::connect(RedisOptions::new(url)).unwrap());
        let limit = Limit::per_minute(10);
        for _ in 0..5 {
            let started = Instant::now();
            let err = l.check("k", &limit, 1).await.unwrap_err();
            assert!(err.is_unavailable() && err.is_retryable(), "{err}");
            assert!(err.retry_after().is_some());
            assert!(started.elapsed() < ms(500), "{:?}", started.elapsed());
        }
        assert!(l.backend().is_breaker_open());

        let fallback = FallbackLimiter::new(l, LocalLimiter::new(), 2, FailurePolicy::FailOpen);
        assert_eq!(
            admitted(&fallback, "k", &limit, 10).await,
            5,
            "10 / 2 nodes"
        );
        assert!(fallback.is_degraded());
    }
}
