//! Who is calling: an API key (`Authorization: Bearer` or `X-Api-Key`) verified through the
//! in-process key cache, or, when `auth.required = false`, an anonymous client identified by
//! `X-Client-Id` or its IP address.

use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::http::StatusCode;
use keystore::{KeyCache, KeyError, KeyRecord};

use crate::error::ApiError;

/// The caller of a request.
#[derive(Debug, Clone)]
pub enum Identity {
    /// A verified API key.
    Key(Arc<KeyRecord>),
    /// No key (anonymous mode): `X-Client-Id` or the peer IP.
    Anonymous(String),
}

impl Identity {
    /// The subject limits and quotas are counted under: the key's public id, never the key.
    pub fn subject(&self) -> String {
        match self {
            Identity::Key(r) => format!("key:{}", r.id),
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

/// The key a request presents, if any.
fn presented_key(req: &HttpRequest) -> Option<&str> {
    if let Some(v) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    req.headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The anonymous client: a sane `X-Client-Id`, else the peer IP.
fn anonymous_client(req: &HttpRequest) -> String {
    if let Some(id) = req
        .headers()
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        && !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_graphic())
    {
        return format!("id:{id}");
    }
    match req.peer_addr() {
        Some(addr) => format!("ip:{}", addr.ip()),
        None => "ip:unknown".to_string(),
    }
}

/// The client's IP, for per-IP ingress limits.
pub fn client_ip(req: &HttpRequest) -> String {
    req.peer_addr()
        .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string())
}

/// Authenticates a request. A presented key must be valid even in anonymous mode; auth never
/// fails open: a key store outage answers 503 for a key this node has not seen, never 401.
pub async fn authenticate(
    keys: &KeyCache,
    required: bool,
    req: &HttpRequest,
) -> Result<Identity, ApiError> {
    let Some(presented) = presented_key(req).filter(|k| !k.is_empty()) else {
        if required {
            return Err(ApiError::unauthorized(
                "an API key is required (Authorization: Bearer <key> or X-Api-Key)",
            ));
        }
        return Ok(Identity::Anonymous(anonymous_client(req)));
    };
    match keys.verify(presented).await {
        Ok(v) => Ok(Identity::Key(v.record)),
        Err(KeyError::Unknown) => Err(ApiError::unauthorized("unknown API key")),
        Err(e @ (KeyError::Revoked { .. } | KeyError::Expired { .. })) => {
            Err(ApiError::forbidden(e.to_string()))
        }
        Err(e) => {
            tracing::warn!(error = %e, "key store unavailable during authentication");
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
