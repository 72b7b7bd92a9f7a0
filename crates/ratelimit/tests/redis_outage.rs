//! Redis taken away mid-test: a private `redis-server` on a free port, killed and restarted.
//! Limits keep being answered per the failure policy, fast, and are exact again once Redis is
//! back; quota counters are not reset by a Redis that comes back empty.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{RedisServer, random_prefix};
use ratelimit::{
    FailurePolicy, FallbackLimiter, Limit, LocalLimiter, RateLimiter, RedisBackend, RedisLimiter,
    RedisOptions,
};

/// Generous: a check on a dead Redis must not wait for anything like a TCP timeout.
const FAST: Duration = Duration::from_millis(500);

fn backend(server: &RedisServer) -> RedisBackend {
    let mut options = RedisOptions::new(server.url());
    options.connect_timeout = Duration::from_millis(250);
    options.response_timeout = Duration::from_millis(250);
    options.breaker_failures = 3;
    options.breaker_cooldown = Duration::from_millis(200);
    RedisBackend::connect(options).unwrap()
}

/// Checks `tries` times, each within [`FAST`]; how many were allowed.
async fn admitted(l: &dyn RateLimiter, key: &str, limit: &Limit, tries: u32) -> u32 {
    let mut n = 0;
    for _ in 0..tries {
        let started = Instant::now();
        let d = l.check(key, limit, 1).await.unwrap();
        assert!(
            started.elapsed() < FAST,
            "a check took {:?}",
            started.elapsed()
        );
        n += u32::from(d.allowed);
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_limiter_survives_a_redis_outage() {
    let Some(mut server) = RedisServer::start_or_skip("redis outage (limits)") else {
        return;
    };
    let backend = backend(&server);
    let primary = RedisLimiter::new(backend.clone()).with_prefix(random_prefix());
    let open = FallbackLimiter::new(
        primary.clone(),
        LocalLimiter::new(),
        2,
        FailurePolicy::FailOpen,
    );
    let closed = FallbackLimiter::new(primary, LocalLimiter::new(), 2, FailurePolicy::FailClosed);
    let limit = Limit::per_hour(20);

    // Redis up: the shared limit, exactly.
    assert_eq!(admitted(&open, "before", &limit, 25).await, 20);
    assert!(!open.is_degraded());

    server.kill();

    // Fail-open: every check answered at once, under the node's share (20 / 2 nodes).
    assert_eq!(admitted(&open, "during", &limit, 30).await, 10);
    assert!(open.is_degraded());
    assert!(backend.is_breaker_open());
    // Fail-closed: denied, told to come back after the breaker's cool-down.
    for _ in 0..10 {
        let started = Instant::now();
        let d = closed.check("during", &limit, 1).await.unwrap();
        assert!(started.elapsed() < FAST);
        assert!(!d.allowed);
        let retry = d.retry_after.unwrap();
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_millis(200),
            "{retry:?}"
        );
    }
    assert!(closed.is_degraded());

    server.restart();

    // Back after the cool-down and one successful probe (a bounded wait for the restarted
    // process and the real-time breaker, not for a rate-limit window).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        admitted(&open, "probe", &limit, 1).await;
        if !open.is_degraded() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the limiter never left degraded mode"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!backend.is_breaker_open());
    // Exact again (a fresh Redis): 20, not the local share.
    assert_eq!(admitted(&open, "after", &limit, 25).await, 20);
    assert!(!open.is_degraded());
    // The fail-closed limiter shares the primary: "after" is now denied by Redis's count (one
    // interval, 3 min, to wait), no longer by the policy.
    let d = closed.check("after", &limit, 1).await.unwrap();
    assert!(!d.allowed);
    assert!(d.retry_after.unwrap() > Duration::from_secs(60));
    assert!(!closed.is_degraded());
    assert_eq!(admitted(&closed, "after-closed", &limit, 1).await, 1);
}

/// A Redis that hangs (SIGSTOP: the socket stays open, nothing answers) costs a check at most
/// the response timeout, and nothing once the breaker opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_times_out_fast() {
    let Some(server) = RedisServer::start_or_skip("redis outage (hung)") else {
        return;
    };
    let backend = backend(&server);
    let primary = RedisLimiter::new(backend.clone()).with_prefix(random_prefix());
    let open = FallbackLimiter::new(primary, LocalLimiter::new(), 4, FailurePolicy::FailOpen);
    let limit = Limit::per_hour(40);
    assert_eq!(admitted(&open, "k", &limit, 1).await, 1);

    server.pause();
    let started = Instant::now();
    // Each within FAST; the first few wait for the 250 ms response timeout, then the breaker
    // answers at once (one probe per 200 ms cool-down waits again).
    assert_eq!(
        admitted(&open, "k", &limit, 20).await,
        10,
        "the node's share, 40 / 4"
    );
    assert!(open.is_degraded());
    assert!(backend.is_breaker_open());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    server.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while open.is_degraded() {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
        admitted(&open, "probe", &limit, 1).await;
    }
    // Exact again.
    assert_eq!(admitted(&open, "fresh", &limit, 45).await, 40);
    // A check that timed out may still have run once Redis woke up: it errs towards counting.
    let left = admitted(&open, "k", &limit, 45).await;
    assert!((30..=39).contains(&left), "{left}");
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_survive_a_redis_restart() {
    use ratelimit::{QuotaDb, QuotaStore, RedisQuotaOptions, RedisQuotaStore, Window};

    let Some(mut server) = RedisServer::start_or_skip("redis outage (quotas)") else {
        return;
    };
    let (_dir, url) = common::sqlite_temp_db();
    let db = QuotaDb::sqlite(&url, 2).unwrap();
    let mut options = RedisQuotaOptions::default();
    options.prefix = random_prefix();
    options.sync_interval = Duration::from_secs(3600); // sync only when told, to see the bound
    let store = RedisQuotaStore::new(backend(&server), db.clone(), options);
    // A window still open by Redis' clock, or the seeded counter would expire at once.
    let now = common::live_now();

    for _ in 0..7 {
        assert!(
            store
                .consume("acct", Window::Day, 1, 10, now)
                .await
                .unwrap()
                .allowed
        );
    }
    store.flush().await.unwrap();
    // One more, not yet synced when Redis dies: the at-most-one-sync-interval loss.
    assert_eq!(
        store
            .consume("acct", Window::Day, 1, 10, now)
            .await
            .unwrap()
            .used,
        8
    );

    server.kill();
    let started = Instant::now();
    let err = store
        .consume("acct", Window::Day, 1, 10, now)
        .await
        .unwrap_err();
    assert!(err.is_unavailable() && err.is_retryable(), "{err}");
    assert!(started.elapsed() < FAST);

    server.restart(); // empty: no persistence
    let deadline = Instant::now() + Duration::from_secs(10);
    let decision = loop {
        match store.consume("acct", Window::Day, 1, 10, now).await {
            Ok(d) => break d,
            Err(e) => assert!(e.is_unavailable(), "{e}"),
        }
        assert!(Instant::now() < deadline, "redis never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Seeded from SQL (7), not reset to zero.
    assert!(decision.allowed);
    assert_eq!(decision.used, 8);
    store.flush().await.unwrap();
    assert_eq!(db.stored_usage("acct", Window::Day, now).await.unwrap(), 8);
}
