//! Prometheus metrics. Per-route handles are resolved once at start so the hot path only
//! increments atomics; those every request bumps are sharded per thread (`sharded.rs`).

mod sharded;

use std::time::Duration;

use sharded::{RequestMetrics, RouteCounters};

use prometheus::{
    Counter, CounterVec, Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the gateway exports.
pub struct Metrics {
    pub registry: Registry,
    /// `tollgate_requests_total`, `tollgate_cost_saved_total`, `tollgate_request_duration_seconds`.
    requests: RequestMetrics,
    upstream_calls: IntCounterVec,
    upstream_errors: IntCounterVec,
    cost_incurred: CounterVec,
    coalesced: IntCounterVec,
    pub client_errors: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub cache_collisions: IntGauge,
    pub cache_store_errors: IntGauge,
    pub cache_l2_errors: IntGauge,
    pub cache_l2_hits: IntGauge,
    pub cache_l2_skipped: IntGauge,
    pub cache_l2_filtered: IntGauge,
    /// 1 while a dependency (`database`, `redis`) answers its health check, 0 while it does not.
    pub dependency_up: IntGaugeVec,
    /// Quota increments that could not be kept for the database (in-memory buffer full).
    pub quota_dropped: IntGauge,
    /// Quota increments counted in memory, not yet written to the database.
    pub quota_pending: IntGauge,
    pub prewarm_runs: IntCounter,
    pub breaker_state: IntGaugeVec,
    pub upstream_retries: IntGaugeVec,
    pub breaker_rejections: IntGaugeVec,
    pub retries_denied: IntGaugeVec,
    pub in_flight_fetches: Gauge,
}

/// Outcomes a proxied request can end in (the `outcome` label).
pub const OUTCOMES: [&str; 5] = ["hit", "miss", "stale", "bypass", "error"];

/// Handles for one route, resolved at start.
pub struct RouteMetrics {
    /// Requests, saved calls and latency: bumped by every request, so sharded per thread.
    counters: RouteCounters,
    pub upstream_calls: IntCounter,
    pub cost_incurred: Counter,
    pub coalesced: IntCounter,
    upstream_errors: IntCounterVec,
    upstream: String,
}

/// The outcome label index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit = 0,
    Miss = 1,
    Stale = 2,
    Bypass = 3,
    Error = 4,
}

impl RouteMetrics {
    /// Counts a request that ended in `outcome` after `elapsed`.
    pub fn observe(&self, outcome: Outcome, elapsed: Duration) {
        self.counters.observe(outcome as usize, elapsed);
    }

