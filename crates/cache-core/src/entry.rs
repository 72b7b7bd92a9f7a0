//! Cached responses and how fresh they are.

use std::any::Any;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use crate::clock::{UnixMillis, duration_millis};

/// How long a stored response may be used, per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CachePolicy {
    /// Time the response is fresh after it is stored.
    pub ttl: Duration,
    /// After the TTL, how long a stale copy may be served while one background refresh runs.
    pub stale_while_revalidate: Duration,
    /// After the TTL, how long a stale copy may be served when the upstream fails or times out.
    pub stale_if_error: Duration,
}

/// One cached upstream response with its freshness horizons.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The canonical request signature this response answers; compared on every lookup.
    pub signature: String,
    /// Upstream name the response came from (for purges and reports).
    pub upstream: String,
    /// Configured route path the request matched (for purges and reports).
    pub route: String,
    /// HTTP status.
    pub status: u16,
    /// Response headers worth replaying (see [`keep_response_header`]).
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Bytes,
    /// When the response was stored.
    pub stored_at: UnixMillis,
    /// Fresh until this instant.
    pub fresh_until: UnixMillis,
    /// Servable stale (with a background refresh) until this instant.
    pub stale_while_revalidate_until: UnixMillis,
    /// Servable stale when the upstream fails until this instant.
    pub stale_if_error_until: UnixMillis,
    /// What one upstream call for this response costs (currency units).
    pub cost: f64,
    /// Data an embedder derives from this entry once and reuses on every hit (e.g. the
    /// headers in its HTTP library's types). Not part of the entry's value: never stored,
    /// ignored by `==`. `Prepared::default()` when building an entry.
    pub prepared: Prepared,
}

/// A slot filled at most once with a value derived from its [`Entry`], of a type the embedder
/// chooses: an HTTP adapter keeps the entry's response headers there, already parsed into its
/// framework's types, so that a cache hit does not parse them again.
///
/// Cloning an entry clones the slot's contents (an `Arc`); two slots always compare equal.
#[derive(Clone, Default)]
pub struct Prepared(OnceLock<Arc<dyn Any + Send + Sync>>);

impl Prepared {
    /// The value of type `T` in the slot, computing it with `prepare` on first use. `None`
    /// only if the slot already holds a value of another type (two embedders sharing one
    /// entry); the caller then prepares its value itself each time.
    pub fn get_or_init<T: Any + Send + Sync>(&self, prepare: impl FnOnce() -> T) -> Option<&T> {
        self.0
            .get_or_init(|| Arc::new(prepare()))
            .as_ref()
            .downcast_ref::<T>()
    }
}

impl PartialEq for Prepared {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Prepared(..)"
        } else {
            "Prepared(empty)"
        })
    }
}

/// Where an entry stands at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within its TTL.
    Fresh,
    /// Past its TTL, inside the stale-while-revalidate window.
    StaleWhileRevalidate,
    /// Past its TTL and SWR window, but still usable if the upstream fails.
    StaleIfError,
    /// Past every horizon.
    Expired,
}

impl Entry {
    /// Builds an entry stored at `now` under `policy`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        signature: impl Into<String>,
        upstream: impl Into<String>,
        route: impl Into<String>,
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
        cost: f64,
        policy: &CachePolicy,
        now: UnixMillis,
    ) -> Self {
        let fresh_until = now.saturating_add(duration_millis(policy.ttl));
        Entry {
            signature: signature.into(),
            upstream: upstream.into(),
            route: route.into(),
            status,
            headers,
            body,
            stored_at: now,
            fresh_until,
            stale_while_revalidate_until: fresh_until
                .saturating_add(duration_millis(policy.stale_while_revalidate)),
            stale_if_error_until: fresh_until
                .saturating_add(duration_millis(policy.stale_if_error)),
            cost,
            prepared: Prepared::default(),
        }
    }

    /// Freshness at `now`.
    pub fn freshness(&self, now: UnixMillis) -> Freshness {
        if now < self.fresh_until {
            Freshness::Fresh
        } else if now < self.stale_while_revalidate_until {
            Freshness::StaleWhileRevalidate
        } else if now < self.stale_if_error_until {
            Freshness::StaleIfError
        } else {
            Freshness::Expired
        }
    }

    /// Whether this entry may be served when the upstream fails at `now`.
    pub fn usable_on_error(&self, now: UnixMillis) -> bool {
        now < self.stale_if_error_until || now < self.stale_while_revalidate_until
    }

    /// The last instant at which the entry is of any use; stores may drop it after this.
    pub fn expires_at(&self) -> UnixMillis {
        self.fresh_until
            .max(self.stale_while_revalidate_until)
            .max(self.stale_if_error_until)
    }

    /// Age in whole seconds at `now` (the `Age` header).
    pub fn age_secs(&self, now: UnixMillis) -> u64 {
        u64::try_from(now.saturating_sub(self.stored_at).max(0) / 1000).unwrap_or(0)
    }

    /// Approximate bytes this entry occupies in memory; what byte-bounded stores count.
    ///
    /// Measured (`tests/entry_weight.rs`): the entry, its strings and body, and a byte-bounded
    /// [`MemoryStore`](crate::MemoryStore)'s own record of it held 460 bytes beyond the
    /// lengths below, and 94 per header, counting what glibc's malloc adds to each
    /// allocation (20,000 entries); the constants leave room on top, for the tables growing
    /// in steps. What an embedder keeps in
    /// [`Entry::prepared`] is not counted here: a store counts it with
    /// [`MemoryStore::counting_prepared`](crate::MemoryStore::counting_prepared).
    pub fn weight(&self) -> usize {
        const OVERHEAD: usize = 540;
        const PER_HEADER: usize = 100;
        OVERHEAD
            + self.body.len()
            + self.signature.len()
            + self.upstream.len()
            + self.route.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + PER_HEADER)
                .sum::<usize>()
    }
}

