//! What is stored about a key, how a new one is described, and the admin API's view of it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;
use crate::error::{KeyError, Result};
use crate::key::{ApiKey, Digest, KeyId};
use crate::money::from_micros;

/// Longest accepted key name, in bytes.
pub const MAX_NAME_LEN: usize = 200;

/// Most upstreams a key may be restricted to.
pub const MAX_UPSTREAMS: usize = 256;

// === impl RateSpec ===

/// A rate: at most `count` requests per `per_secs` seconds.
///
/// Parses from and prints as `60/min`, `10/s`, `1000/h`, `5000/day` or `100/30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RateSpec {
    /// Requests allowed per period.
    pub count: u64,
    /// The period, in seconds.
    pub per_secs: u64,
}

impl RateSpec {
    /// `count` per `per_secs` seconds; [`KeyError::Invalid`] when either is zero or above
    /// `i64::MAX`.
    pub fn new(count: u64, per_secs: u64) -> Result<RateSpec> {
        let spec = RateSpec { count, per_secs };
        spec.validate()?;
        Ok(spec)
    }

    /// The period.
    pub fn period(&self) -> Duration {
        Duration::from_secs(self.per_secs)
    }

    fn validate(&self) -> Result<()> {
        if self.count == 0 || self.per_secs == 0 {
            return Err(KeyError::Invalid(format!(
                "rate limit {}/{}s: count and period must be positive",
                self.count, self.per_secs
            )));
        }
        check_i64("rate limit count", self.count)?;
        check_i64("rate limit period", self.per_secs)
    }
}

impl FromStr for RateSpec {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<RateSpec> {
        let invalid = || {
            KeyError::Invalid(format!(
                "rate {s:?}: expected COUNT/UNIT such as 60/min, 10/s, 1000/h, 5000/day or 100/30s"
            ))
        };
        let (count, per) = s.trim().split_once('/').ok_or_else(invalid)?;
        let count: u64 = count.trim().parse().map_err(|_| invalid())?;
        let per = per.trim();
        let unit_at = per
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(invalid)?;
        let (n, unit) = per.split_at(unit_at);
        let n: u64 = if n.is_empty() {
            1
        } else {
            n.parse().map_err(|_| invalid())?
        };
        let unit_secs: u64 = match unit {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            "d" | "day" => 86_400,
            _ => return Err(invalid()),
        };
        RateSpec::new(count, n.checked_mul(unit_secs).ok_or_else(invalid)?)
    }
}

impl fmt::Display for RateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per_secs {
            1 => write!(f, "{}/s", self.count),
            60 => write!(f, "{}/min", self.count),
            3600 => write!(f, "{}/h", self.count),
            86_400 => write!(f, "{}/day", self.count),
            n => write!(f, "{}/{n}s", self.count),
        }
    }
}

// === impl NewKey ===

/// What to issue a key with ([`KeyStore::create`](crate::KeyStore::create)).
///
/// ```
/// # use keystore::{NewKey, RateSpec};
/// let new = NewKey {
///     daily_quota: Some(1000),
///     rate_limit: Some("60/min".parse().unwrap()),
///     ..NewKey::named("mobile app")
/// };
/// # assert_eq!(new.rate_limit, Some(RateSpec { count: 60, per_secs: 60 }));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewKey {
    /// A human-readable name (1 to 200 bytes).
    pub name: String,
    /// When the key stops working; must be after the creation time.
    pub expires_at: Option<UnixMillis>,
    /// The upstreams the key may call; `None` allows all.
    pub allowed_upstreams: Option<Vec<String>>,
    /// The key's own rate limit.
    pub rate_limit: Option<RateSpec>,
    /// Requests per UTC day.
    pub daily_quota: Option<u64>,
    /// Requests per UTC month.
    pub monthly_quota: Option<u64>,
    /// Upstream cost per UTC day, in micro-units of currency (see [`crate::money`]).
    pub daily_budget_micros: Option<u64>,
    /// Upstream cost per UTC month, in micro-units of currency.
    pub monthly_budget_micros: Option<u64>,
}

impl NewKey {
    /// A key named `name` with no expiry, restriction or limit.
    pub fn named(name: impl Into<String>) -> NewKey {
        NewKey {
            name: name.into(),
            ..NewKey::default()
        }
    }

