//! PostgreSQL (feature `postgres`): diesel-async's pure-Rust client, pooled.

use std::time::Duration;

use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::deadpool::Pool as DeadPool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};

use crate::PoolError;

/// A PostgreSQL connection.
pub type Conn = AsyncPgConnection;

/// A pool of [`Conn`]s.
pub type Pool = DeadPool<Conn>;

/// A connection checked out of a [`Pool`].
pub type Object = diesel_async::pooled_connection::deadpool::Object<Conn>;

/// A pool on the database at `url` (`postgres://user:password@host:port/db?options=...`; the
/// connection's `search_path`, e.g. `?options=-c%20search_path%3Dmy_schema`, picks the schema)
/// of at most `pool_size` connections. `timeout` bounds waiting for, opening and recycling a
/// connection, so a database that is down fails an operation after about that long.
///
/// Connections open lazily: this succeeds while the database is down.
pub fn connect(url: &str, pool_size: usize, timeout: Duration) -> Result<Pool, PoolError> {
    let mut config = ManagerConfig::<Conn>::default();
    // No test query per checkout: connections the server closed are dropped by the pool
    // (`is_closed`), and a query failing on a stale one only fails that operation.
    config.recycling_method = RecyclingMethod::Fast;
    let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(url, config);
    crate::build(manager, pool_size.max(1), timeout)
}
