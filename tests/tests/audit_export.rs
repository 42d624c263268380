//! Audit export (issue 17 items 2 and 5): a 10,000-call run (observer-path records of two tenants
//! plus enforcer calls) exported with `enforcer audit` equals the ledger to the nano-USD, in time
//! order; the CSV opens in Python's csv module with the documented columns; `GET /audit` pages
//! through the same records with its cursor; filters by tenant and path hold; retention trims.

mod enforcer_common;

use std::collections::BTreeSet;
use std::process::Command;

use chrono::Utc;
use enforcer_common::{ADMIN_TOKEN, KEY_OPS, Opts, Stack, http};
use futures::StreamExt as _;
use ledger::Nanos;
use ledger::store::{
    AUDIT_COLUMNS, AuditQuery, CallMeta, Ledger, LedgerConfig, Period, TokenCounts, UsageRecord,
};
use llmwarden_tests::process::workspace_bin;
use llmwarden_tests::python::venv_python;
use serde_json::Value;

const CALLS: usize = 10_000;

fn record(tenant: &str, i: usize) -> UsageRecord {
    UsageRecord {
        tenant: tenant.into(),
        event_id: format!("ev-{i}"),
        feature: i.is_multiple_of(3).then(|| "search".to_owned()),
        session: None,
        provider: "anthropic".into(),
        model: Some("claude-3-5-haiku-20241022".into()),
        cost: Nanos(1_000 + i64::try_from(i).expect("i") * 7),
        tokens: TokenCounts {
            input: 10 + i as u64 % 50,
            output: 5,
            ..TokenCounts::default()
        },
        bypass: true,
        estimated: i.is_multiple_of(11),
        at: Utc::now(),
        meta: CallMeta {
            // A comma and a quote: the CSV must quote them.
            comm: Some("worker, \"b\"".into()),
            pid: Some(7),
            ..CallMeta::default()
        },
    }
}

