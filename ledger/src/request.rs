//! What a request body asks for: model, streaming, the output limit and an input-token estimate.
//!
//! Budgets reserve the worst case of a call before it is forwarded, from this estimate and the
//! output limit; the real usage replaces it when the response is metered.

use crate::error::Error;
use crate::json::{Json, NULL, Object};
use crate::provider::{Api, Endpoint, ProviderKind};
use crate::usage::tokens::{self, Encoding};

mod context;
mod estimate;

pub use crate::usage::tokens::TokenCache;
use estimate::Estimator;
pub use estimate::{ANTHROPIC_TOOL_PROMPT_TOKENS, MEDIA_TOKENS};

/// What the enforcer needs to know about a request before forwarding it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// The model in the body, else the one in the path (Gemini, Vertex) or the Azure deployment.
    pub model: Option<String>,
    /// The response will be streamed.
    pub stream: bool,
    /// The response will carry a usage record: always, except an OpenAI-style chat/completions
    /// stream without `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// The output limit the request sets, multiplied by the number of choices (`n`, `best_of`,
    /// `candidateCount`); `Some(0)` for APIs without output (embeddings, token counting).
    pub max_output_tokens: Option<u64>,
    /// Choices the provider generates and bills (`n`, `best_of`, `candidateCount`; at least 1):
    /// a default output limit must be multiplied by it too.
    pub choices: u64,
    /// The request refers to context the proxy cannot count (a stored response or conversation,
    /// a context cache, an uploaded file, a hosted tool's results): see `request/context.rs`.
    pub unseen_context: bool,
    /// The request may write the prompt cache (Anthropic `cache_control`), billed above input.
    pub cache_writes: bool,
    /// An OpenAI Responses `background: true` request: its creation returns no usage.
    pub background: bool,
    /// The provider keeps the result as an object readable by id (a Responses call unless
    /// `store: false`, a chat completion with `store: true`).
    pub stores_object: bool,
    /// Estimated input tokens; errs high (see docs/providers.md).
    pub input_tokens_estimate: u64,
    /// The estimate used the model's own tokenizer over text only (no media, no tool schemas).
    pub input_estimate_exact: bool,
}

/// Parses a request body for `endpoint`.
///
/// # Errors
/// [`Error::Json`] when the body is not JSON; [`Error::Shape`] when it is not an object or a
/// field the estimate needs has the wrong type (e.g. `messages` is not an array).
pub fn parse_request(endpoint: &Endpoint, body: &[u8]) -> Result<RequestInfo, Error> {
    parse(endpoint, body, None)
}

/// [`parse_request`] with token counts of long texts kept in `cache` under `scope` (the enforcer
/// passes the tenant): the same result, without tokenising again the system prompt, tools and
/// earlier turns that every call of a conversation resends.
///
/// # Errors
/// As [`parse_request`].
pub fn parse_request_cached(
    endpoint: &Endpoint,
    body: &[u8],
    cache: &TokenCache,
    scope: &str,
) -> Result<RequestInfo, Error> {
    parse(endpoint, body, Some((cache, scope)))
}

fn parse(
    endpoint: &Endpoint,
    body: &[u8],
    cache: Option<(&TokenCache, &str)>,
) -> Result<RequestInfo, Error> {
    let what = request_what(endpoint.api);
    let value = Json::parse(body).map_err(|source| Error::Json { what, source })?;
    let Json::Object(obj) = value else {
        return Err(Error::Shape {
            what,
            detail: "body is not a JSON object".to_owned(),
        });
    };
    parse_object(endpoint, &obj, cache).map_err(|detail| Error::Shape { what, detail })
}

/// `body` as JSON where, if it is an object, only the top-level members named in `keys` are built
/// (the last of repeated names wins); every other member is checked for syntax and skipped
/// without being built. Anything but an object comes back as [`Json::Null`]. For callers that
/// edit a request by one member without rebuilding it (the enforcer's `include_usage`).
///
/// # Errors
/// When `body` is not JSON.
pub fn top_level_members(
    body: &[u8],
    keys: &[&str],
) -> Result<serde_json::Value, serde_json::Error> {
    crate::usage::sparse::object(body, keys)
}

