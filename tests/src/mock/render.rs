//! Request parsing and response rendering, in each provider's exact wire shape.

mod anthropic;
mod gemini;
mod openai;

use bytes::Bytes;
use serde_json::Value;

use super::Usage;
use super::knobs::UsageSpec;
use super::words;

/// The provider APIs the mock serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MockApi {
    /// OpenAI `POST /v1/chat/completions`.
    ChatCompletions,
    /// OpenAI legacy `POST /v1/completions`.
    Completions,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// OpenAI `POST /v1/embeddings`.
    Embeddings,
    /// Anthropic `POST /v1/messages`.
    AnthropicMessages,
    /// Anthropic `POST /v1/messages/count_tokens` (free).
    AnthropicCountTokens,
    /// Gemini `POST /v1beta/models/{m}:generateContent`.
    GeminiGenerateContent,
    /// Gemini `POST /v1beta/models/{m}:streamGenerateContent`.
    GeminiStreamGenerateContent,
    /// Gemini `POST /v1beta/models/{m}:countTokens` (free).
    GeminiCountTokens,
}

/// Which provider's conventions (auth header, error shape) an API follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    OpenAi,
    Anthropic,
    Gemini,
}

impl MockApi {
    /// Stable name, matching the ledger's `Api::as_str` spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            MockApi::ChatCompletions => "chat_completions",
            MockApi::Completions => "completions",
            MockApi::Responses => "responses",
            MockApi::Embeddings => "embeddings",
            MockApi::AnthropicMessages => "anthropic_messages",
            MockApi::AnthropicCountTokens => "anthropic_count_tokens",
            MockApi::GeminiGenerateContent => "gemini_generate_content",
            MockApi::GeminiStreamGenerateContent => "gemini_stream_generate_content",
            MockApi::GeminiCountTokens => "gemini_count_tokens",
        }
    }

    /// The API a request path selects (by suffix), with the model named in a Gemini path or an Azure
    /// deployment path.
    #[must_use]
    pub fn from_path(path: &str) -> Option<(MockApi, Option<String>)> {
        let path = path.trim_end_matches('/');
        if let Some(i) = path.rfind("models/") {
            let tail = &path[i + "models/".len()..];
            let (model, method) = tail.rsplit_once(':')?;
            let api = match method {
                "generateContent" => MockApi::GeminiGenerateContent,
                "streamGenerateContent" => MockApi::GeminiStreamGenerateContent,
                "countTokens" => MockApi::GeminiCountTokens,
                _ => return None,
            };
            return Some((api, Some(model.to_owned())));
        }
        let api = if path.ends_with("/chat/completions") {
            MockApi::ChatCompletions
        } else if path.ends_with("/completions") {
            MockApi::Completions
        } else if path.ends_with("/responses") {
            MockApi::Responses
        } else if path.ends_with("/embeddings") {
            MockApi::Embeddings
        } else if path.ends_with("/messages/count_tokens") {
            MockApi::AnthropicCountTokens
        } else if path.ends_with("/messages") {
            MockApi::AnthropicMessages
        } else {
            return None;
        };
        let deployment = path
            .split_once("/deployments/")
            .and_then(|(_, rest)| rest.split('/').next())
            .filter(|d| !d.is_empty())
            .map(str::to_owned);
        Some((api, deployment))
    }

    pub(super) fn family(self) -> Family {
        match self {
            MockApi::ChatCompletions
            | MockApi::Completions
            | MockApi::Responses
            | MockApi::Embeddings => Family::OpenAi,
            MockApi::AnthropicMessages | MockApi::AnthropicCountTokens => Family::Anthropic,
            MockApi::GeminiGenerateContent
            | MockApi::GeminiStreamGenerateContent
            | MockApi::GeminiCountTokens => Family::Gemini,
        }
    }

    /// Calls that produce no output and bill nothing.
    fn is_count(self) -> bool {
        matches!(
            self,
            MockApi::AnthropicCountTokens | MockApi::GeminiCountTokens
        )
    }
}

