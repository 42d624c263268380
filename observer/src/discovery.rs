//! Finds the OpenSSL code processes run: `libssl.so.*` mappings and executables that export
//! `SSL_write` themselves (node with built-in OpenSSL). Files are opened through /proc/PID/root so
//! container filesystems work, and identified by (device, inode) so each is attached once.

use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::bpf::{AttachOutcome, FileId, Probes};

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

/// Attaches to one file if it is new and exports the OpenSSL API.
pub fn attach_path(probes: &mut Probes, path: &Path) -> usize {
    let Some(id) = file_id(path) else { return 0 };
    if probes.knows(id) {
        return 0;
    }
    // Hold the file open and attach through /proc/self/fd: a short-lived process (and with it
    // /proc/PID/root) may vanish while a large binary like node is being resolved.
    if !crate::elf::exports_ssl_write(path) {
        probes.remember_not_ssl(id);
        return 0;
    }
    let Ok(file) = std::fs::File::open(path) else {
        return 0;
    };
    let stable = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    match probes.attach_file(id, &stable) {
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
