//! actix-web adapter: the proxy handler, operations endpoints and the admin API.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix_web::dev::{Payload, ResourceDef, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::StatusCode;
use actix_web::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, HeaderValue, PRAGMA};
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use cache_core::{CacheKey, CacheStore, PurgeFilter, Served};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::gateway::{Gateway, ProxyRequest};
use crate::response::{RequestId, X_CACHE, X_REQUEST_ID, X_UPSTREAM_COST, respond};

/// Shared by every worker.
pub struct AppState {
    pub gateway: Arc<Gateway>,
    /// The durable tier, pinged by `/ready`.
    pub l2: Option<Arc<dyn CacheStore>>,
    pub l2_backend: &'static str,
    /// The shared Redis, when configured (pinged by `/ready`).
    pub redis: Option<ratelimit::RedisBackend>,
    request_prefix: u32,
    request_numbers: RequestNumbers,
}

impl AppState {
    pub fn new(
        gateway: Arc<Gateway>,
        l2: Option<Arc<dyn CacheStore>>,
        l2_backend: &'static str,
        redis: Option<ratelimit::RedisBackend>,
    ) -> Self {
        AppState {
            gateway,
            l2,
            l2_backend,
            redis,
            request_prefix: rand::random(),
            request_numbers: RequestNumbers::new(),
        }
    }

    /// The client's `X-Request-Id` when it is sane, else a new one.
    fn request_id(&self, req: &HttpRequest) -> RequestId {
        self.request_id_of(req.headers().get(&X_REQUEST_ID))
    }

    /// [`request_id`](Self::request_id) for a request whose `X-Request-Id` is `given`.
    fn request_id_of(&self, given: Option<&HeaderValue>) -> RequestId {
        if let Some(v) = given
            && !v.is_empty()
            && v.len() <= 64
            && v.as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
        {
            return RequestId::from_client(v);
        }
        RequestId::generated(self.request_prefix, self.request_numbers.next())
    }
}

/// Numbers for generated request ids: unique per instance, not in order across threads. Each
/// thread takes a block of them at a time, so requests share one atomic add per block, not one
/// each.
struct RequestNumbers {
    /// Tells this instance's blocks from another's in a thread's [`ID_BLOCK`].
    id: u64,
    counter: AtomicU64,
}

/// Request numbers a thread takes at a time.
const ID_BLOCK_SIZE: u64 = 1024;

thread_local! {
    /// This thread's block of request numbers: (the `RequestNumbers::id` it is of, next, end).
    static ID_BLOCK: std::cell::Cell<(u64, u64, u64)> = const { std::cell::Cell::new((0, 0, 0)) };
}

impl RequestNumbers {
    fn new() -> RequestNumbers {
        /// Numbers every instance, from 1 (0 is none's).
        static IDS: AtomicU64 = AtomicU64::new(1);
        RequestNumbers {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            counter: AtomicU64::new(0),
        }
    }

    /// A number no other call on this instance has had.
    fn next(&self) -> u64 {
        ID_BLOCK.with(|block| {
            let (id, next, end) = block.get();
            if id == self.id && next < end {
                block.set((id, next + 1, end));
                return next;
            }
            let start = self.counter.fetch_add(ID_BLOCK_SIZE, Ordering::Relaxed);
            block.set((self.id, start + 1, start + ID_BLOCK_SIZE));
            start
        })
    }
}

/// Mounts every route: one service, [`entry`]. The router is left empty so that a proxied
/// request passes no route match (an empty-prefix scope with a guard cost a hit 3% of its
/// instructions); the gateway's own endpoints are told apart by [`own_endpoint`] first.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.default_service(actix_web::dev::fn_service(entry));
}

/// Every request: the proxy, or one of the gateway's own endpoints.
async fn entry(sreq: ServiceRequest) -> Result<ServiceResponse, actix_web::Error> {
    // The raw path: a percent-encoded reserved first segment is an upstream's name.
    if own_endpoint(sreq.path()) {
        // Boxed: the admin handlers' state stays out of every proxied request's future.
        return Box::pin(own(sreq)).await;
    }
    let (req, payload) = sreq.into_parts();
    let resp = proxy(&req, payload).await;
    Ok(ServiceResponse::new(req, resp))
}

