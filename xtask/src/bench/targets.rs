//! The servers under test — Tollgate (release build), the floor (a bare actix-web handler),
//! nginx `proxy_cache` and Varnish — started on free loopback ports with configs generated
//! into a temp dir, and stopped on drop, on error and on Ctrl-C.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::load;
use super::proc;
use super::scenarios::SLOW_PREFIXES;

/// A server the bench can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// The gateway, release build.
    Tollgate,
    /// A bare actix-web handler answering the same body from memory: the ceiling.
    Floor,
    /// nginx with `proxy_cache` and `proxy_cache_lock`.
    Nginx,
    /// Varnish Cache, malloc storage.
    Varnish,
}

impl TargetKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Tollgate => "tollgate",
            TargetKind::Floor => "floor",
            TargetKind::Nginx => "nginx",
            TargetKind::Varnish => "varnish",
        }
    }

    /// The external program it needs on the PATH, if any.
    pub fn program(self) -> Option<&'static str> {
        match self {
            TargetKind::Nginx => Some("nginx"),
            TargetKind::Varnish => Some("varnishd"),
            TargetKind::Tollgate | TargetKind::Floor => None,
        }
    }

    /// Whether it is a cache (talks to the upstream).
    pub fn caches(self) -> bool {
        self != TargetKind::Floor
    }
}

/// What every target needs to start.
#[derive(Debug, Clone)]
pub struct Env {
    /// The Tollgate release binary.
    pub tollgate: PathBuf,
    /// This program (it serves the floor with `__floor`).
    pub xtask: PathBuf,
    /// The in-process mock upstream.
    pub upstream: SocketAddr,
    /// Bytes of every response body.
    pub body_bytes: usize,
    /// The mock upstream's latency in `miss` and `stampede` (the floor waits as long there).
    pub upstream_delay: Duration,
    /// Worker threads / processes of each server.
    pub workers: usize,
    /// Run servers under `taskset -c 0`.
    pub pin_cpu: Option<usize>,
}

// === impl Server ===

