//! What protects one upstream: its circuit breaker, its retry policy and its retry budget,
//! and how an attempt's result is judged by each.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use breaker::{
    BreakerConfig, BudgetConfig, CircuitBreaker, Clock, Outcome, Permit, RetryBudget, RetryPolicy,
};

use crate::client::UpstreamResponse;
use crate::error::{Result, UpstreamError};

/// The longest stretch of the `timeout` kept free for the attempt a retry starts.
const MAX_RESERVE: Duration = Duration::from_secs(1);

/// How calls to one upstream are protected: a circuit breaker, retries, a retry budget.
///
/// The default turns everything on: the breaker with [`BreakerConfig::default`] (5 failures
/// in a row or 50 % of at least 20 calls in 10 s open it for 30 s, then one probe), retries
/// with [`RetryPolicy::default`] (3 attempts, full-jitter backoff from 200 ms up to 4 s) and
/// a budget of [`BudgetConfig::default`] (retries ≤ 20 % of the requests of the last 10 s,
/// plus 1 per second). [`Resilience::disabled`] turns the breaker and retries off.
///
/// Two settings are adjusted to the upstream's `timeout` when the client is built:
/// * the retry deadline is at most `timeout`: the whole [`send`](crate::UpstreamClient::send),
///   retries and backoff included, ends within `timeout` (see there for the exact bound);
/// * the breaker's `probe_timeout` is raised to `timeout` when it is shorter, so a probe
///   that is slow but within the timeout is not judged failed before it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Resilience {
    /// The circuit breaker; `None`: always closed.
    pub breaker: Option<BreakerConfig>,
    /// Retries of retryable failures; `None`: one attempt per request.
    pub retry: Option<RetryPolicy>,
    /// Caps retries at a share of recent requests (used only when `retry` is set).
    pub budget: BudgetConfig,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            breaker: Some(BreakerConfig::default()),
            retry: Some(RetryPolicy::default()),
            budget: BudgetConfig::default(),
        }
    }
}

impl Resilience {
    /// No breaker and no retries: every request is exactly one attempt, as sent.
    pub fn disabled() -> Self {
        Self {
            breaker: None,
            retry: None,
            budget: BudgetConfig::default(),
        }
    }
}

// === impl Guard ===

/// The live protection of one upstream, shared by every clone of its client.
pub(crate) struct Guard {
    pub(crate) breaker: Option<CircuitBreaker>,
    /// The retry policy with its deadline fitted to the upstream's timeout.
    pub(crate) policy: Option<RetryPolicy>,
    pub(crate) budget: RetryBudget,
    pub(crate) retries: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) budget_exhausted: AtomicU64,
}

impl Guard {
    /// Builds the breaker and budget on `clock`, fitting the settings to `timeout` (see
    /// [`Resilience`]). Transitions are logged at `warn` with the upstream's name.
    pub(crate) fn new(
        upstream: &str,
        r: &Resilience,
        timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let bad = |e: breaker::Error| UpstreamError::config(format!("upstream {upstream}: {e}"));
        let breaker = match &r.breaker {
            None => None,
            Some(config) => {
                let config = BreakerConfig {
                    probe_timeout: config.probe_timeout.max(timeout),
                    ..config.clone()
                };
                let breaker =
                    CircuitBreaker::with_clock(config, Arc::clone(&clock)).map_err(bad)?;
                let name = upstream.to_owned();
                breaker.on_transition(move |from, to| {
                    tracing::warn!(
                        upstream = %name,
                        from = from.as_str(),
                        to = to.as_str(),
                        "circuit breaker transition"
                    );
                });
                Some(breaker)
            }
        };
        let policy = match &r.retry {
            None => None,
            Some(policy) => {
                policy.validate().map_err(bad)?;
                Some(RetryPolicy {
                    deadline: retry_deadline(policy.deadline, timeout),
                    ..policy.clone()
                })
            }
        };
        let budget = RetryBudget::with_clock(r.budget.clone(), clock).map_err(bad)?;
        Ok(Self {
            breaker,
            policy,
            budget,
            retries: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            budget_exhausted: AtomicU64::new(0),
        })
    }

    /// Asks the breaker for one attempt: `Ok(None)` without a breaker, `Ok(Some(permit))`
    /// when admitted, [`UpstreamError::Unavailable`] (counted) when refused.
    pub(crate) fn admit(&self, upstream: &str) -> Result<Option<Permit>> {
        let Some(breaker) = &self.breaker else {
            return Ok(None);
        };
        match breaker.try_acquire() {
            Ok(permit) => Ok(Some(permit)),
            Err(rejected) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    upstream,
                    state = rejected.state.as_str(),
                    retry_after = ?rejected.retry_after,
                    "upstream call refused by the circuit breaker"
                );
                Err(UpstreamError::Unavailable {
                    upstream: upstream.to_owned(),
                    retry_after: rejected.retry_after,
                })
            }
        }
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("breaker", &self.breaker)
            .field("policy", &self.policy)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// The time a retry may start by: `deadline`, but never so late that the attempt would get
/// less than `min(timeout / 10, 1 s)` of the `timeout` the whole request shares.
pub(crate) fn retry_deadline(deadline: Duration, timeout: Duration) -> Duration {
    let reserve = (timeout / 10).min(MAX_RESERVE);
    deadline.min(timeout.saturating_sub(reserve))
}

/// Whether a status says the upstream is working: anything but 429 and 5xx (a 404 is an
/// upstream answering correctly about a missing thing).
pub(crate) fn status_is_healthy(status: u16) -> bool {
    status < 500 && status != 429
}

