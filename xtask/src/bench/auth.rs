//! `auth`: what authentication, a key's rate limit and its daily quota cost on the hit path.
//!
//! The `hot` scenario against instances of the same release build, alternating inside each
//! round: `off` (no auth, no limits), `local` (`[auth] required = true`, requests carry a key
//! with a rate limit and a daily quota far above what the run sends, limits in process) and,
//! when Redis answers at `--redis-url`, `redis` (the same with `storage.redis_url` set, so
//! the rate limit and the quota are counted in Redis). Reported: req/s of each, the ratios
//! local/off and redis/off per round, and what the Redis round trip adds to p99 at a constant
//! rate (redis − local).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::load::{self, LoadResult, Paths, Percentiles};
use super::proc;
use super::report::{self, Check, Ratio};
use super::scenarios::{Ctx, HOT_PATH};
use super::targets::{Env, Server, TollgateSetup};
use super::{Progress, Scenario};

/// The bench key's rate limit: far above what a 2-core machine can send, so nothing is refused.
const KEY_RATE_LIMIT: &str = "1000000/s";
/// The bench key's daily request quota.
const KEY_DAILY_LIMIT: &str = "1000000000000";

/// One instance of the comparison.
struct Variant {
    name: &'static str,
    server: Server,
    headers: Vec<String>,
}

/// One measured run of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct AuthRun {
    /// `off`, `local` or `redis`.
    pub variant: &'static str,
    /// Round, from 1.
    pub round: usize,
    /// The closed-loop run.
    pub throughput: LoadResult,
    /// The constant-rate run.
    pub latency: LoadResult,
    /// Server CPU per request of the closed-loop run, µs.
    pub cpu_us_per_request: Option<f64>,
    /// Peak RSS during the run, KiB.
    pub peak_rss_kib: u64,
}

/// One variant's medians.
#[derive(Debug, Clone, Serialize)]
pub struct AuthRow {
    /// Variant.
    pub variant: &'static str,
    /// How it was configured.
    pub setup: String,
    /// Closed-loop req/s per round.
    pub rps_rounds: Vec<f64>,
    /// Their median.
    pub rps_median: Option<f64>,
    /// Median over rounds of the constant-rate percentiles.
    pub latency: Option<Percentiles>,
    /// Errors (any non-2xx/3xx answer counts: a 401 or 429 would show here).
    pub errors: u64,
    /// Median server CPU per request, µs.
    pub cpu_us_per_request: Option<f64>,
}

/// The `auth` scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct AuthReport {
    /// How load was offered, in words.
    pub method: String,
    /// Sanity probes: a request without a key, the key's limit headers, Redis's state.
    pub probes: Vec<String>,
    /// Every run.
    pub runs: Vec<AuthRun>,
    /// Medians per variant.
    pub rows: Vec<AuthRow>,
    /// `local/off` and `redis/off` req/s per round.
    pub ratios: Vec<Ratio>,
    /// Constant-rate p99 of `redis` minus that of `local`, per round, µs.
    pub redis_p99_added_us: Vec<f64>,
    /// Their median.
    pub redis_p99_added_median_us: Option<f64>,
    /// Targets and whether they were met.
    pub checks: Vec<Check>,
    /// Things the reader should know (e.g. Redis skipped).
    pub notes: Vec<String>,
}

