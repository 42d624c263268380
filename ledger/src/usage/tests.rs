//! Usage extraction against the provider fixtures (ledger/tests/fixtures) and cases written from
//! the providers' API references. Every count is asserted exactly.

use proptest::prelude::*;

use super::*;
use crate::provider::ProviderDetector;

mod sparse;
mod streams;

const OPENAI_CHAT: &str = include_str!("../../tests/fixtures/openai-chat.json");
const OPENAI_CHAT_STREAM: &str =
    include_str!("../../tests/fixtures/openai-chat-stream-include-usage.sse");
const OPENAI_RESPONSES: &str = include_str!("../../tests/fixtures/openai-responses.json");
const OPENAI_RESPONSES_STREAM: &str =
    include_str!("../../tests/fixtures/openai-responses-stream.sse");
const OPENAI_EMBEDDINGS: &str = include_str!("../../tests/fixtures/openai-embeddings.json");
const ANTHROPIC: &str = include_str!("../../tests/fixtures/anthropic-messages.json");
const ANTHROPIC_STREAM: &str = include_str!("../../tests/fixtures/anthropic-messages-stream.sse");
const GEMINI: &str = include_str!("../../tests/fixtures/gemini-generate-content.json");
const GEMINI_STREAM: &str = include_str!("../../tests/fixtures/gemini-stream-generate-content.sse");

pub(super) fn ep(host: &str, path: &str) -> Endpoint {
    ProviderDetector::new()
        .detect(host, "POST", path)
        .expect("known endpoint")
}

pub(super) fn chat() -> Endpoint {
    ep("api.openai.com", "/v1/chat/completions")
}
pub(super) fn responses() -> Endpoint {
    ep("api.openai.com", "/v1/responses")
}
pub(super) fn messages() -> Endpoint {
    ep("api.anthropic.com", "/v1/messages")
}
pub(super) fn gemini_gen() -> Endpoint {
    ep(
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:generateContent",
    )
}
pub(super) fn gemini_sse() -> Endpoint {
    ep(
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    )
}
pub(super) fn gemini_array() -> Endpoint {
    ep(
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
    )
}

fn response(endpoint: &Endpoint, body: &str) -> ResponseMeta {
    parse_response(endpoint, body.as_bytes()).expect("valid response")
}

pub(super) fn usage(
    input: u64,
    cache_read: u64,
    w5: u64,
    w1h: u64,
    output: u64,
    reasoning: u64,
) -> Usage {
    Usage {
        input_tokens: input,
        cache_read_tokens: cache_read,
        cache_write_5m_tokens: w5,
        cache_write_1h_tokens: w1h,
        output_tokens: output,
        reasoning_tokens: reasoning,
        estimated: false,
    }
}

pub(super) fn stream(endpoint: &Endpoint, chunks: &[&[u8]]) -> ResponseMeta {
    let mut meter = StreamMeter::new(endpoint);
    for chunk in chunks {
        meter.feed(chunk);
    }
    meter.finish()
}

pub(super) fn stream_whole(endpoint: &Endpoint, body: &str) -> ResponseMeta {
    stream(endpoint, &[body.as_bytes()])
}

// === fixtures ===

