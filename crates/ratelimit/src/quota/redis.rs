//! Quota counters hot in Redis, synced to SQL.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis::{self, Script};

use super::sql::QuotaDb;
use super::{CounterId, CounterKey, QuotaDecision, QuotaStore, Window};
use crate::backend::RedisBackend;
use crate::clock::UnixMillis;
use crate::error::{RateLimitError, Result};
use crate::limiter::{Decision, Limit};
use crate::redis::{GCRA_LUA, RedisLimiter, gcra_decision};

/// The largest integer Lua's numbers (doubles) hold exactly: limits are capped to it.
const MAX_EXACT: u64 = super::MAX_AMOUNT;

/// Dirty counters claimed per script run, and runs per sync (bounds one sync's work).
const CLAIM_BATCH: u32 = 512;
const MAX_CLAIMS_PER_SYNC: usize = 64;

/// Check-and-add on one counter (a hash: `u` = used, `s` = the part already synced to SQL).
///
/// KEYS: the counter, the dirty set. ARGV: amount, limit, expiry (Unix ms), seed (`''` = none),
/// the counter's member name in the dirty set. A missing counter with no seed answers
/// `{-1, 0}` (the caller loads the SQL value and calls again with it as the seed); otherwise
/// `{1, used}` when added, `{0, used}` when it did not fit.
const CONSUME_LUA: &str = r"
local used = redis.call('HGET', KEYS[1], 'u')
if not used then
  if ARGV[4] == '' then return {-1, 0} end
  used = ARGV[4]
  redis.call('HSET', KEYS[1], 'u', used, 's', used)
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
end
used = tonumber(used)
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if amount <= limit and used <= limit - amount then
  if amount > 0 then
    used = redis.call('HINCRBY', KEYS[1], 'u', ARGV[1])
    redis.call('SADD', KEYS[2], ARGV[5])
  end
  return {1, used}
end
return {0, used}
";