/// Runs `auth`: starts the variants in `dir`, `rounds` rounds of each.
pub fn run(ctx: &Ctx, env: &Env, dir: &Path, progress: &Progress) -> anyhow::Result<AuthReport> {
    let s = ctx.settings;
    let mut notes = Vec::new();
    let mut probes = Vec::new();
    let redis = if s.redis_url.is_empty() {
        notes.push("--redis-url is empty: the Redis-backed variant was skipped".to_string());
        None
    } else {
        match redis_ping(&s.redis_url) {
            Ok(()) => Some(s.redis_url.clone()),
            Err(e) => {
                notes.push(format!(
                    "no Redis at {} ({e:#}): the Redis-backed variant was skipped",
                    s.redis_url
                ));
                None
            }
        }
    };
    let mut variants: Vec<(&'static str, TollgateSetup, String)> = vec![
        (
            "off",
            TollgateSetup::default(),
            "auth off, no limits".to_string(),
        ),
        (
            "local",
            TollgateSetup {
                auth_required: true,
                ..TollgateSetup::default()
            },
            format!(
                "[auth] required, key with --rate-limit {KEY_RATE_LIMIT} --daily-limit {KEY_DAILY_LIMIT} \
                 (limits and quota in process, quota flushed to SQLite)"
            ),
        ),
    ];
    if let Some(url) = redis {
        variants.push((
            "redis",
            TollgateSetup {
                auth_required: true,
                redis_url: url.clone(),
                ..TollgateSetup::default()
            },
            format!(
                "as local, with storage.redis_url = {url} (rate limit and quota counted in Redis)"
            ),
        ));
    }

    let mut started: Vec<Variant> = Vec::new();
    for (name, setup, _) in &variants {
        progress.0.set_message(format!("auth: starting {name}"));
        let mut key = None;
        let server = super::targets::start_tollgate(env, &dir.join(name), setup, |config| {
            if setup.auth_required {
                key = Some(create_key(env, config)?);
            }
            Ok(())
        })?;
        let headers: Vec<String> = key
            .iter()
            .map(|k| format!("Authorization: Bearer {k}"))
            .collect();
        started.push(Variant {
            name,
            server,
            headers,
        });
    }

    // Warm-up, then probes: the key is required and its limits apply, yet nothing is refused.
    let paths = Paths::Fixed(HOT_PATH.into());
    for v in &started {
        progress
            .0
            .set_message(format!("auth: warming up {}", v.name));
        ctx.closed_loop(&v.server, &paths, s.connections, s.hot_warmup, &v.headers)?;
        let with = load::fetch(v.server.addr, HOT_PATH, &v.headers, s.timeout)?;
        let mut p = format!(
            "auth {}: {} X-Cache: {}",
            v.name,
            with.status,
            load::header(&with.head, "x-cache").unwrap_or("-")
        );
        if !v.headers.is_empty() {
            let without = load::fetch(v.server.addr, HOT_PATH, &[], s.timeout)?;
            p.push_str(&format!(
                ", RateLimit-Limit: {}, RateLimit-Remaining: {}; without a key: {}",
                load::header(&with.head, "ratelimit-limit").unwrap_or("-"),
                load::header(&with.head, "ratelimit-remaining").unwrap_or("-"),
                without.status
            ));
            if without.status != 401 {
                notes.push(format!(
                    "auth {}: a request without a key got {}, not 401",
                    v.name, without.status
                ));
            }
        }
        if with.status != 200 {
            bail!(
                "auth {}: the warmed hot key answered {}",
                v.name,
                with.status
            );
        }
        progress.log(&p);
        probes.push(p);
    }

    let mut runs = Vec::new();
    for round in 1..=s.rounds {
        for v in &started {
            progress
                .0
                .set_message(format!("auth round {round}/{}: {}", s.rounds, v.name));
            let pid = v.server.pid();
            proc::reset_peak(pid);
            let before = proc::usage(pid);
            let throughput =
                ctx.closed_loop(&v.server, &paths, s.connections, s.duration, &v.headers)?;
            let after = proc::usage(pid);
            let latency = ctx.constant_rate(&v.server, &paths, s.auth_rate, &v.headers)?;
            let cpu = after.cpu_seconds - before.cpu_seconds;
            let run = AuthRun {
                variant: v.name,
                round,
                cpu_us_per_request: (throughput.requests > 0)
                    .then(|| cpu * 1e6 / throughput.requests as f64),
                peak_rss_kib: proc::usage(pid).peak_rss_kib,
                throughput,
                latency,
            };
            progress.log(one_line(&run));
            runs.push(run);
            progress.0.inc(1);
        }
    }
    for v in &started {
        if v.name == "redis" {
            let m = load::fetch(v.server.addr, "/metrics", &[], s.timeout)?;
            let up = load::metric(
                &m.body,
                "tollgate_dependency_up",
                &[("dependency", "redis")],
            );
            let p = format!(
                "auth redis: tollgate_dependency_up{{dependency=\"redis\"}} = {} after the runs",
                up.map_or("–".into(), |v| v.to_string())
            );
            if up != Some(1.0) {
                notes.push(format!(
                    "{p}: limits may have fallen back to the local limiter"
                ));
            }
            probes.push(p);
        }
    }
    drop(started);
    Ok(summarize(runs, &variants, probes, notes, ctx))
}

