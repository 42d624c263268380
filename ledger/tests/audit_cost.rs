//! What the audit trail and the alert checks add to each script call, measured by Redis itself
//! (`INFO commandstats`, microseconds per EVALSHA), for observer records and single settles with
//! the audit and alerts on and off. Ignored by default (a measurement, not a check):
//! `cargo test -p ledger --test audit_cost -- --ignored --nocapture`.

use std::time::Duration;

use chrono::Utc;
use ledger::Nanos;
use ledger::store::{
    Budget, CallMeta, Ledger, LedgerConfig, Period, ReserveOutcome, ReserveRequest, Settlement,
    TokenCounts, UsageRecord,
};
use llmwarden_tests::redis::RedisServer;

const N: usize = 3_000;

async fn evalsha_usec(server: &RedisServer) -> f64 {
    let client = redis::Client::open(server.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .expect("INFO");
    info.lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| {
            l.split(',')
                .find_map(|kv| kv.strip_prefix("usec_per_call="))
        })
        .and_then(|v| v.parse().ok())
        .expect("evalsha stats")
}

async fn run(audit: bool, alerts: bool) -> (f64, f64) {
    let server = RedisServer::start();
    let cfg = LedgerConfig {
        audit,
        alert_thresholds_pct: if alerts {
            vec![50, 80, 100]
        } else {
            Vec::new()
        },
        group_commit: false,
        ..LedgerConfig::default()
    };
    let l = Ledger::connect_with(&server.url(), cfg)
        .await
        .expect("connect");
    for period in Period::ALL {
        l.set_budget(&Budget {
            tenant: "t".into(),
            feature: None,
            period,
            limit: Nanos(1 << 50),
        })
        .await
        .expect("budget");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..N {
        l.record(&UsageRecord {
            tenant: "t".into(),
            event_id: format!("e{i}"),
            feature: Some("f".into()),
            session: None,
            provider: "openai".into(),
            model: Some("gpt-4o-mini".into()),
            cost: Nanos(1_000),
            tokens: TokenCounts {
                input: 100,
                output: 20,
                ..TokenCounts::default()
            },
            bypass: true,
            estimated: false,
            at: Utc::now(),
            meta: CallMeta {
                api: Some("chat_completions".into()),
                service: Some("svc".into()),
                pid: Some(1),
                comm: Some("python3".into()),
                ..CallMeta::default()
            },
        })
        .await
        .expect("record");
    }
    let record = evalsha_usec(&server).await;
    let server2 = RedisServer::start();
    let l = Ledger::connect_with(
        &server2.url(),
        LedgerConfig {
            audit,
            alert_thresholds_pct: if alerts {
                vec![50, 80, 100]
            } else {
                Vec::new()
            },
            group_commit: false,
            ..LedgerConfig::default()
        },
    )
    .await
    .expect("connect");
    for i in 0..N {
        let r = ReserveRequest {
            tenant: "t".into(),
            feature: None,
            session: None,
            request_id: format!("r{i}"),
            provider: "openai".into(),
            model: Some("gpt-4o-mini".into()),
            amount: Nanos(5_000),
            ttl: Duration::from_secs(60),
            caps: Vec::new(),
            at: Utc::now(),
            rates: Vec::new(),
            tokens: 0,
        };
        assert!(matches!(
            l.reserve(&r).await.expect("reserve"),
            ReserveOutcome::Allowed(_)
        ));
        l.settle(&Settlement {
            tenant: "t".into(),
            request_id: r.request_id.clone(),
            feature: None,
            session: None,
            model: r.model.clone(),
            cost: Nanos(1_000),
            tokens: TokenCounts::default(),
            estimated: false,
            started_at: r.at,
            meta: CallMeta::default(),
        })
        .await
        .expect("settle");
    }
    (record, evalsha_usec(&server2).await)
}

#[tokio::test]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn audit_and_alert_cost_per_script_call() {
    for (audit, alerts) in [(false, false), (true, false), (true, true)] {
        let (record, reserve_settle) = run(audit, alerts).await;
        println!(
            "audit={audit} alerts={alerts}: record {record:.2} us/EVALSHA, reserve+settle {reserve_settle:.2} us/EVALSHA (mean of both)"
        );
    }
}
