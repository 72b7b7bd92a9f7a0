//! The circuit breaker's state machine, driven by a manual clock (no test sleeps).

use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use breaker::{BreakerConfig, CircuitBreaker, ManualClock, Permit, Rejected, State};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Opens by 3 consecutive failures only; 10 s open, 5 s probe timeout, `probes` probes.
fn consecutive(probes: u32) -> BreakerConfig {
    BreakerConfig {
        failure_threshold: 3,
        failure_rate: None,
        open_for: secs(10),
        half_open_probes: probes,
        probe_timeout: secs(5),
        ..BreakerConfig::default()
    }
}

/// Opens by failure rate only: at least 50 % failures among at least 10 calls in 10 s.
fn by_rate() -> BreakerConfig {
    BreakerConfig {
        failure_threshold: 0,
        failure_rate: Some(0.5),
        minimum_volume: 10,
        window: secs(10),
        ..BreakerConfig::default()
    }
}

fn breaker(config: BreakerConfig) -> (CircuitBreaker, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let breaker = CircuitBreaker::with_clock(config, clock.clone()).expect("valid config");
    (breaker, clock)
}

/// Records every transition the breaker announces.
fn transitions(breaker: &CircuitBreaker) -> Arc<Mutex<Vec<(State, State)>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    breaker.on_transition(move |from, to| sink.lock().expect("log").push((from, to)));
    log
}

fn acquire(breaker: &CircuitBreaker) -> Permit {
    breaker.try_acquire().expect("admitted")
}

fn reject(breaker: &CircuitBreaker) -> Rejected {
    match breaker.try_acquire() {
        Ok(permit) => panic!("expected a rejection, got {permit:?}"),
        Err(rejected) => rejected,
    }
}

fn fail(breaker: &CircuitBreaker, times: usize) {
    for _ in 0..times {
        acquire(breaker).failure();
    }
}

fn succeed(breaker: &CircuitBreaker, times: usize) {
    for _ in 0..times {
        acquire(breaker).success();
    }
}

/// Opens the breaker and waits out the open period: the next call is a probe.
fn to_half_open(breaker: &CircuitBreaker, clock: &ManualClock) {
    fail(breaker, 3);
    assert_eq!(breaker.state(), State::Open);
    clock.advance(secs(10));
    assert_eq!(breaker.state(), State::HalfOpen);
}

#[test]
fn consecutive_failures_open_it_and_it_rejects_with_the_time_left() {
    let (breaker, clock) = breaker(consecutive(1));
    fail(&breaker, 2);
    assert_eq!(breaker.state(), State::Closed);
    fail(&breaker, 1);
    assert_eq!(breaker.state(), State::Open);

    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.opened_at, Some(Duration::ZERO));
    assert_eq!(snapshot.consecutive_failures, 3);
    assert_eq!(snapshot.next_probe_in, Some(secs(10)));

    let rejected = reject(&breaker);
    assert_eq!(rejected.state, State::Open);
    assert_eq!(rejected.retry_after, secs(10));
    clock.advance(ms(9_999));
    assert_eq!(reject(&breaker).retry_after, ms(1));
    clock.advance(ms(1));
    assert!(acquire(&breaker).is_probe());
}

#[test]
fn exactly_n_probes_are_admitted_in_half_open() {
    let (breaker, clock) = breaker(consecutive(3));
    to_half_open(&breaker, &clock);

    let probes: Vec<Permit> = (0..3).map(|_| acquire(&breaker)).collect();
    assert!(probes.iter().all(Permit::is_probe));
    clock.advance(secs(1));
    let rejected = reject(&breaker);
    assert_eq!(rejected.state, State::HalfOpen);
    // The probes time out 5 s after they started, 1 s ago.
    assert_eq!(rejected.retry_after, secs(4));
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.state, State::HalfOpen);
    assert_eq!(snapshot.probes_in_flight, 3);
    assert_eq!(snapshot.next_probe_in, Some(secs(4)));

    // Each success frees its slot; it takes three to close.
    let mut probes = probes.into_iter();
    probes.next().expect("probe").success();
    assert_eq!(breaker.state(), State::HalfOpen);
    assert_eq!(breaker.snapshot().next_probe_in, Some(Duration::ZERO));
    let fourth = acquire(&breaker);
    assert!(fourth.is_probe());
    reject(&breaker);
    probes.next().expect("probe").success();
    fourth.success();
    assert_eq!(breaker.state(), State::Closed);
    // The last probe reports after the breaker closed: ignored.
    probes.next().expect("probe").failure();
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(breaker.snapshot().consecutive_failures, 0);
}

