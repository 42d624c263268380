//! The audit trail (issue 17 item 1): every call of a mixed run — enforcer calls settled, cut and
//! released, budget denials, observer-path records, holds abandoned by a kill -9 and committed as
//! estimates after the restart, and a late settle replacing an estimate — is one record in the
//! tenant's stream of the day, and the records add up to the ledger's spend to the nano-USD
//! (spend = Σ cost_nusd − Σ reversed_nusd). No record carries the prompt or a key.

mod enforcer_common;
mod reliability_common;

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use enforcer_common::{KEY_OPS, Opts, Stack, UPSTREAM_KEY};
use ledger::store::{
    AuditQuery, AuditRecord, CallMeta, Ledger, Period, ReserveOutcome, ReserveRequest, Settlement,
    TokenCounts, UsageRecord,
};
use ledger::{Nanos, SettleOutcome};
use reliability_common::{PROMPT, call, kill_9, restart, spawn_stream, spool_toml, wait_until};

const TENANT: &str = "audited";

async fn records(ledger: &Ledger, tenant: &str) -> Vec<AuditRecord> {
    let now = Utc::now();
    let mut r = ledger
        .audit_reader(AuditQuery {
            since: now - chrono::Duration::hours(1),
            until: now + chrono::Duration::minutes(1),
            tenant: Some(tenant.to_owned()),
            path: None,
        })
        .expect("reader");
    let mut out = Vec::new();
    while let Some(rec) = r.next().await.expect("read audit") {
        out.push(rec);
    }
    out
}

