//! Stream cases written from the providers' streaming references.

use super::*;

/// OpenAI chat stream with a streamed tool call and the include_usage record.
pub(super) const CHAT_TOOL_CALLS_STREAM: &str = r#"data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4.1-mini-2025-04-14","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4.1-mini-2025-04-14","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"location\":"}}]},"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4.1-mini-2025-04-14","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":" \"Paris\"}"}}]},"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4.1-mini-2025-04-14","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":null}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4.1-mini-2025-04-14","choices":[],"usage":{"prompt_tokens":81,"completion_tokens":16,"total_tokens":97,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}}}

data: [DONE]

"#;

/// Anthropic stream with a 1-hour cache write in message_start and a message_delta that repeats
/// (and partly zeroes) the input fields, as the API now does.
pub(super) const ANTHROPIC_REPEATED_INPUT_STREAM: &str = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_2","type":"message","role":"assistant","content":[],"model":"claude-opus-4-1-20250805","stop_reason":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":6000,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":6000},"output_tokens":2}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Let me think."}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"San Fra"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"ncisco\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"input_tokens":472,"cache_creation_input_tokens":6000,"cache_read_input_tokens":0,"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"#;

/// Gemini streamGenerateContent without alt=sse: a JSON array streamed element by element.
pub(super) const GEMINI_ARRAY_STREAM: &str = "[{\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Roses [are] {red}\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 9,\"totalTokenCount\": 9},\"modelVersion\": \"gemini-2.5-flash-lite\"}\r\n,\r\n{\"candidates\": [{\"content\": {\"parts\": [{\"text\": \", \\\"violets\\\" are blue\"}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 9,\"cachedContentTokenCount\": 4,\"candidatesTokenCount\": 11,\"totalTokenCount\": 20},\"modelVersion\": \"gemini-2.5-flash-lite\"}\r\n]";

#[test]
fn chat_tool_call_stream() {
    let meta = stream_whole(&chat(), CHAT_TOOL_CALLS_STREAM);
    assert_eq!(meta.model.as_deref(), Some("gpt-4.1-mini-2025-04-14"));
    assert_eq!(meta.usage, Some(usage(81, 0, 0, 0, 16, 0)));
}

#[test]
fn chat_stream_without_usage_is_estimated_from_delivered_text() {
    // The fixture minus its usage chunk: "" + "Hel" + "lo ✓" delivered.
    let body: String = OPENAI_CHAT_STREAM
        .split("\n\n")
        .filter(|e| !e.contains("\"usage\":{"))
        .collect::<Vec<_>>()
        .join("\n\n");
    let meta = stream_whole(&chat(), &body);
    let want = estimate_tokens_from_text(Some("gpt-4o-mini"), "Hello ✓");
    assert_eq!(want, 2);
    assert_eq!(
        meta.usage,
        Some(Usage {
            output_tokens: want,
            estimated: true,
            ..Usage::default()
        })
    );
    // Tool-call names and argument deltas count too.
    let body: String = CHAT_TOOL_CALLS_STREAM
        .split("\n\n")
        .filter(|e| !e.contains("\"usage\":{"))
        .collect::<Vec<_>>()
        .join("\n\n");
    let want = estimate_tokens_from_text(Some("gpt-4.1"), "get_weather{\"location\": \"Paris\"}");
    assert_eq!(want, 8);
    assert_eq!(
        stream_whole(&chat(), &body).usage.map(|u| u.output_tokens),
        Some(want)
    );
}

