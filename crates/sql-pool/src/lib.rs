//! # sql-pool
//!
//! The pooled async SQL connections (diesel-async + deadpool) shared by Tollgate's SQL stores:
//! the response cache, the key store and the quota counters. One place for how a pool is
//! opened, sized and timed out, per backend:
//!
//! * [`sqlite`] (feature `sqlite`): a bundled libsqlite3 behind diesel-async's
//!   `SyncConnectionWrapper`. SQLite calls block, so each runs on a blocking thread.
//!   diesel-async's default wrapper ties a connection to the tokio runtime that opened it; a
//!   connection opened on a runtime that later stops (an actix-web worker at shutdown, or one
//!   restarted after a panic) fails every later query with "task was cancelled", and
//!   cancelling a query on a current-thread runtime panics. Here the blocking work of every
//!   connection runs on one process-wide pool of threads ([`sqlite::Blocking`]) instead,
//!   whatever runtime the caller is on, and dropping a query's future waits for the query
//!   (without `block_in_place`), so a connection is never handed on mid-query.
//! * [`postgres`] (feature `postgres`): diesel-async's pure-Rust client (tokio-postgres, no
//!   libpq, no TLS).
//!
//! Connections open lazily: a pool is built while its database is down, and an operation on it
//! fails after the pool's timeout instead of stalling.
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel_async::SimpleAsyncConnection;
//! let pool = sql_pool::sqlite::connect(
//!     "sqlite::memory:",
//!     4,
//!     &["CREATE TABLE t (x INTEGER)"],
//!     std::time::Duration::from_secs(2),
//! )?;
//! pool.get().await?.batch_execute("INSERT INTO t VALUES (1)").await?;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "sqlite"))]
//! # fn main() {}
//! ```

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// Errors opening a pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The URL names no database.
    #[error("no database path in {0:?}")]
    NoPath(String),
    /// The pool could not be built.
    #[error("building the connection pool: {0}")]
    Build(String),
}

/// A pool of at most `max_size` connections from `manager`; `timeout` bounds waiting for,
/// opening and recycling one.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn build<M: deadpool::managed::Manager>(
    manager: M,
    max_size: usize,
    timeout: std::time::Duration,
) -> Result<deadpool::managed::Pool<M>, PoolError> {
    deadpool::managed::Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(|e| PoolError::Build(e.to_string()))
}

/// A query that the connection keeps prepared, where diesel would parse it again on every call.
///
/// diesel refuses to keep some statements prepared, among them every `INSERT … ON CONFLICT DO
/// UPDATE`: their SQL text may differ from one call to the next (a changeset with `None` fields
/// leaves them out). Wrapped in this, the statement is cached under its SQL text, never under its
/// Rust type, so a different text is a different cached statement and reusing one is always
/// right: only the parse (and, for PostgreSQL, the plan) on every call goes away.
///
/// Do not wrap a query whose text embeds values (a `sql_query` with literals): the connection
/// would keep every distinct text.
///
/// With diesel's **sync** API, run the wrapped statement with `load` or `get_result` (a write
/// with `RETURNING`), not `execute`: `execute` hands the connection a reference to the query,
/// and diesel's `QueryFragment for &T` does not pass this type's answer on, so the statement
/// would be parsed on every call after all. diesel-async's `execute` is fine.
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use diesel::prelude::*;
/// use diesel::upsert::excluded;
/// use diesel_async::RunQueryDsl;
/// diesel::table! { counters (name) { name -> Text, n -> BigInt, } }
///
/// let pool = sql_pool::sqlite::connect(
///     "sqlite::memory:",
///     1,
///     &["CREATE TABLE counters (name TEXT PRIMARY KEY, n BIGINT NOT NULL)"],
///     std::time::Duration::from_secs(2),
/// )?;
/// let mut conn = pool.get().await?;
/// for _ in 0..3 {
///     let upsert = diesel::insert_into(counters::table)
///         .values((counters::name.eq("hits"), counters::n.eq(1_i64)))
///         .on_conflict(counters::name)
///         .do_update()
///         .set(counters::n.eq(counters::n + excluded(counters::n)));
///     sql_pool::KeepPrepared(upsert).execute(&mut conn).await?;
/// }
/// let n: i64 = counters::table.select(counters::n).first(&mut conn).await?;
/// assert_eq!(n, 3);
/// # Ok(())
/// # }
/// # #[cfg(not(feature = "sqlite"))]
/// # fn main() {}
/// ```
#[derive(Debug, Clone, Copy)]
pub struct KeepPrepared<Q>(pub Q);

