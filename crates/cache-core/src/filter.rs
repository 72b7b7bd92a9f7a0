//! Which keys an L2 that only this process writes may hold: a Bloom filter in front of it, so
//! that a miss for a key never stored (the long tail of a Zipf load) does not ask the
//! database.
//!
//! The filter is built by scanning L2's keys ([`CacheStore::keys_after`]) and kept up to date
//! by recording every key this process writes. Until the first scan has finished it answers
//! "may hold" for every key. Keys are never removed from it (a removed key is a false
//! positive: one lookup more, never a wrong answer); it is rebuilt from a fresh scan once
//! enough keys were recorded that false positives would pile up.
//!
//! **Only for an L2 no other process writes** (SQLite): an entry another node stored would
//! be invisible here until the next rebuild, and its request would go upstream again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::key::CacheKey;
use crate::store::CacheStore;

/// Bits per filter: 2^24 (2 MiB). With 4 probes, about 1 in 6,000 absent keys passes with
/// 500,000 keys recorded, 1 in 50 with 2,000,000.
const BITS_LOG2: u32 = 24;
/// Keys recorded since the last scan after which the filter is rebuilt.
const REBUILD_AFTER: u64 = 2_000_000;
/// Keys read per scan step.
const SCAN_PAGE: usize = 2_000;
/// Wait before scanning again after a scan failed (L2 down).
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// A Bloom filter over cache keys, set and read without locks.
struct Bloom {
    words: Box<[AtomicU64]>,
}