/// Claims up to ARGV[2] dirty counters for syncing: pops them from the dirty set (KEYS[1]) and
/// moves each one's `s` up to its `u`, atomically. Returns `{popped, {member...}, {delta...}}`
/// for the counters with something to write.
const CLAIM_LUA: &str = r"
local members = redis.call('SPOP', KEYS[1], ARGV[2])
local names, deltas = {}, {}
for _, m in ipairs(members) do
  local k = ARGV[1] .. m
  local u = redis.call('HGET', k, 'u')
  if u then
    local d = tonumber(u) - tonumber(redis.call('HGET', k, 's') or '0')
    if d > 0 then
      redis.call('HSET', k, 's', u)
      names[#names + 1] = m
      deltas[#deltas + 1] = d
    end
  end
end
return {#members, names, deltas}
";

/// A key's rate limit and its quota counters in one round trip: [`GCRA_LUA`] on KEYS[1] with
/// ARGV[1..4]; if it allows, [`CONSUME_LUA`] on each of the ARGV[5] counters (KEYS[1 + i], the
/// dirty set last; five arguments each), stopping at the first that does not fit. Nothing is
/// done when a counter is missing (it needs its SQL seed first): `{-1}`. Otherwise the GCRA's
/// `{allowed, backlog, retry}` followed by each counter's `{status, used}`.
fn rate_limited_consume_lua() -> String {
    format!(
        "local function gcra(KEYS, ARGV)\n{GCRA_LUA}\nend\n\
         local function consume(KEYS, ARGV)\n{CONSUME_LUA}\nend\n{}",
        r"
local n = tonumber(ARGV[5])
for i = 1, n do
  if redis.call('EXISTS', KEYS[1 + i]) == 0 then return {-1} end
end
local r = gcra({KEYS[1]}, {ARGV[1], ARGV[2], ARGV[3], ARGV[4]})
local out = {r[1], r[2], r[3]}
if r[1] ~= 1 then return out end
for i = 1, n do
  local b = 5 + (i - 1) * 5
  local q = consume({KEYS[1 + i], KEYS[2 + n]},
    {ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]})
  out[#out + 1] = q[1]
  out[#out + 1] = q[2]
  if q[1] ~= 1 then return out end
end
return out
"
    )
}

/// One quota counter for [`RedisQuotaStore::consume_rate_limited`].
#[derive(Debug, Clone, Copy)]
pub struct QuotaCharge<'a> {
    /// Whose counter (as in [`QuotaStore::consume`]).
    pub subject: &'a str,
    /// Its window.
    pub window: Window,
    /// How much to add.
    pub amount: u64,
    /// The limit it must stay within.
    pub limit: u64,
}

/// What [`RedisQuotaStore::consume_rate_limited`] decided.
#[derive(Debug, Clone)]
pub struct RateLimitedConsume {
    /// The rate limit's decision. When it refused, no quota was counted.
    pub rate: Decision,
    /// One decision per quota tried, in order; the quotas after one that did not fit were not
    /// tried (so a refusal is the last one).
    pub quotas: Vec<QuotaDecision>,
}

/// Settings of a [`RedisQuotaStore`]. `#[non_exhaustive]`: start from
/// [`RedisQuotaOptions::default`] and set fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisQuotaOptions {
    /// Prefix of every key (default `tollgate:q:`): counters are `{prefix}c:{window}:{start}:
    /// {subject}`, the set of counters to sync `{prefix}dirty`.
    pub prefix: String,
    /// How often the sync task writes deltas to SQL (default 1 s).
    pub sync_interval: Duration,
    /// How long past its window's end a counter stays in Redis (default 1 day), so the last
    /// increments are synced.
    pub expire_grace: Duration,
}

impl Default for RedisQuotaOptions {
    fn default() -> Self {
        RedisQuotaOptions {
            prefix: "tollgate:q:".to_owned(),
            sync_interval: Duration::from_secs(1),
            expire_grace: Duration::from_secs(86_400),
        }
    }
}

/// A [`QuotaStore`] whose counters live in Redis, exact across every node sharing it (features
/// `redis` and `sqlite` or `postgres`).
///
/// Each `consume` is one Lua script: check against the limit and add, atomically. Counters are
/// Redis hashes expiring a grace period after their window ends. A sync task (every
/// [`sync_interval`](RedisQuotaOptions::sync_interval), and on [`flush`](QuotaStore::flush))
/// writes what changed to the SQL `quota_counters` table as deltas: Redis marks counters dirty
/// and keeps per counter the value already synced, so any node can sync any counter and
/// nothing is written twice.
///
/// **Never reset by a Redis restart**: a counter missing from Redis is seeded from its SQL
/// value before counting. What Redis loses on a crash without persistence is at most one sync
/// interval of increments. A claimed delta whose SQL write failed is kept in memory and
/// retried. Needs a single Redis (or a primary), not Redis Cluster: the sync script touches
/// keys it computes.
///
/// While Redis is unreachable, calls fail with
/// [`RateLimitError::Unavailable`](crate::RateLimitError::Unavailable) within the backend's
/// timeouts; the caller decides whether to serve.
///
/// Cheap to clone; clones share everything. The sync task ends when the last clone is dropped:
/// call `flush()` first.
#[derive(Clone)]
pub struct RedisQuotaStore {
    inner: Arc<Inner>,
}

struct Inner {
    redis: RedisBackend,
    db: QuotaDb,
    options: RedisQuotaOptions,
    dirty_key: String,
    counter_prefix: String,
    consume: Script,
    rate_limited_consume: Script,
    claim: Script,
    /// Deltas claimed from Redis whose SQL write has not succeeded yet.
    unwritten: tokio::sync::Mutex<HashMap<CounterKey, u64>>,
}

impl std::fmt::Debug for RedisQuotaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQuotaStore")
            .field("redis", &self.inner.redis)
            .field("db", &self.inner.db)
            .field("options", &self.inner.options)
            .finish()
    }
}

