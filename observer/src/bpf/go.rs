//! Attaching the Go `crypto/tls` probes (see `observer-ebpf/src/golang.rs`) to a Go binary, once
//! per (device, inode) like the OpenSSL files.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use aya::programs::UProbe;
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint};
use observer::golang::GoTls;

use super::{AttachOutcome, FileId, Probes, Scope};

/// The Go programs, loaded with the others when the object has them (amd64 builds).
pub(super) const GO_PROGRAMS: [&str; 5] = [
    "go_tls_write",
    "go_tls_read",
    "go_tls_read_ret",
    "go_tls_read_copy",
    "go_tls_close",
];

/// How a Go binary went, for `llmwarden_observer_go_binaries{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GoOutcome {
    /// Probes attached.
    Attached,
    /// Older than Go 1.17 or not amd64: cannot be read.
    Unsupported,
    /// No `crypto/tls` in it.
    NoTls,
    /// Its tables or code could not be read, or attaching failed.
    Error,
}

impl GoOutcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            GoOutcome::Attached => "attached",
            GoOutcome::Unsupported => "unsupported",
            GoOutcome::NoTls => "no_tls",
            GoOutcome::Error => "error",
        }
    }

    /// Every outcome, for publishing zeroes too.
    pub const ALL: [GoOutcome; 4] = [
        GoOutcome::Attached,
        GoOutcome::Unsupported,
        GoOutcome::NoTls,
        GoOutcome::Error,
    ];
}

/// Where `Read`'s data is taken: its copy out when the binary has one and probes go on emulated
/// instructions (`probe_sites`), else (`None`) its `RET`s.
pub fn read_copy(tls: &GoTls) -> Option<u64> {
    tls.read_copy.filter(|_| crate::elf::emulated_sites())
}

impl Probes {
    /// Remembers a Go binary's outcome (the file is never inspected again).
    pub fn remember_go(&mut self, id: FileId, outcome: GoOutcome) {
        *self.go.entry(outcome).or_default() += 1;
        if outcome != GoOutcome::Attached {
            self.files.insert(id, AttachOutcome::NotSsl);
        }
    }

    /// Distinct Go binaries seen with this outcome.
    pub fn go_binaries(&self, outcome: GoOutcome) -> u64 {
        self.go.get(&outcome).copied().unwrap_or(0)
    }

    /// Attaches the Go probes to `path` (reaching file `id`) at the sites `tls` gives, firing
    /// in `scope`.
    pub fn attach_go(
        &mut self,
        id: FileId,
        path: &Path,
        tls: &GoTls,
        scope: Scope,
    ) -> Result<AttachOutcome> {
        if self.knows(id, scope) {
            return Ok(AttachOutcome::Known);
        }
        // The entry-side probes carry the cookie telling them they sit on a stack check.
        let cookie = tls.at_check.then_some(observer_common::GO_AT_CHECK);
        let mut sites: Vec<(&str, u64, Option<u64>)> = vec![
            ("go_tls_write", tls.write, cookie),
            ("go_tls_read", tls.read, cookie),
        ];
        match read_copy(tls) {
            Some(o) => sites.push(("go_tls_read_copy", o, None)),
            None => sites.extend(tls.read_rets.iter().map(|&o| ("go_tls_read_ret", o, None))),
        }
        sites.extend(tls.close.map(|o| ("go_tls_close", o, cookie)));
        let _rcu = self.expedited();
        let mut links = Vec::new();
        for (prog, offset, cookie) in sites {
            let program: &mut UProbe = self
                .ebpf
                .program_mut(prog)
                .ok_or_else(|| anyhow!("program {prog} missing (not an amd64 build?)"))?
                .try_into()?;
            let result = program
                .attach(
                    UProbeAttachPoint {
                        location: UProbeAttachLocation::AbsoluteOffset(offset),
                        cookie,
                    },
                    path,
                    scope.uprobe(),
                )
                .with_context(|| format!("attaching {prog} at {offset:#x} in {}", path.display()));
            match result {
                Ok(link) => links.push((prog, link)),
                // Writes without reads (or reads without their returns) would record
                // nonsense: a failure of any of the data probes fails the file.
                Err(e) if prog != "go_tls_close" => {
                    self.drop_links(links);
                    if scope == Scope::All {
                        self.files.insert(id, AttachOutcome::NotSsl);
                    }
                    return Err(e);
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "Go close probe not attached"),
            }
        }
        let attached = links.len();
        self.keep_links(id, scope, links);
        Ok(AttachOutcome::Attached(attached))
    }
}
