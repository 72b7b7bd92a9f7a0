//! Two tiers: an in-process L1 in front of a shared or durable L2.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::clock::UnixMillis;
use crate::entry::Entry;
use crate::error::{CacheError, Result};
use crate::filter::L2Filter;
use crate::key::CacheKey;
use crate::memory::MemoryStore;
use crate::store::{CacheStore, PurgeFilter, StoreUsage};

enum Write {
    Put(CacheKey, Arc<Entry>),
    Flush(oneshot::Sender<()>),
}

/// Counters of a [`TieredStore`]'s second tier.
#[derive(Debug, Default)]
pub struct TierStats {
    /// Lookups answered by L1.
    pub l1_hits: AtomicU64,
    /// Lookups answered by L2 (and promoted into L1).
    pub l2_hits: AtomicU64,
    /// L2 reads or writes that failed and were skipped (the request went on without L2).
    pub l2_errors: AtomicU64,
    /// L2 reads or writes not attempted because L2 failed moments ago (see [`TieredStore`]).
    pub l2_skipped: AtomicU64,
    /// L2 reads not made because the L2 filter ruled the key out
    /// ([`TieredStore::with_l2_filter`]).
    pub l2_filtered: AtomicU64,
}

/// After an L2 failure, L2 is left alone for a cool-down, so that a dead database costs each
/// request nothing instead of a connection timeout.
#[derive(Debug)]
struct L2Health {
    origin: Instant,
    /// Milliseconds after `origin` until which L2 is skipped; 0: healthy.
    down_until: AtomicU64,
    /// Cool-down in milliseconds.
    cooldown_ms: AtomicU64,
}

impl L2Health {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    fn is_down(&self) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        until != 0 && self.now() < until
    }
    fn failed(&self) {
        let until = self
            .now()
            .saturating_add(self.cooldown_ms.load(Ordering::Relaxed))
            .max(1);
        self.down_until.store(until, Ordering::Relaxed);
    }
    fn succeeded(&self) {
        self.down_until.store(0, Ordering::Relaxed);
    }
}

/// An in-process [`MemoryStore`] (L1) in front of another store (L2, e.g. SQLite or PostgreSQL).
///
/// * `get`: L1, then L2; an L2 hit is promoted into L1.
/// * `put`: into L1 at once, into L2 through a bounded write-behind queue (a full queue makes
///   the writer wait rather than lose the write), written in batches of up to 64 with
///   [`put_many`](CacheStore::put_many) (a failed batch is tried once more, for a connection
///   the database closed); [`flush`](CacheStore::flush) waits for it. The writer lingers up to
///   20 ms after the first write of a batch for more to arrive
///   ([`with_write_linger`](Self::with_write_linger)), unless a full batch is queued or a
///   flush asks: one commit per batch instead of one per write or two is much less work for
///   the database under a steady trickle of misses.
/// * L2 failures never fail a lookup or a store: they are counted in [`TierStats`] and logged,
///   and the request is served from L1 or the upstream. After a failure L2 is skipped for a
///   cool-down (1 s by default, [`with_l2_cooldown`](Self::with_l2_cooldown)), so a database
///   that is down or hanging delays no request beyond the one that found out.
pub struct TieredStore {
    l1: MemoryStore,
    l2: Arc<dyn CacheStore>,
    writes: mpsc::Sender<Write>,
    /// Wakes a lingering writer: a batch is queued, or a flush.
    ready: Arc<Notify>,
    stats: Arc<TierStats>,
    health: Arc<L2Health>,
    /// How long the writer waits for a batch to fill, in microseconds.
    linger_us: Arc<AtomicU64>,
    /// Which keys L2 may hold, when L2 is this process's alone; shared with the writer.
    filter: Arc<std::sync::OnceLock<Arc<L2Filter>>>,
}

/// The default of [`TieredStore::with_write_linger`].
pub const DEFAULT_WRITE_LINGER: Duration = Duration::from_millis(20);

impl std::fmt::Debug for TieredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredStore")
            .field("l1", &self.l1)
            .field("l2", &self.l2.name())
            .finish()
    }
}

impl TieredStore {
    /// Combines `l1` and `l2`; `queue` bounds the writes waiting for L2. Must be called inside a
    /// tokio runtime (it spawns the L2 writer).
    pub fn new(l1: MemoryStore, l2: Arc<dyn CacheStore>, queue: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Write>(queue.max(1));
        let stats = Arc::new(TierStats::default());
        let health = Arc::new(L2Health {
            origin: Instant::now(),
            down_until: AtomicU64::new(0),
            cooldown_ms: AtomicU64::new(1000),
        });
        let linger_us = Arc::new(AtomicU64::new(micros(DEFAULT_WRITE_LINGER)));
        let filter = Arc::new(std::sync::OnceLock::new());
        let ready = Arc::new(Notify::new());
        tokio::spawn(write_behind(
            rx,
            Arc::clone(&l2),
            Writer {
                ready: Arc::clone(&ready),
                stats: Arc::clone(&stats),
                health: Arc::clone(&health),
                linger_us: Arc::clone(&linger_us),
                filter: Arc::clone(&filter),
            },
        ));
        TieredStore {
            l1,
            l2,
            writes: tx,
            ready,
            stats,
            health,
            linger_us,
            filter,
        }
    }

