//! Go binaries among the files a process runs: inspected once per (device, inode) from an open
//! file (only the ELF parts needed are read), then probed (see `bpf/go.rs`).

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use observer::golang::{self, GoBinary, GoTls};

use crate::bpf::{AttachOutcome, FileId, GoOutcome, Probes, Scope};

/// What reading a file as a Go binary found.
pub enum GoFile {
    /// No Go binary: the caller decides what it is.
    NotGo,
    /// A Go binary whose TLS cannot be probed (remembered, logged).
    Unprobed,
    /// The probe sites of its crypto/tls.
    Tls(GoTls),
}

/// Inspects `file` (file `id`, named `label` in logs) as a Go binary. A Go binary without
/// probe-able TLS is remembered here; one that is no Go binary is left for the caller.
pub fn inspect_go_file(probes: &mut Probes, id: FileId, file: &File, label: &str) -> GoFile {
    let started = Instant::now();
    let cache = object::ReadCache::new(file);
    let found = golang::inspect(&cache);
    let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    match found {
        Ok(GoBinary::NotGo) => GoFile::NotGo,
        Ok(GoBinary::Tls(tls)) => {
            tracing::debug!(
                path = label,
                inspect_us = took_us,
                "Go binary with crypto/tls"
            );
            GoFile::Tls(tls)
        }
        Ok(GoBinary::NoTls { version }) => {
            tracing::debug!(path = label, version, "Go binary without crypto/tls");
            probes.remember_go(id, GoOutcome::NoTls);
            GoFile::Unprobed
        }
        Ok(GoBinary::Unsupported { version, reason }) => {
            tracing::warn!(
                path = label,
                version,
                reason,
                "Go binary not supported: its TLS is not seen"
            );
            probes.remember_go(id, GoOutcome::Unsupported);
            GoFile::Unprobed
        }
        Err(e) => {
            tracing::warn!(path = label, error = %e, "Go binary unreadable: its TLS is not seen");
            probes.remember_go(id, GoOutcome::Error);
            GoFile::Unprobed
        }
    }
}

/// Attaches the Go TLS probes at `tls`'s sites through `attach_path` (a path that reaches file
/// `id`), firing in `scope`. Returns 1 when newly attached; `first` says whether this is the
/// binary's first attach (counted once in `go_binaries`).
pub fn attach_go_sites(
    probes: &mut Probes,
    id: FileId,
    attach_path: &Path,
    label: &str,
    tls: &GoTls,
    scope: Scope,
    first: bool,
) -> usize {
    match probes.attach_go(id, attach_path, tls, scope) {
        Ok(AttachOutcome::Attached(n)) => {
            if first {
                probes.remember_go(id, GoOutcome::Attached);
            }
            tracing::info!(
                path = label,
                version = tls.version,
                stripped = tls.stripped,
                read_at = if crate::bpf::read_copy(tls).is_some() {
                    "copy"
                } else {
                    "rets"
                },
                probes = n,
                ?scope,
                "attached to Go crypto/tls"
            );
            1
        }
        Ok(_) => 0,
        Err(e) => {
            if scope == Scope::All {
                probes.remember_go(id, GoOutcome::Error);
            }
            tracing::warn!(path = label, error = %format!("{e:#}"), "cannot attach to Go crypto/tls");
            0
        }
    }
}
