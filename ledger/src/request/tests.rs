use super::*;
use crate::provider::{ProviderDetector, classify};
use crate::usage::tokens::{bpe, count_bpe};

fn endpoint(host: &str, path: &str) -> Endpoint {
    ProviderDetector::new()
        .detect(host, "POST", path)
        .expect("known endpoint")
}

fn parse(host: &str, path: &str, body: &str) -> RequestInfo {
    parse_request(&endpoint(host, path), body.as_bytes()).expect("valid request")
}

fn o200k(text: &str) -> u64 {
    count_bpe(bpe(Encoding::O200k).expect("o200k"), text)
}

fn cl100k(text: &str) -> u64 {
    count_bpe(bpe(Encoding::Cl100k).expect("cl100k"), text)
}

#[test]
fn openai_chat_matches_the_cookbook_count() {
    // OpenAI reports 9 prompt tokens for this request: 3 per message + role + content + 3 priming.
    let r = parse(
        "api.openai.com",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello world"}]}"#,
    );
    assert_eq!(
        r,
        RequestInfo {
            model: Some("gpt-4o".into()),
            stream: false,
            include_usage: true,
            max_output_tokens: None,
            choices: 1,
            unseen_context: false,
            cache_writes: false,
            background: false,
            stores_object: false,
            input_tokens_estimate: 9,
            input_estimate_exact: true,
        }
    );
}

#[test]
fn openai_chat_stream_options_limits_and_names() {
    let body = r#"{"model":"gpt-4.1-mini","stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":500,"max_tokens":9,"n":2,
      "messages":[{"role":"system","content":"You are terse."},{"role":"user","name":"ann","content":[{"type":"text","text":"Hi there"}]}]}"#;
    let r = parse("api.openai.com", "/v1/chat/completions", body);
    assert!(r.stream && r.include_usage);
    assert_eq!(r.max_output_tokens, Some(1000));
    assert_eq!(r.choices, 2);
    let want = 3
        + o200k("system")
        + o200k("You are terse.")
        + 3
        + o200k("user")
        + o200k("Hi there")
        + o200k("ann")
        + 1
        + 3;
    assert_eq!(want, 19);
    assert_eq!(r.input_tokens_estimate, want);
    assert!(r.input_estimate_exact);

    let r = parse(
        "api.openai.com",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true,"messages":[],"max_tokens":64}"#,
    );
    assert!(r.stream && !r.include_usage);
    assert_eq!(r.max_output_tokens, Some(64));
    assert_eq!(r.input_tokens_estimate, 3);
}

#[test]
fn older_models_use_cl100k() {
    let r = parse(
        "api.openai.com",
        "/v1/chat/completions",
        r#"{"model":"gpt-4-0613","messages":[{"role":"user","content":"naïve café ☕ résumé"}]}"#,
    );
    assert_eq!(
        r.input_tokens_estimate,
        3 + cl100k("user") + cl100k("naïve café ☕ résumé") + 3
    );
    assert_ne!(
        cl100k("naïve café ☕ résumé"),
        o200k("naïve café ☕ résumé")
    );
    assert!(r.input_estimate_exact);
}

#[test]
fn images_tools_and_tool_calls() {
    let body = r#"{"model":"gpt-4o-mini","messages":[
        {"role":"user","content":[{"type":"text","text":"What is this?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"high"}}]},
        {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"lookup","arguments":"{\"q\":\"cat\"}"}}]},
        {"role":"tool","tool_call_id":"call_1","content":"a cat"}],
      "tools":[{"type":"function","function":{"name":"lookup","parameters":{"type":"object"}}}]}"#;
    let r = parse("api.openai.com", "/v1/chat/completions", body);
    let tools =
        r#"[{"function":{"name":"lookup","parameters":{"type":"object"}},"type":"function"}]"#;
    let want = 3 * 3
        + o200k("user")
        + o200k("What is this?")
        + MEDIA_TOKENS
        + o200k("assistant")
        + o200k("lookup")
        + o200k("{\"q\":\"cat\"}")
        + o200k("tool")
        + o200k("a cat")
        + o200k("call_1")
        + 3
        + o200k(tools);
    assert_eq!(r.input_tokens_estimate, want);
    assert!(!r.input_estimate_exact);
}

