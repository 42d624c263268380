//! Memory bounds of the enforcer (issue 13 item 6): many concurrent worst-case calls (multi-MiB
//! embeddings requests whose answers are multi-MiB too) against the real binary, reading its peak
//! RSS (`VmHWM`), and the global in-flight body budget that turns excess calls into a 503.

mod enforcer_common;

use std::time::Instant;

use enforcer_common::{KEY_OPS, Opts, Stack, http};
use ledger::Nanos;
use serde_json::json;

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
}

/// An embeddings request of about `bytes` bytes (`inputs` strings) asking for 4096-dim vectors:
/// the answer is about `inputs * 48 KiB`.
fn big_embeddings(bytes: usize, inputs: usize) -> Vec<u8> {
    let each = bytes / inputs;
    let words = "lorem ipsum dolor sit amet consectetur ";
    let text: String = words.repeat(each / words.len() + 1)[..each].to_owned();
    let input: Vec<&str> = (0..inputs).map(|_| text.as_str()).collect();
    serde_json::to_vec(&json!({
        "model": "text-embedding-3-small", "dimensions": 4096, "input": input,
    }))
    .expect("json")
}

/// Sends `n` concurrent copies of `body`; returns the statuses and error bodies.
async fn crowd(stack: &Stack, n: usize, body: Vec<u8>, tenant: &str) -> Vec<(u16, String)> {
    let url = format!("{}/embeddings", stack.base("openai"));
    let body = bytes::Bytes::from(body);
    let mut tasks = Vec::new();
    for i in 0..n {
        let (url, body, tenant) = (url.clone(), body.clone(), tenant.to_owned());
        tasks.push(tokio::spawn(async move {
            let r = http()
                .post(&url)
                .bearer_auth(KEY_OPS)
                .header("x-tenant-id", tenant)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
            let status = r.status().as_u16();
            let text = r.bytes().await.expect("response body");
            let shown = if status == 200 {
                format!("{} bytes", text.len())
            } else {
                String::from_utf8_lossy(&text).into_owned()
            };
            (status, shown)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peak_rss_under_64_worst_case_calls() {
    let stack = Stack::start(Opts {
        top_toml: "timeouts.redis_ms = 10000\ntimeouts.client_ms = 60000\n".into(),
        ..Opts::default()
    })
    .await;
    let pid = stack.enforcer.pid();
    let idle = status_kib(pid, "VmRSS:");
    // 4 MiB of prompt in 160 inputs, answered with 160 vectors of 4096 floats (~7 MiB of JSON).
    let body = big_embeddings(4 << 20, 160);
    let started = Instant::now();
    // A small call sent while the big ones are parsed: its latency shows whether parsing
    // megabytes of prompt stalls the async workers.
    let small_url = format!("{}/embeddings", stack.base("openai"));
    let small = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let t = Instant::now();
        let r = http()
            .post(&small_url)
            .bearer_auth(KEY_OPS)
            .header("x-tenant-id", "memtest-small")
            .json(&json!({"model": "text-embedding-3-small", "input": "hello"}))
            .send()
            .await
            .expect("small call");
        (r.status().as_u16(), t.elapsed())
    });
    let res = crowd(&stack, 64, body, "memtest").await;
    let elapsed = started.elapsed();
    let (small_status, small_latency) = small.await.expect("small task");
    eprintln!("memory: a small call during the crowd: {small_status} in {small_latency:?}");
    let ok = res.iter().filter(|(s, _)| *s == 200).count();
    let busy = res.iter().filter(|(s, _)| *s == 503).count();
    for (s, text) in &res {
        assert!(
            *s == 200 || (*s == 503 && text.contains("max_inflight_body_bytes")),
            "unexpected answer {s}: {text}"
        );
    }
    let peak = status_kib(pid, "VmHWM:");
    let answer = res
        .iter()
        .find(|(s, _)| *s == 200)
        .map_or("none", |(_, t)| t.as_str());
    eprintln!(
        "memory: 64 concurrent 4 MiB embeddings calls (answers of {answer}): {ok} ok, {busy} refused \
         (503) in {elapsed:?}; \
         enforcer RSS idle {} MiB, peak (VmHWM) {} MiB",
        idle / 1024,
        peak / 1024
    );
    // The enforcer's own time before forwarding (parse, tokenise, reserve) of the admitted calls.
    let m = stack.metrics().await;
    let sample = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };
    eprintln!(
        "memory: mean enforcer overhead per admitted call {:.3} s",
        sample("llmwarden_overhead_seconds_sum") / sample("llmwarden_overhead_seconds_count")
    );
    assert!(ok > 0, "no call succeeded: {res:?}");
    let s = stack.settled("memtest", ok as u64).await;
    assert_eq!(s.held, Nanos::ZERO);
    assert!(
        peak < 320 * 1024,
        "enforcer peak RSS {} MiB is over 320 MiB (goal: 256 MiB)",
        peak / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inflight_budget_refuses_excess_calls_with_a_named_503() {
    let stack = Stack::start(Opts {
        top_toml: "max_request_body_bytes = 8388608\nmax_inflight_body_bytes = 33554432\n\
                   timeouts.client_ms = 60000\n"
            .into(),
        ..Opts::default()
    })
    .await;
    // 16 calls of 4 MiB (counted 12 MiB each) against a 32 MiB budget: at most two fit at once.
    let res = crowd(&stack, 16, big_embeddings(4 << 20, 16), "budgeted").await;
    let ok = res.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<&String> = res
        .iter()
        .filter(|(s, _)| *s == 503)
        .map(|(_, t)| t)
        .collect();
    assert_eq!(ok + refused.len(), 16, "only 200 or 503: {res:?}");
    assert!(ok > 0, "no call fit the budget: {res:?}");
    assert!(
        !refused.is_empty(),
        "16 x 4 MiB fit a 32 MiB budget: {res:?}"
    );
    for t in &refused {
        assert!(
            t.contains("max_inflight_body_bytes") && t.contains("inflight_bytes_exceeded"),
            "the 503 names the limit and its code: {t}"
        );
    }
    // Refused calls held nothing; admitted ones are settled; the budget is empty again.
    let s = stack.settled("budgeted", ok as u64).await;
    assert_eq!(s.held, Nanos::ZERO);
    assert_eq!(s.requests, ok as u64, "refused calls are not billed");
    let m = stack.metrics().await;
    let metric = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{m}"))
    };
    assert_eq!(
        metric("llmwarden_inflight_refusals_total"),
        refused.len() as u64
    );
    assert_eq!(
        metric("llmwarden_inflight_body_bytes"),
        0,
        "every permit returned"
    );
}
