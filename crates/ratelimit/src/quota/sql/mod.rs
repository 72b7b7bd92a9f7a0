//! Quota counters persisted in SQL: [`QuotaDb`] (the `quota_counters` table through
//! diesel-async, SQLite or PostgreSQL) and [`SqlQuotaStore`] (in-process counters flushed to it).
//!
//! Both backends share the schema and the queries: the `quota_queries!` macro expands the same
//! diesel code for each backend's connection type; only connecting differs.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{
    Counter, CounterId, CounterKey, CounterRef, QuotaDecision, QuotaStore, Window, try_add,
};
use crate::clock::UnixMillis;
use crate::error::{RateLimitError, Result};

/// How long a request waits for a pooled connection, for a new connection, or for a recycle
/// check: a dead database fails an operation after this, never stalls it.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);

/// The diesel schema of `quota_counters`, identical for both backends.
pub(crate) mod schema {
    diesel::table! {
        /// Quota counters: the amount used by a subject in one window instance.
        quota_counters (subject, window_kind, window_start) {
            /// Who consumed (an API key id, an account id).
            subject -> Text,
            /// `day` or `month` ([`Window::as_str`](crate::Window::as_str)).
            window_kind -> Text,
            /// [`Window::window_start`](crate::Window::window_start), Unix ms.
            window_start -> BigInt,
            /// The amount used (requests, or micro-units of currency).
            used -> BigInt,
        }
    }
}

/// Defines, for one backend's connection type `$conn`, the two queries the stores need:
/// `load` (a counter's stored value, 0 when absent) and `add` (add deltas in one transaction,
/// returning each counter's new stored total).
macro_rules! quota_queries {
    ($conn:ty, $backend:literal) => {
        /// The stored value of `key`; 0 when there is no row.
        pub(super) async fn load(
            conn: &mut $conn,
            key: &$crate::quota::CounterKey,
        ) -> $crate::error::Result<u64> {
            use diesel::prelude::*;
            use diesel_async::RunQueryDsl;
            use $crate::quota::sql::schema::quota_counters as t;

            let used: Option<i64> = t::table
                .find((key.subject.as_str(), key.window.as_str(), key.start))
                .select(t::used)
                .first(conn)
                .await
                .optional()
                .map_err(|e| $crate::error::RateLimitError::backend($backend, e))?;
            Ok(u64::try_from(used.unwrap_or(0)).unwrap_or(0))
        }

        /// Adds each delta to its row (`used = used + delta`, inserting missing rows) in one
        /// transaction; the new totals, in order.
        pub(super) async fn add(
            conn: &mut $conn,
            batch: &[($crate::quota::CounterKey, u64)],
        ) -> $crate::error::Result<Vec<u64>> {
            use diesel::prelude::*;
            use diesel::upsert::excluded;
            use diesel_async::{AsyncConnection, RunQueryDsl};
            use $crate::quota::sql::schema::quota_counters as t;

            let totals = conn
                .transaction::<_, diesel::result::Error, _>(async |conn| {
                    let mut totals = Vec::with_capacity(batch.len());
                    for (key, delta) in batch {
                        let delta = i64::try_from(*delta).unwrap_or(i64::MAX);
                        let upsert = diesel::insert_into(t::table)
                            .values((
                                t::subject.eq(key.subject.as_str()),
                                t::window_kind.eq(key.window.as_str()),
                                t::window_start.eq(key.start),
                                t::used.eq(delta),
                            ))
                            .on_conflict((t::subject, t::window_kind, t::window_start))
                            .do_update()
                            .set(t::used.eq(t::used + excluded(t::used)))
                            .returning(t::used);
                        let total: i64 = sql_pool::KeepPrepared(upsert).get_result(conn).await?;
                        totals.push(u64::try_from(total).unwrap_or(0));
                    }
                    Ok(totals)
                })
                .await
                .map_err(|e| $crate::error::RateLimitError::backend($backend, e))?;
            Ok(totals)
        }
    };
}

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

/// The database quota counters are persisted in: the `quota_counters` table of SQLite (feature
/// `sqlite`) or PostgreSQL (feature `postgres`), pooled. Run the workspace's
/// `migrations/{sqlite,postgres}` first (in-memory SQLite gets the table on connect).
///
/// Cheap to clone; clones share the pool. Connections are opened lazily.
#[derive(Clone)]
pub struct QuotaDb {
    pool: Pool,
}

