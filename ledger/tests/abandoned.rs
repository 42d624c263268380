//! Abandoned holds (issue 5 item 2): a hold whose owner never settles or releases it is committed
//! at its reserved amount as estimated spend, exactly once; a late real settle replaces the
//! estimate, a late release reverses it; a restarted instance finds and resolves its own holds.

use std::time::Duration;

use chrono::Utc;
use ledger::Nanos;
use ledger::store::{
    Cap, CapScope, Ledger, Period, ReserveOutcome, ReserveRequest, SettleOutcome, Settlement,
    TenantSpend, TokenCounts,
};
use llmwarden_tests::redis::RedisServer;

async fn ledger(server: &RedisServer) -> Ledger {
    Ledger::connect(&server.url())
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", server.url()))
}

fn req(id: &str, amount: i64, ttl_ms: u64) -> ReserveRequest {
    ReserveRequest {
        tenant: "acme".into(),
        feature: Some("bot".into()),
        session: Some("s1".into()),
        request_id: id.into(),
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        amount: Nanos(amount),
        ttl: Duration::from_millis(ttl_ms),
        caps: vec![Cap {
            scope: CapScope::Tenant,
            period: Period::Month,
            limit: Nanos(1_000_000),
        }],
        at: Utc::now(),
        rates: Vec::new(),
        tokens: 0,
    }
}

fn real(r: &ReserveRequest, cost: i64) -> Settlement {
    Settlement {
        meta: Default::default(),
        tenant: r.tenant.clone(),
        request_id: r.request_id.clone(),
        feature: r.feature.clone(),
        session: r.session.clone(),
        model: r.model.clone(),
        cost: Nanos(cost),
        tokens: TokenCounts {
            input: 40,
            output: 9,
            cache_read: 0,
            cache_write: 0,
        },
        estimated: false,
        started_at: r.at,
    }
}

async fn reserve(l: &Ledger, r: &ReserveRequest) {
    match l.reserve(r).await.expect("reserve") {
        ReserveOutcome::Allowed(_) => {}
        ReserveOutcome::Denied(d) => panic!("reserve {} denied: {d}", r.request_id),
        ReserveOutcome::RateLimited(d) => panic!("reserve {} rate limited: {d}", r.request_id),
    }
}

async fn figures(l: &Ledger) -> Vec<TenantSpend> {
    let mut v = Vec::new();
    for p in Period::ALL {
        v.push(
            l.tenant_spend("acme", p, Utc::now())
                .await
                .expect("tenant_spend"),
        );
    }
    v
}

/// (spend, held, estimated, requests, input tokens, feature spend, model spend, enforcer spend)
fn key_figures(s: &TenantSpend) -> (i64, i64, i64, u64, u64, i64, i64, i64) {
    (
        s.spend.0,
        s.held.0,
        s.estimated_spend.0,
        s.requests,
        s.input_tokens,
        s.by_feature.get("bot").map_or(0, |n| n.0),
        s.by_model.get("gpt-4o-mini").map_or(0, |n| n.0),
        s.by_source.enforcer.0,
    )
}

#[tokio::test]
async fn an_expired_hold_is_committed_once_as_an_estimate() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let r = req("crashed", 700, 50);
    reserve(&l, &r).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(l.reclaim_expired("acme").await.expect("reclaim"), 1);
    assert_eq!(l.reclaim_expired("acme").await.expect("reclaim"), 0);
    for s in figures(&l).await {
        assert_eq!(
            key_figures(&s),
            (700, 0, 700, 1, 0, 700, 700, 700),
            "{}",
            s.period_id
        );
    }
    let sess = l.session_spend("acme", "s1").await.expect("session");
    assert_eq!(
        (sess.spend, sess.held, sess.requests),
        (Nanos(700), Nanos(0), 1)
    );
    // The id is used up: a new reserve with it is refused, a second abandon finds nothing.
    assert!(l.reserve(&r).await.is_err(), "reserve of a reclaimed id");
    assert_eq!(
        l.settle_abandoned("acme", "crashed")
            .await
            .expect("abandon"),
        None
    );
    assert!(l.holds("acme", 10).await.expect("holds").is_empty());
}

