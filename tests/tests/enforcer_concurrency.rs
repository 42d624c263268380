//! 200 concurrent calls, half streaming, 10% of the clients hanging up mid-stream, against a cap
//! worth about 50 calls: committed spend never exceeds the cap, denials happen, and every hold is
//! settled or released.

mod enforcer_common;

use std::time::{Duration, Instant};

use enforcer_common::{KEY_OPS, Opts, Stack, http};
use futures::StreamExt as _;
use ledger::Nanos;
use ledger::price::PriceTable;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_never_overspend() {
    // Worst case of one call: gpt-4o-mini, ~20 input tokens (+10%), 200 output tokens.
    let one = PriceTable::builtin()
        .max_cost("gpt-4o-mini", 22, 200)
        .nanos()
        .expect("priced");
    let cap = Nanos(one.0 * 50);
    let usd = enforcer_common::usd(cap);
    let extra = format!("[[budgets]]\ntenant = \"crowd\"\nperiod = \"month\"\nlimit_usd = {usd}\n");
    // 200 simultaneous TLS handshakes to the mock with debug-build crypto can starve a 2-core
    // machine for over a second; the test is about overspend, so give Redis calls more time.
    let stack = Stack::start(Opts {
        top_toml: "timeouts.redis_ms = 10000\n".into(),
        extra_toml: extra,
        mock_output_tokens: Some(200),
        mock_chunk_delay: Some(Duration::from_millis(2)),
        ..Opts::default()
    })
    .await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let stream = i % 2 == 0;
            let disconnect = i % 10 == 0;
            let body = json!({
                "model": "gpt-4o-mini", "max_tokens": 200, "stream": stream,
                "messages": [{"role": "user", "content": format!("call number {i} of the crowd")}],
            });
            let r = http()
                .post(&url)
                .bearer_auth(KEY_OPS)
                .header("x-tenant-id", "crowd")
                .header("x-mock-chunks", "40")
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
            let status = r.status().as_u16();
            if status != 200 && status != 402 {
                panic!("call {i}: {status} {}", r.text().await.unwrap_or_default());
            }
            if status == 200 && stream && disconnect {
                // Read a little, then hang up.
                let mut s = r.bytes_stream();
                let _ = s.next().await;
                drop(s);
            } else {
                let _ = r.bytes().await;
            }
            status
        }));
    }
    let mut ok = 0;
    let mut denied = 0;
    for t in tasks {
        match t.await.expect("task") {
            200 => ok += 1,
            402 => denied += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    let elapsed = started.elapsed();
    // Holds return to zero once every stream settled or was released.
    let deadline = Instant::now() + Duration::from_secs(15);
    let s = loop {
        let s = stack.spend("crowd").await;
        if s.held == Nanos::ZERO {
            break s;
        }
        assert!(Instant::now() < deadline, "holds not returned: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "200 calls in {elapsed:?}: {ok} allowed, {denied} denied; committed {} of cap {} ({} requests, {} estimated)",
        s.spend, cap, s.requests, s.estimated_spend
    );
    assert!(denied > 0, "no call was denied under a cap worth 50 calls");
    assert!(
        ok >= 40,
        "far fewer calls allowed ({ok}) than the cap admits"
    );
    assert!(
        s.spend <= cap,
        "overspend: committed {} > cap {}",
        s.spend,
        cap
    );
    // Every allowed call is committed at most once (a stream cut before its first byte is released).
    assert!(
        s.requests <= u64::try_from(ok).expect("count")
            && s.requests + 20 >= u64::try_from(ok).expect("count"),
        "{s:?}"
    );
}

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// Latency the enforcer adds to a small non-stream call (reserve + forward + settle), against the
/// mock directly over the same plain-HTTP keep-alive path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_latency_is_small() {
    let stack = Stack::start(Opts::default()).await;
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "latency probe"}]});
    let client = http();
    let run = async |url: String, key: &str| {
        let mut v = Vec::new();
        for i in 0..300 {
            let t = Instant::now();
            let r = client
                .post(&url)
                .header("x-api-key", key)
                .header("x-tenant-id", "lat")
                .json(&body)
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200, "call {i}");
            let _ = r.bytes().await.expect("body");
            if i >= 20 {
                v.push(t.elapsed());
            }
        }
        v
    };
    let mut direct = run(
        format!("{}/v1/messages", stack.mock.http_url()),
        enforcer_common::UPSTREAM_KEY,
    )
    .await;
    let mut proxied = run(format!("{}/v1/messages", stack.base("anthropic")), KEY_OPS).await;
    let (d50, d99) = (percentile(&mut direct, 50), percentile(&mut direct, 99));
    let (p50, p99) = (percentile(&mut proxied, 50), percentile(&mut proxied, 99));
    println!(
        "direct p50 {d50:?} p99 {d99:?}; through the enforcer p50 {p50:?} p99 {p99:?}; added p50 {:?}",
        p50.saturating_sub(d50)
    );
    // Generous bound: debug build on a shared 2-core machine.
    assert!(
        p50.saturating_sub(d50) < Duration::from_millis(25),
        "enforcer adds {:?} at p50",
        p50.saturating_sub(d50)
    );
}
