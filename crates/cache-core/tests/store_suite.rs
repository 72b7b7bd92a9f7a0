//! The `CacheStore` contract, one behaviour suite ([`check_store`]) run against every backend:
//! memory, tiered (memory + SQLite), SQLite and PostgreSQL (`TOLLGATE_TEST_DATABASE_URL`), plus
//! what only some backends promise (restarts, promotion into L1, corrupt rows, dead databases).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use cache_core::{CacheKey, CacheStore, Entry, MemoryStore, PurgeFilter, UnixMillis};

/// An instant well past anything the tests' real clocks show, so memory stores built on a
/// `ManualClock` standing here expire nothing on their own during a test.
const NOW: UnixMillis = 1_800_000_000_000;
const SEC: i64 = 1000;

/// An entry for `signature`, useful until `expires_at`.
fn entry(signature: &str, upstream: &str, route: &str, expires_at: UnixMillis) -> Entry {
    Entry {
        signature: signature.to_owned(),
        upstream: upstream.to_owned(),
        route: route.to_owned(),
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(format!("{{\"sig\":\"{signature}\"}}")),
        stored_at: NOW - 5 * SEC,
        fresh_until: expires_at - 20 * SEC,
        stale_while_revalidate_until: expires_at - 10 * SEC,
        stale_if_error_until: expires_at,
        cost: 0.25,
        prepared: Default::default(),
    }
}

/// An entry exercising every field: odd headers, a binary body with every byte value, distinct
/// timestamps up to `i64::MAX`, a cost that is not a short decimal.
fn full_entry(signature: &str) -> Entry {
    let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    Entry {
        signature: signature.to_owned(),
        upstream: "rentcast".into(),
        route: "/v1/properties/{id}".into(),
        status: 203,
        headers: vec![
            ("content-type".into(), "application/octet-stream".into()),
            ("x-unicode".into(), "héllo ✓ 日本".into()),
            ("x-quotes".into(), "a\"b\\c,[\"d\"]".into()),
            ("x-empty".into(), String::new()),
            ("x-dup".into(), "1".into()),
            ("x-dup".into(), "2".into()),
        ],
        body: Bytes::from(body),
        stored_at: NOW - 1,
        fresh_until: NOW + 60 * SEC,
        stale_while_revalidate_until: NOW + 90 * SEC,
        stale_if_error_until: i64::MAX,
        cost: 1.0 / 3.0,
        prepared: Default::default(),
    }
}

fn key(e: &Entry) -> CacheKey {
    CacheKey::of(&e.signature)
}

/// Stores `e` under its signature's key.
async fn put(store: &dyn CacheStore, e: Entry) -> CacheKey {
    let k = key(&e);
    store.put(k, Arc::new(e)).await.unwrap();
    k
}

fn filter(upstream: Option<&str>, route: Option<&str>, key: Option<CacheKey>) -> PurgeFilter {
    PurgeFilter {
        upstream: upstream.map(str::to_owned),
        route: route.map(str::to_owned),
        key,
    }
}

/// Asserts the store holds exactly `entries` (by count and, for SQL stores, bytes).
async fn assert_holds(store: &dyn CacheStore, entries: &[&Entry]) {
    let usage = store.usage().await.unwrap();
    let bytes: u64 = entries
        .iter()
        .map(|e| (e.body.len() + e.signature.len()) as u64)
        .sum();
    assert_eq!(
        usage.entries,
        entries.len() as u64,
        "{}: entries",
        store.name()
    );
    if matches!(store.name(), "sqlite" | "postgres") {
        assert_eq!(
            usage.bytes,
            bytes,
            "{}: bytes = body + signature",
            store.name()
        );
    } else {
        assert!(
            usage.bytes >= bytes,
            "{}: bytes {usage:?} < {bytes}",
            store.name()
        );
    }
    for e in entries {
        let got = store.get(&key(e)).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(*e),
            "{}: {}",
            store.name(),
            e.signature
        );
    }
}

