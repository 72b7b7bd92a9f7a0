//! Results: every run as recorded, per-scenario medians and the Tollgate/floor and
//! Tollgate/nginx ratios per round, a markdown table for stdout and JSON for
//! `target/bench/<timestamp>.json`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use super::auth::AuthReport;
use super::l1::L1Report;
use super::load::{LoadResult, Percentiles, StampedeResult};
use super::outage::OutageReport;
use super::scenarios::{Scenario, Settings};
use super::targets::TargetKind;

/// One measured run of one scenario against one target.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// Scenario.
    pub scenario: Scenario,
    /// Target.
    pub target: TargetKind,
    /// Round, from 1.
    pub round: usize,
    /// The closed-loop run (`hot`, `zipf`, `miss`).
    pub throughput: Option<LoadResult>,
    /// The constant-rate run (`hot`, `zipf`).
    pub latency: Option<LoadResult>,
    /// The one-shot run (`stampede`).
    pub stampede: Option<StampedeResult>,
    /// Calls the mock upstream received during the closed-loop (or stampede) part.
    pub upstream_calls: u64,
    /// `1 - upstream_calls / requests` during the closed-loop part (caches, `hot` and `zipf`).
    pub hit_ratio: Option<f64>,
    /// Server CPU seconds (user + system, whole process tree) during the closed-loop (or
    /// stampede) part.
    pub cpu_seconds: f64,
    /// `cpu_seconds` per request of the closed-loop part, µs.
    pub cpu_us_per_request: Option<f64>,
    /// Peak RSS during the run (VmHWM, reset before it), KiB, summed over the process tree.
    pub peak_rss_kib: u64,
    /// Proportional set size at the end of the run, KiB, summed over the process tree.
    pub pss_kib: u64,
    /// Processes in the server's tree.
    pub processes: usize,
}

impl RunRecord {
    /// An empty record.
    pub fn new(scenario: Scenario, target: TargetKind, round: usize) -> Self {
        RunRecord {
            scenario,
            target,
            round,
            throughput: None,
            latency: None,
            stampede: None,
            upstream_calls: 0,
            hit_ratio: None,
            cpu_seconds: 0.0,
            cpu_us_per_request: None,
            peak_rss_kib: 0,
            pss_kib: 0,
            processes: 0,
        }
    }

    /// One line for the log.
    pub fn one_line(&self) -> String {
        let mut s = format!(
            "{:<8} r{} {:<8}",
            self.scenario.name(),
            self.round,
            self.target.name()
        );
        if let Some(tp) = &self.throughput {
            let _ = write!(s, " {:>9} req/s ({})", thousands(tp.rps), tp.generator);
            if tp.errors.total() > 0 {
                let _ = write!(s, " errors {}", tp.errors.total());
            }
        }
        if let Some(l) = self.latency.as_ref().and_then(|l| l.latency) {
            let _ = write!(s, "  p50 {} p99 {} ms @const", ms(l.p50_us), ms(l.p99_us));
        } else if let Some(l) = self.throughput.as_ref().and_then(|t| t.latency) {
            let _ = write!(s, "  p50 {} p99 {} ms", ms(l.p50_us), ms(l.p99_us));
        }
        if let Some(st) = &self.stampede {
            let p = st.latency.unwrap_or_default();
            let _ = write!(
                s,
                " {} ok, {} errors, waiter p50 {} ms, max {} ms",
                st.ok,
                st.errors.total(),
                ms(p.p50_us),
                ms(p.max_us)
            );
            if let Some(after) = st.upstream_called_after_ms {
                let _ = write!(s, ", upstream called after {after:.1} ms");
            }
        }
        let _ = write!(s, "  upstream calls {}", self.upstream_calls);
        if let Some(h) = self.hit_ratio {
            let _ = write!(s, ", hit ratio {:.1}%", h * 100.0);
        }
        if let Some(c) = self.cpu_us_per_request {
            let _ = write!(s, ", CPU {c:.1} µs/req");
        }
        let _ = write!(s, ", peak RSS {} MiB", mib(self.peak_rss_kib));
        s
    }
}

/// Facts about the machine.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// `uname -r`.
    pub kernel: String,
}

