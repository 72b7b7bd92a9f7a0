//! `outage`: Tollgate under steady load while its upstream fails and recovers.
//!
//! One Tollgate with the breaker (5 failures in a row open it for 5 s) and retries (3 attempts,
//! 50 ms base) on, upstream timeout 2 s, and two routes with TTL 2 s and `stale_if_error`:
//! `/sie/*`, and `/fallback/*` which also has a static fallback. A constant-rate load
//! (`--outage-rate`, default 500 req/s) runs through three phases: healthy (10 s), the
//! upstream failing (30 s; 10 s with `--quick`), recovered (10 s). 80% of the requests go to
//! 200 warm keys of `/sie/*` (cached in the healthy phase, stale a moment into the outage),
//! 10% to never-seen keys of `/sie/*` (nothing stale: 503 once the breaker is open), 10% to
//! never-seen keys of `/fallback/*` (the fallback). The mock upstream fails in-process
//! (`--outage-mode error`: 503 at once; `hang`: never answers) and is switched back after the
//! outage. Every 100 ms the bench reads `GET /admin/breakers`; `/metrics` is read at the
//! phase changes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::load::{self, Answer, Builtin, LoadResult, MixPart, Paths, Percentiles, Sample};
use super::report::{self, Check};
use super::scenarios::Ctx;
use super::targets::{Env, TollgateSetup};
use super::{Progress, Scenario};

const ADMIN_TOKEN: &str = "bench-admin";
/// Breaker `open_for` and the upstream `timeout` of the outage config, seconds.
const OPEN_FOR_S: u64 = 5;
const TIMEOUT_S: u64 = 2;
/// Warm keys of `/sie/*`.
const WARM_KEYS: usize = 200;
/// The retry budget Tollgate uses (breaker::BudgetConfig::default): 20% of recent
/// requests plus 1 retry per second.
const BUDGET_RATIO: f64 = 0.2;
const BUDGET_PER_SEC: f64 = 1.0;

/// The kinds of key of the load's mix, in [`Paths::Mix`] order.
pub const PARTS: [&str; 3] = ["warm keys", "new keys", "new keys, fallback route"];

/// How the upstream fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutageMode {
    /// Every call answered 503 at once.
    Error,
    /// Calls accepted and never answered (each costs Tollgate its upstream timeout).
    Hang,
}

/// One phase of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// `healthy`, `outage`, `outage, breaker open`, `recovered`.
    pub name: String,
    /// Seconds from the start of the load.
    pub from_s: f64,
    /// Seconds from the start of the load.
    pub to_s: f64,
    /// Requests meant to be sent in it.
    pub requests: u64,
    /// Share of those requests per answer (`HIT`, `STALE`, `fallback`, `503`, …).
    pub answers: Vec<(Answer, f64)>,
    /// The same per kind of key (see [`PARTS`]).
    pub answers_by_key: Vec<(&'static str, Vec<(Answer, f64)>)>,
    /// Latency from the intended send time.
    pub latency: Option<Percentiles>,
}

/// A reading of `GET /admin/breakers`.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerSample {
    /// Seconds from the start of the load.
    pub at_s: f64,
    /// `closed`, `open`, `half_open`.
    pub state: String,
    /// Mock upstream calls so far.
    pub upstream_calls: u64,
}

/// The `outage` scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct OutageReport {
    /// What was done, in words.
    pub method: String,
    /// How the upstream failed.
    pub mode: OutageMode,
    /// The whole constant-rate run.
    pub load: LoadResult,
    /// Per phase.
    pub phases: Vec<Phase>,
    /// Seconds from the failure until the breaker was first seen OPEN.
    pub time_to_open_s: Option<f64>,
    /// Seconds from the recovery until the breaker was first seen CLOSED again.
    pub time_to_close_s: Option<f64>,
    /// Calls the mock upstream received from the breaker opening to the recovery.
    pub upstream_calls_while_open: Option<u64>,
    /// Seconds from the breaker opening to the recovery.
    pub open_s: Option<f64>,
    /// At most one probe per `open_for` (plus, in `hang` mode, the probe's own timeout).
    pub probes_expected_max: Option<u64>,
    /// Mock upstream calls during the whole outage.
    pub upstream_calls_outage: u64,
    /// `tollgate_upstream_retries_total` during the outage.
    pub retries_outage: f64,
    /// `tollgate_retries_denied_total` during the outage.
    pub retries_denied_outage: f64,
    /// `tollgate_breaker_rejections_total` during the outage.
    pub breaker_rejections_outage: f64,
    /// The breaker as read every 100 ms (state changes only).
    pub breaker: Vec<BreakerSample>,
    /// Targets and whether they were met.
    pub checks: Vec<Check>,
}

