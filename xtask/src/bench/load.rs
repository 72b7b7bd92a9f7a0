//! Load generators: `wrk` when it is installed (closed loop, percentiles from a Lua `done()`
//! hook), and a built-in generator on plain threads and blocking sockets that can run
//! closed-loop, at a constant rate (latency measured from each request's *intended* send
//! time, so a stalled server cannot hide its stalls: no coordinated omission) and as a
//! one-shot stampede of N simultaneous requests.
//!
//! The built-in generator uses one OS thread per connection rather than an async runtime:
//! `std::thread::sleep` wakes within tens of microseconds, where a tokio timer rounds to the
//! next millisecond, which would dwarf loopback latencies of ~100 µs in the constant-rate mode.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::scenarios::zipf_pick;
use super::targets;

// === results ===

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

/// Percentiles of `nanos` (sorted in place), nearest-rank; `None` when empty.
pub fn percentiles(nanos: &mut [u64]) -> Option<Percentiles> {
    if nanos.is_empty() {
        return None;
    }
    nanos.sort_unstable();
    let us = |n: u64| n as f64 / 1000.0;
    let sum: u128 = nanos.iter().map(|&n| u128::from(n)).sum();
    Some(Percentiles {
        p50_us: us(nearest_rank(nanos, 50.0)),
        p90_us: us(nearest_rank(nanos, 90.0)),
        p99_us: us(nearest_rank(nanos, 99.0)),
        p999_us: us(nearest_rank(nanos, 99.9)),
        max_us: us(nanos[nanos.len() - 1]),
        mean_us: sum as f64 / nanos.len() as f64 / 1000.0,
    })
}

/// The nearest-rank `pct`th percentile of a sorted, non-empty slice: the smallest value with
/// at least `pct`% of the values at or below it.
pub fn nearest_rank(sorted: &[u64], pct: f64) -> u64 {
    let n = sorted.len();
    // The epsilon keeps float error (0.999 * 1000 = 999.0000000000001) from bumping the rank.
    let rank = ((pct / 100.0) * n as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// Failed requests by kind (wrk's categories).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Errors {
    /// Could not connect.
    pub connect: u64,
    /// The connection failed or closed while reading the response.
    pub read: u64,
    /// Sending the request failed.
    pub write: u64,
    /// Responses with a status outside 200..=399 (counted as requests too, like wrk).
    pub status: u64,
    /// No response within the timeout.
    pub timeout: u64,
}

impl Errors {
    /// Every error.
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.status + self.timeout
    }

    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.read += o.read;
        self.write += o.write;
        self.status += o.status;
        self.timeout += o.timeout;
    }
}

/// How load was offered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mode {
    /// Each connection sends its next request when the previous answer arrives: measures
    /// throughput. Latency figures from this mode suffer from coordinated omission.
    ClosedLoop {
        /// Open connections.
        connections: usize,
        /// Client threads.
        threads: usize,
    },
    /// Requests sent on a fixed timeline whatever the answers do; latency from the intended
    /// send time.
    ConstantRate {
        /// Requests per second offered.
        rate: f64,
        /// Open connections.
        connections: usize,
    },
}

impl Mode {
    /// A short human description.
    pub fn describe(&self, generator: &str) -> String {
        match *self {
            Mode::ClosedLoop {
                connections,
                threads,
            } => format!("closed-loop, {generator} -t{threads} -c{connections}"),
            Mode::ConstantRate { rate, connections } => format!(
                "constant rate {rate:.0} req/s over {connections} connections ({generator}; latency from the intended send time)"
            ),
        }
    }
}

/// One load run against one target.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// `wrk` or `built-in`.
    pub generator: &'static str,
    /// How the load was offered.
    pub mode: Mode,
    /// Responses received (any status).
    pub requests: u64,
    /// Wall time of the run.
    pub duration_s: f64,
    /// `requests / duration_s`.
    pub rps: f64,
    /// Failures.
    pub errors: Errors,
    /// Latency of the responses received.
    pub latency: Option<Percentiles>,
    /// Constant-rate mode: how late the generator itself sent requests (its own noise floor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag: Option<Percentiles>,
}

// === request paths ===

/// Which paths a run requests.
#[derive(Debug, Clone)]
pub enum Paths {
    /// Always this path (with query).
    Fixed(String),
    /// `prefix` followed by a key index drawn from a Zipf distribution.
    Zipf {
        /// E.g. `/bench/zipf/item?k=`.
        prefix: String,
        /// Cumulative probabilities of keys `0..n` (see [`super::scenarios::zipf_cdf`]).
        cdf: Arc<Vec<f64>>,
        /// The same table, one number a line, for wrk's Lua script.
        cdf_file: PathBuf,
        /// Seed of the draws.
        seed: u64,
    },
    /// `prefix` followed by `<worker>-<n>`: never the same path twice in one run.
    Unique {
        /// E.g. `/bench/miss/item?k=r1-`.
        prefix: String,
    },
    /// `prefix` followed by the keys `0, 1, …, keys - 1` in turn, whichever worker asks, then
    /// from 0 again: a run with `max_requests = keys` asks for every key once (built-in
    /// generator only; made by [`Paths::sweep`]).
    Sweep {
        /// E.g. `/bench/zipf/item?id=`.
        prefix: String,
        /// How many keys.
        keys: usize,
        /// The next key to ask for (before wrapping), shared by the run's workers.
        next: Arc<AtomicU64>,
    },
    /// Each request picks one of `parts` with probability proportional to its share (built-in
    /// generator only).
    Mix {
        /// What may be requested.
        parts: Arc<Vec<MixPart>>,
        /// Seed of the draws.
        seed: u64,
    },
}

