//! The Redis ledger against a real redis-server on a free loopback port: atomic caps under
//! concurrency, idempotent settle and record, hold expiry and reclaim, figures to the nano-USD.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ledger::Nanos;
use ledger::store::{
    Budget, Cap, CapScope, Ledger, LedgerConfig, Period, RecordOutcome, ReserveOutcome,
    ReserveRequest, SettleOutcome, Settlement, TokenCounts, UsageRecord, resolve_caps,
};
use llmwarden_tests::redis::RedisServer;

const HOUR: Duration = Duration::from_secs(3600);

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("rfc3339")
        .with_timezone(&Utc)
}

async fn ledger(server: &RedisServer) -> Ledger {
    Ledger::connect(&server.url())
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", server.url()))
}

fn tenant_cap(period: Period, limit: i64) -> Cap {
    Cap {
        scope: CapScope::Tenant,
        period,
        limit: Nanos(limit),
    }
}

fn req(tenant: &str, id: &str, amount: i64, caps: Vec<Cap>) -> ReserveRequest {
    ReserveRequest {
        tenant: tenant.into(),
        feature: None,
        session: None,
        request_id: id.into(),
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        amount: Nanos(amount),
        ttl: HOUR,
        caps,
        at: Utc::now(),
        rates: Vec::new(),
        tokens: 0,
    }
}

fn settlement(r: &ReserveRequest, cost: i64) -> Settlement {
    Settlement {
        meta: Default::default(),
        tenant: r.tenant.clone(),
        request_id: r.request_id.clone(),
        feature: r.feature.clone(),
        session: r.session.clone(),
        model: r.model.clone(),
        cost: Nanos(cost),
        tokens: TokenCounts {
            input: 100,
            output: 20,
            cache_read: 5,
            cache_write: 1,
        },
        estimated: false,
        started_at: r.at,
    }
}

fn record(tenant: &str, event: &str, cost: i64, bypass: bool) -> UsageRecord {
    UsageRecord {
        meta: Default::default(),
        tenant: tenant.into(),
        event_id: event.into(),
        feature: None,
        session: None,
        provider: "anthropic".into(),
        model: Some("claude-sonnet-4-5".into()),
        cost: Nanos(cost),
        tokens: TokenCounts {
            input: 10,
            output: 3,
            cache_read: 0,
            cache_write: 0,
        },
        bypass,
        estimated: false,
        at: Utc::now(),
    }
}

async fn allowed(l: &Ledger, r: &ReserveRequest) -> ledger::store::Reservation {
    match l
        .reserve(r)
        .await
        .unwrap_or_else(|e| panic!("reserve {}: {e}", r.request_id))
    {
        ReserveOutcome::Allowed(res) => res,
        ReserveOutcome::Denied(d) => panic!("reserve {} denied: {d}", r.request_id),
        ReserveOutcome::RateLimited(d) => panic!("reserve {} rate limited: {d}", r.request_id),
    }
}

async fn denied(l: &Ledger, r: &ReserveRequest) -> ledger::store::Denial {
    match l
        .reserve(r)
        .await
        .unwrap_or_else(|e| panic!("reserve {}: {e}", r.request_id))
    {
        ReserveOutcome::Denied(d) => d,
        ReserveOutcome::Allowed(res) => panic!(
            "reserve {} allowed, expected a denial: {res:?}",
            r.request_id
        ),
        ReserveOutcome::RateLimited(d) => panic!("reserve {} rate limited: {d}", r.request_id),
    }
}

async fn month(l: &Ledger, tenant: &str) -> ledger::store::TenantSpend {
    l.tenant_spend(tenant, Period::Month, Utc::now())
        .await
        .expect("tenant_spend")
}