/// Reports one attempt to the breaker.
///
/// * a response: success unless it is 429 or 5xx;
/// * a body over the cap: judged by its status (the upstream did answer);
/// * connect errors, timeouts, protocol errors: failure, except a timeout of an attempt whose
///   time was `cut_short` by the request's deadline (a retry late in the request): that
///   says more about our deadline than about the upstream, and is not counted;
/// * anything else (a request that could not be built): not counted.
pub(crate) fn report(
    permit: Permit,
    result: &Result<UpstreamResponse>,
    status: Option<u16>,
    cut_short: bool,
) {
    match result {
        Ok(response) => permit.record(status_is_healthy(response.status)),
        Err(UpstreamError::BodyTooLarge { .. }) => match status {
            Some(status) => permit.record(status_is_healthy(status)),
            None => permit.ignore(),
        },
        Err(e) if e.is_timeout() && cut_short => permit.ignore(),
        Err(e) if e.is_retryable() => permit.failure(),
        Err(_) => permit.ignore(),
    }
}

/// How an attempt went, for the retry policy: 429/502/503/504 responses (with the
/// upstream's `Retry-After`) and retryable errors may be retried; anything else is final.
pub(crate) fn classify(result: &Result<UpstreamResponse>) -> Outcome {
    match result {
        Ok(response) => {
            let retry_after = if breaker::status_is_retryable(response.status) {
                response
                    .header("retry-after")
                    .and_then(|v| breaker::parse_retry_after(v, SystemTime::now()))
            } else {
                None
            };
            Outcome::from_status(response.status, retry_after)
        }
        Err(e) => Outcome::failure(e.is_retryable()),
    }
}

/// Why an attempt is being retried, for the debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Reason {
    /// No attempt finished yet.
    #[default]
    None,
    /// The upstream answered with this status.
    Status(u16),
    /// The attempt failed with this [`UpstreamError::kind`].
    Error(&'static str),
}

impl Reason {
    pub(crate) fn of(result: &Result<UpstreamResponse>) -> Self {
        match result {
            Ok(response) => Self::Status(response.status),
            Err(e) => Self::Error(e.kind()),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Status(status) => write!(f, "status {status}"),
            Self::Error(kind) => f.write_str(kind),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn response(status: u16, retry_after: Option<&str>) -> Result<UpstreamResponse> {
        Ok(UpstreamResponse {
            status,
            headers: retry_after
                .map(|v| vec![("retry-after".to_owned(), v.to_owned())])
                .unwrap_or_default(),
            body: bytes::Bytes::new(),
        })
    }

    #[test]
    fn retry_deadline_leaves_room_for_the_last_attempt() {
        assert_eq!(retry_deadline(Duration::from_secs(30), ms(500)), ms(450));
        assert_eq!(
            retry_deadline(Duration::from_secs(30), Duration::from_secs(30)),
            Duration::from_secs(29)
        );
        assert_eq!(
            retry_deadline(Duration::from_secs(2), Duration::from_secs(30)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn statuses_for_the_breaker_and_for_retries() {
        for healthy in [200, 204, 301, 304, 400, 401, 404, 409] {
            assert!(status_is_healthy(healthy), "{healthy}");
        }
        for unhealthy in [429, 500, 501, 502, 503, 504] {
            assert!(!status_is_healthy(unhealthy), "{unhealthy}");
        }
        assert_eq!(classify(&response(200, None)), Outcome::Success);
        assert_eq!(classify(&response(404, Some("5"))), Outcome::Fatal);
        assert_eq!(classify(&response(500, Some("5"))), Outcome::Fatal);
        assert_eq!(
            classify(&response(503, Some("2"))),
            Outcome::RetryableFailure {
                retry_after: Some(Duration::from_secs(2))
            }
        );
        assert_eq!(
            classify(&response(429, Some("soon"))),
            Outcome::RetryableFailure { retry_after: None }
        );
        let timeout = Err(UpstreamError::Timeout {
            upstream: "u".into(),
            message: "m".into(),
        });
        assert!(classify(&timeout).is_retryable());
        assert_eq!(
            classify(&Err(UpstreamError::BodyTooLarge { limit: 1 })),
            Outcome::Fatal
        );
        let open = Err(UpstreamError::Unavailable {
            upstream: "u".into(),
            retry_after: ms(5),
        });
        assert_eq!(classify(&open), Outcome::Fatal);
        assert_eq!(Reason::of(&timeout).to_string(), "timeout");
        assert_eq!(Reason::of(&response(503, None)).to_string(), "status 503");
    }

    #[test]
    fn invalid_settings_are_config_errors() {
        let clock: Arc<dyn Clock> = Arc::new(breaker::ManualClock::new());
        let r = Resilience {
            retry: Some(RetryPolicy {
                max_attempts: 0,
                ..RetryPolicy::default()
            }),
            ..Resilience::default()
        };
        let err = Guard::new("u", &r, ms(100), Arc::clone(&clock)).unwrap_err();
        assert_eq!(err.kind(), "config");
        assert!(err.to_string().contains("max_attempts"), "{err}");

        let r = Resilience {
            breaker: Some(BreakerConfig {
                half_open_probes: 0,
                ..BreakerConfig::default()
            }),
            ..Resilience::default()
        };
        let err = Guard::new("u", &r, ms(100), Arc::clone(&clock)).unwrap_err();
        assert!(err.to_string().contains("half_open_probes"), "{err}");

        let guard = Guard::new("u", &Resilience::default(), Duration::from_secs(60), clock)
            .expect("defaults are valid");
        let breaker = guard.breaker.as_ref().expect("on by default");
        assert_eq!(breaker.config().probe_timeout, Duration::from_secs(60));
        assert!(guard.policy.is_some());
        assert!(format!("{guard:?}").contains("Guard"));
    }
}
