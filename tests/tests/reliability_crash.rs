//! Crashes (issue 5 item 2): kill -9 of the enforcer binary with streams in flight, then a restart
//! with the same config and spool. Abandoned calls are settled at their reserved amount, flagged
//! estimated (a crash never turns spent money into free money); a call whose real usage reached
//! the spool before the crash is settled at that real usage instead.

mod enforcer_common;
mod reliability_common;

use std::time::Duration;

use enforcer_common::{Opts, Stack};
use ledger::Nanos;
use reliability_common::{
    assert_log_clean, call, kill_9, mock_billed, restart, spawn_stream, spool_toml, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_then_restart_settles_every_hold_at_its_reserved_amount() {
    let spool = tempfile::tempdir().expect("tempdir");
    let mut stack = Stack::start(Opts {
        top_toml: spool_toml("crash-a", spool.path()),
        mock_chunk_delay: Some(Duration::from_millis(100)),
        ..Opts::default()
    })
    .await;
    let streams: Vec<_> = (0..4).map(|_| spawn_stream(&stack, "crash", 100)).collect();
    let l = stack.ledger.clone();
    wait_until(10, "4 holds", || {
        let l = l.clone();
        async move { l.holds("crash", 10).await.expect("holds").len() == 4 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // output is flowing
    let holds = stack.ledger.holds("crash", 10).await.expect("holds");
    let reserved: i64 = holds.iter().map(|h| h.amount.0).sum();
    assert!(
        holds
            .iter()
            .all(|h| h.instance.as_deref() == Some("crash-a"))
    );
    kill_9(&mut stack);
    for s in streams {
        let chunks = s.await.expect("join");
        assert!(chunks < 100, "a stream finished despite the kill");
    }
    let s = stack.spend("crash").await;
    assert_eq!((s.held, s.spend), (Nanos(reserved), Nanos::ZERO), "{s:?}");

    restart(&mut stack);
    let s = stack.settled("crash", 4).await;
    assert_eq!(
        (s.spend, s.estimated_spend, s.held, s.requests),
        (Nanos(reserved), Nanos(reserved), Nanos::ZERO, 4),
        "each abandoned call is billed at its reservation, flagged estimated"
    );
    assert!(
        s.spend.0 >= mock_billed(&stack).0,
        "the estimate covers what the provider billed"
    );
    assert!(
        stack
            .ledger
            .holds("crash", 10)
            .await
            .expect("holds")
            .is_empty()
    );
    // The restarted instance serves.
    let (st, body, _) = call(&stack, "crash-after", &[], false).await;
    assert_eq!(st, 200, "{body}");
    assert!(stack.log().contains("start-up recovery done"));
    assert_log_clean(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_spooled_before_a_crash_is_settled_exactly_after_restart() {
    let spool = tempfile::tempdir().expect("tempdir");
    let top = format!(
        "{}timeouts.redis_ms = 300\n",
        spool_toml("crash-b", spool.path())
    );
    let mut stack = Stack::start(Opts {
        top_toml: top,
        mock_chunk_delay: Some(Duration::from_millis(40)),
        ..Opts::default()
    })
    .await;
    // A stream starts while Redis is fine (reserved), Redis freezes, the stream completes: its
    // settle cannot be written, so its real usage goes to the spool. Then the enforcer is killed.
    let stream = spawn_stream(&stack, "spooled", 30);
    let l = stack.ledger.clone();
    wait_until(10, "the hold", || {
        let l = l.clone();
        async move { !l.holds("spooled", 10).await.expect("holds").is_empty() }
    })
    .await;
    stack.redis.pause();
    stream.await.expect("stream");
    let spool_dir = spool.path().to_path_buf();
    let spooled = || {
        std::fs::read_dir(&spool_dir)
            .expect("spool dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum::<u64>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while spooled() == 0 || !stack.log().contains("usage spooled until Redis answers") {
        assert!(
            std::time::Instant::now() < deadline,
            "the settle was not spooled:\n{}",
            stack.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill_9(&mut stack);
    stack.redis.resume();
    restart(&mut stack);
    let s = stack.settled("spooled", 1).await;
    let billed = mock_billed(&stack);
    assert_eq!(
        (s.spend, s.estimated_spend, s.requests),
        (billed, Nanos::ZERO, 1),
        "the spooled real usage, not the reservation: {s:?}"
    );
    assert!(stack.log().contains("usage spooled until Redis answers"));
    assert_log_clean(&stack);
}
