//! Behaviour of the [`Cache`] facade over a [`MemoryStore`] on a [`ManualClock`]: hits and
//! misses, single-flight coalescing, stale-while-revalidate, stale-if-error, forced refreshes,
//! what is (not) stored, collisions; and of the memory and tiered stores underneath.
//!
//! No test sleeps to wait for a TTL: the clock is advanced. Upstream calls are held open on a
//! gate the test controls, so concurrent requests join a flight deterministically.
#![allow(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_core::{
    Cache, CacheBuilder, CacheKey, CachePolicy, CacheRequest, CacheStatus, CacheStore, Entry,
    Fetched, ManualClock, MemoryStore, NormalizeConfig, Normalizer, ServeError, Served,
    TieredStore,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

// === Helpers ===

/// 2023-11-14, far from the real clock: a store that used the real clock would see every entry
/// as long expired.
const T0: i64 = 1_700_000_000_000;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn policy(ttl: u64, swr: u64, sie: u64) -> CachePolicy {
    CachePolicy {
        ttl: secs(ttl),
        stale_while_revalidate: secs(swr),
        stale_if_error: secs(sie),
    }
}

struct Harness {
    clock: Arc<ManualClock>,
    store: MemoryStore,
    cache: Cache<String>,
}

/// Entry number `i` of a memory-store test (its own signature), with a 2xx status, and its key.
fn numbered_entry(
    i: u64,
    headers: Vec<(String, String)>,
    body: Bytes,
    policy: &CachePolicy,
) -> (CacheKey, Entry) {
    let signature = format!("v1\nGET\nup\n/r\ni={i}\n-");
    let entry = Entry::new(
        signature.as_str(),
        "up",
        "/r",
        200,
        headers,
        body,
        0.0,
        policy,
        T0,
    );
    (CacheKey::of(&signature), entry)
}

fn harness() -> Harness {
    harness_with(|b| b)
}

fn harness_with(configure: impl FnOnce(CacheBuilder) -> CacheBuilder) -> Harness {
    let clock = Arc::new(ManualClock::new(T0));
    let store = MemoryStore::with_clock(64 << 20, clock.clone());
    let builder = Cache::<String>::builder(Arc::new(store.clone())).clock(clock.clone());
    Harness {
        clock,
        store,
        cache: configure(builder).build(),
    }
}

fn request(query: &str, policy: CachePolicy) -> CacheRequest {
    let n = Normalizer::new(NormalizeConfig::default()).normalize("up", "GET", "/r", query, None);
    CacheRequest {
        signature: n.signature,
        upstream: "up".into(),
        route: "/r".into(),
        policy,
        cost: 0.25,
        force_refresh: false,
    }
}

fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Result<Fetched, String> {
    Ok(Fetched {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: Bytes::from(body.to_string()),
    })
}

fn ok(body: &str) -> Result<Fetched, String> {
    response(200, &[("content-type", "application/json")], body)
}

type FetchFuture = Pin<Box<dyn Future<Output = Result<Fetched, String>> + Send>>;

/// An upstream double: counts its calls; while its gate is closed, calls wait at the gate.
#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    gate: Arc<watch::Sender<bool>>,
}

impl Upstream {
    fn open() -> Self {
        Upstream {
            calls: Arc::default(),
            gate: Arc::new(watch::Sender::new(true)),
        }
    }

    fn closed() -> Self {
        Upstream {
            calls: Arc::default(),
            gate: Arc::new(watch::Sender::new(false)),
        }
    }

    fn release(&self) {
        self.gate.send_replace(true);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// A fetch that answers `result` once the gate is open.
    fn fetch(
        &self,
        result: Result<Fetched, String>,
    ) -> impl FnOnce() -> FetchFuture + Send + 'static {
        let calls = Arc::clone(&self.calls);
        let mut gate = self.gate.subscribe();
        move || -> FetchFuture {
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|open| *open).await;
                result
            })
        }
    }
}

/// Polls `cond` until it holds (a condition, not a TTL: time here is the manual clock's).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Awaits a spawned task, failing (rather than hanging) if it does not finish.
async fn join<T>(handle: JoinHandle<T>) -> T {
    tokio::time::timeout(secs(30), handle)
        .await
        .expect("task did not finish")
        .expect("task panicked")
}

type Outcome = Result<Served, ServeError<String>>;

fn spawn_serve(
    cache: &Cache<String>,
    req: &CacheRequest,
    fetch: impl FnOnce() -> FetchFuture + Send + 'static,
) -> JoinHandle<Outcome> {
    let (cache, req) = (cache.clone(), req.clone());
    tokio::spawn(async move { cache.serve(req, fetch).await })
}

fn served(outcome: Outcome) -> Served {
    match outcome {
        Ok(s) => s,
        Err(e) => panic!("expected a response, got {e:?}"),
    }
}

fn body(s: &Served) -> &[u8] {
    &s.entry.body
}

fn coalesced(cache: &Cache<String>) -> u64 {
    cache.stats().coalesced.load(Ordering::SeqCst)
}

// === Hits and misses ===

#[tokio::test]
async fn miss_then_hit_fetches_once() {
    let h = harness();
    let up = Upstream::open();
    let req = request("a=1&b=2", policy(60, 0, 0));

    let first = served(h.cache.serve(req.clone(), up.fetch(ok("one"))).await);
    assert_eq!(first.status, CacheStatus::Miss);
    assert!(first.fetched && first.stored && !first.coalesced);
    assert_eq!(body(&first), b"one");

    h.clock.advance(secs(30));
    // The same request with its parameters the other way round.
    let second = served(
        h.cache
            .serve(request("b=2&a=1", policy(60, 0, 0)), up.fetch(ok("two")))
            .await,
    );
    assert_eq!(second.status, CacheStatus::Hit);
    assert!(!second.fetched && !second.coalesced);
    assert_eq!(body(&second), b"one");
    assert_eq!(second.age_secs, 30);
    assert_eq!(up.calls(), 1);

    let fast = h.cache.peek_fresh(&req.signature).expect("fresh in memory");
    assert_eq!((fast.status, body(&fast)), (CacheStatus::Hit, &b"one"[..]));

    // At the TTL (no stale windows) the entry is of no use any more.
    h.clock.advance(secs(30));
    assert!(h.cache.peek_fresh(&req.signature).is_none());
    let third = served(h.cache.serve(req, up.fetch(ok("three"))).await);
    assert_eq!(third.status, CacheStatus::Miss);
    assert!(third.fetched);
    assert_eq!(body(&third), b"three");
    assert_eq!(up.calls(), 2);
}