/// A running server; stopped (SIGTERM, then SIGKILL of the whole process tree) on drop.
pub struct Server {
    /// Which target.
    pub kind: TargetKind,
    /// Where it listens.
    pub addr: SocketAddr,
    /// How it was configured, for the report.
    pub notes: String,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Its process id (the master / manager for nginx and Varnish).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 20)
    }

    /// Stops it: SIGTERM to the main process, up to 10 s for a graceful exit, then SIGKILL
    /// to whatever is left of its process tree.
    pub fn stop(&mut self) {
        let pid = self.pid();
        let family = proc::tree(pid);
        signal("TERM", &[pid]);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let left: Vec<u32> = family.into_iter().filter(|&p| proc::alive(p)).collect();
        if !left.is_empty() {
            signal("KILL", &left);
        }
        unregister_pid(pid);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn signal(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-s")
        .arg(sig)
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// === starting ===

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The full path of `program` on the PATH (and the sbin directories, where Debian puts
/// nginx and varnishd, which a non-root PATH may lack).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Starts `kind` with its config in `dir` and waits until it answers.
pub fn start(kind: TargetKind, env: &Env, dir: &Path) -> anyhow::Result<Server> {
    let dir = dir.join(kind.name());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let launch = match kind {
        TargetKind::Tollgate => tollgate(env, &dir, addr, &TollgateSetup::default())?,
        TargetKind::Floor => (
            env.xtask.clone(),
            vec![
                "__floor".into(),
                "--listen".into(),
                addr.to_string(),
                "--body-bytes".into(),
                env.body_bytes.to_string(),
                "--workers".into(),
                env.workers.to_string(),
                "--slow-prefix".into(),
                SLOW_PREFIXES.join(","),
                "--slow-ms".into(),
                env.upstream_delay.as_millis().to_string(),
            ],
            format!(
                "actix-web {} workers, one handler returning a {}-byte body from memory \
                 (`miss` and `stampede` paths after the upstream's {} ms)",
                env.workers,
                env.body_bytes,
                env.upstream_delay.as_millis()
            ),
            "/",
        ),
        TargetKind::Nginx => nginx(env, &dir, addr)?,
        TargetKind::Varnish => varnish(env, &dir, addr)?,
    };
    spawn(kind, env, &dir, addr, launch)
}

/// Starts Tollgate configured by `setup` in `dir` (created), after `before` has run with
/// the path of its config file (e.g. to create an API key), and waits until it answers.
pub fn start_tollgate(
    env: &Env,
    dir: &Path,
    setup: &TollgateSetup,
    before: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<Server> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let launch = tollgate(env, dir, addr, setup)?;
    before(&dir.join("tollgate.toml"))?;
    spawn(TargetKind::Tollgate, env, dir, addr, launch)
}

fn spawn(
    kind: TargetKind,
    env: &Env,
    dir: &Path,
    addr: SocketAddr,
    (program, args, notes, probe): Launch,
) -> anyhow::Result<Server> {
    let log = dir.join("server.log");
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = match env.pin_cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(&program);
            c
        }
        None => Command::new(&program),
    };
    cmd.args(&args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    register_pid(child.id());
    let mut server = Server {
        kind,
        addr,
        notes,
        child,
        log,
    };
    wait_ready(&mut server, probe)?;
    Ok(server)
}

/// Waits (at most 60 s: Varnish compiles its VCL with the C compiler) until `probe` answers 200.
fn wait_ready(server: &mut Server, probe: &str) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < until {
        if let Ok(Some(status)) = server.child.try_wait() {
            bail!(
                "{} exited during start-up ({status}):\n{}",
                server.kind.name(),
                server.log_tail()
            );
        }
        match load::get_once(server.addr, probe, Duration::from_secs(2)) {
            Ok((200, _)) => return Ok(()),
            Ok((status, _)) => last = format!("answered {status}"),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{} did not answer GET {probe} with 200 within 60 s (last: {last}):\n{}",
        server.kind.name(),
        server.log_tail()
    )
}

type Launch = (PathBuf, Vec<String>, String, &'static str);

/// How a Tollgate under test differs from the one `hot`, `zipf`, `miss` and `stampede`
/// measure (the [`Default`]: no auth, no Redis, L1 256 MiB, one upstream `bench` with one
/// route `/*`, TTL 10 min).
#[derive(Debug, Clone, PartialEq)]
pub struct TollgateSetup {
    /// `cache.l1_max_bytes`, e.g. `256MiB`.
    pub l1_max_bytes: String,
    /// `auth.required`.
    pub auth_required: bool,
    /// `storage.redis_url` (empty: none).
    pub redis_url: String,
    /// `server.admin_token` (empty: the admin API is off).
    pub admin_token: String,
    /// Extra keys of the `[[upstreams]]` table (`breaker = …`, `retry = …`), one a line.
    pub upstream: String,
    /// The `timeout` of the upstream.
    pub timeout: String,
    /// The `[[upstreams.routes]]` tables, TOML.
    pub routes: String,
}

impl Default for TollgateSetup {
    fn default() -> Self {
        TollgateSetup {
            l1_max_bytes: "256MiB".into(),
            auth_required: false,
            redis_url: String::new(),
            admin_token: String::new(),
            upstream: String::new(),
            timeout: "30s".into(),
            routes: "[[upstreams.routes]]\npath = \"/*\"\nttl = \"10m\"\ncost = 0.01\n".into(),
        }
    }
}

impl TollgateSetup {
    /// The config file.
    pub fn toml(&self, env: &Env, dir: &Path, addr: SocketAddr) -> String {
        let quoted = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        format!(
            r#"# generated by `cargo xtask bench`
[server]
listen = "{addr}"
workers = {workers}
shutdown_timeout = "2s"
admin_token = {admin}

[storage]
database_url = {db}
redis_url = {redis}

[cache]
l1_max_bytes = {l1}

[auth]
required = {auth}

[[upstreams]]
name = "bench"
base_url = "http://{upstream}"
timeout = {timeout}
max_idle_connections = 1024
{extra}
{routes}"#,
            workers = env.workers,
            admin = quoted(&self.admin_token),
            db = quoted(&format!("sqlite://{}", dir.join("tollgate.db").display())),
            redis = quoted(&self.redis_url),
            l1 = quoted(&self.l1_max_bytes),
            auth = self.auth_required,
            upstream = env.upstream,
            timeout = quoted(&self.timeout),
            extra = self.upstream.trim_end(),
            routes = self.routes,
        )
    }
}

fn tollgate(
    env: &Env,
    dir: &Path,
    addr: SocketAddr,
    setup: &TollgateSetup,
) -> anyhow::Result<Launch> {
    let config = dir.join("tollgate.toml");
    std::fs::write(&config, setup.toml(env, dir, addr))?;
    let mut notes = format!(
        "release build, [server] workers = {}, SQLite L2, L1 {}, 1024 idle upstream \
         connections kept, RUST_LOG=warn",
        env.workers, setup.l1_max_bytes
    );
    if setup == &TollgateSetup::default() {
        notes.push_str(", route ttl 10m");
    }
    Ok((
        env.tollgate.clone(),
        vec![
            "serve".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        notes,
        "/health",
    ))
}

/// Whether this process runs as root (nginx then needs `user root;` to use the temp dir).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The nginx config: `proxy_cache` with `proxy_cache_lock`, TTL 10 min for 200s, keep-alive
/// to the upstream, no access log; everything under `dir`.
pub fn nginx_conf(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    workers: usize,
    root: bool,
) -> String {
    let d = dir.display();
    format!(
        r#"# generated by `cargo xtask bench`
{user}worker_processes {workers};
worker_rlimit_nofile 16384;
error_log {d}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {d}/tmp/client;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    proxy_cache_path {d}/cache levels=1:2 keys_zone=bench:64m max_size=2g inactive=1h use_temp_path=off;
    upstream mock {{
        server {upstream};
        keepalive 1024;
    }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_key $request_uri;
            proxy_cache_valid 200 10m;
            proxy_cache_lock on;
            add_header X-Cache $upstream_cache_status;
        }}
    }}
}}
"#,
        user = if root { "user root;\n" } else { "" },
    )
}

