//! Single-flight: concurrent misses for one key share one fetch.
//!
//! Waiters sleep on a `tokio::sync::watch` channel and are woken the moment the leader
//! publishes its result: no polling, so a waiter's latency is the fetch's plus a wake-up.
//!
//! Completions are counted per shard of keys ([`SingleFlight::epoch`]), so that a new leader
//! can tell whether a flight for its key may have finished since its own cache lookup.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::key::CacheKey;

type Flights<T> = Arc<Mutex<HashMap<CacheKey, Flight<T>>>>;

/// Shards of the completion counters.
const EPOCH_SHARDS: usize = 64;

/// Completions per shard of keys.
type Epochs = Arc<[AtomicU64; EPOCH_SHARDS]>;

fn epoch_of<'a>(epochs: &'a Epochs, key: &CacheKey) -> &'a AtomicU64 {
    &epochs[usize::from(key.as_bytes()[0]) % EPOCH_SHARDS]
}

struct Flight<T> {
    rx: watch::Receiver<Option<T>>,
    waiters: Arc<AtomicUsize>,
}

/// In-flight fetches by key. Cheap to clone; clones share the table.
pub struct SingleFlight<T> {
    flights: Flights<T>,
    epochs: Epochs,
    max_waiters: usize,
}

impl<T> Clone for SingleFlight<T> {
    fn clone(&self) -> Self {
        SingleFlight {
            flights: Arc::clone(&self.flights),
            epochs: Arc::clone(&self.epochs),
            max_waiters: self.max_waiters,
        }
    }
}

/// The outcome of [`SingleFlight::join`].
pub enum Join<T> {
    /// No fetch was running: the caller must run it and [`Leader::complete`] it.
    Leader(Leader<T>, Waiter<T>),
    /// A fetch is running: wait for its result.
    Waiter(Waiter<T>),
}

/// Too many callers are already waiting on this key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyWaiters;

/// The caller that runs the fetch. Dropping it without completing wakes waiters with `None`.
pub struct Leader<T> {
    key: CacheKey,
    tx: watch::Sender<Option<T>>,
    flights: Flights<T>,
    epochs: Epochs,
}

/// A caller waiting for a leader's result.
pub struct Waiter<T> {
    rx: watch::Receiver<Option<T>>,
    waiters: Arc<AtomicUsize>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    /// A table allowing at most `max_waiters` waiters per key.
    pub fn new(max_waiters: usize) -> Self {
        SingleFlight {
            flights: Arc::default(),
            epochs: Arc::new(std::array::from_fn(|_| AtomicU64::new(0))),
            max_waiters,
        }
    }

    /// A number that changes whenever a flight ends (completed or abandoned) for `key` or
    /// for another key of its shard. Read before a cache lookup (and before asking
    /// [`is_running`](Self::is_running)) and again after [`join`](Self::join) made the caller
    /// the leader of a new flight: unchanged, no flight for `key` has stored anything or ended
    /// since, and the lookup need not be repeated. (Changed only means one may have.)
    pub fn epoch(&self, key: &CacheKey) -> u64 {
        epoch_of(&self.epochs, key).load(Ordering::Acquire)
    }

    /// Joins the flight for `key`, starting one if none is running.
    pub fn join(&self, key: CacheKey) -> Result<Join<T>, TooManyWaiters> {
        let mut flights = lock(&self.flights);
        match flights.entry(key) {
            MapEntry::Occupied(f) => {
                let f = f.get();
                if f.waiters.load(Ordering::Relaxed) >= self.max_waiters {
                    return Err(TooManyWaiters);
                }
                f.waiters.fetch_add(1, Ordering::Relaxed);
                Ok(Join::Waiter(Waiter {
                    rx: f.rx.clone(),
                    waiters: Arc::clone(&f.waiters),
                }))
            }
            MapEntry::Vacant(v) => {
                let (tx, rx) = watch::channel(None);
                let waiters = Arc::new(AtomicUsize::new(1));
                v.insert(Flight {
                    rx: rx.clone(),
                    waiters: Arc::clone(&waiters),
                });
                Ok(Join::Leader(
                    Leader {
                        key,
                        tx,
                        flights: Arc::clone(&self.flights),
                        epochs: Arc::clone(&self.epochs),
                    },
                    Waiter { rx, waiters },
                ))
            }
        }
    }

    /// Starts a flight for `key` only if none is running (background refreshes).
    pub fn try_lead(&self, key: CacheKey) -> Option<Leader<T>> {
        let mut flights = lock(&self.flights);
        match flights.entry(key) {
            MapEntry::Occupied(_) => None,
            MapEntry::Vacant(v) => {
                let (tx, rx) = watch::channel(None);
                v.insert(Flight {
                    rx,
                    waiters: Arc::new(AtomicUsize::new(0)),
                });
                Some(Leader {
                    key,
                    tx,
                    flights: Arc::clone(&self.flights),
                    epochs: Arc::clone(&self.epochs),
                })
            }
        }
    }

