//! The metrics every proxied request bumps, sharded per thread: requests by outcome, answers
//! that saved an upstream call, and the latency histogram.
//!
//! As plain prometheus metrics they would be half a dozen atomic read-modify-writes per request
//! on cache lines every worker shares, each one a cache-line transfer between cores while the
//! workers serve the same route. Here each thread bumps counters in a slot of its own (its own
//! cache lines), and a scrape sums the slots. Exposed as prometheus' own types would expose
//! them: same names, labels, types and buckets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};

use super::OUTCOMES;

/// Slots of every sharded metric. Threads take them round-robin on first use, so the first
/// this many threads that serve requests (the workers) each have their own; past that, threads
/// share slots, which stays exact, only slower.
const SLOTS: usize = 16;

/// Upper bounds (seconds) of `tollgate_request_duration_seconds`' buckets.
const LATENCY_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The calling thread's slot.
fn slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS;
    }
    SLOT.with(|s| *s)
}

/// A value on cache lines of its own (128 bytes: x86's prefetcher pulls lines in pairs).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// One value per slot.
struct Shards<T>(Box<[Padded<T>]>);

impl<T: Default> Shards<T> {
    fn new() -> Self {
        Shards((0..SLOTS).map(|_| Padded::default()).collect())
    }
}

impl<T> Shards<T> {
    /// The value of `slot` (a [`slot()`]).
    fn at(&self, slot: usize) -> &T {
        // `slot()` is below `SLOTS`, the length.
        &self.0[slot % self.0.len()].0
    }

    fn sum(&self, f: impl Fn(&T) -> u64) -> u64 {
        self.0
            .iter()
            .fold(0u64, |total, p| total.wrapping_add(f(&p.0)))
    }
}

/// One route's counts in one slot.
#[derive(Default)]
struct RouteCounts {
    /// Requests by outcome (index of [`OUTCOMES`]).
    requests: [AtomicU64; OUTCOMES.len()],
    /// Answers given without an upstream call of their own.
    saved: AtomicU64,
}

/// One outcome's latency histogram in one slot.
#[derive(Default)]
struct LatencyCounts {
    /// Observations per bucket, not cumulative; past the last bound only `count` counts.
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// The handles one route bumps: its counts, and its upstream's latency histograms.
#[derive(Clone)]
pub struct RouteCounters {
    counts: Arc<Shards<RouteCounts>>,
    latency: Arc<[Shards<LatencyCounts>; OUTCOMES.len()]>,
}

impl RouteCounters {
    /// Counts one request that ended in `outcome` (index of [`OUTCOMES`]) after `elapsed`.
    pub fn observe(&self, outcome: usize, elapsed: Duration) {
        let slot = slot();
        if let Some(n) = self.counts.at(slot).requests.get(outcome) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        let Some(latency) = self.latency.get(outcome) else {
            return;
        };
        let h = latency.at(slot);
        let seconds = elapsed.as_secs_f64();
        if let Some(b) = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .and_then(|i| h.buckets.get(i))
        {
            b.fetch_add(1, Ordering::Relaxed);
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        h.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Counts one answer given without an upstream call of its own (its route's cost saved).
    pub fn saved(&self) {
        self.counts.at(slot()).saved.fetch_add(1, Ordering::Relaxed);
    }
}

/// A route as exposed: labels, cost per saved call, counts.
struct RouteSeries {
    upstream: String,
    route: String,
    cost: f64,
    counts: Arc<Shards<RouteCounts>>,
}

#[derive(Default)]
struct Series {
    routes: Vec<RouteSeries>,
    /// Latency histograms per upstream.
    upstreams: HashMap<String, Arc<[Shards<LatencyCounts>; OUTCOMES.len()]>>,
}

/// The collector of `tollgate_requests_total`, `tollgate_cost_saved_total` and
/// `tollgate_request_duration_seconds`. Clones share their series.
#[derive(Clone)]
pub struct RequestMetrics {
    requests: Desc,
    cost_saved: Desc,
    latency: Desc,
    series: Arc<Mutex<Series>>,
}

impl RequestMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.into(),
                help.into(),
                labels.iter().map(|l| l.to_string()).collect(),
                HashMap::new(),
            )
        };
        Ok(RequestMetrics {
            requests: desc(
                "tollgate_requests_total",
                "Proxied requests by upstream, route and outcome",
                &["upstream", "route", "outcome"],
            )?,
            cost_saved: desc(
                "tollgate_cost_saved_total",
                "Upstream cost avoided by cache hits, stale answers and coalescing (currency units)",
                &["upstream", "route"],
            )?,
            latency: desc(
                "tollgate_request_duration_seconds",
                "Gateway latency of proxied requests",
                &["upstream", "outcome"],
            )?,
            series: Arc::default(),
        })
    }

    /// The counters of route `route` of `upstream`, whose every saved call saves `cost`; the
    /// same counters for the same labels however often asked.
    pub fn route(&self, upstream: &str, route: &str, cost: f64) -> RouteCounters {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let latency = Arc::clone(
            series
                .upstreams
                .entry(upstream.to_string())
                .or_insert_with(|| Arc::new(std::array::from_fn(|_| Shards::new()))),
        );
        let counts = match series
            .routes
            .iter()
            .find(|s| s.upstream == upstream && s.route == route)
        {
            Some(s) => Arc::clone(&s.counts),
            None => {
                let counts = Arc::new(Shards::new());
                series.routes.push(RouteSeries {
                    upstream: upstream.to_string(),
                    route: route.to_string(),
                    cost,
                    counts: Arc::clone(&counts),
                });
                counts
            }
        };
        RouteCounters { counts, latency }
    }
}

