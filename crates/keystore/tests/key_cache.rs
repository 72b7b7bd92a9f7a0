//! `KeyCache`: the hot-path verifier. Time is a `ManualClock` except where real propagation
//! time is the point. Two caches over one store stand for two gateway nodes.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{FlakyStore, NOW, SEC};
use keystore::{
    ApiKey, Clock, KeyCache, KeyError, KeyRecord, KeyStore, ManualClock, MemoryKeyStore, NewKey,
};

const TTL: Duration = Duration::from_secs(60);
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
const STORE_RETRY: Duration = Duration::from_secs(1);

/// A cache over `store` on `clock`, with the default TTLs spelled out.
fn cache(store: Arc<dyn KeyStore>, clock: &Arc<ManualClock>) -> KeyCache {
    KeyCache::builder(store)
        .clock(clock.clone())
        .ttl(TTL)
        .negative_ttl(NEGATIVE_TTL)
        .store_retry(STORE_RETRY)
        .build()
}

/// A memory store behind a switch, a clock at [`NOW`], and a cache over them.
fn flaky_setup() -> (Arc<FlakyStore>, Arc<ManualClock>, KeyCache) {
    let store = FlakyStore::new(Arc::new(MemoryKeyStore::new()));
    let clock = Arc::new(ManualClock::new(NOW));
    let keys = cache(store.clone(), &clock);
    (store, clock, keys)
}

/// A key stored directly (the cache has never seen it).
async fn stored_key(store: &dyn KeyStore, new: NewKey) -> (KeyRecord, ApiKey) {
    store.create(new, NOW).await.unwrap()
}

fn well_formed_stranger() -> String {
    ApiKey::generate().unwrap().expose_secret().to_owned()
}

#[tokio::test]
async fn malformed_keys_are_refused_without_a_lookup() {
    let (store, _clock, keys) = flaky_setup();
    let good = well_formed_stranger();
    let malformed = [
        String::new(),
        "Bearer".into(),
        "tg_".into(),
        good[..45].to_owned(),
        format!("{good}x"),
        format!("tk_{}", &good[3..]),
        format!("tg_{}-", &good[3..45]),
        format!("tg_{}", "z".repeat(43)),
        "x".repeat(10_000),
    ];
    for down in [false, true] {
        store.set_down(down);
        for m in &malformed {
            assert!(
                matches!(keys.verify(m).await, Err(KeyError::Unknown)),
                "{m:?}"
            );
        }
    }
    assert_eq!(store.lookups(), 0);
}

#[tokio::test]
async fn known_keys_are_served_from_memory_and_revalidated_after_the_ttl() {
    let (store, clock, keys) = flaky_setup();
    let (record, key) = stored_key(&*store, NewKey::named("k")).await;
    let v = keys.verify(key.expose_secret()).await.unwrap();
    assert_eq!(*v.record, record);
    assert!(!v.stale);
    assert_eq!(store.lookups(), 1);
    for _ in 0..10 {
        keys.verify(key.expose_secret()).await.unwrap();
    }
    clock.advance(TTL - Duration::from_millis(1));
    keys.verify(key.expose_secret()).await.unwrap();
    assert_eq!(store.lookups(), 1, "hits come from memory");

    clock.advance(Duration::from_millis(1));
    let v = keys.verify(key.expose_secret()).await.unwrap();
    assert!(!v.stale);
    assert_eq!(store.lookups(), 2, "re-validated at the TTL");
    keys.verify(key.expose_secret()).await.unwrap();
    assert_eq!(store.lookups(), 2);
}

#[tokio::test]
async fn other_changes_propagate_after_the_ttl() {
    let (store, clock, keys) = flaky_setup();
    let (record, key) = stored_key(&*store, NewKey::named("k")).await;
    keys.verify(key.expose_secret()).await.unwrap();
    // Revoked behind the cache's back (another node without revocation sync).
    store.revoke(&record.id, NOW).await.unwrap();
    keys.verify(key.expose_secret()).await.unwrap();
    clock.advance(TTL);
    assert!(matches!(
        keys.verify(key.expose_secret()).await,
        Err(KeyError::Revoked { id }) if id == record.id
    ));
}

