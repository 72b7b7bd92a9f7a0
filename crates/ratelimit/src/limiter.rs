//! The rate-limiting port: [`RateLimiter`], the [`Limit`] it enforces and the [`Decision`] it
//! returns.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{RateLimitError, Result};

/// A rate: `count` units per `per`, enforced with GCRA.
///
/// One unit is replenished every *emission interval* `per / count` (see
/// [`emission_interval`](Self::emission_interval)); the bucket holds `count` units, so from a
/// fresh (or long idle) state `count` units pass at once, then one per emission interval.
///
/// Limits parse from and print as `"60/min"`, `"20/s"`, `"1000/hour"`, `"5/day"` or with a
/// multiple of the unit, `"100/10s"`:
///
/// ```
/// use std::time::Duration;
/// use ratelimit::Limit;
///
/// let limit: Limit = "60/min".parse().unwrap();
/// assert_eq!(limit, Limit::per_minute(60));
/// assert_eq!(limit.emission_interval().unwrap(), Duration::from_secs(1));
/// assert_eq!("100/10s".parse::<Limit>().unwrap(), Limit::new(100, Duration::from_secs(10)));
/// assert_eq!(Limit::per_second(20).to_string(), "20/s");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    /// How many units per period, and the burst size.
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl Limit {
    /// The longest period a limit may have (ten years of 366 days).
    pub const MAX_PER: Duration = Duration::from_secs(10 * 366 * 86_400);

    /// `count` units per `per`.
    pub const fn new(count: u32, per: Duration) -> Limit {
        Limit { count, per }
    }

    /// `count` per second.
    pub const fn per_second(count: u32) -> Limit {
        Limit::new(count, Duration::from_secs(1))
    }

    /// `count` per minute.
    pub const fn per_minute(count: u32) -> Limit {
        Limit::new(count, Duration::from_secs(60))
    }

    /// `count` per hour.
    pub const fn per_hour(count: u32) -> Limit {
        Limit::new(count, Duration::from_secs(3600))
    }

    /// The time one unit takes to replenish: `per / count`, truncated to whole microseconds so
    /// that the local and the Redis limiter compute exactly the same decisions.
    ///
    /// Fails with [`RateLimitError::InvalidLimit`] for a zero count, a period over
    /// [`MAX_PER`](Self::MAX_PER), or an interval under one microsecond (more than a million
    /// units per second).
    pub fn emission_interval(&self) -> Result<Duration> {
        if self.count == 0 {
            return Err(RateLimitError::InvalidLimit(format!(
                "{self}: the count must be at least 1"
            )));
        }
        if self.per > Self::MAX_PER {
            return Err(RateLimitError::InvalidLimit(format!(
                "{self}: the period is longer than ten years"
            )));
        }
        let micros = self.per.as_micros() / u128::from(self.count);
        if micros == 0 {
            return Err(RateLimitError::InvalidLimit(format!(
                "{self}: the emission interval (period / count) is under one microsecond"
            )));
        }
        Ok(Duration::from_micros(
            u64::try_from(micros).unwrap_or(u64::MAX),
        ))
    }

    /// The share of this limit one node of `nodes` enforces on its own:
    /// `max(1, count / nodes)` per the same period. Used when the shared backend is down.
    pub fn share(&self, nodes: u32) -> Limit {
        Limit {
            count: (self.count / nodes.max(1)).max(1),
            per: self.per,
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.per.as_secs();
        let whole = self.per.subsec_nanos() == 0;
        let (n, unit) = match secs {
            _ if !whole => (self.per.as_millis(), "ms"),
            86_400 => (1, "day"),
            3600 => (1, "hour"),
            60 => (1, "min"),
            1 => (1, "s"),
            _ if secs.is_multiple_of(86_400) => (u128::from(secs / 86_400), "d"),
            _ if secs.is_multiple_of(3600) => (u128::from(secs / 3600), "h"),
            _ if secs.is_multiple_of(60) => (u128::from(secs / 60), "m"),
            _ => (u128::from(secs), "s"),
        };
        if n == 1 {
            write!(f, "{}/{unit}", self.count)
        } else {
            write!(f, "{}/{n}{unit}", self.count)
        }
    }
}

impl FromStr for Limit {
    type Err = RateLimitError;

    /// `COUNT/[N]UNIT` with UNIT one of `ms`, `s`/`sec`/`second`, `m`/`min`/`minute`,
    /// `h`/`hour`, `d`/`day` (plurals accepted). The limit is validated.
    fn from_str(s: &str) -> Result<Limit> {
        let bad = |why: &str| RateLimitError::InvalidArgument(format!("limit {s:?}: {why}"));
        let (count, period) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected COUNT/PERIOD, e.g. 60/min"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| bad("the count is not a whole number"))?;
        let period = period.trim();
        let digits = period
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(period.len());
        let (n, unit) = period.split_at(digits);
        let n: u64 = if n.is_empty() {
            1
        } else {
            n.parse().map_err(|_| bad("bad period multiplier"))?
        };
        let unit_len = match unit.trim() {
            "ms" => Duration::from_millis(1),
            "s" | "sec" | "secs" | "second" | "seconds" => Duration::from_secs(1),
            "m" | "min" | "mins" | "minute" | "minutes" => Duration::from_secs(60),
            "h" | "hr" | "hour" | "hours" => Duration::from_secs(3600),
            "d" | "day" | "days" => Duration::from_secs(86_400),
            _ => return Err(bad("unknown period unit (ms, s, min, hour, day)")),
        };
        let per = u32::try_from(n)
            .ok()
            .and_then(|n| unit_len.checked_mul(n))
            .ok_or_else(|| bad("period too long"))?;
        let limit = Limit { count, per };
        limit.emission_interval()?;
        Ok(limit)
    }
}

/// The answer to one [`RateLimiter::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed. When it may, its cost has been counted.
    pub allowed: bool,
    /// The limit's count (`RateLimit-Limit`).
    pub limit: u32,
    /// Units that could pass right now after this decision (`RateLimit-Remaining`).
    pub remaining: u32,
    /// Until the bucket is full again (`RateLimit-Reset`): `(limit - remaining)` emission
    /// intervals, an upper bound exact to within one interval. Waiting this long restores the
    /// whole burst.
    pub reset_after: Duration,
    /// When denied: how long until a request of the same cost would pass (`Retry-After`).
    /// `None` when allowed, and when the cost exceeds the limit's count, which no wait can fix.
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// The decision for a cost larger than the limit's burst: denied for good, with
    /// `retry_after: None`. Nothing is counted and the stored state is not consulted, so
    /// `remaining` and `reset_after` are 0.
    pub fn over_capacity(limit: &Limit) -> Decision {
        Decision {
            allowed: false,
            limit: limit.count,
            remaining: 0,
            reset_after: Duration::ZERO,
            retry_after: None,
        }
    }
}

