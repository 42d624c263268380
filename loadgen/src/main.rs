//! `loadgen`: the benchmark's load generator. Prints one JSON report on stdout.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use loadgen::hold::{self, HoldReport, HoldRun, Protocol};
use loadgen::http_load::{self, HttpRun, Mode};
use loadgen::ledger_load::{self, LedgerRun};
use loadgen::stream_load::{self, StreamRun};
use loadgen::target::{self, Target};

/// Open-loop / closed-loop HTTP load, SSE stream timing and ledger throughput, for `cargo xtask bench`.
#[derive(Parser)]
#[command(name = "loadgen", version)]
struct Cli {
    /// Tokio worker threads (the bench machine has 2 cores shared with the servers under test).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Request/response load at a fixed rate (open loop) or a fixed concurrency (closed loop).
    Http(HttpArgs),
    /// Concurrent SSE streams: time to first event and gaps between events.
    Stream(StreamArgs),
    /// reserve + settle pairs per second through ledger::store.
    Ledger(LedgerArgs),
    /// N connections held open, idle after one call each or all with a call in flight; prints one
    /// JSON line per phase.
    Hold(HoldArgs),
}

#[derive(Args)]
struct TargetArgs {
    /// `http://127.0.0.1:PORT/path`.
    #[arg(long)]
    url: String,
    /// `name: value`, repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// The request body (POST); GET without it.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Per-request (or per-stream) timeout.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

impl TargetArgs {
    fn target(&self) -> Result<Target> {
        let body = match &self.body_file {
            Some(p) => {
                Bytes::from(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
            }
            None => Bytes::new(),
        };
        Target::new(&self.url, &self.headers, body)
    }
}

#[derive(Args)]
struct HttpArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Requests per second, open loop (latency from the scheduled send time).
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Workers, closed loop.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Measured milliseconds.
    #[arg(long, default_value_t = 5_000)]
    duration_ms: u64,
    /// Unrecorded milliseconds first.
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    /// Open loop: requests in flight at most.
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
}

#[derive(Args)]
struct StreamArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Concurrent streams.
    #[arg(long, default_value_t = 200)]
    streams: usize,
    /// Rounds (the first is a warm-up when there are several).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Stream starts are spread over this many milliseconds.
    #[arg(long, default_value_t = 200)]
    ramp_ms: u64,
}

#[derive(Args)]
struct LedgerArgs {
    /// `redis://127.0.0.1:PORT`.
    #[arg(long)]
    redis: String,
    /// Concurrent tasks.
    #[arg(long, default_value_t = 64)]
    tasks: usize,
    /// Tenants the tasks spread over.
    #[arg(long, default_value_t = 16)]
    tenants: usize,
    /// Measured milliseconds.
    #[arg(long, default_value_t = 5_000)]
    duration_ms: u64,
    /// Unrecorded milliseconds first.
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
}

#[derive(Args)]
struct HoldArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Connections to hold, each its own TCP connection.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1.
    #[arg(long)]
    h2c: bool,
    /// Connections opened (idle: and calls made) at once while opening.
    #[arg(long, default_value_t = 32)]
    open_concurrency: usize,
    /// Open every connection, then send one call on each at once; print the `in_flight` line
    /// after --settle-ms and the `done` line when all are answered. Without it: each connection
    /// makes one call, the `idle` line is printed, and the connections stay open until a line (or
    /// EOF) on stdin or --hold-ms.
    #[arg(long)]
    in_flight: bool,
    /// In flight: milliseconds from sending the calls to the `in_flight` line.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Idle: hold the connections this long at most.
    #[arg(long, default_value_t = 120_000)]
    hold_ms: u64,
}

/// Prints one JSON line and flushes it (the bench reads the lines as they come).
fn print_line(r: &HoldReport) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
    let _ = out.flush();
}

async fn hold_cmd(a: HoldArgs) -> Result<String> {
    if a.connections == 0 {
        bail!("--connections must be > 0");
    }
    let run = HoldRun {
        target: a.target.target()?,
        connections: a.connections,
        protocol: if a.h2c {
            Protocol::H2c
        } else {
            Protocol::Http1
        },
        open_concurrency: a.open_concurrency,
        timeout: Duration::from_millis(a.target.timeout_ms),
    };
    let done = if a.in_flight {
        hold::in_flight(&run, Duration::from_millis(a.settle_ms), print_line).await
    } else {
        let (held, mut r) = hold::idle(&run).await;
        print_line(&r);
        // A plain thread: it may stay blocked on stdin after the hold times out, and the process
        // exits without waiting for it.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_line(&mut String::new());
            let _ = tx.send(());
        });
        let _ = tokio::time::timeout(Duration::from_millis(a.hold_ms), rx).await;
        drop(held);
        r.phase = "done".to_owned();
        r.connections = 0;
        r
    };
    Ok(serde_json::to_string(&done)?)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    let json = rt.block_on(async {
        match cli.cmd {
            Cmd::Http(a) => {
                let mode = match (a.rate, a.concurrency) {
                    (Some(r), None) if r > 0.0 => Mode::Rate(r),
                    (None, Some(n)) if n > 0 => Mode::Concurrency(n),
                    _ => bail!("give exactly one of --rate R (> 0) or --concurrency N (> 0)"),
                };
                let run = HttpRun {
                    target: a.target.target()?,
                    mode,
                    duration: Duration::from_millis(a.duration_ms),
                    warmup: Duration::from_millis(a.warmup_ms),
                    max_in_flight: a.max_in_flight,
                    timeout: Duration::from_millis(a.target.timeout_ms),
                };
                Ok(serde_json::to_string(
                    &http_load::run(&target::client(), &run).await,
                )?)
            }
            Cmd::Stream(a) => {
                let run = StreamRun {
                    target: a.target.target()?,
                    streams: a.streams,
                    rounds: a.rounds,
                    ramp: Duration::from_millis(a.ramp_ms),
                    timeout: Duration::from_millis(a.target.timeout_ms),
                };
                Ok(serde_json::to_string(
                    &stream_load::run(&target::client(), &run).await,
                )?)
            }
            Cmd::Ledger(a) => {
                let run = LedgerRun {
                    redis_url: a.redis,
                    tasks: a.tasks,
                    tenants: a.tenants,
                    duration: Duration::from_millis(a.duration_ms),
                    warmup: Duration::from_millis(a.warmup_ms),
                };
                Ok(serde_json::to_string(&ledger_load::run(&run).await?)?)
            }
            Cmd::Hold(a) => hold_cmd(a).await,
        }
    })?;
    println!("{json}");
    Ok(())
}
