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
