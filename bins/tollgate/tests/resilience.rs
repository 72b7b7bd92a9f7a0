//! End-to-end resilience tests (issue 5): the real `tollgate` binary in front of an in-process
//! mock upstream that can fail, hang or be slow — retries, the circuit breaker (opening,
//! rejecting at once, probing, closing), timeouts, stale answers while the breaker is open,
//! route fallbacks and which methods are retried.
//!
//! Every test starts its own mock and its own gateway process, so the tests run in parallel.

// Not every helper of the shared support module is used here.
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use mock_upstream::MockUpstream;
use reqwest::Method;

use support::{ADMIN_TOKEN, Gateway, Resp, base_config, metric};

/// What "at once" means for an answer that needs no upstream call (an open breaker, a stale
/// entry): far below the upstream timeouts used here (5 s), with room for a loaded machine.
const FAST: Duration = Duration::from_millis(200);

/// One `[[upstreams.routes]]` table.
fn route(path: &str, extra: &str) -> String {
    format!("\n[[upstreams.routes]]\npath = \"{path}\"\n{extra}\n")
}

/// A mock and a gateway whose upstream `demo` points at it.
async fn setup(upstream_extra: &str, routes: &[String]) -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start()
        .await
        .expect("starting the mock upstream");
    let mut config = base_config(&mock.url(), upstream_extra);
    for r in routes {
        config.push_str(r);
    }
    let gw = Gateway::start(&config).await;
    (mock, gw)
}

/// `GET path` and how long the answer took.
async fn timed_get(gw: &Gateway, path: &str) -> (Resp, Duration) {
    let started = Instant::now();
    let r = gw.get(path).await;
    (r, started.elapsed())
}

/// `GET /admin/breakers` → the entry of upstream `demo`.
async fn demo_breaker(gw: &Gateway) -> serde_json::Value {
    let r = gw
        .send(
            gw.request(Method::GET, "/admin/breakers")
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(r.status, 200, "/admin/breakers: {}", r.text());
    let v = r.json();
    let demo = v["breakers"]["demo"].clone();
    assert!(demo.is_object(), "no breaker for demo: {v}");
    demo
}

/// Polls `/admin/breakers` (which makes no upstream call) until demo's breaker is in `state`;
/// panics with the last answer after `within`.
async fn wait_for_breaker(gw: &Gateway, state: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let b = demo_breaker(gw).await;
        if b["state"] == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the breaker did not become {state} within {within:?}: {b}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts `r` is the breaker's fast 503 and returns its `Retry-After` in seconds.
fn assert_unavailable(r: &Resp, took: Duration) -> u64 {
    r.assert_error(503, "upstream_unavailable");
    assert!(took < FAST, "a 503 from an open breaker took {took:?}");
    let retry_after = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("503 without Retry-After: {:?}", r.headers));
    retry_after
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {retry_after:?} is not whole seconds"))
}

/// Asserts `r` is the route fallback `{"fallback":true}`.
fn assert_fallback(r: &Resp) {
    assert_eq!(r.status, 200, "fallback status; body: {}", r.text());
    assert_eq!(r.json(), serde_json::json!({"fallback": true}));
    assert_eq!(r.header("x-tollgate-fallback"), Some("true"), "{r:?}");
    assert_eq!(r.x_cache(), "BYPASS");
    assert_eq!(r.header("content-type"), Some("application/json"));
}

// 1. Two failures then success: one 200 after exactly three upstream calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_two_failures_into_a_success() {
    let (mock, gw) = setup(
        "breaker = { failure_threshold = 10, open_for = \"30s\" }\n\
         retry = { max_attempts = 3, base = \"10ms\", max = \"50ms\" }",
        &[route("/items/*", "ttl = \"60s\"\ncost = 1")],
    )
    .await;

    mock.fail_next(2, 503);
    let r = gw.get("/demo/items/r").await;
    assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{}", r.text());
    assert_eq!(r.mock_call(), 3, "the body of the third call");
    assert_eq!(
        mock.calls(),
        3,
        "upstream calls for two failures and a success"
    );
    let again = gw.get("/demo/items/r").await;
    assert_eq!((again.status, again.x_cache()), (200, "HIT"));
    assert_eq!(again.body, r.body);
    assert_eq!(mock.calls(), 3);

    // Failing more often than max_attempts: exactly max_attempts calls, then a 502.
    mock.fail_next(3, 503);
    gw.get("/demo/items/exhausted")
        .await
        .assert_error(502, "upstream_error");
    assert_eq!(mock.calls_to("/items/exhausted"), 3, "attempts in all");

    // A 500 is not a retryable failure: one call.
    mock.fail_next(1, 500);
    gw.get("/demo/items/fatal")
        .await
        .assert_error(502, "upstream_error");
    assert_eq!(mock.calls_to("/items/fatal"), 1, "a 500 was retried");
    assert_eq!(mock.calls(), 7);

    let b = demo_breaker(&gw).await;
    assert_eq!(b["retries"], 4, "{b}");
    assert_eq!(b["state"], "closed", "{b}");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_upstream_retries_total",
            &[("upstream", "demo")]
        ),
        Some(4.0),
        "{m}"
    );
}