/// Every audit record of the last hour, oldest first.
async fn audit(l: &Ledger) -> Vec<ledger::store::AuditRecord> {
    let q = ledger::store::AuditQuery {
        since: Utc::now() - chrono::Duration::hours(1),
        until: Utc::now() + chrono::Duration::minutes(1),
        tenant: None,
        path: None,
    };
    l.audit_page(q, None, 1000).await.expect("audit page").0
}

/// A denial's record joins the fields the caller sent (path, provider) and the ones the script
/// adds (scope, amounts, the reserve's own context).
#[tokio::test]
async fn a_denial_record_has_the_callers_and_the_scripts_fields() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let mut r = req("big", 2_000_000, 60_000);
    r.caps[0].limit = Nanos(1_000);
    assert!(matches!(
        l.reserve(&r).await.expect("reserve"),
        ReserveOutcome::Denied(_)
    ));
    let all = audit(&l).await;
    let deny = all
        .iter()
        .find(|r| r.kind == "deny")
        .expect("a deny record");
    assert_eq!(
        (
            deny.v.as_str(),
            deny.path.as_str(),
            deny.provider.as_str(),
            deny.request_id.as_str(),
            deny.tenant.as_str(),
            deny.outcome.as_str(),
            deny.scope.as_str(),
            deny.reserved_nusd,
            deny.limit_nusd
        ),
        (
            "1",
            "enforcer",
            "openai",
            "big",
            "acme",
            "denied",
            "tenant/month",
            2_000_000,
            1_000
        ),
        "{deny:?}"
    );
}

/// A reserve whose reclaim commits an abandoned hold checks the alert thresholds too: the
/// estimate crosses 50% of the month budget, and the reserve's script fires that alert once.
#[tokio::test]
async fn a_reclaim_in_a_reserve_fires_the_threshold_it_crosses() {
    let server = RedisServer::start();
    let cfg = ledger::store::LedgerConfig {
        alert_thresholds_pct: vec![50, 100],
        group_commit: false,
        ..ledger::store::LedgerConfig::default()
    };
    let l = Ledger::connect_with(&server.url(), cfg)
        .await
        .expect("connect");
    l.set_budget(&ledger::store::Budget {
        tenant: "acme".into(),
        feature: None,
        period: Period::Month,
        limit: Nanos(1_000),
    })
    .await
    .expect("budget");
    tokio::time::sleep(Duration::from_millis(50)).await;
    reserve(&l, &req("gone", 600, 50)).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    // The next reserve reclaims the expired hold (600 of 1000 committed as an estimate).
    reserve(&l, &req("next", 100, 60_000)).await;
    let alerts = l.pending_alerts("acme", 10).await.expect("alerts");
    let fired: Vec<(String, u32)> = alerts
        .iter()
        .map(|a| (a.period.clone(), a.threshold_pct))
        .collect();
    assert_eq!(fired, vec![("month".to_owned(), 50)], "{alerts:?}");
}

