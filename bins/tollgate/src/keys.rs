//! API keys as the CLI and the admin API manage them: one definition of a new key, shared by
//! `tollgate keys create` and `POST /admin/keys`.

use std::str::FromStr;
use std::sync::Arc;

use keystore::{ApiKey, KeyInfo, KeyRecord, KeyStore, NewKey, RateSpec, SqlKeyStore, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::config::parse_duration;

/// The options of a new key (`keys create` flags, `POST /admin/keys` body).
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A name for the key (who or what uses it).
    #[arg(long)]
    pub name: String,
    /// Requests per UTC day.
    #[arg(long)]
    #[serde(default)]
    pub daily_limit: Option<u64>,
    /// Requests per UTC month.
    #[arg(long)]
    #[serde(default)]
    pub monthly_limit: Option<u64>,
    /// Rate limit, e.g. 60/min or 10/s.
    #[arg(long)]
    #[serde(default)]
    pub rate_limit: Option<String>,
    /// Upstreams the key may call (comma-separated); all when absent.
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub upstreams: Option<Vec<String>>,
    /// Lifetime, e.g. 30d or 12h.
    #[arg(long)]
    #[serde(default)]
    pub expires_in: Option<String>,
    /// Upstream spend per UTC day, in currency units (cache hits cost nothing).
    #[arg(long)]
    #[serde(default)]
    pub daily_budget: Option<f64>,
    /// Upstream spend per UTC month, in currency units.
    #[arg(long)]
    #[serde(default)]
    pub monthly_budget: Option<f64>,
}

impl CreateKey {
    /// The key definition at `now`, or what is wrong with the options.
    pub fn to_new_key(&self, now: UnixMillis) -> Result<NewKey, String> {
        let rate_limit = match &self.rate_limit {
            Some(r) => Some(RateSpec::from_str(r).map_err(|e| format!("rate_limit: {e}"))?),
            None => None,
        };
        let expires_at = match &self.expires_in {
            Some(d) => {
                let d = parse_duration(d).map_err(|e| format!("expires_in: {e}"))?;
                let ms = i64::try_from(d.as_millis()).map_err(|_| "expires_in: too long")?;
                Some(now.saturating_add(ms))
            }
            None => None,
        };
        let budget = |name: &str, v: Option<f64>| -> Result<Option<u64>, String> {
            v.map(|v| keystore::money::to_micros(v).map_err(|e| format!("{name}: {e}")))
                .transpose()
        };
        let new = NewKey {
            name: self.name.clone(),
            expires_at,
            allowed_upstreams: self.upstreams.clone(),
            rate_limit,
            daily_quota: self.daily_limit,
            monthly_quota: self.monthly_limit,
            daily_budget_micros: budget("daily_budget", self.daily_budget)?,
            monthly_budget_micros: budget("monthly_budget", self.monthly_budget)?,
        };
        new.validate(now).map_err(|e| e.to_string())?;
        Ok(new)
    }
}

/// What `keys create --json` prints and `POST /admin/keys` answers: the key, shown once.
#[derive(Debug, Serialize)]
pub struct Created {
    pub key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

impl Created {
    pub fn new(record: &KeyRecord, key: &ApiKey, now: UnixMillis) -> Self {
        Created {
            key: key.expose_secret().to_string(),
            info: record.info(now),
        }
    }
}

/// The key store on the configured database.
pub fn open_store(database_url: &str, pool_size: usize) -> anyhow::Result<Arc<dyn KeyStore>> {
    let store = SqlKeyStore::connect(database_url, pool_size)
        .map_err(|e| anyhow::anyhow!("opening the key store: {e}"))?;
    Ok(Arc::new(store))
}

/// Now, in the key store's unit.
pub fn now_millis() -> UnixMillis {
    use keystore::Clock as _;
    keystore::SystemClock.now_millis()
}
