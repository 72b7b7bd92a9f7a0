//! `tollgate serve`: wiring the stores, the cache and the HTTP server; background tasks
//! (pre-warming, the L2 sweeper); graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use anyhow::{Context, bail};
use cache_core::{Cache, CacheStore, MemoryStore, TieredStore};

use crate::config::Config;
use crate::db::Database;
use crate::gateway::{Gateway, prewarm_interval};
use crate::http::{self, AppState, PurgeRequest};
use crate::limits::Limits;
use crate::metrics::Metrics;

fn init_tracing(cfg: &Config) {
    use tracing_subscriber::prelude::*;
    let filter = log_filter(std::env::var(tracing_subscriber::EnvFilter::DEFAULT_ENV).ok());
    // Colours only for a person at a terminal: escape codes garble a log file or collector,
    // and cost time on every formatted span and event.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let result = if cfg.server.log_format == crate::config::LogFormat::Json {
        registry.with(layer.json().with_ansi(ansi)).try_init()
    } else {
        registry.with(layer.with_ansi(ansi)).try_init()
    };
    if let Err(e) = result {
        eprintln!("tollgate: logging not initialised: {e}");
    }
}

/// The filter for `RUST_LOG`'s directives (`info` when unset or invalid).
///
/// `Targets` when they filter by target and level only. `EnvFilter` takes a lock every worker
/// shares on every enter and exit of every span, to match span and field directives
/// (`target[span{field=value}]=level`); a miss enters its request's span several times. Those
/// directives, and an empty `RUST_LOG`, keep `EnvFilter`.
fn log_filter(
    directives: Option<String>,
) -> Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync> {
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::prelude::*;
    let Some(directives) = directives.filter(|d| EnvFilter::try_new(d).is_ok()) else {
        return EnvFilter::new("info").boxed();
    };
    if !directives.contains('[')
        && !directives.trim().is_empty()
        && let Ok(targets) = directives.parse::<Targets>()
    {
        return targets.boxed();
    }
    EnvFilter::new(directives).boxed()
}

/// Runs the gateway until SIGTERM / SIGINT, then finishes in-flight requests and flushes the
/// cache's pending L2 writes.
pub fn serve(cfg: Config) -> anyhow::Result<()> {
    init_tracing(&cfg);
    upstream_client::install_crypto_provider();
    let db = Database::parse(&cfg.storage.database_url)?;
    match &db {
        Database::Sqlite { path, .. } => {
            let applied = db.migrate()?;
            tracing::info!(database = %path, applied = applied.len(), "SQLite migrations applied");
        }
        Database::Postgres { .. } => {
            let pending = db.pending()?;
            if !pending.is_empty() {
                bail!(
                    "the PostgreSQL database has {} pending migration(s) ({}): run `tollgate migrate` first",
                    pending.len(),
                    pending.join(", ")
                );
            }
        }
    }
    actix_web::rt::System::new().block_on(run(Arc::new(cfg), db))
}