/// 200 concurrent reserves of one amount against a cap admit exactly floor(cap / amount).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reserves_admit_exactly_what_fits() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let amount = 7_000_000; // $0.007
    let cap = amount * 50 + 3_000_000;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let l = l.clone();
        let r = req(
            "acme",
            &format!("r{i}"),
            amount,
            vec![tenant_cap(Period::Month, cap)],
        );
        tasks.push(tokio::spawn(async move {
            l.reserve(&r).await.expect("reserve")
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        if matches!(t.await.expect("join"), ReserveOutcome::Allowed(_)) {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 50,
        "exactly floor(cap/amount) = 50 of 200 admitted"
    );
    let s = month(&l, "acme").await;
    assert_eq!(s.held, Nanos(amount * 50));
    assert!(
        s.spend.0 + s.held.0 <= cap,
        "committed + held {} + {} above cap {cap}",
        s.spend,
        s.held
    );
}

/// Varying amounts, with settles (at a lower actual cost) racing the reserves: committed + held
/// never exceeds the cap, and every denial was justified by what was held at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_varying_amounts_with_settles_never_exceed_the_cap() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let cap = 1_000_000_000; // $1
    let amounts = [13_000_000, 29_000_000, 5_000_000, 41_000_000, 17_000_000];
    let mut tasks = Vec::new();
    for i in 0..200 {
        let l = l.clone();
        let amount = amounts[i % amounts.len()];
        let r = req(
            "acme",
            &format!("v{i}"),
            amount,
            vec![tenant_cap(Period::Day, cap)],
        );
        tasks.push(tokio::spawn(async move {
            match l.reserve(&r).await.expect("reserve") {
                ReserveOutcome::Allowed(_) => {
                    // Half the admitted calls finish at 60 % of their reservation.
                    if i % 2 == 0 {
                        let out = l
                            .settle(&settlement(&r, amount * 6 / 10))
                            .await
                            .expect("settle");
                        assert_eq!(
                            out,
                            SettleOutcome::Settled {
                                released: Some(Nanos(amount))
                            }
                        );
                        (0, amount * 6 / 10, None)
                    } else {
                        (amount, 0, None)
                    }
                }
                ReserveOutcome::Denied(d) => {
                    assert!(
                        d.spent.0 + d.held.0 + amount > cap,
                        "denial without cause: {d}"
                    );
                    (0, 0, Some(amount))
                }
                ReserveOutcome::RateLimited(d) => panic!("rate limited without limits: {d}"),
            }
        }));
    }
    let (mut held, mut spent, mut denied_amounts) = (0, 0, Vec::new());
    for t in tasks {
        let (h, s, d) = t.await.expect("join");
        held += h;
        spent += s;
        denied_amounts.extend(d);
    }
    let s = l
        .tenant_spend("acme", Period::Day, Utc::now())
        .await
        .expect("tenant_spend");
    assert_eq!(
        s.held,
        Nanos(held),
        "held equals the unsettled admitted amounts"
    );
    assert_eq!(s.spend, Nanos(spent), "spend equals the settled costs");
    assert!(
        s.spend.0 + s.held.0 <= cap,
        "over the cap: {} + {}",
        s.spend,
        s.held
    );
    assert!(!denied_amounts.is_empty(), "the cap must have been reached");
}

#[tokio::test]
async fn settle_with_a_smaller_cost_frees_budget_and_is_idempotent() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let caps = vec![tenant_cap(Period::Month, 100)];
    let r1 = req("acme", "a1", 80, caps.clone());
    let res = allowed(&l, &r1).await;
    assert_eq!(
        (res.id.as_str(), res.amount, res.existing),
        ("a1", Nanos(80), false)
    );
    // A second call of 30 does not fit while 80 is held...
    let d = denied(&l, &req("acme", "a2", 30, caps.clone())).await;
    assert_eq!(
        (d.spent, d.held, d.limit, d.requested),
        (Nanos(0), Nanos(80), Nanos(100), Nanos(30))
    );
    // ...but does once the first settles at 50.
    let st = settlement(&r1, 50);
    assert_eq!(
        l.settle(&st).await.expect("settle"),
        SettleOutcome::Settled {
            released: Some(Nanos(80))
        }
    );
    let before = month(&l, "acme").await;
    assert_eq!(
        (before.spend, before.held, before.requests),
        (Nanos(50), Nanos(0), 1)
    );
    // A repeated settle changes nothing.
    assert_eq!(
        l.settle(&st).await.expect("settle again"),
        SettleOutcome::AlreadySettled
    );
    let mut other_cost = st.clone();
    other_cost.cost = Nanos(999);
    assert_eq!(
        l.settle(&other_cost).await.expect("settle again"),
        SettleOutcome::AlreadySettled
    );
    assert_eq!(
        month(&l, "acme").await,
        before,
        "a repeated settle must not change any counter"
    );
    allowed(&l, &req("acme", "a2", 30, caps.clone())).await;
    denied(&l, &req("acme", "a3", 21, caps)).await;
}

#[tokio::test]
async fn reserve_is_idempotent_per_request_id() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let caps = vec![tenant_cap(Period::Month, 100)];
    let r = req("acme", "same", 60, caps);
    let first = allowed(&l, &r).await;
    let again = allowed(&l, &r).await;
    assert!(again.existing && !first.existing);
    assert_eq!(
        (again.id, again.amount, again.expires_at),
        (first.id, first.amount, first.expires_at)
    );
    assert_eq!(
        month(&l, "acme").await.held,
        Nanos(60),
        "a retried reserve holds nothing more"
    );
    // Scripts flushed (a restarted or failed-over Redis): EVALSHA gets NOSCRIPT, reloads, retries.
    assert_eq!(server.command(&["SCRIPT", "FLUSH"]), "+OK");
    assert!(allowed(&l, &r).await.existing);
    l.settle(&settlement(&r, 10)).await.expect("settle");
    let e = l
        .reserve(&r)
        .await
        .expect_err("reserving a settled request id must fail");
    assert!(e.to_string().contains("already settled"), "{e}");
}

#[tokio::test]
async fn settle_after_the_hold_expired_replaces_the_estimate_once_and_held_returns_to_zero() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let mut r = req("acme", "late", 500, vec![tenant_cap(Period::Day, 1000)]);
    r.ttl = Duration::from_millis(150);
    r.session = Some("s1".into());
    r.feature = Some("bot".into());
    allowed(&l, &r).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = settlement(&r, 420);
    // The settle's own reclaim commits the expired hold at 500 (estimated), then the real usage
    // replaces that estimate.
    assert_eq!(
        l.settle(&st).await.expect("settle"),
        SettleOutcome::ReplacedEstimate {
            estimate: Nanos(500)
        }
    );
    assert_eq!(
        l.settle(&st).await.expect("settle again"),
        SettleOutcome::AlreadySettled
    );
    for period in Period::ALL {
        let s = l
            .tenant_spend("acme", period, Utc::now())
            .await
            .expect("tenant_spend");
        assert_eq!(
            (s.spend, s.held, s.requests, s.estimated_spend),
            (Nanos(420), Nanos(0), 1, Nanos(0)),
            "{period}"
        );
        assert_eq!(s.by_feature.get("bot"), Some(&Nanos(420)));
        assert!(s.held_by_feature.is_empty(), "{:?}", s.held_by_feature);
    }
    let sess = l.session_spend("acme", "s1").await.expect("session_spend");
    assert_eq!(
        (sess.spend, sess.held, sess.requests),
        (Nanos(420), Nanos(0), 1)
    );
    assert!(l.holds("acme", 10).await.expect("holds").is_empty());
}

