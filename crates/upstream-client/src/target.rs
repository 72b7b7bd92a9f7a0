//! Joining the upstream's base URL with a client's path and query.

use bytes::Bytes;
use http::uri::{self, Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use url::{Position, Url};

use crate::error::{Result, UpstreamError};

/// What `url` percent-encodes in a path it is given through `Url::set_path` (its `PATH` set;
/// non-ASCII is always encoded). `%` is not: already-encoded input passes through.
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'#')
    .add(b'?')
    .add(b'{')
    .add(b'}');

/// What `url` percent-encodes in an http(s) query given through `Url::set_query` (its
/// `SPECIAL_QUERY` set; non-ASCII is always encoded).
const QUERY: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'\'');

/// The characters `url` drops wherever they appear in a path or a query.
const TAB_OR_NEWLINE: [char; 3] = ['\t', '\n', '\r'];

/// A validated base URL, split into the parts requests are built from.
#[derive(Debug, Clone)]
pub(crate) struct Base {
    url: Url,
    /// The base path without a trailing `/` (`""` for the root).
    prefix: String,
    /// The base URL's own query (e.g. an API key in the query string), if any.
    query: Option<String>,
    /// The scheme and `host[:port]` of request targets (no user info: that is sent as
    /// `Authorization`, see `headers::basic_auth`).
    scheme: Scheme,
    authority: Authority,
    /// For an `http` base, the `Host` header of every request (`host[:port]`, as hyper-util
    /// would build it per request). `None` for `https`: ALPN may pick HTTP/2 there, which
    /// carries the authority in `:authority`, and a `Host` set here would be sent as well.
    host: Option<HeaderValue>,
}

