//! The ledger's one budget cache against a real redis-server: concurrent first users wait for a
//! single read, the background refresher stops once the ledger is dropped, and a group commit
//! that mixes calls of different features fires each feature's alert thresholds.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use ledger::Nanos;
use ledger::store::{Budget, CallMeta, Ledger, Period, Settlement, TokenCounts, UsageRecord};
use llmwarden_tests::redis::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A MONITOR connection on `server`: counts `HGETALL llmw:budgets` until `stop` is awaited.
struct Monitor(
    tokio::task::JoinHandle<String>,
    tokio::sync::oneshot::Sender<()>,
);

impl Monitor {
    async fn start(server: &RedisServer) -> Monitor {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
            .await
            .expect("connect monitor");
        s.write_all(b"*1\r\n$7\r\nMONITOR\r\n")
            .await
            .expect("MONITOR");
        let mut ok = [0u8; 5];
        s.read_exact(&mut ok).await.expect("+OK");
        assert_eq!(&ok, b"+OK\r\n");
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    n = s.read(&mut buf) => match n {
                        Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                        _ => break,
                    },
                }
            }
            String::from_utf8_lossy(&seen).into_owned()
        });
        Monitor(task, tx)
    }

    async fn stop(self) -> usize {
        let _ = self.1.send(());
        self.0
            .await
            .expect("monitor task")
            .lines()
            .filter(|l| l.contains("\"HGETALL\" \"llmw:budgets\""))
            .count()
    }
}

fn record(tenant: &str, id: &str, cost: i64) -> UsageRecord {
    UsageRecord {
        tenant: tenant.into(),
        event_id: id.into(),
        feature: None,
        session: None,
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        cost: Nanos(cost),
        tokens: TokenCounts::default(),
        bypass: true,
        estimated: false,
        at: Utc::now(),
        meta: CallMeta::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_users_share_one_read_and_the_refresher_stops_with_the_ledger() {
    let server = RedisServer::start();
    let l = Ledger::connect(&server.url()).await.expect("connect");
    let mon = Monitor::start(&server).await;
    let t0 = std::time::Instant::now();
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let l = l.clone();
            async move { l.record(&record("first", &format!("e{i}"), 5)).await }
        })
        .collect();
    for r in join_all(calls).await {
        r.expect("record");
    }
    let took = t0.elapsed();
    let reads = mon.stop().await;
    // One inline read, plus one per second of the refresher if the machine was slow.
    let ticks = usize::try_from(took.as_secs()).unwrap_or(usize::MAX);
    assert!(
        (1..=1 + ticks).contains(&reads),
        "50 first records in {took:?} read the budgets {reads} times"
    );

    // The refresher runs about once a second while a clone lives ...
    let keep = l.clone();
    drop(l);
    let mon = Monitor::start(&server).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let alive = mon.stop().await;
    assert!((2..=3).contains(&alive), "{alive} reads in 2.5 s");
    // ... and stops once the last one is dropped.
    drop(keep);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mon = Monitor::start(&server).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(mon.stop().await, 0, "the refresher outlived its ledger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_mixing_features_fires_every_features_thresholds() {
    const TENANT: &str = "mixed";
    let server = RedisServer::start();
    let l = Ledger::connect(&server.url()).await.expect("connect");
    for (feature, limit) in [(None, 10_000), (Some("a"), 1_000), (Some("b"), 2_000)] {
        l.set_budget(&Budget {
            tenant: TENANT.into(),
            feature: feature.map(str::to_owned),
            period: Period::Month,
            limit: Nanos(limit),
        })
        .await
        .expect("set budget");
    }
    // 10 settles each: no feature 300 (tenant 5 300 of 10 000 with the others: 50 %), feature a
    // 60 (600 of 1 000: 50 %), feature b 170 (1 700 of 2 000: 50 and 80 %), interleaved so the
    // group commit mixes them.
    let now = Utc::now();
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let l = l.clone();
            let (feature, cost) = match i % 3 {
                0 => (None, 300),
                1 => (Some("a".to_owned()), 60),
                _ => (Some("b".to_owned()), 170),
            };
            async move {
                l.settle(&Settlement {
                    tenant: TENANT.into(),
                    request_id: format!("r{i}"),
                    feature,
                    session: None,
                    model: Some("gpt-4o-mini".into()),
                    cost: Nanos(cost),
                    tokens: TokenCounts::default(),
                    estimated: false,
                    started_at: now,
                    meta: CallMeta::default(),
                })
                .await
            }
        })
        .collect();
    for r in join_all(calls).await {
        r.expect("settle");
    }
    let stats = l.batch_stats().settle;
    assert!(stats.largest > 1, "no batch formed: {stats:?}");
    let spend = l
        .tenant_spend(TENANT, Period::Month, Utc::now())
        .await
        .expect("spend");
    assert_eq!(spend.spend, Nanos(5_300));
    let got: BTreeSet<(String, u32, i64)> = l
        .pending_alerts(TENANT, 100)
        .await
        .expect("alerts")
        .into_iter()
        .map(|a| (a.feature, a.threshold_pct, a.limit_nusd))
        .collect();
    let want: BTreeSet<(String, u32, i64)> = [
        (String::new(), 50, 10_000),
        ("a".to_owned(), 50, 1_000),
        ("b".to_owned(), 50, 2_000),
        ("b".to_owned(), 80, 2_000),
    ]
    .into();
    assert_eq!(got, want);
}
