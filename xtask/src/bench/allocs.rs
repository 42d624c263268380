//! Allocations per call (issue 20): every call of each proxy's global allocator counted, none
//! sampled, so the figure holds still on a machine whose CPU times move by ±15% run to run.
//!
//! Method: `perf probe` puts a uprobe on mimalloc's entry points in each binary
//! (`mi_malloc_aligned`, `mi_zalloc_aligned`, `mi_realloc_aligned`: what Rust's `GlobalAlloc`
//! calls in both the enforcer and the pass-through), `perf stat -p` counts their hits while
//! `loadgen` sends a fixed open-loop rate, and the counts are divided by the calls sent. Each hit
//! is a trap into the kernel (microseconds), so the rate is low enough that the probed process
//! keeps up: the counts compare builds measured the same way; the CPU of a probed run means nothing.
//! The enforcer's blocks of 256 KiB and more go to glibc's `malloc` (`enforcer::alloc`) and are not
//! counted: no call of this load has one.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Env;
use super::loadgen::{self, Load};
use super::overhead::{Stack, Variant};
use super::perf::Perf;
use crate::command::step;

/// The open-loop rate of a counted run.
pub const RATE: u32 = 100;
/// The uprobe group every event of the bench lives in (removed before and after).
const GROUP: &str = "llmw_bench";
/// mimalloc's entry points behind Rust's `GlobalAlloc`, and the event name of each.
const ENTRY_POINTS: &[(&str, &str)] = &[
    ("mi_malloc_aligned", "alloc"),
    ("mi_zalloc_aligned", "zalloc"),
    ("mi_realloc_aligned", "realloc"),
];

/// The proxies counted, with the binary each runs.
const PROXIES: &[(Variant, &str)] = &[
    (Variant::Passthrough, "passthrough"),
    (Variant::Budgets, "enforcer"),
    (Variant::NoBudgets, "enforcer"),
];

/// Counts allocations per call of the pass-through and the enforcers, `repeats` runs each,
/// interleaved.
pub fn run(env: &Env, stack: &Stack) -> Result<Value> {
    super::perf::check("counting allocations (uprobes through `perf probe`)")?;
    let _probes = Probes::add(&env.bin)?;
    let window = if env.plan.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3)
    };
    // Unmeasured first: pools, caches and the allocator's pages warm up (the overhead section may
    // have been skipped).
    for (variant, _) in PROXIES {
        let target = stack.target(*variant, false, None);
        loadgen::http(env, &target, Load::Rate(RATE), Duration::ZERO, window)
            .with_context(|| format!("warming up {}", variant.name()))?;
    }
    let mut out = serde_json::Map::new();
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); PROXIES.len()];
    for rep in 0..env.plan.repeats {
        for (i, (variant, bin)) in PROXIES.iter().enumerate() {
            let pid = stack
                .pid(*variant)
                .context("the proxy under count has no process")?;
            let counted = count(env, stack, *variant, bin, pid, window)
                .with_context(|| format!("counting allocations of {}", variant.name()))?;
            eprintln!(
                "    allocations {:<20} rep {rep}: {:.1} per call ({:.1} reallocations)",
                variant.name(),
                counted["per_call"].as_f64().unwrap_or(0.0),
                counted["realloc_per_call"].as_f64().unwrap_or(0.0),
            );
            runs[i].push(counted);
        }
    }
    for ((variant, _), rs) in PROXIES.iter().zip(&runs) {
        out.insert(
            variant.name().into(),
            json!({
                "per_call": super::report::spread(rs, |r| r["per_call"].as_f64()),
                "realloc_per_call": super::report::spread(rs, |r| r["realloc_per_call"].as_f64()),
                "runs": rs,
            }),
        );
    }
    Ok(json!({
        "rate": RATE,
        "window_ms": window.as_millis() as u64,
        "variants": Value::Object(out),
    }))
}