#[test]
fn fixture_openai_chat_subtracts_cached_tokens() {
    let meta = response(&chat(), OPENAI_CHAT);
    assert_eq!(meta.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    let u = meta.usage.expect("usage");
    assert_eq!(u, usage(93, 1024, 0, 0, 46, 0));
    assert_eq!(u.prompt_tokens(), 1117);
    assert_eq!(u.total_tokens(), 1163);
}

#[test]
fn fixture_openai_chat_stream() {
    let meta = stream_whole(&chat(), OPENAI_CHAT_STREAM);
    assert_eq!(meta.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    assert_eq!(meta.usage, Some(usage(9, 0, 0, 0, 3, 0)));
}

#[test]
fn fixture_openai_responses_reasoning_inside_output() {
    let meta = response(&responses(), OPENAI_RESPONSES);
    assert_eq!(meta.model.as_deref(), Some("o4-mini-2025-04-16"));
    assert_eq!(meta.usage, Some(usage(36, 0, 0, 0, 1035, 896)));
}

#[test]
fn fixture_openai_responses_stream() {
    let meta = stream_whole(&responses(), OPENAI_RESPONSES_STREAM);
    assert_eq!(meta.model.as_deref(), Some("gpt-4.1-2025-04-14"));
    assert_eq!(meta.usage, Some(usage(37, 0, 0, 0, 11, 0)));
}

#[test]
fn fixture_openai_embeddings() {
    let meta = response(&ep("api.openai.com", "/v1/embeddings"), OPENAI_EMBEDDINGS);
    assert_eq!(meta.model.as_deref(), Some("text-embedding-3-small"));
    assert_eq!(meta.usage, Some(usage(8, 0, 0, 0, 0, 0)));
}

#[test]
fn fixture_anthropic_input_excludes_cache() {
    let meta = response(&messages(), ANTHROPIC);
    assert_eq!(meta.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
    let u = meta.usage.expect("usage");
    assert_eq!(u, usage(12, 4096, 2048, 0, 6, 0));
    assert_eq!(u.prompt_tokens(), 12 + 4096 + 2048);
}

#[test]
fn fixture_anthropic_stream() {
    let meta = stream_whole(&messages(), ANTHROPIC_STREAM);
    assert_eq!(meta.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
    assert_eq!(meta.usage, Some(usage(25, 1800, 0, 0, 15, 0)));
}

#[test]
fn fixture_gemini_thoughts_are_output() {
    let meta = response(&gemini_gen(), GEMINI);
    assert_eq!(meta.model.as_deref(), Some("gemini-2.5-flash"));
    assert_eq!(meta.usage, Some(usage(8, 0, 0, 0, 62, 50)));
}

#[test]
fn fixture_gemini_stream_last_usage_wins() {
    let meta = stream_whole(&gemini_sse(), GEMINI_STREAM);
    assert_eq!(meta.model.as_deref(), Some("gemini-2.5-flash"));
    assert_eq!(meta.usage, Some(usage(8, 0, 0, 0, 33, 28)));
}

// === non-stream cases from the API references ===

#[test]
fn openai_o_series_chat_with_reasoning_and_cache() {
    let body = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"o3-2025-04-16",
      "choices":[{"index":0,"message":{"role":"assistant","content":"42"},"finish_reason":"stop"}],
      "usage":{"prompt_tokens":2500,"completion_tokens":1800,"total_tokens":4300,
        "prompt_tokens_details":{"cached_tokens":2048,"audio_tokens":0},
        "completion_tokens_details":{"reasoning_tokens":1792,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#;
    assert_eq!(
        response(&chat(), body).usage,
        Some(usage(452, 2048, 0, 0, 1800, 1792))
    );
}

#[test]
fn openai_legacy_completions() {
    let body = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"gpt-3.5-turbo-instruct",
      "choices":[{"text":"\n\nThis is a test","index":0,"logprobs":null,"finish_reason":"length"}],
      "usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
    let meta = response(&ep("api.openai.com", "/v1/completions"), body);
    assert_eq!(meta.model.as_deref(), Some("gpt-3.5-turbo-instruct"));
    assert_eq!(meta.usage, Some(usage(5, 0, 0, 0, 7, 0)));
}

#[test]
fn openai_responses_with_cached_input() {
    let body = r#"{"id":"resp_1","object":"response","status":"completed","model":"gpt-5-2025-08-07","output":[],
      "usage":{"input_tokens":3000,"input_tokens_details":{"cached_tokens":2816},"output_tokens":500,
      "output_tokens_details":{"reasoning_tokens":320},"total_tokens":3500}}"#;
    assert_eq!(
        response(&responses(), body).usage,
        Some(usage(184, 2816, 0, 0, 500, 320))
    );
}

#[test]
fn deepseek_cache_hit_fields() {
    let body = r#"{"id":"x","object":"chat.completion","model":"deepseek-chat","choices":[],
      "usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120,
      "prompt_cache_hit_tokens":64,"prompt_cache_miss_tokens":36}}"#;
    let meta = response(&ep("api.deepseek.com", "/chat/completions"), body);
    assert_eq!(meta.usage, Some(usage(36, 64, 0, 0, 20, 0)));
}

#[test]
fn azure_chat_model_from_response_and_deployment_fallback() {
    let endpoint = ep(
        "myres.openai.azure.com",
        "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
    );
    let body = r#"{"id":"x","object":"chat.completion","model":"gpt-4o-2024-11-20","choices":[],
      "usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0}}}"#;
    let meta = response(&endpoint, body);
    assert_eq!(meta.model.as_deref(), Some("gpt-4o-2024-11-20"));
    assert_eq!(meta.usage, Some(usage(19, 0, 0, 0, 10, 0)));
    let meta = response(
        &endpoint,
        r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
    );
    assert_eq!(meta.model.as_deref(), Some("prod-4o"));
}

#[test]
fn anthropic_one_hour_cache_writes() {
    let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-1-20250805","content":[],
      "usage":{"input_tokens":50,"cache_creation_input_tokens":3000,"cache_read_input_tokens":0,
      "cache_creation":{"ephemeral_5m_input_tokens":1000,"ephemeral_1h_input_tokens":2000},"output_tokens":300}}"#;
    assert_eq!(
        response(&messages(), body).usage,
        Some(usage(50, 0, 1000, 2000, 300, 0))
    );
}

#[test]
fn anthropic_cache_creation_without_split_is_5m() {
    let body = r#"{"type":"message","model":"claude-3-5-haiku-20241022","content":[],
      "usage":{"input_tokens":10,"cache_creation_input_tokens":1500,"cache_read_input_tokens":200,"output_tokens":40}}"#;
    assert_eq!(
        response(&messages(), body).usage,
        Some(usage(10, 200, 1500, 0, 40, 0))
    );
}

#[test]
fn vertex_anthropic_uses_path_model_when_body_has_none() {
    let endpoint = ep(
        "us-east5-aiplatform.googleapis.com",
        "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict",
    );
    let meta = response(
        &endpoint,
        r#"{"type":"message","content":[],"usage":{"input_tokens":3,"output_tokens":4}}"#,
    );
    assert_eq!(meta.model.as_deref(), Some("claude-sonnet-4@20250514"));
    assert_eq!(meta.usage, Some(usage(3, 0, 0, 0, 4, 0)));
}

#[test]
fn gemini_cached_content_and_tool_use_prompt() {
    let body = r#"{"candidates":[{"content":{"parts":[{"text":"ok"}],"role":"model"},"finishReason":"STOP"}],
      "usageMetadata":{"promptTokenCount":40000,"cachedContentTokenCount":32768,"candidatesTokenCount":120,
      "toolUsePromptTokenCount":900,"thoughtsTokenCount":400,"totalTokenCount":41420},"modelVersion":"gemini-2.5-pro"}"#;
    let u = response(&gemini_gen(), body).usage.expect("usage");
    assert_eq!(u, usage(7232 + 900, 32768, 0, 0, 520, 400));
    assert_eq!(u.total_tokens(), 41420);
}

