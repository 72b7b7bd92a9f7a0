//! The gateway's configuration: one TOML file, `${VAR}` secrets, `TOLLGATE__…` overrides.
//!
//! # Loading
//!
//! [`Config::load`] reads the file named by its argument, else by the `TOLLGATE_CONFIG`
//! environment variable, else `tollgate.toml` in the current directory, and then:
//!
//! 1. parses it as TOML;
//! 2. replaces `${VAR}` in every string value with the variable's value; `${VAR:-default}`
//!    uses `default` when `VAR` is unset or empty, and `$${` is a literal `${`. A variable
//!    that is unset and has no default is an error naming the key;
//! 3. applies the environment overrides described below;
//! 4. deserializes the result (an unknown key is an error naming it) and
//! 5. checks what the types cannot (unique names, path shapes, URL schemes, …).
//!
//! Every problem is reported as `FILE: KEY: PROBLEM` (`-` when there is no key), one per
//! line, and as many as can be found at once: all substitution and override problems, or
//! the first type error, or all semantic problems.
//!
//! Durations are written `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"30d"` (units may be combined:
//! `"1h30m"`; a plain integer is seconds), sizes `"512KiB"`, `"256MiB"`, `"10MB"`, `"1GiB"`
//! (a plain integer is bytes), rates `"20/s"`, `"60/min"`, `"1000/hour"`, `"5/day"`, `"10/30s"`.
//!
//! # Environment overrides
//!
//! Every value in the file can be overridden by an environment variable named `TOLLGATE__`
//! followed by the value's key path, with `__` (two underscores) between the segments:
//!
//! | variable                                              | sets                              |
//! |-------------------------------------------------------|-----------------------------------|
//! | `TOLLGATE__SERVER__LISTEN=0.0.0.0:8080`               | `server.listen`                   |
//! | `TOLLGATE__STORAGE__DATABASE_URL=postgres://db/tg`    | `storage.database_url`            |
//! | `TOLLGATE__LIMITS__PER_IP=100/min`                    | `limits.per_ip`                   |
//! | `TOLLGATE__UPSTREAMS__0__TIMEOUT=5s`                  | `timeout` of the first upstream   |
//! | `TOLLGATE__UPSTREAMS__RENTCAST__TIMEOUT=5s`           | `timeout` of upstream `rentcast`  |
//! | `TOLLGATE__UPSTREAMS__RENTCAST__ROUTES__1__TTL=1h`    | `ttl` of its second route         |
//! | `TOLLGATE__UPSTREAMS__RENTCAST__HEADERS__X_API_KEY=…` | its `X-Api-Key` header            |
//!
//! * A segment matches an existing key case-insensitively, and `_` in the segment also
//!   matches `-` in the key (`X_API_KEY` finds the header `X-Api-Key`, `OPEN_METEO` the
//!   upstream `open-meteo`).
//! * Array elements are addressed by index; elements that have a `name` (upstreams) also by
//!   that name. An index one past the end appends a new element.
//! * A key the file does not have is created, in lower case, with any missing sections:
//!   `TOLLGATE__SERVER__LISTEN` works without a `[server]` table.
//! * The value: where the file already has a string, the variable's value is taken as it is.
//!   Otherwise it is read as a TOML value when it is one — a number, a boolean, an array
//!   (`["GET", "POST"]`), an inline table (`{ failure_threshold = 3, open_for = "1m" }`) or a
//!   quoted string — and as a plain string when it is not (`5s`, `60/min`, `0.0.0.0:8080`).
//! * Overrides are applied after `${VAR}` substitution (their values are never substituted),
//!   in the order of the variables' names.
//! * A problem with an overridden value names the variable, e.g.
//!   `tollgate.toml: upstreams[0].timeout: invalid duration "5 sec": … (from TOLLGATE__UPSTREAMS__0__TIMEOUT)`.
//! * `TOLLGATE_CONFIG` (one underscore) names the file; it is not an override.

// Until main.rs wires every section in.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use cache_core::NormalizeConfig;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::{Table, Value};
use url::Url;

/// The environment variable naming the config file when no path is given.
pub const CONFIG_ENV: &str = "TOLLGATE_CONFIG";
/// The config file read when neither a path nor `TOLLGATE_CONFIG` is given.
pub const DEFAULT_CONFIG_FILE: &str = "tollgate.toml";
/// The prefix of environment overrides: `TOLLGATE__SECTION__KEY=value`.
pub const OVERRIDE_PREFIX: &str = "TOLLGATE__";
/// First path segments the gateway serves itself, so no upstream may be named after them.
pub const RESERVED_NAMES: &[&str] = &["admin", "health", "ready", "metrics"];
/// The HTTP methods a route may list.
pub const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

// === Config ===

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: the listener and request limits.
    pub server: ServerConfig,
    /// `[storage]`: the database and Redis.
    pub storage: StorageConfig,
    /// `[cache]`: cache sizes and background work.
    pub cache: CacheConfig,
    /// `[auth]`: client authentication.
    pub auth: AuthConfig,
    /// `[limits]`: ingress limits applied before authentication.
    pub limits: LimitsConfig,
    /// `[[upstreams]]`: the APIs behind the gateway.
    pub upstreams: Vec<UpstreamConfig>,
    /// The file this configuration was read from (the source name given to
    /// [`Config::from_toml_str_with_env`]).
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[server]`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Bearer token of the admin API; empty (the default) disables the admin API.
    pub admin_token: String,
    /// Largest request body accepted (larger: 413). Default 1 MiB.
    pub max_body_bytes: ByteSize,
    /// Longest request target accepted (longer: 414). Default 8192 bytes.
    pub max_url_bytes: ByteSize,
    /// Largest request header block accepted (larger: 431). Default 16384 bytes.
    pub max_header_bytes: ByteSize,
    /// HTTP worker threads; 0 (the default) is one per core.
    pub workers: usize,
    /// How long a graceful shutdown waits for requests in flight. Default 30 s.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// Log line format. Default `text`.
    pub log_format: LogFormat,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_token: String::new(),
            max_body_bytes: ByteSize::mib(1),
            max_url_bytes: ByteSize(8192),
            max_header_bytes: ByteSize(16384),
            workers: 0,
            shutdown_timeout: Duration::from_secs(30),
            log_format: LogFormat::Text,
        }
    }
}

impl ServerConfig {
    /// How many worker threads serve: `workers`, or one per core when it is 0.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            n => n,
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("admin_token", &redact(&self.admin_token))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_url_bytes", &self.max_url_bytes)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("workers", &self.workers)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("log_format", &self.log_format)
            .finish()
    }
}

/// `server.log_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[storage]`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `sqlite://FILE` (the default, `sqlite://tollgate.db`) or `postgres://…`.
    pub database_url: String,
    /// `redis://…` or `rediss://…`; empty (the default): a single node with in-process L1
    /// and limits.
    pub redis_url: String,
    /// Connections per pool. Default 8.
    pub pool_size: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            database_url: "sqlite://tollgate.db".to_owned(),
            redis_url: String::new(),
            pool_size: 8,
        }
    }
}

impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// `[cache]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes the in-process L1 may hold. Default 256 MiB.
    pub l1_max_bytes: ByteSize,
    /// Requests that may wait on one coalesced upstream call. Default 10000.
    pub max_waiters: usize,
    /// Capacity of the queue of writes to L2. Default 1024.
    pub l2_write_queue: usize,
    /// How long the L2 writer waits for more writes before committing a batch (of up to 64):
    /// one transaction for a trickle of misses instead of one each. `"0s"`: commit at once.
    /// Default 20 ms.
    #[serde(deserialize_with = "de_duration")]
    pub l2_write_linger: Duration,
    /// With a SQLite L2: keep a Bloom filter (2 MiB) of the keys it holds, so that a miss for
    /// a key never stored does not ask the database. Turn off only when another process writes
    /// the same SQLite file. No effect on PostgreSQL (shared by nodes). Default true.
    pub l2_filter: bool,
    /// How often expired entries are swept from L2. Default 60 s.
    #[serde(deserialize_with = "de_duration")]
    pub sweep_interval: Duration,
    /// Entries removed per sweep step. Default 500.
    pub sweep_batch: usize,
    /// Largest upstream response body that is read (and cached). Default 10 MiB.
    pub max_upstream_body_bytes: ByteSize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            l1_max_bytes: ByteSize::mib(256),
            max_waiters: 10_000,
            l2_write_queue: 1024,
            l2_write_linger: cache_core::DEFAULT_WRITE_LINGER,
            l2_filter: true,
            sweep_interval: Duration::from_secs(60),
            sweep_batch: 500,
            max_upstream_body_bytes: ByteSize::mib(10),
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether every client must present an API key. Default false: anonymous clients,
    /// identified by `X-Client-Id` or IP.
    pub required: bool,
    /// Whether cache hits (and stale answers) count against a key's daily/monthly request
    /// quota. Default true. They never count against a spend budget.
    pub count_cache_hits: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            required: false,
            count_cache_hits: true,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Ingress limit per client IP, applied before authentication. Default none.
    pub per_ip: Option<Rate>,
    /// Rate limit of a key without its own `rate_limit`, and of each anonymous client.
    /// Default none.
    pub per_client: Option<Rate>,
    /// What limits do while Redis is unreachable: `open` (default: each node enforces its
    /// share, the limit ÷ `nodes`, locally) or `closed` (requests are refused with 429).
    pub redis_failure: RedisFailure,
    /// Gateway nodes sharing one Redis; a fail-open node enforces limit ÷ nodes. Default 1.
    pub nodes: u32,
    /// How long a limit check may wait on Redis before it counts as down. Default 100 ms.
    #[serde(deserialize_with = "de_duration")]
    pub redis_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            per_ip: None,
            per_client: None,
            redis_failure: RedisFailure::Open,
            nodes: 1,
            redis_timeout: Duration::from_millis(100),
        }
    }
}

/// `limits.redis_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailure {
    /// Fall back to local limits of limit ÷ nodes.
    #[default]
    Open,
    /// Refuse requests while limits cannot be checked.
    Closed,
}

/// One `[[upstreams]]` entry: an API clients reach under `/{name}/`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The first path segment clients use.
    pub name: String,
    /// Where requests are forwarded (`http` or `https`).
    #[serde(deserialize_with = "de_url")]
    pub base_url: Url,
    /// Headers injected into every upstream request (credentials); never cached or echoed.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Whole-request timeout. Default 30 s.
    #[serde(default = "default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Connection timeout. Default 5 s.
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Overrides `cache.max_upstream_body_bytes` for this upstream.
    #[serde(default)]
    pub max_body_bytes: Option<ByteSize>,
    /// Keep-alive connections to the upstream kept open while idle (each closes after 90 s
    /// unused); 0 opens a connection per call. Default 256. Below the calls in flight at
    /// once, a burst ends by closing connections that the next burst opens again.
    #[serde(default = "default_max_idle_connections")]
    pub max_idle_connections: usize,
    /// Calls per period this gateway makes to the upstream (all clients together).
    #[serde(default)]
    pub egress_limit: Option<Rate>,
    /// Circuit breaker; none: on, with 5 consecutive failures (or ≥ 50% of ≥ 20 calls in 10 s)
    /// opening it for 30 s.
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    /// Retries of failed idempotent calls; none: no retries (on a paid API a retry is another
    /// bill, so they are opt-in).
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// The routes served; any other path is 404.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

