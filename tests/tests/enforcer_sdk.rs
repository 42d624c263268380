//! The official Python SDKs (openai, anthropic) through the enforcer with only base_url changed:
//! non-stream, stream, and a budget denial that surfaces as a 402 APIStatusError without retries.

mod enforcer_common;

use std::process::Command;

use enforcer_common::{KEY_OPS, Opts, Stack};
use llmwarden_tests::process::workspace_root;
use llmwarden_tests::python::venv_python;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_work_unmodified() {
    let extra = "[[budgets]]\ntenant = \"broke\"\nperiod = \"day\"\nlimit_usd = 0.0\n";
    let stack = Stack::start(Opts {
        extra_toml: extra.into(),
        ..Opts::default()
    })
    .await;
    let script = workspace_root().join("tests/python/enforcer_sdk.py");
    let base = format!("http://127.0.0.1:{}", stack.port);
    let py = venv_python();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py).arg(script).arg(base).arg(KEY_OPS).output()
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
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad script output {stdout}: {e}"));

    println!("SDK timings: {}", v["timings_ms"]);
    assert!(
        v["openai_text"].as_str().is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert!(
        v["openai_stream_text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert_eq!(
        v["openai_stream_saw_usage"], false,
        "the injected usage chunk reached the SDK: {v}"
    );
    assert!(
        v["anthropic_text"].as_str().is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert!(
        v["anthropic_stream_text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert_eq!(v["denial"]["status"], 402, "{v}");
    assert_eq!(v["denial"]["code"], "budget_exceeded", "{v}");
    assert_eq!(v["anthropic_denial"]["status"], 402, "{v}");

    // Four successful calls reached the mock; the two denials did not (no retries, no forwarding).
    let calls = stack.mock.ledger().calls();
    assert_eq!(
        calls.len(),
        4,
        "mock calls: {:?}",
        calls
            .iter()
            .map(|c| (&c.model, c.status))
            .collect::<Vec<_>>()
    );
    let s = stack.settled("sdk", 4).await;
    let billed: i64 = calls
        .iter()
        .map(|c| {
            ledger::price::PriceTable::builtin()
                .cost(&c.model, &c.usage)
                .nanos()
                .expect("priced")
                .0
        })
        .sum();
    assert_eq!(s.spend.0, billed, "ledger vs mock billing");
    let denials = stack.log().matches("\"budget_exceeded\"").count();
    assert_eq!(
        denials,
        2,
        "each denial is one request (no SDK retry):\n{}",
        stack.log()
    );
}
