//! The PostgreSQL connection pool.

use deadpool::Runtime;
use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::deadpool::{Object, Pool as DeadPool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};

use super::POOL_TIMEOUT;
use crate::error::{RateLimitError, Result};

type Conn = AsyncPgConnection;

pub(super) type Pool = DeadPool<Conn>;

const BACKEND: &str = "postgres";

/// A pool on the database at `url` (pure-Rust client, no TLS); connections open lazily.
pub(super) fn connect(url: &str, pool_size: usize) -> Result<Pool> {
    let mut config = ManagerConfig::<Conn>::default();
    // No test query per checkout: closed connections are dropped by the pool, and a query
    // failing on a stale one only fails that operation (its deltas are retried).
    config.recycling_method = RecyclingMethod::Fast;
    let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(url, config);
    DeadPool::builder(manager)
        .max_size(pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(POOL_TIMEOUT))
        .recycle_timeout(Some(POOL_TIMEOUT))
        .build()
        .map_err(|e| RateLimitError::backend(BACKEND, e))
}

pub(super) async fn conn(pool: &Pool) -> Result<Object<Conn>> {
    pool.get()
        .await
        .map_err(|e| RateLimitError::backend(BACKEND, e))
}

quota_queries!(Conn, "postgres");
