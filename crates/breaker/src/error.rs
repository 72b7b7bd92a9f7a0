//! The one error type of this crate.

use crate::circuit::Rejected;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in this crate: unusable settings, or a call refused by a breaker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A [`BreakerConfig`](crate::BreakerConfig), [`RetryPolicy`](crate::RetryPolicy) or
    /// [`BudgetConfig`](crate::BudgetConfig) value is out of range. Not retryable.
    #[error("invalid {component} configuration: `{field}` {reason}")]
    Config {
        /// Which settings: `"breaker"`, `"retry"` or `"retry budget"`.
        component: &'static str,
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A circuit breaker refused the call. Not retryable now; it may be after
    /// [`Rejected::retry_after`].
    #[error(transparent)]
    Rejected(#[from] Rejected),
}

impl Error {
    /// Whether trying the same thing again right away may succeed. Never: bad settings stay
    /// bad, and a breaker that refused a call keeps refusing until its `retry_after` passes.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Config { .. } | Self::Rejected(_) => false,
        }
    }

    /// A short, stable name for metrics labels: `"config"` or `"rejected"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Config { .. } => "config",
            Self::Rejected(_) => "rejected",
        }
    }

    pub(crate) fn config(
        component: &'static str,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Self::Config {
            component,
            field,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::State;

    #[test]
    fn kinds_messages_and_retryability() {
        let config = Error::config("breaker", "window", "must be greater than zero");
        assert_eq!(config.kind(), "config");
        assert!(!config.is_retryable());
        assert_eq!(
            config.to_string(),
            "invalid breaker configuration: `window` must be greater than zero"
        );

        let rejected = Error::from(Rejected {
            retry_after: Duration::from_secs(3),
            state: State::Open,
        });
        assert_eq!(rejected.kind(), "rejected");
        assert!(!rejected.is_retryable());
        assert!(rejected.to_string().contains("3s"), "{rejected}");
    }
}
