//! `/sys/kernel/rcu_expedited` switched on while probes are attached.
//!
//! Attaching a uprobe waits for RCU grace periods inside `perf_event_open` (`synchronize_rcu`
//! in the syscall, `rcu_sync_enter` on `dup_mmap_sem` in `register_for_each_vma`). Measured on
//! the 2-core VM (kernel 6.18, docs/observer.md): the nine probes of a libssl no probe used
//! before took 11–28 ms to attach host-wide, 1.4–6 ms with the knob on; in one process (on
//! connect) 12–30 ms against 4–8 ms. A process that writes TLS inside that window is not seen,
//! so every attach runs expedited unless `expedite_rcu = false`. An expedited grace period
//! interrupts every CPU once.

const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// `rcu_expedited` on for as long as it lives, then back to what it was. Nested guards are
/// free: an inner one finds the knob on and leaves it to the outer one.
pub struct ExpeditedRcu {
    restore: bool,
}

impl ExpeditedRcu {
    /// Switches the knob on if it is off.
    pub fn begin() -> ExpeditedRcu {
        let was = std::fs::read_to_string(RCU_EXPEDITED).unwrap_or_default();
        if was.trim() != "0" {
            // Already on (an operator's choice, or an outer guard), or no such knob: nothing
            // to do or undo.
            return ExpeditedRcu { restore: false };
        }
        let restore = std::fs::write(RCU_EXPEDITED, "1").is_ok();
        ExpeditedRcu { restore }
    }
}

impl Drop for ExpeditedRcu {
    fn drop(&mut self) {
        if self.restore && std::fs::write(RCU_EXPEDITED, "0").is_err() {
            tracing::warn!("could not restore {RCU_EXPEDITED} to 0");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knob() -> String {
        std::fs::read_to_string(RCU_EXPEDITED)
            .expect("read rcu_expedited")
            .trim()
            .to_owned()
    }

    /// Needs root (the knob is root-writable); the observer runs as root and so do the tests.
    #[test]
    fn guards_switch_the_knob_on_and_the_outer_one_restores_it() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root to write {RCU_EXPEDITED}"
        );
        let before = knob();
        {
            let outer = ExpeditedRcu::begin();
            assert_eq!(knob(), "1");
            {
                let inner = ExpeditedRcu::begin();
                assert!(!inner.restore, "the inner guard finds the knob on");
            }
            assert_eq!(
                knob(),
                "1",
                "the inner guard leaves the knob to the outer one"
            );
            assert_eq!(outer.restore, before == "0");
        }
        assert_eq!(
            knob(),
            before,
            "an operator's 1 stays; our 1 goes back to 0"
        );
    }
}
