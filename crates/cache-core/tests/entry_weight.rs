//! [`Entry::weight`], what a byte-bounded L1 counts, against what storing entries in a
//! [`MemoryStore`] really holds: the bytes allocated, and what glibc's malloc adds to each
//! allocation (an instrumented global allocator; this binary has this one test, so nothing
//! else allocates meanwhile).

use std::alloc::System;
use std::sync::Arc;

use bytes::Bytes;
use cache_core::{CacheKey, CachePolicy, CacheStore, Entry, MemoryStore};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// What glibc adds to each allocation: an 8-byte header, and on average 8 bytes of rounding
/// up to a multiple of 16.
const PER_ALLOCATION: f64 = 16.0;

/// Bytes still held after storing `n` entries with `headers` headers each, per entry, and
/// their mean weight.
fn per_entry(n: usize, headers: usize) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let store = MemoryStore::new(1 << 30);
    let region = Region::new(GLOBAL);
    let mut weight = 0;
    for i in 0..n {
        let signature = format!("v1\nGET\nweather\n/forecast\nlat=52.52&lon=13.40&n={i}\n-");
        let entry = Entry::new(
            &signature,
            "weather",
            "/forecast",
            200,
            (0..headers)
                .map(|h| (format!("x-header-{h}"), format!("value {i} {h}")))
                .collect(),
            Bytes::from(vec![b'x'; 600]),
            0.01,
            &CachePolicy::default(),
            0,
        );
        weight += entry.weight();
        rt.block_on(store.put(CacheKey::of(&signature), Arc::new(entry)))
            .expect("put");
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
fn an_entrys_weight_covers_what_storing_it_holds() {
    let measured: Vec<(usize, f64, f64)> = [0, 3, 12]
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