    /// Checks the definition for a key created at `now`.
    pub fn validate(&self, now: UnixMillis) -> Result<()> {
        if let Some(expires_at) = self.expires_at
            && expires_at <= now
        {
            return Err(KeyError::Invalid(format!(
                "expiry {expires_at} is not after the creation time {now}"
            )));
        }
        validate_limits(
            &self.name,
            self.allowed_upstreams.as_deref(),
            self.rate_limit.as_ref(),
            [
                ("daily quota", self.daily_quota),
                ("monthly quota", self.monthly_quota),
                ("daily budget", self.daily_budget_micros),
                ("monthly budget", self.monthly_budget_micros),
            ],
        )
    }
}

fn validate_limits(
    name: &str,
    upstreams: Option<&[String]>,
    rate: Option<&RateSpec>,
    amounts: [(&str, Option<u64>); 4],
) -> Result<()> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(KeyError::Invalid(format!(
            "name must be 1 to {MAX_NAME_LEN} bytes without control characters"
        )));
    }
    if let Some(upstreams) = upstreams {
        if upstreams.len() > MAX_UPSTREAMS {
            return Err(KeyError::Invalid(format!(
                "at most {MAX_UPSTREAMS} allowed upstreams"
            )));
        }
        if let Some(bad) = upstreams
            .iter()
            .find(|u| u.is_empty() || u.len() > MAX_NAME_LEN || u.chars().any(char::is_control))
        {
            return Err(KeyError::Invalid(format!(
                "allowed upstream {bad:?} is not an upstream name"
            )));
        }
    }
    if let Some(rate) = rate {
        rate.validate()?;
    }
    for (what, amount) in amounts {
        if let Some(amount) = amount {
            check_i64(what, amount)?;
        }
    }
    Ok(())
}

fn check_i64(what: &str, value: u64) -> Result<()> {
    if i64::try_from(value).is_err() {
        return Err(KeyError::Invalid(format!(
            "{what} {value} is above {}",
            i64::MAX
        )));
    }
    Ok(())
}

// === impl KeyRecord ===

/// Everything stored about a key. The key itself is not here: only its [`Digest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public id.
    pub id: KeyId,
    /// Human-readable name.
    pub name: String,
    /// SHA-256 of the key.
    pub digest: Digest,
    /// When the key was issued.
    pub created_at: UnixMillis,
    /// When the key stops working (refused from this instant on).
    pub expires_at: Option<UnixMillis>,
    /// When the key was revoked. A revoked key is refused whatever this time says.
    pub revoked_at: Option<UnixMillis>,
    /// The upstreams the key may call; `None` allows all.
    pub allowed_upstreams: Option<Vec<String>>,
    /// The key's own rate limit.
    pub rate_limit: Option<RateSpec>,
    /// Requests per UTC day.
    pub daily_quota: Option<u64>,
    /// Requests per UTC month.
    pub monthly_quota: Option<u64>,
    /// Upstream cost per UTC day, in micro-units of currency.
    pub daily_budget_micros: Option<u64>,
    /// Upstream cost per UTC month, in micro-units of currency.
    pub monthly_budget_micros: Option<u64>,
}

impl KeyRecord {
    /// A new key and its record for `new`, issued at `now`: a random [`KeyId`] and a random
    /// [`ApiKey`] from the operating system. [`KeyError::Invalid`] when `new` does not validate.
    pub fn issue(new: NewKey, now: UnixMillis) -> Result<(KeyRecord, ApiKey)> {
        new.validate(now)?;
        let key = ApiKey::generate()?;
        let record = KeyRecord {
            id: KeyId::generate(),
            name: new.name,
            digest: key.digest(),
            created_at: now,
            expires_at: new.expires_at,
            revoked_at: None,
            allowed_upstreams: new.allowed_upstreams,
            rate_limit: new.rate_limit,
            daily_quota: new.daily_quota,
            monthly_quota: new.monthly_quota,
            daily_budget_micros: new.daily_budget_micros,
            monthly_budget_micros: new.monthly_budget_micros,
        };
        Ok((record, key))
    }

