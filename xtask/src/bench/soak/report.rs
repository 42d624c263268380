//! The soak section's rows of the targets table and its part of BENCHMARKS.md.

use serde_json::Value;

use super::{TOLERANCE_MIB, TOLERANCE_PCT};

/// The section's rows of the targets table.
pub fn targets(r: &Value) -> Vec<Value> {
    let so = &r["soak"];
    let why = so["error"].as_str().unwrap_or("");
    let mut t = Vec::new();
    t.push(super::super::report::at_rest_row(
        "enforcer at rest (no calls): wake-ups and CPU",
        &so["quiet"],
        "voluntary context switches of all its threads and utime + stime, over the idle window \
         after a warm-up; what a sidecar costs its host between calls",
        why,
    ));
    let h1 = so["idle_http1"]["kib_per_connection"].as_f64();
    let h2 = so["idle_h2c"]["kib_per_connection"].as_f64();
    t.push(super::super::report::reported(
        "enforcer RSS per idle keep-alive connection",
        h1.map(|k| {
            let h2 = h2.map_or_else(String::new, |h| format!(", h2c {h:.1} KiB"));
            format!("HTTP/1.1 {k:.1} KiB{h2}")
        }),
        if h1.is_some() {
            "(VmRSS with 1000 idle connections that each made one call − before) / 1000"
        } else {
            why
        },
    ));
    let call = so["in_flight"]["kib_per_call"].as_f64();
    t.push(super::super::report::reported(
        "enforcer RSS per call in flight",
        call.map(|k| format!("{k:.1} KiB")),
        &match call {
            Some(_) => format!(
                "{} HTTP/1.1 calls held by a provider answering after 5 s; its client connection \
                 and upstream connection included",
                so["in_flight"]["calls"]
            ),
            None => why.to_owned(),
        },
    ));
    let g = &so["soak"];
    let growth = g["growth_mib"].as_f64();
    let tol = g["tolerance_mib"].as_f64().unwrap_or(TOLERANCE_MIB);
    let minutes = g["duration_s"].as_f64().unwrap_or(0.0) / 60.0;
    t.push(super::super::report::target(
        "enforcer RSS growth over a 10-minute soak at 500 req/s (budgets, lease pool)",
        &format!("none (≤ {TOLERANCE_MIB:.0} MiB or {TOLERANCE_PCT:.0}%, allocator noise)"),
        growth.map(|x| {
            format!(
                "{x:+.2} MiB over {minutes:.0} min ({:+.3} MiB/min)",
                g["slope_mib_per_min"].as_f64().unwrap_or(0.0)
            )
        }),
        growth.map(|x| x <= tol),
        &match growth {
            Some(_) => format!(
                "median VmRSS of the last third of the samples after the warm-up minus the first \
                 third's ({:.1} → {:.1} MiB; tolerance {tol:.1} MiB); {} calls ok, errors {}{}",
                g["first_third_median_mib"].as_f64().unwrap_or(0.0),
                g["last_third_median_mib"].as_f64().unwrap_or(0.0),
                g["ok"],
                g["errors"],
                if minutes < 10.0 {
                    "; --quick: a 1-minute soak, the full run soaks 10"
                } else {
                    ""
                }
            ),
            None => g["error"].as_str().unwrap_or(why).to_owned(),
        },
    ));
    t
}

/// The section in BENCHMARKS.md.
pub fn markdown(s: &mut String, r: &Value) {
    use std::fmt::Write as _;
    let so = &r["soak"];
    let _ = writeln!(
        s,
        "\n## 6. Enforcer memory: connections, calls in flight, soak\n"
    );
    if so.is_null() {
        let _ = writeln!(s, "**Not measured: skipped**");
        return;
    }
    if let Some(e) = so["error"].as_str() {
        let _ = writeln!(s, "**Not measured: {e}**");
        return;
    }
    let mib = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "?".into(), |k| format!("{:.1}", k / 1024.0))
    };
    let kib = |v: &Value| v.as_f64().map_or_else(|| "?".into(), |k| format!("{k:.1}"));
    let _ = writeln!(
        s,
        "A budgets enforcer of its own in front of a mock with 20 ms latency; VmRSS in MiB.\n\n\
         | held | count | ok | errors | RSS before | RSS held | RSS after release | KiB each |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for (label, v) in [
        (
            "idle HTTP/1.1 connections (one call each)",
            &so["idle_http1"],
        ),
        ("idle h2c connections (one call each)", &so["idle_h2c"]),
    ] {
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            v["connections"],
            v["ok"],
            v["errors"],
            mib(&v["rss_before_kib"]),
            mib(&v["rss_held_kib"]),
            mib(&v["rss_after_close_kib"]),
            kib(&v["kib_per_connection"])
        );
    }
    let v = &so["in_flight"];
    let _ = writeln!(
        s,
        "| HTTP/1.1 calls in flight (provider answers after {} ms) | {} | {} | {} | {} | {} | {} | {} |",
        v["provider_latency_ms"],
        v["calls"],
        v["ok"],
        v["errors"],
        mib(&v["rss_before_kib"]),
        mib(&v["rss_during_kib"]),
        mib(&v["rss_after_kib"]),
        kib(&v["kib_per_call"])
    );
    let g = &so["soak"];
    let f2 = |v: &Value| v.as_f64().map_or_else(|| "?".into(), |x| format!("{x:.2}"));
    let _ = writeln!(
        s,
        "\nSoak: {} req/s open loop for {} s ({} ok, errors {}, achieved {} req/s, p99 {} µs). \
         VmRSS every {} s; after the {} s warm-up ({} samples): {}–{} MiB, first third's median \
         {} MiB, last third's {} MiB: growth **{} MiB** ({} bytes per call), slope {} MiB/min; \
         {} MiB once the load stopped.",
        g["rate"],
        g["duration_s"],
        g["ok"],
        g["errors"],
        f2(&g["achieved_rps"]),
        g["latency_us"]["p99"],
        g["sample_every_s"],
        g["warmup_s"],
        g["samples_after_warmup"],
        f2(&g["min_mib"]),
        f2(&g["max_mib"]),
        f2(&g["first_third_median_mib"]),
        f2(&g["last_third_median_mib"]),
        f2(&g["growth_mib"]),
        g["growth_bytes_per_call"]
            .as_f64()
            .map_or_else(|| "?".into(), |x| format!("{x:.1}")),
        f2(&g["slope_mib_per_min"]),
        f2(&g["rss_after_load_mib"]),
    );
}
