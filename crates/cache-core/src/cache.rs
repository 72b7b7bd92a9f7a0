//! The cache facade: lookups, coalesced fetches, stale serving.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::clock::{Clock, SystemClock};
use crate::coalesce::{Join, Leader, SingleFlight};
use crate::entry::{
    CachePolicy, Entry, Freshness, is_cacheable, is_hop_by_hop, is_private, keep_response_header,
};
use crate::key::{CacheKey, Signature};
use crate::store::CacheStore;

/// A response as the upstream gave it, before the cache decides what to keep.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// HTTP status.
    pub status: u16,
    /// Response headers (hop-by-hop headers may still be present; they are never stored).
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Bytes,
}

/// What the cache needs to know about a request.
#[derive(Debug, Clone)]
pub struct CacheRequest {
    /// Canonical signature (and key).
    pub signature: Signature,
    /// Upstream name.
    pub upstream: Arc<str>,
    /// Configured route path.
    pub route: Arc<str>,
    /// Freshness rules of the route.
    pub policy: CachePolicy,
    /// Cost of one upstream call.
    pub cost: f64,
    /// Skip the lookup and refresh the entry from the upstream (`Cache-Control: no-cache`).
    pub force_refresh: bool,
}

/// How a request was answered (the `X-Cache` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Fresh entry.
    Hit,
    /// Fetched from the upstream (by this request or by the flight it joined).
    Miss,
    /// Served past its TTL (stale-while-revalidate or stale-if-error).
    Stale,
    /// Not looked up and not stored.
    Bypass,
}

impl CacheStatus {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// A served response.
#[derive(Debug, Clone)]
pub struct Served {
    /// The response (stored or not).
    pub entry: Arc<Entry>,
    /// How it was served.
    pub status: CacheStatus,
    /// Seconds since it was stored.
    pub age_secs: u64,
    /// Whether this request itself made an upstream call (it pays `cost`): the fetching request
    /// of a miss, including one whose call failed and was answered from a stale entry; `false`
    /// for hits, stale-while-revalidate answers and waiters that joined another request's fetch.
    pub fetched: bool,
    /// Whether this request waited on another request's fetch.
    pub coalesced: bool,
    /// Whether the response was stored.
    pub stored: bool,
}

/// Why a request could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError<E> {
    /// The upstream fetch failed and nothing stale could stand in.
    #[error("upstream fetch failed: {0}")]
    Upstream(E),
    /// Too many requests were already waiting on this key's fetch.
    #[error("too many requests waiting on one fetch")]
    Overloaded,
    /// The fetch task ended without a result (it panicked or the runtime is shutting down).
    #[error("fetch aborted")]
    Aborted,
}

/// Counters kept by a [`Cache`].
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Signature mismatches under one key (MD5 collisions): answered as misses.
    pub collisions: AtomicU64,
    /// Requests that waited on another request's fetch (or on its lookup in the slower tiers,
    /// which found the entry stored).
    pub coalesced: AtomicU64,
    /// Background refreshes started by stale-while-revalidate.
    pub refreshes: AtomicU64,
    /// Store reads or writes that failed (the request went on without the store).
    pub store_errors: AtomicU64,
}

#[derive(Clone)]
enum Flight<E> {
    /// A response every waiter may share; `stored` tells whether it was cached.
    Shared(Arc<Entry>, bool),
    /// No fetch: the leader found this entry stored, fresh or stale within its revalidate
    /// window (a refresh then runs as a flight of its own).
    Stored(Arc<Entry>),
    /// A private response (Set-Cookie, `private`, `no-store`): only the leader's; waiters fetch
    /// for themselves.
    Private(Arc<Entry>),
    /// The fetch failed.
    Failed(E),
}

/// Cache facade over a [`CacheStore`]: freshness against a [`Clock`], signature checks,
/// single-flight fetches, stale-while-revalidate and stale-if-error. Cheap to clone.
///
/// `E` is the fetch error type, shared with every waiter of a failed fetch.
pub struct Cache<E> {
    inner: Arc<Inner<E>>,
}

struct Inner<E> {
    store: Arc<dyn CacheStore>,
    clock: Arc<dyn Clock>,
    flights: SingleFlight<Flight<E>>,
    stats: CacheStats,
}

