//! What one cached answer really keeps allocated in a Tollgate process, against what the L1
//! counts for it ([`Entry::weight`] and `response::replay_weight`): the entry, its byte-bounded [`MemoryStore`] record, and
//! the parsed headers its first answer leaves in [`Entry::prepared`] (`src/response.rs`,
//! compiled here as is).
//!
//! Bytes are counted as glibc's malloc holds them (each allocation plus its header and
//! rounding), since that, not the sum of requested sizes, is what an L1 cap has to bound.
//! Counted by an instrumented global allocator; this binary has this one test, so nothing else
//! allocates meanwhile.

#[allow(dead_code)] // the binary uses more of it than this test
#[path = "../src/response.rs"]
mod response;

use std::alloc::System;
use std::sync::Arc;

use bytes::Bytes;
use cache_core::{CacheKey, CachePolicy, CacheStatus, CacheStore, Entry, MemoryStore, Served};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// What glibc adds to each allocation: an 8-byte header, and on average 8 bytes of rounding
/// up to a multiple of 16.
const PER_ALLOCATION: f64 = 16.0;

/// A paid API's header as an upstream sends it, `i` making the value unique.
fn header(h: usize, i: usize) -> (String, String) {
    match h {
        0 => (
            "content-type".into(),
            "application/json; charset=utf-8".into(),
        ),
        1 => ("cache-control".into(), "public, max-age=600".into()),
        2 => ("etag".into(), format!("\"5f3a9c0e-{i}\"")),
        _ => (format!("x-header-{h}"), format!("value {i} {h}")),
    }
}

/// Bytes still held after storing and answering `n` entries with `headers` headers each, per
/// entry, and their mean weight as the L1 counts it (with what `prepared` keeps).
fn per_entry(n: usize, headers: usize) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let store = MemoryStore::new(1 << 30);
    let rid = response::RequestId::generated(1, 2);
    let region = Region::new(GLOBAL);
    let mut weight = 0;
    for i in 0..n {
        let signature = format!("v1\nGET\nweather\n/forecast\nlat=52.52&lon=13.40&n={i}\n-");
        let entry = Arc::new(Entry::new(
            &signature,
            "weather",
            "/forecast",
            200,
            (0..headers).map(|h| header(h, i)).collect(),
            Bytes::from(vec![b'x'; 600]),
            0.01,
            &CachePolicy::default(),
            0,
        ));
        weight += entry.weight() + response::replay_weight(&entry);
        rt.block_on(store.put(CacheKey::of(&signature), Arc::clone(&entry)))
            .expect("put");
        // The entry's first answer, as the server gives it: it fills `prepared`.
        let served = Served {
            entry,
            status: CacheStatus::Miss,
            age_secs: 0,
            fetched: true,
            coalesced: false,
            stored: true,
        };
        drop(response::respond(&served, &rid));
    }
    let usage = rt.block_on(store.usage()).expect("usage");
    assert_eq!(usage.entries, n as u64);
    let change = region.change();
    let live_allocations = change.allocations as f64 - change.deallocations as f64;
    let held = change.bytes_allocated as f64 - change.bytes_deallocated as f64
        + change.bytes_reallocated as f64
        + PER_ALLOCATION * live_allocations;
    drop(store);
    (held / n as f64, weight as f64 / n as f64)
}

#[test]
fn an_entrys_weight_covers_what_a_cached_answer_keeps_allocated() {
    let measured: Vec<(usize, f64, f64)> = [0, 3, 5, 12]
        .into_iter()
        .map(|headers| {
            let (real, weight) = per_entry(20_000, headers);
            println!("{headers} headers: {real:.0} bytes held per entry, weight {weight:.0}");
            (headers, real, weight)
        })
        .collect();
    for (headers, real, weight) in measured {
        // At least what is held (an L1 cap is a memory bound), at most a third above it.
        assert!(
            weight >= real && weight <= real * 1.34,
            "{headers} headers: weight {weight:.0} for {real:.0} bytes held"
        );
    }
}
