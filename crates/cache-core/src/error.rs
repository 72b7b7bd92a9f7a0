//! The crate's error type.

/// Errors from cache stores and the cache facade.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// A storage backend failed (connection, query, pool). The source is the backend's own error.
    #[error("cache backend {backend} failed: {source}")]
    Backend {
        /// Which backend failed (`memory`, `sqlite`, `postgres`, ...).
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored row could not be decoded into an [`Entry`](crate::Entry).
    #[error("corrupt cache row: {0}")]
    Corrupt(String),
    /// A request could not be turned into a cache key (bad input).
    #[error("invalid request for cache key: {0}")]
    InvalidRequest(String),
}

impl CacheError {
    /// Wraps a backend error.
    pub fn backend(
        backend: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        CacheError::Backend {
            backend,
            source: source.into(),
        }
    }

    /// Whether trying the same operation again might succeed (backend failures may be transient).
    pub fn is_retryable(&self) -> bool {
        matches!(self, CacheError::Backend { .. })
    }
}

/// `Result` with [`CacheError`].
pub type Result<T, E = CacheError> = std::result::Result<T, E>;
