//! Redis outages (issue 5 item 1) against the real enforcer binary and a SIGSTOPped redis-server:
//! usage of calls that complete while Redis is unreachable goes to the local spool and is
//! replayed exactly once when Redis returns, under both on_redis_unavailable policies.

mod enforcer_common;
mod reliability_common;

use std::time::Duration;

use enforcer_common::{Opts, Stack};
use ledger::Nanos;
use reliability_common::{
    assert_log_clean, call, mock_billed, spawn_stream, spool_toml, wait_until,
};

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allow_admits_under_the_cap_spools_the_usage_and_replays_it_once() {
    let spool = tempfile::tempdir().expect("tempdir");
    let top = format!(
        "{}timeouts.redis_ms = 300\non_redis_unavailable = \"allow\"\nredis_unavailable_cap_usd = 1.0\n",
        spool_toml("redis-allow", spool.path())
    );
    let stack = Stack::start(Opts {
        top_toml: top,
        ..Opts::default()
    })
    .await;
    stack.redis.pause();
    let mut header_total = 0;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let (st, body, cost) = call(&stack, "outage", &[], false).await;
        assert_eq!(st, 200, "{body}");
        // Bounded (timeouts.redis_ms for the reserve, then an fsync): never a hang.
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        header_total += Nanos::from_usd_str(&cost.expect("cost header"))
            .expect("usd")
            .0;
    }
    let (st, body, _) = call(&stack, "outage", &[], true).await;
    assert_eq!(st, 200, "{body}");
    let m = stack.metrics().await;
    assert_eq!(
        counter(&m, "llmwarden_redis_unavailable_admissions_total"),
        4,
        "{m}"
    );
    wait_until(5, "4 spooled records", || {
        let stack = &stack;
        async move { counter(&stack.metrics().await, "llmwarden_spooled_records_total") == 4 }
    })
    .await;
    stack.redis.resume();
    let s = stack.settled("outage", 4).await;
    let billed = mock_billed(&stack);
    assert!(header_total > 0 && header_total < billed.0);
    assert_eq!(
        (s.spend, s.requests, s.held),
        (billed, 4, Nanos::ZERO),
        "every call billed exactly once, to the nano-USD"
    );
    // Nothing more arrives later (no double replay).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stack.spend("outage").await.spend, billed);
    assert_log_clean(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deny_refuses_new_calls_but_spools_the_settle_of_a_stream_in_flight() {
    let spool = tempfile::tempdir().expect("tempdir");
    let top = format!(
        "{}timeouts.redis_ms = 300\n",
        spool_toml("redis-deny", spool.path())
    );
    let stack = Stack::start(Opts {
        top_toml: top,
        mock_chunk_delay: Some(Duration::from_millis(40)),
        ..Opts::default()
    })
    .await;
    let stream = spawn_stream(&stack, "inflight", 30);
    let l = stack.ledger.clone();
    wait_until(10, "the hold", || {
        let l = l.clone();
        async move { !l.holds("inflight", 10).await.expect("holds").is_empty() }
    })
    .await;
    stack.redis.pause();
    // A new call is refused in the provider's error shape, in time, and never goes upstream.
    let before = stack.mock.ledger().len();
    let t = std::time::Instant::now();
    let (st, body, _) = call(&stack, "inflight-new", &[], false).await;
    assert_eq!(st, 503, "{body}");
    assert!(
        body.contains("\"error\"") && body.contains("ledger_unavailable"),
        "{body}"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(stack.mock.ledger().len(), before);
    // The stream in flight is not cut; its settle goes to the spool.
    assert!(stream.await.expect("stream") > 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    stack.redis.resume();
    let s = stack.settled("inflight", 1).await;
    assert_eq!(
        (s.spend, s.estimated_spend, s.requests),
        (mock_billed(&stack), Nanos::ZERO, 1)
    );
    assert_log_clean(&stack);
}
