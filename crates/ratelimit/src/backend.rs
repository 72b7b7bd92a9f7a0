//! The connection to Redis shared by `RedisLimiter` and `RedisQuotaStore`: a deadpool pool of
//! multiplexed connections with short timeouts, behind a small circuit breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::clock::Clock;

use deadpool::managed::{self, Metrics, Pool, RecycleResult};
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{
    self, AsyncConnectionConfig, FromRedisValue, RedisError, ScriptInvocation,
};

use crate::error::{RateLimitError, Result};

const BACKEND: &str = "redis";

/// How to reach Redis and how quickly to give up on it.
///
/// `#[non_exhaustive]`: start from [`RedisOptions::new`] and set fields.
///
/// Defaults suit a Redis on the same network: a dead Redis fails a check within
/// `connect_timeout` (a new connection) or `response_timeout` (an open one), and after
/// `breaker_failures` such failures in a row every check fails at once for `breaker_cooldown`,
/// after which one probe decides whether Redis is back.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Pooled connections. Each is multiplexed and only checked out for the instant it takes
    /// to clone it, so a few serve any number of concurrent checks. Default 4.
    pub pool_size: usize,
    /// Limit on opening a connection. Default 250 ms.
    pub connect_timeout: Duration,
    /// Limit on one command's answer. Default 100 ms.
    pub response_timeout: Duration,
    /// Consecutive connection failures that open the breaker. Default 3.
    pub breaker_failures: u32,
    /// How long an open breaker fails calls at once before letting one probe through.
    /// Default 1 s.
    pub breaker_cooldown: Duration,
}

impl RedisOptions {
    /// Defaults for the Redis at `url`.
    pub fn new(url: impl Into<String>) -> RedisOptions {
        RedisOptions {
            url: url.into(),
            pool_size: 4,
            connect_timeout: Duration::from_millis(250),
            response_timeout: Duration::from_millis(100),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(1),
        }
    }

    /// The longest one operation may take before it is abandoned: opening a connection plus
    /// two round trips (`EVALSHA`, then `SCRIPT LOAD` + `EVALSHA` once after a Redis restart).
    fn deadline(&self) -> Duration {
        self.connect_timeout + self.response_timeout * 3
    }
}

/// deadpool-redis's manager without its per-checkout `PING`: when a command fails for want of
/// a connection, [`RedisBackend`] drops the idle connections instead, so a check costs one round
/// trip, not two.
struct Manager {
    inner: deadpool_redis::Manager,
}

impl managed::Manager for Manager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> std::result::Result<MultiplexedConnection, RedisError> {
        managed::Manager::create(&self.inner).await
    }

    async fn recycle(
        &self,
        _conn: &mut MultiplexedConnection,
        _metrics: &Metrics,
    ) -> RecycleResult<RedisError> {
        Ok(())
    }
}

/// A handle on one Redis: pooled connections, timeouts and a circuit breaker. Cheap to clone;
/// clones share the pool and the breaker. Connections are opened on first use, so building one
/// succeeds while Redis is down.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<BackendInner>,
}

struct BackendInner {
    pool: Pool<Manager>,
    breaker: Breaker,
    options: RedisOptions,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("pool", &self.inner.pool.status())
            .field("breaker_open", &self.is_breaker_open())
            .finish()
    }
}

/// What went wrong talking to Redis, before it becomes a [`RateLimitError`].
enum Failure {
    /// Redis answered with an error (script error, wrong type): it is up.
    Answered(RedisError),
    /// No usable answer: connection refused or dropped, timeout, pool exhausted.
    Unreachable(Box<dyn std::error::Error + Send + Sync>),
}

