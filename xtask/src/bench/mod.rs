//! `cargo xtask bench`: Tollgate beside its peers on this machine, in one run.
//!
//! Starts an in-process mock upstream, the Tollgate release build, the floor (a bare
//! actix-web handler: `xtask __floor`), and nginx / Varnish when installed, all on free
//! loopback ports with configs generated into a temp dir; runs each scenario in rounds with
//! the targets alternating (A B C D, A B C D, …); prints a markdown table with medians and the
//! Tollgate/floor and Tollgate/nginx ratios per round; writes everything to
//! `target/bench/<timestamp>.json`.
//!
//! `cargo xtask` is a debug build, too slow to generate load or to be the floor, so the debug
//! binary only builds the release binaries (`tollgate` and `xtask`) and hands over to the
//! release `xtask bench` with the same arguments.
//!
//! Files: `targets.rs` (servers), `load.rs` (wrk and the built-in generator),
//! `scenarios.rs` (what each scenario does), `report.rs` (tables and JSON), `proc.rs`
//! (CPU and memory of the server processes); the opt-in scenarios that measure Tollgate
//! alone against the issues' targets, each with instances configured for it: `auth.rs`,
//! `l1.rs`, `outage.rs`.

mod auth;
mod l1;
mod load;
mod outage;
mod proc;
mod report;
mod scenarios;
mod targets;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

use report::{Machine, Report, RunRecord, TargetInfo, Tool};
use scenarios::{Ctx, Scenario, Settings};
use targets::{Env, Server, TargetKind};

pub use targets::{Slow, run_floor};

/// Set in the environment of the release `xtask bench` started by the debug one.
const INNER: &str = "TOLLGATE_BENCH_INNER";

/// `cargo xtask bench` options.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Smoke run: 1 round of 3 s, 10,000 Zipf keys, short warm-ups.
    #[arg(long)]
    pub quick: bool,
    /// Scenarios to run, in this order. Opt-in, Tollgate alone against the issues' targets:
    /// auth, l1, outage (~4 min together; ~2 min with --quick).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "hot,zipf,miss,stampede"
    )]
    pub scenarios: Vec<Scenario>,
    /// Rounds per scenario (default 3; 1 with --quick).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Length of every measured run, e.g. 10s, 500ms, 1m (default 10s; 3s with --quick).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Connections of the hot and zipf runs.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Targets, in the order they alternate.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "tollgate,floor,nginx,varnish"
    )]
    pub targets: Vec<TargetKind>,
    /// Requests per second of the constant-rate latency runs (hot, zipf).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Worker threads / processes of every server.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Keys of the zipf scenario (default 100,000; 10,000 with --quick).
    #[arg(long)]
    pub zipf_keys: Option<usize>,
    /// Pin the servers to CPU 0 and the load generators (and the mock upstream) to CPU 1
    /// with taskset.
    #[arg(long)]
    pub pin: bool,
    /// Use the built-in load generator even when wrk is installed.
    #[arg(long)]
    pub no_wrk: bool,
    /// Redis of the `auth` scenario's Redis-backed variant (a database of its own; empty to
    /// skip the variant; skipped anyway when nothing answers PING there).
    #[arg(long, default_value = "redis://127.0.0.1:6379/9")]
    pub redis_url: String,
    /// How the upstream fails in the `outage` scenario.
    #[arg(long, value_enum, default_value = "error")]
    pub outage_mode: outage::OutageMode,
    /// Requests per second of the `outage` scenario's steady load.
    #[arg(long, default_value_t = 500.0)]
    pub outage_rate: f64,
}

