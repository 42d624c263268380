//! Escape routes around the hard budget, each closed and tested end to end (enforcer binary, real
//! redis-server, the mock provider over TLS): calls that settle without usage, reservations below
//! what the provider can bill, calls that fail or are dropped after the provider has them, keys
//! that mint tenants or pick features, and a budget list that fails open.

mod enforcer_common;

use std::time::{Duration, Instant};

use enforcer_common::{ADMIN_TOKEN, KEY_BOUND, KEY_OPS, KEY_WILD, Opts, Stack, enforcer_bin, http};
use ledger::Nanos;
use ledger::price::PriceTable;
use ledger::store::TenantSpend;
use serde_json::{Value, json};

struct Reply {
    status: u16,
    body: Value,
}

async fn post(url: &str, key: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    let mut rb = http().post(url).bearer_auth(key).json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    Reply {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

fn code(r: &Reply) -> &str {
    r.body["error"]["code"]
        .as_str()
        .or_else(|| r.body["error"]["details"][0]["reason"].as_str())
        .unwrap_or("")
}

/// What the mock billed for every call it served, at the built-in prices.
fn mock_billed(stack: &Stack) -> Nanos {
    let t = PriceTable::builtin();
    Nanos(
        stack
            .mock
            .ledger()
            .calls()
            .iter()
            .map(|c| {
                t.cost(&c.response_model, &c.usage)
                    .nanos()
                    .map_or(0, |n| n.0)
            })
            .sum(),
    )
}

async fn settled(stack: &Stack, tenant: &str, requests: u64) -> TenantSpend {
    stack.settled(tenant, requests).await
}

async fn put_budget(stack: &Stack, tenant: &str, usd: f64) {
    let r = http()
        .put(format!("{}/budgets", stack.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"tenant": tenant, "period": "month", "limit_usd": usd}))
        .send()
        .await
        .expect("PUT /budgets");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

fn chat(extra: &Value) -> Value {
    let mut v = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "how much is left?"}]});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

/// A 200 without a usage record settles at the reservation, never at the input estimate alone;
/// parameters that hide the usage are stripped or refused; background responses are refused by
/// default and billed at their reservation when allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_usage_never_settle_below_what_was_billed() {
    let stack = Stack::start(Opts::default()).await;
    let chat_url = format!("{}/chat/completions", stack.base("openai"));
    let r = post(
        &chat_url,
        KEY_OPS,
        &[("x-tenant-id", "t-nousage"), ("x-mock-fault", "no-usage")],
        &chat(&json!({"max_tokens": 50})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        r.body["usage"].is_null(),
        "the mock hid the usage: {:?}",
        r.body
    );
    let s = settled(&stack, "t-nousage", 1).await;
    let billed = mock_billed(&stack);
    assert!(
        s.spend >= billed && s.estimated_spend == s.spend,
        "settled {:?} (estimated {:?}) for a call the provider billed {billed:?}",
        s.spend,
        s.estimated_spend
    );

    // Gemini: a field mask that leaves usageMetadata out is stripped, so the call is exact.
    let g = format!(
        "{}/v1beta/models/gemini-2.5-flash:generateContent?fields=candidates",
        stack.base("gemini")
    );
    let body = json!({"contents": [{"parts": [{"text": "hi"}]}]});
    let r = post(
        &g,
        KEY_OPS,
        &[
            ("x-tenant-id", "t-mask"),
            ("x-goog-fieldmask", "candidates"),
        ],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.body.get("usageMetadata").is_some(), "{:?}", r.body);
    let served = stack.mock.ledger().calls();
    let last = served.last().expect("served");
    assert!(
        !last.path_and_query.contains("fields") && !last.has_header("x-goog-fieldmask"),
        "the mask reached the provider: {} {:?}",
        last.path_and_query,
        last.headers
    );
    let s = settled(&stack, "t-mask", 1).await;
    assert_eq!(s.estimated_spend, Nanos::ZERO, "{s:?}");
    // A protobuf response cannot be metered: refused before anything is held or sent.
    let before = stack.mock.ledger().len();
    let proto = g.replace("fields=candidates", "alt=proto");
    let r = post(&proto, KEY_OPS, &[("x-tenant-id", "t-mask")], &body).await;
    assert_eq!(
        (r.status, code(&r)),
        (400, "usage_suppressed"),
        "{:?}",
        r.body
    );
    assert_eq!(stack.mock.ledger().len(), before);

    // Background responses: refused by default.
    let resp_url = format!("{}/responses", stack.base("openai"));
    let bg = json!({"model": "gpt-4o-mini", "input": "summarise", "background": true, "max_output_tokens": 200});
    let r = post(&resp_url, KEY_OPS, &[("x-tenant-id", "t-bg")], &bg).await;
    assert_eq!(
        (r.status, code(&r)),
        (400, "usage_suppressed"),
        "{:?}",
        r.body
    );
    drop(stack);

    // Allowed with background_responses = "reserve": billed at the reservation.
    let stack = Stack::start(Opts {
        top_toml: "background_responses = \"reserve\"".into(),
        ..Opts::default()
    })
    .await;
    let resp_url = format!("{}/responses", stack.base("openai"));
    let r = post(&resp_url, KEY_OPS, &[("x-tenant-id", "t-bg")], &bg).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["status"], "queued");
    let s = settled(&stack, "t-bg", 1).await;
    assert!(
        s.spend >= mock_billed(&stack) && s.estimated_spend == s.spend,
        "{s:?}"
    );
}

