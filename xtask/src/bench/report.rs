//! Aggregation (medians and spread over repeats), the targets of issues 6 and 20 with PASS/MISS,
//! the machine description, and the BENCHMARKS.md rendering.

use std::fmt::Write as _;
use std::process::Command;

use serde_json::{Value, json};

use crate::command::output;

/// Median of `v` (mean of the middle two when even); 0 when empty.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        })
}

/// `{"median", "min", "max"}` of the values at `path` in each run.
pub fn spread(runs: &[Value], f: impl Fn(&Value) -> Option<f64>) -> Value {
    let v: Vec<f64> = runs.iter().filter_map(f).collect();
    if v.is_empty() {
        return Value::Null;
    }
    let (lo, hi) = min_max(&v);
    json!({ "median": median(&v), "min": lo, "max": hi })
}

fn at(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_f64()
}

/// Medians and spread of one variant's repeated HTTP runs.
pub fn aggregate_http(runs: &[Value]) -> Value {
    let errors: u64 = runs
        .iter()
        .filter_map(|r| r["errors"].as_object())
        .flat_map(|m| m.values().filter_map(Value::as_u64))
        .sum();
    json!({
        "p50_us": spread(runs, |r| at(r, &["latency_us", "p50"])),
        "p99_us": spread(runs, |r| at(r, &["latency_us", "p99"])),
        "p999_us": spread(runs, |r| at(r, &["latency_us", "p999"])),
        "achieved_rps": spread(runs, |r| at(r, &["achieved_rps"])),
        "cpu_ms_per_1000": spread(runs, |r| at(r, &["cpu_ms_per_1000"])),
        "rss_kib": spread(runs, |r| at(r, &["rss_kib"])),
        "mock_cpu_ms_per_1000": spread(runs, |r| at(r, &["mock_cpu_ms_per_1000"])),
        "redis_cpu_ms_per_1000": spread(runs, |r| at(r, &["redis_cpu_ms_per_1000"])),
        "before_forwarding_us": spread(runs, |r| at(r, &["before_forwarding_us"])),
        "errors": errors,
        "runs": runs,
    })
}

/// Per-repeat comparisons of `runs` against `base` (same repeat index ran back to back).
pub fn ratios(base: &[Value], runs: &[Value]) -> Value {
    let pairs: Vec<(&Value, &Value)> = base.iter().zip(runs).collect();
    let per = |f: &dyn Fn(&Value, &Value) -> Option<f64>| -> Value {
        let v: Vec<f64> = pairs.iter().filter_map(|(b, r)| f(b, r)).collect();
        if v.is_empty() {
            return Value::Null;
        }
        let (lo, hi) = min_max(&v);
        json!({ "median": median(&v), "min": lo, "max": hi })
    };
    let lat = |q: &'static str| {
        move |b: &Value, r: &Value| Some((at(r, &["latency_us", q])?, at(b, &["latency_us", q])?))
    };
    json!({
        "p99_ratio": per(&|b, r| lat("p99")(b, r).map(|(x, y)| x / y.max(1.0))),
        "p50_ratio": per(&|b, r| lat("p50")(b, r).map(|(x, y)| x / y.max(1.0))),
        "added_p50_us": per(&|b, r| lat("p50")(b, r).map(|(x, y)| x - y)),
        "added_p99_us": per(&|b, r| lat("p99")(b, r).map(|(x, y)| x - y)),
        "added_p999_us": per(&|b, r| lat("p999")(b, r).map(|(x, y)| x - y)),
        "throughput_ratio": per(&|b, r| Some(at(r, &["achieved_rps"])? / at(b, &["achieved_rps"])?.max(1e-9))),
    })
}

/// Per-repeat CPU per call of `runs` as a ratio to `floor`'s (the pass-through run of the same
/// repeat).
pub fn cpu_ratios(floor: &[Value], runs: &[Value]) -> Value {
    let r: Vec<Value> = floor
        .iter()
        .zip(runs)
        .filter_map(|(f, r)| {
            let (f, r) = (at(f, &["cpu_ms_per_1000"])?, at(r, &["cpu_ms_per_1000"])?);
            (f > 0.0).then(|| json!({ "x": r / f }))
        })
        .collect();
    json!({ "cpu_ratio": spread(&r, |x| x["x"].as_f64()) })
}

/// nproc, CPU model, kernel, memory.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")
            .and_then(|r| r.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
    });
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
    });
    json!({
        "nproc": output(&mut Command::new("nproc")).and_then(|s| s.trim().parse::<u64>().ok()),
        "cpu_model": model,
        "kernel": output(Command::new("uname").arg("-r")).map(|s| s.trim().to_owned()),
        "mem_gib": mem_kib.map(|k| (k as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "load_avg_at_start": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
    })
}

fn med(v: &Value) -> Option<f64> {
    v.get("median").and_then(Value::as_f64)
}

fn find_scenario<'a>(results: &'a Value, load: &str) -> Option<&'a Value> {
    results["overhead"]["scenarios"]
        .as_array()?
        .iter()
        .find(|s| s["load"] == load)
}

/// One target: what the issue asks, what was measured, PASS / MISS / NOT MEASURED.
pub(super) fn target(
    name: &str,
    goal: &str,
    measured: Option<String>,
    pass: Option<bool>,
    note: &str,
) -> Value {
    json!({
        "target": name, "goal": goal,
        "measured": measured.unwrap_or_else(|| "not measured".to_owned()),
        "status": match pass { Some(true) => "PASS", Some(false) => "MISS", None => "NOT MEASURED" },
        "note": note,
    })
}

/// The row of a `stack::at_rest` reading: `note` when measured, else the reading's own error or,
/// without one, `why` (the section's).
pub(super) fn at_rest_row(name: &str, rest: &Value, note: &str, why: &str) -> Value {
    let wakeups = rest["wakeups_per_s"].as_f64();
    reported(
        name,
        wakeups.map(|w| {
            format!(
                "{w:.1} wake-ups/s, {:.1} ms CPU per minute",
                rest["cpu_ms_per_min"].as_f64().unwrap_or(0.0)
            )
        }),
        match wakeups {
            Some(_) => note,
            None => rest["error"].as_str().unwrap_or(why),
        },
    )
}

/// A row with no goal: the issue asks for the figure to be reported.
pub(super) fn reported(name: &str, measured: Option<String>, note: &str) -> Value {
    let status = if measured.is_some() {
        "REPORTED"
    } else {
        "NOT MEASURED"
    };
    json!({
        "target": name, "goal": "reported (no goal)",
        "measured": measured.unwrap_or_else(|| "not measured".to_owned()),
        "status": status, "note": note,
    })
}