#[derive(Clone)]
enum Pool {
    #[cfg(feature = "sqlite")]
    Sqlite(sqlite::Pool),
    #[cfg(feature = "postgres")]
    Postgres(postgres::Pool),
}

impl std::fmt::Debug for QuotaDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaDb")
            .field("backend", &self.backend())
            .finish()
    }
}

impl QuotaDb {
    /// The database at `url`: `postgres://` / `postgresql://` URLs are PostgreSQL, anything
    /// else SQLite (`sqlite://path`, a file path, `sqlite::memory:`); at most `pool_size`
    /// connections. Fails for a backend whose feature is not enabled.
    pub fn connect(url: &str, pool_size: usize) -> Result<QuotaDb> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::connect_postgres(url, pool_size)
        } else {
            Self::connect_sqlite(url, pool_size)
        }
    }

    #[cfg(feature = "postgres")]
    fn connect_postgres(url: &str, pool_size: usize) -> Result<QuotaDb> {
        QuotaDb::postgres(url, pool_size)
    }

    #[cfg(not(feature = "postgres"))]
    fn connect_postgres(_url: &str, _pool_size: usize) -> Result<QuotaDb> {
        Err(crate::error::RateLimitError::InvalidArgument(
            "a postgres:// database needs the `postgres` feature of ratelimit".into(),
        ))
    }

    #[cfg(feature = "sqlite")]
    fn connect_sqlite(url: &str, pool_size: usize) -> Result<QuotaDb> {
        QuotaDb::sqlite(url, pool_size)
    }

    #[cfg(not(feature = "sqlite"))]
    fn connect_sqlite(url: &str, _pool_size: usize) -> Result<QuotaDb> {
        Err(crate::error::RateLimitError::InvalidArgument(format!(
            "{url:?} is not a postgres:// URL and the `sqlite` feature of ratelimit is off"
        )))
    }

    /// An SQLite database (see [`connect`](Self::connect)).
    #[cfg(feature = "sqlite")]
    pub fn sqlite(url: &str, pool_size: usize) -> Result<QuotaDb> {
        Ok(QuotaDb {
            pool: Pool::Sqlite(sqlite::connect(url, pool_size)?),
        })
    }

    /// A PostgreSQL database; the schema comes from the connection's `search_path`
    /// (`?options=-c%20search_path%3Dmy_schema`).
    #[cfg(feature = "postgres")]
    pub fn postgres(url: &str, pool_size: usize) -> Result<QuotaDb> {
        Ok(QuotaDb {
            pool: Pool::Postgres(postgres::connect(url, pool_size)?),
        })
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match &self.pool {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(_) => "sqlite",
            #[cfg(feature = "postgres")]
            Pool::Postgres(_) => "postgres",
        }
    }

    /// The amount stored in the database for `subject` in the `window` containing `now`
    /// (what a restarted node would start from).
    pub async fn stored_usage(
        &self,
        subject: &str,
        window: Window,
        now: UnixMillis,
    ) -> Result<u64> {
        self.load(&CounterKey::new(subject, window, now)).await
    }

    pub(crate) async fn load(&self, key: &CounterKey) -> Result<u64> {
        match &self.pool {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(pool) => sqlite::load(&mut *sqlite::conn(pool).await?, key).await,
            #[cfg(feature = "postgres")]
            Pool::Postgres(pool) => postgres::load(&mut *postgres::conn(pool).await?, key).await,
        }
    }

    /// Adds the deltas in one transaction: all or none. The new stored totals, in order.
    pub(crate) async fn add(&self, batch: &[(CounterKey, u64)]) -> Result<Vec<u64>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match &self.pool {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(pool) => sqlite::add(&mut *sqlite::conn(pool).await?, batch).await,
            #[cfg(feature = "postgres")]
            Pool::Postgres(pool) => postgres::add(&mut *postgres::conn(pool).await?, batch).await,
        }
    }
}

/// Flushes without any use before a counter is dropped from memory (reloaded on next use).
const EVICT_AFTER_IDLE_FLUSHES: u32 = 60;

/// Most counters created while the database is down (their stored totals unknown). Past it,
/// new subjects are not counted until the database returns ([`SqlQuotaStore::dropped`]).
const MAX_UNLOADED_COUNTERS: usize = 10_000;