/// The model a request names (else the path's model or Azure deployment), the same as
/// [`parse_request`]'s `model`, without walking the prompt or estimating tokens: for callers that
/// only attribute a call, such as the observer.
///
/// # Errors
/// [`Error::Json`] when the body is not JSON, [`Error::Shape`] when it is not an object or its
/// `model` is not a string.
pub fn request_model(endpoint: &Endpoint, body: &[u8]) -> Result<Option<String>, Error> {
    /// Only `model` is kept; serde skips every other member without building it.
    #[derive(serde::Deserialize)]
    struct ModelOnly<'a> {
        #[serde(default, borrow)]
        model: Option<Json<'a>>,
    }
    let what = request_what(endpoint.api);
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(Error::Shape {
            what,
            detail: "body is not a JSON object".to_owned(),
        });
    }
    let m: ModelOnly =
        serde_json::from_slice(body).map_err(|source| Error::Json { what, source })?;
    let model = model_value(m.model.as_ref()).map_err(|detail| Error::Shape { what, detail })?;
    Ok(model.or_else(|| endpoint.model_in_path.clone()))
}

/// A request's `model` member: a non-empty string, or absent (`None`).
fn model_value(v: Option<&Json<'_>>) -> Result<Option<String>, String> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(m)) if !m.is_empty() => Ok(Some(m.to_string())),
        Some(Json::String(_)) => Ok(None),
        Some(other) => Err(format!("model is {}, not a string", other.type_name())),
    }
}

fn parse_object(
    endpoint: &Endpoint,
    obj: &Object<'_>,
    cache: Option<(&TokenCache, &str)>,
) -> Result<RequestInfo, String> {
    let model = model_value(obj.get("model"))?;
    let model = model.or_else(|| endpoint.model_in_path.clone());
    let stream = endpoint.stream_in_path || bool_field(obj, "stream")?.unwrap_or(false);
    let mut est = estimator(endpoint, model.as_deref(), cache);
    let out = output(endpoint, &mut est, obj, stream)?;
    let (input_tokens_estimate, input_estimate_exact) = est.finish();
    let (unseen_context, cache_writes) = context::scan(endpoint.api, obj);
    Ok(RequestInfo {
        model,
        stream,
        include_usage: out.include_usage,
        max_output_tokens: out.limit.map(|l| l.saturating_mul(out.choices)),
        choices: out.choices,
        unseen_context,
        cache_writes,
        background: endpoint.api == Api::Responses
            && bool_field(obj, "background")?.unwrap_or(false),
        stores_object: match endpoint.api {
            Api::Responses => bool_field(obj, "store")?.unwrap_or(true),
            Api::ChatCompletions => bool_field(obj, "store")?.unwrap_or(false),
            _ => false,
        },
        input_tokens_estimate,
        input_estimate_exact,
    })
}

/// The input estimator for a request: the model's own BPE for OpenAI-family models (o200k for
/// an unknown OpenAI model, not exact), else the bytes-based estimate.
fn estimator<'a>(
    endpoint: &Endpoint,
    model: Option<&str>,
    cache: Option<(&'a TokenCache, &'a str)>,
) -> Estimator<'a> {
    let (encoding, own) = match model.and_then(tokens::encoding_for_model) {
        Some(e) => (Some(e), true),
        None if matches!(
            endpoint.kind,
            ProviderKind::OpenAi | ProviderKind::AzureOpenAi
        ) =>
        {
            (Some(Encoding::O200k), false)
        }
        None => (None, false),
    };
    let bpe = if endpoint.kind.is_openai_family() {
        encoding.and_then(tokens::bpe)
    } else {
        None
    };
    Estimator::new(bpe, own, cache)
}

/// What a request says about its output.
struct Output {
    /// The declared output limit per choice.
    limit: Option<u64>,
    /// Choices generated (`n`, `best_of`, `candidateCount`), at least 1.
    choices: u64,
    /// Whether the response will carry a usage record.
    include_usage: bool,
}

impl Output {
    fn one(limit: Option<u64>) -> Output {
        Output {
            limit,
            choices: 1,
            include_usage: true,
        }
    }
}