/// Said of a difference whose repeats disagree in sign.
const NOISE: &str = "repeats disagree in sign (min–max of the per-repeat differences spans 0): noise \
                     on this shared machine exceeds the overhead; see the spread in the table";

/// Whether a per-repeat difference's repeats disagree in sign (its min–max spans 0).
fn spans_zero(d: &Value) -> bool {
    d["min"].as_f64().unwrap_or(0.0) < 0.0 && d["max"].as_f64().unwrap_or(0.0) > 0.0
}

/// Every target of issue 6 checked against the results.
pub fn targets(r: &Value) -> Value {
    let mut t = Vec::new();
    // 1. Enforcer with budgets at 500 req/s.
    let s500 = find_scenario(r, "rate-500").map(|s| &s["vs_direct"]["enforcer_budgets"]);
    let ratio = s500.and_then(|s| med(&s["p99_ratio"]));
    let added = s500.and_then(|s| med(&s["added_p99_us"]));
    // Repeats that disagree in sign mean the noise of this shared machine exceeds the overhead.
    let noisy = s500.is_some_and(|s| spans_zero(&s["added_p99_us"]));
    let noise_note = if noisy { NOISE } else { "" };
    t.push(target(
        "enforcer p99 vs direct at 500 req/s (budgets, lease pool)",
        "≤ 1.05×",
        ratio.map(|x| format!("{x:.3}×")),
        ratio.map(|x| x <= 1.05),
        noise_note,
    ));
    t.push(target(
        "enforcer added p99 at 500 req/s (budgets, lease pool)",
        "≤ 1 ms",
        added.map(|x| format!("{:.0} µs", x)),
        added.map(|x| x <= 1000.0),
        noise_note,
    ));
    // One sequential keep-alive client: what each call of a single caller waits for.
    let c1 = find_scenario(r, "c1").map(|s| &s["vs_direct"]["enforcer_budgets"]["added_p50_us"]);
    let added_p50 = c1.and_then(med);
    // Where it goes: each proxy's own holds of a call, from one more traced run.
    let held = |v: &str| {
        let w = &r["overhead"]["on_path"][v];
        Some((
            w["request"]["p50_us"].as_f64()?,
            w["response"]["p50_us"].as_f64()?,
        ))
    };
    let on_path = match (held("enforcer_budgets"), held("passthrough")) {
        (Some((eq, es)), Some((pq, ps))) => format!(
            "the enforcer holds a call p50 {eq:.0} µs (request) + {es:.0} µs (response) on its \
             path, the pass-through {pq:.0} + {ps:.0} (section 1, \"Time on the path\")"
        ),
        _ => String::new(),
    };
    let c1_note = match (c1.is_some_and(spans_zero), on_path.is_empty()) {
        (true, true) => NOISE.to_owned(),
        (true, false) => format!("{NOISE}; {on_path}"),
        (false, _) => on_path,
    };
    t.push(target(
        "enforcer added p50, one sequential keep-alive client (budgets, lease pool)",
        "≤ 0.3 ms",
        added_p50.map(|x| format!("{x:.0} µs")),
        added_p50.map(|x| x <= 300.0),
        &c1_note,
    ));
    let c64 = find_scenario(r, "c64")
        .and_then(|s| med(&s["vs_direct"]["enforcer_budgets"]["throughput_ratio"]));
    t.push(target(
        "enforcer throughput at concurrency 64 (budgets, lease pool)",
        "≥ 0.97× direct",
        c64.map(|x| format!("{x:.3}×")),
        c64.map(|x| x >= 0.97),
        "",
    ));
    // 2. Streaming.
    let st = &r["streaming"]["vs_direct"];
    let ttft = med(&st["added_ttft_p99_us"]);
    let gap = med(&st["added_gap_p99_us"]);
    // What each proxy's threads wait for a CPU after a wake-up: the floor under both rows.
    let w = &r["streaming"]["waits_for_cpu"];
    let waits = match (
        w["enforcer_budgets"]["proxy"]["p99_us"].as_f64(),
        w["passthrough"]["proxy"]["p99_us"].as_f64(),
    ) {
        (Some(e), Some(p)) => format!(
            "after a wake-up the proxy's threads waited p99 {e:.0} µs (enforcer) and {p:.0} µs \
             (pass-through) for a CPU (section 2, \"Waits for a CPU\")"
        ),
        _ => String::new(),
    };
    let join = |a: &str, b: &str| match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}; {b}"),
    };
    t.push(target(
        "streaming added TTFT p99",
        "≤ 1 ms",
        ttft.map(|x| format!("{x:.0} µs")),
        ttft.map(|x| x <= 1000.0),
        &join(
            if spans_zero(&st["added_ttft_p99_us"]) {
                NOISE
            } else {
                ""
            },
            &waits,
        ),
    ));
    let floor_gap = med(&r["streaming"]["passthrough_vs_direct"]["added_gap_p99_us"]);
    let floor_note = join(
        &floor_gap.map_or_else(String::new, |x| {
            format!("the pass-through (the floor) adds {x:.0} µs in the same repeats")
        }),
        &waits,
    );
    t.push(target(
        "streaming added inter-chunk p99",
        "≤ 200 µs",
        gap.map(|x| format!("{x:.0} µs")),
        gap.map(|x| x <= 200.0),
        &floor_note,
    ));
    // Issue 20: CPU per call against the pass-through floor, and per SSE event beyond it.
    for (load, label) in [("rate-500", "500 req/s"), ("c64", "concurrency 64")] {
        let sc = find_scenario(r, load);
        let x = sc.and_then(|s| med(&s["vs_passthrough"]["enforcer_budgets"]["cpu_ratio"]));
        let cpu = |v: &str| {
            sc.and_then(|s| med(&s["variants"][v]["cpu_ms_per_1000"]))
                .map_or_else(|| "?".into(), |ms| format!("{ms:.0} µs"))
        };
        t.push(target(
            &format!("enforcer CPU per call vs pass-through at {label} (budgets, lease pool)"),
            "≤ 1.5×",
            x.map(|x| {
                format!(
                    "{x:.2}× ({} vs {} per call)",
                    cpu("enforcer_budgets"),
                    cpu("passthrough")
                )
            }),
            x.map(|x| x <= 1.5),
            "CPU ms / 1000 req is µs per call; median of the per-repeat ratios",
        ));
    }
    let ev = med(&r["streaming"]["vs_passthrough"]["enforcer_budgets"]["added_cpu_us_per_event"]);
    t.push(target(
        "enforcer CPU per SSE event beyond the pass-through's",
        "≤ 3 µs",
        ev.map(|x| format!("{x:.1} µs")),
        ev.map(|x| x <= 3.0),
        "each stream's request, reserve and settle spread over its events; median of per-repeat differences",
    ));
    t.push(super::allocs::target(r));
    let mem = &r["memory"];
    let peak = mem["peak_rss_mib"].as_f64();
    t.push(target(
        "enforcer peak RSS, 64 concurrent 4 MiB embeddings calls with ~6 MB answers",
        "< 256 MiB",
        peak.map(|x| format!("{x:.0} MiB")),
        peak.map(|x| x < 256.0),
        &match peak {
            Some(_) => format!(
                "VmHWM over the whole bench run; {} calls answered, {} refused by the in-flight body budget (503)",
                mem["ok"], mem["refused_503"]
            ),
            None => mem["error"].as_str().unwrap_or("not measured").to_owned(),
        },
    ));
    t.extend(super::soak::targets(r));
    // 3. LiteLLM: its best closed-loop run vs the enforcer's highest throughput among closed-loop
    // runs whose p99 is no worse than LiteLLM's (a lower bound of the ratio at equal p99).
    t.push(litellm_target(r));
    // 4. Ledger.
    let lr = med(&r["ledger"]["ratio_pairs_to_set"]);
    t.push(target(
        "ledger reserve+settle pairs/s vs redis-benchmark SET",
        "≥ 0.5×",
        lr.map(|x| format!("{x:.3}×")),
        lr.map(|x| x >= 0.5),
        "one pair = two Lua scripts (reserve, settle)",
    ));
    // 5. Observer.
    let obs = &r["observer"];
    let skipped = obs["skipped"]
        .as_str()
        .or(obs["error"].as_str())
        .unwrap_or("");
    let nl = med(&obs["non_llm"]["ratio"]);
    let added = obs["non_llm"]["added_us_per_request"].as_f64();
    let nl_note = match added {
        Some(us) if skipped.is_empty() => format!(
            "worst case: a 2-byte answer at zero latency; the observer adds {us:.1} µs per HTTPS \
             request (a probe and a return probe per SSL write and read, on instructions the kernel \
             emulates), whatever the answer's size"
        ),
        _ => skipped.to_owned(),
    };
    t.push(target(
        "observer: HTTPS non-LLM client throughput",
        "≥ 0.95× unattached",
        nl.map(|x| format!("{x:.3}×")),
        nl.map(|x| x >= 0.95),
        &nl_note,
    ));
    let lazy = med(&obs["non_llm_on_connect"]["ratio"]);
    t.push(target(
        "observer with attach = \"on-connect\": HTTPS non-LLM client throughput",
        "≥ 0.99× unattached",
        lazy.map(|x| format!("{x:.3}×")),
        lazy.map(|x| x >= 0.99),
        if skipped.is_empty() {
            "the client never connects to a provider, so it gets no probe: the kernel puts no breakpoint in it"
        } else {
            skipped
        },
    ));
    t.push(at_rest_row(
        "observer at rest (no LLM traffic): wake-ups and CPU",
        &obs["at_rest"],
        "voluntary context switches of all its threads and utime + stime, probes attached \
         host-wide, nothing sent; what every host pays between calls",
        skipped,
    ));
    for (key, name) in [
        ("capture_500", "observer: capture at 500 LLM calls/s"),
        (
            "capture_h2_500",
            "observer: capture at 500 LLM calls/s over HTTP/2",
        ),
    ] {
        t.push(capture_target(&obs[key], name, skipped));
    }
    // Go (issue 15): the capture rows are the last two of `capture` when present.
    let caps = obs["capture"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for (offered, name) in [
        (
            "Go net/http HTTP/1.1, 16 goroutines",
            "observer: capture of a Go client at ≥ 500 calls/s",
        ),
        (
            "Go net/http HTTP/2, 16 goroutines",
            "observer: capture of a Go client at ≥ 500 calls/s over HTTP/2",
        ),
    ] {
        let c = caps
            .iter()
            .find(|c| c["offered"].as_str() == Some(offered))
            .unwrap_or(&Value::Null);
        t.push(capture_target(c, name, skipped));
    }
    for (proto, name) in [
        ("http1", "observer: Go HTTPS non-LLM client throughput"),
        (
            "http2",
            "observer: Go HTTPS non-LLM client throughput over HTTP/2",
        ),
    ] {
        let g = med(&obs["go_non_llm"][proto]["ratio"]);
        t.push(target(
            name,
            "≥ 0.95× unattached",
            g.map(|x| format!("{x:.3}×")),
            g.map(|x| x >= 0.95),
            if skipped.is_empty() {
                "16 goroutines calling chat completions on a host that is no provider (the kernel filter stops copying)"
            } else {
                skipped
            },
        ));
    }
    Value::Array(t)
}

