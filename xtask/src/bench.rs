//! `cargo xtask bench [--quick]`: enforcer overhead, streaming, memory per connection and over a soak,
//! ledger throughput, LiteLLM as a peer and observer cost, measured as ratios within one run,
//! written to BENCHMARKS.md and bench/results.json.
//!
//! Method (docs/benchmarks.md): every server is on loopback; variants of one scenario are interleaved
//! and repeated, so slow drift on this shared 2-core machine hits them alike; the load generator
//! (`loadgen/`, release build) is open loop at fixed rates (latency from the scheduled send time) or
//! closed loop at fixed concurrency; every loop is bounded in count and time.

mod allocs;
mod litellm;
mod loadgen;
mod memory;
mod observer;
mod onpath;
mod overhead;
mod perf;
mod pgo;
mod report;
mod sched;
mod soak;
mod stack;
mod streaming;
mod throughput;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Value, json};

use crate::command::{self, cargo, root, step};

/// Options of `cargo xtask bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// About a minute: shorter runs, fewer repeats (LiteLLM's one-time install not counted).
    #[arg(long)]
    quick: bool,
    /// Sections to skip: overhead, allocations, memory, streaming, soak, ledger, litellm, observer
    /// (repeatable).
    #[arg(long)]
    skip: Vec<String>,
    /// Do not build (use the release binaries already in the target dir, and the PGO ones under
    /// target/pgo when they exist and --no-pgo is not given).
    #[arg(long)]
    no_build: bool,
    /// Measure the plain release build of the enforcer and the pass-through instead of the
    /// profile-guided one (`cargo xtask pgo`).
    #[arg(long)]
    no_pgo: bool,
}

/// `cargo xtask pgo`: the release build the bench measures, plus the PGO enforcer.
pub fn pgo_cli() -> Result<()> {
    build_plain()?;
    let out = pgo::build()?;
    step(&format!(
        "profile-optimised enforcer: {}",
        out.join("enforcer").display()
    ));
    Ok(())
}

/// The plain release binaries every section runs: the mock, loadgen, the pass-through and the
/// enforcer.
fn build_plain() -> Result<()> {
    step("building the release binaries (enforcer, mock-provider, loadgen, passthrough)");
    let mut c = cargo();
    c.args([
        "build",
        "--release",
        "-p",
        "enforcer",
        "-p",
        "llmwarden-tests",
        "--bin",
        "mock-provider",
    ]);
    c.args(["--bin", "enforcer", "-p", "loadgen", "--bin", "loadgen"]);
    c.args(["--bin", "passthrough"]);
    command::run(&mut c)
}

/// The directory the bench runs binaries from: links to the release ones, the enforcer and the
/// pass-through taken from `proxies` (a PGO build, instrumented or optimised) when given.
fn bench_bin(work: &Path, proxies: Option<&Path>) -> Result<PathBuf> {
    let release = stack::release_dir();
    let Some(proxies) = proxies else {
        return Ok(release);
    };
    let bin = work.join("bin");
    std::fs::create_dir_all(&bin)?;
    for e in std::fs::read_dir(&release)? {
        let e = e?;
        let name = e.file_name();
        let from = if pgo::BINS.iter().any(|(_, b)| name == *b) {
            proxies.join(&name)
        } else if e.file_type()?.is_file() {
            e.path()
        } else {
            continue;
        };
        std::os::unix::fs::symlink(&from, bin.join(&name))
            .with_context(|| format!("linking {}", from.display()))?;
    }
    Ok(bin)
}

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Whether this is the quick run.
    pub quick: bool,
    /// Measured time of one load run.
    pub duration: Duration,
    /// Unrecorded time before it.
    pub warmup: Duration,
    /// How many times each variant of a scenario runs (interleaved).
    pub repeats: usize,
    /// Concurrent streams.
    pub streams: usize,
    /// Stream rounds per run (the first warms up).
    pub stream_rounds: usize,
    /// redis-benchmark requests.
    pub set_requests: u64,
    /// HTTPS requests per observer client run.
    pub observer_requests: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                duration: Duration::from_millis(800),
                warmup: Duration::from_millis(200),
                repeats: 3,
                streams: 200,
                stream_rounds: 2,
                set_requests: 50_000,
                observer_requests: 1500,
            }
        } else {
            Plan {
                quick,
                duration: Duration::from_secs(5),
                warmup: Duration::from_secs(1),
                repeats: 3,
                streams: 256,
                stream_rounds: 3,
                set_requests: 200_000,
                observer_requests: 5000,
            }
        }
    }
}

