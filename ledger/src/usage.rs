//! Token usage from provider responses, normalised so every provider prices the same way.
//!
//! [`Usage`] splits prompt tokens into plain input, cache reads and cache writes (5-minute and
//! 1-hour), and counts all billed output including reasoning. Nothing is counted twice: OpenAI's
//! `prompt_tokens` and Gemini's `promptTokenCount` include their cached tokens, which are
//! subtracted; Anthropic's `input_tokens` already exclude cache reads and writes.
//!
//! [`parse_response`] reads a complete JSON body, [`StreamMeter`] an SSE stream (or Gemini's
//! streamed JSON array) fed in arbitrary byte chunks.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Error;
use crate::json::{Json, Object};
use crate::provider::{Api, Endpoint};

mod anthropic;
mod body_scan;
mod chat_chunk;
mod gemini;
mod json_array;
mod openai;
mod pretokenize;
pub(crate) mod sparse;
mod stream;
pub(crate) mod tokens;

pub use stream::StreamMeter;

/// Billed tokens of one call, normalised across providers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens billed at the plain input rate (EXCLUDES cache reads and writes).
    pub input_tokens: u64,
    /// Cached input read (OpenAI `cached_tokens`, Anthropic `cache_read_input_tokens`,
    /// Gemini `cachedContentTokenCount`).
    pub cache_read_tokens: u64,
    /// Anthropic 5-minute cache writes (or `cache_creation_input_tokens` when no split is given).
    pub cache_write_5m_tokens: u64,
    /// Anthropic 1-hour cache writes.
    pub cache_write_1h_tokens: u64,
    /// All billed output, including reasoning and Gemini thoughts.
    pub output_tokens: u64,
    /// The reasoning / thinking part of `output_tokens` (informational, already included).
    pub reasoning_tokens: u64,
    /// `true` when estimated from delivered text rather than read from a provider usage record.
    pub estimated: bool,
}

impl Usage {
    /// Every prompt token: plain input, cache reads and cache writes. Long-context price tiers
    /// ("prompts above 200k tokens") compare against this.
    #[must_use]
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_read_tokens)
            .saturating_add(self.cache_write_5m_tokens)
            .saturating_add(self.cache_write_1h_tokens)
    }

    /// Prompt plus output tokens.
    #[must_use]
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens().saturating_add(self.output_tokens)
    }
}

/// What a response says about the call: the model that served it and its usage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseMeta {
    /// The model the response names (`model`, Gemini `modelVersion`); falls back to the model or
    /// Azure deployment in the request path when the response names none.
    pub model: Option<String>,
    /// The usage; `None` when a complete response carried no usage record.
    pub usage: Option<Usage>,
}

/// Builds both OpenAI tokenizers (o200k_base, cl100k_base) now, if they are not built yet.
///
/// Each is otherwise built on its first use: about 60 ms (o200k) and 26 ms (cl100k) on a
/// 2-core VM, during which that call's thread does nothing else and a call on another thread
/// that needs the same tokenizer waits for it. A proxy calls this before it serves, so that no
/// call pays it; it costs their tables' memory (about 51 and 22 MiB) whether or not a model of
/// that encoding is ever called. Blocking: run it off an async runtime's workers.
pub fn load_tokenizers() {
    for e in [tokens::Encoding::O200k, tokens::Encoding::Cl100k] {
        let _ = tokens::bpe(e);
    }
}

/// Estimates the tokens of `text` for `model`, erring high: the model's own BPE for OpenAI
/// models (exact for plain text), otherwise one token per 3 UTF-8 bytes, rounded up.
#[must_use]
pub fn estimate_tokens_from_text(model: Option<&str>, text: &str) -> u64 {
    match model
        .and_then(tokens::encoding_for_model)
        .and_then(tokens::bpe)
    {
        Some(bpe) => tokens::count_bpe(bpe, text),
        None => tokens::heuristic_tokens(text.len() as u64),
    }
}

/// Reads model and usage from a complete (non-stream) JSON response body.
///
/// Bodies without a usage record (error bodies, for instance) give `usage: None`; the free
/// count-tokens APIs give a zero usage. A Gemini streamed JSON array is accepted too.
///
/// # Errors
/// [`Error::Json`] when the body is not JSON, [`Error::Shape`] when it is not an object or a
/// usage field has the wrong type.
pub fn parse_response(endpoint: &Endpoint, body: &[u8]) -> Result<ResponseMeta, Error> {
    let what = response_what(endpoint.api);
    let value = if is_gemini(endpoint.api) {
        Json::parse(body).map_err(|source| Error::Json { what, source })?
    } else {
        // Only the members the parsers read are built into a tree (its texts borrowed from the
        // body); the answer's text, vectors and tool output are scanned past without allocating.
        sparse::object_json(body, &USAGE_KEYS).map_err(|source| Error::Json { what, source })?
    };
    let mut meta = match (&value, endpoint.api) {
        (Json::Array(items), Api::GeminiGenerateContent | Api::GeminiStreamGenerateContent) => {
            let mut state = gemini::Accumulated::default();
            for item in items {
                let obj = item
                    .as_object()
                    .ok_or_else(|| shape(what, "array element is not an object"))?;
                state.absorb(obj).map_err(|d| shape(what, &d))?;
            }
            state.into_meta()
        }
        (Json::Object(obj), api) => parse_object(api, obj).map_err(|d| shape(what, &d))?,
        _ => return Err(shape(what, "body is not a JSON object")),
    };
    if meta.model.is_none() {
        meta.model.clone_from(&endpoint.model_in_path);
    }
    Ok(meta)
}

