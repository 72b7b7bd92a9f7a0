//! The circuit breaker: CLOSED → OPEN → HALF_OPEN → CLOSED or OPEN again.
//!
//! * **CLOSED**: every call is admitted. Outcomes are counted: consecutive failures, and
//!   calls and failures over a sliding window. The breaker opens when
//!   [`failure_threshold`](BreakerConfig::failure_threshold) failures happen in a row, or
//!   when the window holds at least [`minimum_volume`](BreakerConfig::minimum_volume) calls
//!   and at least [`failure_rate`](BreakerConfig::failure_rate) of them failed.
//! * **OPEN**: every call is rejected at once with the time left until the breaker will
//!   admit a probe. After [`open_for`](BreakerConfig::open_for) it becomes HALF_OPEN.
//! * **HALF_OPEN**: at most [`half_open_probes`](BreakerConfig::half_open_probes) probes are
//!   in flight at once; everyone else is rejected. One probe failure re-opens the breaker;
//!   `half_open_probes` probe successes close it. A probe that reports nothing within
//!   [`probe_timeout`](BreakerConfig::probe_timeout) counts as a failure, so a hung probe
//!   cannot wedge the breaker.
//!
//! Time-driven transitions (OPEN → HALF_OPEN, a probe timing out) are applied lazily, by
//! whichever call next looks at the breaker; they are dated to the moment they became due,
//! not to the moment they were noticed.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::clock::{Clock, MonotonicClock};
use crate::error::{Error, Result};
use crate::ring::Ring;

/// How many buckets the failure-rate window is divided into.
const WINDOW_BUCKETS: u32 = 10;

/// Settings of one [`CircuitBreaker`].
///
/// ```
/// use std::time::Duration;
/// use breaker::BreakerConfig;
///
/// let config = BreakerConfig {
///     failure_threshold: 5,
///     open_for: Duration::from_secs(30),
///     ..BreakerConfig::default()
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Open after this many failures in a row while CLOSED. `0` turns this trigger off.
    /// Default 5.
    pub failure_threshold: u32,
    /// Open when at least this share (in `(0, 1]`) of the calls in the window failed, once
    /// the window holds `minimum_volume` calls. `None` turns this trigger off. Default 50 %.
    pub failure_rate: Option<f64>,
    /// The failure-rate trigger ignores windows holding fewer calls than this. Default 20.
    pub minimum_volume: u32,
    /// Length of the sliding window the failure rate is measured over (kept as 10 buckets
    /// of `window / 10`). Default 10 s.
    pub window: Duration,
    /// How long the breaker stays OPEN before admitting probes. Default 30 s.
    pub open_for: Duration,
    /// Probes admitted at once in HALF_OPEN, and probe successes needed to close.
    /// At least 1. Default 1.
    pub half_open_probes: u32,
    /// A probe that has not reported after this long counts as failed and frees its slot.
    /// Set it at or above the upstream call's own total timeout. Default 10 s.
    pub probe_timeout: Duration,
}

/// The three states of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls are rejected until the open period ends.
    Open,
    /// A limited number of probe calls decide whether to close or re-open.
    HalfOpen,
}

/// A call the breaker refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker {state}: retry after {retry_after:?}")]
#[non_exhaustive]
pub struct Rejected {
    /// How long until the breaker may admit a call again: in OPEN, the rest of the open
    /// period; in HALF_OPEN with every probe slot taken, the time until the oldest probe
    /// times out (by then the breaker will have left HALF_OPEN). Always greater than zero.
    pub retry_after: Duration,
    /// The state that refused the call: [`State::Open`] or [`State::HalfOpen`].
    pub state: State,
}

