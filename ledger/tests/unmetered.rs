//! Unmetered provider connections against real Redis, one node and a real 3-node Redis Cluster:
//! booked once per connection id, summed per tenant, service and host, first/last seen kept,
//! the tenant listed as active, and `kind = unmetered` on the bypass stream.

use chrono::{Duration, Utc};
use ledger::store::{Ledger, Period, UnmeteredConn, UnmeteredOutcome};
use llmwarden_tests::redis::{RedisCluster, RedisServer};

fn conn(tenant: &str, service: &str, id: &str, out: u64, at_secs: i64) -> UnmeteredConn {
    UnmeteredConn {
        tenant: tenant.into(),
        service: service.into(),
        host: "api.openai.com".into(),
        provider: "openai".into(),
        conn_id: id.into(),
        pid: 4242,
        comm: "agent".into(),
        bytes_out: out,
        bytes_in: 10 * out,
        started_at: Utc::now() - Duration::seconds(at_secs),
        duration_ms: 1500,
        joined: false,
    }
}

async fn exercise(l: &Ledger, tenants: &[&str]) {
    let now = Utc::now();
    for t in tenants {
        let a = conn(t, "agent", "c1", 100, 20);
        assert_eq!(
            l.record_unmetered(&a).await.expect("record"),
            UnmeteredOutcome::Recorded
        );
        // A retried write of the same connection books nothing.
        assert_eq!(
            l.record_unmetered(&a).await.expect("again"),
            UnmeteredOutcome::Duplicate
        );
        l.record_unmetered(&conn(t, "agent", "c2", 50, 10))
            .await
            .expect("second");
        l.record_unmetered(&conn(t, "cli", "c3", 7, 5))
            .await
            .expect("other service");
        for period in Period::ALL {
            let u = l.unmetered(t, period, now).await.expect("read");
            assert_eq!(
                (u.connections, u.bytes_out, u.bytes_in),
                (3, 157, 1570),
                "{t} {period:?}"
            );
            assert_eq!(u.entries.len(), 2);
            let agent = &u.entries[0];
            assert_eq!((agent.service.as_str(), agent.connections), ("agent", 2));
            assert_eq!((agent.bytes_out, agent.bytes_in), (150, 1500));
            assert!(agent.first_seen_ms < agent.last_seen_ms, "{agent:?}");
            assert_eq!(u.entries[1].service, "cli");
        }
        assert!(
            l.active_tenants(Period::Month, now)
                .await
                .expect("tenants")
                .contains(&(*t).to_owned()),
            "{t} is listed for enforcer report"
        );
        l.unmetered_event(&a).await.expect("xadd");
    }
    let events = l.recent_bypass_events(100).await.expect("events");
    let kinds: Vec<_> = events
        .iter()
        .filter(|(_, f)| f.iter().any(|(k, v)| k == "kind" && v == "unmetered"))
        .collect();
    assert_eq!(kinds.len(), tenants.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmetered_connections_on_one_node() {
    let redis = RedisServer::start();
    let l = Ledger::connect(&redis.url()).await.expect("connect");
    exercise(&l, &["acme", "beta"]).await;
    // Invalid names never reach Redis.
    let mut bad = conn("acme", "agent", "c9", 1, 1);
    bad.host = "a|b".into();
    assert!(l.record_unmetered(&bad).await.is_err());
    bad = conn("a{b", "agent", "c9", 1, 1);
    assert!(l.record_unmetered(&bad).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmetered_connections_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let l = Ledger::connect(&cluster.url())
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", cluster.url()));
    // Six tenants land on several of the three nodes' slots; each script touches one slot.
    exercise(&l, &["acme", "beta", "gamma", "delta", "epsilon", "zeta"]).await;
}

/// Each booked connection is one audit record (path and kind `unmetered`, $0, its host and
/// bytes); a duplicate books nothing and writes no record. On one node and on a cluster.
async fn audited(url: &str) {
    use ledger::store::AuditQuery;
    let l = Ledger::connect(url).await.expect("connect");
    let c = conn("audited", "agent", "a1", 700, 1);
    l.record_unmetered(&c).await.expect("book");
    l.record_unmetered(&c).await.expect("duplicate");
    l.record_unmetered(&conn("audited", "agent", "a2", 50, 1))
        .await
        .expect("book 2");
    let now = Utc::now();
    let mut r = l
        .audit_reader(AuditQuery {
            since: now - Duration::hours(1),
            until: now + Duration::minutes(1),
            tenant: Some("audited".into()),
            path: Some("unmetered".into()),
        })
        .expect("reader");
    let mut got = Vec::new();
    while let Some(rec) = r.next().await.expect("read") {
        got.push(rec);
    }
    let brief: Vec<_> = got
        .iter()
        .map(|x| {
            (
                x.kind.as_str(),
                x.request_id.as_str(),
                x.host.as_str(),
                x.bytes_out,
                x.bytes_in,
                x.cost_nusd,
            )
        })
        .collect();
    assert_eq!(
        brief,
        [
            ("unmetered", "a1", "api.openai.com", 700, 7000, 0),
            ("unmetered", "a2", "api.openai.com", 50, 500, 0)
        ]
    );
    assert_eq!(
        (
            got[0].service.as_str(),
            got[0].pid.as_str(),
            got[0].outcome.as_str()
        ),
        ("agent", "4242", "unmetered")
    );
}

#[tokio::test]
async fn unmetered_connections_are_audited_once() {
    let server = RedisServer::start();
    audited(&server.url()).await;
}

#[tokio::test]
async fn unmetered_connections_are_audited_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    audited(&cluster.url()).await;
}
