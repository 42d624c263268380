//! llmwarden's automation: `cargo xtask setup | test | ...`. The only place shell-like glue lives.

mod command;
mod demo;
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
    /// Start the whole stack on this machine and drive a scripted workload through both paths.
    Demo(demo::DemoArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test(args) => test::run(&args),
        Task::Demo(args) => demo::run(&args),
    }
}
