//! End-to-end tests: the real `tollgate` binary over real sockets, in front of an in-process
//! mock upstream that counts calls and can be told to be slow, to fail or to hang.
//!
//! Every test starts its own mock and its own gateway process (on a config and SQLite file in
//! a temporary directory), so the tests run in parallel.

// Not every helper of the shared support module is used here.
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mock_upstream::MockUpstream;
use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::{ADMIN_TOKEN, Gateway, Resp, base_config, eventually, metric, run_cli};

/// One `[[upstreams.routes]]` table.
fn route(path: &str, extra: &str) -> String {
    format!("\n[[upstreams.routes]]\npath = \"{path}\"\n{extra}\n")
}

async fn mock() -> MockUpstream {
    MockUpstream::start()
        .await
        .expect("starting the mock upstream")
}

/// A mock and a gateway whose upstream `demo` points at it.
async fn setup(upstream_extra: &str, routes: &[String]) -> (MockUpstream, Gateway) {
    let mock = mock().await;
    let mut config = base_config(&mock.url(), upstream_extra);
    for r in routes {
        config.push_str(r);
    }
    let gw = Gateway::start(&config).await;
    (mock, gw)
}

fn assert_status(r: &Resp, status: u16) {
    assert_eq!(r.status, status, "unexpected status; body: {}", r.text());
}

// 1
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miss_then_hit_with_headers_and_metrics() {
    let (mock, gw) = setup("", &[route("/items/*", "ttl = \"60s\"\ncost = 0.25")]).await;

    let first = gw.get("/demo/items/1?x=1").await;
    assert_status(&first, 200);
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(first.header("x-upstream-cost"), Some("0.25"));
    assert!(first.header("age").is_none(), "Age on a MISS");
    assert_eq!(first.header("content-type"), Some("application/json"));

    let second = gw.get("/demo/items/1?x=1").await;
    assert_status(&second, 200);
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.header("x-upstream-cost"), Some("0"));
    let age = second.header("age").expect("Age on a HIT");
    assert!(age.parse::<u64>().is_ok(), "Age {age:?} is not a number");
    assert_eq!(second.body, first.body);
    assert_eq!(mock.calls(), 1);

    let m = gw.metrics().await;
    let demo = ("upstream", "demo");
    let hits = metric(&m, "tollgate_requests_total", &[demo, ("outcome", "hit")]);
    let misses = metric(&m, "tollgate_requests_total", &[demo, ("outcome", "miss")]);
    assert_eq!(hits, Some(1.0), "{m}");
    assert_eq!(misses, Some(1.0), "{m}");
    let saved = metric(&m, "tollgate_cost_saved_total", &[demo]).unwrap_or(0.0);
    assert!(saved > 0.0, "cost saved {saved}: {m}");
    assert_eq!(
        metric(&m, "tollgate_upstream_calls_total", &[demo]),
        Some(1.0),
        "{m}"
    );
}

// 2
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normalization_sorts_rounds_and_drops() {
    let (mock, gw) = setup(
        "",
        &[
            route(
                "/items/*",
                "ttl = \"60s\"\ncost = 0.1\nnormalize = { drop = [\"_\"] }",
            ),
            route(
                "/geo",
                "ttl = \"60s\"\ncost = 0.1\nnormalize = { round = { lat = 1, lon = 1 } }",
            ),
        ],
    )
    .await;

    let a = gw.get("/demo/items/q?b=2&a=1").await;
    assert_eq!((a.status, a.x_cache()), (200, "MISS"));
    let b = gw.get("/demo/items/q?a=1&b=2").await;
    assert_eq!(
        (b.status, b.x_cache()),
        (200, "HIT"),
        "reordered parameters"
    );
    let c = gw.get("/demo/items/q?a=1&_=1712345678&b=2").await;
    assert_eq!(
        (c.status, c.x_cache()),
        (200, "HIT"),
        "dropped parameter `_`"
    );
    assert_eq!(mock.calls_to("/items/q"), 1);
    assert_eq!(a.body, c.body);

    let near1 = gw.get("/demo/geo?lat=30.26&lon=-97.74").await;
    assert_eq!((near1.status, near1.x_cache()), (200, "MISS"));
    let near2 = gw.get("/demo/geo?lat=30.31&lon=-97.71").await;
    assert_eq!(
        (near2.status, near2.x_cache()),
        (200, "HIT"),
        "rounded coordinates"
    );
    assert_eq!(mock.calls_to("/geo"), 1);
    let seen = mock
        .requests()
        .into_iter()
        .find(|r| r.path == "/geo")
        .expect("the upstream saw /geo");
    assert_eq!(seen.query, "lat=30.3&lon=-97.7", "query forwarded upstream");
    assert_eq!(mock.calls(), 2);
}

