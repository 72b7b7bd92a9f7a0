//! Support for the end-to-end tests: the real `tollgate` binary as a child process on a config
//! written into a temporary directory, an HTTP client, and small helpers (polling with a
//! deadline, reading Prometheus text).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// The admin token written into every test config by [`base_config`].
pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// How long a gateway may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a gateway may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Environment variables never passed to a child: proxies (all traffic is to 127.0.0.1) and
/// anything that could override the test's config.
fn scrub_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        let upper = name.to_ascii_uppercase();
        if upper.starts_with("TOLLGATE_") || upper.ends_with("_PROXY") {
            cmd.env_remove(&name);
        }
    }
}

/// A `tollgate` command (any subcommand) with a scrubbed environment and `RUST_LOG=warn`.
pub fn tollgate_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    scrub_env(&mut cmd);
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// What a finished CLI command did.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `tollgate ARGS` to completion (at most 30 s).
pub async fn run_cli(args: &[&str]) -> CliOutput {
    let mut cmd = tollgate_command();
    cmd.args(args);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`tollgate {}` did not finish within 30 s", args.join(" ")))
        .expect("running the tollgate binary");
    CliOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Installs the rustls crypto provider once; reqwest is built without one.
pub fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err: another provider was installed first, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An HTTP client for the tests: no proxies, a large pool, a generous timeout.
pub fn client() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("building the test HTTP client")
}

/// The `[server]`, `[auth]` and first `[[upstreams]]` header of a test config, with the
/// upstream `demo` pointing at `upstream_url`. `upstream_extra` is appended inside the
/// `[[upstreams]]` table (e.g. `timeout = "500ms"`); routes follow as `[[upstreams.routes]]`.
pub fn base_config(upstream_url: &str, upstream_extra: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_token = "{ADMIN_TOKEN}"

[auth]
required = false

[[upstreams]]
name = "demo"
base_url = "{upstream_url}"
{upstream_extra}
"#
    )
}

/// A running gateway: the `tollgate serve` child process, its config and its temporary
/// directory. Killed when dropped.
pub struct Gateway {
    child: Option<Child>,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    config_path: PathBuf,
    /// `--listen` value: `127.0.0.1:0`, or a fixed port when the config asked for `{port}`.
    listen: String,
    client: reqwest::Client,
    dir: TempDir,
}

impl Gateway {
    /// Writes `config_toml` into a new temporary directory and starts `tollgate serve` on it.
    ///
    /// In the config, `{dir}` stands for the temporary directory and `{port}` for a free port
    /// picked now (the gateway then listens there instead of on an ephemeral port, so CLI
    /// commands reading `server.listen` find it). Unless the config has a `[storage]` table,
    /// the database is `sqlite://{dir}/tollgate.db`.
    pub async fn start(config_toml: &str) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-e2e-")
            .tempdir()
            .expect("creating a temporary directory");
        let mut config = config_toml.replace("{dir}", &dir.path().display().to_string());
        let listen = if config.contains("{port}") {
            let port = free_port();
            config = config.replace("{port}", &port.to_string());
            format!("127.0.0.1:{port}")
        } else {
            "127.0.0.1:0".to_string()
        };
        if !config.contains("[storage]") {
            config.push_str(&format!(
                "\n[storage]\ndatabase_url = \"sqlite://{}/tollgate.db\"\n",
                dir.path().display()
            ));
        }
        let config_path = dir.path().join("tollgate.toml");
        std::fs::write(&config_path, config).expect("writing the config");
        let (child, addr, stderr) = spawn_serve(&config_path, &listen).await;
        Gateway {
            child: Some(child),
            addr,
            stderr,
            config_path,
            listen,
            client: client(),
            dir,
        }
    }

    /// The address the gateway listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The config file the gateway runs on.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temporary directory holding the config and the database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The shared HTTP client (cheap to clone).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// What the gateway wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("the gateway is not running")
    }

    /// Sends SIGTERM, without waiting.
    pub async fn sigterm(&self) {
        let status = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .await
            .expect("running kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// SIGTERM, then waits for the process: it must exit 0 within 15 s.
    pub async fn stop(&mut self) {
        self.sigterm().await;
        self.wait_exit_success().await;
    }

    /// Waits (at most 15 s) for the process to exit and asserts it exited 0.
    pub async fn wait_exit_success(&mut self) {
        let mut child = self.child.take().expect("the gateway is not running");
        let status = match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => status.expect("waiting for the gateway"),
            Err(_) => {
                let _ = child.start_kill();
                panic!(
                    "the gateway did not exit within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
        };
        assert!(
            status.success(),
            "the gateway exited with {status} after SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }

    /// Stops the gateway and starts it again on the same config and directory (and database).
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        let (child, addr, stderr) = spawn_serve(&self.config_path, &self.listen).await;
        self.child = Some(child);
        self.addr = addr;
        self.stderr = stderr;
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.client.get(self.url(path))).await
    }

    /// A request to `path` with the shared client, to finish and [`send`](Self::send).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// Sends `req` and reads the whole response.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let resp = req.send().await.unwrap_or_else(|e| {
            panic!(
                "request to the gateway failed: {e:?}\ngateway stderr:\n{}",
                self.stderr()
            )
        });
        Resp::read(resp).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = self.get("/metrics").await;
        assert_eq!(r.status, 200, "/metrics: {}", r.text());
        r.text()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- gateway stderr ({}) ---\n{}\n--- end ---",
                self.config_path.display(),
                self.stderr()
            );
        }
    }
}