fn summarize(
    runs: Vec<AuthRun>,
    variants: &[(&'static str, TollgateSetup, String)],
    probes: Vec<String>,
    notes: Vec<String>,
    ctx: &Ctx,
) -> AuthReport {
    let of = |name: &str| -> Vec<&AuthRun> { runs.iter().filter(|r| r.variant == name).collect() };
    let rows: Vec<AuthRow> = variants
        .iter()
        .map(|(name, _, setup)| {
            let rs = of(name);
            let rps_rounds: Vec<f64> = rs.iter().map(|r| r.throughput.rps).collect();
            AuthRow {
                variant: name,
                setup: setup.clone(),
                rps_median: report::median(&rps_rounds),
                rps_rounds,
                latency: report::median_percentiles(
                    &rs.iter()
                        .filter_map(|r| r.latency.latency)
                        .collect::<Vec<_>>(),
                ),
                errors: rs
                    .iter()
                    .map(|r| r.throughput.errors.total() + r.latency.errors.total())
                    .sum(),
                cpu_us_per_request: report::median(
                    &rs.iter()
                        .filter_map(|r| r.cpu_us_per_request)
                        .collect::<Vec<_>>(),
                ),
            }
        })
        .collect();
    let per_round = |a: &str, b: &str, f: &dyn Fn(&AuthRun, &AuthRun) -> Option<f64>| {
        of(a)
            .iter()
            .filter_map(|x| {
                let y = of(b).into_iter().find(|y| y.round == x.round)?;
                f(x, y)
            })
            .collect::<Vec<f64>>()
    };
    let rps_ratio = |x: &AuthRun, y: &AuthRun| {
        (y.throughput.rps > 0.0).then(|| x.throughput.rps / y.throughput.rps)
    };
    let mut ratios = Vec::new();
    for name in ["local", "redis"] {
        let v = per_round(name, "off", &rps_ratio);
        if !v.is_empty() {
            ratios.push(Ratio {
                name: format!("{name}/off"),
                metric: "req/s".into(),
                median: report::median(&v),
                per_round: v,
            });
        }
    }
    let added = per_round("redis", "local", &|x, y| {
        Some(x.latency.latency?.p99_us - y.latency.latency?.p99_us)
    });
    let added_median = report::median(&added);
    let mut checks = Vec::new();
    if let Some(r) = ratios.iter().find(|r| r.name == "local/off") {
        checks.push(Check::at_least(
            "auth + key rate limit + quota on / off, hit req/s (median of rounds)",
            r.median,
            0.85,
            |v| format!("{v:.3}"),
        ));
    }
    if let Some(r) = ratios.iter().find(|r| r.name == "redis/off") {
        checks.push(Check::info(
            "the same with limits in Redis / off, hit req/s",
            r.median.map(|v| format!("{v:.3}")),
        ));
    }
    if !added.is_empty() {
        checks.push(Check::at_most(
            "p99 added by the Redis-backed check (redis − local, constant rate)",
            added_median.map(|us| us / 1000.0),
            0.3,
            |v| format!("{v:.3} ms"),
        ));
    }
    AuthReport {
        method: super::describe(Scenario::Auth, ctx.settings),
        probes,
        runs,
        rows,
        ratios,
        redis_p99_added_us: added,
        redis_p99_added_median_us: added_median,
        checks,
        notes,
    }
}

fn one_line(r: &AuthRun) -> String {
    let mut s = format!(
        "auth     r{} {:<8} {:>9} req/s ({})",
        r.round,
        r.variant,
        report::thousands(r.throughput.rps),
        r.throughput.generator
    );
    let errors = r.throughput.errors.total() + r.latency.errors.total();
    if errors > 0 {
        s.push_str(&format!(" errors {errors}"));
    }
    if let Some(l) = r.latency.latency {
        s.push_str(&format!(
            "  p50 {} p99 {} ms @const",
            report::ms(l.p50_us),
            report::ms(l.p99_us)
        ));
    }
    if let Some(c) = r.cpu_us_per_request {
        s.push_str(&format!(", CPU {c:.1} µs/req"));
    }
    s
}

/// Creates the bench key with `tollgate keys create --json` against `config`'s database; the
/// plaintext key.
fn create_key(env: &Env, config: &Path) -> anyhow::Result<String> {
    let out = Command::new(&env.tollgate)
        .arg("keys")
        .arg("create")
        .arg("--config")
        .arg(config)
        .args(["--name", "bench", "--rate-limit", KEY_RATE_LIMIT])
        .args(["--daily-limit", KEY_DAILY_LIMIT, "--json"])
        .output()
        .context("running tollgate keys create")?;
    if !out.status.success() {
        bail!(
            "tollgate keys create failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let created: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("parsing the output of tollgate keys create --json")?;
    created["key"]
        .as_str()
        .map(str::to_string)
        .context("tollgate keys create --json printed no \"key\"")
}

/// The `host:port` of a `redis://[user[:pw]@]host[:port][/db]` URL.
pub fn redis_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("redis://")
        .with_context(|| format!("{url:?} is not a redis:// URL"))?;
    let host_port = rest.split('/').next().unwrap_or("");
    let host_port = host_port.rsplit('@').next().unwrap_or(host_port);
    let with_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:6379")
    };
    with_port
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("{url:?}: no address"))
}

/// Whether a Redis answers `PING` at `url` (within a second).
fn redis_ping(url: &str) -> anyhow::Result<()> {
    let addr = redis_addr(url)?;
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf)?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    if reply.starts_with("+PONG") {
        Ok(())
    } else {
        bail!("PING answered {:?}", reply.trim())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn redis_urls() {
        assert_eq!(
            redis_addr("redis://127.0.0.1:6379/9").unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 6379))
        );
        assert_eq!(
            redis_addr("redis://:pw@127.0.0.1:7000").unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 7000))
        );
        assert_eq!(redis_addr("redis://127.0.0.1").unwrap().port(), 6379);
        assert!(redis_addr("http://127.0.0.1").is_err());
    }
}