#[tokio::test]
async fn expired_holds_are_committed_as_estimates_by_a_later_reserve() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let caps = vec![tenant_cap(Period::Month, 100)];
    let mut crashed = req("acme", "crashed", 100, caps.clone());
    crashed.ttl = Duration::from_millis(100);
    crashed.feature = Some("bot".into());
    allowed(&l, &crashed).await;
    denied(&l, &req("acme", "blocked", 1, caps.clone())).await;
    let holds = l.holds("acme", 10).await.expect("holds");
    assert_eq!(holds.len(), 1);
    assert_eq!(
        (
            holds[0].id.as_str(),
            holds[0].amount,
            holds[0].feature.as_deref()
        ),
        ("crashed", Nanos(100), Some("bot"))
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next reserve reclaims the expired hold first: its owner never settled or released it, so
    // it is committed at its reserved amount as estimated spend, and the cap stays full.
    let d = denied(&l, &req("acme", "after", 1, caps)).await;
    assert_eq!((d.spent, d.held), (Nanos(100), Nanos(0)));
    let s = month(&l, "acme").await;
    assert_eq!(
        (s.spend, s.held, s.estimated_spend, s.requests),
        (Nanos(100), Nanos(0), Nanos(100), 1)
    );
    assert_eq!(s.by_source.enforcer, Nanos(100));
    assert_eq!(s.by_feature.get("bot"), Some(&Nanos(100)));
    assert_eq!(s.by_model.get("gpt-4o-mini"), Some(&Nanos(100)));
    assert!(
        s.held_by_feature.is_empty(),
        "the feature hold was reclaimed too: {:?}",
        s.held_by_feature
    );
    assert!(l.holds("acme", 10).await.expect("holds").is_empty());
    // A sweep reclaims holds of tenants nobody touches any more, once.
    let mut idle = req("idle", "x", 5, vec![]);
    idle.ttl = Duration::from_millis(50);
    allowed(&l, &idle).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(l.reclaim_expired("idle").await.expect("reclaim"), 1);
    assert_eq!(l.reclaim_expired("idle").await.expect("reclaim"), 0);
    let s = month(&l, "idle").await;
    assert_eq!(
        (s.held, s.spend, s.estimated_spend),
        (Nanos(0), Nanos(5), Nanos(5))
    );
}

#[tokio::test]
async fn release_drops_the_hold_without_spend() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let mut r = req("acme", "rel", 70, vec![tenant_cap(Period::Month, 100)]);
    r.session = Some("s".into());
    allowed(&l, &r).await;
    assert_eq!(
        l.release_hold("acme", "rel").await.expect("release"),
        Some(Nanos(70))
    );
    assert_eq!(
        l.release_hold("acme", "rel").await.expect("release again"),
        None
    );
    l.release("acme", "never-existed")
        .await
        .expect("releasing an unknown hold is fine");
    let s = month(&l, "acme").await;
    assert_eq!((s.spend, s.held, s.requests), (Nanos(0), Nanos(0), 0));
    assert_eq!(
        l.session_spend("acme", "s").await.expect("session").held,
        Nanos(0)
    );
    allowed(
        &l,
        &req("acme", "full", 100, vec![tenant_cap(Period::Month, 100)]),
    )
    .await;
}

/// A hold or an estimate whose day hash is gone (expired) is dropped or reversed without
/// re-creating that hash, while the month hash, which still exists, gives back every field.
#[tokio::test]
async fn a_hold_or_estimate_whose_day_hash_expired_never_recreates_it() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let client = redis::Client::open(server.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut r = req("acme", "gone", 70, vec![]);
    r.feature = Some("bot".into());
    r.ttl = Duration::from_millis(100);
    let day = format!("llmw:{{acme}}:spend:d:{}", Period::Day.id(r.at));
    let expire_day = async |c: &mut redis::aio::MultiplexedConnection| {
        let n: i64 = redis::cmd("DEL")
            .arg(&day)
            .query_async(c)
            .await
            .expect("DEL");
        assert_eq!(n, 1, "{day} should exist before it expires");
    };
    let day_fields = async |c: &mut redis::aio::MultiplexedConnection| {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&day)
            .query_async(c)
            .await
            .expect("HGETALL");
        let mut f: Vec<String> = h.into_keys().collect();
        f.sort();
        f
    };

    // A feature hold added to two fields of each hash.
    allowed(&l, &r).await;
    expire_day(&mut c).await;
    assert_eq!(
        l.release_hold("acme", "gone").await.expect("release"),
        Some(Nanos(70))
    );
    assert!(
        day_fields(&mut c).await.is_empty(),
        "the release re-created the day hash"
    );
    let s = month(&l, "acme").await;
    assert_eq!((s.held, s.spend), (Nanos(0), Nanos(0)));
    assert!(s.held_by_feature.is_empty(), "{:?}", s.held_by_feature);

    // An abandoned hold committed as an estimate; its day hash expires; a late release reverses
    // the estimate in the month hash only.
    r.request_id = "late".into();
    allowed(&l, &r).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(l.reclaim_expired("acme").await.expect("reclaim"), 1);
    expire_day(&mut c).await;
    assert_eq!(
        l.release_hold("acme", "late").await.expect("release"),
        Some(Nanos(70))
    );
    assert!(
        day_fields(&mut c).await.is_empty(),
        "the release re-created the day hash"
    );
    let s = month(&l, "acme").await;
    assert_eq!(
        (s.spend, s.requests, s.estimated_spend, s.by_source.enforcer),
        (Nanos(0), 0, Nanos(0), Nanos(0))
    );

    // The same, replaced by a late real settle: the day hash it creates holds only that usage.
    r.request_id = "settled".into();
    allowed(&l, &r).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(l.reclaim_expired("acme").await.expect("reclaim"), 1);
    expire_day(&mut c).await;
    assert_eq!(
        l.settle(&settlement(&r, 30)).await.expect("settle"),
        SettleOutcome::ReplacedEstimate {
            estimate: Nanos(70)
        }
    );
    assert!(
        !day_fields(&mut c)
            .await
            .iter()
            .any(|f| f == "held" || f == "estimated" || f.ends_with(":held")),
        "the estimate's reversal re-created the day hash: {:?}",
        day_fields(&mut c).await
    );
    let s = month(&l, "acme").await;
    assert_eq!(
        (s.spend, s.requests, s.estimated_spend, s.held),
        (Nanos(30), 1, Nanos(0), Nanos(0))
    );
}

