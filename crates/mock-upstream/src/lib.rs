//! # mock-upstream
//!
//! A local HTTP/1.1 server that stands in for a paid third-party API in tests, the demo and
//! load benchmarks. It counts every call, records the last requests it saw, and can be told
//! to be slow, to fail, to hang, to send big (or chunked) bodies or extra headers.
//!
//! Every request is answered (by default) with `200 OK`, `content-type: application/json`,
//! an `x-mock-call: <n>` header and a JSON body describing the request:
//!
//! ```json
//! {"call":1,"method":"GET","path":"/properties","query":"city=Austin","body_len":0,"pad":"xxxx…"}
//! ```
//!
//! padded so the whole body is about [`MockUpstream::set_body_bytes`] bytes (600 by default).
//!
//! ```
//! use mock_upstream::MockUpstream;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let mock = MockUpstream::start().await?;
//! mock.set_delay(Duration::from_millis(5));
//! mock.fail_next(1, 500);
//! println!("point the client at {}", mock.url());
//! assert_eq!(mock.calls(), 0);
//! # Ok(())
//! # }
//! ```
//!
//! The server runs on a spawned tokio task. It stops when [`MockUpstream::shutdown`] is called
//! or when the last clone of the handle is dropped; open connections are closed then.
//!
//! **Invariant:** the hot path (a default response) touches only atomics and one short
//! `Mutex` (the recorded-requests ring and per-path counters); nothing is logged.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// How many requests [`MockUpstream::requests`] keeps (the most recent ones).
pub const RECORDED_REQUESTS: usize = 1000;

/// The default size of the JSON body, in bytes.
pub const DEFAULT_BODY_BYTES: usize = 600;

/// Chunk size used when [`MockUpstream::set_chunked`] is on.
const CHUNK_BYTES: usize = 16 * 1024;

/// Listen backlog, so a thousand clients connecting at once are not refused.
const BACKLOG: u32 = 4096;

// === impl RecordedRequest ===

/// One request as the mock saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The request path, e.g. `/v1/properties` (still percent-encoded).
    pub path: String,
    /// The query string without the `?` (empty when there was none).
    pub query: String,
    /// Header names (lower-case) and values, in arrival order; repeated headers appear once
    /// per value. Non-UTF-8 values are converted lossily.
    pub headers: Vec<(String, String)>,
    /// The full request body.
    pub body: Bytes,
    /// When its head had arrived (before the body was read and before any delay).
    pub arrived: std::time::Instant,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a header called `name` (case-insensitive) was sent at all.
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
}

// === shared state ===

/// Rarely-changed response settings; read under a lock only while `has_extras` is set.
#[derive(Default)]
struct Extras {
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Option<Bytes>,
}

#[derive(Default)]
struct Recorder {
    ring: VecDeque<RecordedRequest>,
    per_path: HashMap<String, u64>,
}

struct State {
    calls: AtomicU64,
    connections: AtomicU64,
    delay_nanos: AtomicU64,
    body_bytes: AtomicUsize,
    /// 0 = no fixed status.
    status: AtomicU16,
    fail_remaining: AtomicU64,
    fail_status: AtomicU16,
    chunked: AtomicBool,
    hanging: AtomicBool,
    hang: watch::Sender<bool>,
    has_extras: AtomicBool,
    extras: Mutex<Extras>,
    recorder: Mutex<Recorder>,
}

impl State {
    fn new() -> Self {
        Self {
            calls: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            delay_nanos: AtomicU64::new(0),
            body_bytes: AtomicUsize::new(DEFAULT_BODY_BYTES),
            status: AtomicU16::new(0),
            fail_remaining: AtomicU64::new(0),
            fail_status: AtomicU16::new(500),
            chunked: AtomicBool::new(false),
            hanging: AtomicBool::new(false),
            hang: watch::Sender::new(false),
            has_extras: AtomicBool::new(false),
            extras: Mutex::new(Extras::default()),
            recorder: Mutex::new(Recorder::default()),
        }
    }

    fn recorder(&self) -> MutexGuard<'_, Recorder> {
        // A panic while holding this lock cannot leave the data inconsistent.
        self.recorder.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn extras(&self) -> MutexGuard<'_, Extras> {
        self.extras.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refresh_has_extras(&self, extras: &Extras) {
        let has = !extras.headers.is_empty() || extras.body.is_some();
        self.has_extras.store(has, Ordering::Release);
    }

