//! `cargo xtask fuzz`: libFuzzer campaigns over the parsers (fuzz/, cargo-fuzz on nightly), and
//! the short smoke run inside `cargo xtask test`.
//!
//! Every run first replays the kept crashing inputs (fuzz/regressions/<target>/*), then fuzzes
//! each target from its seeds (fuzz/seeds/<target>/, in git) and its growing corpus
//! (fuzz/corpus/<target>/, not in git). A crash leaves its input in fuzz/artifacts/<target>/;
//! minimise it with `cargo +nightly fuzz tmin -s none -a <target> <file>` and keep it under
//! fuzz/regressions/<target>/ once fixed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::command::{self, root, step};

/// Build flags shared by every cargo-fuzz call (a differing flag rebuilds everything): no
/// sanitizer (the parsers are safe Rust; this doubles the speed) but debug assertions, so an
/// arithmetic overflow in token or money math is a crash, not a silent wrap.
const BUILD_FLAGS: &[&str] = &["--sanitizer", "none", "--debug-assertions"];

/// Seconds per target in the smoke run of `cargo xtask test`.
const SMOKE_SECONDS: u64 = 5;

/// libFuzzer options for every run: a slow input (>10 s) or more than 2 GiB is a finding.
const LIBFUZZER_OPTIONS: &[&str] = &["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"];

/// Options of `cargo xtask fuzz`.
#[derive(Args)]
pub struct FuzzArgs {
    /// Only this target (see `fuzz/Cargo.toml`); default: every target.
    #[arg(long)]
    target: Option<String>,
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Extra libFuzzer options after `--` (e.g. `-max_len=65536 -jobs=2`).
    #[arg(last = true)]
    libfuzzer: Vec<String>,
}

/// Replays the regressions, then fuzzes the chosen targets for `--seconds` each.
pub fn run(args: &FuzzArgs) -> Result<()> {
    crate::setup::fuzz_tools()?;
    let mut targets = targets()?;
    if let Some(t) = &args.target {
        if !targets.contains(t) {
            bail!(
                "no fuzz target {t:?}; the targets are: {}",
                targets.join(", ")
            );
        }
        targets = vec![t.clone()];
    }
    campaign(&targets, args.seconds, &args.libfuzzer)
}

/// The smoke run of `cargo xtask test`: one build, the regressions, a few seconds per target.
pub fn smoke() -> Result<()> {
    campaign(&targets()?, SMOKE_SECONDS, &[])
}

fn campaign(targets: &[String], seconds: u64, extra: &[String]) -> Result<()> {
    step(&format!(
        "building the fuzz targets (nightly, {})",
        BUILD_FLAGS.join(" ")
    ));
    command::run(cargo_fuzz().arg("build").args(BUILD_FLAGS))?;
    let mut failed = Vec::new();
    for t in targets {
        let kept = regressions(t)?;
        if !kept.is_empty() {
            step(&format!("fuzz {t}: replaying {} kept input(s)", kept.len()));
            let replay = command::run(
                cargo_fuzz()
                    .args(["run"])
                    .args(BUILD_FLAGS)
                    .arg(t)
                    .args(&kept)
                    .arg("--")
                    .args(LIBFUZZER_OPTIONS),
            );
            if replay.is_err() {
                failed.push(format!("{t} (a kept regression input fails again)"));
                continue;
            }
        }
        step(&format!("fuzz {t}: {seconds} s"));
        let corpus = root().join("fuzz/corpus").join(t);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let fuzz = command::run(
            cargo_fuzz()
                .args(["run"])
                .args(BUILD_FLAGS)
                .arg(t)
                .arg(&corpus)
                .arg(root().join("fuzz/seeds").join(t))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .args(LIBFUZZER_OPTIONS)
                .args(extra),
        );
        if fuzz.is_err() {
            failed.push(format!(
                "{t} (the crashing input is in fuzz/artifacts/{t}/)"
            ));
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found failures in: {}; reproduce with `cargo +nightly fuzz run {} <target> <input>`",
            failed.join("; "),
            BUILD_FLAGS.join(" ")
        );
    }
    step(&format!("fuzzing: {} target(s) clean", targets.len()));
    Ok(())
}

/// `cargo fuzz` on the nightly toolchain, from the workspace root (it finds fuzz/ there).
/// The variables cargo set for xtask itself would pin the stable toolchain, so they go.
fn cargo_fuzz() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(root())
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN");
    c
}

/// The targets `fuzz/Cargo.toml` declares.
fn targets() -> Result<Vec<String>> {
    let out = cargo_fuzz()
        .arg("list")
        .output()
        .context("cannot run `cargo fuzz list`; run `cargo xtask setup` to install cargo-fuzz")?;
    if !out.status.success() {
        bail!(
            "`cargo fuzz list` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if list.is_empty() {
        bail!("`cargo fuzz list` names no targets");
    }
    Ok(list)
}

/// The kept crashing inputs of `target`, sorted.
fn regressions(target: &str) -> Result<Vec<PathBuf>> {
    let dir = root().join("fuzz/regressions").join(target);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !is_note(p))
        .collect();
    files.sort();
    Ok(files)
}

/// README files next to the inputs describe them; they are not inputs.
fn is_note(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "md")
}
