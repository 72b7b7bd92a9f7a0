//! SQL stores: SQLite (feature `sqlite`) and PostgreSQL (feature `postgres`) through diesel-async.
//!
//! Both backends share the `api_keys` table (see `migrations/{sqlite,postgres}` at the
//! workspace root; running them is the embedder's job), the row <-> [`KeyRecord`] conversion
//! and the queries: the `impl_sql_key_store!` macro expands the same diesel query code for each
//! backend's connection type. Only connecting differs per backend. [`SqlKeyStore`] picks the
//! backend from a database URL.

use std::time::Duration;

use diesel::{Insertable, Queryable, Selectable};

use crate::clock::UnixMillis;
use crate::error::{KeyError, Result};
use crate::key::{Digest, KeyId};
use crate::record::{KeyRecord, RateSpec, Revocation};

/// How long a request waits for a pooled connection, for a new connection to be established,
/// or for an idle one to be checked: a dead database fails a lookup after this, never stalls it.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);

/// The diesel schema of `api_keys`, identical for both backends.
pub(crate) mod schema {
    diesel::table! {
        /// API keys; only digests, never keys. Timestamps in Unix milliseconds.
        api_keys (id) {
            /// Public id ([`KeyId`](crate::KeyId)).
            id -> Text,
            /// Human-readable name.
            name -> Text,
            /// 64 lower-case hex digits of SHA-256(key); unique.
            digest -> Text,
            /// When the key was issued.
            created_at -> BigInt,
            /// When the key stops working.
            expires_at -> Nullable<BigInt>,
            /// When the key was revoked; indexed for revocation sync.
            revoked_at -> Nullable<BigInt>,
            /// JSON array of upstream names; NULL allows all.
            allowed_upstreams -> Nullable<Text>,
            /// Rate limit: requests ...
            rate_limit_count -> Nullable<BigInt>,
            /// ... per this many seconds.
            rate_limit_per_secs -> Nullable<BigInt>,
            /// Requests per UTC day.
            daily_quota -> Nullable<BigInt>,
            /// Requests per UTC month.
            monthly_quota -> Nullable<BigInt>,
            /// Upstream cost per UTC day, micro-units.
            daily_budget_micros -> Nullable<BigInt>,
            /// Upstream cost per UTC month, micro-units.
            monthly_budget_micros -> Nullable<BigInt>,
        }
    }
}

/// One `api_keys` row, as read and written by both backends.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = schema::api_keys)]
pub(crate) struct KeyRow {
    id: String,
    name: String,
    digest: String,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    allowed_upstreams: Option<String>,
    rate_limit_count: Option<i64>,
    rate_limit_per_secs: Option<i64>,
    daily_quota: Option<i64>,
    monthly_quota: Option<i64>,
    daily_budget_micros: Option<i64>,
    monthly_budget_micros: Option<i64>,
}

/// A stored count: `u64` values above `i64::MAX` are refused by validation before they get here.
fn to_sql(what: &str, value: Option<u64>) -> Result<Option<i64>> {
    value
        .map(|v| {
            i64::try_from(v)
                .map_err(|_| KeyError::Invalid(format!("{what} {v} is above {}", i64::MAX)))
        })
        .transpose()
}