impl Paths {
    /// Every key of `0..keys` once, in order (see [`Paths::Sweep`]).
    pub fn sweep(prefix: String, keys: usize) -> Paths {
        Paths::Sweep {
            prefix,
            keys,
            next: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// One part of [`Paths::Mix`].
#[derive(Debug, Clone)]
pub struct MixPart {
    /// Relative weight.
    pub share: f64,
    /// E.g. `/bench/sie/item?k=`.
    pub prefix: String,
    /// `Some(n)`: the prefix followed by a key drawn uniformly from `0..n`; `None`: followed by
    /// `<worker>-<n>`, a path never requested before in this run.
    pub keys: Option<usize>,
}

/// Draws the paths of one worker.
struct PathGen<'a> {
    paths: &'a Paths,
    worker: usize,
    n: u64,
    rng: SplitMix64,
    /// The [`Paths::Mix`] part of the last path drawn.
    part: usize,
}

impl<'a> PathGen<'a> {
    fn new(paths: &'a Paths, worker: usize) -> Self {
        let seed = match paths {
            Paths::Zipf { seed, .. } | Paths::Mix { seed, .. } => *seed,
            _ => 0,
        };
        PathGen {
            paths,
            worker,
            n: 0,
            // Each worker starts at a hashed point of the sequence. (Starting at
            // `seed ^ worker * step` made the workers' streams shifted copies of one another:
            // SplitMix64 advances by that very step, so the workers drew far fewer distinct
            // keys than they should.)
            rng: SplitMix64(SplitMix64(seed ^ ((worker as u64) << 32)).next_u64()),
            part: 0,
        }
    }

    fn next(&mut self) -> String {
        self.n += 1;
        match self.paths {
            Paths::Fixed(p) => p.clone(),
            Paths::Zipf { prefix, cdf, .. } => {
                format!("{prefix}{}", zipf_pick(cdf, self.rng.next_f64()))
            }
            Paths::Unique { prefix } => format!("{prefix}{}-{}", self.worker, self.n),
            Paths::Sweep { prefix, keys, next } => {
                let key = next.fetch_add(1, Ordering::Relaxed) % (*keys).max(1) as u64;
                format!("{prefix}{key}")
            }
            Paths::Mix { parts, .. } => {
                let total: f64 = parts.iter().map(|p| p.share).sum();
                let mut u = self.rng.next_f64() * total;
                self.part = parts
                    .iter()
                    .position(|p| {
                        u -= p.share;
                        u < 0.0
                    })
                    .unwrap_or(parts.len().saturating_sub(1));
                match parts.get(self.part) {
                    Some(MixPart {
                        prefix,
                        keys: Some(n),
                        ..
                    }) => format!("{prefix}{}", self.rng.next_u64() % (*n).max(1) as u64),
                    Some(MixPart { prefix, .. }) => {
                        format!("{prefix}{}-{}", self.worker, self.n)
                    }
                    None => "/".into(),
                }
            }
        }
    }
}

/// A small, fast, seedable generator (SplitMix64); good enough to draw keys.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A `GET path` request with `headers` (each `Name: value`) added.
fn request_bytes(addr: SocketAddr, path: &str, headers: &[String]) -> Vec<u8> {
    let mut s = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tollgate-bench\r\n");
    for h in headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

fn check_loopback(addr: SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("refusing to send load to {addr}: the bench only targets 127.0.0.1");
    }
    Ok(())
}

// === a minimal HTTP/1.1 client ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Write,
    Read,
    Timeout,
}

/// What [`parse_response`] found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Status code.
    pub status: u16,
    /// Bytes of the whole response (head + body).
    pub len: usize,
    /// The server will close the connection after it.
    pub close: bool,
}

/// Parses one complete HTTP/1.1 response at the start of `buf`: `Ok(None)` when more bytes
/// are needed, `Err` when it is not HTTP. Bodies delimited by `Content-Length` or chunked;
/// a response with neither has no body (the bench's servers always send one of them).
pub fn parse_response(buf: &[u8]) -> Result<Option<Parsed>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad content-length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let body_start = head_end + 4;
    let no_body = status / 100 == 1 || status == 204 || status == 304;
    let len = if no_body {
        Some(body_start)
    } else if chunked {
        chunked_end(&buf[body_start..])?.map(|n| body_start + n)
    } else {
        let total = body_start + content_length.unwrap_or(0);
        (buf.len() >= total).then_some(total)
    };
    Ok(len.map(|len| Parsed { status, len, close }))
}

/// Length of a complete chunked body (through the final CRLF), if `buf` holds all of it.
fn chunked_end(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut at = 0;
    loop {
        let Some(eol) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&buf[at..at + eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        at += eol + 2;
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            let Some(end) = find(&buf[at..], b"\r\n") else {
                return Ok(None);
            };
            if end == 0 {
                return Ok(Some(at + 2));
            }
            at += end + 2;
            continue;
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        at += size + 2;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One keep-alive connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
    /// The last response (head and raw body), kept only when `keep` is set.
    last: Vec<u8>,
    keep: bool,
}

impl Conn {
    fn open(addr: SocketAddr, timeout: Duration) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
            closed: false,
            last: Vec::new(),
            keep: false,
        })
    }

    /// Sends `req` and reads one response; its status.
    fn request(&mut self, req: &[u8]) -> Result<u16, Failure> {
        self.stream.write_all(req).map_err(|_| Failure::Write)?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match parse_response(&self.buf) {
                Ok(Some(p)) => {
                    if self.keep {
                        self.last.clear();
                        self.last.extend_from_slice(&self.buf[..p.len]);
                    }
                    self.buf.drain(..p.len);
                    self.closed = p.close;
                    return Ok(p.status);
                }
                Ok(None) => {}
                Err(_) => return Err(Failure::Read),
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Failure::Read),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Failure::Timeout);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Failure::Read),
            }
        }
    }
}

/// One `GET path` on a fresh connection: the status and the response head (for headers such
/// as `X-Cache`).
pub fn get_once(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let r = fetch(addr, path, &[], timeout)?;
    Ok((r.status, r.head))
}

