//! `l1`: the in-process cache's memory.
//!
//! * **10k keys**: a fresh Tollgate (L1 256 MiB) is filled through the gateway with
//!   `--l1-keys` distinct keys (600-byte bodies); then its resident memory (`VmRSS`, and the
//!   peak `VmHWM`) is read from `/proc` and the L1's entries and bytes from `/metrics`.
//! * **byte cap**: a Tollgate with `cache.l1_max_bytes` = `--l1-cap` is fed distinct entries
//!   whose bodies alone add up to 10× the cap while `/metrics` is sampled every 200 ms;
//!   the largest `tollgate_cache_bytes` seen and the one at the end are compared with the cap.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::load::{self, Builtin, LoadResult, Paths};
use super::proc;
use super::report::{self, Check};
use super::scenarios::Ctx;
use super::targets::{Env, Server, TollgateSetup};
use super::{Progress, Scenario};

/// Connections of the fill runs (misses, so more than the CPUs).
const FILL_CONNECTIONS: usize = 50;
/// RSS target with 10,000 keys, MiB.
const RSS_TARGET_MIB: f64 = 60.0;
/// How far over its cap the L1 may go.
const CAP_SLACK: f64 = 0.10;

/// One fill of one Tollgate.
#[derive(Debug, Clone, Serialize)]
pub struct Fill {
    /// `l1_max_bytes` of that instance.
    pub l1_max_bytes: u64,
    /// Distinct keys requested.
    pub keys: u64,
    /// Response body bytes those keys brought in (`keys × body`).
    pub body_bytes_fed: u64,
    /// The fill run (closed loop, every request a new key).
    pub load: LoadResult,
    /// `VmRSS` before the fill, KiB.
    pub rss_before_kib: u64,
    /// `VmRSS` after it, KiB.
    pub rss_after_kib: u64,
    /// `VmHWM` (peak since start) after it, KiB.
    pub peak_rss_kib: u64,
    /// `tollgate_cache_entries` after it.
    pub entries: Option<f64>,
    /// `tollgate_cache_bytes` after it.
    pub bytes: Option<f64>,
    /// The largest `tollgate_cache_bytes` sampled during it.
    pub bytes_max_sampled: Option<f64>,
    /// `/metrics` samples taken during it.
    pub samples: usize,
}

/// The `l1` scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct L1Report {
    /// What was done, in words.
    pub method: String,
    /// 10,000 keys in a large L1.
    pub keys: Fill,
    /// 10× the cap fed to a small L1.
    pub cap: Fill,
    /// Targets and whether they were met.
    pub checks: Vec<Check>,
}

/// Runs `l1`: two Tollgate instances in `dir`, one after the other.
pub fn run(ctx: &Ctx, env: &Env, dir: &Path, progress: &Progress) -> anyhow::Result<L1Report> {
    let s = ctx.settings;

    progress.0.set_message("l1: 10k keys");
    let setup = TollgateSetup::default();
    let big = parse_mib(&setup.l1_max_bytes);
    let server = super::targets::start_tollgate(env, &dir.join("keys"), &setup, |_| Ok(()))?;
    let keys = fill(ctx, &server, "keys", s.l1_keys as u64, big)?;
    drop(server);
    progress.log(one_line("10k keys", &keys));
    progress.0.inc(1);

    progress.0.set_message("l1: byte cap");
    let cap_bytes = s.l1_cap_bytes;
    let setup = TollgateSetup {
        l1_max_bytes: cap_bytes.to_string(),
        ..TollgateSetup::default()
    };
    let server = super::targets::start_tollgate(env, &dir.join("cap"), &setup, |_| Ok(()))?;
    let feed = (10 * cap_bytes).div_ceil(s.body_bytes.max(1) as u64);
    let cap = fill(ctx, &server, "cap", feed, cap_bytes)?;
    drop(server);
    progress.log(one_line("byte cap", &cap));
    progress.0.inc(1);

    let limit = cap_bytes as f64 * (1.0 + CAP_SLACK);
    let over = |b: Option<f64>| b.map(|b| b / cap_bytes as f64);
    let checks = vec![
        Check::at_most(
            &format!(
                "RSS with {} keys cached in L1 (VmRSS after the fill)",
                report::thousands(keys.keys as f64)
            ),
            Some(keys.rss_after_kib as f64 / 1024.0),
            RSS_TARGET_MIB,
            |v| format!("{v:.1} MiB"),
        ),
        Check::info(
            "L1 entries / bytes after that fill",
            Some(format!(
                "{} / {} MiB",
                report::opt(keys.entries, report::thousands),
                report::opt(keys.bytes, |b| format!("{:.1}", b / 1048576.0))
            )),
        ),
        Check::at_most(
            &format!(
                "L1 bytes / cap ({} MiB) fed {:.0}× the cap: largest sampled",
                cap_bytes as f64 / 1048576.0,
                cap.body_bytes_fed as f64 / cap_bytes as f64
            ),
            over(cap.bytes_max_sampled),
            limit / cap_bytes as f64,
            |v| format!("{v:.3}"),
        ),
        Check::at_most(
            "L1 bytes / cap at the end of that feed",
            over(cap.bytes),
            limit / cap_bytes as f64,
            |v| format!("{v:.3}"),
        ),
        Check::info(
            "RSS of the capped instance after the feed (peak)",
            Some(format!(
                "{} MiB ({} MiB)",
                report::mib(cap.rss_after_kib),
                report::mib(cap.peak_rss_kib)
            )),
        ),
    ];
    Ok(L1Report {
        method: super::describe(Scenario::L1, s),
        keys,
        cap,
        checks,
    })
}

