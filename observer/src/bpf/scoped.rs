//! Per-process probes for `attach = "on-connect"`: the OpenSSL and Go TLS probes are attached
//! with a pid filter to a process the egress accounting saw connect to a provider, and detached
//! when it execs or exits. The kernel's uprobe filter (`uprobe_perf_filter`) then inserts the
//! breakpoint only into that process's memory, so no other process traps on `SSL_write`.
//! The probe sites of each file are resolved once and kept, however many processes use it.

use std::collections::HashMap;
use std::fs::File;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;

use anyhow::{Result, anyhow};
use aya::programs::UProbe;
use aya::programs::uprobe::{UProbeLink, UProbeLinkId, UProbeScope};
use observer::golang::GoTls;

use super::{FileId, Probes};
use crate::elf::SslSymbols;

/// Which processes a probe fires in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every process that maps the file (`attach = "all"`).
    All,
    /// One process (`attach = "on-connect"`): all its threads, no other process.
    Process(NonZeroU32),
}

impl Scope {
    /// The scope of a process's probes; `None` for pid 0 (never a user process).
    pub fn process(pid: u32) -> Option<Scope> {
        NonZeroU32::new(pid).map(Scope::Process)
    }

    pub(super) fn uprobe(self) -> UProbeScope {
        match self {
            Scope::All => UProbeScope::AllProcesses,
            Scope::Process(pid) => UProbeScope::OneProcess(pid),
        }
    }
}

/// Probe sites of a file, resolved once.
#[derive(Debug, Clone)]
pub enum Sites {
    /// An OpenSSL (a libssl, or an executable with OpenSSL built in).
    Ssl(SslSymbols),
    /// A Go binary using crypto/tls.
    Go(GoTls),
}

/// Most files whose sites (and an open handle) are kept, and most executables remembered with
/// the TLS files their processes used: bounds for a host running many distinct binaries.
const MAX_KNOWN: usize = 1024;

/// The per-process state.
#[derive(Default)]
pub(super) struct Scoped {
    /// Files attached per process and the links to detach.
    procs: HashMap<u32, ProcLinks>,
    /// Probe sites per file, with the file held open to attach it again without a /proc walk.
    sites: HashMap<FileId, Known>,
    /// TLS files used by processes of each executable (by the executable's identity): the next
    /// process of that executable gets them first, before its mappings are read.
    exe_files: HashMap<FileId, Vec<FileId>>,
    /// The thread that closes detached links.
    reaper: Option<super::reaper::Reaper>,
}

/// A file whose probe sites are known.
struct Known {
    sites: Sites,
    file: File,
    label: String,
}

#[derive(Default)]
struct ProcLinks {
    files: Vec<FileId>,
    links: Vec<(&'static str, UProbeLinkId)>,
}

impl Scoped {
    pub(super) fn has_file(&self, pid: NonZeroU32, id: FileId) -> bool {
        self.procs
            .get(&pid.get())
            .is_some_and(|p| p.files.contains(&id))
    }

    /// Closes `links` on the reaper thread (started on first use), at a quiet time; inline if
    /// the thread cannot run.
    fn reap(&mut self, links: Vec<UProbeLink>) {
        if self.reaper.is_none() {
            self.reaper = super::reaper::Reaper::start();
        }
        let left = match &self.reaper {
            Some(r) => r.close(links).err(),
            None => Some(links),
        };
        drop(left);
    }

    pub(super) fn keep(
        &mut self,
        pid: NonZeroU32,
        id: FileId,
        links: Vec<(&'static str, UProbeLinkId)>,
    ) {
        let p = self.procs.entry(pid.get()).or_default();
        p.files.push(id);
        p.links.extend(links);
    }
}

impl Probes {
    /// Probe sites resolved earlier for file `id`.
    pub fn sites(&self, id: FileId) -> Option<&Sites> {
        self.scoped.sites.get(&id).map(|k| &k.sites)
    }

    /// Keeps the probe sites of file `id` (open as `file`, named `label` in logs) for the next
    /// process that uses it.
    pub fn remember_sites(&mut self, id: FileId, sites: Sites, file: &File, label: &str) {
        let Ok(file) = file.try_clone() else {
            return;
        };
        if self.scoped.sites.len() >= MAX_KNOWN {
            self.scoped.sites.clear();
            self.scoped.exe_files.clear();
        }
        let label = label.to_owned();
        self.scoped.sites.insert(id, Known { sites, file, label });
    }

    /// A known file: its sites, a path that reaches it (the observer's own descriptor) and its
    /// label.
    pub fn known(&self, id: FileId) -> Option<(Sites, PathBuf, String)> {
        let k = self.scoped.sites.get(&id)?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", k.file.as_raw_fd()));
        Some((k.sites.clone(), path, k.label.clone()))
    }

    /// The TLS files processes of executable `exe` used before.
    pub fn exe_files(&self, exe: FileId) -> Vec<FileId> {
        self.scoped.exe_files.get(&exe).cloned().unwrap_or_default()
    }

    /// Remembers the TLS files process `pid` (running executable `exe`) has probes on.
    pub fn remember_exe(&mut self, exe: FileId, pid: u32) {
        let Some(p) = self.scoped.procs.get(&pid) else {
            return;
        };
        if self.scoped.exe_files.len() >= MAX_KNOWN {
            self.scoped.exe_files.clear();
        }
        self.scoped.exe_files.insert(exe, p.files.clone());
    }

    /// A process is connecting: closing detached probes waits (see `reaper.rs`).
    pub fn connecting(&mut self) {
        if self.scoped.reaper.is_none() {
            self.scoped.reaper = super::reaper::Reaper::start();
        }
        if let Some(r) = &self.scoped.reaper {
            r.busy();
        }
    }

    /// Whether process `pid` has probes of its own.
    pub fn has_process(&self, pid: u32) -> bool {
        self.scoped.procs.contains_key(&pid)
    }

    /// How many processes have probes of their own.
    pub fn process_count(&self) -> usize {
        self.scoped.procs.len()
    }

    /// Processes with probes of their own.
    pub fn processes(&self) -> Vec<u32> {
        self.scoped.procs.keys().copied().collect()
    }

    /// Detaches process `pid`'s probes (it exec'd or exited); returns how many links went.
    pub fn detach_process(&mut self, pid: u32) -> usize {
        let Some(p) = self.scoped.procs.remove(&pid) else {
            return 0;
        };
        let n = p.links.len();
        self.drop_links(p.links);
        n
    }

    /// Detaches `links` (a process's, or a file's half-attached probes): closed on a thread of
    /// their own at a quiet time (see `reaper.rs`), so a detach never delays an attach.
    pub(super) fn drop_links(&mut self, links: Vec<(&'static str, UProbeLinkId)>) {
        let mut owned = Vec::with_capacity(links.len());
        for (prog, link) in links {
            match self.take_link(prog, link) {
                Ok(l) => owned.push(l),
                Err(e) => tracing::warn!(prog, error = %format!("{e:#}"), "probe not detached"),
            }
        }
        if !owned.is_empty() {
            self.scoped.reap(owned);
        }
    }

    fn take_link(&mut self, prog: &str, link: UProbeLinkId) -> Result<UProbeLink> {
        let program: &mut UProbe = self
            .ebpf
            .program_mut(prog)
            .ok_or_else(|| anyhow!("program {prog} missing"))?
            .try_into()?;
        Ok(program.take_link(link)?)
    }
}
