//! `passthrough`: the bench's floor proxy (see `loadgen::passthrough`). Prints
//! `{"addr":"127.0.0.1:PORT"}` on stdout once it listens, then serves until SIGTERM or Ctrl-C, on
//! which it exits 0 (a PGO-instrumented build writes its profile then; see `cargo xtask pgo`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use loadgen::passthrough::{self, Passthrough};

// The enforcer's allocator, so allocation costs the same in both.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A minimal pass-through proxy on the enforcer's stack: no auth, budgets, metering or logging.
#[derive(Parser)]
#[command(name = "passthrough", version)]
struct Cli {
    /// Loopback address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// `NAME=URL`, repeatable: `/NAME/rest` goes to `URL/rest`.
    #[arg(long = "route", required = true)]
    routes: Vec<String>,
    /// An extra trusted CA (PEM) for TLS upstreams.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Fail on a bad route before listening.
    Passthrough::new(&cli.routes, cli.ca_file.as_deref())?;
    // The enforcer's runtimes: the accept loop on a multi-thread one, the connections on one
    // current-thread runtime per CPU (its `proxy_threads` default).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let threads = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    rt.block_on(async {
        let l = passthrough::bind(cli.listen).await?;
        println!(
            "{}",
            serde_json::json!({ "addr": l.local_addr()?.to_string() })
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = passthrough::serve_threads(l, threads, || {
                Passthrough::new(&cli.routes, cli.ca_file.as_deref())
            }) => r,
            _ = term.recv() => Ok(()),
            r = tokio::signal::ctrl_c() => Ok(r?),
        }
    })
}
