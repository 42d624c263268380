//! The observer end to end: real uprobes on the host's OpenSSL, a mock provider over real TLS,
//! real clients (curl, the Python SDKs, node), and the shared Redis ledger.
//!
//! Needs root (eBPF). Fails — never skips — when not root.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ledger::price::PriceTable;
use ledger::store::{Ledger, Period};
use llmwarden_tests::mock::{MockConfig, MockProvider};
use llmwarden_tests::observer::{
    Observer, assert_ledger, billed, billed_tenant, month_spend, require_root,
};
use llmwarden_tests::process::free_port;
use llmwarden_tests::redis::RedisServer;

/// One observer at a time: each attaches host-wide and would see the other tests' calls too.
static SERIAL: Mutex<()> = Mutex::new(());

fn mock(cfg: MockConfig) -> MockProvider {
    MockProvider::start_background(cfg)
}

fn host(m: &MockProvider) -> String {
    m.addr().to_string()
}

fn curl(m: &MockProvider, tenant: &str, body: &str, extra: &[&str]) {
    let url = format!("{}/v1/chat/completions", m.https_url());
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--fail", "--cacert"])
        .arg(m.ca_pem_path())
        .args([
            "-H",
            "content-type: application/json",
            "-H",
            &format!("x-tenant-id: {tenant}"),
            "-d",
            body,
        ])
        .args(extra)
        .arg(&url)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const CHAT: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}"#;
const CHAT_STREAM: &str = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hello there"}]}"#;

/// After a quiet spell the reader stops draining its rings every 20 ms and sleeps until the
/// probes wake it (docs/observer.md, "The reader at rest"). A call made while it sleeps is
/// recorded and billed, and the probes' wake-up is what finds it: not the once-a-second look a
/// sleeping reader still takes (`reader_late_wakes`). That look can win a race with the wake-up
/// (both ready in one turn of the loop), so three rounds are made and one must be a clean wake.
#[test]
fn observer_reader_sleeps_when_quiet_and_the_next_call_wakes_it() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let m = mock(MockConfig::default());
    let obs = Observer::start(
        &redis.url(),
        &[(host(&m).as_str(), "openai")],
        "reader_sleep_after_ms = 300\n",
        false,
    );
    let mut woken = 0;
    for round in 1..=3 {
        // Each call wakes the reader, which sleeps again 300 ms after it.
        obs.wait_metric("llmwarden_observer_reader_sleeps_total", round, "asleep");
        let late = obs.metric("llmwarden_observer_reader_late_wakes_total");
        let t = Instant::now();
        curl(&m, "t-asleep", CHAT, &[]);
        obs.wait_metric("llmwarden_observer_calls_total", round, "the call");
        let late_now = obs.metric("llmwarden_observer_reader_late_wakes_total");
        eprintln!(
            "round {round}: call recorded {:?} after it started (late wakes {late} -> {late_now})",
            t.elapsed()
        );
        if late_now == late {
            woken += 1;
        }
    }
    assert!(
        woken >= 1,
        "no call woke the sleeping reader: every one was found by its once-a-second look; \
         metrics:\n{}",
        obs.metrics()
    );
    assert_ledger(&redis.url(), "t-asleep", billed(&m), &obs);
}