// 3
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_make_one_upstream_call() {
    const N: usize = 500;
    let (mock, gw) = setup("", &[route("/items/*", "ttl = \"60s\"\ncost = 1")]).await;
    mock.set_delay(Duration::from_millis(300));

    let client = gw.client().clone();
    let url = gw.url("/demo/items/hot?id=7");
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (client, url, barrier) = (client.clone(), url.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                let resp = client.get(&url).send().await?;
                let status = resp.status().as_u16();
                let header = |name: &str| {
                    resp.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let x_cache = header("x-cache");
                let cost = header("x-upstream-cost");
                let body = resp.bytes().await?;
                Ok::<_, reqwest::Error>((status, x_cache, cost, body))
            })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    let mut failures = Vec::new();
    let mut paid = 0;
    for t in tasks {
        match t.await.expect("request task") {
            Ok((200, x, cost, body)) if x == "MISS" || x == "HIT" => {
                bodies.insert(body);
                if cost != "0" {
                    assert_eq!(cost, "1", "X-Upstream-Cost");
                    paid += 1;
                }
            }
            other => failures.push(format!("{other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {N} failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert_eq!(bodies.len(), 1, "different bodies served");
    assert_eq!(
        paid, 1,
        "responses carrying the upstream cost (waiters pay 0)"
    );
    assert_eq!(
        mock.calls(),
        1,
        "upstream calls for {N} concurrent requests"
    );
}

// 4
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let (mock, gw) = setup(
        "",
        &[route(
            "/items/*",
            "ttl = \"1s\"\nstale_while_revalidate = \"30s\"\ncost = 0.5",
        )],
    )
    .await;

    let primed = gw.get("/demo/items/swr").await;
    assert_eq!((primed.status, primed.x_cache()), (200, "MISS"));
    assert_eq!(primed.mock_call(), 1);
    let primed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(primed_at.elapsed() > Duration::from_secs(1));

    // Keep the refresh in flight while the burst is answered.
    mock.set_delay(Duration::from_secs(1));
    let client = gw.client().clone();
    let url = gw.url("/demo/items/swr");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                Ok::<_, reqwest::Error>(Resp::read(client.get(&url).send().await?).await)
            })
        })
        .collect::<Vec<_>>();
    for t in tasks {
        let r = t.await.expect("task").expect("request");
        assert_eq!((r.status, r.x_cache()), (200, "STALE"), "{}", r.text());
        assert!(r.header("age").is_some(), "Age on STALE");
        assert_eq!(r.header("x-upstream-cost"), Some("0"));
        assert_eq!(r.body, primed.body, "stale body");
    }

    assert!(
        eventually(Duration::from_secs(5), || mock.calls() >= 2).await,
        "no background refresh"
    );
    // Wait for the refresh to land (polls meanwhile are STALE and must not refetch).
    let deadline = Instant::now() + Duration::from_secs(5);
    let refreshed = loop {
        let r = gw.get("/demo/items/swr").await;
        assert_status(&r, 200);
        if r.x_cache() == "HIT" {
            break r;
        }
        assert_eq!(r.x_cache(), "STALE");
        assert!(
            Instant::now() < deadline,
            "the refreshed entry never became a HIT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refreshed.mock_call(), 2, "HIT serves the refreshed body");
    assert_eq!(mock.calls(), 2, "exactly one refresh");
}

// 5
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_covers_errors_and_timeouts() {
    let (mock, gw) = setup(
        "timeout = \"500ms\"",
        &[route(
            "/items/*",
            "ttl = \"1s\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"1h\"\ncost = 0.5",
        )],
    )
    .await;

    let a = gw.get("/demo/items/a").await;
    let b = gw.get("/demo/items/b").await;
    assert_eq!((a.x_cache(), b.x_cache()), ("MISS", "MISS"));
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // An upstream 500 with a stale entry: the stale entry.
    mock.set_status(Some(500));
    let r = gw.get("/demo/items/a").await;
    assert_eq!((r.status, r.x_cache()), (200, "STALE"), "{}", r.text());
    assert_eq!(r.body, a.body);
    assert!(r.header("age").is_some(), "Age on STALE");
    assert_eq!(r.header("x-upstream-cost"), Some("0"));
    mock.set_status(None);

    // A hung upstream with a stale entry: the stale entry, after the upstream timeout.
    mock.set_hang(true);
    let started = Instant::now();
    let r = gw.get("/demo/items/b").await;
    let took = started.elapsed();
    assert_eq!((r.status, r.x_cache()), (200, "STALE"), "{}", r.text());
    assert_eq!(r.body, b.body);
    assert!(took < Duration::from_millis(1500), "STALE after {took:?}");
    mock.set_hang(false);
    assert_eq!(mock.calls(), 4);
}

// 5b
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_without_stale_are_json_errors() {
    let (mock, gw) = setup(
        "timeout = \"500ms\"",
        &[route(
            "/items/*",
            "ttl = \"60s\"\nstale_if_error = \"1h\"\ncost = 0.5",
        )],
    )
    .await;

    // A hung upstream and nothing stale: 504 upstream_timeout.
    mock.set_hang(true);
    let started = Instant::now();
    gw.get("/demo/items/hung")
        .await
        .assert_error(504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    mock.set_hang(false);

    // An upstream 5xx and nothing stale: 502 upstream_error (only 4xx pass through).
    mock.set_status(Some(500));
    gw.get("/demo/items/failing")
        .await
        .assert_error(502, "upstream_error");
    mock.set_status(Some(503));
    gw.get("/demo/items/failing")
        .await
        .assert_error(502, "upstream_error");
    mock.set_status(None);
    let ok = gw.get("/demo/items/failing").await;
    assert_eq!((ok.status, ok.x_cache()), (200, "MISS"), "a 5xx was stored");
}

// 6
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_survives_restart() {
    let (mock, mut gw) = setup("", &[route("/items/*", "ttl = \"60s\"\ncost = 1")]).await;
    let first = gw.get("/demo/items/durable").await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"));

    gw.restart().await;
    let again = gw.get("/demo/items/durable").await;
    assert_eq!(
        (again.status, again.x_cache()),
        (200, "HIT"),
        "after restart"
    );
    assert_eq!(again.body, first.body);
    assert_eq!(mock.calls(), 1);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_cache_l2_hits_total", &[]),
        Some(1.0),
        "{m}"
    );
}

// 7
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_through_admin_api_and_cli() {
    let mock = mock().await;
    let config = base_config(&mock.url(), "").replace("127.0.0.1:0", "127.0.0.1:{port}")
        + &route("/items/*", "ttl = \"60s\"\ncost = 1");
    let gw = Gateway::start(&config).await;
    let path = "/demo/items/p";
    assert_eq!(gw.get(path).await.x_cache(), "MISS");
    assert_eq!(gw.get(path).await.x_cache(), "HIT");

    let purge = |token: Option<&str>| {
        let req = gw
            .request(Method::POST, "/admin/cache/purge")
            .header("content-type", "application/json")
            .body(r#"{"upstream":"demo"}"#);
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    };
    gw.send(purge(None)).await.assert_error(401, "unauthorized");
    gw.send(purge(Some("wrong-token")))
        .await
        .assert_error(401, "unauthorized");
    assert_eq!(
        gw.get(path).await.x_cache(),
        "HIT",
        "a refused purge purged"
    );

    let r = gw.send(purge(Some(ADMIN_TOKEN))).await;
    assert_status(&r, 200);
    let n = r.json()["purged"].as_u64().expect("purged count");
    assert!(n >= 1, "purged {n}");
    assert_eq!(gw.get(path).await.x_cache(), "MISS", "after the API purge");
    assert_eq!(gw.get(path).await.x_cache(), "HIT");

    let config_path = gw.config_path().to_str().expect("utf-8 path").to_string();
    let out = run_cli(&[
        "cache",
        "purge",
        "--upstream",
        "demo",
        "--config",
        &config_path,
    ])
    .await;
    assert!(out.success(), "cache purge failed: {out:?}");
    assert_eq!(gw.get(path).await.x_cache(), "MISS", "after the CLI purge");
    assert_eq!(mock.calls(), 3);
}

// 8
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_forces_a_refresh() {
    let (mock, gw) = setup("", &[route("/items/*", "ttl = \"60s\"\ncost = 1")]).await;
    let first = gw.get("/demo/items/nc").await;
    assert_eq!((first.x_cache(), first.mock_call()), ("MISS", 1));

    let forced = gw
        .send(
            gw.request(Method::GET, "/demo/items/nc")
                .header("cache-control", "no-cache"),
        )
        .await;
    assert_status(&forced, 200);
    assert_eq!(forced.x_cache(), "MISS");
    assert_eq!(forced.header("x-upstream-cost"), Some("1"));
    assert_eq!(forced.mock_call(), 2);
    assert_eq!(mock.calls(), 2);

    let after = gw.get("/demo/items/nc").await;
    assert_eq!(after.x_cache(), "HIT");
    assert_eq!(after.mock_call(), 2, "the entry was refreshed");
    assert_eq!(mock.calls(), 2);
}

// 9
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_bodies_are_keyed_canonically() {
    let (mock, gw) = setup(
        "",
        &[route(
            "/compute",
            "ttl = \"60s\"\ncost = 2\nmethods = [\"POST\"]",
        )],
    )
    .await;
    let post = |body: &'static str| {
        gw.request(Method::POST, "/demo/compute")
            .header("content-type", "application/json")
            .body(body)
    };
    let a = gw.send(post(r#"{"a":1,"b":2}"#)).await;
    assert_eq!((a.status, a.x_cache()), (200, "MISS"), "{}", a.text());
    let b = gw.send(post(r#"{ "b":2, "a":1 }"#)).await;
    assert_eq!(
        (b.status, b.x_cache()),
        (200, "HIT"),
        "same JSON, other spelling"
    );
    assert_eq!(b.body, a.body);
    assert_eq!(mock.calls(), 1);
    let seen = mock.last_request().expect("a recorded request");
    assert_eq!(seen.method, "POST");
    assert_eq!(&seen.body[..], br#"{"a":1,"b":2}"#);

    let c = gw.send(post(r#"{"a":1,"b":3}"#)).await;
    assert_eq!((c.status, c.x_cache()), (200, "MISS"), "a different body");
    assert_eq!(mock.calls(), 2);
}

// 10
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_upstreams_routes_and_methods() {
    let (mock, gw) = setup("", &[route("/items/*", "ttl = \"60s\"\ncost = 1")]).await;
    gw.get("/nope/items/1").await.assert_error(404, "not_found");
    gw.get("/demo/other").await.assert_error(404, "not_found");
    let r = gw.send(gw.request(Method::DELETE, "/demo/items/1")).await;
    r.assert_error(405, "method_not_allowed");
    let allow = r.header("allow").expect("an Allow header on 405");
    assert!(allow.contains("GET"), "Allow: {allow}");
    assert_eq!(mock.calls(), 0);
}

// The gateway's own endpoints answer only their exact method and path (after re-quoting);
// anything else under a reserved first segment is the proxy's JSON 404, never a call upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_endpoints_match_method_and_path_exactly() {
    let (mock, gw) = setup("", &[route("/*", "ttl = \"60s\"")]).await;
    let admin = |m: Method, p: &str| gw.request(m, p).bearer_auth(ADMIN_TOKEN);
    assert_status(&gw.get("/health").await, 200);
    assert_status(&gw.get("/health?probe=1").await, 200);
    assert_status(&gw.send(admin(Method::GET, "/admin/keys")).await, 200);
    // `%6B` is `k`: actix's re-quoting decodes it before the path is compared.
    assert_status(&gw.send(admin(Method::GET, "/admin/%6Beys")).await, 200);
    for (method, path) in [
        (Method::POST, "/health"),
        (Method::GET, "/health/"),
        (Method::GET, "/health/x"),
        (Method::GET, "/admin"),
        (Method::GET, "/admin/other"),
        (Method::GET, "/admin/cache/purge"),
        (Method::DELETE, "/admin/keys/"),
        (Method::DELETE, "/admin/keys/a/b"),
    ] {
        let r = gw.send(gw.request(method.clone(), path)).await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
        r.assert_error(404, "not_found");
    }
    // A percent-encoded reserved name is an upstream's name (and there is none).
    let r = gw.get("/%68ealth").await;
    r.assert_error(404, "not_found");
    assert!(r.text().contains("%68ealth"), "{}", r.text());
    // The key id is one path segment, percent-decoded, named in the error as sent.
    let r = gw
        .send(admin(Method::DELETE, "/admin/keys/no%20such"))
        .await;
    r.assert_error(404, "not_found");
    assert!(r.text().contains(r#"no key \"no such\""#), "{}", r.text());
    let id = gw
        .create_key(&serde_json::json!({"name": "dispatch"}))
        .await["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let r = gw
        .send(admin(Method::DELETE, &format!("/admin/keys/{id}")))
        .await;
    assert_status(&r, 200);
    assert_eq!(r.json()["revoked"], true);
    // The body limit still applies to the admin API's bodies.
    let r = gw
        .send(
            admin(Method::POST, "/admin/cache/purge")
                .header("content-length", "99999999")
                .body("x"),
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(mock.calls(), 0);
}

/// Sends a chunked POST of `total` bytes over a raw socket and returns the status code of the
/// answer; the gateway may answer (and close) before the body is sent.
async fn chunked_post_status(gw: &Gateway, path: &str, total: usize) -> u16 {
    let stream = tokio::net::TcpStream::connect(gw.addr())
        .await
        .expect("connecting to the gateway");
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
        gw.addr()
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'7'; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            wr.write_all(&chunk).await?;
            wr.write_all(b"\r\n").await?;
            sent += chunk.len();
        }
        wr.write_all(b"0\r\n\r\n").await?;
        Ok::<_, std::io::Error>(())
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(15);
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer to a chunked {total}-byte body within 15 s"),
        }
    }
    writer.abort();
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in the answer: {text:?}"))
}

// 11
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_get_4xx() {
    let mock = mock().await;
    let config = base_config(&mock.url(), "").replace(
        "[server]\n",
        "[server]\nmax_body_bytes = 1024\nmax_url_bytes = 1024\nmax_header_bytes = 4096\n",
    ) + &route("/items/*", "ttl = \"60s\"\ncost = 1")
        + &route("/compute", "ttl = \"60s\"\ncost = 1\nmethods = [\"POST\"]");
    let gw = Gateway::start(&config).await;

    let long = "x".repeat(2000);
    gw.get(&format!("/demo/items/1?q={long}"))
        .await
        .assert_error(414, "uri_too_long");
    let huge_url = gw
        .get(&format!("/demo/items/1?q={}", "x".repeat(40_000)))
        .await;
    assert!(
        (400..500).contains(&huge_url.status),
        "40 kB URL: {}",
        huge_url.status
    );

    gw.send(
        gw.request(Method::GET, "/demo/items/1")
            .header("x-big", "h".repeat(6000)),
    )
    .await
    .assert_error(431, "headers_too_large");
    let huge_headers = gw
        .send(
            gw.request(Method::GET, "/demo/items/1")
                .header("x-big", "h".repeat(40_000)),
        )
        .await;
    assert!(
        (400..500).contains(&huge_headers.status),
        "40 kB header: {}",
        huge_headers.status
    );

    gw.send(
        gw.request(Method::POST, "/demo/compute")
            .header("content-type", "application/json")
            .body(format!("{{\"a\":\"{}\"}}", "b".repeat(2000))),
    )
    .await
    .assert_error(413, "payload_too_large");

    let status = chunked_post_status(&gw, "/demo/compute", 8 * 1024 * 1024).await;
    assert_eq!(status, 413, "chunked 8 MiB body");
    assert_eq!(mock.calls(), 0, "an oversized request reached the upstream");

    // Still serving normally.
    assert_status(&gw.get("/health").await, 200);
    let ok = gw.get("/demo/items/1").await;
    assert_eq!((ok.status, ok.x_cache()), (200, "MISS"));
    let small = gw
        .send(
            gw.request(Method::POST, "/demo/compute")
                .header("content-type", "application/json")
                .body(r#"{"a":1}"#),
        )
        .await;
    assert_eq!(
        (small.status, small.x_cache()),
        (200, "MISS"),
        "{}",
        small.text()
    );
}

// 12
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_upstream_body_is_502_and_not_stored() {
    let (mock, gw) = setup(
        "max_body_bytes = 4096",
        &[route("/items/*", "ttl = \"60s\"\ncost = 1")],
    )
    .await;
    mock.set_body_bytes(20_000);
    gw.get("/demo/items/big")
        .await
        .assert_error(502, "upstream_error");
    gw.get("/demo/items/big")
        .await
        .assert_error(502, "upstream_error");
    assert_eq!(mock.calls(), 2, "the oversized response was stored");

    mock.set_chunked(true);
    gw.get("/demo/items/big")
        .await
        .assert_error(502, "upstream_error");
    assert_eq!(mock.calls(), 3);

    mock.set_chunked(false);
    mock.set_body_bytes(1000);
    let ok = gw.get("/demo/items/big").await;
    assert_eq!((ok.status, ok.x_cache()), (200, "MISS"));
}

// 13
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_responses_and_credential_headers() {
    let mock = mock().await;
    let config = base_config(
        &format!("{}/v1", mock.url()),
        "headers = { \"X-Api-Key\" = \"secret\" }",
    ) + &route("/items/*", "ttl = \"60s\"\ncost = 1");
    let gw = Gateway::start(&config).await;

    // Upstream 404: passed through, not stored.
    mock.set_status(Some(404));
    let r = gw.get("/demo/items/missing").await;
    assert_eq!((r.status, r.x_cache()), (404, "MISS"), "{}", r.text());
    assert_eq!(r.mock_call(), 1, "the upstream's body");
    assert_eq!(
        r.header("x-upstream-cost"),
        Some("1"),
        "the call was paid for"
    );
    let r = gw.get("/demo/items/missing").await;
    assert_eq!((r.status, r.x_cache()), (404, "MISS"));
    assert_eq!(mock.calls_to("/v1/items/missing"), 2, "a 404 was stored");
    mock.set_status(None);

    // Set-Cookie: not stored.
    mock.set_response_header("Set-Cookie", Some("session=abc"));
    let r = gw.get("/demo/items/cookie").await;
    assert_eq!((r.status, r.x_cache()), (200, "MISS"));
    let r = gw.get("/demo/items/cookie").await;
    assert_eq!(
        (r.status, r.x_cache()),
        (200, "MISS"),
        "a Set-Cookie response was stored"
    );
    assert_eq!(mock.calls_to("/v1/items/cookie"), 2);
    mock.set_response_header("Set-Cookie", None);

    // Client credentials never reach the upstream; the configured one does.
    let path = gw.config_path().to_str().expect("utf-8 path").to_string();
    let created = run_cli(&[
        "keys", "create", "--name", "e2e", "--json", "--config", &path,
    ])
    .await;
    assert!(created.success(), "keys create: {created:?}");
    let created: serde_json::Value =
        serde_json::from_str(created.stdout.trim()).expect("keys create --json prints JSON");
    let client_key = created["key"].as_str().expect("a key").to_string();
    let r = gw
        .send(
            gw.request(Method::GET, "/demo/items/creds")
                .header("authorization", format!("Bearer {client_key}"))
                .header("x-api-key", client_key.as_str())
                .header("cookie", "sid=client"),
        )
        .await;
    assert_status(&r, 200);
    let seen = mock
        .requests()
        .into_iter()
        .find(|r| r.path == "/v1/items/creds")
        .expect("the upstream saw /v1/items/creds");
    assert!(!seen.has_header("authorization"), "{:?}", seen.headers);
    assert!(!seen.has_header("cookie"), "{:?}", seen.headers);
    let keys: Vec<_> = seen
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-api-key"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(keys, ["secret"], "X-Api-Key values the upstream saw");
    assert!(!r.text().contains("secret"));
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains(&client_key)),
        "the client's key reached the upstream"
    );
}

// 14
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_config_checks() {
    let (_mock, gw) = setup("", &[route("/items/*", "ttl = \"60s\"\ncost = 1")]).await;
    assert_status(&gw.get("/health").await, 200);
    let ready = gw.get("/ready").await;
    assert_status(&ready, 200);
    let v = ready.json();
    assert_eq!(v["dependencies"]["database"]["state"], "up", "{v}");

    let path = gw.config_path().to_str().expect("utf-8 path").to_string();
    let good = run_cli(&["check-config", "--config", &path]).await;
    assert!(good.success(), "check-config on a good config: {good:?}");

    let bad_path = gw.dir().join("bad.toml");
    let bad = std::fs::read_to_string(gw.config_path())
        .expect("reading the config")
        .replace("ttl = \"60s\"", "ttl = \"10x\"");
    std::fs::write(&bad_path, bad).expect("writing the bad config");
    let bad_path = bad_path.to_str().expect("utf-8 path").to_string();
    let out = run_cli(&["check-config", "--config", &bad_path]).await;
    assert!(
        !out.success(),
        "check-config accepted ttl = \"10x\": {out:?}"
    );
    assert!(
        out.stderr.contains("ttl"),
        "the message does not name the key: {out:?}"
    );
    assert!(
        out.stderr.contains("bad.toml"),
        "the message does not name the file: {out:?}"
    );

    let out = run_cli(&["serve", "--config", &bad_path, "--listen", "127.0.0.1:0"]).await;
    assert!(!out.success(), "serve started on a bad config: {out:?}");
    assert!(!out.stdout.contains("listening"), "{out:?}");
    assert!(out.stderr.contains("ttl"), "{out:?}");
}

// 15
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarm_fills_the_cache_at_start() {
    let (mock, gw) = setup(
        "",
        &[route(
            "/items/*",
            "ttl = \"60s\"\ncost = 1\nprewarm = [\"/items/1\", \"/items/2\"]",
        )],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || mock.calls_to("/items/1") >= 1
            && mock.calls_to("/items/2") >= 1)
        .await,
        "prewarm calls seen: {:?}",
        mock.requests()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    // The /items/2 fetch may still be being stored; /items/1 finished long ago.
    let r = gw.get("/demo/items/1").await;
    assert_eq!((r.status, r.x_cache()), (200, "HIT"));
    assert_eq!(mock.calls_to("/items/1"), 1);
}

// 16
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests() {
    let (mock, mut gw) = setup("", &[route("/items/*", "ttl = \"60s\"\ncost = 1")]).await;
    // Longer than actix's 1 s shutdown poll interval, so a too-short grace period shows.
    mock.set_delay(Duration::from_secs(2));
    let request = {
        let (client, url) = (gw.client().clone(), gw.url("/demo/items/slow"));
        tokio::spawn(async move {
            Ok::<_, reqwest::Error>(Resp::read(client.get(&url).send().await?).await)
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || mock.calls() == 1).await,
        "the request never reached the upstream"
    );
    let sent = Instant::now();
    gw.stop().await;
    let r = request
        .await
        .expect("request task")
        .expect("the in-flight request failed during shutdown");
    assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{}", r.text());
    assert!(sent.elapsed() < Duration::from_secs(10));

    // The response stored during shutdown was flushed to the database.
    gw.restart().await;
    let again = gw.get("/demo/items/slow").await;
    assert_eq!(
        (again.status, again.x_cache()),
        (200, "HIT"),
        "after restart"
    );
    assert_eq!(again.body, r.body);
    assert_eq!(mock.calls(), 1);
}
