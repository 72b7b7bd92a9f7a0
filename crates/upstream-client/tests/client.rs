//! `UpstreamClient` against a real local HTTP server (mock-upstream) and raw TCP misbehaviour.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mock_upstream::MockUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
mod common;

use common::{client, owned, settings};
use upstream_client::{OutboundRequest, UpstreamClient, UpstreamError};

async fn get(
    c: &UpstreamClient,
    path: &str,
    query: &str,
) -> Result<upstream_client::UpstreamResponse, UpstreamError> {
    c.send(OutboundRequest::get(path, query)).await
}

#[tokio::test]
async fn joins_base_path_and_query() {
    let mock = MockUpstream::start().await.unwrap();

    for base in [format!("{}/v1", mock.url()), format!("{}/v1/", mock.url())] {
        let c = client(&base);
        let r = get(&c, "/properties", "city=Austin&state=TX")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let seen = mock.last_request().unwrap();
        assert_eq!(seen.path, "/v1/properties", "base {base}");
        assert_eq!(seen.query, "city=Austin&state=TX");
        assert_eq!(
            c.url_for("/properties", "a=1").unwrap().as_str(),
            format!("{}/v1/properties?a=1", mock.url())
        );
    }

    let c = client(&mock.url());
    get(&c, "/a/b", "").await.unwrap();
    let seen = mock.last_request().unwrap();
    assert_eq!((seen.path.as_str(), seen.query.as_str()), ("/a/b", ""));
    get(&c, "", "").await.unwrap();
    assert_eq!(mock.last_request().unwrap().path, "/");

    // The base URL's own query (an API key in the query string) is kept in front.
    let c = client(&format!("{}/data?appid=k", mock.url()));
    get(&c, "/weather", "q=Oslo").await.unwrap();
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.path, "/data/weather");
    assert_eq!(seen.query, "appid=k&q=Oslo");
    assert_eq!(mock.calls(), 5);
}

#[tokio::test]
async fn paths_cannot_escape_the_base() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client(&format!("{}/v1", mock.url()));
    for bad in [
        "/../admin",
        "/%2e%2e/admin",
        "/x/..%2F..%2Fadmin",
        "/x\\..\\admin",
    ] {
        let err = get(&c, bad, "").await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::InvalidRequest { .. }),
            "{bad}: {err}"
        );
        assert!(!err.is_retryable());
        assert_eq!(err.kind(), "invalid_request");
    }
    let err = c
        .send(OutboundRequest {
            method: "GE T",
            ..OutboundRequest::get("/x", "")
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "invalid_request");
    assert_eq!(mock.calls(), 0, "nothing invalid may reach the upstream");
}

#[tokio::test]
async fn injected_headers_reach_upstream_and_client_credentials_do_not() {
    let mock = MockUpstream::start().await.unwrap();
    let mut s = settings(&mock.url());
    s.headers = owned(&[("X-Api-Key", "upstream-secret"), ("X-Account", "acme")]);
    let c = UpstreamClient::new(s).unwrap();

    let client_headers = owned(&[
        ("Host", "evil.example"),
        ("Authorization", "Bearer tg_client_key"),
        ("X-Api-Key", "tg_client_key"),
        ("Cookie", "session=client"),
        ("Proxy-Authorization", "Basic Y2xpZW50"),
        ("Proxy-Connection", "keep-alive"),
        ("Connection", "X-Hop-Secret"),
        ("X-Hop-Secret", "hop"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "websocket"),
        ("X-Account", "client-chosen"),
        ("X-Client-Id", "device-42"),
        ("Accept", "application/json"),
        ("Content-Type", "application/json"),
    ]);
    let r = c
        .send(OutboundRequest {
            method: "POST",
            path: "/model",
            query: "",
            headers: &client_headers,
            body: Bytes::from_static(b"{\"x\":1}"),
            retry_non_idempotent: false,
        })
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    let seen = mock.last_request().unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body, Bytes::from_static(b"{\"x\":1}"));
    let values = |name: &str| -> Vec<&str> {
        seen.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(values("x-api-key"), ["upstream-secret"]);
    assert_eq!(values("x-account"), ["acme"]);
    assert_eq!(values("x-client-id"), ["device-42"]);
    assert_eq!(values("accept"), ["application/json"]);
    assert_eq!(values("content-type"), ["application/json"]);
    assert_eq!(values("host"), [mock.addr().to_string()]);
    assert_eq!(values("content-length"), ["7"]);
    for absent in [
        "authorization",
        "cookie",
        "proxy-authorization",
        "proxy-connection",
        "x-hop-secret",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
        "accept-encoding",
    ] {
        assert!(
            !seen.has_header(absent),
            "{absent} reached the upstream: {:?}",
            seen.headers
        );
    }
    assert!(values("connection").iter().all(|v| !v.contains("X-Hop")));
    let all = format!("{:?}", seen.headers);
    assert!(!all.contains("tg_client_key"), "{all}");
}