impl Machine {
    /// Reads them.
    pub fn detect() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Machine {
            cpus,
            cpu_model,
            kernel,
        }
    }
}

/// A tool the bench uses, if found.
#[derive(Debug, Clone, Serialize)]
pub struct Tool {
    /// Program name.
    pub name: String,
    /// Where it was found.
    pub path: Option<String>,
    /// Its version line.
    pub version: Option<String>,
}

/// How one target was configured.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// Target.
    pub target: TargetKind,
    /// Its configuration in words.
    pub notes: String,
}

/// The whole bench.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// UTC start, `YYYY-MM-DDTHH:MM:SSZ`.
    pub started_at: String,
    /// The machine.
    pub machine: Machine,
    /// Settings.
    pub settings: Settings,
    /// Tools found or missing.
    pub tools: Vec<Tool>,
    /// Targets measured.
    pub targets: Vec<TargetInfo>,
    /// Things the reader should know (skipped targets, pinning, …).
    pub notes: Vec<String>,
    /// Sanity probes (e.g. the hot key's `X-Cache` after the warm-up).
    pub probes: Vec<String>,
    /// Every run, in the order run.
    pub runs: Vec<RunRecord>,
    /// Medians and ratios per scenario.
    pub summary: Vec<ScenarioSummary>,
    /// The `auth` scenario, when run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthReport>,
    /// The `l1` scenario, when run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l1: Option<L1Report>,
    /// The `outage` scenario, when run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outage: Option<OutageReport>,
}

/// One target's medians over the rounds of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Target.
    pub target: TargetKind,
    /// Closed-loop req/s per round.
    pub rps_rounds: Vec<f64>,
    /// Their median.
    pub rps_median: Option<f64>,
    /// Median over rounds of each latency percentile (constant-rate run for `hot`/`zipf`,
    /// closed-loop for `miss`, waiters for `stampede`).
    pub latency: Option<Percentiles>,
    /// Median over rounds of the closed-loop latency percentiles (coordinated omission!).
    pub closed_loop_latency: Option<Percentiles>,
    /// Errors over every run.
    pub errors: u64,
    /// Requests over the closed-loop runs.
    pub requests: u64,
    /// Upstream calls per round.
    pub upstream_calls: Vec<u64>,
    /// Median hit ratio.
    pub hit_ratio: Option<f64>,
    /// Median server CPU per request, µs.
    pub cpu_us_per_request: Option<f64>,
    /// Largest peak RSS of the runs, KiB.
    pub peak_rss_kib: u64,
    /// Generator lag at the constant rate, median p50 (the generator's own noise floor), µs.
    pub send_lag_p50_us: Option<f64>,
    /// `stampede`: median ms from the first send to the upstream call.
    pub upstream_called_after_ms: Option<f64>,
}

/// A ratio of Tollgate's req/s to another target's, per round and its median.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// E.g. `tollgate/floor`.
    pub name: String,
    /// What is compared.
    pub metric: String,
    /// Per round.
    pub per_round: Vec<f64>,
    /// Median.
    pub median: Option<f64>,
}

impl Ratio {
    /// `* name metric: r1 · r2 · r3 → median **m**`, for the markdown.
    pub fn line(&self) -> String {
        format!(
            "* {} {}: {} → median **{}**",
            self.name,
            self.metric,
            self.per_round
                .iter()
                .map(|v| format!("{v:.3}"))
                .collect::<Vec<_>>()
                .join(" · "),
            opt(self.median, |m| format!("{m:.3}"))
        )
    }
}

/// A scenario's table.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioSummary {
    /// Scenario.
    pub scenario: Scenario,
    /// How load was offered, in words.
    pub method: String,
    /// One row per target.
    pub rows: Vec<Row>,
    /// Ratios.
    pub ratios: Vec<Ratio>,
}