/// A [`QuotaStore`] persisted in SQL (features `sqlite` / `postgres`): the embedded default.
///
/// The hot path is in-process: a `consume` checks and counts in memory (a sharded map, no
/// global lock, no I/O) once the counter is loaded. Counters are loaded from the database on
/// first use of a subject and window (so a restarted node continues where it left off) and
/// written back as deltas (`used = used + delta`, one transaction) every flush interval (1 s by
/// default) by a background task, and on [`flush`](QuotaStore::flush).
///
/// **Durability.** A crash loses at most the increments of one flush interval (those counted
/// since the last flush); a clean shutdown that calls `flush()` loses nothing. A failed flush
/// keeps its deltas and retries them with the next one.
///
/// **Database down.** Counters already in memory go on counting, their deltas kept until a
/// flush succeeds (one `u64` per counter, however long the outage). A subject first used while
/// the database cannot be read gets a counter that starts from zero (its stored total unknown:
/// the quota may then overshoot by that total until the database returns) whose increments are
/// written as deltas like any other. At most 10 000 such counters are created; past that,
/// `consume` for a new subject fails as the database does and the amount is counted in
/// [`dropped`](SqlQuotaStore::dropped).
///
/// **Several nodes on one database** (no Redis): each node counts in its own memory and adds
/// its deltas to the shared rows; a flush also reads back the row's total, so a node sees the
/// others' use with up to a flush interval of delay, and a counter idle for a minute is reloaded
/// on next use. The quota is then approximate, overshooting by at most what the other nodes
/// counted in the last interval. Exact cross-node quotas need `RedisQuotaStore`.
///
/// Cheap to clone; clones share the counters. The flush task holds no strong reference and ends
/// when the last clone is dropped — so call `flush()` before dropping it.
#[derive(Clone)]
pub struct SqlQuotaStore {
    inner: Arc<SqlInner>,
}

struct SqlInner {
    db: QuotaDb,
    counters: DashMap<CounterKey, Counter>,
    /// Counters with [`Counter::unloaded`] set.
    unloaded: AtomicUsize,
    /// Amounts not counted because too many counters were unloaded.
    dropped: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
    flush_interval: Duration,
}

impl std::fmt::Debug for SqlQuotaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlQuotaStore")
            .field("db", &self.inner.db)
            .field("counters", &self.inner.counters.len())
            .field("flush_interval", &self.inner.flush_interval)
            .finish()
    }
}

impl SqlQuotaStore {
    /// The default flush interval, 1 s: what a crash may lose.
    pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

    /// A store on `db`, flushed every second.
    pub fn new(db: QuotaDb) -> SqlQuotaStore {
        SqlQuotaStore::with_flush_interval(db, Self::DEFAULT_FLUSH_INTERVAL)
    }

    /// A store on `db`, flushed every `flush_interval` (at least 1 ms).
    ///
    /// The flush task is spawned on the current tokio runtime; built outside one, there is no
    /// task and nothing is written until [`flush`](QuotaStore::flush) is called.
    pub fn with_flush_interval(db: QuotaDb, flush_interval: Duration) -> SqlQuotaStore {
        let flush_interval = flush_interval.max(Duration::from_millis(1));
        let inner = Arc::new(SqlInner {
            db,
            counters: DashMap::new(),
            unloaded: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
            flush_interval,
        });
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(flush_task(Arc::downgrade(&inner), flush_interval));
            }
            Err(_) => tracing::warn!(
                "SqlQuotaStore built outside a tokio runtime: no background flush, call flush()"
            ),
        }
        SqlQuotaStore { inner }
    }

    /// The database.
    pub fn db(&self) -> &QuotaDb {
        &self.inner.db
    }

    /// The flush interval: the most a crash can lose.
    pub fn flush_interval(&self) -> Duration {
        self.inner.flush_interval
    }

    /// Counters held in memory.
    pub fn counters(&self) -> usize {
        self.inner.counters.len()
    }

    /// The amount counted but not yet written to the database.
    pub fn pending(&self) -> u64 {
        self.inner.counters.iter().map(|c| c.pending).sum()
    }

    /// The amounts not counted because the database was down and the counters created without
    /// it were at their bound (see "Database down" above); since the store was built.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

async fn flush_task(inner: Weak<SqlInner>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.flush().await {
            tracing::warn!(error = %e, "quota flush failed; will retry");
        }
    }
}

