//! Spare holds for a lease pool (ledger/src/store/lease.rs): they count as held, a call settles or
//! is released under one exactly as under its own reservation, a pool is refused before it would
//! take the room other calls need, nothing but a call's own end is audited, and one left unused
//! past its ttl is charged at its amount (a crashed enforcer over-charges, never under).

use std::time::Duration;

use chrono::Utc;
use ledger::Nanos;
use ledger::store::{
    Cap, CapScope, Lease, LeaseRequest, Ledger, Period, SettleOutcome, Settlement, TenantSpend,
    TokenCounts,
};
use llmwarden_tests::redis::RedisServer;

async fn ledger(server: &RedisServer) -> Ledger {
    Ledger::connect(&server.url())
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", server.url()))
}

fn month_cap(limit: i64) -> Cap {
    Cap {
        scope: CapScope::Tenant,
        period: Period::Month,
        limit: Nanos(limit),
    }
}

/// A day cap of `scope`.
fn day_cap(scope: CapScope, limit: i64) -> Cap {
    Cap {
        scope,
        period: Period::Day,
        limit: Nanos(limit),
    }
}

fn lease_req(amount: i64, count: usize, limit: i64, room: i64, ttl: Duration) -> LeaseRequest {
    LeaseRequest {
        tenant: "acme".into(),
        feature: None,
        amount: Nanos(amount),
        ids: (0..count)
            .map(|_| uuid::Uuid::now_v7().to_string())
            .collect(),
        ttl,
        caps: vec![
            month_cap(limit),
            Cap {
                scope: CapScope::Tenant,
                period: Period::Day,
                limit: Nanos(limit),
            },
        ],
        room: Nanos(room),
        at: Utc::now(),
    }
}

fn settlement(id: &str, cost: i64) -> Settlement {
    Settlement {
        meta: Default::default(),
        tenant: "acme".into(),
        request_id: id.into(),
        feature: Some("bot".into()),
        session: None,
        model: Some("gpt-4o-mini".into()),
        cost: Nanos(cost),
        tokens: TokenCounts {
            input: 40,
            output: 9,
            cache_read: 0,
            cache_write: 0,
        },
        estimated: false,
        started_at: Utc::now(),
    }
}

async fn spend(l: &Ledger) -> Vec<TenantSpend> {
    let mut v = Vec::new();
    for p in Period::ALL {
        v.push(l.tenant_spend("acme", p, Utc::now()).await.expect("spend"));
    }
    v
}

/// (spend, held, estimated, requests, feature bot's spend) of both periods.
async fn figures(l: &Ledger) -> Vec<(i64, i64, i64, u64, i64)> {
    spend(l)
        .await
        .iter()
        .map(|s| {
            (
                s.spend.0,
                s.held.0,
                s.estimated_spend.0,
                s.requests,
                s.by_feature.get("bot").map_or(0, |n| n.0),
            )
        })
        .collect()
}

async fn audit(l: &Ledger) -> Vec<ledger::store::AuditRecord> {
    let q = ledger::store::AuditQuery {
        since: Utc::now() - chrono::Duration::hours(1),
        until: Utc::now() + chrono::Duration::minutes(1),
        tenant: None,
        path: None,
    };
    l.audit_page(q, None, 1000).await.expect("audit page").0
}

async fn lease(l: &Ledger, r: &LeaseRequest) -> Vec<Lease> {
    l.lease(r).await.expect("lease")
}