    /// The status forced for this request, if any: a pending `fail_next` first, then
    /// `set_status`.
    fn forced_status(&self) -> Option<u16> {
        let took_failure = self
            .fail_remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if took_failure {
            return Some(self.fail_status.load(Ordering::Acquire));
        }
        match self.status.load(Ordering::Acquire) {
            0 => None,
            s => Some(s),
        }
    }
}

// === impl MockUpstream ===

/// Handle to a running mock upstream. Cheap to clone; the server stops when the last clone is
/// dropped or [`shutdown`](MockUpstream::shutdown) is called.
#[derive(Clone)]
pub struct MockUpstream {
    inner: Arc<Handle>,
}

struct Handle {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.inner.addr)
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

impl MockUpstream {
    /// Starts a mock on `127.0.0.1` with a port chosen by the OS.
    pub async fn start() -> std::io::Result<MockUpstream> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a mock listening on `addr` (port 0 picks a free port).
    ///
    /// Must be called inside a tokio runtime; the server runs on a spawned task.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<MockUpstream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(BACKLOG)?;
        let addr = listener.local_addr()?;

        let state = Arc::new(State::new());
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, Arc::clone(&state), shutdown_rx));
        Ok(MockUpstream {
            inner: Arc::new(Handle {
                addr,
                state,
                shutdown,
            }),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The base URL, e.g. `http://127.0.0.1:41234` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Stops the server and closes every open connection (pending requests get no answer).
    /// Other clones of the handle keep working as handles, but the port is no longer served.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// How many requests arrived since the start (or the last [`reset_calls`](Self::reset_calls)).
    /// A request counts as soon as its head is read, before any delay or hang.
    pub fn calls(&self) -> u64 {
        self.state().calls.load(Ordering::Acquire)
    }

    /// How many TCP connections were accepted since the start (never reset). With keep-alive
    /// clients this stays far below [`calls`](Self::calls).
    pub fn connections(&self) -> u64 {
        self.state().connections.load(Ordering::Acquire)
    }

    /// How many requests arrived for exactly this path (without the query string).
    pub fn calls_to(&self, path: &str) -> u64 {
        self.state()
            .recorder()
            .per_path
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Sets every call counter back to zero and forgets the recorded requests.
    /// The next request is call number 1 again.
    pub fn reset_calls(&self) {
        let state = self.state();
        let mut recorder = state.recorder();
        state.calls.store(0, Ordering::Release);
        recorder.per_path.clear();
        recorder.ring.clear();
    }

    /// The most recent requests (up to [`RECORDED_REQUESTS`]), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().recorder().ring.iter().cloned().collect()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.state().recorder().ring.back().cloned()
    }

    /// Every response waits `d` before it is sent (`Duration::ZERO` to stop waiting).
    pub fn set_delay(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.state().delay_nanos.store(nanos, Ordering::Release);
    }

    /// Pads the default JSON body to about `n` bytes (default [`DEFAULT_BODY_BYTES`]).
    /// The body is never smaller than the JSON without padding.
    pub fn set_body_bytes(&self, n: usize) {
        self.state().body_bytes.store(n, Ordering::Release);
    }

    /// The next `n` requests are answered with `status` (e.g. 500) instead of the configured
    /// one. The body stays the usual JSON.
    pub fn fail_next(&self, n: usize, status: u16) {
        let state = self.state();
        state.fail_status.store(status, Ordering::Release);
        state
            .fail_remaining
            .store(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Release);
    }

    /// Every request is answered with `status` until cleared with `None`.
    /// Values outside 100..=999 are treated as 500 when sent.
    pub fn set_status(&self, status: Option<u16>) {
        self.state()
            .status
            .store(status.unwrap_or(0), Ordering::Release);
    }

    /// While `true`, requests are counted and recorded but never answered. Clearing it lets
    /// the pending requests answer (after the configured delay).
    pub fn set_hang(&self, hang: bool) {
        let state = self.state();
        state.hanging.store(hang, Ordering::Release);
        state.hang.send_replace(hang);
    }

    /// Sends the body with `Transfer-Encoding: chunked` and no `Content-Length` while `true`.
    pub fn set_chunked(&self, chunked: bool) {
        self.state().chunked.store(chunked, Ordering::Release);
    }

    /// Adds header `name: value` to every response, or removes it with `None`. Setting a
    /// name again replaces its value. Invalid names or values are ignored.
    pub fn set_response_header(&self, name: &str, value: Option<&str>) {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            return;
        };
        let state = self.state();
        let mut extras = state.extras();
        extras.headers.retain(|(n, _)| n != name);
        if let Some(value) = value {
            let Ok(value) = HeaderValue::from_str(value) else {
                state.refresh_has_extras(&extras);
                return;
            };
            extras.headers.push((name, value));
        }
        state.refresh_has_extras(&extras);
    }

    /// Answers with exactly `body` instead of the JSON (the `content-type` stays
    /// `application/json` unless overridden with [`set_response_header`](Self::set_response_header)).
    pub fn set_body_override(&self, body: Option<Bytes>) {
        let state = self.state();
        let mut extras = state.extras();
        extras.body = body;
        state.refresh_has_extras(&extras);
    }

    fn state(&self) -> &State {
        &self.inner.state
    }
}

