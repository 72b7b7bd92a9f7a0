//! The normalized form of recent GET requests, so that a repeated request skips normalizing
//! its path and query and hashing its key: about a tenth of the instructions of a hit.
//!
//! Normalizing is a pure function of the route (its normalizer), the upstream's name, the
//! method, the path, the query and the body. A memo is only asked for a GET (no body), a route
//! belongs to one upstream (so the route, compared by address, stands for its upstream too),
//! and a slot is only used when the route, path and query are the request's, compared in full;
//! so what it gives is always what normalizing would give. The hash only picks the slot.
//!
//! One memo per worker thread (see `gateway.rs`), so no lock and no shared cache line.
//! Bounded: a fixed number of slots, direct-mapped (a request takes its slot from whatever was
//! there), and targets longer than [`MAX_TARGET`] bytes are not remembered.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use cache_core::Normalized;

/// The longest path + query a memo remembers, in bytes. A slot holds the target about three
/// times (the target, the signature, the canonical query), so a slot stays under ~1 KiB.
pub const MAX_TARGET: usize = 256;

/// Recent requests' normalized forms, for one thread. `R` is the route type: a slot holds its
/// route, so the route's address cannot be reused by another while it is remembered. A route
/// must belong to one upstream.
pub struct KeyMemo<R> {
    hasher: foldhash::fast::RandomState,
    slots: Box<[Option<Slot<R>>]>,
}

struct Slot<R> {
    route: Arc<R>,
    /// The path, then the query.
    target: Box<str>,
    path_len: usize,
    normalized: Normalized,
}

impl<R> Slot<R> {
    fn is_for(&self, route: &Arc<R>, path: &str, query: &str) -> bool {
        Arc::ptr_eq(&self.route, route)
            && self.path_len == path.len()
            && self.target.len() == path.len() + query.len()
            && self.target.as_bytes()[..self.path_len] == *path.as_bytes()
            && self.target.as_bytes()[self.path_len..] == *query.as_bytes()
    }
}

impl<R> KeyMemo<R> {
    /// A memo of `slots` slots (rounded up to a power of two, at least one). Each slot is a
    /// few dozen bytes until used.
    pub fn new(slots: usize) -> KeyMemo<R> {
        let n = slots.max(1).next_power_of_two();
        KeyMemo {
            hasher: foldhash::fast::RandomState::default(),
            slots: (0..n).map(|_| None).collect(),
        }
    }

    /// Whether a GET for `path` and `query` would be remembered (not when it is too long).
    pub fn remembers(path: &str, query: &str) -> bool {
        path.len() + query.len() <= MAX_TARGET
    }

    /// The normalized form of a GET for `path` and `query` on `route`: remembered, else made
    /// by `normalize` and remembered in place of its slot's last one. `normalize` must be
    /// `route`'s normalizer applied to exactly these inputs and the name of the one upstream
    /// `route` belongs to.
    pub fn get_or_insert(
        &mut self,
        route: &Arc<R>,
        path: &str,
        query: &str,
        normalize: impl FnOnce() -> Normalized,
    ) -> &Normalized {
        let mut h = self.hasher.build_hasher();
        h.write_usize(Arc::as_ptr(route) as *const () as usize);
        h.write(path.as_bytes());
        h.write_u8(0xff);
        h.write(query.as_bytes());
        let i = (h.finish() as usize) & (self.slots.len() - 1);
        let slot = &mut self.slots[i];
        if !slot.as_ref().is_some_and(|s| s.is_for(route, path, query)) {
            *slot = None;
        }
        &slot
            .get_or_insert_with(|| Slot {
                route: Arc::clone(route),
                target: [path, query].concat().into_boxed_str(),
                path_len: path.len(),
                normalized: normalize(),
            })
            .normalized
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use cache_core::{NormalizeConfig, Normalizer};

    use super::*;

    fn normalizer(drop: &[&str]) -> Normalizer {
        Normalizer::new(NormalizeConfig {
            drop: drop.iter().map(|s| s.to_string()).collect(),
            ..NormalizeConfig::default()
        })
    }

    #[test]
    fn a_repeated_request_is_normalized_once() {
        let route = Arc::new(normalizer(&[]));
        let mut memo = KeyMemo::new(64);
        let calls = Cell::new(0);
        for _ in 0..3 {
            let n = memo.get_or_insert(&route, "/a", "x=1", || {
                calls.set(calls.get() + 1);
                route.normalize("up", "GET", "/a", "x=1", None)
            });
            assert_eq!(n, &route.normalize("up", "GET", "/a", "x=1", None));
        }
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn every_input_tells_requests_apart() {
        let a = Arc::new(normalizer(&[]));
        let b = Arc::new(normalizer(&["x"]));
        // The same rules on a route of another upstream: a route of its own.
        let c = Arc::new(normalizer(&[]));
        // (route, upstream, path, query): each differs from the first in one input, including
        // a path/query split of the same bytes.
        let cases: [(&Arc<Normalizer>, &str, &str, &str); 6] = [
            (&a, "up", "/a", "x=1"),
            (&b, "up", "/a", "x=1"),
            (&c, "other", "/a", "x=1"),
            (&a, "up", "/b", "x=1"),
            (&a, "up", "/a", "x=2"),
            (&a, "up", "/ax", "=1"),
        ];
        // One slot: every request lands on the same slot, so only the comparison decides.
        let mut memo = KeyMemo::new(1);
        for round in 0..2 {
            for (route, up, path, query) in cases {
                let expected = route.normalize(up, "GET", path, query, None);
                let got = memo.get_or_insert(route, path, query, || {
                    route.normalize(up, "GET", path, query, None)
                });
                assert_eq!(got, &expected, "round {round}: {up} {path} {query}");
            }
        }
    }

    #[test]
    fn many_requests_through_few_slots_each_get_their_own_form() {
        let route = Arc::new(normalizer(&["utm_source"]));
        let mut memo = KeyMemo::new(16);
        let calls = Cell::new(0);
        // 200 distinct requests, each asked for 3 times in a scattered order.
        for i in 0..600u64 {
            let k = (i * 7919) % 200;
            let path = format!("/items/{}", k % 13);
            let query = format!("id={k}&utm_source=x{i}");
            let expected = route.normalize("up", "GET", &path, &query, None);
            let got = memo.get_or_insert(&route, &path, &query, || {
                calls.set(calls.get() + 1);
                route.normalize("up", "GET", &path, &query, None)
            });
            assert_eq!(got, &expected, "{path}?{query}");
        }
        // 16 slots for 600 distinct targets (utm_source varies): each was normalized.
        assert_eq!(calls.get(), 600);
    }

    #[test]
    fn slots_are_a_power_of_two_and_long_targets_are_not_remembered() {
        assert_eq!(KeyMemo::<()>::new(0).slots.len(), 1);
        assert_eq!(KeyMemo::<()>::new(1000).slots.len(), 1024);
        let long = "q".repeat(MAX_TARGET);
        assert!(KeyMemo::<()>::remembers("/", &long[1..]));
        assert!(!KeyMemo::<()>::remembers("/", &long));
    }
}