#[tokio::test]
async fn injected_authorization_replaces_the_clients() {
    let mock = MockUpstream::start().await.unwrap();
    let mut s = settings(&mock.url());
    s.headers = owned(&[("Authorization", "Bearer upstream-token")]);
    let c = UpstreamClient::new(s).unwrap();
    let client_headers = owned(&[("authorization", "Bearer tg_client_key")]);
    c.send(OutboundRequest {
        headers: &client_headers,
        ..OutboundRequest::get("/x", "")
    })
    .await
    .unwrap();
    let seen = mock.last_request().unwrap();
    let auth: Vec<_> = seen
        .headers
        .iter()
        .filter(|(n, _)| n == "authorization")
        .collect();
    assert_eq!(auth.len(), 1);
    assert_eq!(auth[0].1, "Bearer upstream-token");
}

#[tokio::test]
async fn response_headers_pass_through_minus_hop_by_hop() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_response_header("Set-Cookie", Some("upstream=1"));
    mock.set_response_header("Cache-Control", Some("max-age=60"));
    mock.set_response_header("Content-Encoding", Some("identity"));
    mock.set_response_header("Keep-Alive", Some("timeout=5"));
    mock.set_response_header("Proxy-Authenticate", Some("Basic"));
    mock.set_chunked(true);
    let c = client(&mock.url());
    let r = get(&c, "/h", "").await.unwrap();
    assert_eq!(r.header("set-cookie"), Some("upstream=1"));
    assert_eq!(r.header("Cache-Control"), Some("max-age=60"));
    assert_eq!(r.header("content-encoding"), Some("identity"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-mock-call"), Some("1"));
    for absent in [
        "keep-alive",
        "proxy-authenticate",
        "transfer-encoding",
        "connection",
    ] {
        assert!(r.header(absent).is_none(), "{absent}: {:?}", r.headers);
    }
    assert_eq!(r.body.len(), mock_upstream::DEFAULT_BODY_BYTES);
}

#[tokio::test]
async fn error_statuses_are_responses() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client(&mock.url());
    mock.fail_next(1, 500);
    let r = get(&c, "/x", "").await.unwrap();
    assert_eq!(r.status, 500);
    assert!(!r.body.is_empty());
    mock.set_status(Some(404));
    assert_eq!(get(&c, "/x", "").await.unwrap().status, 404);
    mock.set_status(None);
    assert_eq!(get(&c, "/x", "").await.unwrap().status, 200);
}

#[tokio::test]
async fn body_passes_through_exactly() {
    let mock = MockUpstream::start().await.unwrap();
    let body = Bytes::from((0..=255u8).cycle().take(100_000).collect::<Vec<u8>>());
    mock.set_body_override(Some(body.clone()));
    let c = client(&mock.url());
    assert_eq!(get(&c, "/bin", "").await.unwrap().body, body);
    mock.set_chunked(true);
    assert_eq!(get(&c, "/bin", "").await.unwrap().body, body);
}