#[test]
fn a_successful_probe_closes_it() {
    let (breaker, clock) = breaker(consecutive(1));
    let log = transitions(&breaker);
    to_half_open(&breaker, &clock);
    let probe = acquire(&breaker);
    reject(&breaker);
    probe.success();
    assert_eq!(breaker.state(), State::Closed);
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.opened_at, None);
    assert_eq!(snapshot.next_probe_in, None);
    assert_eq!(snapshot.calls_in_window, 0, "closing starts a fresh window");
    assert_eq!(
        *log.lock().expect("log"),
        [
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed)
        ]
    );
    // Closed again: it takes three new failures to open.
    fail(&breaker, 2);
    assert_eq!(breaker.state(), State::Closed);
}

#[test]
fn a_failed_probe_reopens_it_for_a_full_period() {
    let (breaker, clock) = breaker(consecutive(2));
    to_half_open(&breaker, &clock);
    let first = acquire(&breaker);
    let second = acquire(&breaker);
    clock.advance(secs(2));
    first.failure();
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(breaker.snapshot().opened_at, Some(secs(12)));
    assert_eq!(reject(&breaker).retry_after, secs(10));
    // The other probe succeeding later changes nothing: the breaker already re-opened.
    second.success();
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn a_probe_that_never_returns_times_out_and_reopens() {
    let (breaker, clock) = breaker(consecutive(1));
    let log = transitions(&breaker);
    to_half_open(&breaker, &clock);
    let hung = acquire(&breaker);
    clock.advance(ms(4_999));
    assert_eq!(reject(&breaker).retry_after, ms(1));

    // At the probe timeout the hung probe counts as a failure: OPEN again, dated at the
    // timeout, and its slot is free for the probe after this open period.
    clock.advance(ms(1));
    let rejected = reject(&breaker);
    assert_eq!(rejected.state, State::Open);
    assert_eq!(rejected.retry_after, secs(10));
    assert_eq!(breaker.snapshot().opened_at, Some(secs(15)));
    clock.advance(secs(10));
    let next = acquire(&breaker);
    assert!(next.is_probe());

    // The hung call finally answers: too late to count.
    hung.success();
    assert_eq!(breaker.state(), State::HalfOpen);
    assert_eq!(breaker.snapshot().probes_in_flight, 1);
    next.success();
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(
        *log.lock().expect("log"),
        [
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed)
        ]
    );
}

#[test]
fn a_probe_timeout_noticed_late_admits_a_new_probe_at_once() {
    let (breaker, clock) = breaker(consecutive(1));
    to_half_open(&breaker, &clock);
    let _hung = acquire(&breaker);
    // Nobody looks until long after the timeout and the following open period.
    clock.advance(secs(60));
    let probe = acquire(&breaker);
    assert!(probe.is_probe());
    reject(&breaker);
}

#[test]
fn a_cancelled_probe_frees_its_slot_without_deciding() {
    let (breaker, clock) = breaker(consecutive(1));
    to_half_open(&breaker, &clock);
    let probe = acquire(&breaker);
    reject(&breaker);
    drop(probe);
    assert_eq!(breaker.state(), State::HalfOpen);
    let probe = acquire(&breaker);
    probe.ignore();
    assert_eq!(breaker.state(), State::HalfOpen);
    acquire(&breaker).success();
    assert_eq!(breaker.state(), State::Closed);
}

#[test]
fn below_minimum_volume_it_stays_closed_even_at_100_percent_failures() {
    let (breaker, _clock) = breaker(by_rate());
    fail(&breaker, 9);
    assert_eq!(breaker.state(), State::Closed);
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.calls_in_window, 9);
    assert_eq!(snapshot.failures_in_window, 9);
    assert_eq!(snapshot.failure_rate, Some(1.0));
    fail(&breaker, 1);
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn at_volume_it_opens_when_the_rate_reaches_the_threshold() {
    let (breaker, _clock) = breaker(by_rate());
    succeed(&breaker, 10);
    fail(&breaker, 9);
    assert_eq!(breaker.state(), State::Closed, "9 of 19 is under 50 %");
    assert_eq!(breaker.snapshot().consecutive_failures, 9);
    fail(&breaker, 1);
    assert_eq!(breaker.state(), State::Open, "10 of 20 is 50 %");
}

