//! # cache-core
//!
//! The response cache behind the Tollgate gateway, usable on its own by any Rust service that
//! calls expensive HTTP APIs:
//!
//! * [`Normalizer`] turns a request into a canonical [`Signature`] and its MD5 [`CacheKey`]
//!   (sorted / dropped / rounded query parameters, canonical JSON bodies);
//! * [`CacheStore`] is the storage port: [`MemoryStore`] (in-process, bounded by bytes),
//!   `SqliteStore` (feature `sqlite`), `PostgresStore` (feature `postgres`), and
//!   [`TieredStore`] (memory L1 in front of an L2);
//! * [`Cache`] decides freshness against a [`Clock`], coalesces concurrent misses into one
//!   fetch ([`SingleFlight`]), serves stale while one background refresh runs, and serves stale
//!   when the upstream fails. A stored entry's signature is compared on every lookup, so an MD5
//!   collision is a miss, never a wrong body.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//! use cache_core::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let cache: Cache<String> = Cache::new(Arc::new(MemoryStore::new(64 * 1024 * 1024)));
//! let normalizer = Normalizer::new(NormalizeConfig::default());
//! let calls = Arc::new(AtomicUsize::new(0));
//!
//! for query in ["city=Austin&state=TX", "state=TX&city=Austin"] {
//!     let n = normalizer.normalize("rentcast", "GET", "/properties", query, None);
//!     let req = CacheRequest {
//!         signature: n.signature,
//!         upstream: "rentcast".into(),
//!         route: "/properties".into(),
//!         policy: CachePolicy { ttl: Duration::from_secs(60), ..Default::default() },
//!         cost: 0.20,
//!         force_refresh: false,
//!     };
//!     let calls = Arc::clone(&calls);
//!     let served = cache
//!         .serve(req, move || async move {
//!             calls.fetch_add(1, Ordering::SeqCst);
//!             Ok(Fetched { status: 200, headers: vec![], body: "[]".into() })
//!         })
//!         .await
//!         .unwrap();
//!     println!("{}", served.status.as_str()); // MISS, then HIT
//! }
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # }
//! ```
#![forbid(unsafe_code)]

mod cache;
mod clock;
mod coalesce;
mod entry;
mod error;
mod filter;
mod key;
mod memory;
mod normalize;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
mod store;
mod tiered;

pub use cache::{
    Cache, CacheBuilder, CacheRequest, CacheStats, CacheStatus, Fetched, ServeError, Served,
};
pub use clock::{Clock, ManualClock, SystemClock, UnixMillis, duration_millis};
pub use coalesce::{Join, Leader, SingleFlight, TooManyWaiters, Waiter};
pub use entry::{
    CachePolicy, Entry, Freshness, Prepared, is_cacheable, is_hop_by_hop, is_private,
    keep_response_header,
};
pub use error::{CacheError, Result};
pub use key::{CacheKey, Signature};
pub use memory::{MemoryStore, PreparedWeight};
pub use normalize::{NormalizeConfig, Normalized, Normalizer, canonical_json, round_decimal};
#[cfg(feature = "postgres")]
pub use sql::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sql::SqliteStore;
pub use store::{CacheStore, PurgeFilter, StoreUsage};
pub use tiered::{DEFAULT_WRITE_LINGER, TierStats, TieredStore};
