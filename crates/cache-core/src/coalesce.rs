//! Single-flight: concurrent misses for one key share one fetch.
//!
//! Waiters sleep on a `tokio::sync::watch` channel and are woken the moment the leader
//! publishes its result: no polling, so a waiter's latency is the fetch's plus a wake-up.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::key::CacheKey;

type Flights<T> = Arc<Mutex<HashMap<CacheKey, Flight<T>>>>;

struct Flight<T> {
    rx: watch::Receiver<Option<T>>,
    waiters: Arc<AtomicUsize>,
}

/// In-flight fetches by key. Cheap to clone; clones share the table.
pub struct SingleFlight<T> {
    flights: Flights<T>,
    max_waiters: usize,
}

impl<T> Clone for SingleFlight<T> {
    fn clone(&self) -> Self {
        SingleFlight {
            flights: Arc::clone(&self.flights),
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
            max_waiters,
        }
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
    /// Whatever the fetch stored must be stored before this is called: a caller that leads
    /// the next flight looks in the cache after joining, and must find it.
    pub fn complete(self, value: T) {
        self.unregister();
        let _ = self.tx.send(Some(value));
    }

    /// Removes the flight from the table.
    fn unregister(&self) {
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
