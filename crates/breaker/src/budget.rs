//! A retry budget: retries may be at most a share of recent requests, plus a small floor.
//!
//! Modelled on tower's `TpsBudget`. Every request [deposits](RetryBudget::deposit)
//! [`ratio`](BudgetConfig::ratio) of a retry; every retry [withdraws](RetryBudget::withdraw)
//! a whole one. Deposits and withdrawals are forgotten after [`ttl`](BudgetConfig::ttl),
//! and a reserve of `min_per_sec × ttl` retries is always added, so within any `ttl`
//! there are at most `ratio × requests + min_per_sec × ttl` retries. During an outage
//! retries therefore add at most `ratio` to the load, instead of multiplying it by
//! `max_attempts`; a quiet upstream still gets its floor of retries.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::clock::{Clock, MonotonicClock};
use crate::error::{Error, Result};
use crate::ring::Ring;

/// How many buckets the `ttl` window is divided into.
const BUCKETS: u32 = 10;

/// Fixed-point units in one retry, so fractional deposits add up exactly (to 0.1 %).
const UNIT: i64 = 1000;

/// Settings of a [`RetryBudget`].
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    /// How long a deposit or withdrawal counts (kept as 10 buckets of `ttl / 10`).
    /// Default 10 s.
    pub ttl: Duration,
    /// Retries per second allowed even with no requests, averaged over `ttl` (a reserve of
    /// `min_per_sec × ttl` retries per window). Default 1.
    pub min_per_sec: u32,
    /// Retries allowed per request: `0.2` lets one request in five be retried (20 %).
    /// Between 0 and 1000. Default 0.2.
    pub ratio: f64,
}

/// Retries allowed in proportion to recent requests. Cheap to clone; clones share the
/// budget (use one per upstream). Thread-safe.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use breaker::{BudgetConfig, ManualClock, RetryBudget};
///
/// let clock = Arc::new(ManualClock::new());
/// let config = BudgetConfig { ttl: Duration::from_secs(10), min_per_sec: 0, ratio: 0.1 };
/// let budget = RetryBudget::with_clock(config, clock.clone())?;
/// for _ in 0..30 {
///     budget.deposit(); // 10 % of 30 requests: 3 retries
/// }
/// assert!(budget.withdraw());
/// assert!(budget.withdraw());
/// assert_eq!(budget.available(), 1);
///
/// clock.advance(Duration::from_secs(10));
/// assert_eq!(budget.available(), 0, "the requests have left the window");
/// assert!(!budget.withdraw());
/// # Ok::<(), breaker::Error>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    config: BudgetConfig,
    clock: Arc<dyn Clock>,
    /// Units one request deposits.
    deposit: i64,
    /// Units always available on top of the window's balance.
    reserve: i64,
    /// Net units (deposits minus withdrawals) per bucket.
    ring: Mutex<Ring<i64>>,
}

// === impl BudgetConfig ===

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            min_per_sec: 1,
            ratio: 0.2,
        }
    }
}

impl BudgetConfig {
    /// Checks the settings: a non-zero `ttl` and a `ratio` in `[0, 1000]`.
    pub fn validate(&self) -> Result<()> {
        if self.ttl.is_zero() {
            return Err(Error::config(
                "retry budget",
                "ttl",
                "must be greater than zero",
            ));
        }
        if !(0.0..=1000.0).contains(&self.ratio) {
            return Err(Error::config(
                "retry budget",
                "ratio",
                format!("must be between 0 and 1000, not {}", self.ratio),
            ));
        }
        Ok(())
    }
}

// === impl RetryBudget ===

impl RetryBudget {
    /// A budget on the real monotonic clock.
    pub fn new(config: BudgetConfig) -> Result<Self> {
        Self::with_clock(config, Arc::new(MonotonicClock::new()))
    }

    /// A budget reading time from `clock` (a [`ManualClock`](crate::ManualClock) in tests).
    pub fn with_clock(config: BudgetConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        config.validate()?;
        // Both products are bounded (ratio ≤ 1000; u32 × a ttl in seconds), and `as`
        // saturates on the absurd ones.
        let deposit = (config.ratio * UNIT as f64).round() as i64;
        let reserve =
            (f64::from(config.min_per_sec) * config.ttl.as_secs_f64() * UNIT as f64) as i64;
        Ok(Self {
            inner: Arc::new(Inner {
                ring: Mutex::new(Ring::new(config.ttl, BUCKETS)),
                config,
                clock,
                deposit,
                reserve,
            }),
        })
    }

    /// The settings this budget was made with.
    pub fn config(&self) -> &BudgetConfig {
        &self.inner.config
    }

    /// The clock this budget reads (and [`retry`](crate::retry) measures its deadline by).
    pub fn clock(&self) -> &dyn Clock {
        &*self.inner.clock
    }

    /// Records one request (call it once per request, not per attempt).
    pub fn deposit(&self) {
        let now = self.inner.clock.now();
        let mut ring = self
            .inner
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let net = ring.current(now);
        *net = net.saturating_add(self.inner.deposit);
    }

    /// Takes one retry from the budget: `true` if it was available (and is now spent),
    /// `false` if the caller must not retry.
    pub fn withdraw(&self) -> bool {
        let now = self.inner.clock.now();
        let mut ring = self
            .inner
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.balance(&ring, now) < UNIT {
            return false;
        }
        let net = ring.current(now);
        *net = net.saturating_sub(UNIT);
        true
    }

    /// Whole retries available right now (for metrics).
    pub fn available(&self) -> u32 {
        let now = self.inner.clock.now();
        let ring = self
            .inner
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        u32::try_from(self.balance(&ring, now).max(0) / UNIT).unwrap_or(u32::MAX)
    }

    fn balance(&self, ring: &Ring<i64>, now: Duration) -> i64 {
        ring.live(now)
            .fold(self.inner.reserve, |sum, net| sum.saturating_add(*net))
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("config", &self.inner.config)
            .field("available", &self.available())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    fn budget(config: BudgetConfig) -> (RetryBudget, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let budget = RetryBudget::with_clock(config, clock.clone()).expect("valid config");
        (budget, clock)
    }

    #[test]
    fn fractional_ratios_add_up_exactly() {
        let (budget, _clock) = budget(BudgetConfig {
            min_per_sec: 0,
            ratio: 0.3,
            ..BudgetConfig::default()
        });
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 3);
        assert!(budget.withdraw() && budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw());
    }

    #[test]
    fn zero_ratio_and_zero_floor_never_retries() {
        let (budget, _clock) = budget(BudgetConfig {
            min_per_sec: 0,
            ratio: 0.0,
            ..BudgetConfig::default()
        });
        for _ in 0..100 {
            budget.deposit();
        }
        assert!(!budget.withdraw());
    }

    #[test]
    fn validation_names_the_field() {
        for (config, field) in [
            (
                BudgetConfig {
                    ttl: Duration::ZERO,
                    ..BudgetConfig::default()
                },
                "ttl",
            ),
            (
                BudgetConfig {
                    ratio: -0.1,
                    ..BudgetConfig::default()
                },
                "ratio",
            ),
            (
                BudgetConfig {
                    ratio: f64::NAN,
                    ..BudgetConfig::default()
                },
                "ratio",
            ),
        ] {
            match RetryBudget::new(config) {
                Err(Error::Config { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn debug_shows_what_is_available() {
        let (budget, _clock) = budget(BudgetConfig::default());
        let text = format!("{budget:?}");
        assert!(text.contains("available: 10"), "{text}");
    }
}
