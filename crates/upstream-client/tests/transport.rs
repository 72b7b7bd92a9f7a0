//! What `UpstreamClient` puts on the wire and how it connects: request framing and default
//! headers, URL credentials, the idle pool, HTTPS (trust, ALPN, handshake failures and
//! timeouts). Against mock-upstream, raw TCP servers, and a local TLS server whose
//! certificate (`tests/tls/`) is signed by a test CA.
#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mock_upstream::{MockUpstream, RecordedRequest};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
mod common;

use common::owned;
use upstream_client::{OutboundRequest, UpstreamClient, UpstreamError, UpstreamSettings};

const LEAF_PEM: &[u8] = include_bytes!("tls/localhost.pem");
const LEAF_KEY: &[u8] = include_bytes!("tls/localhost.key");
const CA_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/ca.pem");
/// Set in the child process that trusts the test CA (see [`run_trusting_test_ca`]).
const CHILD: &str = "UPSTREAM_CLIENT_TEST_TRUSTS_TEST_CA";

/// [`common::settings`] without retries: what is on the wire is one attempt's.
fn settings(base: &str) -> UpstreamSettings {
    let mut s = common::settings(base);
    s.resilience.retry = None;
    s
}

fn client(base: &str) -> UpstreamClient {
    UpstreamClient::new(settings(base)).unwrap()
}

/// Every value of header `name` (lower-case) the request carried, in order.
fn values<'r>(seen: &'r RecordedRequest, name: &str) -> Vec<&'r str> {
    seen.headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

// === request framing and headers ===

#[tokio::test]
async fn empty_bodies_of_post_put_patch_are_sent_with_content_length_zero() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client(&mock.url());
    for method in ["POST", "PUT", "PATCH"] {
        let r = c
            .send(OutboundRequest {
                method,
                ..OutboundRequest::get("/m", "")
            })
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let seen = mock.last_request().unwrap();
        assert_eq!(seen.method, method);
        assert_eq!(seen.header("content-length"), Some("0"), "{method}");
        assert!(!seen.has_header("transfer-encoding"), "{method}");
    }
    for method in ["GET", "DELETE", "OPTIONS"] {
        c.send(OutboundRequest {
            method,
            ..OutboundRequest::get("/m", "")
        })
        .await
        .unwrap();
        let seen = mock.last_request().unwrap();
        assert_eq!(seen.method, method);
        assert!(!seen.has_header("content-length"), "{method}");
        assert!(!seen.has_header("transfer-encoding"), "{method}");
    }
    // A body on a GET is sent as it is, with its length.
    c.send(OutboundRequest {
        body: Bytes::from_static(b"abc"),
        ..OutboundRequest::get("/m", "")
    })
    .await
    .unwrap();
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.header("content-length"), Some("3"));
    assert_eq!(seen.body, Bytes::from_static(b"abc"));
}

#[tokio::test]
async fn accept_defaults_to_any_and_the_clients_wins() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client(&mock.url());
    c.send(OutboundRequest::get("/a", "")).await.unwrap();
    let seen = mock.last_request().unwrap();
    assert_eq!(values(&seen, "accept"), ["*/*"]);
    assert!(!seen.has_header("user-agent"));
    assert!(!seen.has_header("accept-encoding"));
    assert!(!seen.has_header("referer"));

    let headers = owned(&[("Accept", "application/json"), ("accept", "text/csv")]);
    c.send(OutboundRequest {
        headers: &headers,
        ..OutboundRequest::get("/a", "")
    })
    .await
    .unwrap();
    let seen = mock.last_request().unwrap();
    assert_eq!(values(&seen, "accept"), ["application/json", "text/csv"]);
}

#[tokio::test]
async fn base_url_credentials_become_basic_auth() {
    let mock = MockUpstream::start().await.unwrap();
    let base = format!("http://us%65r:p%40ss@{}/v1?k=1", mock.addr());
    let c = client(&base);
    c.send(OutboundRequest::get("/x", "q=2")).await.unwrap();
    let seen = mock.last_request().unwrap();
    // base64("user:p@ss")
    assert_eq!(seen.header("authorization"), Some("Basic dXNlcjpwQHNz"));
    assert_eq!(seen.header("host"), Some(mock.addr().to_string().as_str()));
    assert_eq!(
        (seen.path.as_str(), seen.query.as_str()),
        ("/v1/x", "k=1&q=2")
    );

    // A user name alone still counts; an injected Authorization replaces it.
    let c = client(&format!("http://apikey@{}", mock.addr()));
    c.send(OutboundRequest::get("/x", "")).await.unwrap();
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.header("authorization"), Some("Basic YXBpa2V5Og=="));
    let mut s = settings(&base);
    s.headers = owned(&[("Authorization", "Bearer injected")]);
    let c = UpstreamClient::new(s).unwrap();
    c.send(OutboundRequest::get("/x", "")).await.unwrap();
    let seen = mock.last_request().unwrap();
    assert_eq!(values(&seen, "authorization"), ["Bearer injected"]);
}

