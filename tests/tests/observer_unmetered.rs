//! Nothing bypasses silently (issue 16): a connection to a provider that no TLS probe decodes is
//! reported as **unmetered** bypass — real `sock/inet_sock_set_state` tracepoint, real rustls
//! client (reqwest), real OpenSSL client (the Python `openai` SDK), the TLS mock provider, the
//! shared Redis ledger and `enforcer report`.
//!
//! Byte counts are TCP payload bytes (`tcp_sock.bytes_acked` / `bytes_received`): the HTTP
//! plaintext plus TLS framing — the handshake (ClientHello ~0.3-0.5 KiB out; ServerHello,
//! certificate chain and Finished ~1-2 KiB in with the mock's rcgen chain), 22 bytes of record
//! header and AEAD tag per record, and the HTTP heads. The tests send a large body so the bytes
//! are dominated by it and allow [`TLS_OVERHEAD`] above the plaintext bodies.
//!
//! Needs root (eBPF). Fails — never skips — when not root.

mod enforcer_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ledger::store::{Ledger, Period, UnmeteredSummary};
use llmwarden_tests::mock::{MockConfig, MockProvider};
use llmwarden_tests::observer::{Observer, assert_ledger, billed, require_root};
use llmwarden_tests::process::workspace_bin;
use llmwarden_tests::redis::RedisServer;
use serde_json::Value;

/// One observer at a time: each attaches host-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// Most bytes of TLS framing, handshake and HTTP heads allowed above the plaintext bodies, per
/// direction, for the few calls of these tests.
const TLS_OVERHEAD: u64 = 8 * 1024;

/// The observer's verdict waits 2 s after a close (egress.rs VERDICT_GRACE); a record written
/// twice would show within this.
const SETTLE: Duration = Duration::from_secs(4);

/// Attribution: the rustls client is its own service and tenant; everything else names its
/// tenant with X-Tenant-ID, as in the other observer tests.
const RULES: &str = r#"
[[attribution]]
comm = "rustls-client"
tenant = "t-rustls"
service = "rustls-agent"

[[attribution]]
comm = "*"
trust_headers = true
"#;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt")
}

fn unmetered(redis_url: &str, tenant: &str) -> UnmeteredSummary {
    let rt = rt();
    let l = rt.block_on(Ledger::connect(redis_url)).expect("ledger");
    rt.block_on(l.unmetered(tenant, Period::Month, chrono::Utc::now()))
        .expect("unmetered")
}

/// The bypass stream's `kind = unmetered` entries, as field maps.
fn unmetered_events(redis_url: &str) -> Vec<std::collections::HashMap<String, String>> {
    let rt = rt();
    let l = rt.block_on(Ledger::connect(redis_url)).expect("ledger");
    rt.block_on(l.recent_bypass_events(100))
        .expect("events")
        .into_iter()
        .map(|(_, f)| f.into_iter().collect::<std::collections::HashMap<_, _>>())
        .filter(|f| f.get("kind").map(String::as_str) == Some("unmetered"))
        .collect()
}

/// Runs the rustls client against `m` and returns its JSON line.
fn rustls_client(m: &MockProvider, calls: usize) -> Value {
    rustls_client_named(m, calls, None)
}

/// Runs the rustls client against `m`'s address, sending `server_name` as SNI when given.
fn rustls_client_named(m: &MockProvider, calls: usize, server_name: Option<&str>) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rustls-client"));
    cmd.args([
        "--url",
        &m.https_url(),
        "--calls",
        &calls.to_string(),
        "--ca",
    ])
    .arg(m.ca_pem_path());
    if let Some(name) = server_name {
        cmd.args(["--server-name", name]);
    }
    let out = cmd.output().expect("run rustls-client");
    assert!(
        out.status.success(),
        "rustls-client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("rustls-client JSON line")
}

