//! The local spool against a real redis-server: replay in order, idempotent double replay,
//! outages (SIGSTOP), the background replayer, rejected entries, and start-up recovery of an
//! instance's abandoned holds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;
use ledger::Nanos;
use ledger::spool::{Replayer, ReplayerConfig, Spool, SpoolConfig, SpoolEntry, recover_instance};
use ledger::store::{
    Ledger, LedgerConfig, Period, ReserveOutcome, ReserveRequest, Settlement, TenantSpend,
    TokenCounts, UsageRecord,
};
use llmwarden_tests::redis::RedisServer;

fn spool_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmw-spool-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn ledger(server: &RedisServer) -> Ledger {
    let cfg = LedgerConfig {
        operation_timeout: Duration::from_millis(600),
        response_timeout: Duration::from_millis(300),
        ..LedgerConfig::default()
    };
    Ledger::connect_lazy(&server.url(), cfg)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", server.url()))
}

fn settle(id: &str, cost: i64) -> Settlement {
    Settlement {
        meta: Default::default(),
        tenant: "acme".into(),
        request_id: id.into(),
        feature: Some("bot".into()),
        session: None,
        model: Some("gpt-4o-mini".into()),
        cost: Nanos(cost),
        tokens: TokenCounts {
            input: 10,
            output: 2,
            cache_read: 0,
            cache_write: 0,
        },
        estimated: false,
        started_at: Utc::now(),
    }
}

fn record(id: &str, cost: i64) -> UsageRecord {
    UsageRecord {
        meta: Default::default(),
        tenant: "acme".into(),
        event_id: id.into(),
        feature: None,
        session: None,
        provider: "openai".into(),
        model: Some("gpt-4o".into()),
        cost: Nanos(cost),
        tokens: TokenCounts::default(),
        bypass: true,
        estimated: false,
        at: Utc::now(),
    }
}

fn reserve_req(id: &str, amount: i64, ttl: Duration) -> ReserveRequest {
    ReserveRequest {
        tenant: "acme".into(),
        feature: None,
        session: None,
        request_id: id.into(),
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        amount: Nanos(amount),
        ttl,
        caps: vec![],
        at: Utc::now(),
        rates: Vec::new(),
        tokens: 0,
    }
}

async fn reserve(l: &Ledger, r: &ReserveRequest) {
    match l.reserve(r).await.expect("reserve") {
        ReserveOutcome::Allowed(_) => {}
        ReserveOutcome::Denied(d) => panic!("denied: {d}"),
        ReserveOutcome::RateLimited(d) => panic!("rate limited: {d}"),
    }
}

async fn month(l: &Ledger) -> TenantSpend {
    l.tenant_spend("acme", Period::Month, Utc::now())
        .await
        .expect("tenant_spend")
}

