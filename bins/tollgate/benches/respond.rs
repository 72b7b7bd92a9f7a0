//! Criterion micro-benchmark of the last piece of the cache-hit path: an entry turned into an
//! HTTP response (`src/response.rs`, compiled here as is), on a hit whose headers were
//! prepared by an earlier answer and on an entry's first answer.
//!
//! ```sh
//! cargo bench -p tollgate --bench respond
//! ```
#![allow(missing_docs)] // criterion's macros generate undocumented public functions

#[allow(dead_code)] // the binary uses more of it than this bench
#[path = "../src/response.rs"]
mod response;

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use cache_core::{CachePolicy, CacheStatus, Entry, Served};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

use response::{RequestId, respond};

/// A paid API's answer as stored: 600 bytes of JSON and the headers worth replaying.
fn entry() -> Entry {
    Entry::new(
        "v1\nGET\nweather\n/v1/forecast\nlatitude=30.3&longitude=-97.7\n-",
        "weather",
        "/v1/forecast",
        200,
        vec![
            (
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            ),
            ("cache-control".into(), "public, max-age=600".into()),
            ("etag".into(), "\"5f3a9c0e\"".into()),
            ("vary".into(), "Accept-Encoding".into()),
            ("x-request-cost".into(), "0.002".into()),
        ],
        Bytes::from(vec![b'x'; 600]),
        0.002,
        &CachePolicy::default(),
        0,
    )
}

fn hit(entry: Arc<Entry>) -> Served {
    Served {
        entry,
        status: CacheStatus::Hit,
        age_secs: 12,
        fetched: false,
        coalesced: false,
        stored: true,
    }
}

fn bench(c: &mut Criterion) {
    let rid = RequestId::generated(0x1889_d571, 42);
    let served = hit(Arc::new(entry()));
    black_box(respond(&served, &rid)); // prepares the entry's headers
    c.bench_function("respond/hit, headers prepared", |b| {
        b.iter(|| black_box(respond(black_box(&served), &rid)))
    });
    c.bench_function("respond/first answer of an entry", |b| {
        b.iter_batched(
            || hit(Arc::new(entry())),
            |served| black_box(respond(&served, &rid)),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("respond/request id", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            black_box(RequestId::generated(0x1889_d571, n))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
