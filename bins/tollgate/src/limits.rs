//! Every edge guarded: the per-IP ingress limit, a key's (or anonymous client's) rate limits,
//! its daily/monthly request quotas and its spend budget. The egress limit per upstream lives
//! with the upstream call (`gateway.rs`).
//!
//! Request quotas: with `auth.count_cache_hits = true` (the default) every answered request
//! counts, checked and counted atomically before the cache (exact). With `false`, a request is
//! checked against the quota before the cache and counted after it only if it went upstream,
//! so concurrent misses at the boundary may overshoot by their number.
//!
//! Spend budgets count only upstream cost (hits and stale answers cost nothing). A key past its
//! budget is served from the cache only; the request that crosses the budget is counted after
//! its call, so a budget may be exceeded by one call's cost per concurrent request.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ratelimit::{Decision, Limit, QuotaStore, RateLimiter, Window};

use crate::auth::Identity;
use crate::config::Rate;
use crate::error::ApiError;
use crate::gateway::RouteRuntime;

/// The limits of this gateway.
pub struct Limits {
    pub limiter: Arc<dyn RateLimiter>,
    pub quotas: Arc<dyn QuotaStore>,
    /// The quota store when it is SQL-backed, for its buffer metrics (pending, dropped).
    pub sql_quotas: Option<ratelimit::SqlQuotaStore>,
    per_ip: Option<Limit>,
    per_client: Option<Limit>,
    count_cache_hits: bool,
    /// The Redis-backed limiter and quota store, when both are: a key's rate limit and its
    /// quotas are then checked in one round trip.
    redis: Option<(ratelimit::RedisLimiter, ratelimit::RedisQuotaStore)>,
}

/// What the limits decided for one request, before the cache.
#[derive(Debug, Default)]
pub struct Admission {
    /// The limit with the least room left (`RateLimit-*` headers).
    pub tightest: Option<Headers>,
    /// The key's spend budget is used up: answer from the cache only. The time until the
    /// exhausted budget's window (UTC day or month) resets, for `Retry-After`.
    pub cached_only: Option<Duration>,
    /// Request quotas to count after the answer (cache hits not counted).
    count_after: Vec<(Window, u64)>,
}

/// `RateLimit-Limit`, `-Remaining`, `-Reset` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

impl Headers {
    /// Adds the three headers to a response being built.
    pub fn apply(&self, b: &mut actix_web::HttpResponseBuilder) {
        b.insert_header(("ratelimit-limit", self.limit));
        b.insert_header(("ratelimit-remaining", self.remaining));
        b.insert_header(("ratelimit-reset", self.reset_secs));
    }

    /// Sets the three headers on a built response.
    pub fn set_on(&self, headers: &mut actix_web::http::header::HeaderMap) {
        use actix_web::http::header::{HeaderName, HeaderValue};
        // Names built once, not validated again on every answer.
        static LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
        static REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
        static RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
        for (name, value) in [
            (&LIMIT, self.limit),
            (&REMAINING, self.remaining),
            (&RESET, self.reset_secs),
        ] {
            headers.insert(name.clone(), HeaderValue::from(value));
        }
    }

    fn tighter(self, other: Option<Headers>) -> Headers {
        match other {
            Some(o) if o.remaining < self.remaining => o,
            _ => self,
        }
    }
}

/// A rate limit's decision as the answer's headers, or the 429.
fn rate_outcome(d: &Decision, limit: &Limit, what: &str) -> Result<Headers, ApiError> {
    let headers = Headers {
        limit: u64::from(d.limit),
        remaining: u64::from(d.remaining),
        reset_secs: ceil_secs(d.reset_after),
    };
    if d.allowed {
        Ok(headers)
    } else {
        let mut e = ApiError::rate_limited(
            format!("{what} rate limit of {limit} exceeded"),
            d.retry_after.unwrap_or(d.reset_after),
        );
        e.rate_headers = Some(headers);
        Err(e)
    }
}

