//! The mock provider speaks each API in its exact wire shape, bills what its ledger says, injects
//! faults on request, and the official Python SDKs parse what it sends.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llmwarden_tests::mock::{MockApi, MockConfig, MockProvider, ServedCall, Usage};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn client(mock: &MockProvider) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(mock.ca_pem().as_bytes()).expect("mock CA parses");
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client")
}

/// Posts `body` and returns (status, headers, body bytes); panics with context on transport errors.
async fn post(
    c: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut rb = c.post(url).json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let resp = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let bytes = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: reading body: {e}"));
    (status, h, bytes.to_vec())
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// The JSON payloads of an SSE body, with their event names.
fn sse_events(bytes: &[u8]) -> Vec<(Option<String>, Value)> {
    let text = std::str::from_utf8(bytes)
        .expect("SSE is UTF-8")
        .replace("\r\n", "\n");
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut event = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event: ") {
                event = Some(e.to_owned());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            }
        }
        if data == "[DONE]" {
            out.push((event, Value::String(data)));
        } else {
            out.push((event, json_of(data.as_bytes())));
        }
    }
    out
}

fn call_id(h: &reqwest::header::HeaderMap) -> u64 {
    h.get("x-mock-call-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("x-mock-call-id")
}

fn usage(input: u64, cached: u64, w5: u64, w1: u64, output: u64, reasoning: u64) -> Usage {
    Usage {
        input_tokens: input,
        cache_read_tokens: cached,
        cache_write_5m_tokens: w5,
        cache_write_1h_tokens: w1,
        output_tokens: output,
        reasoning_tokens: reasoning,
        estimated: false,
    }
}

async fn served(mock: &MockProvider, h: &reqwest::header::HeaderMap) -> ServedCall {
    mock.ledger().wait_call(call_id(h), WAIT).await
}

const USAGE_HDR: (&str, &str) = ("x-mock-usage", "input=100,cached=20,output=30,reasoning=5");

#[tokio::test]
async fn openai_chat_non_stream_over_tls_and_plain_http() {
    let mock = MockProvider::start(MockConfig::default()).await;
    let c = client(&mock);
    for base in [mock.https_url(), mock.http_url()] {
        let body =
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]});
        let (st, h, b) = post(
            &c,
            &format!("{base}/v1/chat/completions"),
            &[USAGE_HDR],
            &body,
        )
        .await;
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
        let v = json_of(&b);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        assert_eq!(
            text.split_whitespace().count(),
            25,
            "visible tokens = output - reasoning"
        );
        let u = &v["usage"];
        assert_eq!(
            (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64()),
            (Some(120), Some(30))
        );
        assert_eq!(u["total_tokens"], 150);
        assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 20);
        assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 5);
        assert!(
            h.get("content-length").is_some(),
            "non-stream bodies default to Content-Length"
        );
        let call = served(&mock, &h).await;
        assert_eq!(call.api, MockApi::ChatCompletions);
        assert_eq!(call.usage, usage(100, 20, 0, 0, 30, 5));
        assert!(call.usage_reported && !call.client_disconnected && !call.stream);
    }

    // Default usage: input = ceil(text bytes / 4), output = min(max_tokens, 16).
    let body = json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "0123456789"}]});
    let (_, h, b) = post(
        &c,
        &format!("{}/chat/completions", mock.http_url()),
        &[],
        &body,
    )
    .await;
    let v = json_of(&b);
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(served(&mock, &h).await.usage, usage(3, 0, 0, 0, 5, 0));
}