/// A whole response of [`fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Status code.
    pub status: u16,
    /// Status line and headers.
    pub head: String,
    /// The body (de-chunked), lossily as UTF-8.
    pub body: String,
}

/// One `GET path` with `headers` (each `Name: value`) on a fresh connection.
pub fn fetch(
    addr: SocketAddr,
    path: &str,
    headers: &[String],
    timeout: Duration,
) -> anyhow::Result<Fetched> {
    check_loopback(addr)?;
    let mut conn = Conn::open(addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    conn.keep = true;
    let status = conn
        .request(&request_bytes(addr, path, headers))
        .map_err(|f| anyhow::anyhow!("GET http://{addr}{path}: {f:?}"))?;
    let raw = std::mem::take(&mut conn.last);
    let end = find(&raw, b"\r\n\r\n").unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let body = raw.get(end + 4..).unwrap_or_default();
    let body = if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Ok(Fetched {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The sum of the samples of metric `name` that carry every label pair of `labels`, in a
/// Prometheus text exposition; `None` when there is none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        if !labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// The payload of a complete chunked body (trailers dropped).
fn dechunk(mut buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(buf.len());
    while let Some(eol) = find(buf, b"\r\n") {
        let size = std::str::from_utf8(&buf[..eol])
            .ok()
            .and_then(|t| usize::from_str_radix(t.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        buf = &buf[eol + 2..];
        if size == 0 || buf.len() < size {
            break;
        }
        out.extend_from_slice(&buf[..size]);
        buf = buf.get(size + 2..).unwrap_or_default();
    }
    out
}

/// The value of header `name` in a response head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The same client on tokio: many connections on few threads (closed loop, stampede).
struct AsyncConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    closed: bool,
}

impl AsyncConn {
    async fn open(addr: SocketAddr, timeout: Duration) -> std::io::Result<AsyncConn> {
        let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        Ok(AsyncConn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
            closed: false,
        })
    }

    /// Sends `req` and reads one response within `timeout`; its status. After an error the
    /// connection is in an unknown state: drop it.
    async fn request(&mut self, req: &[u8], timeout: Duration) -> Result<u16, Failure> {
        tokio::time::timeout(timeout, self.exchange(req))
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    async fn exchange(&mut self, req: &[u8]) -> Result<u16, Failure> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream
            .write_all(req)
            .await
            .map_err(|_| Failure::Write)?;
        loop {
            match parse_response(&self.buf) {
                Ok(Some(p)) => {
                    self.buf.drain(..p.len);
                    self.closed = p.close;
                    return Ok(p.status);
                }
                Ok(None) => {}
                Err(_) => return Err(Failure::Read),
            }
            self.buf.reserve(16 * 1024);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(Failure::Read),
                Ok(_) => {}
            }
        }
    }
}

// === the built-in generator ===

/// A run of the built-in generator.
#[derive(Debug, Clone)]
pub struct Builtin {
    /// The target (must be loopback).
    pub addr: SocketAddr,
    /// What to request.
    pub paths: Paths,
    /// Connections (closed loop: tasks on `threads` threads; constant rate: one thread each,
    /// for timers that wake within microseconds).
    pub connections: usize,
    /// Threads of the closed-loop run.
    pub threads: usize,
    /// How long to send.
    pub duration: Duration,
    /// `None`: closed loop; `Some(r)`: `r` requests per second on a fixed timeline.
    pub rate: Option<f64>,
    /// Connect / read timeout per request.
    pub timeout: Duration,
    /// Upper bound on requests, whatever the duration.
    pub max_requests: u64,
    /// Headers added to every request, each `Name: value`.
    pub headers: Vec<String>,
}

/// How a gateway answered one request, from its status and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// 2xx, `X-Cache: HIT`.
    Hit,
    /// 2xx, `X-Cache: MISS`.
    Miss,
    /// 2xx, `X-Cache: STALE`.
    Stale,
    /// The route's static fallback (`X-Tollgate-Fallback: true`).
    Fallback,
    /// Any other 2xx/3xx.
    OtherOk,
    /// 503.
    Unavailable,
    /// 502.
    BadGateway,
    /// 504.
    GatewayTimeout,
    /// Any other status.
    OtherStatus,
    /// No response (connect, read or write failure, client timeout).
    NoResponse,
}

impl Answer {
    /// Classifies a response by its status and head.
    pub fn of(status: u16, head: &str) -> Answer {
        if header(head, "x-tollgate-fallback").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Answer::Fallback;
        }
        match status {
            200..=399 => match header(head, "x-cache")
                .map(str::to_ascii_uppercase)
                .as_deref()
            {
                Some("HIT") => Answer::Hit,
                Some("MISS") => Answer::Miss,
                Some("STALE") => Answer::Stale,
                _ => Answer::OtherOk,
            },
            502 => Answer::BadGateway,
            503 => Answer::Unavailable,
            504 => Answer::GatewayTimeout,
            _ => Answer::OtherStatus,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Answer::Hit => "HIT",
            Answer::Miss => "MISS",
            Answer::Stale => "STALE",
            Answer::Fallback => "fallback",
            Answer::OtherOk => "other 2xx",
            Answer::Unavailable => "503",
            Answer::BadGateway => "502",
            Answer::GatewayTimeout => "504",
            Answer::OtherStatus => "other status",
            Answer::NoResponse => "no response",
        }
    }
}

/// One request of a recorded constant-rate run.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it was meant to be sent.
    pub intended: Instant,
    /// From the intended send time to the answer (or the failure), ns.
    pub latency_ns: u64,
    /// How it was answered.
    pub answer: Answer,
    /// Which part of [`Paths::Mix`] it requested (0 for other paths).
    pub part: usize,
}