/// The median (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The median of each percentile over `ps`; `None` when empty.
pub fn median_percentiles(ps: &[Percentiles]) -> Option<Percentiles> {
    if ps.is_empty() {
        return None;
    }
    let m =
        |f: fn(&Percentiles) -> f64| median(&ps.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
    Some(Percentiles {
        p50_us: m(|p| p.p50_us),
        p90_us: m(|p| p.p90_us),
        p99_us: m(|p| p.p99_us),
        p999_us: m(|p| p.p999_us),
        max_us: m(|p| p.max_us),
        mean_us: m(|p| p.mean_us),
    })
}

/// Medians and ratios of `runs`, per scenario, targets in `order`.
pub fn summarize(
    runs: &[RunRecord],
    scenarios: &[Scenario],
    order: &[TargetKind],
    methods: &dyn Fn(Scenario) -> String,
) -> Vec<ScenarioSummary> {
    let mut out = Vec::new();
    for &scenario in scenarios {
        let of = |t: TargetKind| -> Vec<&RunRecord> {
            let mut v: Vec<&RunRecord> = runs
                .iter()
                .filter(|r| r.scenario == scenario && r.target == t)
                .collect();
            v.sort_by_key(|r| r.round);
            v
        };
        let mut rows = Vec::new();
        for &t in order {
            let rs = of(t);
            if rs.is_empty() {
                continue;
            }
            let rps_rounds: Vec<f64> = rs
                .iter()
                .filter_map(|r| r.throughput.as_ref().map(|t| t.rps))
                .collect();
            let latency: Vec<Percentiles> = rs
                .iter()
                .filter_map(|r| {
                    r.latency
                        .as_ref()
                        .and_then(|l| l.latency)
                        .or_else(|| r.stampede.as_ref().and_then(|s| s.latency))
                        .or_else(|| {
                            (scenario == Scenario::Miss)
                                .then(|| r.throughput.as_ref().and_then(|t| t.latency))
                                .flatten()
                        })
                })
                .collect();
            let closed: Vec<Percentiles> = rs
                .iter()
                .filter_map(|r| r.throughput.as_ref().and_then(|t| t.latency))
                .collect();
            let errors = rs
                .iter()
                .map(|r| {
                    r.throughput.as_ref().map_or(0, |t| t.errors.total())
                        + r.latency.as_ref().map_or(0, |t| t.errors.total())
                        + r.stampede.as_ref().map_or(0, |s| s.errors.total())
                })
                .sum();
            let lags: Vec<f64> = rs
                .iter()
                .filter_map(|r| {
                    r.latency
                        .as_ref()
                        .and_then(|l| l.send_lag)
                        .map(|p| p.p50_us)
                })
                .collect();
            rows.push(Row {
                target: t,
                rps_median: median(&rps_rounds),
                rps_rounds,
                latency: median_percentiles(&latency),
                closed_loop_latency: median_percentiles(&closed),
                errors,
                requests: rs
                    .iter()
                    .filter_map(|r| r.throughput.as_ref().map(|t| t.requests))
                    .sum(),
                upstream_calls: rs.iter().map(|r| r.upstream_calls).collect(),
                hit_ratio: median(&rs.iter().filter_map(|r| r.hit_ratio).collect::<Vec<_>>()),
                cpu_us_per_request: median(
                    &rs.iter()
                        .filter_map(|r| r.cpu_us_per_request)
                        .collect::<Vec<_>>(),
                ),
                peak_rss_kib: rs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0),
                send_lag_p50_us: median(&lags),
                upstream_called_after_ms: median(
                    &rs.iter()
                        .filter_map(|r| r.stampede.as_ref()?.upstream_called_after_ms)
                        .collect::<Vec<_>>(),
                ),
            });
        }
        let mut ratios = Vec::new();
        if scenario != Scenario::Stampede {
            let tollgate = of(TargetKind::Tollgate);
            for other in [TargetKind::Floor, TargetKind::Nginx, TargetKind::Varnish] {
                let theirs = of(other);
                let per_round: Vec<f64> = tollgate
                    .iter()
                    .filter_map(|a| {
                        let b = theirs.iter().find(|b| b.round == a.round)?;
                        let (a, b) = (a.throughput.as_ref()?.rps, b.throughput.as_ref()?.rps);
                        (b > 0.0).then_some(a / b)
                    })
                    .collect();
                if !per_round.is_empty() {
                    ratios.push(Ratio {
                        name: format!("tollgate/{}", other.name()),
                        metric: "req/s".into(),
                        median: median(&per_round),
                        per_round,
                    });
                }
            }
        }
        out.push(ScenarioSummary {
            scenario,
            method: methods(scenario),
            rows,
            ratios,
        });
    }
    out
}

