//! The stop signal of the observer's own threads (discovery, the egress resolver): a flag they
//! can also sleep on, so a thread with nothing to do for a minute sleeps for that minute and
//! still stops at once, instead of waking every few hundred ms to look at a flag.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Set once, at the daemon's stop; never cleared.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl StopSignal {
    /// Sets the flag and wakes every thread sleeping in [`StopSignal::sleep`].
    pub fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.changed.notify_all();
    }

    /// Whether [`StopSignal::stop`] was called.
    pub fn stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps for `d` or until the stop, whichever comes first; returns whether stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        while !*stopped {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            stopped = self
                .changed
                .wait_timeout(stopped, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *stopped
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_sleep_ends_at_its_time_without_a_stop() {
        let s = StopSignal::default();
        let t = Instant::now();
        assert!(!s.sleep(Duration::from_millis(50)));
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(!s.stopped());
    }

    #[test]
    fn a_stop_ends_a_long_sleep_at_once() {
        let s = Arc::new(StopSignal::default());
        let sleeper = {
            let s = s.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                (s.sleep(Duration::from_secs(60)), t.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        s.stop();
        let (stopped, slept) = sleeper.join().expect("sleeper");
        assert!(stopped);
        assert!(slept < Duration::from_secs(10), "slept {slept:?}");
        // Stopped for good: a later sleep returns at once.
        assert!(s.sleep(Duration::from_secs(60)));
        assert!(s.stopped());
    }
}