impl RedisBackend {
    /// A backend for `options` (no connection is opened yet).
    pub fn connect(options: RedisOptions) -> Result<RedisBackend> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout));
        let inner = deadpool_redis::Manager::new_with_config(options.url.as_str(), config)
            .map_err(|e| RateLimitError::InvalidArgument(format!("redis url: {e}")))?;
        let pool = Pool::builder(Manager { inner })
            .max_size(options.pool_size.max(1))
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(options.response_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.response_timeout))
            .build()
            .map_err(|e| RateLimitError::InvalidArgument(format!("redis pool: {e}")))?;
        Ok(RedisBackend {
            inner: Arc::new(BackendInner {
                pool,
                breaker: Breaker::new(
                    options.breaker_failures,
                    options.breaker_cooldown,
                    Arc::new(Monotonic(Instant::now())),
                ),
                options,
            }),
        })
    }

    /// The options this backend was built with.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// Whether the circuit breaker is open (calls fail at once): for `/ready` and metrics.
    pub fn is_breaker_open(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// `PING`, through the breaker like every other call.
    pub async fn ping(&self) -> Result<()> {
        let reply: String = self.query(&redis::cmd("PING")).await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(RateLimitError::unavailable(
                BACKEND,
                None,
                format!("unexpected PING reply {reply:?}"),
            ))
        }
    }

    /// Runs `script` (EVALSHA, loading it on NOSCRIPT).
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
    ) -> Result<T> {
        self.run(Op::Script(script)).await
    }

    /// Runs one command.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        self.run(Op::Cmd(cmd)).await
    }

    async fn run<T: FromRedisValue>(&self, op: Op<'_>) -> Result<T> {
        let inner = &*self.inner;
        let permit = inner.breaker.admit().map_err(|retry_in| {
            RateLimitError::unavailable(BACKEND, Some(retry_in), "circuit breaker open")
        })?;
        let outcome = match tokio::time::timeout(inner.options.deadline(), self.attempt(op)).await {
            Ok(outcome) => outcome,
            Err(elapsed) => Err(Failure::Unreachable(Box::new(elapsed))),
        };
        match outcome {
            Ok(value) => {
                permit.succeeded();
                Ok(value)
            }
            Err(Failure::Answered(e)) => {
                permit.succeeded();
                Err(RateLimitError::unavailable(BACKEND, None, e))
            }
            Err(Failure::Unreachable(e)) => {
                if permit.failed() {
                    // Opened: drop idle connections, so the probe after the cool-down connects
                    // afresh instead of trying a connection to a dead server.
                    let dropped = inner.pool.retain(|_, _| false).removed.len();
                    tracing::warn!(error = %e, dropped, "redis unreachable: circuit breaker open");
                }
                Err(RateLimitError::unavailable(
                    BACKEND,
                    Some(inner.breaker.retry_in()),
                    e,
                ))
            }
        }
    }

    async fn attempt<T: FromRedisValue>(&self, op: Op<'_>) -> std::result::Result<T, Failure> {
        let pool = &self.inner.pool;
        // A multiplexed connection serves any number of concurrent commands: use a clone and
        // give the pooled one back at once, so callers never queue for the pool.
        let mut conn = {
            let pooled = pool
                .get()
                .await
                .map_err(|e| Failure::Unreachable(Box::new(e)))?;
            MultiplexedConnection::clone(&pooled)
        };
        let result = match op {
            Op::Script(script) => script.invoke_async(&mut conn).await,
            Op::Cmd(cmd) => cmd.query_async(&mut conn).await,
        };
        result.map_err(|e| {
            if is_unreachable(&e) {
                // The pooled connection(s) may be broken: drop the idle ones, new ones are
                // opened on the next call.
                drop(pool.retain(|_, _| false));
                Failure::Unreachable(Box::new(e))
            } else {
                Failure::Answered(e)
            }
        })
    }
}

enum Op<'a> {
    Script(&'a ScriptInvocation<'a>),
    Cmd(&'a redis::Cmd),
}

