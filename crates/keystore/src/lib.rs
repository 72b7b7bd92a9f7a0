//! # keystore
//!
//! API keys for the Tollgate gateway: issue, hash, verify, revoke, expire, and the per-key
//! limits other crates enforce.
//!
//! * A key ([`ApiKey`]) is `tg_` + 43 base62 characters: 256 random bits from the operating
//!   system. It is shown once; stores keep only its SHA-256 [`Digest`], and digests compare in
//!   constant time. Everywhere else (logs, metrics labels, the admin API, Redis keys) a key is
//!   named by its public [`KeyId`] (`key_` + 16 hex digits). `Debug` output never shows a key.
//! * A [`KeyRecord`] holds the key's name, creation, expiry and revocation times, allowed
//!   upstreams, rate limit, daily and monthly request quotas and spend budgets (integer
//!   micro-units of currency, see [`money`]). [`KeyInfo`] is its serializable view without the
//!   digest.
//! * [`KeyStore`] is the storage port: [`MemoryKeyStore`] (always), `SqliteKeyStore` (feature
//!   `sqlite`), `PostgresKeyStore` (feature `postgres`), and `SqlKeyStore` picking one of those
//!   two from a database URL. The SQL stores need the `api_keys` table from the workspace's
//!   `migrations/`.
//! * [`KeyCache`] verifies presented keys on the hot path: malformed keys are refused without a
//!   lookup, known and unknown keys are cached (bounded), a key revoked through the cache is
//!   refused at once, other nodes learn revocations through
//!   [`KeyCache::sync_revocations`], and while the store is down cached keys keep working and
//!   uncached ones are [`KeyError::Unavailable`] (503), never a misleading 401/403.
//!
//! ```
//! use std::sync::Arc;
//! use keystore::{KeyCache, KeyError, MemoryKeyStore, NewKey};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> keystore::Result<()> {
//! let keys = KeyCache::new(Arc::new(MemoryKeyStore::new()));
//!
//! let new = NewKey { daily_quota: Some(1000), ..NewKey::named("mobile app") };
//! let (record, key) = keys.create(new).await?;
//! println!("{} {}", record.id, key.expose_secret()); // show the key once
//!
//! let verified = keys.verify(key.expose_secret()).await?;
//! assert_eq!(verified.record.id, record.id);
//! assert_eq!(verified.record.daily_quota, Some(1000));
//! assert!(matches!(keys.verify("tg_not-a-key").await, Err(KeyError::Unknown)));
//!
//! assert!(keys.revoke(&record.id).await?);
//! assert!(matches!(
//!     keys.verify(key.expose_secret()).await,
//!     Err(KeyError::Revoked { .. })
//! ));
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod cache;
mod clock;
mod error;
mod key;
mod memory;
pub mod money;
mod record;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
mod store;

pub use cache::{KeyCache, KeyCacheBuilder, Verified};
pub use clock::{Clock, ManualClock, SystemClock, UnixMillis, duration_millis};
pub use error::{BoxError, KeyError, Result};
pub use key::{
    ApiKey, Digest, KEY_ENTROPY_BYTES, KEY_ID_PREFIX, KEY_LEN, KEY_PREFIX, KeyId, is_well_formed,
};
pub use memory::MemoryKeyStore;
pub use record::{
    KeyInfo, KeyRecord, KeyStatus, MAX_NAME_LEN, MAX_UPSTREAMS, NewKey, RateSpec, Revocation,
};
#[cfg(feature = "postgres")]
pub use sql::PostgresKeyStore;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sql::SqlKeyStore;
#[cfg(feature = "sqlite")]
pub use sql::SqliteKeyStore;
pub use store::KeyStore;
