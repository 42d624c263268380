//! Request parameters that would hide a call's usage from the enforcer, so the call would settle
//! without it: stripped where dropping them only changes what the response shows, refused where
//! the response could not be metered at all. The list (docs/security.md):
//!
//! | provider | parameter | action |
//! |---|---|---|
//! | Gemini | query `fields` / `$fields` (partial response) | stripped |
//! | Gemini | header `X-Goog-FieldMask` | stripped |
//! | Gemini | query `alt=proto` (protobuf body) | refused (400) |
//! | all | query `key` (a proxy key in the URL) | stripped |
//!
//! OpenAI streams without `stream_options.include_usage` get it added (forward.rs); a Responses
//! `background` request is refused unless `background_responses = "reserve"` (admit.rs).

use http::HeaderMap;
use ledger::provider::ProviderKind;

use crate::error::ProxyError;

/// Query parameters that restrict a Gemini response to some fields (usageMetadata may be left out).
const GEMINI_FIELD_MASKS: [&str; 2] = ["fields", "$fields"];

/// Headers that do the same.
const GEMINI_FIELD_MASK_HEADERS: [&str; 1] = ["x-goog-fieldmask"];

/// The parameter name, percent-decoded (`%24fields` is `$fields`) and lower-cased.
fn param_name(kv: &str) -> String {
    let name = kv.split_once('=').map_or(kv, |(k, _)| k);
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = name
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

fn param_value(kv: &str) -> &str {
    kv.split_once('=').map_or("", |(_, v)| v)
}

/// The query the upstream gets: the proxy key and (Gemini) field masks removed.
///
/// # Errors
/// [`ProxyError::UsageSuppressed`] for a parameter that makes the response unmeterable
/// (Gemini `alt=proto`).
pub fn upstream_query(kind: ProviderKind, query: &str) -> Result<String, ProxyError> {
    let mut kept = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let name = param_name(kv);
        if name == "key" {
            continue;
        }
        if kind == ProviderKind::Gemini {
            if GEMINI_FIELD_MASKS.contains(&name.as_str()) {
                continue;
            }
            if name == "alt" && param_value(kv).eq_ignore_ascii_case("proto") {
                return Err(ProxyError::UsageSuppressed {
                    param: "alt=proto",
                    why: "a protobuf response cannot be metered; use the JSON default or alt=sse",
                });
            }
        }
        kept.push(kv);
    }
    Ok(kept.join("&"))
}

/// Removes headers that would hide usage (Gemini field masks).
pub fn strip_headers(kind: ProviderKind, h: &mut HeaderMap) {
    if kind == ProviderKind::Gemini {
        for n in GEMINI_FIELD_MASK_HEADERS {
            h.remove(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemini_masks_are_stripped_and_proto_refused() {
        let g = ProviderKind::Gemini;
        assert_eq!(
            upstream_query(g, "alt=sse&key=sk&fields=candidates").unwrap(),
            "alt=sse"
        );
        assert_eq!(
            upstream_query(g, "%24fields=x&FIELDS=y&a=1").unwrap(),
            "a=1"
        );
        assert!(matches!(
            upstream_query(g, "alt=PROTO"),
            Err(ProxyError::UsageSuppressed { .. })
        ));
        // Other providers keep their parameters (but never the proxy key).
        let o = ProviderKind::OpenAi;
        assert_eq!(upstream_query(o, "fields=x&key=k").unwrap(), "fields=x");
        let mut h = HeaderMap::new();
        h.insert("X-Goog-FieldMask", "candidates".parse().unwrap());
        strip_headers(o, &mut h);
        assert!(h.contains_key("x-goog-fieldmask"));
        strip_headers(g, &mut h);
        assert!(!h.contains_key("x-goog-fieldmask"));
    }
}
