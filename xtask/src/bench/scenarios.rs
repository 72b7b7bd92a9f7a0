//! The scenarios: what is requested, how the load is offered and what is recorded.
//!
//! * `hot` — one key, after a warm-up: throughput closed-loop, latency at a constant rate.
//! * `zipf` — keys drawn from a Zipf distribution (s ≈ 1.0) over 100,000 keys, after a
//!   warm-up that asks for every key once, then draws from the same distribution (a key the
//!   cache evicted still misses: the hit ratio is printed).
//! * `miss` — every request a new key, the upstream answers in 50 ms, 1,000 connections:
//!   gateway concurrency under misses; throughput should be bounded by the upstream latency.
//! * `stampede` — 1,000 simultaneous requests for one cold key, upstream 50 ms: upstream calls
//!   per target and how long the waiters waited.
//!
//! Tollgate alone, each with instances of its own (opt-in; see their modules):
//! * `auth` (`auth.rs`) — `hot` with auth + a key rate limit + quota on vs off (and in Redis).
//! * `l1` (`l1.rs`) — RSS with 10,000 keys cached; the L1 byte cap under 10× its size.
//! * `outage` (`outage.rs`) — steady load while the upstream fails and recovers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mock_upstream::MockUpstream;
use serde::Serialize;

use super::load::{self, Builtin, LoadResult, Paths, Wrk};
use super::outage::OutageMode;
use super::proc;
use super::report::RunRecord;
use super::targets::{Server, TargetKind};

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One hot key.
    Hot,
    /// Zipf-distributed keys.
    Zipf,
    /// Every request a miss, slow upstream, many connections.
    Miss,
    /// Many simultaneous requests for one cold key.
    Stampede,
    /// Hit throughput with auth + key rate limit + quota on vs off (Tollgate only).
    Auth,
    /// L1 memory: RSS with 10,000 keys, the byte cap under 10× its size (Tollgate only).
    L1,
    /// Steady load through an upstream outage: breaker, stale, retries (Tollgate only).
    Outage,
}

impl Scenario {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Hot => "hot",
            Scenario::Zipf => "zipf",
            Scenario::Miss => "miss",
            Scenario::Stampede => "stampede",
            Scenario::Auth => "auth",
            Scenario::L1 => "l1",
            Scenario::Outage => "outage",
        }
    }

    /// Whether `kind` takes part: every target in `hot`, `zipf`, `miss` and `stampede` (in
    /// the last two the floor answers after the upstream's latency: see [`SLOW_PREFIXES`]).
    /// The Tollgate-only scenarios start instances of their own instead.
    pub fn includes(self, _kind: TargetKind) -> bool {
        !self.tollgate_only()
    }

    /// Whether it measures Tollgate alone, with instances configured for it.
    pub fn tollgate_only(self) -> bool {
        matches!(self, Scenario::Auth | Scenario::L1 | Scenario::Outage)
    }

    /// Steps of a Tollgate-only scenario, for the progress bar.
    pub fn own_steps(self, s: &Settings) -> usize {
        match self {
            Scenario::Auth => s.rounds * if s.redis_url.is_empty() { 2 } else { 3 },
            Scenario::L1 => 2,
            Scenario::Outage => 1,
            _ => 0,
        }
    }

    /// How long the mock upstream waits before answering.
    pub fn upstream_delay(self, s: &Settings) -> Duration {
        match self {
            Scenario::Hot | Scenario::Zipf => Duration::ZERO,
            Scenario::Miss | Scenario::Stampede => s.upstream_delay,
            Scenario::Auth | Scenario::L1 | Scenario::Outage => Duration::ZERO,
        }
    }
}

