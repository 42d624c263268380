//! The real observer with a malformed entry in `llmw:budgets` (issue 19): the enforcer refuses
//! calls (fail closed), while a call straight to the provider is still booked by the observer and
//! alerted against the budget entries that parse (its one budget cache keeps them).
//!
//! Needs root (the observer loads eBPF programs). Fails, never skips, when not root.

mod enforcer_common;

use std::process::Command;
use std::time::{Duration, Instant};

use enforcer_common::{KEY_OPS, Opts, Stack, UPSTREAM_KEY, http};
use ledger::Nanos;
use ledger::store::{Budget, Period, alerts_key};
use llmwarden_tests::observer::{Observer, require_root};

const TENANT: &str = "t-direct";
const BODY: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":40,"messages":[{"role":"user","content":"direct"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observed_spend_is_booked_and_alerted_while_a_budget_is_malformed() {
    require_root();
    let stack = Stack::start(Opts::default()).await;
    let limit = Nanos(1_000);
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
        .command(&["HSET", "llmw:budgets", "other||day", "1.5"]);
    let host = stack.mock.addr().to_string();
    let obs = Observer::start(&stack.redis.url(), &[(&host, "openai")], "", false);

    // The enforcer fails closed once it rereads the list.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let r = http()
            .post(format!("{}/chat/completions", stack.base("openai")))
            .bearer_auth(KEY_OPS)
            .header("x-tenant-id", "t-proxied")
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await
            .expect("enforcer call");
        let s = r.status().as_u16();
        if s != 200 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 503);

    // Straight to the provider with curl (OpenSSL): the observer books it.
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--fail", "--cacert"])
        .arg(stack.mock.ca_pem_path())
        .args(["-H", "content-type: application/json"])
        .args(["-H", &format!("x-tenant-id: {TENANT}")])
        .args(["-H", &format!("authorization: Bearer {UPSTREAM_KEY}")])
        .args(["-d", BODY])
        .arg(format!("{}/v1/chat/completions", stack.mock.https_url()))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let spend = loop {
        let s = stack.spend(TENANT).await;
        if s.requests >= 1 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(spend.requests, 1, "not booked: {spend:?}\n{}", obs.log());
    assert!(spend.spend > limit, "{spend:?}");
    assert_eq!(spend.bypass_spend, spend.spend);

    // One record past 100 % of the valid budget fires its three thresholds, limit and all.
    let client = redis::Client::open(stack.redis.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(alerts_key(TENANT))
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .expect("XRANGE");
    let got: Vec<(String, String)> = v
        .iter()
        .map(|(_, f)| {
            let get = |k: &str| {
                f.iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            (get("threshold_pct"), get("limit_nusd"))
        })
        .collect();
    let l = limit.0.to_string();
    assert_eq!(
        got,
        vec![
            ("50".to_owned(), l.clone()),
            ("80".to_owned(), l.clone()),
            ("100".to_owned(), l)
        ],
        "observer:\n{}",
        obs.log()
    );
    // The observer says why calls are refused elsewhere, once.
    let log = obs.log();
    assert_eq!(
        log.matches("a stored budget is malformed").count(),
        1,
        "{log}"
    );
}
