//! Enforcer memory over a soak, per connection and per call in flight (issue 20 item 4), on a
//! budgets enforcer of its own, started as the overhead section's (same config, same chat call),
//! in front of a mock with the same 20 ms latency, all on loopback, in this order:
//!
//! - 500 req/s open loop for 10 minutes (`--quick`: 60 s), `VmRSS` sampled every 5 s (2 s): the
//!   median of the last third of the samples after the warm-up minus the median of the first
//!   third, and the least-squares slope;
//! - idle first, after a warm-up: nothing sent for 20 s (`--quick`: 10 s), the enforcer's CPU
//!   time and its threads' wake-ups (voluntary context switches) per second, what a sidecar
//!   costs its host between calls;
//! - 1000 keep-alive connections that each made one call and sit idle (HTTP/1.1, then h2c):
//!   (`VmRSS` held − before) / connections;
//! - 1000 calls in flight at once (the mock answers after 5 s, `x-mock-latency-ms`):
//!   (`VmRSS` during − before) / calls.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::loadgen::{self, Held, Load, Target};
use super::overhead::{self, KEY_BUDGETS};
use super::report::median;
use super::{Env, stack};

mod report;
pub use report::{markdown, targets};

/// Connections held (idle), and calls held in flight.
pub const CONNECTIONS: u32 = 1000;
/// The soak's open-loop rate.
pub const RATE: u32 = 500;
/// How late the mock answers the calls held in flight.
const SLOW_MS: u64 = 5000;
/// From sending the calls held in flight to reading the RSS (well inside `SLOW_MS`).
const SETTLE: Duration = Duration::from_millis(2000);
/// Growth the soak tolerates as allocator noise: the larger of this and `TOLERANCE_PCT`.
pub const TOLERANCE_MIB: f64 = 2.0;
/// Growth the soak tolerates, in percent of the first third's median RSS.
pub const TOLERANCE_PCT: f64 = 2.0;

/// Sizes of the soak.
struct Soak {
    duration: Duration,
    warmup: Duration,
    every: Duration,
}

pub fn run(env: &Env, redis_url: &str) -> Result<Value> {
    let mock = stack::mock(
        &env.bin,
        &env.work,
        "soak-mock",
        20,
        &["--output-tokens", "120"],
    )?;
    let body = env.work.join("soak-chat.json");
    std::fs::write(&body, overhead::chat_body(false))?;
    let ((enforcer, port), _admin) = overhead::enforcer(
        env,
        redis_url,
        &mock,
        &mock,
        true,
        overhead::LEASE_POOL,
        "enforcer-soak",
    )?;
    let pid = enforcer.pid();
    let target = Target {
        url: format!("http://127.0.0.1:{port}/proxy/openai/chat/completions"),
        headers: vec![format!("authorization: Bearer {KEY_BUDGETS}")],
        body: Some(body),
        timeout: Duration::from_secs(10),
    };
    // Connection pool, budget caches, allocator: warm before the first reading.
    loadgen::http(
        env,
        &target,
        Load::Concurrency(16),
        Duration::ZERO,
        Duration::from_secs(1),
    )
    .context("warming up")?;
    let plan = if env.plan.quick {
        Soak {
            duration: Duration::from_secs(60),
            warmup: Duration::from_secs(15),
            every: Duration::from_secs(2),
        }
    } else {
        Soak {
            duration: Duration::from_secs(600),
            warmup: Duration::from_secs(60),
            every: Duration::from_secs(5),
        }
    };
    // Reported apart: a failure here leaves the row unmeasured, not the section.
    let quiet = stack::at_rest(pid, if env.plan.quick { 10 } else { 20 }, "enforcer")
        .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    // The soak first: the calls held in flight below leave 1000 upstream connections in the
    // enforcer's pool until its 90 s idle timeout, whose release would show in the soak's samples.
    let soak = soak(env, pid, &target, &plan).context("soak")?;
    let idle_h1 = idle(env, pid, &target, false).context("idle HTTP/1.1 connections")?;
    let idle_h2 = idle(env, pid, &target, true).context("idle h2c connections")?;
    let mut slow = target.clone();
    slow.headers.push(format!("x-mock-latency-ms: {SLOW_MS}"));
    slow.timeout = Duration::from_millis(SLOW_MS) * 4;
    let in_flight = in_flight(env, pid, &slow).context("calls in flight")?;
    Ok(json!({ "soak": {
        "quiet": quiet, "idle_http1": idle_h1, "idle_h2c": idle_h2, "in_flight": in_flight,
        "soak": soak,
    }}))
}

/// `VmRSS` once the enforcer is quiet: after 1 s (the enforcer has mimalloc purge freed pages
/// after 10 ms), the median of 5 readings 100 ms apart, in KiB.
fn settled_rss(pid: u32) -> Result<f64> {
    std::thread::sleep(Duration::from_secs(1));
    rss_now(pid)
}