fn wait_unmetered(redis_url: &str, tenant: &str, n: u64, obs: &Observer) -> UnmeteredSummary {
    let deadline = Instant::now() + Duration::from_secs(20);
    while unmetered(redis_url, tenant).connections < n {
        assert!(
            Instant::now() < deadline,
            "tenant {tenant}: no unmetered connection recorded; observer log:\n{}",
            obs.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(SETTLE);
    unmetered(redis_url, tenant)
}

fn report(redis_url: &str, dir: &Path) -> Value {
    let cfg = dir.join("enforcer.toml");
    std::fs::write(&cfg, format!("redis_url = \"{redis_url}\"\n")).expect("write config");
    let out = Command::new(workspace_bin("enforcer"))
        .args(["report", "--json", "--config"])
        .arg(&cfg)
        .output()
        .expect("run enforcer report");
    assert!(
        out.status.success(),
        "enforcer report: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("report JSON")
}

#[test]
fn rustls_client_to_a_provider_is_one_unmetered_record() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let m = MockProvider::start_background(MockConfig::default());
    let host = m.addr().to_string();
    let obs = Observer::start(&redis.url(), &[(&host, "openai")], RULES, false);

    let out = rustls_client(&m, 2);
    assert_eq!(m.ledger().calls().len(), 2, "the mock served both calls");
    let pid = out["pid"].as_u64().expect("pid");
    let sent = out["request_body_bytes"].as_u64().expect("sent");
    let received = out["response_body_bytes"].as_u64().expect("received");

    let u = wait_unmetered(&redis.url(), "t-rustls", 1, &obs);
    assert_eq!(u.connections, 1, "one connection, one record: {u:?}");
    assert_eq!(u.entries.len(), 1, "{u:?}");
    let e = &u.entries[0];
    assert_eq!(
        (e.service.as_str(), e.host.as_str()),
        ("rustls-agent", host.as_str())
    );
    assert_eq!(e.connections, 1);
    println!(
        "rustls client: bodies out {sent} in {received}; TCP payload out {} in {} (overhead {} / {})",
        e.bytes_out,
        e.bytes_in,
        e.bytes_out - sent.min(e.bytes_out),
        e.bytes_in - received.min(e.bytes_in)
    );
    assert!(
        (sent..=sent + TLS_OVERHEAD).contains(&e.bytes_out),
        "bytes out {} for {sent} body bytes",
        e.bytes_out
    );
    assert!(
        (received..=received + TLS_OVERHEAD).contains(&e.bytes_in),
        "bytes in {} for {received} body bytes",
        e.bytes_in
    );
    assert_eq!((u.bytes_out, u.bytes_in), (e.bytes_out, e.bytes_in));
    assert!(e.first_seen_ms > 0 && e.last_seen_ms >= e.first_seen_ms);

    // Nothing metered for it, one bypass event with its pid.
    let spend = llmwarden_tests::observer::month_spend(&redis.url(), "t-rustls");
    assert_eq!(spend.requests, 0, "a rustls call cannot be metered");
    let events = unmetered_events(&redis.url());
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["pid"], pid.to_string());
    assert_eq!(events[0]["service"], "rustls-agent");
    assert_eq!(events[0]["tenant"], "t-rustls");
    assert_eq!(events[0]["host"], host);
    assert_eq!(events[0]["joined"], "0");

    assert_eq!(
        obs.metric("llmwarden_observer_unmetered_connections_total"),
        1
    );
    assert_eq!(
        obs.metric("llmwarden_observer_unmetered_bytes_out_total"),
        e.bytes_out
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let v = report(&redis.url(), dir.path());
    let t = v["tenants"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["tenant"] == "t-rustls"))
        .unwrap_or_else(|| panic!("t-rustls missing from the report: {v}"));
    assert_eq!(t["unmetered_connections"], 1);
    assert_eq!(t["unmetered_bytes_out"], e.bytes_out);
    assert_eq!(t["unmetered_bytes_in"], e.bytes_in);
    assert_eq!(t["unmetered"][0]["service"], "rustls-agent");
    assert_eq!(t["unmetered"][0]["host"], host);
    assert_eq!(t["unmetered"][0]["connections"], 1);
}

const PY_OPENAI: &str = r#"
import os, httpx, openai
c = openai.OpenAI(base_url=os.environ["URL"] + "/v1", api_key="sk-test-secret",
                  http_client=httpx.Client(verify=os.environ["CA"]),
                  default_headers={"X-Tenant-ID": "t-openssl"})
c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
print("ok")
"#;

#[test]
fn openssl_client_is_metered_and_not_also_unmetered() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let m = MockProvider::start_background(MockConfig::default());
    let host = m.addr().to_string();
    let obs = Observer::start(&redis.url(), &[(&host, "openai")], RULES, false);

    let out = Command::new(llmwarden_tests::python::venv_python())
        .args(["-c", PY_OPENAI])
        .env("URL", m.https_url())
        .env("CA", m.ca_pem_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ledger(&redis.url(), "t-openssl", billed(&m), &obs);

    // Its connection ended with the process; wait for the verdict.
    let deadline = Instant::now() + Duration::from_secs(20);
    while obs.metric("llmwarden_observer_provider_connections_total") < 1 {
        assert!(
            Instant::now() < deadline,
            "the SDK's provider connection was never decided; log:\n{}",
            obs.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(SETTLE);
    let metrics = obs.metrics();
    assert!(
        metrics.contains("llmwarden_observer_provider_connections_total{verdict=\"metered\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        obs.metric("llmwarden_observer_unmetered_connections_total"),
        0
    );
    for tenant in ["t-openssl", "unattributed"] {
        assert_eq!(unmetered(&redis.url(), tenant).connections, 0, "{tenant}");
    }
    assert!(unmetered_events(&redis.url()).is_empty());
}

#[test]
fn tls_to_a_host_that_is_no_provider_is_not_reported() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let provider = MockProvider::start_background(MockConfig::default());
    // Speaks TLS and the same API, but is not configured as a provider.
    let other = MockProvider::start_background(MockConfig::default());
    let host = provider.addr().to_string();
    let obs = Observer::start(&redis.url(), &[(&host, "openai")], RULES, false);

    rustls_client(&other, 1);
    assert_eq!(other.ledger().calls().len(), 1);
    std::thread::sleep(SETTLE);
    assert_eq!(unmetered(&redis.url(), "t-rustls").connections, 0);
    assert_eq!(
        obs.metric("llmwarden_observer_provider_connections_total"),
        0
    );
    assert_eq!(
        obs.metric("llmwarden_observer_unmetered_connections_total"),
        0
    );
    assert!(unmetered_events(&redis.url()).is_empty());
}

#[test]
fn a_connection_opened_before_the_observer_is_reported_flagged_joined() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let m = MockProvider::start_background(MockConfig::default());
    let host = m.addr().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let go = dir.path().join("go");
    let child = Command::new(env!("CARGO_BIN_EXE_rustls-client"))
        .args(["--url", &m.https_url(), "--calls", "2", "--ca"])
        .arg(m.ca_pem_path())
        .arg("--wait-file")
        .arg(&go)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rustls-client");
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.ledger().calls().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the first call never reached the mock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The client's connection is open (its first call done) before the observer starts.
    let obs = Observer::start(&redis.url(), &[(&host, "openai")], RULES, false);
    obs.wait_log("open_before_start=1", Duration::from_secs(20));
    std::fs::write(&go, b"").expect("go");
    let out = child.wait_with_output().expect("rustls-client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).expect("JSON line");
    let sent = line["request_body_bytes"].as_u64().expect("sent");
    assert_eq!(m.ledger().calls().len(), 2);

    let u = wait_unmetered(&redis.url(), "t-rustls", 1, &obs);
    assert_eq!(u.connections, 1, "{u:?}");
    let e = &u.entries[0];
    assert_eq!(
        (e.service.as_str(), e.host.as_str()),
        ("rustls-agent", host.as_str())
    );
    // The socket's own counters: the whole connection, the call before the observer included.
    assert!(
        (sent..=sent + TLS_OVERHEAD).contains(&e.bytes_out),
        "bytes out {} for {sent} body bytes",
        e.bytes_out
    );
    let events = unmetered_events(&redis.url());
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["joined"], "1");
    assert_eq!(events[0]["pid"], line["pid"].to_string());
    assert_eq!(obs.metric("llmwarden_observer_unmetered_joined_total"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::await_holding_lock,
    reason = "the guard serialises whole tests (one observer at a time); nothing else takes it in this runtime"
)]
async fn the_enforcers_own_upstream_connection_is_neither_metered_nor_unmetered() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut stack = enforcer_common::Stack::start(enforcer_common::Opts::default()).await;
    let exe = std::fs::read_link(format!("/proc/{}/exe", stack.enforcer.pid()));
    let epid = stack.enforcer.pid();
    let host = stack.mock.addr().to_string();
    let obs = Observer::start(&stack.redis.url(), &[(&host, "openai")], RULES, false);

    let r = enforcer_common::http()
        .post(format!("{}/chat/completions", stack.base("openai")))
        .bearer_auth(enforcer_common::KEY_ACME)
        .header("content-type", "application/json")
        .body(
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"via the enforcer"}]}"#,
        )
        .send()
        .await
        .expect("enforcer call");
    assert!(r.status().is_success(), "{}", r.status());
    let s = stack.settled("acme", 1).await;
    assert_eq!(
        s.by_source.observer.0, 0,
        "the observer cannot decode rustls"
    );
    // Its pooled upstream connection ends with the process.
    stack.enforcer.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while obs.metric("llmwarden_observer_provider_connections_total") < 1 {
        assert!(
            Instant::now() < deadline,
            "the enforcer's upstream connection was never decided; log:\n{}",
            obs.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(SETTLE).await;
    let metrics = obs.metrics();
    let url = stack.redis.url();
    let events = tokio::task::spawn_blocking(move || unmetered_events(&url))
        .await
        .expect("join");
    assert!(
        metrics.contains("llmwarden_observer_provider_connections_total{verdict=\"ignored\"}"),
        "{metrics}\nunmetered events: {events:?}\nenforcer exe {exe:?} pid {epid}"
    );
    assert_eq!(
        obs.metric("llmwarden_observer_unmetered_connections_total"),
        0
    );
    let url = stack.redis.url();
    let (acme, unattributed) = tokio::task::spawn_blocking(move || {
        (
            unmetered(&url, "acme").connections,
            unmetered(&url, "unattributed").connections,
        )
    })
    .await
    .expect("join");
    assert_eq!((acme, unattributed), (0, 0));
}

/// curl posting a chat completion to `url` with `args` (TLS options, headers as `-H`, ...).
fn curl(url: &str, args: &[String]) {
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--fail", "-o", "/dev/null"])
        .args(args)
        .args(["-H", "content-type: application/json"])
        .args([
            "-d",
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}"#,
        ])
        .arg(format!("{url}/v1/chat/completions"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_host_header_alone_is_no_provider_under_connection_identity() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let provider = MockProvider::start_background(MockConfig::default());
    // A local TLS server that is no provider, sent the provider's Host header: under
    // provider_identity = "header" its calls are billed as the provider's.
    let local = MockProvider::start_background(MockConfig::default());
    let host = provider.addr().to_string();
    let extra = format!("provider_identity = \"connection\"\n{RULES}");
    let obs = Observer::start(&redis.url(), &[(&host, "openai")], &extra, false);

    let ca = |m: &MockProvider| vec!["--cacert".to_owned(), m.ca_pem_path().display().to_string()];
    let mut claimed = ca(&local);
    claimed.extend(["-H".to_owned(), format!("host: {host}")]);
    claimed.extend(["-H".to_owned(), "x-tenant-id: t-claimed".to_owned()]);
    curl(&local.https_url(), &claimed);
    let mut real = ca(&provider);
    real.extend(["-H".to_owned(), "x-tenant-id: t-real".to_owned()]);
    curl(&provider.https_url(), &real);
    assert_ledger(&redis.url(), "t-real", billed(&provider), &obs);
    let deadline = Instant::now() + Duration::from_secs(10);
    while obs.metric("llmwarden_observer_records_refused_total") < 1 {
        assert!(
            Instant::now() < deadline,
            "the call to the local server was not refused; log:\n{}",
            obs.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = obs.metrics();
    assert!(
        metrics.contains(
            "llmwarden_observer_records_refused_total{reason=\"no_provider_connection\"} 1"
        ),
        "{metrics}"
    );
    assert_eq!(
        llmwarden_tests::observer::month_spend(&redis.url(), "t-claimed").requests,
        0
    );
}

/// The TLS server name a connection sent names its provider, with no address to go by: egress
/// accounting off, the provider configured by a name nothing resolves. curl (OpenSSL) sends the
/// name through `SSL_set_tlsext_host_name`, which the `SSL_ctrl` probe reports. A call to the
/// same server by address, claiming the provider in its Host header, sends no server name and is
/// refused.
#[test]
fn the_server_name_a_connection_sent_names_its_provider() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let m = MockProvider::start_background(MockConfig::default());
    let port = m.addr().port();
    let host = format!("llm.test:{port}");
    let extra = format!("egress_accounting = false\n{RULES}");
    let obs = Observer::start(&redis.url(), &[(&host, "openai")], &extra, false);
    // By name (--resolve: no DNS): SNI llm.test.
    curl(
        &format!("https://{host}"),
        &[
            "-k".to_owned(),
            "--resolve".to_owned(),
            format!("{host}:127.0.0.1"),
            "-H".to_owned(),
            "x-tenant-id: t-sni".to_owned(),
        ],
    );
    // By address with the provider's Host header: no SNI.
    curl(
        &m.https_url(),
        &[
            "-k".to_owned(),
            "-H".to_owned(),
            format!("host: {host}"),
            "-H".to_owned(),
            "x-tenant-id: t-claimed".to_owned(),
        ],
    );
    let calls = m.ledger().calls();
    assert_eq!(calls.len(), 2);
    llmwarden_tests::observer::assert_ledger(
        &redis.url(),
        "t-sni",
        llmwarden_tests::observer::billed_calls(&calls[..1]),
        &obs,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while obs.metric("llmwarden_observer_records_refused_total") < 1 {
        assert!(
            Instant::now() < deadline,
            "the call by address was not refused; log:\n{}",
            obs.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        llmwarden_tests::observer::month_spend(&redis.url(), "t-claimed").requests,
        0
    );
}

/// The ClientHello the rustls client sent (read by the `tcp_sendmsg` fentry, any TLS library)
/// names the destination: the unmetered record's host is the server name, not the address.
#[test]
fn the_unmetered_record_names_the_server_name_the_client_sent() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let m = MockProvider::start_background(MockConfig::default());
    let addr = m.addr().to_string();
    let named = format!("llm.test:{}", m.addr().port());
    // The address is accounted; the name is a provider host (configured, not resolvable).
    let obs = Observer::start(
        &redis.url(),
        &[(&addr, "openai"), (&named, "openai")],
        RULES,
        false,
    );
    let out = rustls_client_named(&m, 1, Some("llm.test"));
    let pid = out["pid"].as_u64().expect("pid");
    let u = wait_unmetered(&redis.url(), "t-rustls", 1, &obs);
    assert_eq!(u.connections, 1, "{u:?}");
    assert_eq!(
        u.entries[0].host,
        "llm.test",
        "{u:?}\n{}\n{}",
        obs.metrics(),
        obs.log()
    );
    let events = unmetered_events(&redis.url());
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["host"], "llm.test");
    assert_eq!(events[0]["pid"], pid.to_string());
    assert_eq!(
        obs.metric("llmwarden_observer_provider_hellos_total{result=\"sni\"}"),
        1,
        "{}",
        obs.metrics()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let v = report(&redis.url(), dir.path());
    let t = v["tenants"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["tenant"] == "t-rustls"))
        .unwrap_or_else(|| panic!("t-rustls missing from the report: {v}"));
    assert_eq!(t["unmetered"][0]["host"], "llm.test");
}

/// A connection to a provider address whose ClientHello names a host that is no provider's (a
/// CDN address shared with other sites): the address match was a coincidence, so it is no
/// unmetered bypass; it is counted under `verdict="not_provider"`.
#[test]
fn a_server_name_that_is_no_provider_host_is_not_unmetered() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let m = MockProvider::start_background(MockConfig::default());
    let addr = m.addr().to_string();
    let obs = Observer::start(&redis.url(), &[(&addr, "openai")], RULES, false);
    rustls_client_named(&m, 1, Some("static.other-site.test"));
    assert_eq!(m.ledger().calls().len(), 1, "the mock served the call");
    let deadline = Instant::now() + Duration::from_secs(20);
    while obs.metric("llmwarden_observer_provider_connections_total{verdict=\"not_provider\"}") < 1
    {
        assert!(
            Instant::now() < deadline,
            "no not_provider verdict; metrics:\n{}\nlog:\n{}",
            obs.metrics(),
            obs.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(SETTLE);
    assert_eq!(unmetered(&redis.url(), "t-rustls").connections, 0);
    assert!(unmetered_events(&redis.url()).is_empty());
    assert_eq!(
        obs.metric("llmwarden_observer_provider_connections_total{verdict=\"unmetered\"}"),
        0
    );
    assert_eq!(
        obs.metric("llmwarden_observer_provider_hellos_total{result=\"sni\"}"),
        1
    );
}