async fn run(cfg: Arc<Config>, db: Database) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new()?);
    let l2 = db.cache_store(cfg.storage.pool_size)?;
    let l1 =
        MemoryStore::counting_prepared(cfg.cache.l1_max_bytes.0, crate::response::replay_weight);
    let mut tiered = TieredStore::new(l1, Arc::clone(&l2), cfg.cache.l2_write_queue)
        .with_write_linger(cfg.cache.l2_write_linger);
    // A SQLite file is one node's own: a filter of its keys spares the long tail's misses a
    // database lookup.
    if cfg.cache.l2_filter && matches!(db, Database::Sqlite { .. }) {
        tiered = tiered.with_l2_filter();
    }
    let tiered = Arc::new(tiered);
    let cache =
        Cache::<crate::gateway::FetchError>::builder(Arc::clone(&tiered) as Arc<dyn CacheStore>)
            .max_waiters(cfg.cache.max_waiters)
            .build();
    let keys = keystore::KeyCache::new(crate::keys::open_store(
        &cfg.storage.database_url,
        cfg.storage.pool_size,
    )?);
    let (limits, redis, limit_tasks) = build_limits(&cfg)?;
    let gateway = Arc::new(Gateway::new(
        Arc::clone(&cfg),
        cache,
        Arc::clone(&limits),
        metrics,
        Some(Arc::clone(tiered.stats())),
        keys.clone(),
    )?);
    // Probes go through the tiered store: an answer from the database ends its L2 cool-down,
    // so once `/ready` says the database is up, L2 is in use again.
    let tiered_store = Arc::clone(&tiered) as Arc<dyn CacheStore>;
    let monitor = tokio::spawn(monitor_dependencies(
        Arc::clone(&tiered_store),
        redis.clone(),
        Arc::clone(&gateway.metrics),
    ));
    let state = web::Data::new(AppState::new(
        Arc::clone(&gateway),
        Some(tiered_store),
        db.backend(),
        redis,
    ));
    let workers = cfg.server.worker_threads();
    crate::gateway::size_key_memos(workers);
    let max_body = cfg.server.max_body_bytes.as_usize();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(max_body))
            .configure(http::routes)
    })
    .workers(workers)
    .shutdown_timeout(cfg.server.shutdown_timeout.as_secs().max(1))
    .bind(cfg.server.listen)
    .with_context(|| format!("binding {}", cfg.server.listen))?;
    for addr in server.addrs() {
        // Tests and scripts read this line to find a port picked with `--listen ...:0`.
        println!("tollgate listening on http://{addr}");
    }
    tracing::info!(listen = ?server.addrs(), workers, database = db.backend(), "tollgate started");
    let server = server.run();

    // Revocations made on other nodes reach this one within two seconds.
    let mut tasks = vec![keys.spawn_revocation_sync(Duration::from_secs(2)), monitor];
    tasks.extend(limit_tasks);
    tasks.push(tokio::spawn(sweeper(
        Arc::clone(&tiered),
        cfg.cache.sweep_interval,
        cfg.cache.sweep_batch,
    )));
    for up in gateway.upstreams.values() {
        for route in up.routes.iter().filter(|r| !r.prewarm.is_empty()) {
            let (g, up, route) = (Arc::clone(&gateway), Arc::clone(up), Arc::clone(route));
            tasks.push(tokio::spawn(async move {
                loop {
                    let started = tokio::time::Instant::now();
                    let ok = g.prewarm_route(&up, &route).await;
                    tracing::info!(upstream = %up.name, route = %route.path, ok, total = route.prewarm.len(), "prewarmed");
                    tokio::time::sleep_until(started + prewarm_interval(&route)).await;
                }
            }));
        }
    }

    let result = server.await;
    tracing::info!("shutting down: flushing pending cache writes");
    for t in &tasks {
        t.abort();
    }
    match tokio::time::timeout(Duration::from_secs(10), limits.quotas.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "flushing quota counters failed"),
        Err(_) => tracing::warn!("flushing quota counters took over 10s; abandoned"),
    }
    match tokio::time::timeout(Duration::from_secs(10), tiered.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "flushing the L2 cache failed"),
        Err(_) => tracing::warn!("flushing the L2 cache took over 10s; abandoned"),
    }
    result.context("HTTP server failed")
}

type LimitParts = (
    Arc<Limits>,
    Option<ratelimit::RedisBackend>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// Rate limits and quotas: in-process GCRA and SQL-persisted quota counters on a single node;
/// with `storage.redis_url`, Redis GCRA (with the configured failure policy) and quota counters
/// hot in Redis, synced to SQL.
fn build_limits(cfg: &Config) -> anyhow::Result<LimitParts> {
    use ratelimit::{
        FailurePolicy, FallbackLimiter, LocalLimiter, QuotaDb, RateLimiter, RedisBackend,
        RedisLimiter, RedisOptions, RedisQuotaOptions, RedisQuotaStore, SqlQuotaStore,
    };
    let quota_db = QuotaDb::connect(&cfg.storage.database_url, cfg.storage.pool_size)
        .map_err(|e| anyhow::anyhow!("opening the quota store: {e}"))?;
    let local = LocalLimiter::new();
    // governor keeps a state per key: forget idle ones so memory stays bounded.
    let tasks = vec![tokio::spawn(local.cleanup_task(Duration::from_secs(60)))];
    if cfg.storage.redis_url.is_empty() {
        let limiter: Arc<dyn RateLimiter> = Arc::new(local);
        let quotas = SqlQuotaStore::new(quota_db);
        let mut limits = Limits::new(limiter, Arc::new(quotas.clone()), cfg);
        limits.sql_quotas = Some(quotas);
        return Ok((Arc::new(limits), None, tasks));
    }
    let mut options = RedisOptions::new(cfg.storage.redis_url.clone());
    options.response_timeout = cfg.limits.redis_timeout;
    let backend =
        RedisBackend::connect(options).map_err(|e| anyhow::anyhow!("storage.redis_url: {e}"))?;
    let policy = match cfg.limits.redis_failure {
        crate::config::RedisFailure::Open => FailurePolicy::FailOpen,
        crate::config::RedisFailure::Closed => FailurePolicy::FailClosed,
    };
    let redis_limiter = RedisLimiter::new(backend.clone());
    let limiter: Arc<dyn RateLimiter> = Arc::new(FallbackLimiter::new(
        redis_limiter.clone(),
        local,
        cfg.limits.nodes,
        policy,
    ));
    let quotas = RedisQuotaStore::new(backend.clone(), quota_db, RedisQuotaOptions::default());
    let limits =
        Limits::new(limiter, Arc::new(quotas.clone()), cfg).with_redis(redis_limiter, quotas);
    Ok((Arc::new(limits), Some(backend), tasks))
}

/// Probes the database and Redis every second (each answer awaited at most a second): sets
/// `tollgate_dependency_up` and logs each change of state once (down at `warn`, up at `info`).
/// Requests never wait on this; they skip a failed dependency on their own.
async fn monitor_dependencies(
    database: Arc<dyn CacheStore>,
    redis: Option<ratelimit::RedisBackend>,
    metrics: Arc<Metrics>,
) {
    const EVERY: Duration = Duration::from_secs(1);
    let mut up = [true, true];
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let db = crate::http::probe(database.ping(), EVERY).await;
        let rd = match &redis {
            None => None,
            Some(r) => Some(crate::http::probe(r.ping(), EVERY).await),
        };
        for (i, (name, probe)) in [("database", Some(db)), ("redis", rd)]
            .into_iter()
            .enumerate()
        {
            let Some(probe) = probe else { continue };
            metrics
                .dependency_up
                .with_label_values(&[name])
                .set(i64::from(probe.is_ok()));
            match probe {
                Err(error) if up[i] => {
                    up[i] = false;
                    tracing::warn!(dependency = name, %error, "dependency down: serving degraded");
                }
                Ok(()) if !up[i] => {
                    up[i] = true;
                    tracing::info!(dependency = name, "dependency up again");
                }
                _ => {}
            }
        }
    }
}