/// The targets-table row: the budgets enforcer's allocations per call against the pass-through's.
pub fn target(r: &Value) -> Value {
    let a = &r["allocations"];
    let v = &a["variants"];
    let enf = v["enforcer_budgets"]["per_call"]["median"].as_f64();
    let pass = v["passthrough"]["per_call"]["median"].as_f64();
    let measured = enf.zip(pass).map(|(e, p)| {
        format!(
            "{e:.1} vs the pass-through's {p:.1} ({:.1}×)",
            e / p.max(f64::MIN_POSITIVE)
        )
    });
    let note = match a["error"].as_str() {
        Some(e) => e.to_owned(),
        None if a.is_null() => "skipped".to_owned(),
        None => format!(
            "calls of the global allocator (uprobes, every one counted) at {} req/s; reallocations \
             apart; steady to ±2% where CPU times move by ±15%",
            a["rate"]
        ),
    };
    super::report::reported(
        "enforcer allocations per call (budgets, lease pool)",
        measured,
        &note,
    )
}

/// Its part of BENCHMARKS.md, under the CPU floor.
pub fn markdown(s: &mut String, r: &Value) {
    use std::fmt::Write as _;
    let a = &r["allocations"];
    if a.is_null() {
        return;
    }
    let _ = writeln!(s, "\n### Allocations per call (issue 20)\n");
    if let Some(e) = a["error"].as_str() {
        let _ = writeln!(s, "**Not counted: {e}**");
        return;
    }
    let _ = writeln!(
        s,
        "Every call of each proxy's global allocator (mimalloc's `mi_malloc_aligned`, \
         `mi_zalloc_aligned`, `mi_realloc_aligned`), counted by uprobes with `perf stat` over {} ms \
         at {} req/s, divided by the calls sent; median over repeats (min–max). The traps slow the \
         probed process, so these runs say nothing of CPU. `enforcer_no_budgets` runs without a \
         lease pool, so each of its calls reserves its own hold in Redis (a script call more).\n\n\
         | variant | allocations per call | reallocations per call | × pass-through |\n|---|---|---|---|",
        a["window_ms"], a["rate"]
    );
    let v = &a["variants"];
    let pass = v["passthrough"]["per_call"]["median"].as_f64();
    for (variant, _) in PROXIES {
        let x = &v[variant.name()];
        let span = |m: &Value| match (m["median"].as_f64(), m["min"].as_f64(), m["max"].as_f64()) {
            (Some(m), Some(lo), Some(hi)) => format!("{m:.1} ({lo:.1}–{hi:.1})"),
            _ => "–".to_owned(),
        };
        let ratio = x["per_call"]["median"].as_f64().zip(pass).map_or_else(
            || "–".to_owned(),
            |(e, p)| format!("{:.2}×", e / p.max(f64::MIN_POSITIVE)),
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} | {ratio} |",
            variant.name(),
            span(&x["per_call"]),
            span(&x["realloc_per_call"]),
        );
    }
}

/// One counted run of `variant` (its process `pid` runs `bin`).
fn count(
    env: &Env,
    stack: &Stack,
    variant: Variant,
    bin: &str,
    pid: u32,
    window: Duration,
) -> Result<Value> {
    let target = stack.target(variant, false, None);
    let file = env
        .work
        .join(format!("allocs-{}-{pid}.csv", variant.name()));
    let events: Vec<String> = ENTRY_POINTS
        .iter()
        .map(|(_, e)| format!("{GROUP}:{bin}_{e}"))
        .collect();
    let mut perf = Stat::start(pid, &events, &file)?;
    let r = loadgen::http(env, &target, Load::Rate(RATE), Duration::ZERO, window)?;
    // The settles of the last calls leave after their settle window (10 ms with a lease pool,
    // 2 ms without: enforcer::config::Config::settle_window): let them go and be counted.
    std::thread::sleep(Duration::from_millis(200));
    let counts = perf.stop()?;
    let calls = r["sent_total"].as_f64().unwrap_or(0.0);
    if calls < 1.0 {
        bail!("no call was sent");
    }
    if r["errors"].as_object().is_some_and(|e| !e.is_empty()) {
        bail!("calls failed: {}", r["errors"]);
    }
    let get = |e: &str| counts.get(&format!("{GROUP}:{bin}_{e}")).copied();
    let (Some(alloc), Some(zalloc), Some(realloc)) = (get("alloc"), get("zalloc"), get("realloc"))
    else {
        bail!("perf stat reported no count for some of {events:?}: {counts:?}");
    };
    Ok(json!({
        "calls": calls,
        "allocs": alloc + zalloc,
        "reallocs": realloc,
        "per_call": (alloc + zalloc) as f64 / calls,
        "realloc_per_call": realloc as f64 / calls,
    }))
}