/// Runs `outage` in `dir`.
pub fn run(ctx: &Ctx, env: &Env, dir: &Path, progress: &Progress) -> anyhow::Result<OutageReport> {
    let s = ctx.settings;
    let mock = ctx.mock;
    mock.set_status(None);
    mock.set_hang(false);
    progress.0.set_message("outage: starting tollgate");
    let route = |path: &str, extra: &str| {
        format!(
            "[[upstreams.routes]]\npath = \"{path}\"\nttl = \"2s\"\nstale_if_error = \"10m\"\ncost = 0.01\n{extra}\n"
        )
    };
    let setup = TollgateSetup {
        admin_token: ADMIN_TOKEN.into(),
        timeout: format!("{TIMEOUT_S}s"),
        upstream: format!(
            "breaker = {{ failure_threshold = 5, open_for = \"{OPEN_FOR_S}s\" }}\n\
             retry = {{ max_attempts = 3, base = \"50ms\", max = \"500ms\" }}\n"
        ),
        routes: format!(
            "{}{}",
            route("/sie/*", ""),
            route(
                "/fallback/*",
                r#"fallback = { status = 200, body = "{\"fallback\":true}" }"#
            )
        ),
        ..TollgateSetup::default()
    };
    let server = super::targets::start_tollgate(env, &dir.join("tollgate"), &setup, |_| Ok(()))?;
    let addr = server.addr;
    let auth = [format!("Authorization: Bearer {ADMIN_TOKEN}")];
    let probe = load::fetch(addr, "/admin/breakers", &auth, s.timeout)?;
    anyhow::ensure!(
        probe.status == 200,
        "GET /admin/breakers answered {}: {}",
        probe.status,
        probe.body
    );

    let (healthy, outage, recovery) = s.outage_phases;
    let load = Builtin {
        addr,
        paths: Paths::Mix {
            parts: Arc::new(vec![
                MixPart {
                    share: 0.8,
                    prefix: "/bench/sie/item?k=".into(),
                    keys: Some(WARM_KEYS),
                },
                MixPart {
                    share: 0.1,
                    prefix: "/bench/sie/item?cold=".into(),
                    keys: None,
                },
                MixPart {
                    share: 0.1,
                    prefix: "/bench/fallback/item?cold=".into(),
                    keys: None,
                },
            ]),
            seed: 5,
        },
        connections: s.connections,
        threads: s.wrk_threads,
        duration: healthy + outage + recovery,
        rate: Some(s.outage_rate),
        timeout: s.timeout,
        max_requests: ((healthy + outage + recovery).as_secs_f64() * s.outage_rate * 2.0) as u64,
        headers: Vec::new(),
    };
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let mut timeline = Timeline::default();
    let (loaded, breaker) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let load_thread = scope.spawn(|| load.run_recorded());
        let monitor = scope.spawn(|| watch_breaker(addr, &auth, mock, &stop, s.timeout));

        progress
            .0
            .set_message(format!("outage: healthy for {} s", healthy.as_secs()));
        sleep_until(t0 + healthy);
        timeline.before = metrics(addr, s.timeout);
        timeline.calls_at_fail = mock.calls();
        match s.outage_mode {
            OutageMode::Error => mock.set_status(Some(503)),
            OutageMode::Hang => mock.set_hang(true),
        }
        timeline.fail_at = Instant::now();
        progress.0.set_message(format!(
            "outage: upstream down ({:?}) for {} s",
            s.outage_mode,
            outage.as_secs()
        ));
        sleep_until(timeline.fail_at + outage);
        timeline.after = metrics(addr, s.timeout);
        timeline.calls_at_recover = mock.calls();
        mock.set_status(None);
        mock.set_hang(false);
        timeline.recover_at = Instant::now();
        progress
            .0
            .set_message(format!("outage: recovered for {} s", recovery.as_secs()));
        let loaded = load_thread.join();
        stop.store(true, Ordering::Release);
        let breaker = monitor.join();
        let loaded = loaded.map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        let breaker = breaker.map_err(|_| anyhow::anyhow!("the breaker monitor panicked"))?;
        Ok((loaded, breaker))
    })?;
    mock.set_status(None);
    mock.set_hang(false);
    drop(server);
    progress.0.inc(1);
    let report = analyze(s, t0, &timeline, loaded, breaker);
    for p in &report.phases {
        progress.log(format!(
            "outage   {:<22} {:>6} req, p99 {} ms: {}",
            p.name,
            p.requests,
            report::opt(p.latency, |l| report::ms(l.p99_us)),
            answers_text(&p.answers)
        ));
        if p.name == "outage" {
            for (k, a) in &p.answers_by_key {
                progress.log(format!("outage     {k}: {}", answers_text(a)));
            }
        }
    }
    Ok(report)
}