// 2. Persistent failure opens the breaker: fast 503s, no upstream calls, visible state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_failure_opens_the_breaker() {
    let (mock, gw) = setup(
        "timeout = \"5s\"\nbreaker = { failure_threshold = 3, open_for = \"2s\" }",
        &[route("/items/*", "ttl = \"60s\"\ncost = 1")],
    )
    .await;
    let b = demo_breaker(&gw).await;
    assert_eq!(b["state"], "closed", "{b}");

    mock.set_status(Some(500));
    for i in 0..3 {
        gw.get(&format!("/demo/items/{i}"))
            .await
            .assert_error(502, "upstream_error");
    }
    assert_eq!(mock.calls(), 3);

    // Any call that still reached the upstream would now hang for the whole 5 s timeout.
    mock.set_hang(true);
    const REJECTED: u64 = 10;
    for i in 0..REJECTED {
        let (r, took) = timed_get(&gw, &format!("/demo/items/{}", i % 4)).await;
        let retry_after = assert_unavailable(&r, took);
        assert!(
            (1..=2).contains(&retry_after),
            "Retry-After {retry_after} with a 2 s open period"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        mock.calls(),
        3,
        "the upstream was called while the breaker was open"
    );

    let r = gw.get("/admin/breakers").await;
    r.assert_error(401, "unauthorized");
    let b = demo_breaker(&gw).await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["consecutive_failures"], 3, "{b}");
    assert_eq!(b["rejected"], REJECTED, "{b}");
    assert_eq!(b["retries"], 0, "retries without a retry policy: {b}");

    let m = gw.metrics().await;
    let demo = [("upstream", "demo")];
    assert_eq!(
        metric(&m, "tollgate_breaker_state", &demo),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "tollgate_breaker_rejections_total", &demo),
        Some(REJECTED as f64),
        "{m}"
    );

    let ready = gw.get("/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let v = ready.json();
    assert_eq!(v["upstreams"]["demo"]["breaker"], "open", "{v}");
    assert_eq!(mock.calls(), 3);
}

