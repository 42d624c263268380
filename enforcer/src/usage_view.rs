//! The part of a large non-stream response its usage is read from. Parsing a whole answer into a
//! `serde_json::Value` costs many times its size (an embeddings answer of 160 vectors of 4096
//! floats is 7 MiB of JSON and over 20 MiB of tree); for OpenAI and Anthropic objects the ledger
//! reads only `model`, `usage` (and Groq's `x_groq`), so the top level is scanned with borrowed raw
//! values and only those keys and other small members are kept. Gemini bodies (an array of
//! chunks, or an object whose candidates the ledger reads) are left whole.

use std::collections::BTreeMap;

use ledger::provider::Api;
use serde_json::value::RawValue;

/// Bodies up to this size are parsed whole: the saving is not worth a second pass.
pub const WHOLE_BELOW: usize = 256 << 10;

/// Members larger than this are dropped unless the ledger reads them.
const MEMBER_KEEP_BELOW: usize = 16 << 10;

/// The top-level members the ledger's usage parser reads for non-Gemini APIs.
const USAGE_KEYS: [&str; 3] = ["model", "usage", "x_groq"];

/// A smaller JSON object holding what the usage of `body` is read from, or `None` to parse
/// `body` as is (small, Gemini, or not a JSON object).
#[must_use]
pub fn usage_view(api: Api, body: &[u8]) -> Option<Vec<u8>> {
    if body.len() < WHOLE_BELOW
        || matches!(
            api,
            Api::GeminiGenerateContent | Api::GeminiStreamGenerateContent | Api::GeminiCountTokens
        )
    {
        return None;
    }
    let members: BTreeMap<String, &RawValue> = serde_json::from_slice(body).ok()?;
    let kept: BTreeMap<&str, &RawValue> = members
        .iter()
        .filter(|(k, v)| USAGE_KEYS.contains(&k.as_str()) || v.get().len() < MEMBER_KEEP_BELOW)
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    serde_json::to_vec(&kept).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    fn embeddings_answer(vectors: usize) -> Vec<u8> {
        let mut data = String::new();
        for i in 0..vectors {
            if i > 0 {
                data.push(',');
            }
            let v: Vec<String> = (0..1024)
                .map(|j| format!("0.{:06}", (i * 7 + j) % 997))
                .collect();
            let _ = write!(
                data,
                r#"{{"object":"embedding","index":{i},"embedding":[{}]}}"#,
                v.join(",")
            );
        }
        format!(
            r#"{{"object":"list","data":[{data}],"model":"text-embedding-3-small","usage":{{"prompt_tokens":1234,"total_tokens":1234}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn large_embeddings_answer_keeps_model_and_usage_only() {
        let body = embeddings_answer(64);
        assert!(body.len() > WHOLE_BELOW);
        let view = usage_view(Api::Embeddings, &body).expect("a view of a large body");
        assert!(view.len() < 200, "{}", String::from_utf8_lossy(&view));
        let ep = ledger::provider::classify(
            ledger::provider::ProviderKind::OpenAi,
            "openai",
            "POST",
            "/embeddings",
        )
        .expect("embeddings endpoint");
        let whole = ledger::usage::parse_response(&ep, &body).expect("whole");
        let slim = ledger::usage::parse_response(&ep, &view).expect("view");
        assert_eq!(whole.model, slim.model);
        assert_eq!(whole.usage, slim.usage);
        assert!(slim.usage.is_some());
    }

    #[test]
    fn small_gemini_and_non_objects_are_parsed_whole() {
        assert!(usage_view(Api::Embeddings, br#"{"usage":{}}"#).is_none());
        let big = embeddings_answer(64);
        assert!(usage_view(Api::GeminiGenerateContent, &big).is_none());
        let mut arr = b"[".to_vec();
        arr.extend_from_slice(&big);
        arr.push(b']');
        assert!(usage_view(Api::ChatCompletions, &arr).is_none());
    }
}