/// The leader starts the upstream call while the request is first polled, not when the
/// runtime gets round to a new task: under a stampede that runtime has hundreds of requests
/// to parse first.
#[tokio::test(flavor = "current_thread")]
async fn the_upstream_call_starts_on_the_leaders_own_poll() {
    let h = harness();
    let started = Arc::new(AtomicUsize::new(0));
    let (release, gate) = tokio::sync::oneshot::channel::<()>();
    let fetch = {
        let started = Arc::clone(&started);
        move || -> FetchFuture {
            Box::pin(async move {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = gate.await;
                ok("late")
            })
        }
    };
    let mut serving = std::pin::pin!(h.cache.serve(request("q=1", policy(60, 0, 0)), fetch));
    // One poll of the request, and no turn of the scheduler: the call has begun.
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(serving.as_mut().poll(cx))).await;
    assert!(first.is_pending());
    assert_eq!(started.load(Ordering::SeqCst), 1);
    release.send(()).expect("the fetch waits");
    let s = served(serving.await);
    assert_eq!((s.status, body(&s)), (CacheStatus::Miss, &b"late"[..]));
    assert!(s.stored);
    assert_eq!(started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn different_requests_do_not_share_an_entry() {
    let h = harness();
    let up = Upstream::open();
    let a = served(
        h.cache
            .serve(request("a=1", policy(60, 0, 0)), up.fetch(ok("a")))
            .await,
    );
    let b = served(
        h.cache
            .serve(request("a=2", policy(60, 0, 0)), up.fetch(ok("b")))
            .await,
    );
    assert_eq!((body(&a), body(&b)), (&b"a"[..], &b"b"[..]));
    assert!(b.fetched);
    assert_eq!(up.calls(), 2);
}

// === Single flight ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_cold_requests_make_one_fetch() {
    let h = harness();
    let up = Upstream::closed();
    let req = request("cold=1", policy(60, 0, 0));
    let handles: Vec<_> = (0..500)
        .map(|_| spawn_serve(&h.cache, &req, up.fetch(ok("shared"))))
        .collect();
    eventually("499 requests wait on the one fetch", || {
        coalesced(&h.cache) == 499 && up.calls() == 1
    })
    .await;
    assert_eq!(h.cache.in_flight(), 1);

    let released = Instant::now();
    up.release();
    let mut all = Vec::new();
    for handle in handles {
        all.push(served(join(handle).await));
    }
    let elapsed = released.elapsed();
    // Waiters are woken by the leader, not by polling: generous for a loaded machine.
    assert!(elapsed < secs(1), "500 waiters took {elapsed:?} to wake");

    assert_eq!(up.calls(), 1);
    assert!(
        all.iter()
            .all(|s| body(s) == b"shared" && s.status == CacheStatus::Miss)
    );
    assert!(all.iter().all(|s| Arc::ptr_eq(&s.entry, &all[0].entry)));
    assert_eq!(all.iter().filter(|s| s.fetched).count(), 1);
    assert_eq!(all.iter().filter(|s| s.coalesced).count(), 499);
    assert!(all.iter().all(|s| s.fetched != s.coalesced));
    assert!(all.iter().all(|s| s.stored));
    assert_eq!(h.cache.in_flight(), 0);

    let later = served(h.cache.serve(req, up.fetch(ok("later"))).await);
    assert_eq!(
        (later.status, body(&later)),
        (CacheStatus::Hit, &b"shared"[..])
    );
    assert_eq!(up.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_fails_every_waiter_once() {
    let h = harness();
    let up = Upstream::closed();
    let req = request("fail=1", policy(60, 30, 300));
    let handles: Vec<_> = (0..50)
        .map(|_| spawn_serve(&h.cache, &req, up.fetch(Err("boom".into()))))
        .collect();
    eventually("49 requests wait", || coalesced(&h.cache) == 49).await;
    up.release();
    for handle in handles {
        match join(handle).await {
            Err(ServeError::Upstream(e)) => assert_eq!(e, "boom"),
            other => panic!("expected the upstream error, got {other:?}"),
        }
    }
    assert_eq!(up.calls(), 1);
    assert_eq!(h.cache.in_flight(), 0);
    // Nothing was stored: the next request tries again.
    assert!(h.cache.lookup(&req.signature).await.is_none());
    let next = served(h.cache.serve(req, up.fetch(ok("fine"))).await);
    assert_eq!(
        (next.status, body(&next)),
        (CacheStatus::Miss, &b"fine"[..])
    );
    assert_eq!(up.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_beyond_the_bound_are_turned_away() {
    // At most 4 requests wait on one fetch: the one making it and 3 more.
    let h = harness_with(|b| b.max_waiters(4));
    let up = Upstream::closed();
    let req = request("busy=1", policy(60, 0, 0));
    let leader = spawn_serve(&h.cache, &req, up.fetch(ok("x")));
    eventually("the fetch started", || up.calls() == 1).await;
    let others: Vec<_> = (0..9)
        .map(|_| spawn_serve(&h.cache, &req, up.fetch(ok("x"))))
        .collect();
    eventually("6 requests were turned away", || {
        others.iter().filter(|h| h.is_finished()).count() == 6
    })
    .await;
    assert_eq!(coalesced(&h.cache), 3);

    up.release();
    let mut ok_count = 0;
    let mut overloaded = 0;
    for handle in std::iter::once(leader).chain(others) {
        match join(handle).await {
            Ok(s) => {
                assert_eq!(body(&s), b"x");
                ok_count += 1;
            }
            Err(ServeError::Overloaded) => overloaded += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((ok_count, overloaded), (4, 6));
    assert_eq!(up.calls(), 1);
}

/// Turned away because too many wait on the refresh, a request still gets a usable stale
/// entry rather than an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_beyond_the_bound_get_the_stale_entry() {
    let h = harness_with(|b| b.max_waiters(2));
    let req = request("busy-stale=1", policy(10, 0, 600));
    served(
        h.cache
            .serve(req.clone(), Upstream::open().fetch(ok("old")))
            .await,
    );
    h.clock.advance(secs(20)); // past the TTL, inside stale-if-error
    let up = Upstream::closed();
    let leader = spawn_serve(&h.cache, &req, up.fetch(ok("new")));
    eventually("the refresh started", || up.calls() == 1).await;
    let others: Vec<_> = (0..4)
        .map(|_| spawn_serve(&h.cache, &req, up.fetch(ok("new"))))
        .collect();
    eventually("3 requests were turned away", || {
        others.iter().filter(|h| h.is_finished()).count() == 3
    })
    .await;
    let (turned_away, waiting): (Vec<_>, Vec<_>) =
        others.into_iter().partition(|h| h.is_finished());
    for handle in turned_away {
        let s = join(handle).await.expect("a stale answer, not Overloaded");
        assert_eq!((s.status, body(&s)), (CacheStatus::Stale, &b"old"[..]));
    }
    up.release();
    for handle in std::iter::once(leader).chain(waiting) {
        let s = join(handle).await.expect("the refreshed answer");
        assert_eq!(body(&s), b"new");
    }
    assert_eq!(up.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_fetch_aborts_its_waiters_and_frees_the_key() {
    let h = harness();
    let up = Upstream::closed();
    let req = request("panic=1", policy(60, 0, 0));
    let gate = up.clone();
    let leader = spawn_serve(&h.cache, &req, move || -> FetchFuture {
        let fetch = gate.fetch(ok("never"));
        Box::pin(async move {
            let _ = fetch().await;
            panic!("fetch panicked (expected by this test)");
        })
    });
    eventually("the fetch started", || up.calls() == 1).await;
    let waiter = spawn_serve(&h.cache, &req, up.fetch(ok("unused")));
    eventually("one request waits", || coalesced(&h.cache) == 1).await;
    up.release();
    assert!(matches!(join(leader).await, Err(ServeError::Aborted)));
    assert!(matches!(join(waiter).await, Err(ServeError::Aborted)));
    assert_eq!(h.cache.in_flight(), 0);
    let next = served(h.cache.serve(req, up.fetch(ok("next"))).await);
    assert!(next.fetched);
    assert_eq!(body(&next), b"next");
}

// === Stale serving ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let h = harness();
    let first = Upstream::open();
    let req = request("swr=1", policy(10, 30, 0));
    served(h.cache.serve(req.clone(), first.fetch(ok("old"))).await);

    h.clock.advance(secs(15)); // past the TTL, inside the SWR window
    let refresh = Upstream::closed();
    let handles: Vec<_> = (0..50)
        .map(|_| spawn_serve(&h.cache, &req, refresh.fetch(ok("new"))))
        .collect();
    for handle in handles {
        let s = served(join(handle).await);
        assert_eq!(s.status, CacheStatus::Stale);
        assert_eq!(body(&s), b"old");
        assert_eq!(s.age_secs, 15);
        assert!(!s.fetched && !s.coalesced);
    }
    // All 50 were answered while the one refresh is still held open.
    eventually("the refresh started", || refresh.calls() == 1).await;
    assert_eq!(h.cache.in_flight(), 1);
    assert_eq!(h.cache.stats().refreshes.load(Ordering::SeqCst), 1);

    refresh.release();
    eventually("the refresh finished", || h.cache.in_flight() == 0).await;
    assert_eq!(refresh.calls(), 1);

    let never = Upstream::open();
    let after = served(h.cache.serve(req.clone(), never.fetch(ok("unused"))).await);
    assert_eq!(after.status, CacheStatus::Hit);
    assert_eq!(body(&after), b"new");
    assert_eq!(after.entry.stored_at, T0 + 15_000);
    assert_eq!(never.calls(), 0);
}

#[tokio::test]
async fn a_failed_background_refresh_keeps_the_stale_entry() {
    let h = harness();
    let up = Upstream::open();
    let req = request("swr=2", policy(10, 30, 0));
    served(h.cache.serve(req.clone(), up.fetch(ok("old"))).await);
    h.clock.advance(secs(15));
    let s = served(
        h.cache
            .serve(req.clone(), up.fetch(Err("down".into())))
            .await,
    );
    assert_eq!((s.status, body(&s)), (CacheStatus::Stale, &b"old"[..]));
    eventually("the refresh finished", || h.cache.in_flight() == 0).await;
    assert_eq!(up.calls(), 2);
    let entry = h.cache.lookup(&req.signature).await.expect("still stored");
    assert_eq!((&entry.body[..], entry.stored_at), (&b"old"[..], T0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_the_old_entry_and_keeps_it() {
    let h = harness();
    let req = request("sie=1", policy(10, 5, 60));
    served(
        h.cache
            .serve(req.clone(), Upstream::open().fetch(ok("old")))
            .await,
    );
    h.clock.advance(secs(20)); // past TTL + SWR, inside SIE

    let failures = [
        Err("down".to_string()),
        response(500, &[], "oops"),
        response(503, &[("retry-after", "5")], "busy"),
        // An error page with a cookie (load balancers add them) is still an error.
        response(502, &[("set-cookie", "lb=1")], "bad gateway"),
    ];
    for failure in failures {
        let up = Upstream::open();
        let what = format!("{:?}", failure.as_ref().map(|f| f.status));
        let s = served(h.cache.serve(req.clone(), up.fetch(failure)).await);
        assert_eq!(s.status, CacheStatus::Stale, "{what}");
        assert_eq!(body(&s), b"old", "{what}");
        assert_eq!(s.age_secs, 20);
        assert_eq!(up.calls(), 1);
        // The error did not replace the entry.
        let entry = h.cache.lookup(&req.signature).await.expect("still stored");
        assert_eq!(
            (&entry.body[..], entry.status, entry.stored_at),
            (&b"old"[..], 200, T0)
        );
    }

    // Concurrent requests during a failing fetch: one call, every request served stale.
    let up = Upstream::closed();
    let handles: Vec<_> = (0..20)
        .map(|_| spawn_serve(&h.cache, &req, up.fetch(Err("down".into()))))
        .collect();
    eventually("19 requests wait", || coalesced(&h.cache) == 19).await;
    up.release();
    for handle in handles {
        let s = served(join(handle).await);
        assert_eq!((s.status, body(&s)), (CacheStatus::Stale, &b"old"[..]));
    }
    assert_eq!(up.calls(), 1);

    // The leader's answer is private, so its waiter fetches for itself, and that fails.
    let up = Upstream::closed();
    let leader = spawn_serve(
        &h.cache,
        &req,
        up.fetch(response(200, &[("set-cookie", "s=1")], "mine")),
    );
    eventually("the leader's fetch started", || up.calls() == 1).await;
    let waiter = spawn_serve(&h.cache, &req, up.fetch(Err("down".into())));
    eventually("the waiter joined", || coalesced(&h.cache) == 20).await;
    up.release();
    let s = served(join(leader).await);
    assert_eq!(
        (s.status, body(&s), s.stored),
        (CacheStatus::Miss, &b"mine"[..], false)
    );
    let s = served(join(waiter).await);
    assert_eq!((s.status, body(&s)), (CacheStatus::Stale, &b"old"[..]));
    assert_eq!(up.calls(), 2);
    let entry = h.cache.lookup(&req.signature).await.expect("still stored");
    assert_eq!(&entry.body[..], b"old");

    // A non-error answer is served even though a stale copy exists.
    let up = Upstream::open();
    let s = served(
        h.cache
            .serve(req.clone(), up.fetch(response(404, &[], "gone")))
            .await,
    );
    assert_eq!(
        (s.status, s.entry.status, body(&s)),
        (CacheStatus::Miss, 404, &b"gone"[..])
    );

    // Past the stale-if-error window the error surfaces.
    h.clock.set(T0 + 70_000);
    let up = Upstream::open();
    match h
        .cache
        .serve(req.clone(), up.fetch(Err("down".into())))
        .await
    {
        Err(ServeError::Upstream(e)) => assert_eq!(e, "down"),
        other => panic!("expected the upstream error, got {other:?}"),
    }
    let s = served(
        h.cache
            .serve(req.clone(), up.fetch(response(500, &[], "oops")))
            .await,
    );
    assert_eq!(
        (s.status, s.entry.status, s.stored),
        (CacheStatus::Miss, 500, false)
    );
    assert_eq!(body(&s), b"oops");
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn force_refresh_replaces_a_fresh_entry() {
    let h = harness();
    let up = Upstream::open();
    let req = request("nc=1", policy(60, 0, 0));
    served(h.cache.serve(req.clone(), up.fetch(ok("v1"))).await);
    h.clock.advance(secs(5));

    let forced = CacheRequest {
        force_refresh: true,
        ..req.clone()
    };
    let s = served(h.cache.serve(forced.clone(), up.fetch(ok("v2"))).await);
    assert_eq!(s.status, CacheStatus::Miss);
    assert!(s.fetched && s.stored);
    assert_eq!(body(&s), b"v2");
    assert_eq!(up.calls(), 2);
    let entry = h.cache.lookup(&req.signature).await.expect("stored");
    assert_eq!((&entry.body[..], entry.stored_at), (&b"v2"[..], T0 + 5_000));

    let hit = served(h.cache.serve(req.clone(), up.fetch(ok("v3"))).await);
    assert_eq!((hit.status, body(&hit)), (CacheStatus::Hit, &b"v2"[..]));
    assert_eq!(up.calls(), 2);

    // A forced refresh that fails still answers with the entry it could not replace.
    let s = served(h.cache.serve(forced, up.fetch(Err("down".into()))).await);
    assert_eq!(body(&s), b"v2");
    // It made the (failed) call, and the entry it fell back on is still fresh.
    assert!(s.fetched);
    assert_eq!(s.status, CacheStatus::Hit);
    assert_eq!(up.calls(), 3);
    let entry = h.cache.lookup(&req.signature).await.expect("stored");
    assert_eq!(&entry.body[..], b"v2");
}

// === What is stored ===

#[tokio::test]
async fn non_cacheable_responses_are_not_stored() {
    let cases: [(u16, &[(&str, &str)]); 7] = [
        (404, &[]),
        (500, &[]),
        (200, &[("Set-Cookie", "session=abc")]),
        (200, &[("Cache-Control", "no-store")]),
        (200, &[("Cache-Control", "private")]),
        (200, &[("cache-control", "max-age=60, Private")]),
        (200, &[("cache-control", "private=\"x-user\", max-age=60")]),
    ];
    for (status, headers) in cases {
        let what = format!("{status} {headers:?}");
        let h = harness();
        let up = Upstream::open();
        let req = request("n=1", policy(60, 30, 300));
        let first = served(
            h.cache
                .serve(req.clone(), up.fetch(response(status, headers, "a")))
                .await,
        );
        assert_eq!(
            (first.status, first.entry.status),
            (CacheStatus::Miss, status),
            "{what}"
        );
        assert!(first.fetched && !first.stored, "{what}");
        assert!(h.cache.lookup(&req.signature).await.is_none(), "{what}");
        let second = served(
            h.cache
                .serve(req, up.fetch(response(status, headers, "b")))
                .await,
        );
        assert_eq!(body(&second), b"b", "{what}");
        assert_eq!(up.calls(), 2, "{what}");
        assert_eq!(h.store.usage().await.expect("usage").entries, 0, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_response_is_not_shared_with_waiters() {
    let h = harness();
    let up = Upstream::closed();
    let req = request("me=1", policy(60, 0, 0));
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let cookie = format!("session={i}");
            let fetch = up.fetch(response(
                200,
                &[("set-cookie", cookie.as_str()), ("connection", "close")],
                &format!("client-{i}"),
            ));
            spawn_serve(&h.cache, &req, fetch)
        })
        .collect();
    eventually("19 requests wait", || coalesced(&h.cache) == 19).await;
    up.release();
    for (i, handle) in handles.into_iter().enumerate() {
        let s = served(join(handle).await);
        assert_eq!(
            body(&s),
            format!("client-{i}").as_bytes(),
            "request {i} got another's body"
        );
        assert_eq!(s.status, CacheStatus::Miss);
        assert!(s.fetched && !s.stored);
        // Its own cookie goes back to its own client; hop-by-hop headers do not.
        assert_eq!(
            s.entry.headers,
            vec![("set-cookie".to_string(), format!("session={i}"))]
        );
    }
    assert_eq!(up.calls(), 20);
    assert!(h.cache.lookup(&req.signature).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_uncacheable_response_is_fetched_once() {
    let h = harness();
    let up = Upstream::closed();
    let req = request("missing=1", policy(60, 0, 0));
    let handles: Vec<_> = (0..20)
        .map(|_| spawn_serve(&h.cache, &req, up.fetch(response(404, &[], "not found"))))
        .collect();
    eventually("19 requests wait", || coalesced(&h.cache) == 19).await;
    up.release();
    for handle in handles {
        let s = served(join(handle).await);
        assert_eq!((s.entry.status, s.stored), (404, false));
    }
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn stored_entries_keep_only_replayable_headers() {
    let h = harness();
    let up = Upstream::open();
    let req = request("h=1", policy(60, 0, 0));
    let headers = [
        ("Content-Type", "application/json"),
        ("ETag", "\"v1\""),
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "2"),
        ("Date", "Tue, 14 Nov 2023 22:13:20 GMT"),
        ("Age", "3"),
        ("Server", "upstream/1.0"),
        ("Via", "1.1 proxy"),
        ("Alt-Svc", "h3=\":443\""),
        ("X-Cache", "HIT"),
        ("X-Upstream-Cost", "0.2"),
        ("Retry-After", "1"),
        ("X-RateLimit-Remaining", "99"),
        ("RateLimit-Limit", "100"),
        ("X-Rate-Limit-Reset", "60"),
        ("Cache-Control", "public, max-age=60"),
        ("Last-Modified", "Tue, 14 Nov 2023 22:00:00 GMT"),
        ("X-Request-Id", "r-1"),
    ];
    let s = served(
        h.cache
            .serve(req.clone(), up.fetch(response(200, &headers, "{}")))
            .await,
    );
    let kept: Vec<(String, String)> = [
        ("Content-Type", "application/json"),
        ("ETag", "\"v1\""),
        ("Cache-Control", "public, max-age=60"),
        ("Last-Modified", "Tue, 14 Nov 2023 22:00:00 GMT"),
        ("X-Request-Id", "r-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert!(s.stored);
    assert_eq!(s.entry.headers, kept);
    let entry = h.cache.lookup(&req.signature).await.expect("stored");
    assert_eq!(entry.headers, kept);
}

#[tokio::test]
async fn header_names_that_are_not_ascii_do_not_panic() {
    let h = harness();
    let up = Upstream::open();
    let req = request("h=2", policy(60, 0, 0));
    let headers = [
        ("ratelimit\u{e9}x", "1"),
        ("x-ratelimit\u{e9}", "1"),
        ("cache-control", "abcdefg\u{e9}, max-age=5"),
        ("cache-control", "privat\u{e9}"),
    ];
    let s = served(
        h.cache
            .serve(req, up.fetch(response(200, &headers, "{}")))
            .await,
    );
    assert!(s.stored);
    assert_eq!(s.entry.headers.len(), 4);
}

// === Collisions ===

#[tokio::test]
async fn a_colliding_entry_is_a_miss_and_is_counted() {
    let h = harness();
    let req = request("c=1", policy(60, 0, 0));
    let key = req.signature.key();
    let impostor = Entry::new(
        "v1\nGET\nup\n/r\nc=2\n-",
        "up",
        "/r",
        200,
        vec![],
        Bytes::from_static(b"wrong body"),
        0.25,
        &policy(60, 0, 0),
        T0,
    );
    h.store.put(key, Arc::new(impostor)).await.expect("put");

    assert!(h.cache.lookup(&req.signature).await.is_none());
    assert_eq!(h.cache.stats().collisions.load(Ordering::SeqCst), 1);
    assert!(h.cache.peek_fresh(&req.signature).is_none());

    let up = Upstream::open();
    let s = served(h.cache.serve(req.clone(), up.fetch(ok("right body"))).await);
    assert_eq!(s.status, CacheStatus::Miss);
    assert!(s.fetched);
    assert_eq!(body(&s), b"right body");
    assert_eq!(up.calls(), 1);
    assert!(h.cache.stats().collisions.load(Ordering::SeqCst) >= 2);
    let entry = h.cache.lookup(&req.signature).await.expect("stored");
    assert_eq!(entry.signature, req.signature.as_str());
}

// === Memory store ===

#[tokio::test]
async fn memory_store_stays_within_its_byte_bound() {
    let clock = Arc::new(ManualClock::new(T0));
    let max_bytes: u64 = 1 << 20;
    let store = MemoryStore::with_clock(max_bytes, clock);
    let payload = Bytes::from(vec![b'x'; 1024]);
    let mut inserted = 0u64;
    let mut i = 0u64;
    while inserted < 10 * max_bytes {
        let (key, e) = numbered_entry(i, vec![], payload.clone(), &policy(3600, 0, 0));
        inserted += e.weight() as u64;
        store.put(key, Arc::new(e)).await.expect("put");
        i += 1;
    }
    let usage = store.usage().await.expect("usage");
    assert!(
        usage.bytes <= max_bytes + max_bytes / 10,
        "{} bytes held, cap {max_bytes} (after inserting {inserted})",
        usage.bytes
    );
    assert!(usage.entries > 0 && usage.entries < i, "{usage:?}");
    assert!(usage.bytes > 0);
}

#[tokio::test]
async fn a_store_counting_prepared_counts_the_embedders_bytes_too() {
    // What an embedder says it keeps per entry, whatever the entry.
    fn prepared(_: &Entry) -> usize {
        10_000
    }
    let plain = MemoryStore::new(1 << 20);
    let counting = MemoryStore::counting_prepared(1 << 20, prepared);
    let mut weight = 0;
    for i in 0..50 {
        let (key, e) = numbered_entry(
            i,
            vec![("content-type".into(), "application/json".into())],
            Bytes::from(vec![b'x'; 600]),
            &CachePolicy::default(),
        );
        let e = Arc::new(e);
        weight += e.weight() as u64;
        for store in [&plain, &counting] {
            store.put(key, Arc::clone(&e)).await.expect("put");
        }
    }
    let plain = plain.usage().await.expect("usage");
    let counting = counting.usage().await.expect("usage");
    assert_eq!((plain.entries, plain.bytes), (50, weight));
    assert_eq!(
        (counting.entries, counting.bytes),
        (50, weight + 50 * 10_000)
    );

    // The cap bounds both together: 1 MiB holds about 1 MiB / (weight + 10,000) entries.
    let capped = MemoryStore::counting_prepared(1 << 20, prepared);
    for i in 0..1_000 {
        let (key, e) = numbered_entry(
            i,
            vec![],
            Bytes::from(vec![b'x'; 600]),
            &CachePolicy::default(),
        );
        capped.put(key, Arc::new(e)).await.expect("put");
    }
    let usage = capped.usage().await.expect("usage");
    assert!(usage.bytes <= (1 << 20) + (1 << 20) / 10, "{usage:?}");
    assert!(usage.entries <= 110, "{usage:?}");
}

#[tokio::test]
async fn memory_store_expires_by_the_injected_clock() {
    let clock = Arc::new(ManualClock::new(T0));
    let store = MemoryStore::with_clock(1 << 20, clock.clone());
    let (key, e) = tiny_entry("sig", &policy(10, 5, 20));
    assert_eq!(e.expires_at(), T0 + 30_000);
    store.put(key, Arc::clone(&e)).await.expect("put");
    // T0 is years before the real clock: still here, so the store goes by the injected clock.
    assert!(store.get(&key).await.expect("get").is_some());

    clock.advance(Duration::from_millis(29_999));
    assert!(store.get(&key).await.expect("get").is_some());
    assert!(store.peek(&key).is_some());

    clock.advance(Duration::from_millis(1));
    assert!(store.get(&key).await.expect("get").is_none());
    assert!(store.peek(&key).is_none());
    assert!(store.get_sync(&key).is_none());

    // An entry already past its horizon is not returned either.
    store.put(key, e).await.expect("put");
    assert!(store.get(&key).await.expect("get").is_none());
}

// === Tiered store ===

fn entry(signature: &str, body: &'static [u8]) -> Entry {
    Entry::new(
        signature,
        "up",
        "/r",
        200,
        vec![("content-type".into(), "text/plain".into())],
        Bytes::from_static(body),
        0.1,
        &policy(60, 0, 0),
        T0,
    )
}

#[tokio::test]
async fn tiered_store_writes_behind_to_l2_and_promotes_on_read() {
    let clock = Arc::new(ManualClock::new(T0));
    let l2 = Arc::new(MemoryStore::with_clock(8 << 20, clock.clone()));
    let warm = TieredStore::new(
        MemoryStore::with_clock(8 << 20, clock.clone()),
        l2.clone(),
        4,
    );
    let key = CacheKey::of("sig-a");
    let e = entry("sig-a", b"body-a");
    warm.put(key, Arc::new(e.clone())).await.expect("put");
    assert_eq!(warm.peek(&key).as_deref(), Some(&e), "in L1 at once");
    warm.flush().await.expect("flush");
    assert_eq!(l2.get(&key).await.expect("l2 get").as_deref(), Some(&e));

    // A new process: empty L1 over the same L2.
    let cold = TieredStore::new(
        MemoryStore::with_clock(8 << 20, clock.clone()),
        l2.clone(),
        4,
    );
    assert!(cold.peek(&key).is_none());
    assert_eq!(cold.get(&key).await.expect("get").as_deref(), Some(&e));
    assert_eq!(cold.stats().l2_hits.load(Ordering::SeqCst), 1);
    assert_eq!(cold.stats().l1_hits.load(Ordering::SeqCst), 0);
    assert_eq!(cold.l1().get_sync(&key).as_deref(), Some(&e), "promoted");
    assert_eq!(cold.get(&key).await.expect("get").as_deref(), Some(&e));
    assert_eq!(cold.stats().l1_hits.load(Ordering::SeqCst), 1);
    assert_eq!(cold.stats().l2_hits.load(Ordering::SeqCst), 1);

    // Removing through one tier set removes from both.
    assert!(cold.remove(&key).await.expect("remove"));
    assert!(l2.get(&key).await.expect("l2 get").is_none());
    assert!(cold.get(&key).await.expect("get").is_none());
}

#[tokio::test]
async fn a_cache_over_a_cold_tiered_store_hits_l2() {
    let clock = Arc::new(ManualClock::new(T0));
    let l2 = Arc::new(MemoryStore::with_clock(8 << 20, clock.clone()));
    let req = request("t=1", policy(60, 0, 0));
    {
        let warm = Arc::new(TieredStore::new(
            MemoryStore::with_clock(8 << 20, clock.clone()),
            l2.clone(),
            4,
        ));
        let cache = Cache::<String>::builder(warm.clone())
            .clock(clock.clone())
            .build();
        let up = Upstream::open();
        served(
            cache
                .serve(req.clone(), up.fetch(ok("from upstream")))
                .await,
        );
        warm.flush().await.expect("flush");
    }
    let cold = Arc::new(TieredStore::new(
        MemoryStore::with_clock(8 << 20, clock.clone()),
        l2,
        4,
    ));
    let cache = Cache::<String>::builder(cold.clone())
        .clock(clock.clone())
        .build();
    clock.advance(secs(2));
    let up = Upstream::open();
    let s = served(cache.serve(req, up.fetch(ok("unused"))).await);
    assert_eq!(
        (s.status, body(&s), s.age_secs),
        (CacheStatus::Hit, &b"from upstream"[..], 2)
    );
    assert_eq!(up.calls(), 0);
    assert_eq!(cold.stats().l2_hits.load(Ordering::SeqCst), 1);
}

/// A real memory store that counts the lookups and the write batches reaching it.
/// `hold_next_get`: the next lookup reads the store, then waits for that channel before it
/// answers (what it read).
struct CountingStore {
    inner: MemoryStore,
    gets: AtomicUsize,
    batches: AtomicUsize,
    hold_next_get: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

#[async_trait::async_trait]
impl CacheStore for CountingStore {
    fn name(&self) -> &'static str {
        "counting"
    }
    async fn get(&self, key: &CacheKey) -> cache_core::Result<Option<Arc<Entry>>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let found = self.inner.get(key).await;
        let hold = self.hold_next_get.lock().expect("lock").take();
        if let Some(hold) = hold {
            let _ = hold.await;
        }
        found
    }
    async fn put(&self, key: CacheKey, entry: Arc<Entry>) -> cache_core::Result<()> {
        self.inner.put(key, entry).await
    }
    async fn put_many(&self, entries: &[(CacheKey, Arc<Entry>)]) -> cache_core::Result<()> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.inner.put_many(entries).await
    }
    async fn remove(&self, key: &CacheKey) -> cache_core::Result<bool> {
        self.inner.remove(key).await
    }
    async fn purge(&self, filter: &cache_core::PurgeFilter) -> cache_core::Result<u64> {
        self.inner.purge(filter).await
    }
    async fn sweep_expired(&self, now: i64, max: usize) -> cache_core::Result<u64> {
        self.inner.sweep_expired(now, max).await
    }
    async fn usage(&self) -> cache_core::Result<cache_core::StoreUsage> {
        self.inner.usage().await
    }
}

fn counted_tiers(clock: &Arc<ManualClock>) -> (Arc<CountingStore>, Arc<TieredStore>) {
    let l2 = Arc::new(CountingStore {
        inner: MemoryStore::with_clock(8 << 20, clock.clone()),
        gets: AtomicUsize::new(0),
        batches: AtomicUsize::new(0),
        hold_next_get: std::sync::Mutex::new(None),
    });
    let tiers = Arc::new(TieredStore::new(
        MemoryStore::with_clock(8 << 20, clock.clone()),
        l2.clone(),
        4,
    ));
    (l2, tiers)
}

/// A small entry for `signature` stored at `T0` under `policy`, and its key.
fn tiny_entry(signature: &str, policy: &CachePolicy) -> (CacheKey, Arc<Entry>) {
    let e = Entry::new(
        signature,
        "up",
        "/r",
        200,
        vec![],
        Bytes::from_static(b"x"),
        0.0,
        policy,
        T0,
    );
    (CacheKey::of(signature), Arc::new(e))
}

/// Writes `n` entries into `tiers`, `gap` apart (tokio time), then waits out the writer's
/// linger; how many batches reached L2 and how many entries it holds.
async fn trickle(tiers: &TieredStore, l2: &CountingStore, n: usize, gap: Duration) -> (usize, u64) {
    for i in 0..n {
        let (k, e) = tiny_entry(&format!("GET up /trickle/{i}"), &CachePolicy::default());
        tiers.put(k, e).await.expect("put");
        tokio::time::sleep(gap).await;
    }
    tokio::time::sleep(cache_core::DEFAULT_WRITE_LINGER * 2).await;
    let held = l2.usage().await.expect("usage").entries;
    (l2.batches.load(Ordering::SeqCst), held)
}

#[tokio::test(start_paused = true)]
async fn the_l2_writer_commits_a_trickle_of_writes_together() {
    let clock = Arc::new(ManualClock::new(T0));
    // Five writes 2 ms apart, all within the default linger of the first: one batch.
    let (l2, tiers) = counted_tiers(&clock);
    assert_eq!(
        trickle(&tiers, &l2, 5, Duration::from_millis(2)).await,
        (1, 5)
    );
    // Without a linger each write that finds the writer idle is a batch of its own.
    let (l2, tiers) = counted_tiers(&clock);
    let tiers = Arc::into_inner(tiers)
        .expect("one owner")
        .with_write_linger(Duration::ZERO);
    assert_eq!(
        trickle(&tiers, &l2, 5, Duration::from_millis(2)).await,
        (5, 5)
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_does_not_wait_for_the_linger() {
    let clock = Arc::new(ManualClock::new(T0));
    let l2 = Arc::new(CountingStore {
        inner: MemoryStore::with_clock(8 << 20, clock.clone()),
        gets: AtomicUsize::new(0),
        batches: AtomicUsize::new(0),
        hold_next_get: std::sync::Mutex::new(None),
    });
    let tiers = TieredStore::new(
        MemoryStore::with_clock(8 << 20, clock.clone()),
        l2.clone(),
        1024,
    )
    .with_write_linger(Duration::from_secs(60));
    let started = tokio::time::Instant::now();
    // The first write starts the linger; 64 more queue behind it, a full batch.
    for i in 0..65 {
        let (k, e) = tiny_entry(&format!("GET up /batch/{i}"), &CachePolicy::default());
        tiers.put(k, e).await.expect("put");
        if i == 0 {
            tokio::task::yield_now().await;
        }
    }
    while l2.usage().await.expect("usage").entries < 64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "written after {:?}",
        started.elapsed()
    );
    assert_eq!(l2.batches.load(Ordering::SeqCst), 1, "one batch of 64");
    // The 65th waits for company (or the linger's end).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(l2.usage().await.expect("usage").entries, 64);
}

#[tokio::test(start_paused = true)]
async fn a_flush_does_not_wait_for_the_linger() {
    let clock = Arc::new(ManualClock::new(T0));
    let (l2, tiers) = counted_tiers(&clock);
    let tiers = Arc::into_inner(tiers)
        .expect("one owner")
        .with_write_linger(Duration::from_secs(60));
    let (k, e) = tiny_entry("GET up /flushed", &CachePolicy::default());
    tiers.put(k, e).await.expect("put");
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    tiers.flush().await.expect("flush");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        l2.usage().await.expect("usage").entries,
        1,
        "written by the flush"
    );
    assert_eq!(l2.batches.load(Ordering::SeqCst), 1);
}

/// A cache over [`counted_tiers`] whose L2 alone holds an answer to `req` (`stored`, stored at
/// `T0`).
async fn cache_with_an_entry_only_l2_holds(
    req: &CacheRequest,
) -> (Arc<ManualClock>, Arc<CountingStore>, Cache<String>) {
    let clock = Arc::new(ManualClock::new(T0));
    let (l2, tiers) = counted_tiers(&clock);
    let cache = Cache::<String>::builder(tiers).clock(clock.clone()).build();
    let stored = Entry::new(
        req.signature.as_str(),
        "up",
        "/r",
        200,
        vec![],
        Bytes::from_static(b"stored"),
        0.25,
        &req.policy,
        T0,
    );
    l2.put(req.signature.key(), Arc::new(stored))
        .await
        .expect("put");
    (clock, l2, cache)
}

/// `1 + waiters` requests for `req` at once: the first leads, its L2 lookup held until the
/// returned sender fires (or is dropped); the others wait on it when this returns (none of
/// them counted as coalesced before). Every fetch answers `ok(answer)` through `up`.
async fn burst_on_a_held_lookup(
    cache: &Cache<String>,
    l2: &CountingStore,
    req: &CacheRequest,
    up: &Upstream,
    answer: &str,
    waiters: usize,
) -> (tokio::sync::oneshot::Sender<()>, Vec<JoinHandle<Outcome>>) {
    let (release, held) = tokio::sync::oneshot::channel();
    *l2.hold_next_get.lock().expect("lock") = Some(held);
    let mut handles = vec![spawn_serve(cache, req, up.fetch(ok(answer)))];
    eventually("the leader's lookup is held", || {
        l2.hold_next_get.lock().expect("lock").is_none()
    })
    .await;
    handles.extend((0..waiters).map(|_| spawn_serve(cache, req, up.fetch(ok(answer)))));
    eventually("the others wait", || coalesced(cache) == waiters as u64).await;
    (release, handles)
}

/// A stampede on a cold key: the requests that find a fetch running join it on what L1 holds,
/// instead of each asking L2 for the entry being fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_a_running_fetch_do_not_query_l2() {
    let clock = Arc::new(ManualClock::new(T0));
    let (l2, tiers) = counted_tiers(&clock);
    let cache = Cache::<String>::builder(tiers).clock(clock.clone()).build();
    let req = request("stampede=1", policy(60, 0, 0));
    let up = Upstream::closed();
    let leader = spawn_serve(&cache, &req, up.fetch(ok("x")));
    eventually("the fetch started", || up.calls() == 1).await;
    let before = l2.gets.load(Ordering::SeqCst);
    assert!(before >= 1, "the leader looked in L2");
    let waiters: Vec<_> = (0..20)
        .map(|_| spawn_serve(&cache, &req, up.fetch(ok("x"))))
        .collect();
    eventually("20 requests wait", || coalesced(&cache) == 20).await;
    assert_eq!(l2.gets.load(Ordering::SeqCst), before, "a waiter asked L2");
    up.release();
    for handle in std::iter::once(leader).chain(waiters) {
        assert_eq!(body(&served(join(handle).await)), b"x");
    }
    assert_eq!(up.calls(), 1);
}

/// A miss asks L2 once, and a burst of misses for one cold key asks it once too: the requests
/// join the key's flight before L2 is asked, and only its leader asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_asks_l2_once_and_a_burst_only_through_its_leader() {
    let clock = Arc::new(ManualClock::new(T0));
    let (l2, tiers) = counted_tiers(&clock);
    let cache = Cache::<String>::builder(tiers).clock(clock.clone()).build();
    let up = Upstream::open();
    for i in 0..5 {
        let req = request(&format!("miss={i}"), policy(60, 0, 0));
        let before = l2.gets.load(Ordering::SeqCst);
        let s = served(cache.serve(req, up.fetch(ok("x"))).await);
        assert_eq!(s.status, CacheStatus::Miss);
        assert_eq!(l2.gets.load(Ordering::SeqCst) - before, 1, "miss {i}");
    }
    assert_eq!(up.calls(), 5);

    // The leader's lookup is held: 20 more requests arrive meanwhile and wait for it.
    let req = request("burst=1", policy(60, 0, 0));
    let before = l2.gets.load(Ordering::SeqCst);
    let (release, requests) = burst_on_a_held_lookup(&cache, &l2, &req, &up, "burst", 20).await;
    assert_eq!(
        l2.gets.load(Ordering::SeqCst) - before,
        1,
        "only the leader asks L2"
    );
    assert_eq!(up.calls(), 5, "the fetch waits for the lookup");
    let _ = release.send(());
    for handle in requests {
        let s = served(join(handle).await);
        assert_eq!((s.status, body(&s)), (CacheStatus::Miss, &b"burst"[..]));
    }
    assert_eq!(up.calls(), 6);
    assert_eq!(l2.gets.load(Ordering::SeqCst) - before, 1);
}

/// A burst for an entry only L2 holds (L1 lost it, or the process restarted): the leader finds
/// it and answers every waiter with it, fresh as a hit, stale (within its revalidate window)
/// as stale with one refresh; no waiter asks L2 and none is reported as coalesced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_an_entry_only_l2_holds_is_answered_by_the_leaders_lookup() {
    for (stale, status) in [(false, CacheStatus::Hit), (true, CacheStatus::Stale)] {
        let req = request("in-l2=1", policy(10, 600, 0));
        let (clock, l2, cache) = cache_with_an_entry_only_l2_holds(&req).await;
        if stale {
            clock.advance(secs(20)); // past the TTL, inside stale-while-revalidate
        }
        let up = Upstream::open();
        let (release, requests) =
            burst_on_a_held_lookup(&cache, &l2, &req, &up, "fetched", 10).await;
        let _ = release.send(());
        for handle in requests {
            let s = served(join(handle).await);
            assert_eq!(
                (s.status, body(&s)),
                (status, &b"stored"[..]),
                "stale {stale}"
            );
            assert!(!s.fetched && !s.coalesced, "stale {stale}");
        }
        assert_eq!(l2.gets.load(Ordering::SeqCst), 1, "stale {stale}");
        let refreshes = usize::from(stale);
        eventually("the refresh ran", || up.calls() == refreshes).await;
        eventually("no flight left", || cache.in_flight() == 0).await;
        assert_eq!(up.calls(), refreshes, "stale {stale}");
    }
}

/// A `no-cache` request that joined a flight which only found the entry stored is not answered
/// with that entry: it goes on to fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_joined_a_lookup_still_fetches() {
    let req = request("refresh-joins=1", policy(60, 0, 0));
    let (_clock, l2, cache) = cache_with_an_entry_only_l2_holds(&req).await;
    let up = Upstream::open();
    let (release, mut requests) = burst_on_a_held_lookup(&cache, &l2, &req, &up, "x", 0).await;
    let refresh = CacheRequest {
        force_refresh: true,
        ..req.clone()
    };
    requests.push(spawn_serve(&cache, &refresh, up.fetch(ok("fresh"))));
    eventually("the refresh waits", || coalesced(&cache) == 1).await;
    let _ = release.send(());
    let mut answers = Vec::new();
    for handle in requests {
        let s = served(join(handle).await);
        answers.push((s.status, s.fetched, body(&s).to_vec()));
    }
    assert_eq!(
        answers,
        [
            (CacheStatus::Hit, false, b"stored".to_vec()),
            (CacheStatus::Miss, true, b"fresh".to_vec()),
        ]
    );
    assert_eq!(up.calls(), 1);
}

/// The waiters that skipped L2 still get the stale entry only L2 holds when the fetch fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_a_failed_fetch_get_the_stale_entry_from_l2() {
    let clock = Arc::new(ManualClock::new(T0));
    let (l2, tiers) = counted_tiers(&clock);
    let cache = Cache::<String>::builder(tiers.clone())
        .clock(clock.clone())
        .build();
    let req = request("stale-in-l2=1", policy(10, 0, 600));
    let key = req.signature.key();
    let mut old = Entry::new(
        req.signature.as_str(),
        "up",
        "/r",
        200,
        vec![],
        Bytes::from_static(b"old"),
        0.25,
        &req.policy,
        T0,
    );
    old.headers
        .push(("content-type".into(), "text/plain".into()));
    l2.put(key, Arc::new(old)).await.expect("put");
    clock.advance(secs(20)); // past the TTL, inside stale-if-error

    let up = Upstream::closed();
    let leader = spawn_serve(&cache, &req, up.fetch(Err("down".into())));
    eventually("the refresh started", || up.calls() == 1).await;
    // L1 lost its copy (evicted) while the refresh runs.
    tiers.l1().remove(&key).await.expect("remove");
    let waiters: Vec<_> = (0..5)
        .map(|_| spawn_serve(&cache, &req, up.fetch(Err("down".into()))))
        .collect();
    eventually("5 requests wait", || coalesced(&cache) == 5).await;
    up.release();
    for handle in std::iter::once(leader).chain(waiters) {
        let s = served(join(handle).await);
        assert_eq!((s.status, body(&s)), (CacheStatus::Stale, &b"old"[..]));
    }
    assert_eq!(up.calls(), 1);
}
