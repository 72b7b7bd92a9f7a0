//! The hot-path verifier: an in-process cache of key records in front of any [`KeyStore`].

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use moka::ops::compute::{CompResult, Op};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::clock::{Clock, SystemClock, UnixMillis, duration_millis};
use crate::error::{BoxError, KeyError, Result};
use crate::key::{ApiKey, Digest, KeyId, is_well_formed};
use crate::record::{KeyRecord, NewKey};
use crate::store::KeyStore;

/// A key that passed [`KeyCache::verify`].
#[derive(Debug, Clone)]
pub struct Verified {
    /// The key's record.
    pub record: Arc<KeyRecord>,
    /// Whether the record came from the cache past its TTL because the store could not be
    /// asked (outage), rather than from a fresh cache entry or the store.
    pub stale: bool,
}

/// One cached record and when the store last confirmed it.
struct Cached {
    record: Arc<KeyRecord>,
    checked_at: UnixMillis,
    /// Set while one caller re-validates the entry, so concurrent callers don't all ask.
    refreshing: AtomicBool,
}

impl Cached {
    fn new(record: Arc<KeyRecord>, checked_at: UnixMillis) -> Arc<Cached> {
        Arc::new(Cached {
            record,
            checked_at,
            refreshing: AtomicBool::new(false),
        })
    }
}

/// Clears [`Cached::refreshing`] when the re-validating caller finishes or is cancelled.
struct RefreshGuard<'a>(&'a AtomicBool);

impl Drop for RefreshGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What a store lookup found.
enum Lookup {
    Found(Arc<KeyRecord>),
    Missing,
    Failed(BoxError),
}

// === impl KeyCacheBuilder ===

/// Builds a [`KeyCache`]; from [`KeyCache::builder`].
pub struct KeyCacheBuilder {
    store: Arc<dyn KeyStore>,
    clock: Arc<dyn Clock>,
    max_entries: u64,
    ttl: Duration,
    max_negative_entries: u64,
    negative_ttl: Duration,
    revocation_overlap: Duration,
    store_retry: Duration,
    store_timeout: Duration,
    max_concurrent_lookups: usize,
}

impl KeyCacheBuilder {
    /// The clock expiry, TTLs and revocation times are read from (default: [`SystemClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Most keys held (default 100 000). Least useful entries are evicted past it.
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// How long a cached record is used before it is re-validated from the store (default
    /// 60 s). Revocations reach caches faster through [`KeyCache::sync_revocations`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Most unknown digests remembered (default 10 000).
    pub fn max_negative_entries(mut self, n: u64) -> Self {
        self.max_negative_entries = n;
        self
    }

    /// How long an unknown key is answered without asking the store again (default 5 s). A
    /// key created on another node can be refused here for this long after a failed attempt.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// How far back each [`KeyCache::sync_revocations`] looks before the previous sync
    /// (default 60 s): covers revocations stamped by nodes whose clocks lag, and lookups that
    /// raced a revocation.
    pub fn revocation_overlap(mut self, overlap: Duration) -> Self {
        self.revocation_overlap = overlap;
        self
    }

    /// After the store fails, how long the cache answers from memory only before one caller
    /// tries the store again (default 1 s): a dead database is not asked on every request.
    pub fn store_retry(mut self, retry: Duration) -> Self {
        self.store_retry = retry;
        self
    }

    /// Longest wait for one store lookup during verification, or for one revocation sync
    /// (default 2 s).
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// Most store lookups in flight at once (default 32): a flood of unknown keys waits
    /// rather than occupying every database connection.
    pub fn max_concurrent_lookups(mut self, n: usize) -> Self {
        self.max_concurrent_lookups = n;
        self
    }

    /// The cache.
    pub fn build(self) -> KeyCache {
        let now = self.clock.now_millis();
        KeyCache {
            inner: Arc::new(Inner {
                positive: moka::sync::Cache::builder()
                    .max_capacity(self.max_entries)
                    .build(),
                negative: moka::sync::Cache::builder()
                    .max_capacity(self.max_negative_entries)
                    .build(),
                lookups: Semaphore::new(self.max_concurrent_lookups.max(1)),
                retry_at: AtomicI64::new(0),
                synced_until: AtomicI64::new(now),
                ttl: duration_millis(self.ttl),
                negative_ttl: duration_millis(self.negative_ttl),
                overlap: duration_millis(self.revocation_overlap),
                store_retry: duration_millis(self.store_retry),
                store_timeout: self.store_timeout,
                store: self.store,
                clock: self.clock,
            }),
        }
    }
}

