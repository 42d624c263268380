//! Finds the OpenSSL code processes run: `libssl.so.*` mappings and executables that export
//! `SSL_write` themselves (node with built-in OpenSSL). Files are opened through /proc/PID/root so
//! container filesystems work, and identified by (device, inode) so each is attached once.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::attribution::{ProcessInfo, Rules};
use crate::bpf::{AttachOutcome, FileId, Probes};
use crate::metrics::Metrics;

mod go;

/// Directories where a host's own libssl lives, attached at start so processes started later are
/// covered from their first call.
const SYSTEM_LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/usr/lib/aarch64-linux-gnu",
];

/// Candidate files of one process: (path inside its mount namespace, reachable path).
pub fn candidates(pid: u32) -> Vec<PathBuf> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut out = Vec::new();
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        out.push(join_root(&root, &exe));
    }
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return out;
    };
    for line in maps.lines() {
        // addr perms offset dev inode path
        let mut parts = line.split_whitespace();
        let perms = parts.nth(1).unwrap_or("");
        let Some(path) = parts.nth(3) else { continue };
        if !perms.contains('x') || !path.starts_with('/') || line.ends_with("(deleted)") {
            continue;
        }
        if is_libssl(path) || path.contains("libnode.so") {
            let p = join_root(&root, Path::new(path));
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

fn join_root(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// `libssl.so`, `libssl.so.3`, `libssl.so.1.1`, ...
pub fn is_libssl(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with("libssl.so"))
}

/// Device and inode of a file.
pub fn file_id(path: &Path) -> Option<FileId> {
    let md = std::fs::metadata(path).ok()?;
    md.is_file().then(|| FileId {
        dev: md.dev(),
        ino: md.ino(),
    })
}

/// All numeric entries of /proc.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Attaches to every new OpenSSL file `pid` uses; returns how many files were newly attached.
pub fn attach_process(probes: &mut Probes, pid: u32) -> usize {
    let mut attached = 0;
    for path in candidates(pid) {
        attached += attach_path(probes, &path);
    }
    attached
}

/// Attaches to one file if it is new and defines the OpenSSL API. The file is read once (section
/// headers and dynamic symbols only) and every probe is attached at its resolved offset.
pub fn attach_path(probes: &mut Probes, path: &Path) -> usize {
    let Some(id) = file_id(path) else { return 0 };
    if probes.knows(id) {
        return 0;
    }
    // Hold the file open and attach through /proc/self/fd: a short-lived process (and with it
    // /proc/PID/root) may vanish while the file is being resolved.
    let Ok(file) = std::fs::File::open(path) else {
        return 0;
    };
    let stable = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let Some(symbols) = crate::elf::ssl_symbols(&stable) else {
        if let Some(n) = go::attach_go_file(probes, id, &file, &stable, &path.to_string_lossy()) {
            return n;
        }
        probes.remember_not_ssl(id);
        return 0;
    };
    match probes.attach_file(id, &stable, &symbols) {
        Ok(AttachOutcome::Attached(n)) => {
            tracing::info!(path = %path.display(), probes = n, "attached to OpenSSL");
            1
        }
        Ok(_) => 0,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "cannot attach");
            0
        }
    }
}

/// Runtimes that commonly carry their own OpenSSL: attached at start so their first call after an
/// exec is not missed while the (large) binary is being resolved.
const STATIC_OPENSSL_BINARIES: &[&str] =
    &["/usr/bin/node", "/usr/local/bin/node", "/usr/bin/nodejs"];

/// Attaches to the host's own libssl files and known static-OpenSSL runtimes, used or not yet.
pub fn attach_system_libs(probes: &mut Probes) -> usize {
    let mut attached = 0;
    for bin in STATIC_OPENSSL_BINARIES {
        attached += attach_path(probes, Path::new(bin));
    }
    for dir in SYSTEM_LIB_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            // Only versioned sonames: libssl.so (dev symlink) resolves to the same inode anyway.
            if name.starts_with("libssl.so.") {
                attached += attach_path(probes, &e.path());
            }
        }
    }
    attached
}

/// Delays after an exec at which the new process is scanned (libssl is mapped by ld.so or a
/// later dlopen, not at exec time).
const EXEC_SCANS_MS: [u64; 5] = [0, 25, 150, 600, 2500];
/// How long an exited process's kernel exclusion is kept (its last events may still be queued).
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// What the reader tells the discovery thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcNote {
    /// A process called execve.
    Exec(u32),
    /// A process exited.
    Exit(u32),
}