/// A hold of amount 0 (a free call) that is abandoned is committed as an estimate of 0; its late
/// real settle replaces that estimate like any other (subtracting 0 must not reach Redis as the
/// increment "-0", which it refuses).
#[tokio::test]
async fn a_zero_estimate_is_replaced_by_the_late_settle() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let mut r = req("acme", "free", 0, vec![]);
    r.ttl = Duration::from_millis(100);
    allowed(&l, &r).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(l.reclaim_expired("acme").await.expect("reclaim"), 1);
    assert_eq!(
        l.settle(&settlement(&r, 30)).await.expect("settle"),
        SettleOutcome::ReplacedEstimate { estimate: Nanos(0) }
    );
    let s = month(&l, "acme").await;
    assert_eq!(
        (s.spend, s.requests, s.estimated_spend, s.held),
        (Nanos(30), 1, Nanos(0), Nanos(0))
    );
}

/// Usage no real call has (a corrupt or forged usage record) is refused whole, naming the field,
/// before anything is written: the hold stays, no done marker is set, and the real settle of the
/// same call still lands.
#[tokio::test]
async fn absurd_usage_is_refused_before_anything_is_written() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let r = req("acme", "absurd", 500, vec![]);
    allowed(&l, &r).await;
    let mut bad = settlement(&r, 30);
    bad.tokens.input = u64::MAX;
    let e = l.settle(&bad).await.expect_err("refused");
    assert!(
        matches!(
            e,
            ledger::Error::Invalid {
                what: "input_tokens",
                ..
            }
        ),
        "{e}"
    );
    let mut bad = settlement(&r, ledger::store::MAX_CALL_COST.0 + 1);
    bad.tokens.output = 1;
    let e = l.settle(&bad).await.expect_err("refused");
    assert!(
        matches!(e, ledger::Error::Invalid { what: "cost", .. }),
        "{e}"
    );
    let mut rec = record("acme", "ev-absurd", 10, true);
    rec.tokens.cache_read = ledger::store::MAX_CALL_TOKENS + 1;
    let e = l.record(&rec).await.expect_err("refused");
    assert!(
        matches!(
            e,
            ledger::Error::Invalid {
                what: "cache_read_tokens",
                ..
            }
        ),
        "{e}"
    );
    let s = month(&l, "acme").await;
    assert_eq!((s.held, s.spend, s.requests), (Nanos(500), Nanos(0), 0));
    assert_eq!(
        l.settle(&settlement(&r, 30)).await.expect("settle"),
        SettleOutcome::Settled {
            released: Some(Nanos(500))
        }
    );
    let s = month(&l, "acme").await;
    assert_eq!((s.held, s.spend, s.requests), (Nanos(0), Nanos(30), 1));
}

#[tokio::test]
async fn observer_records_are_idempotent_and_count_against_the_budget() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    assert_eq!(
        l.record(&record("acme", "ev1", 60, true))
            .await
            .expect("record"),
        RecordOutcome::Recorded
    );
    assert_eq!(
        l.record(&record("acme", "ev1", 60, true))
            .await
            .expect("record"),
        RecordOutcome::Duplicate
    );
    assert_eq!(
        l.record(&record("acme", "ev2", 15, false))
            .await
            .expect("record"),
        RecordOutcome::Recorded
    );
    let s = month(&l, "acme").await;
    assert_eq!(
        (
            s.spend,
            s.bypass_spend,
            s.by_source.observer,
            s.by_source.enforcer
        ),
        (Nanos(75), Nanos(60), Nanos(75), Nanos(0))
    );
    assert_eq!((s.requests, s.input_tokens, s.output_tokens), (2, 20, 6));
    // The enforcer sees the observer's spend.
    let caps = vec![tenant_cap(Period::Month, 100)];
    let d = denied(&l, &req("acme", "r", 26, caps.clone())).await;
    assert_eq!((d.spent, d.held), (Nanos(75), Nanos(0)));
    allowed(&l, &req("acme", "r2", 25, caps)).await;
}

