//! The in-process store, bounded by bytes.

use std::sync::Arc;

use async_trait::async_trait;
use quick_cache::sync::{Cache as Shards, DefaultLifecycle};

use crate::clock::{Clock, SystemClock, UnixMillis};
use crate::entry::Entry;
use crate::error::Result;
use crate::key::CacheKey;
use crate::store::{CacheStore, PurgeFilter, StoreUsage};

/// An in-process store holding at most `max_bytes` of entries (by [`Entry::weight`]), evicting
/// by S3-FIFO when full (a new entry must be asked for again before it displaces established
/// ones) and never answering with an entry past [`Entry::expires_at`]; expired entries are
/// dropped by [`CacheStore::sweep_expired`] or when space is needed. Cheap to clone; clones
/// share the same storage.
///
/// Built for the hit path: a lookup takes a read lock of its own thread's slot in one shard
/// (readers on other threads touch other cache lines), finds the key in a flat hash table and
/// clones the entry's `Arc`; no queue of reads to replay, no background task. The storage is
/// split into shards of `max_bytes / shards` each ([`MemoryStore::shards`]); an entry heavier
/// than one shard's share is not kept.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Arc<Map>,
    max_bytes: u64,
    clock: Arc<dyn Clock>,
}

/// Keys are MD5 digests of client input; foldhash, seeded per process, hashes their 16 bytes
/// in a few instructions.
type Map = Shards<CacheKey, Arc<Entry>, Weight, foldhash::fast::RandomState>;

/// What an entry counts against the byte cap: its [`Entry::weight`] and the embedder's
/// estimate of its prepared slot.
#[derive(Clone)]
struct Weight(PreparedWeight);

impl quick_cache::Weighter<CacheKey, Arc<Entry>> for Weight {
    fn weight(&self, _key: &CacheKey, entry: &Arc<Entry>) -> u64 {
        // At least 1: quick_cache never evicts an entry of weight 0.
        u64::try_from(entry.weight().saturating_add((self.0)(entry)))
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("max_bytes", &self.max_bytes)
            .field("entries", &self.cache.len())
            .finish()
    }
}

/// The bytes an embedder keeps in an entry's [`Entry::prepared`] slot (see
/// [`MemoryStore::counting_prepared`]).
pub type PreparedWeight = fn(&Entry) -> usize;

/// The smallest share of the byte cap a shard gets when the cap allows (so that a large
/// response still fits in one): 32 MiB.
const MIN_SHARD_BYTES: u64 = 32 << 20;

/// What an entry is assumed to weigh when sizing the tables up front (they grow past it).
const TYPICAL_ENTRY_BYTES: u64 = 2048;

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
    /// is filled: an estimate of what the embedder will put there. It runs under a shard's
    /// write lock, so it must not panic (a panic there would poison the shard for every later
    /// lookup).
    pub fn counting_prepared(max_bytes: u64, prepared: PreparedWeight) -> Self {
        Self::build(max_bytes, Arc::new(SystemClock), prepared)
    }

    fn build(max_bytes: u64, clock: Arc<dyn Clock>, prepared: PreparedWeight) -> Self {
        let max_bytes = max_bytes.max(1);
        let options = quick_cache::OptionsBuilder::new()
            .shards(shards_for(max_bytes))
            .weight_capacity(max_bytes)
            .estimated_items_capacity(
                usize::try_from(max_bytes / TYPICAL_ENTRY_BYTES)
                    .unwrap_or(usize::MAX)
                    .clamp(64, 1 << 20),
            )
            .build();
        let cache = match options {
            Ok(options) => Map::with_options(
                options,
                Weight(prepared),
                foldhash::fast::RandomState::default(),
                DefaultLifecycle::default(),
            ),
            // `build` fails only for an option left unset, and every one is set above.
            Err(e) => unreachable!("quick_cache options: {e}"),
        };
        MemoryStore {
            cache: Arc::new(cache),
            max_bytes,
            clock,
        }
    }

    /// The byte cap.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// How many shards the storage is split into: each holds at most `max_bytes / shards`, so
    /// that is the heaviest entry it keeps.
    pub fn shards(&self) -> usize {
        self.cache.num_shards()
    }

    /// The entry under `key`, synchronously.
    pub fn get_sync(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let entry = self.cache.get(key)?;
        (entry.expires_at() > self.clock.now_millis()).then_some(entry)
    }

    /// Stores an entry, synchronously.
    pub fn insert_sync(&self, key: CacheKey, entry: Arc<Entry>) {
        self.cache.insert(key, entry);
    }

    /// Removes every matching entry, synchronously; how many.
    pub fn purge_sync(&self, filter: &PurgeFilter) -> u64 {
        if let Some(key) = &filter.key {
            return u64::from(self.remove_if(key, |e| filter.matches(key, e)));
        }
        let candidates: Vec<CacheKey> = self
            .cache
            .iter()
            .filter(|(k, e)| filter.matches(k, e))
            .map(|(k, _)| k)
            .collect();
        candidates
            .iter()
            .map(|key| u64::from(self.remove_if(key, |e| filter.matches(key, e))))
            .sum()
    }

    /// Removes the entry under `key` if it (still) passes `check`, atomically with respect to
    /// concurrent writers of that key.
    fn remove_if(&self, key: &CacheKey, check: impl FnOnce(&Entry) -> bool) -> bool {
        self.cache.remove_if(key, |e| check(e)).is_some()
    }
}

