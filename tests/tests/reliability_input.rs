//! Hostile or broken input (issue 5 item 4) over raw TCP to the real enforcer binary: conflicting
//! Content-Length and Transfer-Encoding, bad header bytes, garbage instead of HTTP, slow clients
//! (head and body), oversized and malformed bodies, invalid UTF-8. Every case gets a clear error
//! or a closed connection, nothing reaches the upstream, nothing is recorded, and the enforcer lives.

mod enforcer_common;
mod reliability_common;

use std::time::{Duration, Instant};

use enforcer_common::{KEY_OPS, Opts, Stack};
use ledger::Nanos;
use reliability_common::{PROMPT, assert_log_clean, call};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `parts` (pausing `gap` between them) and reads until the server closes or 5 s pass.
async fn raw(port: u16, parts: &[&[u8]], gap: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    for p in parts {
        if s.write_all(p).await.is_err() {
            break;
        }
        tokio::time::sleep(gap).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn head(path: &str, extra: &str) -> String {
    format!(
        "POST /proxy/openai/v1{path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_OPS}\r\n\
         x-tenant-id: hostile\r\ncontent-type: application/json\r\nconnection: close\r\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_clear_errors_and_records_nothing() {
    let top = "timeouts.client_ms = 600\nmax_request_body_bytes = 4096\n";
    let stack = Stack::start(Opts {
        top_toml: top.into(),
        ..Opts::default()
    })
    .await;
    let port = stack.port;
    let body = serde_json::to_string(&reliability_common::chat(false)).expect("json");
    let none = Duration::ZERO;

    // Content-Length and Transfer-Encoding together (a smuggling attempt): hyper applies RFC 9112
    // 6.3 (chunked wins, Content-Length is discarded) and the enforcer re-frames the body itself, so
    // exactly one request reaches the upstream, with its own Content-Length and no chunking, and
    // the bytes after the chunked body are never read as a second request.
    let smuggled = "GET /proxy/openai/v1/models HTTP/1.1\r\nhost: x\r\n\r\n";
    let r = raw(
        port,
        &[head(
            "/chat/completions",
            &format!(
                "content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n{smuggled}",
                body.len()
            ),
        )
        .as_bytes()],
        none,
    )
    .await;
    assert!(matches!(status(&r), 200 | 400) || r.is_empty(), "{r}");
    assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "one response only: {r}");
    let upstream_calls = stack.mock.ledger().calls();
    assert!(upstream_calls.len() <= 1, "{}", upstream_calls.len());
    for c in &upstream_calls {
        assert!(!c.has_header("transfer-encoding"), "chunked upstream");
        assert_eq!(
            c.header("content-length"),
            Some(body.len().to_string().as_str())
        );
        assert!(c.path_and_query.ends_with("/chat/completions"));
    }
    let expected_calls = upstream_calls.len();
    // Two different Content-Length values.
    let r = raw(
        port,
        &[head(
            "/chat/completions",
            "content-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        )
        .as_bytes()],
        none,
    )
    .await;
    assert!(status(&r) == 400 || r.is_empty(), "{r}");
    // A header value with control bytes, and a header name with a space.
    let r = raw(
        port,
        &[head(
            "/chat/completions",
            "x-feature-name: a\x01b\r\ncontent-length: 2\r\n\r\n{}",
        )
        .as_bytes()],
        none,
    )
    .await;
    assert!(status(&r) == 400 || r.is_empty(), "{r}");
    let r = raw(
        port,
        &[head(
            "/chat/completions",
            "bad header: x\r\ncontent-length: 2\r\n\r\n{}",
        )
        .as_bytes()],
        none,
    )
    .await;
    assert!(status(&r) == 400 || r.is_empty(), "{r}");
    // Not HTTP at all.
    let r = raw(port, &[b"\x16\x03\x01\x02\x00garbage\r\n\r\n"], none).await;
    assert!(status(&r) == 400 || r.is_empty(), "{r}");
    // A slow client that never finishes its head: closed after timeouts.client_ms.
    let t = Instant::now();
    let r = raw(
        port,
        &[b"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nhost: x\r\n"],
        none,
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "slow head kept open {:?}",
        t.elapsed()
    );
    assert!(status(&r) == 408 || r.is_empty(), "{r}");
    // A slow body: 400 naming timeouts.client_ms.
    let r = raw(
        port,
        &[
            head("/chat/completions", "content-length: 100\r\n\r\n").as_bytes(),
            b"{\"model\":",
        ],
        Duration::from_millis(100),
    )
    .await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(r.contains("timeouts.client_ms"), "{r}");
    // Oversized (declared), non-JSON, invalid UTF-8 inside JSON, wrong JSON shape.
    let r = raw(
        port,
        &[head("/chat/completions", "content-length: 999999\r\n\r\n").as_bytes()],
        none,
    )
    .await;
    assert_eq!(status(&r), 413, "{r}");
    for bad in [
        b"not json at all".to_vec(),
        b"{\"model\": \"gpt-4o-mini\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec(),
        b"{\"model\": 42, \"messages\": 7}".to_vec(),
        b"[]".to_vec(),
        Vec::new(),
    ] {
        let mut req = head("/chat/completions", &format!("content-length: {}\r\n\r\n", bad.len())).into_bytes();
        req.extend_from_slice(&bad);
        let r = raw(port, &[&req], none).await;
        assert_eq!(status(&r), 400, "{:?} -> {r}", String::from_utf8_lossy(&bad));
        assert!(r.contains("\"error\""), "provider error shape: {r}");
    }
    // Unknown provider and unknown path.
    let r = raw(port, &[format!("POST /proxy/nope/x HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_OPS}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n").as_bytes()], none).await;
    assert_eq!(status(&r), 404, "{r}");
    let r = raw(
        port,
        &[b"GET /../../etc/passwd HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"],
        none,
    )
    .await;
    assert!(matches!(status(&r), 400 | 404), "{r}");
    // A good body split across slow writes within the deadline still works.
    let mut req = head(
        "/chat/completions",
        &format!("content-length: {}\r\n\r\n", body.len()),
    )
    .into_bytes();
    req.extend_from_slice(body.as_bytes());
    let (a, b) = req.split_at(req.len() / 2);
    let r = raw(port, &[a, b], Duration::from_millis(100)).await;
    assert_eq!(status(&r), 200, "{r}");

    // Nothing hostile reached the upstream or the ledger; the enforcer is alive.
    assert_eq!(
        stack.mock.ledger().len(),
        expected_calls + 1,
        "only well-framed calls went upstream"
    );
    let n = u64::try_from(expected_calls + 1).expect("small");
    let s = stack.settled("hostile", n).await;
    assert_eq!((s.requests, s.held), (n, Nanos::ZERO));
    assert!(
        stack
            .ledger
            .holds("hostile", 10)
            .await
            .expect("holds")
            .is_empty()
    );
    let (st, _, _) = call(&stack, "hostile", &[], false).await;
    assert_eq!(st, 200);
    assert!(!stack.log().contains("panicked"), "a panic in the log");
    assert!(!PROMPT.is_empty());
    assert_log_clean(&stack);
}
