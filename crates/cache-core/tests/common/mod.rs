//! Helpers shared by cache-core's integration tests: the database under test and its migrations.
//!
//! PostgreSQL comes from `TOLLGATE_TEST_DATABASE_URL` (see [`pg_url_or_skip`]); each test gets a
//! schema of its own ([`PgSchema`]), so tests run in parallel and leave nothing behind.
#![allow(dead_code)] // each test crate uses a different part

/// The environment variable naming the PostgreSQL database tests may use.
pub const PG_URL_ENV: &str = "TOLLGATE_TEST_DATABASE_URL";

/// The test PostgreSQL URL from [`PG_URL_ENV`]. When it is unset: panics under CI (env `CI`
/// set), so a misconfigured pipeline cannot pass by skipping; otherwise prints
/// `SKIPPED <what>: TOLLGATE_TEST_DATABASE_URL not set` to stderr and returns `None`.
pub fn pg_url_or_skip(what: &str) -> Option<String> {
    match std::env::var(PG_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => panic!(
            "\n\n*** {PG_URL_ENV} is not set but CI is: {what} cannot run. \
             Point it at a PostgreSQL database, e.g. postgres://postgres@127.0.0.1:5432/test ***\n"
        ),
        _ => {
            eprintln!("SKIPPED {what}: {PG_URL_ENV} not set");
            None
        }
    }
}

/// `url` with `name=value` added to its query string (`value` must already be percent-encoded).
pub fn with_query_param(url: &str, name: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{name}={value}")
}

#[cfg(feature = "sqlite")]
pub use sqlite::*;

#[cfg(feature = "sqlite")]
mod sqlite {
    use diesel::{Connection, SqliteConnection};
    use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

    /// `migrations/sqlite` of the workspace.
    pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");

    /// Runs the SQLite migrations on the database file at `path` (created if missing).
    pub fn migrate_sqlite(path: &std::path::Path) {
        let path = path.to_str().expect("utf-8 temp path");
        let mut conn = SqliteConnection::establish(path).expect("open sqlite database");
        conn.run_pending_migrations(SQLITE_MIGRATIONS)
            .expect("run sqlite migrations");
    }

    /// A migrated database file in a fresh temporary directory (kept while the `TempDir` lives)
    /// and its `sqlite://` URL.
    pub fn sqlite_temp_db() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cache.db");
        migrate_sqlite(&path);
        let url = format!("sqlite://{}", path.display());
        (dir, url)
    }
}

#[cfg(feature = "postgres")]
pub use postgres::*;

#[cfg(feature = "postgres")]
mod postgres {
    use diesel::Connection;
    use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
    use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

    use super::with_query_param;

    /// `migrations/postgres` of the workspace.
    pub const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");

    /// Runs the PostgreSQL migrations on `url`, through diesel's sync harness on a blocking
    /// thread (diesel-async's own harness panics on a current-thread runtime).
    pub async fn migrate_postgres(url: &str) {
        let url = url.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut conn =
                <AsyncConnectionWrapper<AsyncPgConnection> as Connection>::establish(&url)
                    .expect("connect to postgres for migrations");
            conn.run_pending_migrations(PG_MIGRATIONS)
                .expect("run postgres migrations");
        })
        .await
        .expect("migration task");
    }

    /// A schema of one test's own, `t_<uuid>`, dropped (with everything in it) when this value
    /// is dropped, even if the test panicked.
    #[derive(Debug)]
    pub struct PgSchema {
        base_url: String,
        name: String,
        url: String,
    }

    impl PgSchema {
        /// Creates the schema on the database at `base_url`. [`url`](Self::url) connects with
        /// `search_path` set to it (checked here).
        pub async fn create(base_url: &str) -> PgSchema {
            let name = format!("t_{}", uuid::Uuid::new_v4().simple());
            let mut admin = AsyncPgConnection::establish(base_url)
                .await
                .expect("connect to TOLLGATE_TEST_DATABASE_URL");
            admin
                .batch_execute(&format!("CREATE SCHEMA {name}"))
                .await
                .expect("create test schema");
            let url = with_query_param(base_url, "options", &format!("-c%20search_path%3D{name}"));
            let schema = PgSchema {
                base_url: base_url.to_owned(),
                name,
                url,
            };
            let mut conn = AsyncPgConnection::establish(&schema.url)
                .await
                .expect("connect with search_path");
            let current: String = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
                "current_schema()",
            ))
            .get_result(&mut conn)
            .await
            .expect("current_schema()");
            assert_eq!(
                current, schema.name,
                "search_path in the URL did not take effect"
            );
            schema
        }

        /// [`create`](Self::create), then the migrations in it.
        pub async fn create_migrated(base_url: &str) -> PgSchema {
            let schema = Self::create(base_url).await;
            migrate_postgres(&schema.url).await;
            schema
        }

        /// The schema's name.
        pub fn name(&self) -> &str {
            &self.name
        }

        /// The database URL with `search_path` set to this schema.
        pub fn url(&self) -> &str {
            &self.url
        }
    }

    impl Drop for PgSchema {
        fn drop(&mut self) {
            // Best effort, on a thread of its own: Drop cannot await, and may run inside a
            // runtime (which cannot block on another).
            let base_url = self.base_url.clone();
            let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let mut conn = AsyncPgConnection::establish(&base_url).await.ok()?;
                    conn.batch_execute(&sql).await.ok()
                })
            })
            .join();
            if !matches!(dropped, Ok(Some(()))) {
                eprintln!("warning: could not drop test schema {}", self.name);
            }
        }
    }
}
