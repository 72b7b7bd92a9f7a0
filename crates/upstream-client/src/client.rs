//! The pooled client for one upstream.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use breaker::{Clock, Idempotence, MonotonicClock, Permit, Snapshot, State, Stop};
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use tokio::time::Instant;
use url::Url;

use crate::error::{Result, UpstreamError};
use crate::headers;
use crate::resilience::{self, Guard, Reason, Resilience};
use crate::target::Base;
use crate::transport::{self, Body, Pools};

// === impl UpstreamSettings ===

/// How to reach one upstream. Build with [`UpstreamSettings::new`] and adjust the fields.
#[derive(Clone)]
pub struct UpstreamSettings {
    /// The upstream's name (used in errors, logs and metrics).
    pub name: String,
    /// Where requests go; may carry a path prefix (`https://api.rentcast.io/v1`) and a query
    /// (kept in front of the client's query, e.g. for an API key in the query string).
    pub base_url: Url,
    /// Headers added to every request, e.g. `("X-Api-Key", secret)`. They replace any client
    /// header of the same name and never appear in `Debug` output.
    pub headers: Vec<(String, String)>,
    /// How long establishing a connection (TCP + TLS) may take.
    pub connect_timeout: Duration,
    /// Total deadline for one [`send`](UpstreamClient::send): connecting, sending, reading
    /// the whole body, and every retry and backoff wait.
    pub timeout: Duration,
    /// The largest response body accepted; larger ones fail with
    /// [`UpstreamError::BodyTooLarge`].
    pub max_body_bytes: u64,
    /// How many idle keep-alive connections each thread's pool keeps per host: the client
    /// keeps one pool per thread that sends (a connection is used on the thread that opened
    /// it), so the most kept idle is this times the threads that send.
    pub pool_max_idle_per_host: usize,
    /// Circuit breaker, retries and retry budget for this upstream (all on by default).
    pub resilience: Resilience,
}

impl UpstreamSettings {
    /// Settings with defaults: no injected headers, 5 s connect timeout, 30 s total timeout,
    /// 10 MiB body cap, 32 idle connections, and [`Resilience::default`] (breaker and
    /// retries on).
    pub fn new(name: impl Into<String>, base_url: Url) -> Self {
        Self {
            name: name.into(),
            base_url,
            headers: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            max_body_bytes: 10 * 1024 * 1024,
            pool_max_idle_per_host: 32,
            resilience: Resilience::default(),
        }
    }
}

impl fmt::Debug for UpstreamSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("UpstreamSettings")
            .field("name", &self.name)
            .field("base_url", &redacted_url(&self.base_url))
            .field("headers", &header_names)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("resilience", &self.resilience)
            .finish()
    }
}

/// The URL without credentials or query (either may hold secrets).
fn redacted_url(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.to_string()
}

// === impl OutboundRequest ===

/// One request to send upstream, as received from a client.
#[derive(Clone)]
pub struct OutboundRequest<'a> {
    /// The HTTP method, e.g. `"GET"`.
    pub method: &'a str,
    /// The upstream-relative path (`/properties`), percent-encoded as received; empty means
    /// the base URL itself. `.`/`..` segments are rejected.
    pub path: &'a str,
    /// The query string without the leading `?`; empty for none.
    pub query: &'a str,
    /// The client's request headers. Hop-by-hop headers, `Host`, `Content-Length` and the
    /// client's credentials (`Authorization`, `X-Api-Key`, `Cookie`, `Proxy-Authorization`)
    /// are dropped; the rest is forwarded.
    pub headers: &'a [(String, String)],
    /// The request body (empty for none).
    pub body: Bytes,
    /// Whether a request whose method is not idempotent (POST, PATCH) may be retried: set it
    /// for routes where sending the same request twice is harmless (a compute API whose
    /// identical bodies give identical answers). GET, HEAD, PUT, DELETE, OPTIONS and TRACE
    /// are retried regardless. Default `false`.
    pub retry_non_idempotent: bool,
}