/// The bench's uprobes, removed again when dropped.
struct Probes;

impl Probes {
    fn add(bin_dir: &Path) -> Result<Probes> {
        remove();
        step("uprobes on the allocator entry points of enforcer and passthrough");
        let guard = Probes;
        for bin in ["enforcer", "passthrough"] {
            let path = bin_dir.join(bin);
            for (func, e) in ENTRY_POINTS {
                let spec = format!("{GROUP}:{bin}_{e}={func}");
                let out = Command::new("perf")
                    .args(["probe", "-q", "-x"])
                    .arg(&path)
                    .args(["-a", &spec])
                    .output()
                    .context("running perf probe")?;
                if !out.status.success() {
                    bail!(
                        "perf probe -x {} -a {spec} failed: {}",
                        path.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
        Ok(guard)
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        remove();
    }
}

/// Removes the bench's probes (none there is no error).
fn remove() {
    let _ = Command::new("perf")
        .args(["probe", "-q", "-d", &format!("{GROUP}:*")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A `perf stat -p` counting until stopped.
struct Stat {
    perf: Perf,
    file: std::path::PathBuf,
}

impl Stat {
    fn start(pid: u32, events: &[String], file: &Path) -> Result<Stat> {
        // perf attaches to every thread of the process before it counts.
        let perf = Perf::start(
            Command::new("perf")
                .args(["stat", "-x", ",", "--no-big-num", "-e", &events.join(",")])
                .args(["-p", &pid.to_string(), "-o"])
                .arg(file),
        )?;
        Ok(Stat {
            perf,
            file: file.to_owned(),
        })
    }

    /// Stops the count and reads the counts by event name.
    fn stop(&mut self) -> Result<std::collections::HashMap<String, u64>> {
        let st = self.perf.stop()?;
        let text = std::fs::read_to_string(&self.file)
            .with_context(|| format!("reading {} (perf stat exited {st})", self.file.display()))?;
        Ok(parse_stat(&text))
    }
}

/// `perf stat -x ,` lines: `count,unit,event,...`; comments and uncounted events are skipped.
fn parse_stat(text: &str) -> std::collections::HashMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(',');
            let n = f.next()?.trim().parse::<u64>().ok()?;
            let event = f.nth(1)?.trim();
            Some((event.to_owned(), n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_stat;

    #[test]
    fn reads_counts_by_event() {
        let text = "# started on Sun Dec  6 12:00:00 2026\n\n\
                    1234,,llmw_bench:enforcer_alloc,3000000,100.00,,\n\
                    0,,llmw_bench:enforcer_zalloc,3000000,100.00,,\n\
                    <not counted>,,llmw_bench:enforcer_realloc,0,0.00,,\n";
        let m = parse_stat(text);
        assert_eq!(m.get("llmw_bench:enforcer_alloc"), Some(&1234));
        assert_eq!(m.get("llmw_bench:enforcer_zalloc"), Some(&0));
        assert_eq!(m.get("llmw_bench:enforcer_realloc"), None);
        assert_eq!(m.len(), 2);
    }
}