/// A target of an issue, what was measured against it and whether it was met.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What is measured.
    pub what: String,
    /// The measured value as shown (`–` when it could not be measured).
    pub measured: String,
    /// The target, in words (empty for figures reported without a target).
    pub target: String,
    /// The measured value as a number, in the target's unit.
    pub value: Option<f64>,
    /// `Some(true)` met, `Some(false)` missed, `None` not judged.
    pub pass: Option<bool>,
}

impl Check {
    /// Met when `value ≥ min`.
    pub fn at_least(
        what: &str,
        value: Option<f64>,
        min: f64,
        show: impl Fn(f64) -> String,
    ) -> Check {
        Check {
            what: what.into(),
            measured: opt(value, &show),
            target: format!("≥ {}", show(min)),
            value,
            pass: value.map(|v| v >= min),
        }
    }

    /// Met when `value ≤ max`.
    pub fn at_most(
        what: &str,
        value: Option<f64>,
        max: f64,
        show: impl Fn(f64) -> String,
    ) -> Check {
        Check {
            what: what.into(),
            measured: opt(value, &show),
            target: format!("≤ {}", show(max)),
            value,
            pass: value.map(|v| v <= max),
        }
    }

    /// A figure reported without a target.
    pub fn info(what: &str, measured: Option<String>) -> Check {
        Check {
            what: what.into(),
            measured: measured.unwrap_or_else(|| "–".into()),
            target: String::new(),
            value: None,
            pass: None,
        }
    }

    /// `PASS`, `FAIL` or `–`.
    pub fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "PASS",
            Some(false) => "**FAIL**",
            None => "–",
        }
    }
}

