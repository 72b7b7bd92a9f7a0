//! The in-process store, bounded by bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::sync::Cache as Moka;

use crate::clock::{Clock, SystemClock, UnixMillis};
use crate::entry::Entry;
use crate::error::Result;
use crate::key::CacheKey;
use crate::store::{CacheStore, PurgeFilter, StoreUsage};

/// An in-process store holding at most `max_bytes` of entries (by [`Entry::weight`]), evicting
/// the least useful (TinyLFU) when full and dropping entries once past [`Entry::expires_at`].
/// Cheap to clone; clones share the same storage.
#[derive(Clone)]
pub struct MemoryStore {
    /// Keys are MD5 digests of client input; foldhash, seeded per process, hashes their 16
    /// bytes in a few instructions (moka's default SipHash costs more than the lookup).
    cache: Moka<CacheKey, Arc<Entry>, foldhash::fast::RandomState>,
    max_bytes: u64,
    clock: Arc<dyn Clock>,
}

struct ExpireAtHorizon {
    clock: Arc<dyn Clock>,
}

impl moka::Expiry<CacheKey, Arc<Entry>> for ExpireAtHorizon {
    fn expire_after_create(&self, _k: &CacheKey, v: &Arc<Entry>, _at: Instant) -> Option<Duration> {
        Some(remaining(self.clock.now_millis(), v.expires_at()))
    }
    fn expire_after_update(
        &self,
        _k: &CacheKey,
        v: &Arc<Entry>,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(remaining(self.clock.now_millis(), v.expires_at()))
    }
}

fn remaining(now: UnixMillis, until: UnixMillis) -> Duration {
    Duration::from_millis(u64::try_from(until.saturating_sub(now)).unwrap_or(0))
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("max_bytes", &self.max_bytes)
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

/// The bytes an embedder keeps in an entry's [`Entry::prepared`] slot (see
/// [`MemoryStore::counting_prepared`]).
pub type PreparedWeight = fn(&Entry) -> usize;

impl MemoryStore {
    /// A store of at most `max_bytes`, expiring entries by the system clock.
    pub fn new(max_bytes: u64) -> Self {
        Self::with_clock(max_bytes, Arc::new(SystemClock))
    }

    /// A store of at most `max_bytes`, expiring entries by `clock`.
    pub fn with_clock(max_bytes: u64, clock: Arc<dyn Clock>) -> Self {
        Self::build(max_bytes, clock, |_| 0)
    }

    /// A store of at most `max_bytes` that counts, beside each entry's
    /// [`weight`](Entry::weight), the bytes `prepared(entry)` says the embedder keeps in its
    /// [`Entry::prepared`] slot. It is asked when the entry is stored, usually before the slot
    /// is filled: an estimate of what the embedder will put there.
    pub fn counting_prepared(max_bytes: u64, prepared: PreparedWeight) -> Self {
        Self::build(max_bytes, Arc::new(SystemClock), prepared)
    }

    fn build(max_bytes: u64, clock: Arc<dyn Clock>, prepared: PreparedWeight) -> Self {
        let cache = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(move |_k: &CacheKey, v: &Arc<Entry>| {
                u32::try_from(v.weight().saturating_add(prepared(v))).unwrap_or(u32::MAX)
            })
            .expire_after(ExpireAtHorizon {
                clock: Arc::clone(&clock),
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        MemoryStore {
            cache,
            max_bytes,
            clock,
        }
    }

    /// The byte cap.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Applies pending evictions now (they otherwise happen in small steps on later calls).
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }

    /// The entry under `key`, synchronously.
    pub fn get_sync(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        // Moka counts the time left in real time from the insert; past the horizon by our clock
        // (a `ManualClock` moved forward, the wall clock stepped) the entry is gone all the same.
        self.cache
            .get(key)
            .filter(|e| e.expires_at() > self.clock.now_millis())
    }

    /// Stores an entry, synchronously.
    pub fn insert_sync(&self, key: CacheKey, entry: Arc<Entry>) {
        self.cache.insert(key, entry);
    }

    /// Removes every matching entry, synchronously; how many.
    pub fn purge_sync(&self, filter: &PurgeFilter) -> u64 {
        if let Some(key) = &filter.key {
            return u64::from(self.remove_if_matches(*key, filter));
        }
        let candidates: Vec<CacheKey> = self
            .cache
            .iter()
            .filter(|(k, e)| filter.matches(k, e))
            .map(|(k, _)| *k)
            .collect();
        candidates
            .into_iter()
            .map(|key| u64::from(self.remove_if_matches(key, filter)))
            .sum()
    }

    /// Removes the entry under `key` if it (still) matches `filter`, atomically with respect to
    /// concurrent writers of that key.
    fn remove_if_matches(&self, key: CacheKey, filter: &PurgeFilter) -> bool {
        use moka::ops::compute::{CompResult, Op};
        let result = self
            .cache
            .entry(key)
            .and_compute_with(|current| match current {
                Some(e) if filter.matches(&key, e.value()) => Op::Remove,
                _ => Op::Nop,
            });
        matches!(result, CompResult::Removed(_))
    }
}

#[async_trait]
impl CacheStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn peek(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.get_sync(key)
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Entry>>> {
        Ok(self.get_sync(key))
    }

    async fn put(&self, key: CacheKey, entry: Arc<Entry>) -> Result<()> {
        self.cache.insert(key, entry);
        Ok(())
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool> {
        Ok(self.cache.remove(key).is_some())
    }

    async fn purge(&self, filter: &PurgeFilter) -> Result<u64> {
        Ok(self.purge_sync(filter))
    }

    async fn sweep_expired(&self, now: UnixMillis, max_entries: usize) -> Result<u64> {
        let expired: Vec<CacheKey> = self
            .cache
            .iter()
            .filter(|(_, e)| e.expires_at() <= now)
            .take(max_entries)
            .map(|(k, _)| *k)
            .collect();
        let mut n = 0;
        for key in expired {
            if self.cache.remove(&key).is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn usage(&self) -> Result<StoreUsage> {
        self.cache.run_pending_tasks();
        Ok(StoreUsage {
            entries: self.cache.entry_count(),
            bytes: self.cache.weighted_size(),
        })
    }
}