/// The id of the object a response created, for APIs whose results the provider keeps (OpenAI
/// Responses `id`, chat completion `id`): read from a complete JSON body, or from the first event
/// of a stream (a chat chunk's `id`, a Responses stream's `response.created` event's
/// `response.id`). `None` when the text has none.
#[must_use]
pub fn object_id(api: Api, text: &[u8]) -> Option<String> {
    if !matches!(api, Api::Responses | Api::ChatCompletions) {
        return None;
    }
    let trimmed = text.trim_ascii_start();
    let v: Value = if trimmed.starts_with(b"{") {
        sparse::object(trimmed, &ID_KEYS).ok()?
    } else {
        // An event stream: the first event whose data is a JSON object.
        let mut p = crate::sse::SseParser::new();
        let mut events = Vec::new();
        p.feed(text, &mut events);
        p.finish(&mut events);
        events.iter().find_map(|e| {
            serde_json::from_str::<Value>(&e.data)
                .ok()
                .filter(Value::is_object)
        })?
    };
    let obj = v.get("response").filter(|r| r.is_object()).unwrap_or(&v);
    obj.get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty() && id.len() <= 128)
        .map(str::to_owned)
}

fn is_gemini(api: Api) -> bool {
    matches!(
        api,
        Api::GeminiGenerateContent | Api::GeminiStreamGenerateContent | Api::GeminiCountTokens
    )
}

/// The top-level members [`parse_object`] reads of a response that is not Gemini's (Gemini's
/// parser reads its candidates too, so its bodies are parsed whole).
const USAGE_KEYS: [&str; 3] = ["model", "usage", "x_groq"];

/// The members [`object_id`] reads of a JSON body.
const ID_KEYS: [&str; 2] = ["id", "response"];

fn parse_object(api: Api, obj: &Object<'_>) -> Result<ResponseMeta, String> {
    let model = str_field(obj, "model");
    let usage = match api {
        Api::ChatCompletions | Api::Completions => openai::chat_usage_of(obj)?,
        Api::Responses => openai::responses_usage(obj.get("usage"))?,
        Api::Embeddings => openai::embeddings_usage(obj.get("usage"))?,
        Api::AnthropicMessages => {
            anthropic::Raw::from_usage(obj.get("usage"))?.map(|raw| raw.usage())
        }
        Api::AnthropicCountTokens | Api::GeminiCountTokens => Some(Usage::default()),
        Api::GeminiGenerateContent | Api::GeminiStreamGenerateContent => {
            let mut state = gemini::Accumulated::default();
            state.absorb(obj)?;
            return Ok(state.into_meta());
        }
    };
    Ok(ResponseMeta { model, usage })
}

/// What a response of `api` is called in error messages.
pub(crate) fn response_what(api: Api) -> &'static str {
    match api {
        Api::ChatCompletions => "OpenAI chat completions response",
        Api::Completions => "OpenAI completions response",
        Api::Responses => "OpenAI responses response",
        Api::Embeddings => "OpenAI embeddings response",
        Api::AnthropicMessages => "Anthropic messages response",
        Api::AnthropicCountTokens => "Anthropic count_tokens response",
        Api::GeminiGenerateContent => "Gemini generateContent response",
        Api::GeminiStreamGenerateContent => "Gemini streamGenerateContent response",
        Api::GeminiCountTokens => "Gemini countTokens response",
    }
}

fn shape(what: &'static str, detail: &str) -> Error {
    Error::Shape {
        what,
        detail: detail.to_owned(),
    }
}

// === JSON field helpers shared by the provider modules ===

/// A non-empty string field.
pub(crate) fn str_field(obj: &Object<'_>, key: &str) -> Option<String> {
    obj.get(key)
        .and_then(Json::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A token count: absent or `null` is `None`; anything but a non-negative integer is an error
/// naming `path`.
pub(crate) fn count(
    value: Option<&Json<'_>>,
    key: &str,
    path: &str,
) -> Result<Option<u64>, String> {
    let Some(v) = value.and_then(|v| v.get(key)) else {
        return Ok(None);
    };
    match v {
        Json::Null => Ok(None),
        Json::Number(n) => n
            .as_u64()
            .or_else(|| {
                // Some OpenAI-compatible servers write counts as 12.0.
                n.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < 9.0e15)
                    .map(|f| {
                        #[expect(
                            clippy::cast_possible_truncation,
                            clippy::cast_sign_loss,
                            reason = "checked integral, non-negative and below 2^53"
                        )]
                        let n = f as u64;
                        n
                    })
            })
            .map(Some)
            .ok_or_else(|| format!("{path}.{key} is {n}, not a token count")),
        other => Err(format!(
            "{path}.{key} is {}, not a token count",
            other.type_name()
        )),
    }
}

#[cfg(test)]
mod tests;