#[tokio::test]
async fn a_call_settles_under_a_spare_hold_as_under_its_own() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let got = lease(
        &l,
        &lease_req(1_000, 4, 1_000_000, 4_000, Duration::from_secs(60)),
    )
    .await;
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|g| g.amount == Nanos(1_000)));
    let mut ids: Vec<_> = got.iter().map(|g| g.id.clone()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 4, "distinct ids");
    // The same ids again are taken already: nothing new is held.
    let mut again = lease_req(1_000, 1, 1_000_000, 4_000, Duration::from_secs(60));
    again.ids = ids.clone();
    let twice = lease(&l, &again).await;
    assert_eq!(twice, got, "a repeated id returns its existing spare hold");
    assert_eq!(figures(&l).await, vec![(0, 4_000, 0, 0, 0); 2]);
    assert_eq!(l.holds("acme", 10).await.expect("holds").len(), 4);

    // A call takes the first: it settles under the spare hold's id.
    match l
        .settle(&settlement(&got[0].id, 300))
        .await
        .expect("settle")
    {
        SettleOutcome::Settled { .. } => {}
        other => panic!("settle under a spare hold: {other:?}"),
    }
    assert_eq!(figures(&l).await, vec![(300, 3_000, 0, 1, 300); 2]);
    // A second call takes the next and fails before anything is billed: released as a call's.
    l.release("acme", &got[1].id).await.expect("release");
    // The pool gives the last two back unused.
    for g in &got[2..] {
        assert_eq!(
            l.release_lease("acme", &g.id).await.expect("release lease"),
            Some(Nanos(1_000))
        );
    }
    assert_eq!(figures(&l).await, vec![(300, 0, 0, 1, 300); 2]);
    assert!(l.holds("acme", 10).await.expect("holds").is_empty());
    assert_eq!(
        l.release_lease("acme", &got[0].id).await.expect("again"),
        None,
        "a settled spare hold is gone"
    );

    // The trail names the two calls under the spare holds' ids, and nothing else: creating or
    // giving back a spare hold is no call's.
    let records = audit(&l).await;
    let mut seen: Vec<_> = records
        .iter()
        .map(|r| (r.kind.clone(), r.request_id.clone()))
        .collect();
    seen.sort();
    let mut want = vec![
        ("release".to_owned(), got[1].id.clone()),
        ("settle".to_owned(), got[0].id.clone()),
    ];
    want.sort();
    assert_eq!(seen, want, "{records:#?}");
}

#[tokio::test]
async fn a_pool_is_refused_before_it_takes_the_room_others_need() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    // Limit 10,000, room 4,000: spare holds of 1,000 fit while spend + held stays ≤ 6,000.
    let got = lease(
        &l,
        &lease_req(1_000, 8, 10_000, 4_000, Duration::from_secs(60)),
    )
    .await;
    assert_eq!(got.len(), 6);
    assert_eq!(figures(&l).await, vec![(0, 6_000, 0, 0, 0); 2]);
    assert!(
        lease(
            &l,
            &lease_req(1_000, 1, 10_000, 4_000, Duration::from_secs(60))
        )
        .await
        .is_empty()
    );
    // Spend counts like held: settle two at 1,500 each (above their spare hold, as a call may).
    for g in &got[..2] {
        l.settle(&settlement(&g.id, 1_500)).await.expect("settle");
    }
    assert_eq!(figures(&l).await, vec![(3_000, 4_000, 0, 2, 3_000); 2]);
    assert!(
        lease(
            &l,
            &lease_req(1_000, 4, 10_000, 4_000, Duration::from_secs(60))
        )
        .await
        .is_empty()
    );
    // A limit below amount + room refuses without running a script.
    assert!(
        lease(
            &l,
            &lease_req(1_000, 1, 4_999, 4_000, Duration::from_secs(60))
        )
        .await
        .is_empty()
    );
    // Refusals are not denials: the trail holds only the two settles.
    let records = audit(&l).await;
    assert_eq!(records.len(), 2, "{records:#?}");
    assert!(records.iter().all(|r| r.kind == "settle"));
}

#[tokio::test]
async fn an_unused_spare_hold_past_its_ttl_is_charged_at_its_amount() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let got = lease(
        &l,
        &lease_req(700, 2, 1_000_000, 0, Duration::from_millis(50)),
    )
    .await;
    assert_eq!(got.len(), 2);
    // The enforcer that reserved them is gone: the holds expire and are committed as estimates.
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(l.reclaim_expired("acme").await.expect("reclaim"), 2);
    assert_eq!(figures(&l).await, vec![(1_400, 0, 1_400, 2, 0); 2]);
    let records = audit(&l).await;
    assert_eq!(records.len(), 2, "{records:#?}");
    assert!(records.iter().all(|r| r.kind == "estimate"), "{records:#?}");
    // Had a call been running on one, its late settle replaces the estimate, once.
    l.settle(&settlement(&got[0].id, 100))
        .await
        .expect("late settle");
    assert_eq!(figures(&l).await, vec![(800, 0, 700, 2, 100); 2]);
}

