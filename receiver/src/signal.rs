//! [`StopSignal`]: how a receiver's threads wait on the injected clock and still stop promptly.
//!
//! A [`Clock`]'s own `sleep_until` cannot be interrupted, and a manual clock only moves when a
//! test moves it, so a thread sleeping on it could never be joined by `stop()`. Threads therefore
//! wait on a condition variable in slices of at most [`MAX_REAL_WAIT`] of real time, re-reading the
//! clock after each slice: a stop or a nudge wakes them at once, a deadline on a system clock is
//! met to within a slice, and a manual clock is observed within a slice of being advanced.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use sluice_blockstore::Clock;

/// The longest a waiting thread sleeps in real time before it re-reads the clock.
pub(crate) const MAX_REAL_WAIT: Duration = Duration::from_millis(5);

/// Why [`StopSignal::wait_until`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The clock reached the deadline.
    Deadline,
    /// Someone called [`StopSignal::nudge`] (there may be new work).
    Nudged,
    /// [`StopSignal::stop`] was called.
    Stopped,
}

#[derive(Debug, Default)]
struct SignalState {
    stopped: bool,
    nudges: u64,
}

/// A stop flag plus a "look again" nudge that clock-aware waits observe.
#[derive(Debug, Default)]
pub(crate) struct StopSignal {
    state: Mutex<SignalState>,
    changed: Condvar,
}

impl StopSignal {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Asks every waiter to stop; permanent.
    pub(crate) fn stop(&self) {
        self.state.lock().expect("signal lock").stopped = true;
        self.changed.notify_all();
    }

    /// Whether [`stop`](Self::stop) was called.
    pub(crate) fn is_stopped(&self) -> bool {
        self.state.lock().expect("signal lock").stopped
    }

    /// Wakes current waiters without stopping them.
    pub(crate) fn nudge(&self) {
        self.state.lock().expect("signal lock").nudges += 1;
        self.changed.notify_all();
    }

    /// Waits until `clock` reads at least `deadline_ms`, or a nudge, or a stop.
    pub(crate) fn wait_until(&self, clock: &dyn Clock, deadline_ms: i64) -> Wake {
        let mut state = self.state.lock().expect("signal lock");
        let nudges = state.nudges;
        loop {
            if state.stopped {
                return Wake::Stopped;
            }
            if state.nudges != nudges {
                return Wake::Nudged;
            }
            let now = clock.now_ms();
            if now >= deadline_ms {
                return Wake::Deadline;
            }
            let remaining = Duration::from_millis((deadline_ms - now) as u64);
            state = self
                .changed
                .wait_timeout(state, remaining.min(MAX_REAL_WAIT))
                .expect("signal lock")
                .0;
        }
    }

    /// Waits `duration_ms` of clock time (see [`wait_until`](Self::wait_until)).
    pub(crate) fn wait_ms(&self, clock: &dyn Clock, duration_ms: u64) -> Wake {
        self.wait_until(clock, clock.now_ms().saturating_add(duration_ms as i64))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_blockstore::ManualClock;

    use super::*;

    #[test]
    fn stop_wakes_a_waiter_on_a_manual_clock_that_never_moves() {
        let clock = Arc::new(ManualClock::new(0));
        let signal = Arc::new(StopSignal::new());
        let waiter = {
            let (clock, signal) = (clock.clone(), signal.clone());
            std::thread::spawn(move || signal.wait_until(&*clock, 1_000_000))
        };
        signal.stop();
        assert_eq!(waiter.join().unwrap(), Wake::Stopped);
        assert!(signal.is_stopped());
    }

    #[test]
    fn deadline_and_nudge() {
        let clock = Arc::new(ManualClock::new(0));
        let signal = Arc::new(StopSignal::new());
        assert_eq!(signal.wait_until(&*clock, 0), Wake::Deadline);
        let waiter = {
            let (clock, signal) = (clock.clone(), signal.clone());
            std::thread::spawn(move || signal.wait_until(&*clock, 100))
        };
        clock.advance_ms(100);
        assert_eq!(waiter.join().unwrap(), Wake::Deadline);
        let waiter = {
            let (clock, signal) = (clock.clone(), signal.clone());
            std::thread::spawn(move || signal.wait_ms(&*clock, 100))
        };
        // A nudge can only be observed by a waiter that started before it; keep nudging until the
        // waiter returns (it cannot reach its deadline: the clock does not move).
        while !waiter.is_finished() {
            signal.nudge();
            std::thread::yield_now();
        }
        assert_eq!(waiter.join().unwrap(), Wake::Nudged);
    }
}