/// Sends `keys` requests, each for a new key, to `server` while sampling its `/metrics`.
fn fill(ctx: &Ctx, server: &Server, name: &str, keys: u64, cap: u64) -> anyhow::Result<Fill> {
    let s = ctx.settings;
    let pid = server.pid();
    // Let the start-up settle (pre-warming, pools) before the baseline.
    std::thread::sleep(Duration::from_millis(300));
    let rss_before_kib = proc::usage(pid).rss_kib;
    let addr = server.addr;
    let timeout = s.timeout;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("l1-sampler".into())
            .spawn(move || {
                let mut max: Option<f64> = None;
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    if let Some(b) = cache_gauges(addr, timeout).and_then(|(_, b)| b) {
                        max = Some(max.map_or(b, |m: f64| m.max(b)));
                        n += 1;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                (max, n)
            })
            .context("spawning the /metrics sampler")?
    };
    let connections = FILL_CONNECTIONS.min(keys.max(1) as usize);
    let load = Builtin {
        addr,
        paths: Paths::Unique {
            prefix: format!("/bench/l1/{name}?k="),
        },
        connections,
        threads: s.wrk_threads,
        // Bounded by `max_requests`; the duration is only a safety net.
        duration: Duration::from_secs(600),
        rate: None,
        timeout,
        max_requests: keys,
        headers: Vec::new(),
    }
    .run();
    // The cache settles its size asynchronously: give it a moment, then read it.
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Release);
    let (sampled_max, samples) = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the /metrics sampler panicked"))?;
    let load = load?;
    let (entries, bytes) = cache_gauges(addr, timeout).unwrap_or((None, None));
    let usage = proc::usage(pid);
    let bytes_max_sampled = match (sampled_max, bytes) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    Ok(Fill {
        l1_max_bytes: cap,
        keys: load.requests,
        body_bytes_fed: load.requests * s.body_bytes as u64,
        load,
        rss_before_kib,
        rss_after_kib: usage.rss_kib,
        peak_rss_kib: usage.peak_rss_kib,
        entries,
        bytes,
        bytes_max_sampled,
        samples,
    })
}

/// `(tollgate_cache_entries, tollgate_cache_bytes)` from `/metrics`; `None` when it fails.
fn cache_gauges(
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Option<(Option<f64>, Option<f64>)> {
    let m = load::fetch(addr, "/metrics", &[], timeout).ok()?;
    (m.status == 200).then(|| {
        (
            load::metric(&m.body, "tollgate_cache_entries", &[]),
            load::metric(&m.body, "tollgate_cache_bytes", &[]),
        )
    })
}

/// `256MiB` → bytes (the default setup's cap; only MiB is needed here).
fn parse_mib(s: &str) -> u64 {
    s.trim_end_matches("MiB").parse::<u64>().unwrap_or(0) * 1024 * 1024
}

fn one_line(what: &str, f: &Fill) -> String {
    format!(
        "l1       {what}: {} keys at {} req/s{}, L1 {} entries / {} MiB (max sampled {} MiB, cap {} MiB), RSS {} → {} MiB",
        report::thousands(f.keys as f64),
        report::thousands(f.load.rps),
        if f.load.errors.total() > 0 {
            format!(" ({} errors)", f.load.errors.total())
        } else {
            String::new()
        },
        report::opt(f.entries, report::thousands),
        report::opt(f.bytes, |b| format!("{:.1}", b / 1048576.0)),
        report::opt(f.bytes_max_sampled, |b| format!("{:.1}", b / 1048576.0)),
        f.l1_max_bytes / 1048576,
        report::mib(f.rss_before_kib),
        report::mib(f.rss_after_kib),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cap_in_bytes() {
        assert_eq!(parse_mib(&TollgateSetup::default().l1_max_bytes), 256 << 20);
    }
}