#[test]
fn azure_deployment_is_the_model_and_uses_o200k() {
    let ep = endpoint(
        "res.openai.azure.com",
        "/openai/deployments/prod-chat/chat/completions?api-version=2024-10-21",
    );
    let r = parse_request(
        &ep,
        br#"{"messages":[{"role":"user","content":"Hello world"}],"max_tokens":100}"#,
    )
    .expect("valid");
    assert_eq!(r.model.as_deref(), Some("prod-chat"));
    assert_eq!(r.input_tokens_estimate, 9);
    assert!(
        !r.input_estimate_exact,
        "deployment name does not identify the tokenizer"
    );
    assert_eq!(r.max_output_tokens, Some(100));
}

#[test]
fn completions_prompt_forms() {
    let ep = endpoint("api.openai.com", "/v1/completions");
    let r = parse_request(&ep, br#"{"model":"gpt-3.5-turbo-instruct","prompt":"Say this is a test","max_tokens":7,"n":2,"best_of":3}"#).expect("valid");
    assert_eq!(r.input_tokens_estimate, cl100k("Say this is a test"));
    assert_eq!(r.input_tokens_estimate, 5);
    assert_eq!(r.max_output_tokens, Some(21));
    let r = parse_request(
        &ep,
        br#"{"model":"gpt-3.5-turbo-instruct","prompt":[[1,2,3],[4,5]],"stream":true}"#,
    )
    .expect("valid");
    assert_eq!(r.input_tokens_estimate, 5);
    assert!(r.stream && !r.include_usage);
}

#[test]
fn embeddings_inputs() {
    let ep = endpoint("api.openai.com", "/v1/embeddings");
    let one = |body: &str| parse_request(&ep, body.as_bytes()).expect("valid");
    let r = one(
        r#"{"model":"text-embedding-3-small","input":"The food was delicious and the waiter..."}"#,
    );
    assert_eq!(r.input_tokens_estimate, 8, "the fixture's prompt_tokens");
    assert_eq!(r.max_output_tokens, Some(0));
    assert!(r.input_estimate_exact);
    let r = one(r#"{"model":"text-embedding-3-small","input":["Hello world","Hello world"]}"#);
    assert_eq!(r.input_tokens_estimate, 4);
    let r = one(r#"{"model":"text-embedding-3-small","input":[15339,1917]}"#);
    assert_eq!(r.input_tokens_estimate, 2);
    let r = one(r#"{"model":"text-embedding-3-small","input":[[15339,1917],[1,2,3]]}"#);
    assert_eq!(r.input_tokens_estimate, 5);
    // Mistral embeddings: byte heuristic, 11 bytes → 4.
    let ep = endpoint("api.mistral.ai", "/v1/embeddings");
    let r =
        parse_request(&ep, br#"{"model":"mistral-embed","input":["Hello world"]}"#).expect("valid");
    assert_eq!(r.input_tokens_estimate, 4);
    assert!(!r.input_estimate_exact);
}

#[test]
fn responses_request() {
    let r = parse(
        "api.openai.com",
        "/v1/responses",
        r#"{"model":"o4-mini","instructions":"Be brief.","input":"Write a haiku.","max_output_tokens":2048,"stream":true,"reasoning":{"effort":"high"}}"#,
    );
    assert!(r.stream && r.include_usage);
    assert_eq!(r.max_output_tokens, Some(2048));
    assert_eq!(
        r.input_tokens_estimate,
        o200k("Be brief.") + 3 + o200k("Write a haiku.") + 3
    );
    let r = parse(
        "api.openai.com",
        "/v1/responses",
        r#"{"model":"gpt-5","input":[{"role":"user","content":[{"type":"input_text","text":"Hi"},{"type":"input_image","image_url":"https://x/y.png"}]},
            {"type":"function_call","call_id":"c","name":"f","arguments":"{}"},{"type":"function_call_output","call_id":"c","output":"42"}]}"#,
    );
    assert_eq!(
        r.input_tokens_estimate,
        3 * 3 + o200k("Hi") + MEDIA_TOKENS + o200k("f") + o200k("{}") + o200k("42") + 3
    );
}

#[test]
fn anthropic_messages_byte_estimate() {
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,
      "system":[{"type":"text","text":"You are a helpful assistant.","cache_control":{"type":"ephemeral","ttl":"1h"}}],
      "messages":[{"role":"user","content":"Hello, Claude"},{"role":"assistant","content":[{"type":"text","text":"Hi!"}]},
                  {"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBOR"}},{"type":"text","text":"Describe"}]}]}"#;
    let r = parse("api.anthropic.com", "/v1/messages", body);
    assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-5"));
    assert!(r.stream && r.include_usage);
    assert_eq!(r.max_output_tokens, Some(1024));
    // Text bytes: 28 + 13 + 3 + 8 = 52 → ceil(52/3) = 18; 3 messages × 4 + 4 priming + 1 image.
    assert_eq!(r.input_tokens_estimate, 18 + 16 + MEDIA_TOKENS);
    assert!(!r.input_estimate_exact);
}

