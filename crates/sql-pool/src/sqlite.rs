//! SQLite (feature `sqlite`): [`Conn`] runs its blocking calls on the process-wide [`Blocking`]
//! pool.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use diesel::SqliteConnection;
use diesel_async::pooled_connection::deadpool::Pool as DeadPool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::{SpawnBlocking, SyncConnectionWrapper};
use diesel_async::{AsyncConnection, SimpleAsyncConnection};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::PoolError;

/// An async SQLite connection whose queries run on the [`Blocking`] pool.
pub type Conn = SyncConnectionWrapper<SqliteConnection, Blocking>;

/// A pool of [`Conn`]s.
pub type Pool = DeadPool<Conn>;

/// A connection checked out of a [`Pool`].
pub type Object = diesel_async::pooled_connection::deadpool::Object<Conn>;

/// Run on every new connection: wait for a busy database instead of failing at once, let readers
/// and the writer work concurrently (WAL), and fsync at checkpoints only.
pub const PRAGMAS: &str =
    "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;";

/// Most threads the process-wide pool runs SQLite calls on at once.
const MAX_BLOCKING_THREADS: usize = 64;

/// Runs SQLite's blocking calls on one process-wide thread pool (a tokio runtime of its own,
/// built on first use and kept for the life of the process), so that connections do not depend
/// on the runtime of whoever opened them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Blocking;

fn runtime() -> Result<&'static tokio::runtime::Runtime, &'static str> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(MAX_BLOCKING_THREADS)
                .thread_name("sqlite")
                .build()
                .map_err(|e| format!("starting the SQLite thread pool: {e}"))
        })
        .as_ref()
        .map_err(String::as_str)
}

impl SpawnBlocking for Blocking {
    fn spawn_blocking<'a, R>(
        &mut self,
        task: impl FnOnce() -> R + Send + 'static,
    ) -> BoxFuture<'a, Result<R, Box<dyn StdError + Send + Sync + 'static>>>
    where
        R: Send + 'static,
    {
        match runtime() {
            Ok(rt) => {
                let done = Arc::new(Done::default());
                let signal = DoneGuard(Arc::clone(&done));
                let handle = rt.spawn_blocking(move || {
                    let _signal = signal;
                    task()
                });
                WaitOnDrop { handle, done }
                    .map(|r| r.map_err(|e| Box::new(e) as Box<dyn StdError + Send + Sync>))
                    .boxed()
            }
            Err(e) => futures_util::future::ready(Err(e.into())).boxed(),
        }
    }

    fn get_runtime() -> Self {
        Blocking
    }
}

/// Set when a blocking task has finished (or panicked).
#[derive(Default)]
struct Done {
    finished: Mutex<bool>,
    changed: Condvar,
}

/// Marks its task [`Done`] when dropped, so a panicking task counts as finished too.
struct DoneGuard(Arc<Done>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let mut finished = self
            .0
            .finished
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *finished = true;
        self.0.changed.notify_all();
    }
}

/// A blocking task's result. Dropped before the task has finished (a caller's timeout, a
/// client gone), it waits for the task: the connection must not be handed to the next user
/// while a query still runs on it (diesel-async would panic on its shared transaction state).
/// It waits with a plain condition variable, which works on any runtime flavour; SQLite calls
/// take milliseconds (a busy database at most the 5 s `busy_timeout`).
struct WaitOnDrop<R> {
    handle: tokio::task::JoinHandle<R>,
    done: Arc<Done>,
}

impl<R> Future for WaitOnDrop<R> {
    type Output = Result<R, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.handle).poll(cx)
    }
}

