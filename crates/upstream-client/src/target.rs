//! Joining the upstream's base URL with a client's path and query.

use http::Uri;
use http::uri::{self, Authority, PathAndQuery, Scheme};
use percent_encoding::percent_decode_str;
use url::{Position, Url};

use crate::error::{Result, UpstreamError};

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
        })
    }

    /// The request target for `path` and `query`: [`join`](Self::join) as an HTTP URI,
    /// without the base URL's user info.
    pub(crate) fn target(&self, path: &str, query: &str) -> Result<Uri> {
        let url = self.join(path, query)?;
        let path_and_query = PathAndQuery::try_from(
            &url[Position::BeforePath..Position::AfterQuery],
        )
        .map_err(|_| UpstreamError::invalid("path or query is not a valid request target"))?;
        let mut parts = uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts)
            .map_err(|_| UpstreamError::invalid("path or query is not a valid request target"))
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

    #[test]
    fn validates_the_base() {
        for bad in ["ftp://h/x", "mailto:a@b", "http://h/#frag", "file:///etc"] {
            let err = Base::new(&Url::parse(bad).unwrap()).unwrap_err();
            assert_eq!(err.kind(), "config", "{bad}");
        }
    }
}
