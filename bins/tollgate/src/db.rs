//! The configured database: which engine, its migrations, and the cache's L2 store on it.

use std::sync::Arc;

use anyhow::{Context, bail};
use cache_core::CacheStore;
use diesel::Connection;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

/// SQLite migrations, compiled into the binary.
pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");
/// PostgreSQL migrations, compiled into the binary.
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");

/// A `storage.database_url`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file (created if missing).
    Sqlite { url: String, path: String },
    /// A PostgreSQL server.
    Postgres { url: String },
}

impl Database {
    pub fn parse(url: &str) -> anyhow::Result<Database> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                bail!(
                    "storage.database_url: sqlite:// needs a file path, e.g. sqlite://tollgate.db"
                );
            }
            return Ok(Database::Sqlite {
                url: url.to_string(),
                path: path.to_string(),
            });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Database::Postgres {
                url: url.to_string(),
            });
        }
        bail!("storage.database_url: {url:?} is neither sqlite://FILE nor postgres://...")
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Database::Sqlite { .. } => "sqlite",
            Database::Postgres { .. } => "postgres",
        }
    }

    /// Applies pending migrations; the versions applied. Blocking: call it outside any async
    /// runtime or inside `spawn_blocking`.
    pub fn migrate(&self) -> anyhow::Result<Vec<String>> {
        match self {
            Database::Sqlite { path, .. } => {
                if let Some(dir) = std::path::Path::new(path).parent()
                    && !dir.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating directory {}", dir.display()))?;
                }
                apply(&mut open_sqlite(path)?, SQLITE_MIGRATIONS)
            }
            Database::Postgres { url } => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?;
                let url = url.clone();
                rt.block_on(async move {
                    tokio::task::spawn_blocking(move || {
                        let mut conn =
                            diesel_async::async_connection_wrapper::AsyncConnectionWrapper::<
                                diesel_async::AsyncPgConnection,
                            >::establish(&url)
                            .context("connecting to PostgreSQL")?;
                        apply(&mut conn, POSTGRES_MIGRATIONS)
                    })
                    .await?
                })
            }
        }
    }

    /// Migrations not yet applied. Blocking, like [`migrate`](Self::migrate).
    pub fn pending(&self) -> anyhow::Result<Vec<String>> {
        match self {
            Database::Sqlite { path, .. } => pending(&mut open_sqlite(path)?, SQLITE_MIGRATIONS),
            Database::Postgres { url } => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?;
                let url = url.clone();
                rt.block_on(async move {
                    tokio::task::spawn_blocking(move || {
                        let mut conn =
                            diesel_async::async_connection_wrapper::AsyncConnectionWrapper::<
                                diesel_async::AsyncPgConnection,
                            >::establish(&url)
                            .context("connecting to PostgreSQL")?;
                        pending(&mut conn, POSTGRES_MIGRATIONS)
                    })
                    .await?
                })
            }
        }
    }

    /// The cache's L2 store on this database.
    pub fn cache_store(&self, pool_size: usize) -> anyhow::Result<Arc<dyn CacheStore>> {
        Ok(match self {
            Database::Sqlite { url, .. } => Arc::new(
                cache_core::SqliteStore::connect(url, pool_size)
                    .context("opening the SQLite cache store")?,
            ),
            Database::Postgres { url } => Arc::new(
                cache_core::PostgresStore::connect(url, pool_size)
                    .context("opening the PostgreSQL cache store")?,
            ),
        })
    }
}

fn apply<C>(conn: &mut C, migrations: EmbeddedMigrations) -> anyhow::Result<Vec<String>>
where
    C: MigrationHarness<C::Backend> + Connection,
{
    let done = conn
        .run_pending_migrations(migrations)
        .map_err(|e| anyhow::anyhow!("applying migrations: {e}"))?;
    Ok(done.iter().map(ToString::to_string).collect())
}

/// The SQLite file at `path`, set up as the stores' pools set up theirs: above all, a
/// database another process is writing (a running gateway) is waited for, not "locked".
fn open_sqlite(path: &str) -> anyhow::Result<diesel::SqliteConnection> {
    use diesel::connection::SimpleConnection;
    let mut conn = diesel::SqliteConnection::establish(path)
        .with_context(|| format!("opening SQLite database {path}"))?;
    conn.batch_execute(sql_pool::sqlite::PRAGMAS)
        .with_context(|| format!("setting up SQLite database {path}"))?;
    Ok(conn)
}

fn pending<C>(conn: &mut C, migrations: EmbeddedMigrations) -> anyhow::Result<Vec<String>>
where
    C: MigrationHarness<C::Backend> + Connection,
{
    let p = conn
        .pending_migrations(migrations)
        .map_err(|e| anyhow::anyhow!("reading migration state: {e}"))?;
    Ok(p.iter().map(|m| m.name().to_string()).collect())
}
