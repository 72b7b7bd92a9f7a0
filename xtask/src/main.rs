//! `cargo xtask`: developer chores — migrations, the offline demo and the load benchmarks.

mod bench;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply database migrations (`tollgate migrate`) for a config.
    Migrate {
        #[arg(long, default_value = "examples/tollgate.toml")]
        config: PathBuf,
    },
    /// Start a local mock upstream and the gateway, and show a MISS, a HIT and the cost saved.
    Demo,
    /// Load benchmarks: Tollgate beside the floor, nginx and Varnish, in one run.
    Bench(bench::BenchArgs),
    /// The bench's floor: a bare actix-web handler answering a fixed body (started by `bench`).
    #[command(name = "__floor", hide = true)]
    Floor {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = mock_upstream::DEFAULT_BODY_BYTES)]
        body_bytes: usize,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Answer paths starting with one of these only after `--slow-ms`.
        #[arg(long, value_delimiter = ',')]
        slow_prefix: Vec<String>,
        #[arg(long, default_value_t = 0)]
        slow_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Migrate { config } => {
            let status = Command::new(env!("CARGO"))
                .args([
                    "run", "--quiet", "-p", "tollgate", "--", "migrate", "--config",
                ])
                .arg(&config)
                .status()?;
            if !status.success() {
                bail!("tollgate migrate failed ({status})");
            }
            Ok(())
        }
        Cmd::Demo => demo(&root),
        Cmd::Bench(args) => bench::run(args, &root),
        Cmd::Floor {
            listen,
            body_bytes,
            workers,
            slow_prefix,
            slow_ms,
        } => bench::run_floor(
            listen,
            body_bytes,
            workers,
            bench::Slow {
                prefixes: slow_prefix,
                delay: std::time::Duration::from_millis(slow_ms),
            },
        ),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Kills the gateway if the demo stops early.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn demo(root: &Path) -> anyhow::Result<()> {
    println!("building the gateway…");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "tollgate"])
        .status()?;
    if !status.success() {
        bail!("cargo build failed");
    }
    let exe = root.join("target/debug/tollgate");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mock = mock_upstream::MockUpstream::start().await?;
        mock.set_delay(Duration::from_millis(150));
        let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("tollgate.toml");
        std::fs::write(
            &config,
            format!(
                r#"[server]
listen = "127.0.0.1:0"

[storage]
database_url = "sqlite://{db}"

[auth]
required = false

[[upstreams]]
name = "demo"
base_url = "{upstream}"

[[upstreams.routes]]
path = "/properties"
ttl = "10m"
cost = 0.20
"#,
                db = dir.join("demo.db").display(),
                upstream = mock.url()
            ),
        )?;
        let mut child = Command::new(&exe)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let gateway = Running(child);
        let base = listening_address(stdout)?;
        println!("mock upstream (charges $0.20 a call, answers in 150 ms) at {}", mock.url());
        println!("gateway at {base}\n");

        let client = reqwest::Client::new();
        // The same question three times, parameters in another order the second time.
        for shown in ["?state=TX&city=Austin", "?city=Austin&state=TX", "?city=Austin&state=TX"] {
            let url = format!("{base}/demo/properties{shown}");
            let started = Instant::now();
            let resp = client.get(&url).send().await?;
            let h = |n: &str| {
                resp.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string()
            };
            println!(
                "GET /demo/properties{shown:<24} {}  X-Cache: {:<5}  X-Upstream-Cost: {:<4}  {:>4} ms",
                resp.status().as_u16(),
                h("x-cache"),
                h("x-upstream-cost"),
                started.elapsed().as_millis()
            );
        }
        let metrics = client.get(format!("{base}/metrics")).send().await?.text().await?;
        let sum = |name: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        println!(
            "\nupstream calls: {} (mock counted {}), cost incurred: ${:.2}, cost saved: ${:.2}",
            sum("tollgate_upstream_calls_total"),
            mock.calls(),
            sum("tollgate_cost_incurred_total"),
            sum("tollgate_cost_saved_total"),
        );
        drop(gateway);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    })
}

/// Reads the gateway's stdout until it says where it listens.
fn listening_address(stdout: std::process::ChildStdout) -> anyhow::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("tollgate listening on ") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .context("the gateway did not start within 30 s")
}
