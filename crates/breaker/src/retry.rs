//! When to try a request again, and how long to wait first.
//!
//! [`RetryPolicy::decide`] is a pure function of the attempt count, the attempt's
//! [`Outcome`], the time spent so far and a random source, so every rule is testable
//! without time passing. [`retry`] drives an async operation with it, a [`RetryBudget`]
//! and a sleep function supplied by the caller (so this crate needs no async runtime).
//!
//! The rules, in order:
//! 1. a [`Success`](Outcome::Success) or [`Fatal`](Outcome::Fatal) outcome is final;
//! 2. a request that is not [idempotent](Idempotence) is never sent twice;
//! 3. at most [`max_attempts`](RetryPolicy::max_attempts) attempts, the first included;
//! 4. the wait before retry *n* (0 for the first retry) is drawn uniformly from
//!    `[0, min(max, base · 2ⁿ)]` ("full jitter"), raised to the upstream's `Retry-After`
//!    when it asks for longer;
//! 5. no retry whose wait would reach the overall [`deadline`](RetryPolicy::deadline);
//! 6. ([`retry`] only) each retry must be paid for from the [`RetryBudget`].

use std::future::Future;
use std::time::{Duration, SystemTime};

use rand::{Rng, RngExt};

use crate::budget::RetryBudget;
use crate::clock::nanos;
use crate::error::{Error, Result};

/// Capped exponential backoff with full jitter, bounded by attempts and by a deadline.
///
/// ```
/// use std::time::Duration;
/// use breaker::{Decision, Idempotence, Outcome, RetryPolicy};
///
/// let policy = RetryPolicy::default(); // 3 attempts, 200 ms base, 4 s cap, 30 s deadline
/// let mut rng = rand::rng();
/// let throttled = Outcome::RetryableFailure { retry_after: Some(Duration::from_secs(2)) };
/// // After the first attempt was throttled, wait at least what the upstream asked for.
/// let delay = policy
///     .next_delay(Idempotence::Idempotent, 1, &throttled, Duration::ZERO, &mut rng)
///     .expect("retry");
/// assert!(delay >= Duration::from_secs(2));
/// // A POST the route did not mark retryable is never sent twice.
/// let post = Idempotence::of_method("POST", false);
/// assert!(matches!(
///     policy.decide(post, 1, &throttled, Duration::ZERO, &mut rng),
///     Decision::Stop(_)
/// ));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; `1` never retries. Default 3.
    pub max_attempts: u32,
    /// Ceiling of the first retry's jittered wait; doubles with each retry. Default 200 ms.
    pub base: Duration,
    /// The ceiling never grows past this. Default 4 s.
    pub max: Duration,
    /// Time budget of the whole request, measured from the start of the first attempt: no
    /// retry is started whose wait would reach it. Also caps how long an upstream's
    /// `Retry-After` can make us wait. Default 30 s.
    pub deadline: Duration,
}

/// How an attempt went, as the caller classifies it.
///
/// [`Outcome::from_status`] and [`Outcome::failure`] cover the usual cases: HTTP 429, 502,
/// 503, 504 and connect errors, timeouts and broken connections
/// (`UpstreamError::is_retryable()`) are retryable; everything else is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The attempt produced the answer; stop.
    Success,
    /// The attempt failed in a way another attempt may not.
    RetryableFailure {
        /// How long the upstream asked us to wait (its `Retry-After`), if it did.
        retry_after: Option<Duration>,
    },
    /// The attempt failed in a way another attempt would repeat (or produced a final
    /// answer such as a 404); stop.
    Fatal,
}

/// Whether a request may be sent more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotence {
    /// Sending it twice has the effect of sending it once: may be retried.
    Idempotent,
    /// Sending it twice may do something twice: never retried.
    NonIdempotent,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then try again.
    Retry {
        /// The wait.
        after: Duration,
    },
    /// Do not try again.
    Stop(Stop),
}