/// The pattern of `DELETE /admin/keys/{id}`.
static KEY_BY_ID: std::sync::LazyLock<ResourceDef> =
    std::sync::LazyLock::new(|| ResourceDef::new("/admin/keys/{id}"));

/// A request under a reserved first segment, dispatched by method and path as actix's router
/// would (paths compared after its re-quoting, the key id percent-decoded); anything else there
/// goes to the proxy, which answers a JSON 404 (no upstream has a reserved name).
async fn own(mut sreq: ServiceRequest) -> Result<ServiceResponse, actix_web::Error> {
    // The key id is captured into the request's match info, for `web::Path` to decode.
    let endpoint =
        if sreq.method() == Method::DELETE && KEY_BY_ID.capture_match_info(sreq.match_info_mut()) {
            Own::RevokeKey
        } else {
            match (sreq.method(), sreq.match_info().unprocessed()) {
                (&Method::GET, "/health") => Own::Health,
                (&Method::GET, "/ready") => Own::Ready,
                (&Method::GET, "/metrics") => Own::Metrics,
                (&Method::POST, "/admin/cache/purge") => Own::Purge,
                (&Method::GET, "/admin/breakers") => Own::Breakers,
                (&Method::POST, "/admin/keys") => Own::CreateKey,
                (&Method::GET, "/admin/keys") => Own::ListKeys,
                _ => Own::Proxy,
            }
        };
    let (req, mut payload) = sreq.into_parts();
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        let resp = ApiError::internal("the gateway's state is missing")
            .respond(&RequestId::generated(0, 0));
        return Ok(ServiceResponse::new(req, resp));
    };
    // Extractor failures answer as actix's handlers did (e.g. 413 for an oversized body).
    let resp = match endpoint {
        Own::Health => health().await,
        Own::Ready => ready(state).await,
        Own::Metrics => metrics(state).await,
        Own::Breakers => breakers(&req, state).await,
        Own::ListKeys => list_keys(&req, state).await,
        Own::Purge | Own::CreateKey => match Bytes::from_request(&req, &mut payload).await {
            Ok(body) if matches!(endpoint, Own::Purge) => purge(&req, body, state).await,
            Ok(body) => create_key(&req, body, state).await,
            Err(e) => return Ok(ServiceResponse::from_err(e, req)),
        },
        Own::RevokeKey => match web::Path::<String>::extract(&req).await {
            Ok(id) => revoke_key(&req, id.into_inner(), state).await,
            Err(e) => return Ok(ServiceResponse::from_err(e, req)),
        },
        Own::Proxy => proxy(&req, payload).await,
    };
    Ok(ServiceResponse::new(req, resp))
}

/// What [`own`] dispatches to.
#[derive(Clone, Copy)]
enum Own {
    Health,
    Ready,
    Metrics,
    Purge,
    Breakers,
    CreateKey,
    ListKeys,
    RevokeKey,
    Proxy,
}

/// Whether `path` is under one of the gateway's own first segments (`/health`, `/admin/...`).
fn own_endpoint(path: &str) -> bool {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let first = &rest[..slash(rest).unwrap_or(rest.len())];
    crate::config::RESERVED_NAMES.contains(&first)
}