/// The instants and readings taken at the phase changes.
struct Timeline {
    fail_at: Instant,
    recover_at: Instant,
    calls_at_fail: u64,
    calls_at_recover: u64,
    before: Option<String>,
    after: Option<String>,
}

impl Default for Timeline {
    fn default() -> Self {
        let now = Instant::now();
        Timeline {
            fail_at: now,
            recover_at: now,
            calls_at_fail: 0,
            calls_at_recover: 0,
            before: None,
            after: None,
        }
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn metrics(addr: std::net::SocketAddr, timeout: Duration) -> Option<String> {
    load::fetch(addr, "/metrics", &[], timeout)
        .ok()
        .filter(|m| m.status == 200)
        .map(|m| m.body)
}

/// Reads the breaker of upstream `bench` every 100 ms until `stop`: `(when, state, mock calls)`.
fn watch_breaker(
    addr: std::net::SocketAddr,
    auth: &[String],
    mock: &mock_upstream::MockUpstream,
    stop: &AtomicBool,
    timeout: Duration,
) -> Vec<(Instant, String, u64)> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let at = Instant::now();
        let calls = mock.calls();
        let state = load::fetch(addr, "/admin/breakers", auth, timeout)
            .ok()
            .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
            .and_then(|v| v["breakers"]["bench"]["state"].as_str().map(str::to_string))
            .unwrap_or_else(|| "unreadable".into());
        out.push((at, state, calls));
        std::thread::sleep(Duration::from_millis(100));
    }
    out
}