impl<E> Clone for Cache<E> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<E: Clone + Send + Sync + 'static> Cache<E> {
    /// A cache over `store` on the system clock, at most 10,000 waiters per key.
    pub fn new(store: Arc<dyn CacheStore>) -> Self {
        Self::builder(store).build()
    }

    /// Starts a [`CacheBuilder`].
    pub fn builder(store: Arc<dyn CacheStore>) -> CacheBuilder {
        CacheBuilder {
            store,
            clock: Arc::new(SystemClock),
            max_waiters: 10_000,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn CacheStore> {
        &self.inner.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// Counters.
    pub fn stats(&self) -> &CacheStats {
        &self.inner.stats
    }

    /// Number of fetches in flight.
    pub fn in_flight(&self) -> usize {
        self.inner.flights.len()
    }

    /// The entry for `signature` if one is stored, whatever its freshness. A stored entry
    /// whose signature differs (an MD5 collision) is not returned and is counted.
    pub async fn lookup(&self, signature: &Signature) -> Option<Arc<Entry>> {
        self.lookup_in(signature, true).await
    }

    /// The stored entry (any tier) if it may stand in for a failed answer at `now`.
    async fn stale_stand_in(
        &self,
        signature: &Signature,
        now: crate::clock::UnixMillis,
    ) -> Option<Arc<Entry>> {
        self.lookup(signature)
            .await
            .filter(|e| e.usable_on_error(now))
    }

    /// [`Cache::lookup`], asking the store's slower tiers only when `all_tiers` (else only
    /// what [`CacheStore::peek`] holds: L1).
    async fn lookup_in(&self, signature: &Signature, all_tiers: bool) -> Option<Arc<Entry>> {
        let key = signature.key();
        let found = match self.inner.store.peek(&key) {
            Some(e) => Some(e),
            None if !all_tiers => None,
            None => match self.inner.store.get(&key).await {
                Ok(e) => e,
                Err(e) => {
                    self.inner
                        .stats
                        .store_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cache lookup failed; treated as a miss");
                    None
                }
            },
        };
        match found {
            Some(e) if e.signature == signature.as_str() => Some(e),
            Some(_) => {
                self.inner.stats.collisions.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %key, "cache key collision; treated as a miss");
                None
            }
            None => None,
        }
    }

    /// A fresh hit for `signature` straight from process memory, or `None`. No await, no
    /// allocation: the gateway's fast path.
    pub fn peek_fresh(&self, signature: &Signature) -> Option<Served> {
        let e = self.inner.store.peek(&signature.key())?;
        if e.signature != signature.as_str() {
            return None; // the full path counts the collision
        }
        let now = self.inner.clock.now_millis();
        (e.freshness(now) == Freshness::Fresh).then(|| Served {
            age_secs: e.age_secs(now),
            entry: e,
            status: CacheStatus::Hit,
            fetched: false,
            coalesced: false,
            stored: true,
        })
    }

    /// A stored entry as an answer now, without fetching: `Hit` while fresh, else `Stale`. For
    /// callers that must not go upstream (a client whose spend budget is used up).
    pub fn answer_from(&self, entry: Arc<Entry>) -> Served {
        fallback_served(entry, false, self.inner.clock.now_millis())
    }

    /// Serves `req`: a fresh entry, a stale one (starting one background refresh), or a
    /// coalesced upstream fetch through `fetch`, falling back to a stale entry if it fails.
    pub async fn serve<F, Fut>(&self, req: CacheRequest, fetch: F) -> Result<Served, ServeError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fetched, E>> + Send + 'static,
    {
        let now = self.inner.clock.now_millis();
        let key = req.signature.key();
        // L1 first: the answer for most requests, and a stale stand-in to keep at hand.
        let mut fallback = None;
        if let Some(e) = self.lookup_in(&req.signature, false).await {
            match (e.freshness(now), req.force_refresh) {
                (Freshness::Fresh, false) => return Ok(served(e, CacheStatus::Hit, now)),
                (Freshness::StaleWhileRevalidate, false) => {
                    self.refresh_in_background(&req, fetch);
                    return Ok(served(e, CacheStatus::Stale, now));
                }
                _ if e.usable_on_error(now) => fallback = Some(e),
                _ => {}
            }
        }

        // Then join this key's flight before asking L2: only its leader asks, once, however
        // many requests arrive for a cold key at once (a stampede used to send each request
        // that came before the leader's join to L2), and the leader's fetch starts right after
        // that one lookup. The others wait for the leader: for what L2 held or for the fetch.
        let (flight, fetched, fetch) = match self.inner.flights.join(key) {
            // Too many waiters on this key: a usable stale entry is still an answer.
            Err(_) => {
                if fallback.is_none() {
                    fallback = self.stale_stand_in(&req.signature, now).await;
                }
                return match fallback {
                    Some(stale) => Ok(fallback_served(stale, false, now)),
                    None => Err(ServeError::Overloaded),
                };
            }
            Ok(Join::Leader(leader, own)) => {
                // Both tiers: L1 again too, where a flight that ended since the lookup above
                // left its entry (L2 gets it only later, from the write-behind queue).
                if let Some(e) = self.lookup(&req.signature).await {
                    let now = self.inner.clock.now_millis();
                    match (e.freshness(now), req.force_refresh) {
                        (Freshness::Fresh, false) => {
                            leader.complete(Flight::Stored(Arc::clone(&e)));
                            return Ok(served(e, CacheStatus::Hit, now));
                        }
                        (Freshness::StaleWhileRevalidate, false) => {
                            // The waiters get the stale entry now too; the refresh is a
                            // flight of its own.
                            leader.complete(Flight::Stored(Arc::clone(&e)));
                            self.refresh_in_background(&req, fetch);
                            return Ok(served(e, CacheStatus::Stale, now));
                        }
                        _ if e.usable_on_error(now) => fallback = Some(e),
                        _ => {}
                    }
                }
                self.spawn_fetch(leader, req.clone(), fetch);
                (own.wait().await, true, None)
            }
            Ok(Join::Waiter(w)) => {
                self.inner.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                (w.wait().await, false, Some(fetch))
            }
        };
        let now = self.inner.clock.now_millis();
        let coalesced = !fetched;
        let failed = match &flight {
            Some(Flight::Failed(_)) => true,
            Some(Flight::Shared(e, _) | Flight::Private(e)) => e.status >= 500,
            Some(Flight::Stored(_)) | None => false,
        };
        // A waiter looked only in L1; the leader already asked every tier.
        if failed && fallback.is_none() && !fetched {
            fallback = self.stale_stand_in(&req.signature, now).await;
        }
        match flight {
            None => Err(ServeError::Aborted),
            Some(Flight::Stored(e)) => match fetch {
                // Asked to refresh (`no-cache`), but the flight it joined only found the entry
                // stored: serve again, now leading (or joining) a flight that fetches.
                Some(fetch) if req.force_refresh => Box::pin(self.serve(req, fetch)).await,
                _ => Ok(fallback_served(e, false, now)),
            },
            Some(Flight::Failed(e)) => match fallback {
                Some(stale) => Ok(fallback_served(stale, fetched, now)),
                None => Err(ServeError::Upstream(e)),
            },
            Some(Flight::Shared(entry, stored)) => match fallback {
                Some(stale) if entry.status >= 500 => Ok(fallback_served(stale, fetched, now)),
                _ => Ok(Served {
                    age_secs: 0,
                    entry,
                    status: CacheStatus::Miss,
                    fetched,
                    coalesced,
                    stored,
                }),
            },
            Some(Flight::Private(entry)) => match (fetch, fallback) {
                // An error page is an error, cookie or not (load balancers set one on every
                // response): stale-if-error applies as to any other.
                (_, Some(stale)) if entry.status >= 500 => Ok(fallback_served(stale, fetched, now)),
                (None, _) => Ok(Served {
                    age_secs: 0,
                    entry,
                    status: CacheStatus::Miss,
                    fetched,
                    coalesced,
                    stored: false,
                }),
                // The leader's response was private: a waiter fetches its own.
                (Some(fetch), fallback) => match (fetch().await, fallback) {
                    (Ok(f), Some(stale)) if f.status >= 500 => {
                        Ok(fallback_served(stale, true, now))
                    }
                    (Err(_), Some(stale)) => Ok(fallback_served(stale, true, now)),
                    (Ok(f), _) => Ok(Served {
                        age_secs: 0,
                        entry: Arc::new(to_entry(&req, f, false, now)),
                        status: CacheStatus::Miss,
                        fetched: true,
                        coalesced: false,
                        stored: false,
                    }),
                    (Err(e), None) => Err(ServeError::Upstream(e)),
                },
            },
        }
    }

    /// Fetches `req` from the upstream without looking up or storing (`X-Cache: BYPASS`).
    pub async fn bypass<F, Fut>(
        &self,
        req: &CacheRequest,
        fetch: F,
    ) -> Result<Served, ServeError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, E>>,
    {
        let f = fetch().await.map_err(ServeError::Upstream)?;
        let now = self.inner.clock.now_millis();
        Ok(Served {
            entry: Arc::new(to_entry(req, f, false, now)),
            status: CacheStatus::Bypass,
            age_secs: 0,
            fetched: true,
            coalesced: false,
            stored: false,
        })
    }

    /// Starts one background refresh for `req` unless a fetch for its key is already running.
    /// Returns whether one was started.
    pub fn refresh_in_background<F, Fut>(&self, req: &CacheRequest, fetch: F) -> bool
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fetched, E>> + Send + 'static,
    {
        match self.inner.flights.try_lead(req.signature.key()) {
            Some(leader) => {
                self.inner.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                self.spawn_fetch(leader, req.clone(), fetch);
                true
            }
            None => false,
        }
    }

    fn spawn_fetch<F, Fut>(&self, leader: Leader<Flight<E>>, req: CacheRequest, fetch: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fetched, E>> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        // The fetch runs in the span of the request that started it (its request id in logs).
        let mut call = Box::pin(tracing::Instrument::in_current_span(fetch()));
        // Polled once here, on the leader's own task, before it is spawned: the upstream call
        // is under way before this thread turns to the requests that arrived with this one (a
        // new task waits for them, and under a stampede those are hundreds). The spawned task
        // polls it again with its own waker, so no wake-up can be lost to the no-op one.
        let first = match call
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        {
            std::task::Poll::Ready(result) => Some(result),
            std::task::Poll::Pending => None,
        };
        let task = async move {
            let fetched = match first {
                Some(result) => result,
                None => call.await,
            };
            let result = match fetched {
                Err(e) => Flight::Failed(e),
                Ok(f) => {
                    let now = inner.clock.now_millis();
                    let private =
                        is_private(f.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                    let cacheable = is_cacheable(
                        f.status,
                        f.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                    );
                    let entry = Arc::new(to_entry(&req, f, cacheable, now));
                    if private {
                        Flight::Private(entry)
                    } else if cacheable {
                        let key = req.signature.key();
                        let stored = match inner.store.put(key, Arc::clone(&entry)).await {
                            Ok(()) => true,
                            Err(e) => {
                                inner.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(error = %e, %key, "cache store failed");
                                false
                            }
                        };
                        Flight::Shared(entry, stored)
                    } else {
                        Flight::Shared(entry, false)
                    }
                }
            };
            leader.complete(result);
        };
        tokio::spawn(tracing::Instrument::in_current_span(task));
    }

    /// The key a request would be stored under.
    pub fn key_of(req: &CacheRequest) -> CacheKey {
        req.signature.key()
    }
}

/// A stored entry standing in for a failed upstream call: `Stale` unless it is still fresh (a
/// failed forced refresh), and `fetched` when this request made the failed call.
fn fallback_served(e: Arc<Entry>, fetched: bool, now: i64) -> Served {
    let status = if e.freshness(now) == Freshness::Fresh {
        CacheStatus::Hit
    } else {
        CacheStatus::Stale
    };
    Served {
        fetched,
        ..served(e, status, now)
    }
}

fn served(e: Arc<Entry>, status: CacheStatus, now: i64) -> Served {
    Served {
        age_secs: e.age_secs(now),
        entry: e,
        status,
        fetched: false,
        coalesced: false,
        stored: true,
    }
}

/// Turns an upstream response into an entry. Stored entries keep only the headers worth
/// replaying; unstored ones lose only hop-by-hop and framing headers.
fn to_entry(req: &CacheRequest, f: Fetched, for_storage: bool, now: i64) -> Entry {
    let headers = f
        .headers
        .into_iter()
        .filter(|(k, _)| {
            if for_storage {
                keep_response_header(k)
            } else {
                !is_hop_by_hop(k)
            }
        })
        .collect();
    Entry::new(
        req.signature.as_str(),
        &*req.upstream,
        &*req.route,
        f.status,
        headers,
        f.body,
        req.cost,
        &req.policy,
        now,
    )
}

/// Builds a [`Cache`].
pub struct CacheBuilder {
    store: Arc<dyn CacheStore>,
    clock: Arc<dyn Clock>,
    max_waiters: usize,
}

impl CacheBuilder {
    /// Decides freshness against `clock`.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// At most `n` requests wait on one key's fetch; more get [`ServeError::Overloaded`].
    pub fn max_waiters(mut self, n: usize) -> Self {
        self.max_waiters = n.max(1);
        self
    }

    /// The cache.
    pub fn build<E: Clone + Send + Sync + 'static>(self) -> Cache<E> {
        Cache {
            inner: Arc::new(Inner {
                store: self.store,
                clock: self.clock,
                flights: SingleFlight::new(self.max_waiters),
                stats: CacheStats::default(),
            }),
        }
    }
}