impl<'a> OutboundRequest<'a> {
    /// A `GET` with no headers and no body.
    pub fn get(path: &'a str, query: &'a str) -> Self {
        Self {
            method: "GET",
            path,
            query,
            headers: &[],
            body: Bytes::new(),
            retry_non_idempotent: false,
        }
    }
}

impl fmt::Debug for OutboundRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values may be credentials: show names only.
        let header_names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("OutboundRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("headers", &header_names)
            .field("body_len", &self.body.len())
            .field("retry_non_idempotent", &self.retry_non_idempotent)
            .finish()
    }
}

// === impl UpstreamResponse ===

/// What the upstream answered. Any status, 5xx included, is a response: deciding what a
/// status means is the caller's business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamResponse {
    /// The HTTP status code.
    pub status: u16,
    /// Response headers with lower-case names, minus hop-by-hop headers. `Content-Encoding`
    /// and `Content-Length` describe `body` as it is (bodies are never decompressed).
    pub headers: Vec<(String, String)>,
    /// The whole body, exactly as sent.
    pub body: Bytes,
}

impl UpstreamResponse {
    /// The first value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

// === impl UpstreamClient ===

/// The HTTP client for one upstream: its connection pools (one per thread that sends), its
/// credentials, its limits, its circuit breaker and its retry budget. Cheap to clone; clones
/// share all of them.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    base: Base,
    injected: Vec<(HeaderName, HeaderValue)>,
    /// `Authorization` for the base URL's user info, if it has any.
    url_auth: Option<HeaderValue>,
    http: Pools,
    timeout: Duration,
    max_body_bytes: u64,
    guard: Guard,
}

/// What the retry loop remembers between attempts.
#[derive(Default)]
struct Last {
    /// Attempts finished so far.
    attempts: u32,
    /// How the latest one went (for the next retry's log line).
    reason: Reason,
    /// The latest attempt's result, if it was a retryable failure.
    latest: Option<Result<UpstreamResponse>>,
    /// The one before it, if it was a retryable failure.
    earlier: Option<Result<UpstreamResponse>>,
}

/// One request, checked and built once, sent as often as retries need.
struct Prepared<'r> {
    method: Method,
    uri: Uri,
    /// The outbound headers, built by `send`, moved into the first attempt (a retry builds
    /// them again from `client_headers`: cheaper than a copy per request for the rare retry).
    headers: Mutex<Option<HeaderMap>>,
    /// The client's headers, as received.
    client_headers: &'r [(String, String)],
    body: Bytes,
    /// For logs: the upstream-relative path as the client sent it.
    path: &'r str,
    /// The end of the whole request: the first attempt's start plus `timeout`.
    deadline: Instant,
}

impl Prepared<'_> {
    /// Time left until the request's deadline.
    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

impl fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("name", &self.inner.name)
            .field("timeout", &self.inner.timeout)
            .field("max_body_bytes", &self.inner.max_body_bytes)
            .field("resilience", &self.inner.guard)
            .finish_non_exhaustive()
    }
}

impl UpstreamClient {
    /// Builds the client, its pool, and its breaker and retry budget on the real clock.
    /// Installs the rustls `ring` crypto provider if no provider is installed yet (see
    /// [`install_crypto_provider`](crate::install_crypto_provider)).
    ///
    /// Fails with [`UpstreamError::Config`] for a non-HTTP(S) base URL, an invalid or
    /// hop-by-hop injected header, a zero timeout, or invalid breaker, retry or budget
    /// settings.
    pub fn new(s: UpstreamSettings) -> Result<Self> {
        Self::with_clock(s, Arc::new(MonotonicClock::new()))
    }