/// (held, spend) of feature bot in both periods.
async fn bot(l: &Ledger) -> Vec<(i64, i64)> {
    spend(l)
        .await
        .iter()
        .map(|s| {
            let get =
                |m: &std::collections::BTreeMap<String, Nanos>| m.get("bot").map_or(0, |n| n.0);
            (get(&s.held_by_feature), get(&s.by_feature))
        })
        .collect()
}

#[tokio::test]
async fn a_features_spare_holds_count_in_its_held_and_keep_room_under_its_cap() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    // The tenant has room for plenty; feature bot's day cap of 10,000 with room 4,000 admits 6.
    let mut r = lease_req(1_000, 8, 1_000_000, 4_000, Duration::from_millis(300));
    r.feature = Some("bot".into());
    r.caps
        .push(day_cap(CapScope::Feature("bot".into()), 10_000));
    let got = lease(&l, &r).await;
    assert_eq!(
        got.len(),
        6,
        "the feature's cap, less the room, bounds the pool"
    );
    assert_eq!(bot(&l).await, vec![(6_000, 0); 2]);
    assert_eq!(figures(&l).await, vec![(0, 6_000, 0, 0, 0); 2]);
    // A call of the feature settles under one: its held becomes spend, as under its own reserve.
    l.settle(&settlement(&got[0].id, 400))
        .await
        .expect("settle");
    assert_eq!(bot(&l).await, vec![(5_000, 400); 2]);
    // A failed call is released; three go back unused; the last one expires and is charged, to
    // the feature, as an estimate.
    l.release("acme", &got[1].id).await.expect("release");
    for g in &got[2..5] {
        assert_eq!(
            l.release_lease("acme", &g.id).await.expect("release lease"),
            Some(Nanos(1_000))
        );
    }
    assert_eq!(bot(&l).await, vec![(1_000, 400); 2]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(l.reclaim_expired("acme").await.expect("reclaim"), 1);
    assert_eq!(bot(&l).await, vec![(0, 1_400); 2]);
    assert_eq!(figures(&l).await, vec![(1_400, 0, 1_000, 2, 1_400); 2]);
}

#[tokio::test]
async fn a_bad_lease_request_is_refused_by_name() {
    let server = RedisServer::start();
    let l = ledger(&server).await;
    let ttl = Duration::from_secs(60);
    let mut feature = lease_req(1_000, 1, 10_000, 0, ttl);
    feature
        .caps
        .push(day_cap(CapScope::Feature("bot".into()), 10_000));
    for (r, what) in [
        (lease_req(0, 1, 10_000, 0, ttl), "lease amount"),
        (lease_req(1 << 46, 1, i64::MAX, 0, ttl), "lease amount"),
        (lease_req(1_000, 0, 10_000, 0, ttl), "lease count"),
        (lease_req(1_000, 65, 10_000, 0, ttl), "lease count"),
        (lease_req(1_000, 1, 10_000, -1, ttl), "lease room"),
        (
            LeaseRequest {
                ids: vec!["bad{id}".into()],
                ..lease_req(1_000, 1, 10_000, 0, ttl)
            },
            "lease id",
        ),
        (feature, "lease cap"),
        (
            LeaseRequest {
                feature: Some("bot".into()),
                caps: vec![day_cap(CapScope::Feature("other".into()), 10_000)],
                ..lease_req(1_000, 1, 10_000, 0, ttl)
            },
            "lease cap",
        ),
        (
            LeaseRequest {
                caps: vec![day_cap(CapScope::Session("s1".into()), 10_000)],
                ..lease_req(1_000, 1, 10_000, 0, ttl)
            },
            "lease cap",
        ),
        (
            LeaseRequest {
                feature: Some("a b".into()),
                ..lease_req(1_000, 1, 10_000, 0, ttl)
            },
            "feature",
        ),
    ] {
        match l.lease(&r).await {
            Err(ledger::Error::Invalid { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(figures(&l).await, vec![(0, 0, 0, 0, 0); 2]);
}