#[tokio::test]
async fn each_cap_kind_denies_with_the_right_denial() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let now = Utc::now();
    let budgets = vec![
        Budget {
            tenant: "*".into(),
            feature: None,
            period: Period::Day,
            limit: Nanos(1_000),
        },
        Budget {
            tenant: "acme".into(),
            feature: None,
            period: Period::Month,
            limit: Nanos(5_000),
        },
        Budget {
            tenant: "acme".into(),
            feature: Some("bot".into()),
            period: Period::Day,
            limit: Nanos(300),
        },
    ];
    let caps = |session: Option<&str>| {
        resolve_caps(&budgets, "acme", Some("bot"), session, Some(Nanos(200)))
    };
    let mk = |id: &str, amount: i64, feature: Option<&str>, session: Option<&str>| {
        let mut r = req("acme", id, amount, caps(session));
        r.caps.retain(|c| match &c.scope {
            CapScope::Feature(_) => feature.is_some(),
            _ => true,
        });
        r.feature = feature.map(Into::into);
        r.session = session.map(Into::into);
        r
    };
    // Session cap: 200 over the session's life.
    let s1 = mk("s1", 150, Some("bot"), Some("sess"));
    allowed(&l, &s1).await;
    l.settle(&settlement(&s1, 150)).await.expect("settle");
    let d = denied(&l, &mk("s2", 60, Some("bot"), Some("sess"))).await;
    assert_eq!(d.cap.scope, CapScope::Session("sess".into()));
    assert_eq!(
        (d.limit, d.spent, d.held, d.reset_at),
        (Nanos(200), Nanos(150), Nanos(0), None)
    );
    assert!(
        d.to_string()
            .contains("session budget exceeded for session sess of tenant acme"),
        "{d}"
    );
    // Feature cap per day: 300 (150 spent).
    let d = denied(&l, &mk("f1", 151, Some("bot"), None)).await;
    assert_eq!(
        d.cap,
        Cap {
            scope: CapScope::Feature("bot".into()),
            period: Period::Day,
            limit: Nanos(300)
        }
    );
    assert_eq!((d.spent, d.held), (Nanos(150), Nanos(0)));
    assert_eq!(d.reset_at, Some(Period::Day.reset_at(now)));
    // Tenant cap per day: 1000 (the "*" budget), unaffected by the feature cap when no feature.
    let d = denied(&l, &mk("t1", 851, None, None)).await;
    assert_eq!(d.cap, tenant_cap(Period::Day, 1_000));
    assert_eq!(d.spent, Nanos(150));
    assert!(
        d.to_string().starts_with("budget exceeded for tenant acme (day, limit $0.000001, spent $0.00000015); raise it with PUT /budgets or wait until "),
        "{d}"
    );
    allowed(&l, &mk("t2", 850, None, None)).await;
    // Tenant cap per month: 5000, checked after the day cap; use a cap list with the month only.
    let mut m = req("acme", "m1", 4_001, vec![tenant_cap(Period::Month, 5_000)]);
    m.at = now;
    let d = denied(&l, &m).await;
    assert_eq!(
        (d.cap.period, d.spent, d.held),
        (Period::Month, Nanos(150), Nanos(850))
    );
    assert_eq!(d.reset_at, Some(Period::Month.reset_at(now)));
    // The first violated cap in order is named: day before month.
    let both = req(
        "acme",
        "b1",
        10_000,
        vec![
            tenant_cap(Period::Day, 1_000),
            tenant_cap(Period::Month, 5_000),
        ],
    );
    assert_eq!(denied(&l, &both).await.cap.period, Period::Day);
    // A cap for another feature is a caller bug.
    let mut wrong = req(
        "acme",
        "w",
        1,
        vec![Cap {
            scope: CapScope::Feature("x".into()),
            period: Period::Day,
            limit: Nanos(1),
        }],
    );
    wrong.feature = Some("y".into());
    assert!(l.reserve(&wrong).await.is_err());
}

#[tokio::test]
async fn tenant_spend_figures_are_exact() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let mut a = req("acme", "e1", 1_000_000, vec![]);
    a.feature = Some("support-bot".into());
    allowed(&l, &a).await;
    let mut st = settlement(&a, 123_456_789);
    st.estimated = true;
    l.settle(&st).await.expect("settle");
    let mut b = req("acme", "e2", 2_000_000, vec![]);
    b.model = Some("ft:gpt-4o:org:custom".into());
    allowed(&l, &b).await; // left in flight
    l.record(&record("acme", "obs1", 1_000, true))
        .await
        .expect("record");
    let s = month(&l, "acme").await;
    assert_eq!(s.period_id, Period::Month.id(Utc::now()));
    assert_eq!(s.spend, Nanos(123_457_789));
    assert_eq!(s.held, Nanos(2_000_000));
    assert_eq!(s.bypass_spend, Nanos(1_000));
    assert_eq!(s.estimated_spend, Nanos(123_456_789));
    assert_eq!(s.requests, 2);
    assert_eq!(
        (
            s.input_tokens,
            s.output_tokens,
            s.cache_read_tokens,
            s.cache_write_tokens
        ),
        (110, 23, 5, 1)
    );
    assert_eq!(
        (s.by_source.enforcer, s.by_source.observer),
        (Nanos(123_456_789), Nanos(1_000))
    );
    assert_eq!(s.by_feature.get("support-bot"), Some(&Nanos(123_456_789)));
    assert_eq!(s.by_model.get("gpt-4o-mini"), Some(&Nanos(123_456_789)));
    assert_eq!(s.by_model.get("claude-sonnet-4-5"), Some(&Nanos(1_000)));
    assert_eq!(s.requests_by_model.get("gpt-4o-mini"), Some(&1));
    assert_eq!(
        l.tenant_spend("acme", Period::Day, Utc::now())
            .await
            .expect("day")
            .spend,
        Nanos(123_457_789)
    );
    assert_eq!(
        l.tenant_spend("nobody", Period::Day, Utc::now())
            .await
            .expect("empty")
            .spend,
        Nanos(0)
    );
    // Spend is booked in the period the call started in (a spool replay after midnight).
    let mut old = settlement(&req("acme", "old", 0, vec![]), 7);
    old.started_at = at("2026-10-31T23:59:59Z");
    l.settle(&old).await.expect("settle old");
    let oct = l
        .tenant_spend("acme", Period::Month, at("2026-10-15T00:00:00Z"))
        .await
        .expect("oct");
    assert_eq!((oct.period_id.as_str(), oct.spend), ("2026-10", Nanos(7)));
    // The raw schema, as ops dashboards read it.
    let key = format!("llmw:{{acme}}:spend:m:{}", Period::Month.id(Utc::now()));
    assert_eq!(server.command(&["HGET", &key, "src:enforcer"]), "123456789");
    assert_eq!(
        server.command(&["HGET", &key, "feature:support-bot:spend"]),
        "123456789"
    );
    let ttl: i64 = server
        .command(&["TTL", &key])
        .trim_start_matches(':')
        .parse()
        .expect("ttl");
    assert!(
        ttl > 400 * 86_400 && ttl < 432 * 86_400,
        "month hash retention ttl {ttl}"
    );
}

