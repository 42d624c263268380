//! Gemini `usageMetadata`: `promptTokenCount` INCLUDES `cachedContentTokenCount`;
//! `thoughtsTokenCount` is billed as output and is NOT part of `candidatesTokenCount`;
//! `toolUsePromptTokenCount` is input. In a stream each chunk's metadata is cumulative: last wins.

use super::stream::StreamState;
use super::{ResponseMeta, Usage, count};
use crate::json::{Json, Object};

/// Normalises one `usageMetadata` object.
pub(super) fn usage_of(meta: &Json<'_>) -> Result<Usage, String> {
    if !meta.is_object() {
        return Err(format!(
            "usageMetadata is {}, not an object",
            meta.type_name()
        ));
    }
    let path = "usageMetadata";
    let prompt = count(Some(meta), "promptTokenCount", path)?.unwrap_or(0);
    let cached = count(Some(meta), "cachedContentTokenCount", path)?
        .unwrap_or(0)
        .min(prompt);
    let tool_prompt = count(Some(meta), "toolUsePromptTokenCount", path)?.unwrap_or(0);
    let candidates = count(Some(meta), "candidatesTokenCount", path)?.unwrap_or(0);
    let thoughts = count(Some(meta), "thoughtsTokenCount", path)?.unwrap_or(0);
    Ok(Usage {
        input_tokens: prompt - cached + tool_prompt,
        cache_read_tokens: cached,
        output_tokens: candidates + thoughts,
        reasoning_tokens: thoughts,
        ..Usage::default()
    })
}

/// What one response object (or stream chunk) says.
struct Chunk<'a> {
    model: Option<&'a str>,
    usage: Option<Usage>,
    finished: bool,
}

fn read<'a>(obj: &'a Object<'_>) -> Result<Chunk<'a>, String> {
    let usage = match obj.get("usageMetadata") {
        None | Some(Json::Null) => None,
        Some(meta) => Some(usage_of(meta)?),
    };
    let finished = obj
        .get("candidates")
        .and_then(Json::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.get("finishReason").is_some_and(Json::is_string))
        });
    Ok(Chunk {
        model: obj
            .get("modelVersion")
            .and_then(Json::as_str)
            .filter(|m| !m.is_empty()),
        usage,
        finished,
    })
}

/// Model and usage over the elements of a complete response (one object or a JSON array).
#[derive(Debug, Default)]
pub(super) struct Accumulated {
    model: Option<String>,
    usage: Option<Usage>,
}

impl Accumulated {
    /// Takes one element: its model and usage replace earlier ones.
    pub(super) fn absorb(&mut self, obj: &Object<'_>) -> Result<(), String> {
        let chunk = read(obj)?;
        if let Some(model) = chunk.model {
            self.model = Some(model.to_owned());
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        Ok(())
    }

    pub(super) fn into_meta(self) -> ResponseMeta {
        ResponseMeta {
            model: self.model,
            usage: self.usage,
        }
    }
}

/// One stream chunk (SSE event data or JSON array element).
pub(super) fn on_chunk(state: &mut StreamState, value: &Json<'_>) {
    let Some(obj) = value.as_object() else {
        state.errors += 1;
        return;
    };
    match read(obj) {
        Ok(chunk) => {
            if let Some(model) = chunk.model {
                state.set_model(model);
            }
            if let Some(usage) = chunk.usage {
                state.set_record(usage, chunk.finished);
            } else if chunk.finished {
                state.mark_final();
            }
        }
        Err(_) => state.errors += 1,
    }
    let candidates = obj
        .get("candidates")
        .and_then(Json::as_array)
        .into_iter()
        .flatten();
    let parts = candidates
        .filter_map(|c| c.get("content")?.get("parts")?.as_array())
        .flatten();
    for part in parts {
        if let Some(text) = part.get("text").and_then(Json::as_str) {
            state.push_text(text);
        }
        if let Some(code) = part
            .get("executableCode")
            .and_then(|c| c.get("code"))
            .and_then(Json::as_str)
        {
            state.push_text(code);
        }
        if let Some(call) = part.get("functionCall") {
            if let Some(name) = call.get("name").and_then(Json::as_str) {
                state.push_text(name);
            }
            if let Some(args) = call.get("args").filter(|a| !a.is_null()) {
                state.push_text(&args.to_string());
            }
        }
    }
}
