//! Request normalization: the rules that decide which requests share one cache entry.

use std::borrow::Cow;
use std::collections::BTreeMap;

use percent_encoding::{
    AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode, utf8_percent_encode,
};
use serde::Deserialize;

use crate::key::Signature;

/// Characters left unescaped in canonical components (RFC 3986 unreserved).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// Path segment: unreserved plus the sub-delims upstream APIs use in paths (not `/`: an
/// escaped `/` inside a segment stays escaped).
const SEGMENT: &AsciiSet = &COMPONENT
    .remove(b':')
    .remove(b'@')
    .remove(b'!')
    .remove(b'$')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=');

/// Per-route normalization rules, as written in the config's `normalize = { .. }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NormalizeConfig {
    /// Sort query parameters by name (repeated names keep their relative order). Default on.
    pub sort: bool,
    /// Query parameters removed before keying and forwarding (cache busters like `_`).
    pub drop: Vec<String>,
    /// Numeric query parameters rounded to this many decimals (coordinates: nearby share).
    pub round: BTreeMap<String, u32>,
    /// Key JSON request bodies by their canonical form (object keys sorted, no whitespace).
    /// Default on.
    pub canonical_json: bool,
}

impl Default for NormalizeConfig {
    fn default() -> Self {
        NormalizeConfig {
            sort: true,
            drop: Vec::new(),
            round: BTreeMap::new(),
            canonical_json: true,
        }
    }
}

/// A request reduced to its canonical parts: what is keyed and what is forwarded upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The signature (and key) of the request.
    pub signature: Signature,
    /// The normalized query string to forward (no leading `?`; empty when there is none).
    pub query: String,
}

/// Applies one route's [`NormalizeConfig`].
#[derive(Debug, Clone, Default)]
pub struct Normalizer {
    config: NormalizeConfig,
}

impl Normalizer {
    /// A normalizer for one route.
    pub fn new(config: NormalizeConfig) -> Self {
        Normalizer { config }
    }

    /// The rules in force.
    pub fn config(&self) -> &NormalizeConfig {
        &self.config
    }

    /// Normalizes a request: `path` is the upstream-relative path (as received, may be
    /// percent-encoded), `query` the raw query string without `?`, `body` the request body of a
    /// cacheable POST (or `None`).
    pub fn normalize(
        &self,
        upstream: &str,
        method: &str,
        path: &str,
        query: &str,
        body: Option<&[u8]>,
    ) -> Normalized {
        // Borrowed wherever nothing needs decoding: the hit path allocates little.
        let mut params: Vec<Param<'_>> = Vec::new();
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = match part.split_once('=') {
                Some((n, v)) => (decode(n), Some(decode(v))),
                None => (decode(part), None),
            };
            if self
                .config
                .drop
                .iter()
                .any(|d| d.as_bytes() == name.bytes())
            {
                continue;
            }
            let decimals = name.text().and_then(|n| self.config.round.get(n));
            let value = match (value, decimals) {
                (Some(v), Some(&decimals)) => Some(
                    v.text()
                        .and_then(|s| round_decimal(s, decimals))
                        .map_or(v, |r| Component::Decoded(Cow::Owned(r.into_bytes()))),
                ),
                (v, _) => v,
            };
            params.push((name, value));
        }
        if self.config.sort {
            params.sort_by(|a, b| a.0.bytes().cmp(b.0.bytes()));
        }
        let mut canonical_query = String::with_capacity(query.len());
        for (name, value) in &params {
            if !canonical_query.is_empty() {
                canonical_query.push('&');
            }
            name.encode_into(&mut canonical_query);
            if let Some(value) = value {
                canonical_query.push('=');
                value.encode_into(&mut canonical_query);
            }
        }
        let mut text = String::with_capacity(
            upstream.len()
                + method.len()
                + path.len()
                + canonical_query.len()
                + body.map_or(0, <[u8]>::len)
                + 16,
        );
        text.push_str("v1\n");
        let method: Cow<'_, str> = if method.bytes().any(|b| b.is_ascii_lowercase()) {
            Cow::Owned(method.to_ascii_uppercase())
        } else {
            Cow::Borrowed(method)
        };
        push_component(&mut text, &method);
        text.push('\n');
        push_component(&mut text, upstream);
        text.push('\n');
        push_canonical_path(&mut text, path);
        text.push('\n');
        text.push_str(&canonical_query);
        text.push('\n');
        match body {
            None => text.push('-'),
            Some(body) => {
                let canonical = if self.config.canonical_json {
                    canonical_json(body)
                } else {
                    None
                };
                match canonical {
                    Some(json) => {
                        text.push_str("j:");
                        text.push_str(&json);
                    }
                    None => match std::str::from_utf8(body) {
                        Ok(s) => {
                            text.push_str("t:");
                            text.push_str(s);
                        }
                        Err(_) => {
                            text.push_str("b:");
                            text.push_str(&hex::encode(body));
                        }
                    },
                }
            }
        }
        Normalized {
            signature: Signature::from_canonical(text),
            query: canonical_query,
        }
    }
}