/// Feeds the prompt of `obj` to the estimator and reads the output limit, per API.
fn output(
    endpoint: &Endpoint,
    est: &mut Estimator<'_>,
    obj: &Object<'_>,
    stream: bool,
) -> Result<Output, String> {
    Ok(match endpoint.api {
        Api::ChatCompletions => {
            chat(est, obj)?;
            let limit = match uint_field(obj, "max_completion_tokens")? {
                Some(n) => Some(n),
                None => uint_field(obj, "max_tokens")?,
            };
            Output {
                limit,
                choices: uint_field(obj, "n")?.unwrap_or(1).max(1),
                include_usage: !stream || stream_include_usage(obj)?,
            }
        }
        Api::Completions => {
            est.prompt_input(obj.get("prompt").unwrap_or(NULL));
            est.content(obj.get("suffix").unwrap_or(NULL));
            let choices = uint_field(obj, "n")?
                .unwrap_or(1)
                .max(uint_field(obj, "best_of")?.unwrap_or(1))
                .max(1);
            Output {
                limit: uint_field(obj, "max_tokens")?,
                choices,
                include_usage: !stream || stream_include_usage(obj)?,
            }
        }
        Api::Embeddings => {
            est.prompt_input(obj.get("input").unwrap_or(NULL));
            Output::one(Some(0))
        }
        Api::Responses => {
            responses(est, obj)?;
            Output::one(uint_field(obj, "max_output_tokens")?)
        }
        Api::AnthropicMessages => {
            anthropic(est, obj)?;
            Output::one(uint_field(obj, "max_tokens")?)
        }
        Api::AnthropicCountTokens => {
            anthropic(est, obj)?;
            Output::one(Some(0))
        }
        Api::GeminiGenerateContent | Api::GeminiStreamGenerateContent | Api::GeminiCountTokens => {
            // countTokens may wrap a whole generateContent request.
            let inner = obj
                .get("generateContentRequest")
                .and_then(Json::as_object)
                .unwrap_or(obj);
            gemini(est, inner)?;
            if endpoint.api == Api::GeminiCountTokens {
                Output::one(Some(0))
            } else {
                gemini_output(inner)?
            }
        }
    })
}

/// Gemini's `generationConfig` (either spelling): output limit and candidate count.
fn gemini_output(req: &Object<'_>) -> Result<Output, String> {
    let config = req
        .get("generationConfig")
        .or_else(|| req.get("generation_config"))
        .and_then(Json::as_object);
    let Some(c) = config else {
        return Ok(Output::one(None));
    };
    let limit = match uint_field(c, "maxOutputTokens")? {
        Some(n) => Some(n),
        None => uint_field(c, "max_output_tokens")?,
    };
    let choices = match uint_field(c, "candidateCount")? {
        Some(n) => n,
        None => uint_field(c, "candidate_count")?.unwrap_or(1),
    };
    Ok(Output {
        limit,
        choices: choices.max(1),
        include_usage: true,
    })
}

fn chat(est: &mut Estimator<'_>, obj: &Object<'_>) -> Result<(), String> {
    for message in array_field(obj, "messages")? {
        let Some(m) = message.as_object() else {
            return Err("messages[] element is not an object".to_owned());
        };
        est.message();
        est.content(m.get("role").unwrap_or(NULL));
        est.content(m.get("content").unwrap_or(NULL));
        if let Some(name) = m.get("name").and_then(Json::as_str) {
            est.text(name);
            est.fixed(1);
        }
        for call in m
            .get("tool_calls")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(function) = call.get("function") {
                est.content(function.get("name").unwrap_or(NULL));
                est.content(function.get("arguments").unwrap_or(NULL));
            }
        }
        if let Some(function) = m.get("function_call") {
            est.json(function);
        }
        est.content(m.get("tool_call_id").unwrap_or(NULL));
    }
    est.reply_priming();
    for key in ["tools", "functions", "response_format"] {
        if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
            est.json(v);
        }
    }
    Ok(())
}

