//! The PostgreSQL connection pool.

pub(super) use sql_pool::postgres::Pool;
use sql_pool::postgres::{Conn, Object};

use super::POOL_TIMEOUT;
use crate::error::{RateLimitError, Result};

const BACKEND: &str = "postgres";

/// A pool on the database at `url` (pure-Rust client, no TLS); connections open lazily.
pub(super) fn connect(url: &str, pool_size: usize) -> Result<Pool> {
    sql_pool::postgres::connect(url, pool_size, POOL_TIMEOUT)
        .map_err(|e| RateLimitError::backend(BACKEND, e))
}

pub(super) async fn conn(pool: &Pool) -> Result<Object> {
    pool.get()
        .await
        .map_err(|e| RateLimitError::backend(BACKEND, e))
}

quota_queries!(Conn, "postgres");
