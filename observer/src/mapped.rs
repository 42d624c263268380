//! Opens the files a process actually maps, as the kernel references them, rather than the
//! paths `/proc/PID/maps` prints: those paths are relative to the *observer's* root, so a
//! chrooted or pivot_root'ed process (containers, systemd `RootDirectory=`) shows paths that
//! exist in neither root, and a library replaced on disk shows `... (deleted)`.
//!
//! `/proc/PID/map_files/START-END` is the kernel's own reference to the mapped inode: opening it
//! needs CAP_SYS_ADMIN (or CAP_CHECKPOINT_RESTORE), which the observer has. Only when that fails
//! (a kernel without it, a process gone mid-scan) is `/proc/PID/root` + the printed path tried.

use std::fs::File;
use std::path::PathBuf;

/// One line of `/proc/PID/maps` with what discovery needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    /// Start address (hex, as printed: also the `map_files` name).
    pub start: String,
    /// End address (hex, as printed).
    pub end: String,
    /// Whether the mapping is executable.
    pub exec: bool,
    /// The path as printed, without a trailing ` (deleted)`.
    pub path: String,
    /// The file was unlinked (or replaced) after it was mapped.
    pub deleted: bool,
}

/// Parses one maps line (`addr perms offset dev inode path`); `None` for anonymous mappings and
/// pseudo-files (`[heap]`, `[vdso]`). Paths may contain spaces.
pub fn parse_maps_line(line: &str) -> Option<MapsEntry> {
    let mut rest = line;
    let mut field = || {
        let t = rest.trim_start();
        let end = t.find(' ').unwrap_or(t.len());
        let (f, r) = t.split_at(end);
        rest = r;
        f
    };
    let (range, perms) = (field(), field());
    let _ = (field(), field(), field()); // offset, dev, inode
    let path = rest.trim_start();
    if !path.starts_with('/') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let (path, deleted) = match path.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (path, false),
    };
    Some(MapsEntry {
        start: start.to_owned(),
        end: end.to_owned(),
        exec: perms.contains('x'),
        path: path.to_owned(),
        deleted,
    })
}

/// Executable file mappings of a process (empty when it is gone).
pub fn exec_mappings(pid: u32) -> Vec<MapsEntry> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    maps.lines()
        .filter_map(parse_maps_line)
        .filter(|e| e.exec)
        .collect()
}

/// How a mapped file was reached (logged, and counted by tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// Through `/proc/PID/map_files/START-END`: the mapped inode itself.
    MapFiles,
    /// Through `/proc/PID/root` + the printed path (fallback).
    RootPath,
}

/// Opens the file behind a mapping: `map_files` first, then `/proc/PID/root` + path (skipped for a
/// deleted file, whose printed path names a different file or none).
pub fn open_mapped(pid: u32, entry: &MapsEntry) -> Option<(File, Reached)> {
    let map_file = format!("/proc/{pid}/map_files/{}-{}", entry.start, entry.end);
    if let Ok(f) = File::open(&map_file) {
        return Some((f, Reached::MapFiles));
    }
    if entry.deleted {
        return None;
    }
    let under_root =
        PathBuf::from(format!("/proc/{pid}/root")).join(entry.path.trim_start_matches('/'));
    File::open(under_root).ok().map(|f| (f, Reached::RootPath))
}

/// Opens the process's running executable through `/proc/PID/exe` (the exact inode, whatever its
/// root or whether it was replaced on disk).
pub fn open_exe(pid: u32) -> Option<File> {
    File::open(format!("/proc/{pid}/exe")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn parses_maps_lines() {
        let e = parse_maps_line(
            "7f12455e8000-7f124560e000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libssl.so.3",
        )
        .expect("entry");
        assert_eq!(
            (e.start.as_str(), e.end.as_str(), e.exec, e.deleted),
            ("7f12455e8000", "7f124560e000", true, false)
        );
        assert!(e.path.ends_with("/libssl.so.3"));
        let d = parse_maps_line("1000-2000 r-xp 0 fe:00 9 /tmp/a b/libssl.so.3 (deleted)")
            .expect("deleted entry");
        assert_eq!((d.path.as_str(), d.deleted), ("/tmp/a b/libssl.so.3", true));
        assert!(parse_maps_line("1000-2000 rw-p 0 00:00 0").is_none());
        assert!(parse_maps_line("1000-2000 r-xp 0 00:00 0    [vdso]").is_none());
        assert!(
            !parse_maps_line("1000-2000 r--p 0 fe:00 9 /x")
                .expect("entry")
                .exec
        );
    }

    /// The observer's own mappings reached through map_files are the mapped inodes.
    #[test]
    fn map_files_reach_the_mapped_inode() {
        let pid = std::process::id();
        let maps = exec_mappings(pid);
        let libc = maps
            .iter()
            .find(|e| {
                e.path
                    .rsplit('/')
                    .next()
                    .is_some_and(|n| n.starts_with("libc.so"))
            })
            .expect("libc mapped");
        let (f, how) = open_mapped(pid, libc).expect("open mapped libc");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(how, Reached::MapFiles, "root opens map_files");
        }
        let want = std::fs::metadata(&libc.path).expect("stat libc");
        let got = f.metadata().expect("fstat");
        assert_eq!((got.dev(), got.ino()), (want.dev(), want.ino()));
        let exe = open_exe(pid).expect("exe").metadata().expect("fstat exe");
        let want = std::fs::metadata(std::env::current_exe().expect("current_exe")).expect("stat");
        assert_eq!((exe.dev(), exe.ino()), (want.dev(), want.ino()));
    }
}