#[tokio::test]
async fn openai_chat_stream_with_and_without_include_usage() {
    let mock = MockProvider::start(MockConfig::default()).await;
    let c = client(&mock);
    let url = format!("{}/v1/chat/completions", mock.https_url());
    let body = json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hi"}]});
    let (st, h, b) = post(&c, &url, &[USAGE_HDR, ("x-mock-chunks", "5")], &body).await;
    assert_eq!(st, 200);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(h.get("content-length").is_none(), "streams are chunked");
    let ev = sse_events(&b);
    assert_eq!(ev.last().unwrap().1, "[DONE]");
    let chunks: Vec<&Value> = ev.iter().map(|e| &e.1).filter(|v| v.is_object()).collect();
    // role chunk + 5 content chunks + finish chunk + usage chunk
    assert_eq!(chunks.len(), 8);
    for ch in &chunks[..7] {
        assert!(
            ch["usage"].is_null() && ch.as_object().unwrap().contains_key("usage"),
            "usage:null on {ch}"
        );
        assert_eq!(ch["object"], "chat.completion.chunk");
    }
    let last = chunks[7];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 120);
    assert_eq!(last["usage"]["completion_tokens"], 30);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text.split_whitespace().count(), 25);
    let call = served(&mock, &h).await;
    assert!(call.stream && call.usage_reported);
    assert_eq!((call.chunks_planned, call.chunks_sent), (9, 9));
    assert_eq!(call.usage, usage(100, 20, 0, 0, 30, 5));

    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let (_, h, b) = post(&c, &url, &[USAGE_HDR], &body).await;
    let ev = sse_events(&b);
    for (_, v) in ev.iter().filter(|e| e.1.is_object()) {
        assert!(
            !v.as_object().unwrap().contains_key("usage"),
            "no usage field without include_usage: {v}"
        );
    }
    let call = served(&mock, &h).await;
    assert!(!call.usage_reported, "the usage was billed but never shown");
    assert_eq!(call.usage, usage(100, 20, 0, 0, 30, 5));
}

#[tokio::test]
async fn openai_responses_embeddings_and_completions() {
    let mock = MockProvider::start(MockConfig {
        model_snapshot: Some("-2025-04-14".into()),
        ..MockConfig::default()
    })
    .await;
    let c = client(&mock);
    let base = format!("{}/v1", mock.https_url());

    let body = json!({"model": "gpt-4.1", "input": "Tell me a story"});
    let (_, h, b) = post(&c, &format!("{base}/responses"), &[USAGE_HDR], &body).await;
    let v = json_of(&b);
    assert_eq!(v["object"], "response");
    assert_eq!(v["model"], "gpt-4.1-2025-04-14");
    assert_eq!(v["output"][0]["type"], "reasoning");
    assert_eq!(v["output"][1]["content"][0]["type"], "output_text");
    assert_eq!(v["usage"]["input_tokens"], 120);
    assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 20);
    assert_eq!(v["usage"]["output_tokens"], 30);
    assert_eq!(v["usage"]["output_tokens_details"]["reasoning_tokens"], 5);
    let call = served(&mock, &h).await;
    assert_eq!(
        (call.model.as_str(), call.response_model.as_str()),
        ("gpt-4.1", "gpt-4.1-2025-04-14")
    );
    assert_eq!(call.usage, usage(100, 20, 0, 0, 30, 5));

    let body = json!({"model": "gpt-4.1", "input": "Tell me a story", "stream": true});
    let (_, h, b) = post(
        &c,
        &format!("{base}/responses"),
        &[USAGE_HDR, ("x-mock-chunks", "4")],
        &body,
    )
    .await;
    let ev = sse_events(&b);
    assert_eq!(ev[0].0.as_deref(), Some("response.created"));
    assert_eq!(
        ev.iter()
            .filter(|e| e.0.as_deref() == Some("response.output_text.delta"))
            .count(),
        4
    );
    let (name, done) = ev.last().unwrap();
    assert_eq!(name.as_deref(), Some("response.completed"));
    assert_eq!(done["response"]["usage"]["output_tokens"], 30);
    for (i, (_, e)) in ev.iter().enumerate() {
        assert_eq!(e["sequence_number"], i);
    }
    assert!(served(&mock, &h).await.usage_reported);

    let body =
        json!({"model": "text-embedding-3-small", "input": ["a", "b", "c"], "dimensions": 4});
    let (_, h, b) = post(
        &c,
        &format!("{base}/embeddings"),
        &[("x-mock-usage", "input=8")],
        &body,
    )
    .await;
    let v = json_of(&b);
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    assert_eq!(v["data"][2]["embedding"].as_array().unwrap().len(), 4);
    assert_eq!(v["usage"], json!({"prompt_tokens": 8, "total_tokens": 8}));
    assert_eq!(served(&mock, &h).await.usage, usage(8, 0, 0, 0, 0, 0));

    let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once", "max_tokens": 7});
    let (_, h, b) = post(&c, &format!("{base}/completions"), &[], &body).await;
    let v = json_of(&b);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(served(&mock, &h).await.api, MockApi::Completions);

    let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once", "stream": true,
                      "stream_options": {"include_usage": true}});
    let (_, _, b) = post(&c, &format!("{base}/completions"), &[], &body).await;
    let ev = sse_events(&b);
    assert_eq!(ev[ev.len() - 2].1["usage"]["completion_tokens"], 16);
}

