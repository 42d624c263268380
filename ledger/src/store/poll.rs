//! One schedule for the background polls of a process (the budget list here; the enforcer's
//! runtime keys, rule sets and lease sweeper): ticks fall on multiples of each poll's period from
//! one shared start, so polls whose periods divide one another (the 250 ms key poll and the
//! 1 s ones) wake the runtime together. Each poll started on its own clock woke it separately: an
//! idle enforcer's runtime woke ~17.6 times a second for its six Redis polls a second
//! (docs/benchmarks.md, "An enforcer at rest").

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// A ticker every `every` on the process's shared schedule: the first tick at once, then on
/// multiples of `every` counted from the schedule's start; a tick missed while the runtime was
/// busy is skipped (no burst of polls after a stall).
///
/// # Panics
/// When `every` is zero (as [`tokio::time::interval`]).
#[must_use]
pub fn poll_ticks(every: Duration) -> Interval {
    static START: OnceLock<Instant> = OnceLock::new();
    let now = Instant::now();
    schedule(*START.get_or_init(|| now), now, every)
}

/// Ticks every `every` on multiples of it from `start` (at once first), missed ticks skipped.
fn schedule(start: Instant, now: Instant, every: Duration) -> Interval {
    // Only a test's paused clock can run behind the shared start; it then keeps its own.
    let mut t = tokio::time::interval_at(start.min(now), every);
    t.set_missed_tick_behavior(MissedTickBehavior::Skip);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn polls_started_apart_tick_together() {
        let start = Instant::now();
        let mut fast = schedule(start, Instant::now(), Duration::from_millis(250));
        assert_eq!(fast.tick().await, start, "the first tick is at once");
        tokio::time::sleep(Duration::from_millis(130)).await;
        let mut slow = schedule(start, Instant::now(), Duration::from_secs(1));
        slow.tick().await; // at once, like tokio's interval
        // Both polled at once, as their tasks are.
        let (slow_ticks, fast_ticks) = tokio::join!(
            async {
                let mut v = Vec::new();
                for _ in 0..3 {
                    v.push(slow.tick().await);
                }
                v
            },
            async {
                let mut v = Vec::new();
                for _ in 0..14 {
                    v.push(fast.tick().await);
                }
                v
            }
        );
        for t in &slow_ticks {
            assert_eq!(
                (*t - start).as_millis() % 1000,
                0,
                "a 1 s tick off the shared schedule"
            );
            assert!(fast_ticks.contains(t), "the 250 ms poll missed {t:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_skips_ticks_instead_of_bursting() {
        let start = Instant::now();
        let mut t = schedule(start, start, Duration::from_millis(250));
        t.tick().await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let stalled = Instant::now();
        // The one missed tick fires at once; the next waits for the schedule's next multiple.
        t.tick().await;
        assert_eq!(Instant::now(), stalled, "the missed tick waited");
        let next = t.tick().await;
        assert_eq!(
            next - start,
            Duration::from_millis(1250),
            "a burst after the stall"
        );
    }

    #[tokio::test]
    async fn the_process_shares_one_schedule() {
        let mut a = poll_ticks(Duration::from_millis(250));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut b = poll_ticks(Duration::from_secs(1));
        // The first tick of each is the schedule's start.
        assert_eq!(
            a.tick().await,
            b.tick().await,
            "two polls of the process on different schedules"
        );
    }
}