impl UpstreamConfig {
    /// The largest response body read from this upstream: `max_body_bytes`, else the cache's
    /// `max_upstream_body_bytes`.
    pub fn body_limit(&self, cache: &CacheConfig) -> ByteSize {
        self.max_body_bytes.unwrap_or(cache.max_upstream_body_bytes)
    }
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: BTreeMap<&str, &str> = self
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), redact(value)))
            .collect();
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("base_url", &self.base_url.as_str())
            .field("headers", &headers)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_idle_connections", &self.max_idle_connections)
            .field("egress_limit", &self.egress_limit)
            .field("breaker", &self.breaker)
            .field("retry", &self.retry)
            .field("routes", &self.routes)
            .finish()
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_max_idle_connections() -> usize {
    256
}

/// `upstreams[].breaker`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. Default 5.
    pub failure_threshold: u32,
    /// How long it stays open before a trial call. Default 30 s.
    #[serde(deserialize_with = "de_duration")]
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(30),
        }
    }
}

/// `upstreams[].retry`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, the first included. Default 3.
    pub max_attempts: u32,
    /// Backoff before the first retry (doubling, full jitter). Default 200 ms.
    #[serde(deserialize_with = "de_duration")]
    pub base: Duration,
    /// Cap on one backoff. Default 4 s.
    #[serde(deserialize_with = "de_duration")]
    pub max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            base: Duration::from_millis(200),
            max: Duration::from_secs(4),
        }
    }
}

/// `upstreams.routes[].fallback`: the static answer of a route whose upstream is down.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Status of the answer. Default 200.
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    /// Body of the answer.
    pub body: String,
    /// Its `Content-Type`. Default `application/json`.
    #[serde(default = "default_fallback_content_type")]
    pub content_type: String,
}

fn default_fallback_status() -> u16 {
    200
}

fn default_fallback_content_type() -> String {
    "application/json".to_owned()
}

/// One `[[upstreams.routes]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// An exact path (`/properties`) or a prefix ending in `/*` (`/items/*`).
    pub path: String,
    /// How long a response is fresh. Default 5 min.
    #[serde(default = "default_ttl", deserialize_with = "de_duration")]
    pub ttl: Duration,
    /// How long past `ttl` a response may be served while it is refreshed. Default 0.
    #[serde(default, deserialize_with = "de_duration")]
    pub stale_while_revalidate: Duration,
    /// How long past `ttl` a response may be served when the upstream fails. Default 0.
    #[serde(default, deserialize_with = "de_duration")]
    pub stale_if_error: Duration,
    /// Currency units one upstream call costs. Default 0.
    #[serde(default)]
    pub cost: f64,
    /// Limit per API key (per client when anonymous) on this route.
    #[serde(default)]
    pub rate_limit: Option<Rate>,
    /// Methods served, upper case after loading. Default `["GET"]`.
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// Which requests share a cache entry.
    #[serde(default)]
    pub normalize: NormalizeConfig,
    /// Paths with queries (`/forecast?latitude=52.5&longitude=13.4`) fetched ahead of clients.
    #[serde(default)]
    pub prewarm: Vec<String>,
    /// false: a BYPASS route, proxied without lookup or store. Default true.
    #[serde(default = "default_true")]
    pub cache: bool,
    /// Retry POST on this route too (only when the upstream has `retry`): for upstreams where
    /// identical bodies give identical answers. Default false.
    #[serde(default)]
    pub retry_post: bool,
    /// A static answer when the upstream is down (breaker open, error or timeout) and nothing
    /// stale can stand in.
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
}

impl RouteConfig {
    /// Whether the route is a prefix route (`/items/*`).
    pub fn is_prefix(&self) -> bool {
        self.path.ends_with("/*")
    }

    /// Whether an upstream-relative path (no query) falls under this route: equal to an
    /// exact route's path, or starting with a prefix route's path minus its `*`
    /// (`/items/*` covers `/items/` and `/items/42`, not `/items`).
    pub fn matches(&self, path: &str) -> bool {
        match self.path.strip_suffix('*') {
            Some(prefix) if self.is_prefix() => path.starts_with(prefix),
            _ => path == self.path,
        }
    }
}

fn default_ttl() -> Duration {
    Duration::from_secs(300)
}

fn default_methods() -> Vec<String> {
    vec!["GET".to_owned()]
}

fn default_true() -> bool {
    true
}

// === Loading ===

impl Config {
    /// Loads the configuration from `path`, else the file named by `TOLLGATE_CONFIG`, else
    /// `tollgate.toml` in the current directory, with `${VAR}` substitution and `TOLLGATE__…`
    /// overrides from the process environment (see the module docs).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        // Variables that are not Unicode cannot be meant for us; skip them rather than panic.
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect();
        Config::load_with_env(path, &env)
    }

    /// [`Config::load`] with the environment given instead of read from the process.
    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigErrors> {
        let path = Config::resolve_path(path, env);
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|error| {
            ConfigError::new(&file, "-", format!("cannot read the config file: {error}"))
        })?;
        let mut config = Config::from_toml_str_with_env(&text, &file, env)?;
        config.source = path;
        Ok(config)
    }

    /// The file [`Config::load`] reads: `path`, else `TOLLGATE_CONFIG`, else `tollgate.toml`.
    pub fn resolve_path(path: Option<&Path>, env: &[(String, String)]) -> PathBuf {
        match path {
            Some(path) => path.to_path_buf(),
            None => match env_var(env, CONFIG_ENV) {
                Some(file) if !file.is_empty() => PathBuf::from(file),
                _ => PathBuf::from(DEFAULT_CONFIG_FILE),
            },
        }
    }

    /// Parses and validates `text` as if read from a file named `source_name`, with `${VAR}` values and `TOLLGATE__…` overrides taken
    /// from `env`.
    pub fn from_toml_str_with_env(
        text: &str,
        source_name: &str,
        env: &[(String, String)],
    ) -> Result<Config, ConfigErrors> {
        let mut problems = Problems::new(source_name);
        let table: Table = match text.parse() {
            Ok(table) => table,
            Err(error) => {
                problems.push("-", toml_syntax_problem(text, &error));
                return Err(problems.finish());
            }
        };
        let mut root = Value::Table(table);
        substitute(&mut root, &mut Vec::new(), env, &mut problems);
        apply_overrides(&mut root, env, &mut problems);
        if !problems.is_empty() {
            return Err(problems.finish());
        }
        let mut config: Config = match serde_path_to_error::deserialize(root) {
            Ok(config) => config,
            Err(error) => {
                let key = match error.path().to_string() {
                    path if path == "." => "-".to_owned(),
                    path => path,
                };
                problems.push(key, error.into_inner().message().to_owned());
                return Err(problems.finish());
            }
        };
        config.source = PathBuf::from(source_name);
        config.validate(&mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems.finish())
        }
    }

    #[cfg(test)]
    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|upstream| upstream.name == name)
    }
}

fn env_var<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// `line L, column C: message` for a TOML syntax error, with the offending line quoted.
fn toml_syntax_problem(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return format!("TOML syntax error: {message}");
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let source_line = text[line_start..].lines().next().unwrap_or("").trim_end();
    format!("TOML syntax error at line {line}, column {column}: {message} (in `{source_line}`)")
}

// === Errors ===

/// One problem with the configuration, displayed as `{file}: {key}: {problem}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    /// The config file (as given, or `tollgate.toml`).
    pub file: String,
    /// The key path (`upstreams[1].routes[0].path`), an override variable's name, or `-`.
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

impl ConfigError {
    fn new(file: &str, key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_owned(),
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// Every problem found in one load, displayed one per line. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    #[cfg(test)]
    /// The problems, in file order where there is one.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char('\n')?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

/// Problems collected during one load, and which keys the environment set.
struct Problems {
    file: String,
    list: Vec<(String, String)>,
    /// (key path, variable, whether the override created the key).
    overrides: Vec<(String, String, bool)>,
}

impl Problems {
    fn new(file: &str) -> Self {
        Problems {
            file: file.to_owned(),
            list: Vec::new(),
            overrides: Vec::new(),
        }
    }

    fn push(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.list.push((key.into(), problem.into()));
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The errors, each naming the override variables that set (or created) its key.
    fn finish(self) -> ConfigErrors {
        let errors = self
            .list
            .into_iter()
            .map(|(key, mut problem)| {
                let vars: Vec<&str> = self
                    .overrides
                    .iter()
                    .filter(|(path, _, created)| {
                        is_under(&key, path) || (*created && is_under(path, &key))
                    })
                    .map(|(_, var, _)| var.as_str())
                    .collect();
                if !vars.is_empty() {
                    let _ = write!(problem, " (from {})", vars.join(", "));
                }
                ConfigError {
                    file: self.file.clone(),
                    key,
                    problem,
                }
            })
            .collect();
        ConfigErrors(errors)
    }
}

/// Whether key path `key` is `ancestor` or lies beneath it.
fn is_under(key: &str, ancestor: &str) -> bool {
    key.strip_prefix(ancestor)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

// === ${VAR} substitution ===

#[derive(Debug, Clone)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `upstreams[0].headers.X-Api-Key`, the form serde_path_to_error uses.
fn key_path(path: &[Segment]) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Index(index) => {
                let _ = write!(out, "[{index}]");
            }
        }
    }
    if out.is_empty() { "-".to_owned() } else { out }
}

fn substitute(
    value: &mut Value,
    path: &mut Vec<Segment>,
    env: &[(String, String)],
    problems: &mut Problems,
) {
    match value {
        Value::String(text) => {
            if text.contains('$') {
                match expand(text, env) {
                    Ok(expanded) => *text = expanded,
                    Err(problem) => problems.push(key_path(path), problem),
                }
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                path.push(Segment::Index(index));
                substitute(item, path, env, problems);
                path.pop();
            }
        }
        Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                path.push(Segment::Key(key.clone()));
                substitute(item, path, env, problems);
                path.pop();
            }
        }
        Value::Integer(_) | Value::Float(_) | Value::Boolean(_) | Value::Datetime(_) => {}
    }
}

