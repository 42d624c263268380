//! The ledger's non-money keys against real Redis — the loop counters of a session and the bypass
//! event stream — on one node and on a real 3-node Redis Cluster (the loop keys live in the
//! tenant's slot; the stream is one key in its own slot, reached through the cluster client).

use std::time::Duration;

use chrono::Utc;
use ledger::store::{BYPASS_EVENTS, BypassEvent, Ledger, LoopCounts};
use llmwarden_tests::redis::{RedisCluster, RedisServer};

fn event(service: &str, tenant: &str) -> BypassEvent {
    BypassEvent {
        service: service.into(),
        provider: "openai".into(),
        tenant: tenant.into(),
        model: "gpt-4o-mini".into(),
        pid: 4242,
        comm: "python3".into(),
        at: Utc::now(),
    }
}

async fn exercise(l: &Ledger, tenants: &[&str]) {
    let window = Duration::from_secs(60);
    let now = Utc::now();
    for t in tenants {
        for i in 1..=3u64 {
            let n = l
                .count_session_call(t, "sess-1", b"same body", window, now)
                .await
                .unwrap_or_else(|e| panic!("{t}: {e}"));
            assert_eq!(
                n,
                LoopCounts {
                    per_minute: i,
                    identical: i
                },
                "{t}"
            );
        }
        let n = l
            .count_session_call(t, "sess-1", b"another body", window, now)
            .await
            .expect("count");
        assert_eq!((n.per_minute, n.identical), (4, 1), "{t}");
        // Another session of the tenant counts apart.
        let n = l
            .count_session_call(t, "sess-2", b"same body", window, now)
            .await
            .expect("count");
        assert_eq!((n.per_minute, n.identical), (1, 1), "{t}");
    }
    for (i, t) in tenants.iter().enumerate() {
        let id = l
            .bypass_event(&event(&format!("svc-{i}"), t))
            .await
            .unwrap_or_else(|e| panic!("bypass event for {t}: {e}"));
        assert!(id.contains('-'), "stream id {id}");
    }
    let recent = l.recent_bypass_events(100).await.expect("read the stream");
    assert_eq!(recent.len(), tenants.len());
    let (_, newest) = &recent[0];
    let field = |k: &str| newest.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    assert_eq!(field("tenant").as_deref(), tenants.last().copied());
    assert_eq!(field("provider").as_deref(), Some("openai"));
    assert_eq!(field("pid").as_deref(), Some("4242"));
    // Names the ledger refuses never reach Redis.
    assert!(
        l.count_session_call("a|b", "s", b"x", window, now)
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(
        l.bypass_event(&event("two words", "acme"))
            .await
            .unwrap_err()
            .is_invalid_input()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_counters_and_bypass_events_on_one_node() {
    let redis = RedisServer::start();
    let l = Ledger::connect(&redis.url()).await.expect("connect");
    exercise(&l, &["acme", "beta"]).await;
    // The counters expire on their own: the minute key within two minutes, the body key with
    // the identical-request window.
    let mut c = redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("llmw:{acme}:loop:sess-1:*")
        .query_async(&mut c)
        .await
        .expect("KEYS");
    assert_eq!(keys.len(), 3, "one minute key and two body keys: {keys:?}");
    for k in keys {
        let ttl: i64 = redis::cmd("TTL")
            .arg(&k)
            .query_async(&mut c)
            .await
            .expect("TTL");
        let limit = if k.contains(":rpm:") { 120 } else { 60 };
        assert!((1..=limit).contains(&ttl), "{k} ttl {ttl}");
    }
    assert_eq!(redis.command(&["XLEN", BYPASS_EVENTS]).trim(), ":2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_counters_and_bypass_events_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let l = Ledger::connect(&cluster.url())
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", cluster.url()));
    // Six tenants land on several of the three nodes' slots.
    exercise(&l, &["acme", "beta", "gamma", "delta", "epsilon", "zeta"]).await;
}
