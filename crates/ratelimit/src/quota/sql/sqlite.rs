//! The SQLite connection pool.

pub(super) use sql_pool::sqlite::Pool;
use sql_pool::sqlite::{Conn, Object};

use super::POOL_TIMEOUT;
use crate::error::{RateLimitError, Result};

const BACKEND: &str = "sqlite";

/// The table, for in-memory databases only: nothing but the pool's own connection can reach
/// them to run migrations.
const IN_MEMORY_SCHEMA: &str =
    include_str!("../../../../../migrations/sqlite/2026-11-23-000003_quota_counters/up.sql");

/// A pool on the database at `url`: `sqlite://path` (an SQLite URI filename), `sqlite:path`, a
/// bare path, or `sqlite::memory:` / `:memory:` (one private connection, created with the
/// table).
pub(super) fn connect(url: &str, pool_size: usize) -> Result<Pool> {
    sql_pool::sqlite::connect(url, pool_size, &[IN_MEMORY_SCHEMA], POOL_TIMEOUT).map_err(
        |e| match e {
            sql_pool::PoolError::NoPath(_) => RateLimitError::InvalidArgument(e.to_string()),
            e => RateLimitError::backend(BACKEND, e),
        },
    )
}

pub(super) async fn conn(pool: &Pool) -> Result<Object> {
    pool.get()
        .await
        .map_err(|e| RateLimitError::backend(BACKEND, e))
}

quota_queries!(Conn, "sqlite");
