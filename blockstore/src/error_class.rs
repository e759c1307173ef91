//! [`ErrorClass`]: one classification of every Sluice error — where it comes from and whether
//! retrying may help — so that retry loops, failure policies and reports decide the same way in
//! every crate.

/// Where a failure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Domain {
    /// A setting, URL or argument the user must fix.
    Config,
    /// Local disk, an object store or their runtime: block store tiers, the local log's files,
    /// the metadata log, sinks.
    Storage,
    /// Bytes that do not decode (a corrupt copy, a torn frame, a record count that does not add
    /// up).
    Corrupt,
    /// The stream's source: Kinesis or the local log read as a stream (throttles, expired
    /// iterators, unknown shards, rejected requests).
    Source,
    /// The lease table (`DynamoDB` or the local file): throttles, lost leases, conflicts.
    Lease,
    /// Records the source no longer holds and no stored copy has: lost for good.
    DataLoss,
    /// The user's code: a panic or an `Err` from an operator, an output or a listener.
    UserCode,
    /// The component is stopping or stopped, or was used out of order.
    Lifecycle,
    /// A bug or an unexpected state inside Sluice.
    Internal,
}

/// A failure's domain and whether retrying the same operation (after a backoff) may succeed.
///
/// ```
/// use sluice_blockstore::{Domain, ErrorClass};
/// let throttled = ErrorClass::transient(Domain::Source);
/// assert!(throttled.is_retryable());
/// assert!(!ErrorClass::permanent(Domain::DataLoss).is_retryable());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorClass {
    /// Where it comes from.
    pub domain: Domain,
    /// Whether retrying may succeed.
    pub retryable: bool,
}

impl ErrorClass {
    /// A failure that retrying may fix (throttling, I/O, a source briefly away).
    #[must_use]
    pub const fn transient(domain: Domain) -> Self {
        Self {
            domain,
            retryable: true,
        }
    }

    /// A failure that retrying the same operation would hit again.
    #[must_use]
    pub const fn permanent(domain: Domain) -> Self {
        Self {
            domain,
            retryable: false,
        }
    }

    /// Whether retrying may succeed.
    #[must_use]
    pub const fn is_retryable(self) -> bool {
        self.retryable
    }
}
