//! The lease pool (`lease_pool`, enforcer/src/lease.rs): calls forwarded on spare holds are
//! charged exactly as calls that reserve their own, a pool never lets a tenant overspend, a
//! graceful shutdown gives every spare hold back, and after kill -9 the unused ones are charged at
//! their amount (over, never under).

mod enforcer_common;
mod reliability_common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use enforcer_common::{KEY_ACME, KEY_OPS, Opts, Stack, http};
use ledger::Nanos;
use ledger::price::PriceTable;
use ledger::store::{AuditQuery, AuditRecord, TenantSpend};
use serde_json::json;

/// A counter's value in the enforcer's exposition.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the exposition:\n{text}"))
}

async fn audit(stack: &Stack) -> Vec<AuditRecord> {
    let q = AuditQuery {
        since: chrono::Utc::now() - chrono::Duration::hours(1),
        until: chrono::Utc::now() + chrono::Duration::minutes(1),
        tenant: None,
        path: None,
    };
    stack
        .ledger
        .audit_page(q, None, 1000)
        .await
        .expect("audit")
        .0
}

/// The request ids of the trail's records of `kind`.
async fn record_ids(stack: &Stack, kind: &str) -> BTreeSet<String> {
    audit(stack)
        .await
        .into_iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.request_id)
        .collect()
}

