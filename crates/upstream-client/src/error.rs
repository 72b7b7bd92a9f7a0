//! The one error type of this crate.

use std::time::Duration;

use crate::transport::ConnectTimedOut;

/// `Result` with [`UpstreamError`] as the default error.
pub type Result<T, E = UpstreamError> = std::result::Result<T, E>;

/// Why a call to an upstream did not produce a response.
///
/// Cheap to clone (messages are plain strings), so one failure can be handed to every
/// coalesced waiter. Messages never contain the request URL (it may carry credentials or
/// client data); they name the upstream and the underlying cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The TCP or TLS connection could not be established (refused, unreachable, DNS, TLS
    /// handshake). Retryable.
    #[error("upstream {upstream}: connect failed: {message}")]
    Connect {
        /// The upstream's configured name.
        upstream: String,
        /// What went wrong, with its causes.
        message: String,
    },
    /// The connect timeout or the total deadline (which includes reading the body) passed.
    /// Retryable.
    #[error("upstream {upstream}: timed out: {message}")]
    Timeout {
        /// The upstream's configured name.
        upstream: String,
        /// Which deadline passed.
        message: String,
    },
    /// The response body is larger than the configured `max_body_bytes`. Not retryable.
    #[error("upstream response body larger than {limit} bytes")]
    BodyTooLarge {
        /// The configured cap, in bytes.
        limit: u64,
    },
    /// The upstream answered with something that is not valid HTTP, or the connection was
    /// reset or closed before the whole response arrived. Retryable.
    #[error("upstream {upstream}: protocol error: {message}")]
    Protocol {
        /// The upstream's configured name.
        upstream: String,
        /// What went wrong, with its causes.
        message: String,
    },
    /// The request built from client input cannot be sent: bad method, a path that would
    /// leave the upstream's base URL, an invalid header. Not retryable.
    #[error("invalid upstream request: {message}")]
    InvalidRequest {
        /// What is wrong with the request.
        message: String,
    },
    /// The upstream's circuit breaker is open (or half-open with every probe slot taken):
    /// the call was not made. Not retryable now; the breaker may admit a call after
    /// `retry_after`. A gateway serves stale data, a fallback, or a 503 with `Retry-After`.
    #[error("upstream {upstream}: circuit breaker open, retry after {retry_after:?}")]
    Unavailable {
        /// The upstream's configured name.
        upstream: String,
        /// How long until the breaker may admit a call again; always greater than zero.
        retry_after: Duration,
    },
    /// The upstream's settings are unusable (bad base URL, bad header, zero timeout, invalid
    /// breaker, retry or budget settings). Not retryable.
    #[error("invalid upstream configuration: {message}")]
    Config {
        /// What is wrong with the settings.
        message: String,
    },
}

impl UpstreamError {
    /// Whether trying the same request again may succeed: connect, timeout and protocol
    /// errors are; body-too-large, invalid-request, config and circuit-open errors are not
    /// (an open breaker keeps refusing until its [`retry_after`](Self::retry_after)).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } | Self::Protocol { .. } => true,
            Self::BodyTooLarge { .. }
            | Self::InvalidRequest { .. }
            | Self::Unavailable { .. }
            | Self::Config { .. } => false,
        }
    }

    /// For [`Unavailable`](Self::Unavailable): how long until the breaker may admit a call
    /// (a gateway's `Retry-After`, rounded up to whole seconds). `None` for other errors.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether this is a [`Timeout`](Self::Timeout) (a gateway answers 504 for it).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// A short, stable name for metrics labels: `"connect"`, `"timeout"`, `"body_too_large"`,
    /// `"protocol"`, `"invalid_request"`, `"circuit_open"` or `"config"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::Protocol { .. } => "protocol",
            Self::InvalidRequest { .. } => "invalid_request",
            Self::Unavailable { .. } => "circuit_open",
            Self::Config { .. } => "config",
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::Config {
            message: message.into(),
        }
    }

    /// Classifies an error of the HTTP client (hyper-util's, with the connector's causes) or
    /// of a response body (hyper's), by its whole chain of causes: a timeout anywhere is a
    /// [`Timeout`](Self::Timeout) (the connect timeout too), else a failure to connect (TCP,
    /// DNS, TLS handshake) a [`Connect`](Self::Connect), else a [`Protocol`](Self::Protocol)
    /// error. Neither library puts the URL in its errors, so the message carries none.
    pub(crate) fn from_http(upstream: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let upstream = upstream.to_owned();
        let message = chain(err);
        let (mut timeout, mut connect) = (false, false);
        let mut source = Some(err);
        while let Some(cause) = source {
            timeout |= cause.is::<ConnectTimedOut>()
                || cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
                || cause
                    .downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout);
            connect |= cause
                .downcast_ref::<hyper_util::client::legacy::Error>()
                .is_some_and(hyper_util::client::legacy::Error::is_connect);
            source = cause.source();
        }
        if timeout {
            Self::Timeout { upstream, message }
        } else if connect {
            Self::Connect { upstream, message }
        } else {
            Self::Protocol { upstream, message }
        }
    }
}

/// `error: cause: cause…`, skipping causes that repeat the previous text.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_retryability() {
        let upstream = || "u".to_owned();
        let message = || "m".to_owned();
        let cases = [
            (
                UpstreamError::Connect {
                    upstream: upstream(),
                    message: message(),
                },
                "connect",
                true,
            ),
            (
                UpstreamError::Timeout {
                    upstream: upstream(),
                    message: message(),
                },
                "timeout",
                true,
            ),
            (
                UpstreamError::BodyTooLarge { limit: 1 },
                "body_too_large",
                false,
            ),
            (
                UpstreamError::Protocol {
                    upstream: upstream(),
                    message: message(),
                },
                "protocol",
                true,
            ),
            (UpstreamError::invalid("m"), "invalid_request", false),
            (
                UpstreamError::Unavailable {
                    upstream: upstream(),
                    retry_after: Duration::from_millis(1500),
                },
                "circuit_open",
                false,
            ),
            (UpstreamError::config("m"), "config", false),
        ];
        for (err, kind, retryable) in cases {
            assert_eq!(err.kind(), kind);
            assert_eq!(err.is_retryable(), retryable, "{kind}");
            assert_eq!(err.is_timeout(), kind == "timeout");
            assert_eq!(
                err.retry_after(),
                (kind == "circuit_open").then_some(Duration::from_millis(1500))
            );
            let shared = err.clone();
            assert_eq!(shared, err);
            assert!(!err.to_string().is_empty());
        }
    }
}
