//! Which headers cross the gateway, in each direction.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::header::{ACCEPT, AUTHORIZATION, CONNECTION, HeaderMap, HeaderName, HeaderValue};
use percent_encoding::percent_decode_str;
use url::Url;

use crate::error::{Result, UpstreamError};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus `Proxy-*`: they describe one connection and are
/// never forwarded. Names are lower-case.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "trailers"
            | "transfer-encoding"
            | "upgrade"
    ) || name.starts_with("proxy-")
}

/// Client headers that carry the client's own credentials for the gateway; they must never
/// reach the upstream.
fn is_client_credential(name: &str) -> bool {
    matches!(
        name,
        "authorization" | "x-api-key" | "cookie" | "proxy-authorization"
    )
}

/// Headers the HTTP client computes itself.
fn is_computed(name: &str) -> bool {
    matches!(name, "host" | "content-length")
}

/// Lower-case names listed in the `Connection` header(s) of `headers`.
fn connection_listed<'a, I>(headers: I) -> Vec<String>
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    headers
        .into_iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, value)| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect()
}

/// Configured upstream headers, parsed once. Values are marked sensitive so they never show
/// in debug output.
pub(crate) fn parse_injected(
    headers: &[(String, String)],
) -> Result<Vec<(HeaderName, HeaderValue)>> {
    headers
        .iter()
        .map(|(name, value)| {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| UpstreamError::config(format!("invalid header name {name:?}")))?;
            if is_hop_by_hop(header.as_str()) || is_computed(header.as_str()) {
                return Err(UpstreamError::config(format!(
                    "header {name:?} cannot be injected: it is set per connection"
                )));
            }
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                // Do not echo the value: it is usually a secret.
                UpstreamError::config(format!("invalid value for header {name:?}"))
            })?;
            value.set_sensitive(true);
            Ok((header, value))
        })
        .collect()
}