/// Paths and ports every section shares.
pub struct Env {
    /// Release binaries.
    pub bin: PathBuf,
    /// Scratch directory (configs, logs, bodies).
    pub work: PathBuf,
    /// Run sizes.
    pub plan: Plan,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let plan = Plan::new(args.quick);
    if !args.no_build {
        build_plain()?;
        if !args.skip.iter().any(|s| s == "observer") && command::is_root() {
            // Built separately: the eBPF side needs nightly; a failure here must not stop the rest.
            if let Err(e) = command::run(cargo().args([
                "build",
                "--release",
                "-p",
                "observer",
                "--bin",
                "observer",
            ])) {
                eprintln!("\x1b[1;31mobserver build failed: {e:#}\x1b[0m");
            }
        }
    }
    let pgo = if args.no_pgo {
        None
    } else if args.no_build {
        let out = pgo::out_dir()?;
        out.join("enforcer").is_file().then_some(out)
    } else {
        Some(pgo::build()?)
    };
    // Measuring time only: the build above may take minutes on this machine.
    let started = Instant::now();
    let work = root()
        .join("bench/work")
        .join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let env = Env {
        bin: bench_bin(&work, pgo.as_deref())?,
        work,
        plan,
    };
    step(&format!("bench scratch dir {}", env.work.display()));

    let mut results = json!({
        "schema": 1,
        "mode": if plan.quick { "quick" } else { "full" },
        "machine": report::machine(),
        "date": command::output(std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
            .map(|s| s.trim().to_owned()),
        "build": {
            "profile": "release (fat LTO, one codegen unit)",
            "pgo": pgo.is_some(),
        },
        "plan": {
            "duration_ms": plan.duration.as_millis() as u64, "warmup_ms": plan.warmup.as_millis() as u64,
            "repeats": plan.repeats, "streams": plan.streams,
        },
    });
    let skip = |s: &str| args.skip.iter().any(|x| x == s);

    let (redis, redis_port) = stack::redis(&env.work)?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");

    if !skip("overhead")
        || !skip("memory")
        || !skip("streaming")
        || !skip("litellm")
        || !skip("allocations")
    {
        let parts = overhead::Parts {
            litellm: !skip("litellm"),
            http: !skip("overhead"),
            memory: !skip("memory"),
            streams: !skip("streaming"),
            allocations: !skip("allocations"),
        };
        section(&mut results, "overhead", || {
            overhead::run(&env, &redis_url, redis.pid(), parts)
        });
    }
    if !skip("soak") {
        section(&mut results, "soak", || soak::run(&env, &redis_url));
    }
    if !skip("ledger") {
        section(&mut results, "ledger", || {
            throughput::run(&env, &redis_url, redis_port)
        });
    }
    if !skip("observer") {
        section(&mut results, "observer", || observer::run(&env, &redis_url));
    }
    results["elapsed_s"] = json!(started.elapsed().as_secs_f64());
    results["targets"] = report::targets(&results);
    write_outputs(&results)?;
    report::print_summary(&results);
    step(&format!(
        "bench done in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Runs one section, recording its result or, loudly, its failure (the other sections still run).
fn section(results: &mut Value, name: &str, f: impl FnOnce() -> Result<Value>) {
    step(&format!("bench section: {name}"));
    let t = Instant::now();
    match f() {
        Ok(v) => {
            if let Value::Object(m) = v {
                for (k, v) in m {
                    results[k] = v;
                }
            }
        }
        Err(e) => {
            eprintln!("\x1b[1;31mbench section {name} FAILED: {e:#}\x1b[0m");
            results[name] = json!({ "error": format!("{e:#}") });
        }
    }
    eprintln!("    section {name} took {:.1} s", t.elapsed().as_secs_f64());
}

fn write_outputs(results: &Value) -> Result<()> {
    let dir = root().join("bench");
    std::fs::create_dir_all(&dir)?;
    let json_path = dir.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(results)? + "\n")?;
    let md = report::markdown(results);
    let md_path = root().join("BENCHMARKS.md");
    std::fs::write(&md_path, md)?;
    step(&format!("wrote {} and {}", rel(&md_path), rel(&json_path)));
    Ok(())
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}