#[tokio::test]
async fn a_late_real_settle_replaces_the_estimate_exactly_once() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let r = req("late", 700, 50);
    reserve(&l, &r).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(l.reclaim_expired("acme").await.expect("reclaim"), 1);
    let st = real(&r, 260);
    assert_eq!(
        l.settle(&st).await.expect("settle"),
        SettleOutcome::ReplacedEstimate {
            estimate: Nanos(700)
        }
    );
    // A replayed spool sends it again: nothing changes.
    assert_eq!(
        l.settle(&st).await.expect("settle again"),
        SettleOutcome::AlreadySettled
    );
    for s in figures(&l).await {
        assert_eq!(
            key_figures(&s),
            (260, 0, 0, 1, 40, 260, 260, 260),
            "{}",
            s.period_id
        );
        assert_eq!(s.requests_by_model.get("gpt-4o-mini"), Some(&1));
    }
    let sess = l.session_spend("acme", "s1").await.expect("session");
    assert_eq!((sess.spend, sess.requests), (Nanos(260), 1));
    // Its audit record carries the caller's fields and the script's reversal, side by side.
    let settle = audit(&l)
        .await
        .into_iter()
        .find(|r| r.kind == "settle")
        .expect("a settle record");
    assert_eq!(
        (
            settle.v.as_str(),
            settle.request_id.as_str(),
            settle.tenant.as_str(),
            settle.model.as_str(),
            settle.cost_nusd,
            settle.reversed_nusd
        ),
        ("1", "late", "acme", "gpt-4o-mini", 260, 700),
        "{settle:?}"
    );
    // A late release after the real settle changes nothing.
    assert_eq!(l.release_hold("acme", "late").await.expect("release"), None);
    assert_eq!(key_figures(&figures(&l).await[1]).0, 260);
}

#[tokio::test]
async fn a_late_release_reverses_the_estimate_once() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let r = req("failed", 300, 50);
    reserve(&l, &r).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(l.reclaim_expired("acme").await.expect("reclaim"), 1);
    assert_eq!(key_figures(&figures(&l).await[1]).0, 300);
    assert_eq!(
        l.release_hold("acme", "failed").await.expect("release"),
        Some(Nanos(300))
    );
    assert_eq!(l.release_hold("acme", "failed").await.expect("again"), None);
    for s in figures(&l).await {
        assert_eq!(key_figures(&s), (0, 0, 0, 0, 0, 0, 0, 0), "{}", s.period_id);
    }
    // The id stays used up: a settle after the release is a duplicate.
    assert_eq!(
        l.settle(&real(&r, 10)).await.expect("settle"),
        SettleOutcome::AlreadySettled
    );
    let sess = l.session_spend("acme", "s1").await.expect("session");
    assert_eq!((sess.spend, sess.requests), (Nanos(0), 0));
}

#[tokio::test]
async fn a_restarted_instance_finds_and_settles_only_its_own_holds() {
    let server = RedisServer::start();
    let a = ledger(&server).await.with_instance("enf-a");
    let b = ledger(&server).await.with_instance("enf-b");
    let ra = req("a-1", 400, 3_600_000);
    let rb = req("b-1", 90, 3_600_000);
    reserve(&a, &ra).await;
    reserve(&b, &rb).await;
    // "Restart" of enf-a: a new handle with the same instance id.
    let a2 = ledger(&server).await.with_instance("enf-a");
    let mine = a2
        .instance_holds("enf-a", Utc::now(), 1000)
        .await
        .expect("instance_holds");
    assert_eq!(mine.len(), 1, "{mine:?}");
    let (tenant, hold) = &mine[0];
    assert_eq!((tenant.as_str(), hold.id.as_str()), ("acme", "a-1"));
    assert_eq!(
        (hold.amount, hold.model.as_deref(), hold.instance.as_deref()),
        (Nanos(400), Some("gpt-4o-mini"), Some("enf-a"))
    );
    assert_eq!(
        a2.settle_abandoned(tenant, &hold.id)
            .await
            .expect("abandon"),
        Some(Nanos(400))
    );
    assert_eq!(
        a2.settle_abandoned(tenant, &hold.id).await.expect("again"),
        None
    );
    let s = &figures(&a2).await[1];
    assert_eq!(
        (s.spend, s.held, s.estimated_spend),
        (Nanos(400), Nanos(90), Nanos(400))
    );
    // enf-b's hold is untouched and settles normally.
    assert_eq!(
        b.settle(&real(&rb, 80)).await.expect("settle b"),
        SettleOutcome::Settled {
            released: Some(Nanos(90))
        }
    );
    assert!(
        a2.instance_holds("enf-a", Utc::now(), 1000)
            .await
            .expect("holds")
            .is_empty()
    );
}