/// Parses `500ms`, `10s`, `2m` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 10s, 500ms, 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s or m")),
    };
    if !(secs > 0.0 && secs <= 3600.0) {
        return Err(format!("duration {s:?} out of range (0, 1h]"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs the bench (handing over to a release build of this program first when needed).
pub fn run(args: BenchArgs, root: &Path) -> anyhow::Result<()> {
    let inner = std::env::var_os(INNER).is_some();
    if cfg!(debug_assertions) && !inner {
        return hand_over(root);
    }
    if !inner {
        build(root, &["tollgate"])?;
    }
    bench(args, root)
}

fn build(root: &Path, packages: &[&str]) -> anyhow::Result<()> {
    eprintln!(
        "building {} (release; the first build takes ~5 min)…",
        packages.join(" and ")
    );
    let mut cmd = Command::new(cargo());
    cmd.args(["build", "--release"]).current_dir(root);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    Ok(())
}

/// Builds the release binaries and re-runs `xtask bench` from the release build.
fn hand_over(root: &Path) -> anyhow::Result<()> {
    build(root, &["tollgate", "xtask"])?;
    let exe = target_dir(root).join("release/xtask");
    let status = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(INNER, "1")
        .status()
        .with_context(|| format!("starting {}", exe.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn tool(name: &str, version_args: &[&str]) -> Tool {
    let path = targets::which(name);
    let version = path.as_ref().and_then(|p| {
        let out = Command::new(p).args(version_args).output().ok()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("Usage"))
            .map(str::to_string)
    });
    Tool {
        name: name.into(),
        path: path.map(|p| p.display().to_string()),
        version,
    }
}

/// Where progress goes: the bar when it is drawn, else stderr.
struct Progress(ProgressBar);

impl Progress {
    fn log(&self, msg: impl AsRef<str>) {
        if self.0.is_hidden() {
            eprintln!("{}", msg.as_ref());
        } else {
            self.0.println(msg.as_ref());
        }
    }
}

fn bench(args: BenchArgs, root: &Path) -> anyhow::Result<()> {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (stamp, started_at) = report::stamps(started);
    let machine = Machine::detect();
    let mut notes = Vec::new();

    let tools = vec![
        tool("wrk", &["--version"]),
        tool("nginx", &["-v"]),
        tool("varnishd", &["-V"]),
        tool("taskset", &["--version"]),
    ];
    let found = |name: &str| tools.iter().any(|t| t.name == name && t.path.is_some());
    let use_wrk = found("wrk") && !args.no_wrk;
    if !found("wrk") {
        notes.push(
            "wrk not found (apt-get install wrk): the built-in generator runs the closed-loop load"
                .into(),
        );
    } else if args.no_wrk {
        notes.push("--no-wrk: the built-in generator runs the closed-loop load".into());
    }
    let mut kinds: Vec<TargetKind> = Vec::new();
    for &k in &args.targets {
        if kinds.contains(&k) {
            continue;
        }
        match k.program() {
            Some(p) if !found(p) => notes.push(format!(
                "{p} not found (apt-get install {}): {} skipped",
                if k == TargetKind::Nginx {
                    "nginx-light"
                } else {
                    "varnish"
                },
                k.name()
            )),
            _ => kinds.push(k),
        }
    }
    if kinds.is_empty() {
        bail!("no target to measure");
    }
    let pin = if args.pin {
        if !found("taskset") {
            notes.push("--pin ignored: taskset not found".into());
            None
        } else if machine.cpus < 2 {
            notes.push("--pin ignored: fewer than 2 CPUs".into());
            None
        } else {
            Some((0, 1))
        }
    } else {
        None
    };

    let quick = args.quick;
    let settings = Settings {
        quick,
        rounds: args.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
        duration: args
            .duration
            .unwrap_or(Duration::from_secs(if quick { 3 } else { 10 })),
        connections: args.connections.max(1),
        wrk_threads: 2.min(args.connections.max(1)),
        rate: args.rate.max(1.0),
        zipf_keys: args
            .zipf_keys
            .unwrap_or(if quick { 10_000 } else { 100_000 })
            .max(1),
        zipf_s: 1.0,
        zipf_warmup: Duration::from_secs(if quick { 2 } else { 5 }),
        hot_warmup: Duration::from_millis(if quick { 500 } else { 1000 }),
        miss_connections: 1000,
        stampede_clients: 1000,
        upstream_delay: Duration::from_millis(50),
        body_bytes: mock_upstream::DEFAULT_BODY_BYTES,
        server_workers: args.workers.max(1),
        use_wrk,
        pin,
        timeout: Duration::from_secs(10),
        redis_url: args.redis_url.trim().to_string(),
        l1_keys: 10_000,
        l1_cap_bytes: 4 * 1024 * 1024,
        auth_rate: 1000.0,
        outage_rate: args.outage_rate.max(1.0),
        outage_phases: (
            Duration::from_secs(10),
            Duration::from_secs(if quick { 10 } else { 30 }),
            Duration::from_secs(10),
        ),
        outage_mode: args.outage_mode,
    };
    if let Some((servers, load)) = pin {
        // The mock upstream and the built-in generator live in this process.
        let me = std::process::id().to_string();
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", &load.to_string(), &me])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        notes.push(format!(
            "pinned with taskset: servers on CPU {servers}; load generator{} on CPU {load}",
            if ok {
                ", mock upstream and this process"
            } else {
                " (pinning this process failed)"
            }
        ));
    } else if machine.cpus <= 2 {
        notes.push(format!(
            "not pinned: servers, load generator and mock upstream share {} CPU(s) (try --pin)",
            machine.cpus
        ));
    }
    targets::install_signal_handler()?;

    let tmp = std::env::temp_dir().join(format!("tollgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    targets::register_dir(tmp.clone());
    let result = run_scenarios(&args, root, &settings, &kinds, &tmp, &mut notes);
    let (runs, infos, probes, own) = match result {
        Ok(v) => v,
        Err(e) => {
            targets::cleanup_all();
            return Err(e);
        }
    };
    targets::remove_dir(&tmp);

    let method = |s: Scenario| describe(s, &settings);
    let classic: Vec<Scenario> = args
        .scenarios
        .iter()
        .copied()
        .filter(|s| !s.tollgate_only())
        .collect();
    let summary = report::summarize(&runs, &classic, &kinds, &method);
    let report = Report {
        started_at,
        machine,
        settings,
        tools,
        targets: infos,
        notes,
        probes,
        runs,
        summary,
        auth: own.auth,
        l1: own.l1,
        outage: own.outage,
    };
    println!("{}", report::markdown(&report));
    let path = report::write_json(&report, &target_dir(root).join("bench"), &stamp)?;
    println!("JSON: {}", path.display());
    Ok(())
}

type Outcome = (Vec<RunRecord>, Vec<TargetInfo>, Vec<String>, Own);

/// Results of the Tollgate-only scenarios.
#[derive(Default)]
struct Own {
    auth: Option<auth::AuthReport>,
    l1: Option<l1::L1Report>,
    outage: Option<outage::OutageReport>,
}

fn run_scenarios(
    args: &BenchArgs,
    root: &Path,
    settings: &Settings,
    kinds: &[TargetKind],
    tmp: &Path,
    notes: &mut Vec<String>,
) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mock-upstream")
        .enable_all()
        .build()?;
    let mock = rt.block_on(mock_upstream::MockUpstream::start())?;
    mock.set_body_bytes(settings.body_bytes);

    let env = Env {
        tollgate: target_dir(root).join("release/tollgate"),
        xtask: std::env::current_exe().context("locating this program")?,
        upstream: mock.addr(),
        body_bytes: settings.body_bytes,
        upstream_delay: settings.upstream_delay,
        workers: settings.server_workers,
        pin_cpu: settings.pin.map(|(servers, _)| servers),
    };
    let needs_tollgate =
        kinds.contains(&TargetKind::Tollgate) || args.scenarios.iter().any(|s| s.tollgate_only());
    if needs_tollgate && !env.tollgate.is_file() {
        bail!(
            "{} is missing: run `cargo build --release -p tollgate`",
            env.tollgate.display()
        );
    }
    let zipf = Arc::new(scenarios::zipf_cdf(settings.zipf_keys, settings.zipf_s));
    let zipf_file = tmp.join("zipf-cdf.txt");
    if args.scenarios.contains(&Scenario::Zipf) {
        let text: String = zipf.iter().map(|p| format!("{p:.17}\n")).collect();
        std::fs::write(&zipf_file, text)?;
    }
    let ctx = Ctx {
        settings,
        mock: &mock,
        dir: tmp.to_path_buf(),
        zipf,
        zipf_file,
    };

    let total: usize = args
        .scenarios
        .iter()
        .map(|s| {
            kinds.iter().filter(|&&k| s.includes(k)).count() * settings.rounds
                + s.own_steps(settings)
        })
        .sum();
    let bar = ProgressBar::new(total as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} runs  {msg}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    let progress = Progress(bar);
    progress.log(format!(
        "targets: {}; scenarios: {}; {} round(s) of {} s; closed-loop load by {}",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", "),
        args.scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        settings.rounds,
        settings.duration.as_secs_f64(),
        if settings.use_wrk {
            "wrk"
        } else {
            "the built-in generator"
        }
    ));
    for n in notes.iter() {
        progress.log(format!("note: {n}"));
    }

    let mut runs = Vec::new();
    let mut infos: Vec<TargetInfo> = Vec::new();
    let mut probes = Vec::new();
    let mut own = Own::default();
    for &scenario in &args.scenarios {
        let began = Instant::now();
        mock.set_delay(scenario.upstream_delay(settings));
        let dir = tmp.join(scenario.name());
        if scenario.tollgate_only() {
            let result = match scenario {
                Scenario::Auth => {
                    auth::run(&ctx, &env, &dir, &progress).map(|r| own.auth = Some(r))
                }
                Scenario::L1 => l1::run(&ctx, &env, &dir, &progress).map(|r| own.l1 = Some(r)),
                _ => outage::run(&ctx, &env, &dir, &progress).map(|r| own.outage = Some(r)),
            };
            if let Err(e) = result {
                let msg = format!("{} failed: {e:#}", scenario.name());
                progress.log(&msg);
                notes.push(short(&msg));
            }
            if !infos.iter().any(|i| i.target == TargetKind::Tollgate) {
                infos.push(TargetInfo {
                    target: TargetKind::Tollgate,
                    notes: format!(
                        "release build, [server] workers = {}, SQLite L2, RUST_LOG=warn \
                         (auth, l1 and outage configure their own instances)",
                        env.workers
                    ),
                });
            }
            targets::remove_dir(&dir);
            progress.log(format!(
                "{} done in {:.0} s",
                scenario.name(),
                began.elapsed().as_secs_f64()
            ));
            continue;
        }
        let mut servers: Vec<Server> = Vec::new();
        for &kind in kinds.iter().filter(|&&k| scenario.includes(k)) {
            progress
                .0
                .set_message(format!("{}: starting {}", scenario.name(), kind.name()));
            match targets::start(kind, &env, &dir) {
                Ok(server) => {
                    if !infos.iter().any(|i| i.target == kind) {
                        infos.push(TargetInfo {
                            target: kind,
                            notes: server.notes.clone(),
                        });
                    }
                    servers.push(server);
                }
                Err(e) => {
                    let msg = format!(
                        "{}: {} did not start, skipped: {e:#}",
                        scenario.name(),
                        kind.name()
                    );
                    progress.log(&msg);
                    notes.push(short(&msg));
                    progress.0.inc(settings.rounds as u64);
                }
            }
        }
        for server in &servers {
            progress.0.set_message(format!(
                "{}: warming up {}",
                scenario.name(),
                server.kind.name()
            ));
            match ctx.warm_up(scenario, server) {
                Ok(Some(probe)) => {
                    let p = format!(
                        "{} {} after warm-up: {probe}",
                        scenario.name(),
                        server.kind.name()
                    );
                    progress.log(&p);
                    probes.push(p);
                }
                Ok(None) => {}
                Err(e) => {
                    let msg = format!(
                        "{}: warming up {} failed: {e:#}",
                        scenario.name(),
                        server.kind.name()
                    );
                    progress.log(&msg);
                    notes.push(short(&msg));
                }
            }
        }
        for round in 1..=settings.rounds {
            for server in &servers {
                progress.0.set_message(format!(
                    "{} round {round}/{}: {}",
                    scenario.name(),
                    settings.rounds,
                    server.kind.name()
                ));
                match ctx.measure(scenario, server, round) {
                    Ok(record) => {
                        progress.log(record.one_line());
                        runs.push(record);
                    }
                    Err(e) => {
                        let msg = format!(
                            "{} round {round}: {} failed: {e:#}",
                            scenario.name(),
                            server.kind.name(),
                        );
                        progress.log(format!("{msg}\n{}", server.log_tail()));
                        notes.push(short(&msg));
                    }
                }
                progress.0.inc(1);
            }
        }
        drop(servers);
        targets::remove_dir(&dir);
        progress.log(format!(
            "{} done in {:.0} s",
            scenario.name(),
            began.elapsed().as_secs_f64()
        ));
    }
    progress.0.finish_and_clear();
    mock.shutdown();
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok((runs, infos, probes, own))
}

/// The first line of `msg`, at most 300 characters: for the report's notes.
fn short(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or("").trim_end();
    match line.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// How `scenario` offers load, in words, for the report.
fn describe(scenario: Scenario, s: &Settings) -> String {
    let generator = if s.use_wrk { "wrk" } else { "built-in" };
    let closed = |c: usize| {
        load::Mode::ClosedLoop {
            connections: c,
            threads: s.wrk_threads,
        }
        .describe(generator)
    };
    let constant_at = |rate: f64| {
        load::Mode::ConstantRate {
            rate,
            connections: s.connections,
        }
        .describe("built-in")
    };
    let constant = constant_at(s.rate);
    let d = s.duration.as_secs_f64();
    match scenario {
        Scenario::Hot => format!(
            "One key, {} B body, upstream answers at once; every target warmed {:.1} s first. \
             **req/s**: {}, {d} s. **Latency** p50…p99.9: {}, {d} s.",
            s.body_bytes,
            s.hot_warmup.as_secs_f64(),
            closed(s.connections),
            constant
        ),
        Scenario::Zipf => format!(
            "{} keys, Zipf s = {}, upstream answers at once; every target warmed by asking for \
             every key once, then {:.0} s of the same distribution (a key a cache evicted still \
             misses: hit ratio = 1 − upstream calls / requests of the closed-loop run). **req/s**: {}, {d} s. **Latency**: {}, {d} s.",
            s.zipf_keys,
            s.zipf_s,
            s.zipf_warmup.as_secs_f64(),
            closed(s.connections),
            constant
        ),
        Scenario::Miss => format!(
            "Every request a new key, upstream latency {} ms: {}, {d} s. Latency is that \
             closed-loop run's (mostly the upstream's {} ms). Bound set by the upstream: \
             {} connections / {} ms ≈ {} req/s; the floor answers every request after {} ms \
             without an upstream call, the best this harness measures.",
            s.upstream_delay.as_millis(),
            closed(s.miss_connections),
            s.upstream_delay.as_millis(),
            s.miss_connections,
            s.upstream_delay.as_millis(),
            report::thousands(s.miss_connections as f64 / s.upstream_delay.as_secs_f64()),
            s.upstream_delay.as_millis(),
        ),
        Scenario::Stampede => format!(
            "Every target first answers {} other cold keys, one new connection each, so that \
             its workers hold upstream connections (a gateway that has been serving). Then {} \
             connections are opened, and one request each is sent for the same cold key at the \
             same instant (built-in generator), a new key every round; upstream latency {} ms. \
             Connections are closed after the last answer. \
             Waiter latency from each request's send; upstream calls counted by the mock, which \
             also tells when the first call arrived (ms after the first send: how long the \
             gateway took to start the fetch). The \
             floor answers every request after {} ms on its own (no coalescing, no upstream): \
             its p50 is the upstream latency plus what this harness and 1,000 answers on this \
             machine add, the bar for a gateway's waiters.",
            scenarios::stampede_warmup_keys(s.server_workers),
            s.stampede_clients,
            s.upstream_delay.as_millis(),
            s.upstream_delay.as_millis()
        ),
        Scenario::Auth => format!(
            "`hot` against instances of the same build, alternating inside each round: **off** \
             (no auth, no limits), **local** (`[auth] required = true`; every request carries \
             `Authorization: Bearer` with a key made by `tollgate keys create` with a rate limit \
             and a daily quota far above the load, so each hit is authenticated, rate-limited \
             and counted) and, when Redis answers at {redis}, **redis** (the same, limits and \
             quota in Redis). **req/s**: {}, {d} s. **Latency**: {}, {d} s — a rate every \
             variant sustains, so p99 shows what the checks cost, not queueing. The Redis-backed \
             check's cost is redis p99 − local p99.",
            closed(s.connections),
            constant_at(s.auth_rate),
            redis = if s.redis_url.is_empty() {
                "(--redis-url empty)"
            } else {
                &s.redis_url
            },
        ),
        Scenario::L1 => format!(
            "(a) a fresh Tollgate (L1 256 MiB) filled through the gateway with {} distinct keys \
             ({} B bodies; built-in generator, 50 connections), then `VmRSS` from /proc and \
             `tollgate_cache_entries` / `tollgate_cache_bytes` from /metrics; (b) a Tollgate with \
             `cache.l1_max_bytes = {}` fed distinct keys whose bodies alone add up to 10× that, \
             /metrics sampled every 200 ms: the largest `tollgate_cache_bytes` seen and the last \
             one against the cap.",
            report::thousands(s.l1_keys as f64),
            s.body_bytes,
            s.l1_cap_bytes,
        ),
        Scenario::Outage => format!(
            "One Tollgate (breaker: 5 failures open it for 5 s; retries: 3 attempts, 50 ms base; \
             upstream timeout 2 s; routes with TTL 2 s and stale_if_error 10 m, `/fallback/*` \
             with a static fallback) under a constant {rate:.0} req/s over {c} connections \
             (built-in generator; latency from the intended send time): 80% to 200 warm keys, \
             10% to new keys, 10% to new keys of the fallback route. Healthy {h} s, then the \
             mock upstream {mode} for {o} s, then healthy again for {r} s. `GET /admin/breakers` \
             read every 100 ms; upstream calls counted by the mock; retries from /metrics. The \
             retry budget is Tollgate's built-in one: 20% of requests + 1 retry/s.",
            rate = s.outage_rate,
            c = s.connections,
            h = s.outage_phases.0.as_secs(),
            o = s.outage_phases.1.as_secs(),
            r = s.outage_phases.2.as_secs(),
            mode = match s.outage_mode {
                outage::OutageMode::Error => "answers 503 at once",
                outage::OutageMode::Hang => "accepts calls and never answers",
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("10h").is_err());
    }
}
