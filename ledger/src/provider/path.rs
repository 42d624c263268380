//! Path and query helpers for provider detection.

use super::Api;

/// Splits `path?query` (a `#fragment` is dropped).
pub(super) fn split_query(path_and_query: &str) -> (&str, &str) {
    let without_fragment = path_and_query
        .split_once('#')
        .map_or(path_and_query, |(p, _)| p);
    without_fragment
        .split_once('?')
        .unwrap_or((without_fragment, ""))
}

/// Whether the query string has `key=value` (case-sensitive key, as Google's APIs are).
pub(super) fn query_has(query: &str, key: &str, value: &str) -> bool {
    query.split('&').any(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        k == key && percent_decode(v).eq_ignore_ascii_case(value)
    })
}

/// The OpenAI API a path remainder names exactly ("/chat/completions", ...).
pub(super) fn openai_api_exact(rest: &str) -> Option<Api> {
    match rest.trim_end_matches('/') {
        "/chat/completions" => Some(Api::ChatCompletions),
        "/completions" | "/fim/completions" => Some(Api::Completions),
        "/responses" => Some(Api::Responses),
        "/embeddings" => Some(Api::Embeddings),
        _ => None,
    }
}

/// The OpenAI API the trailing path segments name, wherever the base path ends.
pub(super) fn openai_api_suffix(segments: &[&str]) -> Option<Api> {
    match segments {
        [.., "chat", "completions"] => Some(Api::ChatCompletions),
        [.., "completions"] => Some(Api::Completions),
        [.., "responses"] => Some(Api::Responses),
        [.., "embeddings"] => Some(Api::Embeddings),
        _ => None,
    }
}

/// The Gemini API of a `:{method}` suffix.
pub(super) fn google_method(method: &str) -> Option<Api> {
    match method {
        "generateContent" => Some(Api::GeminiGenerateContent),
        "streamGenerateContent" => Some(Api::GeminiStreamGenerateContent),
        "countTokens" => Some(Api::GeminiCountTokens),
        _ => None,
    }
}

/// Decodes `%XX` escapes (invalid escapes are kept as written; invalid UTF-8 becomes U+FFFD).
pub(crate) fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && hex.iter().all(u8::is_ascii_hexdigit)
            && let Ok(text) = std::str::from_utf8(hex)
            && let Ok(value) = u8::from_str_radix(text, 16)
        {
            out.push(value);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