/// Checks that `cost` may be charged against `limit`; the emission interval when it may.
/// `Ok(None)`: the cost exceeds the burst ([`Decision::over_capacity`]).
pub(crate) fn validate(limit: &Limit, cost: u32) -> Result<Option<Duration>> {
    let t = limit.emission_interval()?;
    if cost == 0 {
        return Err(RateLimitError::InvalidArgument(
            "a rate-limit check must cost at least 1".into(),
        ));
    }
    Ok((cost <= limit.count).then_some(t))
}

/// A rate limiter: decides whether a request identified by `key` may proceed under `limit`.
///
/// Implementations: [`LocalLimiter`](crate::LocalLimiter) (in-process, governor),
/// `RedisLimiter` (feature `redis`, shared by every node through one Lua script per check) and
/// [`FallbackLimiter`](crate::FallbackLimiter) (a shared limiter with a local fallback).
///
/// Contract, held by every implementation (`tests/limiter_suite.rs`):
/// * GCRA with an emission interval of [`Limit::emission_interval`] and a burst of
///   [`Limit::count`]: from a fresh state `count` units pass at once, then one per interval;
/// * state is kept per `(key, limit)`: the same key under two different limits is two buckets;
/// * an allowed check charges `cost` units; a denied one charges nothing;
/// * `cost == 0` is [`RateLimitError::InvalidArgument`]; a cost above `limit.count` is denied
///   with `retry_after: None` ([`Decision::over_capacity`]) and charges nothing;
/// * keys should be identifiers (a key id, a hashed client id, an IP), never secrets: the Redis
///   limiter stores them in key names.
#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// A short name for logs and metrics (`local`, `redis`, `fallback`).
    fn name(&self) -> &'static str;

    /// Charges `cost` units to `key` under `limit` if they fit now.
    async fn check(&self, key: &str, limit: &Limit, cost: u32) -> Result<Decision>;
}

