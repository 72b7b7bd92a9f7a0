//! The PostgreSQL store.

use deadpool::Runtime;
use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};

use super::POOL_TIMEOUT;
use crate::error::{KeyError, Result};

type Conn = AsyncPgConnection;

const BACKEND: &str = "postgres";

/// A [`KeyStore`](crate::KeyStore) in PostgreSQL (feature `postgres`), shared by every gateway
/// node using the same database.
///
/// Pure-Rust client (tokio-postgres, no TLS), pooled. The `api_keys` table must exist: run
/// `migrations/postgres` first. Table names are unqualified, so the connection's `search_path`
/// picks the schema (`?options=-c%20search_path%3Dmy_schema` in the URL).
///
/// A database that is down or unreachable fails an operation after about two seconds (pool
/// wait, connect and check timeouts) instead of stalling it.
#[derive(Clone)]
pub struct PostgresKeyStore {
    pool: Pool<Conn>,
}

impl std::fmt::Debug for PostgresKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresKeyStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresKeyStore {
    /// A store on the database at `url` (`postgres://user:password@host:port/db?options=...`),
    /// with at most `pool_size` connections.
    ///
    /// Connections are opened lazily, so this succeeds while the database is down (see
    /// [`ping`](crate::KeyStore::ping)); it fails only on a pool that cannot be built.
    pub fn connect(url: &str, pool_size: usize) -> Result<PostgresKeyStore> {
        let mut config = ManagerConfig::<Conn>::default();
        // No test query per checkout: connections the server closed are dropped by the pool
        // (`is_closed`), and a query failing on a stale one only fails that operation.
        config.recycling_method = RecyclingMethod::Fast;
        let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(url, config);
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| KeyError::backend(BACKEND, e))?;
        Ok(PostgresKeyStore { pool })
    }

    async fn conn(&self) -> Result<Object<Conn>> {
        self.pool
            .get()
            .await
            .map_err(|e| KeyError::backend(BACKEND, e))
    }
}

impl_sql_key_store!(PostgresKeyStore, "postgres");
