//! Who is calling: an API key (`Authorization: Bearer` or `X-Api-Key`) verified through the
//! in-process key cache, or, when `auth.required = false`, an anonymous client identified by
//! `X-Client-Id` or its IP address.

use std::net::IpAddr;
use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::http::StatusCode;
use actix_web::http::header::HeaderName;
use keystore::{KeyCache, KeyError, KeyRecord};

use crate::error::ApiError;
use crate::http::RequestHeads;

/// The caller of a request.
#[derive(Debug, Clone)]
pub enum Identity {
    /// A verified API key.
    Key(Arc<KeyRecord>),
    /// No key (anonymous mode): `X-Client-Id` or the peer IP.
    Anonymous(Client),
}

/// An anonymous client, kept unformatted: most requests never need its name (no client or
/// route rate limit), so the hit path does not build one.
#[derive(Debug, Clone)]
pub enum Client {
    /// A sane `X-Client-Id`.
    Id(String),
    /// The peer address (`None` when the transport has none).
    Ip(Option<IpAddr>),
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Id(id) => write!(f, "id:{id}"),
            Client::Ip(Some(ip)) => write!(f, "ip:{ip}"),
            Client::Ip(None) => f.write_str("ip:unknown"),
        }
    }
}

impl Identity {
    /// The subject limits and quotas are counted under: the key's public id, never the key.
    pub fn subject(&self) -> String {
        match self {
            Identity::Key(r) => ["key:", r.id.as_str()].concat(),
            Identity::Anonymous(client) => format!("anon:{client}"),
        }
    }

    /// The key's record, if the caller presented one.
    pub fn key(&self) -> Option<&Arc<KeyRecord>> {
        match self {
            Identity::Key(r) => Some(r),
            Identity::Anonymous(_) => None,
        }
    }
}

// Looked up by a prepared name: a `&str` name is parsed again on every lookup.
pub(crate) static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub(crate) static X_CLIENT_ID: HeaderName = HeaderName::from_static("x-client-id");

/// The key a request presents, if any.
fn presented_key<'a>(heads: &RequestHeads<'a>) -> Option<&'a str> {
    if let Some(v) = heads.authorization.and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    heads.api_key.and_then(|v| v.to_str().ok()).map(str::trim)
}

/// The anonymous client: a sane `X-Client-Id`, else the peer IP.
fn anonymous_client(heads: &RequestHeads<'_>, req: &HttpRequest) -> Client {
    if let Some(id) = heads.client_id.and_then(|v| v.to_str().ok())
        && !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Client::Id(id.to_string());
    }
    Client::Ip(client_ip(req))
}

/// The client's IP, for per-IP ingress limits.
pub fn client_ip(req: &HttpRequest) -> Option<IpAddr> {
    req.peer_addr().map(|a| a.ip())
}

/// Authenticates a request. A presented key must be valid even in anonymous mode; auth never
/// fails open: a key store outage answers 503 for a key this node has not seen, never 401.
///
/// Only a presented key is checked in a future (boxed: the key cache's state would otherwise
/// be part of every request's future, see `Gateway::proxy`).
pub fn authenticate<'a>(
    keys: &'a KeyCache,
    required: bool,
    heads: &RequestHeads<'a>,
    req: &HttpRequest,
    request_id: &'a str,
) -> impl Future<Output = Result<Identity, ApiError>> + 'a {
    use futures_util::future::Either;
    let Some(presented) = presented_key(heads).filter(|k| !k.is_empty()) else {
        let anonymous = if required {
            Err(ApiError::unauthorized(
                "an API key is required (Authorization: Bearer <key> or X-Api-Key)",
            ))
        } else {
            Ok(Identity::Anonymous(anonymous_client(heads, req)))
        };
        return Either::Left(std::future::ready(anonymous));
    };
    Either::Right(Box::pin(verify(keys, presented, request_id)))
}

/// The identity of a presented key.
async fn verify(keys: &KeyCache, presented: &str, request_id: &str) -> Result<Identity, ApiError> {
    match keys.verify(presented).await {
        Ok(v) => Ok(Identity::Key(v.record)),
        Err(KeyError::Unknown) => Err(ApiError::unauthorized("unknown API key")),
        Err(e @ (KeyError::Revoked { .. } | KeyError::Expired { .. })) => {
            Err(ApiError::forbidden(e.to_string()))
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                request_id,
                "key store unavailable during authentication"
            );
            let mut err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "keys cannot be verified right now; retry shortly",
            );
            err.retry_after = Some(1);
            Err(err)
        }
    }
}
