//! Shared helpers of the reliability tests: restart the enforcer of a [`Stack`] after kill -9,
//! stream calls, compute what the mock billed, scan logs for secrets.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use ledger::Nanos;
use ledger::price::{Cost, PriceTable};
use llmwarden_tests::process::{ChildGuard, workspace_bin};
use serde_json::{Value, json};

use crate::enforcer_common::{
    ADMIN_TOKEN, KEY_ACME, KEY_OPS, Stack, UPSTREAM_KEY, assert_absent, http,
};

/// The prompt every reliability call sends; it must never appear in a log.
pub const PROMPT: &str = "PROMPT-SECRET-d41c: what is the launch code?";

/// Starts a streaming chat call as tenant `tenant` (key [`KEY_OPS`]) with `chunks` mock chunks and
/// reads it to its end in the background; the task yields how many body frames arrived.
pub fn spawn_stream(stack: &Stack, tenant: &str, chunks: u32) -> tokio::task::JoinHandle<usize> {
    let url = format!("{}/chat/completions", stack.base("openai"));
    let tenant = tenant.to_owned();
    tokio::spawn(async move {
        let r = http()
            .post(&url)
            .bearer_auth(KEY_OPS)
            .header("x-tenant-id", tenant)
            .header("x-mock-chunks", chunks.to_string())
            .json(&chat(true))
            .send()
            .await
            .expect("send");
        let mut s = r.bytes_stream();
        let mut n = 0;
        while let Some(Ok(_)) = s.next().await {
            n += 1;
        }
        n
    })
}

/// A chat-completions body carrying [`PROMPT`].
pub fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 200,
           "messages": [{"role": "user", "content": PROMPT}]})
}

/// The `top_toml` giving the enforcer a fixed instance id and a spool in `dir`.
pub fn spool_toml(instance: &str, dir: &Path) -> String {
    format!(
        "instance_id = \"{instance}\"\nspool_dir = \"{}\"\n",
        dir.display()
    )
}

/// kill -9 of the enforcer (no graceful shutdown: holds stay, nothing is settled).
pub fn kill_9(stack: &mut Stack) {
    stack.enforcer.kill();
}

/// Starts the enforcer again with the same config (same instance id, same spool), logging to the
/// same file, and waits until it listens.
pub fn restart(stack: &mut Stack) {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(stack.dir.path().join("enforcer.log"))
        .expect("open log");
    let mut cmd = Command::new(workspace_bin("enforcer"));
    cmd.arg("--config")
        .arg(stack.config_path())
        .env("TEST_MOCK_KEY", UPSTREAM_KEY)
        .env("TEST_WARDEN_ADMIN_TOKEN", ADMIN_TOKEN)
        .env(
            "ENFORCER_LOG",
            "debug,hyper=info,h2=info,rustls=info,redis=info",
        )
        .stdout(Stdio::null())
        .stderr(log);
    stack.enforcer = ChildGuard::spawn("enforcer", &mut cmd);
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", stack.port)).is_err() {
        assert!(
            stack.enforcer.is_running(),
            "the restarted enforcer exited:\n{}",
            stack.log()
        );
        assert!(
            Instant::now() < deadline,
            "restarted enforcer does not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a chat call as `tenant` with extra headers; returns status, body and the cost header.
pub async fn call(
    stack: &Stack,
    tenant: &str,
    headers: &[(&str, &str)],
    stream: bool,
) -> (u16, String, Option<String>) {
    let url = format!("{}/chat/completions", stack.base("openai"));
    let mut rb = http()
        .post(&url)
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", tenant)
        .json(&chat(stream));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status().as_u16();
    let cost = r
        .headers()
        .get("x-warden-cost-usd")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut text = Vec::new();
    let mut s = r.bytes_stream();
    while let Some(Ok(b)) = s.next().await {
        text.extend_from_slice(&b);
    }
    (status, String::from_utf8_lossy(&text).into_owned(), cost)
}

/// What the mock billed for every call it served, priced with the built-in table, to the nano-USD.
pub fn mock_billed(stack: &Stack) -> Nanos {
    let table = PriceTable::builtin();
    let mut total = 0;
    for c in stack.mock.ledger().calls() {
        if c.status != 200 {
            continue;
        }
        match table.cost(&c.response_model, &c.usage) {
            Cost::Priced { nanos, .. } => total += nanos.0,
            Cost::Unpriced { model } => panic!("mock model {model} has no price"),
        }
    }
    Nanos(total)
}

/// Polls `f` until it returns true, or panics with `what` after `secs`.
pub async fn wait_until<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts no proxy key, upstream key, admin token or prompt text is in the enforcer's log.
pub fn assert_log_clean(stack: &Stack) {
    let log = stack.log();
    let path = stack.dir.path().join("enforcer.log");
    assert!(!log.is_empty(), "the enforcer wrote no log");
    for (needle, what) in [
        (KEY_ACME, "a proxy key"),
        (KEY_OPS, "a proxy key"),
        (UPSTREAM_KEY, "the upstream key"),
        (ADMIN_TOKEN, "the admin token"),
        (PROMPT, "the prompt"),
        ("PROMPT-SECRET", "part of the prompt"),
        ("launch code", "part of the prompt"),
    ] {
        assert_absent(&log, needle, what, &path);
    }
}