#[test]
fn observer_curl_calls_are_recorded_with_the_billed_cost() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let plain = mock(MockConfig::default());
    let gz = mock(MockConfig {
        gzip: true,
        ..MockConfig::default()
    });
    let chunked = mock(MockConfig {
        chunked: true,
        ..MockConfig::default()
    });
    let providers = [
        (host(&plain), "openai"),
        (host(&gz), "openai"),
        (host(&chunked), "openai"),
    ];
    let providers: Vec<(&str, &str)> = providers.iter().map(|(h, k)| (h.as_str(), *k)).collect();
    let obs = Observer::start(&redis.url(), &providers, "", false);

    curl(&plain, "t-plain", CHAT, &[]);
    curl(&plain, "t-plain", CHAT_STREAM, &[]);
    curl(&gz, "t-gzip", CHAT, &["--compressed"]);
    curl(&chunked, "t-chunked", CHAT, &[]);
    curl(&chunked, "t-chunked", CHAT_STREAM, &[]);
    // Several calls on one keep-alive connection: curl reuses it for URLs given together.
    let url = format!("{}/v1/chat/completions", plain.https_url());
    let mut args: Vec<String> = Vec::new();
    for i in 0..3 {
        if i > 0 {
            args.push("--next".into());
        }
        args.extend(["-sS", "--http1.1", "--cacert"].map(String::from));
        args.push(plain.ca_pem_path().display().to_string());
        args.extend(
            [
                "-H",
                "content-type: application/json",
                "-H",
                "x-tenant-id: t-keepalive",
                "-d",
                CHAT,
                "-o",
                "/dev/null",
            ]
            .map(String::from),
        );
        args.push(url.clone());
    }
    let st = Command::new("curl")
        .args(&args)
        .status()
        .expect("curl keep-alive");
    assert!(st.success());

    assert_ledger(&redis.url(), "t-gzip", billed(&gz), &obs);
    assert_ledger(&redis.url(), "t-chunked", billed(&chunked), &obs);
    // The plain mock served t-plain (2 calls) then t-keepalive (3 calls): split its ledger.
    let calls = plain.ledger().calls();
    let prices = PriceTable::builtin();
    let sum = |cs: &[llmwarden_tests::mock::ServedCall]| {
        cs.iter().fold((0, 0, 0, 0), |t, c| {
            (
                t.0 + 1,
                t.1 + c.usage.input_tokens,
                t.2 + c.usage.output_tokens,
                t.3 + prices.cost(&c.response_model, &c.usage).nanos().unwrap().0,
            )
        })
    };
    assert_eq!(calls.len(), 5);
    assert_ledger(&redis.url(), "t-plain", sum(&calls[..2]), &obs);
    assert_ledger(&redis.url(), "t-keepalive", sum(&calls[2..]), &obs);
    assert!(
        obs.metric("llmwarden_observer_calls_total") >= 7,
        "{}",
        obs.metrics()
    );
    let stream_len = redis.command(&["XLEN", "llmw:events:bypass"]);
    assert!(
        stream_len.trim() != "0",
        "a bypass event was emitted: XLEN = {stream_len}"
    );
    assert!(
        !obs.log().contains("hello there"),
        "prompts never reach the log"
    );
}

fn python(script: &str, envs: &[(&str, String)]) -> std::process::Child {
    let mut cmd = Command::new(llmwarden_tests::python::venv_python());
    cmd.arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start python")
}

const PY_OPENAI: &str = r#"
import os, sys, time, httpx, openai
if os.environ.get("WAIT_FILE"):
    while not os.path.exists(os.environ["WAIT_FILE"]):
        time.sleep(0.05)
c = openai.OpenAI(base_url=os.environ["URL"] + "/v1", api_key="sk-test-secret",
                  http_client=httpx.Client(verify=os.environ["CA"]),
                  default_headers={"X-Tenant-ID": os.environ["TENANT"]})
c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
s = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}],
                              stream=True, stream_options={"include_usage": True})
for _ in s:
    pass
print("ok")
"#;

const PY_ANTHROPIC: &str = r#"
import os, anthropic
c = anthropic.Anthropic(base_url=os.environ["URL"], api_key="sk-ant-test-secret",
                        http_client=anthropic.DefaultHttpxClient(verify=os.environ["CA"]),
                        default_headers={"X-Tenant-ID": os.environ["TENANT"]})
c.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hello there"}])
with c.messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hello there"}]) as s:
    for _ in s.text_stream:
        pass
print("ok")
"#;