/// `checks` as a markdown table.
pub fn checks_markdown(s: &mut String, checks: &[Check]) {
    if checks.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n| check | measured | target | result |");
    let _ = writeln!(s, "|---|---:|---|---|");
    for c in checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            c.what,
            c.measured,
            if c.target.is_empty() {
                "–"
            } else {
                &c.target
            },
            c.verdict()
        );
    }
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(v: f64) -> String {
    let n = v.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// µs → ms with a precision that suits loopback figures.
pub fn ms(us: f64) -> String {
    let m = us / 1000.0;
    if m < 10.0 {
        format!("{m:.3}")
    } else if m < 100.0 {
        format!("{m:.2}")
    } else {
        format!("{m:.1}")
    }
}

/// KiB → MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// `f(v)`, or `–` when `v` is `None`.
pub fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

/// The report as markdown.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## `cargo xtask bench` — {}\n", r.started_at);
    let _ = writeln!(
        s,
        "Machine: {} CPU(s), {}, Linux {}. Body {} bytes. {} round(s) of {} s per run, targets alternating inside each round.",
        r.machine.cpus,
        r.machine.cpu_model,
        r.machine.kernel,
        r.settings.body_bytes,
        r.settings.rounds,
        r.settings.duration.as_secs_f64()
    );
    for t in &r.targets {
        let _ = writeln!(s, "* **{}**: {}", t.target.name(), t.notes);
    }
    for n in &r.notes {
        let _ = writeln!(s, "* {n}");
    }
    for sum in &r.summary {
        let _ = writeln!(s, "\n### {}\n\n{}\n", sum.scenario.name(), sum.method);
        match sum.scenario {
            Scenario::Stampede => {
                let _ = writeln!(
                    s,
                    "| target | upstream calls per round | upstream called after ms | waiter p50 ms | p90 ms | p99 ms | max ms | errors | peak RSS MiB |"
                );
                let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
                for row in &sum.rows {
                    let l = row.latency;
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        row.target.name(),
                        row.upstream_calls
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(" · "),
                        opt(row.upstream_called_after_ms, |v| format!("{v:.1}")),
                        opt(l, |l| ms(l.p50_us)),
                        opt(l, |l| ms(l.p90_us)),
                        opt(l, |l| ms(l.p99_us)),
                        opt(l, |l| ms(l.max_us)),
                        row.errors,
                        mib(row.peak_rss_kib),
                    );
                }
            }
            _ => {
                let _ = writeln!(
                    s,
                    "| target | req/s (median) | req/s per round | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | upstream calls | hit ratio | CPU µs/req | peak RSS MiB |"
                );
                let _ = writeln!(
                    s,
                    "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                );
                for row in &sum.rows {
                    let l = row.latency;
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        row.target.name(),
                        opt(row.rps_median, thousands),
                        row.rps_rounds
                            .iter()
                            .map(|v| thousands(*v))
                            .collect::<Vec<_>>()
                            .join(" · "),
                        opt(l, |l| ms(l.p50_us)),
                        opt(l, |l| ms(l.p90_us)),
                        opt(l, |l| ms(l.p99_us)),
                        opt(l, |l| ms(l.p999_us)),
                        row.errors,
                        if row.target.caches() {
                            format!(
                                "{} / {}",
                                thousands(row.upstream_calls.iter().sum::<u64>() as f64),
                                thousands(row.requests as f64)
                            )
                        } else {
                            "–".into()
                        },
                        opt(row.hit_ratio, |h| format!("{:.2}%", h * 100.0)),
                        opt(row.cpu_us_per_request, |c| format!("{c:.1}")),
                        mib(row.peak_rss_kib),
                    );
                }
                if sum.scenario != Scenario::Miss {
                    let closed: Vec<String> = sum
                        .rows
                        .iter()
                        .filter_map(|row| {
                            row.closed_loop_latency.map(|l| {
                                format!(
                                    "{} {}/{}/{}",
                                    row.target.name(),
                                    ms(l.p50_us),
                                    ms(l.p99_us),
                                    ms(l.p999_us)
                                )
                            })
                        })
                        .collect();
                    if !closed.is_empty() {
                        let _ = writeln!(
                            s,
                            "\nClosed-loop latency p50/p99/p99.9 ms (subject to coordinated omission; for reference): {}.",
                            closed.join(", ")
                        );
                    }
                    let lags: Vec<String> = sum
                        .rows
                        .iter()
                        .filter_map(|row| {
                            row.send_lag_p50_us
                                .map(|l| format!("{} {l:.0} µs", row.target.name()))
                        })
                        .collect();
                    if !lags.is_empty() {
                        let _ = writeln!(
                            s,
                            "Constant-rate generator lag (its own noise floor, included in the latencies above), median p50: {}.",
                            lags.join(", ")
                        );
                    }
                }
            }
        }
        if !sum.ratios.is_empty() {
            let _ = writeln!(s);
        }
        for ratio in &sum.ratios {
            let _ = writeln!(s, "{}", ratio.line());
        }
    }
    if let Some(a) = &r.auth {
        auth_markdown(&mut s, a);
    }
    if let Some(l) = &r.l1 {
        let _ = writeln!(s, "\n### l1\n\n{}", l.method);
        let _ = writeln!(
            s,
            "\n| instance | L1 cap MiB | keys fed | body MiB fed | req/s | errors | L1 entries | L1 MiB (max sampled) | RSS before → after MiB | peak RSS MiB |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---|---|---:|");
        for (name, f) in [("10k keys", &l.keys), ("byte cap", &l.cap)] {
            let mb = |b: f64| format!("{:.1}", b / 1048576.0);
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} | {} | {} ({}) | {} → {} | {} |",
                f.l1_max_bytes / 1048576,
                thousands(f.keys as f64),
                mb(f.body_bytes_fed as f64),
                thousands(f.load.rps),
                f.load.errors.total(),
                opt(f.entries, thousands),
                opt(f.bytes, mb),
                opt(f.bytes_max_sampled, mb),
                mib(f.rss_before_kib),
                mib(f.rss_after_kib),
                mib(f.peak_rss_kib),
            );
        }
        checks_markdown(&mut s, &l.checks);
    }
    if let Some(o) = &r.outage {
        let _ = writeln!(s, "\n### outage\n\n{}\n", o.method);
        super::outage::markdown(&mut s, o);
        checks_markdown(&mut s, &o.checks);
    }
    if !r.probes.is_empty() {
        let _ = writeln!(s, "\nProbes: {}.", r.probes.join("; "));
    }
    s
}