impl KeyRow {
    /// The row storing `record` ([`KeyError::Invalid`] when a value cannot be stored).
    pub(crate) fn from_record(record: &KeyRecord) -> Result<Self> {
        record.validate()?;
        let allowed_upstreams = record
            .allowed_upstreams
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| KeyError::Invalid(format!("allowed upstreams: {e}")))?;
        let rate = record.rate_limit.as_ref();
        Ok(KeyRow {
            id: record.id.as_str().to_owned(),
            name: record.name.clone(),
            digest: record.digest.to_hex(),
            created_at: record.created_at,
            expires_at: record.expires_at,
            revoked_at: record.revoked_at,
            allowed_upstreams,
            rate_limit_count: to_sql("rate limit count", rate.map(|r| r.count))?,
            rate_limit_per_secs: to_sql("rate limit period", rate.map(|r| r.per_secs))?,
            daily_quota: to_sql("daily quota", record.daily_quota)?,
            monthly_quota: to_sql("monthly quota", record.monthly_quota)?,
            daily_budget_micros: to_sql("daily budget", record.daily_budget_micros)?,
            monthly_budget_micros: to_sql("monthly budget", record.monthly_budget_micros)?,
        })
    }

    /// The record this row holds; [`KeyError::Corrupt`] when a column does not decode.
    pub(crate) fn into_record(self) -> Result<KeyRecord> {
        let id = self.id;
        let corrupt = |what: &str| KeyError::Corrupt(format!("key {id}: {what}"));
        let unsigned = |what: &str, v: Option<i64>| {
            v.map(|v| u64::try_from(v).map_err(|_| corrupt(&format!("{what} {v} is negative"))))
                .transpose()
        };
        let rate_limit = match (self.rate_limit_count, self.rate_limit_per_secs) {
            (None, None) => None,
            (Some(count), Some(per_secs)) => {
                let count = unsigned("rate limit count", Some(count))?.unwrap_or(0);
                let per_secs = unsigned("rate limit period", Some(per_secs))?.unwrap_or(0);
                Some(
                    RateSpec::new(count, per_secs)
                        .map_err(|e| corrupt(&format!("rate limit: {e}")))?,
                )
            }
            _ => return Err(corrupt("rate limit count and period must be set together")),
        };
        let allowed_upstreams: Option<Vec<String>> = self
            .allowed_upstreams
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| corrupt(&format!("allowed_upstreams: {e}")))?;
        Ok(KeyRecord {
            digest: Digest::from_hex(&self.digest).map_err(|_| corrupt("digest is not hex"))?,
            name: self.name,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            allowed_upstreams,
            rate_limit,
            daily_quota: unsigned("daily quota", self.daily_quota)?,
            monthly_quota: unsigned("monthly quota", self.monthly_quota)?,
            daily_budget_micros: unsigned("daily budget", self.daily_budget_micros)?,
            monthly_budget_micros: unsigned("monthly budget", self.monthly_budget_micros)?,
            id: KeyId::parse(&id).map_err(|_| corrupt("id is not a key id"))?,
        })
    }
}

/// A `(id, digest, revoked_at)` row of [`KeyStore::revoked_since`](crate::KeyStore::revoked_since).
pub(crate) fn revocation(row: (String, String, Option<i64>)) -> Result<Revocation> {
    let (id, digest, revoked_at) = row;
    let corrupt = |what: &str| KeyError::Corrupt(format!("key {id}: {what}"));
    Ok(Revocation {
        digest: Digest::from_hex(&digest).map_err(|_| corrupt("digest is not hex"))?,
        revoked_at: revoked_at.ok_or_else(|| corrupt("revoked_at is NULL"))?,
        id: KeyId::parse(&id).map_err(|_| corrupt("id is not a key id"))?,
    })
}

/// Keeps `record` only when its digest equals `digest` (constant-time; a backend returning
/// another row would be a bug, never a login).
pub(crate) fn matching(record: KeyRecord, digest: &Digest) -> Option<KeyRecord> {
    (record.digest == *digest).then_some(record)
}

/// A failed query: unique violations are [`KeyError::Conflict`], undecodable column values
/// [`KeyError::Corrupt`], the rest backend failures.
pub(crate) fn query_error(backend: &'static str, e: diesel::result::Error) -> KeyError {
    use diesel::result::{DatabaseErrorKind, Error};
    match e {
        Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
            KeyError::Conflict(info.message().to_owned())
        }
        Error::DeserializationError(e) => KeyError::Corrupt(e.to_string()),
        other => KeyError::backend(backend, other),
    }
}