/// What the mock needs from a request body.
#[derive(Debug, Clone)]
pub(super) struct Request {
    pub api: MockApi,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
    pub text_bytes: u64,
    pub embed_inputs: usize,
    pub dims: Option<usize>,
    pub base64: bool,
    /// Gemini stream as SSE (`?alt=sse`) rather than a JSON array.
    pub sse: bool,
}

const TEXT_KEYS: [&str; 8] = [
    "content",
    "text",
    "input",
    "prompt",
    "system",
    "instructions",
    "contents",
    "parts",
];

fn text_bytes(v: &Value, in_text: bool) -> u64 {
    match v {
        Value::String(s) if in_text => s.len() as u64,
        Value::Array(a) => a.iter().map(|x| text_bytes(x, in_text)).sum(),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| k.as_str() != "type")
            .map(|(k, x)| text_bytes(x, in_text || TEXT_KEYS.contains(&k.as_str())))
            .sum(),
        _ => 0,
    }
}

impl Request {
    /// Parses the JSON body; `model_in_path` comes from Gemini / Azure paths.
    pub(super) fn parse(
        api: MockApi,
        model_in_path: Option<String>,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<Request, String> {
        let v: Value = if body.is_empty() && api.family() == Family::Gemini {
            Value::Object(serde_json::Map::new())
        } else {
            serde_json::from_slice(body)
                .map_err(|e| format!("request body is not valid JSON: {e}"))?
        };
        let model = model_in_path
            .or_else(|| v.get("model").and_then(Value::as_str).map(str::to_owned))
            .ok_or("you must provide a model parameter")?;
        let max_tokens = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_u64))
            .or_else(|| {
                v.pointer("/generationConfig/maxOutputTokens")
                    .and_then(Value::as_u64)
            });
        let embed_inputs = match v.get("input") {
            Some(Value::Array(a)) if a.first().is_some_and(|x| !x.is_number()) => a.len(),
            _ => 1,
        };
        let sse = query.is_some_and(|q| q.split('&').any(|kv| kv == "alt=sse"));
        Ok(Request {
            api,
            model,
            stream: api == MockApi::GeminiStreamGenerateContent
                || v.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: v
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_tokens,
            text_bytes: text_bytes(&v, false),
            embed_inputs,
            dims: v
                .get("dimensions")
                .and_then(Value::as_u64)
                .and_then(|d| usize::try_from(d).ok()),
            base64: v.get("encoding_format").and_then(Value::as_str) == Some("base64"),
            sse,
        })
    }
}

/// Token counts for one call, in the ledger's meaning, before each provider folds what it cannot say.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Tokens {
    pub input: u64,
    pub cached: u64,
    pub write_5m: u64,
    pub write_1h: u64,
    pub output: u64,
    pub reasoning: u64,
}

impl Tokens {
    /// Resolves the spec against the request: derived input, output capped by max tokens.
    pub(super) fn resolve(spec: &UsageSpec, req: &Request, default_output: u64) -> Tokens {
        let input = spec
            .input
            .unwrap_or_else(|| req.text_bytes.div_ceil(4).max(1));
        let no_output = req.api == MockApi::Embeddings || req.api.is_count();
        let output = if no_output {
            0
        } else {
            spec.output.unwrap_or_else(|| {
                req.max_tokens
                    .map_or(default_output, |m| m.min(default_output))
            })
        };
        let reasoning = if no_output { 0 } else { spec.reasoning };
        Tokens {
            input,
            cached: spec.cached,
            write_5m: spec.cache_write_5m,
            write_1h: spec.cache_write_1h,
            output: output.max(reasoning),
            reasoning,
        }
    }

    /// Visible text tokens.
    pub(super) fn text(&self) -> u64 {
        self.output - self.reasoning
    }