// === impl KeyCache ===

/// Verifies presented keys on the hot path, from process memory when it can.
///
/// * A malformed key is refused without a lookup ([`KeyError::Unknown`]).
/// * Known keys are cached (bounded); an entry older than the TTL is re-validated from the
///   store by one caller while the others keep using it.
/// * Unknown keys are remembered briefly (bounded), so repeating a wrong key costs no lookup.
/// * [`revoke`](Self::revoke) through the cache refuses the key here at once;
///   [`sync_revocations`](Self::sync_revocations) (every ≤ 2 s, e.g. with
///   [`spawn_revocation_sync`](Self::spawn_revocation_sync)) stops keys revoked on other nodes.
/// * When the store fails, cached keys keep their last known state (served even past the TTL,
///   [`Verified::stale`]), and a key not in the cache is [`KeyError::Unavailable`], never
///   reported unknown, revoked or expired. After a failure the store is left alone for the
///   retry interval, then one caller tries it again.
///
/// Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct KeyCache {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn KeyStore>,
    clock: Arc<dyn Clock>,
    positive: moka::sync::Cache<Digest, Arc<Cached>>,
    /// Unknown digest → until when it is answered as unknown.
    negative: moka::sync::Cache<Digest, UnixMillis>,
    lookups: Semaphore,
    /// 0 while the store is healthy; after a failure, when it may be tried again.
    retry_at: AtomicI64,
    /// Revocations up to here (minus `overlap`) have been applied.
    synced_until: AtomicI64,
    ttl: i64,
    negative_ttl: i64,
    overlap: i64,
    store_retry: i64,
    store_timeout: Duration,
}

impl fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyCache")
            .field("store", &self.inner.store.name())
            .field("entries", &self.inner.positive.entry_count())
            .field("negative_entries", &self.inner.negative.entry_count())
            .field(
                "store_down",
                &(self.inner.retry_at.load(Ordering::Relaxed) != 0),
            )
            .finish()
    }
}

impl KeyCache {
    /// A cache with default settings in front of `store`.
    pub fn new(store: Arc<dyn KeyStore>) -> KeyCache {
        KeyCache::builder(store).build()
    }

    /// A builder for a cache in front of `store`.
    pub fn builder(store: Arc<dyn KeyStore>) -> KeyCacheBuilder {
        KeyCacheBuilder {
            store,
            clock: Arc::new(SystemClock),
            max_entries: 100_000,
            ttl: Duration::from_secs(60),
            max_negative_entries: 10_000,
            negative_ttl: Duration::from_secs(5),
            revocation_overlap: Duration::from_secs(60),
            store_retry: Duration::from_secs(1),
            store_timeout: Duration::from_secs(2),
            max_concurrent_lookups: 32,
        }
    }

