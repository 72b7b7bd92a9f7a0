//! The in-process store.

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;

use crate::clock::UnixMillis;
use crate::error::{KeyError, Result};
use crate::key::{Digest, KeyId};
use crate::record::{KeyRecord, Revocation};
use crate::store::KeyStore;

/// A [`KeyStore`] in process memory: for tests, demos and embedders that issue keys at start-up.
/// Everything is lost when the process ends.
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    state: RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    by_id: HashMap<KeyId, KeyRecord>,
    /// Digest → id. `Digest`'s equality is constant-time, so lookups compare in constant time.
    by_digest: HashMap<Digest, KeyId>,
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> MemoryKeyStore {
        MemoryKeyStore::default()
    }

    // A panic while holding the lock cannot leave `State` half-updated (every update is one
    // map operation after the checks), so a poisoned lock is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn insert(&self, record: &KeyRecord) -> Result<()> {
        record.validate()?;
        let mut state = self.write();
        if state.by_id.contains_key(&record.id) {
            return Err(KeyError::Conflict(format!("id {}", record.id)));
        }
        if state.by_digest.contains_key(&record.digest) {
            return Err(KeyError::Conflict("digest".into()));
        }
        state.by_digest.insert(record.digest, record.id.clone());
        state.by_id.insert(record.id.clone(), record.clone());
        Ok(())
    }

    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>> {
        let state = self.read();
        Ok(state
            .by_digest
            .get(digest)
            .and_then(|id| state.by_id.get(id))
            .filter(|r| r.digest == *digest)
            .cloned())
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        Ok(self.read().by_id.get(id).cloned())
    }

    async fn list(&self) -> Result<Vec<KeyRecord>> {
        let mut all: Vec<KeyRecord> = self.read().by_id.values().cloned().collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(all)
    }

    async fn revoke(&self, id: &KeyId, at: UnixMillis) -> Result<bool> {
        let mut state = self.write();
        Ok(match state.by_id.get_mut(id) {
            Some(record) => {
                record.revoked_at.get_or_insert(at);
                true
            }
            None => false,
        })
    }

    async fn revoked_since(&self, since: UnixMillis) -> Result<Vec<Revocation>> {
        let mut revoked: Vec<Revocation> = self
            .read()
            .by_id
            .values()
            .filter_map(|r| {
                let at = r.revoked_at.filter(|&at| at >= since)?;
                Some(Revocation {
                    id: r.id.clone(),
                    digest: r.digest,
                    revoked_at: at,
                })
            })
            .collect();
        revoked.sort_by(|a, b| (a.revoked_at, &a.id).cmp(&(b.revoked_at, &b.id)));
        Ok(revoked)
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