#[test]
fn anthropic_tools_and_tool_results() {
    let body = r#"{"model":"claude-opus-4-1","max_tokens":100,"tools":[{"name":"get_weather","input_schema":{"type":"object"}}],
      "messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"get_weather","input":{"city":"Oslo"}}]},
                  {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"-3C"}]}]}"#;
    let r = parse("api.anthropic.com", "/v1/messages", body);
    let tool = r#"{"input_schema":{"type":"object"},"name":"get_weather"}"#;
    let bytes = "get_weather".len() + r#"{"city":"Oslo"}"#.len() + "-3C".len() + tool.len();
    assert_eq!(
        r.input_tokens_estimate,
        (bytes as u64).div_ceil(3) + 12 + ANTHROPIC_TOOL_PROMPT_TOKENS
    );
    let count = parse(
        "api.anthropic.com",
        "/v1/messages/count_tokens",
        r#"{"model":"claude-opus-4-1","messages":[{"role":"user","content":"abc"}]}"#,
    );
    assert_eq!(count.max_output_tokens, Some(0));
    assert_eq!(count.input_tokens_estimate, 1 + 8);
}

#[test]
fn gemini_model_from_path_and_generation_config() {
    let body = r#"{"systemInstruction":{"parts":[{"text":"Be kind."}]},
      "contents":[{"role":"user","parts":[{"text":"Why is the sky blue?"},{"inlineData":{"mimeType":"image/jpeg","data":"/9j/"}}]}],
      "generationConfig":{"maxOutputTokens":800,"candidateCount":2,"thinkingConfig":{"thinkingBudget":0}}}"#;
    let r = parse(
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        body,
    );
    assert_eq!(r.model.as_deref(), Some("gemini-2.5-flash"));
    assert!(r.stream && r.include_usage);
    assert_eq!(r.max_output_tokens, Some(1600));
    // "Be kind." 8 + "Why is the sky blue?" 20 = 28 bytes → 10; 2 messages + priming = 12.
    assert_eq!(r.input_tokens_estimate, 10 + 12 + MEDIA_TOKENS);
    let r = parse(
        "us-central1-aiplatform.googleapis.com",
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent",
        r#"{"contents":[{"role":"user","parts":[{"text":"abcdef"}]}],"generation_config":{"max_output_tokens":50}}"#,
    );
    assert_eq!(
        (
            r.model.as_deref(),
            r.stream,
            r.max_output_tokens,
            r.input_tokens_estimate
        ),
        (Some("gemini-2.5-pro"), false, Some(50), 2 + 8)
    );
    let r = parse(
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:countTokens",
        r#"{"generateContentRequest":{"model":"models/gemini-2.5-flash","contents":[{"parts":[{"text":"abc"}]}]}}"#,
    );
    assert_eq!(
        (r.max_output_tokens, r.input_tokens_estimate),
        (Some(0), 1 + 8)
    );
}