impl RedisQuotaStore {
    /// A store counting in `redis`, synced to `db`. Spawns the sync task on the current tokio
    /// runtime (outside one, nothing is synced until `flush()`).
    pub fn new(redis: RedisBackend, db: QuotaDb, options: RedisQuotaOptions) -> RedisQuotaStore {
        let inner = Arc::new(Inner {
            dirty_key: format!("{}dirty", options.prefix),
            counter_prefix: format!("{}c:", options.prefix),
            redis,
            db,
            consume: Script::new(CONSUME_LUA),
            rate_limited_consume: Script::new(&rate_limited_consume_lua()),
            claim: Script::new(CLAIM_LUA),
            unwritten: tokio::sync::Mutex::new(HashMap::new()),
            options,
        });
        let every = inner.options.sync_interval.max(Duration::from_millis(1));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(sync_task(Arc::downgrade(&inner), every));
            }
            Err(_) => tracing::warn!(
                "RedisQuotaStore built outside a tokio runtime: no background sync, call flush()"
            ),
        }
        RedisQuotaStore { inner }
    }

    /// The SQL database counters are synced to.
    pub fn db(&self) -> &QuotaDb {
        &self.inner.db
    }

    /// The Redis backend.
    pub fn redis(&self) -> &RedisBackend {
        &self.inner.redis
    }

    /// `limiter.check(key, limit, cost)` and, if it allows, [`consume`](QuotaStore::consume)
    /// of each of `quotas` in turn (stopping at the first that does not fit), in **one round
    /// trip**: one atomic script, where the two calls are two. `limiter` must use this store's
    /// Redis.
    ///
    /// `Ok(None)`: nothing was done, make the calls one by one. That is the case when a
    /// counter is not in Redis yet (a new window, or Redis lost it: `consume` seeds it from
    /// SQL), and when `cost` can never fit `limit`.
    pub async fn consume_rate_limited(
        &self,
        limiter: &RedisLimiter,
        key: &str,
        limit: &Limit,
        cost: u32,
        quotas: &[QuotaCharge<'_>],
        now: UnixMillis,
    ) -> Result<Option<RateLimitedConsume>> {
        let inner = &*self.inner;
        let Some(gcra) = limiter.gcra_for(limit, cost)? else {
            return Ok(None);
        };
        let counters: Vec<(CounterKey, String)> = quotas
            .iter()
            .map(|q| {
                let key = CounterKey::new(q.subject, q.window, now);
                let member = member(&key);
                (key, member)
            })
            .collect();
        let mut invocation = inner.rate_limited_consume.prepare_invoke();
        limiter.push_gcra(&mut invocation, &gcra, key, limit, cost);
        invocation.arg(quotas.len());
        for (q, (counter, member)) in quotas.iter().zip(&counters) {
            invocation
                .key(format!("{}{member}", inner.counter_prefix))
                .arg(q.amount.min(MAX_EXACT + 1))
                .arg(q.limit.min(MAX_EXACT))
                .arg(inner.expire_at(counter))
                .arg("")
                .arg(member);
        }
        invocation.key(&inner.dirty_key);
        let reply: Vec<i64> = inner.redis.invoke(&invocation).await?;
        let [allowed, backlog, retry, counted @ ..] = reply.as_slice() else {
            // `{-1}`: a counter needs seeding.
            return Ok(None);
        };
        let decisions = counted
            .chunks_exact(2)
            .zip(quotas.iter().zip(&counters))
            .map(|(pair, (q, (counter, _)))| QuotaDecision {
                allowed: pair[0] == 1,
                used: u64::try_from(pair[1]).unwrap_or(0),
                limit: q.limit,
                reset_at: counter.end(),
            })
            .collect();
        Ok(Some(RateLimitedConsume {
            rate: gcra_decision(&gcra, *allowed, *backlog, *retry),
            quotas: decisions,
        }))
    }
}

async fn sync_task(inner: Weak<Inner>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.sync().await {
            tracing::warn!(error = %e, "quota sync to SQL failed; will retry");
        }
    }
}

/// `{window}:{start}:{subject}`: the counter's name in the dirty set and its key's suffix.
fn member(key: &CounterKey) -> String {
    format!("{}:{}:{}", key.window.as_str(), key.start, key.subject)
}

fn parse_member(member: &str) -> Option<CounterKey> {
    let mut parts = member.splitn(3, ':');
    let window: Window = parts.next()?.parse().ok()?;
    let start: UnixMillis = parts.next()?.parse().ok()?;
    let subject = parts.next()?.to_owned();
    Some(CounterKey {
        subject,
        window,
        start,
    })
}

impl Inner {
    /// When a counter leaves Redis: its window's end plus the grace.
    fn expire_at(&self, key: &CounterKey) -> UnixMillis {
        let grace = i64::try_from(self.options.expire_grace.as_millis()).unwrap_or(i64::MAX);
        key.end().saturating_add(grace)
    }

