//! `attach = "on-connect"` (issue 16 item 4): the TLS probes go only into processes the egress
//! accounting sees connect to a provider, with a pid filter. Real probes, the official `openai`
//! SDK (OpenSSL), the TLS mock provider, the shared Redis ledger.
//!
//! What is checked, by the process itself: a uprobe is an `int3` the kernel writes over the
//! probed instruction in the memory of each process it fires in. The Python client compares
//! libssl's code in its own memory (ctypes) with the file's bytes before and after its calls, so
//! each test shows where the kernel put breakpoints, not only what was recorded.
//!
//! The race: a process gets its probes after its first `connect` to a provider, while its TLS
//! handshake runs. The mock waits `handshake_delay` before answering the ClientHello: a provider
//! that far away. The tests measure how many first calls are captured at 0 ms (loopback, the
//! worst case) and require all of them at 5 ms.
//!
//! Needs root (eBPF). Fails — never skips — when not root.

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use llmwarden_tests::mock::{MockConfig, MockProvider};
use llmwarden_tests::observer::{Observer, billed, month_spend, require_root};
use llmwarden_tests::redis::RedisServer;

/// One observer at a time: each attaches host-wide.
static SERIAL: Mutex<()> = Mutex::new(());

const ON_CONNECT: &str = "attach = \"on-connect\"\n";

/// Calls the mock with the `openai` SDK from a worker thread (the probes must fire in every
/// thread of the process, not only the one whose pid was given), `CALLS` times on one
/// keep-alive connection, and prints whether libssl's code in its own memory holds a breakpoint
/// (an `int3` where the file has another byte) before and after (`cc` = one is there, `--` =
/// none; the probes sit where `observer/src/elf/sites.rs` puts them, not always on an entry).
/// With `URL` naming no provider it fetches `/healthz` over HTTPS instead.
const CLIENT: &str = r#"
import ctypes, os, ssl, threading, httpx, openai
maps = [l.split() for l in open("/proc/self/maps").read().split("\n") if "libssl.so" in l]
code = [m for m in maps if "x" in m[1]]
assert code, maps
def first():
    for m in code:
        lo, hi = (int(x, 16) for x in m[0].split("-"))
        with open(m[-1], "rb") as f:
            f.seek(int(m[2], 16))
            disk = f.read(hi - lo)
        mem = ctypes.string_at(lo, len(disk))
        if any(a == 0xcc and b != 0xcc for a, b in zip(mem, disk)):
            return "cc"
    return "--"
before = first()
def run():
    http = httpx.Client(verify=os.environ["CA"])
    if os.environ.get("PLAIN"):
        for _ in range(int(os.environ["CALLS"])):
            http.get(os.environ["URL"] + "/healthz").raise_for_status()
        return
    c = openai.OpenAI(base_url=os.environ["URL"] + "/v1", api_key="sk-test-secret",
                      http_client=http, max_retries=0,
                      default_headers={"X-Tenant-ID": os.environ["TENANT"]})
    for _ in range(int(os.environ["CALLS"])):
        c.chat.completions.create(model="gpt-4o-mini",
                                  messages=[{"role": "user", "content": "hello there"}])
t = threading.Thread(target=run)
t.start()
t.join()
print(before, first())
"#;

/// Whether libssl's code in the client's memory held a breakpoint before and after its calls.
struct Breakpoints {
    before: String,
    after: String,
}