    /// Counts an answer given without an upstream call of its own: the route's cost saved.
    pub fn saved(&self) {
        self.counters.saved();
    }

    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors
            .with_label_values(&[self.upstream.as_str(), kind])
            .inc();
    }
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = RequestMetrics::new()?;
        let upstream_calls = IntCounterVec::new(
            Opts::new("tollgate_upstream_calls_total", "Calls made to upstreams"),
            &["upstream", "route"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "tollgate_upstream_errors_total",
                "Failed upstream calls by kind",
            ),
            &["upstream", "kind"],
        )?;
        let cost_incurred = CounterVec::new(
            Opts::new(
                "tollgate_cost_incurred_total",
                "Upstream cost incurred (currency units)",
            ),
            &["upstream", "route"],
        )?;
        let coalesced = IntCounterVec::new(
            Opts::new(
                "tollgate_coalesced_waiters_total",
                "Requests that waited on another request's upstream call",
            ),
            &["upstream", "route"],
        )?;
        let client_errors = IntCounterVec::new(
            Opts::new(
                "tollgate_client_errors_total",
                "Requests refused before reaching a route, by code",
            ),
            &["code"],
        )?;
        let cache_entries =
            IntGauge::new("tollgate_cache_entries", "Entries in the in-process cache")?;
        let cache_bytes =
            IntGauge::new("tollgate_cache_bytes", "Bytes held by the in-process cache")?;
        let cache_collisions = IntGauge::new(
            "tollgate_cache_key_collisions_total",
            "Lookups whose stored signature differed from the request's (answered as misses)",
        )?;
        let cache_store_errors = IntGauge::new(
            "tollgate_cache_store_errors_total",
            "Cache store reads or writes that failed",
        )?;
        let cache_l2_errors = IntGauge::new(
            "tollgate_cache_l2_errors_total",
            "L2 (database) cache operations skipped because the database failed",
        )?;
        let cache_l2_hits = IntGauge::new(
            "tollgate_cache_l2_hits_total",
            "Lookups answered by the L2 cache",
        )?;
        let cache_l2_skipped = IntGauge::new(
            "tollgate_cache_l2_skipped_total",
            "L2 (database) cache reads and writes not attempted because the database failed moments ago",
        )?;
        let cache_l2_filtered = IntGauge::new(
            "tollgate_cache_l2_filtered_total",
            "L2 (database) cache reads not made because the key filter showed the key was never stored",
        )?;
        let dependency_up = IntGaugeVec::new(
            Opts::new(
                "tollgate_dependency_up",
                "Whether a dependency answers its health check (1) or not (0)",
            ),
            &["dependency"],
        )?;
        let quota_dropped = IntGauge::new(
            "tollgate_quota_dropped_total",
            "Quota increments not counted because the database was down and the in-memory buffer was full",
        )?;
        let quota_pending = IntGauge::new(
            "tollgate_quota_pending",
            "Quota increments counted in memory and not yet written to the database",
        )?;
        let prewarm_runs =
            IntCounter::new("tollgate_prewarm_fetches_total", "Pre-warming fetches")?;
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "tollgate_breaker_state",
                "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open",
            ),
            &["upstream"],
        )?;
        let upstream_retries = IntGaugeVec::new(
            Opts::new("tollgate_upstream_retries_total", "Retried upstream calls"),
            &["upstream"],
        )?;
        let breaker_rejections = IntGaugeVec::new(
            Opts::new(
                "tollgate_breaker_rejections_total",
                "Calls refused at once because the upstream's breaker was open",
            ),
            &["upstream"],
        )?;
        let retries_denied = IntGaugeVec::new(
            Opts::new(
                "tollgate_retries_denied_total",
                "Retries the retry budget refused",
            ),
            &["upstream"],
        )?;
        let in_flight_fetches = Gauge::new(
            "tollgate_upstream_fetches_in_flight",
            "Coalesced upstream fetches running",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(upstream_calls.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(cost_incurred.clone()))?;
        registry.register(Box::new(coalesced.clone()))?;
        registry.register(Box::new(client_errors.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        registry.register(Box::new(cache_collisions.clone()))?;
        registry.register(Box::new(cache_store_errors.clone()))?;
        registry.register(Box::new(cache_l2_errors.clone()))?;
        registry.register(Box::new(cache_l2_hits.clone()))?;
        registry.register(Box::new(cache_l2_skipped.clone()))?;
        registry.register(Box::new(cache_l2_filtered.clone()))?;
        registry.register(Box::new(dependency_up.clone()))?;
        registry.register(Box::new(quota_dropped.clone()))?;
        registry.register(Box::new(quota_pending.clone()))?;
        registry.register(Box::new(prewarm_runs.clone()))?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(upstream_retries.clone()))?;
        registry.register(Box::new(breaker_rejections.clone()))?;
        registry.register(Box::new(retries_denied.clone()))?;
        registry.register(Box::new(in_flight_fetches.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            upstream_calls,
            upstream_errors,
            cost_incurred,
            coalesced,
            client_errors,
            cache_entries,
            cache_bytes,
            cache_collisions,
            cache_store_errors,
            cache_l2_errors,
            cache_l2_hits,
            cache_l2_skipped,
            cache_l2_filtered,
            dependency_up,
            quota_dropped,
            quota_pending,
            prewarm_runs,
            breaker_state,
            upstream_retries,
            breaker_rejections,
            retries_denied,
            in_flight_fetches,
        })
    }

    /// Resolves the handles of one route, whose upstream calls cost `cost` each.
    pub fn route(&self, upstream: &str, route: &str, cost: f64) -> RouteMetrics {
        RouteMetrics {
            counters: self.requests.route(upstream, route, cost),
            upstream_calls: self.upstream_calls.with_label_values(&[upstream, route]),
            cost_incurred: self.cost_incurred.with_label_values(&[upstream, route]),
            coalesced: self.coalesced.with_label_values(&[upstream, route]),
            upstream_errors: self.upstream_errors.clone(),
            upstream: upstream.to_string(),
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