/// Label pairs sorted by name, as prometheus' own metrics keep them.
fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    let mut pairs = pairs.to_vec();
    pairs.sort_unstable();
    pairs
        .iter()
        .map(|(name, value)| {
            let mut l = LabelPair::default();
            l.set_name(name.to_string());
            l.set_value(value.to_string());
            l
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], value: f64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(value);
    let mut m = proto::Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn family(desc: &Desc, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(desc.fq_name.clone());
    f.set_help(desc.help.clone());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

impl Collector for RequestMetrics {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.requests, &self.cost_saved, &self.latency]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let mut requests = Vec::new();
        let mut saved = Vec::new();
        for s in &series.routes {
            for (i, outcome) in OUTCOMES.iter().enumerate() {
                let n = s
                    .counts
                    .sum(|c| c.requests.get(i).map_or(0, |n| n.load(Ordering::Relaxed)));
                requests.push(counter(
                    &[
                        ("upstream", &s.upstream),
                        ("route", &s.route),
                        ("outcome", outcome),
                    ],
                    n as f64,
                ));
            }
            let n = s.counts.sum(|c| c.saved.load(Ordering::Relaxed));
            saved.push(counter(
                &[("upstream", &s.upstream), ("route", &s.route)],
                n as f64 * s.cost,
            ));
        }
        let mut latency = Vec::new();
        for (upstream, histograms) in &series.upstreams {
            for (h, outcome) in histograms.iter().zip(OUTCOMES) {
                let mut cumulative = 0u64;
                let buckets = LATENCY_BUCKETS
                    .iter()
                    .enumerate()
                    .map(|(i, bound)| {
                        cumulative =
                            cumulative.wrapping_add(h.sum(|c| {
                                c.buckets.get(i).map_or(0, |n| n.load(Ordering::Relaxed))
                            }));
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(*bound);
                        b.set_cumulative_count(cumulative);
                        b
                    })
                    .collect();
                let mut p = proto::Histogram::default();
                p.set_bucket(buckets);
                // Read while requests bump them, a bucket may have counted an observation the
                // count has not yet: `+Inf` (the count) never below the last bucket.
                p.set_sample_count(h.sum(|c| c.count.load(Ordering::Relaxed)).max(cumulative));
                p.set_sample_sum(h.sum(|c| c.sum_nanos.load(Ordering::Relaxed)) as f64 / 1e9);
                let mut m = proto::Metric::from_label(labels(&[
                    ("upstream", upstream),
                    ("outcome", outcome),
                ]));
                m.set_histogram(p);
                latency.push(m);
            }
        }
        vec![
            family(&self.requests, MetricType::COUNTER, requests),
            family(&self.cost_saved, MetricType::COUNTER, saved),
            family(&self.latency, MetricType::HISTOGRAM, latency),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(m: RequestMetrics) -> String {
        let registry = prometheus::Registry::new();
        registry.register(Box::new(m)).expect("registers");
        let mut buf = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut buf,
        )
        .expect("encodes");
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn counts_from_every_thread_are_summed_and_exposed_as_prometheus_metrics() {
        let m = RequestMetrics::new().expect("valid descriptors");
        let a = m.route("up", "/a", 0.25);
        let b = m.route("up", "/b", 1.0);
        std::thread::scope(|s| {
            for _ in 0..20 {
                let a = a.clone();
                s.spawn(move || {
                    for _ in 0..100 {
                        a.observe(0, Duration::from_micros(200));
                        a.saved();
                    }
                    a.observe(1, Duration::from_secs(40));
                });
            }
        });
        b.observe(4, Duration::from_millis(3));
        // The same labels again: the same counters, not a second series.
        m.route("up", "/a", 0.25)
            .observe(0, Duration::from_micros(50));
        let text = render(m);
        for line in [
            "tollgate_requests_total{outcome=\"hit\",route=\"/a\",upstream=\"up\"} 2001",
            "tollgate_requests_total{outcome=\"miss\",route=\"/a\",upstream=\"up\"} 20",
            "tollgate_requests_total{outcome=\"error\",route=\"/b\",upstream=\"up\"} 1",
            "tollgate_requests_total{outcome=\"stale\",route=\"/b\",upstream=\"up\"} 0",
            "tollgate_cost_saved_total{route=\"/a\",upstream=\"up\"} 500",
            "tollgate_cost_saved_total{route=\"/b\",upstream=\"up\"} 0",
            "tollgate_request_duration_seconds_bucket{outcome=\"hit\",upstream=\"up\",le=\"0.0001\"} 1",
            "tollgate_request_duration_seconds_bucket{outcome=\"hit\",upstream=\"up\",le=\"0.00025\"} 2001",
            "tollgate_request_duration_seconds_count{outcome=\"hit\",upstream=\"up\"} 2001",
            "tollgate_request_duration_seconds_bucket{outcome=\"miss\",upstream=\"up\",le=\"30\"} 0",
            "tollgate_request_duration_seconds_bucket{outcome=\"miss\",upstream=\"up\",le=\"+Inf\"} 20",
            "tollgate_request_duration_seconds_sum{outcome=\"miss\",upstream=\"up\"} 800",
            "tollgate_request_duration_seconds_bucket{outcome=\"error\",upstream=\"up\",le=\"0.005\"} 1",
            "tollgate_request_duration_seconds_bucket{outcome=\"error\",upstream=\"up\",le=\"0.0025\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("tollgate_requests_total{"))
                .count(),
            10,
            "five outcomes for each of two routes:\n{text}"
        );
        assert!(text.contains("# TYPE tollgate_request_duration_seconds histogram"));
        assert!(text.contains("# TYPE tollgate_requests_total counter"));
    }
}
