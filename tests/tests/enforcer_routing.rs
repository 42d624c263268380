//! Routing across upstreams of one provider: weights split first attempts exactly, and a
//! connect error, 429 or 5xx before any response byte moves the call to the next route with its
//! one reservation, so only the upstream that answered is billed.

mod enforcer_common;

use enforcer_common::{KEY_OPS, Opts, Stack, UPSTREAM_KEY, http};
use ledger::Nanos;
use ledger::price::PriceTable;
use llmwarden_tests::mock::{Fault, MockConfig, MockProvider};
use serde_json::{Value, json};

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 20, "stream": stream,
           "messages": [{"role": "user", "content": "hello there"}]})
}

async fn call(stack: &Stack, route: &str, tenant: &str, stream: bool) -> (u16, String) {
    let r = http()
        .post(format!("{}/chat/completions", stack.base(route)))
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", tenant)
        .json(&chat(stream))
        .send()
        .await
        .expect("POST");
    let st = r.status().as_u16();
    (st, r.text().await.unwrap_or_default())
}

/// (calls answered 200, nano-USD) a mock billed, at the built-in prices.
fn billed(m: &MockProvider) -> (usize, Nanos) {
    let t = PriceTable::builtin();
    let ok: Vec<_> = m
        .ledger()
        .calls()
        .into_iter()
        .filter(|c| c.status == 200)
        .collect();
    let cost = ok
        .iter()
        .map(|c| {
            t.cost(&c.response_model, &c.usage)
                .nanos()
                .expect("priced")
                .0
        })
        .sum();
    (ok.len(), Nanos(cost))
}