/// The discovery thread's state: owns the programs (attaching) and the process exclusions. All
/// the slow work — ELF reads, aya attaches, /proc scans — happens here, never on the thread that
/// drains the ring buffer.
pub struct Discovery {
    probes: Probes,
    rules: Rules,
    metrics: Arc<Metrics>,
    to_reader: tokio::sync::mpsc::UnboundedSender<ProcessInfo>,
    scans: BTreeMap<Instant, Vec<u32>>,
    dying: Vec<(Instant, u32)>,
    rescan: Duration,
}

impl Discovery {
    /// A discovery over loaded probes.
    pub fn new(
        probes: Probes,
        rules: Rules,
        metrics: Arc<Metrics>,
        to_reader: tokio::sync::mpsc::UnboundedSender<ProcessInfo>,
        rescan: Duration,
    ) -> Discovery {
        Discovery {
            probes,
            rules,
            metrics,
            to_reader,
            scans: BTreeMap::new(),
            dying: Vec::new(),
            rescan,
        }
    }

    /// Attaches the host's libraries and every running process's OpenSSL, then sends on `ready`
    /// and serves process notes until `notes` is closed or `stop` is set.
    pub fn run(mut self, notes: &Receiver<ProcNote>, ready: &Sender<usize>, stop: &AtomicBool) {
        attach_system_libs(&mut self.probes);
        self.scan_all();
        let _ = ready.send(self.probes.attached_files());
        let mut next_rescan = Instant::now() + self.rescan;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let mut until = next_rescan.min(now + Duration::from_millis(200));
            if let Some((&t, _)) = self.scans.first_key_value() {
                until = until.min(t);
            }
            match notes.recv_timeout(until.saturating_duration_since(now)) {
                Ok(note) => self.note(note),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.run_scans();
            let now = Instant::now();
            if now >= next_rescan {
                self.scan_all();
                next_rescan = now + self.rescan;
            }
            self.forget_exited(now);
        }
    }

    fn note(&mut self, note: ProcNote) {
        let now = Instant::now();
        match note {
            ProcNote::Exec(pid) => {
                // The new image's comm/exe/cgroup, read while the process surely exists: handed
                // to the reader for attribution of short-lived processes.
                if let Ok(info) = ProcessInfo::read(Path::new("/proc"), pid) {
                    if self.rules.excluded(&info) {
                        let _ = self.probes.skip_pid(pid, true);
                    }
                    let _ = self.to_reader.send(info);
                }
                for ms in EXEC_SCANS_MS {
                    self.scans
                        .entry(now + Duration::from_millis(ms))
                        .or_default()
                        .push(pid);
                }
            }
            ProcNote::Exit(pid) => self.dying.push((now + EXIT_GRACE, pid)),
        }
    }

    fn run_scans(&mut self) {
        let now = Instant::now();
        let later = self.scans.split_off(&(now + Duration::from_nanos(1)));
        let due = std::mem::replace(&mut self.scans, later);
        let mut attached = 0;
        for pid in due.into_values().flatten() {
            let t = Instant::now();
            attached += attach_process(&mut self.probes, pid);
            tracing::debug!(pid, took_us = t.elapsed().as_micros() as u64, "exec scan");
        }
        if attached > 0 {
            self.publish();
        }
    }

    fn scan_all(&mut self) {
        let excludes = self.rules.has_excludes();
        for pid in all_pids() {
            attach_process(&mut self.probes, pid);
            if excludes
                && let Ok(info) = ProcessInfo::read(Path::new("/proc"), pid)
                && self.rules.excluded(&info)
            {
                let _ = self.probes.skip_pid(pid, true);
            }
        }
        self.publish();
    }

    fn forget_exited(&mut self, now: Instant) {
        if self.dying.is_empty() {
            return;
        }
        let (gone, keep): (Vec<_>, Vec<_>) = self.dying.drain(..).partition(|(t, _)| *t <= now);
        self.dying = keep;
        for (_, pid) in gone {
            let _ = self.probes.skip_pid(pid, false);
        }
    }

    fn publish(&self) {
        self.metrics
            .attached_files
            .set(i64::try_from(self.probes.attached_files()).unwrap_or(0));
        for outcome in crate::bpf::GoOutcome::ALL {
            self.metrics
                .go_binaries
                .get_or_create(&crate::metrics::OutcomeLabels {
                    outcome: outcome.label().to_owned(),
                })
                .set(i64::try_from(self.probes.go_binaries(outcome)).unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libssl_names() {
        assert!(is_libssl("/usr/lib/x86_64-linux-gnu/libssl.so.3"));
        assert!(is_libssl("/opt/app/libssl.so.1.1"));
        assert!(!is_libssl("/usr/lib/libssl3.so"));
        assert!(!is_libssl("/usr/lib/libcrypto.so.3"));
    }

    #[test]
    fn own_process_has_candidates() {
        let c = candidates(std::process::id());
        assert!(
            c[0].starts_with(format!("/proc/{}/root", std::process::id())),
            "{c:?}"
        );
    }
}
