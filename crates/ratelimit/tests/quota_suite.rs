//! The `QuotaStore` contract: one behaviour suite ([`check_quota_store`]) run against every
//! store: memory, SQL (SQLite file, in-memory SQLite, PostgreSQL) and Redis synced to SQLite or
//! PostgreSQL; then what only persistent stores promise: counters survive a restart, and what a
//! crash can lose.
#![allow(clippy::unwrap_used)]

mod common;

use futures_util::future::join_all;
use ratelimit::{MAX_AMOUNT, MemoryQuotaStore, QuotaDecision, QuotaStore, UnixMillis, Window};

const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;
/// 2026-11-23T00:00:00Z.
const NOV_23: UnixMillis = 1_795_392_000_000;
/// 2026-12-01T00:00:00Z.
const DEC_1: UnixMillis = NOV_23 + 8 * DAY;

async fn consume(
    s: &dyn QuotaStore,
    subject: &str,
    window: Window,
    amount: u64,
    limit: u64,
    now: UnixMillis,
) -> QuotaDecision {
    s.consume(subject, window, amount, limit, now)
        .await
        .unwrap_or_else(|e| panic!("{} consume {subject}: {e}", s.name()))
}

async fn usage(s: &dyn QuotaStore, subject: &str, window: Window, now: UnixMillis) -> u64 {
    s.usage(subject, window, now).await.unwrap()
}

fn decision(allowed: bool, used: u64, limit: u64, reset_at: UnixMillis) -> QuotaDecision {
    QuotaDecision {
        allowed,
        used,
        limit,
        reset_at,
    }
}

