//! [`AutoAdvanceClock`]: virtual time that jumps to the end of every sleep.

use std::sync::Mutex;

use crate::Clock;

/// A clock whose `sleep_until` returns at once after moving time to the deadline, recording each
/// wait. Several threads may share it; time only moves forward.
///
/// ```
/// use std::time::Duration;
/// use sluice_blockstore::Clock;
/// use sluice_blockstore::testing::AutoAdvanceClock;
/// let clock = AutoAdvanceClock::new(1_000);
/// clock.sleep(Duration::from_millis(250));
/// assert_eq!(clock.now_ms(), 1_250);
/// assert_eq!(clock.sleeps(), vec![250]);
/// ```
#[derive(Debug, Default)]
pub struct AutoAdvanceClock {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    now_ms: i64,
    sleeps: Vec<i64>,
}

impl AutoAdvanceClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: i64) -> Self {
        Self {
            state: Mutex::new(State {
                now_ms: start_ms,
                sleeps: Vec::new(),
            }),
        }
    }

    /// The length of every wait so far, in ms, in order (waits that were already due are not
    /// recorded).
    pub fn sleeps(&self) -> Vec<i64> {
        self.state.lock().expect("clock lock").sleeps.clone()
    }

    /// Moves time forward by `delta_ms` without recording a sleep.
    pub fn advance_ms(&self, delta_ms: i64) {
        self.state.lock().expect("clock lock").now_ms += delta_ms.max(0);
    }
}

impl Clock for AutoAdvanceClock {
    fn now_ms(&self) -> i64 {
        self.state.lock().expect("clock lock").now_ms
    }

    fn sleep_until(&self, deadline_ms: i64) {
        let mut state = self.state.lock().expect("clock lock");
        if deadline_ms > state.now_ms {
            let wait = deadline_ms - state.now_ms;
            state.sleeps.push(wait);
            state.now_ms = deadline_ms;
        }
    }
}
