//! [`BatchTime`]: when a batch is due.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The time of a batch: milliseconds since the Unix epoch on the context's clock, a multiple of
/// the batch interval (Spark's `Time`). A batch holds the blocks stored before it was due; its
/// time names it in outputs (Parquet `batch=` directories), the metadata log and errors.
///
/// ```
/// use sluice_engine::BatchTime;
/// let t = BatchTime::from_millis(1_700_000_000_000);
/// assert_eq!(t.as_millis(), 1_700_000_000_000);
/// assert_eq!(t.to_string(), "1700000000000 ms");
/// assert!(t < BatchTime::from_millis(1_700_000_001_000));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BatchTime(i64);

impl BatchTime {
    /// The batch due at `millis` since the Unix epoch.
    #[must_use]
    pub const fn from_millis(millis: i64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    #[must_use]
    pub const fn as_millis(self) -> i64 {
        self.0
    }
}

impl fmt::Display for BatchTime {
    /// As Spark prints batch times: `1700000000000 ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms", self.0)
    }
}