// === server ===

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                state.connections.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(serve_connection(
                    stream,
                    Arc::clone(&state),
                    shutdown.clone(),
                ));
            }
            // Out of file descriptors and the like: back off briefly, keep serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| handle(Arc::clone(&state), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        // Dropping the connection closes the socket, pending requests included.
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let arrived = std::time::Instant::now();
    let call = state.calls.fetch_add(1, Ordering::AcqRel) + 1;

    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let method = parts.method.as_str().to_owned();
    let headers = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    // A client that goes away mid-body still counts; record what arrived (nothing).
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body_len = body.len();

    {
        let mut recorder = state.recorder();
        match recorder.per_path.get_mut(&path) {
            Some(count) => *count += 1,
            None => {
                recorder.per_path.insert(path.clone(), 1);
            }
        }
        if recorder.ring.len() >= RECORDED_REQUESTS {
            recorder.ring.pop_front();
        }
        recorder.ring.push_back(RecordedRequest {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            headers,
            body,
            arrived,
        });
    }

    let status = state.forced_status();

    if state.hanging.load(Ordering::Acquire) {
        let mut rx = state.hang.subscribe();
        // Err only if the sender is gone, i.e. the server is shutting down anyway.
        let _ = rx.wait_for(|hang| !*hang).await;
    }
    let delay = state.delay_nanos.load(Ordering::Acquire);
    if delay > 0 {
        tokio::time::sleep(Duration::from_nanos(delay)).await;
    }

    let (extra_headers, body_override) = if state.has_extras.load(Ordering::Acquire) {
        let extras = state.extras();
        (extras.headers.clone(), extras.body.clone())
    } else {
        (Vec::new(), None)
    };

    let payload = match body_override {
        Some(body) => body,
        None => json_body(
            call,
            &method,
            &path,
            &query,
            body_len,
            state.body_bytes.load(Ordering::Acquire),
        ),
    };
    let body = if state.chunked.load(Ordering::Acquire) {
        MockBody::chunked(payload)
    } else {
        MockBody::full(payload)
    };

    let mut response = Response::new(body);
    *response.status_mut() =
        status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(if status.is_some() {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            });
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        HeaderName::from_static("x-mock-call"),
        HeaderValue::from(call),
    );
    for (name, value) in extra_headers {
        headers.insert(name, value);
    }
    Ok(response)
}

/// `{"call":n,"method":..,"path":..,"query":..,"body_len":..,"pad":"xxx…"}`, padded so the
/// whole body is `target` bytes when that is larger than the unpadded JSON.
fn json_body(
    call: u64,
    method: &str,
    path: &str,
    query: &str,
    body_len: usize,
    target: usize,
) -> Bytes {
    let mut out = format!(
        "{{\"call\":{call},\"method\":{},\"path\":{},\"query\":{},\"body_len\":{body_len},\"pad\":\"",
        json_string(method),
        json_string(path),
        json_string(query),
    );
    let pad = target.saturating_sub(out.len() + 2);
    out.reserve(pad + 2);
    out.extend(std::iter::repeat_n('x', pad));
    out.push_str("\"}");
    Bytes::from(out)
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

// === impl MockBody ===

/// A response body: either one buffer with a known length, or chunks of unknown total length
/// (so hyper sends `Transfer-Encoding: chunked`).
struct MockBody {
    remaining: Bytes,
    chunked: bool,
}

impl MockBody {
    fn full(body: Bytes) -> Self {
        Self {
            remaining: body,
            chunked: false,
        }
    }

    fn chunked(body: Bytes) -> Self {
        Self {
            remaining: body,
            chunked: true,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining.is_empty() {
            return Poll::Ready(None);
        }
        let take = if self.chunked {
            self.remaining.len().min(CHUNK_BYTES)
        } else {
            self.remaining.len()
        };
        let chunk = self.remaining.split_to(take);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.chunked {
            SizeHint::default()
        } else {
            SizeHint::with_exact(self.remaining.len() as u64)
        }
    }
}

#[cfg(test)]
mod tests;