/// The behaviour every `QuotaStore` must have. `s` is fresh (no counters).
async fn check_quota_store(s: &dyn QuotaStore) {
    let now = NOV_23 + 10 * HOUR;
    let tomorrow = NOV_23 + DAY;
    let name = s.name();

    // Counting up to the limit, exactly.
    assert_eq!(usage(s, "k1", Window::Day, now).await, 0, "{name}");
    assert_eq!(
        consume(s, "k1", Window::Day, 3, 10, now).await,
        decision(true, 3, 10, tomorrow)
    );
    assert_eq!(
        consume(s, "k1", Window::Day, 7, 10, now).await,
        decision(true, 10, 10, tomorrow)
    );
    // Past it: denied, and a denied amount does not count.
    assert_eq!(
        consume(s, "k1", Window::Day, 1, 10, now).await,
        decision(false, 10, 10, tomorrow)
    );
    assert_eq!(
        consume(s, "k1", Window::Day, 5, 10, now).await,
        decision(false, 10, 10, tomorrow)
    );
    assert_eq!(usage(s, "k1", Window::Day, now).await, 10);
    // Zero asks without counting.
    assert_eq!(
        consume(s, "k1", Window::Day, 0, 10, now).await,
        decision(true, 10, 10, tomorrow)
    );
    assert!(
        !consume(s, "k1", Window::Day, 0, 9, now).await.allowed,
        "over a lowered limit"
    );
    // The limit is the caller's: raised, the counter continues.
    assert_eq!(
        consume(s, "k1", Window::Day, 2, 12, now).await,
        decision(true, 12, 12, tomorrow)
    );
    assert_eq!(
        consume(s, "k1", Window::Day, 1, 12, now).await.remaining(),
        0
    );

    // Windows and subjects are independent.
    assert_eq!(usage(s, "k1", Window::Month, now).await, 0);
    assert_eq!(
        consume(s, "k1", Window::Month, 4, 100, now).await,
        decision(true, 4, 100, DEC_1)
    );
    assert_eq!(
        consume(s, "k2", Window::Day, 1, 1, now).await,
        decision(true, 1, 1, tomorrow)
    );
    assert_eq!(usage(s, "k1", Window::Day, now).await, 12);

    // A new day starts from zero; yesterday keeps its count; the month goes on.
    let later = tomorrow + HOUR;
    assert_eq!(
        consume(s, "k1", Window::Day, 1, 12, later).await,
        decision(true, 1, 12, tomorrow + DAY)
    );
    assert_eq!(usage(s, "k1", Window::Day, now).await, 12);
    assert_eq!(consume(s, "k1", Window::Month, 1, 100, later).await.used, 5);

    // Spend budgets in micro-units: large amounts, exact.
    let budget = 5_000_000_000; // 5000.00 in micro-units
    assert!(
        consume(s, "spend", Window::Month, 1_999_999_999, budget, now)
            .await
            .allowed
    );
    assert!(
        consume(s, "spend", Window::Month, 1_999_999_999, budget, now)
            .await
            .allowed
    );
    let d = consume(s, "spend", Window::Month, 1_000_000_003, budget, now).await;
    assert_eq!(d, decision(false, 3_999_999_998, budget, DEC_1));
    assert_eq!(d.remaining(), 1_000_000_002);
    // Limits above MAX_AMOUNT act as MAX_AMOUNT, in every store.
    assert!(
        !consume(s, "huge", Window::Day, MAX_AMOUNT + 1, u64::MAX, now)
            .await
            .allowed
    );
    let d = consume(s, "huge", Window::Day, MAX_AMOUNT, u64::MAX, now).await;
    assert_eq!(d, decision(true, MAX_AMOUNT, u64::MAX, tomorrow));
    assert!(
        !consume(s, "huge", Window::Day, 1, u64::MAX, now)
            .await
            .allowed
    );

    // Subjects are opaque strings.
    for subject in ["key:with:colons", "ünïcødé ✓", "a b/c?d"] {
        assert!(consume(s, subject, Window::Day, 2, 2, now).await.allowed);
        assert_eq!(usage(s, subject, Window::Day, now).await, 2, "{subject}");
    }

    // Concurrent consumption is atomic: 50 at once against 20 admit exactly 20.
    let results = join_all((0..50).map(|_| s.consume("concurrent", Window::Day, 1, 20, now))).await;
    let passed = results
        .iter()
        .filter(|r| r.as_ref().unwrap().allowed)
        .count();
    assert_eq!(passed, 20, "{name}");
    assert_eq!(usage(s, "concurrent", Window::Day, now).await, 20);

    s.flush().await.unwrap();
    assert_eq!(
        usage(s, "k1", Window::Day, now).await,
        12,
        "flushing changes nothing"
    );

    // Last (stores may forget windows that ended days before the latest `now` they saw): the
    // last millisecond of November and the first of December are different months.
    assert_eq!(
        consume(s, "k1", Window::Month, 1, 100, DEC_1 - 1)
            .await
            .used,
        6
    );
    let december = consume(s, "k1", Window::Month, 1, 100, DEC_1).await;
    assert_eq!(december, decision(true, 1, 100, DEC_1 + 31 * DAY));
    s.flush().await.unwrap();
}

