//! Fault injection (issue 5, "degraded dependencies"): the real `tollgate` binary under a steady
//! load of cache hits and misses while its own dependencies fail and return —
//!
//! * a private PostgreSQL (a temporary `initdb` cluster) crashed with `pg_ctl -m immediate stop`
//!   and started again on the same data directory and port;
//! * a private `redis-server` killed (SIGKILL) and started again on the same port.
//!
//! What must hold: no 5xx for a request that could be served (cache hits, misses the upstream
//! answers, a key the gateway already knows), no multi-second stall (dependencies are skipped,
//! not waited on), `/ready` naming the dependency that is down while `/health` stays 200, full
//! service after the return, and no quota increment lost over the outage.
//!
//! The tests need the PostgreSQL server binaries (`/usr/lib/postgresql/*/bin`) or
//! `redis-server`; without them they print `SKIPPED` and pass, unless `CI` is set.

// Not every helper of the shared support module is used here.
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use mock_upstream::MockUpstream;
use serde_json::{Value, json};

use support::{Gateway, PrivatePostgres, PrivateRedis, Resp, base_config, in_ci, metric, run_cli};

/// No answer may take this long, outage or not (a generous bound for a loaded 2-core machine:
/// a request waiting on a dead dependency would take the pool's 2 s timeout at least, often
/// several).
const STALL: Duration = Duration::from_secs(3);

/// The daily quota of the test keys: large enough never to refuse the load.
const DAILY_LIMIT: u64 = 1_000_000;

/// Load phases.
const BEFORE: u8 = 0;
const OUTAGE: u8 = 1;
const AFTER: u8 = 2;

/// One answer seen by the load (`path` and `body` are read through `Debug`, in failure messages).
#[derive(Debug)]
#[allow(dead_code)]
struct Sample {
    phase: u8,
    worker: usize,
    path: String,
    status: u16,
    took: Duration,
    body: String,
}

/// A steady load: `workers` clients, each alternating a cache hit (one of five hot paths) and a
/// miss (a path never asked before), with a short pause between requests, until stopped (or
/// for at most a minute). Each worker presents `keys[worker % keys.len()]` when there are keys.
struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicU8>,
    workers: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

impl Load {
    fn start(gw: &Gateway, workers: usize, keys: &[String]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicU8::new(BEFORE));
        let workers = (0..workers)
            .map(|worker| {
                let (stop, phase) = (Arc::clone(&stop), Arc::clone(&phase));
                let client = gw.client().clone();
                let base = gw.url("");
                let key = (!keys.is_empty()).then(|| keys[worker % keys.len()].clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let mut samples = Vec::new();
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let path = if i.is_multiple_of(2) {
                            format!("/demo/items/hot{}", i % 5)
                        } else {
                            format!("/demo/items/miss-{worker}-{i}")
                        };
                        let mut req = client
                            .get(format!("{base}{path}"))
                            .header("x-client-id", format!("load-{worker}"));
                        if let Some(key) = &key {
                            req = req.bearer_auth(key);
                        }
                        let phase = phase.load(Ordering::Relaxed);
                        let started = Instant::now();
                        let (status, body) = match req.send().await {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                (status, r.text().await.unwrap_or_default())
                            }
                            Err(e) => (0, format!("request failed: {e}")),
                        };
                        samples.push(Sample {
                            phase,
                            worker,
                            path,
                            status,
                            took: started.elapsed(),
                            body,
                        });
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    samples
                })
            })
            .collect();
        Load {
            stop,
            phase,
            workers,
        }
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::Relaxed);
    }

    /// Stops the workers; every answer they saw.
    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for w in self.workers {
            all.extend(w.await.expect("a load worker panicked"));
        }
        all
    }
}

/// Asserts every answer was a 200 within [`STALL`], and that every phase saw answers.
fn assert_all_served(samples: &[Sample], what: &str) {
    for phase in [BEFORE, OUTAGE, AFTER] {
        assert!(
            samples.iter().any(|s| s.phase == phase),
            "{what}: no answers in phase {phase}"
        );
    }
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.status != 200 || s.took >= STALL)
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} answers failed or stalled, e.g. {:?}",
        bad.len(),
        samples.len(),
        &bad[..bad.len().min(5)]
    );
}