    /// The store behind the cache (for listing keys and readiness checks).
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.inner.store
    }

    /// The cache's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// Whether the last store lookup failed (until one succeeds again).
    pub fn store_is_down(&self) -> bool {
        self.inner.retry_at.load(Ordering::Acquire) != 0
    }

    /// Number of cached keys (after pending evictions; for metrics and tests, not the hot path).
    pub fn entry_count(&self) -> u64 {
        self.inner.positive.run_pending_tasks();
        self.inner.positive.entry_count()
    }

    /// Number of remembered unknown keys (after pending evictions; for metrics and tests).
    pub fn negative_entry_count(&self) -> u64 {
        self.inner.negative.run_pending_tasks();
        self.inner.negative.entry_count()
    }

    /// Verifies `presented` (the key from `Authorization: Bearer <key>` or `X-Api-Key`, without
    /// the scheme or surrounding whitespace) now.
    pub async fn verify(&self, presented: &str) -> Result<Verified> {
        self.verify_at(presented, self.inner.clock.now_millis())
            .await
    }

    /// Verifies `presented` at `now`: the key's record, or [`KeyError::Unknown`] (401),
    /// [`KeyError::Revoked`] / [`KeyError::Expired`] (403), or [`KeyError::Unavailable`] (the
    /// store could not be asked; 503).
    pub async fn verify_at(&self, presented: &str, now: UnixMillis) -> Result<Verified> {
        if !is_well_formed(presented) {
            return Err(KeyError::Unknown);
        }
        let digest = Digest::of_str(presented);
        let inner = &*self.inner;

        if let Some(cached) = inner.positive.get(&digest)
            && bool::from(cached.record.digest.ct_eq(&digest))
        {
            // Revocation is final: no need to ask the store again.
            let fresh = now.saturating_sub(cached.checked_at) < inner.ttl;
            if fresh || cached.record.revoked_at.is_some() {
                return decide(&cached.record, now, false);
            }
            if cached.refreshing.swap(true, Ordering::AcqRel) {
                // Someone else is re-validating it: use what we have meanwhile.
                return decide(&cached.record, now, false);
            }
            let _guard = RefreshGuard(&cached.refreshing);
            return match inner.lookup(&digest, now).await {
                Lookup::Found(record) => decide(&record, now, false),
                Lookup::Missing => Err(KeyError::Unknown),
                Lookup::Failed(_) => decide(&cached.record, now, true),
            };
        }

        if let Some(until) = inner.negative.get(&digest) {
            if now < until {
                return Err(KeyError::Unknown);
            }
            inner.negative.invalidate(&digest);
        }
        match inner.lookup(&digest, now).await {
            Lookup::Found(record) => decide(&record, now, false),
            Lookup::Missing => Err(KeyError::Unknown),
            Lookup::Failed(source) => Err(KeyError::Unavailable { source }),
        }
    }

    /// Issues a key through the store (at the cache's clock) and caches its record, so it works
    /// here at once even if it was presented (and found unknown) moments before.
    pub async fn create(&self, new: NewKey) -> Result<(KeyRecord, ApiKey)> {
        let now = self.inner.clock.now_millis();
        let (record, key) = self.inner.store.create(new, now).await?;
        self.inner.negative.invalidate(&record.digest);
        self.inner.put(Arc::new(record.clone()), now);
        Ok((record, key))
    }

    /// Revokes key `id` in the store (at the cache's clock) and, at once, in this cache; whether
    /// the key exists. Other nodes' caches learn it at their next
    /// [`sync_revocations`](Self::sync_revocations).
    pub async fn revoke(&self, id: &KeyId) -> Result<bool> {
        let inner = &*self.inner;
        let now = inner.clock.now_millis();
        if !inner.store.revoke(id, now).await? {
            return Ok(false);
        }
        // Cache the revoked record (even if this node never saw the key: a lookup racing this
        // revocation cannot then re-insert it unrevoked). Without the record, mark whatever
        // entry holds the id.
        match inner.store.get(id).await {
            Ok(Some(record)) if record.revoked_at.is_some() => {
                inner.put(Arc::new(record), now);
            }
            _ => {
                let digests: Vec<Digest> = inner
                    .positive
                    .iter()
                    .filter(|(_, cached)| cached.record.id == *id)
                    .map(|(digest, _)| *digest)
                    .collect();
                for digest in digests {
                    inner.mark_revoked(&digest, now);
                }
            }
        }
        Ok(true)
    }

    /// Applies the store's recent revocations to this cache; how many cached keys it revoked.
    ///
    /// Each call asks for revocations since the previous successful call's start, minus the
    /// overlap. The embedder runs it every ≤ 2 s so every node refuses a revoked key within 5 s
    /// ([`spawn_revocation_sync`](Self::spawn_revocation_sync)).
    pub async fn sync_revocations(&self) -> Result<usize> {
        let inner = &*self.inner;
        let started = inner.clock.now_millis();
        let since = inner
            .synced_until
            .load(Ordering::Acquire)
            .saturating_sub(inner.overlap);
        let revocations =
            match tokio::time::timeout(inner.store_timeout, inner.store.revoked_since(since)).await
            {
                Ok(revocations) => revocations?,
                Err(_) => return Err(inner.timed_out("revocation sync")),
            };
        let applied = revocations
            .iter()
            .filter(|r| inner.mark_revoked(&r.digest, r.revoked_at))
            .count();
        inner.synced_until.fetch_max(started, Ordering::AcqRel);
        if applied > 0 {
            tracing::debug!(applied, "applied key revocations from the store");
        }
        Ok(applied)
    }

    /// Runs [`sync_revocations`](Self::sync_revocations) every `every` on the current tokio
    /// runtime until the task is aborted or every clone of this cache is dropped. Failures are
    /// logged once per outage (at `warn`) and retried at the next tick.
    pub fn spawn_revocation_sync(&self, every: Duration) -> JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let cache = KeyCache { inner };
                match cache.sync_revocations().await {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("key revocation sync works again");
                    }
                    Ok(_) => {}
                    Err(error) => {
                        if !failing {
                            tracing::warn!(%error, "key revocation sync failed; retrying");
                        }
                        failing = true;
                    }
                }
            }
        })
    }
}

