//! `mock-provider`: the mock LLM provider as a process, for benches, the demo and external harnesses.
//!
//! Prints one JSON line with its address(es) on stdout (`--print-addr`), then serves until killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use llmwarden_tests::mock::{Fault, MockConfig, MockProvider, UsageSpec};

/// A faithful mock of the OpenAI, Anthropic and Gemini APIs over plain HTTP and TLS on one port.
#[derive(Debug, Parser)]
#[command(name = "mock-provider", version)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Accept TLS (a fresh CA per run; see --ca-out).
    #[arg(long)]
    tls: bool,
    /// Offer h2 in ALPN.
    #[arg(long)]
    h2: bool,
    /// Write the CA certificate (PEM) here (default: a temp file, printed).
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Delay before each response head, in ms.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay between stream frames, in ms.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Content chunks per stream (default: one per output token).
    #[arg(long)]
    chunks: Option<usize>,
    /// Output tokens when the request allows more.
    #[arg(long, default_value_t = 16)]
    output_tokens: u64,
    /// Fixed usage, `input=100,cached=20,output=30,...` (as the x-mock-usage header).
    #[arg(long)]
    usage: Option<String>,
    /// Require this provider key on every call.
    #[arg(long)]
    key: Option<String>,
    /// Gzip responses for clients that accept it.
    #[arg(long)]
    gzip: bool,
    /// A fault for every call (as the x-mock-fault header).
    #[arg(long)]
    fault: Option<Fault>,
    /// Suffix appended to echoed models, e.g. -2024-07-18.
    #[arg(long)]
    model_snapshot: Option<String>,
    /// Append one JSON line per served call (usage billed) to this file.
    #[arg(long)]
    ledger_out: Option<PathBuf>,
    /// Print {"addr","http_url","https_url","ca_pem"} as one JSON line once listening.
    #[arg(long)]
    print_addr: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // RUST_LOG=h2=debug etc. says why the HTTP stack ended a connection (a client frame the h2
    // crate found a protocol error, a reset flood): off unless asked for.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let usage = match &args.usage {
        Some(spec) => UsageSpec::parse(spec).map_err(anyhow::Error::msg)?,
        None => UsageSpec::default(),
    };
    let config = MockConfig {
        listen: args.listen,
        tls: args.tls,
        h2: args.h2,
        require_key: args.key,
        usage,
        output_tokens: args.output_tokens,
        chunks: args.chunks,
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        latency: Duration::from_millis(args.latency_ms),
        gzip: args.gzip,
        fault: args.fault,
        model_snapshot: args.model_snapshot,
        ca_out: args.ca_out,
        ledger_out: args.ledger_out,
        // Nothing reads the in-memory ledger of a process; --ledger-out has every call.
        retain_calls: false,
        ..MockConfig::default()
    };
    let mock = MockProvider::try_start(config)
        .await
        .context("starting the mock provider")?;
    if args.print_addr {
        let line = serde_json::json!({
            "addr": mock.addr().to_string(),
            "http_url": mock.http_url(),
            "https_url": args.tls.then(|| mock.https_url()),
            "ca_pem": args.tls.then(|| mock.ca_pem_path().display().to_string()),
        });
        println!("{line}");
    } else {
        eprintln!("mock-provider listening on {}", mock.addr());
    }
    // Serve until SIGINT or SIGTERM; returning drops the mock, which removes its temp CA dir.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    drop(mock);
    Ok(())
}
