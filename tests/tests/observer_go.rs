//! The observer and Go programs (`crypto/tls`, no OpenSSL): a `net/http` client built from
//! `tests/go/llmclient` by the test, against the mock provider over real TLS, billed exactly
//! like curl. Needs root (eBPF) and Go (`golang-go`). Fails — never skips — without them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ledger::price::PriceTable;
use ledger::store::{Ledger, Period};
use llmwarden_tests::golang::{go_version, llmclient};
use llmwarden_tests::mock::{MockConfig, MockProvider, ServedCall};
use llmwarden_tests::observer::{Observer, require_root};
use llmwarden_tests::process::ChildGuard;
use llmwarden_tests::redis::RedisServer;

/// One observer at a time: each attaches host-wide.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How the Go client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    /// `GODEBUG=http2client=0`.
    Http1,
    /// net/http's default over TLS with ALPN h2.
    Http2,
}

fn go_cmd(bin: &Path, m: &MockProvider, proto: Proto, tenant: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("-url")
        .arg(format!("{}/v1/chat/completions", m.https_url()))
        .args(["-tenant", tenant])
        .args(args)
        .env("SSL_CERT_FILE", m.ca_pem_path())
        .env(
            "GODEBUG",
            if proto == Proto::Http1 {
                "http2client=0"
            } else {
                ""
            },
        );
    cmd
}

/// Runs the Go client to its end; panics with its output when it fails.
fn go_run(bin: &Path, m: &MockProvider, proto: Proto, tenant: &str, args: &[&str]) -> Output {
    let out = go_cmd(bin, m, proto, tenant, args)
        .output()
        .expect("run the Go client");
    assert!(
        out.status.success(),
        "Go client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// (calls, input, output, nanos) of served calls, priced with the builtin table.
fn sum(calls: &[ServedCall]) -> (u64, u64, u64, i64) {
    let prices = PriceTable::builtin();
    calls.iter().fold((0, 0, 0, 0), |t, c| {
        (
            t.0 + 1,
            t.1 + c.usage.input_tokens,
            t.2 + c.usage.output_tokens,
            t.3 + prices
                .cost(&c.response_model, &c.usage)
                .nanos()
                .expect("mock model priced")
                .0,
        )
    })
}

/// Served calls whose request named `tenant`.
fn served(m: &MockProvider, tenant: &str) -> Vec<ServedCall> {
    m.ledger()
        .calls()
        .into_iter()
        .filter(|c| c.header("x-tenant-id") == Some(tenant))
        .collect()
}

/// Waits until the tenant's ledger shows `want.0` requests, then compares tokens and cost.
fn assert_ledger(redis: &RedisServer, tenant: &str, want: (u64, u64, u64, i64), obs: &Observer) {
    assert!(want.0 > 0, "tenant {tenant}: the mock served no call");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let ledger = rt
        .block_on(Ledger::connect(&redis.url()))
        .expect("ledger connect");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = rt
            .block_on(ledger.tenant_spend(tenant, Period::Month, chrono::Utc::now()))
            .expect("tenant_spend");
        if s.requests >= want.0 || Instant::now() > deadline {
            // A moment more: a call recorded twice would show now.
            std::thread::sleep(Duration::from_millis(300));
            let s = rt
                .block_on(ledger.tenant_spend(tenant, Period::Month, chrono::Utc::now()))
                .expect("tenant_spend");
            assert_eq!(
                (s.requests, s.input_tokens, s.output_tokens, s.spend.0),
                want,
                "tenant {tenant}: ledger (requests, input, output, nanos) != mock billed; observer log:\n{}",
                obs.log()
            );
            assert_eq!(s.bypass_spend.0, want.3, "observer spend is bypass spend");
            assert_eq!(s.by_source.observer.0, want.3, "by_source.observer");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start(redis: &RedisServer, m: &MockProvider) -> Observer {
    let host = m.addr().to_string();
    Observer::start(&redis.url(), &[(host.as_str(), "openai")], "", false)
}

fn mock() -> MockProvider {
    MockProvider::start_background(MockConfig::default())
}

#[test]
fn observer_meters_go_http1_calls_exactly() {
    require_root();
    let _g = serial();
    let bin = llmclient(false);
    let redis = RedisServer::start();
    let m = mock();
    let obs = start(&redis, &m);
    go_run(&bin, &m, Proto::Http1, "t-go-h1", &["-n", "3"]);
    go_run(
        &bin,
        &m,
        Proto::Http1,
        "t-go-h1-stream",
        &["-n", "2", "-stream"],
    );
    assert_ledger(&redis, "t-go-h1", sum(&served(&m, "t-go-h1")), &obs);
    assert_ledger(
        &redis,
        "t-go-h1-stream",
        sum(&served(&m, "t-go-h1-stream")),
        &obs,
    );
    assert!(
        obs.log().contains("attached to Go crypto/tls"),
        "{}",
        obs.log()
    );
    assert!(
        obs.metrics()
            .contains("llmwarden_observer_go_binaries{outcome=\"attached\"} 1"),
        "{}",
        obs.metrics()
    );
    let _ = go_version();
}
