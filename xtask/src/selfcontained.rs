//! The repository needs nothing outside itself: a user who clones it into an empty folder must pass
//! `cargo xtask test`. Two checks, both run by `cargo xtask test`:
//!
//! 1. no file of the tree (`.ci/` aside, which CI owns) names a path into a sibling folder of the
//!    checkout (the reference folder engineers keep beside it included);
//! 2. the ledger's unit tests (the ones that once read a fixture from beside the checkout) pass
//!    from a copy of the tree in an empty folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::command::{self, cargo, output, root, step};

/// Directories never searched or copied: build output, venvs, fuzz state (all git-ignored).
const SKIP_DIRS: &[&str] = &[
    ".git",
    "target",
    ".venv",
    "bench/work",
    "fuzz/target",
    "fuzz/corpus",
    "fuzz/artifacts",
];

/// What points outside the checkout. Built from pieces so this file does not match itself.
fn forbidden() -> Vec<String> {
    let sib = ["..", "/", "shared"].concat();
    let mut v = vec![sib];
    for sub in ["TOOLCHAIN", "STYLE", "data/", "fixtures/", "hooks/"] {
        v.push(["shared", "/", sub].concat());
    }
    v
}

/// Files of the tree: git's list (tracked plus untracked, not ignored) when this is a checkout,
/// else a walk that skips [`SKIP_DIRS`].
fn files(root: &Path) -> Result<Vec<PathBuf>> {
    if let Some(list) = output(Command::new("git").current_dir(root).args([
        "ls-files",
        "-z",
        "--cached",
        "--others",
        "--exclude-standard",
    ])) {
        return Ok(list
            .split('\0')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .filter(|p| root.join(p).is_file())
            .collect());
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out)?;
    Ok(out)
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let r = rel.join(e.file_name());
        if SKIP_DIRS.iter().any(|s| Path::new(s) == r) {
            continue;
        }
        if e.file_type()?.is_dir() {
            walk(root, &r, out)?;
        } else if e.file_type()?.is_file() {
            out.push(r);
        }
    }
    Ok(())
}

/// Lines (path:line: text) that point outside the checkout.
fn references(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let needles = forbidden();
    let mut hits = Vec::new();
    for f in files {
        if f.starts_with(".ci") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(root.join(f)) else {
            continue; // binary fixtures
        };
        for (i, line) in text.lines().enumerate() {
            if needles.iter().any(|n| line.contains(n.as_str())) {
                hits.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
            }
        }
    }
    hits
}

/// Runs both checks.
pub fn run() -> Result<()> {
    let root = root();
    let files = files(&root)?;
    let hits = references(&root, &files);
    if !hits.is_empty() {
        bail!(
            "{} line(s) point outside the repository; a fresh clone does not have those files. \
             Move what they need into the repository (docs/, fixtures) and point there:\n  {}",
            hits.len(),
            hits.join("\n  ")
        );
    }
    step(&format!(
        "self-contained: {} files, none points outside the repository",
        files.len()
    ));

    let dir = std::env::temp_dir().join(format!("llmwarden-fresh-{}", std::process::id()));
    let copy = dir.join("llmwarden");
    let _ = std::fs::remove_dir_all(&dir);
    for f in &files {
        let to = copy.join(f);
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        std::fs::copy(root.join(f), &to)
            .with_context(|| format!("copying {} to {}", f.display(), to.display()))?;
    }
    step(&format!(
        "the ledger's unit tests from a copy of the tree in an empty folder ({})",
        copy.display()
    ));
    // A target dir of its own, removed with the copy. `-p ledger` resolves dependency features
    // for the ledger alone, so in the workspace's target dir it left a second copy of every crate
    // whose features differ, for good, on a disk CI fills (0.6 GiB; docs/development.md, "Disk").
    let res = command::run(
        cargo()
            .current_dir(&copy)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .args(["test", "--locked", "-p", "ledger", "--lib", "-q"]),
    );
    let _ = std::fs::remove_dir_all(&dir);
    res.context("the ledger's tests fail from a fresh copy of the repository")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_references_outside_and_ignores_ci() {
        let dir = std::env::temp_dir().join(format!("llmwarden-sc-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(".ci")).unwrap();
        let bad = format!("see {}/TOOLCHAIN.md\n", ["..", "/", "shared"].concat());
        std::fs::write(dir.join("a.rs"), format!("// fine\n{bad}")).unwrap();
        std::fs::write(dir.join(".ci/run"), &bad).unwrap();
        std::fs::write(dir.join("b.md"), "wasm-bindgen-shared and shared state\n").unwrap();
        let files = vec![
            PathBuf::from("a.rs"),
            PathBuf::from(".ci/run"),
            PathBuf::from("b.md"),
        ];
        let hits = references(&dir, &files);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(hits.len(), 1, "{hits:?}");
        assert!(hits[0].starts_with("a.rs:2:"), "{hits:?}");
    }
}