/// Implements [`KeyStore`](crate::KeyStore) for a SQL store type with the backend-neutral
/// diesel queries below.
///
/// The type must have `async fn conn(&self) -> Result<impl AsyncConnection>` (a pooled
/// connection). Arguments: the store type and its backend name (`"sqlite"`).
macro_rules! impl_sql_key_store {
    ($store:ty, $backend:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::KeyStore for $store {
            fn name(&self) -> &'static str {
                $backend
            }

            async fn insert(
                &self,
                record: &$crate::record::KeyRecord,
            ) -> $crate::error::Result<()> {
                use diesel_async::RunQueryDsl;
                use $crate::sql::{KeyRow, query_error, schema::api_keys};

                let row = KeyRow::from_record(record)?;
                let mut conn = self.conn().await?;
                diesel::insert_into(api_keys::table)
                    .values(&row)
                    .execute(&mut conn)
                    .await
                    .map_err(|e| query_error($backend, e))?;
                Ok(())
            }

            async fn find_by_digest(
                &self,
                digest: &$crate::key::Digest,
            ) -> $crate::error::Result<Option<$crate::record::KeyRecord>> {
                use diesel::prelude::*;
                use diesel_async::RunQueryDsl;
                use $crate::sql::{KeyRow, matching, query_error, schema::api_keys};

                let mut conn = self.conn().await?;
                let row: Option<KeyRow> = api_keys::table
                    .filter(api_keys::digest.eq(digest.to_hex()))
                    .select(KeyRow::as_select())
                    .first(&mut conn)
                    .await
                    .optional()
                    .map_err(|e| query_error($backend, e))?;
                Ok(row
                    .map(KeyRow::into_record)
                    .transpose()?
                    .and_then(|r| matching(r, digest)))
            }

            async fn get(
                &self,
                id: &$crate::key::KeyId,
            ) -> $crate::error::Result<Option<$crate::record::KeyRecord>> {
                use diesel::prelude::*;
                use diesel_async::RunQueryDsl;
                use $crate::sql::{KeyRow, query_error, schema::api_keys};

                let mut conn = self.conn().await?;
                let row: Option<KeyRow> = api_keys::table
                    .find(id.as_str())
                    .select(KeyRow::as_select())
                    .first(&mut conn)
                    .await
                    .optional()
                    .map_err(|e| query_error($backend, e))?;
                row.map(KeyRow::into_record).transpose()
            }

            async fn list(&self) -> $crate::error::Result<Vec<$crate::record::KeyRecord>> {
                use diesel::prelude::*;
                use diesel_async::RunQueryDsl;
                use $crate::sql::{KeyRow, query_error, schema::api_keys};

                let mut conn = self.conn().await?;
                let rows: Vec<KeyRow> = api_keys::table
                    .order((api_keys::created_at, api_keys::id))
                    .select(KeyRow::as_select())
                    .load(&mut conn)
                    .await
                    .map_err(|e| query_error($backend, e))?;
                rows.into_iter().map(KeyRow::into_record).collect()
            }

            async fn revoke(
                &self,
                id: &$crate::key::KeyId,
                at: $crate::clock::UnixMillis,
            ) -> $crate::error::Result<bool> {
                use diesel::prelude::*;
                use diesel_async::RunQueryDsl;
                use $crate::sql::{query_error, schema::api_keys};

                let mut conn = self.conn().await?;
                let updated = diesel::update(
                    api_keys::table
                        .find(id.as_str())
                        .filter(api_keys::revoked_at.is_null()),
                )
                .set(api_keys::revoked_at.eq(Some(at)))
                .execute(&mut conn)
                .await
                .map_err(|e| query_error($backend, e))?;
                if updated > 0 {
                    return Ok(true);
                }
                // Unknown id, or revoked before (its first revocation time stays).
                let existing: i64 = api_keys::table
                    .find(id.as_str())
                    .count()
                    .get_result(&mut conn)
                    .await
                    .map_err(|e| query_error($backend, e))?;
                Ok(existing > 0)
            }

            async fn revoked_since(
                &self,
                since: $crate::clock::UnixMillis,
            ) -> $crate::error::Result<Vec<$crate::record::Revocation>> {
                use diesel::prelude::*;
                use diesel_async::RunQueryDsl;
                use $crate::sql::{query_error, revocation, schema::api_keys};

                let mut conn = self.conn().await?;
                let rows: Vec<(String, String, Option<i64>)> = api_keys::table
                    .filter(api_keys::revoked_at.ge(since))
                    .order((api_keys::revoked_at, api_keys::id))
                    .select((api_keys::id, api_keys::digest, api_keys::revoked_at))
                    .load(&mut conn)
                    .await
                    .map_err(|e| query_error($backend, e))?;
                rows.into_iter().map(revocation).collect()
            }

            /// Runs `SELECT 1` on a pooled connection (the store itself connects lazily).
            async fn ping(&self) -> $crate::error::Result<()> {
                use diesel_async::RunQueryDsl;
                let mut conn = self.conn().await?;
                diesel::sql_query("SELECT 1")
                    .execute(&mut conn)
                    .await
                    .map_err(|e| $crate::sql::query_error($backend, e))?;
                Ok(())
            }
        }
    };
}

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::PostgresKeyStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteKeyStore;

