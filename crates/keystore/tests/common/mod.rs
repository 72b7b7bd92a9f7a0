//! Helpers shared by keystore's integration tests: the databases under test, their migrations,
//! a store that can be switched off, and a TCP proxy that can be cut.
//!
//! PostgreSQL comes from `TOLLGATE_TEST_DATABASE_URL` (see [`pg_url_or_skip`]); each test gets a
//! schema of its own ([`PgSchema`]), so tests run in parallel and leave nothing behind.
#![allow(dead_code, clippy::unwrap_used)] // each test crate uses a different part

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keystore::{Digest, KeyError, KeyId, KeyRecord, KeyStore, Result, Revocation, UnixMillis};

/// The environment variable naming the PostgreSQL database tests may use.
pub const PG_URL_ENV: &str = "TOLLGATE_TEST_DATABASE_URL";

/// An instant in 2027, well past the tests' real clocks.
pub const NOW: UnixMillis = 1_800_000_000_000;
/// One second in [`UnixMillis`].
pub const SEC: i64 = 1000;

/// The test PostgreSQL URL from [`PG_URL_ENV`]. When it is unset: panics under CI (env `CI`
/// set), so a misconfigured pipeline cannot pass by skipping; otherwise prints
/// `SKIPPED <what>: TOLLGATE_TEST_DATABASE_URL not set` to stderr (not captured by the test
/// harness) and returns `None`.
pub fn pg_url_or_skip(what: &str) -> Option<String> {
    match std::env::var(PG_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => panic!(
            "\n\n*** {PG_URL_ENV} is not set but CI is: {what} cannot run. \
             Point it at a PostgreSQL database, e.g. postgres://postgres@127.0.0.1:5432/test ***\n"
        ),
        _ => {
            // Straight to stderr, past the test harness's output capture, so a run without a
            // database says plainly what it skipped.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {what}: {PG_URL_ENV} not set");
            None
        }
    }
}

/// `url` with `name=value` added to its query string (`value` must already be percent-encoded).
pub fn with_query_param(url: &str, name: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{name}={value}")
}

/// A local port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// === FlakyStore ===

/// A store in front of another that can be switched off (every call then fails like a dead
/// database) and slowed down, and that counts digest lookups.
pub struct FlakyStore {
    inner: Arc<dyn KeyStore>,
    down: AtomicBool,
    lookups: AtomicUsize,
    delay_ms: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl FlakyStore {
    /// Working, in front of `inner`.
    pub fn new(inner: Arc<dyn KeyStore>) -> Arc<FlakyStore> {
        Arc::new(FlakyStore {
            inner,
            down: AtomicBool::new(false),
            lookups: AtomicUsize::new(0),
            delay_ms: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    /// Switches the store off (`true`) or on.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Makes every digest lookup take `delay` first.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as usize, Ordering::SeqCst);
    }

    /// Digest lookups asked for so far (answered or failed).
    pub fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }

    /// The most digest lookups that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(KeyError::backend("flaky", "connection refused (test)"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl KeyStore for FlakyStore {
    fn name(&self) -> &'static str {
        "flaky"
    }
    async fn insert(&self, record: &KeyRecord) -> Result<()> {
        self.check()?;
        self.inner.insert(record).await
    }
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let now_in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight
            .fetch_max(now_in_flight, Ordering::SeqCst);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        let found = match self.check() {
            Ok(()) => self.inner.find_by_digest(digest).await,
            Err(e) => Err(e),
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        found
    }
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        self.check()?;
        self.inner.get(id).await
    }
    async fn list(&self) -> Result<Vec<KeyRecord>> {
        self.check()?;
        self.inner.list().await
    }
    async fn revoke(&self, id: &KeyId, at: UnixMillis) -> Result<bool> {
        self.check()?;
        self.inner.revoke(id, at).await
    }
    async fn revoked_since(&self, since: UnixMillis) -> Result<Vec<Revocation>> {
        self.check()?;
        self.inner.revoked_since(since).await
    }
    async fn ping(&self) -> Result<()> {
        self.check()?;
        self.inner.ping().await
    }
}

// === TcpProxy ===

/// A TCP forwarder to `target` that can be cut: [`stop`](Self::stop) closes the listener and
/// every forwarded connection, as a database host going away would.
pub struct TcpProxy {
    addr: std::net::SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl TcpProxy {
    /// Listens on a free local port and forwards each connection to `target`.
    pub async fn start(target: String) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let conns = Arc::clone(&connections);
        let acceptor = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns.lock().unwrap().push(task.abort_handle());
            }
        });
        TcpProxy {
            addr,
            acceptor,
            connections,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Closes the listener and every connection.
    pub fn stop(&self) {
        self.acceptor.abort();
        for conn in self.connections.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop();
    }
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

    /// A migrated database file `keys.db` in a fresh temporary directory (kept while the
    /// `TempDir` lives) and its `sqlite://` URL.
    pub fn sqlite_temp_db() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.db");
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

    /// Runs `sql` on the database at `url`.
    pub async fn pg_execute(url: &str, sql: &str) {
        let mut conn = AsyncPgConnection::establish(url)
            .await
            .expect("connect to postgres");
        conn.batch_execute(sql).await.expect("run sql");
    }

    /// `url` with its host and port replaced by `addr` (to go through a [`TcpProxy`](super::TcpProxy)).
    pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
        let mut parsed = url::Url::parse(url).expect("postgres url");
        parsed.set_host(Some(&addr.ip().to_string())).unwrap();
        parsed.set_port(Some(addr.port())).unwrap();
        parsed.to_string()
    }

    /// The `host:port` of a postgres URL.
    pub fn host_port(url: &str) -> String {
        let parsed = url::Url::parse(url).expect("postgres url");
        format!(
            "{}:{}",
            parsed.host_str().unwrap_or("127.0.0.1"),
            parsed.port().unwrap_or(5432)
        )
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
            pg_execute(base_url, &format!("CREATE SCHEMA {name}")).await;
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

        /// Drops the schema now (a database whose tables vanished).
        pub async fn drop_now(&self) {
            pg_execute(
                &self.base_url,
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
            )
            .await;
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