/// `record`'s verdict at `now`.
fn decide(record: &Arc<KeyRecord>, now: UnixMillis, stale: bool) -> Result<Verified> {
    record.check(now)?;
    Ok(Verified {
        record: Arc::clone(record),
        stale,
    })
}

impl Inner {
    /// Asks the store for `digest` (unless it failed moments ago) and updates both caches.
    async fn lookup(&self, digest: &Digest, now: UnixMillis) -> Lookup {
        if self.store_resting(now) {
            return Lookup::Failed(STORE_RESTING.into());
        }
        let Ok(_permit) = self.lookups.acquire().await else {
            return Lookup::Failed("key lookups closed".into());
        };
        // Callers that queued while the store failed don't pile onto it.
        if !self.claim_store(now) {
            return Lookup::Failed(STORE_RESTING.into());
        }
        let found =
            match tokio::time::timeout(self.store_timeout, self.store.find_by_digest(digest)).await
            {
                Ok(found) => found,
                Err(_) => Err(self.timed_out("lookup")),
            };
        match found {
            Ok(Some(record)) if record.digest == *digest => {
                self.store_answered();
                let record = Arc::new(record);
                self.negative.invalidate(digest);
                Lookup::Found(self.put(record, now))
            }
            Ok(_) => {
                self.store_answered();
                self.positive.invalidate(digest);
                self.negative
                    .insert(*digest, now.saturating_add(self.negative_ttl));
                Lookup::Missing
            }
            Err(error) => {
                self.store_failed(now, &error);
                Lookup::Failed(Box::new(error))
            }
        }
    }

    fn timed_out(&self, what: &str) -> KeyError {
        KeyError::backend(
            self.store.name(),
            format!("{what} took longer than {:?}", self.store_timeout),
        )
    }

    /// Whether the store failed less than the retry interval ago.
    fn store_resting(&self, now: UnixMillis) -> bool {
        let retry_at = self.retry_at.load(Ordering::Acquire);
        retry_at != 0 && now < retry_at
    }

    /// Whether this caller may ask the store: always while it is healthy; after a failure, one
    /// caller per retry interval.
    fn claim_store(&self, now: UnixMillis) -> bool {
        let retry_at = self.retry_at.load(Ordering::Acquire);
        retry_at == 0
            || (now >= retry_at
                && self
                    .retry_at
                    .compare_exchange(
                        retry_at,
                        now.saturating_add(self.store_retry).max(1),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok())
    }

    fn store_answered(&self) {
        if self.retry_at.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!(store = self.store.name(), "key store answers again");
        }
    }

    fn store_failed(&self, now: UnixMillis, error: &KeyError) {
        let retry_at = now.saturating_add(self.store_retry).max(1);
        if self.retry_at.swap(retry_at, Ordering::AcqRel) == 0 {
            tracing::warn!(
                store = self.store.name(),
                %error,
                "key store failed; serving cached keys, unknown keys get `unavailable`"
            );
        }
    }