/// A point-in-time view of a breaker, for metrics and `GET /admin/breakers`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The current state.
    pub state: State,
    /// Failures in a row counted while CLOSED (in OPEN: the count that was reached).
    pub consecutive_failures: u32,
    /// Calls that reported an outcome within the window.
    pub calls_in_window: u32,
    /// Of those, the failures.
    pub failures_in_window: u32,
    /// `failures_in_window / calls_in_window`; `None` for an empty window.
    pub failure_rate: Option<f64>,
    /// When the breaker last opened, as a reading of its [`Clock`]; `None` while CLOSED.
    pub opened_at: Option<Duration>,
    /// How long until a probe can be admitted: `None` while CLOSED, zero in HALF_OPEN
    /// with a free slot.
    pub next_probe_in: Option<Duration>,
    /// Probes admitted and not yet reported (HALF_OPEN only).
    pub probes_in_flight: u32,
}

/// Admission to make one call through a breaker. Report how it went with
/// [`success`](Self::success) or [`failure`](Self::failure).
///
/// Dropping a permit without reporting (the request was cancelled, or the outcome says
/// nothing about the upstream's health) counts as neither: the call is not counted, and a
/// HALF_OPEN probe slot is freed for the next caller. [`ignore`](Self::ignore) does the
/// same, explicitly.
///
/// Reports that arrive after the breaker changed state (a CLOSED call that ends after the
/// breaker opened, a probe that already timed out) are ignored: they describe an upstream
/// the breaker has already judged.
#[must_use = "a permit records nothing unless `success()` or `failure()` is called"]
pub struct Permit {
    inner: Arc<Inner>,
    generation: u64,
    kind: Kind,
    reported: bool,
}

/// A circuit breaker for one upstream. Cheap to clone; clones share state.
///
/// * **CLOSED**: every call is admitted and its outcome counted. Opens after
///   [`failure_threshold`](BreakerConfig::failure_threshold) failures in a row, or when the
///   sliding [`window`](BreakerConfig::window) holds at least
///   [`minimum_volume`](BreakerConfig::minimum_volume) calls of which at least
///   [`failure_rate`](BreakerConfig::failure_rate) failed.
/// * **OPEN**: every call is rejected at once with the time left; after
///   [`open_for`](BreakerConfig::open_for) the breaker becomes HALF_OPEN.
/// * **HALF_OPEN**: at most [`half_open_probes`](BreakerConfig::half_open_probes) probes in
///   flight, everyone else rejected. A probe failure re-opens the breaker; that many probe
///   successes close it. A probe silent for [`probe_timeout`](BreakerConfig::probe_timeout)
///   counts as a failure (re-opening the breaker as of its deadline) and frees its slot.
///
/// Time-driven transitions happen lazily, in whichever call next looks at the breaker,
/// dated to the moment they became due.
///
/// Thread-safe: every method takes `&self` and holds an internal lock only for a few
/// arithmetic steps (never across a call, a callback or an await).
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use breaker::{BreakerConfig, CircuitBreaker, ManualClock, State};
///
/// let clock = Arc::new(ManualClock::new());
/// let config = BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() };
/// let breaker = CircuitBreaker::with_clock(config, clock.clone())?;
///
/// breaker.try_acquire()?.failure();
/// breaker.try_acquire()?.failure();
/// assert_eq!(breaker.state(), State::Open);
/// let rejected = breaker.try_acquire().err().expect("open");
/// assert_eq!(rejected.retry_after, Duration::from_secs(30));
///
/// clock.advance(Duration::from_secs(30));
/// let probe = breaker.try_acquire()?;
/// assert!(probe.is_probe());
/// probe.success();
/// assert_eq!(breaker.state(), State::Closed);
/// # Ok::<(), breaker::Error>(())
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

type Hook = Arc<dyn Fn(State, State) + Send + Sync>;

struct Inner {
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    machine: Mutex<Machine>,
    hook: Mutex<Option<Hook>>,
}

/// Everything that changes, behind one lock.
#[derive(Debug)]
struct Machine {
    state: State,
    /// Bumped on every transition; permits from an older generation report into nothing.
    generation: u64,
    consecutive_failures: u32,
    window: Ring<Counts>,
    /// When the breaker (last) opened; `None` while CLOSED.
    opened_at: Option<Duration>,
    /// HALF_OPEN probes in flight.
    probes: Vec<Probe>,
    probe_successes: u32,
    next_probe_id: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    calls: u32,
    failures: u32,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    id: u64,
    deadline: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A call admitted while CLOSED.
    Call,
    /// A HALF_OPEN probe.
    Probe(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    Success,
    Failure,
    Cancelled,
}

/// Transitions made under the lock, announced after it is released.
type Transitions = Vec<(State, State)>;

// === impl BreakerConfig ===

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_rate: Some(0.5),
            minimum_volume: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
            probe_timeout: Duration::from_secs(10),
        }
    }
}