fn analyze(
    s: &super::scenarios::Settings,
    t0: Instant,
    tl: &Timeline,
    (load, samples): (LoadResult, Vec<Sample>),
    breaker: Vec<(Instant, String, u64)>,
) -> OutageReport {
    let secs = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let opened = breaker
        .iter()
        .find(|(at, state, _)| *at >= tl.fail_at && *at < tl.recover_at && state == "open");
    let closed_again = breaker
        .iter()
        .find(|(at, state, _)| *at >= tl.recover_at && state == "closed");
    let end = samples
        .iter()
        .map(|x| x.intended)
        .max()
        .unwrap_or(tl.recover_at)
        .max(tl.recover_at);
    let mut phases = vec![
        phase("healthy", t0, tl.fail_at, &samples, t0),
        phase("outage", tl.fail_at, tl.recover_at, &samples, t0),
    ];
    if let Some((at, _, _)) = opened {
        phases.push(phase(
            "outage, breaker open",
            *at,
            tl.recover_at,
            &samples,
            t0,
        ));
    }
    phases.push(phase("recovered", tl.recover_at, end, &samples, t0));

    let metric = |text: &Option<String>, name: &str| {
        text.as_deref()
            .and_then(|t| load::metric(t, name, &[("upstream", "bench")]))
            .unwrap_or(0.0)
    };
    let delta = |name: &str| metric(&tl.after, name) - metric(&tl.before, name);
    let retries = delta("tollgate_upstream_retries_total");
    let outage = &phases[1];
    let outage_s = tl
        .recover_at
        .saturating_duration_since(tl.fail_at)
        .as_secs_f64();
    let open_s =
        opened.map(|(at, _, _)| tl.recover_at.saturating_duration_since(*at).as_secs_f64());
    let period = OPEN_FOR_S as f64
        + match s.outage_mode {
            OutageMode::Error => 0.0,
            OutageMode::Hang => TIMEOUT_S as f64,
        };
    let probes_expected_max = open_s.map(|o| (o / period).ceil() as u64);
    let calls_open = opened.map(|(_, _, calls)| tl.calls_at_recover.saturating_sub(*calls));
    let share = |a: Answer| {
        outage
            .answers
            .iter()
            .find(|(x, _)| *x == a)
            .map_or(0.0, |(_, v)| *v)
    };
    let budget = BUDGET_RATIO * outage.requests as f64 + BUDGET_PER_SEC * outage_s;
    let requests = outage.requests.max(1) as f64;
    let pct = |v: f64| format!("{:.1}%", v * 100.0);
    let while_open = match (open_s, probes_expected_max) {
        (Some(open_s), Some(max)) => Check::at_most(
            &format!(
                "upstream calls while the breaker was OPEN ({open_s:.1} s; probes only: ≤ 1 per {period:.0} s)"
            ),
            calls_open.map(|c| c as f64),
            max as f64,
            |v| format!("{v:.0}"),
        ),
        _ => Check {
            pass: Some(false),
            ..Check::info(
                "upstream calls while the breaker was OPEN",
                Some("the breaker was never seen OPEN during the outage".into()),
            )
        },
    };
    let checks = vec![
        while_open,
        Check::at_most(
            &format!(
                "client p99 during the outage (upstream timeout {TIMEOUT_S} s; target 10% of it)"
            ),
            outage.latency.map(|l| l.p99_us / 1000.0),
            TIMEOUT_S as f64 * 100.0,
            |v| format!("{v:.1} ms"),
        ),
        Check::info(
            "client p99 during the outage once the breaker was open",
            phases
                .iter()
                .find(|p| p.name == "outage, breaker open")
                .and_then(|p| p.latency)
                .map(|l| format!("{} ms", report::ms(l.p99_us))),
        ),
        Check::info(
            "outage requests answered STALE / fallback / 503 / HIT",
            Some(format!(
                "{} / {} / {} / {}",
                pct(share(Answer::Stale)),
                pct(share(Answer::Fallback)),
                pct(share(Answer::Unavailable)),
                pct(share(Answer::Hit))
            )),
        ),
        Check::at_most(
            &format!(
                "retries / requests during the outage ({} retries, {} denied by the budget)",
                retries,
                delta("tollgate_retries_denied_total")
            ),
            Some(retries / requests),
            budget / requests,
            pct,
        ),
    ];
    let mut changes: Vec<BreakerSample> = Vec::new();
    for (at, state, calls) in &breaker {
        if changes.last().is_none_or(|c| &c.state != state) {
            changes.push(BreakerSample {
                at_s: secs(*at),
                state: state.clone(),
                upstream_calls: *calls,
            });
        }
    }
    OutageReport {
        method: super::describe(Scenario::Outage, s),
        mode: s.outage_mode,
        load,
        time_to_open_s: opened
            .map(|(at, _, _)| at.saturating_duration_since(tl.fail_at).as_secs_f64()),
        time_to_close_s: closed_again
            .map(|(at, _, _)| at.saturating_duration_since(tl.recover_at).as_secs_f64()),
        upstream_calls_while_open: calls_open,
        open_s,
        probes_expected_max,
        upstream_calls_outage: tl.calls_at_recover.saturating_sub(tl.calls_at_fail),
        retries_outage: retries,
        retries_denied_outage: delta("tollgate_retries_denied_total"),
        breaker_rejections_outage: delta("tollgate_breaker_rejections_total"),
        breaker: changes,
        phases,
        checks,
    }
}