fn nginx(env: &Env, dir: &Path, addr: SocketAddr) -> anyhow::Result<Launch> {
    let program = which("nginx").context("nginx is not installed")?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::create_dir_all(dir.join("cache"))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        nginx_conf(dir, addr, env.upstream, env.workers, is_root()),
    )?;
    let d = dir.display();
    Ok((
        program,
        vec![
            "-e".into(),
            format!("{d}/error.log"),
            "-p".into(),
            format!("{d}/"),
            "-c".into(),
            conf.display().to_string(),
            "-g".into(),
            format!("daemon off; pid {d}/nginx.pid;"),
        ],
        format!(
            "worker_processes {}, proxy_cache (disk, keys_zone 64m) + proxy_cache_lock on, proxy_cache_valid 200 10m, key $request_uri, upstream keepalive, access_log off",
            env.workers
        ),
        "/bench/ready",
    ))
}

/// The Varnish VCL: every 200 cached for 10 min, no grace; `X-Cache` says HIT or MISS.
pub fn varnish_vcl(upstream: SocketAddr) -> String {
    format!(
        r#"vcl 4.1;
# generated by `cargo xtask bench`
backend mock {{
    .host = "{host}";
    .port = "{port}";
}}
sub vcl_backend_response {{
    set beresp.ttl = 10m;
    set beresp.grace = 0s;
}}
sub vcl_deliver {{
    if (obj.hits > 0) {{
        set resp.http.X-Cache = "HIT";
    }} else {{
        set resp.http.X-Cache = "MISS";
    }}
}}
"#,
        host = upstream.ip(),
        port = upstream.port(),
    )
}

fn varnish(env: &Env, dir: &Path, addr: SocketAddr) -> anyhow::Result<Launch> {
    let program = which("varnishd").context("varnishd is not installed")?;
    let vcl = dir.join("default.vcl");
    std::fs::write(&vcl, varnish_vcl(env.upstream))?;
    Ok((
        program,
        vec![
            "-F".into(),
            // No privilege separation: works as root and as an ordinary user alike.
            "-j".into(),
            "none".into(),
            "-a".into(),
            addr.to_string(),
            "-n".into(),
            dir.join("work").display().to_string(),
            "-f".into(),
            vcl.display().to_string(),
            "-s".into(),
            "malloc,256m".into(),
            "-T".into(),
            "none".into(),
        ],
        "-s malloc,256m, beresp.ttl 10m, grace 0s, default thread pools (2)".into(),
        "/bench/ready",
    ))
}

// === the floor ===

