//! The gateway's runtime: upstreams and routes built from the config, and the proxy pipeline
//! (route policy → cache lookup → coalesced upstream call → cache store). Knows nothing of
//! actix-web; `http.rs` adapts it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cache_core::{
    Cache, CachePolicy, CacheRequest, CacheStatus, Fetched, Normalizer, ServeError, Served,
};
use ratelimit::{Limit, RateLimiter};
use tracing::Instrument;
use upstream_client::{OutboundRequest, UpstreamClient, UpstreamError, UpstreamSettings};

use crate::config::{Config, RouteConfig, UpstreamConfig};
use crate::error::ApiError;
use crate::keymemo::KeyMemo;
use crate::metrics::{Metrics, Outcome, RouteMetrics};

/// One configured route, ready to serve.
pub struct RouteRuntime {
    pub path: Arc<str>,
    /// The route as configured (its `matches` decides which paths it serves).
    config: RouteConfig,
    pub methods: Vec<String>,
    pub normalizer: Normalizer,
    pub policy: CachePolicy,
    pub cost: f64,
    pub cache: bool,
    /// Per client on this route.
    pub rate_limit: Option<Limit>,
    pub prewarm: Vec<String>,
    /// Retry POST too (when the upstream retries at all).
    pub retry_post: bool,
    /// The static answer when the upstream is down and nothing stale can stand in.
    pub fallback: Option<crate::config::FallbackConfig>,
    pub metrics: RouteMetrics,
}

impl RouteRuntime {
    fn allows(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method) || (method == "HEAD" && self.allows("GET"))
    }
}

/// Why a fetch produced no upstream response. Shared by every waiter of a coalesced fetch; a
/// stale entry stands in for either kind when one is usable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The call failed (connect, timeout, breaker open, ...).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The upstream's egress limit (its account's own quota) was reached: no call was made.
    #[error("egress limit of upstream {upstream} reached")]
    Egress {
        upstream: Arc<str>,
        retry_after: Duration,
    },
}

/// One configured upstream: its pooled client and routes.
pub struct UpstreamRuntime {
    pub name: Arc<str>,
    pub client: UpstreamClient,
    /// Calls per period to this upstream from all clients (and all nodes sharing Redis).
    pub egress: Option<Limit>,
    /// Exact routes first, then prefixes, longest first.
    pub routes: Vec<Arc<RouteRuntime>>,
}

impl UpstreamRuntime {
    fn route_for(&self, path: &str) -> Option<&Arc<RouteRuntime>> {
        self.routes.iter().find(|r| r.config.matches(path))
    }
}

/// A client request, reduced to what the pipeline needs.
pub struct ProxyRequest<'a, H> {
    /// For the logs: everything past a fresh in-memory hit runs in a `request` span with it.
    pub request_id: &'a str,
    /// Upper-case method.
    pub method: &'a str,
    /// Upstream-relative path as received (starts with `/`).
    pub path: &'a str,
    /// Raw query string without `?`.
    pub query: &'a str,
    /// The client's headers, collected only when the request goes upstream.
    pub headers: H,
    pub body: Bytes,
    /// `Cache-Control: no-cache` from the client.
    pub force_refresh: bool,
    /// Answer only from the cache (fresh or stale), never upstream: the caller's spend budget
    /// is exhausted until this long from now.
    pub cached_only: Option<Duration>,
}

