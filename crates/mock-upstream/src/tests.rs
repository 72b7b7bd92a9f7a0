#![allow(clippy::unwrap_used)]

use super::*;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use std::time::Instant;

type Sender = SendRequest<Full<Bytes>>;

struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn send_on(
    sender: &mut Sender,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    sender.ready().await.unwrap();
    let mut req = Request::builder()
        .method(method)
        .uri(target)
        .header("host", "mock");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

async fn get(mock: &MockUpstream, target: &str) -> Reply {
    let mut sender = connect(mock.addr()).await;
    send_on(&mut sender, "GET", target, &[], "").await
}

fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

#[tokio::test]
async fn default_response_describes_the_request() {
    let mock = MockUpstream::start().await.unwrap();
    assert!(mock.url().starts_with("http://127.0.0.1:"));
    assert_eq!(mock.url(), format!("http://{}", mock.addr()));

    let mut sender = connect(mock.addr()).await;
    let r = send_on(
        &mut sender,
        "POST",
        "/v1/things?a=1&b=%22x%22",
        &[("X-Custom", "yes")],
        "hello",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["x-mock-call"], "1");
    assert_eq!(
        r.headers["content-length"],
        DEFAULT_BODY_BYTES.to_string().as_str()
    );
    assert_eq!(r.body.len(), DEFAULT_BODY_BYTES);
    let v = json(&r.body);
    assert_eq!(v["call"], 1);
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/v1/things");
    assert_eq!(v["query"], "a=1&b=%22x%22");
    assert_eq!(v["body_len"], 5);
    assert!(v["pad"].as_str().unwrap().chars().all(|c| c == 'x'));

    // Same connection (keep-alive), second call.
    let r = send_on(&mut sender, "GET", "/other", &[], "").await;
    assert_eq!(r.headers["x-mock-call"], "2");
    assert_eq!(json(&r.body)["call"], 2);
    assert_eq!(mock.calls(), 2);
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn body_size_follows_settings() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_body_bytes(100_000);
    let r = get(&mock, "/big").await;
    assert_eq!(r.body.len(), 100_000);
    json(&r.body);

    // Smaller than the JSON itself: no padding, still valid JSON.
    mock.set_body_bytes(10);
    let r = get(&mock, "/small").await;
    let v = json(&r.body);
    assert_eq!(v["pad"], "");
    assert!(r.body.len() > 10);
}

#[test]
fn json_body_escapes_and_pads_exactly() {
    let b = json_body(7, "GET", "/a\"b", "q=\\", 3, 500);
    assert_eq!(b.len(), 500);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["path"], "/a\"b");
    assert_eq!(v["query"], "q=\\");
    assert_eq!(v["call"], 7);
    assert_eq!(v["body_len"], 3);
}

#[tokio::test]
async fn records_requests_and_counts_per_path() {
    let mock = MockUpstream::start().await.unwrap();
    let mut sender = connect(mock.addr()).await;
    send_on(
        &mut sender,
        "PUT",
        "/a?x=1",
        &[("X-Api-Key", "k1"), ("Accept", "a"), ("Accept", "b")],
        "payload",
    )
    .await;
    send_on(&mut sender, "GET", "/a?x=2", &[], "").await;
    send_on(&mut sender, "GET", "/b", &[], "").await;

    assert_eq!(mock.calls(), 3);
    assert_eq!(mock.calls_to("/a"), 2);
    assert_eq!(mock.calls_to("/b"), 1);
    assert_eq!(mock.calls_to("/c"), 0);

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 3);
    let first = &reqs[0];
    assert_eq!(first.method, "PUT");
    assert_eq!(first.path, "/a");
    assert_eq!(first.query, "x=1");
    assert_eq!(first.body, Bytes::from_static(b"payload"));
    assert_eq!(first.header("x-api-key"), Some("k1"));
    assert_eq!(first.header("X-API-KEY"), Some("k1"));
    assert!(first.headers.iter().any(|(n, _)| n == "x-api-key"));
    let accepts: Vec<_> = first
        .headers
        .iter()
        .filter(|(n, _)| n == "accept")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(accepts, ["a", "b"]);
    assert_eq!(reqs[2].query, "");
    assert_eq!(mock.last_request().unwrap().path, "/b");

    mock.reset_calls();
    assert_eq!(mock.calls(), 0);
    assert_eq!(mock.calls_to("/a"), 0);
    assert!(mock.requests().is_empty());
    let r = send_on(&mut sender, "GET", "/a", &[], "").await;
    assert_eq!(r.headers["x-mock-call"], "1");
}

#[tokio::test]
async fn recorded_requests_are_bounded() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_body_bytes(0);
    let mut sender = connect(mock.addr()).await;
    for i in 0..(RECORDED_REQUESTS + 5) {
        send_on(&mut sender, "GET", &format!("/r{i}"), &[], "").await;
    }
    let reqs = mock.requests();
    assert_eq!(reqs.len(), RECORDED_REQUESTS);
    assert_eq!(reqs[0].path, "/r5");
    assert_eq!(
        reqs.last().unwrap().path,
        format!("/r{}", RECORDED_REQUESTS + 4)
    );
    assert_eq!(mock.calls(), (RECORDED_REQUESTS + 5) as u64);
    assert_eq!(mock.calls_to("/r0"), 1);
}

