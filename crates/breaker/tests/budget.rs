//! The retry budget, driven by a manual clock (no test sleeps).

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use breaker::{BudgetConfig, ManualClock, RetryBudget};

fn budget(min_per_sec: u32, ratio: f64) -> (RetryBudget, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let config = BudgetConfig {
        ttl: Duration::from_secs(10),
        min_per_sec,
        ratio,
    };
    let budget = RetryBudget::with_clock(config, clock.clone()).expect("valid config");
    (budget, clock)
}

#[test]
fn the_floor_allows_min_per_sec_with_no_deposits() {
    let (budget, clock) = budget(2, 0.2);
    // A reserve of 2/s over the 10 s window: 20 retries, then none.
    assert_eq!(budget.available(), 20);
    for n in 0..20 {
        assert!(budget.withdraw(), "retry {n}");
    }
    assert!(!budget.withdraw());
    // As those retries leave the window, the floor comes back.
    clock.advance(Duration::from_secs(10));
    assert_eq!(budget.available(), 20);
}

#[test]
fn the_floor_sustains_min_per_sec_indefinitely() {
    let (budget, clock) = budget(1, 0.2);
    for second in 0..120 {
        assert!(budget.withdraw(), "second {second}");
        clock.advance(Duration::from_secs(1));
    }
    // Steady at one per second, it never builds up a burst beyond the window's reserve.
    let (budget, clock) = self::budget(1, 0.2);
    let mut granted = 0;
    for _ in 0..60 {
        while budget.withdraw() {
            granted += 1;
        }
        clock.advance(Duration::from_secs(1));
    }
    assert!(
        (60..=70).contains(&granted),
        "{granted} retries in 60 s at 1/s (plus the first window's reserve)"
    );
}

#[test]
fn the_ratio_is_respected_under_concurrent_load() {
    const THREADS: usize = 8;
    const REQUESTS: usize = 1000;
    let (budget, _clock) = budget(0, 0.1);
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let budget = budget.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let mut granted = 0u32;
                for _ in 0..REQUESTS {
                    budget.deposit();
                    // Every request would like a retry.
                    if budget.withdraw() {
                        granted += 1;
                    }
                }
                granted
            })
        })
        .collect();
    let granted: u32 = handles
        .into_iter()
        .map(|handle| handle.join().expect("thread"))
        .sum();
    // 10 % of 8000 requests is 800 retries: never more, and none lost.
    assert!(granted <= 800, "{granted}");
    assert_eq!(granted + budget.available(), 800);
}

#[test]
fn the_ratio_is_respected_under_steady_load_over_time() {
    let (budget, clock) = budget(0, 0.1);
    let (mut requests, mut retries) = (0u32, 0u32);
    // 100 requests per second for a minute, each wanting a retry.
    for _ in 0..6000 {
        budget.deposit();
        requests += 1;
        if budget.withdraw() {
            retries += 1;
        }
        clock.advance(Duration::from_millis(10));
    }
    assert!(
        retries <= requests / 10,
        "{retries} retries for {requests} requests"
    );
    assert!(
        retries >= requests / 10 - 10,
        "{retries}: the budget is usable"
    );
}

#[test]
fn deposits_expire_after_the_ttl() {
    let (budget, clock) = budget(0, 0.5);
    for _ in 0..10 {
        budget.deposit();
    }
    assert_eq!(budget.available(), 5);
    clock.advance(Duration::from_secs(9));
    assert_eq!(budget.available(), 5);
    clock.advance(Duration::from_secs(1));
    assert_eq!(budget.available(), 0);
    assert!(!budget.withdraw());
}