/// A free port on 127.0.0.1, right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

/// Spawns `tollgate serve --config FILE --listen LISTEN` and waits for its listening line.
async fn spawn_serve(config: &Path, listen: &str) -> (Child, SocketAddr, Arc<Mutex<String>>) {
    let mut cmd = tollgate_command();
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--listen")
        .arg(listen);
    let mut child = cmd.spawn().expect("spawning tollgate serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr_pipe = child.stderr.take().expect("piped stderr");

    let stderr = Arc::new(Mutex::new(String::new()));
    let stderr_done = {
        let stderr = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut pipe = stderr_pipe;
            let mut buf = vec![0u8; 8192];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => stderr
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        })
    };

    let (tx, rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut tx = Some(tx);
        // Keep draining stdout after the listening line so the child never blocks on it.
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = line.trim().strip_prefix("tollgate listening on http://")
                && let Ok(addr) = addr.parse()
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr);
            }
        }
    });

    match tokio::time::timeout(START_TIMEOUT, rx).await {
        Ok(Ok(addr)) => (child, addr, stderr),
        outcome => {
            let why = match outcome {
                Err(_) => format!("no listening line within {START_TIMEOUT:?}"),
                Ok(Err(_)) => "stdout closed before the listening line".to_string(),
                Ok(Ok(_)) => unreachable!(),
            };
            let _ = child.start_kill();
            let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), stderr_done).await;
            panic!(
                "tollgate serve --config {} did not start: {why} (exit: {status:?}); stderr:\n{}",
                config.display(),
                stderr.lock().unwrap_or_else(|e| e.into_inner())
            );
        }
    }
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Resp {
    /// Reads `resp` to the end.
    pub async fn read(resp: reqwest::Response) -> Resp {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.expect("reading the response body");
        Resp {
            status,
            headers,
            body,
        }
    }

    /// Header `name` as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `X-Cache` header ("" when absent).
    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("")
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }

    /// The mock upstream's call number recorded in the body (`{"call": n, ...}`).
    pub fn mock_call(&self) -> u64 {
        self.json()["call"]
            .as_u64()
            .unwrap_or_else(|| panic!("no \"call\" in the body: {}", self.text()))
    }

    /// Asserts this is the contract's JSON error with `status` and `code` and a request id.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status,
            status,
            "expected {status} {code}, got {}: {}",
            self.status,
            self.text()
        );
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "error body: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a message: {v}"
        );
        assert!(
            v["error"]["request_id"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a request_id: {v}"
        );
    }
}

/// Polls `cond` every 20 ms until it holds or `within` passes; returns whether it held.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the samples of metric `name` (exact name, e.g. `tollgate_requests_total`) whose
/// labels include every `(label, value)` of `labels`; `None` if no sample matched.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(rest) = rest.strip_prefix('{') {
            let Some((labels, value)) = rest.split_once('}') else {
                continue;
            };
            (labels, value)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // a longer metric name
        };
        let matches = labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if !matches {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}