/// `/ready`: (status, degraded dependencies, whole answer); `/ready` itself answers 200 at once.
async fn ready(gw: &Gateway) -> (String, Vec<String>, Value) {
    let started = Instant::now();
    let r = gw.get("/ready").await;
    assert!(
        started.elapsed() < STALL,
        "/ready took {:?}",
        started.elapsed()
    );
    assert_eq!(r.status, 200, "/ready: {}", r.text());
    let v = r.json();
    let degraded = v["degraded"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    (
        v["status"].as_str().unwrap_or_default().to_string(),
        degraded,
        v,
    )
}

/// Polls `/ready` until its status is `status` with exactly `degraded` down; panics after
/// `within`.
async fn wait_ready(gw: &Gateway, status: &str, degraded: &[&str], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (s, d, v) = ready(gw).await;
        if s == status && d == degraded {
            let deps = &v["dependencies"];
            for name in degraded {
                assert_eq!(deps[name]["state"], "down", "{v}");
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/ready did not say {status} {degraded:?} within {within:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/health` answers 200 quickly.
async fn assert_healthy(gw: &Gateway) {
    let started = Instant::now();
    let r = gw.get("/health").await;
    assert_eq!(r.status, 200, "/health: {}", r.text());
    assert!(
        started.elapsed() < STALL,
        "/health took {:?}",
        started.elapsed()
    );
}

/// `tollgate_dependency_up{dependency=NAME}` reaches `up` within 10 s.
async fn wait_dependency_metric(gw: &Gateway, name: &str, up: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = gw.metrics().await;
        let value = metric(&text, "tollgate_dependency_up", &[("dependency", name)]);
        if value == Some(up) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tollgate_dependency_up{{dependency={name:?}}} is {value:?}, not {up}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A key with the daily quota [`DAILY_LIMIT`], through the admin API → the plaintext key.
async fn create_key(gw: &Gateway, name: &str) -> String {
    let v = gw
        .create_key(&json!({"name": name, "daily_limit": DAILY_LIMIT}))
        .await;
    v["key"]
        .as_str()
        .unwrap_or_else(|| panic!("no key in {v}"))
        .to_string()
}

/// Once the dependency is back: `/ready` ready again and the metric up within 10 s, then one
/// more second of load; every answer the load saw, all asserted served.
async fn finish_after_return(
    gw: &Gateway,
    load: Load,
    dependency: &str,
    test: &str,
) -> Vec<Sample> {
    wait_ready(gw, "ready", &[], Duration::from_secs(10)).await;
    load.set_phase(AFTER);
    wait_dependency_metric(gw, dependency, 1.0).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let samples = load.finish().await;
    assert_all_served(&samples, &format!("{dependency} outage"));
    eprintln!(
        "{test}: {} answers ({} during the outage), slowest {:?}",
        samples.len(),
        samples.iter().filter(|s| s.phase == OUTAGE).count(),
        samples.iter().map(|s| s.took).max().unwrap_or_default()
    );
    samples
}

fn remaining(r: &Resp) -> u64 {
    r.header("ratelimit-remaining")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no RateLimit-Remaining: {:?} {}", r.headers, r.text()))
}

/// The routes of both tests: every `/items/*` path cached for a minute.
fn config(upstream: &str, tables: &str) -> String {
    format!(
        "{}\n{tables}\n[[upstreams.routes]]\npath = \"/items/*\"\nttl = \"60s\"\n",
        base_config(upstream, "timeout = \"5s\"")
    )
    .replace("required = false", "required = true")
    .replace(
        "[server]\n",
        "[server]\nlog_format = \"json\"\nshutdown_timeout = \"5s\"\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_crash_mid_load_degrades_then_recovers_without_losing_quota_counts() {
    const TEST: &str = "database_crash_mid_load_degrades_then_recovers_without_losing_quota_counts";
    let Some(pg) = PrivatePostgres::start().await else {
        assert!(
            !in_ci(),
            "{TEST}: no PostgreSQL server binaries, and CI is set"
        );
        eprintln!("SKIPPED {TEST}: no PostgreSQL server binaries (initdb, pg_ctl)");
        return;
    };
    let mock = MockUpstream::start().await.expect("starting the mock");
    let config = config(
        &mock.url(),
        &format!("[storage]\ndatabase_url = \"{}\"\n", pg.url()),
    );
    let migrate_config = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(migrate_config.path(), &config).expect("writing the config");
    let path = migrate_config.path().display().to_string();
    let out = run_cli(&["migrate", "--config", &path]).await;
    assert!(out.success(), "tollgate migrate: {out:?}");

    let mut gw = Gateway::start(&config).await;
    // `known` is used before the outage; `quiet` is created before it but first used during it.
    let known = create_key(&gw, "known").await;
    let quiet = create_key(&gw, "quiet").await;
    for i in 0..5 {
        let r = gw.get_bearer(&format!("/demo/items/hot{i}"), &known).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let mut counted_known = 5;

    let load = Load::start(&gw, 4, std::slice::from_ref(&known));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    pg.stop_immediately().await;
    load.set_phase(OUTAGE);
    wait_ready(&gw, "degraded", &["database"], Duration::from_secs(5)).await;
    assert_healthy(&gw).await;
    // A key the gateway has not seen cannot be checked: 503, never 401/403 …
    let last = if known.ends_with('x') { "y" } else { "x" };
    let unknown = gw
        .get_bearer(
            "/demo/items/hot0",
            &format!("{}{last}", &known[..known.len() - 1]),
        )
        .await;
    unknown.assert_error(503, "service_unavailable");
    // … while a key created before the outage, never used yet, is counted against its quota
    // (in memory until the database returns).
    let quiet_during = 4;
    for i in 0..quiet_during {
        let r = gw.get_bearer(&format!("/demo/items/hot{i}"), &quiet).await;
        assert_eq!(r.status, 200, "quiet key during the outage: {}", r.text());
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    wait_dependency_metric(&gw, "database", 0.0).await;

    pg.start_again().await;
    let samples = finish_after_return(&gw, load, "database", TEST).await;
    counted_known += samples.len() as u64;

    let text = gw.metrics().await;
    let skipped = metric(&text, "tollgate_cache_l2_skipped_total", &[]).unwrap_or(0.0);
    let errors = metric(&text, "tollgate_cache_l2_errors_total", &[]).unwrap_or(0.0);
    assert!(
        skipped > 0.0 && errors > 0.0,
        "L2 skipped {skipped}, errors {errors}"
    );
    // Degradation events are logged as JSON with the request id, never with a key.
    let log = gw.stderr();
    assert!(
        log.lines().any(|l| l.contains("\"level\":\"WARN\"")
            && l.contains("L2 cache")
            && l.contains("\"request_id\"")),
        "no JSON warning about the L2 cache with a request id:\n{log}"
    );
    for key in [&known, &quiet] {
        assert!(!log.contains(&key[3..]), "a key in the gateway's log");
    }

    // The first new entry after the return reaches L2 (the writer tries a failed batch once
    // more, past a pooled connection that died with the server): after a graceful restart (an
    // empty L1) it is a hit without an upstream call.
    let r = gw.get_bearer("/demo/items/after-return", &known).await;
    assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{}", r.text());
    counted_known += 1;
    gw.restart().await;
    let calls = mock.calls_to("/items/after-return");
    let r = gw.get_bearer("/demo/items/after-return", &known).await;
    assert_eq!((r.status, r.x_cache()), (200, "HIT"), "{}", r.text());
    assert_eq!(mock.calls_to("/items/after-return"), calls);
    counted_known += 1;
    // Every request counted during the outage reached the database.
    assert_eq!(
        remaining(&r),
        DAILY_LIMIT - counted_known,
        "requests of the known key were lost"
    );
    let r = gw.get_bearer("/demo/items/hot0", &quiet).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        remaining(&r),
        DAILY_LIMIT - quiet_during - 1,
        "requests of the key first used during the outage were lost"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_degrades_then_recovers() {
    const TEST: &str = "redis_killed_mid_load_degrades_then_recovers";
    let Some(mut redis) = PrivateRedis::start().await else {
        assert!(!in_ci(), "{TEST}: no redis-server binary, and CI is set");
        eprintln!("SKIPPED {TEST}: no redis-server binary on the PATH");
        return;
    };
    let mock = MockUpstream::start().await.expect("starting the mock");
    let tables = format!(
        "[limits]\nper_client = \"100000/min\"\nredis_failure = \"open\"\n\n[storage]\n\
         database_url = \"sqlite://{{dir}}/tollgate.db\"\nredis_url = \"{}\"\n",
        redis.url()
    );
    let gw = Gateway::start(
        &config(&mock.url(), &tables).replace("required = true", "required = false"),
    )
    .await;
    wait_ready(&gw, "ready", &[], Duration::from_secs(5)).await;

    let load = Load::start(&gw, 4, &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    redis.kill();
    load.set_phase(OUTAGE);
    wait_ready(&gw, "degraded", &["redis"], Duration::from_secs(5)).await;
    assert_healthy(&gw).await;
    wait_dependency_metric(&gw, "redis", 0.0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    redis.restart().await;
    finish_after_return(&gw, load, "redis", TEST).await;
}