/// A decoded query parameter: name, and value when there is an `=`.
type Param<'a> = (Component<'a>, Option<Component<'a>>);

/// A query name or value, decoded.
enum Component<'a> {
    /// Only unreserved characters: decoding leaves it as it is, and so does encoding (the
    /// common case, which then costs one scan and no copy).
    Plain(&'a str),
    /// Decoded to bytes, not text: a lossy decode would turn `%FF` and `%FE` alike into
    /// U+FFFD, and two different requests into one key.
    Decoded(Cow<'a, [u8]>),
}

impl Component<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Component::Plain(s) => s.as_bytes(),
            Component::Decoded(b) => b,
        }
    }

    /// The decoded value as text, when it is UTF-8.
    fn text(&self) -> Option<&str> {
        match self {
            Component::Plain(s) => Some(s),
            Component::Decoded(b) => std::str::from_utf8(b).ok(),
        }
    }

    /// Appends the canonical (percent-encoded) form.
    fn encode_into(&self, out: &mut String) {
        match self {
            Component::Plain(s) => out.push_str(s),
            Component::Decoded(b) => out.extend(percent_encode(b, COMPONENT)),
        }
    }
}

/// Whether `b` is RFC 3986 unreserved: what [`COMPONENT`] leaves unescaped.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn decode(s: &str) -> Component<'_> {
    if s.bytes().all(unreserved) {
        Component::Plain(s)
    } else if s.contains('+') {
        // `+` in a query is a space (form encoding); percent-decoding follows.
        Component::Decoded(Cow::Owned(
            percent_decode_str(&s.replace('+', " ")).collect(),
        ))
    } else {
        Component::Decoded(percent_decode_str(s).into())
    }
}

/// Appends `s` percent-encoded with [`COMPONENT`].
fn push_component(out: &mut String, s: &str) {
    if s.bytes().all(unreserved) {
        out.push_str(s);
    } else {
        out.extend(utf8_percent_encode(s, COMPONENT));
    }
}

/// Decodes then re-encodes a path so `%7E` and `~` key alike. Segment by segment and as bytes:
/// `/a%2Fb` is not `/a/b`, and `%FF` is not `%FE`.
fn push_canonical_path(out: &mut String, path: &str) {
    // Nothing to decode (no `%`) and nothing [`SEGMENT`] escapes: the path is its own form.
    if path
        .bytes()
        .all(|b| unreserved(b) || b"/:@!$'()*+,;=".contains(&b))
    {
        out.push_str(path);
        return;
    }
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let decoded: Cow<'_, [u8]> = percent_decode_str(segment).into();
        out.extend(percent_encode(&decoded, SEGMENT));
    }
}

/// Rounds a decimal number to `decimals` places; `None` when `value` is not a finite number.
pub fn round_decimal(value: &str, decimals: u32) -> Option<String> {
    let v: f64 = value.trim().parse().ok()?;
    if !v.is_finite() {
        return None;
    }
    let decimals = decimals.min(15);
    let factor = 10f64.powi(decimals as i32);
    let mut rounded = (v * factor).round() / factor;
    if rounded == 0.0 {
        rounded = 0.0; // no "-0.0"
    }
    Some(format!("{rounded:.prec$}", prec = decimals as usize))
}