/// Removes expired L2 rows in bounded batches, every `interval`.
async fn sweeper(store: Arc<TieredStore>, interval: Duration, batch: usize) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let mut total = 0;
        for _ in 0..100 {
            let now = cache_core::SystemClock.now_millis();
            match store.sweep_expired(now, batch).await {
                Ok(n) => {
                    total += n;
                    if (n as usize) < batch {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cache sweep failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::debug!(removed = total, "expired cache entries swept");
        }
    }
}

use cache_core::Clock as _;

/// `tollgate cache purge`: through the running gateway's admin API (at `url`, else at
/// `server.listen`) so its in-process tier is purged too; when no gateway answers there (and no
/// `url` was given), directly in the database.
pub fn purge_cli(cfg: &Config, req: PurgeRequest, url: Option<&str>) -> anyhow::Result<()> {
    let filter = req.filter().map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let base = match url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let mut addr = cfg.server.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    upstream_client::install_crypto_provider();
    let endpoint = format!("{base}/admin/cache/purge");
    let token = cfg.server.admin_token.clone();
    let body = serde_json::to_vec(&req)?;
    let answer = rt.block_on(async {
        let sent = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(30))
            .build()?
            .post(&endpoint)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Ok(None),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("calling {endpoint}"))),
        };
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{endpoint} answered {status}: {text}");
        }
        let v: serde_json::Value = serde_json::from_str(&text)?;
        Ok(Some(v))
    })?;
    if let Some(v) = answer {
        println!(
            "purged {} (through the running gateway at {base})",
            v["purged"]
        );
        return Ok(());
    }
    if url.is_some() {
        bail!("no gateway answered at {base}");
    }
    eprintln!(
        "note: no gateway answered at {base}; purging the database only (a gateway listening \
         elsewhere keeps its in-memory copies until they expire: pass --url to reach it)"
    );
    let db = Database::parse(&cfg.storage.database_url)?;
    if matches!(db, Database::Sqlite { .. }) {
        db.migrate()?;
    }
    let n = rt.block_on(async move {
        let store = db.cache_store(1)?;
        store.purge(&filter).await.context("purging the database")
    })?;
    println!("purged {n} (from the database)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::prelude::*;

    /// The filter `RUST_LOG=directives` gets ("targets" or "env"), and whether it takes events
    /// from `tollgate::gateway` at DEBUG, INFO and WARN, and from `hyper` at INFO.
    fn filtered(directives: Option<&str>) -> (&'static str, [bool; 4]) {
        let subscriber =
            tracing_subscriber::registry().with(log_filter(directives.map(String::from)));
        let kind = match (
            subscriber.downcast_ref::<Targets>(),
            subscriber.downcast_ref::<EnvFilter>(),
        ) {
            (Some(_), _) => "targets",
            (_, Some(_)) => "env",
            _ => "other",
        };
        let enabled = tracing::subscriber::with_default(subscriber, || {
            [
                tracing::enabled!(target: "tollgate::gateway", Level::DEBUG),
                tracing::enabled!(target: "tollgate::gateway", Level::INFO),
                tracing::enabled!(target: "tollgate::gateway", Level::WARN),
                tracing::enabled!(target: "hyper", Level::INFO),
            ]
        });
        (kind, enabled)
    }

    #[test]
    fn rust_log_filters_by_target_and_level_without_envfilter_unless_it_names_spans() {
        assert_eq!(filtered(None), ("env", [false, true, true, true]));
        assert_eq!(
            filtered(Some("warn")),
            ("targets", [false, false, true, false])
        );
        assert_eq!(
            filtered(Some("hyper=warn,tollgate=debug")),
            ("targets", [true, true, true, false])
        );
        assert_eq!(
            filtered(Some("info,hyper=off")),
            ("targets", [false, true, true, false])
        );
        // Span directives need EnvFilter.
        assert_eq!(
            filtered(Some("warn,tollgate[request]=debug")),
            ("env", [false, false, true, false])
        );
        // Invalid: as if unset.
        assert_eq!(
            filtered(Some("tollgate=loud")),
            ("env", [false, true, true, true])
        );
    }
}
