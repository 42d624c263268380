//! Enforcer memory under the worst calls it admits (issue 13 item 6): 64 clients each sending a
//! ~4 MB embeddings request whose answer is ~6 MB (160 inputs × 4096 dimensions), closed loop,
//! against the budgets enforcer of the overhead stack. Reports its peak RSS (`VmHWM`), which
//! covers the whole bench run before it too, and how many calls the in-flight body budget
//! (`max_inflight_body_bytes`, 96 MiB by default) turned into 503s.

use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use super::loadgen::{self, Load, Target};
use super::{Env, stack};

/// Concurrent worst-case calls.
pub const CLIENTS: u32 = 64;

/// An embeddings request of about 4 MB (4.19 MB) asking for 4096-dimension vectors of 160 inputs.
fn body() -> String {
    let input: Vec<String> = (0..160)
        .map(|i| format!("{i} {}", "lorem ipsum dolor sit amet ".repeat(970)))
        .collect();
    json!({ "model": "text-embedding-3-small", "dimensions": 4096, "input": input }).to_string()
}

/// Runs the load against `url` (the enforcer's embeddings route) with `key`, then reads `pid`'s
/// peak RSS.
pub fn run(env: &Env, url: &str, key: &str, pid: u32) -> Result<Value> {
    let path = env.work.join("memory-embeddings.json");
    let b = body();
    std::fs::write(&path, &b)?;
    let target = Target {
        url: url.to_owned(),
        headers: vec![format!("authorization: Bearer {key}")],
        body: Some(path),
        timeout: Duration::from_secs(60),
    };
    let window = if env.plan.quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(6)
    };
    let r = loadgen::http(
        env,
        &target,
        Load::Concurrency(CLIENTS),
        Duration::ZERO,
        window,
    )?;
    let peak_kib = stack::status_field(pid, "VmHWM:");
    let now_kib = stack::status_field(pid, "VmRSS:");
    let refused = r["errors"]["status_503"].as_u64().unwrap_or(0);
    eprintln!(
        "    memory: {CLIENTS} clients × {:.1} MB embeddings: {} ok, {refused} refused (503); enforcer peak RSS {} MiB",
        b.len() as f64 / 1e6,
        r["ok"],
        peak_kib.unwrap_or(0) / 1024
    );
    Ok(json!({
        "clients": CLIENTS,
        "request_bytes": b.len(),
        "ok": r["ok"],
        "refused_503": refused,
        "errors": r["errors"],
        "peak_rss_mib": peak_kib.map(|k| k as f64 / 1024.0),
        "rss_after_mib": now_kib.map(|k| k as f64 / 1024.0),
    }))
}