impl BreakerConfig {
    /// Checks the settings: a failure rate in `(0, 1]`, a non-zero window, probe count and
    /// probe timeout.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason| Err(Error::config("breaker", field, reason));
        if let Some(rate) = self.failure_rate
            && !(rate > 0.0 && rate <= 1.0)
        {
            return bad(
                "failure_rate",
                format!("must be greater than 0 and at most 1, not {rate}"),
            );
        }
        if self.window.is_zero() {
            return bad("window", "must be greater than zero".to_owned());
        }
        if self.half_open_probes == 0 {
            return bad("half_open_probes", "must be at least 1".to_owned());
        }
        if self.probe_timeout.is_zero() {
            return bad("probe_timeout", "must be greater than zero".to_owned());
        }
        Ok(())
    }
}

// === impl State ===

impl State {
    /// A short, stable name for metrics labels and JSON: `"closed"`, `"open"` or
    /// `"half_open"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl CircuitBreaker ===

impl CircuitBreaker {
    /// A CLOSED breaker on the real monotonic clock.
    pub fn new(config: BreakerConfig) -> Result<Self> {
        Self::with_clock(config, Arc::new(MonotonicClock::new()))
    }

    /// A CLOSED breaker reading time from `clock` (a [`ManualClock`](crate::ManualClock) in
    /// tests).
    pub fn with_clock(config: BreakerConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        config.validate()?;
        let machine = Machine {
            state: State::Closed,
            generation: 0,
            consecutive_failures: 0,
            window: Ring::new(config.window, WINDOW_BUCKETS),
            opened_at: None,
            probes: Vec::with_capacity(config.half_open_probes.min(64) as usize),
            probe_successes: 0,
            next_probe_id: 0,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                clock,
                machine: Mutex::new(machine),
                hook: Mutex::new(None),
            }),
        })
    }

    /// The settings this breaker was made with.
    pub fn config(&self) -> &BreakerConfig {
        &self.inner.config
    }

    /// Asks to make one call. CLOSED: always admitted. OPEN: rejected. HALF_OPEN: admitted
    /// as a probe while fewer than `half_open_probes` probes are in flight, else rejected.
    ///
    /// Never blocks and never waits; a rejection says how long to wait.
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let now = self.inner.clock.now();
        let mut transitions = Transitions::new();
        let decision = {
            let mut machine = self.inner.lock();
            machine.advance(&self.inner.config, now, &mut transitions);
            machine.admit(&self.inner.config, now)
        };
        self.inner.announce(transitions);
        decision.map(|(generation, kind)| Permit {
            inner: Arc::clone(&self.inner),
            generation,
            kind,
            reported: false,
        })
    }

    /// The current state (applying any time-driven transition that is due).
    pub fn state(&self) -> State {
        self.snapshot().state
    }

    /// A consistent view of the state and counters (applying any time-driven transition
    /// that is due).
    pub fn snapshot(&self) -> Snapshot {
        let now = self.inner.clock.now();
        let mut transitions = Transitions::new();
        let snapshot = {
            let mut machine = self.inner.lock();
            machine.advance(&self.inner.config, now, &mut transitions);
            machine.snapshot(&self.inner.config, now)
        };
        self.inner.announce(transitions);
        snapshot
    }

    /// Sets the function called on every state change with `(from, to)`, replacing any
    /// previous one; e.g. to log transitions.
    ///
    /// It runs on the thread whose call caused (or, for time-driven transitions, noticed)
    /// the change, after the breaker's lock is released, so it may call back into the
    /// breaker. Calls from different threads may overlap; keep it short.
    pub fn on_transition(&self, hook: impl Fn(State, State) + Send + Sync + 'static) {
        *self
            .inner
            .hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(hook));
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.lock().state;
        f.debug_struct("CircuitBreaker")
            .field("config", &self.inner.config)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