#[tokio::test]
async fn unknown_keys_are_remembered_briefly() {
    let (store, clock, keys) = flaky_setup();
    let stranger = well_formed_stranger();
    for _ in 0..5 {
        assert!(matches!(
            keys.verify(&stranger).await,
            Err(KeyError::Unknown)
        ));
    }
    assert_eq!(store.lookups(), 1);
    clock.advance(NEGATIVE_TTL - Duration::from_millis(1));
    assert!(matches!(
        keys.verify(&stranger).await,
        Err(KeyError::Unknown)
    ));
    assert_eq!(store.lookups(), 1);
    clock.advance(Duration::from_millis(1));
    assert!(matches!(
        keys.verify(&stranger).await,
        Err(KeyError::Unknown)
    ));
    assert_eq!(store.lookups(), 2, "asked again after the negative TTL");
}

#[tokio::test]
async fn both_caches_are_bounded() {
    let store = FlakyStore::new(Arc::new(MemoryKeyStore::new()));
    let clock = Arc::new(ManualClock::new(NOW));
    let keys = KeyCache::builder(store.clone())
        .clock(clock.clone())
        .max_entries(10)
        .max_negative_entries(50)
        .build();
    for _ in 0..500 {
        let stranger = well_formed_stranger();
        assert!(matches!(
            keys.verify(&stranger).await,
            Err(KeyError::Unknown)
        ));
    }
    assert!(
        keys.negative_entry_count() <= 50,
        "{}",
        keys.negative_entry_count()
    );
    let mut issued = Vec::new();
    for i in 0..40 {
        issued.push(stored_key(&*store, NewKey::named(format!("k{i}"))).await);
    }
    for (record, key) in &issued {
        assert_eq!(
            keys.verify(key.expose_secret()).await.unwrap().record.id,
            record.id
        );
    }
    assert!(keys.entry_count() <= 10, "{}", keys.entry_count());
}

#[tokio::test]
async fn expiry_follows_the_clock_even_from_the_cache() {
    let (store, clock, keys) = flaky_setup();
    let new = NewKey {
        expires_at: Some(NOW + 10 * SEC),
        ..NewKey::named("short-lived")
    };
    let (record, key) = stored_key(&*store, new).await;
    keys.verify(key.expose_secret()).await.unwrap();
    clock.set(NOW + 10 * SEC - 1);
    keys.verify(key.expose_secret()).await.unwrap();
    clock.set(NOW + 10 * SEC);
    assert!(matches!(
        keys.verify(key.expose_secret()).await,
        Err(KeyError::Expired { id }) if id == record.id
    ));
    assert_eq!(store.lookups(), 1, "decided from the cached record");
    // verify_at takes the instant from the caller.
    keys.verify_at(key.expose_secret(), NOW + 5 * SEC)
        .await
        .unwrap();
    // Down or not, an expired key is expired (403), not unavailable.
    store.set_down(true);
    clock.advance(TTL);
    assert!(matches!(
        keys.verify(key.expose_secret()).await,
        Err(KeyError::Expired { .. })
    ));
}

#[tokio::test]
async fn while_the_store_is_down_known_keys_work_and_unknown_keys_are_unavailable() {
    let (store, clock, keys) = flaky_setup();
    let (_, key) = stored_key(&*store, NewKey::named("known")).await;
    let (revoked, revoked_key) = stored_key(&*store, NewKey::named("revoked")).await;
    keys.verify(key.expose_secret()).await.unwrap();
    keys.revoke(&revoked.id).await.unwrap();
    let stranger = well_formed_stranger();

    store.set_down(true);
    let v = keys.verify(key.expose_secret()).await.unwrap();
    assert!(!v.stale, "fresh entry");
    clock.advance(TTL);
    let lookups = store.lookups();
    let v = keys.verify(key.expose_secret()).await.unwrap();
    assert!(v.stale, "served past its TTL because the store failed");
    assert_eq!(store.lookups(), lookups + 1, "it did try the store");
    assert!(keys.store_is_down());
    assert!(matches!(
        keys.verify(revoked_key.expose_secret()).await,
        Err(KeyError::Revoked { .. })
    ));

    // An unknown key cannot be judged: 503, never 401.
    let err = keys.verify(&stranger).await.unwrap_err();
    assert!(matches!(err, KeyError::Unavailable { .. }), "{err}");
    assert!(err.is_retryable() && !err.is_unauthorized() && !err.is_forbidden());
    // ... and the dead store is left alone until the retry interval has passed,
    for _ in 0..20 {
        assert!(matches!(
            keys.verify(&well_formed_stranger()).await,
            Err(KeyError::Unavailable { .. })
        ));
        assert!(keys.verify(key.expose_secret()).await.unwrap().stale);
    }
    assert_eq!(store.lookups(), lookups + 1, "no lookups while resting");
    // ... then one caller tries it again.
    clock.advance(STORE_RETRY);
    assert!(matches!(
        keys.verify(&stranger).await,
        Err(KeyError::Unavailable { .. })
    ));
    assert_eq!(store.lookups(), lookups + 2);

    // Back up: answers are exact again.
    store.set_down(false);
    clock.advance(STORE_RETRY);
    assert!(matches!(
        keys.verify(&stranger).await,
        Err(KeyError::Unknown)
    ));
    assert!(!keys.store_is_down());
    let v = keys.verify(key.expose_secret()).await.unwrap();
    assert!(!v.stale, "re-validated");
}