const NODE: &str = r#"
const https = require('https'); const fs = require('fs');
const u = new URL(process.env.URL + '/v1/chat/completions');
const body = JSON.stringify({model: 'gpt-4o-mini', messages: [{role: 'user', content: 'hello there'}]});
const agent = new https.Agent({keepAlive: true, ca: fs.readFileSync(process.env.CA)});
function call(n) {
  if (n === 0) { agent.destroy(); console.log('ok'); return; }
  const req = https.request({hostname: u.hostname, port: u.port, path: u.pathname, method: 'POST', agent,
    headers: {'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'x-tenant-id': process.env.TENANT}},
    res => { res.resume(); res.on('end', () => call(n - 1)); });
  req.on('error', e => { console.error(e); process.exit(1); });
  req.end(body);
}
call(2);
"#;

fn finish(child: std::process::Child, what: &str) {
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn observer_sdk_and_node_clients_started_before_and_after() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let before_mock = mock(MockConfig::default());
    let after_mock = mock(MockConfig::default());
    let anthropic_mock = mock(MockConfig::default());
    let node_mock = mock(MockConfig::default());
    let gate = tempfile::tempdir().expect("tempdir");
    let wait_file = gate.path().join("go");
    let env = |m: &MockProvider, tenant: &str| {
        vec![
            ("URL", m.https_url()),
            ("CA", m.ca_pem_path().display().to_string()),
            ("TENANT", tenant.to_owned()),
        ]
    };
    // Started before the observer: imports the SDK (and libssl) now, calls once the gate opens.
    let mut early_env = env(&before_mock, "t-py-before");
    early_env.push(("WAIT_FILE", wait_file.display().to_string()));
    let early = python(PY_OPENAI, &early_env);
    std::thread::sleep(Duration::from_secs(2));

    let providers = [
        (host(&before_mock), "openai"),
        (host(&after_mock), "openai"),
        (host(&anthropic_mock), "anthropic"),
        (host(&node_mock), "openai"),
    ];
    let providers: Vec<(&str, &str)> = providers.iter().map(|(h, k)| (h.as_str(), *k)).collect();
    let obs = Observer::start(&redis.url(), &providers, "", false);
    std::fs::File::create(&wait_file)
        .and_then(|mut f| f.write_all(b"go"))
        .expect("open gate");
    finish(early, "python openai (started before the observer)");
    finish(
        python(PY_OPENAI, &env(&after_mock, "t-py-after")),
        "python openai (started after)",
    );
    finish(
        python(PY_ANTHROPIC, &env(&anthropic_mock, "t-anthropic")),
        "python anthropic",
    );
    let mut node = Command::new("/usr/bin/node");
    node.arg("-e")
        .arg(NODE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env(&node_mock, "t-node") {
        node.env(k, v);
    }
    finish(node.spawn().expect("node"), "node https");

    assert_ledger(&redis.url(), "t-py-before", billed(&before_mock), &obs);
    assert_ledger(&redis.url(), "t-py-after", billed(&after_mock), &obs);
    assert_ledger(&redis.url(), "t-anthropic", billed(&anthropic_mock), &obs);
    assert_ledger(&redis.url(), "t-node", billed(&node_mock), &obs);
    assert!(
        !obs.log().contains("sk-test-secret") && !obs.log().contains("sk-ant-test-secret"),
        "keys never logged"
    );
}

#[test]
fn observer_sniff_prints_a_python_sdk_call_with_its_cost() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let m = mock(MockConfig::default());
    let h = host(&m);
    // sniff needs no Redis: point redis_url at a port nobody listens on.
    let obs = Observer::start(
        &format!("redis://127.0.0.1:{}/", free_port()),
        &[(h.as_str(), "openai")],
        "",
        true,
    );
    let env = vec![
        ("URL", m.https_url()),
        ("CA", m.ca_pem_path().display().to_string()),
        ("TENANT", "t-sniff".to_owned()),
    ];
    finish(python(PY_OPENAI, &env), "python openai");
    let want = billed(&m);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<serde_json::Value> = obs
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= 2 || Instant::now() > deadline {
            assert_eq!(
                lines.len() as u64,
                want.0,
                "one JSON line per call: {lines:?}\n{}",
                obs.log()
            );
            let cost: i64 = lines
                .iter()
                .map(|l| l["cost_nusd"].as_i64().expect("priced"))
                .sum();
            assert_eq!(cost, want.3, "{lines:?}");
            for l in &lines {
                assert_eq!(l["tenant"], "t-sniff");
                assert_eq!(l["model"], "gpt-4o-mini");
                assert!(
                    l["comm"].as_str().is_some_and(|c| c.starts_with("python")),
                    "{l}"
                );
                assert!(
                    l["pid"].as_u64().is_some()
                        && l["service"].is_string()
                        && l["provider"].is_string()
                );
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn observer_counts_truncation_and_kernel_drops() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let m = mock(MockConfig {
        output_tokens: 400,
        ..MockConfig::default()
    });
    let h = host(&m);
    // A 4 KiB ring (one page) cannot hold a full 4 KiB chunk event (plus its header): every big
    // chunk is a kernel drop. 8 KiB per call: the rest of a 20 KB request body is truncated.
    let obs = Observer::start(
        &redis.url(),
        &[(h.as_str(), "openai")],
        "per_call_bytes = 8192\nring_buffer_bytes = 4096",
        false,
    );
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(20_000)
    );
    let file: &Path =
        &std::env::temp_dir().join(format!("observer-big-{}.json", std::process::id()));
    std::fs::write(file, &big).expect("write body");
    for _ in 0..5 {
        curl(&m, "t-drops", &format!("@{}", file.display()), &[]);
    }
    let _ = std::fs::remove_file(file);
    let deadline = Instant::now() + Duration::from_secs(10);
    while obs.metric("llmwarden_observer_truncated_bytes") == 0
        || obs.metric("llmwarden_observer_kernel_drops") == 0
    {
        assert!(
            Instant::now() < deadline,
            "counters never moved:\n{}",
            obs.metrics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        obs.metric("llmwarden_observer_kernel_dropped_bytes") >= 4096,
        "{}",
        obs.metrics()
    );
}

/// A keep-alive node client that completes its TLS handshake (one warm-up call), prints "warm",
/// waits for WAIT_FILE, then sends N calls paced at RATE per second on the same connection and
/// prints {"reused": <calls on the already-open socket>, "ms": <burst duration>}.
const NODE_BURST: &str = r#"
const https = require('https'); const fs = require('fs');
const u = new URL(process.env.URL + '/v1/chat/completions');
const body = JSON.stringify({model: 'gpt-4o-mini', messages: [{role: 'user', content: 'hello there'}]});
const agent = new https.Agent({keepAlive: true, maxSockets: 1, ca: fs.readFileSync(process.env.CA)});
const N = +process.env.N, RATE = +process.env.RATE;
let reused = 0;
function one(tenant, cb) {
  const req = https.request({hostname: u.hostname, port: u.port, path: u.pathname, method: 'POST', agent,
    headers: {'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'x-tenant-id': tenant}},
    res => { if (req.reusedSocket) reused++; res.resume(); res.on('end', cb); });
  req.on('error', e => { console.error(e); process.exit(1); });
  req.end(body);
}
one('t-warm', () => {
  console.log('warm');
  const gate = setInterval(() => {
    if (!fs.existsSync(process.env.WAIT_FILE)) return;
    clearInterval(gate);
    const t0 = Date.now();
    const next = i => {
      if (i === N) { agent.destroy(); console.log(JSON.stringify({reused, ms: Date.now() - t0})); return; }
      one('t-load', () => setTimeout(() => next(i + 1), Math.max(0, t0 + (i + 1) * 1000 / RATE - Date.now())));
    };
    next(0);
  }, 10);
});
"#;

/// Regression: a burst right after start must be captured completely. A node client that is
/// already mid keep-alive session (TLS handshake done before the observer started) sends 500
/// calls at ~500/s; every one is in the ledger, with zero kernel ring-buffer drops and zero
/// output-queue drops.
#[test]
fn observer_captures_a_burst_from_a_client_already_mid_session() {
    use std::io::BufRead as _;
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    const N: u64 = 500;
    let redis = RedisServer::start();
    let m = mock(MockConfig::default());
    let gate = tempfile::tempdir().expect("tempdir");
    let wait_file = gate.path().join("go");
    let mut node = Command::new("/usr/bin/node");
    node.arg("-e")
        .arg(NODE_BURST)
        .env("URL", m.https_url())
        .env("CA", m.ca_pem_path())
        .env("N", N.to_string())
        .env("RATE", "500")
        .env("WAIT_FILE", &wait_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = node.spawn().expect("node");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("node warm-up");
    assert_eq!(line.trim(), "warm", "node warm-up call failed");

    let h = host(&m);
    // A 256 KiB ring holds ~0.3 s of this burst: a reader that stalls longer than that (discovery
    // work or a cold tokenizer on its thread, as before) shows up as kernel drops, not as lateness.
    let obs = Observer::start(
        &redis.url(),
        &[(h.as_str(), "openai")],
        "ring_buffer_bytes = 262144",
        false,
    );
    std::fs::write(&wait_file, b"go").expect("open gate");
    let started = Instant::now();
    line.clear();
    stdout.read_line(&mut line).expect("node result");
    let out = child.wait_with_output().expect("node wait");
    assert!(
        out.status.success(),
        "node burst failed: {line}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(line.trim()).expect("node result JSON");
    assert_eq!(
        result["reused"].as_u64(),
        Some(N),
        "every burst call rode the connection opened before the observer: {result}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "burst took {:?}",
        started.elapsed()
    );

    let want = billed_tenant(&m, "t-load");
    assert_eq!(want.0, N, "mock served the burst");
    assert_ledger(&redis.url(), "t-load", want, &obs);
    // Kernel counters reach the metrics once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let metrics = obs.metrics();
    assert_eq!(
        obs.metric("llmwarden_observer_kernel_drops"),
        0,
        "ring buffer drops:\n{metrics}"
    );
    assert_eq!(
        obs.metric("llmwarden_observer_sink_queue_drops"),
        0,
        "output queue drops:\n{metrics}"
    );
    assert!(
        obs.metric("llmwarden_observer_calls_total") >= N,
        "calls metric:\n{metrics}"
    );
}

/// The in-kernel allow-lists from the config: a pid list that excludes the client copies nothing
/// (bytes counted as skipped, no call recorded); a cgroup list naming the client's cgroup v2
/// captures it.
#[test]
fn observer_allow_lists_filter_in_the_kernel() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let m = mock(MockConfig::default());
    let h = host(&m);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let ledger = rt
        .block_on(Ledger::connect(&redis.url()))
        .expect("ledger connect");
    let requests = |tenant: &str| {
        rt.block_on(ledger.tenant_spend(tenant, Period::Month, chrono::Utc::now()))
            .expect("tenant_spend")
            .requests
    };

    // pid 1 only: curl is filtered in the kernel.
    {
        let obs = Observer::start(
            &redis.url(),
            &[(h.as_str(), "openai")],
            "allow_pids = [1]",
            false,
        );
        curl(&m, "t-allow-pid", CHAT, &[]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while obs.metric("llmwarden_observer_skipped_bytes") == 0 {
            assert!(
                Instant::now() < deadline,
                "skipped bytes never counted:\n{}",
                obs.metrics()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(requests("t-allow-pid"), 0, "{}", obs.log());
        // Nothing reaches the ring buffer: no data, and no connection ends (SSL_free) either.
        assert_eq!(
            obs.metric("llmwarden_observer_bytes_total"),
            0,
            "{}",
            obs.metrics()
        );
        assert_eq!(
            obs.metric("llmwarden_observer_events_total"),
            0,
            "{}",
            obs.metrics()
        );
    }

    // The test's own cgroup v2 (curl inherits it): captured.
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .expect("read /proc/self/cgroup")
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .expect("a cgroup v2 line");
    let obs = Observer::start(
        &redis.url(),
        &[(h.as_str(), "openai")],
        &format!("allow_cgroups = [\"{cgroup}\"]"),
        false,
    );
    curl(&m, "t-allow-cgroup", CHAT, &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while requests("t-allow-cgroup") < 1 {
        assert!(
            Instant::now() < deadline,
            "call in the allowed cgroup not recorded:\n{}",
            obs.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Any local process can send `X-Tenant-ID: victim`. Unless a rule trusts the process to name
/// its tenant, the call is billed to the rule's tenant and the claimed one pays nothing; a
/// process a rule trusts (`trust_headers = true`) names its tenant as before.
#[test]
fn observer_bills_claimed_tenants_only_for_trusted_processes() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let m = mock(MockConfig::default());
    let h = host(&m);
    // curl's rule names its tenant and does not trust its headers; python is trusted.
    // A process that renames itself after exec (prctl, as workers and the demo do) is matched
    // by the name it has when it calls, not the interpreter's.
    let rules = "[[attribution]]\ncomm = \"curl\"\ntenant = \"team-curl\"\nservice = \"curl\"\n\n\
                 [[attribution]]\ncomm = \"renamed-work*\"\ntenant = \"team-renamed\"\n\n\
                 [[attribution]]\ncomm = \"python*\"\ntrust_headers = true\n";
    let obs = Observer::start(&redis.url(), &[(h.as_str(), "openai")], rules, false);
    curl(&m, "victim", CHAT, &[]);
    assert_ledger(&redis.url(), "team-curl", billed(&m), &obs);

    // The trusted process names its tenant.
    let script = format!(
        "import ssl, urllib.request\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         req = urllib.request.Request({url:?}, data={body:?}.encode(), headers={{'content-type': 'application/json', 'x-tenant-id': 'gateway-tenant'}})\n\
         urllib.request.urlopen(req, context=ctx).read()\n",
        ca = m.ca_pem_path().display().to_string(),
        url = format!("{}/v1/chat/completions", m.https_url()),
        body = CHAT,
    );
    // What one run of a python script made the mock bill.
    let billed_by = |script: &str| {
        let before = billed(&m);
        let out = Command::new(llmwarden_tests::python::venv_python())
            .args(["-c", script])
            .output()
            .expect("run the venv's python");
        assert!(
            out.status.success(),
            "python3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = billed(&m);
        (
            after.0 - before.0,
            after.1 - before.1,
            after.2 - before.2,
            after.3 - before.3,
        )
    };
    assert_ledger(&redis.url(), "gateway-tenant", billed_by(&script), &obs);

    // Renamed after exec: its rule's tenant, not the trusted python rule's header.
    let renamed = format!(
        "import ctypes\n\
         ctypes.CDLL(None).prctl(15, b'renamed-worker', 0, 0, 0)\n{script}"
    );
    assert_ledger(&redis.url(), "team-renamed", billed_by(&renamed), &obs);

    let victim = month_spend(&redis.url(), "victim");
    assert_eq!(
        (victim.requests, victim.spend.0),
        (0, 0),
        "the claimed tenant was charged; observer log:\n{}",
        obs.log()
    );
}

/// A call reporting more usage than any real call (a local fake provider) is refused before the
/// ledger and counted; models outside the price table share one metric label, so made-up names
/// cannot grow the metrics without bound.
#[test]
fn observer_refuses_absurd_usage_and_bounds_model_labels() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let huge = mock(MockConfig {
        output_tokens: 5_000,
        ..MockConfig::default()
    });
    let small = mock(MockConfig::default());
    let (hh, hs) = (host(&huge), host(&small));
    let obs = Observer::start(
        &redis.url(),
        &[(hh.as_str(), "openai"), (hs.as_str(), "openai")],
        "max_tokens_per_call = 2000\n",
        false,
    );
    curl(&huge, "t-absurd", CHAT, &[]);
    // Two made-up model names: one label between them.
    for model in ["made-up-model-1", "made-up-model-2"] {
        let body = CHAT.replace("gpt-4o-mini", model);
        curl(&small, "t-labels", &body, &[]);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while obs.metric("llmwarden_observer_records_refused_total") < 1
        || obs.metric("llmwarden_observer_calls_total") < 2
    {
        assert!(
            Instant::now() < deadline,
            "no refusal or calls counted; log:\n{}\nmetrics:\n{}",
            obs.log(),
            obs.metrics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = obs.metrics();
    assert!(
        metrics.contains("llmwarden_observer_records_refused_total{reason=\"tokens\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("model=\"unpriced\"") && !metrics.contains("made-up-model"),
        "{metrics}"
    );
    let absurd = month_spend(&redis.url(), "t-absurd");
    assert_eq!((absurd.requests, absurd.spend.0), (0, 0), "{}", obs.log());
    assert!(obs.log().contains("call refused"), "{}", obs.log());
}

/// Two streams on one client, as an app makes them; the SDK opens a new connection for the
/// second because it closed the first at `[DONE]` (the body's end was never read).
const PY_OPENAI_STREAMS: &str = r#"
import os, httpx, openai
c = openai.OpenAI(base_url=os.environ["URL"] + "/v1", api_key="sk-test-secret", max_retries=0,
                  http_client=httpx.Client(verify=os.environ["CA"]),
                  default_headers={"X-Tenant-ID": os.environ["TENANT"]})
extra = {"stream_options": {"include_usage": True}} if os.environ["INCLUDE_USAGE"] == "1" else {}
for _ in range(2):
    s = c.chat.completions.create(model="gpt-4o-mini", stream=True, max_tokens=24,
                                  messages=[{"role": "user", "content": "hello there"}], **extra)
    for _ in s:
        pass
print("ok")
"#;

/// The official Python `openai` SDK returns at `data: [DONE]` and closes the connection. Real
/// provider edges send the chunked body's end (`0\r\n\r\n`) in a TLS record of its own, which
/// the client then never reads, so a call recorded at the body's end was never recorded. The
/// mock sends the end 400 ms after the last event: with `include_usage` each stream costs exactly
/// what the provider billed; without it, the call is still recorded, flagged estimated.
#[test]
fn observer_records_python_sdk_streams_that_stop_reading_at_done() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let split = || MockConfig {
        end_delay: Duration::from_millis(400),
        ..MockConfig::default()
    };
    let with_usage = mock(split());
    let without_usage = mock(split());
    let providers = [host(&with_usage), host(&without_usage)];
    let obs = Observer::start(
        &redis.url(),
        &[
            (providers[0].as_str(), "openai"),
            (providers[1].as_str(), "openai"),
        ],
        "",
        false,
    );
    for (m, tenant, include) in [
        (&with_usage, "t-stream-usage", "1"),
        (&without_usage, "t-stream-no-usage", "0"),
    ] {
        let env = vec![
            ("URL", m.https_url()),
            ("CA", m.ca_pem_path().display().to_string()),
            ("TENANT", tenant.to_owned()),
            ("INCLUDE_USAGE", include.to_owned()),
        ];
        finish(python(PY_OPENAI_STREAMS, &env), "python openai streams");
    }
    assert_ledger(&redis.url(), "t-stream-usage", billed(&with_usage), &obs);

    // Without a usage record: both calls recorded, as estimates (input from the request, output
    // from the delivered text), never at $0.
    let deadline = Instant::now() + Duration::from_secs(15);
    let spend = loop {
        let s = month_spend(&redis.url(), "t-stream-no-usage");
        if s.requests >= 2 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (_, _, mock_output, _) = billed(&without_usage);
    assert_eq!(spend.requests, 2, "observer log:\n{}", obs.log());
    assert!(
        spend.spend.0 > 0 && spend.estimated_spend == spend.spend,
        "{spend:?}"
    );
    assert!(spend.input_tokens > 0, "{spend:?}");
    assert!(
        spend.output_tokens >= mock_output,
        "delivered output {} tokens, estimate {} (errs high)",
        mock_output,
        spend.output_tokens
    );
    assert_eq!(
        obs.metric(
            r#"llmwarden_observer_exchanges_total{end="stream_end_event",response="complete"}"#
        ),
        4,
        "{}",
        obs.metrics()
    );
}

/// The official SDKs' async clients over HTTP/2: N concurrent calls (half streamed) as asyncio
/// tasks, which httpx multiplexes on one connection. Prints how many connections answered.
/// (The sync clients shared between threads are not used: httpcore's sync HTTP/2 connection
/// allocates stream ids and encodes headers without a lock, so threads can send HEADERS out of
/// order, which a server must answer with GOAWAY PROTOCOL_ERROR; see docs/observer.md.)
const PY_H2: &str = r#"
import asyncio, os, httpx, openai, anthropic
# Which network streams (connections) answered.
streams = set()
async def seen(r):
    streams.add(id(r.extensions["network_stream"]))
hooks = {"response": [seen]}
N = int(os.environ["N"])
async def main():
    if os.environ["SDK"] == "openai":
        c = openai.AsyncOpenAI(base_url=os.environ["URL"] + "/v1", api_key="sk-test-secret", max_retries=0,
                               http_client=httpx.AsyncClient(verify=os.environ["CA"], http2=True, event_hooks=hooks),
                               default_headers={"X-Tenant-ID": os.environ["TENANT"]})
        async def call(i):
            msgs = [{"role": "user", "content": "hello there %d" % i}]
            if i % 2:
                s = await c.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=20, stream=True,
                                                    stream_options={"include_usage": True})
                async for _ in s:
                    pass
            else:
                await c.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=20)
    else:
        c = anthropic.AsyncAnthropic(base_url=os.environ["URL"], api_key="sk-ant-test-secret", max_retries=0,
                                     http_client=anthropic.DefaultAsyncHttpxClient(verify=os.environ["CA"], http2=True,
                                                                                   event_hooks=hooks),
                                     default_headers={"X-Tenant-ID": os.environ["TENANT"]})
        async def call(i):
            msgs = [{"role": "user", "content": "hello there %d" % i}]
            if i % 2:
                async with c.messages.stream(model="claude-haiku-4-5", max_tokens=20, messages=msgs) as s:
                    async for _ in s.text_stream:
                        pass
            else:
                await c.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=msgs)
    await asyncio.gather(*(call(i) for i in range(N)))
    print("ok, %d connection(s)" % len(streams))
asyncio.run(main())
"#;

/// node's `http2` module: a stream and a non-stream call on one session.
const NODE_H2: &str = r#"
const http2 = require('http2'); const fs = require('fs');
const s = http2.connect(process.env.URL, {ca: fs.readFileSync(process.env.CA)});
let left = 2;
for (const stream of [false, true]) {
  const body = JSON.stringify({model: 'gpt-4o-mini', stream, messages: [{role: 'user', content: 'hello there'}],
                               ...(stream ? {stream_options: {include_usage: true}} : {})});
  const req = s.request({':method': 'POST', ':path': '/v1/chat/completions', 'content-type': 'application/json',
                         'x-tenant-id': process.env.TENANT});
  req.on('response', h => { if (h[':status'] !== 200) { console.error(h); process.exit(1); } });
  req.on('data', () => {});
  req.on('end', () => { if (--left === 0) { s.close(); console.log('ok'); } });
  req.on('error', e => { console.error(e); process.exit(1); });
  req.end(body);
}
"#;

/// HTTP/2 clients, costed exactly: curl's default (it negotiates h2 when the server offers it),
/// stream and non-stream; node's `http2` module; the official `openai` and `anthropic` SDKs
/// with `http2=True`, 50 concurrent calls each (half streamed) multiplexed on one connection
/// per client, no retries.
#[test]
fn observer_meters_http2_clients_exactly() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let h2 = || {
        mock(MockConfig {
            h2: true,
            ..MockConfig::default()
        })
    };
    let (curl_mock, py_mock, ant_mock, node_mock) = (h2(), h2(), h2(), h2());
    let hosts = [
        host(&curl_mock),
        host(&py_mock),
        host(&ant_mock),
        host(&node_mock),
    ];
    let obs = Observer::start(
        &redis.url(),
        &[
            (hosts[0].as_str(), "openai"),
            (hosts[1].as_str(), "openai"),
            (hosts[2].as_str(), "anthropic"),
            (hosts[3].as_str(), "openai"),
        ],
        "",
        false,
    );
    for body in [CHAT, CHAT_STREAM] {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version}",
                "--cacert",
            ])
            .arg(curl_mock.ca_pem_path())
            .args([
                "-H",
                "content-type: application/json",
                "-H",
                "x-tenant-id: t-h2-curl",
            ])
            .args(["-d", body])
            .arg(format!("{}/v1/chat/completions", curl_mock.https_url()))
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "2",
            "curl negotiated h2"
        );
    }
    for (m, sdk, tenant) in [
        (&py_mock, "openai", "t-h2-openai"),
        (&ant_mock, "anthropic", "t-h2-anthropic"),
    ] {
        let env = vec![
            ("URL", m.https_url()),
            ("CA", m.ca_pem_path().display().to_string()),
            ("TENANT", tenant.to_owned()),
            ("SDK", sdk.to_owned()),
            ("N", "50".to_owned()),
        ];
        let out = python(PY_H2, &env).wait_with_output().expect("wait");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{sdk} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.trim(),
            "ok, 1 connection(s)",
            "{sdk}: one connection"
        );
        assert_eq!(billed(m).0, 50, "{sdk}: the mock served 50 calls");
    }
    let mut node = Command::new("/usr/bin/node");
    node.arg("-e")
        .arg(NODE_H2)
        .env("URL", node_mock.https_url())
        .env("CA", node_mock.ca_pem_path())
        .env("TENANT", "t-h2-node")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    finish(node.spawn().expect("node"), "node http2");
    assert_ledger(&redis.url(), "t-h2-node", billed(&node_mock), &obs);
    assert_ledger(&redis.url(), "t-h2-curl", billed(&curl_mock), &obs);
    assert_ledger(&redis.url(), "t-h2-openai", billed(&py_mock), &obs);
    assert_ledger(&redis.url(), "t-h2-anthropic", billed(&ant_mock), &obs);
    assert!(
        obs.metric("llmwarden_observer_http2_connections_total") >= 5,
        "{}",
        obs.metrics()
    );
    assert_eq!(
        obs.metric("llmwarden_observer_parse_errors_total"),
        0,
        "{}",
        obs.metrics()
    );
    assert_eq!(
        obs.metric("llmwarden_observer_ledger_duplicates_total"),
        0,
        "two calls were given one event id: {}",
        obs.metrics()
    );
}