const CACHE_HDR: (&str, &str) = (
    "x-mock-usage",
    "input=12,cached=4096,cache_write_5m=2048,cache_write_1h=512,output=40",
);

#[tokio::test]
async fn anthropic_messages_with_cache_reads_and_both_write_kinds() {
    let mock = MockProvider::start(MockConfig::default()).await;
    let c = client(&mock);
    let url = format!("{}/v1/messages", mock.https_url());
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 1024,
                      "messages": [{"role": "user", "content": "Hello"}]});
    let (st, h, b) = post(&c, &url, &[CACHE_HDR], &body).await;
    assert_eq!(st, 200);
    let v = json_of(&b);
    assert_eq!(
        (v["type"].as_str(), v["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    assert_eq!(v["stop_reason"], "end_turn");
    let u = &v["usage"];
    assert_eq!(u["input_tokens"], 12);
    assert_eq!(u["cache_read_input_tokens"], 4096);
    assert_eq!(u["cache_creation_input_tokens"], 2560);
    assert_eq!(
        u["cache_creation"],
        json!({"ephemeral_5m_input_tokens": 2048, "ephemeral_1h_input_tokens": 512})
    );
    assert_eq!(u["output_tokens"], 40);
    assert_eq!(
        served(&mock, &h).await.usage,
        usage(12, 4096, 2048, 512, 40, 0)
    );

    let mut body = body;
    body["stream"] = json!(true);
    let (_, h, b) = post(&c, &url, &[CACHE_HDR, ("x-mock-chunks", "3")], &body).await;
    let ev = sse_events(&b);
    let names: Vec<&str> = ev.iter().map(|e| e.0.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(ev[0].1["message"]["usage"]["cache_read_input_tokens"], 4096);
    assert_eq!(ev[0].1["message"]["usage"]["input_tokens"], 12);
    assert_eq!(ev[7].1["usage"]["output_tokens"], 40);
    let call = served(&mock, &h).await;
    assert!(call.usage_reported);
    assert_eq!(call.usage, usage(12, 4096, 2048, 512, 40, 0));

    let (_, h, b) = post(
        &c,
        &format!("{}/v1/messages/count_tokens", mock.http_url()),
        &[("x-mock-usage", "input=77")],
        &json!({"model": "claude-sonnet-4-5", "messages": []}),
    )
    .await;
    assert_eq!(json_of(&b), json!({"input_tokens": 77}));
    assert_eq!(
        served(&mock, &h).await.usage,
        Usage::default(),
        "count_tokens is free"
    );
}

#[tokio::test]
async fn gemini_generate_and_stream_in_sse_and_json_array() {
    let mock = MockProvider::start(MockConfig::default()).await;
    let c = client(&mock);
    let base = format!("{}/v1beta/models/gemini-2.5-flash", mock.https_url());
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "Why is the sky blue?"}]}]});
    let hdr = ("x-mock-usage", "input=8,cached=2,output=62,reasoning=50");
    let (_, h, b) = post(&c, &format!("{base}:generateContent"), &[hdr], &body).await;
    let v = json_of(&b);
    let um = &v["usageMetadata"];
    assert_eq!(um["promptTokenCount"], 10);
    assert_eq!(um["cachedContentTokenCount"], 2);
    assert_eq!(um["candidatesTokenCount"], 12);
    assert_eq!(um["thoughtsTokenCount"], 50);
    assert_eq!(um["totalTokenCount"], 72);
    assert_eq!(v["modelVersion"], "gemini-2.5-flash");
    let call = served(&mock, &h).await;
    assert_eq!(call.model, "gemini-2.5-flash");
    assert_eq!(call.usage, usage(8, 2, 0, 0, 62, 50));

    let (_, h, b) = post(
        &c,
        &format!("{base}:streamGenerateContent?alt=sse"),
        &[hdr, ("x-mock-chunks", "3")],
        &body,
    )
    .await;
    assert!(
        String::from_utf8_lossy(&b).contains("\r\n\r\n"),
        "Gemini frames SSE with CRLF"
    );
    let ev = sse_events(&b);
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[2].1["usageMetadata"]["candidatesTokenCount"], 12);
    assert_eq!(ev[2].1["candidates"][0]["finishReason"], "STOP");
    assert!(served(&mock, &h).await.usage_reported);

    let (_, h, b) = post(
        &c,
        &format!("{base}:streamGenerateContent"),
        &[hdr, ("x-mock-chunks", "3")],
        &body,
    )
    .await;
    let arr = json_of(&b);
    assert_eq!(
        arr.as_array().map(Vec::len),
        Some(3),
        "a streamed JSON array"
    );
    assert_eq!(arr[2]["usageMetadata"]["thoughtsTokenCount"], 50);
    assert!(served(&mock, &h).await.stream);
}