#[test]
fn gemini_non_sse_array_body() {
    let body = "[{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]}}],\"usageMetadata\":{\"promptTokenCount\":5},\"modelVersion\":\"gemini-2.5-flash\"}\r\n,{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"b\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":2,\"totalTokenCount\":7}}]";
    let meta = response(&gemini_array(), body);
    assert_eq!(meta.usage, Some(usage(5, 0, 0, 0, 2, 0)));
    assert_eq!(meta.model.as_deref(), Some("gemini-2.5-flash"));
}

#[test]
fn count_tokens_is_free() {
    let meta = response(
        &ep("api.anthropic.com", "/v1/messages/count_tokens"),
        r#"{"input_tokens":2095}"#,
    );
    assert_eq!(meta.usage, Some(Usage::default()));
    let meta = response(
        &ep(
            "generativelanguage.googleapis.com",
            "/v1beta/models/gemini-2.5-flash:countTokens",
        ),
        r#"{"totalTokens":31}"#,
    );
    assert_eq!(meta.usage, Some(Usage::default()));
}

#[test]
fn error_bodies_have_no_usage() {
    let meta = response(
        &chat(),
        r#"{"error":{"message":"Rate limit","type":"requests","code":"rate_limit_exceeded"}}"#,
    );
    assert_eq!(meta, ResponseMeta::default());
    let meta = response(
        &messages(),
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    );
    assert_eq!(meta.usage, None);
}