/// The canonical form of a JSON document (object keys sorted, no insignificant whitespace);
/// `None` when `body` is not JSON.
pub fn canonical_json(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    // serde_json's default map is a BTreeMap: serializing sorts the keys at every depth.
    serde_json::to_string(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(cfg: NormalizeConfig) -> Normalizer {
        Normalizer::new(cfg)
    }

    #[test]
    fn sorts_and_drops() {
        let cfg = NormalizeConfig {
            drop: vec!["_".into()],
            ..Default::default()
        };
        let a = n(cfg.clone()).normalize("w", "GET", "/f", "b=2&a=1&_=123", None);
        let b = n(cfg).normalize("w", "get", "/f", "a=1&b=2", None);
        assert_eq!(a.signature, b.signature);
        assert_eq!(a.query, "a=1&b=2");
    }

    #[test]
    fn rounds_coordinates() {
        let cfg = NormalizeConfig {
            round: [("lat".to_string(), 1), ("lon".to_string(), 1)].into(),
            ..Default::default()
        };
        let a = n(cfg.clone()).normalize("w", "GET", "/f", "lat=30.2672&lon=-97.7431", None);
        let b = n(cfg.clone()).normalize("w", "GET", "/f", "lon=-97.71&lat=30.31", None);
        assert_eq!(a.signature, b.signature);
        assert_eq!(a.query, "lat=30.3&lon=-97.7");
        let c = n(cfg.clone()).normalize("w", "GET", "/f", "lat=30.36&lon=-97.7431", None);
        assert_ne!(a.signature, c.signature);
        // not a number: kept as is
        let d = n(cfg).normalize("w", "GET", "/f", "lat=north", None);
        assert_eq!(d.query, "lat=north");
    }

    #[test]
    fn round_edge_cases() {
        assert_eq!(round_decimal("-0.01", 1).as_deref(), Some("0.0"));
        assert_eq!(round_decimal("2", 2).as_deref(), Some("2.00"));
        assert_eq!(round_decimal("1e3", 0).as_deref(), Some("1000"));
        assert_eq!(round_decimal("NaN", 1), None);
        assert_eq!(round_decimal("inf", 1), None);
    }

    #[test]
    fn percent_forms_key_alike() {
        let cfg = NormalizeConfig::default();
        let a = n(cfg.clone()).normalize("u", "GET", "/a%7Eb", "q=hello%20world", None);
        let b = n(cfg).normalize("u", "GET", "/a~b", "q=hello+world", None);
        assert_eq!(a.signature, b.signature);
    }

    #[test]
    fn json_body_key_order_does_not_matter() {
        let cfg = NormalizeConfig::default();
        let a = n(cfg.clone()).normalize(
            "m",
            "POST",
            "/run",
            "",
            Some(br#"{"b":1,"a":{"y":2,"x":[1,2]}}"#),
        );
        let b = n(cfg.clone()).normalize(
            "m",
            "POST",
            "/run",
            "",
            Some(br#"{ "a": {"x":[1, 2], "y":2}, "b":1 }"#),
        );
        assert_eq!(a.signature, b.signature);
        let c = n(cfg.clone()).normalize(
            "m",
            "POST",
            "/run",
            "",
            Some(br#"{"a":{"x":[2,1],"y":2},"b":1}"#),
        );
        assert_ne!(a.signature, c.signature);
        let none = n(cfg.clone()).normalize("m", "POST", "/run", "", None);
        let empty = n(cfg).normalize("m", "POST", "/run", "", Some(b""));
        assert_ne!(none.signature, empty.signature);
    }

    #[test]
    fn components_cannot_bleed() {
        let cfg = NormalizeConfig::default();
        let a = n(cfg.clone()).normalize("u", "GET", "/a", "x=1%0Ab", None);
        let b = n(cfg).normalize("u", "GET", "/a\nx=1", "b", None);
        assert_ne!(a.signature, b.signature);
    }
}