fn is_unreachable(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

// === impl Breaker ===

/// Monotonic time since the breaker was built.
#[derive(Debug)]
struct Monotonic(Instant);

impl Clock for Monotonic {
    fn now_micros(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// A minimal circuit breaker: closed until `threshold` consecutive failures, then open (calls
/// fail at once) for `cooldown`, then half-open: one probe call goes through, the rest keep
/// failing at once until the probe says whether the backend is back.
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    clock: Arc<dyn Clock>,
    failures: AtomicU32,
    /// Milliseconds since `origin` until which the breaker is open; 0 = closed.
    open_until: AtomicU64,
    probing: AtomicBool,
}

/// Leave to make one call; report how it went. Dropped unreported (the call was cancelled), it
/// frees the probe slot so the next caller probes.
struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    done: bool,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration, clock: Arc<dyn Clock>) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            clock,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_micros() / 1000
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    /// How long until a call may go through again (at least 1 ms).
    fn retry_in(&self) -> Duration {
        let until = self.open_until.load(Ordering::Acquire);
        Duration::from_millis(until.saturating_sub(self.now_ms()).max(1))
    }

    /// A permit to call, or how long to wait.
    fn admit(&self) -> std::result::Result<Permit<'_>, Duration> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Ok(Permit {
                breaker: self,
                probe: false,
                done: false,
            });
        }
        let now = self.now_ms();
        if now < until {
            return Err(Duration::from_millis(until - now));
        }
        if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            Ok(Permit {
                breaker: self,
                probe: true,
                done: false,
            })
        } else {
            // Someone is probing; its answer comes within one operation's deadline.
            Err(Duration::from_millis(1))
        }
    }

    fn open(&self) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(self.cooldown.as_millis()).unwrap_or(u64::MAX))
            .max(1);
        self.open_until.store(until, Ordering::Release);
    }
}

impl Permit<'_> {
    fn succeeded(mut self) {
        self.done = true;
        let b = self.breaker;
        b.failures.store(0, Ordering::Release);
        if self.probe || b.is_open() {
            b.open_until.store(0, Ordering::Release);
            tracing::info!("redis reachable again: circuit breaker closed");
        }
        if self.probe {
            b.probing.store(false, Ordering::Release);
        }
    }

    /// Records a failure; whether it opened the breaker.
    fn failed(mut self) -> bool {
        self.done = true;
        let b = self.breaker;
        let failures = b.failures.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let opened = if self.probe || (failures >= b.threshold && !b.is_open()) {
            b.open();
            true
        } else {
            false
        };
        if self.probe {
            b.probing.store(false, Ordering::Release);
        }
        opened
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.done {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn breaker_opens_probes_and_closes() {
        let clock = FakeRelativeClock::default();
        clock.advance(Duration::from_secs(1));
        let b = Breaker::new(3, Duration::from_millis(40), Arc::new(clock.clone()));
        for _ in 0..2 {
            assert!(!b.admit().is_ok_and(|p| p.failed()));
        }
        assert!(!b.is_open());
        assert!(b.admit().is_ok_and(|p| p.failed()), "third failure opens");
        assert!(b.is_open());
        let wait = b.admit().err();
        assert_eq!(wait, Some(Duration::from_millis(40)));
        clock.advance(Duration::from_millis(39));
        assert!(b.admit().is_err());
        clock.advance(Duration::from_millis(1));
        let probe = b.admit();
        assert!(probe.as_ref().is_ok_and(|p| p.probe));
        assert!(b.admit().is_err(), "one probe at a time");
        assert!(probe.is_ok_and(|p| p.failed()), "a failed probe re-opens");
        assert!(b.admit().is_err());
        clock.advance(Duration::from_millis(40));
        // A cancelled probe frees the slot.
        drop(b.admit());
        let probe = b.admit();
        assert!(probe.as_ref().is_ok_and(|p| p.probe));
        if let Ok(p) = probe {
            p.succeeded();
        }
        assert!(!b.is_open());
        assert!(b.admit().is_ok_and(|p| !p.probe));
        // Successes reset the count.
        assert!(!b.admit().is_ok_and(|p| p.failed()));
        assert!(!b.admit().is_ok_and(|p| p.failed()));
        if let Ok(p) = b.admit() {
            p.succeeded();
        }
        assert!(!b.admit().is_ok_and(|p| p.failed()));
        assert!(!b.is_open());
    }
}
