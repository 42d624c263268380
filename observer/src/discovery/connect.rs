//! `attach = "on-connect"`: a process gets the TLS probes when the egress accounting sees it
//! connect to a provider, and loses them when it execs or exits.
//!
//! The probes race the process's TLS handshake: its first request is written one handshake
//! after the connect. Measured on the 2-core VM (kernel 6.18, docs/observer.md): the window from
//! the connect to live probes was 12–30 ms, almost all of it RCU grace periods the kernel waits
//! for inside `perf_event_open` (`synchronize_rcu` in the syscall and `rcu_sync_enter` on
//! `dup_mmap_sem` in `register_for_each_vma`). Two things shorten it:
//! - the TLS files a process of the same executable used are attached first, from handles the
//!   observer holds, before the process's mappings are read;
//! - while attaching, `/sys/kernel/rcu_expedited` is set (and restored), so those grace periods
//!   are expedited: 4–8 ms (`bpf/rcu.rs`; `expedite_rcu = false` turns that off).

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Instant;

use super::{Discovery, Trigger, attach_process, go, monotonic_ns};
use crate::attribution::ProcessInfo;
use crate::bpf::{AttachOutcome, FileId, Probes, Scope, Sites};

/// Identity of the executable process `pid` runs.
fn exe_id(pid: u32) -> Option<FileId> {
    let md = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    Some(FileId {
        dev: md.dev(),
        ino: md.ino(),
    })
}

/// Attaches a file whose sites are known, through the observer's own handle, in `scope`.
fn attach_known(probes: &mut Probes, id: FileId, scope: Scope) -> usize {
    if probes.knows(id, scope) {
        return 0;
    }
    let Some((sites, path, label)) = probes.known(id) else {
        return 0;
    };
    match sites {
        Sites::Go(tls) => go::attach_go_sites(probes, id, &path, &label, &tls, scope, false),
        Sites::Ssl(symbols) => match probes.attach_file(id, &path, &symbols, scope) {
            Ok(AttachOutcome::Attached(_)) => 1,
            Ok(_) => 0,
            Err(e) => {
                tracing::debug!(path = label, error = %format!("{e:#}"), "cannot attach");
                0
            }
        },
    }
}

impl Discovery {
    /// A process connected to a provider (on connect): its TLS files get probes of their own,
    /// unless it is excluded. A process scanned on a connect less than
    /// [`super::CONNECT_RESCAN`] ago is not scanned again (a library it opens later is reported
    /// by the open tracepoints).
    pub(super) fn connected(&mut self, pid: u32, ts_ns: u64, now: Instant) {
        if !self.on_connect {
            return;
        }
        let Some(scope) = Scope::process(pid) else {
            return;
        };
        if self
            .connect_scans
            .get(&pid)
            .is_some_and(|&(t, _)| now.duration_since(t) < super::CONNECT_RESCAN)
        {
            return;
        }
        let connect_ns = if ts_ns > 0 { ts_ns } else { monotonic_ns() };
        self.connect_scans.insert(pid, (now, connect_ns));
        if let Ok(info) = ProcessInfo::read(Path::new("/proc"), pid)
            && self.rules.excluded(&info)
        {
            let _ = self.probes.skip_pid(pid, true);
            return;
        }
        self.probes.connecting();
        let rcu = self.probes.expedited();
        let picked = monotonic_ns();
        let exe = exe_id(pid);
        let mut files = 0;
        for id in exe.map(|e| self.probes.exe_files(e)).unwrap_or_default() {
            files += attach_known(&mut self.probes, id, scope);
        }
        let live_ns = (files > 0).then(monotonic_ns);
        files += attach_process(&mut self.probes, pid, scope);
        drop(rcu);
        self.probes.connecting();
        if files == 0 {
            return;
        }
        if let Some(exe) = exe {
            self.probes.remember_exe(exe, pid);
        }
        self.metrics
            .attached(Trigger::Connect(ts_ns).label(), files);
        if ts_ns > 0 {
            let window_ns = live_ns.unwrap_or_else(monotonic_ns).saturating_sub(ts_ns);
            self.metrics.connect_attach.observe(window_ns as f64 / 1e9);
            tracing::info!(
                pid,
                files,
                queued_us = picked.saturating_sub(ts_ns) / 1000,
                window_us = window_ns / 1000,
                from_exe = live_ns.is_some(),
                "probes live in a process that connected to a provider"
            );
        } else {
            tracing::info!(
                pid,
                files,
                "probes live in a process connected before the start"
            );
        }
        self.publish();
    }

    /// Detaches a process's own probes (on connect); whether it had any.
    pub(super) fn forget_process(&mut self, pid: u32) -> bool {
        self.connect_scans.remove(&pid);
        let links = self.probes.detach_process(pid);
        if links > 0 {
            tracing::debug!(pid, links, "process probes detached");
        }
        links > 0
    }
}