/// Expands `${VAR}`, `${VAR:-default}` and `$${` in one string.
fn expand(text: &str, env: &[(String, String)]) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        rest = &rest[dollar..];
        if let Some(after) = rest.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let Some(close) = after.find('}') else {
                return Err(
                    "unterminated \"${\" (close it with \"}\", or write \"$${\" for a literal \"${\")"
                        .to_owned(),
                );
            };
            let body = &after[..close];
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            if !is_var_name(name) {
                return Err(format!(
                    "invalid environment variable name \"{name}\" in \"${{{body}}}\" \
                     (expected letters, digits and _, not starting with a digit)"
                ));
            }
            match (env_var(env, name), default) {
                (Some(""), Some(default)) => out.push_str(default),
                (Some(value), _) => out.push_str(value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => return Err(format!("environment variable {name} is not set")),
            }
            rest = &after[close + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// === TOLLGATE__ overrides ===

fn apply_overrides(root: &mut Value, env: &[(String, String)], problems: &mut Problems) {
    let mut vars: Vec<&(String, String)> = env
        .iter()
        .filter(|(name, _)| name.starts_with(OVERRIDE_PREFIX))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, raw) in vars {
        let segments: Vec<&str> = name[OVERRIDE_PREFIX.len()..].split("__").collect();
        if segments.iter().any(|segment| segment.is_empty()) {
            problems.push(
                name,
                "empty key segment (write TOLLGATE__SECTION__KEY, segments separated by \"__\")",
            );
            continue;
        }
        match set_path(root, &segments, raw) {
            Ok((path, created)) => problems.overrides.push((path, name.clone(), created)),
            Err(problem) => problems.push(name, problem),
        }
    }
}

/// Sets the value at `segments` (creating what is missing); returns its key path and whether
/// it was created.
fn set_path(root: &mut Value, segments: &[&str], raw: &str) -> Result<(String, bool), String> {
    let mut path = Vec::new();
    let mut created = false;
    let mut node = root;
    for (i, segment) in segments.iter().enumerate() {
        let fresh = || match segments.get(i + 1) {
            None => Value::Table(Table::new()), // replaced below
            Some(next) if next.parse::<usize>().is_ok() => Value::Array(Vec::new()),
            Some(_) => Value::Table(Table::new()),
        };
        node = match node {
            Value::Table(table) => {
                let key = match matching_key(table, segment)? {
                    Some(key) => key,
                    None => {
                        created = true;
                        segment.to_ascii_lowercase()
                    }
                };
                path.push(Segment::Key(key.clone()));
                table.entry(key).or_insert_with(fresh)
            }
            Value::Array(items) => {
                let index = matching_index(items, segment, &path)?;
                if index == items.len() {
                    created = true;
                    items.push(fresh());
                }
                path.push(Segment::Index(index));
                &mut items[index]
            }
            other => {
                return Err(format!(
                    "{} is a {}, not a table or an array",
                    key_path(&path),
                    other.type_str()
                ));
            }
        };
    }
    *node = override_value(raw, !created && node.is_str());
    Ok((key_path(&path), created))
}

/// Which of `names` a segment names: matched case-insensitively, else also with `_` in the
/// segment matching `-` in the name.
fn match_name<'a>(names: &[&'a str], segment: &str) -> Result<Option<&'a str>, String> {
    let fold = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let mut found: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| name.eq_ignore_ascii_case(segment))
        .collect();
    if found.is_empty() {
        found = names
            .iter()
            .copied()
            .filter(|name| fold(name) == fold(segment))
            .collect();
    }
    match found.as_slice() {
        [] => Ok(None),
        [name] => Ok(Some(name)),
        several => Err(format!(
            "\"{segment}\" is ambiguous: it matches {}",
            several.join(", ")
        )),
    }
}

/// The key of `table` a segment names, if any.
fn matching_key(table: &Table, segment: &str) -> Result<Option<String>, String> {
    let keys: Vec<&str> = table.keys().map(String::as_str).collect();
    Ok(match_name(&keys, segment)?.map(str::to_owned))
}

/// The index of the element of `items` a segment names: an index (one past the end
/// appends), or the name of an element with a `name` key (an upstream).
fn matching_index(items: &[Value], segment: &str, path: &[Segment]) -> Result<usize, String> {
    if let Ok(index) = segment.parse::<usize>() {
        return if index <= items.len() {
            Ok(index)
        } else {
            Err(format!(
                "index {index} is out of range: {} has {} element(s)",
                key_path(path),
                items.len()
            ))
        };
    }
    let names: Vec<&str> = items
        .iter()
        .map(|item| item.get("name").and_then(Value::as_str).unwrap_or(""))
        .collect();
    match match_name(&names, segment)? {
        Some(name) => Ok(names.iter().position(|n| *n == name).unwrap_or(items.len())),
        None => Err(format!(
            "{} has no element named \"{segment}\" (names: {})",
            key_path(path),
            names
                .iter()
                .filter(|name| !name.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// An override's value: verbatim where the file has a string, else TOML when it parses as a
/// single TOML value (not a date), else a string.
fn override_value(raw: &str, keep_string: bool) -> Value {
    if !keep_string
        && let Ok(mut table) = format!("value = {raw}").parse::<Table>()
        && table.len() == 1
    {
        match table.remove("value") {
            Some(Value::Datetime(_)) | None => {}
            Some(value) => return value,
        }
    }
    Value::String(raw.to_owned())
}

// === Validation ===

impl Config {
    /// Checks what deserialization cannot, and upper-cases route methods.
    fn validate(&mut self, problems: &mut Problems) {
        let server = &self.server;
        for (key, size) in [
            ("server.max_body_bytes", server.max_body_bytes),
            ("server.max_url_bytes", server.max_url_bytes),
            ("server.max_header_bytes", server.max_header_bytes),
            ("cache.l1_max_bytes", self.cache.l1_max_bytes),
            (
                "cache.max_upstream_body_bytes",
                self.cache.max_upstream_body_bytes,
            ),
        ] {
            check_size(problems, key, size);
        }

        let storage = &self.storage;
        match storage.database_url.split_once("://") {
            Some(("sqlite", "")) => problems.push(
                "storage.database_url",
                "sqlite:// needs a file path, e.g. \"sqlite://tollgate.db\"",
            ),
            Some(("sqlite" | "postgres" | "postgresql", _)) => {}
            _ => problems.push(
                "storage.database_url",
                format!(
                    "\"{}\" is not a sqlite:// or postgres:// URL",
                    redact_url(&storage.database_url)
                ),
            ),
        }
        if !storage.redis_url.is_empty()
            && !matches!(
                storage.redis_url.split_once("://"),
                Some(("redis" | "rediss", rest)) if !rest.is_empty()
            )
        {
            problems.push(
                "storage.redis_url",
                format!(
                    "\"{}\" is not a redis:// or rediss:// URL (leave it empty for a single node)",
                    redact_url(&storage.redis_url)
                ),
            );
        }
        check_count(problems, "storage.pool_size", storage.pool_size);

        let cache = &self.cache;
        check_count(problems, "cache.max_waiters", cache.max_waiters);
        check_count(problems, "cache.l2_write_queue", cache.l2_write_queue);
        if cache.l2_write_linger > Duration::from_secs(1) {
            // A batch waits this long for company: beyond a second, entries reach L2 (and
            // other nodes) late for no gain in batching.
            problems.push("cache.l2_write_linger", "must be at most 1s");
        }
        check_count(problems, "cache.sweep_batch", cache.sweep_batch);
        check_nonzero_duration(problems, "cache.sweep_interval", cache.sweep_interval);

        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, upstream) in self.upstreams.iter_mut().enumerate() {
            let key = format!("upstreams[{i}]");
            validate_upstream(upstream, &key, problems);
            if !upstream.name.is_empty()
                && let Some(first) = seen.insert(upstream.name.to_ascii_lowercase(), i)
            {
                problems.push(
                    format!("{key}.name"),
                    format!(
                        "duplicate upstream name \"{}\" (also upstreams[{first}])",
                        upstream.name
                    ),
                );
            }
        }
    }
}

fn validate_upstream(upstream: &mut UpstreamConfig, key: &str, problems: &mut Problems) {
    let name = &upstream.name;
    if name.is_empty() {
        problems.push(format!("{key}.name"), "must not be empty");
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        problems.push(
            format!("{key}.name"),
            format!("\"{name}\" may contain only letters, digits, \"-\" and \"_\""),
        );
    } else if RESERVED_NAMES
        .iter()
        .any(|reserved| name.eq_ignore_ascii_case(reserved))
    {
        problems.push(
            format!("{key}.name"),
            format!(
                "\"{name}\" is reserved for the gateway's own endpoints ({})",
                RESERVED_NAMES.join(", ")
            ),
        );
    }

    let url = &upstream.base_url;
    if !matches!(url.scheme(), "http" | "https") {
        problems.push(
            format!("{key}.base_url"),
            format!("scheme must be http or https, not \"{}\"", url.scheme()),
        );
    } else if url.host_str().is_none_or(str::is_empty) {
        problems.push(format!("{key}.base_url"), "must name a host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        problems.push(
            format!("{key}.base_url"),
            "must not have a query or fragment (clients' paths and queries are appended)",
        );
    }

    for (header, value) in &upstream.headers {
        if header.is_empty() || !header.bytes().all(is_token_byte) {
            problems.push(
                format!("{key}.headers.{header}"),
                "is not a valid HTTP header name",
            );
        }
        if value
            .chars()
            .any(|c| (c.is_control() && c != '\t') || c == '\u{7f}')
        {
            problems.push(
                format!("{key}.headers.{header}"),
                "value contains a control character (a trailing newline from an environment variable?)",
            );
        }
    }

    check_nonzero_duration(problems, &format!("{key}.timeout"), upstream.timeout);
    check_nonzero_duration(
        problems,
        &format!("{key}.connect_timeout"),
        upstream.connect_timeout,
    );
    if let Some(size) = upstream.max_body_bytes {
        check_size(problems, &format!("{key}.max_body_bytes"), size);
    }
    if let Some(breaker) = &upstream.breaker {
        if breaker.failure_threshold == 0 {
            problems.push(
                format!("{key}.breaker.failure_threshold"),
                "must be at least 1",
            );
        }
        check_nonzero_duration(
            problems,
            &format!("{key}.breaker.open_for"),
            breaker.open_for,
        );
    }
    if let Some(retry) = &upstream.retry {
        if retry.max_attempts == 0 {
            problems.push(
                format!("{key}.retry.max_attempts"),
                "must be at least 1 (1 = no retries)",
            );
        }
        if retry.base > retry.max {
            problems.push(
                format!("{key}.retry.base"),
                format!(
                    "{} is more than retry.max ({})",
                    format_duration(retry.base),
                    format_duration(retry.max)
                ),
            );
        }
    }

    let mut paths: BTreeMap<String, usize> = BTreeMap::new();
    for (j, route) in upstream.routes.iter_mut().enumerate() {
        let key = format!("{key}.routes[{j}]");
        validate_route(route, &key, problems);
        if let Some(first) = paths.insert(route.path.clone(), j) {
            problems.push(
                format!("{key}.path"),
                format!(
                    "duplicate route path \"{}\" (also routes[{first}])",
                    route.path
                ),
            );
        }
    }
}

fn validate_route(route: &mut RouteConfig, key: &str, problems: &mut Problems) {
    let path = &route.path;
    let path_ok = if !path.starts_with('/') {
        problems.push(format!("{key}.path"), "must start with \"/\"");
        false
    } else if path.contains(['?', '#']) {
        problems.push(
            format!("{key}.path"),
            "must be a path without \"?\" or \"#\" (queries are matched by the normalizer)",
        );
        false
    } else if path.contains('*') && (!route.is_prefix() || path[..path.len() - 1].contains('*')) {
        problems.push(
            format!("{key}.path"),
            "\"*\" is allowed only as a final \"/*\" (a prefix route, e.g. \"/items/*\")",
        );
        false
    } else {
        true
    };

    if route.methods.is_empty() {
        problems.push(format!("{key}.methods"), "must list at least one method");
    }
    let mut methods: Vec<String> = Vec::with_capacity(route.methods.len());
    for (m, method) in route.methods.iter().enumerate() {
        let upper = method.to_ascii_uppercase();
        if !METHODS.contains(&upper.as_str()) {
            problems.push(
                format!("{key}.methods[{m}]"),
                format!(
                    "unknown method \"{method}\" (allowed: {})",
                    METHODS.join(", ")
                ),
            );
        } else if !methods.contains(&upper) {
            methods.push(upper);
        }
    }
    route.methods = methods;

    if !route.cost.is_finite() || route.cost < 0.0 {
        problems.push(
            format!("{key}.cost"),
            format!("must be a finite number >= 0, not {}", route.cost),
        );
    }
    if route.cache && route.ttl.is_zero() {
        problems.push(
            format!("{key}.ttl"),
            "must be more than 0 on a cached route (set cache = false to bypass the cache)",
        );
    }

    if !route.prewarm.is_empty() {
        if !route.cache {
            problems.push(
                format!("{key}.prewarm"),
                "prewarming needs a cached route (this one has cache = false)",
            );
        } else if !route.methods.iter().any(|m| m == "GET") {
            problems.push(
                format!("{key}.prewarm"),
                "prewarming uses GET, which this route's methods do not list",
            );
        }
    }
    for (p, entry) in route.prewarm.iter().enumerate() {
        let entry_path = entry
            .split_once('?')
            .map_or(entry.as_str(), |(path, _)| path);
        if entry.contains('#') {
            problems.push(
                format!("{key}.prewarm[{p}]"),
                format!("\"{entry}\" must not have a fragment"),
            );
        } else if path_ok && !route.matches(entry_path) {
            problems.push(
                format!("{key}.prewarm[{p}]"),
                format!(
                    "\"{entry}\" is not under the route's path \"{}\" (write a path with an optional query)",
                    route.path
                ),
            );
        }
    }
    if let Some(fallback) = &route.fallback {
        if !(100..=599).contains(&fallback.status) {
            problems.push(
                format!("{key}.fallback.status"),
                format!("{} is not an HTTP status", fallback.status),
            );
        }
        if fallback.content_type.is_empty()
            || fallback.content_type.chars().any(|ch| ch.is_control())
        {
            problems.push(
                format!("{key}.fallback.content_type"),
                "must be a non-empty header value",
            );
        }
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_size(problems: &mut Problems, key: &str, size: ByteSize) {
    if size.0 == 0 {
        problems.push(key, "must be more than 0 bytes");
    }
}

fn check_count(problems: &mut Problems, key: &str, count: usize) {
    if count == 0 {
        problems.push(key, "must be at least 1");
    }
}

fn check_nonzero_duration(problems: &mut Problems, key: &str, duration: Duration) {
    if duration.is_zero() {
        problems.push(key, "must be more than 0s");
    }
}

/// `<redacted>` for a non-empty secret.
fn redact(secret: &str) -> &str {
    if secret.is_empty() { "" } else { "<redacted>" }
}

/// The URL with any password replaced, for messages and `Debug`.
fn redact_url(text: &str) -> String {
    match Url::parse(text) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("redacted"));
            url.to_string()
        }
        _ => text.to_owned(),
    }
}

// === Value syntax: durations, sizes, rates ===

/// A humane value that did not parse: `invalid duration "3x": unknown unit "x" (…)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} \"{input}\": {reason}")]
pub struct ParseValueError {
    what: &'static str,
    input: String,
    reason: String,
}

impl ParseValueError {
    fn new(what: &'static str, input: &str, reason: impl Into<String>) -> Self {
        ParseValueError {
            what,
            input: input.to_owned(),
            reason: reason.into(),
        }
    }
}

const DURATION_UNITS: &str = "ms, s, m, h, d or w";

fn unit_millis(unit: &str) -> Option<u64> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "ms" | "msec" | "millis" => 1,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        "w" | "week" | "weeks" => 604_800_000,
        _ => return None,
    })
}

