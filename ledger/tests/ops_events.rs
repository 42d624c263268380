//! Alert sources beyond budget thresholds, against a real redis-server (and a real 3-node
//! cluster): price gaps are announced once per (provider, model) and UTC day across processes,
//! and the observer's unmetered connections become `first_unmetered` alerts.

use chrono::Utc;
use ledger::store::{Ledger, OPS_CURSOR, PriceGap, UnmeteredConn};
use llmwarden_tests::redis::{RedisCluster, RedisServer};

fn gap(path: &str, model: &str, tenant: &str) -> PriceGap {
    PriceGap {
        path: path.into(),
        provider: "openai".into(),
        model: model.into(),
        tenant: tenant.into(),
        service: if path == "observer" {
            "billing".into()
        } else {
            String::new()
        },
        at: Utc::now(),
    }
}

/// Two processes (two handles: each has its own once-per-process memory) see the same gap on
/// both paths, many times: one event. Another model: a second one.
async fn price_gaps_once(url: &str) {
    let a = Ledger::connect(url).await.expect("connect a");
    let b = Ledger::connect(url).await.expect("connect b");
    let mut appended = 0;
    for _ in 0..3 {
        for (l, path) in [(&a, "enforcer"), (&b, "observer")] {
            if l.price_gap(&gap(path, "acme-internal-1", "acme"))
                .await
                .expect("gap")
            {
                appended += 1;
            }
        }
    }
    assert_eq!(appended, 1, "one process appends the day's event");
    assert!(
        b.price_gap(&gap("observer", "acme-internal-2", "beta"))
            .await
            .expect("gap 2")
    );
    let alerts = a.pending_ops_alerts(100).await.expect("pending");
    let got: Vec<(&str, &str, &str)> = alerts
        .iter()
        .map(|x| (x.kind.as_str(), x.model.as_str(), x.tenant.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("price_gap", "acme-internal-1", "acme"),
            ("price_gap", "acme-internal-2", "beta")
        ]
    );
    assert!(alerts[0].id.starts_with("ops|"));
    assert_eq!(alerts[1].path, "observer");
    assert_eq!(alerts[1].service, "billing");
    // Acknowledged: delivered once.
    a.ack_alert(OPS_CURSOR, &alerts[1].stream_id)
        .await
        .expect("ack");
    assert!(a.pending_ops_alerts(100).await.expect("pending").is_empty());
    // Names are checked.
    assert!(a.price_gap(&gap("enforcer", "", "acme")).await.is_err());
    assert!(a.price_gap(&gap("enforcer", "m", "a|b")).await.is_err());
}

#[tokio::test]
async fn price_gaps_are_announced_once_per_model_and_day() {
    let server = RedisServer::start();
    price_gaps_once(&server.url()).await;
}

#[tokio::test]
async fn price_gaps_work_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    price_gaps_once(&cluster.url()).await;
}

#[tokio::test]
async fn unmetered_connections_become_first_unmetered_alerts() {
    let server = RedisServer::start();
    let l = Ledger::connect(&server.url()).await.expect("connect");
    let c = UnmeteredConn {
        tenant: "acme".into(),
        service: "agent".into(),
        host: "api.anthropic.com".into(),
        provider: "anthropic".into(),
        conn_id: "c1".into(),
        pid: 4242,
        comm: "agent".into(),
        bytes_out: 1200,
        bytes_in: 9000,
        started_at: Utc::now(),
        duration_ms: 800,
        joined: false,
    };
    l.unmetered_event(&c).await.expect("event");
    let alerts = l.pending_bypass_alerts(10).await.expect("pending");
    assert_eq!(alerts.len(), 1);
    let a = &alerts[0];
    assert_eq!(
        (
            a.kind.as_str(),
            a.host.as_str(),
            a.bytes_out,
            a.bytes_in,
            a.pid.as_str()
        ),
        ("first_unmetered", "api.anthropic.com", 1200, 9000, "4242")
    );
}
