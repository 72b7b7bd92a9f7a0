//! The crate's error type.

use crate::key::KeyId;

/// A boxed error from a backend (database driver, pool, operating system).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors from key stores, key verification and key definitions.
///
/// Verification outcomes map to HTTP answers as the gateway's contract says:
/// [`Unknown`](Self::Unknown) → 401 `unauthorized`; [`Revoked`](Self::Revoked) and
/// [`Expired`](Self::Expired) → 403 `forbidden`; [`Unavailable`](Self::Unavailable) → 503 (the
/// key could not be checked; never reported as 401/403). No variant ever holds a client's key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not a key this gateway knows: malformed, or no key has its digest.
    #[error("unknown API key")]
    Unknown,
    /// The key exists but was revoked.
    #[error("API key {id} is revoked")]
    Revoked {
        /// The key's public id.
        id: KeyId,
    },
    /// The key exists but its expiry time has passed.
    #[error("API key {id} has expired")]
    Expired {
        /// The key's public id.
        id: KeyId,
    },
    /// The key is not in the in-process cache and the store could not be asked (it failed, or
    /// failed moments ago and is given time to recover).
    #[error("key store unavailable: {source}")]
    Unavailable {
        /// Why the store could not answer.
        #[source]
        source: BoxError,
    },
    /// A storage backend failed (connection, query, pool). The source is the backend's own error.
    #[error("key store backend {backend} failed: {source}")]
    Backend {
        /// Which backend failed (`memory`, `sqlite`, `postgres`, `os-rng`).
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// A stored row could not be decoded into a [`KeyRecord`](crate::KeyRecord).
    #[error("corrupt api_keys row: {0}")]
    Corrupt(String),
    /// A key definition or identifier is not acceptable (empty name, zero rate, value out of range).
    #[error("invalid key definition: {0}")]
    Invalid(String),
    /// Inserting a key whose id or digest is already stored.
    #[error("a key with the same id or digest already exists: {0}")]
    Conflict(String),
}

impl KeyError {
    /// Wraps a backend error.
    pub fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        KeyError::Backend {
            backend,
            source: source.into(),
        }
    }

    /// Whether trying the same operation again might succeed (backend failures may be transient).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            KeyError::Backend { .. } | KeyError::Unavailable { .. }
        )
    }

    /// Whether the presented credential is not a known key (HTTP 401 `unauthorized`).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, KeyError::Unknown)
    }

    /// Whether the key is known but may not be used (revoked or expired; HTTP 403 `forbidden`).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, KeyError::Revoked { .. } | KeyError::Expired { .. })
    }
}

/// `Result` with [`KeyError`].
pub type Result<T, E = KeyError> = std::result::Result<T, E>;
