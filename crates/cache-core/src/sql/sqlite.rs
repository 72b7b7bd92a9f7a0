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

/// Run on the store's own connections, after `sql-pool`'s: checkpoint the WAL into the
/// database every 10,000 pages (~40 MiB) instead of SQLite's 1,000, and cut the WAL file back
/// to 64 MiB after a checkpoint resets it.
///
/// A miss writes one row, and its random MD5 key lands in another page of the key's index
/// each time. Under `cargo xtask bench`'s `miss` (~14,000 new entries a second), 1,000 pages
/// meant 64 `fsync`s a second and 4.3 page writes a row; 10,000 meant 6 `fsync`s a second, 3.5
/// writes a row and 11% less of the SQLite threads' CPU per row. A page written several times
/// between two checkpoints is copied into the database once.
///
/// The cost: with `synchronous = NORMAL`, a power loss (not a crash of the process) may drop
/// what was committed since the last checkpoint, up to ~40 MiB of the newest entries, which the
/// next miss fetches again. API keys and quota counters, on connections of their own, keep
/// SQLite's default: a commit of theirs checkpoints the WAL once it holds 1,000 pages.
const CACHE_PRAGMAS: &str =
    "PRAGMA wal_autocheckpoint = 10000; PRAGMA journal_size_limit = 67108864;";

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
        let pool = sql_pool::sqlite::connect_with_pragmas(
            url,
            pool_size,
            IN_MEMORY_SCHEMA,
            POOL_TIMEOUT,
            CACHE_PRAGMAS,
        )
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
