//! Criterion micro-benchmarks of the cache-hit path's library pieces: canonical key building
//! with normalizers, a memory-store get, a tiered get answered by L1, and `Cache::peek_fresh`.
//!
//! ```sh
//! cargo bench -p cache-core --bench hot_path
//! cargo bench -p cache-core --bench hot_path -- peek   # a subset
//! ```
//!
//! Serializing an entry into an HTTP response lives in the binary: `cargo bench -p tollgate
//! --bench respond`. `cargo xtask bench` measures the whole path.
#![allow(missing_docs)] // criterion's macros generate undocumented public functions

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cache_core::{
    Cache, CacheKey, CachePolicy, CacheStore, Clock, Entry, MemoryStore, NormalizeConfig,
    Normalizer, Signature, SystemClock, TieredStore,
};
use criterion::{Criterion, criterion_group, criterion_main};

const L1_BYTES: u64 = 256 * 1024 * 1024;
/// Entries besides the one looked up, so lookups do not hit a one-entry map.
const NEIGHBOURS: usize = 10_000;

fn weather_normalizer() -> Normalizer {
    Normalizer::new(NormalizeConfig {
        sort: true,
        drop: vec!["_".into(), "cb".into()],
        round: BTreeMap::from([("latitude".into(), 1), ("longitude".into(), 1)]),
        canonical_json: true,
    })
}

const WEATHER_QUERY: &str =
    "longitude=-97.7431&latitude=30.2672&_=1712345678&hourly=temperature_2m&timezone=auto";

fn entry(signature: &Signature) -> Arc<Entry> {
    let policy = CachePolicy {
        ttl: Duration::from_secs(600),
        ..CachePolicy::default()
    };
    Arc::new(Entry::new(
        signature.as_str(),
        "open-meteo",
        "/v1/forecast",
        200,
        vec![
            ("content-type".into(), "application/json".into()),
            ("x-mock-call".into(), "1".into()),
        ],
        Bytes::from(vec![b'x'; 600]),
        0.01,
        &policy,
        SystemClock.now_millis(),
    ))
}

/// A memory store holding the weather entry and `NEIGHBOURS` others; the weather signature.
fn filled(store: &MemoryStore) -> Signature {
    let n = weather_normalizer();
    for i in 0..NEIGHBOURS {
        let other = n.normalize(
            "open-meteo",
            "GET",
            "/v1/forecast",
            &format!("city={i}"),
            None,
        );
        store.insert_sync(other.signature.key(), entry(&other.signature));
    }
    let sig = n
        .normalize("open-meteo", "GET", "/v1/forecast", WEATHER_QUERY, None)
        .signature;
    store.insert_sync(sig.key(), entry(&sig));
    sig
}

fn keys(c: &mut Criterion) {
    let plain = Normalizer::new(NormalizeConfig::default());
    let weather = weather_normalizer();
    let mut g = c.benchmark_group("key");
    g.bench_function("normalize: 2 params, sorted", |b| {
        b.iter(|| {
            plain.normalize(
                black_box("rentcast"),
                "GET",
                black_box("/properties"),
                black_box("state=TX&city=Austin"),
                None,
            )
        })
    });
    g.bench_function("normalize: 5 params, sorted + 2 rounded + 1 dropped", |b| {
        b.iter(|| {
            weather.normalize(
                black_box("open-meteo"),
                "GET",
                black_box("/v1/forecast"),
                black_box(WEATHER_QUERY),
                None,
            )
        })
    });
    let body = br#"{"model":"rent-v2","inputs":{"zip":"78701","beds":2,"baths":1.5},"options":{"explain":false}}"#;
    g.bench_function("normalize: POST, canonical JSON body", |b| {
        b.iter(|| {
            plain.normalize(
                black_box("models"),
                "POST",
                black_box("/v1/predict"),
                "",
                Some(black_box(&body[..])),
            )
        })
    });
    let text = weather
        .normalize("open-meteo", "GET", "/v1/forecast", WEATHER_QUERY, None)
        .signature
        .into_string();
    g.bench_function("md5 of a signature", |b| {
        b.iter(|| CacheKey::of(black_box(&text)))
    });
    g.finish();
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let _guard = rt.enter(); // TieredStore::new spawns its L2 writer

    let memory = MemoryStore::new(L1_BYTES);
    let sig = filled(&memory);
    let key = sig.key();
    let mut g = c.benchmark_group("store");
    g.bench_function("memory: get_sync (hit)", |b| {
        b.iter(|| memory.get_sync(black_box(&key)))
    });
    g.bench_function("memory: CacheStore::get (hit, async)", |b| {
        b.to_async(&rt).iter(|| memory.get(black_box(&key)))
    });
    let missing = CacheKey::of("nothing here");
    g.bench_function("memory: get_sync (miss)", |b| {
        b.iter(|| memory.get_sync(black_box(&missing)))
    });

    let l1 = MemoryStore::new(L1_BYTES);
    let sig = filled(&l1);
    let key = sig.key();
    let l2: Arc<dyn CacheStore> = Arc::new(MemoryStore::new(L1_BYTES));
    let tiered = TieredStore::new(l1, l2, 1024);
    g.bench_function("tiered: peek (L1 hit)", |b| {
        b.iter(|| tiered.peek(black_box(&key)))
    });
    g.bench_function("tiered: CacheStore::get (L1 hit, async)", |b| {
        b.to_async(&rt).iter(|| tiered.get(black_box(&key)))
    });
    g.finish();

    let l1 = MemoryStore::new(L1_BYTES);
    let sig = filled(&l1);
    let l2: Arc<dyn CacheStore> = Arc::new(MemoryStore::new(L1_BYTES));
    let cache: Cache<String> = Cache::new(Arc::new(TieredStore::new(l1, l2, 1024)));
    assert!(
        cache.peek_fresh(&sig).is_some(),
        "the entry must be a fresh hit"
    );
    let weather = weather_normalizer();
    let mut g = c.benchmark_group("cache");
    g.bench_function("peek_fresh (tiered, L1 hit)", |b| {
        b.iter(|| cache.peek_fresh(black_box(&sig)))
    });
    g.bench_function(
        "normalize + peek_fresh (the library's share of a hit)",
        |b| {
            b.iter(|| {
                let n = weather.normalize(
                    "open-meteo",
                    "GET",
                    "/v1/forecast",
                    black_box(WEATHER_QUERY),
                    None,
                );
                cache.peek_fresh(&n.signature)
            })
        },
    );
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = keys, stores
}
criterion_main!(benches);
