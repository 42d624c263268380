//! The sparse parse of whole responses against the whole-tree parse it replaced: the same model,
//! usage and errors for every non-Gemini fixture and for bodies built to trip it (repeated and
//! escaped member names, usage after a large member, broken JSON in a skipped member, trailing
//! bytes, non-objects), and the same object ids.

use proptest::prelude::*;
use serde_json::Value;

use super::*;
use crate::error::Error;
use crate::json::Json;
use crate::usage::{object_id, parse_object, response_what};

/// What `parse_response` did before: the whole body as a tree (a `Json` tree is a
/// `serde_json::Value`'s, `json.rs` tests), then the same object parser.
fn whole(endpoint: &Endpoint, body: &[u8]) -> Result<ResponseMeta, Error> {
    let what = response_what(endpoint.api);
    let value = Json::parse(body).map_err(|source| Error::Json { what, source })?;
    let Json::Object(obj) = &value else {
        return Err(Error::Shape {
            what,
            detail: "body is not a JSON object".into(),
        });
    };
    let mut meta =
        parse_object(endpoint.api, obj).map_err(|detail| Error::Shape { what, detail })?;
    if meta.model.is_none() {
        meta.model.clone_from(&endpoint.model_in_path);
    }
    Ok(meta)
}

/// Both give the same meta, or both fail with the same kind of error.
fn same(endpoint: &Endpoint, body: &str) {
    let got = parse_response(endpoint, body.as_bytes());
    let want = whole(endpoint, body.as_bytes());
    match (&got, &want) {
        (Ok(g), Ok(w)) => assert_eq!(g, w, "{body}"),
        // The same kind of JSON error at the same place (a skipped member's message may name
        // what was being read differently: "an object" for "a value").
        (Err(Error::Json { source: g, .. }), Err(Error::Json { source: w, .. })) => {
            assert_eq!(
                (g.classify(), g.line(), g.column()),
                (w.classify(), w.line(), w.column()),
                "{g} vs {w} for {body}"
            );
        }
        (Err(Error::Shape { .. }), Err(Error::Shape { .. })) => {
            assert_eq!(
                got.unwrap_err().to_string(),
                want.unwrap_err().to_string(),
                "{body}"
            );
        }
        _ => panic!("sparse {got:?} vs whole {want:?} for {body}"),
    }
}

fn embeddings() -> Endpoint {
    ep("api.openai.com", "/v1/embeddings")
}

#[test]
fn fixtures_parse_as_the_whole_tree_did() {
    same(&chat(), OPENAI_CHAT);
    same(&responses(), OPENAI_RESPONSES);
    same(&embeddings(), OPENAI_EMBEDDINGS);
    same(&messages(), ANTHROPIC);
    assert_eq!(
        object_id(Api::ChatCompletions, OPENAI_CHAT.as_bytes()),
        serde_json::from_str::<Value>(OPENAI_CHAT).expect("json")["id"]
            .as_str()
            .map(str::to_owned)
    );
}

