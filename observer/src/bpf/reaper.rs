//! Closes the probes of processes that exec'd or exited (`attach = "on-connect"`), away from
//! the attaches.
//!
//! Closing a uprobe's perf event and its BPF link waits for RCU grace periods, Tasks Trace RCU
//! among them (`uprobe_unregister_sync`, `perf_event_detach_bpf_prog`): measured on the 2-core
//! VM, 0.8–1 s for a process's nine probes, and an attach that runs meanwhile takes 25–55 ms
//! instead of 2 ms, long enough to miss a process's first request. So the links wait here
//! until no process has connected to a provider for [`QUIET`], and are closed one at a time,
//! re-checking between each; more than [`MAX_WAITING`] waiting links are closed regardless (each
//! holds two descriptors, and each stays a consumer the kernel's uprobe handler walks).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use aya::programs::uprobe::UProbeLink;

/// Links are closed only after this long without a provider connect.
const QUIET: Duration = Duration::from_secs(3);
/// Links waiting beyond this are closed at once.
const MAX_WAITING: usize = 2048;

/// The discovery thread's side.
pub(super) struct Reaper {
    tx: Sender<Vec<UProbeLink>>,
    /// Milliseconds since `epoch` of the last connect (or attach).
    last_busy: Arc<AtomicU64>,
    epoch: Instant,
}

impl Reaper {
    /// Starts the closing thread; `None` if it cannot be spawned.
    pub(super) fn start() -> Option<Reaper> {
        let (tx, rx) = std::sync::mpsc::channel();
        let last_busy = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let busy = last_busy.clone();
        std::thread::Builder::new()
            .name("observer-detach".into())
            .spawn(move || run(&rx, &busy, epoch))
            .ok()?;
        Some(Reaper {
            tx,
            last_busy,
            epoch,
        })
    }

    /// Hands links over to be closed; gives them back if the thread is gone.
    pub(super) fn close(&self, links: Vec<UProbeLink>) -> Result<(), Vec<UProbeLink>> {
        self.tx.send(links).map_err(|e| e.0)
    }

    /// Marks now as busy: nothing is closed for [`QUIET`].
    pub(super) fn busy(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_busy.store(ms, Ordering::Relaxed);
    }
}

fn run(rx: &Receiver<Vec<UProbeLink>>, busy: &AtomicU64, epoch: Instant) {
    let mut waiting: VecDeque<UProbeLink> = VecDeque::new();
    let quiet = || {
        let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(busy.load(Ordering::Relaxed)) >= QUIET.as_millis() as u64
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(links) => waiting.extend(links),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while let Ok(links) = rx.try_recv() {
            waiting.extend(links);
        }
        let mut closed = 0;
        let started = Instant::now();
        while !waiting.is_empty() && (quiet() || waiting.len() > MAX_WAITING) {
            drop(waiting.pop_front());
            closed += 1;
        }
        if closed > 0 {
            tracing::debug!(
                links = closed,
                waiting = waiting.len(),
                took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                "probes detached"
            );
        }
    }
}