impl SqlInner {
    /// `consume` for a counter not in memory: its stored total is loaded first.
    async fn consume_first(
        &self,
        key: CounterKey,
        amount: u64,
        limit: u64,
    ) -> Result<QuotaDecision> {
        let stored = match self.db.load(&key).await {
            Ok(stored) => stored,
            Err(e) => return self.consume_unloaded(key, amount, limit, e),
        };
        let mut counter = self.counters.entry(key.clone()).or_insert_with(|| Counter {
            used: stored,
            ..Counter::default()
        });
        Ok(counter.consume(&key, amount, limit))
    }

    /// `consume` for a subject whose stored total could not be read (`error`): counts in a new
    /// counter starting from zero, written as deltas once the database returns; `error` when
    /// there is nothing to count or too many such counters exist already.
    fn consume_unloaded(
        &self,
        key: CounterKey,
        amount: u64,
        limit: u64,
        error: RateLimitError,
    ) -> Result<QuotaDecision> {
        if amount == 0 || try_add(0, amount, limit.min(super::MAX_AMOUNT)).is_none() {
            return Err(error);
        }
        let mut counter = match self.counters.entry(key.clone()) {
            Entry::Occupied(e) => e.into_ref(),
            Entry::Vacant(e) => {
                if self.unloaded.fetch_add(1, Ordering::Relaxed) >= MAX_UNLOADED_COUNTERS {
                    self.unloaded.fetch_sub(1, Ordering::Relaxed);
                    self.dropped.fetch_add(amount, Ordering::Relaxed);
                    return Err(error);
                }
                e.insert(Counter {
                    unloaded: true,
                    ..Counter::default()
                })
            }
        };
        Ok(counter.consume(&key, amount, limit))
    }

    async fn flush(&self) -> Result<()> {
        let _flushing = self.flush_lock.lock().await;
        let mut batch = Vec::new();
        let mut idle = Vec::new();
        for mut entry in self.counters.iter_mut() {
            let counter = entry.value_mut();
            if counter.pending > 0 {
                let delta = std::mem::take(&mut counter.pending);
                batch.push((entry.key().clone(), delta));
            } else {
                counter.idle = counter.idle.saturating_add(1);
                if counter.idle >= EVICT_AFTER_IDLE_FLUSHES {
                    idle.push(entry.key().clone());
                }
            }
        }
        for key in idle {
            self.counters.remove_if(&key, |_, c| {
                c.pending == 0 && c.idle >= EVICT_AFTER_IDLE_FLUSHES
            });
        }
        match self.db.add(&batch).await {
            Ok(totals) => {
                for ((key, _), total) in batch.iter().zip(totals) {
                    if let Some(mut counter) = self.counters.get_mut(key) {
                        // The row's total includes other nodes' deltas; add what was counted
                        // here since the batch was taken.
                        counter.used = total.saturating_add(counter.pending);
                        if std::mem::take(&mut counter.unloaded) {
                            self.unloaded.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                for (key, delta) in batch {
                    match self.counters.get_mut(&key) {
                        Some(mut counter) => {
                            counter.pending = counter.pending.saturating_add(delta);
                        }
                        None => tracing::error!(window = %key.window, start = key.start, delta,
                            "quota counter vanished during a failed flush; delta lost"),
                    }
                }
                Err(e)
            }
        }
    }
}

#[async_trait]
impl QuotaStore for SqlQuotaStore {
    fn name(&self) -> &'static str {
        self.inner.db.backend()
    }

    async fn consume(
        &self,
        subject: &str,
        window: Window,
        amount: u64,
        limit: u64,
        now: UnixMillis,
    ) -> Result<QuotaDecision> {
        let id = CounterRef::new(subject, window, now);
        if let Some(mut counter) = self.inner.counters.get_mut(&id as &dyn CounterId) {
            return Ok(counter.consume(&id, amount, limit));
        }
        // Boxed: the query's future is large and needed only for a counter's first use; inline
        // it would be part of every call's boxed future, a large allocation per request.
        Box::pin(self.inner.consume_first(id.to_key(), amount, limit)).await
    }

    async fn usage(&self, subject: &str, window: Window, now: UnixMillis) -> Result<u64> {
        let id = CounterRef::new(subject, window, now);
        if let Some(counter) = self.inner.counters.get(&id as &dyn CounterId) {
            return Ok(counter.used);
        }
        self.inner.db.load(&id.to_key()).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
}
