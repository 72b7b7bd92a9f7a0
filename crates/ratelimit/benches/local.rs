//! The local limiter's cost per check (target: under 1 µs).
//!
//! `cargo bench -p ratelimit --bench local`
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use ratelimit::{Limit, LocalLimiter, RateLimiter};

fn local(c: &mut Criterion) {
    let mut group = c.benchmark_group("local");

    // One hot key whose bucket never empties during the run.
    let limiter = LocalLimiter::new();
    let roomy = Limit::new(100_000_000, Duration::from_secs(1000));
    group.bench_function("check_now/allowed", |b| {
        b.iter(|| {
            limiter
                .check_now(black_box("key-hot"), black_box(&roomy), 1)
                .unwrap()
        })
    });

    // One key, always denied (the retry_after path).
    let tight = Limit::per_hour(1);
    limiter.check_now("key-denied", &tight, 1).unwrap();
    group.bench_function("check_now/denied", |b| {
        b.iter(|| {
            limiter
                .check_now(black_box("key-denied"), black_box(&tight), 1)
                .unwrap()
        })
    });

    // 10 000 keys in turn, under two limits (a global and a per-route one).
    let keys: Vec<String> = (0..10_000).map(|i| format!("key-{i:05}")).collect();
    let per_route = Limit::per_minute(60);
    let mut i = 0;
    group.bench_function("check_now/10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let limit = if i % 2 == 0 { &roomy } else { &per_route };
            limiter.check_now(black_box(&keys[i]), limit, 1).unwrap()
        })
    });

    // Through the port, as the gateway calls it (`dyn RateLimiter`, boxed future, no runtime
    // needed: the local limiter is ready at once).
    let port: &dyn RateLimiter = &limiter;
    group.bench_function("check_dyn/allowed", |b| {
        b.iter(|| {
            port.check(black_box("key-hot"), black_box(&roomy), 1)
                .now_or_never()
                .unwrap()
                .unwrap()
        })
    });

    group.finish();
}

criterion_group!(benches, local);
criterion_main!(benches);
