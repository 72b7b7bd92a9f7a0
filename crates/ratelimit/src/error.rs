//! The crate's error type.

use std::time::Duration;

/// Errors from rate limiters and quota stores.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RateLimitError {
    /// A [`Limit`](crate::Limit) that cannot be enforced: a zero count or period, an emission
    /// interval (`per / count`) under one microsecond, or a period over
    /// [`Limit::MAX_PER`](crate::Limit::MAX_PER).
    #[error("invalid limit: {0}")]
    InvalidLimit(String),
    /// A bad argument (a zero cost, a malformed limit string, an unsupported database URL).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The shared backend (Redis) did not answer in time, refused the connection, failed the
    /// command, or its circuit breaker is open. Nothing was counted that the caller can rely on;
    /// a [`FallbackLimiter`](crate::FallbackLimiter) turns this into a local decision or a denial.
    #[error("{backend} unavailable: {source}")]
    Unavailable {
        /// Which backend (`redis`).
        backend: &'static str,
        /// When trying again makes sense: the breaker's remaining cool-down when it is open.
        retry_after: Option<Duration>,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A database used to persist quota counters failed (connection, query, pool).
    #[error("{backend} failed: {source}")]
    Backend {
        /// Which backend (`sqlite`, `postgres`).
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored value could not be decoded (a counter that is not a number, ...).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

impl RateLimitError {
    /// Wraps a database error.
    pub fn backend(
        backend: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        RateLimitError::Backend {
            backend,
            source: source.into(),
        }
    }

    /// A backend that cannot be reached now.
    pub fn unavailable(
        backend: &'static str,
        retry_after: Option<Duration>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        RateLimitError::Unavailable {
            backend,
            retry_after,
            source: source.into(),
        }
    }

    /// Whether the same call may succeed later (the backend may come back); invalid limits and
    /// arguments never will.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RateLimitError::Unavailable { .. } | RateLimitError::Backend { .. }
        )
    }

    /// Whether this is [`RateLimitError::Unavailable`], the error a fallback policy acts on.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, RateLimitError::Unavailable { .. })
    }

    /// For [`RateLimitError::Unavailable`]: when to try again, if the backend said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RateLimitError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// `Result` with [`RateLimitError`].
pub type Result<T, E = RateLimitError> = std::result::Result<T, E>;