fn audit_cli(stack: &Stack, args: &[&str]) -> String {
    let now = Utc::now();
    let since = (now - chrono::Duration::hours(1)).to_rfc3339();
    let until = (now + chrono::Duration::minutes(1)).to_rfc3339();
    let out = Command::new(workspace_bin("enforcer"))
        .arg("--config")
        .arg(stack.config_path())
        .args(["audit", "--since", &since, "--until", &until])
        .args(args)
        .output()
        .expect("run enforcer audit");
    assert!(
        out.status.success(),
        "enforcer audit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

async fn month_spend(l: &Ledger, tenant: &str) -> i64 {
    l.tenant_spend(tenant, Period::Month, Utc::now())
        .await
        .expect("spend")
        .spend
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_10000_call_export_equals_the_ledger_and_csv_opens_in_python() {
    let stack = Stack::start(Opts::default()).await;
    // Enforcer calls.
    for _ in 0..5 {
        let r = http()
            .post(format!("{}/chat/completions", stack.base("openai")))
            .bearer_auth(KEY_OPS)
            .header("x-tenant-id", "exp-a")
            .json(
                &serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 20,
                "messages": [{"role": "user", "content": "hello"}]}),
            )
            .send()
            .await
            .expect("call");
        assert_eq!(r.status(), 200);
    }
    stack.settled("exp-a", 5).await;
    // Observer-path records, 16 at a time (bounded).
    let n = CALLS - 5;
    futures::stream::iter(0..n)
        .map(|i| {
            let l = stack.ledger.clone();
            async move {
                let tenant = if i.is_multiple_of(2) {
                    "exp-a"
                } else {
                    "exp-b"
                };
                l.record(&record(tenant, i)).await.expect("record");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let ledger_total =
        month_spend(&stack.ledger, "exp-a").await + month_spend(&stack.ledger, "exp-b").await;

    // JSONL: every call, time order, sum to the nano-USD.
    let jsonl = audit_cli(&stack, &["--format", "jsonl"]);
    let recs: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(recs.len(), CALLS);
    let sum: i64 = recs
        .iter()
        .map(|r| r["cost_nusd"].as_i64().expect("cost") - r["reversed_nusd"].as_i64().expect("rev"))
        .sum();
    assert_eq!(sum, ledger_total, "export vs ledger");
    let key = |r: &Value| {
        let id = r["id"].as_str().expect("id");
        let (ms, seq) = id.split_once('-').expect("stream id");
        (
            ms.parse::<u64>().expect("ms"),
            seq.parse::<u64>().expect("seq"),
            r["tenant"].as_str().expect("tenant").to_owned(),
        )
    };
    assert!(
        recs.windows(2).all(|w| key(&w[0]) < key(&w[1])),
        "time order"
    );

    // Filters.
    let only_b = audit_cli(&stack, &["--tenant", "exp-b", "--path", "observer"]);
    assert_eq!(only_b.lines().count(), n / 2);
    let enforcer_only = audit_cli(&stack, &["--path", "enforcer"]);
    assert_eq!(enforcer_only.lines().count(), 5);

    // CSV through Python's csv module.
    let csv = audit_cli(&stack, &["--format", "csv"]);
    let path = stack.dir.path().join("audit.csv");
    std::fs::write(&path, csv).expect("write csv");
    let script = r#"
import csv, sys
with open(sys.argv[1], newline='') as f:
    r = csv.DictReader(f)
    rows = list(r)
    print(','.join(r.fieldnames))
print(len(rows))
print(sum(int(x['cost_nusd']) - int(x['reversed_nusd']) for x in rows))
print(sum(1 for x in rows if x['comm'] == 'worker, "b"'))
"#;
    let out = Command::new(venv_python())
        .args(["-c", script])
        .arg(&path)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], AUDIT_COLUMNS.join(","), "documented columns");
    assert_eq!(lines[1], CALLS.to_string());
    assert_eq!(lines[2], ledger_total.to_string());
    assert_eq!(lines[3], n.to_string());

    // GET /audit, walked with its cursor: the same records in the same order.
    let now = Utc::now();
    let since = (now - chrono::Duration::hours(1)).timestamp_millis();
    let until = (now + chrono::Duration::minutes(1)).timestamp_millis();
    let mut cursor: Option<String> = None;
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages < 100, "paging does not end");
        let mut url = format!(
            "{}/audit?since={since}&until={until}&limit=997",
            stack.admin()
        );
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let r = http()
            .get(&url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("GET /audit");
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("json");
        for rec in v["records"].as_array().expect("records") {
            ids.push(key(rec));
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let want: Vec<_> = recs.iter().map(key).collect();
    assert_eq!(ids.len(), want.len());
    assert!(ids == want, "paged records differ from the export");
    let bad = http()
        .get(format!(
            "{}/audit?since=yesterday&until={until}",
            stack.admin()
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("GET /audit");
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn retention_trims_and_expires_the_streams() {
    let redis = llmwarden_tests::redis::RedisServer::start();
    let l = Ledger::connect_with(
        &redis.url(),
        LedgerConfig {
            audit_max_per_day: 100,
            audit_retention: std::time::Duration::from_secs(86_400),
            ..LedgerConfig::default()
        },
    )
    .await
    .expect("connect");
    for i in 0..1_000 {
        l.record(&record("trim", i)).await.expect("record");
    }
    let client = redis::Client::open(redis.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let key = format!("llmw:{{trim}}:audit:{}", Period::Day.id(Utc::now()));
    let len: usize = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut c)
        .await
        .expect("XLEN");
    // MAXLEN ~ keeps at least 100 and trims whole nodes (100 entries each by default).
    assert!((100..=300).contains(&len), "{len} records kept");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .expect("TTL");
    let day_end = Period::Day.reset_at(Utc::now());
    let want = (day_end - Utc::now()).num_seconds() + 86_400;
    assert!(
        (want - 5..=want + 5).contains(&ttl),
        "ttl {ttl}, want about {want}"
    );
    let kinds: BTreeSet<String> = {
        let mut r = l
            .audit_reader(AuditQuery {
                since: Utc::now() - chrono::Duration::hours(1),
                until: Utc::now() + chrono::Duration::minutes(1),
                tenant: Some("trim".into()),
                path: None,
            })
            .expect("reader");
        let mut k = BTreeSet::new();
        while let Some(rec) = r.next().await.expect("next") {
            k.insert(rec.kind);
        }
        k
    };
    assert_eq!(kinds, BTreeSet::from(["record".to_owned()]));
}