/// The port's contract. `store` must be empty and must not expire entries by itself before
/// `NOW` + 1 h (memory stores: build them on a `ManualClock` at [`NOW`]).
async fn check_store(store: Arc<dyn CacheStore>) {
    let s = &*store;
    let name = s.name();

    // An empty store.
    let full = full_entry("GET rentcast /v1/properties/{id} id=1");
    assert!(
        s.get(&key(&full)).await.unwrap().is_none(),
        "{name}: empty get"
    );
    assert!(
        !s.remove(&key(&full)).await.unwrap(),
        "{name}: empty remove"
    );
    assert_eq!(
        s.purge(&PurgeFilter::default()).await.unwrap(),
        0,
        "{name}: empty purge"
    );
    assert_eq!(
        s.sweep_expired(NOW + 3600 * SEC, 100).await.unwrap(),
        0,
        "{name}"
    );
    assert_holds(s, &[]).await;

    // Round trip: every field comes back equal.
    let k = put(s, full.clone()).await;
    let empty_body = Entry {
        status: 204,
        headers: vec![],
        body: Bytes::new(),
        cost: 0.0,
        ..entry("GET other /empty", "other", "/empty", NOW + 3600 * SEC)
    };
    put(s, empty_body.clone()).await;
    s.flush().await.unwrap();
    let got = s.get(&k).await.unwrap().expect("stored entry");
    assert_eq!(*got, full, "{name}: round trip");
    assert_eq!(got.expires_at(), i64::MAX, "{name}");
    assert_holds(s, &[&full, &empty_body]).await;

    // Overwrite: the key now answers with the new entry, and still counts once.
    let replacement = Entry {
        status: 201,
        route: "/v2/other".into(),
        headers: vec![("etag".into(), "\"v2\"".into())],
        body: Bytes::from_static(b"replaced"),
        cost: 2.5,
        ..entry(&full.signature, "rentcast", "/v2/other", NOW + 600 * SEC)
    };
    put(s, replacement.clone()).await;
    s.flush().await.unwrap();
    assert_holds(s, &[&replacement, &empty_body]).await;

    // Remove.
    assert!(s.remove(&k).await.unwrap(), "{name}: remove present");
    assert!(s.get(&k).await.unwrap().is_none(), "{name}: removed");
    assert!(!s.remove(&k).await.unwrap(), "{name}: remove absent");
    assert_holds(s, &[&empty_body]).await;
    assert_eq!(s.purge(&PurgeFilter::default()).await.unwrap(), 1, "{name}");
    assert_holds(s, &[]).await;

    // Purge: by upstream, by route, by key, by key that does not match the other fields, all.
    let late = NOW + 3600 * SEC;
    let a1 = entry("a /r1 1", "a", "/r1", late);
    let a2 = entry("a /r1 2", "a", "/r1", late);
    let a3 = entry("a /r2 1", "a", "/r2", late);
    let b1 = entry("b /r1 1", "b", "/r1", late);
    let b2 = entry("b /r1 2", "b", "/r1", late);
    let c1 = entry("c /r3 1", "c", "/r3", late);
    let c2 = entry("c /r3 2", "c", "/r3", late);
    for e in [&a1, &a2, &a3, &b1, &b2, &c1, &c2] {
        put(s, e.clone()).await;
    }
    s.flush().await.unwrap();
    assert_holds(s, &[&a1, &a2, &a3, &b1, &b2, &c1, &c2]).await;

    let purged = s.purge(&filter(Some("b"), None, None)).await.unwrap();
    assert_eq!(purged, 2, "{name}: purge upstream b");
    assert_holds(s, &[&a1, &a2, &a3, &c1, &c2]).await;

    let purged = s.purge(&filter(None, Some("/r2"), None)).await.unwrap();
    assert_eq!(purged, 1, "{name}: purge route /r2");
    assert_holds(s, &[&a1, &a2, &c1, &c2]).await;

    let purged = s
        .purge(&filter(Some("a"), Some("/r3"), None))
        .await
        .unwrap();
    assert_eq!(purged, 0, "{name}: upstream and route must both match");
    assert_holds(s, &[&a1, &a2, &c1, &c2]).await;

    let purged = s
        .purge(&filter(Some("c"), None, Some(key(&a1))))
        .await
        .unwrap();
    assert_eq!(purged, 0, "{name}: key matches but upstream does not");
    assert_holds(s, &[&a1, &a2, &c1, &c2]).await;

    let purged = s.purge(&filter(None, None, Some(key(&a1)))).await.unwrap();
    assert_eq!(purged, 1, "{name}: purge key");
    assert_holds(s, &[&a2, &c1, &c2]).await;

    let purged = s
        .purge(&filter(Some("c"), Some("/r3"), None))
        .await
        .unwrap();
    assert_eq!(purged, 2, "{name}: purge upstream c + route /r3");
    assert_holds(s, &[&a2]).await;

    put(s, b1.clone()).await;
    s.flush().await.unwrap();
    assert_eq!(
        s.purge(&PurgeFilter::default()).await.unwrap(),
        2,
        "{name}: purge all"
    );
    assert_holds(s, &[]).await;

    // Sweep: only entries expired at `now` (inclusive), at most `max_entries` per call.
    let sweep_at = NOW + 300 * SEC;
    let e1 = entry("expired 1", "a", "/r", NOW + 100 * SEC);
    let e2 = entry("expired 2", "a", "/r", NOW + 200 * SEC);
    let e3 = entry("expired 3", "b", "/r", sweep_at);
    let live1 = entry("live 1", "a", "/r", sweep_at + 1);
    let live2 = entry("live 2", "b", "/r", NOW + 3600 * SEC);
    for e in [&e1, &live1, &e2, &live2, &e3] {
        put(s, e.clone()).await;
    }
    s.flush().await.unwrap();
    assert_eq!(
        s.sweep_expired(sweep_at, 0).await.unwrap(),
        0,
        "{name}: max 0"
    );
    assert_eq!(
        s.sweep_expired(NOW, 10).await.unwrap(),
        0,
        "{name}: nothing due yet"
    );
    assert_eq!(
        s.sweep_expired(sweep_at, 2).await.unwrap(),
        2,
        "{name}: bounded"
    );
    assert_eq!(s.usage().await.unwrap().entries, 3, "{name}");
    assert_eq!(
        s.sweep_expired(sweep_at, 2).await.unwrap(),
        1,
        "{name}: the rest"
    );
    assert_eq!(
        s.sweep_expired(sweep_at, 2).await.unwrap(),
        0,
        "{name}: done"
    );
    assert_holds(s, &[&live1, &live2]).await;
    for e in [&e1, &e2, &e3] {
        assert!(
            s.get(&key(e)).await.unwrap().is_none(),
            "{name}: swept {}",
            e.signature
        );
    }

    assert_eq!(s.purge(&PurgeFilter::default()).await.unwrap(), 2, "{name}");
    assert_holds(s, &[]).await;

    // A batch: every entry stored, a key repeated in it ends with its last entry, and an
    // empty batch is nothing.
    s.put_many(&[]).await.unwrap();
    assert_holds(s, &[]).await;
    let batch: Vec<Entry> = (0..5)
        .map(|i| entry(&format!("batch {i}"), "a", "/r", NOW + 3600 * SEC))
        .collect();
    let mut replaced = entry("batch 0", "b", "/r2", NOW + 7200 * SEC);
    replaced.body = Bytes::from_static(b"the second write of batch 0");
    let mut writes: Vec<(CacheKey, Arc<Entry>)> = batch
        .iter()
        .map(|e| (key(e), Arc::new(e.clone())))
        .collect();
    writes.push((key(&replaced), Arc::new(replaced.clone())));
    s.put_many(&writes).await.unwrap();
    s.flush().await.unwrap();
    let expected: Vec<&Entry> = std::iter::once(&replaced).chain(&batch[1..]).collect();
    assert_holds(s, &expected).await;

    // Listing keys (for an L2 filter), a page at a time, in order: every key once.
    if let Some(first) = s.keys_after(None, 2).await.unwrap() {
        let mut listed = first;
        while let Some(&last) = listed.last() {
            let page = s
                .keys_after(Some(last), 2)
                .await
                .unwrap()
                .expect("still listable");
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 2, "{name}");
            listed.extend(page);
        }
        let mut keys: Vec<CacheKey> = batch.iter().map(key).collect();
        keys.sort_by_key(|k| k.to_hex());
        assert_eq!(listed, keys, "{name}");
    }
    assert_eq!(s.purge(&PurgeFilter::default()).await.unwrap(), 5, "{name}");
    assert_eq!(
        s.keys_after(None, 10).await.unwrap().unwrap_or_default(),
        [],
        "{name}"
    );
}