// === impl Inner ===

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Machine> {
        // The machine is only changed by code that cannot panic half-way through a change
        // (no user code runs under the lock), so a poisoned lock holds a consistent state.
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, generation: u64, kind: Kind, report: Report) {
        let now = self.clock.now();
        let mut transitions = Transitions::new();
        {
            let mut machine = self.lock();
            machine.advance(&self.config, now, &mut transitions);
            machine.record(
                &self.config,
                now,
                generation,
                kind,
                report,
                &mut transitions,
            );
        }
        self.announce(transitions);
    }

    fn announce(&self, transitions: Transitions) {
        if transitions.is_empty() {
            return;
        }
        let hook = self
            .hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            for (from, to) in transitions {
                hook(from, to);
            }
        }
    }
}

// === impl Machine ===

impl Machine {
    fn transition(&mut self, to: State, at: Duration, transitions: &mut Transitions) {
        transitions.push((self.state, to));
        self.state = to;
        self.generation = self.generation.wrapping_add(1);
        self.probes.clear();
        self.probe_successes = 0;
        match to {
            State::Open => self.opened_at = Some(at),
            State::HalfOpen => {}
            State::Closed => {
                self.opened_at = None;
                self.consecutive_failures = 0;
                self.window.clear();
            }
        }
    }

    /// The end of the open period, if OPEN.
    fn open_until(&self, config: &BreakerConfig) -> Option<Duration> {
        match (self.state, self.opened_at) {
            (State::Open, Some(at)) => Some(at.saturating_add(config.open_for)),
            _ => None,
        }
    }

    /// Applies the transitions time has made due: OPEN → HALF_OPEN when the open period
    /// ends; HALF_OPEN → OPEN when a probe's deadline passes (dated at that deadline, so the
    /// new open period may itself already be over).
    fn advance(&mut self, config: &BreakerConfig, now: Duration, transitions: &mut Transitions) {
        loop {
            match self.state {
                State::Closed => return,
                State::Open => match self.open_until(config) {
                    Some(until) if until > now => return,
                    _ => self.transition(State::HalfOpen, now, transitions),
                },
                State::HalfOpen => {
                    let expired = self
                        .probes
                        .iter()
                        .map(|probe| probe.deadline)
                        .filter(|deadline| *deadline <= now)
                        .min();
                    match expired {
                        Some(deadline) => self.transition(State::Open, deadline, transitions),
                        None => return,
                    }
                }
            }
        }
    }

    fn admit(&mut self, config: &BreakerConfig, now: Duration) -> Result<(u64, Kind), Rejected> {
        match self.state {
            State::Closed => Ok((self.generation, Kind::Call)),
            State::Open => {
                let until = self.open_until(config).unwrap_or(now);
                Err(Rejected {
                    retry_after: until.saturating_sub(now),
                    state: State::Open,
                })
            }
            State::HalfOpen => {
                if self.probes.len() < config.half_open_probes as usize {
                    let id = self.next_probe_id;
                    self.next_probe_id = self.next_probe_id.wrapping_add(1);
                    self.probes.push(Probe {
                        id,
                        deadline: now.saturating_add(config.probe_timeout),
                    });
                    Ok((self.generation, Kind::Probe(id)))
                } else {
                    Err(Rejected {
                        retry_after: self.earliest_probe_deadline(now).saturating_sub(now),
                        state: State::HalfOpen,
                    })
                }
            }
        }
    }

    fn earliest_probe_deadline(&self, now: Duration) -> Duration {
        self.probes
            .iter()
            .map(|probe| probe.deadline)
            .min()
            .unwrap_or(now)
    }