#[test]
fn compatible_hosts_use_bpe_only_for_openai_models() {
    let ep = classify(
        ProviderKind::OpenAiCompatible,
        "openrouter",
        "POST",
        "/api/v1/chat/completions",
    )
    .expect("ep");
    let r = parse_request(
        &ep,
        br#"{"model":"openai/gpt-4o","messages":[{"role":"user","content":"Hello world"}]}"#,
    )
    .expect("valid");
    assert_eq!(r.input_tokens_estimate, 9);
    let r = parse_request(&ep, br#"{"model":"meta-llama/llama-3.3-70b","messages":[{"role":"user","content":"Hello world"}]}"#).expect("valid");
    // "user" 4 + "Hello world" 11 = 15 bytes → 5; 4 per message + 4 priming.
    assert_eq!(r.input_tokens_estimate, 13);
}

#[test]
fn vertex_anthropic_body_without_model() {
    let r = parse(
        "us-east5-aiplatform.googleapis.com",
        "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict",
        r#"{"anthropic_version":"vertex-2023-10-16","max_tokens":256,"messages":[{"role":"user","content":"Hey"}]}"#,
    );
    assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-5@20250929"));
    assert!(r.stream);
    assert_eq!(r.input_tokens_estimate, 1 + 8);
}

#[test]
fn errors_name_the_api_and_field() {
    let ep = endpoint("api.openai.com", "/v1/chat/completions");
    let err = parse_request(&ep, b"{oops").expect_err("invalid");
    assert!(
        matches!(
            err,
            Error::Json {
                what: "OpenAI chat completions request",
                ..
            }
        ),
        "{err}"
    );
    let err = parse_request(&ep, b"\"text\"").expect_err("string");
    assert!(
        matches!(
            err,
            Error::Shape {
                what: "OpenAI chat completions request",
                ..
            }
        ),
        "{err}"
    );
    for (body, field) in [
        (r#"{"model":5}"#, "model is a number"),
        (r#"{"stream":"yes"}"#, "stream is a string"),
        (r#"{"messages":{}}"#, "messages is an object"),
        (r#"{"max_tokens":-1}"#, "max_tokens is -1"),
        (
            r#"{"stream":true,"stream_options":[]}"#,
            "stream_options is an array",
        ),
    ] {
        let err = parse_request(&ep, body.as_bytes()).expect_err(body);
        assert!(err.to_string().contains(field), "{body}: {err}");
    }
    let gemini = endpoint(
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:generateContent",
    );
    let err = parse_request(&gemini, br#"{"contents":"hi"}"#).expect_err("contents");
    assert!(
        err.to_string().contains("Gemini generateContent request"),
        "{err}"
    );
}

#[test]
fn cached_parse_equals_parse() {
    let system =
        "You are a support assistant. Answer briefly and cite the order number. ".repeat(8);
    let tools = serde_json::json!([{"type": "function", "function": {"name": "lookup_order",
        "description": "Looks an order up by number. ".repeat(10),
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}}]);
    let cache = TokenCache::new();
    for turn in 0..3 {
        let body = serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": format!("Where is order {turn}? {}", "Please check. ".repeat(30))},
            ],
            "tools": tools,
            "max_tokens": 100,
        })
        .to_string();
        let ep = endpoint("api.openai.com", "/v1/chat/completions");
        let want = parse_request(&ep, body.as_bytes()).expect("valid");
        for scope in ["a", "b"] {
            let got = parse_request_cached(&ep, body.as_bytes(), &cache, scope).expect("valid");
            assert_eq!(got, want, "turn {turn} scope {scope}");
        }
    }
    let (hits, misses) = cache.stats();
    assert!(
        hits >= 4,
        "the system prompt and the tools are reused: {hits} hits {misses} misses"
    );
}

#[test]
fn request_model_agrees_with_parse_request() {
    let chat = ("api.openai.com", "/v1/chat/completions");
    let gemini = (
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:generateContent",
    );
    let bodies = [
        (
            chat,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello world"}]}"#,
        ),
        (
            chat,
            r#"{"messages":[],"model":"gpt-4.1-mini","stream":true}"#,
        ),
        (chat, r#"{"model":"","messages":[]}"#),
        (chat, r#"{"model":null,"messages":[]}"#),
        (gemini, r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#),
        (gemini, r#"{"model":"models/other","contents":[]}"#),
    ];
    for ((host, path), body) in bodies {
        let ep = endpoint(host, path);
        let full = parse_request(&ep, body.as_bytes()).expect("valid").model;
        assert_eq!(
            request_model(&ep, body.as_bytes()).expect("valid"),
            full,
            "{body}"
        );
    }
    let ep = endpoint(chat.0, chat.1);
    for bad in [
        r#"["gpt-4o"]"#,
        r#"{"model":4}"#,
        "not json",
        r#"{"model":"x""#,
    ] {
        let e = request_model(&ep, bad.as_bytes()).expect_err(bad);
        assert!(
            parse_request(&ep, bad.as_bytes()).is_err(),
            "both refuse {bad}: {e}"
        );
    }
    let e = request_model(&ep, br#"{"model":4}"#).expect_err("number");
    assert!(e.to_string().contains("model is"), "{e}");
}
