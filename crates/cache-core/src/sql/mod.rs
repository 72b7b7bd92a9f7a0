//! SQL stores: SQLite (feature `sqlite`) and PostgreSQL (feature `postgres`) through diesel-async.
//!
//! Both backends share the `cache_entries` table (see `migrations/{sqlite,postgres}` at the
//! workspace root; running them is the embedder's job), the row <-> [`Entry`] conversion and the
//! queries: the `impl_sql_cache_store!` macro expands the same diesel query code for each backend's
//! connection type. Only connecting and the byte-count expression differ per backend.

use std::time::Duration;

use bytes::Bytes;
use diesel::{Insertable, Queryable, Selectable};

use crate::entry::Entry;
use crate::error::{CacheError, Result};
use crate::key::CacheKey;

/// How long a request waits for a pooled connection, for a new connection to be established,
/// or for an idle one to be checked: a dead database fails a lookup after this, never stalls it.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);

/// The diesel schema of `cache_entries`, identical for both backends.
pub(crate) mod schema {
    diesel::table! {
        /// Cached upstream responses; timestamps in Unix milliseconds.
        cache_entries (key) {
            /// 32 lower-case hex characters of the [`CacheKey`](crate::CacheKey).
            key -> Text,
            /// Canonical request signature.
            signature -> Text,
            /// Upstream name.
            upstream -> Text,
            /// Configured route path.
            route -> Text,
            /// HTTP status.
            status -> Integer,
            /// JSON array of `[name, value]` pairs.
            headers -> Text,
            /// Response body.
            body -> Binary,
            /// [`Entry::stored_at`](crate::Entry::stored_at).
            stored_at -> BigInt,
            /// [`Entry::fresh_until`](crate::Entry::fresh_until).
            fresh_until -> BigInt,
            /// [`Entry::stale_while_revalidate_until`](crate::Entry::stale_while_revalidate_until).
            swr_until -> BigInt,
            /// [`Entry::stale_if_error_until`](crate::Entry::stale_if_error_until).
            sie_until -> BigInt,
            /// [`Entry::expires_at`](crate::Entry::expires_at), indexed for sweeping.
            expires_at -> BigInt,
            /// Cost of one upstream call.
            cost -> Double,
        }
    }
}

/// One `cache_entries` row, as read and written by both backends.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = schema::cache_entries)]
pub(crate) struct EntryRow {
    key: String,
    signature: String,
    upstream: String,
    route: String,
    status: i32,
    headers: String,
    body: Vec<u8>,
    stored_at: i64,
    fresh_until: i64,
    swr_until: i64,
    sie_until: i64,
    expires_at: i64,
    cost: f64,
}

impl EntryRow {
    /// The row storing `entry` under `key`.
    pub(crate) fn from_entry(backend: &'static str, key: &CacheKey, entry: &Entry) -> Result<Self> {
        let headers =
            serde_json::to_string(&entry.headers).map_err(|e| CacheError::backend(backend, e))?;
        Ok(EntryRow {
            key: key.to_hex(),
            signature: entry.signature.clone(),
            upstream: entry.upstream.clone(),
            route: entry.route.clone(),
            status: i32::from(entry.status),
            headers,
            body: entry.body.to_vec(),
            stored_at: entry.stored_at,
            fresh_until: entry.fresh_until,
            swr_until: entry.stale_while_revalidate_until,
            sie_until: entry.stale_if_error_until,
            expires_at: entry.expires_at(),
            cost: entry.cost,
        })
    }

    /// The entry this row holds; [`CacheError::Corrupt`] when a column does not decode.
    pub(crate) fn into_entry(self) -> Result<Entry> {
        let status = u16::try_from(self.status).map_err(|_| {
            CacheError::Corrupt(format!(
                "row {}: status {} out of range",
                self.key, self.status
            ))
        })?;
        let headers: Vec<(String, String)> = serde_json::from_str(&self.headers)
            .map_err(|e| CacheError::Corrupt(format!("row {}: headers: {e}", self.key)))?;
        Ok(Entry {
            signature: self.signature,
            upstream: self.upstream,
            route: self.route,
            status,
            headers,
            body: Bytes::from(self.body),
            stored_at: self.stored_at,
            fresh_until: self.fresh_until,
            stale_while_revalidate_until: self.swr_until,
            stale_if_error_until: self.sie_until,
            cost: self.cost,
            prepared: Default::default(),
        })
    }
}

/// A failed query: undecodable column values are [`CacheError::Corrupt`], the rest backend
/// failures.
pub(crate) fn query_error(backend: &'static str, e: diesel::result::Error) -> CacheError {
    match e {
        diesel::result::Error::DeserializationError(e) => CacheError::Corrupt(e.to_string()),
        other => CacheError::backend(backend, other),
    }
}