#[test]
fn invalid_bodies_are_errors_naming_the_api() {
    let err = parse_response(&chat(), b"{not json").expect_err("invalid");
    assert!(
        matches!(
            err,
            Error::Json {
                what: "OpenAI chat completions response",
                ..
            }
        ),
        "{err}"
    );
    let err = parse_response(&messages(), b"[1,2]").expect_err("array");
    assert!(
        matches!(
            err,
            Error::Shape {
                what: "Anthropic messages response",
                ..
            }
        ),
        "{err}"
    );
    let err =
        parse_response(&chat(), br#"{"usage":{"prompt_tokens":"12"}}"#).expect_err("string count");
    assert!(
        err.to_string().contains("usage.prompt_tokens is a string"),
        "{err}"
    );
    let err = parse_response(
        &gemini_gen(),
        br#"{"usageMetadata":{"promptTokenCount":-1}}"#,
    )
    .expect_err("negative");
    assert!(err.to_string().contains("promptTokenCount"), "{err}");
}

#[test]
fn integral_float_counts_are_accepted() {
    let meta = response(
        &chat(),
        r#"{"usage":{"prompt_tokens":12.0,"completion_tokens":3}}"#,
    );
    assert_eq!(meta.usage, Some(usage(12, 0, 0, 0, 3, 0)));
}

#[test]
fn estimate_tokens_from_text_errs_high_for_unknown_models() {
    assert_eq!(estimate_tokens_from_text(Some("gpt-4o"), "Hello world"), 2);
    assert_eq!(
        estimate_tokens_from_text(Some("claude-sonnet-4-5"), "Hello world"),
        4
    );
    assert_eq!(estimate_tokens_from_text(None, "Hello world!"), 4);
    assert_eq!(estimate_tokens_from_text(None, ""), 0);
}

#[test]
fn usage_serde_round_trip() {
    let u = usage(1, 2, 3, 4, 5, 6);
    let json = serde_json::to_string(&u).expect("serialize");
    assert_eq!(
        serde_json::from_str::<Usage>(&json).expect("deserialize"),
        u
    );
}

// === split invariance ===

fn fixtures() -> Vec<(Endpoint, &'static str)> {
    vec![
        (chat(), OPENAI_CHAT_STREAM),
        (responses(), OPENAI_RESPONSES_STREAM),
        (messages(), ANTHROPIC_STREAM),
        (gemini_sse(), GEMINI_STREAM),
        (gemini_array(), streams::GEMINI_ARRAY_STREAM),
        (chat(), streams::CHAT_TOOL_CALLS_STREAM),
        (messages(), streams::ANTHROPIC_REPEATED_INPUT_STREAM),
        (chat(), OPENAI_CHAT),
    ]
}

fn crlf(s: &str) -> String {
    s.replace('\n', "\r\n")
}

#[test]
fn every_single_split_gives_the_same_meta() {
    for (endpoint, body) in fixtures() {
        for body in [body.to_owned(), crlf(body), body.replace('\n', "\r")] {
            let whole = stream_whole(&endpoint, &body);
            assert!(
                whole.usage.is_some_and(|u| !u.estimated),
                "{}: {whole:?}",
                endpoint.api
            );
            let bytes = body.as_bytes();
            for i in 0..=bytes.len() {
                let (a, b) = bytes.split_at(i);
                assert_eq!(
                    stream(&endpoint, &[a, b]),
                    whole,
                    "{} split at {i}",
                    endpoint.api
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_chunkings_give_the_same_meta(which in 0usize..8, crlf_ends: bool, cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..24)) {
        let (endpoint, body) = fixtures().swap_remove(which);
        let body = if crlf_ends { crlf(body) } else { body.to_owned() };
        let bytes = body.as_bytes();
        let whole = stream(&endpoint, &[bytes]);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut last = 0;
        for cut in cuts {
            chunks.push(&bytes[last..cut]);
            last = cut;
        }
        chunks.push(&bytes[last..]);
        prop_assert_eq!(stream(&endpoint, &chunks), whole);
    }
}

#[test]
fn object_ids_of_stored_results() {
    use crate::provider::Api;
    let chat =
        br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","choices":[]}"#;
    assert_eq!(
        super::object_id(Api::ChatCompletions, chat).as_deref(),
        Some("chatcmpl-1")
    );
    let stream = b"data: {\"id\":\"chatcmpl-2\",\"choices\":[{\"delta\":{}}]}\n\ndata: [DONE]\n\n";
    assert_eq!(
        super::object_id(Api::ChatCompletions, stream).as_deref(),
        Some("chatcmpl-2")
    );
    let responses = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_9\",\"status\":\"in_progress\"}}\n\n";
    assert_eq!(
        super::object_id(Api::Responses, responses).as_deref(),
        Some("resp_9")
    );
    assert_eq!(super::object_id(Api::Embeddings, chat), None);
    assert_eq!(super::object_id(Api::ChatCompletions, b"not json"), None);
}

/// The end-of-stream event marks the meter complete exactly when it arrives, and the usage read at
/// that point is the one the whole body gives: a caller may record the call there.
#[test]
fn end_events_complete_the_stream_with_its_final_usage() {
    for (endpoint, body, ends) in [
        (chat(), OPENAI_CHAT_STREAM, true),
        (responses(), OPENAI_RESPONSES_STREAM, true),
        (messages(), ANTHROPIC_STREAM, true),
        (gemini_sse(), GEMINI_STREAM, false),
    ] {
        let whole = stream_whole(&endpoint, body);
        let mut meter = StreamMeter::new(&endpoint);
        let mut completed_at = None;
        for (i, event) in body.split_inclusive("\n\n").enumerate() {
            assert!(
                !meter.is_complete(),
                "{:?}: complete before event {i}",
                endpoint.api
            );
            meter.feed(event.as_bytes());
            if meter.is_complete() {
                completed_at = Some(i);
                break;
            }
        }
        assert_eq!(completed_at.is_some(), ends, "{:?}", endpoint.api);
        if ends {
            assert_eq!(
                meter.finish(),
                whole,
                "{:?}: usage at the end event",
                endpoint.api
            );
        }
    }
    // Without include_usage, `[DONE]` still ends the stream (the usage is then an estimate).
    let mut meter = StreamMeter::new(&chat());
    meter.feed(b"data: {\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"hi there\"}}]}\n\n");
    assert!(!meter.is_complete());
    meter.feed(b"data: [DONE]\n\n");
    assert!(meter.is_complete());
    assert!(meter.finish().usage.is_some_and(|u| u.estimated));
    // An Anthropic error event ends the stream too.
    let mut meter = StreamMeter::new(&messages());
    meter.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n");
    assert!(meter.is_complete());
}
