//! Finds the OpenSSL code processes run: `libssl.so.*` mappings and executables that export
//! `SSL_write` themselves (node with built-in OpenSSL). Files are opened as mapped
//! (`/proc/PID/map_files`, `/proc/PID/exe`; see `mapped.rs`) so chroots, containers and files
//! replaced on disk work, and identified by (device, inode) so each is attached once.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::attribution::{ProcessInfo, Rules};
use crate::bpf::{AttachOutcome, FileId, Probes, Scope, Sites};
use crate::metrics::Metrics;
use crate::stop::StopSignal;

mod connect;
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

/// An OpenSSL candidate of one process, already open: the file the kernel maps, whatever the
/// process's root or whether the file was replaced on disk since.
pub struct Candidate {
    /// The path as the process's maps print it (for logs).
    pub label: String,
    /// A mapped library (not the process's executable).
    pub library: bool,
    /// The open file.
    pub file: File,
}

/// Candidate files of one process: its executable (node with built-in OpenSSL) and its mapped
/// `libssl.so.*` / `libnode.so*`, each opened through [`crate::mapped`].
pub fn candidates(pid: u32) -> Vec<Candidate> {
    let mut out = Vec::new();
    if let Some(file) = crate::mapped::open_exe(pid) {
        let label = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_or_else(|_| format!("/proc/{pid}/exe"), |p| p.display().to_string());
        out.push(Candidate {
            label,
            library: false,
            file,
        });
    }
    let mut seen: Vec<String> = Vec::new();
    for entry in crate::mapped::exec_mappings(pid) {
        if !is_tls_library(&entry.path) || seen.contains(&entry.path) {
            continue;
        }
        seen.push(entry.path.clone());
        match crate::mapped::open_mapped(pid, &entry) {
            Some((file, how)) => {
                tracing::debug!(pid, path = %entry.path, ?how, deleted = entry.deleted, "mapped OpenSSL candidate");
                out.push(Candidate {
                    label: entry.path,
                    library: true,
                    file,
                });
            }
            None => tracing::debug!(pid, path = %entry.path, "mapped file not reachable"),
        }
    }
    out
}

/// `libssl.so`, `libssl.so.3`, `libssl.so.1.1`, ...
pub fn is_libssl(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with("libssl.so"))
}

/// The libraries the kernel reports as they are opened (the eBPF `is_tls_library`): `libssl.so*`
/// and `libnode.so*` (node built as a shared library).
pub fn is_tls_library(path: &str) -> bool {
    is_libssl(path)
        || path
            .rsplit('/')
            .next()
            .is_some_and(|name| name.starts_with("libnode.so"))
}

/// Device and inode of an open file (the identity probes are keyed by).
pub fn open_file_id(file: &File) -> Option<FileId> {
    let md = file.metadata().ok()?;
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

/// Attaches to every new TLS file `pid` uses, firing in `scope`; returns how many files were
/// newly attached.
pub fn attach_process(probes: &mut Probes, pid: u32, scope: Scope) -> usize {
    let mut attached = 0;
    for c in candidates(pid) {
        attached += attach_open(probes, &c.file, &c.label, scope);
    }
    attached
}

/// What a TLS-library open reported by the kernel led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Files newly attached.
    pub attached: usize,
    /// Whether a library of that file name is mapped (attached now or before); `false` means not
    /// mapped yet, or the open failed (the loader tries each directory of its search path), or the
    /// process is gone: look again shortly.
    pub found: bool,
}

/// Attaches to the TLS libraries process `pid` maps, after the kernel reported it opening one
/// named `name` (its first 16 bytes), firing in `scope`.
pub fn attach_opened(probes: &mut Probes, pid: u32, name: &[u8], scope: Scope) -> Opened {
    let mut out = Opened {
        attached: 0,
        found: false,
    };
    for c in candidates(pid) {
        let file_name = c.label.rsplit('/').next().unwrap_or("").as_bytes();
        out.found |= c.library && file_name.starts_with(name);
        out.attached += attach_open(probes, &c.file, &c.label, scope);
    }
    out
}

/// Attaches to one file (by path) if it is new and defines the OpenSSL API.
pub fn attach_path(probes: &mut Probes, path: &Path) -> usize {
    match File::open(path) {
        Ok(file) => attach_open(probes, &file, &path.display().to_string(), Scope::All),
        Err(_) => 0,
    }
}