/// Everything a request needs, shared by all workers.
pub struct Gateway {
    /// By name; looked up on every request (foldhash: SipHash cost more than the lookup).
    pub upstreams: HashMap<String, Arc<UpstreamRuntime>, foldhash::fast::RandomState>,
    pub cache: Cache<FetchError>,
    /// Rate limits (local, or shared through Redis), quotas and budgets.
    pub limits: Arc<crate::limits::Limits>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<Config>,
    /// Counters of the L1/L2 tiers, when the store is tiered.
    pub tier_stats: Option<Arc<cache_core::TierStats>>,
    /// API keys, verified through an in-process cache.
    pub keys: keystore::KeyCache,
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        cache: Cache<FetchError>,
        limits: Arc<crate::limits::Limits>,
        metrics: Arc<Metrics>,
        tier_stats: Option<Arc<cache_core::TierStats>>,
        keys: keystore::KeyCache,
    ) -> anyhow::Result<Self> {
        let mut upstreams = HashMap::default();
        for u in &config.upstreams {
            let rt = build_upstream(&config, u, &metrics)?;
            upstreams.insert(u.name.clone(), Arc::new(rt));
        }
        Ok(Gateway {
            upstreams,
            cache,
            limits,
            metrics,
            config,
            tier_stats,
            keys,
        })
    }

    /// The upstream and route serving `/{upstream}{path}`, or the client error. Borrowed, not
    /// cloned: every worker would otherwise bump the same two reference counts per request.
    pub fn resolve(
        &self,
        upstream: &str,
        path: &str,
        method: &str,
    ) -> Result<(&Arc<UpstreamRuntime>, &Arc<RouteRuntime>), ApiError> {
        let up = self
            .upstreams
            .get(upstream)
            .ok_or_else(|| ApiError::not_found(format!("no upstream named {upstream:?}")))?;
        let route = up
            .route_for(path)
            .ok_or_else(|| ApiError::not_found(format!("no route for {path:?} on {upstream:?}")))?;
        if !route.allows(method) {
            return Err(ApiError::method_not_allowed(&route.methods));
        }
        Ok((up, route))
    }

    /// Serves a request on a resolved route. Records the route's metrics.
    pub fn proxy<'a, H>(
        &'a self,
        up: &'a Arc<UpstreamRuntime>,
        route: &'a Arc<RouteRuntime>,
        req: ProxyRequest<'a, H>,
    ) -> impl Future<Output = Result<Served, ApiError>> + 'a
    where
        H: FnOnce() -> Vec<(String, String)> + 'a,
    {
        use futures_util::future::Either;
        let started = std::time::Instant::now();
        // HEAD is answered from the GET entry.
        let key_method = if req.method == "HEAD" {
            "GET"
        } else {
            req.method
        };
        let cacheable =
            route.cache && matches!(key_method, "GET" | "POST") && route.allows(key_method);
        let body = (key_method != "GET").then_some(&req.body[..]);
        let peeked = normalized_then(up, route, key_method, req.path, req.query, body, |n| {
            let hit = (cacheable && !req.force_refresh)
                .then(|| self.cache.peek_fresh(&n.signature))
                .flatten();
            hit.ok_or_else(|| n.clone())
        });
        // A fresh in-memory hit is answered here, without a future of its own: the caller's
        // future then holds neither this request nor the miss path's state (a request's future
        // over 1 KiB is allocated past malloc's per-thread cache, and moved, on every request).
        match peeked {
            Ok(hit) => {
                let result = Ok(hit);
                count(route, &result, started);
                Either::Left(std::future::ready(result))
            }
            Err(normalized) => {
                let miss = self.miss(up, route, req, normalized, key_method, cacheable);
                Either::Right(async move {
                    let result = miss.await;
                    count(route, &result, started);
                    result
                })
            }
        }
    }

    /// The answer to a request the in-memory cache had no fresh answer for (`normalized`):
    /// from L2, a stale entry, another request's fetch, or the upstream.
    fn miss<'a, H>(
        &'a self,
        up: &'a Arc<UpstreamRuntime>,
        route: &'a Arc<RouteRuntime>,
        req: ProxyRequest<'a, H>,
        normalized: cache_core::Normalized,
        key_method: &'a str,
        cacheable: bool,
    ) -> impl Future<Output = Result<Served, ApiError>> + 'a
    where
        H: FnOnce() -> Vec<(String, String)> + 'a,
    {
        // Built past the hit: its two `Arc` clones are shared counters every worker bumps.
        let cache_req = CacheRequest {
            signature: normalized.signature,
            upstream: Arc::clone(&up.name),
            route: Arc::clone(&route.path),
            policy: route.policy,
            cost: route.cost,
            force_refresh: req.force_refresh,
        };
        // Past the in-memory hit, events carry the request id (the upstream fetch, spawned
        // by the cache, inherits the span). Not before: a span costs about as much as the
        // rest of a hit's own work.
        let span = tracing::error_span!("request", request_id = %req.request_id);
        // Boxed: the miss path's state (lookup, coalescing, the fetch) is kilobytes.
        Box::pin(async move {
            if let Some(budget_reset) = req.cached_only {
                return match self.cache.lookup(&cache_req.signature).await {
                    Some(e) if cacheable && e.usable_on_error(self.cache.clock().now_millis()) => {
                        Ok(self.cache.answer_from(e))
                    }
                    _ => Err(ApiError::quota_exceeded(
                        "the key's upstream spend budget is used up; only cached answers are served",
                        Some(budget_reset),
                    )),
                };
            }
            let query = if cacheable {
                normalized.query
            } else {
                req.query.to_string()
            };
            let egress = up.egress.map(|l| (Arc::clone(&self.limits.limiter), l));
            let fetch = fetcher(
                egress,
                Arc::clone(up),
                Arc::clone(route),
                key_method.to_string(),
                req.path.to_string(),
                query,
                (req.headers)(),
                req.body,
            );
            let result = if cacheable {
                self.cache.serve(cache_req, fetch).await
            } else {
                self.cache.bypass(&cache_req, fetch).await
            };
            let served = result.map_err(|e| match e {
                ServeError::Upstream(FetchError::Upstream(e)) => upstream_api_error(&up.name, &e),
                ServeError::Upstream(FetchError::Egress { retry_after, .. }) => ApiError::rate_limited(
                    format!("the egress limit of upstream {} is reached", up.name),
                    retry_after,
                ),
                ServeError::Overloaded => ApiError::upstream_unavailable(
                    "too many requests are waiting on this upstream call",
                    1,
                ),
                ServeError::Aborted => ApiError::upstream_error("the upstream call was aborted"),
            })?;
            // Upstream 4xx pass through; a 5xx with nothing stale to stand in is a 502.
            if served.entry.status >= 500 {
                return Err(ApiError::upstream_error(format!(
                    "upstream {} answered {}",
                    up.name, served.entry.status
                )));
            }
            Ok(served)
        }
        .instrument(span))
    }

    /// Fetches every route's `prewarm` paths once, spaced out; returns how many succeeded.
    pub async fn prewarm_route(
        &self,
        up: &Arc<UpstreamRuntime>,
        route: &Arc<RouteRuntime>,
    ) -> usize {
        let spacing = prewarm_spacing(route);
        let mut ok = 0;
        for (i, target) in route.prewarm.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(spacing).await;
            }
            let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
            let req = ProxyRequest {
                request_id: "prewarm",
                method: "GET",
                path,
                query,
                headers: Vec::new,
                body: Bytes::new(),
                force_refresh: true,
                cached_only: None,
            };
            self.metrics.prewarm_runs.inc();
            match self.proxy(up, route, req).await {
                Ok(s) if (200..300).contains(&s.entry.status) => ok += 1,
                Ok(s) => {
                    tracing::warn!(upstream = %up.name, target, status = s.entry.status, "prewarm fetch not cacheable")
                }
                Err(e) => {
                    tracing::warn!(upstream = %up.name, target, error = %e, "prewarm fetch failed")
                }
            }
        }
        ok
    }
}