#[tokio::test]
async fn fail_next_then_recover() {
    let mock = MockUpstream::start().await.unwrap();
    mock.fail_next(2, 503);
    let mut sender = connect(mock.addr()).await;
    assert_eq!(send_on(&mut sender, "GET", "/", &[], "").await.status, 503);
    assert_eq!(send_on(&mut sender, "GET", "/", &[], "").await.status, 503);
    assert_eq!(send_on(&mut sender, "GET", "/", &[], "").await.status, 200);
    assert_eq!(mock.calls(), 3);
}

#[tokio::test]
async fn fixed_status_until_cleared() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_status(Some(429));
    let mut sender = connect(mock.addr()).await;
    for _ in 0..3 {
        assert_eq!(send_on(&mut sender, "GET", "/", &[], "").await.status, 429);
    }
    // fail_next takes precedence while it lasts.
    mock.fail_next(1, 500);
    assert_eq!(send_on(&mut sender, "GET", "/", &[], "").await.status, 500);
    assert_eq!(send_on(&mut sender, "GET", "/", &[], "").await.status, 429);
    mock.set_status(None);
    assert_eq!(send_on(&mut sender, "GET", "/", &[], "").await.status, 200);
}

#[tokio::test]
async fn delay_applies_to_every_response() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_delay(Duration::from_millis(150));
    let start = Instant::now();
    let r = get(&mock, "/slow").await;
    assert_eq!(r.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(150));
    mock.set_delay(Duration::ZERO);
}

#[tokio::test]
async fn hang_counts_but_does_not_answer_until_cleared() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_hang(true);
    let m = mock.clone();
    let pending = tokio::spawn(async move { get(&m, "/hang").await.status });
    // The call is counted on arrival, before the hang.
    for _ in 0..200 {
        if mock.calls() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(mock.calls(), 1);
    assert_eq!(mock.calls_to("/hang"), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());

    mock.set_hang(false);
    let status = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn extra_headers_and_body_override() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_response_header("Set-Cookie", Some("session=abc"));
    mock.set_response_header("Cache-Control", Some("max-age=60"));
    mock.set_response_header("Cache-Control", Some("no-store"));
    let r = get(&mock, "/").await;
    assert_eq!(r.headers["set-cookie"], "session=abc");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.headers.get_all("cache-control").iter().count(), 1);

    mock.set_response_header("Set-Cookie", None);
    mock.set_response_header("bad header", Some("x"));
    mock.set_body_override(Some(Bytes::from_static(b"exact")));
    let r = get(&mock, "/").await;
    assert!(r.headers.get("set-cookie").is_none());
    assert_eq!(r.body, Bytes::from_static(b"exact"));
    assert_eq!(r.headers["content-length"], "5");

    mock.set_body_override(None);
    mock.set_response_header("Cache-Control", None);
    let r = get(&mock, "/").await;
    assert!(r.headers.get("cache-control").is_none());
    assert_eq!(r.body.len(), DEFAULT_BODY_BYTES);
}

#[tokio::test]
async fn chunked_bodies_have_no_content_length() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_chunked(true);
    mock.set_body_bytes(100_000);
    let r = get(&mock, "/chunked").await;
    assert_eq!(r.status, 200);
    assert!(r.headers.get("content-length").is_none());
    assert_eq!(r.headers["transfer-encoding"], "chunked");
    assert_eq!(r.body.len(), 100_000);
    json(&r.body);
}

async fn wait_until_refused(addr: SocketAddr) {
    for _ in 0..400 {
        if TcpStream::connect(addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{addr} still accepts connections");
}

#[tokio::test]
async fn shutdown_stops_serving_and_closes_connections() {
    let mock = MockUpstream::start().await.unwrap();
    let addr = mock.addr();
    mock.set_hang(true);
    let m = mock.clone();
    let pending = tokio::spawn(async move {
        let stream = TcpStream::connect(m.addr()).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/hang")
            .header("host", "mock")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(req).await.is_err()
    });
    while mock.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    mock.shutdown();
    let failed = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(failed, "a pending request must fail when the server stops");
    wait_until_refused(addr).await;
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() {
    let mock = MockUpstream::start().await.unwrap();
    let addr = mock.addr();
    let clone = mock.clone();
    drop(mock);
    // Still served while a clone lives.
    assert_eq!(get(&clone, "/").await.status, 200);
    drop(clone);
    wait_until_refused(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_thousand_concurrent_connections() {
    const CONNECTIONS: usize = 1000;
    let mock = MockUpstream::start().await.unwrap();
    // Keep every connection's request in flight at once.
    mock.set_delay(Duration::from_millis(300));
    let mut tasks = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let addr = mock.addr();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await;
            let a = send_on(&mut sender, "GET", &format!("/c/{i}"), &[], "").await;
            let b = send_on(&mut sender, "GET", &format!("/c/{i}"), &[], "").await;
            (a.status, b.status)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, 200));
    }
    assert_eq!(mock.calls(), 2 * CONNECTIONS as u64);
    assert_eq!(mock.calls_to("/c/999"), 2);
}