struct WorkerOut {
    latencies: Vec<u64>,
    lags: Vec<u64>,
    errors: Errors,
    finished: Instant,
    samples: Vec<Sample>,
}

impl Builtin {
    /// Runs the load and waits for it; every worker stops at the deadline or after its share
    /// of `max_requests`, whichever comes first.
    pub fn run(&self) -> anyhow::Result<LoadResult> {
        check_loopback(self.addr)?;
        match self.rate {
            None => self.run_closed(),
            Some(rate) => self.run_paced(rate, false).map(|(r, _)| r),
        }
    }

    /// A constant-rate run (at `rate`, else 1 req/s) that also returns every request's
    /// [`Sample`], in no particular order.
    pub fn run_recorded(&self) -> anyhow::Result<(LoadResult, Vec<Sample>)> {
        check_loopback(self.addr)?;
        self.run_paced(self.rate.unwrap_or(1.0), true)
    }

    fn per_worker_max(&self) -> u64 {
        self.max_requests
            .div_ceil(self.connections.max(1) as u64)
            .max(1)
    }

    /// Closed loop: one task per connection on a multi-threaded tokio runtime.
    fn run_closed(&self) -> anyhow::Result<LoadResult> {
        let connections = self.connections.max(1);
        let threads = self.threads.max(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("load")
            .enable_all()
            .build()?;
        let spec = Arc::new(self.clone());
        let max = self.per_worker_max();
        let start = Instant::now();
        let deadline = start + self.duration;
        let outs = rt.block_on(async move {
            let mut set = tokio::task::JoinSet::new();
            for worker in 0..connections {
                let spec = Arc::clone(&spec);
                set.spawn(async move { spec.closed_worker(worker, start, deadline, max).await });
            }
            let mut outs = Vec::with_capacity(connections);
            while let Some(out) = set.join_next().await {
                outs.push(out.context("a load task failed")?);
            }
            Ok::<_, anyhow::Error>(outs)
        })?;
        Ok(merge(
            outs,
            start,
            Mode::ClosedLoop {
                connections,
                threads,
            },
            false,
        ))
    }

    async fn closed_worker(
        &self,
        worker: usize,
        start: Instant,
        deadline: Instant,
        max: u64,
    ) -> WorkerOut {
        let mut out = WorkerOut::new(start);
        let mut paths = PathGen::new(&self.paths, worker);
        let fixed = match &self.paths {
            Paths::Fixed(p) => Some(request_bytes(self.addr, p, &self.headers)),
            _ => None,
        };
        let mut conn: Option<AsyncConn> = None;
        let mut sent: u64 = 0;
        while sent < max && Instant::now() < deadline {
            if conn.as_ref().is_none_or(|c| c.closed) {
                match AsyncConn::open(self.addr, self.timeout).await {
                    Ok(c) => conn = Some(c),
                    Err(_) => {
                        out.errors.connect += 1;
                        conn = None;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let owned;
            let req = match &fixed {
                Some(r) => r.as_slice(),
                None => {
                    owned = request_bytes(self.addr, &paths.next(), &self.headers);
                    owned.as_slice()
                }
            };
            let began = Instant::now();
            sent += 1;
            match c.request(req, self.timeout).await {
                Ok(status) => out.done(status, nanos(began.elapsed()), None),
                Err(f) => {
                    out.failed(f);
                    conn = None;
                }
            }
        }
        out.finished = Instant::now();
        out
    }

    /// Constant rate: one OS thread per connection, each on its own fixed timeline.
    fn run_paced(&self, rate: f64, record: bool) -> anyhow::Result<(LoadResult, Vec<Sample>)> {
        let connections = self.connections.max(1);
        let max = self.per_worker_max();
        // Everyone starts on the same timeline, a moment from now.
        let start = Instant::now() + Duration::from_millis(50);
        let deadline = start + self.duration;
        // Per connection: one request every `interval`; connection i is offset by i/rate.
        let rate = rate.max(1e-3);
        let interval = Duration::from_secs_f64(connections as f64 / rate);
        let mut handles = Vec::with_capacity(connections);
        for worker in 0..connections {
            let spec = self.clone();
            let offset = Duration::from_secs_f64(worker as f64 / rate);
            let handle = std::thread::Builder::new()
                .name(format!("load-{worker}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    let timeline = (start, deadline, interval, offset);
                    spec.paced_worker(worker, timeline, max, record)
                })
                .context("spawning a load thread")?;
            handles.push(handle);
        }
        let mut outs = Vec::with_capacity(connections);
        for h in handles {
            outs.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a load thread panicked"))?,
            );
        }
        let samples = outs
            .iter_mut()
            .flat_map(|o| std::mem::take(&mut o.samples))
            .collect();
        let result = merge(outs, start, Mode::ConstantRate { rate, connections }, true);
        Ok((result, samples))
    }

    /// `timeline`: (start, deadline, interval between this worker's requests, its offset).
    fn paced_worker(
        &self,
        worker: usize,
        (start, deadline, interval, offset): (Instant, Instant, Duration, Duration),
        max: u64,
        record: bool,
    ) -> WorkerOut {
        let mut out = WorkerOut::new(start);
        let mut paths = PathGen::new(&self.paths, worker);
        let fixed = match &self.paths {
            Paths::Fixed(p) => Some(request_bytes(self.addr, p, &self.headers)),
            _ => None,
        };
        let mut conn: Option<Conn> = None;
        let mut k: u32 = 0;
        let mut sent: u64 = 0;
        while sent < max {
            let intended = start + offset + interval * k;
            k = k.saturating_add(1);
            if intended >= deadline {
                break;
            }
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if conn.as_ref().is_none_or(|c| c.closed) {
                match Conn::open(self.addr, self.timeout) {
                    Ok(mut c) => {
                        c.keep = record;
                        conn = Some(c);
                    }
                    Err(_) => {
                        // This slot is lost; the timeline goes on.
                        out.errors.connect += 1;
                        conn = None;
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let owned;
            let req = match &fixed {
                Some(r) => r.as_slice(),
                None => {
                    owned = request_bytes(self.addr, &paths.next(), &self.headers);
                    owned.as_slice()
                }
            };
            let began = Instant::now();
            sent += 1;
            let result = c.request(req);
            // Latency from the intended send time: a stall delays every later request of
            // this connection, and each of them counts it.
            let latency_ns = nanos(Instant::now().saturating_duration_since(intended));
            let answer = match result {
                Ok(status) => {
                    out.done(
                        status,
                        latency_ns,
                        Some(nanos(began.saturating_duration_since(intended))),
                    );
                    let head_end = find(&c.last, b"\r\n\r\n").unwrap_or(0);
                    Answer::of(status, &String::from_utf8_lossy(&c.last[..head_end]))
                }
                Err(f) => {
                    out.failed(f);
                    conn = None;
                    Answer::NoResponse
                }
            };
            if record {
                out.samples.push(Sample {
                    intended,
                    latency_ns,
                    answer,
                    part: paths.part,
                });
            }
        }
        out.finished = Instant::now();
        out
    }
}

impl WorkerOut {
    fn new(start: Instant) -> Self {
        WorkerOut {
            latencies: Vec::with_capacity(4096),
            lags: Vec::new(),
            errors: Errors::default(),
            finished: start,
            samples: Vec::new(),
        }
    }

    fn done(&mut self, status: u16, latency: u64, lag: Option<u64>) {
        self.latencies.push(latency);
        if let Some(lag) = lag {
            self.lags.push(lag);
        }
        if !(200..400).contains(&status) {
            self.errors.status += 1;
        }
    }

    fn failed(&mut self, f: Failure) {
        match f {
            Failure::Write => self.errors.write += 1,
            Failure::Read => self.errors.read += 1,
            Failure::Timeout => self.errors.timeout += 1,
        }
    }
}

fn merge(outs: Vec<WorkerOut>, start: Instant, mode: Mode, lags: bool) -> LoadResult {
    let mut latencies = Vec::new();
    let mut lag = Vec::new();
    let mut errors = Errors::default();
    let mut finished = start;
    for out in outs {
        latencies.extend(out.latencies);
        lag.extend(out.lags);
        errors.add(&out.errors);
        finished = finished.max(out.finished);
    }
    let duration_s = finished.saturating_duration_since(start).as_secs_f64();
    let requests = latencies.len() as u64;
    LoadResult {
        generator: "built-in",
        mode,
        requests,
        duration_s,
        rps: if duration_s > 0.0 {
            requests as f64 / duration_s
        } else {
            0.0
        },
        errors,
        latency: percentiles(&mut latencies),
        send_lag: if lags { percentiles(&mut lag) } else { None },
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// === stampede ===

/// The outcome of [`stampede`].
#[derive(Debug, Clone, Serialize)]
pub struct StampedeResult {
    /// Requests sent at once.
    pub clients: usize,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Failures (status errors included).
    pub errors: Errors,
    /// Latency of every response, from its own send.
    pub latency: Option<Percentiles>,
    /// When the first request was sent.
    #[serde(skip)]
    pub first_send: Instant,
    /// Milliseconds from the first send to the upstream call's arrival (filled in by the
    /// scenario, which sees the mock upstream): how long the gateway took to start the fetch.
    pub upstream_called_after_ms: Option<f64>,
}

/// Opens `clients` connections to `addr`, then sends `GET path` on all of them at once and
/// waits (at most `timeout` each) for every answer. One tokio thread drives every connection:
/// the sends go out back to back within a few milliseconds, and a thousand client threads do
/// not fight the servers for the CPU.
pub fn stampede(
    addr: SocketAddr,
    path: &str,
    clients: usize,
    timeout: Duration,
) -> anyhow::Result<StampedeResult> {
    check_loopback(addr)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = Arc::new(request_bytes(addr, path, &[]));
    rt.block_on(async move {
        let mut errors = Errors::default();
        // Connect first (retrying briefly: a short listen backlog may drop a SYN); set-up is
        // not part of the measurement.
        let mut connecting = tokio::task::JoinSet::new();
        for _ in 0..clients {
            connecting.spawn(async move {
                let until = Instant::now() + timeout;
                loop {
                    match AsyncConn::open(addr, timeout).await {
                        Ok(c) => return Some(c),
                        Err(_) if Instant::now() < until => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => return None,
                    }
                }
            });
        }
        let mut conns = Vec::with_capacity(clients);
        while let Some(c) = connecting.join_next().await {
            match c {
                Ok(Some(c)) => conns.push(c),
                _ => errors.connect += 1,
            }
        }
        // The tasks start when this one awaits, and run back to back: each sends, then waits.
        let mut set = tokio::task::JoinSet::new();
        let first_send = Instant::now();
        for mut c in conns {
            let req = Arc::clone(&req);
            set.spawn(async move {
                let began = Instant::now();
                let r = c.request(&req, timeout).await;
                // The connection goes back to be closed after the last answer: a close is
                // work for both ends, and would delay the answers still being sent.
                (r.map(|s| (s, nanos(began.elapsed()))), c)
            });
        }
        let mut ok = 0;
        let mut latencies = Vec::with_capacity(clients);
        let mut open = Vec::with_capacity(clients);
        while let Some(r) = set.join_next().await {
            let r = r.map(|(r, c)| {
                open.push(c);
                r
            });
            match r {
                Ok(Ok((status, n))) => {
                    latencies.push(n);
                    if (200..300).contains(&status) {
                        ok += 1;
                    } else {
                        errors.status += 1;
                    }
                }
                Ok(Err(Failure::Write)) => errors.write += 1,
                Ok(Err(Failure::Read)) | Err(_) => errors.read += 1,
                Ok(Err(Failure::Timeout)) => errors.timeout += 1,
            }
        }
        drop(open);
        Ok(StampedeResult {
            clients,
            ok,
            errors,
            latency: percentiles(&mut latencies),
            first_send,
            upstream_called_after_ms: None,
        })
    })
}

// === wrk ===

/// A closed-loop wrk run.
#[derive(Debug, Clone)]
pub struct Wrk<'a> {
    /// The target (must be loopback).
    pub addr: SocketAddr,
    /// What to request.
    pub paths: &'a Paths,
    /// `-c`.
    pub connections: usize,
    /// `-t`.
    pub threads: usize,
    /// `-d`.
    pub duration: Duration,
    /// `--timeout`.
    pub timeout: Duration,
    /// Where the Lua script is written.
    pub dir: &'a Path,
    /// Run wrk under `taskset -c CPU`.
    pub cpu: Option<usize>,
    /// Headers added to every request (`-H`), each `Name: value`.
    pub headers: &'a [String],
}

/// The marker of the line our Lua `done()` prints.
const WRK_MARKER: &str = "TOLLGATE_BENCH";

impl Wrk<'_> {
    /// Runs wrk and parses its summary.
    pub fn run(&self) -> anyhow::Result<LoadResult> {
        check_loopback(self.addr)?;
        if matches!(self.paths, Paths::Mix { .. } | Paths::Sweep { .. }) {
            bail!("mixed and swept paths need the built-in generator");
        }
        let script = self.dir.join(format!(
            "wrk-{}.lua",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::write(&script, wrk_script(self.paths))
            .with_context(|| format!("writing {}", script.display()))?;
        let url = match self.paths {
            Paths::Fixed(p) => format!("http://{}{p}", self.addr),
            _ => format!("http://{}/", self.addr),
        };
        let threads = self.threads.clamp(1, self.connections.max(1));
        let mut cmd = match self.cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string(), "wrk"]);
                c
            }
            None => Command::new("wrk"),
        };
        cmd.arg(format!("-t{threads}"))
            .arg(format!("-c{}", self.connections))
            // wrk takes whole seconds only.
            .arg(format!("-d{}s", whole_secs(self.duration)))
            .arg(format!("--timeout={}s", whole_secs(self.timeout)));
        for h in self.headers {
            cmd.arg("-H").arg(h);
        }
        cmd.arg("-s")
            .arg(&script)
            .arg(&url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().context("starting wrk")?;
        let pid = child.id();
        targets::register_pid(pid);
        let output = child.wait_with_output();
        targets::unregister_pid(pid);
        let _ = std::fs::remove_file(&script);
        let output = output.context("waiting for wrk")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "wrk failed ({}): {}{}",
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let summary = parse_wrk(&stdout)?;
        let duration_s = summary.duration_us as f64 / 1e6;
        Ok(LoadResult {
            generator: "wrk",
            mode: Mode::ClosedLoop {
                connections: self.connections,
                threads,
            },
            requests: summary.requests,
            duration_s,
            rps: if duration_s > 0.0 {
                summary.requests as f64 / duration_s
            } else {
                0.0
            },
            errors: summary.errors,
            latency: (summary.requests > 0).then_some(summary.latency),
            send_lag: None,
        })
    }
}

/// `d` in whole seconds, at least 1 (rounded to the nearest).
pub fn whole_secs(d: Duration) -> u64 {
    (d.as_secs_f64().round() as u64).max(1)
}

/// What our `done()` hook reports.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkSummary {
    /// Completed requests.
    pub requests: u64,
    /// Run time, µs.
    pub duration_us: u64,
    /// Errors by kind.
    pub errors: Errors,
    /// Latency (closed loop: subject to coordinated omission).
    pub latency: Percentiles,
}

/// Parses the `TOLLGATE_BENCH key=value …` line of wrk's output.
pub fn parse_wrk(stdout: &str) -> anyhow::Result<WrkSummary> {
    let line = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(WRK_MARKER))
        .with_context(|| format!("no {WRK_MARKER} line in wrk's output:\n{stdout}"))?;
    let mut fields = std::collections::HashMap::new();
    for kv in line.split_whitespace() {
        if let Some((k, v)) = kv.split_once('=') {
            fields.insert(k, v);
        }
    }
    let num = |k: &str| -> anyhow::Result<f64> {
        fields
            .get(k)
            .with_context(|| format!("wrk summary lacks {k}: {line}"))?
            .parse::<f64>()
            .with_context(|| format!("wrk summary {k} is not a number: {line}"))
    };
    let int = |k: &str| num(k).map(|v| v.max(0.0) as u64);
    Ok(WrkSummary {
        requests: int("requests")?,
        duration_us: int("duration_us")?,
        errors: Errors {
            connect: int("connect")?,
            read: int("read")?,
            write: int("write")?,
            status: int("status")?,
            timeout: int("timeout")?,
        },
        latency: Percentiles {
            p50_us: num("p50_us")?,
            p90_us: num("p90_us")?,
            p99_us: num("p99_us")?,
            p999_us: num("p999_us")?,
            max_us: num("max_us")?,
            mean_us: num("mean_us")?,
        },
    })
}

fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The Lua script for `paths`: per-thread ids, the request chooser, and a `done()` that prints
/// one machine-readable summary line (latencies in µs).
pub fn wrk_script(paths: &Paths) -> String {
    let mut s = String::from(
        "-- generated by `cargo xtask bench`\n\
         local threads = 0\n\
         function setup(thread)\n  threads = threads + 1\n  thread:set(\"id\", threads)\nend\n",
    );
    match paths {
        // Mixed and swept paths are refused by `Wrk::run`.
        Paths::Fixed(_) | Paths::Mix { .. } | Paths::Sweep { .. } => {}
        Paths::Zipf {
            prefix,
            cdf_file,
            seed,
            ..
        } => {
            s.push_str(&format!(
                r#"local cdf, reqs, n = {{}}, {{}}, 0
function init(args)
  for line in io.lines({file}) do
    n = n + 1
    cdf[n] = tonumber(line)
  end
  math.randomseed({seed} + (id or 0) * 7919)
  for i = 1, n do
    reqs[i] = wrk.format("GET", {prefix} .. (i - 1))
  end
end
function request()
  local u = math.random()
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return reqs[lo]
end
"#,
                file = lua_string(&cdf_file.display().to_string()),
                seed = seed % 1_000_000_007,
                prefix = lua_string(prefix),
            ));
        }
        Paths::Unique { prefix } => {
            s.push_str(&format!(
                r#"local sent = 0
function request()
  sent = sent + 1
  return wrk.format("GET", {prefix} .. (id or 0) .. "-" .. sent)
end
"#,
                prefix = lua_string(prefix),
            ));
        }
    }
    s.push_str(&format!(
        r#"function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("{WRK_MARKER} requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d mean_us=%.1f max_us=%.1f p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"#
    ));
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The stampede's connections stay open until every answer is in: a client closing its
    /// connection as soon as it has its answer makes the server close it too, while the
    /// server still has answers to send.
    #[test]
    fn a_stampede_closes_no_connection_before_the_last_answer() {
        use std::io::{Read, Write};
        const CLIENTS: usize = 20;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut conns: Vec<std::net::TcpStream> =
                (0..CLIENTS).map(|_| listener.accept().unwrap().0).collect();
            for c in &mut conns {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    c.read_exact(&mut byte).unwrap();
                    head.push(byte[0]);
                }
            }
            // Answer one connection at a time; after each, look for answered ones closed.
            let mut closed_early = 0;
            for i in 0..CLIENTS {
                conns[i]
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .unwrap();
                std::thread::sleep(Duration::from_millis(5));
                if i + 1 == CLIENTS {
                    break;
                }
                for c in &conns[..=i] {
                    c.set_nonblocking(true).unwrap();
                    if matches!(c.peek(&mut [0u8; 1]), Ok(0)) {
                        closed_early += 1;
                    }
                }
            }
            closed_early
        });
        let result = stampede(addr, "/k", CLIENTS, Duration::from_secs(5)).unwrap();
        assert_eq!(result.ok, CLIENTS as u64);
        assert_eq!(
            server.join().unwrap(),
            0,
            "connections closed before the last answer"
        );
    }