/// The statement inserting `row` (an `&EntryRow`), or replacing the row with its key: one
/// expression for both backends and both diesel APIs (sync on SQLite's thread, async on
/// PostgreSQL). Run it wrapped in [`sql_pool::KeepPrepared`]: diesel would otherwise parse it
/// again on every call (it deems every `ON CONFLICT DO UPDATE` unsafe to cache), which was a
/// tenth of the CPU of a cache miss.
macro_rules! upsert_statement {
    ($row:expr) => {{
        use diesel::prelude::*;
        use diesel::upsert::excluded;
        use $crate::sql::schema::cache_entries as t;

        diesel::insert_into(t::table)
            .values($row)
            .on_conflict(t::key)
            .do_update()
            .set((
                t::signature.eq(excluded(t::signature)),
                t::upstream.eq(excluded(t::upstream)),
                t::route.eq(excluded(t::route)),
                t::status.eq(excluded(t::status)),
                t::headers.eq(excluded(t::headers)),
                t::body.eq(excluded(t::body)),
                t::stored_at.eq(excluded(t::stored_at)),
                t::fresh_until.eq(excluded(t::fresh_until)),
                t::swr_until.eq(excluded(t::swr_until)),
                t::sie_until.eq(excluded(t::sie_until)),
                t::expires_at.eq(excluded(t::expires_at)),
                t::cost.eq(excluded(t::cost)),
            ))
    }};
}