#[tokio::test]
async fn replay_sends_everything_once_even_when_replayed_twice() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    reserve(&l, &reserve_req("failed", 500, Duration::from_secs(3600))).await;
    let d = spool_dir("twice");
    let spool = Spool::open(SpoolConfig::new(&d)).expect("open spool");
    let entries = vec![
        SpoolEntry::Settle(settle("s1", 300)),
        SpoolEntry::Release {
            tenant: "acme".into(),
            request_id: "failed".into(),
        },
        SpoolEntry::Record(record("e1", 70)),
        SpoolEntry::Settle(settle("s2", 30)),
    ];
    for e in &entries {
        spool.append(e).await.expect("append");
    }
    let r = spool.replay_once(&l).await.expect("replay");
    assert_eq!(
        (r.settled, r.released, r.recorded, r.duplicates, r.rejected),
        (2, 1, 1, 0, 0),
        "{r:?}"
    );
    assert!(spool.is_empty(), "acknowledged segments are deleted");
    let s = month(&l).await;
    assert_eq!(
        (s.spend, s.held, s.requests, s.bypass_spend),
        (Nanos(400), Nanos(0), 3, Nanos(70))
    );
    // A crash after sending but before deleting: the same records come back. Nothing changes.
    for e in &entries {
        spool.append(e).await.expect("append again");
    }
    let r = spool.replay_once(&l).await.expect("second replay");
    assert_eq!((r.settled, r.recorded, r.duplicates), (0, 0, 3), "{r:?}");
    let s2 = month(&l).await;
    assert_eq!(
        (s2.spend, s2.held, s2.requests),
        (s.spend, s.held, s.requests)
    );
    assert_eq!(spool.stats().replayed, 8);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn a_paused_redis_fails_the_pass_fast_and_keeps_every_record() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    l.ping().await.expect("ping");
    let d = spool_dir("paused");
    let spool = Spool::open(SpoolConfig::new(&d)).expect("open spool");
    for i in 0..5 {
        spool
            .append(&SpoolEntry::Settle(settle(&format!("p{i}"), 100)))
            .await
            .expect("append");
    }
    server.pause();
    let t = Instant::now();
    let e = spool.replay_once(&l).await.expect_err("redis is paused");
    server.resume();
    assert!(e.is_transient(), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(!spool.is_empty());
    let r = spool.replay_once(&l).await.expect("replay after resume");
    assert_eq!(r.settled + r.duplicates, 5, "{r:?}");
    assert_eq!(month(&l).await.spend, Nanos(500));
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn the_replayer_drains_the_spool_when_redis_returns() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    l.ping().await.expect("ping");
    let d = spool_dir("replayer");
    let spool = Spool::open(SpoolConfig::new(&d)).expect("open spool");
    server.pause();
    let _replayer = Replayer::spawn(
        spool.clone(),
        l.clone(),
        ReplayerConfig {
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(400),
            idle_check: Duration::from_millis(200),
        },
    );
    for i in 0..50 {
        spool
            .append(&SpoolEntry::Record(record(&format!("ev{i}"), 10)))
            .await
            .expect("append");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!spool.is_empty(), "nothing can drain while redis is paused");
    server.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !spool.is_empty() {
        assert!(
            Instant::now() < deadline,
            "spool not drained: {:?}",
            spool.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = month(&l).await;
    assert_eq!((s.spend, s.requests), (Nanos(500), 50));
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn an_entry_redis_rejects_is_kept_aside_not_dropped() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let d = spool_dir("rejected");
    let spool = Spool::open(SpoolConfig::new(&d)).expect("open spool");
    let mut bad = settle("bad", 1);
    bad.tenant = "a{b".into();
    spool
        .append(&SpoolEntry::Settle(bad))
        .await
        .expect("append");
    spool
        .append(&SpoolEntry::Settle(settle("good", 5)))
        .await
        .expect("append");
    let r = spool.replay_once(&l).await.expect("replay");
    assert_eq!((r.settled, r.rejected), (1, 1), "{r:?}");
    let kept = std::fs::read_to_string(d.join("rejected.jsonl")).expect("rejected.jsonl");
    assert_eq!(kept.lines().count(), 1);
    assert!(kept.contains("\"request_id\":\"bad\""), "{kept}");
    assert!(spool.is_empty());
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn recovery_uses_real_usage_from_the_spool_and_estimates_the_rest() {
    let server = RedisServer::start();
    let hour = Duration::from_secs(3600);
    // The previous run of instance enf-1: three calls in flight when it was killed; one of them had
    // finished and its settle went to the spool (Redis was unreachable at that moment).
    let before = ledger(&server).await.with_instance("enf-1");
    let other = ledger(&server).await.with_instance("enf-2");
    for (id, amount) in [("done", 900), ("lost-1", 400), ("lost-2", 250)] {
        reserve(&before, &reserve_req(id, amount, hour)).await;
    }
    reserve(&other, &reserve_req("theirs", 50, hour)).await;
    let d = spool_dir("recover");
    {
        let spool = Spool::open(SpoolConfig::new(&d)).expect("open spool");
        let mut st = settle("done", 120);
        st.feature = None;
        spool.append(&SpoolEntry::Settle(st)).await.expect("append");
    }
    // The restart.
    let started = Utc::now();
    let l = ledger(&server).await.with_instance("enf-1");
    let spool = Spool::open(SpoolConfig::new(&d)).expect("reopen spool");
    let r = recover_instance(&spool, &l, "enf-1", started)
        .await
        .expect("recover");
    assert_eq!(
        (r.settled, r.abandoned, r.abandoned_amount),
        (1, 2, Nanos(650)),
        "{r:?}"
    );
    let s = month(&l).await;
    assert_eq!(
        (s.spend, s.estimated_spend, s.held, s.requests),
        (Nanos(120 + 650), Nanos(650), Nanos(50), 3),
        "real usage for the spooled call, reserved amounts for the others; enf-2's hold untouched"
    );
    // Running recovery again (a second crash during start-up) changes nothing.
    let r = recover_instance(&spool, &l, "enf-1", started)
        .await
        .expect("recover again");
    assert_eq!((r.settled, r.abandoned), (0, 0));
    assert_eq!(month(&l).await.spend, s.spend);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn a_spooled_settle_replaces_an_expired_holds_estimate() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let r = reserve_req("slow", 1000, Duration::from_millis(50));
    reserve(&l, &r).await;
    let d = spool_dir("replace");
    let spool = Spool::open(SpoolConfig::new(&d)).expect("open spool");
    let mut st = settle("slow", 333);
    st.feature = None;
    st.started_at = r.at;
    spool.append(&SpoolEntry::Settle(st)).await.expect("append");
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(l.reclaim_expired("acme").await.expect("reclaim"), 1);
    assert_eq!(month(&l).await.estimated_spend, Nanos(1000));
    let rep = spool.replay_once(&l).await.expect("replay");
    assert_eq!(rep.replaced_estimates, 1, "{rep:?}");
    let s = month(&l).await;
    assert_eq!(
        (s.spend, s.estimated_spend, s.requests),
        (Nanos(333), Nanos(0), 1)
    );
    let _ = std::fs::remove_dir_all(&d);
}
