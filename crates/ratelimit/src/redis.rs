//! The shared limiter: GCRA in one atomic Lua script per check, state in Redis.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis::{Script, ScriptInvocation};

use crate::backend::RedisBackend;
use crate::clock::Clock;
use crate::error::Result;
use crate::gcra::Gcra;
use crate::limiter::{Decision, Limit, RateLimiter, validate};

/// GCRA over one key (see `gcra.rs`, whose `Gcra::check` this transcribes), in whole
/// microseconds, which doubles (Lua's numbers) hold exactly for any date this side of 2255.
///
/// KEYS[1]: the bucket, holding its TAT. ARGV: emission interval, burst, cost, and `now` or
/// `''` for the server's own clock (`TIME`), so node clocks never matter.
/// Returns `{allowed, TAT − now after the decision, retry_after (0 when allowed)}`.
pub(crate) const GCRA_LUA: &str = r"
local t = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now
if ARGV[4] == '' then
  if redis.replicate_commands then redis.replicate_commands() end
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
else
  now = tonumber(ARGV[4])
end
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local window = t * count
local new_tat = tat + cost * t
if new_tat - now <= window then
  local ttl_ms = math.max(1, math.ceil((new_tat - now) / 1000))
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl_ms))
  return {1, new_tat - now, 0}
end
return {0, tat - now, new_tat - window - now}
";

/// Where a [`RedisLimiter`] takes "now" from.
#[derive(Debug, Clone, Default)]
pub enum TimeSource {
    /// Redis's `TIME`, read inside the script: every node agrees whatever their own clocks say.
    #[default]
    RedisServer,
    /// A clock passed in with each check: for tests, with governor's
    /// [`FakeRelativeClock`](governor::clock::FakeRelativeClock). All limiters sharing keys must
    /// share the clock.
    Clock(Arc<dyn Clock>),
}

/// A [`RateLimiter`] whose state lives in Redis, shared by every node using the same Redis and
/// key prefix (feature `redis`): limits hold across the whole fleet, exactly.
///
/// Each check is one `EVALSHA` of a GCRA script (loaded on `NOSCRIPT`), atomic in Redis, timed
/// by Redis's own clock. A bucket is one string key, `{prefix}{count}/{interval µs}:{key}`,
/// expiring when the bucket is full again; pass identifiers as keys (a key id, a hashed client
/// id), never secrets, as they appear in Redis key names.
///
/// Failures (Redis down or slow, breaker open) are
/// [`RateLimitError::Unavailable`](crate::RateLimitError::Unavailable) after at most the
/// [`RedisOptions`](crate::RedisOptions) timeouts, and at once while the breaker is open; wrap
/// the limiter in a [`FallbackLimiter`](crate::FallbackLimiter) to keep answering.
///
/// ```no_run
/// use ratelimit::{Limit, RateLimiter, RedisBackend, RedisLimiter, RedisOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> ratelimit::Result<()> {
/// let redis = RedisBackend::connect(RedisOptions::new("redis://127.0.0.1:6379"))?;
/// let limiter = RedisLimiter::new(redis).with_prefix("myservice:rl:");
/// let decision = limiter.check("key-42", &Limit::per_minute(60), 1).await?;
/// println!("allowed={} remaining={}", decision.allowed, decision.remaining);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RedisLimiter {
    backend: RedisBackend,
    prefix: String,
    time: TimeSource,
    script: Script,
}

impl RedisLimiter {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "tollgate:rl:";

    /// A limiter on `backend`, keys under [`DEFAULT_PREFIX`](Self::DEFAULT_PREFIX), timed by the
    /// Redis server.
    pub fn new(backend: RedisBackend) -> RedisLimiter {
        RedisLimiter {
            backend,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            time: TimeSource::RedisServer,
            script: Script::new(GCRA_LUA),
        }
    }

    /// Keys under `prefix` instead.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> RedisLimiter {
        self.prefix = prefix.into();
        self
    }

    /// Takes "now" from `time` instead of the Redis server.
    pub fn with_time_source(mut self, time: TimeSource) -> RedisLimiter {
        self.time = time;
        self
    }

    /// The backend (for `ping` and breaker state).
    pub fn backend(&self) -> &RedisBackend {
        &self.backend
    }

    /// The Redis key holding `key`'s bucket under `limit`.
    pub fn bucket_key(&self, key: &str, limit: &Limit) -> Result<String> {
        Ok(self.key_for(key, limit, limit.emission_interval()?))
    }

    fn key_for(&self, key: &str, limit: &Limit, interval: Duration) -> String {
        format!(
            "{}{}/{}:{key}",
            self.prefix,
            limit.count,
            interval.as_micros()
        )
    }
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn check(&self, key: &str, limit: &Limit, cost: u32) -> Result<Decision> {
        let Some(gcra) = self.gcra_for(limit, cost)? else {
            return Ok(Decision::over_capacity(limit));
        };
        let mut invocation = self.script.prepare_invoke();
        self.push_gcra(&mut invocation, &gcra, key, limit, cost);
        let (allowed, backlog, retry): (i64, i64, i64) = self.backend.invoke(&invocation).await?;
        Ok(gcra_decision(&gcra, allowed, backlog, retry))
    }
}

impl RedisLimiter {
    /// The GCRA of `limit`, or `None` when `cost` can never fit it (nothing to ask Redis).
    pub(crate) fn gcra_for(&self, limit: &Limit, cost: u32) -> Result<Option<Gcra>> {
        if validate(limit, cost)?.is_none() {
            return Ok(None);
        }
        Gcra::new(limit).map(Some)
    }

    /// Adds one check's key and arguments ([`GCRA_LUA`]'s KEYS[1] and ARGV[1..4]).
    pub(crate) fn push_gcra(
        &self,
        invocation: &mut ScriptInvocation<'_>,
        gcra: &Gcra,
        key: &str,
        limit: &Limit,
        cost: u32,
    ) {
        let now = match &self.time {
            TimeSource::RedisServer => String::new(),
            TimeSource::Clock(clock) => clock.now_micros().to_string(),
        };
        invocation
            .key(self.key_for(key, limit, gcra.t()))
            .arg(u64::try_from(gcra.t().as_micros()).unwrap_or(u64::MAX))
            .arg(limit.count)
            .arg(cost)
            .arg(now);
    }
}

/// The decision [`GCRA_LUA`]'s `{allowed, backlog, retry}` (µs) stand for.
pub(crate) fn gcra_decision(gcra: &Gcra, allowed: i64, backlog: i64, retry: i64) -> Decision {
    let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
    gcra.decision(allowed == 1, micros(backlog), Some(micros(retry)))
}