fn client(m: &MockProvider, tenant: &str, calls: usize, plain: bool) -> Breakpoints {
    let mut cmd = Command::new(llmwarden_tests::python::venv_python());
    cmd.args(["-c", CLIENT])
        .env("URL", m.https_url())
        .env("CA", m.ca_pem_path())
        .env("TENANT", tenant)
        .env("CALLS", calls.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if plain {
        cmd.env("PLAIN", "1");
    }
    let out = cmd.output().expect("run python");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let mut parts = line.split_whitespace();
    Breakpoints {
        before: parts.next().expect("byte before").to_owned(),
        after: parts.next().expect("byte after").to_owned(),
    }
}

fn start(redis: &RedisServer, provider: &MockProvider) -> Observer {
    let host = provider.addr().to_string();
    let obs = Observer::start(&redis.url(), &[(&host, "openai")], ON_CONNECT, false);
    // The provider's addresses are in the kernel once the resolver has run.
    obs.wait_log("egress accounting on", Duration::from_secs(20));
    obs
}

/// Waits until the ledger holds `n` calls for `tenant` (at most 15 s), then returns what it holds.
fn ledger_calls(redis_url: &str, tenant: &str, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = month_spend(redis_url, tenant).requests;
        if got >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn probes_go_only_into_processes_that_connect_to_a_provider() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let provider = MockProvider::start_background(MockConfig {
        handshake_delay: Duration::from_millis(5),
        ..MockConfig::default()
    });
    let other = MockProvider::start_background(MockConfig::default());
    let obs = start(&redis, &provider);
    assert_eq!(
        obs.metric("llmwarden_observer_attached_files"),
        0,
        "nothing attached host-wide"
    );

    // HTTPS to a host that is no provider: no probe, no breakpoint, nothing recorded.
    let b = client(&other, "t-none", 3, true);
    assert_ne!(b.before, "cc", "a breakpoint before any connect");
    assert_ne!(
        b.after, "cc",
        "a process that never reached a provider got a breakpoint"
    );
    assert_eq!(
        obs.metric("llmwarden_observer_attaches_total{trigger=\"connect\"}"),
        0
    );

    // Fresh processes calling the provider (5 ms away): each gets its probes at its connect,
    // and every call, the first included, is metered.
    let processes = 6;
    for _ in 0..processes {
        let b = client(&provider, "t-lazy", 2, false);
        assert_ne!(b.before, "cc", "a breakpoint before the process connected");
        assert_eq!(
            b.after,
            "cc",
            "no breakpoint after the process connected; log:\n{}",
            obs.log()
        );
    }
    let served = provider.ledger().calls().len() as u64;
    assert_eq!(served, 2 * processes);
    let got = ledger_calls(&redis.url(), "t-lazy", served);
    assert_eq!(
        got,
        served,
        "on connect, 5 ms away: every call metered; log:\n{}",
        obs.log()
    );
    llmwarden_tests::observer::assert_ledger(&redis.url(), "t-lazy", billed(&provider), &obs);
    assert_eq!(
        obs.metric("llmwarden_observer_attaches_total{trigger=\"connect\"}"),
        processes,
        "one attach per process"
    );
    // The exited processes' probes are detached (after the 5 s exit grace).
    let deadline = Instant::now() + Duration::from_secs(15);
    while obs.metric("llmwarden_observer_attached_processes") > 0 {
        assert!(
            Instant::now() < deadline,
            "exited processes keep their probes:\n{}",
            obs.metrics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "on-connect attach windows (connect to probes live): {}",
        obs.metrics()
            .lines()
            .filter(|l| l.starts_with("llmwarden_observer_connect_attach_seconds"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

/// The race at its worst: the provider on loopback answers at once. A process's first call can
/// be written before its probes are live; the test measures how often, and requires every later
/// call of the process (its probes are live by then) to be metered.
#[test]
fn the_race_on_loopback_loses_at_most_a_first_call() {
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let provider = MockProvider::start_background(MockConfig::default());
    let obs = start(&redis, &provider);
    let processes: u64 = 6;
    let calls: u64 = 3;
    for _ in 0..processes {
        let b = client(&provider, "t-race", calls as usize, false);
        assert_eq!(b.after, "cc", "no breakpoint after the process connected");
    }
    let served = provider.ledger().calls().len() as u64;
    assert_eq!(served, processes * calls);
    let got = ledger_calls(&redis.url(), "t-race", served);
    // Let late records land before reading the final count.
    std::thread::sleep(Duration::from_secs(2));
    let got = got.max(month_spend(&redis.url(), "t-race").requests);
    println!(
        "on-connect, provider 0 ms away: {got} of {served} calls metered ({} first calls of {processes} lost)",
        served - got
    );
    assert!(
        got >= processes * (calls - 1),
        "only first calls may be lost: {got} of {served}; log:\n{}",
        obs.log()
    );
    assert!(got <= served, "more calls metered than served");
}

/// A process that connected before the observer started is found by the start-up scan of
/// provider connections and gets its probes then: its next call on that connection is metered.
#[test]
fn a_process_connected_before_the_start_gets_probes_at_the_start() {
    use std::io::{BufRead as _, BufReader, Write as _};
    require_root();
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let redis = RedisServer::start();
    let provider = MockProvider::start_background(MockConfig::default());
    let script = r#"
import os, sys, httpx, openai
c = openai.OpenAI(base_url=os.environ["URL"] + "/v1", api_key="sk-test-secret",
                  http_client=httpx.Client(verify=os.environ["CA"]), max_retries=0,
                  default_headers={"X-Tenant-ID": "t-early"})
call = lambda: c.chat.completions.create(model="gpt-4o-mini",
                                         messages=[{"role": "user", "content": "hello there"}])
call()
print("first", flush=True)
sys.stdin.readline()
call()
print("second", flush=True)
"#;
    let mut child = Command::new(llmwarden_tests::python::venv_python())
        .args(["-c", script])
        .env("URL", provider.https_url())
        .env("CA", provider.ca_pem_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run python");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("first call");
    assert_eq!(line.trim(), "first");

    let obs = start(&redis, &provider);
    obs.wait_log(
        "probes live in a process connected before the start",
        Duration::from_secs(20),
    );
    writeln!(child.stdin.as_mut().expect("stdin")).expect("signal");
    line.clear();
    out.read_line(&mut line).expect("second call");
    assert_eq!(line.trim(), "second");
    assert!(child.wait().expect("python").success());

    assert_eq!(provider.ledger().calls().len(), 2);
    let got = ledger_calls(&redis.url(), "t-early", 1);
    assert_eq!(
        got,
        1,
        "the call made after the start is metered (the one before it is not seen); log:\n{}",
        obs.log()
    );
}
