//! One budget cache per process (issues 19 and 20): the enforcer's caps and the scripts' alert
//! thresholds read the same in-memory copy of `llmw:budgets`, so an enforcer under load reads the
//! hash about once a second (it read it twice a second with two caches); a malformed entry still
//! refuses calls (fail closed) while spend the observer records is booked and alerted against
//! the entries that parse; a live budget edit reaches the alert thresholds.

mod enforcer_common;

use std::time::{Duration, Instant};

use chrono::Utc;
use enforcer_common::{KEY_OPS, Opts, Stack, http};
use ledger::Nanos;
use ledger::store::{
    Budget, CallMeta, Ledger, Period, RecordOutcome, TokenCounts, UsageRecord, alerts_key,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One chat call through the enforcer as `tenant`: status and JSON body.
async fn chat(stack: &Stack, tenant: &str) -> (u16, Value) {
    let r = http()
        .post(format!("{}/chat/completions", stack.base("openai")))
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", tenant)
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("call");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Spend the observer saw (no reservation).
fn observed(tenant: &str, id: &str, cost: i64) -> UsageRecord {
    UsageRecord {
        tenant: tenant.into(),
        event_id: id.into(),
        feature: None,
        session: None,
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        cost: Nanos(cost),
        tokens: TokenCounts::default(),
        bypass: true,
        estimated: false,
        at: Utc::now(),
        meta: CallMeta::default(),
    }
}

/// The tenant's alerts as (threshold %, limit), oldest first, straight from its stream.
async fn alerts(stack: &Stack, tenant: &str) -> Vec<(u64, i64)> {
    let client = redis::Client::open(stack.redis.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(alerts_key(tenant))
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .expect("XRANGE");
    v.into_iter()
        .map(|(_, f)| {
            let get = |k: &str| {
                f.iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            (
                get("threshold_pct").parse().expect("threshold"),
                get("limit_nusd").parse().expect("limit"),
            )
        })
        .collect()
}

/// Counts `HGETALL llmw:budgets` on the stack's Redis for `window` with MONITOR.
async fn budget_reads(stack: &Stack, window: Duration) -> usize {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", stack.redis.port()))
        .await
        .expect("connect monitor");
    s.write_all(b"*1\r\n$7\r\nMONITOR\r\n")
        .await
        .expect("MONITOR");
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = tokio::time::Instant::now() + window;
    while let Ok(Ok(n)) = tokio::time::timeout_at(end, s.read(&mut buf)).await {
        assert!(n > 0, "redis closed the MONITOR connection");
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen)
        .lines()
        .filter(|l| l.contains("\"HGETALL\" \"llmw:budgets\""))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_enforcer_under_load_reads_the_budgets_about_once_a_second() {
    let stack = Stack::start(Opts::default()).await;
    // Calls run the caps (reserve) and the alert thresholds (reserve, settle) the whole time.
    assert_eq!(chat(&stack, "cached").await.0, 200);
    let load = {
        let url = format!("{}/chat/completions", stack.base("openai"));
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(8);
            let mut n = 0u32;
            while Instant::now() < deadline && n < 2000 {
                let r = http()
                    .post(&url)
                    .bearer_auth(KEY_OPS)
                    .header("x-tenant-id", "cached")
                    .json(&json!({"model": "gpt-4o-mini", "max_tokens": 20,
                        "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .expect("call");
                assert_eq!(r.status().as_u16(), 200);
                n += 1;
            }
            n
        })
    };
    let window = Duration::from_secs(6);
    let reads = budget_reads(&stack, window).await;
    let calls = load.await.expect("load");
    eprintln!("{reads} HGETALL llmw:budgets in {window:?} during {calls} calls");
    assert!(calls >= 10, "only {calls} calls ran");
    // One refresher at one read a second: 6 (±1 for where the window falls). Two caches read 12.
    assert!(
        (5..=7).contains(&reads),
        "{reads} budget reads in {window:?}: expected about one a second"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_budget_refuses_calls_but_observed_spend_is_booked_and_alerted() {
    const TENANT: &str = "watched";
    let stack = Stack::start(Opts::default()).await;
    assert_eq!(chat(&stack, TENANT).await.0, 200);
    let limit = Nanos(1_000_000);
    stack
        .ledger
        .set_budget(&Budget {
            tenant: TENANT.into(),
            feature: None,
            period: Period::Month,
            limit,
        })
        .await
        .expect("set budget");
    let _ = stack
        .redis
        .command(&["HSET", "llmw:budgets", "other||month", "lots"]);

    // The enforcer refuses (fail closed) once its cache rereads the list.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let r = chat(&stack, TENANT).await;
        if r.0 != 200 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("budgets_invalid")),
        "{body}"
    );
    let before = stack.settled(TENANT, 1).await.spend;

    // A fresh observer-side ledger meets the broken list on its first read: its records are
    // booked exactly and cross the thresholds of the entry that parses; its own caps refuse.
    let observer = Ledger::connect(&stack.redis.url()).await.expect("connect");
    let first = limit.0 * 6 / 10 - before.0;
    assert!(first > 0, "the calls spent too much: {before}");
    assert_eq!(
        observer
            .record(&observed(TENANT, "seen-1", first))
            .await
            .expect("record"),
        RecordOutcome::Recorded
    );
    assert_eq!(stack.spend(TENANT).await.spend, Nanos(before.0 + first));
    assert_eq!(alerts(&stack, TENANT).await, vec![(50, limit.0)]);
    let caps = observer.budget_cache().caps(TENANT, None, None, None).await;
    assert!(
        caps.as_ref()
            .is_err_and(|e| e.to_string().contains("other||month")),
        "{caps:?}"
    );
    observer
        .record(&observed(TENANT, "seen-2", limit.0 / 4))
        .await
        .expect("record");
    assert_eq!(
        alerts(&stack, TENANT).await,
        vec![(50, limit.0), (80, limit.0)]
    );

    // A live edit while the list is still broken reaches the observer's alert thresholds within
    // about a second (no stale alert arguments): with the limit raised tenfold, spend just below
    // it fires nothing (the old limit would fire 100 %), just past it fires 100 % of the new one.
    let raised = Nanos(limit.0 * 10);
    stack
        .ledger
        .set_budget(&Budget {
            tenant: TENANT.into(),
            feature: None,
            period: Period::Month,
            limit: raised,
        })
        .await
        .expect("raise budget");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spend = stack.spend(TENANT).await.spend;
    observer
        .record(&observed(TENANT, "seen-3", raised.0 - spend.0 - 1))
        .await
        .expect("record");
    assert_eq!(stack.spend(TENANT).await.spend, Nanos(raised.0 - 1));
    assert_eq!(
        alerts(&stack, TENANT).await,
        vec![(50, limit.0), (80, limit.0)]
    );
    observer
        .record(&observed(TENANT, "seen-4", 2))
        .await
        .expect("record");
    assert_eq!(
        alerts(&stack, TENANT).await,
        vec![(50, limit.0), (80, limit.0), (100, raised.0)]
    );
    assert_eq!(chat(&stack, TENANT).await.0, 503, "still fail closed");

    // Fixed: calls are checked against the budget again (now spent: 402, not 503), and the
    // observer's caps resolve against the new list.
    let _ = stack
        .redis
        .command(&["HDEL", "llmw:budgets", "other||month"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = chat(&stack, TENANT).await;
    assert_eq!(status, 402, "{body}");
    let caps = observer
        .budget_cache()
        .caps(TENANT, None, None, None)
        .await
        .expect("caps");
    assert_eq!(caps.len(), 1);
    assert_eq!(caps[0].limit, raised);
}