/// Where `s`'s first `/` is. A byte search: `str::find('/')`'s searcher costs a short path
/// several times more (two calls on every request).
fn slash(s: &str) -> Option<usize> {
    s.bytes().position(|b| b == b'/')
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

#[derive(Serialize)]
struct Dependency {
    state: &'static str,
    backend: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Awaits a dependency's health check for at most `within`: `Err` with what went wrong.
pub(crate) async fn probe<E: std::fmt::Display>(
    check: impl std::future::Future<Output = Result<(), E>>,
    within: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(within, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

impl Dependency {
    const DISABLED: Dependency = Dependency {
        state: "disabled",
        backend: "none",
        error: None,
    };

    fn probed(backend: &'static str, result: Result<(), String>) -> Dependency {
        match result {
            Ok(()) => Dependency {
                state: "up",
                backend,
                error: None,
            },
            Err(error) => Dependency {
                state: "down",
                backend,
                error: Some(error),
            },
        }
    }
}

async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let database = match &state.l2 {
        None => Dependency::DISABLED,
        Some(l2) => Dependency::probed(
            state.l2_backend,
            probe(l2.ping(), Duration::from_secs(2)).await,
        ),
    };
    let redis = match &state.redis {
        None => Dependency::DISABLED,
        Some(r) => Dependency::probed("redis", probe(r.ping(), Duration::from_secs(1)).await),
    };
    // The gateway keeps serving when the database or Redis is down (L1, key cache, local
    // limits): degraded, not unready; `degraded` names the dependencies that are down.
    let degraded: Vec<&str> = [("database", &database), ("redis", &redis)]
        .into_iter()
        .filter(|(_, d)| d.state == "down")
        .map(|(name, _)| name)
        .collect();
    let status = if degraded.is_empty() {
        "ready"
    } else {
        "degraded"
    };
    let upstreams: serde_json::Map<String, serde_json::Value> = state
        .gateway
        .upstreams
        .iter()
        .map(|(name, up)| {
            let breaker = up.client.breaker_state().map_or("none", |s| s.as_str());
            (name.clone(), serde_json::json!({ "breaker": breaker }))
        })
        .collect();
    HttpResponse::Ok().json(serde_json::json!({
        "status": status,
        "degraded": degraded,
        "dependencies": {
            "database": database,
            "redis": redis,
        },
        "upstreams": upstreams,
    }))
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let g = &state.gateway;
    let m = &g.metrics;
    if let Ok(usage) = g.cache.store().usage().await {
        m.cache_entries
            .set(i64::try_from(usage.entries).unwrap_or(i64::MAX));
        m.cache_bytes
            .set(i64::try_from(usage.bytes).unwrap_or(i64::MAX));
    }
    let stats = g.cache.stats();
    let get = |a: &AtomicU64| i64::try_from(a.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
    m.cache_collisions.set(get(&stats.collisions));
    m.cache_store_errors.set(get(&stats.store_errors));
    if let Some(t) = &g.tier_stats {
        m.cache_l2_errors.set(get(&t.l2_errors));
        m.cache_l2_hits.set(get(&t.l2_hits));
        m.cache_l2_skipped.set(get(&t.l2_skipped));
        m.cache_l2_filtered.set(get(&t.l2_filtered));
    }
    if let Some(q) = &g.limits.sql_quotas {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        m.quota_pending.set(clamp(q.pending()));
        m.quota_dropped.set(clamp(q.dropped()));
    }
    m.in_flight_fetches.set(g.cache.in_flight() as f64);
    for (name, up) in &g.upstreams {
        let c = &up.client;
        let state = match c.breaker_state() {
            Some(breaker::State::Open) => 2,
            Some(breaker::State::HalfOpen) => 1,
            _ => 0,
        };
        let labels = [name.as_str()];
        m.breaker_state.with_label_values(&labels).set(state);
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        m.upstream_retries
            .with_label_values(&labels)
            .set(clamp(c.retries()));
        m.breaker_rejections
            .with_label_values(&labels)
            .set(clamp(c.rejected()));
        m.retries_denied
            .with_label_values(&labels)
            .set(clamp(c.retries_denied()));
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(m.render())
}

/// Constant-time comparison of the bearer token with the admin token.
fn admin_authorized(req: &HttpRequest, token: &str) -> Result<(), ApiError> {
    if token.is_empty() {
        return Err(ApiError::forbidden(
            "the admin API is disabled: set server.admin_token",
        ));
    }
    let given = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::unauthorized("admin token required (Authorization: Bearer ...)")
        })?;
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("wrong admin token"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /admin/keys`: body as `keys create`'s options; answers like `keys create --json`.
async fn create_key(req: &HttpRequest, body: Bytes, state: web::Data<AppState>) -> HttpResponse {
    let rid = state.request_id(req);
    let result = async {
        admin_authorized(req, &state.gateway.config.server.admin_token)?;
        let options: crate::keys::CreateKey = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid key request: {e}")))?;
        let now = crate::keys::now_millis();
        let new = options.to_new_key(now).map_err(ApiError::bad_request)?;
        let (record, key) = state
            .gateway
            .keys
            .create(new)
            .await
            .map_err(key_store_error)?;
        tracing::info!(id = %record.id, name = %record.name, "API key created");
        Ok::<_, ApiError>(crate::keys::Created::new(&record, &key, now))
    }
    .await;
    match result {
        Ok(created) => HttpResponse::Created().json(created),
        Err(e) => e.respond(&rid),
    }
}

/// `GET /admin/keys`: every key, never its plaintext or digest.
async fn list_keys(req: &HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let rid = state.request_id(req);
    let result = async {
        admin_authorized(req, &state.gateway.config.server.admin_token)?;
        let mut records = state
            .gateway
            .keys
            .store()
            .list()
            .await
            .map_err(key_store_error)?;
        records.sort_by_key(|r| r.created_at);
        let now = crate::keys::now_millis();
        Ok::<_, ApiError>(records.iter().map(|r| r.info(now)).collect::<Vec<_>>())
    }
    .await;
    match result {
        Ok(keys) => HttpResponse::Ok().json(serde_json::json!({ "keys": keys })),
        Err(e) => e.respond(&rid),
    }
}

/// `DELETE /admin/keys/{id}`: revokes at once on this node, within seconds on the others.
async fn revoke_key(req: &HttpRequest, id: String, state: web::Data<AppState>) -> HttpResponse {
    let rid = state.request_id(req);
    let result = async {
        admin_authorized(req, &state.gateway.config.server.admin_token)?;
        let key_id = keystore::KeyId::parse(&id)
            .map_err(|_| ApiError::not_found(format!("no key {id:?}")))?;
        if !state
            .gateway
            .keys
            .revoke(&key_id)
            .await
            .map_err(key_store_error)?
        {
            return Err(ApiError::not_found(format!("no key {id:?}")));
        }
        tracing::info!(id = %key_id, "API key revoked");
        Ok(key_id)
    }
    .await;
    match result {
        Ok(id) => {
            HttpResponse::Ok().json(serde_json::json!({ "id": id.to_string(), "revoked": true }))
        }
        Err(e) => e.respond(&rid),
    }
}

fn key_store_error(e: keystore::KeyError) -> ApiError {
    match e {
        keystore::KeyError::Invalid(m) => ApiError::bad_request(m),
        e => {
            let mut err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                format!("key store: {e}"),
            );
            err.retry_after = Some(1);
            err
        }
    }
}

/// `GET /admin/breakers`: every upstream's breaker.
async fn breakers(req: &HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let rid = state.request_id(req);
    if let Err(e) = admin_authorized(req, &state.gateway.config.server.admin_token) {
        return e.respond(&rid);
    }
    let ms = |d: Option<Duration>| d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut out = serde_json::Map::new();
    let mut names: Vec<&String> = state.gateway.upstreams.keys().collect();
    names.sort();
    for name in names {
        let up = &state.gateway.upstreams[name];
        let c = &up.client;
        let value = match c.breaker_snapshot() {
            None => serde_json::json!({ "state": "none" }),
            Some(s) => serde_json::json!({
                "state": s.state.as_str(),
                "consecutive_failures": s.consecutive_failures,
                "calls_in_window": s.calls_in_window,
                "failures_in_window": s.failures_in_window,
                "failure_rate": s.failure_rate,
                "next_probe_in_ms": ms(s.next_probe_in),
                "probes_in_flight": s.probes_in_flight,
                "retries": c.retries(),
                "rejected": c.rejected(),
                "retries_denied": c.retries_denied(),
            }),
        };
        out.insert(name.clone(), value);
    }
    HttpResponse::Ok().json(serde_json::json!({ "breakers": out }))
}

/// Body of `POST /admin/cache/purge`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub cache_key: Option<String>,
}

impl PurgeRequest {
    pub fn filter(&self) -> Result<PurgeFilter, ApiError> {
        let key = match &self.cache_key {
            Some(k) => {
                Some(CacheKey::from_hex(k).map_err(|e| ApiError::bad_request(e.to_string()))?)
            }
            None => None,
        };
        Ok(PurgeFilter {
            upstream: self.upstream.clone(),
            route: self.route.clone(),
            key,
        })
    }
}

async fn purge(req: &HttpRequest, body: Bytes, state: web::Data<AppState>) -> HttpResponse {
    let rid = state.request_id(req);
    let result = async {
        admin_authorized(req, &state.gateway.config.server.admin_token)?;
        let p: PurgeRequest = if body.iter().all(u8::is_ascii_whitespace) {
            PurgeRequest::default()
        } else {
            serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_request(format!("invalid purge request: {e}")))?
        };
        let filter = p.filter()?;
        let purged = state
            .gateway
            .cache
            .store()
            .purge(&filter)
            .await
            .map_err(|e| ApiError::internal(format!("purge failed: {e}")))?;
        tracing::info!(?filter, purged, "cache purged");
        Ok::<_, ApiError>(purged)
    }
    .await;
    match result {
        Ok(n) => HttpResponse::Ok().json(serde_json::json!({ "purged": n })),
        Err(e) => e.respond(&rid),
    }
}

async fn proxy(req: &HttpRequest, payload: Payload) -> HttpResponse {
    // Borrowed from the app data, not extracted: `web::Data` would clone (and drop) an `Arc`
    // whose count every worker shares, on every request.
    let Some(state) = req.app_data::<web::Data<AppState>>() else {
        return ApiError::internal("the gateway's state is missing")
            .respond(&RequestId::generated(0, 0));
    };
    let heads = RequestHeads::of(req.headers());
    let rid = state.request_id_of(heads.request_id);
    // Every event logged while serving this request carries its id: a `request_id` field
    // before the cache, the gateway's `request` span after it (see `Gateway::proxy`).
    match proxy_inner(req, &heads, payload, state, &rid).await {
        Ok((served, rate)) => {
            let mut resp = respond(&served, &rid);
            if let Some(h) = rate {
                h.set_on(resp.headers_mut());
            }
            resp
        }
        Err((e, Some(fallback)))
            if matches!(
                e.code,
                "upstream_error" | "upstream_timeout" | "upstream_unavailable"
            ) =>
        {
            tracing::debug!(
                error = %e,
                request_id = &*rid,
                "upstream down; answering the route's fallback"
            );
            let status = StatusCode::from_u16(fallback.status).unwrap_or(StatusCode::OK);
            HttpResponse::build(status)
                .insert_header((X_CACHE.clone(), HeaderValue::from_static("BYPASS")))
                .insert_header(("x-tollgate-fallback", "true"))
                .insert_header((X_UPSTREAM_COST.clone(), HeaderValue::from_static("0")))
                .insert_header(("content-type", fallback.content_type.as_str()))
                .insert_header((X_REQUEST_ID.clone(), rid.header()))
                .body(fallback.body.clone())
        }
        Err((e, _)) => {
            if e.status.is_client_error() {
                state
                    .gateway
                    .metrics
                    .client_errors
                    .with_label_values(&[e.code])
                    .inc();
            }
            e.respond(&rid)
        }
    }
}

/// The request headers the proxy reads, found in one pass over the map: each `get` hashes the
/// name and probes the map, and seven of them cost a hit more than this whole pass.
pub(crate) struct RequestHeads<'a> {
    /// Size of the header block as `server.max_header_bytes` counts it: per value, its name,
    /// `: `, the value and CRLF.
    pub bytes: u64,
    /// The first `X-Request-Id`.
    pub request_id: Option<&'a HeaderValue>,
    /// The first `Authorization`.
    pub authorization: Option<&'a HeaderValue>,
    /// The first `X-Api-Key`.
    pub api_key: Option<&'a HeaderValue>,
    /// The first `X-Client-Id`.
    pub client_id: Option<&'a HeaderValue>,
    /// The first `Content-Length`.
    pub content_length: Option<&'a HeaderValue>,
    /// Whether a `Cache-Control` or `Pragma` value holds the `no-cache` directive.
    pub no_cache: bool,
}

impl<'a> RequestHeads<'a> {
    /// Reads `headers` once.
    pub(crate) fn of(headers: &'a actix_web::http::header::HeaderMap) -> RequestHeads<'a> {
        let mut heads = RequestHeads {
            bytes: 0,
            request_id: None,
            authorization: None,
            api_key: None,
            client_id: None,
            content_length: None,
            no_cache: false,
        };
        for (name, value) in headers.iter() {
            heads.bytes += (name.as_str().len() + value.len() + 4) as u64;
            let first = if name == AUTHORIZATION {
                &mut heads.authorization
            } else if name == CONTENT_LENGTH {
                &mut heads.content_length
            } else if name == CACHE_CONTROL || name == PRAGMA {
                heads.no_cache |= value.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
                });
                continue;
            } else if name == X_REQUEST_ID {
                &mut heads.request_id
            } else if name == crate::auth::X_API_KEY {
                &mut heads.api_key
            } else if name == crate::auth::X_CLIENT_ID {
                &mut heads.client_id
            } else {
                continue;
            };
            first.get_or_insert(value);
        }
        heads
    }
}

/// The answer (with the tightest limit's headers), or the error with the matched route's
/// fallback (if it has one).
async fn proxy_inner(
    req: &HttpRequest,
    heads: &RequestHeads<'_>,
    payload: Payload,
    state: &AppState,
    rid: &str,
) -> Result<
    (Served, Option<crate::limits::Headers>),
    (ApiError, Option<crate::config::FallbackConfig>),
> {
    let mut route_fallback = None;
    proxy_route(req, heads, payload, state, rid, &mut route_fallback)
        .await
        .map_err(|e| (e, route_fallback))
}

async fn proxy_route(
    req: &HttpRequest,
    heads: &RequestHeads<'_>,
    mut payload: Payload,
    state: &AppState,
    rid: &str,
    route_fallback: &mut Option<crate::config::FallbackConfig>,
) -> Result<(Served, Option<crate::limits::Headers>), ApiError> {
    let server = &state.gateway.config.server;
    let target_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) as u64;
    if target_len > server.max_url_bytes.0 {
        return Err(ApiError::uri_too_long(server.max_url_bytes.0));
    }
    if heads.bytes > server.max_header_bytes.0 {
        return Err(ApiError::headers_too_large(server.max_header_bytes.0));
    }
    let full = req.path();
    let rest = full.strip_prefix('/').unwrap_or(full);
    let (upstream, path) = match slash(rest) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if upstream.is_empty() {
        return Err(ApiError::not_found("call /{upstream}/{path}"));
    }
    let method = req.method().as_str();
    let limits = &state.gateway.limits;
    let ingress = limits.ingress(crate::auth::client_ip(req), rid).await?;
    let identity = crate::auth::authenticate(
        &state.gateway.keys,
        state.gateway.config.auth.required,
        heads,
        req,
        rid,
    )
    .await?;
    let (up, route) = state.gateway.resolve(upstream, path, method)?;
    if let Some(key) = identity.key()
        && !key.allows_upstream(&up.name)
    {
        return Err(ApiError::forbidden(format!(
            "this key may not call upstream {:?}",
            up.name
        )));
    }
    let admission = limits
        .admit(&identity, &up.name, route, ingress, rid)
        .await?;
    route_fallback.clone_from(&route.fallback);

    let limit = server.max_body_bytes.0;
    if let Some(len) = heads
        .content_length
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit
    {
        return Err(ApiError::payload_too_large(limit));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("reading request body: {e}")))?;
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::payload_too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }

    let force_refresh = heads.no_cache;
    let preq = ProxyRequest {
        request_id: rid,
        method,
        path,
        query: req.query_string(),
        headers: || {
            req.headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect()
        },
        body: body.freeze(),
        force_refresh,
        cached_only: admission.cached_only,
    };
    let served = state.gateway.proxy(up, route, preq).await?;
    limits
        .record(&identity, &admission, served.fetched, route.cost, rid)
        .await;
    Ok((served, admission.tightest))
}

#[cfg(test)]
mod tests {
    use cache_core::{CacheStatus, Entry, Served};

    use super::*;

    #[test]
    fn request_numbers_are_unique_across_threads_and_instances() {
        let a = Arc::new(RequestNumbers::new());
        let b = RequestNumbers::new();
        // Four threads take more than a block each from `a`; this thread alternates a and b.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let a = Arc::clone(&a);
                std::thread::spawn(move || (0..3000).map(|_| a.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut from_a: Vec<u64> = Vec::new();
        let mut from_b: Vec<u64> = Vec::new();
        for _ in 0..1500 {
            from_a.push(a.next());
            from_b.push(b.next());
        }
        for t in threads {
            from_a.extend(t.join().expect("thread"));
        }
        let n = from_a.len();
        from_a.sort_unstable();
        from_a.dedup();
        assert_eq!(from_a.len(), n, "a number given twice");
        // b's blocks are its own: alternating with a in one thread skips numbers, never
        // repeats one.
        let n = from_b.len();
        from_b.sort_unstable();
        from_b.dedup();
        assert_eq!(from_b.len(), n, "b gave a number twice");
        // Used alone in a thread, an instance counts 0, 1, 2, … across its blocks.
        let c = RequestNumbers::new();
        let from_c: Vec<u64> = (0..3000).map(|_| c.next()).collect();
        assert_eq!(from_c, (0..3000).collect::<Vec<u64>>());
    }

    #[test]
    fn own_endpoints_are_the_reserved_first_segments() {
        for path in [
            "/health",
            "/ready",
            "/metrics",
            "/admin/keys",
            "/admin/keys/x",
            "/admin",
        ] {
            assert!(own_endpoint(path), "{path}");
        }
        for path in [
            "/",
            "/bench/x",
            "/healthy",
            "/Admin/keys",
            "/api/health",
            "",
        ] {
            assert!(!own_endpoint(path), "{path}");
        }
    }

    #[test]
    fn one_pass_finds_the_headers_the_proxy_reads() {
        use actix_web::http::header::{HeaderMap, HeaderName};
        let mut map = HeaderMap::new();
        let mut add = |name: &'static str, value: &'static str| {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        };
        add("host", "example.test");
        add("authorization", "Bearer first");
        add("authorization", "Bearer second");
        add("x-api-key", "k");
        add("x-client-id", "c");
        add("x-request-id", "r");
        add("content-length", "12");
        add("cache-control", "max-age=0");
        let heads = RequestHeads::of(&map);
        let text = |v: Option<&HeaderValue>| v.and_then(|v| v.to_str().ok()).map(String::from);
        assert_eq!(text(heads.authorization).as_deref(), Some("Bearer first"));
        assert_eq!(text(heads.api_key).as_deref(), Some("k"));
        assert_eq!(text(heads.client_id).as_deref(), Some("c"));
        assert_eq!(text(heads.request_id).as_deref(), Some("r"));
        assert_eq!(text(heads.content_length).as_deref(), Some("12"));
        assert!(!heads.no_cache);
        // name + ": " + value + CRLF, per value
        let expected: usize = map
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        assert_eq!(heads.bytes, expected as u64);

        for (name, value, no_cache) in [
            ("cache-control", "max-age=0, No-Cache", true),
            ("pragma", "no-cache", true),
            ("cache-control", "no-cache-please", false),
            ("x-other", "no-cache", false),
        ] {
            let mut map = HeaderMap::new();
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            assert_eq!(RequestHeads::of(&map).no_cache, no_cache, "{name}: {value}");
        }
        let empty = HeaderMap::new();
        let none = RequestHeads::of(&empty);
        assert!(none.authorization.is_none() && none.request_id.is_none() && none.bytes == 0);
    }

    #[test]
    fn a_requests_future_stays_within_mallocs_per_thread_cache() {
        // actix boxes every request's future: past 1,032 bytes glibc's malloc takes it from
        // its shared bins instead of the thread's cache, several hundred instructions more
        // per request, on hits too. Checks, the key cache and the miss path box their own
        // state to keep it out (see `Gateway::proxy`).
        let request = actix_web::test::TestRequest::default().to_srv_request();
        let size = std::mem::size_of_val(&entry(request));
        assert!(size <= 1024, "entry's future is {size} bytes");
    }

    #[test]
    fn generated_request_ids_are_prefix_then_counter_in_hex() {
        assert_eq!(
            &*RequestId::generated(0x1889_d571, 0x2a),
            "1889d57100000000002a"
        );
        assert_eq!(
            &*RequestId::generated(u32::MAX, u64::MAX),
            "ffffffffffffffffffff"
        );
    }

    /// A 200 with body `{}` and cost 0.5, stored at 0 with `headers`.
    fn entry_with_headers(headers: Vec<(String, String)>) -> Entry {
        Entry::new(
            "sig",
            "up",
            "/r",
            200,
            headers,
            Bytes::from_static(b"{}"),
            0.5,
            &cache_core::CachePolicy::default(),
            0,
        )
    }

    #[test]
    fn a_hit_replays_the_valid_entry_headers_and_adds_its_own() {
        let entry = entry_with_headers(vec![
            ("content-type".into(), "application/json".into()),
            ("bad name".into(), "x".into()),
            ("x-bad-value".into(), "a\nb".into()),
            ("x-dup".into(), "1".into()),
            ("x-dup".into(), "2".into()),
        ]);
        let served = Served {
            entry: std::sync::Arc::new(entry),
            status: CacheStatus::Hit,
            age_secs: 3,
            fetched: false,
            coalesced: false,
            stored: true,
        };
        let rid = RequestId::generated(1, 2);
        // Twice: the first answer prepares the headers, the second replays them.
        for _ in 0..2 {
            let resp = respond(&served, &rid);
            let mut headers: Vec<String> = resp
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                .collect();
            headers.sort();
            assert_eq!(
                headers,
                [
                    "age: 3",
                    "content-type: application/json",
                    "x-cache: HIT",
                    "x-dup: 1",
                    "x-dup: 2",
                    "x-request-id: 00000001000000000002",
                    "x-upstream-cost: 0",
                ]
            );
        }
    }

    #[test]
    fn tollgates_own_headers_replace_the_upstreams() {
        let stored = |name: &str| (name.to_string(), format!("upstream's {name}"));
        let entry = entry_with_headers(vec![
            stored("x-cache"),
            stored("x-request-id"),
            stored("x-upstream-cost"),
            stored("age"),
            stored("etag"),
        ]);
        let served = |status, fetched| Served {
            entry: std::sync::Arc::new(entry.clone()),
            status,
            age_secs: 7,
            fetched,
            coalesced: false,
            stored: true,
        };
        let values = |resp: &actix_web::HttpResponse, name: &str| -> Vec<String> {
            resp.headers()
                .get_all(name)
                .map(|v| v.to_str().unwrap_or_default().to_string())
                .collect()
        };
        let rid = RequestId::generated(1, 2);
        let hit = respond(&served(CacheStatus::Hit, false), &rid);
        assert_eq!(values(&hit, "x-cache"), ["HIT"]);
        assert_eq!(values(&hit, "x-request-id"), ["00000001000000000002"]);
        assert_eq!(values(&hit, "x-upstream-cost"), ["0"]);
        assert_eq!(values(&hit, "age"), ["7"]);
        assert_eq!(values(&hit, "etag"), ["upstream's etag"]);
        let miss = respond(&served(CacheStatus::Miss, true), &rid);
        assert_eq!(values(&miss, "x-cache"), ["MISS"]);
        assert_eq!(values(&miss, "x-upstream-cost"), ["0.5"]);
        // Tollgate sets no Age on a miss: the upstream's passes through.
        assert_eq!(values(&miss, "age"), ["upstream's age"]);
    }
}