#[tokio::test]
async fn a_head_response_declaring_a_large_body_is_not_over_the_cap() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_body_bytes(50_000);
    let mut s = settings(&mock.url());
    s.max_body_bytes = 10_000;
    let c = UpstreamClient::new(s).unwrap();
    let r = c
        .send(OutboundRequest {
            method: "HEAD",
            ..OutboundRequest::get("/h", "")
        })
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    let err = c.send(OutboundRequest::get("/h", "")).await.unwrap_err();
    assert_eq!(err, UpstreamError::BodyTooLarge { limit: 10_000 });
}

// === the pool ===

#[tokio::test]
async fn no_idle_connections_kept_when_the_pool_size_is_zero() {
    let mock = MockUpstream::start().await.unwrap();
    let mut s = settings(&mock.url());
    s.pool_max_idle_per_host = 0;
    let c = UpstreamClient::new(s).unwrap();
    for _ in 0..3 {
        assert_eq!(
            c.send(OutboundRequest::get("/p", "")).await.unwrap().status,
            200
        );
    }
    assert_eq!(mock.calls(), 3);
    assert_eq!(mock.connections(), 3);
}

#[tokio::test]
async fn clients_do_not_share_a_pool() {
    let mock = MockUpstream::start().await.unwrap();
    let (a, b) = (client(&mock.url()), client(&mock.url()));
    for _ in 0..3 {
        a.send(OutboundRequest::get("/p", "")).await.unwrap();
        b.send(OutboundRequest::get("/p", "")).await.unwrap();
    }
    assert_eq!(mock.calls(), 6);
    assert_eq!(mock.connections(), 2);
}

#[tokio::test]
async fn concurrent_requests_open_connections_and_keep_them() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_delay(Duration::from_millis(100));
    let c = client(&mock.url());
    let burst = || async {
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.send(OutboundRequest::get("/p", "")).await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().status, 200);
        }
    };
    burst().await;
    assert_eq!(mock.connections(), 4);
    burst().await;
    assert_eq!(mock.calls(), 8);
    assert_eq!(
        mock.connections(),
        4,
        "the second burst reuses the idle connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn each_thread_sends_on_connections_of_its_own() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client(&mock.url());
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let send_three = |c: UpstreamClient| async move {
        for _ in 0..3 {
            assert_eq!(
                c.send(OutboundRequest::get("/p", "")).await.unwrap().status,
                200
            );
        }
    };
    let (a_sent, a_has_sent) = std::sync::mpsc::channel::<()>();
    let (b_sent, b_has_sent) = tokio::sync::oneshot::channel::<()>();
    let a = {
        let c = c.clone();
        std::thread::spawn(move || {
            runtime().block_on(async {
                send_three(c).await;
                a_sent.send(()).unwrap();
                // This runtime, and the idle connection its tasks keep, stays up meanwhile.
                b_has_sent.await.unwrap();
            });
        })
    };
    let b = std::thread::spawn(move || {
        a_has_sent.recv().unwrap();
        runtime().block_on(send_three(c));
        b_sent.send(()).unwrap();
    });
    tokio::task::spawn_blocking(move || {
        a.join().unwrap();
        b.join().unwrap();
    })
    .await
    .unwrap();
    assert_eq!(mock.calls(), 6);
    assert_eq!(
        mock.connections(),
        2,
        "one kept and reused by each thread, none taken from the other thread's pool"
    );
}

// === HTTPS ===

