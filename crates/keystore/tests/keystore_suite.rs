//! The `KeyStore` contract, one behaviour suite ([`check_store`]) run against every backend:
//! memory, SQLite (file, in-memory, through `SqlKeyStore`) and PostgreSQL
//! (`TOLLGATE_TEST_DATABASE_URL`, a schema per test), plus what only SQL backends promise (no
//! plaintext in the file, restarts, corrupt rows, dead databases).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{NOW, SEC};
use keystore::{
    ApiKey, KeyError, KeyId, KeyRecord, KeyStore, MemoryKeyStore, NewKey, RateSpec, Revocation,
};

/// A key definition using every field, with awkward values.
fn full_key(name: &str) -> NewKey {
    NewKey {
        name: name.to_owned(),
        expires_at: Some(NOW + 30 * 86_400 * SEC),
        allowed_upstreams: Some(vec![
            "rentcast".into(),
            "open-meteo".into(),
            "we,ird \"name\" ✓".into(),
        ]),
        rate_limit: Some(RateSpec::new(60, 60).unwrap()),
        daily_quota: Some(1000),
        monthly_quota: Some(i64::MAX as u64),
        daily_budget_micros: Some(2_500_000),
        monthly_budget_micros: Some(0),
    }
}

/// What `new` should have become, given the issued record's generated parts.
fn expected(new: &NewKey, issued: &KeyRecord, created_at: i64) -> KeyRecord {
    KeyRecord {
        id: issued.id.clone(),
        name: new.name.clone(),
        digest: issued.digest,
        created_at,
        expires_at: new.expires_at,
        revoked_at: None,
        allowed_upstreams: new.allowed_upstreams.clone(),
        rate_limit: new.rate_limit,
        daily_quota: new.daily_quota,
        monthly_quota: new.monthly_quota,
        daily_budget_micros: new.daily_budget_micros,
        monthly_budget_micros: new.monthly_budget_micros,
    }
}