    /// What the provider bills, normalised like the ledger's `Usage`.
    pub(super) fn billed(&self, api: MockApi) -> Usage {
        let writes = self.write_5m + self.write_1h;
        let mut u = Usage::default();
        match api {
            MockApi::AnthropicCountTokens | MockApi::GeminiCountTokens => {}
            MockApi::Embeddings => u.input_tokens = self.input + self.cached + writes,
            MockApi::AnthropicMessages => {
                u.input_tokens = self.input;
                u.cache_read_tokens = self.cached;
                u.cache_write_5m_tokens = self.write_5m;
                u.cache_write_1h_tokens = self.write_1h;
                u.output_tokens = self.output;
            }
            _ => {
                u.input_tokens = self.input + writes;
                u.cache_read_tokens = self.cached;
                u.output_tokens = self.output;
                u.reasoning_tokens = self.reasoning;
            }
        }
        u
    }
}

/// Per-call values every renderer uses.
pub(super) struct Ctx<'a> {
    pub call_id: u64,
    pub created: u64,
    /// The response model as a JSON string literal (quoted, escaped).
    pub model_json: &'a str,
    pub chunks: Option<usize>,
    pub embedding_dims: usize,
    /// Output stopped at the request's max tokens.
    pub hit_max: bool,
}

/// A rendered response body.
pub(super) struct Rendered {
    pub frames: Vec<Bytes>,
    pub content_type: &'static str,
    /// The frame carrying the final usage record, if the body carries one.
    pub usage_frame: Option<usize>,
    /// Frames from this index on follow the one before without a generation delay: the
    /// providers send their trailer (OpenAI's usage chunk and `[DONE]`, Anthropic's
    /// `message_delta` and `message_stop`) right after the last generated chunk.
    pub trailer_from: usize,
}

impl Rendered {
    fn json(body: String) -> Rendered {
        Rendered {
            frames: vec![Bytes::from(body)],
            content_type: JSON,
            usage_frame: Some(0),
            trailer_from: 1,
        }
    }
}

pub(super) const JSON: &str = "application/json";
pub(super) const SSE: &str = "text/event-stream; charset=utf-8";

/// `data: {json}\n\n`, optionally with an `event:` line.
pub(super) fn sse_frame(event: Option<&str>, data: &str) -> Bytes {
    let mut s = String::with_capacity(data.len() + 32);
    if let Some(e) = event {
        s.push_str("event: ");
        s.push_str(e);
        s.push('\n');
    }
    s.push_str("data: ");
    s.push_str(data);
    s.push_str("\n\n");
    Bytes::from(s)
}

/// Renders the success response of `req`.
pub(super) fn render(req: &Request, t: &Tokens, ctx: &Ctx<'_>) -> Rendered {
    let pieces = || {
        words::pieces(
            t.text(),
            ctx.chunks
                .unwrap_or_else(|| usize::try_from(t.text()).unwrap_or(1)),
        )
    };
    match (req.api, req.stream) {
        (MockApi::ChatCompletions, false) => Rendered::json(openai::chat(t, ctx)),
        (MockApi::ChatCompletions, true) => {
            openai::chat_stream(t, ctx, &pieces(), req.include_usage)
        }
        (MockApi::Completions, false) => Rendered::json(openai::completion(t, ctx)),
        (MockApi::Completions, true) => {
            openai::completion_stream(t, ctx, &pieces(), req.include_usage)
        }
        (MockApi::Responses, false) => Rendered::json(openai::response(t, ctx)),
        (MockApi::Responses, true) => openai::response_stream(t, ctx, &pieces()),
        (MockApi::Embeddings, _) => Rendered::json(openai::embeddings(t, ctx, req)),
        (MockApi::AnthropicMessages, false) => Rendered::json(anthropic::message(t, ctx)),
        (MockApi::AnthropicMessages, true) => anthropic::message_stream(t, ctx, &pieces()),
        (MockApi::AnthropicCountTokens, _) => Rendered {
            usage_frame: None,
            ..Rendered::json(format!("{{\"input_tokens\":{}}}", t.input + t.cached))
        },
        (MockApi::GeminiGenerateContent | MockApi::GeminiStreamGenerateContent, false) => {
            Rendered::json(gemini::generate(t, ctx))
        }
        (MockApi::GeminiGenerateContent | MockApi::GeminiStreamGenerateContent, true) => {
            gemini::stream(t, ctx, &pieces(), req.sse)
        }
        (MockApi::GeminiCountTokens, _) => Rendered {
            usage_frame: None,
            ..Rendered::json(gemini::count(t))
        },
    }
}