    /// [`new`](Self::new), with the circuit breaker and the retry budget reading time from
    /// `clock` (a [`breaker::ManualClock`] in tests, so an open period can end without
    /// waiting for it).
    ///
    /// Timeouts and backoff waits always run on tokio's clock. The retry deadline is judged
    /// on `clock`, but no attempt and no wait ever outlasts the real `timeout` (see
    /// [`send`](Self::send)), whatever `clock` says.
    pub fn with_clock(s: UpstreamSettings, clock: Arc<dyn Clock>) -> Result<Self> {
        let base = Base::new(&s.base_url)?;
        let injected = headers::parse_injected(&s.headers)?;
        if s.timeout.is_zero() || s.connect_timeout.is_zero() {
            return Err(UpstreamError::config(format!(
                "upstream {}: timeout and connect_timeout must be greater than zero",
                s.name
            )));
        }
        let guard = Guard::new(&s.name, &s.resilience, s.timeout, clock)?;
        crate::install_crypto_provider();
        // No proxy from the environment, no redirects followed (a gateway hands them to its
        // client), no Referer, no decompression: the pool does none of these.
        let http = transport::pools(s.connect_timeout, s.pool_max_idle_per_host).map_err(|e| {
            UpstreamError::config(format!(
                "upstream {}: cannot build the HTTP client: {e}",
                s.name
            ))
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                name: s.name,
                base,
                injected,
                url_auth: headers::basic_auth(&s.base_url),
                http,
                timeout: s.timeout,
                max_body_bytes: s.max_body_bytes,
                guard,
            }),
        })
    }

    /// The upstream's configured name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The URL a request for `path` and `query` goes to: `{base_url}{path}?{query}`, with the
    /// base URL's own query kept in front. Fails with [`UpstreamError::InvalidRequest`] when
    /// the path contains `.`/`..` segments (also percent-encoded) or a backslash.
    pub fn url_for(&self, path: &str, query: &str) -> Result<Url> {
        self.inner.base.join(path, query)
    }

    /// Sends one request through the upstream's circuit breaker, retrying retryable
    /// failures, and reads the whole response body within the body cap.
    ///
    /// **Outcomes.** Any HTTP status the upstream sends is `Ok`, including a 503 that was
    /// still a 503 after the last retry: what a status means is the caller's business.
    /// An open breaker gives [`UpstreamError::Unavailable`] at once, without a call (also
    /// when it opens between two attempts of this request). Otherwise the error is the
    /// last attempt's, except that a retry which timed out, having only the rest of the
    /// deadline, yields the attempt before it (the upstream's 503, a refused connection)
    /// instead of a timeout.
    ///
    /// **Retries** (when [`Resilience::retry`] is set): connect errors, timeouts, protocol
    /// errors and 429/502/503/504 responses are retried, waiting at least the upstream's
    /// `Retry-After`; 500, 501 and other statuses are not. A method that is not idempotent
    /// (POST, PATCH) is retried only with [`OutboundRequest::retry_non_idempotent`]. Each
    /// retry is paid from the upstream's retry budget; an empty budget ends the request
    /// with the last result. The breaker is asked before every attempt.
    ///
    /// **Breaker.** An attempt counts as a failure for connect errors, timeouts, protocol
    /// errors, 429 and 5xx; as a success for every other status (a 404 is the upstream
    /// working). A body over the cap is judged by its status. A timeout of a retry whose
    /// time was cut short by the deadline below, and requests that cannot be built, are
    /// not counted.
    ///
    /// **Time bound.** `send` returns within the upstream's `timeout`, measured from the
    /// moment the first attempt starts, plus scheduling slack (tokio's timer resolution,
    /// about a millisecond, and the time to get polled again). The first attempt may use
    /// the whole `timeout`; every later attempt only what is left of it; and a retry is
    /// started only if it can begin before `min(retry.deadline, timeout − reserve)` with
    /// `reserve = min(timeout / 10, 1 s)`, so the last attempt always gets at least the
    /// reserve. An upstream that hangs therefore costs one `timeout`, never `max_attempts`
    /// of them: only failures that come back early (a refused connection, a quick 503) are
    /// retried.
    pub async fn send(&self, req: OutboundRequest<'_>) -> Result<UpstreamResponse> {
        let method = Method::from_bytes(req.method.as_bytes())
            .map_err(|_| UpstreamError::invalid(format!("invalid method {:?}", req.method)))?;
        let uri = self.inner.base.target(req.path, req.query)?;
        let headers = self.outbound_headers(req.headers, &method, &req.body)?;
        let idempotence = Idempotence::of_method(method.as_str(), req.retry_non_idempotent);
        let guard = &self.inner.guard;

        // An open breaker answers at once: no call, nothing paid into the retry budget.
        let first = guard.admit(&self.inner.name)?;
        let call = Prepared {
            method,
            uri,
            headers: Mutex::new(Some(headers)),
            client_headers: req.headers,
            body: req.body,
            path: req.path,
            deadline: Instant::now() + self.inner.timeout,
        };
        let Some(policy) = &guard.policy else {
            return self.attempt(&call, 1, first).await;
        };

        let last = Mutex::new(Last::default());
        let this = self;
        let call = &call;
        let mut first = Some(first);
        let done = breaker::retry(
            policy,
            &guard.budget,
            idempotence,
            |wait| {
                let (attempt, reason) = {
                    let last = last.lock().unwrap_or_else(PoisonError::into_inner);
                    (last.attempts, last.reason)
                };
                guard.retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    upstream = %this.inner.name, path = call.path, attempt = attempt + 1,
                    reason = %reason, wait = ?wait, "retrying upstream call"
                );
                // On the real clock `wait` always fits the deadline. On an injected clock
                // the retry deadline is judged by that clock: never sleep past the real one.
                tokio::time::sleep(wait.min(call.remaining()))
            },
            |result| {
                let outcome = resilience::classify(result);
                let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
                last.attempts = last.attempts.saturating_add(1);
                last.reason = Reason::of(result);
                // Only failed attempts are kept (a response clone shares its body).
                last.earlier = last.latest.take();
                last.latest = outcome.is_retryable().then(|| result.clone());
                outcome
            },
            move |attempt| {
                let admitted = match first.take() {
                    Some(first) => Ok(first),
                    None => guard.admit(&this.inner.name),
                };
                async move { this.attempt(call, attempt, admitted?).await }
            },
        )
        .await;
        match done.stop {
            Stop::BudgetExhausted => {
                guard.budget_exhausted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    upstream = %self.inner.name, path = call.path, attempts = done.attempts,
                    "retry budget exhausted; not retrying"
                );
            }
            Stop::MaxAttempts | Stop::Deadline | Stop::NotIdempotent => tracing::debug!(
                upstream = %self.inner.name, path = call.path, attempts = done.attempts,
                stop = done.stop.as_str(), "upstream call failed; not retrying"
            ),
            _ => {}
        }
        match done.result {
            // A retry that ran out of the shared deadline does not turn what the upstream
            // said before (a 503, a refused connection) into a timeout of ours.
            Err(e) if e.is_timeout() && done.attempts > 1 => {
                let last = last.into_inner().unwrap_or_else(PoisonError::into_inner);
                last.earlier.unwrap_or(Err(e))
            }
            result => result,
        }
    }

    /// Attempt number `n` of `call`, reported to the breaker through `permit`.
    async fn attempt(
        &self,
        call: &Prepared<'_>,
        n: u32,
        permit: Option<Permit>,
    ) -> Result<UpstreamResponse> {
        let timeout = self.inner.timeout;
        // The first attempt has the whole timeout; later ones what is left of it.
        let limit = if n == 1 { timeout } else { call.remaining() };
        if limit.is_zero() {
            // Reachable only when an injected clock let a retry start too late.
            return Err(self.timed_out(timeout));
        }
        let started = Instant::now();
        // The status, once the response head arrived (a body over the cap still has one).
        let mut answered: Option<u16> = None;
        let exchange = async {
            let mut resends = 0;
            let response = loop {
                match self.inner.http.get().request(self.request(call)?).await {
                    Ok(response) => break response,
                    // Not an attempt of its own: the upstream has not processed the request.
                    Err(e)
                        if resends < transport::REFUSED_RESENDS
                            && transport::refused_unprocessed(&e) =>
                    {
                        resends += 1;
                        tracing::debug!(
                            upstream = %self.inner.name, path = call.path, attempt = n,
                            error = %e, "upstream refused the request unprocessed; sending again"
                        );
                    }
                    Err(e) => return Err(UpstreamError::from_http(&self.inner.name, &e)),
                }
            };
            answered = Some(response.status().as_u16());
            self.read(response).await
        };
        let result = match tokio::time::timeout(limit, exchange).await {
            Ok(result) => result,
            Err(_) => Err(self.timed_out(limit)),
        };
        if let Some(permit) = permit {
            resilience::report(permit, &result, answered, limit < timeout);
        }
        match &result {
            Ok(r) => tracing::debug!(
                upstream = %self.inner.name, method = %call.method, path = call.path,
                attempt = n, status = r.status, bytes = r.body.len(),
                elapsed = ?started.elapsed(), "upstream call"
            ),
            Err(e) => tracing::debug!(
                upstream = %self.inner.name, method = %call.method, path = call.path,
                attempt = n, kind = e.kind(), error = %e, elapsed = ?started.elapsed(),
                "upstream call failed"
            ),
        }
        result
    }

    /// The headers for `client_headers` (see `headers::outbound`), plus `Content-Length: 0`
    /// for an empty body of a method that carries one (HTTP/1.1 sends other empty bodies
    /// without a length; a non-empty body gets its length from the HTTP client).
    fn outbound_headers(
        &self,
        client_headers: &[(String, String)],
        method: &Method,
        body: &Bytes,
    ) -> Result<HeaderMap> {
        let inner = &self.inner;
        let mut headers =
            headers::outbound(client_headers, &inner.injected, inner.url_auth.as_ref())?;
        if body.is_empty() && method_expects_body(method) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        // Otherwise hyper-util formats the same value for every request.
        if let Some(host) = inner.base.host() {
            headers.insert(HOST, host.clone());
        }
        Ok(headers)
    }

    /// The HTTP request for one attempt of `call`.
    fn request(&self, call: &Prepared<'_>) -> Result<Request<Body>> {
        let first = call
            .headers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let headers = match first {
            Some(headers) => headers,
            None => self.outbound_headers(call.client_headers, &call.method, &call.body)?,
        };
        let mut request = Request::new(Body::new(call.body.clone()));
        *request.method_mut() = call.method.clone();
        *request.uri_mut() = call.uri.clone();
        *request.headers_mut() = headers;
        Ok(request)
    }

    fn timed_out(&self, limit: Duration) -> UpstreamError {
        UpstreamError::Timeout {
            upstream: self.inner.name.clone(),
            message: format!("no complete response within {limit:?}"),
        }
    }

    /// The breaker's state, or `None` when the upstream has no breaker.
    pub fn breaker_state(&self) -> Option<State> {
        self.inner.guard.breaker.as_ref().map(|b| b.state())
    }

    /// The breaker's state and counters (for `GET /admin/breakers`), or `None` when the
    /// upstream has no breaker.
    pub fn breaker_snapshot(&self) -> Option<Snapshot> {
        self.inner.guard.breaker.as_ref().map(|b| b.snapshot())
    }

    /// Retries made since the client was built (attempts after the first of a request).
    pub fn retries(&self) -> u64 {
        self.inner.guard.retries.load(Ordering::Relaxed)
    }

    /// Attempts the breaker refused since the client was built (each ended its request with
    /// [`UpstreamError::Unavailable`]).
    pub fn rejected(&self) -> u64 {
        self.inner.guard.rejected.load(Ordering::Relaxed)
    }

    /// Requests whose retry was denied because the retry budget was empty.
    pub fn retries_denied(&self) -> u64 {
        self.inner.guard.budget_exhausted.load(Ordering::Relaxed)
    }

    /// Whole retries the budget holds right now, or `None` when retries are off.
    pub fn retry_budget_available(&self) -> Option<u32> {
        let guard = &self.inner.guard;
        guard.policy.as_ref().map(|_| guard.budget.available())
    }

    /// Reads the body as a stream, failing as soon as it exceeds the cap.
    async fn read(&self, response: Response<Incoming>) -> Result<UpstreamResponse> {
        let limit = self.inner.max_body_bytes;
        let too_large = || UpstreamError::BodyTooLarge { limit };
        let (head, mut body) = response.into_parts();
        // The length the body will have: Content-Length, except where the response has no
        // body whatever it declares (HEAD, 204, 304).
        let declared = body.size_hint().exact();
        if declared.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let status = head.status.as_u16();
        let headers = headers::inbound(&head.headers);

        let mut first: Option<Bytes> = None;
        let mut rest: Option<BytesMut> = None;
        let mut total: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| UpstreamError::from_http(&self.inner.name, &e))?;
            // Trailers are dropped.
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            total = total.saturating_add(chunk.len() as u64);
            if total > limit {
                return Err(too_large());
            }
            match (&mut first, &mut rest) {
                (None, _) => first = Some(chunk),
                (Some(head), None) => {
                    let capacity = declared.unwrap_or(total).min(limit);
                    let mut buf = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
                    buf.extend_from_slice(head);
                    buf.extend_from_slice(&chunk);
                    rest = Some(buf);
                }
                (Some(_), Some(buf)) => buf.extend_from_slice(&chunk),
            }
        }
        let body = match (first, rest) {
            (_, Some(buf)) => buf.freeze(),
            // A copy, not the chunk itself: the chunk is a view into hyper's read buffer
            // (8 KiB and up), which a cached body would keep alive for its whole life (RSS grew
            // ~10 KiB per cached 600-byte entry).
            (Some(only), None) => Bytes::copy_from_slice(&only),
            (None, None) => Bytes::new(),
        };
        Ok(UpstreamResponse {
            status,
            headers,
            body,
        })
    }
}

