//! How a component stops: one enum for the block generator, the receiver and the engine.

/// How a stop treats work that was accepted but not finished.
///
/// Every layer means the same by it: [`Graceful`](StopMode::Graceful) finishes what it has
/// accepted before returning; [`Immediate`](StopMode::Immediate) stops after the unit of work in
/// progress and leaves the rest to be done again after a restart. Neither loses a record: what an
/// immediate stop leaves is either unread (no checkpoint covers it, so it is read again) or logged
/// (a restart processes it).
///
/// | | [`BlockGenerator::stop`](crate::BlockGenerator::stop) | [`Receiver::stop`](crate::Receiver::stop) | `StreamingContext::stop` (engine) |
/// |---|---|---|---|
/// | `Graceful` | seals the buffer, stores every queued block | stops reading, stores what is buffered, checkpoints it, releases leases | stops the receivers gracefully, processes every logged block, checkpoints (within the graceful-stop timeout) |
/// | `Immediate` | drops buffered and queued records (never stored, so never checkpointed) | drops what is buffered, checkpoints what is stored, releases leases | stops the receivers immediately, finishes only the batch in progress |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopMode {
    /// Finish what was accepted (Spark's `stop(stopGracefully = true)`).
    Graceful,
    /// Stop after the unit of work in progress; the rest is redone after a restart.
    Immediate,
}