    /// 64 connections drawing 40 keys each out of 200 request nearly every key: their
    /// streams are independent, not shifted copies of one stream.
    #[test]
    fn workers_draw_independent_keys() {
        let paths = Paths::Mix {
            parts: Arc::new(vec![MixPart {
                share: 1.0,
                prefix: "/k=".into(),
                keys: Some(200),
            }]),
            seed: 5,
        };
        let mut seen = std::collections::HashSet::new();
        for worker in 0..64 {
            let mut g = PathGen::new(&paths, worker);
            for _ in 0..40 {
                seen.insert(g.next());
            }
        }
        assert!(seen.len() >= 190, "only {} distinct keys", seen.len());
    }

    #[test]
    fn a_sweep_asks_for_every_key() {
        // Key counts that do and do not divide evenly among the connections.
        for (keys, connections) in [(100usize, 7usize), (64, 64), (10, 64), (1000, 1)] {
            let spec = Builtin {
                addr: "127.0.0.1:1".parse().unwrap(),
                paths: Paths::sweep("/k?id=".into(), keys),
                connections,
                threads: 1,
                duration: Duration::from_secs(1),
                rate: None,
                timeout: Duration::from_secs(1),
                max_requests: keys as u64,
                headers: Vec::new(),
            };
            let mut seen = std::collections::BTreeSet::new();
            for worker in 0..connections {
                let mut draw = PathGen::new(&spec.paths, worker);
                for _ in 0..spec.per_worker_max() {
                    let path = draw.next();
                    let key: usize = path.strip_prefix("/k?id=").unwrap().parse().unwrap();
                    assert!(key < keys, "{path}");
                    seen.insert(key);
                }
            }
            assert_eq!(
                seen.len(),
                keys,
                "{keys} keys over {connections} connections"
            );
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 50.0), 50);
        assert_eq!(nearest_rank(&v, 90.0), 90);
        assert_eq!(nearest_rank(&v, 99.0), 99);
        assert_eq!(nearest_rank(&v, 99.9), 100);
        assert_eq!(nearest_rank(&v, 100.0), 100);
        assert_eq!(nearest_rank(&v, 0.0), 1);
        assert_eq!(nearest_rank(&[7], 99.9), 7);
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(nearest_rank(&v, 99.9), 999);

