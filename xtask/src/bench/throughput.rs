//! Ledger throughput: reserve + settle pairs per second through `ledger::store` vs
//! `redis-benchmark -t set -q` on the same redis-server, interleaved and repeated.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::report::spread;
use super::{Env, loadgen};

/// Concurrent ledger tasks (the enforcer at concurrency 64 has about this many calls in flight).
const TASKS: usize = 64;

pub fn run(env: &Env, redis_url: &str, redis_port: u16) -> Result<Value> {
    let (mut ledger_runs, mut set_runs) = (Vec::new(), Vec::new());
    for rep in 0..env.plan.repeats {
        let set = redis_benchmark_set(redis_port, env.plan.set_requests)?;
        let l = loadgen::ledger(env, redis_url, TASKS).context("ledger load")?;
        eprintln!(
            "    ledger rep {rep}: {:.0} pairs/s (errors {}), redis-benchmark SET {set:.0}/s",
            l["pairs_per_s"].as_f64().unwrap_or(0.0),
            l["errors"]
        );
        set_runs.push(json!({ "set_per_s": set }));
        ledger_runs.push(l);
    }
    let ratios: Vec<Value> = ledger_runs
        .iter()
        .zip(&set_runs)
        .filter_map(|(l, s)| {
            Some(json!({ "r": l["pairs_per_s"].as_f64()? / s["set_per_s"].as_f64()?.max(1.0) }))
        })
        .collect();
    Ok(json!({ "ledger": {
        "tasks": TASKS,
        "pairs_per_s": spread(&ledger_runs, |r| r["pairs_per_s"].as_f64()),
        "ops_per_s": spread(&ledger_runs, |r| r["ops_per_s"].as_f64()),
        "pair_p99_us": spread(&ledger_runs, |r| r["pair_latency_us"]["p99"].as_f64()),
        "set_per_s": spread(&set_runs, |r| r["set_per_s"].as_f64()),
        "ratio_pairs_to_set": spread(&ratios, |r| r["r"].as_f64()),
        "runs": ledger_runs,
    }}))
}

/// `redis-benchmark -t set -q` → SET requests per second.
fn redis_benchmark_set(port: u16, n: u64) -> Result<f64> {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "set",
            "-q",
            "-n",
            &n.to_string(),
        ])
        .output()
        .context("running redis-benchmark (apt-get install redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_set_rate(&text).with_context(|| format!("redis-benchmark printed {text:?}"))
}

/// Finds `SET: 123456.78 requests per second` (the last progress line wins).
fn parse_set_rate(text: &str) -> Result<f64> {
    for part in text.rsplit(['\r', '\n']) {
        if let Some(rest) = part.trim().strip_prefix("SET:")
            && let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok())
        {
            return Ok(n);
        }
    }
    bail!("no SET rate")
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_redis_benchmark_quiet_output() {
        let out = "SET: rps=0.0 (overall: nan) avg_msec=nan (overall: nan)\rSET: 98814.23 requests per second, p50=0.263 msec\n\n";
        assert!((super::parse_set_rate(out).unwrap() - 98814.23).abs() < 1e-6);
    }
}
