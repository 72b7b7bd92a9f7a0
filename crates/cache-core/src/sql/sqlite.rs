//! The SQLite store.

use diesel::{Connection, QueryResult, SqliteConnection};
use sql_pool::KeepPreparedAs;
use sql_pool::sqlite::{Object, Pool};

use super::{EntryRow, POOL_TIMEOUT};
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

    /// The row with primary key `key_hex`. Built and run on SQLite's thread with diesel's sync
    /// API: one hand-off per lookup, and the prepared statement found by its Rust type, where
    /// the async wrapper renders the SQL text on the caller's thread to find it.
    async fn select_row(conn: &mut Object, key_hex: String) -> QueryResult<Option<EntryRow>> {
        conn.spawn_blocking(move |c| {
            use super::schema::cache_entries;
            use diesel::prelude::*;
            // `get_result`, not `first`: the key is the primary key, and `first`'s bound
            // `LIMIT ?` made SQLite (built with STAT4) re-prepare the statement on every call,
            // the most expensive part of an L1 miss.
            cache_entries::table
                .find(key_hex)
                .select(EntryRow::as_select())
                .get_result(c)
                .optional()
        })
        .await
    }

    /// Writes `rows` in one hand-off to SQLite's thread, several in one transaction (one
    /// commit); each row was a hand-off of its own.
    async fn upsert_rows(conn: &mut Object, rows: Vec<EntryRow>) -> QueryResult<()> {
        /// Names the upsert in the connection's statement cache: one row, every column, so
        /// its SQL text never changes.
        struct UpsertEntry;
        fn upsert(c: &mut SqliteConnection, row: &EntryRow) -> QueryResult<()> {
            use super::schema::cache_entries as t;
            use diesel::RunQueryDsl;
            // `get_result` with `RETURNING`, not `execute`, or it is parsed on every call
            // (see `KeepPrepared`); found by type, so not rendered to SQL on every call either.
            KeepPreparedAs::<UpsertEntry, _>::new(upsert_statement!(row).returning(t::key))
                .get_result::<String>(c)
                .map(|_| ())
        }
        conn.spawn_blocking(move |c| match rows.as_slice() {
            [row] => upsert(c, row),
            rows => c.transaction(|c| rows.iter().try_for_each(|row| upsert(c, row))),
        })
        .await
    }
}

impl_sql_cache_store!(
    SqliteStore,
    "sqlite",
    diesel::sqlite::Sqlite,
    "COALESCE(SUM(length(body) + length(CAST(signature AS BLOB))), 0)"
);