fn responses(est: &mut Estimator<'_>, obj: &Object<'_>) -> Result<(), String> {
    est.content(obj.get("instructions").unwrap_or(NULL));
    match obj.get("input") {
        Some(Json::String(s)) => {
            est.message();
            est.text(s);
        }
        Some(Json::Array(items)) => {
            for item in items {
                est.message();
                let kind = item.get("type").and_then(Json::as_str).unwrap_or("message");
                match kind {
                    "message" => est.content(item.get("content").unwrap_or(NULL)),
                    "function_call" | "custom_tool_call" => {
                        est.content(item.get("name").unwrap_or(NULL));
                        est.content(
                            item.get("arguments")
                                .or_else(|| item.get("input"))
                                .unwrap_or(NULL),
                        );
                    }
                    "function_call_output" | "custom_tool_call_output" => {
                        est.content(item.get("output").unwrap_or(NULL));
                    }
                    _ => est.json(item),
                }
            }
        }
        None | Some(Json::Null) => {}
        Some(other) => {
            return Err(format!(
                "input is {}, not a string or an array",
                other.type_name()
            ));
        }
    }
    est.reply_priming();
    for key in ["tools", "text"] {
        if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
            est.json(v);
        }
    }
    Ok(())
}

fn anthropic(est: &mut Estimator<'_>, obj: &Object<'_>) -> Result<(), String> {
    est.content(obj.get("system").unwrap_or(NULL));
    for message in array_field(obj, "messages")? {
        est.message();
        est.content(message.get("content").unwrap_or(NULL));
    }
    est.reply_priming();
    if let Some(tools) = obj
        .get("tools")
        .and_then(Json::as_array)
        .filter(|t| !t.is_empty())
    {
        est.fixed(ANTHROPIC_TOOL_PROMPT_TOKENS);
        for tool in tools {
            est.json(tool);
        }
    }
    Ok(())
}

fn gemini(est: &mut Estimator<'_>, obj: &Object<'_>) -> Result<(), String> {
    if let Some(system) = obj
        .get("systemInstruction")
        .or_else(|| obj.get("system_instruction"))
    {
        est.message();
        est.gemini_parts(system.get("parts").unwrap_or(NULL));
    }
    for content in array_field(obj, "contents")? {
        est.message();
        est.gemini_parts(content.get("parts").unwrap_or(NULL));
    }
    est.reply_priming();
    if let Some(tools) = obj.get("tools").filter(|v| !v.is_null()) {
        est.json(tools);
    }
    Ok(())
}

/// What a request of `api` is called in error messages.
fn request_what(api: Api) -> &'static str {
    match api {
        Api::ChatCompletions => "OpenAI chat completions request",
        Api::Completions => "OpenAI completions request",
        Api::Responses => "OpenAI responses request",
        Api::Embeddings => "OpenAI embeddings request",
        Api::AnthropicMessages => "Anthropic messages request",
        Api::AnthropicCountTokens => "Anthropic count_tokens request",
        Api::GeminiGenerateContent => "Gemini generateContent request",
        Api::GeminiStreamGenerateContent => "Gemini streamGenerateContent request",
        Api::GeminiCountTokens => "Gemini countTokens request",
    }
}

fn stream_include_usage(obj: &Object<'_>) -> Result<bool, String> {
    match obj.get("stream_options") {
        None | Some(Json::Null) => Ok(false),
        Some(Json::Object(options)) => Ok(bool_field(options, "include_usage")?.unwrap_or(false)),
        Some(other) => Err(format!(
            "stream_options is {}, not an object",
            other.type_name()
        )),
    }
}

fn array_field<'a, 'j>(obj: &'a Object<'j>, key: &str) -> Result<&'a [Json<'j>], String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(&[]),
        Some(Json::Array(items)) => Ok(items),
        Some(other) => Err(format!("{key} is {}, not an array", other.type_name())),
    }
}

fn bool_field(obj: &Object<'_>, key: &str) -> Result<Option<bool>, String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(format!("{key} is {}, not a boolean", other.type_name())),
    }
}

fn uint_field(obj: &Object<'_>, key: &str) -> Result<Option<u64>, String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{key} is {n}, not a non-negative integer")),
        Some(other) => Err(format!(
            "{key} is {}, not a non-negative integer",
            other.type_name()
        )),
    }
}

#[cfg(test)]
mod tests;