/// Parses a duration: `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"30d"`, `"2w"`, combinations such
/// as `"1h30m"`, or a plain integer number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, ParseValueError> {
    let fail = |reason: String| ParseValueError::new("duration", text, reason);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(fail(format!(
            "empty (expected e.g. \"500ms\", \"10s\", \"5m\"; units {DURATION_UNITS})"
        )));
    }
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = trimmed.parse().map_err(|_| fail("too large".to_owned()))?;
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u64 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(fail(format!(
                "expected a whole number followed by a unit ({DURATION_UNITS}), e.g. \"10s\""
            )));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| fail("too large".to_owned()))?;
        rest = rest[digits..].trim_start();
        let letters = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..letters];
        if unit.is_empty() {
            return Err(fail(if rest.starts_with('.') {
                "fractions are not supported (write \"1500ms\" for 1.5s)".to_owned()
            } else {
                format!("missing unit after {number} ({DURATION_UNITS})")
            }));
        }
        let millis = unit_millis(unit)
            .ok_or_else(|| fail(format!("unknown unit \"{unit}\" ({DURATION_UNITS})")))?;
        total = number
            .checked_mul(millis)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| fail("too large".to_owned()))?;
        rest = rest[letters..].trim_start();
    }
    Ok(Duration::from_millis(total))
}

/// Formats a duration the way [`parse_duration`] reads it, in its largest exact unit:
/// `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"30d"`.
pub fn format_duration(duration: Duration) -> String {
    if !duration.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{duration:?}");
    }
    if duration.subsec_millis() != 0 {
        return format!("{}ms", duration.as_millis());
    }
    let secs = duration.as_secs();
    match secs {
        0 => "0s".to_owned(),
        s if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        s if s.is_multiple_of(3_600) => format!("{}h", s / 3_600),
        s if s.is_multiple_of(60) => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A size in bytes, written `"512KiB"`, `"256MiB"`, `"10MB"`, `"1GiB"` or as plain bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    #[cfg(test)]
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        ByteSize(n * 1024)
    }

    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }

    /// The size as a `usize`, saturating on 32-bit targets.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

const SIZE_UNITS: &str = "B, KB, KiB, MB, MiB, GB, GiB, TB or TiB";

/// Parses a size: `"512KiB"`, `"256MiB"`, `"10MB"`, `"1GiB"` (KB/MB/GB/TB are powers of
/// 1000, KiB/MiB/GiB/TiB of 1024; units are case-insensitive), or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<ByteSize, ParseValueError> {
    let fail = |reason: String| ParseValueError::new("size", text, reason);
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    if digits == 0 {
        return Err(fail(format!(
            "expected a whole number of bytes, optionally with a unit ({SIZE_UNITS}), e.g. \"256MiB\""
        )));
    }
    let number: u64 = trimmed[..digits]
        .parse()
        .map_err(|_| fail("too large".to_owned()))?;
    let unit = trimmed[digits..].trim();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ if unit.starts_with('.') => {
            return Err(fail(
                "fractions are not supported (write \"1536MiB\" for 1.5GiB)".to_owned(),
            ));
        }
        _ => return Err(fail(format!("unknown unit \"{unit}\" ({SIZE_UNITS})"))),
    };
    number
        .checked_mul(multiplier)
        .map(ByteSize)
        .ok_or_else(|| fail("too large".to_owned()))
}

impl FromStr for ByteSize {
    type Err = ParseValueError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_size(text)
    }
}

impl fmt::Display for ByteSize {
    /// In the largest binary unit that divides it exactly: `256MiB`, `1500B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if n != 0 && n.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256MiB\" or \"10MB\", or a number of bytes")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
                parse_size(text).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {n}: must not be negative")))
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A rate: `count` events per `per`, written `"20/s"`, `"60/min"`, `"1000/hour"`, `"5/day"`
/// or `"10/30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Events allowed per period (at least 1).
    pub count: u32,
    /// The period (more than 0).
    pub per: Duration,
}

impl Rate {
    /// Parses `"COUNT/PERIOD"`, the period a unit (`s`, `min`, `hour`, `day`, …) or a
    /// duration (`30s`, `5m`).
    pub fn parse(text: &str) -> Result<Rate, ParseValueError> {
        let fail = |reason: String| ParseValueError::new("rate", text, reason);
        let Some((count, per)) = text.split_once('/') else {
            return Err(fail(
                "expected COUNT/PERIOD, e.g. \"60/min\", \"20/s\", \"1000/hour\", \"10/30s\""
                    .to_owned(),
            ));
        };
        let count = count.trim();
        let count: u32 = count.parse().map_err(|_| {
            fail(format!(
                "\"{count}\" is not a whole number of events (up to {})",
                u32::MAX
            ))
        })?;
        if count == 0 {
            return Err(fail("the count must be at least 1".to_owned()));
        }
        let per = per.trim();
        let period = match unit_millis(per) {
            Some(millis) => Duration::from_millis(millis),
            None if !per.is_empty() && per.chars().all(|c| c.is_ascii_alphabetic()) => {
                return Err(fail(format!(
                    "unknown period \"{per}\" (s, min, hour, day, or a duration such as 30s)"
                )));
            }
            None => parse_duration(per)
                .map_err(|error| fail(format!("bad period: {}", error.reason)))?,
        };
        if period.is_zero() {
            return Err(fail("the period must be more than 0".to_owned()));
        }
        Ok(Rate { count, per: period })
    }

    #[cfg(test)]
    /// The time in which one event's allowance comes back: `per / count`.
    pub fn interval(&self) -> Duration {
        self.per.checked_div(self.count).unwrap_or(self.per)
    }
}

impl FromStr for Rate {
    type Err = ParseValueError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Rate::parse(text)
    }
}

impl fmt::Display for Rate {
    /// `60/min`, `20/s`, `1000/hour`, `5/day`, `10/30s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.count;
        match self.per.as_millis() {
            1_000 => write!(f, "{count}/s"),
            60_000 => write!(f, "{count}/min"),
            3_600_000 => write!(f, "{count}/hour"),
            86_400_000 => write!(f, "{count}/day"),
            _ => write!(f, "{count}/{}", format_duration(self.per)),
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RateVisitor;

        impl Visitor<'_> for RateVisitor {
            type Value = Rate;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate such as \"60/min\" or \"20/s\"")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Rate, E> {
                Rate::parse(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(RateVisitor)
    }
}

/// Deserializes a [`Duration`] from a humane string or an integer number of seconds.
fn de_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"500ms\", \"10s\" or \"5m\", or a number of seconds")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            parse_duration(text).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, secs: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(secs))
        }

        fn visit_i64<E: de::Error>(self, secs: i64) -> Result<Duration, E> {
            u64::try_from(secs)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("invalid duration {secs}: must not be negative")))
        }
    }

    deserializer.deserialize_any(DurationVisitor)
}

