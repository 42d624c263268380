//! The observer during a Redis outage (issue 5 item 1, observer side): a call it sees while Redis
//! is frozen (SIGSTOP) goes to its local spool and is recorded exactly once when Redis returns.
//!
//! Needs root (eBPF). Fails — never skips — when not root.

use std::process::Command;
use std::time::{Duration, Instant};

use ledger::price::{Cost, PriceTable};
use ledger::store::{Ledger, Period};
use llmwarden_tests::mock::{MockConfig, MockProvider};
use llmwarden_tests::process::{ChildGuard, free_port, is_root, workspace_bin};
use llmwarden_tests::redis::RedisServer;

fn wait_log(path: &std::path::Path, needle: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "observer never logged {needle:?}; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_call_seen_while_redis_is_frozen_is_spooled_and_recorded_once() {
    assert!(
        is_root(),
        "observer tests load eBPF programs and must run as root; run `cargo xtask test` as root"
    );
    let redis = RedisServer::start();
    let mock = MockProvider::start_background(MockConfig::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let config = dir.path().join("observer.toml");
    std::fs::write(
        &config,
        format!(
            "redis_url = \"{}\"\nmetrics_listen = \"127.0.0.1:{}\"\nspool_dir = \"{}\"\n\
             [[providers]]\nhost = \"{}\"\nkind = \"openai\"\n\
             [[attribution]]\ncomm = \"curl\"\ntrust_headers = true\n",
            redis.url(),
            free_port(),
            spool.display(),
            mock.addr()
        ),
    )
    .expect("config");
    let stderr = dir.path().join("stderr.log");
    let mut cmd = Command::new(workspace_bin("observer"));
    cmd.arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr"));
    let _observer = ChildGuard::spawn("observer", &mut cmd);
    wait_log(&stderr, "observer ready", 60);

    redis.pause();
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"spool me"}]}"#;
    let call = || {
        Command::new("curl")
            .args(["-sS", "--http1.1", "--fail", "--cacert"])
            .arg(mock.ca_pem_path())
            .args([
                "-H",
                "content-type: application/json",
                "-H",
                "x-tenant-id: obs-outage",
                "-d",
                body,
            ])
            .arg(format!("{}/v1/chat/completions", mock.https_url()))
            .output()
            .expect("curl")
    };
    let out = call();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = wait_log(&stderr, "spooled until Redis answers", 20);
    wait_log(&stderr, "bypass event XADD failed", 20);
    redis.resume();

    let c = mock.ledger().last().expect("the mock served the call");
    let Cost::Priced { nanos, .. } = PriceTable::builtin().cost(&c.response_model, &c.usage) else {
        panic!("unpriced");
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ledger = rt.block_on(Ledger::connect(&redis.url())).expect("ledger");
    let deadline = Instant::now() + Duration::from_secs(45);
    let s = loop {
        let s = rt
            .block_on(ledger.tenant_spend("obs-outage", Period::Month, chrono::Utc::now()))
            .expect("tenant_spend");
        if s.requests >= 1 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the spooled record never reached Redis: {s:?}\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(1));
    let again = rt
        .block_on(ledger.tenant_spend("obs-outage", Period::Month, chrono::Utc::now()))
        .expect("tenant_spend");
    assert_eq!(
        (s.spend, s.bypass_spend, s.requests),
        (nanos, nanos, 1),
        "{s:?}"
    );
    assert_eq!(
        (again.spend, again.requests),
        (s.spend, 1),
        "recorded twice"
    );
    // The bypass alert could not be sent while Redis was frozen; the pair's next call sends it.
    assert_eq!(redis.command(&["XLEN", "llmw:events:bypass"]).trim(), ":0");
    let out = call();
    assert!(out.status.success(), "second curl failed");
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis.command(&["XLEN", "llmw:events:bypass"]).trim() != ":1" {
        assert!(
            Instant::now() < deadline,
            "the bypass event was never delivered after Redis came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(!log.contains("spool me"), "prompt text in the observer log");
}