/// Shards for a cap of `max_bytes`: four per CPU (a power of two), fewer when that would leave
/// a shard less than [`MIN_SHARD_BYTES`].
fn shards_for(max_bytes: u64) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let by_size = usize::try_from(max_bytes / MIN_SHARD_BYTES).unwrap_or(usize::MAX);
    let n = (cpus * 4).min(by_size).max(1);
    // the largest power of two not above `n`
    1 << n.ilog2()
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
        self.insert_sync(key, entry);
        Ok(())
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool> {
        Ok(self.cache.remove(key).is_some())
    }

    async fn purge(&self, filter: &PurgeFilter) -> Result<u64> {
        Ok(self.purge_sync(filter))
    }

    async fn sweep_expired(&self, now: UnixMillis, max_entries: usize) -> Result<u64> {
        // Walked one entry at a time (a read lock each), so lookups never wait on the sweep.
        let expired: Vec<CacheKey> = self
            .cache
            .iter()
            .filter(|(_, e)| e.expires_at() <= now)
            .take(max_entries)
            .map(|(k, _)| k)
            .collect();
        let removed = expired
            .iter()
            .filter(|key| self.remove_if(key, |e| e.expires_at() <= now))
            .count();
        Ok(removed as u64)
    }

    async fn usage(&self) -> Result<StoreUsage> {
        Ok(StoreUsage {
            entries: self.cache.len() as u64,
            bytes: self.cache.weight(),
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::entry::CachePolicy;

    fn entry(signature: &str, body_bytes: usize) -> (CacheKey, Arc<Entry>) {
        let policy = CachePolicy {
            ttl: std::time::Duration::from_secs(3600),
            ..CachePolicy::default()
        };
        let now = SystemClock.now_millis();
        let e = Entry::new(
            signature,
            "u",
            "/r",
            200,
            vec![],
            Bytes::from(vec![b'x'; body_bytes]),
            0.0,
            &policy,
            now,
        );
        (CacheKey::of(signature), Arc::new(e))
    }

    #[test]
    fn shards_are_a_power_of_two_and_hold_a_large_answer() {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        for (cap, at_most) in [(1, 1), (4 << 20, 1), (64 << 20, 2), (1 << 30, 32)] {
            let n = shards_for(cap);
            assert!(n.is_power_of_two(), "{cap}: {n}");
            assert!(n <= at_most && n <= cpus * 4, "{cap}: {n} shards");
            assert!(n == 1 || cap / n as u64 >= MIN_SHARD_BYTES, "{cap}: {n}");
        }
    }

    #[test]
    fn a_small_store_keeps_an_answer_of_most_of_its_cap() {
        // 4 MiB: one shard, so a 3 MiB answer fits.
        let store = MemoryStore::new(4 << 20);
        assert_eq!(store.shards(), 1);
        let (key, e) = entry("big", 3 << 20);
        store.insert_sync(key, e);
        assert!(store.get_sync(&key).is_some());
        // One that outweighs the whole cap is not kept, and nothing breaks.
        let (huge, e) = entry("huge", 5 << 20);
        store.insert_sync(huge, e);
        assert!(store.get_sync(&huge).is_none());
    }

    #[test]
    fn clones_share_the_storage() {
        let store = MemoryStore::new(1 << 20);
        let copy = store.clone();
        let (key, e) = entry("shared", 10);
        store.insert_sync(key, e);
        assert!(copy.get_sync(&key).is_some());
        assert_eq!(copy.cache.len(), 1);
    }
}
