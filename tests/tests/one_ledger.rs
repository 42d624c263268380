//! One ledger in fact: the same call, once through the enforcer and once straight to the provider
//! (seen by the observer), is billed to the same nano-USD on both paths — for a priced model and
//! for a model the price table does not know (both bill `unknown_model_price`, never $0).
//!
//! Needs root (the observer loads eBPF programs). Fails, never skips, when not root.

mod enforcer_common;

use std::process::Command;
use std::time::{Duration, Instant};

use enforcer_common::{KEY_ACME, Opts, Stack, UPSTREAM_KEY, http};
use ledger::Nanos;
use ledger::store::{Period, TenantSpend};
use llmwarden_tests::observer::{Observer, require_root};

const MODELS: [&str; 2] = ["gpt-4o-mini", "acme-internal-1"];

fn body(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":40,"messages":[{{"role":"user","content":"same call on both paths"}}]}}"#
    )
}

async fn spend_once(stack: &Stack, tenant: &str, requests: u64, obs: &Observer) -> TenantSpend {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = stack
            .ledger
            .tenant_spend(tenant, Period::Month, chrono::Utc::now())
            .await
            .expect("tenant_spend");
        if (s.requests >= requests && s.held == Nanos::ZERO) || Instant::now() > deadline {
            assert_eq!(
                s.requests,
                requests,
                "{tenant}: {s:?}\nobserver:\n{}",
                obs.log()
            );
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_bill_the_same_usage_the_same() {
    require_root();
    let stack = Stack::start(Opts {
        top_toml: "unknown_model = \"allow\"".into(),
        ..Opts::default()
    })
    .await;
    let host = stack.mock.addr().to_string();
    let obs = Observer::start(&stack.redis.url(), &[(&host, "openai")], "", false);

    let client = http();
    for model in MODELS {
        // Through the enforcer (its upstream TLS is rustls: invisible to the OpenSSL probes).
        let r = client
            .post(format!("{}/chat/completions", stack.base("openai")))
            .bearer_auth(KEY_ACME)
            .header("content-type", "application/json")
            .body(body(model))
            .send()
            .await
            .expect("enforcer call");
        assert!(r.status().is_success(), "{model}: {}", r.status());
        // Straight to the provider with curl (OpenSSL): bypass, seen by the observer.
        let out = Command::new("curl")
            .args(["-sS", "--http1.1", "--fail", "--cacert"])
            .arg(stack.mock.ca_pem_path())
            .args([
                "-H",
                "content-type: application/json",
                "-H",
                "x-tenant-id: t-direct",
            ])
            .args(["-H", &format!("authorization: Bearer {UPSTREAM_KEY}")])
            .args(["-d", &body(model)])
            .arg(format!("{}/v1/chat/completions", stack.mock.https_url()))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let via_enforcer = spend_once(&stack, "acme", 2, &obs).await;
    let direct = spend_once(&stack, "t-direct", 2, &obs).await;
    for model in MODELS {
        let e = via_enforcer
            .by_model
            .get(model)
            .copied()
            .unwrap_or_default();
        let d = direct.by_model.get(model).copied().unwrap_or_default();
        assert!(
            e > Nanos::ZERO,
            "{model} billed $0 through the enforcer: {via_enforcer:?}"
        );
        assert_eq!(e, d, "{model}: enforcer {e:?} vs observer {d:?}");
    }
    assert_eq!(via_enforcer.spend, direct.spend);
    assert_eq!(via_enforcer.by_source.enforcer, direct.by_source.observer);
    assert_eq!(direct.bypass_spend, direct.spend);
    // The unknown model is billed at the default price ($15 / $75 per million) from the
    // provider's usage record, and flagged estimated on both paths.
    let unpriced = via_enforcer.by_model["acme-internal-1"];
    let served: Vec<_> = stack
        .mock
        .ledger()
        .calls()
        .into_iter()
        .filter(|c| c.response_model == "acme-internal-1")
        .collect();
    assert_eq!(served.len(), 2);
    let u = &served[0].usage;
    let want = (u.prompt_tokens() as i64) * 15_000 + (u.output_tokens as i64) * 75_000;
    assert_eq!(unpriced, Nanos(want), "default price of {u:?}");
    assert_eq!(via_enforcer.estimated_spend, unpriced);
    assert_eq!(direct.estimated_spend, unpriced);
    // Both paths met the price gap; the ledger announced it once (docs/audit.md, price_gap).
    let deadline = Instant::now() + Duration::from_secs(5);
    let gaps = loop {
        let gaps = stack
            .ledger
            .pending_ops_alerts(100)
            .await
            .expect("ops events");
        if !gaps.is_empty() || Instant::now() > deadline {
            break gaps;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let got: Vec<(&str, &str)> = gaps
        .iter()
        .map(|g| (g.kind.as_str(), g.model.as_str()))
        .collect();
    assert_eq!(got, [("price_gap", "acme-internal-1")], "{gaps:?}");
    assert!(
        ["enforcer", "observer"].contains(&gaps[0].path.as_str()),
        "{gaps:?}"
    );
}