impl Base {
    pub(crate) fn new(url: &Url) -> Result<Self> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(UpstreamError::config(format!(
                "base_url scheme must be http or https, not {:?}",
                url.scheme()
            )));
        }
        if url.cannot_be_a_base() || url.host().is_none() {
            return Err(UpstreamError::config("base_url must have a host"));
        }
        if url.fragment().is_some() {
            return Err(UpstreamError::config("base_url must not have a #fragment"));
        }
        let scheme = match url.scheme() {
            "https" => Scheme::HTTPS,
            _ => Scheme::HTTP,
        };
        let host = url.host_str().unwrap_or_default();
        let authority = match url.port() {
            Some(port) => Authority::try_from(format!("{host}:{port}")),
            None => Authority::try_from(host),
        }
        .map_err(|_| UpstreamError::config("base_url host is not a valid HTTP authority"))?;
        // The pool speaks HTTP/2 only when TLS negotiates it (see `transport::pool`), so a
        // plain-HTTP connection is always HTTP/1, where hyper-util keeps a `Host` it is given.
        let host = (scheme == Scheme::HTTP)
            .then(|| HeaderValue::from_str(authority.as_str()).ok())
            .flatten();
        let mut url = url.clone();
        let prefix = url.path().trim_end_matches('/').to_owned();
        let query = url.query().filter(|q| !q.is_empty()).map(str::to_owned);
        url.set_query(None);
        Ok(Self {
            url,
            prefix,
            query,
            scheme,
            authority,
            host,
        })
    }

    /// The request target for `path` and `query`: [`join`](Self::join) as an HTTP URI,
    /// without the base URL's user info.
    ///
    /// Built directly, without a `Url`, to the same bytes `join` gives (the tests compare
    /// both): a path with a tab or a newline, which `url` drops before it looks for `.`/`..`
    /// segments, still goes through `join`.
    pub(crate) fn target(&self, path: &str, query: &str) -> Result<Uri> {
        let path_and_query = if path.contains(TAB_OR_NEWLINE) {
            let url = self.join(path, query)?;
            PathAndQuery::try_from(&url[Position::BeforePath..Position::AfterQuery])
        } else {
            check_path(path)?;
            PathAndQuery::from_maybe_shared(Bytes::from(self.path_and_query(path, query)))
        }
        .map_err(|_| UpstreamError::invalid("path or query is not a valid request target"))?;
        let mut parts = uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts)
            .map_err(|_| UpstreamError::invalid("path or query is not a valid request target"))
    }

    /// The `Host` header to send, if it is known before a connection is chosen: for `http`
    /// bases (always HTTP/1). For `https` the pool adds it on HTTP/1 connections only.
    pub(crate) fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// What `join` puts after the authority, for a `path` that passed `check_path` and has
    /// no tab or newline: the base path, `path` and the query, encoded as `url` does.
    fn path_and_query(&self, path: &str, query: &str) -> String {
        let query = query.strip_prefix('?').unwrap_or(query);
        let base_query = self.query.as_deref().unwrap_or_default();
        let mut out = String::with_capacity(
            self.prefix.len() + path.len() + base_query.len() + query.len() + 3,
        );
        out.push_str(&self.prefix);
        if path.is_empty() {
            if self.prefix.is_empty() {
                out.push('/');
            }
        } else {
            if !path.starts_with('/') {
                out.push('/');
            }
            out.extend(utf8_percent_encode(path, PATH));
        }
        // `url` writes a `?` for any query it is given, even one it then drops entirely.
        if !base_query.is_empty() || !query.is_empty() {
            out.push('?');
            out.push_str(base_query);
            if !query.is_empty() {
                if !base_query.is_empty() {
                    out.push('&');
                }
                for part in query.split(TAB_OR_NEWLINE) {
                    out.extend(utf8_percent_encode(part, QUERY));
                }
            }
        }
        out
    }

    /// `{base}{path}?{base query&}{query}`. Rejects paths that could leave the base path.
    pub(crate) fn join(&self, path: &str, query: &str) -> Result<Url> {
        check_path(path)?;
        let mut url = self.url.clone();
        let full = if path.is_empty() {
            if self.prefix.is_empty() {
                "/".to_owned()
            } else {
                self.prefix.clone()
            }
        } else if path.starts_with('/') {
            format!("{}{path}", self.prefix)
        } else {
            format!("{}/{path}", self.prefix)
        };
        url.set_path(&full);

        let query = query.strip_prefix('?').unwrap_or(query);
        match (&self.query, query.is_empty()) {
            (None, true) => url.set_query(None),
            (None, false) => url.set_query(Some(query)),
            (Some(base), true) => url.set_query(Some(base)),
            (Some(base), false) => url.set_query(Some(&format!("{base}&{query}"))),
        }

        // Defence in depth: whatever the parser did, the result stays under the base path.
        let under_base = self.prefix.is_empty()
            || url
                .path()
                .strip_prefix(&self.prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if !under_base || url.fragment().is_some() {
            return Err(UpstreamError::invalid("path leaves the upstream base URL"));
        }
        Ok(url)
    }
}