/// The contract every [`KeyStore`] meets. `store` must be empty.
async fn check_store(store: Arc<dyn KeyStore>) {
    let name = store.name();
    store.ping().await.unwrap();
    assert!(store.list().await.unwrap().is_empty(), "{name}: empty");
    let stranger = ApiKey::generate().unwrap();
    assert_eq!(
        store.find_by_digest(&stranger.digest()).await.unwrap(),
        None
    );
    assert_eq!(store.get(&KeyId::generate()).await.unwrap(), None);
    assert!(store.revoked_since(i64::MIN).await.unwrap().is_empty());

    // Create: every field round-trips; the plaintext matches the stored digest.
    let full = full_key("Rentcast — production ✓");
    let (record, key) = store.create(full.clone(), NOW).await.unwrap();
    assert_eq!(record, expected(&full, &record, NOW), "{name}");
    assert_eq!(record.digest, key.digest());
    assert!(keystore::is_well_formed(key.expose_secret()));
    assert!(record.id.as_str().starts_with("key_"));
    assert_eq!(
        store.find_by_digest(&key.digest()).await.unwrap().as_ref(),
        Some(&record),
        "{name}: find_by_digest"
    );
    assert_eq!(store.get(&record.id).await.unwrap().as_ref(), Some(&record));

    // A minimal key: every optional field empty.
    let (plain, plain_key) = store
        .create(NewKey::named("plain"), NOW + SEC)
        .await
        .unwrap();
    assert_eq!(plain, expected(&NewKey::named("plain"), &plain, NOW + SEC));
    assert_ne!(plain.id, record.id);
    assert_ne!(plain.digest, record.digest);
    assert_eq!(
        store.find_by_digest(&plain_key.digest()).await.unwrap(),
        Some(plain.clone())
    );
    // An empty allow-list (allows nothing) is not "all upstreams".
    let none_allowed = NewKey {
        allowed_upstreams: Some(vec![]),
        expires_at: Some(i64::MAX),
        ..NewKey::named("none allowed")
    };
    let (nothing, _) = store.create(none_allowed, NOW + 2 * SEC).await.unwrap();
    let nothing = store.get(&nothing.id).await.unwrap().unwrap();
    assert_eq!(nothing.allowed_upstreams, Some(vec![]));
    assert_eq!(nothing.expires_at, Some(i64::MAX));
    assert!(!nothing.allows_upstream("rentcast"));

    // Invalid definitions are refused and nothing is stored.
    for bad in [
        NewKey::named(""),
        NewKey {
            expires_at: Some(NOW),
            ..NewKey::named("expired at birth")
        },
        NewKey {
            daily_quota: Some(u64::MAX),
            ..NewKey::named("too big")
        },
    ] {
        assert!(
            matches!(store.create(bad, NOW).await, Err(KeyError::Invalid(_))),
            "{name}"
        );
    }
    assert_eq!(store.list().await.unwrap().len(), 3, "{name}");

    // Insert keeps ids and digests unique.
    let (dup_id, _) = KeyRecord::issue(NewKey::named("dup id"), NOW).unwrap();
    let dup_id = KeyRecord {
        id: record.id.clone(),
        ..dup_id
    };
    assert!(
        matches!(store.insert(&dup_id).await, Err(KeyError::Conflict(_))),
        "{name}: duplicate id"
    );
    let dup_digest = KeyRecord {
        id: KeyId::generate(),
        ..record.clone()
    };
    assert!(
        matches!(store.insert(&dup_digest).await, Err(KeyError::Conflict(_))),
        "{name}: duplicate digest"
    );
    let invalid = KeyRecord {
        id: KeyId::generate(),
        digest: ApiKey::generate().unwrap().digest(),
        monthly_budget_micros: Some(u64::MAX),
        ..record.clone()
    };
    assert!(matches!(
        store.insert(&invalid).await,
        Err(KeyError::Invalid(_))
    ));
    // An imported record (id of its own, already revoked) is stored as given.
    let (imported, imported_key) = KeyRecord::issue(NewKey::named("imported"), NOW - SEC).unwrap();
    let imported = KeyRecord {
        id: KeyId::parse("legacy-7").unwrap(),
        revoked_at: Some(NOW - 500),
        ..imported
    };
    store.insert(&imported).await.unwrap();
    assert_eq!(
        store.find_by_digest(&imported_key.digest()).await.unwrap(),
        Some(imported.clone())
    );

    // List: oldest first.
    let listed: Vec<KeyId> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        listed,
        vec![
            imported.id.clone(),
            record.id.clone(),
            plain.id.clone(),
            nothing.id.clone()
        ],
        "{name}: list order"
    );

    // Revoke: unknown ids are false; the first revocation time sticks.
    assert!(!store.revoke(&KeyId::generate(), NOW).await.unwrap());
    assert!(store.revoke(&plain.id, NOW + 10 * SEC).await.unwrap());
    assert!(
        store.revoke(&plain.id, NOW + 20 * SEC).await.unwrap(),
        "idempotent"
    );
    let revoked = store.get(&plain.id).await.unwrap().unwrap();
    assert_eq!(
        revoked.revoked_at,
        Some(NOW + 10 * SEC),
        "{name}: first time kept"
    );
    assert_eq!(
        store.find_by_digest(&plain_key.digest()).await.unwrap(),
        Some(revoked.clone())
    );
    assert!(store.revoke(&record.id, NOW + 11 * SEC).await.unwrap());

    // Revoked since: inclusive bound, oldest first, with digests.
    let all = store.revoked_since(i64::MIN).await.unwrap();
    assert_eq!(
        all,
        vec![
            Revocation {
                id: imported.id.clone(),
                digest: imported.digest,
                revoked_at: NOW - 500
            },
            Revocation {
                id: plain.id.clone(),
                digest: plain.digest,
                revoked_at: NOW + 10 * SEC
            },
            Revocation {
                id: record.id.clone(),
                digest: record.digest,
                revoked_at: NOW + 11 * SEC
            },
        ],
        "{name}"
    );
    let since = |at| {
        let store = Arc::clone(&store);
        async move {
            store
                .revoked_since(at)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        since(NOW + 10 * SEC).await,
        vec![plain.id.clone(), record.id.clone()]
    );
    assert_eq!(since(NOW + 10 * SEC + 1).await, vec![record.id.clone()]);
    assert!(since(NOW + 11 * SEC + 1).await.is_empty());
    assert_eq!(
        store.get(&nothing.id).await.unwrap().unwrap().revoked_at,
        None,
        "others untouched"
    );
}

/// Many concurrent creations: all stored, ids and digests distinct.
async fn check_concurrent_creates(store: Arc<dyn KeyStore>) {
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .create(NewKey::named(format!("k{i}")), NOW + i)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        let (record, key) = t.await.unwrap();
        assert_eq!(
            store
                .find_by_digest(&key.digest())
                .await
                .unwrap()
                .unwrap()
                .id,
            record.id
        );
        ids.insert(record.id);
    }
    assert_eq!(ids.len(), 24);
    assert_eq!(store.list().await.unwrap().len(), 24, "{}", store.name());
}