    fn record(
        &mut self,
        config: &BreakerConfig,
        now: Duration,
        generation: u64,
        kind: Kind,
        report: Report,
        transitions: &mut Transitions,
    ) {
        if generation != self.generation {
            return;
        }
        match kind {
            Kind::Call => match report {
                Report::Cancelled => {}
                Report::Success => {
                    self.consecutive_failures = 0;
                    self.window.current(now).calls += 1;
                }
                Report::Failure => {
                    self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                    let counts = self.window.current(now);
                    counts.calls += 1;
                    counts.failures += 1;
                    if self.should_open(config, now) {
                        self.transition(State::Open, now, transitions);
                    }
                }
            },
            Kind::Probe(id) => {
                let Some(index) = self.probes.iter().position(|probe| probe.id == id) else {
                    return;
                };
                self.probes.swap_remove(index);
                match report {
                    Report::Cancelled => {}
                    Report::Success => {
                        self.probe_successes += 1;
                        if self.probe_successes >= config.half_open_probes {
                            self.transition(State::Closed, now, transitions);
                        }
                    }
                    Report::Failure => self.transition(State::Open, now, transitions),
                }
            }
        }
    }

    fn window_counts(&self, now: Duration) -> Counts {
        self.window
            .live(now)
            .fold(Counts::default(), |total, counts| Counts {
                calls: total.calls.saturating_add(counts.calls),
                failures: total.failures.saturating_add(counts.failures),
            })
    }

    fn should_open(&self, config: &BreakerConfig, now: Duration) -> bool {
        if config.failure_threshold > 0 && self.consecutive_failures >= config.failure_threshold {
            return true;
        }
        let Some(rate) = config.failure_rate else {
            return false;
        };
        let counts = self.window_counts(now);
        // Divide rather than multiply: `3 / 10` rounds to exactly the `0.3` a config holds,
        // `0.3 * 10` does not.
        counts.calls > 0
            && counts.calls >= config.minimum_volume
            && f64::from(counts.failures) / f64::from(counts.calls) >= rate
    }

    fn snapshot(&self, config: &BreakerConfig, now: Duration) -> Snapshot {
        let counts = self.window_counts(now);
        let next_probe_in = match self.state {
            State::Closed => None,
            State::Open => Some(self.open_until(config).unwrap_or(now).saturating_sub(now)),
            State::HalfOpen if self.probes.len() < config.half_open_probes as usize => {
                Some(Duration::ZERO)
            }
            State::HalfOpen => Some(self.earliest_probe_deadline(now).saturating_sub(now)),
        };
        Snapshot {
            state: self.state,
            consecutive_failures: self.consecutive_failures,
            calls_in_window: counts.calls,
            failures_in_window: counts.failures,
            failure_rate: (counts.calls > 0)
                .then(|| f64::from(counts.failures) / f64::from(counts.calls)),
            opened_at: self.opened_at,
            next_probe_in,
            probes_in_flight: u32::try_from(self.probes.len()).unwrap_or(u32::MAX),
        }
    }
}

// === impl Permit ===

impl Permit {
    /// The call succeeded: the upstream is healthy.
    pub fn success(mut self) {
        self.report(Report::Success);
    }

    /// The call failed in a way that says the upstream is unhealthy (connect error,
    /// timeout, 5xx, throttling).
    pub fn failure(mut self) {
        self.report(Report::Failure);
    }

    /// Records [`success`](Self::success) when `ok`, else [`failure`](Self::failure).
    pub fn record(self, ok: bool) {
        if ok { self.success() } else { self.failure() }
    }

    /// Releases the permit without counting the call (same as dropping it); for outcomes
    /// that say nothing about the upstream, such as a request the gateway refused to send.
    pub fn ignore(self) {}

    /// Whether this permit is a HALF_OPEN probe.
    pub fn is_probe(&self) -> bool {
        matches!(self.kind, Kind::Probe(_))
    }

