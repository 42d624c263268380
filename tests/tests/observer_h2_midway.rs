//! The observer joining HTTP/2 connections mid-way: real SDK clients (the official `openai` and
//! `anthropic` Python SDKs with `http2=True`) open an h2 connection to the TLS mock provider and
//! make a call before the observer starts; once it runs, the same clients make stream and
//! non-stream calls on the same connections. Those calls' heads refer to HPACK tables the
//! observer never saw: they are billed from their bodies, exactly to the nano-USD, and counted
//! as joined mid-way.
//!
//! Needs root (eBPF). Fails — never skips — when not root.

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};

use llmwarden_tests::mock::{MockConfig, MockProvider};
use llmwarden_tests::observer::{Observer, assert_ledger, billed_tenant, require_root};
use llmwarden_tests::redis::RedisServer;

/// Warms one h2 connection (tenant `t-warm`), prints "warm", waits for WAIT_FILE, then makes a
/// non-stream and a stream call, twice, on the same connection (tenant `t-midway`); prints the
/// number of connections used ("connections 1").
const PY_MIDWAY: &str = r#"
import os, sys, time, openai, anthropic
sdk = os.environ["SDK"]
streams = set()
def seen(r):
    assert r.http_version == "HTTP/2", r.http_version
    streams.add(id(r.extensions["network_stream"]))
hooks = {"response": [seen]}
if sdk == "openai":
    http = openai.DefaultHttpxClient(verify=os.environ["CA"], http2=True, event_hooks=hooks)
    c = openai.OpenAI(base_url=os.environ["URL"] + "/v1", api_key="sk-test-secret", max_retries=0,
                      http_client=http)
    def call(tenant, stream):
        msgs = [{"role": "user", "content": "hello there"}]
        h = {"X-Tenant-ID": tenant}
        if stream:
            for _ in c.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=20, stream=True,
                                               stream_options={"include_usage": True}, extra_headers=h):
                pass
        else:
            c.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=20, extra_headers=h)
else:
    http = anthropic.DefaultHttpxClient(verify=os.environ["CA"], http2=True, event_hooks=hooks)
    c = anthropic.Anthropic(base_url=os.environ["URL"], api_key="sk-ant-test-secret", max_retries=0,
                            http_client=http)
    def call(tenant, stream):
        msgs = [{"role": "user", "content": "hello there"}]
        h = {"X-Tenant-ID": tenant}
        if stream:
            with c.messages.stream(model="claude-haiku-4-5", max_tokens=20, messages=msgs, extra_headers=h) as s:
                for _ in s.text_stream:
                    pass
        else:
            c.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=msgs, extra_headers=h)
call("t-warm", False)
print("warm", flush=True)
while not os.path.exists(os.environ["WAIT_FILE"]):
    time.sleep(0.02)
for stream in (False, True, False, True):
    call("t-midway", stream)
print("connections", len(streams), flush=True)
"#;

/// Starts the client of `sdk` against `m` and waits until its warm-up call is done.
fn warm_client(sdk: &str, m: &MockProvider, wait_file: &std::path::Path) -> Child {
    let mut child = Command::new(llmwarden_tests::python::venv_python())
        .arg("-c")
        .arg(PY_MIDWAY)
        .env("URL", m.https_url())
        .env("CA", m.ca_pem_path())
        .env("SDK", sdk)
        .env("WAIT_FILE", wait_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read warm-up");
    if line.trim() != "warm" {
        let out = child.wait_with_output().expect("wait");
        panic!(
            "{sdk} warm-up call failed: {line}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child
}

#[test]
fn observer_bills_http2_connections_it_joined_midway_exactly() {
    require_root();
    let redis = RedisServer::start();
    let h2 = || {
        MockProvider::start_background(MockConfig {
            h2: true,
            ..MockConfig::default()
        })
    };
    let (openai_mock, anthropic_mock) = (h2(), h2());
    let gate = tempfile::tempdir().expect("tempdir");
    let wait_file = gate.path().join("go");
    let clients = [
        warm_client("openai", &openai_mock, &wait_file),
        warm_client("anthropic", &anthropic_mock, &wait_file),
    ];

    // The heads of calls on a connection joined mid-way are unknown (HPACK), so is their
    // X-Tenant-ID: the process rule names the tenant.
    let hosts = [
        openai_mock.addr().to_string(),
        anthropic_mock.addr().to_string(),
    ];
    let obs = Observer::start(
        &redis.url(),
        &[
            (hosts[0].as_str(), "openai"),
            (hosts[1].as_str(), "anthropic"),
        ],
        "[[attribution]]\ncomm = \"python*\"\ntenant = \"t-midway\"\n",
        false,
    );
    std::fs::write(&wait_file, b"go").expect("open gate");
    for (child, sdk) in clients.into_iter().zip(["openai", "anthropic"]) {
        let out = child.wait_with_output().expect("wait");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{sdk} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.trim(),
            "connections 1",
            "{sdk}: every call rode the connection opened before the observer"
        );
    }

    let (a, b) = (
        billed_tenant(&openai_mock, "t-midway"),
        billed_tenant(&anthropic_mock, "t-midway"),
    );
    assert_eq!(
        (a.0, b.0),
        (4, 4),
        "the mocks served the calls after the gate"
    );
    let want = (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3);

    assert_ledger(&redis.url(), "t-midway", want, &obs);
    let metrics = obs.metrics();
    assert_eq!(
        obs.metric("llmwarden_observer_midway_calls_total"),
        want.0,
        "every call was recorded as joined mid-way:\n{metrics}"
    );
    assert!(
        metrics.contains("llmwarden_observer_midway_calls_total{guessed=\"api\"} 8"),
        "heads hidden, API from the bodies:\n{metrics}"
    );
    assert!(
        obs.metric("llmwarden_observer_http2_connections_total") >= 2,
        "{metrics}"
    );
    assert!(
        !obs.log().contains("hello there"),
        "prompts never reach the log"
    );
}