    /// Whether a flight for `key` is running.
    pub fn is_running(&self, key: &CacheKey) -> bool {
        lock(&self.flights).contains_key(key)
    }

    /// Number of flights running.
    pub fn len(&self) -> usize {
        lock(&self.flights).len()
    }

    /// Whether no flight is running.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Leader<T> {
    /// Publishes the result and wakes every waiter. Later callers start a new flight.
    ///
    /// Whatever the fetch stored must be stored before this is called: the key's
    /// [`epoch`](SingleFlight::epoch) moves on before the flight leaves the table, so a
    /// caller that leads the next flight sees the new epoch and looks again.
    pub fn complete(self, value: T) {
        self.unregister();
        let _ = self.tx.send(Some(value));
    }

    /// Removes the flight from the table, its shard's epoch moved on first (also when the
    /// leader went away without a result: whoever leads next then looks in every tier).
    fn unregister(&self) {
        epoch_of(&self.epochs, &self.key).fetch_add(1, Ordering::AcqRel);
        let mut flights = lock(&self.flights);
        // Only remove our own flight (same channel), never a successor's.
        if flights
            .get(&self.key)
            .is_some_and(|f| f.rx.same_channel(&self.tx.subscribe()))
        {
            flights.remove(&self.key);
        }
    }
}

impl<T> Drop for Leader<T> {
    fn drop(&mut self) {
        if self.tx.borrow().is_none() {
            self.unregister();
        }
    }
}

impl<T: Clone> Waiter<T> {
    /// The leader's result; `None` if the leader went away without one.
    pub async fn wait(mut self) -> Option<T> {
        if let Ok(v) = self.rx.wait_for(Option::is_some).await {
            return v.clone();
        }
        // The leader went away; it may still have published just before.
        self.rx.borrow().clone()
    }
}

impl<T> Drop for Waiter<T> {
    fn drop(&mut self) {
        self.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_waiters() {
        let sf: SingleFlight<u32> = SingleFlight::new(100);
        let key = CacheKey::of("k");
        let Ok(Join::Leader(leader, own)) = sf.join(key) else {
            panic!("first caller must lead")
        };
        let mut waiters = Vec::new();
        for _ in 0..10 {
            match sf.join(key) {
                Ok(Join::Waiter(w)) => waiters.push(tokio::spawn(w.wait())),
                _ => panic!("later callers must wait"),
            }
        }
        assert!(sf.try_lead(key).is_none());
        leader.complete(7);
        assert_eq!(own.wait().await, Some(7));
        for w in waiters {
            assert_eq!(w.await.ok().flatten(), Some(7));
        }
        assert!(sf.is_empty());
    }

    #[tokio::test]
    async fn waiters_are_bounded() {
        let sf: SingleFlight<u32> = SingleFlight::new(2);
        let key = CacheKey::of("k");
        let _lead = sf.join(key);
        let _w = sf.join(key);
        assert!(matches!(sf.join(key), Err(TooManyWaiters)));
    }

    #[test]
    fn the_epoch_moves_when_a_flight_of_the_shard_ends() {
        let sf: SingleFlight<u32> = SingleFlight::new(10);
        let key = CacheKey::of("k");
        let other = (0..)
            .map(|i| CacheKey::of(&format!("other-{i}")))
            .find(|k| k.as_bytes()[0] % 64 != key.as_bytes()[0] % 64)
            .expect("a key of another shard");
        let e0 = sf.epoch(&key);
        let Ok(Join::Leader(leader, _own)) = sf.join(key) else {
            panic!("first caller must lead")
        };
        assert_eq!(sf.epoch(&key), e0, "starting a flight is not an end");
        leader.complete(1);
        let e1 = sf.epoch(&key);
        assert_ne!(e1, e0, "completed");
        // Another shard's flight leaves this key's epoch alone.
        let Some(leader) = sf.try_lead(other) else {
            panic!("no flight for the other key")
        };
        leader.complete(2);
        assert_eq!(sf.epoch(&key), e1);
        // An abandoned flight moves it too.
        let Some(leader) = sf.try_lead(key) else {
            panic!("no flight for the key")
        };
        drop(leader);
        assert_ne!(sf.epoch(&key), e1, "abandoned");
    }

    #[tokio::test]
    async fn dropped_leader_wakes_waiters_with_none() {
        let sf: SingleFlight<u32> = SingleFlight::new(10);
        let key = CacheKey::of("k");
        let Ok(Join::Leader(leader, _own)) = sf.join(key) else {
            panic!()
        };
        let Ok(Join::Waiter(w)) = sf.join(key) else {
            panic!()
        };
        let h = tokio::spawn(w.wait());
        drop(leader);
        assert_eq!(h.await.ok().flatten(), None);
        assert!(!sf.is_running(&key));
    }
}