#[test]
fn a_low_rate_at_volume_stays_closed() {
    let (breaker, _clock) = breaker(BreakerConfig {
        failure_rate: Some(0.3),
        ..by_rate()
    });
    for _ in 0..50 {
        succeed(&breaker, 3);
        fail(&breaker, 1);
    }
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(breaker.snapshot().failure_rate, Some(0.25));
    // 3 of 10 is exactly the configured 0.3.
    let (breaker, _clock) = self::breaker(BreakerConfig {
        failure_rate: Some(0.3),
        ..by_rate()
    });
    succeed(&breaker, 7);
    fail(&breaker, 3);
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn the_sliding_window_forgets_old_failures() {
    let (breaker, clock) = breaker(by_rate());
    fail(&breaker, 9);
    clock.advance(secs(10));
    assert_eq!(breaker.snapshot().calls_in_window, 0);
    // Counted together with the old failures this would be 10 of 19 and open it.
    succeed(&breaker, 9);
    fail(&breaker, 1);
    assert_eq!(breaker.state(), State::Closed);
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.calls_in_window, 10);
    assert_eq!(snapshot.failures_in_window, 1);
}

#[test]
fn the_window_slides_bucket_by_bucket() {
    let (breaker, clock) = breaker(by_rate());
    fail(&breaker, 5); // t = 0
    clock.advance(secs(5));
    fail(&breaker, 4); // t = 5 s
    clock.advance(secs(5)); // t = 10 s: the first five have left the window
    assert_eq!(breaker.snapshot().calls_in_window, 4);
    succeed(&breaker, 6);
    fail(&breaker, 1);
    // 5 of 11; with the forgotten five it would be 10 of 16.
    assert_eq!(breaker.state(), State::Closed);
    fail(&breaker, 1);
    assert_eq!(breaker.state(), State::Open, "6 of 12");
}

#[test]
fn both_triggers_can_be_on() {
    let (breaker, _clock) = breaker(BreakerConfig {
        failure_threshold: 3,
        ..by_rate()
    });
    fail(&breaker, 3);
    assert_eq!(
        breaker.state(),
        State::Open,
        "the consecutive trigger fires below volume"
    );
}

#[test]
fn concurrent_callers_get_exactly_n_probes() {
    const THREADS: usize = 32;
    const PROBES: u32 = 3;
    let (breaker, clock) = breaker(consecutive(PROBES));
    for round in 0..20 {
        to_half_open(&breaker, &clock);
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let breaker = breaker.clone();
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    breaker.try_acquire().ok()
                })
            })
            .collect();
        // Keep every permit alive until all threads have tried.
        let permits: Vec<Permit> = handles
            .into_iter()
            .filter_map(|handle| handle.join().expect("thread"))
            .collect();
        assert_eq!(permits.len(), PROBES as usize, "round {round}");
        assert!(permits.iter().all(Permit::is_probe));
        assert_eq!(breaker.snapshot().probes_in_flight, PROBES);
        // Fail one: OPEN again for the next round; the others' reports are ignored.
        for permit in permits {
            permit.failure();
        }
        assert_eq!(breaker.state(), State::Open);
        clock.advance(secs(10));
        succeed_probes(&breaker, PROBES);
        assert_eq!(breaker.state(), State::Closed);
    }
}

fn succeed_probes(breaker: &CircuitBreaker, n: u32) {
    for _ in 0..n {
        let probe = acquire(breaker);
        assert!(probe.is_probe());
        probe.success();
    }
}

#[test]
fn concurrent_failures_open_it_once() {
    const THREADS: usize = 16;
    let (breaker, _clock) = breaker(consecutive(1));
    let log = transitions(&breaker);
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let breaker = breaker.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                for _ in 0..100 {
                    match breaker.try_acquire() {
                        Ok(permit) => permit.failure(),
                        Err(rejected) => assert_eq!(rejected.state, State::Open),
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("thread");
    }
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(*log.lock().expect("log"), [(State::Closed, State::Open)]);
}

#[test]
fn the_hook_may_call_back_into_the_breaker() {
    let (breaker, clock) = breaker(consecutive(1));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (inner, sink) = (breaker.clone(), Arc::clone(&seen));
    breaker.on_transition(move |_, to| {
        // No deadlock: hooks run after the lock is released.
        let snapshot = inner.snapshot();
        sink.lock().expect("seen").push((to, snapshot.state));
    });
    to_half_open(&breaker, &clock);
    assert_eq!(
        *seen.lock().expect("seen"),
        [
            (State::Open, State::Open),
            (State::HalfOpen, State::HalfOpen)
        ]
    );
}