/// Methods that carry a body, so an empty one is sent as `Content-Length: 0`.
fn method_expects_body(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PUT || *method == Method::PATCH
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn debug_output_hides_secrets() {
        let mut s = UpstreamSettings::new(
            "rentcast",
            Url::parse("https://user:pw@api.example.com/v1?appid=topsecret").unwrap(),
        );
        s.headers.push(("X-Api-Key".into(), "topsecret".into()));
        let text = format!("{s:?}");
        assert!(!text.contains("topsecret"), "{text}");
        assert!(!text.contains("pw"), "{text}");
        assert!(text.contains("X-Api-Key"));

        let headers = vec![("Authorization".to_owned(), "Bearer topsecret".to_owned())];
        let req = OutboundRequest {
            headers: &headers,
            ..OutboundRequest::get("/x", "")
        };
        let text = format!("{req:?}");
        assert!(!text.contains("topsecret"), "{text}");

        let client = UpstreamClient::new(s).unwrap();
        assert!(!format!("{client:?}").contains("topsecret"));
    }

    #[test]
    fn new_rejects_bad_settings() {
        let base = Url::parse("http://127.0.0.1:1/").unwrap();
        let mut s = UpstreamSettings::new("u", base.clone());
        s.timeout = Duration::ZERO;
        assert_eq!(UpstreamClient::new(s).unwrap_err().kind(), "config");

        let mut s = UpstreamSettings::new("u", base.clone());
        s.headers
            .push(("Transfer-Encoding".into(), "chunked".into()));
        assert_eq!(UpstreamClient::new(s).unwrap_err().kind(), "config");

        let s = UpstreamSettings::new("u", Url::parse("ftp://h/").unwrap());
        assert_eq!(UpstreamClient::new(s).unwrap_err().kind(), "config");

        let client = UpstreamClient::new(UpstreamSettings::new("u", base)).unwrap();
        assert_eq!(client.name(), "u");
    }
}
