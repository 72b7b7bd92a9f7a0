//! # upstream-client
//!
//! The HTTP client Tollgate uses to call one paid third-party API ("upstream"): one
//! connection pool per upstream (hyper-util's pooled client; HTTP/1.1, and HTTP/2 where TLS
//! negotiates it; rustls with the platform's trust store), with
//!
//! * **URL joining** that keeps a base path (`https://api.rentcast.io/v1` + `/properties` →
//!   `/v1/properties`) and refuses paths that would leave it (`..`, also percent-encoded);
//! * **credential injection**: the upstream's configured headers (e.g. `X-Api-Key`) are added
//!   to every request, while the client's own credentials (`Authorization`, `X-Api-Key`,
//!   `Cookie`, `Proxy-Authorization`) and hop-by-hop headers never reach the upstream;
//! * **limits**: a connect timeout, a total deadline that includes reading the body (and
//!   every retry), and a body cap enforced while streaming (and up front from
//!   `Content-Length`);
//! * **resilience** ([`Resilience`], from the [`breaker`] crate): a circuit breaker per
//!   upstream that fails calls fast with [`UpstreamError::Unavailable`] while the upstream is
//!   down, and retries of connect errors, timeouts and 429/502/503/504 with capped
//!   exponential backoff, full jitter and the upstream's `Retry-After`, for idempotent
//!   requests only, limited by a per-upstream retry budget and by the `timeout`;
//! * **one error type**, [`UpstreamError`], cheap to clone for coalesced waiters, that says
//!   whether a retry may help ([`UpstreamError::is_retryable`]) and names its kind for metrics.
//!
//! Bodies are passed through untouched: nothing is decompressed, `Content-Encoding` stays in
//! the response headers. Redirects are not followed, no environment proxy is used, and the
//! only headers added are `Host`, `Content-Length`, `Accept: */*` when the client sent no
//! `Accept`, and `Authorization: Basic` for user info in the base URL (unless injected). Any
//! HTTP status is an `Ok` response (after retries, the last one); what a status means is the
//! caller's business. [`UpstreamClient::send`] documents the exact rules and time bound.
//!
//! ```no_run
//! use std::time::Duration;
//! use upstream_client::breaker::BreakerConfig;
//! use upstream_client::{OutboundRequest, UpstreamClient, UpstreamSettings};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut settings = UpstreamSettings::new("rentcast", "https://api.rentcast.io/v1".parse()?);
//! settings.headers.push(("X-Api-Key".into(), std::env::var("RENTCAST_API_KEY")?));
//! settings.timeout = Duration::from_secs(10); // the whole send, retries included
//! settings.resilience.breaker = Some(BreakerConfig {
//!     failure_threshold: 5,
//!     open_for: Duration::from_secs(30),
//!     ..BreakerConfig::default()
//! });
//! let client = UpstreamClient::new(settings)?;
//!
//! let client_headers = vec![("Accept".to_owned(), "application/json".to_owned())];
//! let response = client
//!     .send(OutboundRequest {
//!         method: "GET",
//!         path: "/properties",
//!         query: "city=Austin&state=TX",
//!         headers: &client_headers,
//!         body: bytes::Bytes::new(),
//!         retry_non_idempotent: false,
//!     })
//!     .await;
//! match response {
//!     Ok(r) => println!("{} with {} bytes", r.status, r.body.len()),
//!     Err(e) if e.retry_after().is_some() => println!("circuit open: {e}"),
//!     Err(e) => println!("gave up: {e} ({})", e.kind()),
//! }
//! println!("breaker {:?}, {} retries so far", client.breaker_state(), client.retries());
//! # Ok(())
//! # }
//! ```
//!
//! **Invariant:** no header value, URL query or userinfo from the settings appears in an
//! error message, a log line or `Debug` output.
//! **Invariant:** a request the breaker refuses never reaches the network; a request that
//! is not idempotent is sent once unless its route allows retries.
#![forbid(unsafe_code)]

mod client;
mod error;
mod headers;
mod resilience;
mod target;
mod transport;

/// The breaker crate, re-exported for its settings ([`breaker::BreakerConfig`],
/// [`breaker::RetryPolicy`], [`breaker::BudgetConfig`]), [`breaker::Snapshot`] and clocks.
pub use breaker;
pub use client::{OutboundRequest, UpstreamClient, UpstreamResponse, UpstreamSettings};
pub use error::{Result, UpstreamError};
pub use resilience::Resilience;

/// Installs rustls' `ring` crypto provider as the process default, unless a provider is
/// already installed. Idempotent and cheap after the first call; [`UpstreamClient::new`]
/// calls it, so an embedder only needs it when building other rustls users first.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Err means another thread installed one first: that is fine too.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
}