// 3. After the open period one probe closes the breaker, and traffic flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_open_period_one_probe_closes_the_breaker() {
    let (mock, gw) = setup(
        "timeout = \"5s\"\nbreaker = { failure_threshold = 2, open_for = \"1s\" }",
        &[route("/items/*", "ttl = \"60s\"\ncost = 1")],
    )
    .await;
    mock.set_status(Some(500));
    for _ in 0..2 {
        gw.get("/demo/items/p")
            .await
            .assert_error(502, "upstream_error");
    }
    // Healthy again, but the breaker does not know yet: requests are refused until the open
    // period ends, then the first one is the probe.
    mock.set_status(None);
    let opened = Instant::now();
    let deadline = opened + Duration::from_secs(5);
    let mut refused = 0;
    let probe = loop {
        let (r, took) = timed_get(&gw, "/demo/items/p").await;
        if r.status != 503 {
            break r;
        }
        assert_unavailable(&r, took);
        assert_eq!(
            mock.calls(),
            2,
            "an upstream call while the breaker was open"
        );
        refused += 1;
        assert!(
            Instant::now() < deadline,
            "still refused {:?} after a 1 s open period",
            opened.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        opened.elapsed() >= Duration::from_millis(800),
        "the breaker let a call through {:?} into a 1 s open period",
        opened.elapsed()
    );
    assert!(refused >= 5, "only {refused} requests were refused");
    assert_eq!(
        (probe.status, probe.x_cache()),
        (200, "MISS"),
        "{}",
        probe.text()
    );
    assert_eq!(mock.calls(), 3, "one upstream call for the probe");
    assert_eq!(probe.mock_call(), 3);
    let b = demo_breaker(&gw).await;
    assert_eq!(b["state"], "closed", "one successful probe: {b}");

    for i in 0..3 {
        let r = gw.get(&format!("/demo/items/after-{i}")).await;
        assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{}", r.text());
    }
    assert_eq!(mock.calls(), 6, "calls after the breaker closed");
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_breaker_state", &[("upstream", "demo")]),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        gw.get("/ready").await.json()["upstreams"]["demo"]["breaker"],
        "closed"
    );
}

// 3b. HALF_OPEN admits one probe at a time; a failed probe reopens the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_admits_a_single_probe() {
    let (mock, gw) = setup(
        "timeout = \"5s\"\nbreaker = { failure_threshold = 2, open_for = \"1s\" }",
        &[route("/items/*", "ttl = \"60s\"\ncost = 1")],
    )
    .await;
    mock.set_status(Some(500));
    for _ in 0..2 {
        gw.get("/demo/items/x")
            .await
            .assert_error(502, "upstream_error");
    }
    // The probe fails: the breaker opens again and refuses without calling.
    wait_for_breaker(&gw, "half_open", Duration::from_secs(5)).await;
    gw.get("/demo/items/x")
        .await
        .assert_error(502, "upstream_error");
    assert_eq!(mock.calls(), 3);
    let (r, took) = timed_get(&gw, "/demo/items/x").await;
    assert_unavailable(&r, took);
    assert_eq!(demo_breaker(&gw).await["state"], "open");
    assert_eq!(mock.calls(), 3, "a call right after a failed probe");

    // Next open period over: of concurrent requests, one is the probe, the rest are refused.
    mock.set_status(None);
    mock.set_delay(Duration::from_millis(400));
    wait_for_breaker(&gw, "half_open", Duration::from_secs(5)).await;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (client, url) = (gw.client().clone(), gw.url(&format!("/demo/items/c{i}")));
            tokio::spawn(async move {
                let started = Instant::now();
                let r = Resp::read(client.get(&url).send().await?).await;
                Ok::<_, reqwest::Error>((r, started.elapsed()))
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let (r, took) = t.await.expect("request task").expect("request");
        if r.status == 200 {
            ok += 1;
        } else {
            assert_unavailable(&r, took);
        }
    }
    assert_eq!(ok, 1, "answered requests while HALF_OPEN");
    assert_eq!(mock.calls(), 4, "probes while HALF_OPEN");
    assert_eq!(demo_breaker(&gw).await["state"], "closed");
}

