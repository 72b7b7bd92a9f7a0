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

    /// `GET path` with `Authorization: Bearer KEY`.
    pub async fn get_bearer(&self, path: &str, key: &str) -> Resp {
        self.send(self.request(reqwest::Method::GET, path).bearer_auth(key))
            .await
    }

    /// `POST /admin/keys` with the admin token and `body` (which needs a `name`); asserts a 2xx
    /// and returns the answer (`{"id", "key": "tg_…", "name", …}`).
    pub async fn create_key(&self, body: &serde_json::Value) -> serde_json::Value {
        let r = self
            .send(
                self.request(reqwest::Method::POST, "/admin/keys")
                    .bearer_auth(ADMIN_TOKEN)
                    .json(body),
            )
            .await;
        assert!(
            (200..300).contains(&r.status),
            "POST /admin/keys {body}: {} {}",
            r.status,
            r.text()
        );
        r.json()
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

/// Whether the environment asks backend suites to run for sure (CI sets it): a missing service
/// or binary then fails the test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// A private `redis-server` on a free port of 127.0.0.1, without persistence; killed on drop.
pub struct PrivateRedis {
    child: Option<std::process::Child>,
    port: u16,
}

impl PrivateRedis {
    /// Starts one on a free port; `None` when there is no `redis-server` binary.
    pub async fn start() -> Option<PrivateRedis> {
        let mut r = PrivateRedis {
            child: None,
            port: free_port(),
        };
        if !r.spawn() {
            return None;
        }
        r.wait_up().await;
        Some(r)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> bool {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(c) => {
                self.child = Some(c);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => panic!("starting redis-server: {e}"),
        }
    }

    /// Whether it answers `PING` now.
    async fn pong(&self) -> bool {
        use tokio::io::AsyncWriteExt;
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            s.write_all(b"PING\r\n").await?;
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf).await?;
            Ok::<_, std::io::Error>(buf[..n].starts_with(b"+PONG"))
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), attempt).await,
            Ok(Ok(true))
        )
    }

    async fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pong().await {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("redis-server on port {} exited: {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills it (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "redis-server disappeared");
        self.wait_up().await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private PostgreSQL cluster (`initdb` in a temporary directory, trust authentication for
/// user `postgres`) listening on a free port of 127.0.0.1; stopped (immediately) on drop.
///
/// PostgreSQL refuses to run as root: when the tests run as root, its commands run as the
/// `postgres` OS user (`runuser -u postgres --`), in a directory that user may write.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    as_postgres_user: bool,
}

impl PrivatePostgres {
    /// The directory of `initdb` / `pg_ctl`: the newest `/usr/lib/postgresql/*/bin`, else the
    /// `PATH`'s.
    fn find_bin() -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
            .collect();
        // Numeric versions: 9.6 < 15 < 16.
        dirs.sort_by_key(|bin| {
            bin.parent()
                .and_then(Path::file_name)
                .and_then(|v| v.to_str())
                .and_then(|v| v.split('.').next())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        dirs.pop().or_else(|| {
            std::env::var_os("PATH")
                .and_then(|path| std::env::split_paths(&path).find(|d| d.join("initdb").is_file()))
        })
    }

    /// A new cluster, started; `None` when the PostgreSQL server binaries are not installed.
    pub async fn start() -> Option<PrivatePostgres> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let bin = Self::find_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("tollgate-pg-")
            .tempdir()
            .expect("creating a temporary directory");
        // /proc/self belongs to the effective user.
        let as_postgres_user = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if as_postgres_user {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("opening the temporary directory to the postgres user");
        }
        let pg = PrivatePostgres {
            bin,
            dir,
            port: free_port(),
            as_postgres_user,
        };
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        .await;
        pg.start_again().await;
        Some(pg)
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// `program` from the server's bin directory, as the `postgres` user when we are root.
    fn command(&self, program: &str) -> std::process::Command {
        let program = self.bin.join(program);
        if self.as_postgres_user {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        }
    }

    /// `program ARGS` from the server's bin directory (as the `postgres` user when we are
    /// root); panics with its output unless it succeeds within 60 s.
    async fn run(&self, program: &str, args: &[&str]) {
        let mut cmd = Command::from(self.command(program));
        let program = self.bin.join(program);
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{} {args:?} took over 60 s", program.display()))
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
        assert!(
            out.status.success(),
            "{} {args:?}: {}\nstdout: {}\nstderr: {}\nserver log:\n{}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
        );
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again: same data directory, same port) and waits until it accepts
    /// connections.
    pub async fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        )
        .await;
    }

    /// Crashes it: `pg_ctl -m immediate stop` (no shutdown checkpoint; recovery on restart).
    pub async fn stop_immediately(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"],
        )
        .await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        // Already stopped is fine: the temporary directory goes either way.
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