/// Space prewarm fetches so that a route's whole list takes at most a tenth of its TTL and
/// never bursts: between 50 ms and 1 s apart.
fn prewarm_spacing(route: &RouteRuntime) -> Duration {
    let n = route.prewarm.len().max(1) as u32;
    (route.policy.ttl / 10 / n).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// How long after a prewarm pass the next one starts: before the entries expire.
pub fn prewarm_interval(route: &RouteRuntime) -> Duration {
    (route.policy.ttl.mul_f64(0.8)).max(Duration::from_secs(1))
}

/// Slots of all workers' [`KeyMemo`]s together (more only past 32 workers, at the least of
/// [`KEY_MEMO_SLOTS`] each): ~100 bytes a slot when empty (3 MiB), ~500 with a 100-byte target
/// (15 MiB), under 1 KiB with a [`crate::keymemo::MAX_TARGET`]-byte one (32 MiB). Each worker
/// sees every key, so more slots each is a higher hit rate: with 100,000 keys drawn with
/// Zipf s = 1, ~48% of requests find their slot among 1,024, ~76% among 16,384 (simulated).
const KEY_MEMO_TOTAL_SLOTS: usize = 32_768;

/// Bounds of the slots of one worker's memo, whatever the number of workers.
const KEY_MEMO_SLOTS: std::ops::RangeInclusive<usize> = 1024..=16_384;

/// Slots of each memo made from now on (see [`size_key_memos`]).
static KEY_MEMO_SLOTS_EACH: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(*KEY_MEMO_SLOTS.start());

/// Sizes the memos of `workers` worker threads, before they serve: [`KEY_MEMO_TOTAL_SLOTS`]
/// shared among them, within [`KEY_MEMO_SLOTS`] each.
pub fn size_key_memos(workers: usize) {
    KEY_MEMO_SLOTS_EACH.store(
        key_memo_slots(workers),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Slots of each of `workers` memos.
fn key_memo_slots(workers: usize) -> usize {
    (KEY_MEMO_TOTAL_SLOTS / workers.max(1)).clamp(*KEY_MEMO_SLOTS.start(), *KEY_MEMO_SLOTS.end())
}

thread_local! {
    /// This worker's memo of recent GETs' normalized forms.
    static KEY_MEMO: std::cell::RefCell<KeyMemo<RouteRuntime>> = std::cell::RefCell::new(
        KeyMemo::new(KEY_MEMO_SLOTS_EACH.load(std::sync::atomic::Ordering::Relaxed)),
    );
}

/// Counts an answer of `route` in its metrics: its outcome and latency, a saved upstream
/// call, a coalesced one.
fn count(route: &RouteRuntime, result: &Result<Served, ApiError>, started: std::time::Instant) {
    let outcome = match result {
        Ok(s) => match s.status {
            CacheStatus::Hit => Outcome::Hit,
            CacheStatus::Miss => Outcome::Miss,
            CacheStatus::Stale => Outcome::Stale,
            CacheStatus::Bypass => Outcome::Bypass,
        },
        Err(_) => Outcome::Error,
    };
    if let Ok(s) = result {
        if !s.fetched && s.status != CacheStatus::Bypass {
            route.metrics.saved();
        }
        if s.coalesced {
            route.metrics.coalesced.inc();
        }
    }
    route.metrics.observe(outcome, started.elapsed());
}

/// Calls `f` with the request's normalized form: from this thread's memo for a GET, else
/// normalized for this call.
fn normalized_then<T>(
    up: &UpstreamRuntime,
    route: &Arc<RouteRuntime>,
    method: &str,
    path: &str,
    query: &str,
    body: Option<&[u8]>,
    f: impl FnOnce(&cache_core::Normalized) -> T,
) -> T {
    let normalize = || {
        route
            .normalizer
            .normalize(&up.name, method, path, query, body)
    };
    // The memo does not key by method or body: only a GET without one is remembered.
    if method != "GET" || body.is_some() || !KeyMemo::<RouteRuntime>::remembers(path, query) {
        return f(&normalize());
    }
    KEY_MEMO.with(|memo| match memo.try_borrow_mut() {
        Ok(mut memo) => f(memo.get_or_insert(route, path, query, normalize)),
        // Not expected (nothing in `f` normalizes), but never a panic for it.
        Err(_) => f(&normalize()),
    })
}

#[allow(clippy::too_many_arguments)]
fn fetcher(
    egress: Option<(Arc<dyn RateLimiter>, Limit)>,
    up: Arc<UpstreamRuntime>,
    route: Arc<RouteRuntime>,
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Bytes,
) -> impl FnOnce() -> futures_util::future::BoxFuture<'static, Result<Fetched, FetchError>>
+ Send
+ 'static {
    move || {
        Box::pin(async move {
            if let Some((limiter, limit)) = egress {
                let key = format!("egress:{}", up.name);
                match limiter.check(&key, &limit, 1).await {
                    Ok(d) if !d.allowed => {
                        route.metrics.upstream_error("egress_limited");
                        return Err(FetchError::Egress {
                            upstream: Arc::clone(&up.name),
                            retry_after: d.retry_after.unwrap_or(d.reset_after),
                        });
                    }
                    Ok(_) => {}
                    // The limiter applies the Redis failure policy itself; what is left is
                    // not the client's fault: call the upstream.
                    Err(e) => tracing::warn!(error = %e, "egress limit check failed; allowed"),
                }
            }
            route.metrics.upstream_calls.inc();
            route.metrics.cost_incurred.inc_by(route.cost);
            let result = up
                .client
                .send(OutboundRequest {
                    method: &method,
                    path: &path,
                    query: &query,
                    headers: &headers,
                    body,
                    retry_non_idempotent: route.retry_post,
                })
                .await;
            match result {
                Ok(r) => Ok(Fetched {
                    status: r.status,
                    headers: r.headers,
                    body: r.body,
                }),
                Err(e) => {
                    route.metrics.upstream_error(e.kind());
                    if matches!(e, upstream_client::UpstreamError::Unavailable { .. }) {
                        // Refused by the open breaker without a call: one line per request
                        // during an outage would flood the log (the transition is logged).
                        tracing::debug!(upstream = %up.name, path, error = %e, "upstream call refused");
                    } else {
                        tracing::warn!(upstream = %up.name, path, error = %e, "upstream call failed");
                    }
                    Err(FetchError::Upstream(e))
                }
            }
        })
    }
}

fn upstream_api_error(upstream: &str, e: &UpstreamError) -> ApiError {
    if let Some(wait) = e.retry_after() {
        // Breaker open and nothing stale to serve: a fast, honest 503.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        ApiError::upstream_unavailable(
            format!("upstream {upstream} is failing; calls are paused"),
            secs.max(1),
        )
    } else if e.is_timeout() {
        ApiError::upstream_timeout(format!("upstream {upstream} did not answer in time"))
    } else if e.kind() == "invalid_request" {
        ApiError::bad_request(e.to_string())
    } else {
        ApiError::upstream_error(format!("upstream {upstream}: {e}"))
    }
}

fn build_upstream(
    config: &Config,
    u: &UpstreamConfig,
    metrics: &Metrics,
) -> anyhow::Result<UpstreamRuntime> {
    let client = UpstreamClient::new(UpstreamSettings {
        name: u.name.clone(),
        base_url: u.base_url.clone(),
        headers: u
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        connect_timeout: u.connect_timeout,
        timeout: u.timeout,
        max_body_bytes: u.body_limit(&config.cache).0,
        // Each worker thread keeps its own pool: the upstream's share of idle connections.
        pool_max_idle_per_host: u
            .max_idle_connections
            .div_ceil(config.server.worker_threads()),
        resilience: resilience(u),
    })
    .map_err(|e| anyhow::anyhow!("upstream {}: {e}", u.name))?;
    let mut routes: Vec<Arc<RouteRuntime>> = u
        .routes
        .iter()
        .map(|r| Arc::new(build_route(&u.name, r, metrics)))
        .collect();
    // exact routes first, then the longest prefix
    routes.sort_by_key(|r| (r.config.is_prefix(), usize::MAX - r.path.len()));
    Ok(UpstreamRuntime {
        name: Arc::from(u.name.as_str()),
        client,
        egress: u.egress_limit.as_ref().map(|r| Limit::new(r.count, r.per)),
        routes,
    })
}

/// The upstream's breaker and retries. The breaker is on unless configured otherwise; retries
/// only when `retry` is configured: on a paid API, a retry is another bill.
fn resilience(u: &UpstreamConfig) -> upstream_client::Resilience {
    let defaults = breaker::BreakerConfig::default();
    upstream_client::Resilience {
        breaker: Some(match &u.breaker {
            Some(b) => breaker::BreakerConfig {
                failure_threshold: b.failure_threshold,
                open_for: b.open_for,
                ..defaults
            },
            None => defaults,
        }),
        retry: u.retry.as_ref().map(|r| breaker::RetryPolicy {
            max_attempts: r.max_attempts,
            base: r.base,
            max: r.max,
            deadline: u.timeout,
        }),
        budget: breaker::BudgetConfig::default(),
    }
}

fn build_route(upstream: &str, r: &RouteConfig, metrics: &Metrics) -> RouteRuntime {
    RouteRuntime {
        path: Arc::from(r.path.as_str()),
        config: r.clone(),
        methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
        normalizer: Normalizer::new(r.normalize.clone()),
        policy: CachePolicy {
            ttl: r.ttl,
            stale_while_revalidate: r.stale_while_revalidate,
            stale_if_error: r.stale_if_error,
        },
        cost: r.cost,
        cache: r.cache,
        rate_limit: r.rate_limit.as_ref().map(|r| Limit::new(r.count, r.per)),
        prewarm: r.prewarm.clone(),
        retry_post: r.retry_post,
        fallback: r.fallback.clone(),
        metrics: metrics.route(upstream, &r.path, r.cost),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_memos_share_a_bounded_number_of_slots() {
        assert_eq!(key_memo_slots(0), 16_384);
        assert_eq!(key_memo_slots(1), 16_384);
        assert_eq!(key_memo_slots(2), 16_384);
        assert_eq!(key_memo_slots(8), 4096);
        // Many workers: each keeps a useful memo, and the total grows no faster than they do.
        assert_eq!(key_memo_slots(64), 1024);
    }
}