// 4. A slow upstream: 504 upstream_timeout within the configured timeout, retries included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_times_out() {
    let (mock, gw) = setup(
        "timeout = \"500ms\"\nretry = { max_attempts = 3, base = \"10ms\", max = \"50ms\" }",
        &[
            route("/slow/*", "ttl = \"60s\"\ncost = 1"),
            route(
                "/fb/*",
                "ttl = \"60s\"\ncost = 1\nfallback = { body = \"{\\\"fallback\\\":true}\" }",
            ),
        ],
    )
    .await;

    mock.set_hang(true);
    let (r, took) = timed_get(&gw, "/demo/slow/hung").await;
    r.assert_error(504, "upstream_timeout");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
        "504 after {took:?} with a 500 ms timeout"
    );
    assert_eq!(
        mock.calls_to("/slow/hung"),
        1,
        "a retry after the whole timeout was spent"
    );

    // A timeout on a route with a fallback: the fallback, as quickly.
    let (r, took) = timed_get(&gw, "/demo/fb/hung").await;
    assert_fallback(&r);
    assert!(
        took < Duration::from_millis(1500),
        "fallback after {took:?}"
    );
    mock.set_hang(false);

    // An answer slower than the timeout is a timeout too.
    mock.set_delay(Duration::from_millis(900));
    let (r, took) = timed_get(&gw, "/demo/slow/delayed").await;
    r.assert_error(504, "upstream_timeout");
    assert!(took < Duration::from_millis(1500), "504 after {took:?}");
    mock.set_delay(Duration::ZERO);

    let ok = gw.get("/demo/slow/hung").await;
    assert_eq!((ok.status, ok.x_cache()), (200, "MISS"), "{}", ok.text());
}

// 5. With the breaker open, an expired entry inside stale_if_error is served STALE, uncalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_is_served_while_the_breaker_is_open() {
    let (mock, gw) = setup(
        "timeout = \"5s\"\nbreaker = { failure_threshold = 2, open_for = \"30s\" }",
        &[route(
            "/items/*",
            "ttl = \"1s\"\nstale_if_error = \"1h\"\ncost = 0.5",
        )],
    )
    .await;
    let primed = gw.get("/demo/items/primed").await;
    assert_eq!((primed.status, primed.x_cache()), (200, "MISS"));
    let primed_at = Instant::now();

    // Open the breaker with failures on another path of the same upstream.
    mock.set_status(Some(500));
    for _ in 0..2 {
        gw.get("/demo/items/other")
            .await
            .assert_error(502, "upstream_error");
    }
    let (r, took) = timed_get(&gw, "/demo/items/other").await;
    assert_unavailable(&r, took);
    assert_eq!(mock.calls(), 3);
    // Any call that still reached the upstream would now hang for the whole 5 s timeout.
    mock.set_hang(true);

    let expiry = Duration::from_millis(1100);
    tokio::time::sleep(expiry.saturating_sub(primed_at.elapsed())).await;
    let (r, took) = timed_get(&gw, "/demo/items/primed").await;
    assert_eq!((r.status, r.x_cache()), (200, "STALE"), "{}", r.text());
    assert_eq!(r.body, primed.body, "the stale body");
    assert!(r.header("age").is_some(), "Age on STALE");
    assert_eq!(r.header("x-upstream-cost"), Some("0"));
    assert!(took < FAST, "STALE while open took {took:?}");
    assert_eq!(
        mock.calls_to("/items/primed"),
        1,
        "a call for the stale path"
    );
    assert_eq!(mock.calls(), 3);
    assert_eq!(demo_breaker(&gw).await["state"], "open");
}

// 6. A route fallback answers while the upstream is down; routes without one get JSON errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_answers_while_the_upstream_is_down() {
    let (mock, gw) = setup(
        "timeout = \"5s\"\nbreaker = { failure_threshold = 2, open_for = \"1s\" }",
        &[
            route(
                "/fb/*",
                "ttl = \"60s\"\ncost = 1\nfallback = { body = \"{\\\"fallback\\\":true}\" }",
            ),
            route("/plain/*", "ttl = \"60s\"\ncost = 1"),
        ],
    )
    .await;

    // An upstream 4xx is an answer, not an outage: passed through.
    mock.set_status(Some(404));
    let r = gw.get("/demo/fb/missing").await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.header("x-tollgate-fallback").is_none(), "{r:?}");
    assert_eq!(r.mock_call(), 1);

    // Upstream errors (breaker still closed).
    mock.set_status(Some(500));
    assert_fallback(&gw.get("/demo/fb/1").await);
    let r = gw.get("/demo/plain/1").await;
    r.assert_error(502, "upstream_error");
    assert!(r.header("x-tollgate-fallback").is_none(), "{r:?}");
    assert_eq!(mock.calls(), 3);

    // Breaker open: no call at all.
    let (r, took) = timed_get(&gw, "/demo/fb/2").await;
    assert_fallback(&r);
    assert!(took < FAST, "fallback while open took {took:?}");
    let (r, took) = timed_get(&gw, "/demo/plain/2").await;
    assert_unavailable(&r, took);
    assert!(r.header("x-tollgate-fallback").is_none(), "{r:?}");
    assert_eq!(
        mock.calls(),
        3,
        "an upstream call while the breaker was open"
    );

    // Recovered: the real answer, and the fallback was never cached.
    mock.set_status(None);
    wait_for_breaker(&gw, "half_open", Duration::from_secs(5)).await;
    let r = gw.get("/demo/fb/1").await;
    assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{}", r.text());
    assert!(r.header("x-tollgate-fallback").is_none(), "{r:?}");
    assert_eq!(r.mock_call(), 4);
    let r = gw.get("/demo/fb/2").await;
    assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{}", r.text());
    assert_eq!(r.mock_call(), 5);
}

