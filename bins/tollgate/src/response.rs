//! The answer to a proxied request, built from a cache entry: the entry's status, headers and
//! body, and Tollgate's own headers (`X-Cache`, `Age`, `X-Upstream-Cost`, `X-Request-Id`).
//!
//! Depends only on actix-web and cache-core, so that `benches/respond.rs` measures it as is.

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue};
use bytes::BytesMut;
use cache_core::{CacheStatus, Entry, Served};

/// A request's id as the `X-Request-Id` value it is answered with: the client's own when it is
/// sane (only `[A-Za-z0-9-_.:]`, so it is also valid text), else 8 hex digits of this
/// process's random prefix and 12 of a counter.
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The client's own id (already checked to be short and plain ASCII).
    pub fn from_client(value: &HeaderValue) -> RequestId {
        RequestId(value.clone())
    }

    /// The header value.
    pub fn header(&self) -> HeaderValue {
        self.0.clone()
    }

    /// A new id: `prefix`, then the low 48 bits of `n`, in hex.
    pub fn generated(prefix: u32, n: u64) -> RequestId {
        /// The two hex digits of every byte, by byte: a byte at a time, not a digit.
        const PAIRS: [[u8; 2]; 256] = {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut pairs = [[0; 2]; 256];
            let mut b = 0;
            while b < 256 {
                pairs[b] = [HEX[b >> 4], HEX[b & 0xf]];
                b += 1;
            }
            pairs
        };
        let mut buf = [0u8; 20];
        // the prefix in the first 8 digits, the counter's low 48 bits in the last 12
        let counter = n.to_be_bytes();
        let bytes = prefix
            .to_be_bytes()
            .into_iter()
            .chain(counter[2..].iter().copied());
        for (digits, byte) in buf.chunks_exact_mut(2).zip(bytes) {
            digits.copy_from_slice(&PAIRS[usize::from(byte)]);
        }
        // Owned by its `Bytes`, so the clone that answers with it shares it (a copied slice
        // would allocate again on its first clone).
        RequestId(
            HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
                .unwrap_or(HeaderValue::from_static("0")),
        )
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;
    fn deref(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub static X_UPSTREAM_COST: HeaderName = HeaderName::from_static("x-upstream-cost");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// An entry's stored headers in actix-web's types, parsed on the entry's first answer and kept
/// in its [`cache_core::Prepared`] slot: a hit copies them without parsing again.
///
/// Kept for the entry's whole life, so kept small: an exact-size slice, and every value a
/// slice of one shared buffer. A value parsed on its own would be one allocation, and a second
/// one (its shared reference count) the first time a hit clones it.
struct ReplayHeaders(Box<[(HeaderName, HeaderValue)]>);

impl ReplayHeaders {
    /// The entry's headers that are valid HTTP (anything else is skipped, as it always was),
    /// but for those [`respond`] always sets itself (an upstream's would be replaced).
    fn of(entry: &Entry) -> ReplayHeaders {
        let mut values = BytesMut::with_capacity(entry.headers.iter().map(|(_, v)| v.len()).sum());
        for (_, v) in &entry.headers {
            values.extend_from_slice(v.as_bytes());
        }
        let values = values.freeze();
        let mut start = 0;
        let mut pairs = Vec::with_capacity(entry.headers.len());
        pairs.extend(entry.headers.iter().filter_map(|(k, v)| {
            let value = values.slice(start..start + v.len());
            start += v.len();
            let name = HeaderName::try_from(k.as_str()).ok()?;
            if [&X_CACHE, &X_UPSTREAM_COST, &X_REQUEST_ID].contains(&&name) {
                return None;
            }
            Some((name, HeaderValue::from_maybe_shared(value).ok()?))
        }));
        ReplayHeaders(pairs.into_boxed_slice())
    }
}

/// An estimate of the bytes [`ReplayHeaders`] keeps for `entry` (what the L1 counts beside
/// [`Entry::weight`], see `tests/entry_memory.rs`): its slot and list, and per header the
/// pair, the value's bytes, and a name outside the standard ones with its shared count.
pub fn replay_weight(entry: &Entry) -> usize {
    const SLOT: usize = 96;
    const PER_HEADER: usize = 128;
    SLOT + entry
        .headers
        .iter()
        .map(|(k, v)| PER_HEADER + k.len() + v.len())
        .sum::<usize>()
}

/// The answer to a proxied request: the entry's status, headers and body (shared, not copied),
/// and Tollgate's own headers.
pub fn respond(served: &Served, rid: &RequestId) -> HttpResponse {
    let entry = &served.entry;
    let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::BAD_GATEWAY);
    // For HEAD, actix sends the headers (Content-Length included) and drops the body.
    let mut resp = HttpResponse::with_body(status, entry.body.clone()).map_into_boxed_body();
    let owned;
    let replay = match entry.prepared.get_or_init(|| ReplayHeaders::of(entry)) {
        Some(r) => r,
        None => {
            owned = ReplayHeaders::of(entry);
            &owned
        }
    };
    // Straight into the map: the builder converts and checks every pair again.
    let headers = resp.headers_mut();
    for (k, v) in replay.0.iter() {
        headers.append(k.clone(), v.clone());
    }
    // Appended, not inserted (which also looks for a value to replace): the replayed
    // headers hold none of these three.
    headers.append(
        X_CACHE.clone(),
        HeaderValue::from_static(served.status.as_str()),
    );
    if matches!(served.status, CacheStatus::Hit | CacheStatus::Stale) {
        headers.insert(actix_web::http::header::AGE, age(served.age_secs));
    }
    // HIT and STALE answers cost the client nothing, even when a failed call stood behind them.
    let cost = match served.status {
        CacheStatus::Miss | CacheStatus::Bypass if served.fetched => entry.cost,
        _ => 0.0,
    };
    let cost = if cost == 0.0 {
        HeaderValue::from_static("0")
    } else {
        HeaderValue::from_str(&format_cost(cost)).unwrap_or(HeaderValue::from_static("0"))
    };
    headers.append(X_UPSTREAM_COST.clone(), cost);
    headers.append(X_REQUEST_ID.clone(), rid.header());
    resp
}

/// Ages below this are answered from static text, without formatting or allocating.
const STATIC_AGES: u64 = 10_000;

/// An `Age` value.
fn age(secs: u64) -> HeaderValue {
    /// The decimal text of every age below [`STATIC_AGES`], by age: slices of one leaked text.
    static AGES: std::sync::LazyLock<Box<[&'static str]>> = std::sync::LazyLock::new(|| {
        let text: &'static str =
            String::leak((0..STATIC_AGES).map(|n| n.to_string()).collect::<String>());
        let mut rest = text;
        (0..STATIC_AGES)
            .map(|n| {
                let (digits, tail) = rest.split_at(n.to_string().len());
                rest = tail;
                digits
            })
            .collect()
    });
    match usize::try_from(secs).ok().and_then(|i| AGES.get(i)) {
        Some(digits) => HeaderValue::from_static(digits),
        None => HeaderValue::from(secs),
    }
}

/// A cost as a header value: plain decimal, no exponent, no trailing zeros.
pub fn format_cost(cost: f64) -> String {
    if cost == 0.0 {
        return "0".into();
    }
    let s = format!("{cost:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)] // `benches/respond.rs` compiles this file, and not its tests
    use super::*;

    #[test]
    fn every_age_is_its_decimal_text() {
        for secs in (0..STATIC_AGES + 20).chain([u64::from(u32::MAX), u64::MAX]) {
            assert_eq!(age(secs).to_str().ok(), Some(secs.to_string().as_str()));
        }
    }

    #[test]
    fn generated_ids_survive_their_clones() {
        let id = RequestId::generated(0xdead_beef, 0x1234_5678_9abc);
        let header = id.header();
        drop(id);
        assert_eq!(header.to_str().ok(), Some("deadbeef123456789abc"));
    }
}
