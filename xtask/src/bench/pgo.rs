//! Profile-guided optimisation of the two proxies (`cargo xtask pgo`, and the bench by default).
//!
//! Three steps, each cached on disk under `target/pgo/`:
//! 1. an instrumented release build of the enforcer and of the pass-through
//!    (`-Cprofile-generate`; same release profile: fat LTO, one codegen unit);
//! 2. a training run: the bench's stack (redis-server, mock providers, the three enforcer
//!    configurations and the pass-through) under short bursts of open-loop, closed-loop and SSE
//!    load, then a graceful stop so each process writes its counters; `llvm-profdata` (rustup's
//!    `llvm-tools`, the LLVM of our own rustc) merges them;
//! 3. the optimised build (`-Cprofile-use`) into `target/pgo/use/<host>/release/`.
//!
//! Both proxies get the same treatment, so the bench's floor moves with the enforcer. The training
//! is skipped when a merged profile newer than the instrumented binaries exists.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::loadgen::{self, Load};
use super::overhead::{self, Variant};
use super::{Env, Plan, stack};
use crate::command::{self, cargo, output, root, step};

/// The binaries built with a profile, as (package, bin).
pub const BINS: [(&str, &str); 2] = [("enforcer", "enforcer"), ("loadgen", "passthrough")];

/// `target/pgo` (or `$CARGO_TARGET_DIR/pgo`).
fn base() -> PathBuf {
    stack::target_dir().join("pgo")
}

/// Where `cargo xtask pgo` leaves the optimised enforcer and pass-through.
pub fn out_dir() -> Result<PathBuf> {
    Ok(built(&base().join("use"), &host()?))
}

/// Where cargo puts release binaries built for `host` under `target_dir`.
fn built(target_dir: &Path, host: &str) -> PathBuf {
    target_dir.join(host).join("release")
}

/// Builds the profile-optimised enforcer and pass-through and returns their directory. The
/// training drives them with the plain release `mock-provider` and `loadgen` (built first).
pub fn build() -> Result<PathBuf> {
    let host = host()?;
    let profdata_tool = llvm_profdata(&host)?;
    let base = base();
    let raw = base.join("raw");
    let gen_dir = built(&base.join("gen"), &host);

    step("PGO 1/3: instrumented release build of the enforcer and the pass-through");
    cargo_build(
        &base.join("gen"),
        &host,
        &[format!("-Cprofile-generate={}", raw.display())],
    )?;

    let profdata = base.join("merged.profdata");
    if fresh(&profdata, &gen_dir) {
        step(&format!(
            "PGO 2/3: {} is newer than the instrumented binaries; training skipped",
            profdata.display()
        ));
    } else {
        step("PGO 2/3: training run (the bench's stack under short bursts of every load shape)");
        let _ = std::fs::remove_dir_all(&raw);
        std::fs::create_dir_all(&raw)?;
        train(&gen_dir)?;
        merge(&profdata_tool, &raw, &profdata)?;
    }

    step("PGO 3/3: release build with the merged profile");
    cargo_build(
        &base.join("use"),
        &host,
        &[
            format!("-Cprofile-use={}", profdata.display()),
            // Functions the training never ran (error paths, the admin API) have no counts; that
            // is expected, not worth a warning per function.
            "-Cllvm-args=-pgo-warn-missing-function=false".to_owned(),
        ],
    )?;
    let out = built(&base.join("use"), &host);
    for (_, bin) in BINS {
        let p = out.join(bin);
        if !p.is_file() {
            bail!("the PGO build left no {}", p.display());
        }
    }
    Ok(out)
}

