//! `observer`: sees every OpenSSL-carried LLM call on the host through eBPF uprobes, prices it with
//! the shared ledger and records it as bypass spend. See docs/observer.md.

mod attribution;
mod bpf;
mod btf;
mod connections;
mod daemon;
mod discovery;
mod doze;
mod egress;
mod elf;
mod identity;
mod mapped;
mod metrics;
mod sink;
mod stop;
mod unmetered;

// The pure parsers and the config live in the library (src/lib.rs, fuzzable without the eBPF
// object); imported at the crate root so the daemon's modules keep their `crate::config` paths.
use observer::{config, exchange, http1};

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// llmwarden observer: LLM calls that bypass the enforcer, priced and recorded.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Config file.
    #[arg(long, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print each detected LLM call as one JSON line; needs no Redis.
    Sniff,
    /// Validate the config and print the effective settings.
    CheckConfig,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let sniff = matches!(cli.command, Some(Command::Sniff));
    let cfg = if sniff
        && !cli.config.exists()
        && cli.config == std::path::Path::new(config::DEFAULT_PATH)
    {
        config::Config::default() // sniff works out of the box, with built-in providers only
    } else {
        config::Config::load(&cli.config)?
    };
    let mode = match cli.command {
        Some(Command::CheckConfig) => {
            println!("{}", toml::to_string_pretty(&cfg)?);
            return Ok(());
        }
        Some(Command::Sniff) => daemon::Mode::Sniff,
        None => daemon::Mode::Record,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(daemon::run(cfg, mode))
}