/// Why retrying stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stop {
    /// The last attempt succeeded.
    Succeeded,
    /// The last attempt failed in a way that is not retryable.
    Fatal,
    /// The request is not idempotent.
    NotIdempotent,
    /// `max_attempts` attempts were made.
    MaxAttempts,
    /// The next wait (the backoff or the upstream's `Retry-After`) would reach the deadline.
    Deadline,
    /// The retry budget had nothing left.
    BudgetExhausted,
}

/// The result of [`retry`]: the last attempt's result, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retried<T, E> {
    /// What the last attempt returned (a retryable failure too, if retrying stopped).
    pub result: Result<T, E>,
    /// Attempts made, the first included (at least 1).
    pub attempts: u32,
    /// Why no further attempt was made.
    pub stop: Stop,
}

// === impl RetryPolicy ===

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base: Duration::from_millis(200),
            max: Duration::from_secs(4),
            deadline: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Checks the settings: at least one attempt, `base <= max`, a non-zero deadline.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| Err(Error::config("retry", field, reason));
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1");
        }
        if self.base > self.max {
            return bad("base", "must not be greater than `max`");
        }
        if self.deadline.is_zero() {
            return bad("deadline", "must be greater than zero");
        }
        Ok(())
    }

    /// The ceiling of the jittered wait before retry number `retry` (0 for the first
    /// retry): `min(max, base · 2^retry)`, without overflow.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let grown = 1u32
            .checked_shl(retry)
            .map_or(Duration::MAX, |factor| self.base.saturating_mul(factor));
        grown.min(self.max)
    }

    /// A full-jitter wait before retry number `retry`: uniform in
    /// `[0, backoff_ceiling(retry)]` (nanosecond resolution).
    pub fn backoff<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let ceiling = nanos(self.backoff_ceiling(retry));
        Duration::from_nanos(rng.random_range(0..=ceiling))
    }

    /// What to do after attempt number `attempts` (1 for the first) ended with `outcome`,
    /// `elapsed` after the first attempt started. The rules, in order:
    ///
    /// 1. a [`Success`](Outcome::Success) or [`Fatal`](Outcome::Fatal) outcome is final;
    /// 2. a [`NonIdempotent`](Idempotence::NonIdempotent) request is never sent twice;
    /// 3. at most [`max_attempts`](Self::max_attempts) attempts, the first included;
    /// 4. the wait before retry *n* (0 for the first retry) is drawn uniformly from
    ///    `[0, min(max, base · 2ⁿ)]` ("full jitter"), raised to the upstream's
    ///    `Retry-After` when it asks for longer;
    /// 5. no retry whose wait would reach the [`deadline`](Self::deadline) (so a
    ///    `Retry-After` longer than the time left stops retrying at once).
    pub fn decide<R: Rng + ?Sized>(
        &self,
        idempotence: Idempotence,
        attempts: u32,
        outcome: &Outcome,
        elapsed: Duration,
        rng: &mut R,
    ) -> Decision {
        let retry_after = match *outcome {
            Outcome::Success => return Decision::Stop(Stop::Succeeded),
            Outcome::Fatal => return Decision::Stop(Stop::Fatal),
            Outcome::RetryableFailure { retry_after } => retry_after.unwrap_or_default(),
        };
        if idempotence == Idempotence::NonIdempotent {
            return Decision::Stop(Stop::NotIdempotent);
        }
        if attempts >= self.max_attempts {
            return Decision::Stop(Stop::MaxAttempts);
        }
        let wait = self
            .backoff(attempts.saturating_sub(1), rng)
            .max(retry_after);
        if wait >= self.deadline.saturating_sub(elapsed) {
            return Decision::Stop(Stop::Deadline);
        }
        Decision::Retry { after: wait }
    }

    /// [`decide`](Self::decide), reduced to the wait before the next attempt, or `None` to
    /// stop.
    pub fn next_delay<R: Rng + ?Sized>(
        &self,
        idempotence: Idempotence,
        attempts: u32,
        outcome: &Outcome,
        elapsed: Duration,
        rng: &mut R,
    ) -> Option<Duration> {
        self.decide(idempotence, attempts, outcome, elapsed, rng)
            .delay()
    }
}

