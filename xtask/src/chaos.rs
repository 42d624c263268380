//! `cargo xtask chaos`: the reliability scenario of issue 5 against real processes on loopback —
//! 1000 calls over two enforcer instances sharing one Redis, half streaming, 10% aborted by the
//! client, Redis paused (SIGSTOP) and resumed mid-run, one enforcer killed (SIGKILL) and restarted.
//! It checks spend ≤ every cap, no hold left, and that the ledger's real-usage spend equals what the
//! mock provider billed, and prints those figures.
//!
//! The scenario lives in tests/tests/reliability_chaos.rs (so `cargo xtask test` runs its short
//! form, 120 calls); this task builds the binaries and runs it with `LLMW_CHAOS_CALLS`.

use anyhow::Result;
use clap::Args;

use crate::command::{self, step};

/// Options of `cargo xtask chaos`.
#[derive(Args)]
pub struct ChaosArgs {
    /// The short form (120 calls), as run inside `cargo xtask test`.
    #[arg(long)]
    short: bool,
    /// Number of calls (default 1000; 120 with --short).
    #[arg(long)]
    calls: Option<usize>,
}

/// Builds the enforcer and runs the chaos scenario, printing its figures.
pub fn run(args: &ChaosArgs) -> Result<()> {
    let calls = args.calls.unwrap_or(if args.short { 120 } else { 1000 });
    step("building the enforcer");
    command::run(command::cargo().args(["build", "-p", "enforcer", "--bin", "enforcer"]))?;
    step(&format!(
        "chaos: {calls} calls, 2 enforcers, Redis paused, one enforcer killed"
    ));
    command::run(
        command::cargo()
            .args([
                "test",
                "-p",
                "llmwarden-tests",
                "--test",
                "reliability_chaos",
                "--",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("LLMW_CHAOS_CALLS", calls.to_string()),
    )
}