    /// Checks that every value can be stored (stores call it on insert).
    pub fn validate(&self) -> Result<()> {
        validate_limits(
            &self.name,
            self.allowed_upstreams.as_deref(),
            self.rate_limit.as_ref(),
            [
                ("daily quota", self.daily_quota),
                ("monthly quota", self.monthly_quota),
                ("daily budget", self.daily_budget_micros),
                ("monthly budget", self.monthly_budget_micros),
            ],
        )
    }

    /// The key's state at `now`. Revocation wins over expiry; a key expires at `expires_at`
    /// exactly.
    pub fn status_at(&self, now: UnixMillis) -> KeyStatus {
        if self.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if self.is_expired_at(now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }

    /// Whether the key has expired at `now` (`now >= expires_at`).
    pub fn is_expired_at(&self, now: UnixMillis) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// `Ok` when the key may be used at `now`, else [`KeyError::Revoked`] or
    /// [`KeyError::Expired`].
    pub fn check(&self, now: UnixMillis) -> Result<()> {
        match self.status_at(now) {
            KeyStatus::Active => Ok(()),
            KeyStatus::Revoked => Err(KeyError::Revoked {
                id: self.id.clone(),
            }),
            KeyStatus::Expired => Err(KeyError::Expired {
                id: self.id.clone(),
            }),
        }
    }

    /// Whether the key may call `upstream`.
    pub fn allows_upstream(&self, upstream: &str) -> bool {
        self.allowed_upstreams
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|u| u == upstream))
    }

    /// The admin API's view of the key at `now` (no digest).
    pub fn info(&self, now: UnixMillis) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            status: self.status_at(now),
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            allowed_upstreams: self.allowed_upstreams.clone(),
            rate_limit: self.rate_limit,
            daily_quota: self.daily_quota,
            monthly_quota: self.monthly_quota,
            daily_budget: self.daily_budget_micros.map(from_micros),
            monthly_budget: self.monthly_budget_micros.map(from_micros),
        }
    }
}

/// A key's state at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// Usable.
    Active,
    /// Revoked.
    Revoked,
    /// Past its expiry time.
    Expired,
}

/// A key as the admin API and `keys list` show it: a [`KeyRecord`] without the digest, budgets
/// in currency units, timestamps in Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Public id.
    pub id: KeyId,
    /// Human-readable name.
    pub name: String,
    /// State when the view was made.
    pub status: KeyStatus,
    /// When the key was issued.
    pub created_at: UnixMillis,
    /// When the key stops working.
    pub expires_at: Option<UnixMillis>,
    /// When the key was revoked.
    pub revoked_at: Option<UnixMillis>,
    /// The upstreams the key may call; `null` allows all.
    pub allowed_upstreams: Option<Vec<String>>,
    /// The key's own rate limit.
    pub rate_limit: Option<RateSpec>,
    /// Requests per UTC day.
    pub daily_quota: Option<u64>,
    /// Requests per UTC month.
    pub monthly_quota: Option<u64>,
    /// Upstream cost per UTC day, in currency units.
    pub daily_budget: Option<f64>,
    /// Upstream cost per UTC month, in currency units.
    pub monthly_budget: Option<f64>,
}

