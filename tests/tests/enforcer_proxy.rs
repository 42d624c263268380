//! The enforcer between real HTTP clients and the mock provider: exact billing per API, include_usage
//! injection, auth and isolation, budget denials, loop detection and the admin API.

mod enforcer_common;

use std::time::Duration;

use enforcer_common::{
    ADMIN_TOKEN, KEY_ACME, KEY_OPS, Opts, Stack, UPSTREAM_KEY, assert_absent, http,
};
use ledger::Nanos;
use ledger::price::{Cost, PriceTable};
use ledger::usage::Usage;
use llmwarden_tests::mock::ServedCall;
use serde_json::{Value, json};

const PROMPT: &str = "purple-elephant-prompt-91 tell me about budgets";

fn price(model: &str, u: &Usage) -> Nanos {
    match PriceTable::builtin().cost(model, u) {
        Cost::Priced { nanos, .. } => nanos,
        Cost::Unpriced { model } => panic!("{model} has no built-in price"),
    }
}

struct Call {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn post(url: &str, key: &str, tenant: &str, extra: &[(&str, &str)], body: &Value) -> Call {
    let mut rb = http()
        .post(url)
        .bearer_auth(key)
        .header("x-tenant-id", tenant)
        .json(body);
    for (k, v) in extra {
        rb = rb.header(*k, *v);
    }
    let r = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r
        .text()
        .await
        .unwrap_or_else(|e| panic!("body of POST {url}: {e}"));
    Call {
        status,
        headers,
        body,
    }
}

async fn served(stack: &Stack, c: &Call) -> ServedCall {
    let id: u64 = c
        .headers
        .get("x-mock-call-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no x-mock-call-id in {:?} / {}", c.headers, c.body));
    stack
        .mock
        .ledger()
        .wait_call(id, Duration::from_secs(5))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bills_every_api_exactly() {
    let stack = Stack::start(Opts::default()).await;
    let oa = stack.base("openai");
    let cases: Vec<(&str, String, Value, &str, &str)> = vec![
        (
            "t-chat",
            format!("{oa}/chat/completions"),
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}),
            "input=100,cached=20,output=30",
            "gpt-4o-mini",
        ),
        (
            "t-chat-stream",
            format!("{oa}/chat/completions"),
            json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": PROMPT}]}),
            "input=120,cached=0,output=12",
            "gpt-4o-mini",
        ),
        (
            "t-responses",
            format!("{oa}/responses"),
            json!({"model": "gpt-4.1-mini", "input": PROMPT}),
            "input=64,cached=32,output=10,reasoning=4",
            "gpt-4.1-mini",
        ),
        (
            "t-embed",
            format!("{oa}/embeddings"),
            json!({"model": "text-embedding-3-small", "input": [PROMPT, "second"]}),
            "input=333",
            "text-embedding-3-small",
        ),
        (
            "t-claude",
            format!("{}/v1/messages", stack.base("anthropic")),
            json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": PROMPT}]}),
            "input=50,cached=10,cache_write_5m=100,cache_write_1h=200,output=40",
            "claude-sonnet-4-5",
        ),
        (
            "t-claude-stream",
            format!("{}/v1/messages", stack.base("anthropic")),
            json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": PROMPT}]}),
            "input=70,cached=5,cache_write_5m=11,cache_write_1h=13,output=16",
            "claude-sonnet-4-5",
        ),
        (
            "t-gemini",
            format!(
                "{}/v1beta/models/gemini-2.5-flash:generateContent",
                stack.base("gemini")
            ),
            json!({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}),
            "input=90,cached=30,output=25,reasoning=5",
            "gemini-2.5-flash",
        ),
        (
            "t-gemini-stream",
            format!(
                "{}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                stack.base("gemini")
            ),
            json!({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}),
            "input=80,output=14",
            "gemini-2.5-flash",
        ),
        (
            "t-gemini-array",
            format!(
                "{}/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                stack.base("gemini")
            ),
            json!({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}),
            "input=33,cached=11,output=21",
            "gemini-2.5-flash",
        ),
        (
            "t-completions",
            format!("{oa}/completions"),
            json!({"model": "gpt-4o-mini", "prompt": PROMPT, "max_tokens": 30}),
            "input=17,output=30",
            "gpt-4o-mini",
        ),
    ];
    for (tenant, url, body, usage, model) in cases {
        let c = post(&url, KEY_OPS, tenant, &[("x-mock-usage", usage)], &body).await;
        assert_eq!(c.status, 200, "{tenant}: {}", c.body);
        assert!(
            c.headers.contains_key("x-warden-request-id"),
            "{tenant}: no request id"
        );
        let call = served(&stack, &c).await;
        let expected = price(model, &call.usage);
        assert!(expected.0 > 0, "{tenant}: zero price");
        let s = stack.settled(tenant, 1).await;
        assert_eq!(
            s.spend, expected,
            "{tenant}: ledger {} vs price of mock usage {:?}",
            s.spend, call.usage
        );
        if !call.stream {
            let hdr = c
                .headers
                .get("x-warden-cost-usd")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            assert_eq!(
                hdr,
                enforcer_common::usd(expected),
                "{tenant}: x-warden-cost-usd"
            );
        }
    }
    // Hand-computed checks of two of them (USD per 1M tokens from ledger/prices.json).
    // gpt-4o-mini: 100 x 0.15 + 20 x 0.075 + 30 x 0.60 = 34.5 -> 34_500 nano-USD.
    assert_eq!(stack.spend("t-chat").await.spend, Nanos(34_500));
    // claude-sonnet-4-5: 50 x 3 + 10 x 0.30 + 100 x 3.75 + 200 x 6 + 40 x 15 = 2328 -> 2_328_000.
    assert_eq!(stack.spend("t-claude").await.spend, Nanos(2_328_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_usage_is_injected_invisibly_and_billed() {
    let stack = Stack::start(Opts::default()).await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    let req = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": PROMPT}]});
    let c = post(
        &url,
        KEY_OPS,
        "t-inject",
        &[("x-mock-usage", "input=40,output=9")],
        &req,
    )
    .await;
    assert_eq!(c.status, 200, "{}", c.body);
    assert!(
        c.body.contains("data: [DONE]"),
        "stream incomplete: {}",
        c.body
    );
    assert!(
        !c.body.contains("\"choices\":[]"),
        "the injected usage chunk reached the client:\n{}",
        c.body
    );
    assert!(
        !c.body.contains("\"usage\":{"),
        "usage reached a client that did not ask for it:\n{}",
        c.body
    );
    let call = served(&stack, &c).await;
    assert!(
        call.usage_reported,
        "the enforcer did not ask upstream for include_usage"
    );
    assert_eq!(
        stack.settled("t-inject", 1).await.spend,
        price("gpt-4o-mini", &call.usage)
    );
    assert_eq!(
        stack.spend("t-inject").await.estimated_spend,
        Nanos::ZERO,
        "billed from an estimate"
    );

    // A client that asked for usage gets the chunk untouched.
    let mut req = req;
    req["stream_options"] = json!({"include_usage": true});
    let c = post(
        &url,
        KEY_OPS,
        "t-inject2",
        &[("x-mock-usage", "input=40,output=9")],
        &req,
    )
    .await;
    assert!(
        c.body.contains("\"choices\":[]"),
        "the client's own usage chunk was removed:\n{}",
        c.body
    );
    let call = served(&stack, &c).await;
    assert_eq!(
        stack.settled("t-inject2", 1).await.spend,
        price("gpt-4o-mini", &call.usage)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_isolation() {
    let stack = Stack::start(Opts::default()).await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    let req = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]});
    let before = stack.mock.ledger().len();

    let r = http().post(&url).json(&req).send().await.expect("send");
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "missing_api_key", "{v}");

    let c = post(&url, "sk-wrong", "acme", &[], &req).await;
    assert_eq!(c.status, 401, "{}", c.body);
    let v: Value = serde_json::from_str(&c.body).expect("json");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    // Anthropic route: Anthropic's shape, key in x-api-key.
    let r = http()
        .post(format!("{}/v1/messages", stack.base("anthropic")))
        .header("x-api-key", "sk-wrong")
        .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");

    let c = post(&url, KEY_ACME, "gamma", &[], &req).await;
    assert_eq!(c.status, 403, "{}", c.body);
    assert_eq!(
        stack.mock.ledger().len(),
        before,
        "refused calls reached the upstream"
    );

    let c = post(
        &url,
        KEY_ACME,
        "beta",
        &[
            ("x-feature-name", "support-bot"),
            ("x-session-id", "sess-1"),
        ],
        &req,
    )
    .await;
    assert_eq!(c.status, 200, "{}", c.body);
    let call = served(&stack, &c).await;
    for h in ["x-tenant-id", "x-feature-name", "x-session-id", "x-api-key"] {
        assert!(!call.has_header(h), "{h} reached the upstream");
    }
    assert_eq!(
        call.header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    // The upstream's own authority as Host (built once per route), never the enforcer's.
    assert_eq!(
        call.header("host"),
        Some(stack.mock.addr().to_string().as_str())
    );
    for (name, v) in &call.headers {
        let v = v.to_str().unwrap_or("");
        assert!(
            !v.contains(KEY_ACME),
            "the caller's key reached the upstream in {name}"
        );
    }
    let s = stack.settled("beta", 1).await;
    assert_eq!(s.by_feature.get("support-bot").copied(), Some(s.spend));

    // Gemini with the key in ?key=: stripped from the query, real key in x-goog-api-key.
    let r = http()
        .post(format!(
            "{}/v1beta/models/gemini-2.5-flash:generateContent?key={KEY_ACME}",
            stack.base("gemini")
        ))
        .json(&json!({"contents": [{"parts": [{"text": PROMPT}]}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let call = stack.mock.ledger().last().expect("a call");
    assert!(
        !call.path_and_query.contains(KEY_ACME),
        "key went upstream in the query: {}",
        call.path_and_query
    );
    assert_eq!(call.header("x-goog-api-key"), Some(UPSTREAM_KEY));

    // Nothing secret or private in the log of the run.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = stack.log();
    assert!(log.contains("\"decision\""), "no request log lines:\n{log}");
    let p = stack.dir.path().join("enforcer.log");
    for (secret, what) in [
        (KEY_ACME, "proxy key"),
        (KEY_OPS, "proxy key"),
        (UPSTREAM_KEY, "upstream key"),
        ("purple-elephant", "prompt"),
    ] {
        assert_absent(&log, secret, what, &p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_deny_with_402_and_admin_edits_apply_live() {
    let extra = "[[budgets]]\ntenant = \"tiny\"\nperiod = \"month\"\nlimit_usd = 0.000001\n";
    let stack = Stack::start(Opts {
        extra_toml: extra.into(),
        ..Opts::default()
    })
    .await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    let req = json!({"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": PROMPT}]});
    let before = stack.mock.ledger().len();
    let c = post(&url, KEY_OPS, "tiny", &[], &req).await;
    assert_eq!(c.status, 402, "{}", c.body);
    let v: Value = serde_json::from_str(&c.body).expect("json");
    assert_eq!(v["error"]["code"], "budget_exceeded");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("tenant tiny") && msg.contains("month") && msg.contains("PUT /budgets"),
        "{msg}"
    );
    assert_eq!(c.headers["x-warden-budget-limit"], "0.000001000");
    assert!(
        c.headers.contains_key("x-warden-budget-remaining")
            && c.headers.contains_key("x-warden-budget-reset")
    );
    assert_eq!(
        stack.mock.ledger().len(),
        before,
        "a denied call reached the upstream"
    );

    // Admin API: token required; PUT raises the limit live.
    let admin = stack.admin();
    assert_eq!(
        http()
            .get(format!("{admin}/budgets"))
            .send()
            .await
            .expect("get")
            .status(),
        401
    );
    assert_eq!(
        http()
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .expect("get")
            .status(),
        200
    );
    assert_eq!(
        http()
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .expect("get")
            .status(),
        200
    );
    let r = http()
        .put(format!("{admin}/budgets"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"tenant": "tiny", "period": "month", "limit_usd": 1.0}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let c = post(&url, KEY_OPS, "tiny", &[], &req).await;
    assert_eq!(
        c.status, 200,
        "PUT /budgets did not take effect: {}",
        c.body
    );
    let v: Value = http()
        .get(format!("{admin}/budgets"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert!(
        v["budgets"].as_array().is_some_and(|b| b
            .iter()
            .any(|b| b["tenant"] == "tiny" && b["limit_nusd"] == 1_000_000_000)),
        "{v}"
    );
    stack.settled("tiny", 1).await;
    let v: Value = http()
        .get(format!("{admin}/spend?tenant=tiny&period=month"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(v["tenants"][0]["tenant"], "tiny", "{v}");
    assert!(
        v["tenants"][0]["spend_nusd"].as_i64().unwrap_or(0) > 0,
        "{v}"
    );
    let m = http()
        .get(format!("{admin}/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    for name in [
        "gen_ai_client_token_usage",
        "llmwarden_denials_total{reason=\"budget_exceeded\"}",
        "llmwarden_cost_nanousd_total",
    ] {
        assert!(m.contains(name), "metrics lack {name}:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_are_stopped_with_429() {
    let extra =
        "[session]\nmax_identical_requests = 2\nmax_requests_per_minute = 5\nlimit_usd = 0.00005\n";
    let stack = Stack::start(Opts {
        extra_toml: extra.into(),
        ..Opts::default()
    })
    .await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    let req = json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": PROMPT}]});
    for i in 0..2 {
        let c = post(&url, KEY_OPS, "loopy", &[("x-session-id", "agent-1")], &req).await;
        assert_eq!(c.status, 200, "call {i}: {}", c.body);
    }
    let c = post(&url, KEY_OPS, "loopy", &[("x-session-id", "agent-1")], &req).await;
    assert_eq!(c.status, 429, "{}", c.body);
    let v: Value = serde_json::from_str(&c.body).expect("json");
    assert_eq!(v["error"]["code"], "loop_detected");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("max_identical_requests"),
        "{v}"
    );
    // Another session is unaffected; the per-minute limit trips after 5. The counter is per UTC
    // minute: start well inside one so the six calls cannot straddle a boundary.
    while chrono::Utc::now().timestamp() % 60 > 50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut statuses = Vec::new();
    for i in 0..6 {
        let mut r = req.clone();
        r["messages"][0]["content"] = json!(format!("question {i}"));
        statuses.push(
            post(&url, KEY_OPS, "loopy", &[("x-session-id", "agent-2")], &r)
                .await
                .status,
        );
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429]);

    // The cumulative session cap: a call whose worst case exceeds it is refused with 402.
    let mut big = req.clone();
    big["max_tokens"] = json!(1000);
    let c = post(&url, KEY_OPS, "loopy", &[("x-session-id", "agent-3")], &big).await;
    assert_eq!(c.status, 402, "{}", c.body);
    assert!(
        c.body
            .contains("session budget exceeded for session agent-3"),
        "{}",
        c.body
    );
    assert_eq!(c.headers["x-warden-budget-reset"], "never");
}