/// The provider's error body for `status`, and its content type.
pub(super) fn error_body(family: Family, status: u16, message: &str) -> String {
    let msg = serde_json::to_string(message).unwrap_or_else(|_| "\"error\"".to_owned());
    match family {
        Family::OpenAi => {
            let (ty, code) = match status {
                401 => ("invalid_request_error", "\"invalid_api_key\""),
                404 => ("invalid_request_error", "\"unknown_url\""),
                429 => ("requests", "\"rate_limit_exceeded\""),
                400..=499 => ("invalid_request_error", "null"),
                _ => ("server_error", "null"),
            };
            format!(
                "{{\"error\":{{\"message\":{msg},\"type\":\"{ty}\",\"param\":null,\"code\":{code}}}}}"
            )
        }
        Family::Anthropic => {
            let ty = match status {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            format!(
                "{{\"type\":\"error\",\"error\":{{\"type\":\"{ty}\",\"message\":{msg}}},\"request_id\":\"req_mock\"}}"
            )
        }
        Family::Gemini => {
            let st = match status {
                400 => "INVALID_ARGUMENT",
                401 => "UNAUTHENTICATED",
                403 => "PERMISSION_DENIED",
                404 => "NOT_FOUND",
                429 => "RESOURCE_EXHAUSTED",
                503 => "UNAVAILABLE",
                504 => "DEADLINE_EXCEEDED",
                _ => "INTERNAL",
            };
            format!("{{\"error\":{{\"code\":{status},\"message\":{msg},\"status\":\"{st}\"}}}}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_select_apis() {
        let cases = [
            ("/v1/chat/completions", MockApi::ChatCompletions, None),
            ("/chat/completions", MockApi::ChatCompletions, None),
            (
                "/openai/deployments/gpt4o/chat/completions",
                MockApi::ChatCompletions,
                Some("gpt4o"),
            ),
            ("/v1/completions", MockApi::Completions, None),
            ("/v1/responses", MockApi::Responses, None),
            ("/embeddings", MockApi::Embeddings, None),
            ("/v1/messages", MockApi::AnthropicMessages, None),
            (
                "/v1/messages/count_tokens",
                MockApi::AnthropicCountTokens,
                None,
            ),
            (
                "/v1beta/models/gemini-2.5-flash:generateContent",
                MockApi::GeminiGenerateContent,
                Some("gemini-2.5-flash"),
            ),
            (
                "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
                MockApi::GeminiStreamGenerateContent,
                Some("gemini-2.5-pro"),
            ),
        ];
        for (p, api, model) in cases {
            assert_eq!(
                MockApi::from_path(p),
                Some((api, model.map(str::to_owned))),
                "{p}"
            );
        }
        assert_eq!(MockApi::from_path("/v1/models"), None);
    }

    #[test]
    fn input_is_text_bytes_over_four() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"12345678"},{"role":"user","content":[{"type":"text","text":"1"}]}]}"#;
        let r = Request::parse(MockApi::ChatCompletions, None, None, body).unwrap();
        assert_eq!(r.text_bytes, 9);
        let t = Tokens::resolve(&UsageSpec::default(), &r, 16);
        assert_eq!((t.input, t.output), (3, 16));
    }
}
