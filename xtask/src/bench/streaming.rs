//! Streaming: 200+ concurrent SSE streams of 64 chunks, direct vs through the enforcer (budgets on)
//! vs through the pass-through proxy (the floor), interleaved and repeated; time to first event and
//! the gaps between events as the client sees them, and each proxy's CPU per SSE event; then
//! one more run of each under the scheduler's tracepoints, for how long each process waits for a
//! CPU (`sched.rs`).

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::overhead::{Stack, Variant, tree_ticks};
use super::report::spread;
use super::{Env, loadgen, stack};

pub fn run(env: &Env, stack: &Stack) -> Result<Value> {
    // Direct and the enforcer first: `vs_direct` compares runs[0] and runs[1].
    let variants = [Variant::Direct, Variant::Budgets, Variant::Passthrough];
    let mut runs: [Vec<Value>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for rep in 0..env.plan.repeats {
        for k in 0..variants.len() {
            let i = (k + rep) % variants.len();
            let v = variants[i];
            let before = stack.pid(v).map(tree_ticks);
            let mock_before = stack::cpu_ticks(stack.mock_pid(true));
            let mut r = loadgen::stream(env, &stack.target(v, true, None))
                .with_context(|| format!("streams {}", v.name()))?;
            // The proxy's CPU per SSE event it forwarded (each stream's request, reserve and
            // settle included): steadier than tail latency on this shared machine.
            let events = r["events_per_stream"].as_f64().unwrap_or(0.0)
                * (env.plan.streams * env.plan.stream_rounds) as f64;
            let per_event = |ticks: u64| ticks as f64 / stack::ticks_per_s() * 1e6 / events;
            if let (Some(p), Some(b)) = (stack.pid(v), before)
                && events > 0.0
            {
                r["cpu_us_per_event"] = json!(per_event(tree_ticks(p).saturating_sub(b)));
            }
            if let (Some(b), Some(a)) = (mock_before, stack::cpu_ticks(stack.mock_pid(true)))
                && events > 0.0
            {
                r["mock_cpu_us_per_event"] = json!(per_event(a.saturating_sub(b)));
            }
            eprintln!(
                "    streams  {:<20} rep {rep}: TTFT p99 {:>6} µs  gap p50 {:>6} µs  gap p99 {:>6} µs  events/stream {:.1}  errors {}",
                v.name(),
                r["ttft_us"]["p99"],
                r["gap_us"]["p50"],
                r["gap_us"]["p99"],
                r["events_per_stream"].as_f64().unwrap_or(0.0),
                r["errors"]
            );
            runs[i].push(r);
        }
    }
    // Then one more run of each under the scheduler's tracepoints: how long each process waited
    // for a CPU after its wake-ups (reported, not a target; a missing `perf` is said, not fatal).
    let waits = super::sched::run(env, stack, &variants).unwrap_or_else(|e| {
        eprintln!("\x1b[1;31mwaits for a CPU NOT recorded: {e:#}\x1b[0m");
        json!({ "error": format!("{e:#}") })
    });
    let mut vs = serde_json::Map::new();
    for (v, rs) in variants.iter().zip(&runs) {
        vs.insert(v.name().into(), aggregate(rs));
    }
    // `of`: 1 the enforcer, 2 the pass-through; against direct (0), repeat by repeat.
    let diff_of = |of: usize, q: &'static str, field: &'static str| {
        let d: Vec<Value> = runs[0]
            .iter()
            .zip(&runs[of])
            .filter_map(|(b, r)| {
                Some(json!({ "d": r[field][q].as_f64()? - b[field][q].as_f64()? }))
            })
            .collect();
        spread(&d, |x| x["d"].as_f64())
    };
    let diff = |q, field| diff_of(1, q, field);
    // The enforcer's CPU per event beyond the floor's, repeat by repeat.
    let cpu: Vec<Value> = runs[1]
        .iter()
        .zip(&runs[2])
        .filter_map(|(e, p)| {
            Some(json!({ "d": e["cpu_us_per_event"].as_f64()? - p["cpu_us_per_event"].as_f64()? }))
        })
        .collect();
    Ok(json!({
        "streams": env.plan.streams,
        "chunks": 64,
        "chunk_delay_ms": 10,
        "variants": vs,
        "vs_direct": {
            "added_ttft_p50_us": diff("p50", "ttft_us"),
            "added_ttft_p99_us": diff("p99", "ttft_us"),
            "added_gap_p50_us": diff("p50", "gap_us"),
            "added_gap_p99_us": diff("p99", "gap_us"),
            "added_gap_p999_us": diff("p999", "gap_us"),
        },
        // What the floor adds to the same latencies: the share of the enforcer's figures that any
        // proxy on this stack pays on this machine.
        "passthrough_vs_direct": {
            "added_ttft_p99_us": diff_of(2, "p99", "ttft_us"),
            "added_gap_p99_us": diff_of(2, "p99", "gap_us"),
        },
        "waits_for_cpu": waits,
        "vs_passthrough": {
            "enforcer_budgets": {
                "added_cpu_us_per_event": spread(&cpu, |x| x["d"].as_f64()),
            },
        },
    }))
}

fn aggregate(runs: &[Value]) -> Value {
    let errors: u64 = runs
        .iter()
        .filter_map(|r| r["errors"].as_object())
        .flat_map(|m| m.values().filter_map(Value::as_u64))
        .sum();
    let q = |field: &'static str, p: &'static str| spread(runs, move |r| r[field][p].as_f64());
    json!({
        "ttft_p50_us": q("ttft_us", "p50"),
        "ttft_p99_us": q("ttft_us", "p99"),
        "gap_p50_us": q("gap_us", "p50"),
        "gap_p99_us": q("gap_us", "p99"),
        "gap_p999_us": q("gap_us", "p999"),
        "events_per_stream": spread(runs, |r| r["events_per_stream"].as_f64()),
        "cpu_us_per_event": spread(runs, |r| r["cpu_us_per_event"].as_f64()),
        "mock_cpu_us_per_event": spread(runs, |r| r["mock_cpu_us_per_event"].as_f64()),
        "errors": errors,
        "runs": runs,
    })
}
