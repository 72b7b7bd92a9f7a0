//! The connection pools under an [`UpstreamClient`](crate::UpstreamClient): hyper-util's
//! pooled client over TCP and rustls, HTTP/1.1 and HTTP/2 (chosen by ALPN), one per thread
//! that sends.
//!
//! Per thread because a pooled connection is a task on the runtime that opened it: a request
//! on another thread's connection wakes that thread to write it, and the response wakes the
//! sender back (two cross-thread wake-ups, each a syscall, per call). A gateway with one
//! current-thread runtime per worker opens and reuses each connection on one thread.
//!
//! Only what a gateway needs: no proxy, no redirects, no decompression, no cookies, no
//! default headers (those few the client adds are in `headers.rs`). The socket and pool
//! settings are the ones reqwest used here before.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls_platform_verifier::BuilderVerifierExt;
use thread_local::ThreadLocal;
use tower_service::Service;

/// A request body: always complete in memory.
pub(crate) type Body = Full<Bytes>;

/// How a pool connects: TCP (and TLS for https) within the connect timeout.
type Connector = ConnectTimeout<HttpsConnector<HttpConnector>>;

/// One thread's pooled HTTP client for an upstream.
pub(crate) type Pool = Client<Connector, Body>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// TCP keepalive: first probe after this long idle, then one per this interval.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
/// Unanswered keepalive probes before the connection is dropped.
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel drops the connection.
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One upstream's pools, one per thread that sends, each made on that thread's first request
/// and dropped with the upstream's client.
pub(crate) struct Pools {
    per_thread: ThreadLocal<Pool>,
    connector: Connector,
    max_idle_per_host: usize,
}

impl Pools {
    /// The calling thread's pool.
    pub(crate) fn get(&self) -> &Pool {
        self.per_thread.get_or(|| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_max_idle_per_host(self.max_idle_per_host)
                .build(self.connector.clone())
        })
    }
}

/// Builds the pools: plain HTTP or HTTPS (rustls with the process's default crypto provider,
/// else `ring`, and the platform's trust store through `rustls-platform-verifier`), TCP_NODELAY,
/// `connect_timeout` over TCP and TLS together, at most `max_idle_per_host` idle connections
/// in each thread's pool.
///
/// Fails when no trust store can be loaded; the message says why, without secrets.
pub(crate) fn pools(
    connect_timeout: Duration,
    max_idle_per_host: usize,
) -> Result<Pools, rustls::Error> {
    let mut tcp = HttpConnector::new();
    // https URLs pass through to the TLS layer around it.
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    // Also split between a host's addresses, so a dead first address leaves time for the next.
    tcp.set_connect_timeout(Some(connect_timeout));
    tcp.set_keepalive(Some(TCP_KEEPALIVE));
    tcp.set_keepalive_interval(Some(TCP_KEEPALIVE));
    tcp.set_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES));
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    tcp.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));

    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);

    Ok(Pools {
        per_thread: ThreadLocal::new(),
        connector: ConnectTimeout {
            inner: https,
            timeout: connect_timeout,
        },
        max_idle_per_host,
    })
}

/// How often a request the upstream refused unprocessed over HTTP/2 is sent again at once,
/// on top of the first time (reqwest's default did the same).
pub(crate) const REFUSED_RESENDS: u32 = 2;

/// Whether the upstream refused a request over HTTP/2 before processing any of it: it reset
/// the stream with `REFUSED_STREAM`, or is shutting the connection down gracefully (`GOAWAY`
/// with `NO_ERROR`). Sending it again is safe whatever the method (RFC 9113 §8.7).
pub(crate) fn refused_unprocessed(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(cause) = source {
        if let Some(e) = cause.downcast_ref::<h2::Error>() {
            let reason = e.reason();
            return e.is_remote()
                && ((e.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM))
                    || (e.is_go_away() && reason == Some(h2::Reason::NO_ERROR)));
        }
        source = cause.source();
    }
    false
}

// === impl ConnectTimeout ===

/// A connector whose connections (TCP and TLS handshake) must be up within `timeout`.
#[derive(Clone)]
pub(crate) struct ConnectTimeout<C> {
    inner: C,
    timeout: Duration,
}

/// The error of a connection that was not up within the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("connect timed out after {0:?}")]
pub(crate) struct ConnectTimedOut(Duration);

impl<C> Service<Uri> for ConnectTimeout<C>
where
    C: Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let timeout = self.timeout;
        let connecting = self.inner.call(dst);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimedOut(timeout)) as BoxError),
            }
        })
    }
}