fn metric(text: &str, needle: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mock_cfg(fault: Option<Fault>) -> MockConfig {
    MockConfig {
        require_key: Some(UPSTREAM_KEY.to_owned()),
        fault,
        ..MockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_bills_only_the_upstream_that_answered_and_weights_split_exactly() {
    let failing = MockProvider::start(mock_cfg(Some(Fault::Status(503)))).await;
    let limited = MockProvider::start(mock_cfg(Some(Fault::Status(429)))).await;
    let second = MockProvider::start(mock_cfg(None)).await;
    let closed = llmwarden_tests::process::free_port();
    let route = |name: &str, url: String, weight: u32, failover: &str| {
        format!(
            "\n[providers.{name}]\nkind = \"openai\"\nbase_url = \"{url}/v1\"\napi_key_env = \"TEST_MOCK_KEY\"\nweight = {weight}\nfailover = [{failover}]\n"
        )
    };
    let backup = |name: &str, weight: u32| {
        format!(
            "\n[providers.{name}]\nkind = \"openai\"\nbase_url = \"@MOCK_HTTPS@/v1\"\nca_file = \"@MOCK_CA@\"\napi_key_env = \"TEST_MOCK_KEY\"\nweight = {weight}\n"
        )
    };
    let mut extra = String::new();
    // The stack's own mock (TLS) as a failover-only route, and as a weight-1 route.
    extra.push_str(&backup("backup", 0));
    extra.push_str(&backup("backup1", 1));
    extra.push_str(&route("primary", failing.http_url(), 1, "\"backup\""));
    extra.push_str(&route("busy", limited.http_url(), 1, "\"backup\""));
    extra.push_str(&route(
        "down",
        format!("http://127.0.0.1:{closed}"),
        1,
        "\"backup\"",
    ));
    extra.push_str(&route("allbad", failing.http_url(), 1, "\"busy\""));
    extra.push_str(&route("split", second.http_url(), 3, "\"backup1\""));
    let stack = Stack::start(Opts {
        extra_toml: extra,
        ..Opts::default()
    })
    .await;

    // A 503, a 429 and a refused connection each move the call to the backup: the client gets
    // the backup's answer; the tenant is billed what the backup billed, once per call.
    for (route, tenant) in [
        ("primary", "fo-503"),
        ("busy", "fo-429"),
        ("down", "fo-connect"),
    ] {
        for stream in [false, true] {
            let (st, body) = call(&stack, route, tenant, stream).await;
            assert_eq!(st, 200, "{route}: {body}");
        }
    }
    let s503 = stack.settled("fo-503", 2).await;
    let s429 = stack.settled("fo-429", 2).await;
    let sconn = stack.settled("fo-connect", 2).await;
    assert_eq!(
        (s503.requests, s429.requests, sconn.requests),
        (2, 2, 2),
        "one reservation per call"
    );
    let (backup_calls, backup_cost) = billed(&stack.mock);
    assert_eq!(backup_calls, 6, "the backup answered every call");
    assert_eq!(
        s503.spend.0 + s429.spend.0 + sconn.spend.0,
        backup_cost.0,
        "billed exactly what the upstream that answered billed"
    );
    assert_eq!(billed(&failing).1, Nanos::ZERO);
    assert_eq!(billed(&limited).1, Nanos::ZERO);
    let m = stack.metrics().await;
    for (from, reason) in [("primary", "503"), ("busy", "429"), ("down", "connect")] {
        let needle = format!(
            "llmwarden_upstream_failovers_total{{from=\"{from}\",to=\"backup\",reason=\"{reason}\"}}"
        );
        assert_eq!(metric(&m, &needle), 2, "{needle}\n{m}");
    }
    let log = stack.log();
    assert!(
        log.contains("\"upstream\":\"backup\"") && log.contains("\"attempts\":2"),
        "the call log names the upstream"
    );

    // Every route fails: the client gets the last provider error as is; nothing is billed.
    let before = stack.spend("fo-allbad").await;
    let (st, body) = call(&stack, "allbad", "fo-allbad", false).await;
    assert_eq!(st, 429, "{body}");
    let after = stack.settled("fo-allbad", 0).await;
    assert_eq!((after.spend, after.held), (before.spend, Nanos::ZERO));

    // Weights 3 and 1: 40 calls, exactly 30 and 10 first attempts, each billed where it ran.
    let backup_before = billed(&stack.mock);
    for _ in 0..40 {
        let (st, body) = call(&stack, "split", "w-split", false).await;
        assert_eq!(st, 200, "{body}");
    }
    let split = stack.settled("w-split", 40).await;
    let (n2, c2) = billed(&second);
    let (nb, cb) = billed(&stack.mock);
    assert_eq!((n2, nb - backup_before.0), (30, 10));
    assert_eq!(split.spend.0, c2.0 + cb.0 - backup_before.1.0);
}

/// The official SDKs, base URL changed only: openai with stream and non-stream, anthropic.
const PY_DOWNGRADE: &str = r#"
import json, sys, openai, anthropic
base, key = sys.argv[1], sys.argv[2]
o = openai.OpenAI(base_url=base + "/proxy/openai", api_key=key, max_retries=0,
                  default_headers={"X-Tenant-ID": "dg-tenant"})
out = {}
r = o.chat.completions.with_raw_response.create(
    model="gpt-4o", max_tokens=1000, messages=[{"role": "user", "content": "hello there"}])
c = r.parse()
out["openai"] = {"model": c.model, "text": c.choices[0].message.content,
                 "from": r.headers.get("x-warden-routed-from"), "to": r.headers.get("x-warden-routed-to")}
s = o.chat.completions.create(model="gpt-4o", max_tokens=1000, stream=True,
                              messages=[{"role": "user", "content": "hello there"}])
models, text = set(), ""
for ch in s:
    models.add(ch.model)
    if ch.choices and ch.choices[0].delta.content:
        text += ch.choices[0].delta.content
out["openai_stream"] = {"models": sorted(models), "text": text}
a = anthropic.Anthropic(base_url=base + "/proxy/anthropic", api_key=key, max_retries=0,
                        default_headers={"X-Tenant-ID": "dg-tenant"})
m = a.messages.create(model="claude-opus-4-5", max_tokens=1000,
                      messages=[{"role": "user", "content": "hello there"}])
out["anthropic"] = {"model": m.model, "text": m.content[0].text}
try:
    o.chat.completions.create(model="gpt-4o", max_tokens=1000, messages=[{"role": "user", "content": "hi"}],
                              extra_headers={"X-Tenant-ID": "dg-broke"})
    out["broke"] = "allowed"
except openai.APIStatusError as e:
    out["broke"] = e.status_code
print(json.dumps(out))
"#;

/// A cap that denies gpt-4o and claude-opus admits their cheaper chain models: the SDKs get
/// normal answers from the model that ran, the ledger bills that model exactly, and a tenant
/// whose cap denies the whole chain still gets 402.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_aware_downgrade_is_a_normal_answer_and_never_escapes_a_cap() {
    let extra = "\n[[downgrades]]\nfrom = \"gpt-4o\"\nto = [\"gpt-4o-mini\"]\n\
                 [[downgrades]]\nfrom = \"claude-opus-*\"\nto = [\"claude-3-haiku\"]\n\
                 [[budgets]]\ntenant = \"dg-tenant\"\nperiod = \"month\"\nlimit_usd = 0.005\n\
                 [[budgets]]\ntenant = \"dg-broke\"\nperiod = \"month\"\nlimit_usd = 0.0001\n";
    let stack = Stack::start(Opts {
        extra_toml: extra.into(),
        ..Opts::default()
    })
    .await;
    let base = format!("http://127.0.0.1:{}", stack.port);
    let py = llmwarden_tests::python::venv_python();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(py)
            .args(["-c", PY_DOWNGRADE, &base, KEY_OPS])
            .output()
    })
    .await
    .expect("join")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed:\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).expect("script JSON");
    assert!(
        v["openai"]["model"]
            .as_str()
            .is_some_and(|m| m.starts_with("gpt-4o-mini")),
        "{v}"
    );
    assert!(
        v["openai"]["text"].as_str().is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert_eq!(v["openai"]["from"], "gpt-4o", "{v}");
    assert_eq!(v["openai"]["to"], "gpt-4o-mini", "{v}");
    assert!(
        v["openai_stream"]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert!(
        v["openai_stream"]["models"].as_array().is_some_and(|m| m
            .iter()
            .all(|m| m.as_str().is_some_and(|m| m.starts_with("gpt-4o-mini")))),
        "{v}"
    );
    assert!(
        v["anthropic"]["model"]
            .as_str()
            .is_some_and(|m| m.starts_with("claude-3-haiku")),
        "{v}"
    );
    assert_eq!(
        v["broke"], 402,
        "a cap that denies every model of the chain still denies: {v}"
    );

    // The mock ran only the downgraded models; the ledger holds exactly what it billed.
    let calls = stack.mock.ledger().calls();
    let models: Vec<_> = calls.iter().map(|c| c.model.clone()).collect();
    assert_eq!(calls.len(), 3, "{models:?}");
    assert!(
        models
            .iter()
            .all(|m| m == "gpt-4o-mini" || m == "claude-3-haiku"),
        "{models:?}"
    );
    let s = stack.settled("dg-tenant", 3).await;
    assert_eq!(s.spend, billed(&stack.mock).1);
    assert_eq!(stack.spend("dg-broke").await.requests, 0);
}

/// GET /rules on one replica's admin API: (downgrades source, rate_limits source).
async fn rule_sources(admin: &str) -> (String, String) {
    let v: Value = http()
        .get(format!("{admin}/rules"))
        .bearer_auth(enforcer_common::ADMIN_TOKEN)
        .send()
        .await
        .expect("GET /rules")
        .json()
        .await
        .expect("rules JSON");
    (
        v["downgrades"]["source"].as_str().unwrap_or("").to_owned(),
        v["rate_limits"]["source"].as_str().unwrap_or("").to_owned(),
    )
}

/// Waits (at most 5 s) until replica `admin` reports `want` as its sources.
async fn until_sources(admin: &str, want: (&str, &str)) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let got = rule_sources(admin).await;
        if (got.0.as_str(), got.1.as_str()) == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{admin}: rule sources {got:?}, want {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn put_rules(admin: &str, set: &str, body: &Value) -> (u16, Value) {
    let r = http()
        .put(format!("{admin}/rules/{set}"))
        .bearer_auth(enforcer_common::ADMIN_TOKEN)
        .json(body)
        .send()
        .await
        .expect("PUT /rules");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// A gpt-4o call of `tenant` with 1000 output tokens at most: (status, x-warden-routed-to).
async fn big_call(base: &str, tenant: &str) -> (u16, Option<String>) {
    let r = http()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", tenant)
        .json(&json!({"model": "gpt-4o", "max_tokens": 1000,
                      "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .expect("POST");
    let to = r
        .headers()
        .get("x-warden-routed-to")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (r.status().as_u16(), to)
}

/// Downgrades and rate limits stored through one replica's admin API apply on another replica
/// within its refresh (about a second), are refused when malformed, and DELETE returns both
/// replicas to the config file's sets. A routed call is still reserved against the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_edited_through_the_admin_api_apply_on_every_replica() {
    let stack = Stack::start(Opts {
        extra_toml: "\n[[budgets]]\ntenant = \"live-dg\"\nperiod = \"month\"\nlimit_usd = 0.005\n"
            .into(),
        ..Opts::default()
    })
    .await;
    let (_b, b_port, b_admin_port) = stack.start_replica("replica-b");
    let a_admin = stack.admin();
    let b_admin = format!("http://127.0.0.1:{b_admin_port}");
    let b_base = format!("http://127.0.0.1:{b_port}/proxy/openai");
    until_sources(&b_admin, ("file", "file")).await;
    // gpt-4o's worst case (1000 output tokens) is beyond the $0.005 budget: denied.
    assert_eq!(big_call(&b_base, "live-dg").await, (402, None));

    // Malformed sets are refused, naming the entry and key; nothing is stored.
    let (st, v) = put_rules(&a_admin, "rate_limits", &json!([{"tenant": "x", "rpm": 0}])).await;
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("rate_limits[0].rpm"), "{v}");
    let (st, v) = put_rules(&a_admin, "downgrades", &json!({"from": "gpt-4o"})).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(rule_sources(&a_admin).await, ("file".into(), "file".into()));

    // A downgrade chain stored through replica A routes replica B's next denied call.
    let chain = json!([{"tenant": "live-dg", "from": "gpt-4o", "to": ["gpt-4o-mini"]}]);
    assert_eq!(put_rules(&a_admin, "downgrades", &chain).await.0, 200);
    until_sources(&b_admin, ("redis", "file")).await;
    assert_eq!(
        big_call(&b_base, "live-dg").await,
        (200, Some("gpt-4o-mini".into()))
    );
    let spent = stack.settled("live-dg", 1).await;
    assert!(spent.spend.0 > 0 && spent.spend.0 <= 5_000_000, "{spent:?}");

    // A rate limit stored through A: B admits 2 calls a minute, then 429.
    let limit = json!([{"tenant": "live-rl", "rpm": 2}]);
    assert_eq!(put_rules(&a_admin, "rate_limits", &limit).await.0, 200);
    until_sources(&b_admin, ("redis", "redis")).await;
    let statuses = [
        call(&stack, "openai", "live-rl", false).await.0,
        big_call(&b_base, "live-rl").await.0,
        big_call(&b_base, "live-rl").await.0,
    ];
    assert_eq!(statuses, [200, 200, 429]);

    // DELETE: both sets back to the file's (none) on B; the limit no longer applies.
    for set in ["rate_limits", "downgrades"] {
        let r = http()
            .delete(format!("{a_admin}/rules/{set}"))
            .bearer_auth(enforcer_common::ADMIN_TOKEN)
            .send()
            .await
            .expect("DELETE");
        assert_eq!(r.status().as_u16(), 200);
    }
    until_sources(&b_admin, ("file", "file")).await;
    assert_eq!(big_call(&b_base, "live-rl").await.0, 200);
    assert_eq!(big_call(&b_base, "live-dg").await, (402, None));
}

/// An OpenAI route whose upstream answers 503 fails over to an Azure OpenAI deployment (another
/// API shape: the model's deployment in the path, `api-version`, the key in `api-key`), stream
/// and non-stream; only the Azure upstream is billed, at the price of the deployment's model
/// (`model_aliases`), with one reservation per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_route_fails_over_to_an_azure_deployment() {
    let failing = MockProvider::start(mock_cfg(Some(Fault::Status(503)))).await;
    let azure = MockProvider::start(mock_cfg(None)).await;
    let extra = format!(
        "\n[model_aliases]\n\"mini-eu\" = \"gpt-4o-mini\"\n\
         [providers.oa]\nkind = \"openai\"\nbase_url = \"{}/v1\"\napi_key_env = \"TEST_MOCK_KEY\"\nfailover = [\"az\"]\n\
         [providers.az]\nkind = \"azure-openai\"\nbase_url = \"{}\"\napi_key_env = \"TEST_MOCK_KEY\"\n\
         weight = 0\napi_version = \"2024-10-21\"\ndeployments = {{ \"gpt-4o-mini\" = \"mini-eu\" }}\n",
        failing.http_url(),
        azure.http_url()
    );
    let stack = Stack::start(Opts {
        extra_toml: extra,
        ..Opts::default()
    })
    .await;
    for stream in [false, true] {
        let (st, body) = call(&stack, "oa", "fo-azure", stream).await;
        assert_eq!(st, 200, "stream={stream}: {body}");
        if !stream {
            let v: Value = serde_json::from_str(&body).expect("JSON answer");
            assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
        }
    }
    let served = azure.ledger().calls();
    assert_eq!(served.len(), 2, "{served:#?}");
    for c in &served {
        assert_eq!(
            c.path_and_query,
            "/openai/deployments/mini-eu/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(c.header("api-key"), Some(UPSTREAM_KEY));
        assert_eq!(c.header("authorization"), None, "no OpenAI bearer to Azure");
    }
    let spent = stack.settled("fo-azure", 2).await;
    let t = PriceTable::builtin();
    let want: i64 = served
        .iter()
        .map(|c| t.cost("gpt-4o-mini", &c.usage).nanos().expect("priced").0)
        .sum();
    assert_eq!(
        spent.spend,
        Nanos(want),
        "billed the Azure answers at gpt-4o-mini's price"
    );
    assert_eq!(
        spent.estimated_spend,
        Nanos::ZERO,
        "usage came with the answers: {spent:?}"
    );
    assert_eq!(billed(&failing).1, Nanos::ZERO);
    let m = stack.metrics().await;
    let needle = "llmwarden_upstream_failovers_total{from=\"oa\",to=\"az\",reason=\"503\"}";
    assert_eq!(metric(&m, needle), 2, "{m}");
    // A model the Azure route has no deployment for is not sent there: the 503 stands.
    let r = http()
        .post(format!("{}/chat/completions", stack.base("oa")))
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", "fo-azure-none")
        .json(&json!({"model": "gpt-4o", "max_tokens": 20,
                      "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(azure.ledger().calls().len(), 2);
}

/// A downgrade chain may run on another route of the same API kind (another key, region or
/// host): the denied gpt-4o call is reserved as gpt-4o-mini against the same caps and served by
/// that route's upstream only, billed once. A chain whose route speaks another API kind is not
/// used: the denial stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_chain_can_run_on_another_route() {
    let eu = MockProvider::start(mock_cfg(None)).await;
    let extra = format!(
        "\n[providers.eu]\nkind = \"openai\"\nbase_url = \"{}/v1\"\napi_key_env = \"TEST_MOCK_KEY\"\n\
         [[downgrades]]\ntenant = \"dg-route\"\nfrom = \"gpt-4o\"\nto = [\"gpt-4o-mini\"]\nroute = \"eu\"\n\
         [[downgrades]]\ntenant = \"dg-kind\"\nfrom = \"gpt-4o\"\nto = [\"gpt-4o-mini\"]\nroute = \"anthropic\"\n\
         [[budgets]]\ntenant = \"dg-route\"\nperiod = \"month\"\nlimit_usd = 0.005\n\
         [[budgets]]\ntenant = \"dg-kind\"\nperiod = \"month\"\nlimit_usd = 0.005\n",
        eu.http_url()
    );
    let stack = Stack::start(Opts {
        extra_toml: extra,
        ..Opts::default()
    })
    .await;
    let own = stack.base("openai");
    assert_eq!(
        big_call(&own, "dg-route").await,
        (200, Some("gpt-4o-mini".into()))
    );
    let served = eu.ledger().calls();
    assert_eq!(served.len(), 1, "{served:#?}");
    assert!(served[0].response_model.starts_with("gpt-4o-mini"));
    assert!(
        stack.mock.ledger().calls().is_empty(),
        "the call's own route served nothing"
    );
    let spent = stack.settled("dg-route", 1).await;
    assert_eq!(
        spent.spend,
        billed(&eu).1,
        "billed what the chain's route billed"
    );
    assert!(spent.spend.0 <= 5_000_000);
    // The chain's route is an Anthropic route: not used for an OpenAI call.
    assert_eq!(big_call(&own, "dg-kind").await, (402, None));
    assert_eq!(eu.ledger().calls().len(), 1);
}

/// An upstream that negotiates `h2` over TLS (ALPN) is reached over HTTP/2, and its calls,
/// whole and streamed, are billed exactly what it billed: the upstream connector keeps the
/// negotiated protocol (forward/connector.rs drops only the connection's addresses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_is_reached_over_http2_and_billed_exactly() {
    let stack = Stack::start(Opts {
        mock_h2: true,
        ..Opts::default()
    })
    .await;
    for stream in [false, true, false] {
        let (st, body) = call(&stack, "openai", "ops", stream).await;
        assert_eq!(st, 200, "{body}");
    }
    let calls = stack.mock.ledger().calls();
    assert_eq!(calls.len(), 3);
    for c in &calls {
        assert_eq!(
            c.version,
            http::Version::HTTP_2,
            "call {} path {}",
            c.id,
            c.path_and_query
        );
    }
    let (n, cost) = billed(&stack.mock);
    let s = stack.settled("ops", 3).await;
    assert_eq!((n, s.spend), (3, cost));
}
