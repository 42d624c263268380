//! Ways a real provider answers without a usage record, reproduced so the enforcer's handling of
//! them is tested against the behaviour, not against a stub:
//!
//! - Gemini partial responses: a `fields` / `$fields` query parameter or an `X-Goog-FieldMask`
//!   header that does not name `usageMetadata` leaves it out of the body;
//! - OpenAI Responses `background: true`: the creation answers `status: "queued"` with no output
//!   and `usage: null` (the output, and the usage, come later from `GET /responses/{id}`);
//! - `x-mock-fault: no-usage`: a body (or stream) with its usage record removed, as some
//!   OpenAI-compatible servers send.
//!
//! In every case the mock's ledger still records the usage the call costs: the provider bills it
//! whether or not the response shows it.

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::render::{MockApi, Rendered};

/// Why a response carries no usage record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hidden {
    /// A Gemini field mask without `usageMetadata`.
    FieldMask,
    /// A queued background response.
    Background,
    /// The `no-usage` fault.
    Fault,
}

/// Whether a Gemini request restricts its response to fields that exclude `usageMetadata`.
pub(super) fn gemini_masked(api: MockApi, query: Option<&str>, headers: &HeaderMap) -> bool {
    if !matches!(
        api,
        MockApi::GeminiGenerateContent | MockApi::GeminiStreamGenerateContent
    ) {
        return false;
    }
    let names_usage = |mask: &str| {
        mask.split(',')
            .any(|f| f.trim().starts_with("usageMetadata"))
    };
    let query_mask = query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        matches!(k, "fields" | "$fields" | "%24fields").then_some(v)
    });
    let header_mask = headers
        .get("x-goog-fieldmask")
        .and_then(|v| v.to_str().ok());
    [query_mask, header_mask]
        .into_iter()
        .flatten()
        .any(|m| !names_usage(&m.replace("%2C", ",")))
}

/// Whether an OpenAI Responses request body asks for a background response.
pub(super) fn is_background(api: MockApi, body: &[u8]) -> bool {
    api == MockApi::Responses
        && serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("background").and_then(Value::as_bool))
            .unwrap_or(false)
}

/// Rewrites a rendered response so it carries no usage record.
pub(super) fn apply(rendered: &mut Rendered, stream: bool, why: Hidden) {
    if stream {
        // The event that carries the usage is dropped; the rest of the stream is unchanged.
        if let Some(i) = rendered.usage_frame.take()
            && i < rendered.frames.len()
        {
            rendered.frames.remove(i);
            if rendered.trailer_from > i {
                rendered.trailer_from -= 1;
            }
        }
        return;
    }
    let Some(first) = rendered.frames.first() else {
        return;
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(first) else {
        return;
    };
    if let Some(o) = v.as_object_mut() {
        o.remove("usageMetadata");
        if o.contains_key("usage") {
            o.insert("usage".into(), Value::Null);
        }
        if why == Hidden::Background {
            o.insert("status".into(), Value::from("queued"));
            o.insert("output".into(), Value::Array(Vec::new()));
        }
    }
    rendered.frames[0] = Bytes::from(v.to_string());
    rendered.usage_frame = None;
}