/// A revoked key, as [`KeyStore::revoked_since`](crate::KeyStore::revoked_since) reports it
/// for other nodes' caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The key's public id.
    pub id: KeyId,
    /// The key's digest (what caches are keyed by).
    pub digest: Digest,
    /// When it was revoked.
    pub revoked_at: UnixMillis,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const NOW: UnixMillis = 1_800_000_000_000;

    #[test]
    fn rate_specs() {
        for (s, count, per) in [
            ("60/min", 60, 60),
            ("10/s", 10, 1),
            ("10/sec", 10, 1),
            ("1000/h", 1000, 3600),
            ("1000/hour", 1000, 3600),
            ("5000/day", 5000, 86_400),
            ("100/30s", 100, 30),
            ("5/10min", 5, 600),
            (" 7 / m ", 7, 60),
        ] {
            assert_eq!(
                s.parse::<RateSpec>().unwrap(),
                RateSpec {
                    count,
                    per_secs: per
                },
                "{s}"
            );
        }
        for bad in [
            "", "60", "60/", "/min", "0/min", "60/0s", "60/week", "-1/s", "x/s", "1/s/s",
        ] {
            assert!(bad.parse::<RateSpec>().is_err(), "{bad:?}");
        }
        for s in ["60/min", "10/s", "1000/h", "5000/day", "100/30s"] {
            assert_eq!(s.parse::<RateSpec>().unwrap().to_string(), s);
        }
        assert!(RateSpec::new(u64::MAX, 1).is_err());
        assert_eq!(
            RateSpec::new(1, 60).unwrap().period(),
            Duration::from_secs(60)
        );
    }

    fn record(expires_at: Option<UnixMillis>) -> KeyRecord {
        let new = NewKey {
            expires_at,
            ..NewKey::named("k")
        };
        KeyRecord::issue(new, NOW).unwrap().0
    }

    #[test]
    fn expiry_boundaries() {
        let r = record(Some(NOW + 1000));
        assert_eq!(r.status_at(NOW), KeyStatus::Active);
        assert_eq!(r.status_at(NOW + 999), KeyStatus::Active);
        assert_eq!(
            r.status_at(NOW + 1000),
            KeyStatus::Expired,
            "expires at the instant"
        );
        assert_eq!(r.status_at(NOW + 1001), KeyStatus::Expired);
        assert!(r.check(NOW + 999).is_ok());
        assert!(matches!(r.check(NOW + 1000), Err(KeyError::Expired { id }) if id == r.id));

        let forever = record(None);
        assert_eq!(forever.status_at(i64::MAX), KeyStatus::Active);

        // Revocation wins over expiry, and holds even if stamped in the (local) future.
        let mut revoked = record(Some(NOW + 1000));
        revoked.revoked_at = Some(NOW + 10_000);
        assert_eq!(revoked.status_at(NOW), KeyStatus::Revoked);
        assert_eq!(revoked.status_at(NOW + 5000), KeyStatus::Revoked);
        assert!(matches!(revoked.check(NOW), Err(KeyError::Revoked { .. })));
    }

    #[test]
    fn new_keys_are_validated() {
        let ok = NewKey::named("ok");
        assert!(ok.validate(NOW).is_ok());
        let bad = [
            NewKey::named(""),
            NewKey::named("   "),
            NewKey::named("x".repeat(201)),
            NewKey::named("a\nb"),
            NewKey {
                expires_at: Some(NOW),
                ..ok.clone()
            },
            NewKey {
                expires_at: Some(NOW - 1),
                ..ok.clone()
            },
            NewKey {
                rate_limit: Some(RateSpec {
                    count: 0,
                    per_secs: 60,
                }),
                ..ok.clone()
            },
            NewKey {
                daily_quota: Some(u64::MAX),
                ..ok.clone()
            },
            NewKey {
                monthly_budget_micros: Some(1 << 63),
                ..ok.clone()
            },
            NewKey {
                allowed_upstreams: Some(vec![String::new()]),
                ..ok.clone()
            },
        ];
        for new in bad {
            assert!(
                matches!(
                    KeyRecord::issue(new.clone(), NOW),
                    Err(KeyError::Invalid(_))
                ),
                "{new:?}"
            );
        }
        let zero_quota = NewKey {
            daily_quota: Some(0),
            expires_at: Some(NOW + 1),
            ..ok
        };
        assert!(zero_quota.validate(NOW).is_ok());
    }

    #[test]
    fn issued_records_match_their_key() {
        let new = NewKey {
            allowed_upstreams: Some(vec!["rentcast".into()]),
            daily_budget_micros: Some(2_500_000),
            ..NewKey::named("k")
        };
        let (record, key) = KeyRecord::issue(new, NOW).unwrap();
        assert_eq!(record.digest, key.digest());
        assert_eq!(record.created_at, NOW);
        assert!(record.allows_upstream("rentcast"));
        assert!(!record.allows_upstream("weather"));
        assert!(record.validate().is_ok());

        let info = record.info(NOW);
        assert_eq!(info.daily_budget, Some(2.5));
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["status"], "active");
        assert_eq!(json["id"], record.id.as_str());
        assert!(json.get("digest").is_none());
        let text = json.to_string();
        assert!(!text.contains(&record.digest.to_hex()));
        assert!(!text.contains(&key.expose_secret()[3..]));
        assert_eq!(serde_json::from_value::<KeyInfo>(json).unwrap(), info);
        assert!(record_without_restriction().allows_upstream("anything"));
    }

    fn record_without_restriction() -> KeyRecord {
        record(None)
    }
}