#[tokio::test]
async fn body_cap_with_and_without_content_length() {
    let mock = MockUpstream::start().await.unwrap();
    let mut s = settings(&mock.url());
    s.max_body_bytes = 10_000;
    let c = UpstreamClient::new(s).unwrap();

    // Exactly at the cap is fine.
    mock.set_body_bytes(10_000);
    assert_eq!(get(&c, "/ok", "").await.unwrap().body.len(), 10_000);
    mock.set_chunked(true);
    assert_eq!(get(&c, "/ok", "").await.unwrap().body.len(), 10_000);

    for chunked in [false, true] {
        mock.set_chunked(chunked);
        mock.set_body_bytes(10_001);
        let err = get(&c, "/big", "").await.unwrap_err();
        assert_eq!(
            err,
            UpstreamError::BodyTooLarge { limit: 10_000 },
            "chunked={chunked}"
        );
        assert!(!err.is_retryable());
        assert_eq!(err.kind(), "body_too_large");

        mock.set_body_bytes(5_000_000);
        let err = get(&c, "/huge", "").await.unwrap_err();
        assert_eq!(
            err,
            UpstreamError::BodyTooLarge { limit: 10_000 },
            "chunked={chunked}"
        );
    }
}

#[tokio::test]
async fn hanging_upstream_times_out() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_hang(true);
    let mut s = settings(&mock.url());
    s.timeout = Duration::from_millis(300);
    let c = UpstreamClient::new(s).unwrap();
    let started = Instant::now();
    let err = get(&c, "/slow", "").await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(err.is_timeout(), "{err}");
    assert!(err.is_retryable());
    assert_eq!(err.kind(), "timeout");
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(mock.calls(), 1);
    mock.set_hang(false);
}

/// A server that accepts connections and runs `script` on each.
async fn raw_server<F, Fut>(script: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(script(stream));
        }
    });
    addr
}

async fn read_head(stream: &mut tokio::net::TcpStream) {
    let mut buf = vec![0u8; 8192];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn deadline_includes_the_body() {
    // Headers arrive at once, the body never finishes.
    let addr = raw_server(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let mut s = settings(&format!("http://{addr}"));
    s.timeout = Duration::from_millis(300);
    let c = UpstreamClient::new(s).unwrap();
    let started = Instant::now();
    let err = get(&c, "/", "").await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn connection_refused_is_a_retryable_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let c = client(&format!("http://{addr}/v1"));
    let err = get(&c, "/x", "secret=1").await.unwrap_err();
    assert!(matches!(err, UpstreamError::Connect { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(!err.is_timeout());
    assert_eq!(err.kind(), "connect");
    let text = err.to_string();
    assert!(text.contains("test"), "names the upstream: {text}");
    assert!(!text.contains("secret"), "no URL in messages: {text}");
}

#[tokio::test]
async fn truncated_body_is_a_retryable_protocol_error() {
    let addr = raw_server(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-a-bit")
            .await;
        // Dropping the stream closes the connection mid-body.
    })
    .await;
    let c = client(&format!("http://{addr}"));
    let err = get(&c, "/", "").await.unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol { .. }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(err.kind(), "protocol");
}

#[tokio::test]
async fn garbage_response_is_a_protocol_error() {
    let addr = raw_server(|mut s| async move {
        read_head(&mut s).await;
        let _ = s.write_all(b"this is not http\r\n\r\n").await;
    })
    .await;
    let c = client(&format!("http://{addr}"));
    let err = get(&c, "/", "").await.unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol { .. }), "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn one_pool_per_client_reuses_connections() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client(&mock.url());
    let clone = c.clone();
    for i in 0..10 {
        let which = if i % 2 == 0 { &c } else { &clone };
        assert_eq!(get(which, "/p", "").await.unwrap().status, 200);
    }
    assert_eq!(mock.calls(), 10);
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn errors_are_shared_by_clones() {
    let err = UpstreamError::Timeout {
        upstream: "u".into(),
        message: "m".into(),
    };
    let waiters: Vec<UpstreamError> = (0..3).map(|_| err.clone()).collect();
    assert!(waiters.iter().all(|e| e == &err && e.is_timeout()));
    upstream_client::install_crypto_provider();
    upstream_client::install_crypto_provider();
}