    /// Caches `record` as confirmed at `now`, unless the entry already knows it is revoked and
    /// `record` does not (an answer read before a revocation landed): revocation is final.
    /// The record now cached.
    fn put(&self, record: Arc<KeyRecord>, now: UnixMillis) -> Arc<KeyRecord> {
        let result = self
            .positive
            .entry_by_ref(&record.digest)
            .and_compute_with(|existing| {
                let revoked_before = existing
                    .as_ref()
                    .and_then(|e| e.value().record.revoked_at)
                    .filter(|_| record.revoked_at.is_none());
                let record = match revoked_before {
                    Some(at) => Arc::new(KeyRecord {
                        revoked_at: Some(at),
                        ..(*record).clone()
                    }),
                    None => Arc::clone(&record),
                };
                Op::Put(Cached::new(record, now))
            });
        match result {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) => Arc::clone(&e.value().record),
            _ => record,
        }
    }

    /// Marks the cached entry for `digest`, if any, revoked at `at`; whether it changed.
    fn mark_revoked(&self, digest: &Digest, at: UnixMillis) -> bool {
        let result =
            self.positive
                .entry_by_ref(digest)
                .and_compute_with(|existing| match existing {
                    Some(e) if e.value().record.revoked_at.is_none() => {
                        let cached = e.value();
                        Op::Put(Cached::new(
                            Arc::new(KeyRecord {
                                revoked_at: Some(at),
                                ..(*cached.record).clone()
                            }),
                            cached.checked_at,
                        ))
                    }
                    _ => Op::Nop,
                });
        matches!(result, CompResult::ReplacedWith(_))
    }
}

const STORE_RESTING: &str = "key store failed moments ago; not asked again yet";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::clock::ManualClock;
    use crate::memory::MemoryKeyStore;

    const NOW: UnixMillis = 1_800_000_000_000;

    /// A lookup that read the store before a revocation landed must not un-revoke the entry.
    #[tokio::test]
    async fn revocation_is_final_in_the_cache() {
        let clock = Arc::new(ManualClock::new(NOW));
        let keys = KeyCache::builder(Arc::new(MemoryKeyStore::new()))
            .clock(clock)
            .build();
        let (record, key) = keys.create(NewKey::named("k")).await.unwrap();
        assert!(keys.inner.mark_revoked(&record.digest, NOW + 1));
        assert!(!keys.inner.mark_revoked(&record.digest, NOW + 2), "once");
        // The stale answer (not revoked) arrives after the revocation.
        let cached = keys.inner.put(Arc::new(record.clone()), NOW + 3);
        assert_eq!(cached.revoked_at, Some(NOW + 1));
        assert!(matches!(
            keys.verify(key.expose_secret()).await,
            Err(KeyError::Revoked { .. })
        ));
        // A record that is itself revoked replaces the entry as is.
        let later = KeyRecord {
            revoked_at: Some(NOW + 5),
            ..record
        };
        assert_eq!(
            keys.inner.put(Arc::new(later), NOW + 6).revoked_at,
            Some(NOW + 5)
        );
    }

    #[test]
    fn the_store_gate_lets_one_caller_probe_per_interval() {
        let keys = KeyCache::builder(Arc::new(MemoryKeyStore::new()))
            .store_retry(Duration::from_secs(1))
            .build();
        let inner = &keys.inner;
        assert!(
            inner.claim_store(NOW) && inner.claim_store(NOW),
            "healthy: everyone"
        );
        inner.store_failed(NOW, &KeyError::Unknown);
        assert!(keys.store_is_down());
        assert!(inner.store_resting(NOW + 999));
        assert!(!inner.claim_store(NOW + 999));
        assert!(!inner.store_resting(NOW + 1000));
        assert!(inner.claim_store(NOW + 1000), "the probe");
        assert!(!inner.claim_store(NOW + 1000), "only one");
        assert!(inner.claim_store(NOW + 2000), "next interval");
        inner.store_answered();
        assert!(!keys.store_is_down());
        assert!(inner.claim_store(NOW + 2000) && inner.claim_store(NOW + 2000));
    }
}