#[tokio::test]
async fn active_tenants_include_observer_only_tenants() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    allowed(&l, &req("acme", "1", 5, vec![])).await;
    l.record(&record("shadow-it", "ev", 5, true))
        .await
        .expect("record");
    let now = Utc::now();
    assert_eq!(
        l.active_tenants(Period::Month, now).await.expect("active"),
        vec!["acme", "shadow-it"]
    );
    assert_eq!(
        l.active_tenants(Period::Day, now).await.expect("active"),
        vec!["acme", "shadow-it"]
    );
    assert!(
        l.active_tenants(Period::Month, at("2020-01-01T00:00:00Z"))
            .await
            .expect("active")
            .is_empty()
    );
}

/// A tenant is listed in the sets of every day and month it was active in, whatever the order
/// of the calls' days (a late settle of yesterday's call between today's): the per-day shortcut
/// skips only what was written.
#[tokio::test]
async fn active_tenants_over_days_and_months_in_any_order() {
    let server = RedisServer::start();
    // Without the audit trail, which also marks today's day for every call.
    let l = Ledger::connect_with(
        &server.url(),
        LedgerConfig {
            audit: false,
            ..LedgerConfig::default()
        },
    )
    .await
    .expect("connect");
    let days = [
        "2031-01-31T23:59:59Z",
        "2031-02-01T00:00:00Z",
        "2031-01-31T10:00:00Z",
        "2031-02-02T12:00:00Z",
        "2031-02-01T08:00:00Z",
    ];
    for (i, d) in days.iter().enumerate() {
        let mut r = req("acme", &format!("d{i}"), 5, vec![]);
        r.at = at(d);
        allowed(&l, &r).await;
        let mut r = req("beta", &format!("d{i}"), 5, vec![]);
        r.at = at(d);
        if i % 2 == 0 {
            allowed(&l, &r).await;
        }
    }
    let listed = |p, d| {
        let l = l.clone();
        async move { l.active_tenants(p, at(d)).await.expect("active") }
    };
    assert_eq!(
        listed(Period::Day, "2031-01-31T00:00:00Z").await,
        vec!["acme", "beta"]
    );
    assert_eq!(
        listed(Period::Day, "2031-02-01T00:00:00Z").await,
        vec!["acme", "beta"]
    );
    assert_eq!(
        listed(Period::Day, "2031-02-02T00:00:00Z").await,
        vec!["acme"]
    );
    assert_eq!(
        listed(Period::Month, "2031-01-05T00:00:00Z").await,
        vec!["acme", "beta"]
    );
    assert_eq!(
        listed(Period::Month, "2031-02-05T00:00:00Z").await,
        vec!["acme", "beta"]
    );
    assert!(listed(Period::Day, "2031-02-03T00:00:00Z").await.is_empty());
}

#[tokio::test]
async fn invalid_names_are_rejected() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    for bad in ["", "a{b}", "x}", "new\nline", "pipe|d", "*"] {
        let e = l.reserve(&req(bad, "r", 1, vec![])).await.expect_err(bad);
        assert!(
            matches!(e, ledger::Error::Invalid { what: "tenant", .. }),
            "{bad:?}: {e}"
        );
    }
    let long = "a".repeat(129);
    assert!(l.reserve(&req("acme", &long, 1, vec![])).await.is_err());
    let mut r = req("acme", "r", 1, vec![]);
    r.feature = Some("f{1}".into());
    assert!(l.reserve(&r).await.is_err());
    let mut st = settlement(&req("acme", "r", 1, vec![]), 1);
    st.model = Some("bad\u{0}model".into());
    assert!(l.settle(&st).await.is_err());
    assert!(l.record(&record("acme", "", 1, false)).await.is_err());
    assert!(l.reserve(&req("acme", "neg", -1, vec![])).await.is_err());
    assert!(
        server.command(&["DBSIZE"]).ends_with(":0"),
        "nothing was written"
    );
}