    async fn sync(&self) -> Result<()> {
        let mut unwritten = self.unwritten.lock().await;
        let mut claim_error = None;
        for _ in 0..MAX_CLAIMS_PER_SYNC {
            let mut invocation = self.claim.prepare_invoke();
            invocation
                .key(&self.dirty_key)
                .arg(&self.counter_prefix)
                .arg(CLAIM_BATCH);
            match self
                .redis
                .invoke::<(u64, Vec<String>, Vec<i64>)>(&invocation)
                .await
            {
                Ok((popped, names, deltas)) => {
                    for (name, delta) in names.iter().zip(deltas) {
                        let Some(key) = parse_member(name) else {
                            tracing::warn!(member = %name, "unparseable quota counter skipped");
                            continue;
                        };
                        let delta = u64::try_from(delta).unwrap_or(0);
                        let slot = unwritten.entry(key).or_insert(0);
                        *slot = slot.saturating_add(delta);
                    }
                    if popped < u64::from(CLAIM_BATCH) {
                        break;
                    }
                }
                Err(e) => {
                    claim_error = Some(e);
                    break;
                }
            }
        }
        if !unwritten.is_empty() {
            let batch: Vec<(CounterKey, u64)> =
                unwritten.iter().map(|(k, d)| (k.clone(), *d)).collect();
            self.db.add(&batch).await?;
            unwritten.clear();
        }
        claim_error.map_or(Ok(()), Err)
    }

    /// What a counter missing from Redis restarts from: its SQL value plus deltas claimed here
    /// but not yet written.
    async fn seed(&self, key: &CounterKey) -> Result<u64> {
        let stored = self.db.load(key).await?;
        let unwritten = self
            .unwritten
            .try_lock()
            .ok()
            .and_then(|u| u.get(key).copied())
            .unwrap_or(0);
        Ok(stored.saturating_add(unwritten))
    }
}

#[async_trait]
impl QuotaStore for RedisQuotaStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn consume(
        &self,
        subject: &str,
        window: Window,
        amount: u64,
        limit: u64,
        now: UnixMillis,
    ) -> Result<QuotaDecision> {
        let inner = &*self.inner;
        let key = CounterKey::new(subject, window, now);
        let member = member(&key);
        let counter = format!("{}{member}", inner.counter_prefix);
        let expire_at = inner.expire_at(&key);
        let mut seed = String::new();
        for _ in 0..2 {
            let mut invocation = inner.consume.prepare_invoke();
            invocation
                .key(&counter)
                .key(&inner.dirty_key)
                .arg(amount.min(MAX_EXACT + 1))
                .arg(limit.min(MAX_EXACT))
                .arg(expire_at)
                .arg(&seed)
                .arg(&member);
            let (status, used): (i64, i64) = inner.redis.invoke(&invocation).await?;
            if status == -1 {
                seed = inner.seed(&key).await?.min(MAX_EXACT).to_string();
                continue;
            }
            return Ok(QuotaDecision {
                allowed: status == 1,
                used: u64::try_from(used).unwrap_or(0),
                limit,
                reset_at: key.end(),
            });
        }
        Err(RateLimitError::Corrupt(format!(
            "quota counter {counter} still missing after seeding"
        )))
    }

    async fn usage(&self, subject: &str, window: Window, now: UnixMillis) -> Result<u64> {
        let inner = &*self.inner;
        let key = CounterKey::new(subject, window, now);
        let counter = format!("{}{}", inner.counter_prefix, member(&key));
        let used: Option<u64> = inner
            .redis
            .query(redis::cmd("HGET").arg(&counter).arg("u"))
            .await?;
        match used {
            Some(used) => Ok(used),
            None => inner.seed(&key).await,
        }
    }

    async fn flush(&self) -> Result<()> {
        self.inner.sync().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_round_trip() {
        let key = CounterKey::new("acct:42:x", Window::Month, 1_795_392_000_000);
        let m = member(&key);
        assert_eq!(m, format!("month:{}:acct:42:x", key.start));
        assert_eq!(parse_member(&m), Some(key));
        assert_eq!(parse_member("week:1:x"), None);
        assert_eq!(parse_member("day:x:y"), None);
        assert_eq!(parse_member("day:1"), None);
    }
}
