//! The SQLite store.

use sql_pool::sqlite::{Object, Pool};

use super::POOL_TIMEOUT;
use crate::error::{CacheError, Result};

const BACKEND: &str = "sqlite";

/// The schema, for in-memory databases only: nothing but the store's own connection can reach
/// them to run migrations. Lists every migration's `up.sql` in order.
const IN_MEMORY_SCHEMA: &[&str] = &[include_str!(
    "../../../../migrations/sqlite/2026-11-23-000001_cache_entries/up.sql"
)];

/// A [`CacheStore`](crate::CacheStore) in an SQLite database file (feature `sqlite`).
///
/// Queries run on a pool of connections, each on the process-wide SQLite threads (`sql-pool`). The `cache_entries`
/// table must exist: run `migrations/sqlite` first. Survives restarts of the process; several
/// processes may share the file (WAL mode, 5 s busy timeout).
#[derive(Clone)]
pub struct SqliteStore {
    pool: Pool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl SqliteStore {
    /// A store on the database at `url`: `sqlite://path/to/file.db` (an SQLite URI filename, so
    /// `?mode=...` parameters work), `sqlite:path`, a bare file path, or `sqlite::memory:` /
    /// `:memory:` for a private in-memory database (one connection whatever `pool_size`; it gets
    /// the schema on connect, as nothing else can reach it to run migrations).
    ///
    /// Connections are opened lazily (see [`ping`](Self::ping)); at most `pool_size` at once.
    pub fn connect(url: &str, pool_size: usize) -> Result<SqliteStore> {
        let pool = sql_pool::sqlite::connect(url, pool_size, IN_MEMORY_SCHEMA, POOL_TIMEOUT)
            .map_err(|e| CacheError::backend(BACKEND, e))?;
        Ok(SqliteStore { pool })
    }

    async fn conn(&self) -> Result<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| CacheError::backend(BACKEND, e))
    }
}

impl_sql_cache_store!(
    SqliteStore,
    "sqlite",
    diesel::sqlite::Sqlite,
    "COALESCE(SUM(length(body) + length(CAST(signature AS BLOB))), 0)"
);
