//! The storage port.

use std::sync::Arc;

use async_trait::async_trait;

use crate::clock::UnixMillis;
use crate::error::{KeyError, Result};
use crate::key::{ApiKey, Digest, KeyId};
use crate::record::{KeyRecord, NewKey, Revocation};

/// How many times [`KeyStore::create`] draws a new id and key after a conflict.
const CREATE_ATTEMPTS: usize = 3;

/// Where key records live. Implementations: [`MemoryKeyStore`](crate::MemoryKeyStore)
/// (always), `SqliteKeyStore` (feature `sqlite`), `PostgresKeyStore` (feature `postgres`), and
/// `SqlKeyStore` choosing between those two by URL.
///
/// Stores keep records and answer lookups; they do not decide whether a key may be used (see
/// [`KeyRecord::check`] and [`KeyCache`](crate::KeyCache)). Keys are never deleted, only
/// revoked, so a revocation can always be propagated.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// A short name for logs and metrics (`memory`, `sqlite`, `postgres`).
    fn name(&self) -> &'static str;

    /// Issues a key for `new` at `now` and stores its record; the record and the plaintext key,
    /// which exists nowhere else afterwards (show it once).
    ///
    /// [`KeyError::Invalid`] when `new` does not validate. The provided implementation draws
    /// a fresh id and key and retries [`insert`](Self::insert) on the (astronomically unlikely)
    /// [`KeyError::Conflict`].
    async fn create(&self, new: NewKey, now: UnixMillis) -> Result<(KeyRecord, ApiKey)> {
        let mut attempt = 1;
        loop {
            let (record, key) = KeyRecord::issue(new.clone(), now)?;
            match self.insert(&record).await {
                Ok(()) => return Ok((record, key)),
                Err(KeyError::Conflict(_)) if attempt < CREATE_ATTEMPTS => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores `record` as it is (imports, tests). [`KeyError::Conflict`] when its id or digest
    /// is already stored; [`KeyError::Invalid`] when a value cannot be stored.
    async fn insert(&self, record: &KeyRecord) -> Result<()>;

    /// The record whose digest is `digest`, if any.
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>>;

    /// The record with id `id`, if any.
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>>;

    /// Every record, oldest first (then by id).
    async fn list(&self) -> Result<Vec<KeyRecord>>;

    /// Marks the key revoked at `at`; whether a key with this id exists. Revoking a revoked
    /// key keeps its first revocation time (and answers `true`).
    async fn revoke(&self, id: &KeyId, at: UnixMillis) -> Result<bool>;

    /// Keys revoked at or after `since`, oldest revocation first, for other nodes' caches.
    async fn revoked_since(&self, since: UnixMillis) -> Result<Vec<Revocation>>;

    /// Whether the backend answers (readiness checks).
    async fn ping(&self) -> Result<()>;
}

#[async_trait]
impl<S: KeyStore + ?Sized> KeyStore for Arc<S> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    async fn create(&self, new: NewKey, now: UnixMillis) -> Result<(KeyRecord, ApiKey)> {
        (**self).create(new, now).await
    }
    async fn insert(&self, record: &KeyRecord) -> Result<()> {
        (**self).insert(record).await
    }
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>> {
        (**self).find_by_digest(digest).await
    }
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        (**self).get(id).await
    }
    async fn list(&self) -> Result<Vec<KeyRecord>> {
        (**self).list().await
    }
    async fn revoke(&self, id: &KeyId, at: UnixMillis) -> Result<bool> {
        (**self).revoke(id, at).await
    }
    async fn revoked_since(&self, since: UnixMillis) -> Result<Vec<Revocation>> {
        (**self).revoked_since(since).await
    }
    async fn ping(&self) -> Result<()> {
        (**self).ping().await
    }
}