/// A JSON body of exactly `n` bytes (when `n` ≥ its unpadded size), shaped like the mock
/// upstream's.
pub fn floor_body(n: usize) -> String {
    let head = r#"{"call":1,"method":"GET","path":"/bench/hot","query":"","body_len":0,"pad":""#;
    let pad = n.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(n);
    s.push_str(head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// Paths the floor answers only after a delay: the upstream's latency in `miss` and
/// `stampede`, so that the floor shows what this harness measures for a gateway that costs
/// nothing and coalesces nothing.
#[derive(Debug, Clone, Default)]
pub struct Slow {
    /// Path prefixes that wait.
    pub prefixes: Vec<String>,
    /// How long they wait.
    pub delay: Duration,
}

impl Slow {
    /// How long a request for `path` waits before its answer.
    pub fn delay_for(&self, path: &str) -> Option<Duration> {
        (!self.delay.is_zero() && self.prefixes.iter().any(|p| path.starts_with(p.as_str())))
            .then_some(self.delay)
    }
}

/// `xtask __floor`: serves `floor_body(body_bytes)` to every request until SIGTERM / SIGINT,
/// after `slow`'s delay for the paths it names.
pub fn run_floor(
    listen: SocketAddr,
    body_bytes: usize,
    workers: usize,
    slow: Slow,
) -> anyhow::Result<()> {
    use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
    let body = web::Bytes::from(floor_body(body_bytes));
    let slow = Arc::new(slow);
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            let body = body.clone();
            let slow = Arc::clone(&slow);
            App::new().default_service(web::to(move |req: HttpRequest| {
                let body = body.clone();
                let delay = slow.delay_for(req.path());
                async move {
                    if let Some(delay) = delay {
                        actix_web::rt::time::sleep(delay).await;
                    }
                    HttpResponse::Ok()
                        .content_type("application/json")
                        .body(body)
                }
            }))
        })
        .workers(workers.max(1))
        .backlog(4096)
        .bind(listen)
        .with_context(|| format!("binding {listen}"))?;
        for addr in server.addrs() {
            println!("floor listening on http://{addr}");
        }
        server.run().await.context("floor server failed")
    })
}

// === cleanup on signals ===

#[derive(Default)]
struct Registry {
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remembers a child process to kill if the bench is interrupted.
pub fn register_pid(pid: u32) {
    registry().pids.push(pid);
}

/// Forgets a child process (it has been stopped).
pub fn unregister_pid(pid: u32) {
    registry().pids.retain(|&p| p != pid);
}

/// Remembers a temp dir to remove if the bench is interrupted.
pub fn register_dir(dir: PathBuf) {
    registry().dirs.push(dir);
}

/// Removes a temp dir now and forgets it.
pub fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    registry().dirs.retain(|d| d != dir);
}

/// Kills every registered process tree and removes the registered dirs.
pub fn cleanup_all() {
    let (pids, dirs) = {
        let mut r = registry();
        (std::mem::take(&mut r.pids), std::mem::take(&mut r.dirs))
    };
    let family: Vec<u32> = pids.iter().flat_map(|&p| proc::tree(p)).collect();
    signal("TERM", &pids);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until && family.iter().any(|&p| proc::alive(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = family.into_iter().filter(|&p| proc::alive(p)).collect();
    signal("KILL", &left);
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// On SIGINT / SIGTERM / SIGHUP: stop every server started so far, remove the temp dirs,
/// exit 130.
pub fn install_signal_handler() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal as unix_signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                    unix_signal(SignalKind::interrupt()),
                    unix_signal(SignalKind::terminate()),
                    unix_signal(SignalKind::hangup()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
                eprintln!("\ninterrupted: stopping the servers…");
                cleanup_all();
                std::process::exit(130);
            });
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_body_has_the_requested_size() {
        assert_eq!(floor_body(600).len(), 600);
        assert!(floor_body(600).ends_with("xx\"}"));
        assert!(floor_body(10).len() > 10); // never smaller than the unpadded JSON
    }

    #[test]
    fn configs_name_the_right_ports() {
        let up = SocketAddr::from(([127, 0, 0, 1], 4001));
        let listen = SocketAddr::from(([127, 0, 0, 1], 4002));
        let conf = nginx_conf(Path::new("/tmp/x"), listen, up, 2, true);
        assert!(conf.contains("server 127.0.0.1:4001;"));
        assert!(conf.contains("listen 127.0.0.1:4002"));
        assert!(conf.contains("proxy_cache_lock on;"));
        assert!(conf.contains("proxy_cache_valid 200 10m;"));
        assert!(conf.starts_with("# generated") && conf.contains("user root;"));
        assert!(!nginx_conf(Path::new("/tmp/x"), listen, up, 2, false).contains("user root"));
        let vcl = varnish_vcl(up);
        assert!(vcl.contains(".port = \"4001\";") && vcl.contains("beresp.ttl = 10m;"));
    }
}