/// Deserializes a [`Url`] from a string (url's own serde support is not enabled).
fn de_url<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Url, D::Error> {
    let text = String::deserialize(deserializer)?;
    Url::parse(&text).map_err(|error| de::Error::custom(format!("invalid URL \"{text}\": {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn parse_env(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        Config::from_toml_str_with_env(text, "test.toml", &env(pairs))
    }

    fn parse(text: &str) -> Config {
        match parse_env(text, &[]) {
            Ok(config) => config,
            Err(errors) => panic!("expected a valid config, got:\n{errors}"),
        }
    }

    /// The error lines for `text`.
    fn errors_env(text: &str, pairs: &[(&str, &str)]) -> Vec<String> {
        match parse_env(text, pairs) {
            Ok(config) => panic!("expected errors, got {config:?}"),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn errors(text: &str) -> Vec<String> {
        errors_env(text, &[])
    }

    /// A minimal valid upstream with one route; tests append keys to it.
    const UPSTREAM: &str = r#"
[[upstreams]]
name = "demo"
base_url = "http://127.0.0.1:9090"

[[upstreams.routes]]
path = "/items/*"
"#;

    /// The example of the external contract in DESIGN.md, verbatim.
    const CONTRACT: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_token = "${TOLLGATE_ADMIN_TOKEN}"
max_body_bytes = 1048576                   # larger request body -> 413
max_url_bytes = 8192                       # longer request target -> 414
max_header_bytes = 16384                   # larger header block -> 431

[storage]
database_url = "sqlite://tollgate.db"      # or postgres://user@host/db
redis_url = ""                             # empty: single node, in-process L1 and limits

[cache]
l1_max_bytes = "256MiB"

[auth]
required = true                            # false: anonymous clients, identified by X-Client-Id or IP

[limits]
per_ip = "1000/min"                        # ingress, before auth

[[upstreams]]
name = "rentcast"                          # clients call /rentcast/<path>
base_url = "https://api.rentcast.io/v1"
headers = { "X-Api-Key" = "${RENTCAST_API_KEY}" }   # injected upstream credentials, never cached or echoed
timeout = "10s"
egress_limit = "20/s"                      # protects the upstream account's own quota
breaker = { failure_threshold = 5, open_for = "30s" }
retry = { max_attempts = 3, base = "200ms", max = "4s" }

[[upstreams.routes]]
path = "/properties"                       # exact path, or a prefix ending in /*
ttl = "24h"
stale_while_revalidate = "1h"
stale_if_error = "24h"
cost = 0.20                                # currency units per upstream call
rate_limit = "60/min"                      # per API key, on this route
methods = ["GET"]                          # POST allowed when listed; the body is then part of the cache key
normalize = { round = { latitude = 1, longitude = 1 }, drop = ["_"] }
prewarm = ["/properties?city=Austin&state=TX"]
"#;

    const CONTRACT_ENV: &[(&str, &str)] = &[
        ("TOLLGATE_ADMIN_TOKEN", "admin-secret"),
        ("RENTCAST_API_KEY", "rc-key"),
    ];

    // === parsers ===

    #[test]
    fn durations_parse() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("10s", Duration::from_secs(10)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("30d", Duration::from_secs(30 * 86_400)),
            ("2w", Duration::from_secs(14 * 86_400)),
            ("1h30m", Duration::from_secs(5400)),
            ("1m 30s", Duration::from_secs(90)),
            ("10 sec", Duration::from_secs(10)),
            ("3 hours", Duration::from_secs(3 * 3600)),
            ("45", Duration::from_secs(45)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
            (" 24H ", Duration::from_secs(86_400)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn duration_errors_say_what_is_wrong() {
        let cases = [
            ("", "invalid duration \"\": empty"),
            (
                "3x",
                "invalid duration \"3x\": unknown unit \"x\" (ms, s, m, h, d or w)",
            ),
            (
                "-5s",
                "invalid duration \"-5s\": expected a whole number followed by a unit",
            ),
            ("s", "invalid duration \"s\": expected a whole number"),
            (
                "1.5s",
                "invalid duration \"1.5s\": fractions are not supported",
            ),
            ("10s5", "invalid duration \"10s5\": missing unit after 5"),
            (
                "99999999999999999999",
                "invalid duration \"99999999999999999999\": too large",
            ),
            (
                "999999999999999d",
                "invalid duration \"999999999999999d\": too large",
            ),
        ];
        for (text, expected) in cases {
            let message = parse_duration(text).expect_err(text).to_string();
            assert!(message.starts_with(expected), "{text}: {message}");
        }
    }

    #[test]
    fn durations_format_in_their_largest_exact_unit() {
        for text in ["500ms", "10s", "90s", "5m", "1h", "30d", "0s", "1500ms"] {
            let duration = parse_duration(text).expect(text);
            assert_eq!(format_duration(duration), text);
        }
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1.5ms");
    }

    #[test]
    fn sizes_parse() {
        let cases = [
            ("256MiB", 256 << 20),
            ("10MB", 10_000_000),
            ("512KiB", 512 << 10),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("3kb", 3000),
            ("100B", 100),
            ("8192", 8192),
            ("1 MiB", 1 << 20),
            ("0", 0),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text), Ok(ByteSize(expected)), "{text}");
        }
        assert_eq!("64KiB".parse::<ByteSize>(), Ok(ByteSize::kib(64)));
    }

    #[test]
    fn size_errors_say_what_is_wrong() {
        let cases = [
            ("", "invalid size \"\": expected a whole number of bytes"),
            ("MiB", "invalid size \"MiB\": expected a whole number"),
            ("-1", "invalid size \"-1\": expected a whole number"),
            (
                "10 megs",
                "invalid size \"10 megs\": unknown unit \"megs\" (B, KB, KiB",
            ),
            (
                "1.5GiB",
                "invalid size \"1.5GiB\": fractions are not supported",
            ),
            ("20000000TiB", "invalid size \"20000000TiB\": too large"),
        ];
        for (text, expected) in cases {
            let message = parse_size(text).expect_err(text).to_string();
            assert!(message.starts_with(expected), "{text}: {message}");
        }
    }

    #[test]
    fn sizes_display_in_binary_units() {
        assert_eq!(ByteSize::mib(256).to_string(), "256MiB");
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
        assert_eq!(ByteSize(1536).to_string(), "1536B");
        assert_eq!(ByteSize(10_000_000).to_string(), "10000000B");
        assert_eq!(ByteSize(0).to_string(), "0B");
        assert_eq!(ByteSize::mib(3).as_usize(), 3 << 20);
    }

    #[test]
    fn rates_parse() {
        let cases = [
            ("60/min", 60, 60),
            ("20/s", 20, 1),
            ("1000/hour", 1000, 3600),
            ("5/day", 5, 86_400),
            ("10/30s", 10, 30),
            ("3/5m", 3, 300),
            ("7 / sec", 7, 1),
            ("100/h", 100, 3600),
            ("2/d", 2, 86_400),
        ];
        for (text, count, secs) in cases {
            let expected = Rate {
                count,
                per: Duration::from_secs(secs),
            };
            assert_eq!(Rate::parse(text), Ok(expected), "{text}");
            assert_eq!(text.parse::<Rate>(), Ok(expected), "{text}");
        }
        assert_eq!(
            Rate::parse("1/500ms").map(|rate| rate.per),
            Ok(Duration::from_millis(500))
        );
    }

    #[test]
    fn rate_errors_say_what_is_wrong() {
        let cases = [
            ("60", "invalid rate \"60\": expected COUNT/PERIOD"),
            (
                "x/min",
                "invalid rate \"x/min\": \"x\" is not a whole number",
            ),
            (
                "-1/min",
                "invalid rate \"-1/min\": \"-1\" is not a whole number",
            ),
            (
                "0/min",
                "invalid rate \"0/min\": the count must be at least 1",
            ),
            (
                "5/fortnight",
                "invalid rate \"5/fortnight\": unknown period \"fortnight\"",
            ),
            (
                "5/3x",
                "invalid rate \"5/3x\": bad period: unknown unit \"x\"",
            ),
            (
                "5/0s",
                "invalid rate \"5/0s\": the period must be more than 0",
            ),
            ("5/", "invalid rate \"5/\": bad period: empty"),
        ];
        for (text, expected) in cases {
            let message = Rate::parse(text).expect_err(text).to_string();
            assert!(message.starts_with(expected), "{text}: {message}");
        }
    }

    #[test]
    fn rates_display_and_interval() {
        for text in ["60/min", "20/s", "1000/hour", "5/day", "10/30s", "1/500ms"] {
            assert_eq!(Rate::parse(text).expect(text).to_string(), text);
        }
        assert_eq!(Rate::parse("1/2m").expect("rate").to_string(), "1/2m");
        let rate = Rate::parse("60/min").expect("rate");
        assert_eq!(rate.interval(), Duration::from_secs(1));
    }

    // === defaults and the contract ===

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = parse("");
        let expected = Config {
            source: PathBuf::from("test.toml"),
            ..Config::default()
        };
        assert_eq!(config, expected);
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.max_body_bytes, ByteSize(1 << 20));
        assert_eq!(config.server.max_url_bytes, ByteSize(8192));
        assert_eq!(config.server.max_header_bytes, ByteSize(16384));
        assert_eq!(config.server.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(config.server.log_format, LogFormat::Text);
        assert_eq!(config.storage.database_url, "sqlite://tollgate.db");
        assert_eq!(config.storage.redis_url, "");
        assert_eq!(config.storage.pool_size, 8);
        assert_eq!(config.cache.l1_max_bytes, ByteSize(256 << 20));
        assert_eq!(config.cache.max_waiters, 10_000);
        assert_eq!(config.cache.l2_write_queue, 1024);
        assert_eq!(config.cache.l2_write_linger, Duration::from_millis(20));
        assert!(config.cache.l2_filter);
        assert_eq!(config.cache.sweep_interval, Duration::from_secs(60));
        assert_eq!(config.cache.sweep_batch, 500);
        assert_eq!(config.cache.max_upstream_body_bytes, ByteSize(10 << 20));
        assert!(!config.auth.required);
        assert_eq!(config.limits.per_ip, None);
        assert!(config.upstreams.is_empty());
    }

    #[test]
    fn upstream_and_route_defaults() {
        let config = parse(&format!(
            "{UPSTREAM}\n[upstreams.breaker]\n[upstreams.retry]\n"
        ));
        let upstream = &config.upstreams[0];
        assert!(upstream.headers.is_empty());
        assert_eq!(upstream.timeout, Duration::from_secs(30));
        assert_eq!(upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(upstream.max_body_bytes, None);
        assert_eq!(upstream.max_idle_connections, 256);
        let no_keep_alive =
            parse(&UPSTREAM.replacen("base_url", "max_idle_connections = 0\nbase_url", 1));
        assert_eq!(no_keep_alive.upstreams[0].max_idle_connections, 0);
        assert_eq!(upstream.body_limit(&config.cache), ByteSize::mib(10));
        assert_eq!(upstream.egress_limit, None);
        assert_eq!(upstream.breaker, Some(BreakerConfig::default()));
        assert_eq!(
            upstream
                .breaker
                .as_ref()
                .map(|b| (b.failure_threshold, b.open_for)),
            Some((5, Duration::from_secs(30)))
        );
        assert_eq!(
            upstream
                .retry
                .as_ref()
                .map(|r| (r.max_attempts, r.base, r.max)),
            Some((3, Duration::from_millis(200), Duration::from_secs(4)))
        );
        let route = &upstream.routes[0];
        assert_eq!(route.ttl, Duration::from_secs(300));
        assert_eq!(route.stale_while_revalidate, Duration::ZERO);
        assert_eq!(route.stale_if_error, Duration::ZERO);
        assert_eq!(route.cost, 0.0);
        assert_eq!(route.rate_limit, None);
        assert_eq!(route.methods, ["GET"]);
        assert_eq!(route.normalize, NormalizeConfig::default());
        assert!(route.prewarm.is_empty());
        assert!(route.cache);
        assert!(config.upstream("demo").is_some());
        assert!(config.upstream("other").is_none());
    }

    #[test]
    fn the_contract_example_parses_as_written() {
        let config = parse_env(CONTRACT, CONTRACT_ENV).expect("contract example");
        assert!(config.auth.required);
    }

    #[test]
    fn the_contract_example_parses() {
        let text = CONTRACT.replace("required = true ", "required = false");
        let config = parse_env(&text, CONTRACT_ENV).expect("contract example");
        assert_eq!(
            config.server.listen,
            SocketAddr::from(([127, 0, 0, 1], 8080))
        );
        assert_eq!(config.server.admin_token, "admin-secret");
        assert_eq!(config.server.max_body_bytes, ByteSize(1_048_576));
        assert_eq!(config.cache.l1_max_bytes, ByteSize::mib(256));
        assert_eq!(
            config.limits.per_ip,
            Some(Rate::parse("1000/min").expect("rate"))
        );
        let upstream = &config.upstreams[0];
        assert_eq!(upstream.name, "rentcast");
        assert_eq!(upstream.base_url.as_str(), "https://api.rentcast.io/v1");
        assert_eq!(
            upstream.headers.get("X-Api-Key").map(String::as_str),
            Some("rc-key")
        );
        assert_eq!(upstream.timeout, Duration::from_secs(10));
        assert_eq!(
            upstream.egress_limit.map(|r| r.to_string()).as_deref(),
            Some("20/s")
        );
        assert_eq!(
            upstream.retry.as_ref().map(|r| r.base),
            Some(Duration::from_millis(200))
        );
        let route = &upstream.routes[0];
        assert_eq!(route.path, "/properties");
        assert_eq!(route.ttl, Duration::from_secs(86_400));
        assert_eq!(route.stale_while_revalidate, Duration::from_secs(3600));
        assert_eq!(route.cost, 0.20);
        assert_eq!(
            route.rate_limit.map(|r| (r.count, r.per.as_secs())),
            Some((60, 60))
        );
        assert_eq!(route.normalize.round.get("latitude"), Some(&1));
        assert_eq!(route.normalize.drop, ["_"]);
        assert!(route.normalize.sort);
        assert_eq!(route.prewarm, ["/properties?city=Austin&state=TX"]);
    }

    #[test]
    fn every_example_file_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let env = env(&[
            ("TOLLGATE_ADMIN_TOKEN", "admin-secret"),
            ("RENTCAST_API_KEY", "rc-key"),
        ]);
        let mut loaded = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("examples/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                match Config::load_with_env(Some(&path), &env) {
                    Ok(config) => loaded.push((path.file_name().map(|n| n.to_owned()), config)),
                    Err(errors) => panic!("{}:\n{errors}", path.display()),
                }
            }
        }
        loaded.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<String> = loaded
            .iter()
            .map(|(name, _)| {
                name.as_ref()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(names, ["rentcast.toml", "tollgate.toml", "weather.toml"]);

        let demo = &loaded[1].1;
        assert_eq!(demo.server.admin_token, "admin-secret");
        assert_eq!(
            demo.upstreams[0].base_url.as_str(),
            "http://127.0.0.1:9090/"
        );
        assert_eq!(demo.upstreams[0].routes.len(), 2);
        let weather = &loaded[2].1.upstreams[0];
        assert_eq!(weather.base_url.as_str(), "https://api.open-meteo.com/v1");
        assert_eq!(weather.routes[0].prewarm.len(), 3);
        assert_eq!(weather.routes[0].normalize.round.get("longitude"), Some(&1));
        assert_eq!(
            loaded[0].1.upstreams[0]
                .headers
                .get("X-Api-Key")
                .map(String::as_str),
            Some("rc-key")
        );

        // The README's example runs with nothing set.
        let bare =
            Config::load_with_env(Some(&dir.join("tollgate.toml")), &[]).expect("tollgate.toml");
        assert_eq!(bare.server.admin_token, "change-me");
        assert_eq!(bare.storage.database_url, "sqlite://tollgate.db");
    }

    // === loading ===

    #[test]
    fn the_file_comes_from_the_argument_then_tollgate_config_then_the_default() {
        let given = Path::new("given.toml");
        let named = env(&[("TOLLGATE_CONFIG", "/etc/tollgate/named.toml")]);
        assert_eq!(
            Config::resolve_path(Some(given), &named),
            PathBuf::from("given.toml")
        );
        assert_eq!(
            Config::resolve_path(None, &named),
            PathBuf::from("/etc/tollgate/named.toml")
        );
        assert_eq!(
            Config::resolve_path(None, &[]),
            PathBuf::from("tollgate.toml")
        );
        assert_eq!(
            Config::resolve_path(None, &env(&[("TOLLGATE_CONFIG", "")])),
            PathBuf::from("tollgate.toml")
        );
    }

    #[test]
    fn load_reads_the_file_and_records_its_path() {
        let path =
            std::env::temp_dir().join(format!("tollgate-config-{}.toml", std::process::id()));
        std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:9999\"\n").expect("write");
        let env = env(&[("TOLLGATE_CONFIG", &path.to_string_lossy())]);
        let config = Config::load_with_env(None, &env);
        let _ = std::fs::remove_file(&path);
        let config = config.expect("config");
        assert_eq!(config.server.listen.port(), 9999);
        assert_eq!(config.source, path);
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let error = Config::load_with_env(Some(Path::new("/nonexistent/tollgate.toml")), &[])
            .expect_err("missing file");
        assert_eq!(error.0.len(), 1);
        let message = error.to_string();
        assert!(
            message.starts_with("/nonexistent/tollgate.toml: -: cannot read the config file: "),
            "{message}"
        );
    }

    #[test]
    fn a_toml_syntax_error_gives_line_and_column() {
        let lines = errors("[server]\nlisten = \"127.0.0.1:8080\nworkers = 2\n");
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("test.toml: -: TOML syntax error at line 2, column "),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains("listen = \"127.0.0.1:8080"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn an_unknown_key_is_named() {
        assert_eq!(
            errors("[server]\nlisten_addr = \"127.0.0.1:80\"\n"),
            [
                "test.toml: server.listen_addr: unknown field `listen_addr`, expected one of `listen`, `admin_token`, `max_body_bytes`, `max_url_bytes`, `max_header_bytes`, `workers`, `shutdown_timeout`, `log_format`"
            ]
        );
        let lines = errors(&format!("{UPSTREAM}ttl = \"1m\"\ncahce = false\n"));
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("test.toml: upstreams[0].routes[0].cahce: unknown field `cahce`"),
            "{}",
            lines[0]
        );
        let lines = errors("[sever]\n");
        assert!(
            lines[0].starts_with("test.toml: sever: unknown field `sever`"),
            "{}",
            lines[0]
        );
        let lines = errors(&format!("{UPSTREAM}normalize = {{ sorted = false }}\n"));
        assert!(
            lines[0]
                .starts_with("test.toml: upstreams[0].routes[0].normalize.sorted: unknown field"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn a_type_error_names_the_key() {
        assert_eq!(
            errors(&format!("{UPSTREAM}ttl = \"5 parsecs\"\n")),
            [
                "test.toml: upstreams[0].routes[0].ttl: invalid duration \"5 parsecs\": unknown unit \"parsecs\" (ms, s, m, h, d or w)"
            ]
        );
        assert_eq!(
            errors("[server]\nlisten = \"localhost\"\n"),
            ["test.toml: server.listen: invalid socket address syntax"]
        );
        assert_eq!(
            errors("[server]\nworkers = \"four\"\n"),
            ["test.toml: server.workers: invalid type: string \"four\", expected usize"]
        );
        assert_eq!(
            errors("[server]\nlog_format = \"xml\"\n"),
            ["test.toml: server.log_format: unknown variant `xml`, expected `text` or `json`"]
        );
        assert_eq!(
            errors("[limits]\nper_ip = \"lots\"\n"),
            [
                "test.toml: limits.per_ip: invalid rate \"lots\": expected COUNT/PERIOD, e.g. \"60/min\", \"20/s\", \"1000/hour\", \"10/30s\""
            ]
        );
        assert_eq!(
            errors("[cache]\nl1_max_bytes = -5\n"),
            ["test.toml: cache.l1_max_bytes: invalid size -5: must not be negative"]
        );
        assert_eq!(
            errors("[[upstreams]]\nname = \"x\"\nbase_url = \"not a url\"\n"),
            [
                "test.toml: upstreams[0].base_url: invalid URL \"not a url\": relative URL without a base"
            ]
        );
        assert_eq!(
            errors("[[upstreams]]\nname = \"x\"\n"),
            ["test.toml: upstreams[0]: missing field `base_url`"]
        );
    }

    #[test]
    fn durations_and_sizes_also_take_plain_integers() {
        let config = parse(&format!(
            "[server]\nshutdown_timeout = 5\nmax_body_bytes = 2048\n{UPSTREAM}ttl = 90\n"
        ));
        assert_eq!(config.server.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(config.server.max_body_bytes, ByteSize(2048));
        assert_eq!(config.upstreams[0].routes[0].ttl, Duration::from_secs(90));
    }

    // === ${VAR} substitution ===

    #[test]
    fn variables_are_substituted_in_every_string() {
        let text = format!(
            r#"
[server]
admin_token = "${{TOKEN}}"
[storage]
database_url = "postgres://${{DB_USER}}@${{DB_HOST:-localhost}}/tollgate"
{UPSTREAM}
prewarm = ["/items/${{ITEM}}"]
"#
        );
        let config = parse_env(
            &text,
            &[("TOKEN", "t0k"), ("DB_USER", "gate"), ("ITEM", "42")],
        )
        .expect("config");
        assert_eq!(config.server.admin_token, "t0k");
        assert_eq!(
            config.storage.database_url,
            "postgres://gate@localhost/tollgate"
        );
        assert_eq!(config.upstreams[0].routes[0].prewarm, ["/items/42"]);
    }

    #[test]
    fn substitution_defaults_escapes_and_lone_dollars() {
        let vars = env(&[("SET", "value"), ("EMPTY", "")]);
        let cases = [
            ("${SET}", "value"),
            ("${SET:-other}", "value"),
            ("${UNSET:-fallback}", "fallback"),
            ("${EMPTY:-fallback}", "fallback"),
            ("${EMPTY}", ""),
            ("${UNSET:-}", ""),
            ("${UNSET:-a:b/c}", "a:b/c"),
            ("a${SET}b${SET}c", "avaluebvaluec"),
            ("$${SET}", "${SET}"),
            ("cost $5 and $", "cost $5 and $"),
            ("$$", "$$"),
            ("no variables", "no variables"),
        ];
        for (text, expected) in cases {
            assert_eq!(expand(text, &vars).as_deref(), Ok(expected), "{text}");
        }
    }

    #[test]
    fn an_unset_variable_is_an_error_naming_the_key() {
        let text = r#"
[server]
admin_token = "${TOLLGATE_ADMIN_TOKEN}"

[[upstreams]]
name = "rentcast"
base_url = "https://api.rentcast.io/v1"
headers = { "X-Api-Key" = "${RENTCAST_API_KEY}" }
"#;
        assert_eq!(
            errors(text),
            [
                "test.toml: server.admin_token: environment variable TOLLGATE_ADMIN_TOKEN is not set",
                "test.toml: upstreams[0].headers.X-Api-Key: environment variable RENTCAST_API_KEY is not set",
            ]
        );
        assert_eq!(
            errors("[server]\nadmin_token = \"${OPEN\"\n"),
            [
                "test.toml: server.admin_token: unterminated \"${\" (close it with \"}\", or write \"$${\" for a literal \"${\")"
            ]
        );
        assert_eq!(
            errors("[server]\nadmin_token = \"${1X}\"\n"),
            [
                "test.toml: server.admin_token: invalid environment variable name \"1X\" in \"${1X}\" (expected letters, digits and _, not starting with a digit)"
            ]
        );
        assert_eq!(
            errors(&format!("{UPSTREAM}prewarm = [\"/items/1\", \"${{P}}\"]\n")),
            ["test.toml: upstreams[0].routes[0].prewarm[1]: environment variable P is not set"]
        );
    }

    // === TOLLGATE__ overrides ===

    #[test]
    fn overrides_create_missing_sections_and_keys() {
        let config = parse_env(
            "",
            &[
                ("TOLLGATE__SERVER__LISTEN", "0.0.0.0:9000"),
                ("TOLLGATE__SERVER__WORKERS", "4"),
                ("TOLLGATE__STORAGE__REDIS_URL", "redis://127.0.0.1:6379"),
                ("TOLLGATE__LIMITS__PER_IP", "100/min"),
                ("TOLLGATE__AUTH__REQUIRED", "false"),
                ("TOLLGATE__CACHE__L1_MAX_BYTES", "64MiB"),
            ],
        )
        .expect("config");
        assert_eq!(config.server.listen, SocketAddr::from(([0, 0, 0, 0], 9000)));
        assert_eq!(config.server.workers, 4);
        assert_eq!(config.storage.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(config.limits.per_ip.map(|r| r.count), Some(100));
        assert_eq!(config.cache.l1_max_bytes, ByteSize::mib(64));
    }

    #[test]
    fn overrides_match_keys_case_insensitively_and_replace_values() {
        let text = "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_token = \"from-file\"\n";
        let config = parse_env(
            text,
            &[
                ("TOLLGATE__Server__Listen", "127.0.0.1:1234"),
                ("TOLLGATE__SERVER__ADMIN_TOKEN", "12345"),
                ("TOLLGATE_CONFIG", "ignored.toml"),
                ("TOLLGATE_ADMIN_TOKEN", "not-an-override"),
            ],
        )
        .expect("config");
        assert_eq!(config.server.listen.port(), 1234);
        // The file has a string there, so the digits stay a string.
        assert_eq!(config.server.admin_token, "12345");
    }

    #[test]
    fn overrides_address_upstreams_by_index_or_name() {
        let text = format!(
            "{UPSTREAM}\n[[upstreams]]\nname = \"open-meteo\"\nbase_url = \"https://api.open-meteo.com/v1\"\nheaders = {{ \"X-Api-Key\" = \"old\" }}\n[[upstreams.routes]]\npath = \"/forecast\"\n"
        );
        let config = parse_env(
            &text,
            &[
                ("TOLLGATE__UPSTREAMS__0__TIMEOUT", "5s"),
                ("TOLLGATE__UPSTREAMS__DEMO__CONNECT_TIMEOUT", "1s"),
                ("TOLLGATE__UPSTREAMS__OPEN_METEO__TIMEOUT", "7s"),
                ("TOLLGATE__UPSTREAMS__open-meteo__EGRESS_LIMIT", "10/min"),
                ("TOLLGATE__UPSTREAMS__OPEN_METEO__HEADERS__X_API_KEY", "new"),
                ("TOLLGATE__UPSTREAMS__1__ROUTES__0__TTL", "15m"),
                (
                    "TOLLGATE__UPSTREAMS__DEMO__ROUTES__0__METHODS",
                    "[\"get\", \"POST\"]",
                ),
                ("TOLLGATE__UPSTREAMS__DEMO__ROUTES__0__COST", "0.5"),
                (
                    "TOLLGATE__UPSTREAMS__DEMO__BREAKER",
                    "{ failure_threshold = 2, open_for = \"1m\" }",
                ),
            ],
        )
        .expect("config");
        let demo = &config.upstreams[0];
        let meteo = &config.upstreams[1];
        assert_eq!(demo.timeout, Duration::from_secs(5));
        assert_eq!(demo.connect_timeout, Duration::from_secs(1));
        assert_eq!(demo.routes[0].methods, ["GET", "POST"]);
        assert_eq!(demo.routes[0].cost, 0.5);
        assert_eq!(
            demo.breaker,
            Some(BreakerConfig {
                failure_threshold: 2,
                open_for: Duration::from_secs(60)
            })
        );
        assert_eq!(meteo.timeout, Duration::from_secs(7));
        assert_eq!(
            meteo.egress_limit.map(|r| r.to_string()).as_deref(),
            Some("10/min")
        );
        assert_eq!(meteo.headers.len(), 1);
        assert_eq!(
            meteo.headers.get("X-Api-Key").map(String::as_str),
            Some("new")
        );
        assert_eq!(meteo.routes[0].ttl, Duration::from_secs(900));
    }

    #[test]
    fn overrides_can_append_an_upstream() {
        let config = parse_env(
            "",
            &[
                ("TOLLGATE__UPSTREAMS__0__NAME", "demo"),
                ("TOLLGATE__UPSTREAMS__0__BASE_URL", "http://127.0.0.1:9090"),
                ("TOLLGATE__UPSTREAMS__0__ROUTES__0__PATH", "/items/*"),
            ],
        )
        .expect("config");
        assert_eq!(config.upstreams[0].name, "demo");
        assert_eq!(config.upstreams[0].routes[0].path, "/items/*");
    }

    #[test]
    fn override_values_parse_as_toml_when_they_are_toml() {
        assert_eq!(override_value("42", false), Value::Integer(42));
        assert_eq!(override_value("true", false), Value::Boolean(true));
        assert_eq!(override_value("0.25", false), Value::Float(0.25));
        assert_eq!(
            override_value("\"quoted\"", false),
            Value::String("quoted".into())
        );
        assert_eq!(override_value("5s", false), Value::String("5s".into()));
        assert_eq!(
            override_value("60/min", false),
            Value::String("60/min".into())
        );
        assert_eq!(
            override_value("0.0.0.0:80", false),
            Value::String("0.0.0.0:80".into())
        );
        assert_eq!(
            override_value("2024-01-01", false),
            Value::String("2024-01-01".into())
        );
        assert_eq!(
            override_value("1\nb = 2", false),
            Value::String("1\nb = 2".into())
        );
        assert_eq!(override_value("42", true), Value::String("42".into()));
        assert!(override_value("[1, 2]", false).is_array());
        assert!(override_value("{ a = 1 }", false).is_table());
    }

    #[test]
    fn override_errors_name_the_variable() {
        let lines = errors_env(
            UPSTREAM,
            &[
                ("TOLLGATE__UPSTREAMS__NOPE__TIMEOUT", "5s"),
                ("TOLLGATE__UPSTREAMS__3__TIMEOUT", "5s"),
                ("TOLLGATE__UPSTREAMS__DEMO__NAME__X", "5s"),
                ("TOLLGATE__SERVER____LISTEN", "x"),
            ],
        );
        assert_eq!(
            lines,
            [
                "test.toml: TOLLGATE__SERVER____LISTEN: empty key segment (write TOLLGATE__SECTION__KEY, segments separated by \"__\")",
                "test.toml: TOLLGATE__UPSTREAMS__3__TIMEOUT: index 3 is out of range: upstreams has 1 element(s)",
                "test.toml: TOLLGATE__UPSTREAMS__DEMO__NAME__X: upstreams[0].name is a string, not a table or an array",
                "test.toml: TOLLGATE__UPSTREAMS__NOPE__TIMEOUT: upstreams has no element named \"NOPE\" (names: demo)",
            ]
        );
    }

    #[test]
    fn an_ambiguous_override_is_an_error() {
        let text = "[[upstreams]]\nname = \"demo\"\nbase_url = \"http://h\"\nheaders = { \"X-Key\" = \"a\", \"x-key\" = \"b\" }\n";
        assert_eq!(
            errors_env(text, &[("TOLLGATE__UPSTREAMS__DEMO__HEADERS__X_KEY", "c")]),
            [
                "test.toml: TOLLGATE__UPSTREAMS__DEMO__HEADERS__X_KEY: \"X_KEY\" is ambiguous: it matches X-Key, x-key"
            ]
        );
    }

    #[test]
    fn problems_with_overridden_values_name_the_variable() {
        assert_eq!(
            errors_env(
                UPSTREAM,
                &[("TOLLGATE__UPSTREAMS__DEMO__TIMEOUT", "5 secondz")]
            ),
            [
                "test.toml: upstreams[0].timeout: invalid duration \"5 secondz\": unknown unit \"secondz\" (ms, s, m, h, d or w) (from TOLLGATE__UPSTREAMS__DEMO__TIMEOUT)"
            ]
        );
        assert_eq!(
            errors_env(
                UPSTREAM,
                &[("TOLLGATE__UPSTREAMS__0__ROUTES__0__PATH", "items")]
            ),
            [
                "test.toml: upstreams[0].routes[0].path: must start with \"/\" (from TOLLGATE__UPSTREAMS__0__ROUTES__0__PATH)"
            ]
        );
        assert_eq!(
            errors_env("", &[("TOLLGATE__SERVER__LISTN", "0.0.0.0:80")])[0]
                .split(", expected")
                .next(),
            Some("test.toml: server.listn: unknown field `listn`")
        );
        assert!(
            errors_env("", &[("TOLLGATE__SERVER__LISTN", "0.0.0.0:80")])[0]
                .ends_with("(from TOLLGATE__SERVER__LISTN)")
        );
        assert_eq!(
            errors_env("", &[("TOLLGATE__UPSTREAMS__0__NAME", "x")]),
            [
                "test.toml: upstreams[0]: missing field `base_url` (from TOLLGATE__UPSTREAMS__0__NAME)"
            ]
        );
    }

    // === validation ===

    #[test]
    fn upstream_names_are_checked() {
        let upstream = |name: &str| {
            format!("[[upstreams]]\nname = \"{name}\"\nbase_url = \"http://127.0.0.1:9090\"\n")
        };
        assert_eq!(
            errors(&upstream("")),
            ["test.toml: upstreams[0].name: must not be empty"]
        );
        assert_eq!(
            errors(&upstream("my api")),
            [
                "test.toml: upstreams[0].name: \"my api\" may contain only letters, digits, \"-\" and \"_\""
            ]
        );
        assert_eq!(
            errors(&upstream("a/b")),
            [
                "test.toml: upstreams[0].name: \"a/b\" may contain only letters, digits, \"-\" and \"_\""
            ]
        );
        for reserved in ["admin", "health", "ready", "metrics", "Admin"] {
            assert_eq!(
                errors(&upstream(reserved)),
                [format!(
                    "test.toml: upstreams[0].name: \"{reserved}\" is reserved for the gateway's own endpoints (admin, health, ready, metrics)"
                )]
            );
        }
        assert_eq!(
            errors(&format!(
                "{}{}{}",
                upstream("a"),
                upstream("b_2-x"),
                upstream("A")
            )),
            ["test.toml: upstreams[2].name: duplicate upstream name \"A\" (also upstreams[0])"]
        );
        parse(&upstream("rent-cast_2"));
    }

    #[test]
    fn base_urls_are_checked() {
        let upstream = |url: &str| format!("[[upstreams]]\nname = \"x\"\nbase_url = \"{url}\"\n");
        assert_eq!(
            errors(&upstream("ftp://example.com/")),
            ["test.toml: upstreams[0].base_url: scheme must be http or https, not \"ftp\""]
        );
        assert_eq!(
            errors(&upstream("https://example.com/v1?key=1")),
            [
                "test.toml: upstreams[0].base_url: must not have a query or fragment (clients' paths and queries are appended)"
            ]
        );
        parse(&upstream("https://api.example.com/v1"));
        parse(&upstream("http://[::1]:9090"));
    }

    #[test]
    fn headers_are_checked() {
        let text = "[[upstreams]]\nname = \"x\"\nbase_url = \"http://h\"\nheaders = { \"Bad Name\" = \"v\", \"X-Key\" = \"${KEY}\" }\n";
        assert_eq!(
            errors_env(text, &[("KEY", "secret\n")]),
            [
                "test.toml: upstreams[0].headers.Bad Name: is not a valid HTTP header name",
                "test.toml: upstreams[0].headers.X-Key: value contains a control character (a trailing newline from an environment variable?)",
            ]
        );
    }

    #[test]
    fn route_paths_are_checked() {
        let route = |path: &str| format!("{UPSTREAM}\n[[upstreams.routes]]\npath = \"{path}\"\n");
        assert_eq!(
            errors(&route("items")),
            ["test.toml: upstreams[0].routes[1].path: must start with \"/\""]
        );
        assert_eq!(
            errors(&route("")),
            ["test.toml: upstreams[0].routes[1].path: must start with \"/\""]
        );
        for bad in ["/a/*/b", "/a*", "/*/*", "/a/b*"] {
            assert_eq!(
                errors(&route(bad)),
                [
                    "test.toml: upstreams[0].routes[1].path: \"*\" is allowed only as a final \"/*\" (a prefix route, e.g. \"/items/*\")"
                ],
                "{bad}"
            );
        }
        assert_eq!(
            errors(&route("/search?q=x")),
            [
                "test.toml: upstreams[0].routes[1].path: must be a path without \"?\" or \"#\" (queries are matched by the normalizer)"
            ]
        );
        assert_eq!(
            errors(&route("/items/*")),
            [
                "test.toml: upstreams[0].routes[1].path: duplicate route path \"/items/*\" (also routes[0])"
            ]
        );
        parse(&route("/*"));
        parse(&route("/items"));
        // The same path under another upstream is fine.
        parse(&format!(
            "{UPSTREAM}\n[[upstreams]]\nname = \"other\"\nbase_url = \"http://h\"\n[[upstreams.routes]]\npath = \"/items/*\"\n"
        ));
    }

    #[test]
    fn route_matching() {
        let route = |path: &str| RouteConfig {
            path: path.to_owned(),
            ttl: default_ttl(),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            cost: 0.0,
            rate_limit: None,
            methods: default_methods(),
            normalize: NormalizeConfig::default(),
            prewarm: Vec::new(),
            cache: true,
            retry_post: false,
            fallback: None,
        };
        assert!(route("/items/*").matches("/items/42"));
        assert!(route("/items/*").matches("/items/"));
        assert!(!route("/items/*").matches("/items"));
        assert!(!route("/items/*").matches("/itemsx/1"));
        assert!(route("/*").matches("/anything/at/all"));
        assert!(route("/weather").matches("/weather"));
        assert!(!route("/weather").matches("/weather/x"));
    }

    #[test]
    fn methods_are_checked_and_upper_cased() {
        let config = parse(&format!(
            "{UPSTREAM}methods = [\"get\", \"Post\", \"GET\", \"options\"]\n"
        ));
        assert_eq!(
            config.upstreams[0].routes[0].methods,
            ["GET", "POST", "OPTIONS"]
        );
        assert_eq!(
            errors(&format!("{UPSTREAM}methods = [\"GET\", \"FETCH\"]\n")),
            [
                "test.toml: upstreams[0].routes[0].methods[1]: unknown method \"FETCH\" (allowed: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS)"
            ]
        );
        assert_eq!(
            errors(&format!("{UPSTREAM}methods = []\n")),
            ["test.toml: upstreams[0].routes[0].methods: must list at least one method"]
        );
    }

    #[test]
    fn cost_must_be_finite_and_not_negative() {
        for (cost, shown) in [("-0.5", "-0.5"), ("nan", "NaN"), ("inf", "inf")] {
            assert_eq!(
                errors(&format!("{UPSTREAM}cost = {cost}\n")),
                [format!(
                    "test.toml: upstreams[0].routes[0].cost: must be a finite number >= 0, not {shown}"
                )]
            );
        }
        assert_eq!(
            parse(&format!("{UPSTREAM}cost = 2\n")).upstreams[0].routes[0].cost,
            2.0
        );
    }

    #[test]
    fn ttl_must_be_positive_on_cached_routes() {
        assert_eq!(
            errors(&format!("{UPSTREAM}ttl = \"0s\"\n")),
            [
                "test.toml: upstreams[0].routes[0].ttl: must be more than 0 on a cached route (set cache = false to bypass the cache)"
            ]
        );
        let config = parse(&format!("{UPSTREAM}ttl = 0\ncache = false\n"));
        assert!(!config.upstreams[0].routes[0].cache);
    }

    #[test]
    fn prewarm_entries_must_lie_under_the_route() {
        let exact = "[[upstreams]]\nname = \"w\"\nbase_url = \"https://h/v1\"\n[[upstreams.routes]]\npath = \"/forecast\"\n";
        parse(&format!(
            "{exact}prewarm = [\"/forecast?latitude=52.5\", \"/forecast\"]\n"
        ));
        assert_eq!(
            errors(&format!(
                "{exact}prewarm = [\"/forecast?a=1\", \"/forecasts?a=1\", \"forecast\"]\n"
            )),
            [
                "test.toml: upstreams[0].routes[0].prewarm[1]: \"/forecasts?a=1\" is not under the route's path \"/forecast\" (write a path with an optional query)",
                "test.toml: upstreams[0].routes[0].prewarm[2]: \"forecast\" is not under the route's path \"/forecast\" (write a path with an optional query)",
            ]
        );
        parse(&format!(
            "{UPSTREAM}prewarm = [\"/items/1\", \"/items/2?full=true\"]\n"
        ));
        assert_eq!(
            errors(&format!("{UPSTREAM}prewarm = [\"/items?x=1\"]\n")),
            [
                "test.toml: upstreams[0].routes[0].prewarm[0]: \"/items?x=1\" is not under the route's path \"/items/*\" (write a path with an optional query)"
            ]
        );
        assert_eq!(
            errors(&format!("{UPSTREAM}prewarm = [\"/items/1#top\"]\n")),
            [
                "test.toml: upstreams[0].routes[0].prewarm[0]: \"/items/1#top\" must not have a fragment"
            ]
        );
        assert_eq!(
            errors(&format!(
                "{UPSTREAM}prewarm = [\"/items/1\"]\ncache = false\n"
            )),
            [
                "test.toml: upstreams[0].routes[0].prewarm: prewarming needs a cached route (this one has cache = false)"
            ]
        );
        assert_eq!(
            errors(&format!(
                "{UPSTREAM}prewarm = [\"/items/1\"]\nmethods = [\"POST\"]\n"
            )),
            [
                "test.toml: upstreams[0].routes[0].prewarm: prewarming uses GET, which this route's methods do not list"
            ]
        );
    }

    #[test]
    fn storage_urls_are_checked() {
        for ok in [
            "sqlite://tollgate.db",
            "sqlite:///var/lib/tollgate/tollgate.db",
            "postgres://gate@db/tollgate",
            "postgresql://gate:pw@db:5432/tollgate",
        ] {
            parse(&format!("[storage]\ndatabase_url = \"{ok}\"\n"));
        }
        assert_eq!(
            errors("[storage]\ndatabase_url = \"mysql://root:hunter2@db/x\"\n"),
            [
                "test.toml: storage.database_url: \"mysql://root:redacted@db/x\" is not a sqlite:// or postgres:// URL"
            ]
        );
        assert_eq!(
            errors("[storage]\ndatabase_url = \"tollgate.db\"\n"),
            [
                "test.toml: storage.database_url: \"tollgate.db\" is not a sqlite:// or postgres:// URL"
            ]
        );
        assert_eq!(
            errors("[storage]\ndatabase_url = \"sqlite://\"\n"),
            [
                "test.toml: storage.database_url: sqlite:// needs a file path, e.g. \"sqlite://tollgate.db\""
            ]
        );
        for ok in ["", "redis://127.0.0.1:6379", "rediss://:pw@cache:6380/0"] {
            parse(&format!("[storage]\nredis_url = \"{ok}\"\n"));
        }
        assert_eq!(
            errors("[storage]\nredis_url = \"127.0.0.1:6379\"\n"),
            [
                "test.toml: storage.redis_url: \"127.0.0.1:6379\" is not a redis:// or rediss:// URL (leave it empty for a single node)"
            ]
        );
    }

    #[test]
    fn sizes_counts_and_intervals_must_be_positive() {
        let text = r#"
[server]
max_body_bytes = 0
max_url_bytes = "0KiB"
max_header_bytes = 0
[storage]
pool_size = 0
[cache]
l1_max_bytes = 0
max_upstream_body_bytes = 0
max_waiters = 0
l2_write_queue = 0
l2_write_linger = "2s"
sweep_batch = 0
sweep_interval = "0s"
[[upstreams]]
name = "x"
base_url = "http://h"
max_body_bytes = "0MiB"
timeout = 0
connect_timeout = "0ms"
breaker = { failure_threshold = 0, open_for = 0 }
retry = { max_attempts = 0, base = "5s", max = "1s" }
"#;
        assert_eq!(
            errors(text),
            [
                "test.toml: server.max_body_bytes: must be more than 0 bytes",
                "test.toml: server.max_url_bytes: must be more than 0 bytes",
                "test.toml: server.max_header_bytes: must be more than 0 bytes",
                "test.toml: cache.l1_max_bytes: must be more than 0 bytes",
                "test.toml: cache.max_upstream_body_bytes: must be more than 0 bytes",
                "test.toml: storage.pool_size: must be at least 1",
                "test.toml: cache.max_waiters: must be at least 1",
                "test.toml: cache.l2_write_queue: must be at least 1",
                "test.toml: cache.l2_write_linger: must be at most 1s",
                "test.toml: cache.sweep_batch: must be at least 1",
                "test.toml: cache.sweep_interval: must be more than 0s",
                "test.toml: upstreams[0].timeout: must be more than 0s",
                "test.toml: upstreams[0].connect_timeout: must be more than 0s",
                "test.toml: upstreams[0].max_body_bytes: must be more than 0 bytes",
                "test.toml: upstreams[0].breaker.failure_threshold: must be at least 1",
                "test.toml: upstreams[0].breaker.open_for: must be more than 0s",
                "test.toml: upstreams[0].retry.max_attempts: must be at least 1 (1 = no retries)",
                "test.toml: upstreams[0].retry.base: 5s is more than retry.max (1s)",
            ]
        );
    }

    #[test]
    fn all_validation_problems_are_reported_together() {
        let text = r#"
[auth]
required = true
[[upstreams]]
name = "admin"
base_url = "ftp://h"
[[upstreams.routes]]
path = "x"
[[upstreams.routes]]
path = "/y"
cost = -1
"#;
        assert_eq!(
            errors(text),
            [
                "test.toml: upstreams[0].name: \"admin\" is reserved for the gateway's own endpoints (admin, health, ready, metrics)",
                "test.toml: upstreams[0].base_url: scheme must be http or https, not \"ftp\"",
                "test.toml: upstreams[0].routes[0].path: must start with \"/\"",
                "test.toml: upstreams[0].routes[1].cost: must be a finite number >= 0, not -1",
            ]
        );
    }

    // === errors and secrets ===

    #[test]
    fn errors_display_as_file_key_problem() {
        let error = ConfigError::new(
            "tollgate.toml",
            "upstreams[1].routes[0].path",
            "must start with \"/\"",
        );
        assert_eq!(
            error.to_string(),
            "tollgate.toml: upstreams[1].routes[0].path: must start with \"/\""
        );
        let errors = ConfigErrors(vec![
            error.clone(),
            ConfigError::new("tollgate.toml", "-", "x"),
        ]);
        assert_eq!(
            errors.to_string(),
            "tollgate.toml: upstreams[1].routes[0].path: must start with \"/\"\ntollgate.toml: -: x"
        );
        assert_eq!(ConfigErrors::from(error.clone()).errors(), [error]);
    }

    #[test]
    fn debug_output_hides_secrets() {
        let text = CONTRACT
            .replace("required = true ", "required = false")
            .replace(
                "sqlite://tollgate.db",
                "postgres://gate:db-password@db/tollgate",
            );
        let config = parse_env(&text, CONTRACT_ENV).expect("config");
        let debug = format!("{config:?}");
        for secret in ["admin-secret", "rc-key", "db-password"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("X-Api-Key"));
        assert!(debug.contains("<redacted>"));
    }
}
