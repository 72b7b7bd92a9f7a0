//! The SQLite store.

use sql_pool::sqlite::{Object, Pool};

use super::POOL_TIMEOUT;
use crate::error::{KeyError, Result};

const BACKEND: &str = "sqlite";

/// The schema, for in-memory databases only: nothing but the store's own connection can reach
/// them to run migrations. The `api_keys` migration's `up.sql`.
const IN_MEMORY_SCHEMA: &[&str] = &[include_str!(
    "../../../../migrations/sqlite/2026-11-23-000002_api_keys/up.sql"
)];

/// A [`KeyStore`](crate::KeyStore) in an SQLite database file (feature `sqlite`).
///
/// Queries run on a pool of connections, each on the process-wide SQLite threads (`sql-pool`). The `api_keys`
/// table must exist: run `migrations/sqlite` first. Several processes may share the file (WAL
/// mode, 5 s busy timeout).
#[derive(Clone)]
pub struct SqliteKeyStore {
    pool: Pool,
}

impl std::fmt::Debug for SqliteKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteKeyStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl SqliteKeyStore {
    /// A store on the database at `url`: `sqlite://path/to/file.db` (an SQLite URI filename, so
    /// `?mode=...` parameters work), `sqlite:path`, a bare file path, or `sqlite::memory:` /
    /// `:memory:` for a private in-memory database (one connection whatever `pool_size`; it gets
    /// the schema on connect, as nothing else can reach it to run migrations).
    ///
    /// Connections are opened lazily (see [`ping`](crate::KeyStore::ping)); at most `pool_size`
    /// at once.
    pub fn connect(url: &str, pool_size: usize) -> Result<SqliteKeyStore> {
        let pool = sql_pool::sqlite::connect(url, pool_size, IN_MEMORY_SCHEMA, POOL_TIMEOUT)
            .map_err(|e| match e {
                sql_pool::PoolError::NoPath(_) => KeyError::Invalid(e.to_string()),
                e => KeyError::backend(BACKEND, e),
            })?;
        Ok(SqliteKeyStore { pool })
    }

    async fn conn(&self) -> Result<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| KeyError::backend(BACKEND, e))
    }
}

impl_sql_key_store!(SqliteKeyStore, "sqlite");
