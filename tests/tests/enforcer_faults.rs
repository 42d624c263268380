//! Upstream faults and hostile input: the client gets a clear error, the ledger is settled or
//! released correctly, and nothing is billed wrongly. Also unknown models (deny / allow at the
//! default price), h2c clients and gzip-capable clients.

mod enforcer_common;

use std::time::Duration;

use enforcer_common::{KEY_OPS, Opts, Stack, http};
use futures::StreamExt as _;
use ledger::Nanos;
use ledger::price::PriceTable;
use serde_json::{Value, json};

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 50,
           "messages": [{"role": "user", "content": "a question about faults"}]})
}

async fn send(url: &str, tenant: &str, headers: &[(&str, &str)], body: &Value) -> (u16, String) {
    let mut rb = http()
        .post(url)
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", tenant)
        .json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status().as_u16();
    let mut text = Vec::new();
    let mut s = r.bytes_stream();
    while let Some(Ok(b)) = s.next().await {
        text.extend_from_slice(&b);
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_release_or_settle() {
    let top =
        "max_request_body_bytes = 4096\ntimeouts.first_byte_ms = 700\ntimeouts.idle_ms = 500\n";
    let stack = Stack::start(Opts {
        top_toml: top.into(),
        ..Opts::default()
    })
    .await;
    let url = format!("{}/chat/completions", stack.base("openai"));

    // 5xx before any output: the provider's error goes back, the hold is released, nothing billed.
    let (st, body) = send(
        &url,
        "f-500",
        &[("x-mock-fault", "status=500")],
        &chat(false),
    )
    .await;
    assert_eq!(st, 500, "{body}");
    let s = stack.spend("f-500").await;
    assert_eq!(
        (s.spend, s.held, s.requests),
        (Nanos::ZERO, Nanos::ZERO, 0),
        "{s:?}"
    );

    // Slow first byte: 504 within the deadline. The provider had the request and may bill it,
    // so the call is settled at its reservation, flagged estimated (never released to $0).
    let (st, body) = send(
        &url,
        "f-firstbyte",
        &[("x-mock-fault", "slow-first-byte=3000")],
        &chat(false),
    )
    .await;
    assert_eq!(st, 504, "{body}");
    assert!(body.contains("first_byte_ms"), "{body}");
    let s = stack.settled("f-firstbyte", 1).await;
    assert!(s.spend.0 > 0 && s.estimated_spend == s.spend, "{s:?}");

    // Reset mid-stream after some output: settled from what was delivered, flagged estimated.
    let (st, body) = send(
        &url,
        "f-reset",
        &[
            ("x-mock-fault", "reset-mid-stream=4"),
            ("x-mock-chunks", "20"),
            ("x-mock-chunk-delay-ms", "20"),
        ],
        &chat(true),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let s = stack.settled("f-reset", 1).await;
    assert!(
        s.spend.0 > 0 && s.estimated_spend == s.spend,
        "reset stream not settled as an estimate: {s:?}"
    );

    // A stalled stream: the idle timeout ends it and settles it as an estimate.
    let (st, body) = send(
        &url,
        "f-stall",
        &[("x-mock-fault", "stall=3"), ("x-mock-chunks", "20")],
        &chat(true),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let s = stack.settled("f-stall", 1).await;
    assert!(
        s.spend.0 > 0 && s.estimated_spend == s.spend,
        "stalled stream: {s:?}"
    );

    // A slow but live stream (a chunk every 150 ms, 1.5 s in all) outlasts the 500 ms idle
    // timeout without tripping it: the deadline counts from the last frame, not the first.
    let (st, body) = send(
        &url,
        "f-slow",
        &[("x-mock-chunk-delay-ms", "150"), ("x-mock-chunks", "10")],
        &chat(true),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("[DONE]"), "slow stream cut: {body}");
    let s = stack.settled("f-slow", 1).await;
    assert!(
        s.spend.0 > 0 && s.estimated_spend.0 == 0,
        "slow stream not settled with its real usage: {s:?}"
    );

    // Hostile input.
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    assert_eq!(send(&url, "f-in", &[], &big).await.0, 413);
    let r = http()
        .post(&url)
        .bearer_auth(KEY_OPS)
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let r = http()
        .post(&url)
        .bearer_auth(KEY_OPS)
        .body(vec![0xff, 0xfe, 0x00])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let r = http()
        .post(format!("{}/images/generations", stack.base("openai")))
        .bearer_auth(KEY_OPS)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "unmetered_endpoint");
    let r = http()
        .post(format!("{}/x", stack.base("nope")))
        .bearer_auth(KEY_OPS)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let r = http()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            stack.port
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let r = http()
        .post(&url)
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", "bad{tenant}")
        .json(&chat(false))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    // Unknown model under the default deny policy: 400 naming prices_file, never forwarded.
    let before = stack.mock.ledger().len();
    let mut m = chat(false);
    m["model"] = json!("my-private-model");
    let (st, body) = send(&url, "f-unknown", &[], &m).await;
    assert_eq!(st, 400, "{body}");
    assert!(
        body.contains("prices_file") && body.contains("unknown_model"),
        "{body}"
    );
    assert_eq!(stack.mock.ledger().len(), before);

    // The enforcer survived all of it.
    assert_eq!(send(&url, "f-ok", &[], &chat(false)).await.0, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_allowed_at_the_default_price_h2c_and_gzip() {
    let top = "unknown_model = \"allow\"\nunknown_model_price.input_usd_per_mtok = 15.0\nunknown_model_price.output_usd_per_mtok = 75.0\n";
    let stack = Stack::start(Opts {
        top_toml: top.into(),
        ..Opts::default()
    })
    .await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    let mut m = chat(false);
    m["model"] = json!("my-private-model");
    let (st, body) = send(
        &url,
        "u-allow",
        &[("x-mock-usage", "input=1000,output=100")],
        &m,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // 1000 x $15/M + 100 x $75/M = $0.0225, never $0.
    assert_eq!(stack.settled("u-allow", 1).await.spend, Nanos(22_500_000));

    // h2c (prior knowledge) works the same.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("h2 client");
    let r = h2
        .post(&url)
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", "u-h2")
        .header("x-mock-usage", "input=10,output=5")
        .json(&chat(false))
        .send()
        .await
        .expect("h2c send");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-warden-cost-usd"));
    let usage = ledger::usage::Usage {
        input_tokens: 10,
        output_tokens: 5,
        ..Default::default()
    };
    let want = PriceTable::builtin()
        .cost("gpt-4o-mini", &usage)
        .nanos()
        .expect("priced");
    assert_eq!(stack.settled("u-h2", 1).await.spend, want);

    // A client that accepts gzip from a provider that would gzip: the enforcer asks for identity,
    // so metering sees plaintext and billing stays exact.
    let (st, body) = send(
        &url,
        "u-gzip",
        &[
            ("accept-encoding", "gzip"),
            ("x-mock-gzip", "1"),
            ("x-mock-usage", "input=10,output=5"),
        ],
        &chat(true),
    )
    .await;
    assert_eq!(st, 200);
    assert!(body.contains("[DONE]"), "not plaintext: {body}");
    let s = stack.settled("u-gzip", 1).await;
    assert_eq!((s.spend, s.estimated_spend), (want, Nanos::ZERO));
}

/// A CA and a localhost leaf signed by it: (ca pem, leaf cert pem, leaf key pem).
fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_h2_and_http1() {
    let pki = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = test_pki();
    std::fs::write(pki.path().join("cert.pem"), cert).expect("write cert");
    std::fs::write(pki.path().join("key.pem"), key).expect("write key");
    let top = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        pki.path().join("cert.pem").display(),
        pki.path().join("key.pem").display()
    );
    let stack = Stack::start(Opts {
        top_toml: top,
        ..Opts::default()
    })
    .await;
    let root = reqwest::Certificate::from_pem(ca.as_bytes()).expect("ca");
    let url = format!(
        "https://localhost:{}/proxy/openai/chat/completions",
        stack.port
    );
    for h2 in [true, false] {
        let mut b = reqwest::Client::builder().add_root_certificate(root.clone());
        if !h2 {
            b = b.http1_only();
        }
        let r = b
            .build()
            .expect("client")
            .post(&url)
            .bearer_auth(KEY_OPS)
            .header("x-tenant-id", "tls")
            .json(&chat(false))
            .send()
            .await
            .expect("TLS call");
        assert_eq!(r.status(), 200);
        let want = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(r.version(), want);
    }
    stack.settled("tls", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_denies_with_503_in_time() {
    let stack = Stack::start(Opts {
        top_toml: "timeouts.redis_ms = 300\n".into(),
        ..Opts::default()
    })
    .await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    assert_eq!(send(&url, "r-ok", &[], &chat(false)).await.0, 200);
    stack.redis.pause();
    let before = stack.mock.ledger().len();
    let t = std::time::Instant::now();
    let (st, body) = send(&url, "r-down", &[], &chat(false)).await;
    let took = t.elapsed();
    stack.redis.resume();
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("ledger_unavailable"), "{body}");
    assert!(took < Duration::from_secs(3), "denial took {took:?}");
    assert_eq!(
        stack.mock.ledger().len(),
        before,
        "a call went upstream without a reservation"
    );
    // Redis back: calls flow again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(send(&url, "r-back", &[], &chat(false)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_admits_and_counts_under_allow() {
    let top = "timeouts.redis_ms = 300\non_redis_unavailable = \"allow\"\nredis_unavailable_cap_usd = 0.00005\n";
    let stack = Stack::start(Opts {
        top_toml: top.into(),
        ..Opts::default()
    })
    .await;
    let url = format!("{}/chat/completions", stack.base("openai"));
    stack.redis.pause();
    let (st, body) = send(&url, "r-allow", &[], &chat(false)).await;
    // The per-instance emergency allowance ($0.00005) admits one such call, not two.
    let (st2, body2) = send(&url, "r-allow", &[], &chat(false)).await;
    let m = http()
        .get(format!("{}/metrics", stack.admin()))
        .bearer_auth(enforcer_common::ADMIN_TOKEN)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    stack.redis.resume();
    assert_eq!(st, 200, "{body}");
    assert_eq!(st2, 503, "{body2}");
    assert!(body2.contains("redis_unavailable_cap_usd"), "{body2}");
    assert!(
        m.contains("llmwarden_redis_unavailable_admissions_total 1"),
        "{m}"
    );
}
