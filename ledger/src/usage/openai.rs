//! OpenAI shapes: chat completions, legacy completions, responses and embeddings (also spoken by
//! Azure OpenAI and the OpenAI-compatible hosts).

use super::stream::StreamState;
use super::{Usage, count};
use crate::json::{Json, Object};

/// The usage of a chat/completions body or chunk: `usage`, or Groq's `x_groq.usage`.
pub(super) fn chat_usage_of(obj: &Object<'_>) -> Result<Option<Usage>, String> {
    chat_usage_in(obj.get("usage"), obj.get("x_groq"))
}

/// [`chat_usage_of`] from a chunk's `usage` and `x_groq` members.
pub(super) fn chat_usage_in(
    usage: Option<&Json<'_>>,
    x_groq: Option<&Json<'_>>,
) -> Result<Option<Usage>, String> {
    let usage = usage
        .filter(|v| !v.is_null())
        .or_else(|| x_groq.and_then(|x| x.get("usage")).filter(|v| !v.is_null()));
    chat_usage(usage)
}

/// Chat/completions usage: `prompt_tokens` INCLUDES `prompt_tokens_details.cached_tokens`
/// (DeepSeek: `prompt_cache_hit_tokens`), `completion_tokens` INCLUDES reasoning tokens.
pub(super) fn chat_usage(usage: Option<&Json<'_>>) -> Result<Option<Usage>, String> {
    let Some(u) = object(usage)? else {
        return Ok(None);
    };
    let prompt = count(Some(u), "prompt_tokens", "usage")?.unwrap_or(0);
    let completion = count(Some(u), "completion_tokens", "usage")?.unwrap_or(0);
    let cached = match count(
        u.get("prompt_tokens_details"),
        "cached_tokens",
        "usage.prompt_tokens_details",
    )? {
        Some(c) => c,
        None => count(Some(u), "prompt_cache_hit_tokens", "usage")?.unwrap_or(0),
    };
    let reasoning = count(
        u.get("completion_tokens_details"),
        "reasoning_tokens",
        "usage.completion_tokens_details",
    )?
    .unwrap_or(0);
    Ok(Some(split_cached(prompt, cached, completion, reasoning)))
}

/// Responses usage: `input_tokens` INCLUDES `input_tokens_details.cached_tokens`,
/// `output_tokens` INCLUDES `output_tokens_details.reasoning_tokens`.
pub(super) fn responses_usage(usage: Option<&Json<'_>>) -> Result<Option<Usage>, String> {
    let Some(u) = object(usage)? else {
        return Ok(None);
    };
    let input = count(Some(u), "input_tokens", "usage")?.unwrap_or(0);
    let output = count(Some(u), "output_tokens", "usage")?.unwrap_or(0);
    let cached = count(
        u.get("input_tokens_details"),
        "cached_tokens",
        "usage.input_tokens_details",
    )?
    .unwrap_or(0);
    let reasoning = count(
        u.get("output_tokens_details"),
        "reasoning_tokens",
        "usage.output_tokens_details",
    )?
    .unwrap_or(0);
    Ok(Some(split_cached(input, cached, output, reasoning)))
}

/// Embeddings usage: input only (`prompt_tokens`, else `total_tokens`).
pub(super) fn embeddings_usage(usage: Option<&Json<'_>>) -> Result<Option<Usage>, String> {
    let Some(u) = object(usage)? else {
        return Ok(None);
    };
    let input = match count(Some(u), "prompt_tokens", "usage")? {
        Some(n) => n,
        None => count(Some(u), "total_tokens", "usage")?.unwrap_or(0),
    };
    Ok(Some(Usage {
        input_tokens: input,
        ..Usage::default()
    }))
}

fn split_cached(prompt: u64, cached: u64, output: u64, reasoning: u64) -> Usage {
    let cached = cached.min(prompt);
    Usage {
        input_tokens: prompt - cached,
        cache_read_tokens: cached,
        output_tokens: output,
        reasoning_tokens: reasoning.min(output),
        ..Usage::default()
    }
}

fn object<'a, 'j>(usage: Option<&'a Json<'j>>) -> Result<Option<&'a Json<'j>>, String> {
    match usage {
        None | Some(Json::Null) => Ok(None),
        Some(v @ Json::Object(_)) => Ok(Some(v)),
        Some(other) => Err(format!("usage is {}, not an object", other.type_name())),
    }
}

/// One chat/completions stream chunk, built whole (tests compare [`super::chat_chunk`], which
/// meters streams, with it): the usage record (last wins, never added) and the
/// delivered text of content, reasoning, refusal and tool-call argument deltas.
pub(super) fn on_chat_chunk(state: &mut StreamState, value: &Json<'_>) {
    let Some(obj) = value.as_object() else {
        state.errors += 1;
        return;
    };
    if let Some(model) = obj.get("model").and_then(Json::as_str) {
        state.set_model(model);
    }
    match chat_usage_of(obj) {
        Ok(Some(usage)) => state.set_record(usage, true),
        Ok(None) => {}
        Err(_) => state.errors += 1,
    }
    let Some(choices) = obj.get("choices").and_then(Json::as_array) else {
        return;
    };
    for choice in choices {
        if let Some(text) = choice.get("text").and_then(Json::as_str) {
            state.push_text(text);
        }
        let Some(delta) = choice.get("delta") else {
            continue;
        };
        for key in ["content", "reasoning_content", "reasoning", "refusal"] {
            match delta.get(key) {
                Some(Json::String(text)) => state.push_text(text),
                // Some compatible servers (Mistral) send content as an array of typed parts.
                Some(Json::Array(parts)) => {
                    for part in parts {
                        if let Some(text) = part.get("text").and_then(Json::as_str) {
                            state.push_text(text);
                        }
                    }
                }
                _ => {}
            }
        }
        let calls = delta
            .get("tool_calls")
            .and_then(Json::as_array)
            .into_iter()
            .flatten();
        for function in calls
            .filter_map(|c| c.get("function"))
            .chain(delta.get("function_call"))
        {
            for key in ["name", "arguments"] {
                if let Some(text) = function.get(key).and_then(Json::as_str) {
                    state.push_text(text);
                }
            }
        }
    }
}

/// One responses stream event: `response.completed`, `response.incomplete` and `response.failed`
/// carry the usage record; `*.delta` events carry delivered text (audio deltas excepted).
pub(super) fn on_responses_event(state: &mut StreamState, value: &Json<'_>) {
    let Some(obj) = value.as_object() else {
        state.errors += 1;
        return;
    };
    let kind = obj.get("type").and_then(Json::as_str).unwrap_or("");
    if let Some(response) = obj.get("response").and_then(Json::as_object) {
        if let Some(model) = response.get("model").and_then(Json::as_str) {
            state.set_model(model);
        }
        if matches!(
            kind,
            "response.completed" | "response.incomplete" | "response.failed"
        ) {
            state.mark_ended();
            match responses_usage(response.get("usage")) {
                Ok(Some(usage)) => state.set_record(usage, true),
                Ok(None) => {}
                Err(_) => state.errors += 1,
            }
        }
    }
    if kind.ends_with(".delta")
        && !kind.contains("audio")
        && let Some(text) = obj.get("delta").and_then(Json::as_str)
    {
        state.push_text(text);
    }
}