    /// Keeps a Bloom filter of the keys L2 holds, so that a miss for a key L2 has never stored
    /// does not ask it. **Only for an L2 no other process writes** (a SQLite file): what
    /// another process stores stays invisible to this one until the filter's next rebuild.
    ///
    /// The filter (2 MiB) is built by listing L2's keys
    /// ([`keys_after`](CacheStore::keys_after)) in the background; until that is done, and for
    /// an L2 that cannot list them, every miss asks L2 as before. Every key this store writes
    /// is recorded; keys removed from L2 stay in the filter (a lookup more, never a wrong
    /// answer) until it is rebuilt, after 2,000,000 recorded writes. Must be called inside a
    /// tokio runtime (it spawns the scan).
    pub fn with_l2_filter(self) -> Self {
        let _ = self.filter.set(L2Filter::spawn(Arc::clone(&self.l2)));
        self
    }

    /// Whether the L2 filter is built and answering (see
    /// [`with_l2_filter`](Self::with_l2_filter)).
    pub fn l2_filter_ready(&self) -> bool {
        self.filter.get().is_some_and(|f| f.is_built())
    }

    /// How long the L2 writer waits, after taking the first write of a batch, for the batch to
    /// fill (up to 64 writes) before committing it (default [`DEFAULT_WRITE_LINGER`]; zero:
    /// commit whatever is queued at once). A [`flush`](CacheStore::flush) never waits for it.
    /// Longer means fewer, larger transactions, and entries reaching L2 that much later.
    pub fn with_write_linger(self, linger: Duration) -> Self {
        self.linger_us.store(micros(linger), Ordering::Relaxed);
        self
    }

    /// How long L2 is skipped after it fails (default 1 s; zero: never skipped).
    pub fn with_l2_cooldown(self, cooldown: Duration) -> Self {
        let ms = u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX);
        self.health.cooldown_ms.store(ms, Ordering::Relaxed);
        self
    }

    /// Whether L2 is being skipped after a recent failure.
    pub fn l2_degraded(&self) -> bool {
        self.health.is_down()
    }

    /// The first tier.
    pub fn l1(&self) -> &MemoryStore {
        &self.l1
    }

    /// The second tier.
    pub fn l2(&self) -> &Arc<dyn CacheStore> {
        &self.l2
    }

    /// Tier counters.
    pub fn stats(&self) -> &Arc<TierStats> {
        &self.stats
    }

    fn l2_failed(&self, op: &str, e: &CacheError) {
        self.health.failed();
        self.stats.l2_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, op, "L2 cache unavailable, skipped");
    }
}

/// Most queued L2 writes committed together (one transaction in the SQL stores).
const WRITE_BATCH: usize = 64;

