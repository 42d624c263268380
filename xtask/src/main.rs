//! llmwarden's automation: `cargo xtask setup | test | ...`. The only place shell-like glue lives.

mod bench;
mod chaos;
mod command;
mod demo;
mod disk;
mod fuzz;
mod selfcontained;
mod setup;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Build, test, bench and demo automation for llmwarden.
#[derive(Parser)]
#[command(name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (apt packages, rust-src for nightly, bpf-linker,
    /// redis-server, a Python venv with the official SDKs). Idempotent: checks before it installs.
    Setup,
    /// setup, then cargo fmt --check, clippy -D warnings, and every test (unit, integration with a
    /// real redis-server, eBPF as root).
    Test(test::TestArgs),
    /// Benchmarks (enforcer overhead, streaming, ledger, LiteLLM, observer) → BENCHMARKS.md, bench/results.json.
    Bench(bench::BenchArgs),
    /// Release build of the enforcer (and the bench's pass-through) optimised with a profile of
    /// the bench's workload: instrumented build, training run, optimised build into
    /// target/pgo/use/<host>/release/ (docs/development.md, "Profile-guided builds").
    Pgo,
    /// Start the whole stack on this machine and drive a scripted workload through both paths.
    Demo(demo::DemoArgs),
    /// Fuzz the parsers (cargo-fuzz, nightly): replay fuzz/regressions, then 60 s per target.
    Fuzz(fuzz::FuzzArgs),
    /// Reliability chaos: 1000 calls over two enforcers, Redis paused, one enforcer killed; checks
    /// caps, holds and that the ledger equals what the mock billed (`--short`: 120 calls).
    Chaos(chaos::ChaosArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test(args) => test::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Pgo => bench::pgo_cli(),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Chaos(args) => chaos::run(&args),
    }
}