fn observed(i: u32, cost: i64) -> UsageRecord {
    UsageRecord {
        tenant: TENANT.into(),
        event_id: format!("obs-{i}"),
        feature: None,
        session: None,
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        cost: Nanos(cost),
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
            service: Some("billing-worker".into()),
            pid: Some(4242),
            comm: Some("python3".into()),
            ..CallMeta::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_of_a_mixed_run_with_a_crash_is_one_record_and_they_sum_to_spend() {
    let spool = tempfile::tempdir().expect("tempdir");
    let mut stack = Stack::start(Opts {
        top_toml: spool_toml("audit-a", spool.path()),
        mock_chunk_delay: Some(Duration::from_millis(60)),
        extra_toml: format!(
            "[[budgets]]\ntenant = \"{TENANT}\"\nfeature = \"capped\"\nperiod = \"day\"\nlimit_usd = 0.000001\n"
        ),
        ..Opts::default()
    })
    .await;

    // Enforcer: settled calls (non-stream and stream).
    for stream in [false, true, false] {
        let (status, _, _) = call(&stack, TENANT, &[], stream).await;
        assert_eq!(status, 200);
    }
    // A stream the upstream resets mid-way: settled from what was delivered ("cut").
    let (status, _, _) = call(
        &stack,
        TENANT,
        &[("x-mock-fault", "reset-mid-stream=2")],
        true,
    )
    .await;
    assert_eq!(status, 200);
    // An upstream error status: the hold is released, nothing billed.
    let (status, _, _) = call(&stack, TENANT, &[("x-mock-fault", "status=500")], false).await;
    assert_eq!(status, 500);
    // Denials by the feature's tiny day budget.
    for _ in 0..2 {
        let (status, _, _) = call(&stack, TENANT, &[("x-feature-name", "capped")], false).await;
        assert_eq!(status, 402);
    }
    // Observer path: bypass calls recorded through the ledger as the observer's sink does (one
    // repeated: a duplicate writes nothing).
    for i in 0..3 {
        stack
            .ledger
            .record(&observed(i, 1_234_567 + i64::from(i)))
            .await
            .expect("record");
    }
    stack
        .ledger
        .record(&observed(0, 1_234_567))
        .await
        .expect("duplicate record");

    // Crash: two streams in flight, kill -9, restart: their holds are committed as estimates.
    let streams: Vec<_> = (0..2).map(|_| spawn_stream(&stack, TENANT, 100)).collect();
    let l = stack.ledger.clone();
    wait_until(10, "2 holds", || {
        let l = l.clone();
        async move { l.holds(TENANT, 10).await.expect("holds").len() == 2 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill_9(&mut stack);
    for s in streams {
        s.await.expect("join");
    }
    restart(&mut stack);
    let l = stack.ledger.clone();
    wait_until(15, "the abandoned holds committed", || {
        let l = l.clone();
        async move { l.holds(TENANT, 10).await.expect("holds").is_empty() }
    })
    .await;

    // A hold that expires (its owner never came back), is reclaimed as an estimate, and whose
    // real usage arrives later (a spool replay): the estimate is replaced, once.
    let reserve = ReserveRequest {
        tenant: TENANT.into(),
        feature: None,
        session: None,
        request_id: "late-settle-1".into(),
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        amount: Nanos(9_000_000),
        ttl: Duration::from_millis(50),
        caps: Vec::new(),
        at: Utc::now(),
        rates: Vec::new(),
        tokens: 0,
    };
    assert!(matches!(
        stack.ledger.reserve(&reserve).await.expect("reserve"),
        ReserveOutcome::Allowed(_)
    ));
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        stack.ledger.reclaim_expired(TENANT).await.expect("reclaim"),
        1
    );
    let late = Settlement {
        tenant: TENANT.into(),
        request_id: "late-settle-1".into(),
        feature: None,
        session: None,
        model: Some("gpt-4o-mini".into()),
        cost: Nanos(2_500_000),
        tokens: TokenCounts {
            input: 50,
            output: 10,
            ..TokenCounts::default()
        },
        estimated: false,
        started_at: reserve.at,
        meta: CallMeta::default(),
    };
    assert_eq!(
        stack.ledger.settle(&late).await.expect("late settle"),
        SettleOutcome::ReplacedEstimate {
            estimate: Nanos(9_000_000)
        }
    );
    assert_eq!(
        stack.ledger.settle(&late).await.expect("repeat"),
        SettleOutcome::AlreadySettled
    );

    // Let in-flight settles of the restarted enforcer land, then compare.
    let spend = stack
        .ledger
        .tenant_spend(TENANT, Period::Month, Utc::now())
        .await
        .expect("spend");
    let recs = records(&stack.ledger, TENANT).await;
    let by_kind = recs.iter().fold(HashMap::<&str, usize>::new(), |mut m, r| {
        *m.entry(r.kind.as_str()).or_default() += 1;
        m
    });
    let sum: i64 = recs.iter().map(|r| r.cost_nusd - r.reversed_nusd).sum();
    assert_eq!(
        Nanos(sum),
        spend.spend,
        "audit (Σ cost − Σ reversed) vs ledger spend; kinds {by_kind:?}\n{recs:#?}"
    );
    // 3 ok + 1 cut + 1 late settle; 3 observer records; 2 denials; 1 release; 2 + 1 estimates.
    assert_eq!(by_kind.get("settle"), Some(&5), "{by_kind:?}");
    assert_eq!(by_kind.get("record"), Some(&3), "{by_kind:?}");
    assert_eq!(by_kind.get("deny"), Some(&2), "{by_kind:?}");
    assert_eq!(by_kind.get("release"), Some(&1), "{by_kind:?}");
    assert_eq!(by_kind.get("estimate"), Some(&3), "{by_kind:?}");
    // Requests committed = settles + records + estimates − the one estimate replaced.
    assert_eq!(spend.requests, 5 + 3 + 3 - 1);
    let cut = recs.iter().filter(|r| r.outcome == "cut").count();
    assert_eq!(cut, 1, "{recs:#?}");
    assert!(recs.iter().any(|r| r.reversed_nusd == 9_000_000));
    let deny = recs.iter().find(|r| r.kind == "deny").expect("deny");
    assert_eq!(
        (deny.scope.as_str(), deny.limit_nusd, deny.feature.as_str()),
        ("feature/day", 1_000, "capped")
    );
    // The context the reserve script adds to its own denial record.
    assert_eq!(
        (
            deny.path.as_str(),
            deny.tenant.as_str(),
            deny.provider.as_str(),
            deny.model.as_str(),
            deny.outcome.as_str(),
            deny.cost_nusd
        ),
        ("enforcer", TENANT, "openai", "gpt-4o-mini", "denied", 0),
        "{deny:#?}"
    );
    assert!(
        !deny.request_id.is_empty() && deny.reserved_nusd > 0 && !deny.started_ms.is_empty(),
        "{deny:#?}"
    );
    let obs = recs.iter().find(|r| r.kind == "record").expect("record");
    assert_eq!(
        (
            obs.path.as_str(),
            obs.service.as_str(),
            obs.pid.as_str(),
            obs.bypass
        ),
        ("observer", "billing-worker", "4242", true)
    );
    let settled = recs
        .iter()
        .find(|r| r.kind == "settle" && r.outcome == "ok" && r.provider == "openai")
        .expect("an enforcer settle");
    assert_eq!(settled.api, "chat_completions");
    assert!(!settled.latency_ms.is_empty());
    assert!(
        recs.iter()
            .filter(|r| r.kind == "estimate")
            .all(|r| r.estimated)
    );
    // Time order.
    let order = |r: &AuditRecord| -> (u64, u64) {
        let (ms, seq) = r.id.split_once('-').expect("stream id");
        (ms.parse().expect("ms"), seq.parse().expect("seq"))
    };
    assert!(recs.windows(2).all(|w| order(&w[0]) < order(&w[1])));
    // Never prompts or keys.
    let dump = format!("{recs:?}");
    for secret in [PROMPT, KEY_OPS, UPSTREAM_KEY] {
        assert!(!dump.contains(secret), "an audit record carries a secret");
    }
}