/// The reservation is a true upper bound: choices without a limit, the model in the path,
/// context the enforcer cannot see. A budget between the old and the new worst case tells them
/// apart; a settle above its reservation is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_cover_what_the_provider_can_bill() {
    let stack = Stack::start(Opts::default()).await;
    let chat_url = format!("{}/chat/completions", stack.base("openai"));
    // gpt-4o-mini reserves 16,384 output tokens per choice at $0.60/M = ~$0.0098.
    put_budget(&stack, "t-n", 0.02).await;
    let one = post(
        &chat_url,
        KEY_OPS,
        &[("x-tenant-id", "t-n")],
        &chat(&json!({})),
    )
    .await;
    assert_eq!(one.status, 200, "{:?}", one.body);
    let four = post(
        &chat_url,
        KEY_OPS,
        &[("x-tenant-id", "t-n")],
        &chat(&json!({"n": 4})),
    )
    .await;
    assert_eq!(
        (four.status, code(&four)),
        (402, "budget_exceeded"),
        "n = 4 without max_tokens must reserve four choices: {:?}",
        four.body
    );

    // The path's model is the one billed: gemini-2.5-pro ($10/M output) named in the path with
    // a cheap model in the body reserves pro (65,535 x $10/M = $0.66 > $0.30).
    put_budget(&stack, "t-path", 0.30).await;
    let base = stack.base("gemini");
    let flash = format!("{base}/v1beta/models/gemini-2.5-flash:generateContent");
    let pro = format!("{base}/v1beta/models/gemini-2.5-pro:generateContent");
    let body = json!({"model": "gemini-2.5-flash", "contents": [{"parts": [{"text": "hi"}]}]});
    let r = post(&flash, KEY_OPS, &[("x-tenant-id", "t-path")], &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = post(&pro, KEY_OPS, &[("x-tenant-id", "t-path")], &body).await;
    assert_eq!(
        (r.status, code(&r)),
        (402, "budget_exceeded"),
        "{:?}",
        r.body
    );

    // Context the enforcer cannot see reserves the model's context window (128k x $0.15/M).
    put_budget(&stack, "t-ctx", 0.01).await;
    let resp_url = format!("{}/responses", stack.base("openai"));
    let plain = json!({"model": "gpt-4o-mini", "input": "and then?", "max_output_tokens": 10});
    let r = post(&resp_url, KEY_OPS, &[("x-tenant-id", "t-ctx")], &plain).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mut chained = plain.clone();
    chained["previous_response_id"] = json!("resp_earlier");
    let r = post(&resp_url, KEY_OPS, &[("x-tenant-id", "t-ctx")], &chained).await;
    assert_eq!(
        (r.status, code(&r)),
        (402, "budget_exceeded"),
        "{:?}",
        r.body
    );

    // A provider that bills more than the request allowed: settled in full and counted.
    let r = post(
        &chat_url,
        KEY_OPS,
        &[("x-tenant-id", "t-over"), ("x-mock-usage", "output=5000")],
        &chat(&json!({"max_tokens": 10})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let s = settled(&stack, "t-over", 1).await;
    assert!(s.output_tokens >= 5000, "{s:?}");
    let metrics = http()
        .get(format!("{}/metrics", stack.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let over: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("llmwarden_settle_over_reservation_nusd_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(over > 0, "over-reservation not counted:\n{metrics}");
    assert!(stack.log().contains("settle above its reservation"));
}

/// Once the provider may have a request, every failure or drop settles an estimate within a
/// second; only a request that never left is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_dropped_calls_settle_once_the_provider_has_them() {
    let stack = Stack::start(Opts {
        top_toml: "timeouts.first_byte_ms = 1500".into(),
        extra_toml: "[providers.dead]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\napi_key_env = \"TEST_MOCK_KEY\"\n".into(),
        ..Opts::default()
    })
    .await;
    let chat_url = format!("{}/chat/completions", stack.base("openai"));
    let body = chat(&json!({"max_tokens": 100}));
    // A first call loads the tokenizer (slow in a debug build) before the timed ones.
    let warm = post(&chat_url, KEY_OPS, &[("x-tenant-id", "t-warm")], &body).await;
    assert_eq!(warm.status, 200, "{:?}", warm.body);

    // The client gives up (an SDK timeout) while the provider works on the call.
    let gone = http()
        .post(&chat_url)
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", "t-drop")
        .header("x-mock-latency-ms", "1000")
        .timeout(Duration::from_millis(300))
        .json(&body)
        .send()
        .await;
    assert!(gone.is_err(), "the client should have timed out");
    let dropped_at = Instant::now();
    let s = settled(&stack, "t-drop", 1).await;
    assert!(
        dropped_at.elapsed() < Duration::from_secs(3),
        "the hold of a dropped call waited for its ttl"
    );
    assert!(
        s.spend > Nanos::ZERO && s.estimated_spend == s.spend,
        "{s:?}"
    );

    // The response head never comes (first_byte_ms): the provider had the request.
    let r = post(
        &chat_url,
        KEY_OPS,
        &[
            ("x-tenant-id", "t-timeout"),
            ("x-mock-fault", "slow-first-byte=3000"),
        ],
        &body,
    )
    .await;
    assert_eq!(
        (r.status, code(&r)),
        (504, "upstream_timeout"),
        "{:?}",
        r.body
    );
    let s = settled(&stack, "t-timeout", 1).await;
    assert!(
        s.spend > Nanos::ZERO && s.estimated_spend == s.spend,
        "{s:?}"
    );

    // Nothing listens at the provider: the request never left, the hold is released.
    let dead = format!("{}/chat/completions", stack.base("dead"));
    let r = post(&dead, KEY_OPS, &[("x-tenant-id", "t-dead")], &body).await;
    assert_eq!(
        (r.status, code(&r)),
        (502, "upstream_unreachable"),
        "{:?}",
        r.body
    );
    let s = stack.spend("t-dead").await;
    assert_eq!(
        (s.spend, s.held, s.requests),
        (Nanos::ZERO, Nanos::ZERO, 0),
        "{s:?}"
    );

    // An error status from the provider bills nothing.
    let r = post(
        &chat_url,
        KEY_OPS,
        &[("x-tenant-id", "t-500"), ("x-mock-fault", "status=500")],
        &body,
    )
    .await;
    assert_eq!(r.status, 500);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = stack.spend("t-500").await;
    assert_eq!((s.spend, s.held), (Nanos::ZERO, Nanos::ZERO), "{s:?}");
    assert!(
        !stack.log().contains("how much is left"),
        "prompts never reach the log"
    );
}

/// A key bound to features bills its first feature by default and refuses others; a wildcard
/// key cannot mint tenants with fresh default budgets unless allowed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cannot_pick_features_or_mint_tenants() {
    let extra = "[[budgets]]\ntenant = \"*\"\nperiod = \"month\"\nlimit_usd = 5.0\n";
    let stack = Stack::start(Opts {
        extra_toml: extra.into(),
        ..Opts::default()
    })
    .await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    let body = chat(&json!({"max_tokens": 20}));
    let r = post(&url, KEY_BOUND, &[], &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = post(&url, KEY_BOUND, &[("x-feature-name", "triage")], &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = post(&url, KEY_BOUND, &[("x-feature-name", "billing-app")], &body).await;
    assert_eq!(
        (r.status, code(&r)),
        (403, "feature_forbidden"),
        "{:?}",
        r.body
    );
    let s = settled(&stack, "acme", 2).await;
    assert!(
        s.by_feature.contains_key("support-bot") && s.by_feature.contains_key("triage"),
        "{s:?}"
    );
    assert!(!s.by_feature.contains_key("billing-app"));

    // A wildcard key without mint_tenants: only tenants with a budget of their own.
    let r = post(&url, KEY_WILD, &[("x-tenant-id", "brand-new-1")], &body).await;
    assert_eq!(
        (r.status, code(&r)),
        (403, "tenant_not_provisioned"),
        "{:?}",
        r.body
    );
    put_budget(&stack, "brand-new-1", 1.0).await;
    let r = post(&url, KEY_WILD, &[("x-tenant-id", "brand-new-1")], &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The ops key may mint (mint_tenants = true): each new tenant gets the "*" default budget.
    let r = post(&url, KEY_OPS, &[("x-tenant-id", "brand-new-2")], &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// A malformed entry in the stored budgets refuses every call (503) instead of admitting calls
/// with no caps, at start and while running; `enforcer check-budgets` names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_budget_list_fails_closed() {
    let stack = Stack::start(Opts::default()).await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    let body = chat(&json!({"max_tokens": 20}));
    let r = post(&url, KEY_OPS, &[("x-tenant-id", "t-ok")], &body).await;
    assert_eq!(r.status, 200);
    let _ = stack
        .redis
        .command(&["HSET", "llmw:budgets", "t-ok||month", "lots"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = post(&url, KEY_OPS, &[("x-tenant-id", "t-ok")], &body).await;
        if r.status != 200 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (r.status, code(&r)),
        (503, "budgets_invalid"),
        "{:?}",
        r.body
    );
    let msg = r.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("t-ok||month") && msg.contains("check-budgets"),
        "{msg}"
    );

    // The check command and endpoint name the entry.
    let out = std::process::Command::new(enforcer_bin())
        .args(["check-budgets", "--config"])
        .arg(stack.config_path())
        .output()
        .expect("check-budgets");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("t-ok||month"),
        "{text}"
    );
    let v: Value = http()
        .get(format!("{}/budgets/check", stack.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("check")
        .json()
        .await
        .expect("json");
    assert_eq!(v["valid"], false, "{v}");

    // A second enforcer that starts while the bad entry is there refuses its very first call
    // (its cache was never loaded: it reads the list before deciding, never an empty one).
    let port = llmwarden_tests::process::free_port();
    let cfg = std::fs::read_to_string(stack.config_path())
        .expect("config")
        .replace(
            &format!("127.0.0.1:{}", stack.port),
            &format!("127.0.0.1:{port}"),
        )
        .replace(
            &format!("admin_listen = \"127.0.0.1:{}\"", stack.admin_port),
            "admin_listen = \"off\"",
        )
        .replace("spool_dir = \"", "instance_id = \"second\"\nspool_dir = \"")
        .replace("/spool\"", "/spool-second\"");
    let cfg_path = stack.dir.path().join("second.toml");
    std::fs::write(&cfg_path, cfg).expect("write");
    let mut cmd = std::process::Command::new(enforcer_bin());
    cmd.arg("--config")
        .arg(&cfg_path)
        .env("TEST_MOCK_KEY", enforcer_common::UPSTREAM_KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _second = llmwarden_tests::process::ChildGuard::spawn("enforcer (second)", &mut cmd);
    llmwarden_tests::process::wait_for_port(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(15),
    );
    let url2 = format!("http://127.0.0.1:{port}/proxy/openai/chat/completions");
    let r = post(&url2, KEY_OPS, &[("x-tenant-id", "t-new")], &body).await;
    assert_eq!(
        (r.status, code(&r)),
        (503, "budgets_invalid"),
        "{:?}",
        r.body
    );

    // Fixed: calls pass again on both.
    let _ = stack
        .redis
        .command(&["HDEL", "llmw:budgets", "t-ok||month"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = post(&url, KEY_OPS, &[("x-tenant-id", "t-ok")], &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = post(&url2, KEY_OPS, &[("x-tenant-id", "t-new")], &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

async fn get(url: &str, key: &str, tenant: Option<&str>) -> Reply {
    let mut rb = http().get(url).bearer_auth(key);
    if let Some(t) = tenant {
        rb = rb.header("x-tenant-id", t);
    }
    let r = rb.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    Reply {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// Reaching the mock (which serves only POST) shows as its own 404 "no API at GET ...".
fn reached_provider(r: &Reply) -> bool {
    r.status == 404 && r.body.to_string().contains("mock provider: no API at GET")
}

/// The shared provider key never reads another tenant's stored objects: by default only model
/// listings and the caller's own stored responses and completions are reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_objects_are_read_only_by_their_tenant() {
    let open_key = "sk-warden-files-3e8d21aa";
    let extra = format!(
        "[[keys]]\nsha256 = \"{}\"\ntenant = \"ops2\"\nopen_paths = [\"GET /files*\"]\n",
        enforcer_common::hash_key(open_key)
    );
    let stack = Stack::start(Opts {
        extra_toml: extra,
        ..Opts::default()
    })
    .await;
    let base = stack.base("openai");
    let chat_url = format!("{base}/chat/completions");
    let r = post(
        &chat_url,
        enforcer_common::KEY_ACME,
        &[],
        &chat(&json!({"store": true, "max_tokens": 10})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = r.body["id"].as_str().expect("a completion id").to_owned();
    let unstored = post(
        &chat_url,
        enforcer_common::KEY_ACME,
        &[],
        &chat(&json!({"max_tokens": 10})),
    )
    .await;
    let unstored_id = unstored.body["id"].as_str().expect("id").to_owned();
    settled(&stack, "acme", 2).await;

    let own = format!("{base}/chat/completions/{id}");
    let r = get(&own, enforcer_common::KEY_ACME, None).await;
    assert!(
        reached_provider(&r),
        "the creator's read was not forwarded: {:?}",
        r.body
    );
    // The same key billing another tenant, and another key: refused.
    let r = get(&own, enforcer_common::KEY_ACME, Some("beta")).await;
    assert_eq!(
        (r.status, code(&r)),
        (403, "object_forbidden"),
        "{:?}",
        r.body
    );
    let r = get(&own, KEY_OPS, None).await;
    assert_eq!(
        (r.status, code(&r)),
        (403, "object_forbidden"),
        "{:?}",
        r.body
    );
    // A completion that was not stored was never remembered.
    let r = get(
        &format!("{base}/chat/completions/{unstored_id}"),
        enforcer_common::KEY_ACME,
        None,
    )
    .await;
    assert_eq!(
        (r.status, code(&r)),
        (403, "object_forbidden"),
        "{:?}",
        r.body
    );
    // Listings and other collections: refused; model listings: forwarded.
    for path in [
        "/chat/completions",
        "/files",
        "/files/file-1/content",
        "/batches",
    ] {
        let r = get(&format!("{base}{path}"), KEY_OPS, None).await;
        assert_eq!(
            (r.status, code(&r)),
            (403, "endpoint_forbidden"),
            "{path}: {:?}",
            r.body
        );
    }
    let r = get(&format!("{base}/models"), KEY_OPS, None).await;
    assert!(reached_provider(&r), "{:?}", r.body);
    // A key whose open_paths name a collection reaches it.
    let r = get(&format!("{base}/files"), open_key, None).await;
    assert!(reached_provider(&r), "{:?}", r.body);
    let r = http()
        .delete(format!("{base}/files/file-1"))
        .bearer_auth(open_key)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 403);
}
