//! [`NamedCounter`]: how a [`Source`](crate::Source) or a [`LeaseStore`](crate::LeaseStore)
//! reports its own counters (calls made, throttles, …) to whoever monitors it, without the
//! monitor knowing the implementation: the engine exports each one as a metric labelled with the
//! stream.

/// One counter of a source or a lease store: a value that only grows over the object's life.
///
/// ```
/// use sluice_receiver::NamedCounter;
/// let c = NamedCounter::new("throttles", "Calls the service throttled.", 3);
/// assert_eq!((c.name, c.value), ("throttles", 3));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NamedCounter {
    /// A `snake_case` name, unique within the object that reports it and the same for every
    /// object of one implementation (it becomes part of a metric name).
    pub name: &'static str,
    /// One sentence: what is counted.
    pub help: &'static str,
    /// The count so far.
    pub value: u64,
}

impl NamedCounter {
    /// A counter.
    pub const fn new(name: &'static str, help: &'static str, value: u64) -> Self {
        Self { name, help, value }
    }
}