/// Waits until `n` calls of acme are committed (whatever stays held) and returns its figures.
async fn committed(stack: &Stack, n: usize) -> TenantSpend {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stack.spend("acme").await;
        if s.requests >= n as u64 {
            return s;
        }
        assert!(Instant::now() < deadline, "calls not settled: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the enforcer the way an orchestrator does and waits for it.
fn terminate(stack: &mut Stack) {
    stack.enforcer.signal(libc::SIGTERM);
    let st = stack.enforcer.wait_exit(Duration::from_secs(40));
    assert!(st.success(), "enforcer exit: {st:?}\n{}", stack.log());
}

/// Runs the same calls (half streaming, some with a feature, some answered without a usage record
/// and so billed at their worst case) through a stack and returns the request ids the enforcer
/// answered with.
async fn calls(stack: &Stack, n: usize) -> Vec<String> {
    let url = format!("{}/chat/completions", stack.base("openai"));
    let mut ids = Vec::new();
    for i in 0..n {
        let stream = i % 2 == 1;
        let mut body = json!({
            "model": "gpt-4o-mini", "max_tokens": 100, "stream": stream,
            "messages": [{"role": "user", "content": format!("question {i}: how many words is this?")}],
        });
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        let mut req = http().post(&url).bearer_auth(KEY_ACME).json(&body);
        if i % 3 == 0 {
            req = req.header("x-feature-name", "triage");
        }
        if i % 6 == 2 || i % 6 == 5 {
            req = req.header("x-mock-fault", "no-usage");
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(r.status(), 200, "call {i}");
        ids.push(
            r.headers()
                .get("x-warden-request-id")
                .and_then(|v| v.to_str().ok())
                .expect("request id")
                .to_owned(),
        );
        let _ = r.bytes().await.expect("body");
    }
    ids
}

fn charged(s: &TenantSpend) -> (Nanos, Nanos, u64, u64, u64, Option<Nanos>) {
    (
        s.spend,
        s.estimated_spend,
        s.requests,
        s.input_tokens,
        s.output_tokens,
        s.by_feature.get("triage").copied(),
    )
}

/// The tenant's caps, and a cap of feature triage: its calls draw from a pool of their own.
const BUDGET: &str = "[[budgets]]\ntenant = \"acme\"\nperiod = \"month\"\nlimit_usd = 100\n\n[[budgets]]\ntenant = \"acme\"\nperiod = \"day\"\nlimit_usd = 50\n\n[[budgets]]\ntenant = \"acme\"\nfeature = \"triage\"\nperiod = \"day\"\nlimit_usd = 20\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_spare_holds_are_charged_exactly_as_calls_that_reserve() {
    const N: usize = 24;
    let mut on = Stack::start(Opts {
        top_toml: "lease_pool = 8\n".into(),
        extra_toml: BUDGET.into(),
        ..Opts::default()
    })
    .await;
    let off = Stack::start(Opts {
        extra_toml: BUDGET.into(),
        ..Opts::default()
    })
    .await;
    let on_ids = calls(&on, N).await;
    let _ = calls(&off, N).await;
    let want = charged(&off.settled("acme", N as u64).await);

    // While it serves, the pool's spare holds are held; the calls themselves are all committed.
    let live = committed(&on, N).await;
    assert_eq!(charged(&live), want, "{live:?}");
    assert!(live.held > Nanos::ZERO, "no spare hold is held: {live:?}");
    assert!(
        live.held_by_feature.get("triage") > Some(&Nanos::ZERO),
        "feature triage's pool holds nothing: {live:?}"
    );
    // The gauges name exactly what the pools hold once no refill is under way: every hold in
    // Redis is a waiting spare hold, and what a crash now would charge is their sum.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = on.metrics().await;
        let held = on.spend("acme").await.held;
        let holds = on.ledger.holds("acme", 100).await.expect("holds").len() as u64;
        let gauges = (
            counter(&m, "llmwarden_lease_spare_holds"),
            counter(&m, "llmwarden_lease_spare_nanousd"),
        );
        if gauges == (holds, u64::try_from(held.0).expect("held")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gauges {gauges:?} against {holds} holds of {held} in Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = on.metrics().await;
    let taken = counter(&m, "llmwarden_lease_taken_total");
    // Each of the two pools (the tenant's, triage's) misses a call or two while it first fills.
    assert!(
        taken + 5 >= N as u64,
        "only {taken} of {N} sequential calls took a spare hold"
    );
    assert!(counter(&m, "llmwarden_lease_reserved_total") >= taken);

    // Every call is recorded once, under the id it was answered with.
    assert_eq!(
        record_ids(&on, "settle").await,
        on_ids.iter().cloned().collect::<BTreeSet<_>>()
    );

    // A graceful stop gives the spare holds back: nothing held, nothing more charged, and the
    // trail holds the calls' settles only.
    terminate(&mut on);
    let after = on.spend("acme").await;
    assert_eq!(after.held, Nanos::ZERO, "{after:?}");
    assert_eq!(charged(&after), want);
    let kinds: Vec<String> = audit(&on).await.into_iter().map(|r| r.kind).collect();
    assert_eq!(kinds, vec!["settle".to_owned(); N], "{kinds:?}");
    let log = on.log();
    assert!(!log.contains("spare holds not all released"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_never_lets_concurrent_calls_overspend() {
    crowd(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_features_pool_never_lets_concurrent_calls_overspend_its_cap() {
    crowd(Some("triage")).await;
}

/// Six clients of tenant crowd calling back to back against a cap worth 50 calls: the tenant's,
/// or `feature`'s (the tenant then has a cap far above it, so both pools' rules apply).
async fn crowd(feature: Option<&str>) {
    // Worst case of one call: gpt-4o-mini, ~20 input tokens (+10%), 200 output tokens.
    let one = PriceTable::builtin()
        .max_cost("gpt-4o-mini", 22, 200)
        .nanos()
        .expect("priced");
    let cap = Nanos(one.0 * 50);
    let usd = enforcer_common::usd(cap);
    let mut stack = Stack::start(Opts {
        top_toml: "lease_pool = 8\ntimeouts.redis_ms = 10000\n".into(),
        extra_toml: match feature {
            None => format!(
                "[[budgets]]\ntenant = \"crowd\"\nperiod = \"month\"\nlimit_usd = {usd}\n"
            ),
            Some(f) => format!(
                "[[budgets]]\ntenant = \"crowd\"\nperiod = \"month\"\nlimit_usd = 1000\n\n\
                 [[budgets]]\ntenant = \"crowd\"\nfeature = \"{f}\"\nperiod = \"day\"\nlimit_usd = {usd}\n"
            ),
        },
        mock_output_tokens: Some(200),
        ..Opts::default()
    })
    .await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    // Six clients, each calling back to back: the pool is refilled and drawn on while the budget
    // runs out, then refused near the limit, where calls reserve one by one until denied.
    let mut tasks = Vec::new();
    for c in 0..6u32 {
        let url = url.clone();
        let feature = feature.map(str::to_owned);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut denied) = (0u64, 0u64);
            for i in 0..25u32 {
                let body = json!({
                    "model": "gpt-4o-mini", "max_tokens": 200,
                    "messages": [{"role": "user", "content": format!("call {i} of client {c}")}],
                });
                let mut req = http()
                    .post(&url)
                    .bearer_auth(KEY_OPS)
                    .header("x-tenant-id", "crowd");
                if let Some(f) = &feature {
                    req = req.header("x-feature-name", f);
                }
                let r = req
                    .json(&body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("call {i} of {c}: {e}"));
                match r.status().as_u16() {
                    200 => ok += 1,
                    402 => denied += 1,
                    other => panic!("call {i} of {c}: status {other}"),
                }
                let _ = r.bytes().await;
            }
            (ok, denied)
        }));
    }
    let (mut ok, mut denied) = (0u64, 0u64);
    for t in tasks {
        let (o, d) = t.await.expect("task");
        ok += o;
        denied += d;
    }
    let m = stack.metrics().await;
    let taken = counter(&m, "llmwarden_lease_taken_total");
    let refused = counter(&m, "llmwarden_lease_refused_total");
    terminate(&mut stack);
    let s = stack.spend("crowd").await;
    println!(
        "150 calls: {ok} allowed ({taken} on spare holds), {denied} denied, {refused} refills refused; committed {} of cap {cap}",
        s.spend
    );
    assert!(taken > 0, "no call took a spare hold:\n{}", stack.log());
    assert!(refused > 0, "the pool was never refused near the limit");
    assert!(denied > 0, "no call was denied under a cap worth 50 calls");
    assert!(
        ok >= 40,
        "far fewer calls allowed ({ok}) than the cap admits"
    );
    assert!(
        s.spend <= cap,
        "overspend: committed {} > cap {cap}",
        s.spend
    );
    if let Some(f) = feature {
        assert_eq!(s.by_feature.get(f), Some(&s.spend), "{s:?}");
        assert_eq!(
            s.held_by_feature.get(f).copied().unwrap_or_default(),
            Nanos::ZERO
        );
    }
    assert_eq!(s.held, Nanos::ZERO, "{s:?}");
    assert_eq!(s.requests, ok, "{s:?}");
    assert_eq!(s.estimated_spend, Nanos::ZERO, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_unused_spare_holds_are_charged_at_their_amount() {
    const N: usize = 6;
    let spool = tempfile::tempdir().expect("tempdir");
    let mut stack = Stack::start(Opts {
        top_toml: format!(
            "lease_pool = 8\n{}",
            reliability_common::spool_toml("lease-a", spool.path())
        ),
        extra_toml: BUDGET.into(),
        ..Opts::default()
    })
    .await;
    let _ = calls(&stack, N).await;
    committed(&stack, N).await;
    // What the pool held when the process died: spare holds of this instance, one amount each.
    // A refill the last call started may still land: wait until the holds stay put.
    let deadline = Instant::now() + Duration::from_secs(10);
    let spares = loop {
        let a = stack.ledger.holds("acme", 100).await.expect("holds");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b = stack.ledger.holds("acme", 100).await.expect("holds");
        if a.len() == b.len() {
            break b;
        }
        assert!(Instant::now() < deadline, "the pool never settled: {b:?}");
    };
    let before = stack.spend("acme").await;
    assert!(!spares.is_empty(), "no spare hold to lose");
    // Two pools (the tenant's and feature triage's), each of at most lease_pool = 8.
    for feature in [None, Some("triage")] {
        let n = spares
            .iter()
            .filter(|h| h.feature.as_deref() == feature)
            .count();
        assert!(n <= 8, "{n} spare holds of {feature:?}: {spares:?}");
    }
    let held: i64 = spares.iter().map(|h| h.amount.0).sum();
    assert!(
        spares
            .iter()
            .all(|h| h.instance.as_deref() == Some("lease-a") && h.amount == spares[0].amount),
        "{spares:?}"
    );
    assert_eq!(before.held, Nanos(held));

    reliability_common::kill_9(&mut stack);
    reliability_common::restart(&mut stack);
    // The restart's recovery commits them as estimates: the calls' own spend is untouched, and
    // the over-charge is exactly the unused pool.
    let l = stack.ledger.clone();
    reliability_common::wait_until(15, "the spare holds committed", || {
        let l = l.clone();
        async move { l.holds("acme", 100).await.expect("holds").is_empty() }
    })
    .await;
    let after = stack.spend("acme").await;
    assert_eq!(
        (
            after.spend,
            after.estimated_spend,
            after.held,
            after.requests
        ),
        (
            Nanos(before.spend.0 + held),
            Nanos(before.estimated_spend.0 + held),
            Nanos::ZERO,
            (N + spares.len()) as u64
        ),
        "{after:?}"
    );
    assert_eq!(
        record_ids(&stack, "estimate").await,
        spares.iter().map(|h| h.id.clone()).collect::<BTreeSet<_>>(),
        "the trail names each spare hold charged"
    );
}