// === impl Outcome ===

impl Outcome {
    /// Classifies an HTTP response status: [`status_is_retryable`] ones (429, 502, 503,
    /// 504) are retryable failures carrying `retry_after`; 1xx–3xx are successes; any other
    /// status (4xx, 500, 501, …) is final.
    pub fn from_status(status: u16, retry_after: Option<Duration>) -> Self {
        if status_is_retryable(status) {
            Self::RetryableFailure { retry_after }
        } else if status < 400 {
            Self::Success
        } else {
            Self::Fatal
        }
    }

    /// A failure without a response: retryable or not, e.g.
    /// `Outcome::failure(err.is_retryable())` for an `UpstreamError`.
    pub fn failure(retryable: bool) -> Self {
        if retryable {
            Self::RetryableFailure { retry_after: None }
        } else {
            Self::Fatal
        }
    }

    /// Whether this is a [`RetryableFailure`](Self::RetryableFailure).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::RetryableFailure { .. })
    }
}

// === impl Idempotence ===

impl Idempotence {
    /// [`method_is_idempotent`] methods are idempotent; any other method (POST, PATCH, …)
    /// only when its route is marked retryable (e.g. a compute API where identical bodies
    /// give identical answers).
    pub fn of_method(method: &str, route_marked_retryable: bool) -> Self {
        if route_marked_retryable || method_is_idempotent(method) {
            Self::Idempotent
        } else {
            Self::NonIdempotent
        }
    }
}

// === impl Decision ===

impl Decision {
    /// The wait before the next attempt, or `None` for [`Stop`](Decision::Stop).
    pub fn delay(self) -> Option<Duration> {
        match self {
            Self::Retry { after } => Some(after),
            Self::Stop(_) => None,
        }
    }
}

// === impl Stop ===

impl Stop {
    /// A short, stable name for metrics labels and logs: `"succeeded"`, `"fatal"`,
    /// `"not_idempotent"`, `"max_attempts"`, `"deadline"` or `"budget_exhausted"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Fatal => "fatal",
            Self::NotIdempotent => "not_idempotent",
            Self::MaxAttempts => "max_attempts",
            Self::Deadline => "deadline",
            Self::BudgetExhausted => "budget_exhausted",
        }
    }
}

// === impl Retried ===

impl<T, E> Retried<T, E> {
    /// The last attempt's result.
    pub fn into_result(self) -> Result<T, E> {
        self.result
    }

    /// Retries made (attempts after the first).
    pub fn retries(&self) -> u32 {
        self.attempts.saturating_sub(1)
    }
}

/// Whether an HTTP method is idempotent (RFC 9110 §9.2.2): GET, HEAD, PUT, DELETE, OPTIONS
/// and TRACE. Methods are case-sensitive: `get` is not `GET`.
pub fn method_is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"
    )
}