#[tokio::test]
async fn memory_store_meets_the_contract() {
    check_store(Arc::new(MemoryKeyStore::new())).await;
    check_concurrent_creates(Arc::new(MemoryKeyStore::new())).await;
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use diesel::{Connection, RunQueryDsl, SqliteConnection};
    use keystore::{SqlKeyStore, SqliteKeyStore};

    use super::*;
    use crate::common::{migrate_sqlite, sqlite_temp_db};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_store_meets_the_contract() {
        let (_dir, url) = sqlite_temp_db();
        check_store(Arc::new(SqliteKeyStore::connect(&url, 4).unwrap())).await;
        let (_dir, url) = sqlite_temp_db();
        check_concurrent_creates(Arc::new(SqliteKeyStore::connect(&url, 4).unwrap())).await;
    }

    #[tokio::test]
    async fn sqlite_store_on_a_current_thread_runtime() {
        // The binary's actix runtime is single-threaded; blocking SQLite work must still run.
        let (_dir, url) = sqlite_temp_db();
        check_store(Arc::new(SqliteKeyStore::connect(&url, 2).unwrap())).await;
    }

    #[tokio::test]
    async fn sqlite_in_memory_database_meets_the_contract() {
        // No migrations: nothing else can reach a private in-memory database.
        check_store(Arc::new(
            SqliteKeyStore::connect("sqlite::memory:", 8).unwrap(),
        ))
        .await;
    }

    #[tokio::test]
    async fn sql_key_store_picks_sqlite_from_the_url() {
        let (_dir, url) = sqlite_temp_db();
        let store = SqlKeyStore::connect(&url, 2).unwrap();
        assert_eq!(store.name(), "sqlite");
        check_store(Arc::new(store)).await;
    }

    /// Every file SQLite wrote in `dir` (database, WAL, shared memory), concatenated.
    fn files_bytes(dir: &std::path::Path) -> Vec<u8> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            all.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        all
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn the_plaintext_key_never_reaches_the_database_file() {
        let (dir, url) = sqlite_temp_db();
        let store = SqliteKeyStore::connect(&url, 2).unwrap();
        let mut issued = Vec::new();
        for i in 0..20 {
            issued.push(
                store
                    .create(full_key(&format!("key {i}")), NOW)
                    .await
                    .unwrap(),
            );
        }
        store.revoke(&issued[0].0.id, NOW + SEC).await.unwrap();
        // Both with the WAL still holding the writes and after a checkpoint into the file.
        for checkpoint in [false, true] {
            if checkpoint {
                let mut raw =
                    SqliteConnection::establish(dir.path().join("keys.db").to_str().unwrap())
                        .unwrap();
                diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(&mut raw)
                    .unwrap();
            }
            let bytes = files_bytes(dir.path());
            for (record, key) in &issued {
                let secret = key.expose_secret();
                assert!(!contains(&bytes, secret.as_bytes()), "whole key on disk");
                assert!(
                    !contains(&bytes, &secret.as_bytes()[3..]),
                    "key body on disk"
                );
                assert!(
                    !contains(&bytes, &secret.as_bytes()[3..19]),
                    "16 chars of a key"
                );
                // The test does see the database: digests and ids are there.
                assert!(contains(&bytes, record.digest.to_hex().as_bytes()));
                assert!(contains(&bytes, record.id.as_str().as_bytes()));
            }
        }
    }

    #[tokio::test]
    async fn sqlite_keys_survive_a_restart() {
        let (dir, url) = sqlite_temp_db();
        let (record, key) = {
            let store = SqliteKeyStore::connect(&url, 2).unwrap();
            store.create(full_key("kept"), NOW).await.unwrap()
        };
        // Reopen by bare path this time, as another process would.
        let path = dir.path().join("keys.db");
        let store = SqliteKeyStore::connect(path.to_str().unwrap(), 2).unwrap();
        assert_eq!(
            store.find_by_digest(&key.digest()).await.unwrap(),
            Some(record)
        );
    }

    #[tokio::test]
    async fn the_digest_index_is_unique_in_the_schema() {
        let (dir, url) = sqlite_temp_db();
        let store = SqliteKeyStore::connect(&url, 1).unwrap();
        let (record, _) = store.create(NewKey::named("a"), NOW).await.unwrap();
        let mut raw =
            SqliteConnection::establish(dir.path().join("keys.db").to_str().unwrap()).unwrap();
        let dup = diesel::sql_query(format!(
            "INSERT INTO api_keys (id, name, digest, created_at) VALUES ('other', 'b', '{}', 0)",
            record.digest.to_hex()
        ))
        .execute(&mut raw);
        assert!(dup.is_err(), "UNIQUE index on digest");
    }

    #[tokio::test]
    async fn sqlite_corrupt_rows_are_reported() {
        let (dir, url) = sqlite_temp_db();
        let store = SqliteKeyStore::connect(&url, 2).unwrap();
        let (good, _) = store.create(NewKey::named("good"), NOW).await.unwrap();
        let mut raw =
            SqliteConnection::establish(dir.path().join("keys.db").to_str().unwrap()).unwrap();
        for (n, id, column, value) in [
            (1, "bad-upstreams", "allowed_upstreams", "'not json'"),
            (2, "bad-quota", "daily_quota", "-5"),
        ] {
            diesel::sql_query(format!(
                "INSERT INTO api_keys (id, name, digest, created_at, {column}) \
                 VALUES ('{id}', 'x', '{n:0>64}', 0, {value})"
            ))
            .execute(&mut raw)
            .unwrap();
            match store.get(&KeyId::parse(id).unwrap()).await {
                Err(KeyError::Corrupt(msg)) => assert!(msg.contains(id), "{msg}"),
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
        // The rest of the store still works.
        assert_eq!(store.get(&good.id).await.unwrap(), Some(good));
        assert!(matches!(store.list().await, Err(KeyError::Corrupt(_))));
    }

    #[tokio::test]
    async fn sqlite_missing_table_is_a_backend_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unmigrated.db");
        let store = SqliteKeyStore::connect(path.to_str().unwrap(), 1).unwrap();
        let err = store.get(&KeyId::generate()).await.unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::Backend {
                    backend: "sqlite",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_retryable());
        migrate_sqlite(&path);
        assert!(store.get(&KeyId::generate()).await.unwrap().is_none());
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::time::{Duration, Instant};

    use keystore::{PostgresKeyStore, SqlKeyStore};

    use super::*;
    use crate::common::{PgSchema, closed_port, pg_execute, pg_url_or_skip};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_store_meets_the_contract() {
        let Some(base) = pg_url_or_skip("postgres key store suite") else {
            return;
        };
        let schema = PgSchema::create_migrated(&base).await;
        check_store(Arc::new(
            PostgresKeyStore::connect(schema.url(), 4).unwrap(),
        ))
        .await;
        let schema = PgSchema::create_migrated(&base).await;
        check_concurrent_creates(Arc::new(
            PostgresKeyStore::connect(schema.url(), 4).unwrap(),
        ))
        .await;
    }

    #[tokio::test]
    async fn sql_key_store_picks_postgres_from_the_url() {
        let Some(base) = pg_url_or_skip("postgres key store suite") else {
            return;
        };
        let schema = PgSchema::create_migrated(&base).await;
        let store = SqlKeyStore::connect(schema.url(), 2).unwrap();
        assert_eq!(store.name(), "postgres");
        check_store(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn postgres_corrupt_rows_are_reported() {
        let Some(base) = pg_url_or_skip("postgres key store suite") else {
            return;
        };
        let schema = PgSchema::create_migrated(&base).await;
        let store = PostgresKeyStore::connect(schema.url(), 2).unwrap();
        pg_execute(
            schema.url(),
            &format!(
                "INSERT INTO api_keys (id, name, digest, created_at, allowed_upstreams) \
                 VALUES ('bad', 'x', '{}', 0, 'not json')",
                "cd".repeat(32)
            ),
        )
        .await;
        assert!(matches!(
            store.get(&KeyId::parse("bad").unwrap()).await,
            Err(KeyError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn schemas_isolate_tests() {
        let Some(base) = pg_url_or_skip("postgres key store suite") else {
            return;
        };
        let one = PgSchema::create_migrated(&base).await;
        let two = PgSchema::create_migrated(&base).await;
        let s1 = PostgresKeyStore::connect(one.url(), 1).unwrap();
        let s2 = PostgresKeyStore::connect(two.url(), 1).unwrap();
        s1.create(NewKey::named("only in one"), NOW).await.unwrap();
        assert_eq!(s1.list().await.unwrap().len(), 1);
        assert!(s2.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_refused_connection_fails_at_once() {
        let store =
            PostgresKeyStore::connect(&format!("postgres://u@127.0.0.1:{}/db", closed_port()), 2)
                .unwrap();
        let started = Instant::now();
        let err = store
            .find_by_digest(&ApiKey::generate().unwrap().digest())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::Backend {
                    backend: "postgres",
                    ..
                }
            ),
            "{err}"
        );
        assert!(store.ping().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(4));
    }
}