// === impl SqlKeyStore ===

/// The SQL store a database URL names: [`PostgresKeyStore`] for `postgres://` and
/// `postgresql://` URLs (feature `postgres`), [`SqliteKeyStore`] for anything else (feature
/// `sqlite`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SqlKeyStore {
    /// SQLite.
    #[cfg(feature = "sqlite")]
    Sqlite(SqliteKeyStore),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(PostgresKeyStore),
}

impl SqlKeyStore {
    /// A store on the database at `url` with at most `pool_size` connections (opened lazily).
    /// [`KeyError::Invalid`] when the URL names a backend this build lacks.
    pub fn connect(url: &str, pool_size: usize) -> Result<SqlKeyStore> {
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if postgres {
            #[cfg(feature = "postgres")]
            return PostgresKeyStore::connect(url, pool_size).map(SqlKeyStore::Postgres);
            #[cfg(not(feature = "postgres"))]
            return Err(KeyError::Invalid(
                "a postgres:// database needs keystore's `postgres` feature".into(),
            ));
        }
        #[cfg(feature = "sqlite")]
        return SqliteKeyStore::connect(url, pool_size).map(SqlKeyStore::Sqlite);
        #[cfg(not(feature = "sqlite"))]
        return Err(KeyError::Invalid(
            "an SQLite database needs keystore's `sqlite` feature".into(),
        ));
    }

    fn inner(&self) -> &dyn crate::store::KeyStore {
        match self {
            #[cfg(feature = "sqlite")]
            SqlKeyStore::Sqlite(s) => s,
            #[cfg(feature = "postgres")]
            SqlKeyStore::Postgres(s) => s,
        }
    }
}

#[async_trait::async_trait]
impl crate::store::KeyStore for SqlKeyStore {
    fn name(&self) -> &'static str {
        self.inner().name()
    }
    async fn insert(&self, record: &KeyRecord) -> Result<()> {
        self.inner().insert(record).await
    }
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>> {
        self.inner().find_by_digest(digest).await
    }
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        self.inner().get(id).await
    }
    async fn list(&self) -> Result<Vec<KeyRecord>> {
        self.inner().list().await
    }
    async fn revoke(&self, id: &KeyId, at: UnixMillis) -> Result<bool> {
        self.inner().revoke(id, at).await
    }
    async fn revoked_since(&self, since: UnixMillis) -> Result<Vec<Revocation>> {
        self.inner().revoked_since(since).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner().ping().await
    }
}
