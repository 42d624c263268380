//! Free disk space around the heavy steps of `cargo xtask test`.
//!
//! The fuzz build instruments every dependency again in `fuzz/target`; on a CI machine whose disk
//! filled there, cargo's error ("No space left on device" while writing an rlib) named neither the
//! cause nor how much had been used. Each heavy step now starts with the free space and the size of
//! the build directories, so a full disk is read in the log, not guessed; and when the disk is
//! short before the fuzz build, the workspace's test executables make room for it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::command::{output, root, step};

/// Free space the fuzz build wants before it starts: it takes 1.4 GiB from scratch
/// (docs/development.md, "Disk"), and the demo after it writes logs and a Redis file.
const FUZZ_ROOM_KIB: u64 = 2 * 1024 * 1024;

/// Prints the free space on the filesystem holding the repository and the size of its build
/// directories.
pub fn report(when: &str) -> Result<()> {
    let root = root();
    let free = free_kib()?;
    let sizes: Vec<String> = ["target", "fuzz/target"]
        .iter()
        .filter(|d| root.join(d).is_dir())
        .map(|d| format!("{d} {}", human(du_kib(&root.join(d)))))
        .collect();
    step(&format!(
        "disk {when}: {} free; {}",
        human(Some(free)),
        if sizes.is_empty() {
            "no build directories yet".to_owned()
        } else {
            sizes.join(", ")
        }
    ));
    Ok(())
}

/// After the workspace tests, before the fuzz build: when less than [`FUZZ_ROOM_KIB`] is free,
/// removes the test executables those tests ran (1.7 GiB of the 4.0 GiB `target/` holds then;
/// `cargo test` links them again next time). A CI run filled its disk in the fuzz build with
/// 0.2 GiB left. Nothing else is removed: the demo still starts the binaries in `target/debug`.
pub fn make_room_for_fuzz() -> Result<()> {
    let free = free_kib()?;
    if free >= FUZZ_ROOM_KIB {
        return Ok(());
    }
    let listing =
        output(crate::test::workspace("test").args(["--no-run", "--message-format=json"]))
            .context(
                "listing the test executables with `cargo test --no-run --message-format=json`",
            )?;
    let exes = test_executables(&listing)?;
    let mut freed = 0;
    for exe in &exes {
        let len = std::fs::metadata(exe).map_or(0, |m| m.len());
        match std::fs::remove_file(exe) {
            Ok(()) => freed += len / 1024,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", exe.display())),
        }
    }
    step(&format!(
        "disk: {} free, the fuzz build wants {}: removed the {} test executables ({}); \
         `cargo test` links them again next time",
        human(Some(free)),
        human(Some(FUZZ_ROOM_KIB)),
        exes.len(),
        human(Some(freed)),
    ));
    Ok(())
}

/// The test executables (`profile.test`) among the artifacts of a `cargo --message-format=json`
/// build. Binaries the tests start (`target/debug/enforcer`...) are not test artifacts.
fn test_executables(listing: &str) -> Result<Vec<PathBuf>> {
    let mut exes = Vec::new();
    for line in listing.lines().filter(|l| l.starts_with('{')) {
        let msg: Value = serde_json::from_str(line)
            .with_context(|| format!("cargo printed a message that is not JSON: {line:.80}"))?;
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && let Some(exe) = msg["executable"].as_str()
        {
            exes.push(PathBuf::from(exe));
        }
    }
    if exes.is_empty() {
        bail!("cargo listed no test executables; expected the workspace's tests");
    }
    Ok(exes)
}

fn free_kib() -> Result<u64> {
    output(Command::new("df").args(["-Pk"]).arg(root()))
        .as_deref()
        .and_then(available_kib)
        .context("reading free disk space with `df -Pk`")
}

/// The "Available" column (KiB) of `df -Pk` output for one path.
fn available_kib(df: &str) -> Option<u64> {
    df.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

fn du_kib(dir: &Path) -> Option<u64> {
    output(Command::new("du").args(["-sk"]).arg(dir))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn human(kib: Option<u64>) -> String {
    match kib {
        // Display only: the figures are rounded for the log, never compared.
        Some(k) => format!("{:.1} GiB", k as f64 / (1024.0 * 1024.0)),
        None => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_available_column() {
        let df = "Filesystem 1024-blocks Used Available Capacity Mounted on\n\
                  /dev/vda 264091588 11234567 83886080 13% /\n";
        assert_eq!(available_kib(df), Some(83_886_080));
        assert_eq!(available_kib("Filesystem\n"), None);
        assert_eq!(human(Some(83_886_080)), "80.0 GiB");
    }

    #[test]
    fn test_executables_are_the_test_profile_artifacts() {
        let listing = r#"{"reason":"compiler-artifact","target":{"name":"ledger"},"profile":{"test":true},"executable":"/t/debug/deps/ledger-1"}
{"reason":"compiler-artifact","target":{"name":"enforcer"},"profile":{"test":false},"executable":"/t/debug/enforcer"}
{"reason":"compiler-artifact","target":{"name":"tokio"},"profile":{"test":false},"executable":null}
{"reason":"build-script-executed","package_id":"observer"}
{"reason":"compiler-artifact","target":{"name":"one_ledger"},"profile":{"test":true},"executable":"/t/debug/deps/one_ledger-2"}
{"reason":"build-finished","success":true}
"#;
        assert_eq!(
            test_executables(listing).unwrap(),
            [
                PathBuf::from("/t/debug/deps/ledger-1"),
                PathBuf::from("/t/debug/deps/one_ledger-2")
            ]
        );
        let err = test_executables("{\"reason\":\"build-finished\"}\n").unwrap_err();
        assert!(err.to_string().contains("no test executables"), "{err}");
        let err = test_executables("{oops\n").unwrap_err();
        assert!(err.to_string().contains("not JSON"), "{err}");
    }
}