/// The host triple of our rustc (`--target <host>` keeps RUSTFLAGS off build scripts and proc
/// macros, which would otherwise write or want profiles of their own).
fn host() -> Result<String> {
    let v = output(Command::new("rustc").current_dir(root()).arg("-vV"))
        .context("cannot run `rustc -vV`")?;
    v.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` printed no host line")
}

/// rustup's `llvm-profdata`, added (`llvm-tools`) when missing: its profile format is the one our
/// rustc's LLVM reads, which a distribution's llvm-profdata of another major version is not.
fn llvm_profdata(host: &str) -> Result<PathBuf> {
    let sysroot = output(
        Command::new("rustc")
            .current_dir(root())
            .args(["--print", "sysroot"]),
    )
    .context("cannot run `rustc --print sysroot`")?;
    let p = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-profdata");
    if !p.is_file() {
        step("adding rustup's llvm-tools (llvm-profdata for the PGO build)");
        command::run(Command::new("rustup").current_dir(root()).args([
            "component",
            "add",
            "llvm-tools",
        ]))?;
    }
    if !p.is_file() {
        bail!("`rustup component add llvm-tools` left no {}", p.display());
    }
    Ok(p)
}

fn cargo_build(target_dir: &Path, host: &str, rustflags: &[String]) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "--release", "--target", host, "--target-dir"])
        .arg(target_dir);
    for (pkg, bin) in BINS {
        c.args(["-p", pkg, "--bin", bin]);
    }
    // The encoded form wins over RUSTFLAGS and keeps each flag whole.
    c.env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"));
    c.env_remove("RUSTFLAGS");
    command::run(&mut c)
}

/// Whether `profdata` exists and is newer than every instrumented binary in `gen_dir`.
fn fresh(profdata: &Path, gen_dir: &Path) -> bool {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(profile) = mtime(profdata) else {
        return false;
    };
    BINS.iter()
        .all(|(_, bin)| mtime(&gen_dir.join(bin)).is_some_and(|b| b < profile))
}

/// Runs the bench's stack from `gen_dir`'s instrumented proxies and stops it gracefully: as it
/// exits, each instrumented process (the `enforcer hash-key` runs too) merges its counters into
/// its binary's `default_<signature>_0.profraw` in the directory given to `-Cprofile-generate`.
fn train(gen_dir: &Path) -> Result<()> {
    let work = base().join("train-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let env = Env {
        bin: super::bench_bin(&work, Some(gen_dir))?,
        work,
        plan: Plan::new(true),
    };
    let (redis, redis_port) = stack::redis(&env.work)?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let mut stack = overhead::start(&env, &redis_url, redis.pid())?;
    let others = other_providers(&env.work)?;
    let burst = Duration::from_millis(1500);
    let warmup = Duration::from_millis(200);
    for variant in [
        Variant::Budgets,
        Variant::Reserving,
        Variant::NoBudgets,
        Variant::Passthrough,
    ] {
        for load in [Load::Rate(300), Load::Concurrency(32), Load::Concurrency(1)] {
            let t = stack.target(variant, false, None);
            let r = loadgen::http(&env, &t, load, warmup, burst)
                .with_context(|| format!("training {} at {}", variant.name(), load.label()))?;
            ensure_ok(&r, variant, &load.label())?;
        }
        let t = stack.target(variant, true, None);
        let r = loadgen::stream(&env, &t)
            .with_context(|| format!("training {} with streams", variant.name()))?;
        ensure_ok(&r, variant, "streams")?;
        // The other providers' request and usage parsers: untrained code is laid out as cold,
        // which would slow Anthropic and Gemini traffic below a plain build.
        for (provider, path, body) in &others {
            let t = stack.provider_target(variant, provider, path, body.clone());
            let r = loadgen::http(&env, &t, Load::Concurrency(8), warmup, burst / 2)
                .with_context(|| format!("training {} on {provider}{path}", variant.name()))?;
            ensure_ok(&r, variant, &format!("{provider}{path}"))?;
        }
    }
    stack.stop_proxies(Duration::from_secs(20))?;
    Ok(())
}

/// (provider, path below its base URL, body file) of Anthropic and Gemini calls, each streamed
/// and not.
fn other_providers(work: &Path) -> Result<Vec<(&'static str, &'static str, PathBuf)>> {
    let question = "My order 48213 arrived with a cracked screen protector and the charger is \
                    missing. What is the return process and how long does a replacement take?";
    let anthropic = |stream: bool| {
        serde_json::json!({
            "model": "claude-haiku-4-5",
            "max_tokens": 200,
            "system": "You are a support assistant for an online store.",
            "messages": [{"role": "user", "content": question}],
            "stream": stream,
        })
    };
    let gemini = serde_json::json!({
        "contents": [{"role": "user", "parts": [{"text": question}]}],
        "systemInstruction": {"parts": [{"text": "You are a support assistant for an online store."}]},
        "generationConfig": {"maxOutputTokens": 200},
    });
    let mut out = Vec::new();
    for (provider, path, body) in [
        ("anthropic", "/v1/messages", anthropic(false)),
        ("anthropic", "/v1/messages", anthropic(true)),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            gemini.clone(),
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            gemini,
        ),
    ] {
        let file = work.join(format!("train-{}.json", out.len()));
        std::fs::write(&file, body.to_string())?;
        out.push((provider, path, file));
    }
    Ok(out)
}

/// Fails when a training load saw errors: a profile of error paths would mislead the optimiser.
fn ensure_ok(r: &serde_json::Value, variant: Variant, what: &str) -> Result<()> {
    let ok = r["ok"].as_u64().unwrap_or(0);
    let failed = r["errors"].as_object().is_some_and(|e| !e.is_empty());
    if failed || ok == 0 {
        bail!(
            "PGO training: {} under {what} answered {ok} calls, errors {}",
            variant.name(),
            r["errors"]
        );
    }
    Ok(())
}

fn merge(tool: &Path, raw: &Path, profdata: &Path) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(raw)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    files.sort();
    if files.len() < BINS.len() {
        bail!(
            "PGO training left {} profile files in {} (the proxies did not exit cleanly?)",
            files.len(),
            raw.display()
        );
    }
    command::run(
        Command::new(tool)
            .args(["merge", "--output"])
            .arg(profdata)
            .args(&files),
    )?;
    let summary = output(Command::new(tool).args(["show"]).arg(profdata)).unwrap_or_default();
    for l in summary.lines().filter(|l| l.contains("functions")) {
        eprintln!("    {}", l.trim());
    }
    Ok(())
}
