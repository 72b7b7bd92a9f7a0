//! The JSON error format of the external contract.

use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderValue, RETRY_AFTER};
use actix_web::{HttpResponse, HttpResponseBuilder};
use serde::Serialize;

/// An error answered to a client: `{"error": {"code", "message", "request_id"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    pub allow: Option<String>,
    /// `RateLimit-*` headers of the limit that refused the request.
    pub rate_headers: Option<crate::limits::Headers>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    request_id: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            allow: None,
            rate_headers: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn method_not_allowed(allow: &[String]) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("this route accepts {}", allow.join(", ")),
        );
        e.allow = Some(allow.join(", "));
        e
    }
    pub fn payload_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body exceeds {limit} bytes"),
        )
    }
    pub fn uri_too_long(limit: u64) -> Self {
        Self::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("request target exceeds {limit} bytes"),
        )
    }
    pub fn headers_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("request headers exceed {limit} bytes"),
        )
    }
    pub fn upstream_error(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message)
    }
    pub fn upstream_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", message)
    }
    pub fn upstream_unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_unavailable",
            message,
        );
        e.retry_after = Some(retry_after);
        e
    }
    pub fn rate_limited(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
        e.retry_after = Some(ceil_secs(retry_after));
        e
    }
    /// A quota or budget is used up; `retry_after` until its window resets, when known.
    pub fn quota_exceeded(
        message: impl Into<String>,
        retry_after: Option<std::time::Duration>,
    ) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message);
        e.retry_after = retry_after.map(ceil_secs);
        e
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// The response, tagged with the request id.
    pub fn respond(&self, request_id: &str) -> HttpResponse {
        let mut b = HttpResponseBuilder::new(self.status);
        if let Some(secs) = self.retry_after {
            b.insert_header((RETRY_AFTER, secs.to_string()));
        }
        if let Some(allow) = &self.allow
            && let Ok(v) = HeaderValue::from_str(allow)
        {
            b.insert_header((actix_web::http::header::ALLOW, v));
        }
        if let Ok(v) = HeaderValue::from_str(request_id) {
            b.insert_header(("x-request-id", v));
        }
        if let Some(h) = &self.rate_headers {
            h.apply(&mut b);
        }
        b.json(Body {
            error: Inner {
                code: self.code,
                message: &self.message,
                request_id,
            },
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

/// Whole seconds, rounded up, at least 1 (a `Retry-After` of 0 invites a hot loop).
pub fn ceil_secs(d: std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}