/// The samples meant to be sent in `[from, to)`.
fn phase(name: &str, from: Instant, to: Instant, samples: &[Sample], t0: Instant) -> Phase {
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|x| x.intended >= from && x.intended < to)
        .collect();
    let shares = |of: &dyn Fn(&Sample) -> bool| {
        let mut counts: std::collections::BTreeMap<Answer, u64> = Default::default();
        let mut n = 0u64;
        for x in inside.iter().filter(|x| of(x)) {
            *counts.entry(x.answer).or_default() += 1;
            n += 1;
        }
        counts
            .into_iter()
            .map(|(a, c)| (a, c as f64 / n.max(1) as f64))
            .collect::<Vec<_>>()
    };
    let mut latencies: Vec<u64> = inside.iter().map(|x| x.latency_ns).collect();
    Phase {
        name: name.into(),
        from_s: from.saturating_duration_since(t0).as_secs_f64(),
        to_s: to.saturating_duration_since(t0).as_secs_f64(),
        requests: inside.len() as u64,
        answers: shares(&|_| true),
        answers_by_key: PARTS
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, shares(&|x: &Sample| x.part == i)))
            .collect(),
        latency: load::percentiles(&mut latencies),
    }
}

/// `STALE 62.0%, 503 10.1%, …`
pub fn answers_text(answers: &[(Answer, f64)]) -> String {
    answers
        .iter()
        .map(|(a, v)| format!("{} {:.1}%", a.name(), v * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `outage` section of the markdown report.
pub fn markdown(s: &mut String, r: &OutageReport) {
    use std::fmt::Write as _;
    let _ = writeln!(
        s,
        "| phase | from–to s | requests | p50 ms | p99 ms | max ms | answers |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---|");
    for p in &r.phases {
        let l = p.latency;
        let _ = writeln!(
            s,
            "| {} | {:.1}–{:.1} | {} | {} | {} | {} | {} |",
            p.name,
            p.from_s,
            p.to_s,
            report::thousands(p.requests as f64),
            report::opt(l, |l| report::ms(l.p50_us)),
            report::opt(l, |l| report::ms(l.p99_us)),
            report::opt(l, |l| report::ms(l.max_us)),
            answers_text(&p.answers)
        );
    }
    if let Some(p) = r.phases.iter().find(|p| p.name == "outage") {
        let _ = writeln!(
            s,
            "\nOutage answers by kind of key: {}.",
            p.answers_by_key
                .iter()
                .map(|(k, a)| format!("{k}: {}", answers_text(a)))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let _ = writeln!(
        s,
        "\nBreaker (read every 100 ms): {}. Opened {} s after the failure, closed {} s after the \
         recovery. Upstream calls during the outage: {}; retries {}, denied by the budget {}, \
         calls refused by the open breaker {}.",
        r.breaker
            .iter()
            .map(|b| format!("{} at {:.1} s", b.state, b.at_s))
            .collect::<Vec<_>>()
            .join(" → "),
        report::opt(r.time_to_open_s, |v| format!("{v:.1}")),
        report::opt(r.time_to_close_s, |v| format!("{v:.1}")),
        r.upstream_calls_outage,
        r.retries_outage,
        r.retries_denied_outage,
        r.breaker_rejections_outage,
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn phases_split_samples_by_intended_time() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let sample = |ms: u64, answer: Answer, lat_ms: u64| Sample {
            intended: at(ms),
            latency_ns: lat_ms * 1_000_000,
            answer,
            part: usize::from(answer == Answer::Unavailable),
        };
        let samples = vec![
            sample(10, Answer::Hit, 1),
            sample(1000, Answer::Stale, 2),
            sample(1500, Answer::Unavailable, 3),
            sample(1999, Answer::Stale, 4),
            sample(2000, Answer::Hit, 1),
        ];
        let p = phase("outage", at(1000), at(2000), &samples, t0);
        assert_eq!(p.requests, 3);
        assert_eq!(p.from_s, 1.0);
        assert_eq!(
            p.answers,
            vec![(Answer::Stale, 2.0 / 3.0), (Answer::Unavailable, 1.0 / 3.0)]
        );
        assert_eq!(p.latency.unwrap().max_us, 4000.0);
        assert_eq!(answers_text(&p.answers), "STALE 66.7%, 503 33.3%");
        assert_eq!(p.answers_by_key[0], (PARTS[0], vec![(Answer::Stale, 1.0)]));
        assert_eq!(
            p.answers_by_key[1],
            (PARTS[1], vec![(Answer::Unavailable, 1.0)])
        );
    }
}