impl<Q> diesel::query_builder::QueryId for KeepPrepared<Q> {
    type QueryId = ();
    // No static id: the statement cache keys this query by its SQL text.
    const HAS_STATIC_QUERY_ID: bool = false;
}

/// A query wrapper's diesel traits: run by `RunQueryDsl` (diesel's sync `load`/`get_result`,
/// see [`KeepPrepared`] for why not `execute`), the wrapped query's SQL, and always safe to
/// keep prepared. Arguments: the type, its type parameters (the query's named `Q`), and the
/// field holding the query.
macro_rules! kept_prepared_query {
    ($name:ident<$($param:ident),+>, $field:tt) => {
        impl<$($param,)+ Conn> diesel::query_dsl::RunQueryDsl<Conn> for $name<$($param),+> {}

        impl<DB, $($param),+> diesel::query_builder::QueryFragment<DB> for $name<$($param),+>
        where
            DB: diesel::backend::Backend,
            Q: diesel::query_builder::QueryFragment<DB>,
        {
            fn walk_ast<'b>(
                &'b self,
                pass: diesel::query_builder::AstPass<'_, 'b, DB>,
            ) -> diesel::QueryResult<()> {
                self.$field.walk_ast(pass)
            }

            fn is_safe_to_cache_prepared(&self, _backend: &DB) -> diesel::QueryResult<bool> {
                Ok(true)
            }
        }

        impl<$($param),+> diesel::query_builder::Query for $name<$($param),+>
        where
            Q: diesel::query_builder::Query,
        {
            type SqlType = Q::SqlType;
        }
    };
}

kept_prepared_query!(KeepPrepared<Q>, 0);

/// [`KeepPrepared`] for a statement whose SQL text its Rust type fixes, found in the statement
/// cache by the type `Id` (which the caller names for this one statement) instead of by its
/// rendered text: a call no longer renders the statement only to look it up. (For the cache's
/// upsert, which quotes every column name twice, that rendering was about 11% of the
/// instructions of a whole gateway cache miss, measured with callgrind.)
///
/// Every statement run under one `Id` must render the same SQL: one row of fixed columns, no
/// `IN` lists, no `Option` fields in a changeset. When in doubt, use [`KeepPrepared`].
/// The same rule as [`KeepPrepared`] for diesel's sync API: `get_result` or `load`, not
/// `execute`.
pub struct KeepPreparedAs<Id, Q> {
    query: Q,
    id: std::marker::PhantomData<fn() -> Id>,
}

impl<Id, Q> KeepPreparedAs<Id, Q> {
    /// Wraps `query`, cached under `Id`.
    pub fn new(query: Q) -> Self {
        KeepPreparedAs {
            query,
            id: std::marker::PhantomData,
        }
    }
}

impl<Id: 'static, Q> diesel::query_builder::QueryId for KeepPreparedAs<Id, Q> {
    type QueryId = Id;
    const HAS_STATIC_QUERY_ID: bool = true;
}