/// Everything that shapes a run; reported in the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// `--quick`.
    pub quick: bool,
    /// Rounds of every scenario (targets alternate inside a round).
    pub rounds: usize,
    /// Length of each measured run.
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// Connections of the closed-loop and constant-rate runs (`hot`, `zipf`).
    pub connections: usize,
    /// wrk threads.
    pub wrk_threads: usize,
    /// Requests per second of the constant-rate latency runs.
    pub rate: f64,
    /// Keys of the `zipf` scenario.
    pub zipf_keys: usize,
    /// Zipf exponent.
    pub zipf_s: f64,
    /// Warm-up before the first `zipf` round, per target.
    #[serde(serialize_with = "secs")]
    pub zipf_warmup: Duration,
    /// Warm-up before the first `hot` round, per target.
    #[serde(serialize_with = "secs")]
    pub hot_warmup: Duration,
    /// Connections of the `miss` scenario.
    pub miss_connections: usize,
    /// Simultaneous requests of the `stampede` scenario.
    pub stampede_clients: usize,
    /// Upstream latency in `miss` and `stampede`.
    #[serde(serialize_with = "secs")]
    pub upstream_delay: Duration,
    /// Response body size.
    pub body_bytes: usize,
    /// Workers (threads or processes) of every server.
    pub server_workers: usize,
    /// Use wrk for closed-loop runs (else the built-in generator).
    pub use_wrk: bool,
    /// CPU of the servers and of the load generator when pinned with taskset.
    pub pin: Option<(usize, usize)>,
    /// Per-request timeout of the load generators.
    #[serde(serialize_with = "secs")]
    pub timeout: Duration,
    /// Redis of the `auth` scenario's Redis-backed variant (empty: skipped).
    pub redis_url: String,
    /// Distinct keys cached in the first part of `l1`.
    pub l1_keys: usize,
    /// `cache.l1_max_bytes` of the second part of `l1`.
    pub l1_cap_bytes: u64,
    /// Requests per second of the `auth` latency runs (below every variant's capacity, so
    /// p99 shows the checks' cost rather than queueing).
    pub auth_rate: f64,
    /// Requests per second of the `outage` load.
    pub outage_rate: f64,
    /// `outage`: healthy, upstream failing, recovered.
    #[serde(serialize_with = "secs3")]
    pub outage_phases: (Duration, Duration, Duration),
    /// How the upstream fails in `outage`.
    pub outage_mode: OutageMode,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn secs3<S: serde::Serializer>(
    (a, b, c): &(Duration, Duration, Duration),
    s: S,
) -> Result<S::Ok, S::Error> {
    [a, b, c].map(Duration::as_secs_f64).serialize(s)
}

/// Cumulative probabilities of a Zipf distribution over `n` keys with exponent `s`:
/// `P(key = k) ∝ 1 / (k + 1)^s`, so key 0 is the most popular. The last value is exactly 1.
pub fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect();
    if let Some(last) = cdf.last_mut() {
        *last = 1.0;
    }
    cdf
}

/// The key whose CDF interval holds `u ∈ [0, 1)`: the first `k` with `cdf[k] ≥ u` (the same
/// binary search the wrk script does).
pub fn zipf_pick(cdf: &[f64], u: f64) -> usize {
    cdf.partition_point(|&c| c < u)
        .min(cdf.len().saturating_sub(1))
}

/// What a scenario run needs besides the target.
pub struct Ctx<'a> {
    /// Settings.
    pub settings: &'a Settings,
    /// The in-process mock upstream (counts calls).
    pub mock: &'a MockUpstream,
    /// Scratch dir (wrk scripts, the Zipf table).
    pub dir: PathBuf,
    /// The Zipf table, built once per bench.
    pub zipf: Arc<Vec<f64>>,
    /// The Zipf table as a file, for wrk.
    pub zipf_file: PathBuf,
}

/// Paths of `miss` and `stampede` start with one of these: the floor answers them after the
/// upstream's latency, as a gateway that costs nothing and coalesces nothing would.
pub const SLOW_PREFIXES: [&str; 2] = [MISS_PREFIX, STAMPEDE_PREFIX];

/// Paths of the `zipf` scenario: this, then the key's number.
const ZIPF_PREFIX: &str = "/bench/zipf/properties?id=";

/// Where `miss` paths start.
const MISS_PREFIX: &str = "/bench/miss/";

/// Where `stampede` paths start.
const STAMPEDE_PREFIX: &str = "/bench/stampede/";

/// The one key of `hot` (and `auth`).
pub const HOT_PATH: &str = "/bench/hot/properties?state=TX&city=Austin";