/// A capture target: 100% of the calls sent at ≥ 500/s recorded.
fn capture_target(c5: &Value, name: &str, skipped: &str) -> Value {
    let cap = c5["captured_fraction"].as_f64();
    let rate = c5["achieved_rps"].as_f64().unwrap_or(0.0);
    let note = if cap.is_some() && rate < 500.0 {
        "the client could not reach 500 calls/s on this machine: capture was measured at a lower rate"
    } else {
        skipped
    };
    target(
        name,
        "100%",
        cap.map(|x| {
            format!(
                "{:.2}% ({} of {} at {rate:.0} calls/s)",
                x * 100.0,
                c5["captured"],
                c5["sent"]
            )
        }),
        cap.map(|x| x >= 1.0 && rate >= 500.0),
        note,
    )
}

fn litellm_target(r: &Value) -> Value {
    let scenarios: Vec<&Value> = ["c16", "c64"]
        .iter()
        .filter_map(|l| find_scenario(r, l))
        .collect();
    let lite = scenarios
        .iter()
        .filter_map(|s| {
            let v = &s["variants"]["litellm"];
            Some((
                s["load"].as_str()?.to_owned(),
                med(&v["achieved_rps"])?,
                med(&v["p99_us"])?,
            ))
        })
        .filter(|(_, q, _)| *q > 0.0)
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let measured = lite.as_ref().and_then(|(ll, q, lp)| {
        let best = scenarios
            .iter()
            .filter_map(|s| {
                let v = &s["variants"]["enforcer_budgets"];
                Some((s["load"].as_str()?, med(&v["achieved_rps"])?, med(&v["p99_us"])?))
            })
            .filter(|(_, _, ep)| *ep <= *lp)
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        let (q, lp) = (*q, *lp);
        let x = best.1 / q;
        Some((
            format!(
                "{x:.1}×: enforcer {:.0} req/s at {} (p99 {:.1} ms) vs LiteLLM {q:.1} req/s at {ll} (p99 {:.1} ms)",
                best.1,
                best.0,
                best.2 / 1000.0,
                lp / 1000.0
            ),
            x,
        ))
    });
    let note = match r["litellm"]["error"].as_str() {
        Some(e) => format!("LiteLLM could not run: {e}"),
        None if r["litellm"].is_null() => "LiteLLM was skipped (--skip litellm)".into(),
        None if lite.is_none() => "LiteLLM completed no request in its measured windows".into(),
        None => "enforcer with budgets at a load whose p99 is no worse than LiteLLM's: a lower \
                 bound of the ratio at equal p99"
            .into(),
    };
    target(
        "throughput vs LiteLLM proxy at equal p99",
        "≥ 20×",
        measured.as_ref().map(|m| m.0.clone()),
        measured.as_ref().map(|m| m.1 >= 20.0),
        &note,
    )
}