#[tokio::test]
async fn budgets_live_in_redis() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let day = Budget {
        tenant: "*".into(),
        feature: None,
        period: Period::Day,
        limit: Nanos(5_000_000_000),
    };
    let feat = Budget {
        tenant: "acme".into(),
        feature: Some("bot".into()),
        period: Period::Month,
        limit: Nanos(7),
    };
    l.set_budget(&day).await.expect("set");
    l.set_budget(&feat).await.expect("set");
    assert_eq!(
        l.budgets().await.expect("list"),
        vec![day.clone(), feat.clone()]
    );
    assert_eq!(
        server.command(&["HGET", "llmw:budgets", "acme|bot|month"]),
        "7"
    );
    // Seeding never overwrites a live edit.
    let mut seeded = feat.clone();
    seeded.limit = Nanos(99);
    assert!(!l.seed_budget(&seeded).await.expect("seed"));
    assert_eq!(l.budgets().await.expect("list")[1].limit, Nanos(7));
    assert!(
        l.delete_budget("acme", Some("bot"), Period::Month)
            .await
            .expect("delete")
    );
    assert!(
        !l.delete_budget("acme", Some("bot"), Period::Month)
            .await
            .expect("delete")
    );
    assert!(l.seed_budget(&seeded).await.expect("seed"));
    assert!(
        l.set_budget(&Budget {
            tenant: "a{".into(),
            ..day
        })
        .await
        .is_err()
    );
}

/// Redis down or frozen: every call fails fast with an "unavailable" error, and the ledger works
/// again when Redis comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_or_paused_redis_fails_fast() {
    let cfg = LedgerConfig {
        response_timeout: Duration::from_millis(200),
        connection_timeout: Duration::from_millis(200),
        operation_timeout: Duration::from_millis(800),
        ..LedgerConfig::default()
    };
    // Nothing listening.
    let port = llmwarden_tests::process::free_port();
    let t0 = Instant::now();
    let e = Ledger::connect_with(&format!("redis://127.0.0.1:{port}"), cfg.clone())
        .await
        .expect_err("nothing listens");
    assert!(e.is_transient(), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "connect took {:?}",
        t0.elapsed()
    );
    // A lazy ledger starts anyway and fails per call.
    let lazy = Ledger::connect_lazy(&format!("redis://127.0.0.1:{port}"), cfg.clone())
        .await
        .expect("lazy");
    let t0 = Instant::now();
    let e = lazy
        .reserve(&req("acme", "x", 1, vec![]))
        .await
        .expect_err("down");
    assert!(e.is_transient(), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "reserve took {:?}",
        t0.elapsed()
    );

    // Frozen with SIGSTOP: the socket stays open, replies never come.
    let server = RedisServer::start();
    let l = Ledger::connect_with(&server.url(), cfg)
        .await
        .expect("connect");
    allowed(&l, &req("acme", "before", 1, vec![])).await;
    server.pause();
    let t0 = Instant::now();
    let e = l
        .reserve(&req("acme", "during", 1, vec![]))
        .await
        .expect_err("paused");
    let took = t0.elapsed();
    assert!(e.is_transient(), "{e}");
    assert!(
        took < Duration::from_secs(2),
        "a paused Redis must not hang a reserve: {took:?}"
    );
    let e = l.ping().await.expect_err("paused");
    assert!(e.is_transient(), "{e}");
    server.resume();
    let mut ok = false;
    for _ in 0..50 {
        if l.ping().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the ledger must recover after Redis resumes");
    // The reserve that timed out may or may not have run; a retry with the same id is safe.
    allowed(&l, &req("acme", "during", 1, vec![])).await;
    assert_eq!(month(&l, "acme").await.held, Nanos(2));
}