        let mut shuffled: Vec<u64> = (1..=10).rev().map(|n| n * 1000).collect();
        let p = percentiles(&mut shuffled).unwrap();
        assert_eq!(p.p50_us, 5.0);
        assert_eq!(p.p90_us, 9.0);
        assert_eq!(p.p99_us, 10.0);
        assert_eq!(p.max_us, 10.0);
        assert_eq!(p.mean_us, 5.5);
        assert!(percentiles(&mut []).is_none());
    }

    const WRK_OUT: &str = "Running 3s test @ http://127.0.0.1:40000/bench/hot
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   412.33us  301.12us  12.20ms   90.00%
    Req/Sec    80.11k     3.20k   88.00k    70.00%
  478123 requests in 3.00s, 380.12MB read
Requests/sec: 159374.33
Transfer/sec:    126.70MB
TOLLGATE_BENCH requests=478123 duration_us=3000012 bytes=398584120 connect=0 read=2 write=0 status=5 timeout=1 mean_us=412.3 max_us=12200.0 p50_us=380.0 p90_us=610.0 p99_us=1400.0 p999_us=4100.0
";

    #[test]
    fn parses_wrk_summary() {
        let s = parse_wrk(WRK_OUT).unwrap();
        assert_eq!(s.requests, 478_123);
        assert_eq!(s.duration_us, 3_000_012);
        assert_eq!(
            s.errors,
            Errors {
                connect: 0,
                read: 2,
                write: 0,
                status: 5,
                timeout: 1
            }
        );
        assert_eq!(s.errors.total(), 8);
        assert_eq!(s.latency.p50_us, 380.0);
        assert_eq!(s.latency.p999_us, 4100.0);
        assert_eq!(s.latency.max_us, 12200.0);
        assert!(parse_wrk("Running 3s test\n").is_err());
        assert!(parse_wrk("TOLLGATE_BENCH requests=1\n").is_err());
    }

    #[test]
    fn wrk_gets_whole_seconds() {
        assert_eq!(whole_secs(Duration::from_millis(500)), 1);
        assert_eq!(whole_secs(Duration::from_millis(2600)), 3);
        assert_eq!(whole_secs(Duration::from_secs(10)), 10);
    }

    #[test]
    fn scripts_quote_paths_and_define_done() {
        let s = wrk_script(&Paths::Unique {
            prefix: "/bench/miss?k=\"x".into(),
        });
        assert!(s.contains(r#""/bench/miss?k=\"x""#));
        assert!(s.contains("function request()"));
        assert!(s.contains("function done("));
        let s = wrk_script(&Paths::Fixed("/bench/hot".into()));
        assert!(!s.contains("function request()"));
    }

    #[test]
    fn parses_responses() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Cache: HIT\r\n\r\nhelloHTTP/1.1";
        assert_eq!(
            parse_response(r).unwrap(),
            Some(Parsed {
                status: 200,
                len: r.len() - 8,
                close: false
            })
        );
        // Incomplete body, incomplete head.
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel").unwrap(),
            None
        );
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        // Chunked.
        let c = b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(c).unwrap(),
            Some(Parsed {
                status: 502,
                len: c.len(),
                close: true
            })
        );
        assert_eq!(parse_response(&c[..c.len() - 2]).unwrap(), None);
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn reads_prometheus_text() {
        let text = "# HELP tollgate_cache_bytes Bytes\n# TYPE tollgate_cache_bytes gauge\n\
                    tollgate_cache_bytes 4194000\n\
                    tollgate_cache_bytes_other 1\n\
                    tollgate_upstream_retries_total{upstream=\"bench\"} 12\n\
                    tollgate_upstream_retries_total{upstream=\"other\"} 3\n\
                    tollgate_requests_total{upstream=\"bench\",route=\"/a\",outcome=\"hit\"} 5\n\
                    tollgate_requests_total{upstream=\"bench\",route=\"/b\",outcome=\"hit\"} 7\n";
        assert_eq!(metric(text, "tollgate_cache_bytes", &[]), Some(4_194_000.0));
        assert_eq!(
            metric(
                text,
                "tollgate_upstream_retries_total",
                &[("upstream", "bench")]
            ),
            Some(12.0)
        );
        assert_eq!(
            metric(text, "tollgate_upstream_retries_total", &[]),
            Some(15.0)
        );
        assert_eq!(
            metric(text, "tollgate_requests_total", &[("outcome", "hit")]),
            Some(12.0)
        );
        assert_eq!(metric(text, "tollgate_cache_entries", &[]), None);
    }

    #[test]
    fn classifies_answers_and_dechunks() {
        let head = |extra: &str| format!("HTTP/1.1 200 OK\r\ncontent-length: 2{extra}");
        assert_eq!(Answer::of(200, &head("\r\nX-Cache: STALE")), Answer::Stale);
        assert_eq!(Answer::of(200, &head("\r\nx-cache: hit")), Answer::Hit);
        assert_eq!(
            Answer::of(
                200,
                &head("\r\nX-Cache: BYPASS\r\nx-tollgate-fallback: true")
            ),
            Answer::Fallback
        );
        assert_eq!(Answer::of(200, &head("")), Answer::OtherOk);
        assert_eq!(Answer::of(503, "HTTP/1.1 503 x"), Answer::Unavailable);
        assert_eq!(Answer::of(429, "HTTP/1.1 429 x"), Answer::OtherStatus);
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n"), b"abcde");
        assert_eq!(
            request_bytes(
                SocketAddr::from(([127, 0, 0, 1], 1)),
                "/x",
                &["Authorization: Bearer k".into()]
            ),
            b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:1\r\nUser-Agent: tollgate-bench\r\nAuthorization: Bearer k\r\n\r\n"
        );
    }

    #[test]
    fn mixed_paths_follow_their_shares() {
        let paths = Paths::Mix {
            parts: Arc::new(vec![
                MixPart {
                    share: 3.0,
                    prefix: "/w?k=".into(),
                    keys: Some(10),
                },
                MixPart {
                    share: 1.0,
                    prefix: "/c?k=".into(),
                    keys: None,
                },
            ]),
            seed: 1,
        };
        let mut g = PathGen::new(&paths, 7);
        let drawn: Vec<String> = (0..4000).map(|_| g.next()).collect();
        let warm = drawn.iter().filter(|p| p.starts_with("/w?k=")).count();
        assert!((2800..3200).contains(&warm), "{warm}");
        assert!(
            drawn
                .iter()
                .filter(|p| p.starts_with("/w?k="))
                .all(|p| p[5..].parse::<usize>().unwrap() < 10)
        );
        let cold: std::collections::HashSet<&String> =
            drawn.iter().filter(|p| p.starts_with("/c?k=7-")).collect();
        assert_eq!(cold.len(), 4000 - warm, "cold paths never repeat");
    }

    #[test]
    fn splitmix_is_uniform_enough() {
        let mut r = SplitMix64(1);
        let n = 100_000;
        let mean = (0..n).map(|_| r.next_f64()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