fn f(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "–".into(), |x| format!("{x:.digits$}"))
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "–".into(), |x| format!("{:.2}", x / 1000.0))
}

fn span_ms(v: &Value) -> String {
    if v.is_null() {
        return "–".into();
    }
    format!("{} ({}–{})", ms(&v["median"]), ms(&v["min"]), ms(&v["max"]))
}

/// BENCHMARKS.md.
pub fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let m = &r["machine"];
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench{}` on {}. Method: docs/benchmarks.md. Raw data: bench/results.json.\n",
        if r["mode"] == "quick" { " --quick" } else { "" },
        r["date"].as_str().unwrap_or("?")
    );
    let _ = writeln!(s, "| machine | |\n|---|---|");
    let _ = writeln!(s, "| CPUs (nproc) | {} |", m["nproc"]);
    let _ = writeln!(
        s,
        "| CPU model | {} |",
        m["cpu_model"].as_str().unwrap_or("?")
    );
    let _ = writeln!(s, "| kernel | {} |", m["kernel"].as_str().unwrap_or("?"));
    let _ = writeln!(s, "| memory | {} GiB |", m["mem_gib"]);
    let _ = writeln!(
        s,
        "| load average at start | {} |",
        m["load_avg_at_start"].as_str().unwrap_or("?")
    );
    let build = &r["build"];
    if build.is_object() {
        let _ = writeln!(
            s,
            "| build | {}{} |",
            build["profile"].as_str().unwrap_or("release"),
            if build["pgo"] == true {
                "; enforcer and pass-through profile-guided (`cargo xtask pgo`)"
            } else {
                "; no PGO"
            }
        );
    }
    let _ = writeln!(
        s,
        "| run | {} mode, {} ms measured per run after {} ms warm-up, {} interleaved repeats, {:.0} s of measuring (build excluded) |\n",
        r["mode"].as_str().unwrap_or("?"),
        r["plan"]["duration_ms"],
        r["plan"]["warmup_ms"],
        r["plan"]["repeats"],
        r["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        s,
        "## Targets (issues 6 and 20)\n\n| target | goal | measured | status | note |\n|---|---|---|---|---|"
    );
    for t in r["targets"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | **{}** | {} |",
            t["target"].as_str().unwrap_or(""),
            t["goal"].as_str().unwrap_or(""),
            t["measured"].as_str().unwrap_or(""),
            t["status"].as_str().unwrap_or(""),
            t["note"]
                .as_str()
                .unwrap_or("")
                .replace('|', "/")
                .replace('\n', " ")
        );
    }
    overhead_md(&mut s, r);
    floor_md(&mut s, r);
    on_path_md(&mut s, &r["overhead"]["on_path"]);
    super::allocs::markdown(&mut s, r);
    streaming_md(&mut s, r);
    super::soak::markdown(&mut s, r);
    ledger_md(&mut s, r);
    observer_md(&mut s, r);
    s
}

fn overhead_md(s: &mut String, r: &Value) {
    let _ = writeln!(s, "\n## 1. Enforcer overhead and 4. LiteLLM peer\n");
    if let Some(e) = r["overhead"]["error"].as_str() {
        let _ = writeln!(s, "**Not measured: {e}**");
        return;
    }
    if let Some(e) = r["litellm"]["error"].as_str() {
        let _ = writeln!(s, "**LiteLLM was not measured: {e}**\n");
    }
    let _ = writeln!(
        s,
        "Mock provider with a fixed 20 ms latency. Latency in ms: median over repeats (min–max). Open loop \
         (`rate-N`) measures from the scheduled send time. CPU and RSS are the proxy's own.\n"
    );
    let _ = writeln!(
        s,
        "| load | variant | p50 ms | p99 ms | p99.9 ms | req/s | errors | CPU ms / 1000 req | RSS MiB | p99 vs direct | added p99 µs | throughput vs direct |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for sc in r["overhead"]["scenarios"].as_array().into_iter().flatten() {
        for (name, v) in sc["variants"].as_object().into_iter().flatten() {
            let ra = &sc["vs_direct"][name];
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                sc["load"].as_str().unwrap_or(""),
                name,
                span_ms(&v["p50_us"]),
                span_ms(&v["p99_us"]),
                ms(&v["p999_us"]["median"]),
                f(&v["achieved_rps"]["median"], 0),
                v["errors"],
                f(&v["cpu_ms_per_1000"]["median"], 1),
                v["rss_kib"]["median"]
                    .as_f64()
                    .map_or_else(|| "–".into(), |k| format!("{:.1}", k / 1024.0)),
                if ra.is_null() {
                    "–".into()
                } else {
                    format!("{}×", f(&ra["p99_ratio"]["median"], 3))
                },
                f(&ra["added_p99_us"]["median"], 0),
                if ra.is_null() {
                    "–".into()
                } else {
                    format!("{}×", f(&ra["throughput_ratio"]["median"], 3))
                },
            );
        }
    }
}

/// The enforcer's CPU per call against the pass-through's, and the mock's own, per scenario.
fn floor_md(s: &mut String, r: &Value) {
    let scenarios = r["overhead"]["scenarios"].as_array();
    if !scenarios.is_some_and(|v| v.iter().any(|s| !s["variants"]["passthrough"].is_null())) {
        return;
    }
    let _ = writeln!(
        s,
        "\n### CPU per call against the floor (issue 20)\n\n\
         `passthrough`: a proxy on the enforcer's own stack (hyper-util server and pooled \
         hyper-rustls client, runtime, allocator) doing nothing but forwarding (docs/benchmarks.md). \
         µs of CPU per call (= CPU ms / 1000 req), median over repeats; the ratios are the median \
         of the per-repeat ratios. The mock's column is the provider's own cost of answering; Redis's is \
         what the budgets-on enforcer's scripts cost the shared redis-server per call (the \
         reserving and the no-budgets enforcers' in brackets). Before forwarding: the mean time from \
         a request's arrival to its forwarding (auth, parse, reserve or spare hold), from each \
         enforcer's own `llmwarden_overhead_seconds`. `enforcer_budgets` runs with a lease pool of \
         16 spare holds per tenant (`lease_pool`, docs/enforcer.md); `enforcer_budgets_reserving` \
         is the same enforcer without one, every call reserving its own hold.\n"
    );
    let _ = writeln!(
        s,
        "| load | passthrough µs | enforcer_budgets µs | × pass-through | enforcer_budgets_reserving µs | × pass-through | enforcer_no_budgets µs | × pass-through | mock µs | Redis µs | before forwarding µs (reserving) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    );
    for sc in scenarios.into_iter().flatten() {
        let v = &sc["variants"];
        let x = |name: &str| {
            let m = &sc["vs_passthrough"][name]["cpu_ratio"]["median"];
            if m.is_null() {
                "–".into()
            } else {
                format!("{}×", f(m, 2))
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}, {}) | {} ({}) |",
            sc["load"].as_str().unwrap_or(""),
            f(&v["passthrough"]["cpu_ms_per_1000"]["median"], 0),
            f(&v["enforcer_budgets"]["cpu_ms_per_1000"]["median"], 0),
            x("enforcer_budgets"),
            f(
                &v["enforcer_budgets_reserving"]["cpu_ms_per_1000"]["median"],
                0
            ),
            x("enforcer_budgets_reserving"),
            f(&v["enforcer_no_budgets"]["cpu_ms_per_1000"]["median"], 0),
            x("enforcer_no_budgets"),
            f(&v["direct"]["mock_cpu_ms_per_1000"]["median"], 0),
            f(&v["enforcer_budgets"]["redis_cpu_ms_per_1000"]["median"], 0),
            f(
                &v["enforcer_budgets_reserving"]["redis_cpu_ms_per_1000"]["median"],
                0
            ),
            f(
                &v["enforcer_no_budgets"]["redis_cpu_ms_per_1000"]["median"],
                0
            ),
            f(&v["enforcer_budgets"]["before_forwarding_us"]["median"], 0),
            f(
                &v["enforcer_budgets_reserving"]["before_forwarding_us"]["median"],
                0
            ),
        );
    }
}

/// How long each proxy held a call on its path in one more one-client run (`onpath.rs`).
fn on_path_md(s: &mut String, w: &Value) {
    if w.is_null() {
        return;
    }
    let _ = writeln!(s, "\n### Time on the path, one client\n");
    if let Some(e) = w["error"].as_str() {
        let _ = writeln!(s, "**Not recorded: {e}**");
        return;
    }
    let _ = writeln!(
        s,
        "One more `c1` run of each proxy under `perf record` of its `recvfrom` and `writev` \
         tracepoints: a request is held from the proxy's last read of it to its write upstream, a \
         response from its read of the answer to its write back (µs). What a proxy adds to a call \
         beyond these two holds (two more loopback hops and wake-ups) is the same for both. The \
         tracepoints cost a few µs per syscall, so these runs' p50 is not the table's.\n"
    );
    let _ = writeln!(
        s,
        "| proxy | request p50 | request p90 | request p99 | response p50 | response p90 | response p99 | both p50 | calls | run p50 ms |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    for (name, v) in w.as_object().into_iter().flatten() {
        let (rq, rs) = (&v["request"], &v["response"]);
        let both = rq["p50_us"]
            .as_f64()
            .zip(rs["p50_us"].as_f64())
            .map(|(a, b)| json!(a + b));
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f(&rq["p50_us"], 0),
            f(&rq["p90_us"], 0),
            f(&rq["p99_us"], 0),
            f(&rs["p50_us"], 0),
            f(&rs["p90_us"], 0),
            f(&rs["p99_us"], 0),
            f(&both.unwrap_or(Value::Null), 0),
            rq["holds"],
            ms(&v["p50_us"]),
        );
    }
}

fn streaming_md(s: &mut String, r: &Value) {
    let st = &r["streaming"];
    let _ = writeln!(s, "\n## 2. Streaming\n");
    if let Some(e) = st["error"].as_str() {
        let _ = writeln!(s, "**Not measured: {e}**");
        return;
    }
    let _ = writeln!(
        s,
        "{} concurrent streams of 64 chunks 10 ms apart (20 ms before the first). Median over repeats (min–max), ms.\n",
        r["plan"]["streams"]
    );
    let _ = writeln!(
        s,
        "| variant | TTFT p50 | TTFT p99 | gap p50 | gap p99 | gap p99.9 | events/stream | errors |\n|---|---|---|---|---|---|---|---|"
    );
    for (name, v) in st["variants"].as_object().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            span_ms(&v["ttft_p50_us"]),
            span_ms(&v["ttft_p99_us"]),
            span_ms(&v["gap_p50_us"]),
            span_ms(&v["gap_p99_us"]),
            span_ms(&v["gap_p999_us"]),
            f(&v["events_per_stream"]["median"], 1),
            v["errors"]
        );
    }
    let d = &st["vs_direct"];
    let _ = writeln!(
        s,
        "\nAdded by the enforcer: TTFT p99 {} µs, inter-chunk p99 {} µs (median of per-repeat differences). \
         Enforcer CPU: {} µs per SSE event forwarded, each stream's request, reserve and settle \
         included (median over repeats).",
        f(&d["added_ttft_p99_us"]["median"], 0),
        f(&d["added_gap_p99_us"]["median"], 0),
        f(
            &st["variants"]["enforcer_budgets"]["cpu_us_per_event"]["median"],
            1
        )
    );
    let floor = &st["passthrough_vs_direct"];
    if !floor.is_null() {
        let _ = writeln!(
            s,
            "\nAdded by the pass-through, same repeats: TTFT p99 {} µs, inter-chunk p99 {} µs.",
            f(&floor["added_ttft_p99_us"]["median"], 0),
            f(&floor["added_gap_p99_us"]["median"], 0),
        );
    }
    if !st["variants"]["passthrough"].is_null() {
        let _ = writeln!(
            s,
            "\nThe pass-through proxy (the floor, same streams): {} µs of CPU per SSE event, so the \
             enforcer spends {} µs per event beyond it (median of per-repeat differences). The \
             streaming mock itself: {} µs per event.",
            f(
                &st["variants"]["passthrough"]["cpu_us_per_event"]["median"],
                1
            ),
            f(
                &st["vs_passthrough"]["enforcer_budgets"]["added_cpu_us_per_event"]["median"],
                1
            ),
            f(
                &st["variants"]["direct"]["mock_cpu_us_per_event"]["median"],
                1
            ),
        );
    }
    waits_md(s, &st["waits_for_cpu"]);
}

/// How long each process of one more streaming run per variant waited for a CPU (`sched.rs`).
fn waits_md(s: &mut String, w: &Value) {
    if w.is_null() {
        return;
    }
    let _ = writeln!(s, "\n### Waits for a CPU\n");
    if let Some(e) = w["error"].as_str() {
        let _ = writeln!(s, "**Not recorded: {e}**");
        return;
    }
    let _ = writeln!(
        s,
        "One more run of each under `perf sched record -a`: for every time a thread was switched \
         in, how long it had been runnable first (since its wake-up or its preemption), per process, \
         µs. Each event a proxy forwards wakes one of its threads, so the proxy's wait is on the \
         client's gap whichever proxy it is. The recording costs something on every context \
         switch, so these runs' latencies are beside the point and not the table above.\n"
    );
    let _ = writeln!(
        s,
        "| run | client gap p99 ms | proxy wait p50 | proxy wait p99 | proxy wait p99.9 | mock wait p99 | loadgen wait p99 | proxy switch-ins |\n|---|---|---|---|---|---|---|---|"
    );
    for (name, v) in w.as_object().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            ms(&v["gap_p99_us"]),
            f(&v["proxy"]["p50_us"], 0),
            f(&v["proxy"]["p99_us"], 0),
            f(&v["proxy"]["p999_us"], 0),
            f(&v["mock"]["p99_us"], 0),
            f(&v["loadgen"]["p99_us"], 0),
            v["proxy"]["switch_ins"]
                .as_u64()
                .map_or_else(|| "–".into(), |n| n.to_string()),
        );
    }
}

fn ledger_md(s: &mut String, r: &Value) {
    let l = &r["ledger"];
    let _ = writeln!(s, "\n## 3. Ledger\n");
    if let Some(e) = l["error"].as_str() {
        let _ = writeln!(s, "**Not measured: {e}**");
        return;
    }
    let _ = writeln!(
        s,
        "`ledger::store` reserve + settle pairs from {} concurrent tasks on one multiplexed connection, vs \
         `redis-benchmark -t set -q` (50 clients) on the same redis-server, interleaved.\n",
        l["tasks"]
    );
    let _ = writeln!(
        s,
        "| measure | median (min–max) |\n|---|---|\n| reserve+settle pairs/s | {} ({}–{}) |\n| ledger ops/s (reserve or settle) | {} |\n| redis-benchmark SET/s | {} ({}–{}) |\n| pairs / SET | {} |\n| pair latency p99 | {} ms |",
        f(&l["pairs_per_s"]["median"], 0),
        f(&l["pairs_per_s"]["min"], 0),
        f(&l["pairs_per_s"]["max"], 0),
        f(&l["ops_per_s"]["median"], 0),
        f(&l["set_per_s"]["median"], 0),
        f(&l["set_per_s"]["min"], 0),
        f(&l["set_per_s"]["max"], 0),
        f(&l["ratio_pairs_to_set"]["median"], 3),
        ms(&l["pair_p99_us"]["median"]),
    );
}

fn observer_md(s: &mut String, r: &Value) {
    let o = &r["observer"];
    let _ = writeln!(s, "\n## 5. Observer\n");
    if let Some(e) = o["skipped"].as_str().or(o["error"].as_str()) {
        let _ = writeln!(s, "**Not measured: {e}**");
        return;
    }
    let _ = writeln!(
        s,
        "curl (OpenSSL) over one HTTPS keep-alive connection to a local TLS mock, {} LLM requests \
         per run; non-LLM: {} requests per run (a 2-byte answer) in {} cycles of unattached / \
         attached / unattached (the observer started and stopped each time); the ratio is the \
         median of the cycles' ratios (range {}–{}×).\n",
        o["requests"],
        o["non_llm"]["requests"],
        o["non_llm"]["cycles"],
        f(&o["non_llm"]["ratio"]["min"], 3),
        f(&o["non_llm"]["ratio"]["max"], 3)
    );
    let _ = writeln!(
        s,
        "| traffic | unattached req/s | attached req/s | ratio | added µs / req | observer CPU ms / 1000 req |\n|---|---|---|---|---|---|"
    );
    for (k, label) in [
        ("non_llm", "non-LLM (kernel filter)"),
        (
            "non_llm_on_connect",
            "non-LLM, attach = \"on-connect\" (no probe in the client)",
        ),
        ("llm", "LLM calls"),
        ("llm_h2", "LLM calls over HTTP/2"),
    ] {
        if o[k].is_null() {
            continue;
        }
        let v = &o[k];
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {}× | {} | {} |",
            f(&v["unattached_rps"], 0),
            f(&v["attached_rps"], 0),
            f(&v["ratio"]["median"], 3),
            f(&v["added_us_per_request"], 1),
            f(&v["observer_cpu_ms_per_1000"], 1)
        );
    }
    let _ = writeln!(
        s,
        "\n| offered LLM calls/s | sent | captured | kernel drops (delta) | achieved calls/s |\n|---|---|---|---|---|"
    );
    for c in o["capture"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            c["offered"].as_str().unwrap_or("?"),
            c["sent"],
            c["captured"],
            c["kernel_drops"],
            f(&c["achieved_rps"], 0)
        );
    }
    let open = &o["open_syscall"];
    if !open.is_null() {
        let _ = writeln!(
            s,
            "\n`open` + `close` of a file (best of 5 × 50 000, median over the cycles): {} ns \
             unattached, {} ns attached (+{} ns: the open tracepoints that report TLS libraries \
             as they are opened read every opened path).",
            f(&open["unattached_ns"], 0),
            f(&open["attached_ns"], 0),
            f(&open["added_ns"], 0)
        );
    }
    if let Some(n) = o["note"].as_str() {
        let _ = writeln!(s, "\n{n}");
    }
}

/// The targets table on the terminal.
pub fn print_summary(r: &Value) {
    println!(
        "\nBENCH TARGETS ({} mode)",
        r["mode"].as_str().unwrap_or("?")
    );
    for t in r["targets"].as_array().into_iter().flatten() {
        println!(
            "  {:<13} {:<55} goal {:<18} measured {}",
            t["status"].as_str().unwrap_or(""),
            t["target"].as_str().unwrap_or(""),
            t["goal"].as_str().unwrap_or(""),
            t["measured"].as_str().unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The targets row named `name` of results `r` (after `targets`).
    fn target_row(r: &Value, name: &str) -> Value {
        r["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["target"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no row {name}: {}", r["targets"]))
    }

    fn run(p50: f64, p99: f64, rps: f64) -> Value {
        json!({ "latency_us": { "p50": p50, "p99": p99, "p999": p99 * 1.5 }, "achieved_rps": rps, "errors": {} })
    }

    #[test]
    fn medians_and_ratios_pair_repeats() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!((median(&[4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-9);
        let direct = [
            run(20_000.0, 21_000.0, 500.0),
            run(20_000.0, 22_000.0, 500.0),
        ];
        let proxy = [
            run(20_100.0, 21_500.0, 495.0),
            run(20_200.0, 22_200.0, 490.0),
        ];
        let r = ratios(&direct, &proxy);
        assert!(
            (r["added_p99_us"]["median"].as_f64().unwrap() - 350.0).abs() < 1e-9,
            "{r}"
        );
        assert!((r["added_p99_us"]["min"].as_f64().unwrap() - 200.0).abs() < 1e-9);
        assert!((r["throughput_ratio"]["max"].as_f64().unwrap() - 0.99).abs() < 1e-9);
    }

    #[test]
    fn the_one_client_row_says_how_long_each_proxy_held_a_call() {
        let direct = vec![run(20_000.0, 21_000.0, 500.0)];
        let proxy = vec![run(20_320.0, 21_500.0, 495.0)];
        let held = |q: f64, s: f64| {
            json!({ "p50_us": 21_800.0,
                "request": { "holds": 300, "p50_us": q, "p90_us": q + 30.0, "p99_us": q + 90.0 },
                "response": { "holds": 300, "p50_us": s, "p90_us": s + 20.0, "p99_us": s + 80.0 } })
        };
        let mut r = json!({
            "mode": "quick", "date": "2026-12-07T20:00:00Z", "machine": machine(),
            "plan": { "duration_ms": 1000, "warmup_ms": 300, "repeats": 1, "streams": 200 },
            "overhead": {
                "scenarios": [{
                    "load": "c1",
                    "variants": { "direct": aggregate_http(&direct), "enforcer_budgets": aggregate_http(&proxy) },
                    "vs_direct": { "enforcer_budgets": ratios(&direct, &proxy) },
                }],
                "on_path": { "passthrough": held(42.0, 49.0), "enforcer_budgets": held(95.0, 96.0) },
            },
        });
        r["targets"] = targets(&r);
        let row = target_row(
            &r,
            "enforcer added p50, one sequential keep-alive client (budgets, lease pool)",
        );
        assert_eq!(row["status"], "MISS", "{row}");
        assert_eq!(
            row["note"],
            "the enforcer holds a call p50 95 µs (request) + 96 µs (response) on its path, the \
             pass-through 42 + 49 (section 1, \"Time on the path\")"
        );
        let md = markdown(&r);
        assert!(md.contains("### Time on the path, one client"), "{md}");
        assert!(
            md.contains(
                "| enforcer_budgets | 95 | 125 | 185 | 96 | 116 | 176 | 191 | 300 | 21.80 |"
            ),
            "{md}"
        );
        // A run without `perf` says so where the table would be.
        r["overhead"]["on_path"] = json!({ "error": "recording a proxy's syscalls needs root" });
        assert!(markdown(&r).contains("**Not recorded: recording a proxy's syscalls needs root**"));
    }

    #[test]
    fn targets_and_markdown_from_partial_results() {
        let direct = vec![run(20_000.0, 21_000.0, 500.0)];
        let proxy = vec![run(20_100.0, 21_500.0, 495.0)];
        let r = json!({
            "mode": "quick", "date": "2026-11-27T10:00:00Z", "machine": machine(),
            "plan": { "duration_ms": 1000, "warmup_ms": 300, "repeats": 1, "streams": 200 },
            "overhead": { "scenarios": [{
                "load": "rate-500",
                "variants": { "direct": aggregate_http(&direct), "enforcer_budgets": aggregate_http(&proxy) },
                "vs_direct": { "enforcer_budgets": ratios(&direct, &proxy) },
            }, {
                "load": "c1",
                "variants": { "direct": aggregate_http(&direct), "enforcer_budgets": aggregate_http(&proxy) },
                "vs_direct": { "enforcer_budgets": ratios(&direct, &proxy) },
            }]},
            "observer": { "skipped": "not root" },
            "litellm": { "error": "pip failed" },
        });
        let mut r = r;
        r["targets"] = targets(&r);
        let t = r["targets"].as_array().unwrap();
        assert_eq!(t[0]["status"], "PASS", "{}", t[0]);
        assert_eq!(t[1]["status"], "PASS");
        assert_eq!(
            (t[2]["target"].as_str(), t[2]["measured"].as_str()),
            (
                Some("enforcer added p50, one sequential keep-alive client (budgets, lease pool)"),
                Some("100 µs")
            ),
            "{}",
            t[2]
        );
        assert_eq!(t[2]["status"], "PASS");
        assert_eq!(t[3]["status"], "NOT MEASURED");
        let md = markdown(&r);
        assert!(
            md.contains(
                "| enforcer added p99 at 500 req/s (budgets, lease pool) | ≤ 1 ms | 500 µs | **PASS** |"
            ),
            "{md}"
        );
        assert!(md.contains("LiteLLM was not measured: pip failed"), "{md}");
        assert!(md.contains("**Not measured: not root**"), "{md}");
    }

    #[test]
    fn the_enforcer_at_rest_is_reported() {
        let mut r = json!({ "soak": { "quiet": {
            "seconds": 20.0, "wakeups_per_s": 2.04, "cpu_ms_per_min": 12.0,
        }}});
        r["targets"] = targets(&r);
        let row = target_row(&r, "enforcer at rest (no calls): wake-ups and CPU");
        assert_eq!(row["measured"], "2.0 wake-ups/s, 12.0 ms CPU per minute");
        assert_eq!(row["status"], "REPORTED");
        let mut r = json!({ "soak": { "error": "mock did not start" } });
        r["targets"] = targets(&r);
        let row = target_row(&r, "enforcer at rest (no calls): wake-ups and CPU");
        assert_eq!(row["status"], "NOT MEASURED", "{row}");
        assert_eq!(row["note"], "mock did not start");
    }

    #[test]
    fn the_observer_at_rest_is_reported() {
        let name = "observer at rest (no LLM traffic): wake-ups and CPU";
        let mut r = json!({ "observer": { "at_rest": {
            "seconds": 20.0, "wakeups_per_s": 5.71, "cpu_ms_per_min": 3.0,
        }}});
        r["targets"] = targets(&r);
        let row = target_row(&r, name);
        assert_eq!(row["measured"], "5.7 wake-ups/s, 3.0 ms CPU per minute");
        assert_eq!(row["status"], "REPORTED");
        // The reading failed: its own error; the section skipped: the section's reason.
        let mut r =
            json!({ "observer": { "at_rest": { "error": "reading the observer's /proc" } } });
        r["targets"] = targets(&r);
        let row = target_row(&r, name);
        assert_eq!(row["status"], "NOT MEASURED", "{row}");
        assert_eq!(row["note"], "reading the observer's /proc");
        let mut r = json!({ "observer": { "skipped": "not root" } });
        r["targets"] = targets(&r);
        assert_eq!(target_row(&r, name)["note"], "not root");
    }

    #[test]
    fn cpu_against_the_pass_through_pairs_repeats() {
        let cpu = |ms: f64, mock: f64| {
            let mut r = run(20_000.0, 21_000.0, 500.0);
            r["cpu_ms_per_1000"] = json!(ms);
            r["mock_cpu_ms_per_1000"] = json!(mock);
            r
        };
        let direct = vec![cpu(0.0, 50.0), cpu(0.0, 52.0)];
        let floor = vec![cpu(100.0, 50.0), cpu(200.0, 51.0)];
        let mut enf = vec![cpu(140.0, 50.0), cpu(400.0, 51.0)];
        enf[0]["redis_cpu_ms_per_1000"] = json!(70.0);
        enf[1]["redis_cpu_ms_per_1000"] = json!(90.0);
        enf[0]["before_forwarding_us"] = json!(900.0);
        enf[1]["before_forwarding_us"] = json!(1100.0);
        let x = cpu_ratios(&floor, &enf);
        assert!(
            (x["cpu_ratio"]["min"].as_f64().unwrap() - 1.4).abs() < 1e-9,
            "{x}"
        );
        assert!(
            (x["cpu_ratio"]["max"].as_f64().unwrap() - 2.0).abs() < 1e-9,
            "{x}"
        );
        let scenario = |load: &str| {
            json!({
                "load": load,
                "variants": {
                    "direct": aggregate_http(&direct),
                    "passthrough": aggregate_http(&floor),
                    "enforcer_budgets": aggregate_http(&enf),
                },
                "vs_passthrough": { "enforcer_budgets": cpu_ratios(&floor[..1], &enf[..1]) },
            })
        };
        let mut r = json!({
            "mode": "quick", "date": "2026-12-04T14:00:00Z", "machine": machine(),
            "plan": { "duration_ms": 800, "warmup_ms": 200, "repeats": 2, "streams": 200 },
            "overhead": { "scenarios": [scenario("rate-500"), scenario("c64")] },
            "streaming": {
                "variants": {
                    "direct": { "mock_cpu_us_per_event": { "median": 2.0 } },
                    "passthrough": { "cpu_us_per_event": { "median": 6.0 } },
                },
                "vs_passthrough": { "enforcer_budgets": { "added_cpu_us_per_event": { "median": 4.5 } } },
                "vs_direct": { "added_gap_p99_us": { "median": 640.0 } },
                "passthrough_vs_direct": {
                    "added_ttft_p99_us": { "median": 700.0 },
                    "added_gap_p99_us": { "median": 630.0 },
                },
            },
        });
        let waits_row = |proxy: Value| {
            json!({
                "gap_p99_us": 13_100.0, "proxy": proxy,
                "mock": { "p99_us": 700.0 }, "loadgen": { "p99_us": 800.0 },
            })
        };
        let mut with_waits = r.clone();
        with_waits["streaming"]["waits_for_cpu"] = json!({
            "direct": waits_row(Value::Null),
            "enforcer_budgets": waits_row(json!({ "switch_ins": 7000, "p50_us": 30.0, "p99_us": 830.0, "p999_us": 1400.0 })),
            "passthrough": waits_row(json!({ "switch_ins": 6900, "p50_us": 28.0, "p99_us": 660.0, "p999_us": 1200.0 })),
        });
        with_waits["targets"] = targets(&with_waits);
        let waits = "after a wake-up the proxy's threads waited p99 830 µs (enforcer) and 660 µs \
                     (pass-through) for a CPU (section 2, \"Waits for a CPU\")";
        assert_eq!(
            target_row(&with_waits, "streaming added inter-chunk p99")["note"],
            json!(format!(
                "the pass-through (the floor) adds 630 µs in the same repeats; {waits}"
            ))
        );
        assert_eq!(
            target_row(&with_waits, "streaming added TTFT p99")["note"],
            json!(waits)
        );
        let md = markdown(&with_waits);
        assert!(
            md.contains("| enforcer_budgets | 13.10 | 30 | 830 | 1400 | 700 | 800 | 7000 |"),
            "{md}"
        );
        assert!(
            md.contains("| direct | 13.10 | – | – | – | 700 | 800 | – |"),
            "{md}"
        );
        r["targets"] = targets(&r);
        let row = |name: &str| target_row(&r, name);
        let t = row("enforcer CPU per call vs pass-through at 500 req/s (budgets, lease pool)");
        assert_eq!(t["status"], "PASS", "{t}");
        assert_eq!(t["measured"], "1.40× (270 µs vs 150 µs per call)");
        let t = row("enforcer CPU per SSE event beyond the pass-through's");
        assert_eq!(
            (t["status"].as_str(), t["measured"].as_str()),
            (Some("MISS"), Some("4.5 µs"))
        );
        let t = row("streaming added inter-chunk p99");
        assert_eq!(
            (t["status"].as_str(), t["measured"].as_str()),
            (Some("MISS"), Some("640 µs"))
        );
        assert_eq!(
            t["note"],
            "the pass-through (the floor) adds 630 µs in the same repeats"
        );
        let md = markdown(&r);
        assert!(
            md.contains(
                "Added by the pass-through, same repeats: TTFT p99 700 µs, inter-chunk p99 630 µs."
            ),
            "{md}"
        );
        assert!(
            md.contains("| c64 | 150 | 270 | 1.40× | – | – | – | – | 51 | 80 (–, –) | 1000 (–) |"),
            "{md}"
        );
        assert!(
            md.contains("enforcer spends 4.5 µs per event beyond it"),
            "{md}"
        );
    }
}