/// The median of 5 `VmRSS` readings 100 ms apart, in KiB.
fn rss_now(pid: u32) -> Result<f64> {
    let mut v = Vec::new();
    for i in 0..5 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        v.push(stack::rss_kib(pid).context("reading the enforcer's VmRSS")? as f64);
    }
    Ok(median(&v))
}

fn idle(env: &Env, pid: u32, target: &Target, h2c: bool) -> Result<Value> {
    let before = settled_rss(pid)?;
    let mut h = loadgen::hold(env, target, CONNECTIONS, h2c, Held::Idle)?;
    let open = h.line()?;
    let held = settled_rss(pid)?;
    let done = h.release()?;
    let after = settled_rss(pid)?;
    let n = open["connections"].as_f64().unwrap_or(0.0);
    let per = (n > 0.0).then(|| (held - before) / n);
    eprintln!(
        "    {} idle {} connections ({} calls ok, errors {}): RSS {:.1} → {:.1} MiB, {:.1} KiB per connection; {:.1} MiB after closing",
        n,
        if h2c { "h2c" } else { "HTTP/1.1" },
        open["ok"],
        open["errors"],
        before / 1024.0,
        held / 1024.0,
        per.unwrap_or(f64::NAN),
        after / 1024.0
    );
    Ok(json!({
        "protocol": if h2c { "h2c" } else { "http1" },
        "connections": open["connections"], "ok": open["ok"], "errors": open["errors"],
        "rss_before_kib": before, "rss_held_kib": held, "rss_after_close_kib": after,
        "kib_per_connection": per, "done": done,
    }))
}

fn in_flight(env: &Env, pid: u32, target: &Target) -> Result<Value> {
    let before = settled_rss(pid)?;
    let t0 = Instant::now();
    let mut h = loadgen::hold(
        env,
        target,
        CONNECTIONS,
        false,
        Held::InFlight { settle: SETTLE },
    )?;
    let at = h.line()?;
    let during = rss_now(pid)?;
    let sampled_at = t0.elapsed();
    let done = h.line()?;
    drop(h);
    let after = settled_rss(pid)?;
    let pending = at["pending"].as_u64().unwrap_or(0) as f64;
    let per = (pending > 0.0).then(|| (during - before) / pending);
    eprintln!(
        "    {pending} calls in flight (of {} connections; {} answered after, errors {}): RSS {:.1} → {:.1} MiB, {:.1} KiB per call; {:.1} MiB after",
        at["connections"],
        done["ok"],
        done["errors"],
        before / 1024.0,
        during / 1024.0,
        per.unwrap_or(f64::NAN),
        after / 1024.0
    );
    Ok(json!({
        "calls": at["pending"], "connections": at["connections"], "provider_latency_ms": SLOW_MS,
        "sampled_after_ms": sampled_at.as_millis() as u64,
        "ok": done["ok"], "errors": done["errors"], "latency_us": done["latency_us"],
        "rss_before_kib": before, "rss_during_kib": during, "rss_after_kib": after,
        "kib_per_call": per,
    }))
}

fn soak(env: &Env, pid: u32, target: &Target, plan: &Soak) -> Result<Value> {
    let mut samples: Vec<(f64, f64)> = Vec::new();
    // Beside VmRSS: its anonymous part and the thread count, which tell a heap that grows from
    // the allocator's per-thread pages (a new blocking thread) or file pages.
    let mut detail: Vec<(u64, u64)> = Vec::new();
    let t0 = Instant::now();
    let report = std::thread::scope(|s| {
        let load =
            s.spawn(|| loadgen::http(env, target, Load::Rate(RATE), Duration::ZERO, plan.duration));
        // Bounded: loadgen stops on time; this loop also gives up a minute after it should have.
        let give_up = plan.duration + Duration::from_secs(60);
        while !load.is_finished() && t0.elapsed() < give_up {
            if let Some(k) = stack::rss_kib(pid) {
                samples.push((t0.elapsed().as_secs_f64(), k as f64));
                detail.push((
                    stack::status_field(pid, "RssAnon:").unwrap_or(0),
                    stack::status_field(pid, "Threads:").unwrap_or(0),
                ));
            }
            let next = plan.every * u32::try_from(samples.len()).unwrap_or(u32::MAX);
            std::thread::sleep(
                next.saturating_sub(t0.elapsed())
                    .max(Duration::from_millis(10)),
            );
        }
        load.join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))?
    })?;
    let after = settled_rss(pid)?;
    let mut g = growth(&samples, plan.warmup.as_secs_f64());
    let calls = report["ok"].as_f64().unwrap_or(0.0);
    eprintln!(
        "    soak {RATE} req/s for {} s: {} ok, errors {}, p99 {} µs; RSS growth {:+.2} MiB (slope {:+.3} MiB/min), samples {:.1}–{:.1} MiB",
        plan.duration.as_secs(),
        report["ok"],
        report["errors"],
        report["latency_us"]["p99"],
        g["growth_mib"].as_f64().unwrap_or(f64::NAN),
        g["slope_mib_per_min"].as_f64().unwrap_or(f64::NAN),
        g["min_mib"].as_f64().unwrap_or(f64::NAN),
        g["max_mib"].as_f64().unwrap_or(f64::NAN),
    );
    g["rate"] = json!(RATE);
    g["duration_s"] = json!(plan.duration.as_secs());
    g["warmup_s"] = json!(plan.warmup.as_secs());
    g["sample_every_s"] = json!(plan.every.as_secs());
    g["ok"] = report["ok"].clone();
    g["errors"] = report["errors"].clone();
    g["achieved_rps"] = report["achieved_rps"].clone();
    g["latency_us"] = report["latency_us"].clone();
    g["rss_after_load_mib"] = json!(after / 1024.0);
    g["samples_format"] = json!("[s, VmRSS MiB, RssAnon MiB, threads]");
    // What a steady growth would be per call (the calls after the warm-up).
    if let Some(gm) = g["growth_mib"].as_f64() {
        let measured = calls * (1.0 - plan.warmup.as_secs_f64() / plan.duration.as_secs_f64());
        g["growth_bytes_per_call"] = json!(gm * 1024.0 * 1024.0 / measured.max(1.0));
    }
    g["samples"] = json!(
        samples
            .iter()
            .zip(&detail)
            .map(|((t, k), (anon, threads))| json!([
                (t * 10.0).round() / 10.0,
                (k / 1024.0 * 100.0).round() / 100.0,
                (*anon as f64 / 1024.0 * 100.0).round() / 100.0,
                threads
            ]))
            .collect::<Vec<_>>()
    );
    Ok(g)
}

