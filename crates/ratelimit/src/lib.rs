//! # ratelimit
//!
//! Rate limits and quotas for API gateways, usable on their own by any Rust service that has to
//! keep clients within limits, on one node or many.
//!
//! **Rate limits** (GCRA: `count` per `per`, a burst of `count`, then one unit per
//! `per / count`) behind the [`RateLimiter`] port:
//! * [`LocalLimiter`]: in-process (governor), well under a microsecond per check;
//! * `RedisLimiter` (feature `redis`): one atomic Lua script per check, timed by the Redis
//!   server, exact across every node sharing the Redis; short timeouts and a circuit breaker
//!   (`RedisOptions`) so a dead Redis costs nothing;
//! * [`FallbackLimiter`]: a shared limiter plus a [`FailurePolicy`] for when it is down: a local
//!   limit of `count / nodes` per node (fail-open) or a denial (fail-closed).
//!
//! **Quotas** over UTC calendar [`Window`]s (day, month) behind the [`QuotaStore`] port, for
//! request counts and spend budgets (in micro-units of currency):
//! * [`MemoryQuotaStore`], in-process;
//! * `SqlQuotaStore` (features `sqlite`, `postgres`): in-process counters persisted to SQL as
//!   deltas every second; a crash loses at most one flush interval, a restart continues;
//! * `RedisQuotaStore` (feature `redis` + a SQL feature): counters hot in Redis, exact across
//!   nodes, synced to SQL, never reset by a Redis restart.
//!
//! Every implementation of a port passes the same behaviour suite (`tests/limiter_suite.rs`,
//! `tests/quota_suite.rs`). Time comes from a [`Clock`] (limits) or the caller (quotas), so tests
//! move it by hand. Keys and subjects should be identifiers, never secrets: the shared backends
//! store them as they are.
//!
//! ```
//! use std::time::Duration;
//! use ratelimit::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ratelimit::Result<()> {
//! // 60 requests a minute per key, at most 1000 a day.
//! let limiter = LocalLimiter::new();
//! let quotas = MemoryQuotaStore::new();
//! let per_key: Limit = "60/min".parse()?;
//! let now = SystemClock::unix_millis();
//!
//! let mut served = 0;
//! for _ in 0..100 {
//!     let rate = limiter.check("key-42", &per_key, 1).await?;
//!     if !rate.allowed {
//!         // 429 with `Retry-After: rate.retry_after` and `RateLimit-*` headers.
//!         assert!(rate.retry_after.unwrap() <= Duration::from_secs(1));
//!         continue;
//!     }
//!     let quota = quotas.consume("key-42", Window::Day, 1, 1000, now).await?;
//!     if quota.allowed {
//!         served += 1;
//!     }
//! }
//! assert_eq!(served, 60); // the burst; then one a second
//! assert_eq!(quotas.usage("key-42", Window::Day, now).await?, 60);
//!
//! // A shared limiter that falls back to a local share when it is down (here the "shared" one
//! // is another local limiter; in production a `RedisLimiter`).
//! let fleet = FallbackLimiter::new(LocalLimiter::new(), LocalLimiter::new(), 4, FailurePolicy::FailOpen);
//! assert!(fleet.check("key-42", &per_key, 1).await?.allowed);
//! assert!(!fleet.is_degraded());
//! # Ok(())
//! # }
//! ```
//!
//! ## Features
//! * `redis`: `RedisBackend`, `RedisLimiter` (and with a SQL feature, `RedisQuotaStore`);
//! * `sqlite`, `postgres`: `QuotaDb`, `SqlQuotaStore`. The table comes from the workspace's
//!   `migrations/{sqlite,postgres}/…_quota_counters`; running them is the embedder's job.
//!
//! With no feature the crate has no network or database dependency.
#![forbid(unsafe_code)]

#[cfg(feature = "redis")]
mod backend;
mod clock;
mod error;
mod fallback;
mod gcra;
mod limiter;
mod local;
mod quota;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub use backend::{RedisBackend, RedisOptions};
pub use clock::{Clock, SystemClock, UnixMillis};
pub use error::{RateLimitError, Result};
pub use fallback::{FailurePolicy, FallbackLimiter};
pub use limiter::{Decision, Limit, RateLimiter};
pub use local::{LocalClock, LocalLimiter};
pub use quota::{MAX_AMOUNT, MemoryQuotaStore, QuotaDecision, QuotaStore, Window};
#[cfg(all(feature = "redis", any(feature = "sqlite", feature = "postgres")))]
pub use quota::{QuotaCharge, RateLimitedConsume, RedisQuotaOptions, RedisQuotaStore};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use quota::{QuotaDb, SqlQuotaStore};
#[cfg(feature = "redis")]
pub use redis::{RedisLimiter, TimeSource};