/// `Authorization: Basic …` for the user name and password in `url`
/// (`https://user:secret@api.example.com/`), percent-decoded; `None` when it has neither.
/// The value is marked sensitive.
pub(crate) fn basic_auth(url: &Url) -> Option<HeaderValue> {
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let mut credentials: Vec<u8> = percent_decode_str(url.username()).collect();
    credentials.push(b':');
    if let Some(password) = url.password() {
        credentials.extend(percent_decode_str(password));
    }
    let mut value = HeaderValue::try_from(format!("Basic {}", BASE64.encode(credentials))).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// The headers to send upstream: the client's headers minus hop-by-hop ones (and those named
/// in `Connection`), minus `Host`/`Content-Length`, minus the client's credentials, minus any
/// name the upstream injects; then the injected headers; then `url_auth` (the base URL's
/// credentials) unless an `Authorization` was injected, and `Accept: */*` unless the client
/// sent an `Accept`.
pub(crate) fn outbound(
    client: &[(String, String)],
    injected: &[(HeaderName, HeaderValue)],
    url_auth: Option<&HeaderValue>,
) -> Result<HeaderMap> {
    let listed = connection_listed(client.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    let mut out = HeaderMap::with_capacity(client.len() + injected.len() + 2);
    for (name, value) in client {
        let lower = name.to_ascii_lowercase();
        if is_hop_by_hop(&lower)
            || is_computed(&lower)
            || is_client_credential(&lower)
            || listed.contains(&lower)
            || injected.iter().any(|(n, _)| n.as_str() == lower)
        {
            continue;
        }
        let header = HeaderName::from_bytes(lower.as_bytes())
            .map_err(|_| UpstreamError::invalid(format!("invalid header name {name:?}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| UpstreamError::invalid(format!("invalid value for header {name:?}")))?;
        out.append(header, value);
    }
    for (name, value) in injected {
        out.append(name.clone(), value.clone());
    }
    if let Some(auth) = url_auth {
        out.entry(AUTHORIZATION).or_insert_with(|| auth.clone());
    }
    out.entry(ACCEPT)
        .or_insert_with(|| HeaderValue::from_static("*/*"));
    Ok(out)
}

/// The response headers to hand back: all but hop-by-hop ones and those named in
/// `Connection`. Repeated headers stay repeated; non-UTF-8 values are converted lossily.
pub(crate) fn inbound(headers: &HeaderMap) -> Vec<(String, String)> {
    let listed = connection_listed(
        headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| ("connection", v)),
    );
    headers
        .iter()
        .filter(|(name, _)| {
            !is_hop_by_hop(name.as_str()) && !listed.iter().any(|l| l == name.as_str())
        })
        .map(|(name, value)| {
            let value = match value.to_str() {
                Ok(v) => v.to_owned(),
                Err(_) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
            };
            (name.as_str().to_owned(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn outbound_strips_and_injects() {
        let client = pairs(&[
            ("Host", "evil.example"),
            ("Content-Length", "999"),
            ("Authorization", "Bearer tg_client"),
            ("X-Api-Key", "tg_client"),
            ("Cookie", "s=1"),
            ("Proxy-Authorization", "Basic x"),
            ("Proxy-Connection", "keep-alive"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "x"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("X-Client-Id", "device-1"),
            ("Accept", "application/json"),
            ("Accept", "text/plain"),
            ("X-Upstream-Token", "client-value"),
        ]);
        let injected = parse_injected(&pairs(&[("X-Upstream-Token", "secret")])).unwrap();
        let out = outbound(&client, &injected, None).unwrap();
        let names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-client-id", "accept", "x-upstream-token"]);
        assert_eq!(out.get_all("accept").iter().count(), 2);
        assert_eq!(out.get_all("x-upstream-token").iter().count(), 1);
        assert_eq!(out["x-upstream-token"], "secret");
        assert!(out["x-upstream-token"].is_sensitive());
    }

    #[test]
    fn outbound_rejects_bad_client_headers() {
        let err = outbound(&pairs(&[("bad name", "x")]), &[], None).unwrap_err();
        assert_eq!(err.kind(), "invalid_request");
        let err = outbound(&pairs(&[("x-ok", "a\nb")]), &[], None).unwrap_err();
        assert_eq!(err.kind(), "invalid_request");
    }

    #[test]
    fn url_credentials_and_accept_are_defaults() {
        let url = |s: &str| Url::parse(s).unwrap();
        assert_eq!(basic_auth(&url("https://h/x")), None);
        let auth = basic_auth(&url("https://us%65r:p%40ss%C3%A9@h/")).unwrap();
        assert!(auth.is_sensitive());
        // base64("user:p@ssé")
        assert_eq!(auth, "Basic dXNlcjpwQHNzw6k=");
        assert_eq!(
            basic_auth(&url("https://key@h/")).unwrap(),
            "Basic a2V5Og=="
        );
        assert_eq!(basic_auth(&url("https://:pw@h/")).unwrap(), "Basic OnB3");

        let out = outbound(&pairs(&[("Authorization", "Bearer c")]), &[], Some(&auth)).unwrap();
        assert_eq!(
            out.get_all(AUTHORIZATION).iter().collect::<Vec<_>>(),
            [&auth]
        );
        assert_eq!(out[ACCEPT], "*/*");
        let injected = parse_injected(&pairs(&[("Authorization", "Bearer i")])).unwrap();
        let client = pairs(&[("accept", "text/csv")]);
        let out = outbound(&client, &injected, Some(&auth)).unwrap();
        assert_eq!(
            out.get_all(AUTHORIZATION).iter().collect::<Vec<_>>(),
            ["Bearer i"]
        );
        assert_eq!(out.get_all(ACCEPT).iter().collect::<Vec<_>>(), ["text/csv"]);
    }

    #[test]
    fn injected_headers_are_validated_without_echoing_secrets() {
        let err = parse_injected(&pairs(&[("X-Api-Key", "se\ncret")])).unwrap_err();
        assert_eq!(err.kind(), "config");
        assert!(!err.to_string().contains("se"), "{err}");
        assert!(parse_injected(&pairs(&[("bad name", "x")])).is_err());
        assert!(parse_injected(&pairs(&[("Connection", "close")])).is_err());
        assert!(parse_injected(&pairs(&[("Host", "x")])).is_err());
    }

    #[test]
    fn inbound_strips_hop_by_hop() {
        let mut headers = HeaderMap::new();
        for (n, v) in [
            ("connection", "x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("proxy-authenticate", "Basic"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ] {
            headers.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let out = inbound(&headers);
        let expected = pairs(&[
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ]);
        assert_eq!(out, expected);
    }
}