/// RSS growth from `(seconds, KiB)` samples after `warmup_s`: the median of the last third minus
/// the median of the first third, in MiB, and the least-squares slope in MiB per minute.
fn growth(samples: &[(f64, f64)], warmup_s: f64) -> Value {
    let kept: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|(t, _)| *t >= warmup_s)
        .map(|(t, k)| (t, k / 1024.0))
        .collect();
    if kept.len() < 3 {
        return json!({ "error": format!("{} samples after the warm-up, need 3", kept.len()) });
    }
    let third = kept.len() / 3;
    let mib: Vec<f64> = kept.iter().map(|(_, m)| *m).collect();
    let first = median(&mib[..third]);
    let last = median(&mib[mib.len() - third..]);
    let n = kept.len() as f64;
    let (mt, mm) = (
        kept.iter().map(|(t, _)| t).sum::<f64>() / n,
        mib.iter().sum::<f64>() / n,
    );
    let cov: f64 = kept.iter().map(|(t, m)| (t - mt) * (m - mm)).sum();
    let var: f64 = kept.iter().map(|(t, _)| (t - mt).powi(2)).sum();
    let slope = if var > 0.0 { cov / var * 60.0 } else { 0.0 };
    let tolerance = TOLERANCE_MIB.max(first * TOLERANCE_PCT / 100.0);
    json!({
        "samples_after_warmup": kept.len(),
        "first_third_median_mib": first,
        "last_third_median_mib": last,
        "growth_mib": last - first,
        "slope_mib_per_min": slope,
        "min_mib": mib.iter().copied().fold(f64::INFINITY, f64::min),
        "max_mib": mib.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        "tolerance_mib": tolerance,
    })
}

#[cfg(test)]
mod tests {
    use super::growth;

    #[test]
    fn growth_compares_thirds_after_the_warmup_and_fits_a_slope() {
        // 10 s warm-up climbing to 40 MiB, then a steady 1 MiB per minute from 40 MiB.
        let mut s: Vec<(f64, f64)> = (0..5)
            .map(|i| (f64::from(i) * 2.0, 10_240.0 * f64::from(i)))
            .collect();
        s.extend((5..=95).map(|i| {
            let t = f64::from(i) * 2.0;
            (t, (40.0 + (t - 10.0) / 60.0) * 1024.0)
        }));
        let g = growth(&s, 10.0);
        assert_eq!(g["samples_after_warmup"], 91);
        let slope = g["slope_mib_per_min"].as_f64().unwrap();
        assert!((slope - 1.0).abs() < 1e-9, "{g}");
        // Thirds of 30 samples (60 s each), medians 120 s apart: 2 MiB.
        let growth_mib = g["growth_mib"].as_f64().unwrap();
        assert!((growth_mib - 2.0).abs() < 0.05, "{g}");
        assert!(
            (g["tolerance_mib"].as_f64().unwrap() - 2.0).abs() < 1e-9,
            "{g}"
        );
        // Flat with noise: no growth; too few samples: an error, not a number.
        let flat: Vec<(f64, f64)> = (0..30)
            .map(|i| (f64::from(i), 51_200.0 + f64::from(i % 3) * 100.0))
            .collect();
        assert!(growth(&flat, 0.0)["growth_mib"].as_f64().unwrap().abs() < 0.1);
        assert!(growth(&flat[..2], 0.0)["error"].is_string());
    }
}
