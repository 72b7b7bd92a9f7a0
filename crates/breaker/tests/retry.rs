//! The retry policy (pure decisions, property-tested) and the async `retry` driver, with a
//! manual clock that the injected sleep function advances (no test sleeps).

use std::cell::{Cell, RefCell};
use std::future::{Future, ready};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use breaker::{
    BudgetConfig, Decision, Idempotence, ManualClock, Outcome, Retried, RetryBudget, RetryPolicy,
    Stop, parse_retry_after, retry,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const GET: Idempotence = Idempotence::Idempotent;

/// A scripted upstream: each attempt answers the next status (the last one repeats),
/// optionally with a `Retry-After` header, and takes `latency` of clock time.
struct Upstream {
    clock: Arc<ManualClock>,
    script: Vec<(u16, Option<&'static str>)>,
    latency: Duration,
    calls: Cell<u32>,
    sleeps: RefCell<Vec<Duration>>,
}

/// What an attempt returned: a status and its `Retry-After` header, if any.
type Answer = (u16, Option<&'static str>);

impl Upstream {
    fn new(clock: &Arc<ManualClock>, script: &[(u16, Option<&'static str>)]) -> Self {
        Self {
            clock: Arc::clone(clock),
            script: script.to_vec(),
            latency: Duration::ZERO,
            calls: Cell::new(0),
            sleeps: RefCell::new(Vec::new()),
        }
    }

    fn call(&self, attempt: u32) -> impl Future<Output = Result<Answer, ()>> + use<> {
        assert_eq!(
            attempt,
            self.calls.get() + 1,
            "attempts are numbered from 1"
        );
        self.calls.set(attempt);
        self.clock.advance(self.latency);
        let index = (attempt as usize - 1).min(self.script.len() - 1);
        ready(Ok(self.script[index]))
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + use<> {
        self.sleeps.borrow_mut().push(d);
        self.clock.advance(d);
        ready(())
    }

    async fn run(
        &self,
        policy: &RetryPolicy,
        budget: &RetryBudget,
        idempotence: Idempotence,
    ) -> Retried<Answer, ()> {
        // `Retry-After` dates are relative to this wall-clock instant.
        let now = SystemTime::UNIX_EPOCH + secs(1_445_412_470); // 2015-10-21 07:27:50 GMT
        retry(
            policy,
            budget,
            idempotence,
            |d| self.sleep(d),
            |result: &Result<Answer, ()>| match result {
                Ok((status, header)) => Outcome::from_status(
                    *status,
                    header.and_then(|value| parse_retry_after(value, now)),
                ),
                Err(()) => Outcome::failure(true),
            },
            |attempt| self.call(attempt),
        )
        .await
    }
}

fn generous_budget(clock: &Arc<ManualClock>) -> RetryBudget {
    RetryBudget::with_clock(
        BudgetConfig {
            min_per_sec: 100,
            ..BudgetConfig::default()
        },
        clock.clone(),
    )
    .expect("valid budget")
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base: ms(100),
        max: ms(1000),
        deadline: secs(30),
    }
}

proptest! {
    #[test]
    fn full_jitter_stays_within_the_capped_exponential_ceiling(
        base_ms in 0u64..10_000,
        extra_ms in 0u64..100_000,
        retry in 0u32..80,
        seed in any::<u64>(),
    ) {
        let policy = RetryPolicy { base: ms(base_ms), max: ms(base_ms + extra_ms), ..RetryPolicy::default() };
        let ceiling = policy.backoff_ceiling(retry);
        let exponential = 2u128.checked_pow(retry).map(|factor| ms(base_ms).as_nanos() * factor);
        let expected = match exponential {
            Some(nanos) if nanos < policy.max.as_nanos() => Duration::from_nanos(nanos as u64),
            _ => policy.max,
        };
        prop_assert_eq!(ceiling, expected);
        let mut rng = SmallRng::seed_from_u64(seed);
        let delay = policy.backoff(retry, &mut rng);
        prop_assert!(delay <= ceiling, "{:?} > {:?}", delay, ceiling);
    }

    #[test]
    fn decided_waits_respect_jitter_retry_after_and_deadline(
        attempts in 1u32..10,
        retry_after_ms in proptest::option::of(0u64..40_000),
        elapsed_ms in 0u64..40_000,
        seed in any::<u64>(),
    ) {
        let policy = RetryPolicy { max_attempts: 10, ..policy() };
        let outcome = Outcome::RetryableFailure { retry_after: retry_after_ms.map(ms) };
        let elapsed = ms(elapsed_ms);
        let mut rng = SmallRng::seed_from_u64(seed);
        // The same draw, replayed: the wait is max(jitter, Retry-After).
        let jitter = policy.backoff(attempts - 1, &mut SmallRng::seed_from_u64(seed));
        let wait = jitter.max(retry_after_ms.map(ms).unwrap_or_default());
        match policy.decide(GET, attempts, &outcome, elapsed, &mut rng) {
            Decision::Retry { after } => {
                prop_assert_eq!(after, wait);
                prop_assert!(after <= policy.backoff_ceiling(attempts - 1).max(retry_after_ms.map(ms).unwrap_or_default()));
                prop_assert!(elapsed + after < policy.deadline, "a retry never crosses the deadline");
            }
            Decision::Stop(Stop::Deadline) => prop_assert!(elapsed + wait >= policy.deadline),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

#[test]
fn full_jitter_spreads_over_the_whole_range() {
    let policy = policy();
    let mut rng = SmallRng::seed_from_u64(7);
    let draws: Vec<Duration> = (0..2000).map(|_| policy.backoff(3, &mut rng)).collect();
    let ceiling = policy.backoff_ceiling(3);
    assert_eq!(ceiling, ms(800));
    assert!(
        draws.iter().any(|d| *d < ceiling / 20),
        "some waits are near zero"
    );
    assert!(
        draws.iter().any(|d| *d > ceiling * 19 / 20),
        "some are near the ceiling"
    );
    let mean = draws.iter().sum::<Duration>() / 2000;
    assert!(
        mean > ms(360) && mean < ms(440),
        "mean {mean:?} is about half the ceiling"
    );
}

#[tokio::test]
async fn two_failures_then_success_takes_three_attempts() {
    let clock = Arc::new(ManualClock::new());
    let upstream = Upstream::new(&clock, &[(503, None), (502, None), (200, None)]);
    let done = upstream.run(&policy(), &generous_budget(&clock), GET).await;
    assert_eq!(done.result, Ok((200, None)));
    assert_eq!(done.attempts, 3);
    assert_eq!(done.retries(), 2);
    assert_eq!(done.stop, Stop::Succeeded);
    let sleeps = upstream.sleeps.borrow();
    assert_eq!(sleeps.len(), 2);
    assert!(sleeps[0] <= ms(100) && sleeps[1] <= ms(200), "{sleeps:?}");
}

#[tokio::test]
async fn max_attempts_is_respected() {
    let clock = Arc::new(ManualClock::new());
    let upstream = Upstream::new(&clock, &[(504, None)]);
    let done = upstream.run(&policy(), &generous_budget(&clock), GET).await;
    assert_eq!(
        done.result,
        Ok((504, None)),
        "the last failure is handed back"
    );
    assert_eq!(done.attempts, 4);
    assert_eq!(upstream.calls.get(), 4);
    assert_eq!(done.stop, Stop::MaxAttempts);
    let sleeps = upstream.sleeps.borrow();
    for (retry, sleep) in sleeps.iter().enumerate() {
        assert!(*sleep <= ms(100 << retry), "retry {retry} slept {sleep:?}");
    }
    assert_eq!(sleeps.len(), 3);
}

#[tokio::test]
async fn fatal_outcomes_are_not_retried() {
    let clock = Arc::new(ManualClock::new());
    for status in [400, 404, 500, 501] {
        let upstream = Upstream::new(&clock, &[(status, None), (200, None)]);
        let done = upstream.run(&policy(), &generous_budget(&clock), GET).await;
        assert_eq!((done.attempts, done.stop), (1, Stop::Fatal), "{status}");
    }
}

#[tokio::test]
async fn post_is_not_retried_unless_the_route_allows_it() {
    let clock = Arc::new(ManualClock::new());
    let script = [(503, None), (200, None)];

    let upstream = Upstream::new(&clock, &script);
    let post = Idempotence::of_method("POST", false);
    let done = upstream
        .run(&policy(), &generous_budget(&clock), post)
        .await;
    assert_eq!(done.result, Ok((503, None)));
    assert_eq!((done.attempts, done.stop), (1, Stop::NotIdempotent));
    assert_eq!(upstream.calls.get(), 1);
    assert!(upstream.sleeps.borrow().is_empty());

    let upstream = Upstream::new(&clock, &script);
    let marked = Idempotence::of_method("POST", true);
    let done = upstream
        .run(&policy(), &generous_budget(&clock), marked)
        .await;
    assert_eq!(done.result, Ok((200, None)));
    assert_eq!((done.attempts, done.stop), (2, Stop::Succeeded));

    // Idempotent methods need no marking.
    for method in ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"] {
        let upstream = Upstream::new(&clock, &script);
        let done = upstream
            .run(
                &policy(),
                &generous_budget(&clock),
                Idempotence::of_method(method, false),
            )
            .await;
        assert_eq!(done.attempts, 2, "{method}");
    }
}

#[tokio::test]
async fn retry_after_in_seconds_is_honoured() {
    let clock = Arc::new(ManualClock::new());
    let upstream = Upstream::new(&clock, &[(429, Some("3")), (200, None)]);
    let done = upstream.run(&policy(), &generous_budget(&clock), GET).await;
    assert_eq!((done.attempts, done.stop), (2, Stop::Succeeded));
    // The jittered backoff is at most 100 ms: the upstream's 3 s wins.
    assert_eq!(*upstream.sleeps.borrow(), [secs(3)]);
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    let clock = Arc::new(ManualClock::new());
    // Ten seconds after the wall-clock `now` the test upstream uses.
    let upstream = Upstream::new(
        &clock,
        &[(503, Some("Wed, 21 Oct 2015 07:28:00 GMT")), (200, None)],
    );
    let done = upstream.run(&policy(), &generous_budget(&clock), GET).await;
    assert_eq!((done.attempts, done.stop), (2, Stop::Succeeded));
    assert_eq!(*upstream.sleeps.borrow(), [secs(10)]);
}

#[test]
fn a_short_retry_after_does_not_shorten_the_backoff() {
    let policy = RetryPolicy {
        base: secs(5),
        max: secs(5),
        ..policy()
    };
    let outcome = Outcome::RetryableFailure {
        retry_after: Some(Duration::ZERO),
    };
    let expected = policy.backoff(0, &mut SmallRng::seed_from_u64(3));
    assert!(expected > Duration::ZERO);
    assert_eq!(
        policy.next_delay(
            GET,
            1,
            &outcome,
            Duration::ZERO,
            &mut SmallRng::seed_from_u64(3)
        ),
        Some(expected)
    );
}

#[tokio::test]
async fn a_retry_after_beyond_the_deadline_stops_retrying() {
    let clock = Arc::new(ManualClock::new());
    let upstream = Upstream::new(&clock, &[(503, Some("120")), (200, None)]);
    let done = upstream.run(&policy(), &generous_budget(&clock), GET).await;
    assert_eq!(done.result, Ok((503, Some("120"))));
    assert_eq!((done.attempts, done.stop), (1, Stop::Deadline));
    assert!(upstream.sleeps.borrow().is_empty(), "gave up at once");
}

#[tokio::test]
async fn the_deadline_counts_the_time_attempts_take() {
    let clock = Arc::new(ManualClock::new());
    let mut upstream = Upstream::new(&clock, &[(504, None)]);
    upstream.latency = secs(10);
    let policy = RetryPolicy {
        max_attempts: 10,
        deadline: secs(25),
        ..policy()
    };
    let done = upstream.run(&policy, &generous_budget(&clock), GET).await;
    // 10 s, retry, 20 s (+ ≤ 0.3 s of backoff), retry, 30 s: past the deadline.
    assert_eq!((done.attempts, done.stop), (3, Stop::Deadline));
    // A wait that would land after the deadline is not started either.
    let retry_after = Outcome::RetryableFailure {
        retry_after: Some(secs(5)),
    };
    let mut rng = SmallRng::seed_from_u64(0);
    assert_eq!(
        policy.decide(GET, 1, &retry_after, secs(20), &mut rng),
        Decision::Stop(Stop::Deadline)
    );
    assert_eq!(
        policy.decide(GET, 1, &retry_after, ms(19_999), &mut rng),
        Decision::Retry { after: secs(5) }
    );
}

#[tokio::test]
async fn an_exhausted_budget_stops_retries() {
    let clock = Arc::new(ManualClock::new());
    let empty = RetryBudget::with_clock(
        BudgetConfig {
            min_per_sec: 0,
            ratio: 0.0,
            ..BudgetConfig::default()
        },
        clock.clone(),
    )
    .expect("valid budget");
    let upstream = Upstream::new(&clock, &[(503, None), (200, None)]);
    let done = upstream.run(&policy(), &empty, GET).await;
    assert_eq!(done.result, Ok((503, None)));
    assert_eq!((done.attempts, done.stop), (1, Stop::BudgetExhausted));
    assert!(upstream.sleeps.borrow().is_empty());
}

#[tokio::test]
async fn during_an_outage_retries_stay_within_the_budget_ratio() {
    let clock = Arc::new(ManualClock::new());
    // One retry per two requests, no floor.
    let budget = RetryBudget::with_clock(
        BudgetConfig {
            min_per_sec: 0,
            ratio: 0.5,
            ..BudgetConfig::default()
        },
        clock.clone(),
    )
    .expect("valid budget");
    let mut retries = 0;
    for _ in 0..100 {
        let upstream = Upstream::new(&clock, &[(503, None)]);
        let done = upstream.run(&policy(), &budget, GET).await;
        assert_eq!(done.stop, Stop::BudgetExhausted);
        retries += done.retries();
    }
    // Without the budget: 300 retries (max_attempts 4). With it: half the requests.
    assert_eq!(retries, 50);
}

#[test]
fn the_retry_future_is_send() {
    fn assert_send<F: Future + Send>(_: F) {}
    let clock = Arc::new(ManualClock::new());
    let budget = generous_budget(&clock);
    let policy = policy();
    assert_send(retry(
        &policy,
        &budget,
        GET,
        |_| ready(()),
        |result: &Result<u16, ()>| match result {
            Ok(status) => Outcome::from_status(*status, None),
            Err(()) => Outcome::Fatal,
        },
        |_| ready(Ok::<u16, ()>(200)),
    ));
}

#[tokio::test]
async fn works_with_a_real_runtime_sleep() {
    // A real (zero-length) tokio sleep, to show the driver needs nothing else from the runtime.
    let budget = RetryBudget::new(BudgetConfig::default()).expect("valid budget");
    let policy = RetryPolicy {
        base: Duration::ZERO,
        max: Duration::ZERO,
        ..policy()
    };
    let calls = Cell::new(0u32);
    let done = retry(
        &policy,
        &budget,
        GET,
        tokio::time::sleep,
        |result: &Result<u16, ()>| match result {
            Ok(status) => Outcome::from_status(*status, None),
            Err(()) => Outcome::Fatal,
        },
        |attempt| {
            calls.set(attempt);
            ready(Ok(if attempt < 3 { 503 } else { 200 }))
        },
    )
    .await;
    assert_eq!((done.result, done.attempts), (Ok(200), 3));
    assert_eq!(calls.get(), 3);
}
