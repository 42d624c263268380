//! Usage and model of a plain JSON body too large to buffer, from its first and last bytes.
//!
//! OpenAI and Gemini write `usage` / `usageMetadata` at the end of a body (after e.g. thousands of
//! embedding vectors), so the meter keeps only the edges of an oversized body and finds the keys
//! there. A key is only taken outside string values (a preceding backslash means it was quoted).

use std::borrow::Cow;

use super::{ResponseMeta, parse_object};
use crate::json::{Json, Object};
use crate::provider::{Api, Endpoint};

/// The value following the last occurrence of the object key `key` in `bytes`.
fn value_after_key<'a>(bytes: &'a [u8], key: &str, last: bool) -> Option<Json<'a>> {
    let needle = format!("\"{key}\"");
    let needle = needle.as_bytes();
    let mut positions = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|&(i, w)| w == needle && (i == 0 || bytes[i - 1] != b'\\'))
        .map(|(i, _)| i);
    let candidates: Vec<usize> = if last {
        positions.collect()
    } else {
        positions.next().into_iter().collect()
    };
    candidates.into_iter().rev().find_map(|i| {
        let rest = &bytes[i + needle.len()..];
        let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
        if rest[colon] != b':' {
            return None;
        }
        serde_json::Deserializer::from_slice(&rest[colon + 1..])
            .into_iter::<Json<'a>>()
            .next()?
            .ok()
    })
}

/// Model and usage of an oversized body whose `head` and `tail` bytes were kept.
pub(super) fn meta_from_edges(
    endpoint: &Endpoint,
    head: &[u8],
    tail: &[u8],
) -> Option<ResponseMeta> {
    let gemini = matches!(
        endpoint.api,
        Api::GeminiGenerateContent | Api::GeminiStreamGenerateContent
    );
    let (usage_key, model_key) = if gemini {
        ("usageMetadata", "modelVersion")
    } else {
        ("usage", "model")
    };
    let mut members = Vec::new();
    if let Some(usage) = value_after_key(tail, usage_key, true) {
        members.push((Cow::Borrowed(usage_key), usage));
    }
    let is_string = |v: &Json<'_>| v.as_str().is_some();
    let model = value_after_key(tail, model_key, true)
        .filter(is_string)
        .or_else(|| value_after_key(head, model_key, false).filter(is_string));
    if let Some(model) = model {
        members.push((Cow::Borrowed(model_key), model));
    }
    parse_object(endpoint.api, &Object::from_members(members)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{Api, Endpoint, ProviderKind};

    #[test]
    fn finds_usage_after_escaped_decoys() {
        let ep = Endpoint {
            kind: ProviderKind::OpenAi,
            api: Api::Embeddings,
            provider: "openai".into(),
            model_in_path: None,
            stream_in_path: false,
            sse_in_query: false,
        };
        let tail = br#"ring \"usage\": 5", "more": [0.1, 0.2]}], "model": "text-embedding-3-large", "usage": {"prompt_tokens": 4096, "total_tokens": 4096}}"#;
        let meta = meta_from_edges(&ep, b"{\"object\":\"list\"", tail).expect("meta");
        assert_eq!(meta.model.as_deref(), Some("text-embedding-3-large"));
        assert_eq!(meta.usage.map(|u| u.input_tokens), Some(4096));
    }
}
