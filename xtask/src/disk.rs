//! Free disk space around the heavy steps of `cargo xtask test`.
//!
//! The fuzz build instruments every dependency again in `fuzz/target`; on a CI machine whose disk
//! filled there, cargo's error ("No space left on device" while writing an rlib) named neither the
//! cause nor how much had been used. Each heavy step now starts with the free space and the size of
//! the build directories, so a full disk is read in the log, not guessed.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::command::{output, root, step};

/// Prints the free space on the filesystem holding the repository and the size of its build
/// directories.
pub fn report(when: &str) -> Result<()> {
    let root = root();
    let free = output(Command::new("df").args(["-Pk"]).arg(&root))
        .as_deref()
        .and_then(available_kib)
        .context("reading free disk space with `df -Pk`")?;
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
}
