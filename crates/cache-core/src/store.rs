//! The storage port.

use std::sync::Arc;

use async_trait::async_trait;

use crate::clock::UnixMillis;
use crate::entry::Entry;
use crate::error::Result;
use crate::key::CacheKey;

/// Which entries a purge removes. Every field set must match; all `None` removes everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeFilter {
    /// Only entries from this upstream.
    pub upstream: Option<String>,
    /// Only entries stored for this configured route path.
    pub route: Option<String>,
    /// Only this key.
    pub key: Option<CacheKey>,
}

impl PurgeFilter {
    /// Whether `entry` stored under `key` matches.
    pub fn matches(&self, key: &CacheKey, entry: &Entry) -> bool {
        self.key.as_ref().is_none_or(|k| k == key)
            && self.upstream.as_deref().is_none_or(|u| u == entry.upstream)
            && self.route.as_deref().is_none_or(|r| r == entry.route)
    }
}

/// How much a store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Number of entries.
    pub entries: u64,
    /// Bytes of entries ([`Entry::weight`] for memory, body + signature bytes for SQL).
    pub bytes: u64,
}

/// A place cached responses live. Implementations: [`MemoryStore`](crate::MemoryStore)
/// (always), `SqliteStore` (feature `sqlite`), `PostgresStore` (feature `postgres`) and
/// [`TieredStore`](crate::TieredStore) combining two of them.
///
/// Stores do not judge freshness; they keep what they are given until it is removed, purged,
/// swept after [`Entry::expires_at`], or evicted for space.
#[async_trait]
pub trait CacheStore: Send + Sync + 'static {
    /// A short name for logs and metrics (`memory`, `sqlite`, `postgres`, `tiered`).
    fn name(&self) -> &'static str;

    /// A lookup that answers at once from process memory, without I/O; `None` means
    /// "not in memory" (the caller then uses [`get`](Self::get)). The hit path uses it.
    fn peek(&self, _key: &CacheKey) -> Option<Arc<Entry>> {
        None
    }

    /// Whether the backend answers (readiness checks). Default: a lookup of an unused key.
    async fn ping(&self) -> Result<()> {
        self.get(&CacheKey::from_bytes([0; 16])).await.map(|_| ())
    }

    /// The entry stored under `key`, if any.
    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Entry>>>;

    /// Stores `entry` under `key`, replacing what was there.
    async fn put(&self, key: CacheKey, entry: Arc<Entry>) -> Result<()>;

    /// Stores several entries (a write-behind batch), in order, as cheaply as the backend
    /// allows; SQL stores use one transaction: all or none. Default: one [`put`](Self::put)
    /// after the other, stopping at the first error.
    async fn put_many(&self, entries: &[(CacheKey, Arc<Entry>)]) -> Result<()> {
        for (key, entry) in entries {
            self.put(*key, Arc::clone(entry)).await?;
        }
        Ok(())
    }

    /// Removes one entry; whether it was there.
    async fn remove(&self, key: &CacheKey) -> Result<bool>;

    /// Removes every entry matching `filter`; how many were removed.
    async fn purge(&self, filter: &PurgeFilter) -> Result<u64>;

    /// Removes at most `max_entries` entries whose [`Entry::expires_at`] is before `now`;
    /// how many were removed. Callers loop while the answer equals `max_entries`.
    async fn sweep_expired(&self, now: UnixMillis, max_entries: usize) -> Result<u64>;

    /// How much the store holds.
    async fn usage(&self) -> Result<StoreUsage>;

    /// Waits until writes accepted so far are durable (write-behind stores). Default: nothing
    /// is pending.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Up to `limit` keys of stored entries in ascending order, those after `after` (from the
    /// first when `None`): how [`TieredStore::with_l2_filter`](crate::TieredStore::with_l2_filter)
    /// learns what its L2 holds. `Ok(None)`: this store cannot list its keys (the default).
    async fn keys_after(
        &self,
        after: Option<CacheKey>,
        limit: usize,
    ) -> Result<Option<Vec<CacheKey>>> {
        let _ = (after, limit);
        Ok(None)
    }
}

#[async_trait]
impl<S: CacheStore + ?Sized> CacheStore for Arc<S> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn peek(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        (**self).peek(key)
    }
    async fn ping(&self) -> Result<()> {
        (**self).ping().await
    }
    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Entry>>> {
        (**self).get(key).await
    }
    async fn put(&self, key: CacheKey, entry: Arc<Entry>) -> Result<()> {
        (**self).put(key, entry).await
    }
    async fn put_many(&self, entries: &[(CacheKey, Arc<Entry>)]) -> Result<()> {
        (**self).put_many(entries).await
    }
    async fn remove(&self, key: &CacheKey) -> Result<bool> {
        (**self).remove(key).await
    }
    async fn purge(&self, filter: &PurgeFilter) -> Result<u64> {
        (**self).purge(filter).await
    }
    async fn sweep_expired(&self, now: UnixMillis, max_entries: usize) -> Result<u64> {
        (**self).sweep_expired(now, max_entries).await
    }
    async fn usage(&self) -> Result<StoreUsage> {
        (**self).usage().await
    }
    async fn keys_after(
        &self,
        after: Option<CacheKey>,
        limit: usize,
    ) -> Result<Option<Vec<CacheKey>>> {
        (**self).keys_after(after, limit).await
    }
    async fn flush(&self) -> Result<()> {
        (**self).flush().await
    }
}
