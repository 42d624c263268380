//! The routing rule sets the enforcer's admin API stores (`llmw:rules`), on a real redis-server
//! and a real 3-node cluster: stored, versioned, deleted, unknown sets and non-arrays refused.

use ledger::store::Ledger;
use llmwarden_tests::redis::{RedisCluster, RedisServer};

async fn exercise(url: &str) {
    let l = Ledger::connect(url).await.expect("connect");
    let empty = l.rules().await.expect("rules");
    assert!(empty.sets.is_empty());
    assert_eq!((empty.version, l.rules_version().await.expect("v")), (0, 0));
    let chain = r#"[{"from":"gpt-4o","to":["gpt-4o-mini"]}]"#;
    l.set_rule_set("downgrades", chain).await.expect("store");
    l.set_rule_set("rate_limits", "[]").await.expect("store");
    let r = l.rules().await.expect("rules");
    assert_eq!(r.sets.get("downgrades").map(String::as_str), Some(chain));
    assert_eq!(r.version, 2);
    assert_eq!(l.rules_version().await.expect("v"), 2);
    assert!(l.delete_rule_set("rate_limits").await.expect("delete"));
    assert!(
        !l.delete_rule_set("rate_limits")
            .await
            .expect("delete again")
    );
    let r = l.rules().await.expect("rules");
    assert_eq!(r.sets.keys().collect::<Vec<_>>(), ["downgrades"]);
    assert_eq!(r.version, 4);
    assert!(l.set_rule_set("routes", "[]").await.is_err());
    assert!(l.set_rule_set("downgrades", "{}").await.is_err());
    assert!(l.delete_rule_set("budgets").await.is_err());
    assert_eq!(
        l.rules_version().await.expect("v"),
        4,
        "refusals write nothing"
    );
}

#[tokio::test]
async fn rule_sets_on_one_node() {
    let server = RedisServer::start();
    exercise(&server.url()).await;
}

#[tokio::test]
async fn rule_sets_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    exercise(&cluster.url()).await;
}
