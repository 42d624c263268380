//! Rate limits checked in the reserve script with the caps: exact across replicas, refused with
//! 429 `rate_limited` and `retry-after`, token limits counted at the worst case and corrected to
//! the real count at settle.

mod enforcer_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use enforcer_common::{KEY_OPS, Opts, Stack, http};
use serde_json::{Value, json};

async fn chat(base: &str, tenant: &str, stream: bool) -> (u16, Option<u64>, String) {
    let r = http()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", tenant)
        .json(
            &json!({"model": "gpt-4o-mini", "max_tokens": 1000, "stream": stream,
                      "messages": [{"role": "user", "content": "hello there"}]}),
        )
        .send()
        .await
        .expect("POST");
    let st = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = r.text().await.unwrap_or_default();
    let code = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (st, retry, code)
}

/// 4 clients, 2 on each of 2 enforcers, as fast as they can for 10 s against 60 requests per
/// minute: exactly 60 are admitted; every other call is 429 `rate_limited` with `retry-after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_rpm_on_two_replicas_admits_exactly_sixty() {
    let stack = Stack::start(Opts {
        extra_toml: "\n[[rate_limits]]\ntenant = \"rl-t\"\nrpm = 60\n".into(),
        ..Opts::default()
    })
    .await;
    let (_b, b_port, _) = stack.start_replica("replica-b");
    let bases = [
        stack.base("openai"),
        format!("http://127.0.0.1:{b_port}/proxy/openai"),
    ];
    let (ok, limited, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let end = Instant::now() + Duration::from_secs(10);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let base = bases[i % 2].clone();
        let (ok, limited, other) = (ok.clone(), limited.clone(), other.clone());
        tasks.push(tokio::spawn(async move {
            // Bounded: at most 10 s and 5,000 calls per client.
            for _ in 0..5_000 {
                if Instant::now() >= end {
                    break;
                }
                match chat(&base, "rl-t", false).await {
                    (200, _, _) => ok.fetch_add(1, Ordering::Relaxed),
                    (429, Some(s), code) if code == "rate_limited" && (1..=60).contains(&s) => {
                        limited.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let (ok, limited, other) = (
        ok.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    println!("admitted {ok}, rate limited {limited}, other {other}");
    assert_eq!(ok, 60, "exactly the limit admitted");
    assert!(
        limited > 0 && other == 0,
        "limited {limited}, other {other}"
    );
    let s = stack.settled("rl-t", 60).await;
    assert_eq!(
        s.requests, 60,
        "only admitted calls were reserved and billed"
    );
    let m = stack.metrics().await;
    assert!(
        m.contains("reason=\"rate_limited\""),
        "refusals are counted:\n{m}"
    );
}

/// A token limit counts each call at its worst case while it runs (so a burst of slow calls gets
/// exactly as many in as fit), then at its real count (so the next calls fit again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limits_count_the_worst_case_then_the_real_tokens() {
    let stack = Stack::start(Opts {
        extra_toml: "\n[[rate_limits]]\ntenant = \"*\"\nmodel = \"gpt-4o-mini*\"\ntpm = 2500\n"
            .into(),
        // 16 chunks: each admitted stream runs about 3 s, longer than the burst takes to decide.
        mock_chunk_delay: Some(Duration::from_millis(200)),
        ..Opts::default()
    })
    .await;
    let base = stack.base("openai");
    // A first call of another tenant warms the enforcer (tokenizer, upstream connection).
    assert_eq!(chat(&base, "tpm-warm", false).await.0, 200);
    // Six slow streams at once, each reserving ~1,000 tokens of a 2,500 window: two fit.
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move { chat(&base, "tpm-t", true).await })
        })
        .collect();
    let mut codes = Vec::new();
    for b in burst {
        codes.push(b.await.expect("call"));
    }
    let admitted = codes.iter().filter(|c| c.0 == 200).count();
    assert_eq!(admitted, 2, "{codes:?}");
    assert!(
        codes
            .iter()
            .filter(|c| c.0 != 200)
            .all(|c| c.0 == 429 && c.2 == "rate_limited"),
        "{codes:?}"
    );
    stack.settled("tpm-t", 2).await;
    // Settled at ~20 real tokens each: ten more calls one after another all fit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..10 {
        let (st, _, code) = chat(&base, "tpm-t", false).await;
        assert_eq!(st, 200, "call {i}: {code}");
        stack.settled("tpm-t", 3 + i).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
