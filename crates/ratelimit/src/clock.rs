//! Time sources.
//!
//! Rate limits only compare instants with each other, so a [`Clock`] may count from any origin
//! that every limiter sharing the same state agrees on. Quotas work on calendar windows and take
//! the wall-clock time ([`UnixMillis`]) as an argument, so the caller decides what "now" is.

use std::fmt::Debug;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (UTC), the unit of quota window boundaries.
pub type UnixMillis = i64;

/// A source of time for rate limiting, in microseconds since an origin fixed for the clock's
/// lifetime and shared by every limiter that shares state through it.
///
/// Implemented by [`SystemClock`] (the Unix epoch) and by governor's
/// [`FakeRelativeClock`](governor::clock::FakeRelativeClock), the clock tests move by hand: the
/// same fake clock can drive a [`LocalLimiter`](crate::LocalLimiter) (through governor) and a
/// `RedisLimiter` (through `TimeSource::Clock`).
pub trait Clock: Send + Sync + Debug + 'static {
    /// Now, in microseconds since the clock's origin.
    fn now_micros(&self) -> u64;
}

/// The system's wall clock, counting from the Unix epoch.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    /// Now, in milliseconds since the Unix epoch: the `now` argument quota stores take.
    pub fn unix_millis() -> UnixMillis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

impl Clock for SystemClock {
    fn now_micros(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

impl Clock for governor::clock::FakeRelativeClock {
    fn now_micros(&self) -> u64 {
        governor::clock::Clock::now(self).as_u64() / 1_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    #[test]
    fn fake_clock_in_micros() {
        let c = FakeRelativeClock::default();
        assert_eq!(c.now_micros(), 0);
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now_micros(), 1_500_000);
        c.advance(Duration::from_nanos(999));
        assert_eq!(c.now_micros(), 1_500_000);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_micros() > 1_577_836_800_000_000);
        assert!(SystemClock::unix_millis() > 1_577_836_800_000);
    }
}