#[async_trait]
impl<L: RateLimiter + ?Sized> RateLimiter for Arc<L> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    async fn check(&self, key: &str, limit: &Limit, cost: u32) -> Result<Decision> {
        (**self).check(key, limit, cost).await
    }
}

#[async_trait]
impl<L: RateLimiter + ?Sized> RateLimiter for Box<L> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    async fn check(&self, key: &str, limit: &Limit, cost: u32) -> Result<Decision> {
        (**self).check(key, limit, cost).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emission_interval() {
        let ms = Duration::from_millis;
        assert_eq!(Limit::per_second(5).emission_interval().ok(), Some(ms(200)));
        assert_eq!(
            Limit::per_second(3).emission_interval().ok(),
            Some(Duration::from_micros(333_333))
        );
        assert_eq!(
            Limit::per_second(1_000_000).emission_interval().ok(),
            Some(Duration::from_micros(1))
        );
        assert!(Limit::per_second(1_000_001).emission_interval().is_err());
        assert!(Limit::per_second(0).emission_interval().is_err());
        assert!(Limit::new(1, Duration::ZERO).emission_interval().is_err());
        assert!(Limit::new(1, Limit::MAX_PER).emission_interval().is_ok());
        assert!(
            Limit::new(1, Limit::MAX_PER + ms(1))
                .emission_interval()
                .is_err()
        );
    }

    #[test]
    fn parse_and_print() {
        let p = |s: &str| s.parse::<Limit>().ok();
        assert_eq!(p("60/min"), Some(Limit::per_minute(60)));
        assert_eq!(p(" 20 / s "), Some(Limit::per_second(20)));
        assert_eq!(p("1000/hour"), Some(Limit::per_hour(1000)));
        assert_eq!(p("5/day"), Some(Limit::new(5, Duration::from_secs(86_400))));
        assert_eq!(p("100/10s"), Some(Limit::new(100, Duration::from_secs(10))));
        assert_eq!(
            p("10/500ms"),
            Some(Limit::new(10, Duration::from_millis(500)))
        );
        assert_eq!(
            p("3/2minutes"),
            Some(Limit::new(3, Duration::from_secs(120)))
        );
        for bad in [
            "",
            "60",
            "x/min",
            "60/",
            "60/fortnight",
            "0/min",
            "-1/s",
            "1/0s",
        ] {
            assert!(p(bad).is_none(), "{bad:?} parsed");
        }
        for s in [
            "60/min",
            "20/s",
            "1000/hour",
            "5/day",
            "100/10s",
            "10/500ms",
            "3/2m",
            "7/3h",
        ] {
            let l = p(s).unwrap_or_else(|| panic!("{s}"));
            assert_eq!(l.to_string().parse::<Limit>().ok(), Some(l), "{s}");
        }
        assert_eq!(Limit::new(3, Duration::from_secs(120)).to_string(), "3/2m");
    }

    #[test]
    fn share() {
        assert_eq!(Limit::per_minute(50).share(4), Limit::per_minute(12));
        assert_eq!(Limit::per_minute(3).share(4), Limit::per_minute(1));
        assert_eq!(Limit::per_minute(3).share(0), Limit::per_minute(3));
    }

    #[test]
    fn validation() {
        let l = Limit::per_second(5);
        assert!(matches!(
            validate(&l, 0),
            Err(RateLimitError::InvalidArgument(_))
        ));
        assert!(matches!(validate(&l, 6), Ok(None)));
        assert!(matches!(validate(&l, 5), Ok(Some(_))));
        assert!(matches!(
            validate(&Limit::per_second(0), 1),
            Err(RateLimitError::InvalidLimit(_))
        ));
    }
}
