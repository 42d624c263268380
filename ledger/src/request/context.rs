//! What a request makes the provider bill beyond the text the proxy can count: context it only
//! refers to (a stored response or conversation, a context cache, an uploaded file, results of
//! a hosted tool the provider runs), and prompt-cache writes, which Anthropic bills above the
//! input price. A reservation that ignored them would not be an upper bound.

use crate::json::{Json, Object};
use crate::provider::Api;

/// Keys whose presence (with a non-null value) anywhere in the prompt means context the proxy
/// cannot see: uploaded files by id or URI.
const FILE_KEYS: &[&str] = &["file_id", "fileData", "file_data"];

/// Hosted tools the provider runs itself, adding their results to the billed input: web and
/// file search, code execution, URL fetch, remote MCP servers.
const HOSTED_TOOL_PREFIXES: &[&str] = &[
    "web_search",
    "file_search",
    "code_interpreter",
    "code_execution",
    "web_fetch",
    "mcp",
    "computer_use",
    "image_generation",
];

/// Gemini tool keys for tools Google runs.
const GEMINI_HOSTED_TOOLS: &[&str] = &[
    "googleSearch",
    "google_search",
    "googleSearchRetrieval",
    "google_search_retrieval",
    "codeExecution",
    "code_execution",
    "urlContext",
    "url_context",
    "fileSearch",
    "file_search",
];

/// How deep the search for file references goes (messages → content parts → source).
const MAX_DEPTH: usize = 8;

/// (unseen context, cache writes) of a request body.
pub(super) fn scan(api: Api, obj: &Object<'_>) -> (bool, bool) {
    let unseen = match api {
        Api::Responses => {
            present(obj, "previous_response_id")
                || present(obj, "conversation")
                || present(obj, "prompt")
                || hosted_tools(obj.get("tools"))
                || has_key(obj.get("input"), FILE_KEYS, 0)
        }
        Api::ChatCompletions | Api::Completions => {
            present(obj, "web_search_options")
                || hosted_tools(obj.get("tools"))
                || has_key(obj.get("messages"), FILE_KEYS, 0)
        }
        Api::AnthropicMessages => {
            present(obj, "container")
                || present(obj, "mcp_servers")
                || hosted_tools(obj.get("tools"))
                || has_key(obj.get("messages"), FILE_KEYS, 0)
                || has_key(obj.get("system"), FILE_KEYS, 0)
        }
        Api::GeminiGenerateContent | Api::GeminiStreamGenerateContent => {
            present(obj, "cachedContent")
                || present(obj, "cached_content")
                || gemini_hosted_tools(obj.get("tools"))
                || has_key(obj.get("contents"), FILE_KEYS, 0)
        }
        Api::Embeddings | Api::AnthropicCountTokens | Api::GeminiCountTokens => false,
    };
    let cache_writes = api == Api::AnthropicMessages
        && (present(obj, "cache_control")
            || ["system", "messages", "tools"]
                .iter()
                .any(|k| has_key(obj.get(k), &["cache_control"], 0)));
    (unseen, cache_writes)
}

fn present(obj: &Object<'_>, key: &str) -> bool {
    obj.get(key).is_some_and(|v| !v.is_null())
}

/// Whether `v` holds, at any depth up to [`MAX_DEPTH`], an object with one of `keys` set.
fn has_key(v: Option<&Json<'_>>, keys: &[&str], depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    match v {
        Some(Json::Object(o)) => {
            keys.iter().any(|k| present(o, k))
                || o.values().any(|c| has_key(Some(c), keys, depth + 1))
        }
        Some(Json::Array(a)) => a.iter().any(|c| has_key(Some(c), keys, depth + 1)),
        _ => false,
    }
}

/// OpenAI and Anthropic tools: `{"type": "web_search_20250305", ...}`; function tools are the
/// caller's own and add nothing unseen.
fn hosted_tools(tools: Option<&Json<'_>>) -> bool {
    let Some(Json::Array(tools)) = tools else {
        return false;
    };
    tools.iter().any(|t| {
        t.get("type")
            .and_then(Json::as_str)
            .is_some_and(|ty| HOSTED_TOOL_PREFIXES.iter().any(|p| ty.starts_with(p)))
    })
}

/// Gemini tools: `{"googleSearch": {}}`, `{"codeExecution": {}}`, ...
fn gemini_hosted_tools(tools: Option<&Json<'_>>) -> bool {
    let Some(Json::Array(tools)) = tools else {
        return false;
    };
    tools.iter().any(|t| {
        t.as_object()
            .is_some_and(|o| GEMINI_HOSTED_TOOLS.iter().any(|k| o.contains_key(k)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(text: &str) -> Object<'_> {
        match Json::parse(text.as_bytes()).unwrap() {
            Json::Object(o) => o,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn unseen_context_and_cache_writes() {
        let cases = [
            (
                Api::Responses,
                r#"{"input":"hi","previous_response_id":"resp_1"}"#,
                (true, false),
            ),
            (
                Api::Responses,
                r#"{"input":"hi","previous_response_id":null}"#,
                (false, false),
            ),
            (
                Api::Responses,
                r#"{"input":[{"role":"user","content":[{"type":"input_file","file_id":"file-1"}]}]}"#,
                (true, false),
            ),
            (
                Api::Responses,
                r#"{"input":"hi","tools":[{"type":"web_search_preview"}]}"#,
                (true, false),
            ),
            (
                Api::Responses,
                r#"{"input":"hi","tools":[{"type":"function","name":"f"}]}"#,
                (false, false),
            ),
            (
                Api::ChatCompletions,
                r#"{"messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-9"}}]}]}"#,
                (true, false),
            ),
            (
                Api::ChatCompletions,
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                (false, false),
            ),
            (
                Api::AnthropicMessages,
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":"x","cache_control":{"type":"ephemeral","ttl":"1h"}}]}]}"#,
                (false, true),
            ),
            (
                Api::AnthropicMessages,
                r#"{"system":[{"type":"text","text":"x","cache_control":{"type":"ephemeral"}}],"messages":[]}"#,
                (false, true),
            ),
            (
                Api::AnthropicMessages,
                r#"{"messages":[{"role":"user","content":[{"type":"document","source":{"type":"file","file_id":"f"}}]}]}"#,
                (true, false),
            ),
            (
                Api::AnthropicMessages,
                r#"{"messages":[],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
                (true, false),
            ),
            (
                Api::GeminiGenerateContent,
                r#"{"contents":[],"cachedContent":"cachedContents/abc"}"#,
                (true, false),
            ),
            (
                Api::GeminiGenerateContent,
                r#"{"contents":[{"parts":[{"fileData":{"fileUri":"x"}}]}]}"#,
                (true, false),
            ),
            (
                Api::GeminiGenerateContent,
                r#"{"contents":[],"tools":[{"googleSearch":{}}]}"#,
                (true, false),
            ),
            (
                Api::GeminiGenerateContent,
                r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#,
                (false, false),
            ),
            (
                Api::Embeddings,
                r#"{"input":"x","file_id":"y"}"#,
                (false, false),
            ),
        ];
        for (api, body, want) in cases {
            assert_eq!(scan(api, &obj(body)), want, "{api:?} {body}");
        }
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let mut v = String::from(r#"{"file_id":"f"}"#);
        for _ in 0..20 {
            v = format!("[{v}]");
        }
        let body = format!(r#"{{"messages":{v}}}"#);
        let o = obj(&body);
        assert_eq!(scan(Api::ChatCompletions, &o), (false, false));
    }
}
