//! Helpers shared by ratelimit's integration tests: the services under test (Redis, PostgreSQL,
//! SQLite files), their migrations, and a private `redis-server` a test can kill.
//!
//! Redis comes from `TOLLGATE_TEST_REDIS_URL` and PostgreSQL from `TOLLGATE_TEST_DATABASE_URL`
//! ([`redis_url_or_skip`], [`pg_url_or_skip`]). Each test uses a random Redis key prefix
//! ([`random_prefix`]) and a PostgreSQL schema of its own ([`PgSchema`]), so tests run in
//! parallel and leave nothing behind that matters.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)] // each test crate uses a part

/// The environment variable naming the PostgreSQL database tests may use.
pub const PG_URL_ENV: &str = "TOLLGATE_TEST_DATABASE_URL";
/// The environment variable naming the Redis tests may use.
pub const REDIS_URL_ENV: &str = "TOLLGATE_TEST_REDIS_URL";

/// The value of `var`. When it is unset: panics under CI (env `CI` set), so a misconfigured
/// pipeline cannot pass by skipping; otherwise prints `SKIPPED <what>: <var> not set` to stderr
/// and returns `None`.
fn service_url_or_skip(var: &str, what: &str, example: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => panic!(
            "\n\n*** {var} is not set but CI is: {what} cannot run. \
             Point it at a test service, e.g. {example} ***\n"
        ),
        _ => {
            eprintln!("SKIPPED {what}: {var} not set");
            None
        }
    }
}

/// The test PostgreSQL URL (see [`service_url_or_skip`]).
pub fn pg_url_or_skip(what: &str) -> Option<String> {
    service_url_or_skip(PG_URL_ENV, what, "postgres://postgres@127.0.0.1:5432/test")
}

/// The test Redis URL (see [`service_url_or_skip`]).
pub fn redis_url_or_skip(what: &str) -> Option<String> {
    service_url_or_skip(REDIS_URL_ENV, what, "redis://127.0.0.1:6379")
}

/// A key prefix no other test (or run) uses: `t:<uuid>:`.
pub fn random_prefix() -> String {
    format!("t:{}:", uuid::Uuid::new_v4().simple())
}

/// An hour into the current UTC day (Unix ms) by this machine's clock. Redis expires a quota
/// counter at its window's end (plus a day of grace) by its own clock, so a test that reads a
/// counter back from Redis must count in a window that is still open: a fixed date stops
/// working a day after its window closes.
pub fn live_now() -> i64 {
    const DAY: i64 = 86_400_000;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    ms - ms.rem_euclid(DAY) + 3_600_000
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
        let path = dir.path().join("quotas.db");
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
        /// Creates the schema on `base_url`, with the migrations applied in it. [`url`]
        /// connects with `search_path` set to it (checked here).
        ///
        /// [`url`]: Self::url
        pub async fn create_migrated(base_url: &str) -> PgSchema {
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
            migrate_postgres(&schema.url).await;
            schema
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

/// Options for the shared test Redis: the defaults, with 1 s timeouts, so a loaded machine
/// (parallel tests, builds) never turns a slow answer into `Unavailable` in a test about
/// something else. Tests of failing fast set their own.
#[cfg(feature = "redis")]
pub fn redis_options(url: &str) -> ratelimit::RedisOptions {
    let mut options = ratelimit::RedisOptions::new(url);
    options.connect_timeout = std::time::Duration::from_secs(1);
    options.response_timeout = std::time::Duration::from_secs(1);
    options
}

#[cfg(feature = "redis")]
pub use redis_server::*;

#[cfg(feature = "redis")]
mod redis_server {
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A private `redis-server` on a free loopback port, without persistence, killed when
    /// dropped: for tests that take Redis away.
    #[derive(Debug)]
    pub struct RedisServer {
        port: u16,
        child: Option<Child>,
        dir: tempfile::TempDir,
    }

    impl RedisServer {
        /// Starts one. When `redis-server` is not installed: panics under CI, else prints
        /// `SKIPPED <what>: redis-server not installed` and returns `None`.
        pub fn start_or_skip(what: &str) -> Option<RedisServer> {
            let installed = Command::new("redis-server")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !installed {
                if std::env::var_os("CI").is_some() {
                    panic!(
                        "\n\n*** redis-server is not installed but CI is set: {what} cannot run ***\n"
                    );
                }
                eprintln!("SKIPPED {what}: redis-server not installed");
                return None;
            }
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut server = RedisServer {
                port,
                child: None,
                dir: tempfile::tempdir().expect("temp dir"),
            };
            server.restart();
            Some(server)
        }

        /// `redis://127.0.0.1:<port>`.
        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        /// Kills the server (SIGKILL) and waits for it to exit.
        pub fn kill(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
        pub fn pause(&self) {
            self.signal("-STOP");
        }

        /// Thaws a [`pause`](Self::pause)d server (SIGCONT).
        pub fn resume(&self) {
            self.signal("-CONT");
        }

        fn signal(&self, signal: &str) {
            let child = self.child.as_ref().expect("server running");
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {signal} failed");
        }

        /// (Re)starts the server on the same port, empty, and waits until it accepts
        /// connections (at most 10 s).
        pub fn restart(&mut self) {
            self.kill();
            let child = Command::new("redis-server")
                .args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(self.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.kill();
        }
    }
}