/// Implements [`CacheStore`](crate::CacheStore) for a SQL store type with the backend-neutral
/// diesel queries below.
///
/// The type must have `async fn conn(&self) -> Result<Object>` (a pooled connection), and the
/// two queries of the hot paths as associated functions, where the backends differ in how they
/// run them (SQLite: one hand-off to its thread per call):
/// `async fn select_row(&mut Object, key_hex: String) -> QueryResult<Option<EntryRow>>` and
/// `async fn upsert_rows(&mut Object, rows: Vec<EntryRow>) -> QueryResult<()>` (several rows
/// in one transaction). Arguments: the store type, its backend name (`"sqlite"`), the diesel backend
/// type, and an SQL expression counting the bytes of all rows' bodies and signatures.
macro_rules! impl_sql_cache_store {
    ($store:ty, $backend:literal, $db:ty, $bytes_sql:expr) => {
        impl $store {
            /// A failed query's error. After a backend failure the idle connections are
            /// dropped: when the database restarted they are all dead, and each would fail
            /// one more operation before the pool noticed.
            fn query_failed(&self, e: diesel::result::Error) -> $crate::error::CacheError {
                let error = $crate::sql::query_error($backend, e);
                if error.is_retryable() {
                    self.pool.retain(|_, _| false);
                }
                error
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::CacheStore for $store {
            fn name(&self) -> &'static str {
                $backend
            }

            /// Runs `SELECT 1` on a pooled connection (the store itself connects lazily).
            async fn ping(&self) -> $crate::error::Result<()> {
                use diesel_async::RunQueryDsl;
                let mut conn = self.conn().await?;
                diesel::sql_query("SELECT 1")
                    .execute(&mut conn)
                    .await
                    .map_err(|e| self.query_failed(e))?;
                Ok(())
            }

            async fn get(
                &self,
                key: &$crate::key::CacheKey,
            ) -> $crate::error::Result<Option<std::sync::Arc<$crate::entry::Entry>>> {
                let mut conn = self.conn().await?;
                let row = Self::select_row(&mut conn, key.to_hex())
                    .await
                    .map_err(|e| self.query_failed(e))?;
                row.map(|r| r.into_entry().map(std::sync::Arc::new))
                    .transpose()
            }

            async fn put(
                &self,
                key: $crate::key::CacheKey,
                entry: std::sync::Arc<$crate::entry::Entry>,
            ) -> $crate::error::Result<()> {
                use $crate::sql::EntryRow;

                let row = EntryRow::from_entry($backend, &key, &entry)?;
                let mut conn = self.conn().await?;
                Self::upsert_rows(&mut conn, vec![row])
                    .await
                    .map_err(|e| self.query_failed(e))
            }

            /// One transaction for the whole batch: one commit instead of one per entry.
            async fn put_many(
                &self,
                entries: &[($crate::key::CacheKey, std::sync::Arc<$crate::entry::Entry>)],
            ) -> $crate::error::Result<()> {
                use $crate::sql::EntryRow;

                let rows = entries
                    .iter()
                    .map(|(key, entry)| EntryRow::from_entry($backend, key, entry))
                    .collect::<$crate::error::Result<Vec<_>>>()?;
                if rows.is_empty() {
                    return Ok(());
                }
                let mut conn = self.conn().await?;
                Self::upsert_rows(&mut conn, rows)
                    .await
                    .map_err(|e| self.query_failed(e))
            }

            async fn remove(&self, key: &$crate::key::CacheKey) -> $crate::error::Result<bool> {
                use diesel::prelude::*;
                use diesel_async::RunQueryDsl;
                use $crate::sql::schema::cache_entries;

                let mut conn = self.conn().await?;
                let removed = diesel::delete(cache_entries::table.find(key.to_hex()))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| self.query_failed(e))?;
                Ok(removed > 0)
            }

            async fn purge(
                &self,
                filter: &$crate::store::PurgeFilter,
            ) -> $crate::error::Result<u64> {
                use diesel::prelude::*;
                use diesel_async::RunQueryDsl;
                use $crate::sql::schema::cache_entries;

                let mut query = diesel::delete(cache_entries::table).into_boxed::<$db>();
                if let Some(upstream) = &filter.upstream {
                    query = query.filter(cache_entries::upstream.eq(upstream.as_str()));
                }
                if let Some(route) = &filter.route {
                    query = query.filter(cache_entries::route.eq(route.as_str()));
                }
                if let Some(key) = &filter.key {
                    query = query.filter(cache_entries::key.eq(key.to_hex()));
                }
                let mut conn = self.conn().await?;
                let purged = query
                    .execute(&mut conn)
                    .await
                    .map_err(|e| self.query_failed(e))?;
                Ok(u64::try_from(purged).unwrap_or(u64::MAX))
            }

            async fn sweep_expired(
                &self,
                now: $crate::clock::UnixMillis,
                max_entries: usize,
            ) -> $crate::error::Result<u64> {
                use diesel::prelude::*;
                use diesel_async::RunQueryDsl;
                use $crate::sql::schema::cache_entries;

                if max_entries == 0 {
                    return Ok(0);
                }
                // The oldest expired keys; an alias, as diesel reads an unaliased subquery on
                // the same table as a correlated one.
                let expired = diesel::alias!(cache_entries as expired);
                let batch = expired
                    .select(expired.field(cache_entries::key))
                    .filter(expired.field(cache_entries::expires_at).le(now))
                    .order(expired.field(cache_entries::expires_at))
                    .limit(i64::try_from(max_entries).unwrap_or(i64::MAX));
                let mut conn = self.conn().await?;
                let swept = diesel::delete(cache_entries::table)
                    .filter(cache_entries::key.eq_any(batch))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| self.query_failed(e))?;
                Ok(u64::try_from(swept).unwrap_or(u64::MAX))
            }

            async fn usage(&self) -> $crate::error::Result<$crate::store::StoreUsage> {
                use diesel::prelude::*;
                use diesel_async::RunQueryDsl;
                use $crate::sql::schema::cache_entries;

                let mut conn = self.conn().await?;
                let (entries, bytes): (i64, i64) = cache_entries::table
                    .select((
                        diesel::dsl::count_star(),
                        diesel::dsl::sql::<diesel::sql_types::BigInt>($bytes_sql),
                    ))
                    .get_result(&mut conn)
                    .await
                    .map_err(|e| self.query_failed(e))?;
                Ok($crate::store::StoreUsage {
                    entries: u64::try_from(entries).unwrap_or(0),
                    bytes: u64::try_from(bytes).unwrap_or(0),
                })
            }

            /// A page of the primary key's index, in order.
            async fn keys_after(
                &self,
                after: Option<$crate::key::CacheKey>,
                limit: usize,
            ) -> $crate::error::Result<Option<Vec<$crate::key::CacheKey>>> {
                use diesel::prelude::*;
                use diesel_async::RunQueryDsl;
                use $crate::sql::schema::cache_entries;

                let mut conn = self.conn().await?;
                // "" sorts before every key.
                let after = after.map(|k| k.to_hex()).unwrap_or_default();
                let keys: Vec<String> = cache_entries::table
                    .select(cache_entries::key)
                    .filter(cache_entries::key.gt(after))
                    .order(cache_entries::key.asc())
                    .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                    .load(&mut conn)
                    .await
                    .map_err(|e| self.query_failed(e))?;
                keys.iter()
                    .map(|k| $crate::key::CacheKey::from_hex(k))
                    .collect::<$crate::error::Result<Vec<_>>>()
                    .map(Some)
            }
        }
    };
}

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