/// What `scenario` requests in `round` (`zipf`, `zipf_file`: the Zipf table and its file).
fn scenario_paths(
    scenario: Scenario,
    round: usize,
    seed: u64,
    zipf: &Arc<Vec<f64>>,
    zipf_file: &std::path::Path,
) -> Paths {
    match scenario {
        Scenario::Hot => Paths::Fixed(HOT_PATH.into()),
        Scenario::Zipf => Paths::Zipf {
            prefix: ZIPF_PREFIX.into(),
            cdf: Arc::clone(zipf),
            cdf_file: zipf_file.to_path_buf(),
            seed,
        },
        Scenario::Miss => Paths::Unique {
            prefix: format!("{MISS_PREFIX}properties?round={round}&k="),
        },
        Scenario::Stampede => Paths::Fixed(format!("{STAMPEDE_PREFIX}properties?round={round}")),
        Scenario::Auth | Scenario::L1 | Scenario::Outage => {
            unreachable!("Tollgate-only scenarios choose their own paths")
        }
    }
}

impl Ctx<'_> {
    fn paths(&self, scenario: Scenario, round: usize, seed: u64) -> Paths {
        scenario_paths(scenario, round, seed, &self.zipf, &self.zipf_file)
    }

    /// A closed-loop run with `headers` (`Name: value`) on every request: wrk when
    /// available, else the built-in generator.
    pub fn closed_loop(
        &self,
        server: &Server,
        paths: &Paths,
        connections: usize,
        duration: Duration,
        headers: &[String],
    ) -> anyhow::Result<LoadResult> {
        let s = self.settings;
        if s.use_wrk {
            Wrk {
                addr: server.addr,
                paths,
                connections,
                threads: s.wrk_threads,
                duration,
                timeout: s.timeout,
                dir: &self.dir,
                cpu: s.pin.map(|(_, load)| load),
                headers,
            }
            .run()
        } else {
            Builtin {
                addr: server.addr,
                paths: paths.clone(),
                connections,
                threads: s.wrk_threads,
                duration,
                rate: None,
                timeout: s.timeout,
                max_requests: max_requests(duration, 1_000_000.0),
                headers: headers.to_vec(),
            }
            .run()
        }
    }

    /// A constant-rate run at `rate` req/s with `headers` on every request (built-in
    /// generator).
    pub fn constant_rate(
        &self,
        server: &Server,
        paths: &Paths,
        rate: f64,
        headers: &[String],
    ) -> anyhow::Result<LoadResult> {
        let s = self.settings;
        Builtin {
            addr: server.addr,
            paths: paths.clone(),
            connections: s.connections,
            threads: s.wrk_threads,
            duration: s.duration,
            rate: Some(rate),
            timeout: s.timeout,
            max_requests: max_requests(s.duration, rate),
            headers: headers.to_vec(),
        }
        .run()
    }

    /// Prepares `server` for the first round: fills its cache for `hot` and `zipf`, opens its
    /// workers' upstream connections for `stampede`. Returns the `X-Cache` header seen on a
    /// probe of the hot key afterwards (`hot` only).
    pub fn warm_up(&self, scenario: Scenario, server: &Server) -> anyhow::Result<Option<String>> {
        let s = self.settings;
        match scenario {
            Scenario::Hot => {
                let paths = self.paths(scenario, 0, 0);
                self.closed_loop(server, &paths, s.connections, s.hot_warmup, &[])?;
                let (status, head) = load::get_once(server.addr, HOT_PATH, s.timeout)?;
                let x_cache = load::header(&head, "x-cache").unwrap_or("-");
                Ok(Some(format!("{status} X-Cache: {x_cache}")))
            }
            Scenario::Zipf => {
                // Every key once, so that the measured runs are of a warm cache (the zipf
                // warm-up alone leaves much of the tail cold), then the distribution itself.
                let sweep = Builtin {
                    addr: server.addr,
                    paths: Paths::sweep(ZIPF_PREFIX.into(), s.zipf_keys),
                    connections: s.connections,
                    threads: s.wrk_threads,
                    duration: ZIPF_SWEEP_LIMIT,
                    rate: None,
                    timeout: s.timeout,
                    max_requests: s.zipf_keys as u64,
                    headers: Vec::new(),
                }
                .run()?;
                if sweep.requests < s.zipf_keys as u64 || sweep.errors.total() > 0 {
                    anyhow::bail!(
                        "{}: the zipf warm-up had {} answers for {} keys within {:?}, {} errors",
                        server.kind.name(),
                        sweep.requests,
                        s.zipf_keys,
                        ZIPF_SWEEP_LIMIT,
                        sweep.errors.total()
                    );
                }
                let paths = self.paths(scenario, 0, 0xC0FFEE);
                self.closed_loop(server, &paths, s.connections, s.zipf_warmup, &[])?;
                Ok(None)
            }
            Scenario::Stampede => {
                // A few cold keys, each on a new connection (servers hand new connections to
                // their workers in turn): every worker then holds an upstream connection, as
                // in a gateway that has been serving, and the rounds time a cold key, not a
                // cold process.
                for i in 0..stampede_warmup_keys(s.server_workers) {
                    let path = format!("{STAMPEDE_PREFIX}properties?warm={i}");
                    let (status, _) = load::get_once(server.addr, &path, s.timeout)?;
                    if !(200..300).contains(&status) {
                        anyhow::bail!("{}: warm-up {path} answered {status}", server.kind.name());
                    }
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// One measured run of `scenario` against `server`.
    pub fn measure(
        &self,
        scenario: Scenario,
        server: &Server,
        round: usize,
    ) -> anyhow::Result<RunRecord> {
        let s = self.settings;
        let pid = server.pid();
        proc::reset_peak(pid);
        let before = proc::usage(pid);
        let calls_before = self.mock.calls();
        let mut record = RunRecord::new(scenario, server.kind, round);
        match scenario {
            Scenario::Hot | Scenario::Zipf | Scenario::Miss => {
                let paths = self.paths(scenario, round, round as u64);
                let connections = if scenario == Scenario::Miss {
                    s.miss_connections
                } else {
                    s.connections
                };
                let tp = self.closed_loop(server, &paths, connections, s.duration, &[])?;
                let after = proc::usage(pid);
                let calls = self.mock.calls().saturating_sub(calls_before);
                record.upstream_calls = calls;
                record.cpu_seconds = after.cpu_seconds - before.cpu_seconds;
                if tp.requests > 0 {
                    record.cpu_us_per_request = Some(record.cpu_seconds * 1e6 / tp.requests as f64);
                    if server.kind.caches() && scenario != Scenario::Miss {
                        record.hit_ratio = Some(1.0 - (calls as f64 / tp.requests as f64).min(1.0));
                    }
                }
                record.throughput = Some(tp);
                if scenario != Scenario::Miss {
                    record.latency = Some(self.constant_rate(server, &paths, s.rate, &[])?);
                }
            }
            Scenario::Stampede => {
                let Paths::Fixed(path) = self.paths(scenario, round, 0) else {
                    unreachable!("stampede requests one path")
                };
                let mut result = load::stampede(server.addr, &path, s.stampede_clients, s.timeout)?;
                // A late upstream call would still be counted: give stragglers a moment.
                std::thread::sleep(Duration::from_millis(200));
                result.upstream_called_after_ms = upstream_called_after(self.mock, &path, &result);
                let after = proc::usage(pid);
                record.upstream_calls = self.mock.calls().saturating_sub(calls_before);
                record.cpu_seconds = after.cpu_seconds - before.cpu_seconds;
                record.stampede = Some(result);
            }
            Scenario::Auth | Scenario::L1 | Scenario::Outage => {
                anyhow::bail!("{} runs its own Tollgate instances", scenario.name())
            }
        }
        let end = proc::usage(pid);
        record.peak_rss_kib = end.peak_rss_kib;
        record.pss_kib = end.pss_kib;
        record.processes = end.processes;
        Ok(record)
    }
}

/// Milliseconds from the stampede's first send to the first upstream call with `path`'s query
/// (unique per round; gateways forward it unchanged, while the path may lose its prefix), if
/// the mock still remembers it.
fn upstream_called_after(
    mock: &MockUpstream,
    path: &str,
    result: &load::StampedeResult,
) -> Option<f64> {
    let first_send = result.first_send;
    let (_, query) = path.split_once('?')?;
    mock.requests()
        .iter()
        .filter(|r| r.query == query && r.arrived >= first_send)
        .map(|r| r.arrived.duration_since(first_send).as_secs_f64() * 1e3)
        .reduce(f64::min)
}

/// Cold keys the `stampede` warm-up asks for: twice the workers, at least 4.
pub fn stampede_warmup_keys(workers: usize) -> usize {
    (2 * workers).max(4)
}

/// The longest the zipf warm-up may take to ask for every key once (about 10 s for 100,000
/// keys here, each a miss).
const ZIPF_SWEEP_LIMIT: Duration = Duration::from_secs(120);

/// A safety bound on requests: twice what `rate` would send in `duration`, at least 1,000.
fn max_requests(duration: Duration, rate: f64) -> u64 {
    ((duration.as_secs_f64() * rate * 2.0) as u64).max(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_table_sums_to_one_and_is_monotone() {
        for (n, s) in [(100_000, 1.0), (10, 1.0), (1000, 0.8), (1, 1.0)] {
            let cdf = zipf_cdf(n, s);
            assert_eq!(cdf.len(), n);
            assert_eq!(cdf[n - 1], 1.0);
            assert!(cdf.windows(2).all(|w| w[0] < w[1]), "not increasing");
            assert!(cdf[0] > 0.0);
            // Each key at most as likely as the one before it.
            let p: Vec<f64> = std::iter::once(cdf[0])
                .chain(cdf.windows(2).map(|w| w[1] - w[0]))
                .collect();
            assert!(p.windows(2).all(|w| w[0] >= w[1] - 1e-15));
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        }
        // s = 1 over 100,000 keys: key 0 takes 1/H(100000) ≈ 8.3%.
        let cdf = zipf_cdf(100_000, 1.0);
        assert!((cdf[0] - 0.0827).abs() < 0.001, "{}", cdf[0]);
    }

    #[test]
    fn zipf_pick_inverts_the_cdf() {
        let cdf = zipf_cdf(4, 1.0); // weights 1, 1/2, 1/3, 1/4 over 25/12
        assert_eq!(zipf_pick(&cdf, 0.0), 0);
        assert_eq!(zipf_pick(&cdf, 0.47), 0);
        assert_eq!(zipf_pick(&cdf, 0.49), 1);
        assert_eq!(zipf_pick(&cdf, 0.999_999), 3);
        assert_eq!(zipf_pick(&cdf, 1.0), 3);
        let mut rng = load::SplitMix64(7);
        let draws = 200_000;
        let zeros = (0..draws)
            .filter(|_| zipf_pick(&cdf, rng.next_f64()) == 0)
            .count();
        let share = zeros as f64 / draws as f64;
        assert!((share - 12.0 / 25.0).abs() < 0.01, "{share}");
    }

    #[test]
    fn the_upstream_call_is_timed_from_the_first_send() -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mock = rt.block_on(MockUpstream::start())?;
        let first_send = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let timeout = Duration::from_secs(5);
        load::get_once(mock.addr(), "/other?round=8", timeout)?;
        load::get_once(mock.addr(), "/stampede/properties?round=7", timeout)?;
        let result = load::StampedeResult {
            clients: 1,
            ok: 1,
            errors: load::Errors::default(),
            latency: None,
            first_send,
            upstream_called_after_ms: None,
        };
        // Matched by the query: the gateway may strip the path's first segment.
        let after = upstream_called_after(&mock, "/bench/stampede/properties?round=7", &result);
        assert!(
            after.is_some_and(|ms| (20.0..5000.0).contains(&ms)),
            "{after:?}"
        );
        let never = upstream_called_after(&mock, "/bench/stampede/properties?round=9", &result);
        assert_eq!(never, None);
        Ok(())
    }

    #[test]
    fn the_floor_waits_on_miss_and_stampede_paths_only() {
        let slow = super::super::Slow {
            prefixes: SLOW_PREFIXES.map(String::from).to_vec(),
            delay: Duration::from_millis(50),
        };
        let first = |p: &Paths| match p {
            Paths::Fixed(path) => path.clone(),
            Paths::Unique { prefix } => format!("{prefix}0"),
            Paths::Zipf { prefix, .. } => format!("{prefix}0"),
            other => panic!("unexpected paths {other:?}"),
        };
        let zipf = Arc::new(vec![1.0]);
        for (scenario, waits) in [
            (Scenario::Hot, false),
            (Scenario::Zipf, false),
            (Scenario::Miss, true),
            (Scenario::Stampede, true),
        ] {
            let path = first(&scenario_paths(scenario, 1, 0, &zipf, &PathBuf::new()));
            assert_eq!(slow.delay_for(&path).is_some(), waits, "{path}");
            assert!(scenario.includes(TargetKind::Floor));
        }
        assert!(!Scenario::Auth.includes(TargetKind::Floor));
        let instant = super::super::Slow {
            delay: Duration::ZERO,
            ..slow
        };
        assert_eq!(instant.delay_for("/bench/miss/properties?k=1"), None);
    }
}