/// A request quota's state as the answer's headers (`used` after counting this request), or
/// the 429 when it is used up (`None`).
fn quota_outcome(
    window: Window,
    quota: u64,
    used: Option<u64>,
    now: i64,
) -> Result<Headers, ApiError> {
    let reset = Duration::from_millis(
        u64::try_from(window.window_end(now).saturating_sub(now)).unwrap_or(0),
    );
    let Some(used) = used else {
        let mut e = ApiError::quota_exceeded(
            format!(
                "the {} request quota of {quota} is used up",
                window.as_str()
            ),
            Some(reset),
        );
        e.rate_headers = Some(Headers {
            limit: quota,
            remaining: 0,
            reset_secs: ceil_secs(reset),
        });
        return Err(e);
    };
    Ok(Headers {
        limit: quota,
        remaining: quota.saturating_sub(used),
        reset_secs: ceil_secs(reset),
    })
}

/// The quota counter of a subject's requests (checked at admission, counted there or after
/// an upstream call).
fn requests_counter(subject: &str) -> String {
    ["req:", subject].concat()
}

/// The quota counter of a subject's upstream spend (in micro-units of money).
fn spend_counter(subject: &str) -> String {
    ["spend:", subject].concat()
}

fn limit_of(rate: &Rate) -> Limit {
    Limit::new(rate.count, rate.per)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Limits {
    pub fn new(
        limiter: Arc<dyn RateLimiter>,
        quotas: Arc<dyn QuotaStore>,
        config: &crate::config::Config,
    ) -> Self {
        Limits {
            limiter,
            quotas,
            sql_quotas: None,
            per_ip: config.limits.per_ip.as_ref().map(limit_of),
            per_client: config.limits.per_client.as_ref().map(limit_of),
            count_cache_hits: config.auth.count_cache_hits,
            redis: None,
        }
    }

    /// Checks a key's rate limit and request quotas in one Redis round trip when it can
    /// (`limiter` and `quotas` must be what `self.limiter` and `self.quotas` are built on).
    pub fn with_redis(
        mut self,
        limiter: ratelimit::RedisLimiter,
        quotas: ratelimit::RedisQuotaStore,
    ) -> Self {
        self.redis = Some((limiter, quotas));
        self
    }

    /// One rate-limit check; `Ok(headers)` when allowed.
    async fn check(
        &self,
        key: &str,
        limit: &Limit,
        what: &str,
        request_id: &str,
    ) -> Result<Headers, ApiError> {
        let d: Decision = match self.limiter.check(key, limit, 1).await {
            Ok(d) => d,
            Err(e) => {
                // The limiter applies the Redis failure policy itself; an error left here is
                // not the client's doing (e.g. a limit the limiter rejects): let it through.
                tracing::warn!(error = %e, what, request_id, "rate limit check failed; allowed");
                return Ok(Headers {
                    limit: u64::from(limit.count),
                    remaining: u64::from(limit.count),
                    reset_secs: 0,
                });
            }
        };
        rate_outcome(&d, limit, what)
    }

    /// The per-IP ingress limit, before authentication (without one, no future to run; a
    /// check is boxed, see [`admit`](Self::admit)).
    pub fn ingress<'a>(
        &'a self,
        ip: Option<IpAddr>,
        request_id: &'a str,
    ) -> impl Future<Output = Result<Option<Headers>, ApiError>> + 'a {
        use futures_util::future::Either;
        match &self.per_ip {
            None => Either::Left(std::future::ready(Ok(None))),
            Some(limit) => Either::Right(Box::pin(async move {
                let key = crate::auth::Client::Ip(ip).to_string();
                self.check(&key, limit, "per-IP", request_id)
                    .await
                    .map(Some)
            })),
        }
    }

    /// Rate limits, quotas and budget of an identified client on a route.
    ///
    /// An anonymous client without a per-client limit, on a route without one, has nothing to
    /// check: answered without a future (the checks' state cost such a hit ~650 instructions
    /// to set up and run); one that checks is boxed, as its state would otherwise be part of
    /// every request's future (see `Gateway::proxy`).
    pub fn admit<'a>(
        &'a self,
        identity: &'a Identity,
        upstream: &'a str,
        route: &'a RouteRuntime,
        ingress: Option<Headers>,
        request_id: &'a str,
    ) -> impl Future<Output = Result<Admission, ApiError>> + 'a {
        use futures_util::future::Either;
        if identity.key().is_none() && self.per_client.is_none() && route.rate_limit.is_none() {
            return Either::Left(std::future::ready(Ok(Admission {
                tightest: ingress,
                ..Admission::default()
            })));
        }
        Either::Right(Box::pin(
            self.admit_checked(identity, upstream, route, ingress, request_id),
        ))
    }

    /// [`admit`](Self::admit) when there is something to check.
    async fn admit_checked(
        &self,
        identity: &Identity,
        upstream: &str,
        route: &RouteRuntime,
        ingress: Option<Headers>,
        request_id: &str,
    ) -> Result<Admission, ApiError> {
        let mut tightest = ingress;
        let key = identity.key();
        let own = key
            .and_then(|k| k.rate_limit)
            .map(|r| {
                Limit::new(
                    u32::try_from(r.count).unwrap_or(u32::MAX),
                    Duration::from_secs(r.per_secs),
                )
            })
            .or(self.per_client);
        // Named only when something is counted under the name (not on an unlimited hit).
        let subject = if own.is_some() || route.rate_limit.is_some() || key.is_some() {
            identity.subject()
        } else {
            String::new()
        };
        // A key's request quotas (none, and no clock read, for an anonymous client).
        let (now, quotas) = match key {
            None => (0, [(Window::Day, None), (Window::Month, None)]),
            Some(k) => (
                crate::keys::now_millis(),
                [
                    (Window::Day, k.daily_quota),
                    (Window::Month, k.monthly_quota),
                ],
            ),
        };
        let quotas = quotas.iter().filter_map(|&(w, q)| Some((w, q?)));
        let has_quotas = quotas.clone().next().is_some();
        let qsubject = if has_quotas {
            requests_counter(&subject)
        } else {
            String::new()
        };
        // The client's own rate limit and the key's quotas in one Redis round trip, when both
        // are in Redis and nothing else is checked in between (a route limit) or after the
        // answer (hits not counted).
        let one_call = self
            .redis
            .as_ref()
            .filter(|_| route.rate_limit.is_none() && self.count_cache_hits && has_quotas);
        let mut counted = false;
        if let (Some((limiter, store)), Some(limit)) = (one_call, own) {
            let charges: Vec<ratelimit::QuotaCharge<'_>> = quotas
                .clone()
                .map(|(window, limit)| ratelimit::QuotaCharge {
                    subject: &qsubject,
                    window,
                    amount: 1,
                    limit,
                })
                .collect();
            // Boxed: the Redis call's state is large, and would otherwise be part of every
            // request's future (copied and zeroed per request), Redis or not.
            match Box::pin(store.consume_rate_limited(limiter, &subject, &limit, 1, &charges, now))
                .await
            {
                Ok(Some(r)) => {
                    let h = rate_outcome(&r.rate, &limit, "client")?;
                    tightest = Some(h.tighter(tightest));
                    for ((window, quota), d) in quotas.clone().zip(&r.quotas) {
                        let used = d.allowed.then_some(d.used);
                        let h = quota_outcome(window, quota, used, now)?;
                        tightest = Some(h.tighter(tightest));
                    }
                    counted = true;
                }
                // A counter to seed from SQL first, or Redis failed: one by one below, where
                // the failure policies apply (a Redis that is down fails those at once: its
                // breaker counted this failure too).
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, request_id, "combined limit check failed");
                }
            }
        }
        if let (Some(limit), false) = (own, counted) {
            let h = self.check(&subject, &limit, "client", request_id).await?;
            tightest = Some(h.tighter(tightest));
        }
        if let Some(rate) = &route.rate_limit {
            let k = format!("{subject}:route:{upstream}{}", route.path);
            let h = self.check(&k, rate, "route", request_id).await?;
            tightest = Some(h.tighter(tightest));
        }
        let mut admission = Admission::default();
        let Some(key) = key else {
            admission.tightest = tightest;
            return Ok(admission);
        };
        for (window, quota) in quotas.filter(|_| !counted) {
            let used = if self.count_cache_hits {
                match self.quotas.consume(&qsubject, window, 1, quota, now).await {
                    Ok(d) if !d.allowed => None,
                    Ok(d) => Some(d.used),
                    Err(e) => {
                        tracing::warn!(error = %e, request_id, "quota check failed; allowed");
                        Some(0)
                    }
                }
            } else {
                match self.quotas.usage(&qsubject, window, now).await {
                    Ok(used) if used >= quota => None,
                    Ok(used) => {
                        admission.count_after.push((window, quota));
                        Some(used)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, request_id, "quota check failed; allowed");
                        Some(0)
                    }
                }
            };
            let h = quota_outcome(window, quota, used, now)?;
            tightest = Some(h.tighter(tightest));
        }
        for (window, budget) in [
            (Window::Day, key.daily_budget_micros),
            (Window::Month, key.monthly_budget_micros),
        ] {
            let Some(budget) = budget else { continue };
            match self
                .quotas
                .usage(&spend_counter(&subject), window, now)
                .await
            {
                Ok(spent) if spent >= budget => {
                    let reset = Duration::from_millis(
                        u64::try_from(window.window_end(now).saturating_sub(now)).unwrap_or(0),
                    );
                    // Both budgets used up: the later reset is when misses are allowed again.
                    admission.cached_only = admission.cached_only.max(Some(reset));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, request_id, "budget check failed; allowed")
                }
            }
        }
        admission.tightest = tightest;
        Ok(admission)
    }

    /// Counts what a served request used: request quotas not yet counted (when hits don't
    /// count) and the upstream cost against the spend budgets.
    ///
    /// Most answers count nothing here, and get no future to run (one that does is boxed, see
    /// [`admit`](Self::admit)).
    pub fn record<'a>(
        &'a self,
        identity: &'a Identity,
        admission: &'a Admission,
        called_upstream: bool,
        cost: f64,
        request_id: &'a str,
    ) -> impl Future<Output = ()> + 'a {
        use futures_util::future::Either;
        // Nothing to count for an answer that made no upstream call (a hit).
        let Some(key) = identity.key().filter(|_| called_upstream) else {
            return Either::Left(std::future::ready(()));
        };
        let has_budget = key.daily_budget_micros.is_some() || key.monthly_budget_micros.is_some();
        let spends = has_budget && cost > 0.0;
        // Most misses count nothing here either (hits count at admission, no budget).
        if admission.count_after.is_empty() && !spends {
            return Either::Left(std::future::ready(()));
        }
        Either::Right(Box::pin(
            self.record_counted(identity, admission, spends, cost, request_id),
        ))
    }

    /// [`record`](Self::record) when there is something to count.
    async fn record_counted(
        &self,
        identity: &Identity,
        admission: &Admission,
        spends: bool,
        cost: f64,
        request_id: &str,
    ) {
        let subject = identity.subject();
        let now = crate::keys::now_millis();
        let requests = requests_counter(&subject);
        for (window, quota) in &admission.count_after {
            if let Err(e) = self
                .quotas
                .consume(
                    &requests,
                    *window,
                    1,
                    ratelimit::MAX_AMOUNT.max(*quota),
                    now,
                )
                .await
            {
                tracing::warn!(
                    error = %e,
                    request_id,
                    "counting a request against its quota failed"
                );
            }
        }
        if spends {
            let micros = keystore::money::to_micros(cost).unwrap_or(0);
            let spend = spend_counter(&subject);
            for window in [Window::Day, Window::Month] {
                if let Err(e) = self
                    .quotas
                    .consume(&spend, window, micros, ratelimit::MAX_AMOUNT, now)
                    .await
                {
                    tracing::warn!(
                        error = %e,
                        request_id,
                        "counting spend against the budget failed"
                    );
                }
            }
        }
    }
}
