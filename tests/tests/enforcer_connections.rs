//! Client connections cannot exhaust the enforcer: idle ones close on every protocol and
//! listener, the connection count is capped, and running out of file descriptors pauses the
//! accept loop instead of spinning it (enforcer binary, real redis-server, the mock provider).

mod enforcer_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use enforcer_common::{KEY_ACME, Opts, Stack, http};
use serde_json::json;

/// The h2 client connection preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// h2 frame type of GOAWAY.
const GOAWAY: u8 = 0x7;

/// The value of one sample (`name{labels}`), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Reads until the peer closes (or `limit` passes); returns the bytes and when the close came.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (got, Some(start.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (got, Some(start.elapsed()));
            }
            Err(e) => panic!("reading from the enforcer: {e}"),
        }
    }
    (got, None)
}

/// The frame types in a server's h2 byte stream.
fn h2_frame_types(mut b: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while b.len() >= 9 {
        let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
        types.push(b[3]);
        b = &b[(9 + len).min(b.len())..];
    }
    types
}

fn chat() -> serde_json::Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_on_every_protocol_and_listener() {
    let stack = Stack::start(Opts {
        top_toml: "timeouts.connection_idle_ms = 1000".into(),
        ..Opts::default()
    })
    .await;
    // h2c with prior knowledge: the preface, then nothing. GOAWAY, then the close, after ~1 s.
    let mut h2 = TcpStream::connect(("127.0.0.1", stack.port)).expect("connect");
    h2.write_all(H2_PREFACE).expect("h2 preface");
    // An HTTP/1.1 client that connects and never sends a byte, on the proxy and the admin port.
    let mut h1 = TcpStream::connect(("127.0.0.1", stack.port)).expect("connect");
    let mut admin = TcpStream::connect(("127.0.0.1", stack.admin_port)).expect("connect admin");
    let (bytes, closed) = read_to_close(&mut h2, Duration::from_secs(10));
    let closed = closed.expect("an idle h2c connection stayed open for 10 s");
    assert!(
        closed >= Duration::from_millis(900),
        "closed after {closed:?}, before the idle period"
    );
    let types = h2_frame_types(&bytes);
    assert!(
        types.contains(&GOAWAY),
        "the idle h2c connection closed without GOAWAY (frame types {types:?})"
    );
    for (name, s) in [("proxy h1", &mut h1), ("admin", &mut admin)] {
        let (_, closed) = read_to_close(s, Duration::from_secs(10));
        assert!(
            closed.is_some(),
            "an idle {name} connection stayed open for 10 s (timeouts.client_ms is 30 s; the idle \
             timeout must close it)"
        );
    }
    // A call in flight longer than the idle period is not cut: the provider answers after 2.5 s.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("h2c client");
    let r = client
        .post(format!("{}/v1/chat/completions", stack.base("openai")))
        .bearer_auth(KEY_ACME)
        .header("x-mock-latency-ms", "2500")
        .json(&chat())
        .send()
        .await
        .expect("a slow call over h2c");
    assert_eq!(r.status(), 200);
    let body = r.text().await.expect("body");
    assert!(body.contains("usage"), "the slow call's body: {body}");
    stack.settled("acme", 1).await;
    let m = stack.metrics().await;
    assert!(
        sample(
            &m,
            "llmwarden_connection_idle_closes_total{listener=\"proxy\"}"
        ) >= 2.0,
        "idle closes not counted:\n{m}"
    );
    assert!(
        sample(
            &m,
            "llmwarden_connection_idle_closes_total{listener=\"admin\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_ones_wait_for_a_free_slot() {
    let stack = Stack::start(Opts {
        top_toml: "max_connections = 3".into(),
        ..Opts::default()
    })
    .await;
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", stack.port)).expect("connect"))
        .collect();
    // Give the enforcer time to accept all three.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = format!("{}/v1/chat/completions", stack.base("openai"));
    let waiting = http()
        .post(&url)
        .bearer_auth(KEY_ACME)
        .timeout(Duration::from_millis(800))
        .json(&chat())
        .send()
        .await;
    assert!(
        waiting.as_ref().is_err_and(reqwest::Error::is_timeout),
        "a fourth connection was served past max_connections = 3: {waiting:?}"
    );
    // One slot frees: the next call goes through.
    drop(held.pop());
    let r = http()
        .post(&url)
        .bearer_auth(KEY_ACME)
        .json(&chat())
        .send()
        .await
        .expect("a call once a slot is free");
    assert_eq!(r.status(), 200);
    let m = stack.metrics().await;
    assert!(
        sample(
            &m,
            "llmwarden_connection_limit_waits_total{listener=\"proxy\"}"
        ) >= 1.0,
        "limit waits not counted:\n{m}"
    );
    drop(held);
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = &stat[stat.rfind(") ").expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_pauses_and_recovers() {
    let stack = Stack::start(Opts {
        nofile: Some(96),
        ..Opts::default()
    })
    .await;
    // Warm up: the upstream connection pool and Redis connections take their descriptors now.
    let url = format!("{}/v1/chat/completions", stack.base("openai"));
    let r = http()
        .post(&url)
        .bearer_auth(KEY_ACME)
        .json(&chat())
        .send()
        .await
        .expect("first call");
    assert_eq!(r.status(), 200);
    // More connections than descriptors left: accept fails with EMFILE while they are open.
    let held: Vec<TcpStream> = (0..150)
        .map(|_| TcpStream::connect(("127.0.0.1", stack.port)).expect("connect"))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = stack.enforcer.pid();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_ticks(pid) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).expect("clock ticks");
    assert!(
        spent * 10 < hz * 2,
        "the enforcer burned {spent} ticks ({hz}/s) in 2 s with its descriptors exhausted: the \
         accept loop spins"
    );
    let log = stack.log();
    assert!(
        log.contains("accept failed"),
        "no accept failure logged with 150 connections and 96 descriptors:\n{log}"
    );
    drop(held);
    // The descriptors free up: calls go through again, and the failures were counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http()
            .post(&url)
            .bearer_auth(KEY_ACME)
            .json(&chat())
            .send()
            .await;
        if r.as_ref().is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no call served 10 s after the connections closed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = stack.metrics().await;
    assert!(
        sample(&m, "llmwarden_accept_errors_total{listener=\"proxy\"}") >= 1.0,
        "accept errors not counted:\n{m}"
    );
    stack.settled("acme", 2).await;
}

/// An HTTP/1.1 connection reads ahead at most 64 KiB (so 64 clients sending large bodies do not
/// each hold ~400 KiB buffers, hyper's default): a request head must fit in that. One that does
/// gets through; one that does not gets 431 at once, not a hang or a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_up_to_the_read_buffer_pass_larger_ones_get_431() {
    let stack = Stack::start(Opts::default()).await;
    let fits = "a".repeat(40 << 10);
    let r = http()
        .post(format!("{}/v1/chat/completions", stack.base("openai")))
        .bearer_auth(KEY_ACME)
        .header("x-padding", &fits)
        .json(&chat())
        .send()
        .await
        .expect("a call with a 40 KiB header");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    stack.settled("acme", 1).await;

    let too_big = "a".repeat(70 << 10);
    let mut s = TcpStream::connect(("127.0.0.1", stack.port)).expect("connect");
    let head = format!(
        "POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-padding: {too_big}\r\n\
         content-length: 2\r\n\r\n{{}}"
    );
    // The enforcer may answer and close before the whole head is written.
    let _ = s.write_all(head.as_bytes());
    let (bytes, closed) = read_to_close(&mut s, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "a 70 KiB request head got {text:?}"
    );
    assert!(closed.is_some(), "the connection stayed open after the 431");
}

/// Before the listener opens, every proxy thread has opened its Redis connection and the scripts
/// a call runs are loaded (docs/enforcer.md, "Runtime threads"), so the first calls pay neither a
/// connect nor a NOSCRIPT round trip and a second load: a first call on each thread opens no
/// connection to Redis and gets no NOSCRIPT error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_proxy_thread_connects_to_redis_and_loads_the_call_scripts_before_listening() {
    let stack = Stack::start(Opts {
        top_toml: "proxy_threads = 2".into(),
        ..Opts::default()
    })
    .await;
    let loads = stack.redis.command(&["INFO", "commandstats"]);
    let script_loads: u64 = loads
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_script|load:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        script_loads >= 2 * 5,
        "two threads should each load the five call scripts: {loads}"
    );
    // `INFO` lines are `name:value`, read like samples.
    let before = sample(
        &stack.redis.command(&["INFO", "clients"]),
        "connected_clients:",
    );
    assert!(
        before >= 3.0,
        "the shared connection and two threads' at least: {before}"
    );
    // Two connections at once: the enforcer places them on different threads.
    let calls = (0..2).map(|_| async {
        let c = http();
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let r = c
                .post(format!("{}/v1/chat/completions", stack.base("openai")))
                .bearer_auth(KEY_ACME)
                .json(&chat())
                .send()
                .await
                .expect("POST");
            statuses.push(r.status().as_u16());
            let _ = r.bytes().await;
        }
        statuses
    });
    let statuses = futures::future::join_all(calls).await;
    assert_eq!(statuses, vec![vec![200, 200], vec![200, 200]]);
    let errors = stack.redis.command(&["INFO", "errorstats"]);
    assert_eq!(
        sample(&errors, "errorstat_NOSCRIPT:count="),
        0.0,
        "{errors}"
    );
    let after = sample(
        &stack.redis.command(&["INFO", "clients"]),
        "connected_clients:",
    );
    assert_eq!(
        after, before,
        "the calls opened Redis connections of their own"
    );
}