/// What the L2 writer shares with its store.
struct Writer {
    ready: Arc<Notify>,
    stats: Arc<TierStats>,
    health: Arc<L2Health>,
    linger_us: Arc<AtomicU64>,
    filter: Arc<std::sync::OnceLock<Arc<L2Filter>>>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The L2 writer: takes what is queued, waits up to the linger for the batch to fill (up to
/// [`WRITE_BATCH`] writes; not when a flush is queued), and stores it with one
/// [`put_many`](CacheStore::put_many); a flush request is answered once every write queued
/// before it has been tried. Ends, after writing what it took, when the store is dropped.
async fn write_behind(mut rx: mpsc::Receiver<Write>, l2: Arc<dyn CacheStore>, writer: Writer) {
    let mut queued = Vec::with_capacity(WRITE_BATCH);
    while rx.recv_many(&mut queued, WRITE_BATCH).await > 0 {
        let linger = Duration::from_micros(writer.linger_us.load(Ordering::Relaxed));
        if queued.len() < WRITE_BATCH
            && !linger.is_zero()
            && !queued.iter().any(|w| matches!(w, Write::Flush(_)))
        {
            // Waits to be told, not on the channel: waiting on the channel woke this task
            // for every write, from another thread mostly (a syscall and a context switch
            // per cache store under a stream of misses).
            let deadline = tokio::time::Instant::now() + linger;
            let _ = tokio::time::timeout_at(deadline, writer.ready.notified()).await;
            while queued.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(w) => queued.push(w),
                    Err(_) => break,
                }
            }
        }
        let mut batch = Vec::with_capacity(queued.len());
        let mut flushes = Vec::new();
        for w in queued.drain(..) {
            match w {
                Write::Put(key, entry) => batch.push((key, entry)),
                Write::Flush(done) => flushes.push(done),
            }
        }
        if write_batch(&*l2, &writer.stats, &writer.health, &batch).await
            && let Some(filter) = writer.filter.get()
        {
            for (key, _) in &batch {
                filter.record(key, false);
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// Writes `batch` (tried twice); whether it was written.
async fn write_batch(
    l2: &dyn CacheStore,
    stats: &TierStats,
    health: &L2Health,
    batch: &[(CacheKey, Arc<Entry>)],
) -> bool {
    let n = batch.len() as u64;
    if n == 0 {
        return false;
    }
    if health.is_down() {
        stats.l2_skipped.fetch_add(n, Ordering::Relaxed);
        return false;
    }
    // A pooled connection that the database closed (it restarted) fails once and is dropped;
    // the second try gets a fresh one. A database that is really down fails both (in the
    // background: no request waits on this).
    let mut result = l2.put_many(batch).await;
    if result.is_err() {
        result = l2.put_many(batch).await;
    }
    match result {
        Ok(()) => {
            health.succeeded();
            true
        }
        Err(e) => {
            health.failed();
            stats.l2_errors.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(error = %e, entries = n, "L2 cache writes skipped");
            false
        }
    }
}

#[async_trait]
impl CacheStore for TieredStore {
    fn name(&self) -> &'static str {
        "tiered"
    }

    fn peek(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.l1.get_sync(key)
    }

    /// The L2's health: the tier the process cannot serve durably without.
    /// Pings L2. An answer ends a cool-down at once, so readiness probes tell when L2 is in
    /// use again.
    async fn ping(&self) -> Result<()> {
        let result = self.l2.ping().await;
        if result.is_ok() {
            self.health.succeeded();
        }
        result
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Entry>>> {
        if let Some(e) = self.l1.get_sync(key) {
            self.stats.l1_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(e));
        }
        if self.health.is_down() {
            self.stats.l2_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        if let Some(filter) = self.filter.get()
            && !filter.may_hold(key)
        {
            self.stats.l2_filtered.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        match self.l2.get(key).await {
            Ok(Some(e)) => {
                self.health.succeeded();
                self.stats.l2_hits.fetch_add(1, Ordering::Relaxed);
                self.l1.insert_sync(*key, Arc::clone(&e));
                Ok(Some(e))
            }
            Ok(None) => {
                self.health.succeeded();
                Ok(None)
            }
            Err(e) => {
                self.l2_failed("get", &e);
                Ok(None)
            }
        }
    }

    async fn put(&self, key: CacheKey, entry: Arc<Entry>) -> Result<()> {
        self.l1.insert_sync(key, Arc::clone(&entry));
        if let Some(filter) = self.filter.get() {
            filter.record(&key, true);
        }
        if self.writes.send(Write::Put(key, entry)).await.is_err() {
            return Err(CacheError::backend(self.l2.name(), "L2 writer stopped"));
        }
        // A full batch (or a full queue, when it holds less) ends the writer's linger.
        let max = self.writes.max_capacity();
        if max - self.writes.capacity() >= WRITE_BATCH.min(max) {
            self.ready.notify_one();
        }
        Ok(())
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool> {
        // Pending writes first, so a queued put cannot resurrect the entry.
        self.flush().await?;
        let in_l1 = self.l1.remove(key).await?;
        let in_l2 = self.l2.remove(key).await?;
        Ok(in_l1 || in_l2)
    }

    async fn purge(&self, filter: &PurgeFilter) -> Result<u64> {
        self.flush().await?;
        let l1 = self.l1.purge_sync(filter);
        let l2 = self.l2.purge(filter).await?;
        // An entry is usually in both tiers; count entries, not copies.
        Ok(l1.max(l2))
    }

    async fn sweep_expired(&self, now: UnixMillis, max_entries: usize) -> Result<u64> {
        self.l1.sweep_expired(now, max_entries).await?;
        self.l2.sweep_expired(now, max_entries).await
    }

    async fn usage(&self) -> Result<StoreUsage> {
        self.l1.usage().await
    }

    async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Write::Flush(tx)).await.is_err() {
            return Err(CacheError::backend(self.l2.name(), "L2 writer stopped"));
        }
        self.ready.notify_one();
        if rx.await.is_err() {
            return Err(CacheError::backend(self.l2.name(), "L2 writer stopped"));
        }
        self.l2.flush().await
    }
}