kept_prepared_query!(KeepPreparedAs<Id, Q>, query);

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use diesel::connection::{Instrumentation, InstrumentationEvent};
    use diesel::prelude::*;
    use diesel::upsert::excluded;
    use diesel_async::{AsyncConnection, RunQueryDsl};

    use super::{KeepPrepared, KeepPreparedAs};

    diesel::table! { counters (name) { name -> Text, n -> BigInt, } }

    const SCHEMA: &str = "CREATE TABLE counters (name TEXT PRIMARY KEY, n BIGINT NOT NULL)";

    /// Adds one to the `hits` counter: an upsert diesel will not keep prepared.
    macro_rules! upsert {
        () => {
            diesel::insert_into(counters::table)
                .values((counters::name.eq("hits"), counters::n.eq(1_i64)))
                .on_conflict(counters::name)
                .do_update()
                .set(counters::n.eq(counters::n + excluded(counters::n)))
        };
    }

    /// Counts the statements a connection puts in its prepared-statement cache.
    fn counting(cached: &Arc<AtomicUsize>) -> impl Instrumentation {
        let cached = Arc::clone(cached);
        move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::CacheQuery { .. } = event {
                cached.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    #[tokio::test]
    async fn an_upsert_is_prepared_once_when_wrapped() -> Result<(), Box<dyn std::error::Error>> {
        let pool = crate::sqlite::connect("sqlite::memory:", 1, &[SCHEMA], Duration::from_secs(2))?;
        let mut conn = pool.get().await?;
        let cached = Arc::new(AtomicUsize::new(0));
        conn.set_instrumentation(counting(&cached));
        // diesel on its own never keeps this statement: each call parses it again.
        for _ in 0..3 {
            upsert!().execute(&mut conn).await?;
        }
        // (`AtomicUsize::load` spelled out: diesel-async's `RunQueryDsl::load` covers every type.)
        assert_eq!(AtomicUsize::load(&cached, Ordering::SeqCst), 0);

        // Wrapped, it is prepared and cached once, then reused, with the same effect.
        for _ in 0..3 {
            KeepPrepared(upsert!()).execute(&mut conn).await?;
        }
        assert_eq!(AtomicUsize::load(&cached, Ordering::SeqCst), 1);
        let n: i64 = counters::table
            .select(counters::n)
            .get_result(&mut conn)
            .await?;
        assert_eq!(n, 6);

        // With RETURNING, through `get_result`, as the quota counters use it.
        let total: i64 = KeepPrepared(upsert!().returning(counters::n))
            .get_result(&mut conn)
            .await?;
        assert_eq!(total, 7);
        Ok(())
    }

    /// diesel's sync API: kept prepared when run by `get_result`; `execute` loses the wrapper
    /// (it passes a reference, and `&T` does not forward `is_safe_to_cache_prepared`).
    mod sync {
        use diesel::RunQueryDsl;
        use diesel::connection::SimpleConnection;

        use super::*;

        #[test]
        fn a_wrapped_upsert_run_by_get_result_is_prepared_once()
        -> Result<(), Box<dyn std::error::Error>> {
            let mut conn = SqliteConnection::establish(":memory:")?;
            conn.batch_execute(SCHEMA)?;
            let cached = Arc::new(AtomicUsize::new(0));
            conn.set_instrumentation(counting(&cached));

            for _ in 0..3 {
                KeepPrepared(upsert!()).execute(&mut conn)?;
            }
            assert_eq!(AtomicUsize::load(&cached, Ordering::SeqCst), 0);

            let mut total = 0;
            for _ in 0..3 {
                total =
                    KeepPrepared(upsert!().returning(counters::n)).get_result::<i64>(&mut conn)?;
            }
            assert_eq!(AtomicUsize::load(&cached, Ordering::SeqCst), 1);
            assert_eq!(total, 6);
            Ok(())
        }

        /// Names the `hits` upsert in the statement cache.
        struct HitsUpsert;
        /// Another name for it.
        struct SameSqlOtherName;

        #[test]
        fn an_upsert_keyed_by_type_is_prepared_once_and_found_by_its_type()
        -> Result<(), Box<dyn std::error::Error>> {
            let mut conn = SqliteConnection::establish(":memory:")?;
            conn.batch_execute(SCHEMA)?;
            let cached = Arc::new(AtomicUsize::new(0));
            conn.set_instrumentation(counting(&cached));
            let mut total = 0;
            for _ in 0..3 {
                total = KeepPreparedAs::<HitsUpsert, _>::new(upsert!().returning(counters::n))
                    .get_result::<i64>(&mut conn)?;
            }
            assert_eq!(AtomicUsize::load(&cached, Ordering::SeqCst), 1);
            assert_eq!(total, 3);
            // The cache key is the type, not the text: the same SQL under another name is
            // prepared again (keyed by its text, it would have been found).
            total = KeepPreparedAs::<SameSqlOtherName, _>::new(upsert!().returning(counters::n))
                .get_result::<i64>(&mut conn)?;
            assert_eq!(AtomicUsize::load(&cached, Ordering::SeqCst), 2);
            assert_eq!(total, 4);
            Ok(())
        }
    }
}