fn auth_markdown(s: &mut String, a: &AuthReport) {
    let _ = writeln!(s, "\n### auth\n\n{}\n", a.method);
    let _ = writeln!(
        s,
        "| variant | req/s (median) | req/s per round | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | CPU µs/req | setup |"
    );
    let _ = writeln!(s, "|---|---:|---|---:|---:|---:|---:|---:|---:|---|");
    for row in &a.rows {
        let l = row.latency;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.variant,
            opt(row.rps_median, thousands),
            row.rps_rounds
                .iter()
                .map(|v| thousands(*v))
                .collect::<Vec<_>>()
                .join(" · "),
            opt(l, |l| ms(l.p50_us)),
            opt(l, |l| ms(l.p90_us)),
            opt(l, |l| ms(l.p99_us)),
            opt(l, |l| ms(l.p999_us)),
            row.errors,
            opt(row.cpu_us_per_request, |c| format!("{c:.1}")),
            row.setup,
        );
    }
    let _ = writeln!(s);
    for ratio in &a.ratios {
        let _ = writeln!(s, "{}", ratio.line());
    }
    if !a.redis_p99_added_us.is_empty() {
        let _ = writeln!(
            s,
            "* p99 added by Redis (redis − local, constant rate): {} ms → median **{}** ms",
            a.redis_p99_added_us
                .iter()
                .map(|v| ms(*v))
                .collect::<Vec<_>>()
                .join(" · "),
            opt(a.redis_p99_added_median_us, ms)
        );
    }
    for n in a.notes.iter().chain(&a.probes) {
        let _ = writeln!(s, "* {n}");
    }
    checks_markdown(s, &a.checks);
}

/// Writes the report to `dir/<timestamp>.json`; the path.
pub fn write_json(r: &Report, dir: &Path, stamp: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{stamp}.json"));
    let json = serde_json::to_string_pretty(r)?;
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Civil date (year, month, day) of a day count since 1970-01-01 (H. Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `(file stamp YYYYMMDDTHHMMSSZ, ISO 8601 YYYY-MM-DDTHH:MM:SSZ)` of a Unix time.
pub fn stamps(unix_secs: u64) -> (String, String) {
    let secs = unix_secs as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    let (h, mi, s) = (t / 3600, t % 3600 / 60, t % 60);
    (
        format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z"),
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::bench::load::{Errors, Mode};

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let (file, iso) = stamps(1_700_000_000);
        assert_eq!(file, "20231114T221320Z");
        assert_eq!(iso, "2023-11-14T22:13:20Z");
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(163_456.7), "163,457");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(ms(412.0), "0.412");
        assert_eq!(ms(50_400.0), "50.40");
        assert_eq!(ms(504_000.0), "504.0");
    }

    fn run(target: TargetKind, round: usize, rps: f64) -> RunRecord {
        let mut r = RunRecord::new(Scenario::Hot, target, round);
        r.throughput = Some(LoadResult {
            generator: "wrk",
            mode: Mode::ClosedLoop {
                connections: 64,
                threads: 2,
            },
            requests: (rps * 10.0) as u64,
            duration_s: 10.0,
            rps,
            errors: Errors::default(),
            latency: None,
            send_lag: None,
        });
        r
    }

    #[test]
    fn ratios_per_round_and_median() {
        let runs = vec![
            run(TargetKind::Tollgate, 1, 90.0),
            run(TargetKind::Floor, 1, 100.0),
            run(TargetKind::Tollgate, 2, 80.0),
            run(TargetKind::Floor, 2, 100.0),
            run(TargetKind::Tollgate, 3, 99.0),
            run(TargetKind::Floor, 3, 110.0),
        ];
        let sum = summarize(
            &runs,
            &[Scenario::Hot],
            &[TargetKind::Tollgate, TargetKind::Floor, TargetKind::Nginx],
            &|_| String::new(),
        );
        assert_eq!(sum.len(), 1);
        assert_eq!(sum[0].rows.len(), 2);
        assert_eq!(sum[0].rows[0].rps_median, Some(90.0));
        assert_eq!(sum[0].ratios.len(), 1);
        let r = &sum[0].ratios[0];
        assert_eq!(r.name, "tollgate/floor");
        assert_eq!(r.per_round, vec![0.9, 0.8, 0.9]);
        assert_eq!(r.median, Some(0.9));
    }
}