/// Whether a response may be stored: a cacheable status (2xx), and neither `Set-Cookie` nor
/// `Cache-Control: no-store` / `private`.
pub fn is_cacheable<'a>(
    status: u16,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> bool {
    if !(200..300).contains(&status) {
        return false;
    }
    !is_private(headers)
}

/// Whether a response must never be shared between clients (`Set-Cookie`,
/// `Cache-Control: no-store` or `private`), whatever its status.
pub fn is_private<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("set-cookie") {
            return true;
        }
        if name.eq_ignore_ascii_case("cache-control") {
            let private = value.split(',').map(str::trim).any(|d| {
                d.eq_ignore_ascii_case("no-store")
                    || d.eq_ignore_ascii_case("private")
                    || d.get(..8)
                        .is_some_and(|p| p.eq_ignore_ascii_case("private="))
            });
            if private {
                return true;
            }
        }
    }
    false
}

/// Whether an upstream response header is worth storing and replaying. Hop-by-hop headers,
/// framing (`Content-Length`), per-response values (`Date`, `Age`, `Server`), cookies and the
/// upstream's own rate-limit headers are not.
pub fn keep_response_header(name: &str) -> bool {
    const DROP: &[&str] = &[
        "date",
        "age",
        "server",
        "set-cookie",
        "via",
        "alt-svc",
        "x-cache",
        "x-upstream-cost",
        "retry-after",
    ];
    // `get`, not indexing: a non-ASCII name may have no char boundary at `p.len()`.
    let lower_starts = |p: &str| {
        name.get(..p.len())
            .is_some_and(|n| n.eq_ignore_ascii_case(p))
    };
    !(is_hop_by_hop(name)
        || DROP.iter().any(|d| name.eq_ignore_ascii_case(d))
        || lower_starts("ratelimit-")
        || lower_starts("x-ratelimit-")
        || lower_starts("x-rate-limit-"))
}

/// Hop-by-hop and framing headers (RFC 9110 §7.6.1 plus `Content-Length`): never forwarded
/// in either direction.
pub fn is_hop_by_hop(name: &str) -> bool {
    const HOP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(now: i64) -> Entry {
        let policy = CachePolicy {
            ttl: Duration::from_secs(10),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(60),
        };
        Entry::new(
            "sig",
            "u",
            "/r",
            200,
            vec![],
            Bytes::from_static(b"x"),
            0.1,
            &policy,
            now,
        )
    }

    #[test]
    fn prepared_is_computed_once_shared_by_clones_and_ignored_by_eq() {
        let e = entry(0);
        let calls = std::cell::Cell::new(0);
        let prepare = || {
            calls.set(calls.get() + 1);
            e.headers.len() + 7
        };
        assert_eq!(e.prepared.get_or_init(prepare), Some(&7));
        assert_eq!(e.prepared.get_or_init(prepare), Some(&7));
        assert_eq!(calls.get(), 1);
        // A clone shares the prepared value; a fresh entry compares equal all the same.
        let copy = e.clone();
        assert_eq!(copy.prepared.get_or_init(|| 0usize), Some(&7));
        assert_eq!(entry(0), e);
        // Another type than the one stored: `None`, never a wrong value.
        assert_eq!(e.prepared.get_or_init(|| "other"), None);
        assert_eq!(format!("{:?}", entry(0).prepared), "Prepared(empty)");
    }

    #[test]
    fn freshness_moves_through_windows() {
        let e = entry(1_000);
        assert_eq!(e.freshness(1_000), Freshness::Fresh);
        assert_eq!(e.freshness(10_999), Freshness::Fresh);
        assert_eq!(e.freshness(11_000), Freshness::StaleWhileRevalidate);
        assert_eq!(e.freshness(15_999), Freshness::StaleWhileRevalidate);
        assert_eq!(e.freshness(16_000), Freshness::StaleIfError);
        assert!(e.usable_on_error(70_999));
        assert_eq!(e.freshness(71_000), Freshness::Expired);
        assert!(!e.usable_on_error(71_000));
        assert_eq!(e.expires_at(), 71_000);
        assert_eq!(e.age_secs(3_999), 2);
    }

    #[test]
    fn cacheability() {
        assert!(is_cacheable(200, [("content-type", "application/json")]));
        assert!(is_cacheable(204, []));
        assert!(!is_cacheable(404, []));
        assert!(!is_cacheable(500, []));
        assert!(!is_cacheable(200, [("Set-Cookie", "a=b")]));
        assert!(!is_cacheable(
            200,
            [("Cache-Control", "max-age=5, no-store")]
        ));
        assert!(!is_cacheable(200, [("cache-control", "Private")]));
        assert!(!is_cacheable(200, [("cache-control", "private=\"x\"")]));
        assert!(is_cacheable(200, [("cache-control", "public, max-age=60")]));
        // Not ASCII: no char boundary at byte 8, and no panic.
        assert!(is_cacheable(200, [("cache-control", "abcdefg\u{e9}")]));
    }

    #[test]
    fn header_filter() {
        assert!(keep_response_header("Content-Type"));
        assert!(keep_response_header("ETag"));
        assert!(!keep_response_header("Transfer-Encoding"));
        assert!(!keep_response_header("X-RateLimit-Remaining"));
        assert!(!keep_response_header("set-cookie"));
        assert!(keep_response_header("ratelimit\u{e9}x"));
    }
}
