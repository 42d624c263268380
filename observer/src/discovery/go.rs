//! Go binaries among the files a process runs: inspected once per (device, inode) from an open
//! file (only the ELF parts needed are read), then probed (see `bpf/go.rs`).

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use observer::golang::{self, GoBinary};

use crate::bpf::{AttachOutcome, FileId, GoOutcome, Probes};

/// Inspects `file` (file `id`, named `label` in logs) as a Go binary and attaches the Go TLS
/// probes through `attach_path` (a path that reaches the same open file). Returns 1 when newly
/// attached. A file that is no Go binary is left for the caller to remember.
pub fn attach_go_file(
    probes: &mut Probes,
    id: FileId,
    file: &File,
    attach_path: &Path,
    label: &str,
) -> Option<usize> {
    let started = Instant::now();
    let cache = object::ReadCache::new(file);
    let found = golang::inspect(&cache);
    let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let tls = match found {
        Ok(GoBinary::NotGo) => return None,
        Ok(GoBinary::Tls(tls)) => tls,
        Ok(GoBinary::NoTls { version }) => {
            tracing::debug!(path = label, version, "Go binary without crypto/tls");
            probes.remember_go(id, GoOutcome::NoTls);
            return Some(0);
        }
        Ok(GoBinary::Unsupported { version, reason }) => {
            tracing::warn!(
                path = label,
                version,
                reason,
                "Go binary not supported: its TLS is not seen"
            );
            probes.remember_go(id, GoOutcome::Unsupported);
            return Some(0);
        }
        Err(e) => {
            tracing::warn!(path = label, error = %e, "Go binary unreadable: its TLS is not seen");
            probes.remember_go(id, GoOutcome::Error);
            return Some(0);
        }
    };
    match probes.attach_go(id, attach_path, &tls) {
        Ok(AttachOutcome::Attached(n)) => {
            probes.remember_go(id, GoOutcome::Attached);
            tracing::info!(
                path = label,
                version = tls.version,
                stripped = tls.stripped,
                probes = n,
                inspect_us = took_us,
                "attached to Go crypto/tls"
            );
            Some(1)
        }
        Ok(_) => Some(0),
        Err(e) => {
            probes.remember_go(id, GoOutcome::Error);
            tracing::warn!(path = label, error = %format!("{e:#}"), "cannot attach to Go crypto/tls");
            Some(0)
        }
    }
}