    fn report(&mut self, report: Report) {
        self.reported = true;
        self.inner.record(self.generation, self.kind, report);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // An unreported CLOSED call changes nothing: skip the lock.
        if !self.reported && self.is_probe() {
            self.report(Report::Cancelled);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("generation", &self.generation)
            .field("probe", &self.is_probe())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    fn breaker(config: BreakerConfig) -> (CircuitBreaker, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let breaker = CircuitBreaker::with_clock(config, clock.clone()).expect("valid config");
        (breaker, clock)
    }

    #[test]
    fn config_validation_names_the_field() {
        let cases = [
            (
                BreakerConfig {
                    failure_rate: Some(0.0),
                    ..BreakerConfig::default()
                },
                "failure_rate",
            ),
            (
                BreakerConfig {
                    failure_rate: Some(f64::NAN),
                    ..BreakerConfig::default()
                },
                "failure_rate",
            ),
            (
                BreakerConfig {
                    failure_rate: Some(1.5),
                    ..BreakerConfig::default()
                },
                "failure_rate",
            ),
            (
                BreakerConfig {
                    window: Duration::ZERO,
                    ..BreakerConfig::default()
                },
                "window",
            ),
            (
                BreakerConfig {
                    half_open_probes: 0,
                    ..BreakerConfig::default()
                },
                "half_open_probes",
            ),
            (
                BreakerConfig {
                    probe_timeout: Duration::ZERO,
                    ..BreakerConfig::default()
                },
                "probe_timeout",
            ),
        ];
        for (config, field) in cases {
            match CircuitBreaker::new(config) {
                Err(Error::Config { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: expected a config error, got {other:?}"),
            }
        }
        assert!(BreakerConfig::default().validate().is_ok());
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let (breaker, _clock) = breaker(BreakerConfig {
            failure_threshold: 3,
            failure_rate: None,
            ..BreakerConfig::default()
        });
        for _ in 0..10 {
            breaker.try_acquire().expect("closed").failure();
            breaker.try_acquire().expect("closed").failure();
            breaker.try_acquire().expect("closed").success();
        }
        assert_eq!(breaker.state(), State::Closed);
        assert_eq!(breaker.snapshot().consecutive_failures, 0);
    }

    #[test]
    fn zero_threshold_and_no_rate_never_opens() {
        let (breaker, _clock) = breaker(BreakerConfig {
            failure_threshold: 0,
            failure_rate: None,
            ..BreakerConfig::default()
        });
        for _ in 0..1000 {
            breaker.try_acquire().expect("closed").failure();
        }
        assert_eq!(breaker.state(), State::Closed);
    }

    #[test]
    fn late_reports_from_an_older_state_are_ignored() {
        let (breaker, clock) = breaker(BreakerConfig {
            failure_threshold: 1,
            failure_rate: None,
            ..BreakerConfig::default()
        });
        let slow = breaker.try_acquire().expect("closed");
        breaker.try_acquire().expect("closed").failure();
        assert_eq!(breaker.state(), State::Open);
        clock.advance(Duration::from_secs(30));
        let probe = breaker.try_acquire().expect("probe");
        probe.success();
        assert_eq!(breaker.state(), State::Closed);
        // A call admitted before the breaker opened fails only now: it describes the old
        // upstream and must not re-open the freshly closed breaker.
        slow.failure();
        assert_eq!(breaker.state(), State::Closed);
        assert_eq!(breaker.snapshot().consecutive_failures, 0);
    }

    #[test]
    fn dropping_a_closed_permit_counts_nothing() {
        let (breaker, _clock) = breaker(BreakerConfig::default());
        drop(breaker.try_acquire().expect("closed"));
        breaker.try_acquire().expect("closed").ignore();
        let snapshot = breaker.snapshot();
        assert_eq!(snapshot.calls_in_window, 0);
        assert_eq!(snapshot.failure_rate, None);
    }

    #[test]
    fn state_names() {
        assert_eq!(State::Closed.to_string(), "closed");
        assert_eq!(State::Open.as_str(), "open");
        assert_eq!(State::HalfOpen.as_str(), "half_open");
    }

    #[test]
    fn debug_does_not_deadlock_or_leak_the_hook() {
        let (breaker, _clock) = breaker(BreakerConfig::default());
        breaker.on_transition(|_, _| {});
        let text = format!("{breaker:?}");
        assert!(text.contains("Closed"), "{text}");
        let permit = breaker.try_acquire().expect("closed");
        assert!(format!("{permit:?}").contains("probe: false"));
    }
}