/// Rejects `.`/`..` segments (also percent-encoded, or hidden behind an encoded slash) and
/// backslashes, which URL parsers treat as `/`.
fn check_path(path: &str) -> Result<()> {
    if path.contains('\\') {
        return Err(UpstreamError::invalid("path must not contain a backslash"));
    }
    for segment in path.split('/') {
        let decoded = percent_decode_str(segment).decode_utf8_lossy();
        if decoded
            .split(['/', '\\'])
            .any(|part| part == "." || part == "..")
        {
            return Err(UpstreamError::invalid(
                "path must not contain '.' or '..' segments",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn base(s: &str) -> Base {
        Base::new(&Url::parse(s).unwrap()).unwrap()
    }

    #[test]
    fn joins_with_and_without_base_path() {
        let b = base("https://api.rentcast.io/v1");
        assert_eq!(
            b.join("/properties", "city=Austin&state=TX")
                .unwrap()
                .as_str(),
            "https://api.rentcast.io/v1/properties?city=Austin&state=TX"
        );
        assert_eq!(
            b.join("", "").unwrap().as_str(),
            "https://api.rentcast.io/v1"
        );
        assert_eq!(
            b.join("/", "").unwrap().as_str(),
            "https://api.rentcast.io/v1/"
        );
        assert_eq!(
            b.join("properties", "").unwrap().as_str(),
            "https://api.rentcast.io/v1/properties"
        );

        let b = base("https://api.rentcast.io/v1/");
        assert_eq!(
            b.join("/properties", "").unwrap().as_str(),
            "https://api.rentcast.io/v1/properties"
        );

        let b = base("http://127.0.0.1:9000");
        assert_eq!(
            b.join("/a/b", "x=1").unwrap().as_str(),
            "http://127.0.0.1:9000/a/b?x=1"
        );
        assert_eq!(b.join("", "").unwrap().as_str(), "http://127.0.0.1:9000/");
        assert_eq!(
            b.join("", "?x=1").unwrap().as_str(),
            "http://127.0.0.1:9000/?x=1"
        );
    }

    #[test]
    fn keeps_the_base_query_and_encodes_specials() {
        let b = base("https://api.example.com/data/2.5?appid=secret");
        assert_eq!(
            b.join("/weather", "q=London").unwrap().as_str(),
            "https://api.example.com/data/2.5/weather?appid=secret&q=London"
        );
        assert_eq!(
            b.join("/weather", "").unwrap().as_str(),
            "https://api.example.com/data/2.5/weather?appid=secret"
        );
        let b = base("http://h/v1");
        // '?' and '#' in the path cannot start a query or a fragment.
        let u = b.join("/a?b#c d", "x=1#frag").unwrap();
        assert_eq!(u.path(), "/v1/a%3Fb%23c%20d");
        assert_eq!(u.fragment(), None);
        assert_eq!(u.query(), Some("x=1%23frag"));
        // Already-encoded input is passed through, not double-encoded.
        assert_eq!(b.join("/a%20b", "").unwrap().path(), "/v1/a%20b");
    }

    #[test]
    fn rejects_escapes() {
        let b = base("https://api.rentcast.io/v1");
        for bad in [
            "/../admin",
            "/..",
            "/a/../../x",
            "/%2e%2e/admin",
            "/%2E%2E",
            "/.%2e/x",
            "/a/..%2f..%2fx",
            "/a/%2e%2e%5cx",
            "/a\\..\\x",
            "/./x",
        ] {
            let err = b.join(bad, "").unwrap_err();
            assert_eq!(err.kind(), "invalid_request", "{bad}");
        }
        // Dots inside names are fine.
        assert_eq!(
            b.join("/a..b/.well-known/x.json", "").unwrap().path(),
            "/v1/a..b/.well-known/x.json"
        );
    }

    #[test]
    fn targets_keep_the_url_minus_user_info() {
        let b = base("https://user:pw@api.example.com/v1?appid=secret");
        let uri = b.target("/a b", "q=1&r=%20").unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.example.com/v1/a%20b?appid=secret&q=1&r=%20"
        );
        let b = base("http://[::1]:8080");
        assert_eq!(b.target("", "").unwrap().to_string(), "http://[::1]:8080/");
        assert_eq!(b.target("", "").unwrap().host(), Some("[::1]"));
        // A default port is not repeated.
        let b = base("https://h:443/x/");
        assert_eq!(b.target("/y", "").unwrap().to_string(), "https://h/x/y");
        assert_eq!(b.target("/../y", "").unwrap_err().kind(), "invalid_request");
    }

    /// The target as it was built before `target` stopped going through a `Url`: `join`,
    /// sliced after the authority.
    fn joined_target(b: &Base, path: &str, query: &str) -> Result<Uri> {
        let url = b.join(path, query)?;
        let path_and_query =
            PathAndQuery::try_from(&url[Position::BeforePath..Position::AfterQuery])
                .map_err(|_| UpstreamError::invalid("not a valid request target"))?;
        let mut parts = uri::Parts::default();
        parts.scheme = Some(b.scheme.clone());
        parts.authority = Some(b.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(|_| UpstreamError::invalid("not a valid request target"))
    }

    fn assert_same_target(b: &Base, path: &str, query: &str) {
        match (b.target(path, query), joined_target(b, path, query)) {
            (Ok(direct), Ok(joined)) => {
                assert_eq!(direct, joined, "{path:?} {query:?}");
                assert_eq!(direct.to_string(), joined.to_string(), "{path:?} {query:?}");
            }
            (Err(direct), Err(joined)) => {
                assert_eq!(direct.kind(), joined.kind(), "{path:?} {query:?}");
            }
            (direct, joined) => panic!("{path:?} {query:?}: {direct:?} vs {joined:?}"),
        }
    }

    const BASES: [&str; 12] = [
        "http://h",
        "http://h/",
        "https://api.example.com/v1",
        "https://api.example.com/v1/",
        "https://api.example.com/v1//",
        "https://h/data/2.5?appid=secret",
        "https://h/data/2.5/?appid=s%20c&x=%C3%A9",
        "http://h?k=v",
        "http://h/?",
        "https://user:pw@h:8443/a%20b/c",
        "http://[::1]:8080/v1?x=1",
        "https://h:443/x/",
    ];

    #[test]
    fn direct_targets_match_joined_ones_for_a_table_of_inputs() {
        let paths = [
            "",
            "/",
            "//",
            "x",
            "/x",
            "/x/",
            "//x//y",
            "/a b",
            "/a?b#c d",
            "/a%20b",
            "/a%",
            "/a%zz",
            "/100%",
            "/é/ü?",
            "/日本",
            "/\u{0}\u{1f}\u{7f}",
            "/\"<>`{}|^[]'",
            "/!$&'()*+,;=:@~",
            "/a..b/.well-known/x.json",
            "/..",
            "/.",
            "/%2e",
            "/a/%2E%2e/b",
            "/a\\b",
            "/a\tb",
            "/a/.\t./b",
            "/a/%2\te/b",
            "\n/x\r",
        ];
        let queries = [
            "",
            "?",
            "??",
            "?x=1",
            "x=1",
            "a=1&b=2",
            "q=a b",
            "q=%20&r=%",
            "q=#frag",
            "q=a?b#c#",
            "q=é&日=本",
            "q='\"<>`{}|^[]\\",
            "\t",
            "?\n",
            "a\tb\r\n=c",
            "\u{0}\u{1f}\u{7f}",
            "&",
        ];
        for base_url in BASES {
            let b = base(base_url);
            for path in paths {
                for query in queries {
                    assert_same_target(&b, path, query);
                }
            }
        }
    }

    #[test]
    fn direct_targets_match_joined_ones_for_generated_inputs() {
        // Pieces a path or query is glued from: specials, escapes, dots, slashes, non-ASCII.
        const PIECES: [&str; 32] = [
            "a", "Z9", "/", "//", ".", "..", "%", "%2e", "%2E", "%2f", "%5c", "%20", "%zz", " ",
            "?", "#", "&", "=", "\"", "'", "<", ">", "`", "{", "}", "é", "日", "\u{7f}", "\u{1}",
            "\t", "\n", "+",
        ];
        // A fixed xorshift sequence: the same inputs on every run.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let glue = |next: &mut dyn FnMut() -> u64| {
            let len = next() % 7;
            (0..len)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect::<String>()
        };
        let bases = BASES.map(base);
        for _ in 0..20_000 {
            let path = glue(&mut next);
            let query = glue(&mut next);
            let b = &bases[(next() % bases.len() as u64) as usize];
            assert_same_target(b, &path, &query);
        }
    }

    #[test]
    fn validates_the_base() {
        for bad in ["ftp://h/x", "mailto:a@b", "http://h/#frag", "file:///etc"] {
            let err = Base::new(&Url::parse(bad).unwrap()).unwrap_err();
            assert_eq!(err.kind(), "config", "{bad}");
        }
    }
}