// 7. POST is retried only on routes with `retry_post = true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_retried_only_when_the_route_allows_it() {
    let (mock, gw) = setup(
        "retry = { max_attempts = 3, base = \"10ms\", max = \"50ms\" }",
        &[
            route("/items/*", "ttl = \"60s\"\ncost = 1"),
            route("/compute", "ttl = \"60s\"\ncost = 1\nmethods = [\"POST\"]"),
            route(
                "/compute-idempotent",
                "ttl = \"60s\"\ncost = 1\nmethods = [\"POST\"]\nretry_post = true",
            ),
        ],
    )
    .await;
    let post = |path: &str| {
        gw.request(Method::POST, path)
            .header("content-type", "application/json")
            .body(r#"{"a":1}"#)
    };

    // The upstream's retries are on: a GET is retried.
    mock.fail_next(1, 503);
    let r = gw.get("/demo/items/1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.calls_to("/items/1"), 2, "GET attempts");

    mock.fail_next(1, 503);
    gw.send(post("/demo/compute"))
        .await
        .assert_error(502, "upstream_error");
    assert_eq!(mock.calls_to("/compute"), 1, "a POST was retried");

    mock.fail_next(1, 503);
    let r = gw.send(post("/demo/compute-idempotent")).await;
    assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{}", r.text());
    assert_eq!(mock.calls_to("/compute-idempotent"), 2, "POST attempts");
    let bodies: Vec<_> = mock
        .requests()
        .into_iter()
        .filter(|r| r.path == "/compute-idempotent")
        .map(|r| r.body)
        .collect();
    assert_eq!(bodies.len(), 2);
    assert!(
        bodies.iter().all(|b| &b[..] == br#"{"a":1}"#),
        "retried bodies: {bodies:?}"
    );
    assert_eq!(demo_breaker(&gw).await["retries"], 2);
}

// 8. A throttling upstream: a 429 is retried after its Retry-After, unless that is too long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_calls_are_retried_after_retry_after() {
    let (mock, gw) = setup(
        "timeout = \"5s\"\nretry = { max_attempts = 3, base = \"10ms\", max = \"50ms\" }",
        &[route("/items/*", "ttl = \"60s\"\ncost = 1")],
    )
    .await;

    mock.set_response_header("Retry-After", Some("1"));
    mock.fail_next(1, 429);
    let (r, took) = timed_get(&gw, "/demo/items/throttled").await;
    assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{}", r.text());
    assert_eq!(mock.calls_to("/items/throttled"), 2, "attempts");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "a retry after `Retry-After: 1` (backoff at most 50 ms) came after {took:?}"
    );

    // Waiting 30 s would overrun the 5 s timeout: no retry, the 429 passes through.
    mock.set_response_header("Retry-After", Some("30"));
    mock.fail_next(1, 429);
    let (r, took) = timed_get(&gw, "/demo/items/throttled-long").await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("30"));
    assert_eq!(mock.calls_to("/items/throttled-long"), 1, "attempts");
    assert!(took < Duration::from_secs(1), "429 after {took:?}");
}