/// Many writers at once (pool contention; SQLite's single writer).
async fn check_concurrent_writes(store: Arc<dyn CacheStore>) {
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let e = entry(&format!("concurrent {i}"), "a", "/r", NOW + 3600 * SEC);
                put(&*store, e).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    store.flush().await.unwrap();
    assert_eq!(store.usage().await.unwrap().entries, 40, "{}", store.name());
    assert_eq!(store.purge(&PurgeFilter::default()).await.unwrap(), 40);
}

fn memory_store() -> MemoryStore {
    MemoryStore::with_clock(64 << 20, Arc::new(cache_core::ManualClock::new(NOW)))
}

#[tokio::test]
async fn memory_store_meets_the_contract() {
    check_store(Arc::new(memory_store())).await;
    check_concurrent_writes(Arc::new(memory_store())).await;
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use cache_core::{CacheError, SqliteStore, TieredStore};
    use diesel::{Connection, RunQueryDsl, SqliteConnection};

    use super::*;
    use crate::common::{migrate_sqlite, sqlite_temp_db};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_store_meets_the_contract() {
        let (_dir, url) = sqlite_temp_db();
        let store = Arc::new(SqliteStore::connect(&url, 4).unwrap());
        store.ping().await.unwrap();
        check_store(store.clone()).await;
        check_concurrent_writes(store).await;
    }

    #[tokio::test]
    async fn sqlite_store_on_a_current_thread_runtime() {
        // The binary's actix runtime is single-threaded; blocking SQLite work must still run.
        let (_dir, url) = sqlite_temp_db();
        check_store(Arc::new(SqliteStore::connect(&url, 2).unwrap())).await;
    }

    #[tokio::test]
    async fn tiered_memory_over_sqlite_meets_the_contract() {
        let (_dir, url) = sqlite_temp_db();
        let l2 = Arc::new(SqliteStore::connect(&url, 4).unwrap());
        let tiered = Arc::new(TieredStore::new(memory_store(), l2.clone(), 16));
        check_store(tiered.clone()).await;
        check_concurrent_writes(tiered).await;
        assert_eq!(l2.usage().await.unwrap().entries, 0, "L2 purged too");
    }

    #[tokio::test]
    async fn the_l2_filter_spares_lookups_for_keys_never_stored() {
        let (_dir, url) = sqlite_temp_db();
        let l2: Arc<dyn CacheStore> = Arc::new(SqliteStore::connect(&url, 2).unwrap());
        // Stored by an earlier process.
        let before = full_entry("GET rentcast /before-restart");
        put(&*l2, before.clone()).await;

        let tiers = TieredStore::new(memory_store(), Arc::clone(&l2), 16).with_l2_filter();
        for _ in 0..500 {
            if tiers.l2_filter_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(tiers.l2_filter_ready(), "built within 5 s");
        let counted = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::SeqCst);

        // What L2 held before the filter was built is found through it.
        let got = tiers.get(&key(&before)).await.unwrap();
        assert_eq!(got.as_deref(), Some(&before));
        // A key never stored: L2 is not asked.
        assert!(
            tiers
                .get(&CacheKey::of("never stored"))
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(counted(&tiers.stats().l2_filtered), 1);

        // Stored through the tiers now: recorded, so once L1 has let it go, L2 is asked.
        let after = full_entry("GET rentcast /after-the-scan");
        tiers
            .put(key(&after), Arc::new(after.clone()))
            .await
            .unwrap();
        tiers.flush().await.unwrap();
        assert!(tiers.l1().remove(&key(&after)).await.unwrap());
        let got = tiers.get(&key(&after)).await.unwrap();
        assert_eq!(got.as_deref(), Some(&after));
        assert_eq!(counted(&tiers.stats().l2_filtered), 1);
        assert_eq!(counted(&tiers.stats().l2_hits), 2);
    }

    #[tokio::test]
    async fn tiered_promotes_an_l2_hit_into_l1() {
        let (_dir, url) = sqlite_temp_db();
        let l2: Arc<dyn CacheStore> = Arc::new(SqliteStore::connect(&url, 2).unwrap());
        let full = full_entry("GET rentcast /promote");
        let k = key(&full);

        let first = TieredStore::new(memory_store(), Arc::clone(&l2), 16);
        first.put(k, Arc::new(full.clone())).await.unwrap();
        first.flush().await.unwrap();
        assert_eq!(
            l2.get(&k).await.unwrap().as_deref(),
            Some(&full),
            "written behind"
        );

        // A new process: empty L1, same L2.
        let second = TieredStore::new(memory_store(), Arc::clone(&l2), 16);
        assert!(second.l1().get_sync(&k).is_none());
        assert!(second.peek(&k).is_none());
        let got = second.get(&k).await.unwrap().expect("L2 hit");
        assert_eq!(*got, full);
        let promoted = second.l1().get_sync(&k).expect("promoted into L1");
        assert_eq!(*promoted, full);
        assert!(second.peek(&k).is_some());
        second.get(&k).await.unwrap().expect("L1 hit");
        let stats = second.stats();
        assert_eq!(stats.l2_hits.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(stats.l1_hits.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(
            stats.l2_errors.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[tokio::test]
    async fn sqlite_store_checkpoints_its_wal_every_10000_pages() {
        // At SQLite's default of 1,000 pages a miss-heavy load spent much of the store's time
        // copying pages back into the database and in `fsync`.
        #[derive(diesel::QueryableByName)]
        struct Wal {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            log: i32,
        }
        let (dir, url) = sqlite_temp_db();
        let store = SqliteStore::connect(&url, 2).unwrap();
        // ~18 pages each (70 kB bodies): ~1,800 pages in 10 transactions.
        let entries: Vec<_> = (0..100)
            .map(|i| {
                let e = full_entry(&format!("GET rentcast /wal/{i}"));
                (key(&e), Arc::new(e))
            })
            .collect();
        for batch in entries.chunks(10) {
            store.put_many(batch).await.unwrap();
        }
        // While the store is open (closing its last connection would checkpoint), the WAL
        // still holds every page written: none was checkpointed and the WAL restarted.
        let path = dir.path().join("cache.db");
        let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        let wal: Wal = diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)")
            .get_result(&mut conn)
            .unwrap();
        assert!(wal.log > 1_500, "{} pages in the WAL", wal.log);
        let got = store.get(&entries[0].0).await.unwrap();
        assert_eq!(got.as_deref(), Some(&*entries[0].1));
    }

    #[tokio::test]
    async fn sqlite_entries_survive_a_restart() {
        let (dir, url) = sqlite_temp_db();
        let full = full_entry("GET rentcast /restart");
        let other = entry("GET other /restart", "other", "/r", NOW + 3600 * SEC);
        {
            let store = SqliteStore::connect(&url, 2).unwrap();
            put(&store, full.clone()).await;
            put(&store, other.clone()).await;
        }
        // Reopen by bare path this time, as another process would.
        let path = dir.path().join("cache.db");
        let store = SqliteStore::connect(path.to_str().unwrap(), 2).unwrap();
        assert_holds(&store, &[&full, &other]).await;
    }

    #[tokio::test]
    async fn sqlite_in_memory_database_meets_the_contract() {
        // No migrations: nothing else can reach a private in-memory database.
        let store = Arc::new(SqliteStore::connect("sqlite::memory:", 8).unwrap());
        check_store(store.clone()).await;
        check_concurrent_writes(store).await;
    }

    #[tokio::test]
    async fn sqlite_corrupt_rows_are_reported() {
        let (dir, url) = sqlite_temp_db();
        let store = SqliteStore::connect(&url, 2).unwrap();
        let good = entry("good", "a", "/r", NOW + 3600 * SEC);
        put(&store, good.clone()).await;

        let bad_headers = CacheKey::of("bad headers");
        let bad_status = CacheKey::of("bad status");
        let mut raw =
            SqliteConnection::establish(dir.path().join("cache.db").to_str().unwrap()).unwrap();
        for (k, status, headers) in [(bad_headers, 200, "not json"), (bad_status, 70_000, "[]")] {
            diesel::sql_query(format!(
                "INSERT INTO cache_entries VALUES ('{}', 'sig', 'a', '/r', {status}, '{headers}', \
                 x'00ff', 0, 0, 0, 0, 0, 0.0)",
                k.to_hex()
            ))
            .execute(&mut raw)
            .unwrap();
        }

        for k in [bad_headers, bad_status] {
            match store.get(&k).await {
                Err(CacheError::Corrupt(msg)) => assert!(msg.contains(&k.to_hex()), "{msg}"),
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
        // The rest of the store still works, and corrupt rows can be removed.
        assert_eq!(
            store.get(&key(&good)).await.unwrap().as_deref(),
            Some(&good)
        );
        assert_eq!(store.sweep_expired(NOW, 10).await.unwrap(), 2);
        assert_holds(&store, &[&good]).await;
    }

    #[tokio::test]
    async fn sqlite_missing_table_is_a_backend_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unmigrated.db");
        let store = SqliteStore::connect(path.to_str().unwrap(), 1).unwrap();
        let err = store.get(&CacheKey::of("x")).await.unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::Backend {
                    backend: "sqlite",
                    ..
                }
            ),
            "{err}"
        );
        migrate_sqlite(&path);
        assert!(store.get(&CacheKey::of("x")).await.unwrap().is_none());
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::time::{Duration, Instant};

    use cache_core::{CacheError, PostgresStore, TieredStore};
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

    use super::*;
    use crate::common::{PgSchema, pg_url_or_skip};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_store_meets_the_contract() {
        let Some(base) = pg_url_or_skip("postgres store suite") else {
            return;
        };
        let schema = PgSchema::create_migrated(&base).await;
        let store = Arc::new(PostgresStore::connect(schema.url(), 4).unwrap());
        store.ping().await.unwrap();
        check_store(store.clone()).await;
        check_concurrent_writes(store).await;
    }

    #[tokio::test]
    async fn tiered_memory_over_postgres_meets_the_contract() {
        let Some(base) = pg_url_or_skip("postgres store suite") else {
            return;
        };
        let schema = PgSchema::create_migrated(&base).await;
        let l2 = Arc::new(PostgresStore::connect(schema.url(), 4).unwrap());
        check_store(Arc::new(TieredStore::new(memory_store(), l2, 16))).await;
    }

    #[tokio::test]
    async fn postgres_corrupt_rows_are_reported() {
        let Some(base) = pg_url_or_skip("postgres store suite") else {
            return;
        };
        let schema = PgSchema::create_migrated(&base).await;
        let store = PostgresStore::connect(schema.url(), 2).unwrap();
        let k = CacheKey::of("bad headers");
        let mut raw = AsyncPgConnection::establish(schema.url()).await.unwrap();
        raw.batch_execute(&format!(
            "INSERT INTO cache_entries VALUES ('{}', 'sig', 'a', '/r', 200, 'not json', \
             '\\x00ff', 0, 0, 0, 0, 0, 0.0)",
            k.to_hex()
        ))
        .await
        .unwrap();
        assert!(matches!(store.get(&k).await, Err(CacheError::Corrupt(_))));
        assert_eq!(store.usage().await.unwrap().entries, 1);
    }

    #[tokio::test]
    async fn schemas_isolate_tests() {
        let Some(base) = pg_url_or_skip("postgres store suite") else {
            return;
        };
        let one = PgSchema::create_migrated(&base).await;
        let two = PgSchema::create_migrated(&base).await;
        let s1 = PostgresStore::connect(one.url(), 1).unwrap();
        let s2 = PostgresStore::connect(two.url(), 1).unwrap();
        put(&s1, entry("only in one", "a", "/r", NOW + SEC)).await;
        assert_eq!(s1.usage().await.unwrap().entries, 1);
        assert_eq!(s2.usage().await.unwrap().entries, 0);
        assert_ne!(one.name(), two.name());
    }

    /// A server that accepts connections and never answers: every operation fails after the
    /// pool's timeouts (~2 s) instead of hanging. Needs no database.
    #[tokio::test]
    async fn an_unresponsive_database_fails_fast() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let black_hole = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let store =
            PostgresStore::connect(&format!("postgres://u@127.0.0.1:{port}/db"), 2).unwrap();
        let started = Instant::now();
        let err = store.get(&CacheKey::of("x")).await.unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(
                err,
                CacheError::Backend {
                    backend: "postgres",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_retryable());
        assert!(took < Duration::from_secs(4), "took {took:?}");
        assert!(store.ping().await.is_err());
        black_hole.abort();
    }

    #[tokio::test]
    async fn a_refused_connection_fails_at_once() {
        // Bind then drop: nothing listens on the port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store =
            PostgresStore::connect(&format!("postgres://u@127.0.0.1:{port}/db"), 2).unwrap();
        let started = Instant::now();
        let err = store
            .put(CacheKey::of("x"), Arc::new(entry("x", "a", "/r", NOW)))
            .await;
        assert!(err.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
