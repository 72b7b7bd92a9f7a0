//! The PostgreSQL store.

use diesel::QueryResult;
use diesel_async::AsyncPgConnection;
use sql_pool::KeepPrepared;
use sql_pool::postgres::{Object, Pool};

use super::{EntryRow, POOL_TIMEOUT};
use crate::error::{CacheError, Result};

const BACKEND: &str = "postgres";

/// A [`CacheStore`](crate::CacheStore) in PostgreSQL (feature `postgres`), shared by every
/// gateway instance using the same database.
///
/// Pure-Rust client (tokio-postgres, no TLS), pooled. The `cache_entries` table must exist: run
/// `migrations/postgres` first. Table names are unqualified, so the connection's `search_path`
/// picks the schema (`?options=-c%20search_path%3Dmy_schema` in the URL).
///
/// A database that is down or unreachable fails an operation after about two seconds (pool
/// wait, connect and check timeouts) instead of stalling it.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresStore {
    /// A store on the database at `url` (`postgres://user:password@host:port/db?options=...`),
    /// with at most `pool_size` connections.
    ///
    /// Connections are opened lazily, so this succeeds while the database is down (see
    /// [`ping`](Self::ping)); it fails only on a pool that cannot be built.
    pub fn connect(url: &str, pool_size: usize) -> Result<PostgresStore> {
        let pool = sql_pool::postgres::connect(url, pool_size, POOL_TIMEOUT)
            .map_err(|e| CacheError::backend(BACKEND, e))?;
        Ok(PostgresStore { pool })
    }

    async fn conn(&self) -> Result<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| CacheError::backend(BACKEND, e))
    }

    /// The row with primary key `key_hex`.
    async fn select_row(conn: &mut Object, key_hex: String) -> QueryResult<Option<EntryRow>> {
        use super::schema::cache_entries;
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;

        cache_entries::table
            .find(key_hex)
            .select(EntryRow::as_select())
            .get_result(conn)
            .await
            .optional()
    }

    /// Writes `rows`, several in one transaction (one commit).
    async fn upsert_rows(conn: &mut Object, rows: Vec<EntryRow>) -> QueryResult<()> {
        use diesel_async::{AsyncConnection, RunQueryDsl};

        async fn upsert(c: &mut AsyncPgConnection, row: &EntryRow) -> QueryResult<()> {
            KeepPrepared(upsert_statement!(row))
                .execute(c)
                .await
                .map(|_| ())
        }
        match rows.as_slice() {
            [row] => upsert(conn, row).await,
            rows => {
                conn.transaction::<_, diesel::result::Error, _>(async |c| {
                    for row in rows {
                        upsert(c, row).await?;
                    }
                    Ok(())
                })
                .await
            }
        }
    }
}

impl_sql_cache_store!(
    PostgresStore,
    "postgres",
    diesel::pg::Pg,
    "CAST(COALESCE(SUM(octet_length(body) + octet_length(signature)), 0) AS BIGINT)"
);
