//! The PostgreSQL store.

use sql_pool::postgres::{Object, Pool};

use super::POOL_TIMEOUT;
use crate::error::{KeyError, Result};

const BACKEND: &str = "postgres";

/// A [`KeyStore`](crate::KeyStore) in PostgreSQL (feature `postgres`), shared by every gateway
/// node using the same database.
///
/// Pure-Rust client (tokio-postgres, no TLS), pooled. The `api_keys` table must exist: run
/// `migrations/postgres` first. Table names are unqualified, so the connection's `search_path`
/// picks the schema (`?options=-c%20search_path%3Dmy_schema` in the URL).
///
/// A database that is down or unreachable fails an operation after about two seconds (pool
/// wait, connect and check timeouts) instead of stalling it.
#[derive(Clone)]
pub struct PostgresKeyStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresKeyStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresKeyStore {
    /// A store on the database at `url` (`postgres://user:password@host:port/db?options=...`),
    /// with at most `pool_size` connections.
    ///
    /// Connections are opened lazily, so this succeeds while the database is down (see
    /// [`ping`](crate::KeyStore::ping)); it fails only on a pool that cannot be built.
    pub fn connect(url: &str, pool_size: usize) -> Result<PostgresKeyStore> {
        let pool = sql_pool::postgres::connect(url, pool_size, POOL_TIMEOUT)
            .map_err(|e| KeyError::backend(BACKEND, e))?;
        Ok(PostgresKeyStore { pool })
    }

    async fn conn(&self) -> Result<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| KeyError::backend(BACKEND, e))
    }
}

impl_sql_key_store!(PostgresKeyStore, "postgres");