/// Attaches to an open file if it is new (for `scope`) and defines the OpenSSL API or is a Go
/// binary using crypto/tls. The file is read once (section headers and dynamic symbols only;
/// the sites are kept for per-process scopes) and every probe is attached at its resolved
/// offset, through `/proc/self/fd/N`: the kernel resolves that link to the very inode held open
/// (a map_files reference, a deleted file, a file under another root), and a short-lived process
/// vanishing mid-attach does not matter.
pub fn attach_open(probes: &mut Probes, file: &File, label: &str, scope: Scope) -> usize {
    let Some(id) = open_file_id(file) else {
        return 0;
    };
    if probes.knows(id, scope) {
        return 0;
    }
    let stable = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let cached = probes.sites(id).cloned();
    let first = cached.is_none();
    let sites = match cached {
        Some(sites) => sites,
        None => match crate::elf::ssl_symbols_of(file, &stable) {
            Some(symbols) => Sites::Ssl(symbols),
            None => match go::inspect_go_file(probes, id, file, label) {
                go::GoFile::Tls(tls) => Sites::Go(tls),
                go::GoFile::Unprobed => return 0,
                go::GoFile::NotGo => {
                    probes.remember_not_ssl(id);
                    return 0;
                }
            },
        },
    };
    if first && scope != Scope::All {
        probes.remember_sites(id, sites.clone(), file, label);
    }
    let symbols = match sites {
        Sites::Ssl(symbols) => symbols,
        Sites::Go(tls) => {
            return go::attach_go_sites(probes, id, &stable, label, &tls, scope, first);
        }
    };
    match probes.attach_file(id, &stable, &symbols, scope) {
        Ok(AttachOutcome::Attached(n)) => {
            tracing::info!(
                path = label,
                dev = id.dev,
                ino = id.ino,
                probes = n,
                writes = symbols.writes.as_str(),
                reads = symbols.reads.as_str(),
                ?scope,
                "attached to OpenSSL"
            );
            1
        }
        Ok(_) => 0,
        Err(e) => {
            tracing::warn!(path = label, error = %format!("{e:#}"), "cannot attach");
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

/// Delays after an exec at which the new process is scanned when the kernel reports TLS libraries
/// as they are opened: at once (the executable itself, e.g. node with built-in OpenSSL), and a
/// late safety net (counted as `rescan`).
const EXEC_SCANS_MS: [u64; 2] = [0, 2500];
/// The same without open events (a kernel whose open tracepoints differ): libssl is mapped by
/// ld.so or a later dlopen, so the new process is scanned several times.
const EXEC_SCANS_BLIND_MS: [u64; 5] = [0, 25, 150, 600, 2500];
/// Delays at which a process is looked at again when its TLS library was reported opened but was
/// neither held open nor mapped yet.
const OPEN_RETRIES_MS: [u64; 4] = [1, 5, 25, 100];
/// On connect: a process scanned at a connect is not scanned again at its next connects for
/// this long (a library opened later is reported by the open tracepoints).
const CONNECT_RESCAN: Duration = Duration::from_secs(2);
/// How long an exited process's kernel exclusion is kept (its last events may still be queued).
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// What the reader tells the discovery thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcNote {
    /// A process called execve.
    Exec {
        /// The process.
        pid: u32,
        /// When (kernel monotonic clock, ns).
        ts_ns: u64,
    },
    /// A process exited.
    Exit(u32),
    /// A process is opening a file named like a TLS library.
    TlsOpen {
        /// The process.
        pid: u32,
        /// The file name (its first 16 bytes, NUL-padded).
        name: [u8; 16],
        /// When (kernel monotonic clock, ns).
        ts_ns: u64,
    },
    /// A process opened a TCP connection to a provider address (`attach = "on-connect"`), or
    /// held one when the observer started (`ts_ns` 0).
    Connect {
        /// The process.
        pid: u32,
        /// When (kernel monotonic clock, ns).
        ts_ns: u64,
    },
    /// The daemon stops: wakes the thread to read its stop signal.
    Stop,
}

/// What made discovery look at a process (the `trigger` label of `attaches`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The scan of a just exec'd process.
    Exec,
    /// The kernel reported a TLS library opened at this kernel time (ns).
    Open(u64),
    /// The process connected to a provider at this kernel time (ns; 0: before the start).
    Connect(u64),
    /// A timed scan: the safety net.
    Rescan,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Exec => "exec",
            Trigger::Open(_) => "open",
            Trigger::Connect(_) => "connect",
            Trigger::Rescan => "rescan",
        }
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Which processes get probes (`attach` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Every process, from its exec.
    All,
    /// Processes that connect to a provider, each with probes of its own.
    OnConnect,
}

/// The discovery thread's state: owns the programs (attaching) and the process exclusions. All
/// the slow work — ELF reads, aya attaches, /proc scans — happens here, never on the thread that
/// drains the ring buffer.
pub struct Discovery {
    probes: Probes,
    rules: Rules,
    metrics: Arc<Metrics>,
    to_reader: tokio::sync::mpsc::UnboundedSender<ProcessInfo>,
    scans: BTreeMap<Instant, Vec<(u32, Trigger)>>,
    dying: Vec<(Instant, u32)>,
    rescan: Duration,
    /// `attach = "on-connect"`: probes only in processes that connect to a provider.
    on_connect: bool,
    /// When each process with its own probes was last scanned on a connect, and the kernel
    /// time of that connect.
    connect_scans: std::collections::HashMap<u32, (Instant, u64)>,
}

impl Discovery {
    /// A discovery over loaded probes.
    pub fn new(
        probes: Probes,
        rules: Rules,
        metrics: Arc<Metrics>,
        to_reader: tokio::sync::mpsc::UnboundedSender<ProcessInfo>,
        rescan: Duration,
        attach: AttachMode,
    ) -> Discovery {
        Discovery {
            probes,
            rules,
            metrics,
            to_reader,
            scans: BTreeMap::new(),
            dying: Vec::new(),
            rescan,
            on_connect: attach != AttachMode::All,
            connect_scans: std::collections::HashMap::new(),
        }
    }

    /// Attaches the host's libraries and every running process's OpenSSL, then sends on `ready`
    /// and serves process notes until `notes` is closed or `stop` is set.
    pub fn run(mut self, notes: &Receiver<ProcNote>, ready: &Sender<usize>, stop: &StopSignal) {
        // On connect, nothing is attached host-wide: processes get probes as they connect (those
        // connected before the start are reported by the egress resolver's scan).
        if !self.on_connect {
            let mut attached = attach_system_libs(&mut self.probes);
            attached += self.scan_all();
            self.metrics.attached("startup", attached);
        }
        let _ = ready.send(self.probes.attached_files());
        let mut next_rescan = Instant::now() + self.rescan;
        // Sleeps until a note, the next scan due, the next exited process to forget or the
        // rescan; the stop sends a note ([`ProcNote::Stop`]).
        while !stop.stopped() {
            let now = Instant::now();
            let mut until = next_rescan;
            if let Some((&t, _)) = self.scans.first_key_value() {
                until = until.min(t);
            }
            if let Some(t) = self.dying.iter().map(|&(t, _)| t).min() {
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
                let found = self.scan_all();
                self.metrics.attached("rescan", found);
                if found > 0 {
                    tracing::warn!(
                        files = found,
                        "the periodic rescan found TLS libraries no event reported"
                    );
                }
                next_rescan = now + self.rescan;
            }
            self.forget_exited(now);
        }
    }

    fn note(&mut self, note: ProcNote) {
        let now = Instant::now();
        match note {
            ProcNote::Exec { pid, ts_ns } => {
                // The new image's comm/exe/cgroup, read while the process surely exists: handed
                // to the reader for attribution of short-lived processes.
                if let Ok(info) = ProcessInfo::read(Path::new("/proc"), pid) {
                    if self.rules.excluded(&info) {
                        let _ = self.probes.skip_pid(pid, true);
                    }
                    let _ = self.to_reader.send(info);
                }
                if self.on_connect {
                    // The old image's probes go with it; the new one gets its own at its first
                    // connect. (The rings are drained in turn: a connect of the new image may
                    // have been handled first, and its probes stay.)
                    let before_exec = self
                        .connect_scans
                        .get(&pid)
                        .is_some_and(|&(_, connect_ns)| connect_ns < ts_ns);
                    if before_exec && self.forget_process(pid) {
                        self.publish();
                    }
                    return;
                }
                let delays: &[u64] = if self.probes.open_events() {
                    &EXEC_SCANS_MS
                } else {
                    &EXEC_SCANS_BLIND_MS
                };
                for &ms in delays {
                    let trigger = if ms == 0 {
                        Trigger::Exec
                    } else {
                        Trigger::Rescan
                    };
                    self.schedule(now + Duration::from_millis(ms), pid, trigger);
                }
            }
            ProcNote::Exit(pid) => self.dying.push((now + EXIT_GRACE, pid)),
            ProcNote::Connect { pid, ts_ns } => self.connected(pid, ts_ns, now),
            ProcNote::Stop => {}
            ProcNote::TlsOpen { pid, name, ts_ns } => {
                let Some(scope) = self.scope_of(pid) else {
                    return;
                };
                let picked = monotonic_ns();
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                let opened = attach_opened(&mut self.probes, pid, name, scope);
                tracing::debug!(
                    pid,
                    name = %String::from_utf8_lossy(name),
                    queued_us = picked.saturating_sub(ts_ns) / 1000,
                    took_us = monotonic_ns().saturating_sub(picked) / 1000,
                    ?opened,
                    "TLS library opened"
                );
                self.attached(Trigger::Open(ts_ns), pid, opened.attached);
                if !opened.found {
                    for ms in OPEN_RETRIES_MS {
                        self.schedule(now + Duration::from_millis(ms), pid, Trigger::Open(ts_ns));
                    }
                }
            }
        }
    }

    /// The scope `pid`'s probes fire in: host-wide, or (on connect) its own once it has
    /// connected to a provider; `None`: not to be attached (yet).
    fn scope_of(&self, pid: u32) -> Option<Scope> {
        if !self.on_connect {
            return Some(Scope::All);
        }
        Scope::process(pid).filter(|_| self.probes.has_process(pid))
    }

    fn schedule(&mut self, at: Instant, pid: u32, trigger: Trigger) {
        self.scans.entry(at).or_default().push((pid, trigger));
    }

    /// Counts `files` newly attached for `pid` and, for a reported open, how long the library was
    /// unprobed.
    fn attached(&mut self, trigger: Trigger, pid: u32, files: usize) {
        if files == 0 {
            return;
        }
        self.metrics.attached(trigger.label(), files);
        if let Trigger::Open(ts_ns) = trigger {
            let window_ns = monotonic_ns().saturating_sub(ts_ns);
            self.metrics.attach_window.observe(window_ns as f64 / 1e9);
            tracing::info!(
                pid,
                window_us = window_ns / 1000,
                "probes live on a TLS library the process just opened"
            );
        }
        self.publish();
    }

    fn run_scans(&mut self) {
        let now = Instant::now();
        let later = self.scans.split_off(&(now + Duration::from_nanos(1)));
        let due = std::mem::replace(&mut self.scans, later);
        for (pid, trigger) in due.into_values().flatten() {
            let Some(scope) = self.scope_of(pid) else {
                continue;
            };
            let t = Instant::now();
            let attached = attach_process(&mut self.probes, pid, scope);
            tracing::debug!(
                pid,
                ?trigger,
                took_us = t.elapsed().as_micros() as u64,
                "scan"
            );
            self.attached(trigger, pid, attached);
        }
    }

    /// Scans every process (on connect: every process with probes of its own); returns how
    /// many files were newly attached.
    fn scan_all(&mut self) -> usize {
        if self.on_connect {
            let mut attached = 0;
            for pid in self.probes.processes() {
                if let Some(scope) = Scope::process(pid) {
                    attached += attach_process(&mut self.probes, pid, scope);
                }
            }
            return attached;
        }
        let mut attached = 0;
        let excludes = self.rules.has_excludes();
        for pid in all_pids() {
            attached += attach_process(&mut self.probes, pid, Scope::All);
            if excludes
                && let Ok(info) = ProcessInfo::read(Path::new("/proc"), pid)
                && self.rules.excluded(&info)
            {
                let _ = self.probes.skip_pid(pid, true);
            }
        }
        self.publish();
        attached
    }

    fn forget_exited(&mut self, now: Instant) {
        if self.dying.is_empty() {
            return;
        }
        let (gone, keep): (Vec<_>, Vec<_>) = self.dying.drain(..).partition(|(t, _)| *t <= now);
        self.dying = keep;
        let mut detached = false;
        for (_, pid) in gone {
            let _ = self.probes.skip_pid(pid, false);
            detached |= self.forget_process(pid);
        }
        if detached {
            self.publish();
        }
    }

    fn publish(&self) {
        self.metrics
            .attached_files
            .set(i64::try_from(self.probes.attached_files()).unwrap_or(0));
        self.metrics
            .attached_processes
            .set(i64::try_from(self.probes.process_count()).unwrap_or(0));
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
        let exe = std::env::current_exe().expect("current_exe");
        assert_eq!(c[0].label, exe.display().to_string());
        let want = std::fs::metadata(&exe).expect("stat exe");
        assert_eq!(
            open_file_id(&c[0].file),
            Some(FileId {
                dev: want.dev(),
                ino: want.ino()
            })
        );
    }
}