#[test]
fn bodies_built_to_trip_the_sparse_parse() {
    let usage = r#"{"prompt_tokens":11,"completion_tokens":7}"#;
    let big = "x".repeat(300_000);
    for body in [
        // The last of repeated members wins, as in a tree.
        format!(r#"{{"model":"a","usage":{usage},"model":"b"}}"#),
        format!(r#"{{"usage":{{"prompt_tokens":1}},"usage":{usage}}}"#),
        // Escaped member names are the same names.
        format!(r#"{{"mod\u0065l":"gpt-4o","us\u0061ge":{usage}}}"#),
        // Usage after a large member; skipped members of every JSON type.
        format!(
            r#"{{"choices":[{{"message":{{"content":"{big}"}}}}],"n":[1,2.5,-3e2,true,null,{{}}],"usage":{usage}}}"#
        ),
        // Groq's usage inside x_groq.
        format!(r#"{{"model":"llama","x_groq":{{"usage":{usage}}}}}"#),
        // Broken JSON in a skipped member, and after the object.
        format!(r#"{{"choices":[{{"a":tru}}],"usage":{usage}}}"#),
        format!(r#"{{"usage":{usage}}} trailing"#),
        format!(r#"{{"choices":"unterminated,"usage":{usage}}}"#),
        // Not objects.
        format!("[{usage}]"),
        "\"text\"".to_owned(),
        "12".to_owned(),
        "null".to_owned(),
        String::new(),
        // A wrong usage shape still fails the same way.
        r#"{"usage":{"prompt_tokens":"many"}}"#.to_owned(),
    ] {
        same(&chat(), &body);
        same(&messages(), &body);
    }
    assert_eq!(
        object_id(
            Api::Responses,
            br#"{"output":[{"id":"x"}],"\u0069d":"resp_1"}"#
        ),
        Some("resp_1".into())
    );
    assert_eq!(
        object_id(Api::Responses, br#"{"id":"a","id":"b"}"#),
        Some("b".into())
    );
}

proptest! {
    /// Arbitrary JSON objects (and their prefixes, which are broken JSON) with usage members
    /// mixed in: the sparse parse agrees with the tree.
    #[test]
    fn arbitrary_objects_parse_as_the_whole_tree_did(
        members in prop::collection::vec(
            (
                prop::sample::select(vec!["model", "usage", "x_groq", "choices", "id", "u"]),
                prop::sample::select(vec![
                    r#"{"prompt_tokens":3,"completion_tokens":4}"#,
                    r#"{"input_tokens":5,"output_tokens":6}"#,
                    r#""m""#, "[1,{\"a\":[]}]", "null", "7", r#"{"usage":{"prompt_tokens":9}}"#,
                ]),
            ),
            0..6,
        ),
        cut in 0usize..200,
    ) {
        let body = format!(
            "{{{}}}",
            members
                .iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        same(&chat(), &body);
        same(&messages(), &body);
        let cut = &body[..cut.min(body.len())];
        same(&chat(), cut);
    }
}

/// One chat stream chunk built from generated parts (some malformed).
fn chunk(part: (usize, usize, usize, bool)) -> String {
    let (content, usage, extra, broken) = part;
    let content = [
        r#"{"delta":{"content":"Hello there"}}"#,
        r#"{"delta":{"reasoning_content":"think","refusal":null}}"#,
        r#"{"text":"plain completion text"}"#,
        r#"{"delta":{"content":[{"type":"text","text":"parts"}]}}"#,
        r#"{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":1}"}}]}}"#,
        r#"{"delta":{}}"#,
        // Wrong types read as absent; the last of repeated names wins.
        r#"{"delta":{"content":7,"refusal":["x",{"text":5},{"text":"ok"}],"tool_calls":{"a":1}}}"#,
        r#"{"delta":"text","text":["no"]}"#,
        r#"{"delta":{"content":"first","content":"second"},"delta":{"content":"third"}}"#,
        r#"{"delta":{"tool_calls":[7,{"function":"f"},{"function":{"name":"n","arguments":"{}"}}],"function_call":{"name":"g","arguments":null}}}"#,
        r#"{"delta":{"content":"esc\u00e9\n\"q\""},"text":"t"}"#,
        "7",
    ][content % 12];
    let usage = [
        "null",
        r#"{"prompt_tokens":12,"completion_tokens":30}"#,
        r#"{"prompt_tokens":"x"}"#,
    ][usage % 3];
    let extra = [
        r#""id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"#,
        r#""x_groq":{"usage":{"prompt_tokens":3,"completion_tokens":4}},"#,
        r#""model":"gpt-4o-mini","system_fingerprint":"fp","#,
        "",
        r#""model":5,"choices":{"not":"an array"},"#,
        r#""model":"gpt-4o","model":"gpt-4o-mini","usage":{"prompt_tokens":1},"#,
        r#""x_groq":"odd","model":null,"#,
    ][extra % 7];
    let body = format!(r#"{{{extra}"choices":[{content}],"usage":{usage}}}"#);
    if broken {
        body[..body.len() / 2].to_owned()
    } else {
        body
    }
}

proptest! {
    /// A chat stream metered with the sparse chunk parse ends with the same model, usage and
    /// text estimate as with the whole tree.
    #[test]
    fn chat_streams_meter_as_with_the_whole_tree(
        parts in prop::collection::vec((0usize..12, 0usize..3, 0usize..7, prop::bool::weighted(0.1)), 0..12),
        done in any::<bool>(),
    ) {
        let mut sse: String = parts.iter().map(|p| format!("data: {}\n\n", chunk(*p))).collect();
        if done {
            sse.push_str("data: [DONE]\n\n");
        }
        prop_assert_eq!(meter_chat(&sse, false), meter_chat(&sse, true));
    }
}

/// A chat stream's model, usage and parse errors, its chunks read lean or (`whole`) as trees.
fn meter_chat(sse: &str, whole: bool) -> (ResponseMeta, u64) {
    crate::usage::stream::WHOLE_CHUNKS.with(|w| w.set(whole));
    let mut m = StreamMeter::new(&chat());
    m.feed(sse.as_bytes());
    let errors = m.parse_errors();
    let meta = m.finish();
    crate::usage::stream::WHOLE_CHUNKS.with(|w| w.set(false));
    (meta, errors)
}

/// Chunks that are not objects, whose last `choices` is no array, or that end in trailing
/// bytes count as errors or read as empty the same way both ways.
#[test]
fn odd_chat_chunks_meter_as_with_the_whole_tree() {
    for event in [
        "[1,2]",
        "\"text\"",
        "null",
        r#"{"choices":[{"delta":{"content":"a"}}],"choices":{"0":{"delta":{"content":"b"}}}}"#,
        r#"{"choices":[{"delta":{"content":"a"}}]} x"#,
        r#"{"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":-1}}"#,
        r#"{"choices":[{"delta":{"content":"caf\u00e9 \ud83d\ude00"}}],"model":"gpt-4o"}"#,
        r#"{"choices":[{"delta":{"content":"a"}}],"x":[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]}"#,
    ] {
        let sse = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"hello\"}}}}]}}\n\ndata: {event}\n\n"
        );
        let (lean, whole) = (meter_chat(&sse, false), meter_chat(&sse, true));
        assert_eq!(lean, whole, "{event}");
    }
    // Counted as errors: the three non-objects and the trailing bytes, both ways.
    let sse: String = ["[1,2]", "\"text\"", "null", "{} x"]
        .iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect();
    assert_eq!(meter_chat(&sse, false).1, 4);
    assert_eq!(meter_chat(&sse, true).1, 4);
}