/// Informative throughput figure: reserve + settle pairs per second over one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reserve_settle_throughput() {
    let server = RedisServer::start();
    let l = Arc::new(ledger(&server).await);
    let n = 4_000;
    let conc = 32;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc {
        let l = Arc::clone(&l);
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(conc) {
                let mut r = req(
                    &format!("t{}", i % 10),
                    &format!("p{i}"),
                    1_000,
                    vec![tenant_cap(Period::Month, i64::MAX / 4)],
                );
                r.feature = Some("f".into());
                allowed(&l, &r).await;
                l.settle(&settlement(&r, 900)).await.expect("settle");
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    let el = t0.elapsed();
    let per_s = f64::from(u32::try_from(n).unwrap()) / el.as_secs_f64();
    println!("reserve+settle: {n} pairs in {el:?} = {per_s:.0} pairs/s ({conc} concurrent tasks)");
    let mut total = HashMap::new();
    for t in 0..10 {
        let s = month(&l, &format!("t{t}")).await;
        assert_eq!(s.held, Nanos(0));
        total.insert(t, s.spend);
    }
    assert_eq!(
        total.values().map(|n| n.0).sum::<i64>(),
        900 * i64::try_from(n).unwrap()
    );
}

/// The same operations over a 3-node Redis Cluster: each tenant's script runs on its slot's node,
/// the tenant sets and budgets live in other slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_redis_cluster() {
    let cluster = llmwarden_tests::redis::RedisCluster::start(3);
    let l = Ledger::connect(&cluster.url())
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", cluster.url()));
    let tenants = ["acme", "beta", "gamma", "delta", "epsilon", "zeta"];
    for (i, t) in tenants.iter().enumerate() {
        let caps = vec![tenant_cap(Period::Month, 100)];
        let mut r = req(t, &format!("c{i}"), 60, caps.clone());
        r.feature = Some("bot".into());
        r.session = Some("s".into());
        allowed(&l, &r).await;
        denied(&l, &req(t, &format!("d{i}"), 41, caps)).await;
        assert!(matches!(
            l.settle(&settlement(&r, 30)).await.expect("settle"),
            SettleOutcome::Settled { .. }
        ));
        assert_eq!(
            l.record(&record(t, "ev", 5, true)).await.expect("record"),
            RecordOutcome::Recorded
        );
        let s = month(&l, t).await;
        assert_eq!(
            (s.spend, s.held, s.requests, s.bypass_spend),
            (Nanos(35), Nanos(0), 2, Nanos(5)),
            "{t}"
        );
    }
    let mut active = l
        .active_tenants(Period::Month, Utc::now())
        .await
        .expect("active");
    active.sort();
    let mut want: Vec<String> = tenants.iter().map(|t| (*t).to_owned()).collect();
    want.sort();
    assert_eq!(active, want);
    let b = Budget {
        tenant: "acme".into(),
        feature: None,
        period: Period::Day,
        limit: Nanos(9),
    };
    l.set_budget(&b).await.expect("set_budget");
    assert_eq!(l.budgets().await.expect("budgets"), vec![b]);
    // The tenants really are spread over the nodes.
    let used = cluster
        .nodes()
        .iter()
        .filter(|n| !n.command(&["DBSIZE"]).ends_with(":0"))
        .count();
    assert!(
        used >= 2,
        "tenants should land on several nodes, got {used}"
    );
    // The audit trail: each tenant's stream on its own node, merged in time order by the reader;
    // a denial, a settle and a record per tenant, adding up to the spend.
    let q = ledger::store::AuditQuery {
        since: Utc::now() - chrono::Duration::hours(1),
        until: Utc::now() + chrono::Duration::minutes(1),
        tenant: None,
        path: None,
    };
    let (page, next) = l.audit_page(q.clone(), None, 10).await.expect("page");
    assert_eq!(page.len(), 10);
    let (rest, end) = l.audit_page(q, next, 100).await.expect("rest");
    assert!(end.is_none());
    let all: Vec<_> = page.into_iter().chain(rest).collect();
    assert_eq!(all.len(), 3 * tenants.len());
    let sum: i64 = all.iter().map(|r| r.cost_nusd - r.reversed_nusd).sum();
    assert_eq!(sum, 35 * 6);
    assert_eq!(
        all.iter().filter(|r| r.kind == "deny").count(),
        tenants.len()
    );
}

/// Every key the money scripts create carries an expiry, including when the scripts skip the
/// EXPIREAT of a period hash they saw already existing (reserve, settle, record, release,
/// reclaim of an expired hold, calls of a second feature, usage with zero counters).
#[tokio::test]
async fn every_key_the_money_scripts_write_expires() {
    use redis::AsyncCommands as _;
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let with = |id: &str, feature: &str, ttl: Duration| {
        let mut r = req(
            "ttl",
            id,
            1_000,
            vec![tenant_cap(Period::Day, 1_000_000_000)],
        );
        r.feature = Some(feature.into());
        r.session = Some("s1".into());
        r.ttl = ttl;
        r
    };
    for (i, feature) in ["a", "a", "b"].iter().enumerate() {
        let r = with(&format!("r{i}"), feature, HOUR);
        allowed(&l, &r).await;
        let mut s = settlement(&r, 700);
        s.tokens.cache_read = 0;
        s.tokens.cache_write = 0;
        l.settle(&s).await.expect("settle");
    }
    let free = with("free", "a", HOUR);
    allowed(&l, &free).await;
    l.settle(&settlement(&free, 0)).await.expect("settle at $0");
    let rel = with("rel", "a", HOUR);
    allowed(&l, &rel).await;
    l.release("ttl", "rel").await.expect("release");
    allowed(&l, &with("lost", "b", Duration::from_millis(1))).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    allowed(&l, &with("next", "a", HOUR)).await; // reclaims "lost" as an estimate
    // A record of its own tenant: its EXPIREAT would mend a key the calls above left without one.
    let mut rec = record("ttl-obs", "ev1", 300, true);
    rec.feature = Some("c".into());
    l.record(&rec).await.expect("record");
    l.record(&rec).await.expect("record again (duplicate)");
    let mut rec2 = record("ttl-obs", "ev2", 0, true);
    rec2.feature = Some("c".into());
    l.record(&rec2).await.expect("record at $0");

    let client = redis::Client::open(server.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut keys: Vec<String> = c.keys("llmw:{ttl}:*").await.expect("KEYS");
    keys.extend(
        c.keys::<_, Vec<String>>("llmw:{ttl-obs}:*")
            .await
            .expect("KEYS"),
    );
    let mut without: Vec<String> = Vec::new();
    for k in &keys {
        let ttl: i64 = c.ttl(k).await.expect("TTL");
        if ttl < 0 {
            without.push(k.clone());
        }
    }
    // The holds index lives as long as the tenant (it is emptied, never expired).
    without.retain(|k| !k.ends_with(":holds"));
    assert!(
        without.is_empty(),
        "keys without an expiry: {without:?} (of {keys:?})"
    );
    for kind in ["spend:d:", "spend:m:", "session:s1", "audit:"] {
        assert!(
            keys.iter().any(|k| k.contains(kind)),
            "no {kind} key written: {keys:?}"
        );
    }
}