#[tokio::test]
async fn one_caller_revalidates_a_stale_entry() {
    let (store, clock, keys) = flaky_setup();
    let (_, key) = stored_key(&*store, NewKey::named("hot")).await;
    keys.verify(key.expose_secret()).await.unwrap();
    clock.advance(TTL);
    store.set_delay(Duration::from_millis(200));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let keys = keys.clone();
            let key = key.clone();
            tokio::spawn(async move { keys.verify(key.expose_secret()).await.map(|_| ()) })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.lookups(), 2);
}

#[tokio::test]
async fn a_flood_of_unknown_keys_is_bounded_in_concurrency() {
    let store = FlakyStore::new(Arc::new(MemoryKeyStore::new()));
    store.set_delay(Duration::from_millis(20));
    let keys = KeyCache::builder(store.clone())
        .max_concurrent_lookups(3)
        .build();
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let keys = keys.clone();
            tokio::spawn(async move { keys.verify(&well_formed_stranger()).await })
        })
        .collect();
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Err(KeyError::Unknown)));
    }
    assert_eq!(store.lookups(), 30);
    assert!(store.max_in_flight() <= 3, "{}", store.max_in_flight());
}

#[tokio::test]
async fn a_slow_store_is_a_timeout_not_a_stall() {
    let store = FlakyStore::new(Arc::new(MemoryKeyStore::new()));
    store.set_delay(Duration::from_secs(30));
    let keys = KeyCache::builder(store.clone())
        .store_timeout(Duration::from_millis(100))
        .build();
    let started = Instant::now();
    assert!(matches!(
        keys.verify(&well_formed_stranger()).await,
        Err(KeyError::Unavailable { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn keys_created_through_the_cache_work_at_once() {
    let (store, _clock, keys) = flaky_setup();
    let (record, key) = keys.create(NewKey::named("new")).await.unwrap();
    assert_eq!(record.created_at, NOW);
    assert_eq!(
        keys.verify(key.expose_secret()).await.unwrap().record.id,
        record.id
    );
    assert_eq!(store.lookups(), 0);
    assert_eq!(keys.store().get(&record.id).await.unwrap(), Some(record));
}

#[tokio::test]
async fn revoking_through_the_cache() {
    let (store, clock, keys) = flaky_setup();
    let (seen, seen_key) = stored_key(&*store, NewKey::named("seen")).await;
    let (unseen, unseen_key) = stored_key(&*store, NewKey::named("unseen")).await;
    keys.verify(seen_key.expose_secret()).await.unwrap();
    clock.advance(Duration::from_secs(1));

    assert!(!keys.revoke(&keystore::KeyId::generate()).await.unwrap());
    assert!(keys.revoke(&seen.id).await.unwrap());
    assert!(keys.revoke(&unseen.id).await.unwrap());
    let lookups = store.lookups();
    for key in [&seen_key, &unseen_key] {
        assert!(matches!(
            keys.verify(key.expose_secret()).await,
            Err(KeyError::Revoked { .. })
        ));
    }
    assert_eq!(store.lookups(), lookups, "refused from the cache");
    assert_eq!(
        store.get(&seen.id).await.unwrap().unwrap().revoked_at,
        Some(NOW + SEC)
    );

    // A revocation that cannot be stored is an error, and changes nothing.
    let (other, other_key) = stored_key(&*store, NewKey::named("other")).await;
    keys.verify(other_key.expose_secret()).await.unwrap();
    store.set_down(true);
    let err = keys.revoke(&other.id).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    keys.verify(other_key.expose_secret()).await.unwrap();
    assert!(keys.sync_revocations().await.is_err());
}

#[tokio::test]
async fn nothing_prints_a_key() {
    let (store, _clock, keys) = flaky_setup();
    let (record, key) = keys.create(NewKey::named("secret")).await.unwrap();
    let verified = keys.verify(key.expose_secret()).await.unwrap();
    keys.revoke(&record.id).await.unwrap();
    let revoked = keys.verify(key.expose_secret()).await.unwrap_err();
    store.set_down(true);
    let unavailable = keys.verify(&well_formed_stranger()).await.unwrap_err();
    let printed = format!(
        "{key:?} {record:?} {verified:?} {keys:?} {revoked} {revoked:?} {unavailable} \
         {unavailable:?} {:?} {}",
        record.info(NOW),
        serde_json::to_string(&record.info(NOW)).unwrap()
    );
    let secret = key.expose_secret();
    assert!(!printed.contains(&secret[3..]), "{printed}");
    assert!(!printed.contains(&secret[3..13]), "{printed}");
    assert!(printed.contains(record.id.as_str()), "ids are printed");
}

/// Node A and node B: one store (or two handles on one database), two caches.
async fn check_two_nodes(a_store: Arc<dyn KeyStore>, b_store: Arc<dyn KeyStore>) {
    let clock = Arc::new(ManualClock::new(NOW));
    let a = cache(a_store, &clock);
    let b = cache(b_store.clone(), &clock);
    let (record, key) = a.create(NewKey::named("shared")).await.unwrap();
    a.verify(key.expose_secret()).await.unwrap();
    b.verify(key.expose_secret()).await.unwrap();
    assert_eq!(b.sync_revocations().await.unwrap(), 0);

    clock.advance(Duration::from_secs(1));
    assert!(a.revoke(&record.id).await.unwrap());
    assert!(
        matches!(
            a.verify(key.expose_secret()).await,
            Err(KeyError::Revoked { .. })
        ),
        "A refuses at once"
    );
    // B's entry is fresh: B accepts the key until it syncs (every ≤ 2 s in production).
    b.verify(key.expose_secret()).await.unwrap();
    assert_eq!(b.sync_revocations().await.unwrap(), 1);
    assert!(
        matches!(b.verify(key.expose_secret()).await, Err(KeyError::Revoked { id }) if id == record.id),
        "B refuses after its sync"
    );
    assert_eq!(b.sync_revocations().await.unwrap(), 0, "applied once");

    // A node that never saw the key learns it from the store.
    let c = cache(b_store.clone(), &clock);
    assert!(matches!(
        c.verify(key.expose_secret()).await,
        Err(KeyError::Revoked { .. })
    ));

    // A revocation stamped by a node whose clock lags (within the overlap) still arrives.
    let (late, late_key) = a.create(NewKey::named("late")).await.unwrap();
    b.verify(late_key.expose_secret()).await.unwrap();
    clock.advance(Duration::from_secs(2));
    b.sync_revocations().await.unwrap();
    let lagging = Arc::new(ManualClock::new(clock.now_millis() - 30 * SEC));
    let d = cache(b_store, &lagging);
    assert!(d.revoke(&late.id).await.unwrap());
    b.verify(late_key.expose_secret()).await.unwrap();
    assert_eq!(b.sync_revocations().await.unwrap(), 1);
    assert!(matches!(
        b.verify(late_key.expose_secret()).await,
        Err(KeyError::Revoked { .. })
    ));
}

#[tokio::test]
async fn memory_two_nodes() {
    let store: Arc<dyn KeyStore> = Arc::new(MemoryKeyStore::new());
    check_two_nodes(store.clone(), store).await;
}

#[tokio::test]
async fn the_revocation_task_stops_with_the_cache() {
    let keys = KeyCache::new(Arc::new(MemoryKeyStore::new()));
    let task = keys.spawn_revocation_sync(Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!task.is_finished());
    drop(keys);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("task ended")
        .unwrap();
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use diesel::{Connection, RunQueryDsl, SqliteConnection};
    use keystore::SqliteKeyStore;

    use super::*;
    use crate::common::sqlite_temp_db;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_two_nodes() {
        let (_dir, url) = sqlite_temp_db();
        check_two_nodes(
            Arc::new(SqliteKeyStore::connect(&url, 2).unwrap()),
            Arc::new(SqliteKeyStore::connect(&url, 2).unwrap()),
        )
        .await;
    }

    /// Real time: node B's background sync (every 100 ms) stops a key revoked on node A
    /// within 5 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_sync_propagates_a_revocation_within_five_seconds() {
        let (_dir, url) = sqlite_temp_db();
        let a = KeyCache::new(Arc::new(SqliteKeyStore::connect(&url, 2).unwrap()));
        let b = KeyCache::new(Arc::new(SqliteKeyStore::connect(&url, 2).unwrap()));
        let sync = b.spawn_revocation_sync(Duration::from_millis(100));
        let (record, key) = a.create(NewKey::named("k")).await.unwrap();
        b.verify(key.expose_secret()).await.unwrap();

        let started = Instant::now();
        a.revoke(&record.id).await.unwrap();
        loop {
            match b.verify(key.expose_secret()).await {
                Err(KeyError::Revoked { .. }) => break,
                Ok(_) => assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "B still accepts the key after 5 s"
                ),
                Err(e) => panic!("{e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("revocation reached node B after {:?}", started.elapsed());
        sync.abort();
    }

    #[tokio::test]
    async fn a_broken_sqlite_database_keeps_known_keys_working() {
        let (dir, url) = sqlite_temp_db();
        let clock = Arc::new(ManualClock::new(NOW));
        let keys = cache(Arc::new(SqliteKeyStore::connect(&url, 2).unwrap()), &clock);
        let (_, key) = keys.create(NewKey::named("k")).await.unwrap();
        keys.verify(key.expose_secret()).await.unwrap();

        let mut raw =
            SqliteConnection::establish(dir.path().join("keys.db").to_str().unwrap()).unwrap();
        diesel::sql_query("DROP TABLE api_keys")
            .execute(&mut raw)
            .unwrap();
        clock.advance(TTL);
        assert!(keys.verify(key.expose_secret()).await.unwrap().stale);
        clock.advance(STORE_RETRY);
        assert!(matches!(
            keys.verify(&well_formed_stranger()).await,
            Err(KeyError::Unavailable { .. })
        ));
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use keystore::PostgresKeyStore;

    use super::*;
    use crate::common::{PgSchema, TcpProxy, closed_port, host_port, pg_url_or_skip, via};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_two_nodes() {
        let Some(base) = pg_url_or_skip("postgres key cache tests") else {
            return;
        };
        let schema = PgSchema::create_migrated(&base).await;
        check_two_nodes(
            Arc::new(PostgresKeyStore::connect(schema.url(), 2).unwrap()),
            Arc::new(PostgresKeyStore::connect(schema.url(), 2).unwrap()),
        )
        .await;
    }

    #[tokio::test]
    async fn a_dropped_schema_keeps_known_keys_working() {
        let Some(base) = pg_url_or_skip("postgres key cache tests") else {
            return;
        };
        let schema = PgSchema::create_migrated(&base).await;
        let clock = Arc::new(ManualClock::new(NOW));
        let keys = cache(
            Arc::new(PostgresKeyStore::connect(schema.url(), 2).unwrap()),
            &clock,
        );
        let (_, key) = keys.create(NewKey::named("k")).await.unwrap();
        keys.verify(key.expose_secret()).await.unwrap();

        schema.drop_now().await;
        clock.advance(TTL);
        assert!(keys.verify(key.expose_secret()).await.unwrap().stale);
        clock.advance(STORE_RETRY);
        assert!(matches!(
            keys.verify(&well_formed_stranger()).await,
            Err(KeyError::Unavailable { .. })
        ));
    }

    /// The database host goes away (the proxy in front of it closes every connection and the
    /// port): known keys keep working, unknown keys are unavailable, quickly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_database_keeps_known_keys_working() {
        let Some(base) = pg_url_or_skip("postgres key cache tests") else {
            return;
        };
        let schema = PgSchema::create_migrated(&base).await;
        let proxy = TcpProxy::start(host_port(&base)).await;
        let clock = Arc::new(ManualClock::new(NOW));
        let keys = cache(
            Arc::new(PostgresKeyStore::connect(&via(schema.url(), proxy.addr()), 2).unwrap()),
            &clock,
        );
        let (_, key) = keys.create(NewKey::named("k")).await.unwrap();
        keys.verify(key.expose_secret()).await.unwrap();
        keys.store().ping().await.unwrap();

        proxy.stop();
        clock.advance(TTL);
        let started = Instant::now();
        assert!(keys.verify(key.expose_secret()).await.unwrap().stale);
        clock.advance(STORE_RETRY);
        assert!(matches!(
            keys.verify(&well_formed_stranger()).await,
            Err(KeyError::Unavailable { .. })
        ));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(keys.store().ping().await.is_err());
    }

    #[tokio::test]
    async fn a_closed_port_is_unavailable_not_unknown() {
        let store =
            PostgresKeyStore::connect(&format!("postgres://u@127.0.0.1:{}/db", closed_port()), 2)
                .unwrap();
        let keys = KeyCache::new(Arc::new(store));
        assert!(matches!(
            keys.verify(&well_formed_stranger()).await,
            Err(KeyError::Unavailable { .. })
        ));
    }
}