/// TLS for `localhost`/`127.0.0.1` with the test CA's certificate, offering `alpn`.
fn tls_acceptor(alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let certs = CertificateDer::pem_slice_iter(LEAF_PEM)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(LEAF_KEY).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TLS server that answers every request with its HTTP version and the authority it was
/// asked for, speaking HTTP/2 when ALPN chose `h2`.
async fn tls_server(alpn: &[&[u8]]) -> SocketAddr {
    let acceptor = tls_acceptor(alpn);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                let service = service_fn(|req: Request<Incoming>| async move {
                    let authority = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .or_else(|| {
                            req.headers()
                                .get("host")
                                .and_then(|h| h.to_str().ok())
                                .map(str::to_owned)
                        })
                        .unwrap_or_default();
                    let text = format!("{:?} {authority} {}", req.version(), req.uri().path());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let io = TokioIo::new(tls);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_connect_error() {
    if std::env::var_os(CHILD).is_some() {
        return; // this process trusts the test CA
    }
    let addr = tls_server(&[b"h2", b"http/1.1"]).await;
    let c = client(&format!("https://localhost:{}/v1?secret=1", addr.port()));
    let err = c.send(OutboundRequest::get("/x", "")).await.unwrap_err();
    assert_eq!(err.kind(), "connect", "{err}");
    assert!(err.is_retryable());
    let text = err.to_string();
    assert!(text.contains("certificate"), "{text}");
    assert!(!text.contains("secret"), "{text}");
}

#[tokio::test]
async fn https_to_a_plain_http_port_fails_cleanly() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client(&format!("https://{}/?secret=1", mock.addr()));
    let err = c.send(OutboundRequest::get("/x", "")).await.unwrap_err();
    assert!(
        matches!(err.kind(), "connect" | "protocol"),
        "{err} ({})",
        err.kind()
    );
    assert!(err.is_retryable());
    assert!(!err.to_string().contains("secret"), "{err}");
    assert_eq!(mock.calls(), 0);
}

#[tokio::test]
async fn a_stalled_tls_handshake_ends_at_the_connect_timeout() {
    // Accepts TCP connections and never answers the ClientHello.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut s = settings(&format!("https://localhost:{}", addr.port()));
    s.connect_timeout = Duration::from_millis(200);
    s.timeout = Duration::from_secs(5);
    let c = UpstreamClient::new(s).unwrap();
    let started = Instant::now();
    let err = c.send(OutboundRequest::get("/x", "")).await.unwrap_err();
    let elapsed = started.elapsed();
    // As with reqwest before: the connect timeout (TCP + TLS) is a timeout.
    assert!(err.is_timeout(), "{err} ({})", err.kind());
    assert!(err.is_retryable());
    assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

/// Runs `test` in a child process (this test binary again) whose system trust store is the
/// test CA alone, through `SSL_CERT_FILE`, which the platform verifier reads on Linux.
fn run_trusting_test_ca(test: &str) {
    let status = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("SSL_CERT_FILE", CA_PATH)
        .env_remove("SSL_CERT_DIR")
        .status()
        .unwrap();
    assert!(status.success(), "{test} failed in the child process");
}

#[test]
fn https_with_a_trusted_certificate_speaks_h2_or_http1_as_negotiated() {
    if std::env::var_os(CHILD).is_none() {
        return run_trusting_test_ca(
            "https_with_a_trusted_certificate_speaks_h2_or_http1_as_negotiated",
        );
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for (alpn, version) in [
            (&[b"h2".as_slice(), b"http/1.1"][..], "HTTP/2.0"),
            (&[b"http/1.1".as_slice()][..], "HTTP/1.1"),
            (&[][..], "HTTP/1.1"),
        ] {
            let addr = tls_server(alpn).await;
            for host in ["localhost", "127.0.0.1"] {
                let c = client(&format!("https://{host}:{}/v1", addr.port()));
                for _ in 0..2 {
                    let r = c.send(OutboundRequest::get("/x", "")).await.unwrap();
                    assert_eq!(r.status, 200);
                    let body = String::from_utf8(r.body.to_vec()).unwrap();
                    assert_eq!(body, format!("{version} {host}:{} /v1/x", addr.port()));
                }
            }
        }
    });
}

/// An HTTP/2-only TLS server that resets its first `refuse` streams with `REFUSED_STREAM` and
/// answers the others `200 ok`. Also returns how many streams it saw.
async fn h2_refusing_server(refuse: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let acceptor = tls_acceptor(&[b"h2"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&streams);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst) < refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else if let Ok(mut body) =
                        respond.send_response(http::Response::new(()), false)
                    {
                        let _ = body.send_data(Bytes::from_static(b"ok"), true);
                    }
                }
            });
        }
    });
    (addr, streams)
}

#[test]
fn http2_refused_streams_are_sent_again_at_once() {
    if std::env::var_os(CHILD).is_none() {
        return run_trusting_test_ca("http2_refused_streams_are_sent_again_at_once");
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // Refused twice, answered the third time: one attempt, no retry of ours (retries are
        // off in `settings`), whatever the method.
        let (addr, streams) = h2_refusing_server(2).await;
        let c = client(&format!("https://localhost:{}", addr.port()));
        let r = c
            .send(OutboundRequest {
                method: "POST",
                body: Bytes::from_static(b"{}"),
                ..OutboundRequest::get("/x", "")
            })
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_ref()), (200, b"ok".as_slice()));
        assert_eq!(streams.load(Ordering::SeqCst), 3);
        assert_eq!(c.retries(), 0);

        // Refused three times: given up after two re-sends, a protocol error.
        let (addr, streams) = h2_refusing_server(3).await;
        let c = client(&format!("https://localhost:{}", addr.port()));
        let err = c.send(OutboundRequest::get("/x", "")).await.unwrap_err();
        assert_eq!(err.kind(), "protocol", "{err}");
        assert_eq!(streams.load(Ordering::SeqCst), 3);
    });
}