#[test]
fn groq_usage_in_x_groq() {
    let endpoint = ep("api.groq.com", "/openai/v1/chat/completions");
    let body = r#"data: {"id":"c","object":"chat.completion.chunk","model":"llama-3.3-70b-versatile","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"x_groq":{"id":"req_1"}}

data: {"id":"c","object":"chat.completion.chunk","model":"llama-3.3-70b-versatile","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"x_groq":{"id":"req_1","usage":{"queue_time":0.01,"prompt_tokens":40,"prompt_time":0.002,"completion_tokens":2,"completion_time":0.001,"total_tokens":42,"total_time":0.003}}}

data: [DONE]

"#;
    let meta = stream_whole(&endpoint, body);
    assert_eq!(meta.model.as_deref(), Some("llama-3.3-70b-versatile"));
    assert_eq!(meta.usage, Some(usage(40, 0, 0, 0, 2, 0)));
}

#[test]
fn openrouter_comments_and_reasoning_deltas() {
    let endpoint = ep("openrouter.ai", "/api/v1/chat/completions");
    let body = ": OPENROUTER PROCESSING\n\n: OPENROUTER PROCESSING\n\ndata: {\"id\":\"gen-1\",\"model\":\"deepseek/deepseek-r1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"reasoning\":\"Think\"}}]}\n\ndata: {\"id\":\"gen-1\",\"model\":\"deepseek/deepseek-r1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Answer\"},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"gen-1\",\"model\":\"deepseek/deepseek-r1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":30,\"total_tokens\":42,\"completion_tokens_details\":{\"reasoning_tokens\":25},\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\ndata: [DONE]\n\n";
    assert_eq!(
        stream_whole(&endpoint, body).usage,
        Some(usage(12, 0, 0, 0, 30, 25))
    );
    // Without the usage chunk: "Think" + "Answer" = 11 bytes → ceil(11/3) = 4 (byte heuristic, not an OpenAI model).
    let cut = body
        .split("data: {\"id\":\"gen-1\",\"model\":\"deepseek/deepseek-r1\",\"choices\":[],")
        .next()
        .expect("prefix");
    assert_eq!(
        stream_whole(&endpoint, cut).usage,
        Some(Usage {
            output_tokens: 4,
            estimated: true,
            ..Usage::default()
        })
    );
}

#[test]
fn anthropic_repeated_input_fields_are_not_added() {
    let meta = stream_whole(&messages(), ANTHROPIC_REPEATED_INPUT_STREAM);
    assert_eq!(meta.model.as_deref(), Some("claude-opus-4-1-20250805"));
    assert_eq!(meta.usage, Some(usage(472, 0, 0, 6000, 89, 0)));
}

#[test]
fn anthropic_message_delta_zeroes_do_not_erase_start_values() {
    let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-haiku-4-5\",\"usage\":{\"input_tokens\":30,\"cache_read_input_tokens\":900,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"input_tokens\":0,\"cache_read_input_tokens\":null,\"output_tokens\":12}}\n\n";
    assert_eq!(
        stream_whole(&messages(), body).usage,
        Some(usage(30, 900, 0, 0, 12, 0))
    );
}

#[test]
fn anthropic_cancelled_stream_keeps_input_and_estimates_output() {
    // Cut after the two text deltas, before message_delta: input from message_start, output
    // = max(1 from message_start, ceil(len("Hello!")/3) = 2).
    let cut = ANTHROPIC_STREAM
        .split("event: content_block_stop")
        .next()
        .expect("prefix");
    let meta = stream_whole(&messages(), cut);
    assert_eq!(
        meta.usage,
        Some(Usage {
            input_tokens: 25,
            cache_read_tokens: 1800,
            output_tokens: 2,
            estimated: true,
            ..Usage::default()
        })
    );
}

#[test]
fn anthropic_error_event_mid_stream() {
    let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let meta = stream_whole(&messages(), body);
    assert_eq!(
        meta.usage,
        Some(Usage {
            input_tokens: 10,
            output_tokens: 1,
            estimated: true,
            ..Usage::default()
        })
    );
}

#[test]
fn responses_stream_incomplete_carries_usage() {
    let body = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_3\",\"status\":\"in_progress\",\"model\":\"o3-2025-04-16\",\"usage\":null}}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Partial\"}\n\nevent: response.incomplete\ndata: {\"type\":\"response.incomplete\",\"response\":{\"id\":\"resp_3\",\"status\":\"incomplete\",\"incomplete_details\":{\"reason\":\"max_output_tokens\"},\"model\":\"o3-2025-04-16\",\"usage\":{\"input_tokens\":1200,\"input_tokens_details\":{\"cached_tokens\":1024},\"output_tokens\":4000,\"output_tokens_details\":{\"reasoning_tokens\":3990},\"total_tokens\":5200}}}\n\n";
    let meta = stream_whole(&responses(), body);
    assert_eq!(meta.model.as_deref(), Some("o3-2025-04-16"));
    assert_eq!(meta.usage, Some(usage(176, 1024, 0, 0, 4000, 3990)));
}

#[test]
fn responses_stream_cancelled_is_estimated_with_o200k() {
    let cut = OPENAI_RESPONSES_STREAM
        .split("event: response.completed")
        .next()
        .expect("prefix");
    // "Hi there" is 2 o200k tokens.
    assert_eq!(
        stream_whole(&responses(), cut).usage,
        Some(Usage {
            output_tokens: 2,
            estimated: true,
            ..Usage::default()
        })
    );
}

#[test]
fn gemini_array_stream() {
    let meta = stream_whole(&gemini_array(), GEMINI_ARRAY_STREAM);
    assert_eq!(meta.model.as_deref(), Some("gemini-2.5-flash-lite"));
    assert_eq!(meta.usage, Some(usage(5, 4, 0, 0, 11, 0)));
}

#[test]
fn gemini_stream_cut_before_finish_is_estimated() {
    // Only the first chunk: usage has no candidates yet; "The sky" is 7 bytes → 3 tokens.
    let first = GEMINI_STREAM
        .split("\n\n")
        .next()
        .expect("first")
        .to_owned()
        + "\n\n";
    assert_eq!(
        stream_whole(&gemini_sse(), &first).usage,
        Some(Usage {
            input_tokens: 8,
            output_tokens: 3,
            estimated: true,
            ..Usage::default()
        })
    );
}

#[test]
fn vertex_gemini_sse_stream() {
    let endpoint = ep(
        "us-central1-aiplatform.googleapis.com",
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
    );
    let body = "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"functionCall\":{\"name\":\"lookup\",\"args\":{\"q\":\"x\"}}}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":100,\"candidatesTokenCount\":7,\"thoughtsTokenCount\":60,\"totalTokenCount\":167,\"trafficType\":\"ON_DEMAND\"},\"modelVersion\":\"gemini-2.5-pro\",\"createTime\":\"2025-01-01T00:00:00Z\",\"responseId\":\"r\"}\r\n\r\n";
    assert_eq!(
        stream_whole(&endpoint, body).usage,
        Some(usage(100, 0, 0, 0, 67, 60))
    );
}

#[test]
fn usage_so_far_tracks_the_stream() {
    let mut meter = StreamMeter::new(&messages());
    assert_eq!(meter.usage_so_far(), None);
    let (start, rest) = ANTHROPIC_STREAM.split_at(
        ANTHROPIC_STREAM
            .find("event: content_block_start")
            .expect("start"),
    );
    meter.feed(start.as_bytes());
    assert_eq!(meter.model(), Some("claude-sonnet-4-5-20250929"));
    assert_eq!(
        meter.usage_so_far(),
        Some(Usage {
            input_tokens: 25,
            cache_read_tokens: 1800,
            output_tokens: 1,
            estimated: true,
            ..Usage::default()
        })
    );
    meter.feed(rest.as_bytes());
    assert_eq!(meter.usage_so_far(), Some(usage(25, 1800, 0, 0, 15, 0)));
    assert_eq!(meter.parse_errors(), 0);
    assert_eq!(meter.finish().usage, Some(usage(25, 1800, 0, 0, 15, 0)));
}

#[test]
fn unterminated_final_event_is_used_when_its_json_is_complete() {
    let body = OPENAI_CHAT_STREAM.replace("\n\ndata: [DONE]\n\n", "");
    assert!(body.ends_with('}'));
    assert_eq!(
        stream_whole(&chat(), &body).usage,
        Some(usage(9, 0, 0, 0, 3, 0))
    );
    // A truncated JSON line is not: the estimate stands.
    let truncated = &body[..body.len() - 10];
    assert!(
        stream_whole(&chat(), truncated)
            .usage
            .is_some_and(|u| u.estimated)
    );
}

#[test]
fn malformed_events_are_counted_not_fatal() {
    let mut meter = StreamMeter::new(&chat());
    meter.feed(b"data: {broken\n\ndata: [1,2]\n\n");
    meter.feed(OPENAI_CHAT_STREAM.as_bytes());
    assert_eq!(meter.parse_errors(), 2);
    assert_eq!(meter.finish().usage, Some(usage(9, 0, 0, 0, 3, 0)));
}

#[test]
fn oversized_sse_line_is_dropped_and_counted() {
    let mut meter = StreamMeter::new(&chat());
    let huge = vec![b'x'; crate::sse::DEFAULT_MAX_LINE_BYTES + 10];
    meter.feed(b"data: ");
    meter.feed(&huge);
    meter.feed(b"\n\n");
    meter.feed(OPENAI_CHAT_STREAM.as_bytes());
    assert_eq!(meter.parse_errors(), 1);
    assert_eq!(meter.finish().usage, Some(usage(9, 0, 0, 0, 3, 0)));
}

#[test]
fn plain_json_body_through_the_meter_matches_parse_response() {
    for (endpoint, body) in [
        (chat(), OPENAI_CHAT),
        (messages(), ANTHROPIC),
        (gemini_gen(), GEMINI),
        (responses(), OPENAI_RESPONSES),
    ] {
        let want = parse_response(&endpoint, body.as_bytes()).expect("valid");
        assert_eq!(stream(&endpoint, &[b"\r\n  ", body.as_bytes()]), want);
    }
    let embeddings = ep("api.openai.com", "/v1/embeddings");
    assert_eq!(
        stream_whole(&embeddings, OPENAI_EMBEDDINGS).usage,
        Some(usage(8, 0, 0, 0, 0, 0))
    );
}

#[test]
fn oversized_json_body_keeps_usage_from_its_tail() {
    let embeddings = ep("api.openai.com", "/v1/embeddings");
    let vector = vec!["0.0123456789"; 3072].join(",");
    let item = format!("{{\"object\":\"embedding\",\"index\":0,\"embedding\":[{vector}]}}");
    let data = vec![item; 300].join(",");
    let body = format!(
        "{{\"object\":\"list\",\"data\":[{data}],\"model\":\"text-embedding-3-large\",\"usage\":{{\"prompt_tokens\":6000,\"total_tokens\":6000}}}}"
    );
    assert!(body.len() > 8 * 1024 * 1024);
    let chunks: Vec<&[u8]> = body.as_bytes().chunks(64 * 1024).collect();
    let meta = stream(&embeddings, &chunks);
    assert_eq!(meta.model.as_deref(), Some("text-embedding-3-large"));
    assert_eq!(meta.usage, Some(usage(6000, 0, 0, 0, 0, 0)));
}

#[test]
fn empty_stream_is_an_estimated_zero() {
    assert_eq!(
        stream(&chat(), &[b"", b"\n"]).usage,
        Some(Usage {
            estimated: true,
            ..Usage::default()
        })
    );
}

/// The meter's result for `body` fed whole, in `size`-byte chunks, and one byte at a time.
fn stream_three_ways(endpoint: &Endpoint, body: &[u8], size: usize) -> [ResponseMeta; 3] {
    let chunked: Vec<&[u8]> = body.chunks(size).collect();
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    [
        stream(endpoint, &[body]),
        stream(endpoint, &chunked),
        stream(endpoint, &bytes),
    ]
}

#[test]
fn long_leading_whitespace_keeps_its_line_ends_when_chunked() {
    // fuzz/regressions/stream_usage/undecided-whitespace-over-4k-drops-line-ends: over 4 KiB of
    // leading blanks used to stop the line ends after them being kept, so the event was lost
    // when the body arrived in 255-byte chunks (the blanks prefixed the `data` field name).
    let event = br#"data: {"choices":[{"delta":{"content":"hello world"}}],"model":"gpt-4o"}"#;
    let mut body = vec![b' '; 4335];
    body.extend_from_slice(&[b'\n'; 255]);
    body.extend_from_slice(event);
    body.extend_from_slice(b"\n\n");
    let want = ResponseMeta {
        model: Some("gpt-4o".to_owned()),
        usage: Some(Usage {
            output_tokens: 2,
            estimated: true,
            ..Usage::default()
        }),
    };
    for meta in stream_three_ways(&chat(), &body, 255) {
        assert_eq!(meta, want);
    }
}

#[test]
fn leading_whitespace_is_read_the_same_however_it_is_split() {
    let event = br#"data: {"choices":[{"delta":{"content":"hello world"}}],"model":"gpt-4o"}"#;
    let counted = Some("gpt-4o");
    for (prefix, model) in [
        // Blank lines with CR, LF and CRLF ends, and blanks between them, are skipped.
        (b"\r".repeat(3), counted),
        (b"\r\n \t\x0c\r".repeat(2000), counted),
        (b" \n".repeat(5000), counted),
        // Blanks left on the last line belong to the field name: "  data" is not "data".
        (b"\n  ".to_vec(), None),
        (
            b"\r\n"
                .repeat(3000)
                .into_iter()
                .chain([b' '; 5000])
                .collect(),
            None,
        ),
        // A BOM is stripped from the first line only, and a line of blanks is a line.
        (b"\n\xEF\xBB\xBF".to_vec(), None),
    ] {
        let mut body = prefix.clone();
        body.extend_from_slice(event);
        body.extend_from_slice(b"\n\n");
        for (i, meta) in stream_three_ways(&chat(), &body, 255)
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                meta.model.as_deref(),
                model,
                "split {i}, prefix of {} bytes",
                prefix.len()
            );
        }
    }
}