impl Bloom {
    fn new() -> Bloom {
        Bloom {
            words: (0..(1usize << BITS_LOG2) / 64)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// The key's four bit positions: an MD5 key is uniformly random already, so its four
    /// 32-bit quarters are four independent hashes.
    fn positions(key: &CacheKey) -> impl Iterator<Item = usize> {
        let b = *key.as_bytes();
        (0..4).map(move |i| {
            let quarter = u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
            (quarter as usize) & ((1usize << BITS_LOG2) - 1)
        })
    }

    fn insert(&self, key: &CacheKey) {
        for bit in Self::positions(key) {
            self.words[bit / 64].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }

    fn contains(&self, key: &CacheKey) -> bool {
        Self::positions(key)
            .all(|bit| self.words[bit / 64].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }
}

/// The filter of one [`TieredStore`](crate::TieredStore): the filter in use (none before the
/// first scan) and the one a scan is filling.
pub(crate) struct L2Filter {
    current: RwLock<Option<Arc<Bloom>>>,
    next: RwLock<Option<Arc<Bloom>>>,
    /// Keys recorded since `current` was built.
    recorded: AtomicU64,
    rebuild_due: AtomicBool,
    /// Wakes the scanning task for a rebuild.
    rebuild: mpsc::Sender<()>,
}

impl L2Filter {
    /// A filter over `l2` and its scanning task, spawned on the current runtime. The task
    /// ends when the filter is dropped.
    pub(crate) fn spawn(l2: Arc<dyn CacheStore>) -> Arc<L2Filter> {
        let (tx, rx) = mpsc::channel(1);
        let filter = Arc::new(L2Filter {
            current: RwLock::new(None),
            next: RwLock::new(None),
            recorded: AtomicU64::new(0),
            rebuild_due: AtomicBool::new(false),
            rebuild: tx,
        });
        tokio::spawn(scan_task(Arc::downgrade(&filter), l2, rx));
        filter
    }

    /// Whether L2 may hold `key`: false only when the filter is built and rules it out.
    pub(crate) fn may_hold(&self, key: &CacheKey) -> bool {
        read(&self.current, |b| b.is_none_or(|b| b.contains(key)))
    }

    /// Records a key about to be written to L2 (`put`), or just written (`!put`: the writer
    /// records it again after its commit, for a scan that started between the two and had
    /// already passed the key's place). Only `put`s count towards a rebuild.
    pub(crate) fn record(&self, key: &CacheKey, put: bool) {
        for filter in [&self.current, &self.next] {
            read(filter, |b| {
                if let Some(b) = b {
                    b.insert(key);
                }
            });
        }
        if put
            && self.recorded.fetch_add(1, Ordering::Relaxed) >= REBUILD_AFTER
            && !self.rebuild_due.swap(true, Ordering::Relaxed)
        {
            let _ = self.rebuild.try_send(());
        }
    }

    /// Whether the first scan has finished.
    pub(crate) fn is_built(&self) -> bool {
        read(&self.current, |b| b.is_some())
    }
}

/// `f` of the filter in `lock`, under its read lock (no reference count touched per miss).
fn read<T>(lock: &RwLock<Option<Arc<Bloom>>>, f: impl FnOnce(Option<&Bloom>) -> T) -> T {
    match lock.read() {
        Ok(g) => f(g.as_deref()),
        Err(poisoned) => f(poisoned.into_inner().as_deref()),
    }
}

fn write(lock: &RwLock<Option<Arc<Bloom>>>, value: Option<Arc<Bloom>>) {
    match lock.write() {
        Ok(mut g) => *g = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

/// Builds the filter, then rebuilds it whenever [`L2Filter::record`] asks.
async fn scan_task(
    filter: std::sync::Weak<L2Filter>,
    l2: Arc<dyn CacheStore>,
    mut rebuild: mpsc::Receiver<()>,
) {
    loop {
        match scan(&filter, &*l2).await {
            Some(true) => {
                // Built; wait for the next rebuild (or the filter's end).
                if rebuild.recv().await.is_none() {
                    return;
                }
            }
            Some(false) => {
                // L2 cannot list its keys: no filter, every miss asks L2.
                tracing::debug!(l2 = l2.name(), "L2 lists no keys; no L2 filter");
                return;
            }
            None if filter.strong_count() == 0 => return,
            None => tokio::time::sleep(RETRY_AFTER).await,
        }
    }
}

/// One scan into a fresh filter, swapped in at the end: `Some(true)` done, `Some(false)` L2
/// cannot list keys, `None` failed (or the filter is gone).
async fn scan(filter: &std::sync::Weak<L2Filter>, l2: &dyn CacheStore) -> Option<bool> {
    let fresh = Arc::new(Bloom::new());
    {
        let f = filter.upgrade()?;
        write(&f.next, Some(Arc::clone(&fresh)));
        f.recorded.store(0, Ordering::Relaxed);
    }
    let mut after = None;
    let mut keys = 0u64;
    loop {
        let page = match l2.keys_after(after, SCAN_PAGE).await {
            Ok(Some(page)) => page,
            Ok(None) => return Some(false),
            Err(e) => {
                tracing::warn!(error = %e, "scanning L2's keys for the L2 filter failed; will retry");
                if let Some(f) = filter.upgrade() {
                    write(&f.next, None);
                }
                return None;
            }
        };
        for key in &page {
            fresh.insert(key);
        }
        keys += page.len() as u64;
        if filter.strong_count() == 0 {
            return None;
        }
        match page.last() {
            Some(last) if page.len() == SCAN_PAGE => after = Some(*last),
            _ => break,
        }
    }
    let f = filter.upgrade()?;
    write(&f.current, Some(fresh));
    write(&f.next, None);
    f.rebuild_due.store(false, Ordering::Relaxed);
    tracing::debug!(keys, "L2 filter built");
    Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_what_was_inserted_and_rules_out_nearly_all_else() {
        let bloom = Bloom::new();
        let inserted: Vec<CacheKey> = (0..100_000)
            .map(|i| CacheKey::of(&format!("stored {i}")))
            .collect();
        for k in &inserted {
            bloom.insert(k);
        }
        assert!(inserted.iter().all(|k| bloom.contains(k)));
        let passed = (0..100_000)
            .filter(|i| bloom.contains(&CacheKey::of(&format!("never {i}"))))
            .count();
        // Expected about 1 in 3,000,000 at this load (4 probes, 2^24 bits).
        assert!(passed < 10, "{passed} false positives in 100,000");
    }

    #[tokio::test]
    async fn before_its_first_scan_every_key_may_be_held() {
        // MemoryStore cannot list its keys: the filter is never built.
        let l2: Arc<dyn CacheStore> = Arc::new(crate::MemoryStore::new(1 << 20));
        let filter = L2Filter::spawn(l2);
        let k = CacheKey::of("anything");
        filter.record(&CacheKey::of("other"), true);
        tokio::task::yield_now().await;
        assert!(!filter.is_built());
        assert!(filter.may_hold(&k));
    }
}
