//! Resilience for calls to a paid upstream: a circuit breaker, a retry policy with capped
//! exponential backoff and full jitter, and a retry budget.
//!
//! Pure logic around an injected [`Clock`]: no HTTP client, no web framework, no async
//! runtime. The caller classifies outcomes (an HTTP status, `UpstreamError::is_retryable()`)
//! and supplies the sleep function, so every rule is testable by moving a [`ManualClock`].
//!
//! * [`CircuitBreaker`] (`circuit.rs`): CLOSED → OPEN → HALF_OPEN → CLOSED or OPEN, opened by
//!   consecutive failures or by a failure rate over a sliding window with a minimum volume;
//!   HALF_OPEN admits a fixed number of probes, and a probe that never reports times out.
//! * [`RetryPolicy`] (`retry.rs`): whether and when to retry: idempotent requests only,
//!   retryable outcomes only, at most `max_attempts`, full-jitter backoff raised to the
//!   upstream's `Retry-After`, never past the overall deadline. [`retry`] drives an async
//!   operation with it.
//! * [`RetryBudget`] (`budget.rs`): retries limited to a share of recent requests plus a
//!   small floor, so retries cannot multiply load during an outage.
//!
//! # Example
//!
//! One upstream call through a breaker, retried under a policy and a budget. Each attempt
//! asks the breaker first; an open breaker ends the request at once (the gateway then
//! serves stale data or a 503 with `Retry-After`).
//!
//! ```
//! use std::sync::Arc;
//! use breaker::{
//!     retry, BreakerConfig, BudgetConfig, CircuitBreaker, Idempotence, ManualClock, Outcome,
//!     Rejected, RetryBudget, RetryPolicy, State, Stop,
//! };
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let clock = Arc::new(ManualClock::new());
//! let breaker = CircuitBreaker::with_clock(
//!     BreakerConfig { failure_threshold: 3, ..BreakerConfig::default() },
//!     clock.clone(),
//! )?;
//! let budget = RetryBudget::with_clock(BudgetConfig::default(), clock.clone())?;
//! let policy = RetryPolicy { max_attempts: 5, ..RetryPolicy::default() };
//! breaker.on_transition(|from, to| println!("breaker {from} -> {to}"));
//!
//! // An upstream that is down: every call answers 503.
//! let upstream = |_attempt: u32| async { 503u16 };
//!
//! let done = retry(
//!     &policy,
//!     &budget,
//!     Idempotence::of_method("GET", false),
//!     // In production: `|d| tokio::time::sleep(d)`.
//!     |d| {
//!         clock.advance(d);
//!         std::future::ready(())
//!     },
//!     // A refusal by the breaker is final: retrying an open circuit is pointless.
//!     |result: &Result<u16, Rejected>| match result {
//!         Ok(status) => Outcome::from_status(*status, None),
//!         Err(_rejected) => Outcome::Fatal,
//!     },
//!     |attempt| {
//!         let permit = breaker.try_acquire();
//!         async move {
//!             let permit = permit?;
//!             let status = upstream(attempt).await;
//!             permit.record(status < 500 && status != 429);
//!             Ok(status)
//!         }
//!     },
//! )
//! .await;
//!
//! // Three 503s opened the breaker; the fourth attempt was refused without a call.
//! assert_eq!(done.attempts, 4);
//! assert_eq!(done.stop, Stop::Fatal);
//! assert!(matches!(done.result, Err(rejected) if rejected.state == State::Open));
//! assert_eq!(breaker.state(), State::Open);
//!
//! // `GET /admin/breakers` material.
//! let snapshot = breaker.snapshot();
//! assert_eq!(snapshot.consecutive_failures, 3);
//! assert!(snapshot.next_probe_in.is_some());
//! # Ok::<(), breaker::Error>(())
//! # }).unwrap();
//! ```
//!
//! # What counts as a failure
//!
//! For the breaker, report [`Permit::failure`] for what says the upstream is unhealthy:
//! connect errors, timeouts, broken responses, 5xx, 429. Report [`Permit::success`] for
//! any other answer, 4xx included (the upstream is fine; the request was not). Drop the
//! permit (or [`Permit::ignore`] it) when the outcome says nothing about the upstream, such
//! as a request the gateway refused to send or a client that went away.

#![forbid(unsafe_code)]

mod budget;
mod circuit;
mod clock;
mod error;
mod retry;
mod ring;

pub use budget::{BudgetConfig, RetryBudget};
pub use circuit::{BreakerConfig, CircuitBreaker, Permit, Rejected, Snapshot, State};
pub use clock::{Clock, ManualClock, MonotonicClock};
pub use error::{Error, Result};
pub use retry::{
    Decision, Idempotence, Outcome, Retried, RetryPolicy, Stop, method_is_idempotent,
    parse_retry_after, retry, status_is_retryable,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn shared_types_are_send_and_sync() {
        assert_send_sync::<CircuitBreaker>();
        assert_send_sync::<Permit>();
        assert_send_sync::<RetryBudget>();
        assert_send_sync::<RetryPolicy>();
        assert_send_sync::<Error>();
        assert_send_sync::<ManualClock>();
    }
}