impl<R> Drop for WaitOnDrop<R> {
    fn drop(&mut self) {
        if self.handle.is_finished() {
            return;
        }
        let mut finished = self
            .done
            .finished
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while !*finished {
            finished = self
                .done
                .changed
                .wait(finished)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// What to hand SQLite for `url`, and whether it names an in-memory database: `sqlite://path`
/// (an SQLite URI filename, so `?mode=...` parameters work), `sqlite:path`, a bare path, or
/// `sqlite::memory:` / `sqlite://:memory:` / `:memory:`.
pub fn database_target(url: &str) -> Result<(String, bool), PoolError> {
    let (target, uri) = if let Some(rest) = url.strip_prefix("sqlite://") {
        (rest, true)
    } else if let Some(rest) = url.strip_prefix("sqlite:") {
        (rest, false)
    } else {
        (url, false)
    };
    if target.is_empty() {
        return Err(PoolError::NoPath(url.to_owned()));
    }
    if target == ":memory:" {
        return Ok((":memory:".to_owned(), true));
    }
    // `file:` makes SQLite parse the name as a URI (percent-escapes, `?mode=ro`, ...).
    Ok((
        if uri {
            format!("file:{target}")
        } else {
            target.to_owned()
        },
        false,
    ))
}

/// A pool on the database at `url` (see [`database_target`]) of at most `pool_size`
/// connections, each set up with [`PRAGMAS`]. An in-memory database is private to its one
/// connection (whatever `pool_size`), so nothing else could run migrations on it: it gets
/// `in_memory_schema` (statements run in order) on connect. `timeout` bounds waiting for,
/// opening and recycling a connection.
///
/// Connections are opened lazily, on first use.
pub fn connect(
    url: &str,
    pool_size: usize,
    in_memory_schema: &'static [&'static str],
    timeout: Duration,
) -> Result<Pool, PoolError> {
    connect_with_pragmas(url, pool_size, in_memory_schema, timeout, "")
}

/// [`connect`], each connection then also running `pragmas` (after [`PRAGMAS`]): settings
/// of the connection itself, for a store whose writes need other trade-offs than the
/// defaults'.
pub fn connect_with_pragmas(
    url: &str,
    pool_size: usize,
    in_memory_schema: &'static [&'static str],
    timeout: Duration,
    pragmas: &'static str,
) -> Result<Pool, PoolError> {
    let (target, in_memory) = database_target(url)?;
    let mut config = ManagerConfig::<Conn>::default();
    // A local file does not go away under an idle connection: no test query per checkout.
    config.recycling_method = RecyclingMethod::Fast;
    config.custom_setup = Box::new(move |url| {
        let url = url.to_owned();
        Box::pin(async move {
            let mut conn = Conn::establish(&url).await?;
            let setup = [PRAGMAS, pragmas]
                .into_iter()
                .filter(|sql| !sql.is_empty())
                .chain(in_memory_schema.iter().copied().filter(|_| in_memory));
            for sql in setup {
                conn.batch_execute(sql)
                    .await
                    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            }
            Ok(conn)
        })
    });
    let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(target, config);
    crate::build(
        manager,
        if in_memory { 1 } else { pool_size.max(1) },
        timeout,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::QueryableByName;
    use diesel::sql_types::BigInt;
    use diesel_async::RunQueryDsl;

    #[test]
    fn urls() {
        let t = |u: &str| database_target(u).ok();
        assert_eq!(
            t("sqlite://data/c.db"),
            Some(("file:data/c.db".into(), false))
        );
        assert_eq!(
            t("sqlite:///tmp/c.db"),
            Some(("file:/tmp/c.db".into(), false))
        );
        assert_eq!(t("sqlite:c.db"), Some(("c.db".into(), false)));
        assert_eq!(t("/tmp/c.db"), Some(("/tmp/c.db".into(), false)));
        assert_eq!(t("sqlite::memory:"), Some((":memory:".into(), true)));
        assert_eq!(t("sqlite://:memory:"), Some((":memory:".into(), true)));
        assert_eq!(t(":memory:"), Some((":memory:".into(), true)));
        assert!(matches!(
            database_target("sqlite://"),
            Err(PoolError::NoPath(_))
        ));
        assert!(database_target("").is_err());
    }

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    async fn count(pool: &Pool) -> i64 {
        let mut conn = pool.get().await.expect("a connection");
        diesel::sql_query("SELECT COUNT(*) AS n FROM t")
            .get_result::<Count>(&mut *conn)
            .await
            .expect("counting")
            .n
    }

    /// The bug this crate exists for: a connection opened on a runtime that has since shut
    /// down (an actix-web worker at shutdown) keeps working from another runtime.
    #[test]
    fn a_connection_outlives_the_runtime_that_opened_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/t.db", dir.path().display());
        let pool = connect(&url, 1, &[], Duration::from_secs(2)).expect("pool");
        {
            let first = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            first.block_on(async {
                let mut conn = pool.get().await.expect("a connection");
                conn.batch_execute("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
                    .await
                    .expect("setup");
            });
        } // `first` is dropped here, with the pool's only connection opened on it.
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        assert_eq!(second.block_on(count(&pool)), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_query_does_not_panic_and_the_connection_stays_usable() {
        let pool = connect(
            "sqlite::memory:",
            4,
            &["CREATE TABLE t (x INTEGER)"],
            Duration::from_secs(2),
        )
        .expect("pool");
        {
            let mut conn = pool.get().await.expect("a connection");
            // A query that takes a while (about a second), abandoned after 50 ms.
            let slow = conn.batch_execute(
                "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 3000000) \
                 INSERT INTO t SELECT 1 FROM c WHERE i = 3000000",
            );
            let abandoned = tokio::time::timeout(Duration::from_millis(50), slow).await;
            assert!(
                abandoned.is_err(),
                "the query was not slow enough to abandon"
            );
        }
        // The abandoned query finished on its own thread; the next one waited for it.
        assert_eq!(count(&pool).await, 1);
    }
}
