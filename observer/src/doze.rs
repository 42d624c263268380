//! When the reader stops draining its rings on a timer. Under traffic it drains every
//! `poll_interval_ms` (the probes write events without waking it: one wake-up per event would
//! cost more than the drain). After `reader_sleep_after_ms` with no TLS event it sets the sleep
//! flag the probes read, looks at the rings once more, and sleeps: every event written while the
//! flag is set wakes it (`BPF_RB_FORCE_WAKEUP`), and an event written just before the flag was
//! seen is followed by an empty wake-up event (`wake_if_asleep` in the eBPF crate). The 1 s
//! housekeeping tick still drains every ring while it sleeps.

use std::time::{Duration, Instant};

/// The reader's sleep state; the kernel flag itself is written by the caller.
#[derive(Debug)]
pub struct Doze {
    /// Quiet time before sleeping; `None` = never sleep.
    after: Option<Duration>,
    /// When the last drain that found work ran (or the reader woke).
    quiet_since: Instant,
    asleep: bool,
}

impl Doze {
    /// `after` of zero means the reader never sleeps.
    pub fn new(after: Duration, now: Instant) -> Self {
        Self {
            after: (!after.is_zero()).then_some(after),
            quiet_since: now,
            asleep: false,
        }
    }

    /// Whether the reader sleeps (its drain timer is stopped).
    pub fn asleep(&self) -> bool {
        self.asleep
    }

    /// After a timed drain: `busy` when it read a TLS event or egress accounting waits on a
    /// timer. Returns whether the reader has been quiet long enough to go to sleep.
    pub fn drained(&mut self, busy: bool, now: Instant) -> bool {
        if busy {
            self.quiet_since = now;
            return false;
        }
        self.after
            .is_some_and(|after| now.saturating_duration_since(self.quiet_since) >= after)
    }

    /// The flag is set and the last look at the rings found nothing.
    pub fn slept(&mut self) {
        self.asleep = true;
    }

    /// An event woke the reader (or the last look before sleeping found one): drain on the
    /// timer again, for at least another `after`.
    pub fn woke(&mut self, now: Instant) {
        self.asleep = false;
        self.quiet_since = now;
    }

    /// The flag cannot be written: drain on the timer for good (sleeping without the flag would
    /// leave events unread until the housekeeping tick).
    pub fn never_again(&mut self) {
        self.after = None;
        self.asleep = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(1);

    #[test]
    fn sleeps_only_after_a_quiet_spell() {
        let t0 = Instant::now();
        let mut d = Doze::new(AFTER, t0);
        assert!(!d.drained(false, t0 + Duration::from_millis(500)));
        // Work at 900 ms starts the spell again.
        assert!(!d.drained(true, t0 + Duration::from_millis(900)));
        assert!(!d.drained(false, t0 + Duration::from_millis(1500)));
        assert!(d.drained(false, t0 + Duration::from_millis(1900)));
        assert!(!d.asleep());
        d.slept();
        assert!(d.asleep());
    }

    #[test]
    fn a_wake_up_restarts_the_quiet_spell() {
        let t0 = Instant::now();
        let mut d = Doze::new(AFTER, t0);
        assert!(d.drained(false, t0 + AFTER));
        d.slept();
        let woke = t0 + Duration::from_secs(5);
        d.woke(woke);
        assert!(!d.asleep());
        assert!(!d.drained(false, woke + Duration::from_millis(999)));
        assert!(d.drained(false, woke + AFTER));
    }

    #[test]
    fn zero_or_a_broken_flag_never_sleeps() {
        let t0 = Instant::now();
        let mut d = Doze::new(Duration::ZERO, t0);
        assert!(!d.drained(false, t0 + Duration::from_secs(3600)));
        let mut d = Doze::new(AFTER, t0);
        d.slept();
        d.never_again();
        assert!(!d.asleep());
        assert!(!d.drained(false, t0 + Duration::from_secs(3600)));
    }
}
