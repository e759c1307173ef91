//! [`ConfigError`]: why a `*Config` of this crate was rejected.

/// A configuration value is invalid; the message names the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it and what would be accepted.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }

    /// Configuration errors never go away by retrying.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// [`Domain::Config`](sluice_blockstore::Domain::Config), never retryable.
    pub fn class(&self) -> sluice_blockstore::ErrorClass {
        sluice_blockstore::ErrorClass::permanent(sluice_blockstore::Domain::Config)
    }
}