/// Whether an upstream answer with this status is worth retrying: 429 Too Many Requests,
/// 502 Bad Gateway, 503 Service Unavailable, 504 Gateway Timeout.
pub fn status_is_retryable(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

/// Parses a `Retry-After` header value (RFC 9110 §10.2.3) into a wait from `now`: either
/// delay-seconds (`"120"`) or an HTTP-date (`"Wed, 21 Oct 2015 07:28:00 GMT"`, also the
/// obsolete RFC 850 and asctime forms). A date in the past gives zero. Anything else
/// (negative or fractional seconds, garbage) gives `None`.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use breaker::parse_retry_after;
///
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470); // 07:27:50 GMT
/// assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
/// assert_eq!(
///     parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
///     Some(Duration::from_secs(10))
/// );
/// assert_eq!(parse_retry_after("soon", now), None);
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: only overflow can fail, and an absurd wait is still "very long".
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Runs `op` until it succeeds, fails for good, or the policy or the budget says stop.
///
/// * `op(n)` makes attempt `n` (1 for the first); `classify` turns its result into an
///   [`Outcome`] (e.g. `Ok(response)` with status 503 is a retryable failure).
/// * `sleep(d)` waits `d`: `|d| tokio::time::sleep(d)` in a tokio program; in tests, a
///   function that advances a [`ManualClock`](crate::ManualClock) and returns at once.
/// * The request is [deposited](RetryBudget::deposit) into `budget` once; every retry is
///   [withdrawn](RetryBudget::withdraw) from it. Elapsed time for the deadline is read from
///   the budget's clock.
///
/// Returns the last attempt's result with the attempt count and the reason it stopped. The
/// future is `Send` when `op`, `classify`, `sleep`, their futures, `T` and `E` are.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use breaker::{retry, BudgetConfig, Idempotence, ManualClock, Outcome, RetryBudget, RetryPolicy, Stop};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let clock = Arc::new(ManualClock::new());
/// let budget = RetryBudget::with_clock(BudgetConfig::default(), clock.clone())?;
/// let policy = RetryPolicy::default();
///
/// // The upstream fails twice with 503, then answers 200.
/// let statuses = [503, 503, 200];
/// let done = retry(
///     &policy,
///     &budget,
///     Idempotence::of_method("GET", false),
///     |d| { clock.advance(d); std::future::ready(()) }, // `tokio::time::sleep` in production
///     |result: &Result<u16, ()>| match result {
///         Ok(status) => Outcome::from_status(*status, None),
///         Err(()) => Outcome::failure(true),
///     },
///     |attempt| std::future::ready(Ok(statuses[attempt as usize - 1])),
/// )
/// .await;
/// assert_eq!(done.result, Ok(200));
/// assert_eq!(done.attempts, 3);
/// assert_eq!(done.stop, Stop::Succeeded);
/// # Ok::<(), breaker::Error>(())
/// # }).unwrap();
/// ```
pub async fn retry<T, E, Op, Fut, Sleep, SleepFut, Classify>(
    policy: &RetryPolicy,
    budget: &RetryBudget,
    idempotence: Idempotence,
    mut sleep: Sleep,
    mut classify: Classify,
    mut op: Op,
) -> Retried<T, E>
where
    Op: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    Sleep: FnMut(Duration) -> SleepFut,
    SleepFut: Future<Output = ()>,
    Classify: FnMut(&Result<T, E>) -> Outcome,
{
    let clock = budget.clock();
    let start = clock.now();
    budget.deposit();
    let mut attempts = 0u32;
    loop {
        attempts = attempts.saturating_add(1);
        let result = op(attempts).await;
        let outcome = classify(&result);
        let elapsed = clock.now().saturating_sub(start);
        // `rand::rng()` is not `Send`: create and drop it within this statement so it is
        // never held across an await.
        let decision = policy.decide(idempotence, attempts, &outcome, elapsed, &mut rand::rng());
        let stop = match decision {
            Decision::Retry { .. } if !budget.withdraw() => Stop::BudgetExhausted,
            Decision::Retry { after } => {
                drop(result);
                sleep(after).await;
                continue;
            }
            Decision::Stop(stop) => stop,
        };
        return Retried {
            result,
            attempts,
            stop,
        };
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;

    const RETRYABLE: Outcome = Outcome::RetryableFailure { retry_after: None };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ceiling_doubles_then_caps_without_overflow() {
        let policy = RetryPolicy {
            base: ms(100),
            max: ms(1000),
            ..RetryPolicy::default()
        };
        let ceilings: Vec<_> = (0..6).map(|n| policy.backoff_ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        assert_eq!(policy.backoff_ceiling(31), ms(1000));
        assert_eq!(policy.backoff_ceiling(32), ms(1000));
        assert_eq!(policy.backoff_ceiling(u32::MAX), ms(1000));
    }

    #[test]
    fn final_outcomes_stop_first() {
        let policy = RetryPolicy::default();
        let mut rng = SmallRng::seed_from_u64(1);
        let idem = Idempotence::Idempotent;
        assert_eq!(
            policy.decide(idem, 1, &Outcome::Success, Duration::ZERO, &mut rng),
            Decision::Stop(Stop::Succeeded)
        );
        assert_eq!(
            policy.decide(idem, 1, &Outcome::Fatal, Duration::ZERO, &mut rng),
            Decision::Stop(Stop::Fatal)
        );
        // A success of a POST is a success, not "not idempotent".
        assert_eq!(
            policy.decide(
                Idempotence::NonIdempotent,
                1,
                &Outcome::Success,
                Duration::ZERO,
                &mut rng
            ),
            Decision::Stop(Stop::Succeeded)
        );
    }

    #[test]
    fn max_attempts_counts_the_first() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let mut rng = SmallRng::seed_from_u64(2);
        let idem = Idempotence::Idempotent;
        assert!(
            policy
                .next_delay(idem, 1, &RETRYABLE, Duration::ZERO, &mut rng)
                .is_some()
        );
        assert!(
            policy
                .next_delay(idem, 2, &RETRYABLE, Duration::ZERO, &mut rng)
                .is_some()
        );
        assert_eq!(
            policy.decide(idem, 3, &RETRYABLE, Duration::ZERO, &mut rng),
            Decision::Stop(Stop::MaxAttempts)
        );
        let once = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        assert_eq!(
            once.decide(idem, 1, &RETRYABLE, Duration::ZERO, &mut rng),
            Decision::Stop(Stop::MaxAttempts)
        );
    }

    #[test]
    fn classification_helpers() {
        for status in [429, 502, 503, 504] {
            assert!(status_is_retryable(status), "{status}");
            assert_eq!(
                Outcome::from_status(status, Some(ms(5))),
                Outcome::RetryableFailure {
                    retry_after: Some(ms(5))
                }
            );
        }
        for status in [200, 204, 304] {
            assert!(!status_is_retryable(status));
            assert_eq!(Outcome::from_status(status, None), Outcome::Success);
        }
        for status in [400, 401, 404, 409, 500, 501, 505] {
            assert!(!status_is_retryable(status), "{status}");
            assert_eq!(Outcome::from_status(status, None), Outcome::Fatal);
        }
        assert!(Outcome::failure(true).is_retryable());
        assert_eq!(Outcome::failure(false), Outcome::Fatal);

        for method in ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"] {
            assert!(method_is_idempotent(method), "{method}");
            assert_eq!(
                Idempotence::of_method(method, false),
                Idempotence::Idempotent
            );
        }
        for method in ["POST", "PATCH", "CONNECT", "get", ""] {
            assert!(!method_is_idempotent(method), "{method}");
            assert_eq!(
                Idempotence::of_method(method, false),
                Idempotence::NonIdempotent
            );
            assert_eq!(
                Idempotence::of_method(method, true),
                Idempotence::Idempotent
            );
        }
    }

    #[test]
    fn retry_after_parsing() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470); // 07:27:50
        let secs = Duration::from_secs;
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(" 30 ", now), Some(secs(30)));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(secs(10))
        );
        // Obsolete forms a recipient must accept.
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:28:00 GMT", now),
            Some(secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed Oct 21 07:28:00 2015", now),
            Some(secs(10))
        );
        // In the past: retry now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in [
            "",
            "-1",
            "1.5",
            "+3",
            "soon",
            "Wed, 32 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn policy_validation_names_the_field() {
        assert!(RetryPolicy::default().validate().is_ok());
        let cases = [
            (
                RetryPolicy {
                    max_attempts: 0,
                    ..RetryPolicy::default()
                },
                "max_attempts",
            ),
            (
                RetryPolicy {
                    base: ms(10),
                    max: ms(5),
                    ..RetryPolicy::default()
                },
                "base",
            ),
            (
                RetryPolicy {
                    deadline: Duration::ZERO,
                    ..RetryPolicy::default()
                },
                "deadline",
            ),
        ];
        for (policy, field) in cases {
            match policy.validate() {
                Err(Error::Config { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn stop_names() {
        assert_eq!(Stop::BudgetExhausted.as_str(), "budget_exhausted");
        assert_eq!(Stop::NotIdempotent.as_str(), "not_idempotent");
    }
}