#[tokio::test]
async fn auth_is_enforced_in_each_providers_shape_and_headers_are_recorded() {
    let mock = MockProvider::start(MockConfig {
        require_key: Some("sk-real".into()),
        ..MockConfig::default()
    })
    .await;
    let c = client(&mock);
    let base = mock.https_url();
    let chat = json!({"model": "gpt-4o", "messages": []});
    let (st, _, b) = post(
        &c,
        &format!("{base}/v1/chat/completions"),
        &[("authorization", "Bearer sk-wrong")],
        &chat,
    )
    .await;
    assert_eq!(st, 401);
    assert_eq!(json_of(&b)["error"]["code"], "invalid_api_key");
    let (st, _, b) = post(
        &c,
        &format!("{base}/v1/messages"),
        &[],
        &json!({"model": "claude", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(st, 401);
    assert_eq!(json_of(&b)["error"]["type"], "authentication_error");
    let (st, _, b) = post(
        &c,
        &format!("{base}/v1beta/models/g:generateContent"),
        &[],
        &json!({}),
    )
    .await;
    assert_eq!(
        (st, json_of(&b)["error"]["status"].as_str()),
        (401, Some("UNAUTHENTICATED"))
    );
    assert!(mock.ledger().is_empty(), "rejected calls are not served");

    let (st, ..) = post(
        &c,
        &format!("{base}/v1/chat/completions"),
        &[("authorization", "Bearer sk-real"), ("x-tenant-id", "acme")],
        &chat,
    )
    .await;
    assert_eq!(st, 200);
    let (st, ..) = post(
        &c,
        &format!("{base}/v1/messages"),
        &[("x-api-key", "sk-real")],
        &json!({"model": "claude", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(st, 200);
    let (st, ..) = post(
        &c,
        &format!("{base}/v1beta/models/g:generateContent?key=sk-real"),
        &[],
        &json!({}),
    )
    .await;
    assert_eq!(st, 200);
    let calls = mock.ledger().wait_for(3, WAIT).await;
    assert_eq!(mock.ledger().header_values("x-tenant-id"), ["acme"]);
    assert_eq!(calls[0].header("authorization"), Some("Bearer sk-real"));
    assert!(calls[2].path_and_query.ends_with("?key=sk-real"));
    assert!(!mock.ledger().any_call_had_header("x-feature-name"));
}

fn stream_body() -> Value {
    json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn faults_status_slow_first_byte_invalid_json_and_truncation() {
    let mock = MockProvider::start(MockConfig::default()).await;
    let c = client(&mock);
    let url = format!("{}/v1/chat/completions", mock.https_url());
    for (code, ty) in [
        (500, "server_error"),
        (429, "requests"),
        (400, "invalid_request_error"),
    ] {
        let f = format!("status={code}");
        let (st, h, b) = post(&c, &url, &[("x-mock-fault", &f)], &stream_body()).await;
        assert_eq!(st, code);
        assert_eq!(json_of(&b)["error"]["type"], ty);
        let call = served(&mock, &h).await;
        assert_eq!(
            (call.status, call.usage),
            (code, Usage::default()),
            "errors bill nothing"
        );
    }
    let (st, _, b) = post(
        &c,
        &format!("{}/v1/messages", mock.https_url()),
        &[("x-mock-fault", "status=529")],
        &json!({"model": "claude", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(
        (st, json_of(&b)["error"]["type"].as_str()),
        (529, Some("overloaded_error"))
    );

    let t0 = Instant::now();
    let (st, ..) = post(
        &c,
        &url,
        &[("x-mock-fault", "slow-first-byte=300")],
        &stream_body(),
    )
    .await;
    assert!(st == 200 && t0.elapsed() >= Duration::from_millis(300));

    let (_, h, b) = post(
        &c,
        &url,
        &[("x-mock-fault", "invalid-json")],
        &json!({"model": "m", "messages": []}),
    )
    .await;
    assert!(serde_json::from_slice::<Value>(&b).is_err());
    assert!(!served(&mock, &h).await.usage_reported);

    let (_, h, b) = post(
        &c,
        &url,
        &[("x-mock-fault", "truncated-sse=3"), ("x-mock-chunks", "4")],
        &stream_body(),
    )
    .await;
    let text = String::from_utf8(b).unwrap();
    assert_eq!(
        text.matches("\n\n").count(),
        3,
        "three whole events then half of one: {text}"
    );
    assert!(!text.ends_with("\n\n"));
    let call = served(&mock, &h).await;
    assert!(!call.usage_reported && !call.client_disconnected);
    assert_eq!(call.chunks_sent, 4);
}

#[tokio::test]
async fn faults_reset_mid_stream_and_stall() {
    let mock = MockProvider::start(MockConfig::default()).await;
    let c = client(&mock);
    for base in [mock.https_url(), mock.http_url()] {
        let url = format!("{base}/v1/chat/completions");
        let mut resp = c
            .post(&url)
            .header("x-mock-fault", "reset-mid-stream=3")
            .json(&stream_body())
            .send()
            .await
            .expect("headers arrive before the reset");
        let id = call_id(resp.headers());
        let mut got = Vec::new();
        let err = loop {
            match resp.chunk().await {
                Ok(Some(ch)) => got.extend_from_slice(&ch),
                Ok(None) => panic!("the body must fail, got a clean end after {got:?}"),
                Err(e) => break e,
            }
        };
        assert!(
            err.is_body() || err.is_decode() || err.is_request(),
            "{err:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&got).matches("data: ").count(),
            3,
            "frames before the reset arrive"
        );
        let call = mock.ledger().wait_call(id, WAIT).await;
        assert_eq!(call.chunks_sent, 3);
        assert!(!call.usage_reported);
    }

    let url = format!("{}/v1/chat/completions", mock.https_url());
    let mut resp = c
        .post(&url)
        .header("x-mock-fault", "stall=2")
        .json(&stream_body())
        .send()
        .await
        .expect("headers");
    let id = call_id(resp.headers());
    let mut got = Vec::new();
    let stalled = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(ch) = resp.chunk().await.expect("no error while stalled") {
            got.extend_from_slice(&ch);
        }
    })
    .await;
    assert!(stalled.is_err(), "the stream must stall, not end");
    assert_eq!(String::from_utf8_lossy(&got).matches("data: ").count(), 2);
    drop(resp);
    let call = mock.ledger().wait_call(id, WAIT).await;
    assert!(call.client_disconnected, "recorded when the client gave up");
    assert_eq!(call.chunks_sent, 2);
}

#[tokio::test]
async fn client_disconnect_is_recorded_with_chunks_delivered() {
    let mock = MockProvider::start(MockConfig::default()).await;
    let c = client(&mock);
    let url = format!("{}/v1/messages", mock.http_url());
    let body =
        json!({"model": "claude-haiku-4-5", "max_tokens": 1000, "stream": true, "messages": []});
    let mut resp = c
        .post(&url)
        .header("x-mock-usage", "output=200")
        .header("x-mock-chunks", "100")
        .header("x-mock-chunk-delay-ms", "20")
        .json(&body)
        .send()
        .await
        .expect("send");
    let id = call_id(resp.headers());
    let first = resp.chunk().await.expect("chunk").expect("some data");
    assert!(first.starts_with(b"event: message_start"));
    drop(resp);
    let call = mock.ledger().wait_call(id, WAIT).await;
    assert!(call.client_disconnected);
    assert!(
        call.chunks_sent < call.chunks_planned,
        "{} of {}",
        call.chunks_sent,
        call.chunks_planned
    );
}

#[tokio::test]
async fn gzip_chunked_latency_and_h2() {
    let mock = MockProvider::start(MockConfig {
        h2: true,
        latency: Duration::from_millis(50),
        ..MockConfig::default()
    })
    .await;
    let c = client(&mock);
    let url = format!("{}/v1/chat/completions", mock.https_url());
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});

    let t0 = Instant::now();
    let resp = c.post(&url).json(&body).send().await.expect("send");
    assert!(
        t0.elapsed() >= Duration::from_millis(50),
        "configured latency"
    );
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "h2 offered in ALPN"
    );

    // gzip is opt-in and needs the client to accept it
    let (_, h, b) = post(&c, &url, &[("x-mock-gzip", "1")], &body).await;
    assert!(
        h.get("content-encoding").is_none(),
        "client did not accept gzip"
    );
    json_of(&b);
    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(mock.ca_pem().as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    for stream in [false, true] {
        let mut body = body.clone();
        body["stream"] = json!(stream);
        let (_, h, b) = post(
            &h1,
            &url,
            &[("x-mock-gzip", "1"), ("accept-encoding", "gzip, deflate")],
            &body,
        )
        .await;
        assert_eq!(h["content-encoding"], "gzip");
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&b[..])
            .read_to_string(&mut plain)
            .expect("valid gzip");
        if stream {
            assert!(plain.ends_with("data: [DONE]\n\n"));
        } else {
            assert_eq!(json_of(plain.as_bytes())["object"], "chat.completion");
        }
    }

    let (_, h, b) = post(&h1, &url, &[("x-mock-chunked", "1")], &body).await;
    assert_eq!(
        h.get("transfer-encoding").map(|v| v.to_str().unwrap()),
        Some("chunked")
    );
    assert_eq!(json_of(&b)["object"], "chat.completion");
}

/// Kills the spawned mock when the test ends, even by panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn mock_provider_binary_prints_its_address_and_appends_its_ledger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = dir.path().join("ledger.jsonl");
    let ca = dir.path().join("ca.pem");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-provider"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--tls",
            "--print-addr",
            "--latency-ms",
            "1",
            "--key",
            "K",
        ])
        .arg("--ca-out")
        .arg(&ca)
        .arg("--ledger-out")
        .arg(&ledger)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn mock-provider");
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let mut stdout = std::io::BufReader::new(stdout);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read the address line");
    let info = json_of(line.as_bytes());
    assert_eq!(info["ca_pem"], ca.display().to_string());
    let https = info["https_url"].as_str().expect("https_url").to_owned();

    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--cacert"])
        .arg(&ca)
        .args([
            "-H",
            "x-api-key: K",
            "-H",
            "content-type: application/json",
            "-H",
            "x-mock-usage: input=9,output=3",
        ])
        .args([
            "-d",
            r#"{"model":"claude-haiku-4-5","max_tokens":10,"messages":[]}"#,
        ])
        .arg(format!("{https}/v1/messages"))
        .output()
        .expect("curl");
    child.0.kill().expect("kill mock-provider");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_of(&out.stdout)["usage"]["output_tokens"], 3);
    let rec = std::fs::read_to_string(&ledger).expect("ledger file");
    let rec = json_of(rec.lines().next().expect("one line").as_bytes());
    assert_eq!(rec["api"], "anthropic_messages");
    assert_eq!(rec["usage"]["input_tokens"], 9);
    assert_eq!(rec["usage"]["output_tokens"], 3);
    assert!(
        !rec.to_string().contains("\"K\""),
        "no header values in the ledger file"
    );
}

#[tokio::test]
async fn python_sdks_parse_the_mock_over_tls() {
    let py = llmwarden_tests::python::venv_python();
    let mock = MockProvider::start(MockConfig {
        require_key: Some("sk-mock".into()),
        ..MockConfig::default()
    })
    .await;
    let script = llmwarden_tests::process::workspace_root().join("tests/python/mock_sdk_check.py");
    let out = tokio::process::Command::new(py)
        .arg(&script)
        .arg(mock.https_url())
        .arg(mock.ca_pem_path())
        .env("SSL_CERT_FILE", mock.ca_pem_path())
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_of(
        stdout
            .trim()
            .lines()
            .last()
            .expect("a JSON line")
            .as_bytes(),
    );
    assert_eq!(
        report["openai_chat"],
        json!({"prompt": 120, "completion": 30, "cached": 20, "reasoning": 5})
    );
    assert_eq!(
        report["openai_chat_stream"],
        json!({"prompt": 120, "completion": 30, "text_words": 25})
    );
    assert_eq!(
        report["openai_responses"],
        json!({"input": 120, "output": 30})
    );
    let anth = json!({"input": 12, "output": 40, "cache_read": 4096, "cache_write": 2560});
    assert_eq!(report["anthropic_messages"], anth);
    assert_eq!(report["anthropic_messages_stream"], anth);
    assert_eq!(report["openai_embeddings"], json!({"n": 2, "prompt": 8}));
    let calls = mock.ledger().wait_for(6, WAIT).await;
    assert!(
        calls
            .iter()
            .all(|c| c.status == 200 && !c.client_disconnected),
        "{calls:#?}"
    );
}

/// The ledger reads back exactly what the mock says it billed, for every API, stream and not.
#[tokio::test]
async fn ledger_parsers_read_back_what_the_mock_billed() {
    use ledger::{ProviderKind, StreamMeter, classify, parse_response};
    let mock = MockProvider::start(MockConfig {
        model_snapshot: Some("-2025-01-01".into()),
        ..MockConfig::default()
    })
    .await;
    let c = client(&mock);
    let msgs =
        json!([{"role": "user", "content": "What is the capital of France? Answer briefly."}]);
    let all = "input=100,cached=20,cache_write_5m=7,cache_write_1h=3,output=30,reasoning=5";
    let cases: Vec<(ProviderKind, &str, Value)> = vec![
        (
            ProviderKind::OpenAi,
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "messages": msgs}),
        ),
        (
            ProviderKind::OpenAi,
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "messages": msgs, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            ProviderKind::OpenAi,
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once"}),
        ),
        (
            ProviderKind::OpenAi,
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once", "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            ProviderKind::OpenAi,
            "/v1/responses",
            json!({"model": "o4-mini", "input": "hi"}),
        ),
        (
            ProviderKind::OpenAi,
            "/v1/responses",
            json!({"model": "o4-mini", "input": "hi", "stream": true}),
        ),
        (
            ProviderKind::OpenAi,
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "hi"}),
        ),
        (
            ProviderKind::Anthropic,
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": msgs}),
        ),
        (
            ProviderKind::Anthropic,
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": msgs, "stream": true}),
        ),
        (
            ProviderKind::Gemini,
            "/v1beta/models/gemini-2.5-flash:generateContent",
            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
        ),
        (
            ProviderKind::Gemini,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
        ),
        (
            ProviderKind::Gemini,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
        ),
    ];
    for (kind, path, body) in cases {
        for usage_hdr in [all, ""] {
            let endpoint = classify(kind, kind.as_str(), "POST", path)
                .unwrap_or_else(|| panic!("ledger classifies {path}"));
            let mut resp = c
                .post(format!("{}{path}", mock.https_url()))
                .header("x-mock-usage", usage_hdr)
                .header("x-mock-chunks", "7")
                .json(&body)
                .send()
                .await
                .expect("send");
            let id = call_id(resp.headers());
            let mut meter = StreamMeter::new(&endpoint);
            let mut whole = Vec::new();
            while let Some(ch) = resp.chunk().await.expect("chunk") {
                // Feed in uneven pieces, as a proxy would see them.
                for piece in ch.chunks(13) {
                    meter.feed(piece);
                }
                whole.extend_from_slice(&ch);
            }
            let call = mock.ledger().wait_call(id, WAIT).await;
            let meta = if call.stream {
                meter.finish()
            } else {
                parse_response(&endpoint, &whole).expect("parse_response")
            };
            let what = format!("{path} {body} usage={usage_hdr:?}");
            assert_eq!(meta.usage, Some(call.usage), "{what}");
            if call.api != MockApi::Embeddings {
                assert_eq!(
                    meta.model.as_deref(),
                    Some(call.response_model.as_str()),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn background_mock_serves_synchronous_clients_like_curl() {
    let mock = MockProvider::start_background(MockConfig::default());
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--compressed", "--cacert"])
        .arg(mock.ca_pem_path())
        .args([
            "-H",
            "content-type: application/json",
            "-H",
            "x-mock-gzip: 1",
            "-H",
            "x-mock-usage: input=5,output=4",
        ])
        .args(["-d", r#"{"model":"gpt-4o-mini","messages":[]}"#])
        .arg(format!("{}/v1/chat/completions", mock.https_url()))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_of(&out.stdout)["usage"]["total_tokens"], 9);
    let calls = mock.ledger().wait_for_blocking(1, WAIT);
    assert_eq!(calls[0].usage, usage(5, 0, 0, 0, 4, 0));
    assert!(
        calls[0]
            .header("accept-encoding")
            .is_some_and(|v| v.contains("gzip"))
    );
}