#[tokio::test]
async fn memory_store_suite() {
    check_quota_store(&MemoryQuotaStore::new()).await;
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql {
    use std::time::{Duration, Instant};

    use super::*;
    use ratelimit::{QuotaDb, SqlQuotaStore};

    /// Counters survive a restart: a store counts and flushes, is dropped; a new one on the
    /// same database continues from where it stopped.
    pub async fn check_restart(url: &str) {
        let now = NOV_23 + HOUR;
        let db = QuotaDb::connect(url, 4).unwrap();
        let first = SqlQuotaStore::new(db.clone());
        assert_eq!(consume(&first, "k", Window::Day, 7, 10, now).await.used, 7);
        assert_eq!(
            consume(&first, "k", Window::Month, 70, 100, now).await.used,
            70
        );
        first.flush().await.unwrap();
        assert_eq!(first.pending(), 0);
        drop(first);

        let second = SqlQuotaStore::new(QuotaDb::connect(url, 4).unwrap());
        assert_eq!(usage(&second, "k", Window::Day, now).await, 7);
        assert_eq!(
            consume(&second, "k", Window::Day, 3, 10, now).await.used,
            10
        );
        assert!(!consume(&second, "k", Window::Day, 1, 10, now).await.allowed);
        assert_eq!(
            consume(&second, "k", Window::Month, 1, 100, now).await.used,
            71
        );
        second.flush().await.unwrap();
        assert_eq!(db.stored_usage("k", Window::Day, now).await.unwrap(), 10);
        assert_eq!(db.stored_usage("k", Window::Month, now).await.unwrap(), 71);
    }

    /// What a crash loses: only what was not flushed yet, and the background task flushes
    /// every interval by itself.
    pub async fn check_flush_bound(url: &str) {
        let now = NOV_23 + HOUR;
        let db = QuotaDb::connect(url, 4).unwrap();
        // A store that never flushes by itself, dropped without flush(): a crash.
        let crashed = SqlQuotaStore::with_flush_interval(db.clone(), Duration::from_secs(3600));
        consume(&crashed, "crash", Window::Day, 5, 10, now).await;
        assert_eq!(crashed.pending(), 5);
        drop(crashed);
        assert_eq!(db.stored_usage("crash", Window::Day, now).await.unwrap(), 0);

        // A store flushing every 20 ms: what it counts reaches the database within a few
        // intervals, without flush() (bounded wait for the background task, not for a window).
        let store = SqlQuotaStore::with_flush_interval(db.clone(), Duration::from_millis(20));
        assert_eq!(store.flush_interval(), Duration::from_millis(20));
        consume(&store, "bg", Window::Day, 4, 10, now).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while db.stored_usage("bg", Window::Day, now).await.unwrap() != 4 {
            assert!(Instant::now() < deadline, "the background flush never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.pending(), 0);
    }

    /// Two nodes on one database without Redis: both add their deltas; after a flush each
    /// sees the other's use.
    pub async fn check_two_nodes(url: &str) {
        let now = NOV_23 + HOUR;
        let a = SqlQuotaStore::new(QuotaDb::connect(url, 2).unwrap());
        let b = SqlQuotaStore::new(QuotaDb::connect(url, 2).unwrap());
        consume(&a, "shared", Window::Day, 5, 100, now).await;
        consume(&b, "shared", Window::Day, 3, 100, now).await;
        a.flush().await.unwrap();
        b.flush().await.unwrap();
        assert_eq!(
            a.db()
                .stored_usage("shared", Window::Day, now)
                .await
                .unwrap(),
            8
        );
        assert_eq!(usage(&b, "shared", Window::Day, now).await, 8);
        a.flush().await.unwrap();
        // `a` learns b's use on its next flush with a delta of its own.
        consume(&a, "shared", Window::Day, 1, 100, now).await;
        a.flush().await.unwrap();
        assert_eq!(usage(&a, "shared", Window::Day, now).await, 9);
    }

    #[cfg(feature = "sqlite")]
    mod sqlite {
        use super::*;
        use crate::common::sqlite_temp_db;

        #[tokio::test]
        async fn sqlite_store_suite() {
            let (_dir, url) = sqlite_temp_db();
            let store = SqlQuotaStore::new(QuotaDb::sqlite(&url, 4).unwrap());
            check_quota_store(&store).await;
        }

        #[tokio::test]
        async fn in_memory_sqlite_store_suite() {
            let store = SqlQuotaStore::new(QuotaDb::connect("sqlite::memory:", 4).unwrap());
            assert_eq!(store.name(), "sqlite");
            check_quota_store(&store).await;
        }

        #[tokio::test]
        async fn sqlite_counters_survive_a_restart() {
            let (_dir, url) = sqlite_temp_db();
            check_restart(&url).await;
        }

        #[tokio::test]
        async fn sqlite_crash_loses_at_most_one_flush_interval() {
            let (_dir, url) = sqlite_temp_db();
            check_flush_bound(&url).await;
        }

        #[tokio::test]
        async fn sqlite_two_nodes() {
            let (_dir, url) = sqlite_temp_db();
            check_two_nodes(&url).await;
        }

        /// A database that fails keeps the deltas for the next flush.
        #[tokio::test]
        async fn failed_flush_keeps_deltas() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("unmigrated.db");
            let url = format!("sqlite://{}", path.display());
            std::fs::File::create(&path).unwrap();
            let store = SqlQuotaStore::with_flush_interval(
                QuotaDb::sqlite(&url, 1).unwrap(),
                Duration::from_secs(3600),
            );
            // No table: the first use cannot read the stored total; it is counted in memory
            // from zero, to be written once the database works. An ask (0) is not counted.
            assert!(
                store
                    .consume("k", Window::Day, 0, 10, NOV_23)
                    .await
                    .unwrap_err()
                    .is_retryable()
            );
            consume(&store, "k", Window::Day, 1, 10, NOV_23).await;
            assert_eq!((store.pending(), store.dropped()), (1, 0));
            // Create the table, count, then break the table and flush.
            crate::common::migrate_sqlite(&path);
            consume(&store, "k", Window::Day, 3, 10, NOV_23).await;
            {
                use diesel::{Connection, RunQueryDsl, SqliteConnection};
                let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
                diesel::sql_query("ALTER TABLE quota_counters RENAME TO moved")
                    .execute(&mut conn)
                    .unwrap();
            }
            assert!(store.flush().await.is_err());
            assert_eq!(store.pending(), 4);
            consume(&store, "k", Window::Day, 1, 10, NOV_23).await;
            {
                use diesel::{Connection, RunQueryDsl, SqliteConnection};
                let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
                diesel::sql_query("ALTER TABLE moved RENAME TO quota_counters")
                    .execute(&mut conn)
                    .unwrap();
            }
            store.flush().await.unwrap();
            assert_eq!(store.pending(), 0);
            assert_eq!(
                store
                    .db()
                    .stored_usage("k", Window::Day, NOV_23)
                    .await
                    .unwrap(),
                5
            );
        }
    }

    #[cfg(feature = "postgres")]
    mod postgres {
        use super::*;
        use crate::common::{PgSchema, pg_url_or_skip};

        #[tokio::test]
        async fn postgres_store_suite() {
            let Some(base) = pg_url_or_skip("postgres quota store suite") else {
                return;
            };
            let schema = PgSchema::create_migrated(&base).await;
            let store = SqlQuotaStore::new(QuotaDb::postgres(schema.url(), 4).unwrap());
            assert_eq!(store.name(), "postgres");
            check_quota_store(&store).await;
        }

        #[tokio::test]
        async fn postgres_counters_survive_a_restart() {
            let Some(base) = pg_url_or_skip("postgres quota restart") else {
                return;
            };
            let schema = PgSchema::create_migrated(&base).await;
            check_restart(schema.url()).await;
            check_flush_bound(schema.url()).await;
            check_two_nodes(schema.url()).await;
        }
    }
}

#[cfg(all(feature = "redis", any(feature = "sqlite", feature = "postgres")))]
mod redis {
    use super::*;
    use crate::common::{live_now, random_prefix, redis_options, redis_url_or_skip};
    use deadpool_redis::redis::AsyncCommands;
    use ratelimit::{QuotaDb, RedisBackend, RedisQuotaOptions, RedisQuotaStore};

    fn store(redis_url: &str, db: &QuotaDb, prefix: &str) -> RedisQuotaStore {
        let backend = RedisBackend::connect(redis_options(redis_url)).unwrap();
        let mut options = RedisQuotaOptions::default();
        options.prefix = prefix.to_owned();
        RedisQuotaStore::new(backend, db.clone(), options)
    }

    /// Counters survive a restart of the gateway (same Redis), and a Redis that lost them (the
    /// keys deleted, as after a restart without persistence) is seeded back from SQL.
    async fn check_restart(redis_url: &str, db: &QuotaDb) {
        let prefix = random_prefix();
        let now = live_now();
        let first = store(redis_url, db, &prefix);
        assert_eq!(consume(&first, "k", Window::Day, 7, 10, now).await.used, 7);
        first.flush().await.unwrap();
        assert_eq!(db.stored_usage("k", Window::Day, now).await.unwrap(), 7);
        drop(first);

        let second = store(redis_url, db, &prefix);
        assert_eq!(usage(&second, "k", Window::Day, now).await, 7);
        assert_eq!(consume(&second, "k", Window::Day, 2, 10, now).await.used, 9);
        second.flush().await.unwrap();
        assert_eq!(db.stored_usage("k", Window::Day, now).await.unwrap(), 9);
        // A sync with nothing new writes nothing twice.
        second.flush().await.unwrap();
        assert_eq!(db.stored_usage("k", Window::Day, now).await.unwrap(), 9);

        // Redis loses everything under the prefix.
        let client = deadpool_redis::redis::Client::open(redis_url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = conn.keys(format!("{prefix}*")).await.unwrap();
        assert!(!keys.is_empty());
        let _: () = conn.del(keys).await.unwrap();
        assert_eq!(usage(&second, "k", Window::Day, now).await, 9, "from SQL");
        assert_eq!(
            consume(&second, "k", Window::Day, 1, 10, now).await.used,
            10,
            "seeded"
        );
        assert!(!consume(&second, "k", Window::Day, 1, 10, now).await.allowed);
        second.flush().await.unwrap();
        assert_eq!(db.stored_usage("k", Window::Day, now).await.unwrap(), 10);
    }

    /// Four nodes with pools of their own: exact together, and every node's increments are
    /// synced exactly once whichever node syncs.
    async fn check_four_nodes(redis_url: &str, db: &QuotaDb) {
        let prefix = random_prefix();
        let now = live_now();
        let nodes: Vec<RedisQuotaStore> = (0..4).map(|_| store(redis_url, db, &prefix)).collect();
        let results =
            join_all((0..200).map(|i| nodes[i % 4].consume("acct", Window::Month, 1, 50, now)))
                .await;
        let passed = results
            .iter()
            .filter(|r| r.as_ref().unwrap().allowed)
            .count();
        assert_eq!(passed, 50);
        join_all(nodes.iter().map(|n| n.flush()))
            .await
            .into_iter()
            .for_each(|r| r.unwrap());
        assert_eq!(
            db.stored_usage("acct", Window::Month, now).await.unwrap(),
            50
        );
    }

    #[cfg(feature = "sqlite")]
    mod with_sqlite {
        use super::*;
        use crate::common::sqlite_temp_db;

        #[tokio::test]
        async fn redis_sqlite_store_suite() {
            let Some(redis_url) = redis_url_or_skip("redis+sqlite quota store suite") else {
                return;
            };
            let (_dir, url) = sqlite_temp_db();
            let db = QuotaDb::sqlite(&url, 4).unwrap();
            let store = store(&redis_url, &db, &random_prefix());
            check_quota_store(&store).await;
            // Everything counted reached SQL, exactly.
            let now = NOV_23 + 10 * HOUR;
            assert_eq!(db.stored_usage("k1", Window::Day, now).await.unwrap(), 12);
            assert_eq!(
                db.stored_usage("concurrent", Window::Day, now)
                    .await
                    .unwrap(),
                20
            );
            assert_eq!(
                db.stored_usage("spend", Window::Month, now).await.unwrap(),
                3_999_999_998
            );
        }

        /// The key's rate limit and its quotas in one call: counted as the two calls one by
        /// one would, nothing done while a counter still needs its seed from SQL.
        #[tokio::test]
        async fn rate_limit_and_quotas_in_one_call() {
            use ratelimit::{Limit, QuotaCharge, RateLimiter, RedisLimiter};
            let Some(redis_url) = redis_url_or_skip("redis rate limit + quotas in one call") else {
                return;
            };
            let (_dir, url) = sqlite_temp_db();
            let db = QuotaDb::sqlite(&url, 2).unwrap();
            let prefix = random_prefix();
            let store = store(&redis_url, &db, &prefix);
            let limiter =
                RedisLimiter::new(store.redis().clone()).with_prefix(format!("{prefix}rl:"));
            let now = live_now();
            let limit = Limit::new(2, std::time::Duration::from_secs(60));
            let charge = |window, limit| QuotaCharge {
                subject: "k",
                window,
                amount: 1,
                limit,
            };
            let quotas = [charge(Window::Day, 2), charge(Window::Month, 100)];
            let both = || store.consume_rate_limited(&limiter, "k", &limit, 1, &quotas, now);

            // Counters not in Redis yet: nothing is done (a plain consume seeds them).
            assert!(both().await.unwrap().is_none());
            consume(&store, "k", Window::Day, 1, 2, now).await;
            consume(&store, "k", Window::Month, 1, 100, now).await;

            // One call: the rate limit charged, both quotas counted.
            let r = both().await.unwrap().expect("counters in Redis");
            assert!(r.rate.allowed);
            assert_eq!(r.rate.remaining, 1);
            let counted: Vec<(bool, u64)> = r.quotas.iter().map(|q| (q.allowed, q.used)).collect();
            assert_eq!(counted, [(true, 2), (true, 2)]);

            // The daily quota is used up: refused there, the monthly one not tried.
            let r = both().await.unwrap().unwrap();
            assert!(r.rate.allowed);
            let counted: Vec<(bool, u64)> = r.quotas.iter().map(|q| (q.allowed, q.used)).collect();
            assert_eq!(counted, [(false, 2)]);
            assert_eq!(usage(&store, "k", Window::Month, now).await, 2);

            // The rate limit's 2 are spent: refused, no quota touched.
            let r = both().await.unwrap().unwrap();
            assert!(!r.rate.allowed);
            assert!(r.quotas.is_empty());
            assert!(
                !limiter.check("k", &limit, 1).await.unwrap().allowed,
                "same bucket"
            );

            // Synced to SQL like any other count.
            store.flush().await.unwrap();
            assert_eq!(db.stored_usage("k", Window::Day, now).await.unwrap(), 2);
            assert_eq!(db.stored_usage("k", Window::Month, now).await.unwrap(), 2);
        }

        #[tokio::test]
        async fn redis_sqlite_restart() {
            let Some(redis_url) = redis_url_or_skip("redis+sqlite quota restart") else {
                return;
            };
            let (_dir, url) = sqlite_temp_db();
            let db = QuotaDb::sqlite(&url, 4).unwrap();
            check_restart(&redis_url, &db).await;
            check_four_nodes(&redis_url, &db).await;
        }
    }

    #[cfg(feature = "postgres")]
    mod with_postgres {
        use super::*;
        use crate::common::{PgSchema, pg_url_or_skip};

        #[tokio::test]
        async fn redis_postgres_store_suite() {
            let Some(redis_url) = redis_url_or_skip("redis+postgres quota store suite") else {
                return;
            };
            let Some(base) = pg_url_or_skip("redis+postgres quota store suite") else {
                return;
            };
            let schema = PgSchema::create_migrated(&base).await;
            let db = QuotaDb::postgres(schema.url(), 4).unwrap();
            check_quota_store(&store(&redis_url, &db, &random_prefix())).await;
        }

        #[tokio::test]
        async fn redis_postgres_restart() {
            let Some(redis_url) = redis_url_or_skip("redis+postgres quota restart") else {
                return;
            };
            let Some(base) = pg_url_or_skip("redis+postgres quota restart") else {
                return;
            };
            let schema = PgSchema::create_migrated(&base).await;
            let db = QuotaDb::postgres(schema.url(), 4).unwrap();
            check_restart(&redis_url, &db).await;
            check_four_nodes(&redis_url, &db).await;
        }
    }
}
