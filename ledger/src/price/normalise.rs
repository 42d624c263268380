//! Model-name normalisation: from what a client or provider writes ("models/gemini-2.5-flash",
//! "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "gpt-4o-mini-2024-07-18") to a table id.
//!
//! Each step only removes a decoration (a path prefix, a Bedrock region or version, a date), never
//! part of a family name, so "gpt-4o-mini-tts" can never fall back to "gpt-4o-mini" nor
//! "gpt-4o-mini" to "gpt-4o". The exact name is always tried first. All steps slice the input:
//! no allocation.

/// Bedrock cross-region inference prefixes ("us.anthropic.claude-...").
const BEDROCK_REGIONS: &[&str] = &[
    "us.", "eu.", "apac.", "global.", "us-gov.", "jp.", "au.", "ca.",
];
/// Bedrock vendor prefixes ("anthropic.claude-...").
const BEDROCK_VENDORS: &[&str] = &[
    "anthropic.",
    "meta.",
    "amazon.",
    "mistral.",
    "cohere.",
    "ai21.",
    "deepseek.",
    "openai.",
    "qwen.",
    "google.",
];

/// The normalisation steps, in order; the table is consulted after each one that changes the name.
const STEPS: &[fn(&str) -> &str] = &[
    strip_path_prefix,
    strip_bedrock_prefix,
    strip_at_version,
    strip_bedrock_version,
    strip_latest,
    strip_date,
];

/// Looks `name` up exactly, then after each normalisation step; the first hit wins.
pub(super) fn resolve<T>(name: &str, mut get: impl FnMut(&str) -> Option<T>) -> Option<T> {
    if let Some(hit) = get(name) {
        return Some(hit);
    }
    let mut s = name;
    for step in STEPS {
        let next = step(s);
        if next.len() != s.len() && !next.is_empty() {
            s = next;
            if let Some(hit) = get(s) {
                return Some(hit);
            }
        }
    }
    None
}

/// The canonical id of a price-file key: lower case, without provider path or Bedrock
/// region/vendor prefixes. Dates and versions stay: a dated key is its own id.
pub(super) fn canonical_key(key: &str) -> String {
    let key = key.trim().to_ascii_lowercase();
    strip_bedrock_prefix(strip_path_prefix(&key)).to_owned()
}

/// "anthropic/claude-x", "models/gemini-x", "publishers/google/models/gemini-x" -> the last segment.
pub(super) fn strip_path_prefix(s: &str) -> &str {
    s.rsplit_once('/').map_or(s, |(_, last)| last)
}

/// "us.anthropic.claude-x" / "anthropic.claude-x" -> "claude-x".
fn strip_bedrock_prefix(s: &str) -> &str {
    let s = BEDROCK_REGIONS
        .iter()
        .find_map(|r| s.strip_prefix(r))
        .unwrap_or(s);
    BEDROCK_VENDORS
        .iter()
        .find_map(|v| s.strip_prefix(v))
        .unwrap_or(s)
}

/// Vertex AI "claude-opus-4-1@20250805" -> "claude-opus-4-1".
fn strip_at_version(s: &str) -> &str {
    s.split_once('@').map_or(s, |(model, _)| model)
}

/// Bedrock "...-v1:0" -> "...".
fn strip_bedrock_version(s: &str) -> &str {
    let Some((head, tail)) = s.rsplit_once("-v") else {
        return s;
    };
    let Some((major, minor)) = tail.split_once(':') else {
        return s;
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if digits(major) && digits(minor) {
        head
    } else {
        s
    }
}

/// "claude-3-7-sonnet-latest" -> "claude-3-7-sonnet".
fn strip_latest(s: &str) -> &str {
    s.strip_suffix("-latest").unwrap_or(s)
}

/// A dated snapshot: "-20250929" or "-2024-07-18" at the end.
fn strip_date(s: &str) -> &str {
    let b = s.as_bytes();
    let digit = |i: usize| b[i].is_ascii_digit();
    let n = b.len();
    // "-YYYYMMDD"
    if n > 9 && b[n - 9] == b'-' && b[n - 8..n - 6] == *b"20" && (n - 8..n).all(digit) {
        return &s[..n - 9];
    }
    // "-YYYY-MM-DD"
    if n > 11
        && b[n - 11] == b'-'
        && b[n - 10..n - 8] == *b"20"
        && (n - 10..n - 6).all(digit)
        && b[n - 6] == b'-'
        && (n - 5..n - 3).all(digit)
        && b[n - 3] == b'-'
        && (n - 2..n).all(digit)
    {
        return &s[..n - 11];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_only_remove_decorations() {
        assert_eq!(
            strip_date("claude-sonnet-4-5-20250929"),
            "claude-sonnet-4-5"
        );
        assert_eq!(strip_date("gpt-4o-mini-2024-07-18"), "gpt-4o-mini");
        assert_eq!(
            strip_date("gpt-4-0613"),
            "gpt-4-0613",
            "4-digit suffixes are distinct models"
        );
        assert_eq!(
            strip_date("gemini-2.5-flash-preview-09-2025"),
            "gemini-2.5-flash-preview-09-2025"
        );
        assert_eq!(strip_date("x-2024-07-1a"), "x-2024-07-1a");
        assert_eq!(
            strip_bedrock_version("claude-sonnet-4-5-20250929-v1:0"),
            "claude-sonnet-4-5-20250929"
        );
        assert_eq!(strip_bedrock_version("claude-v2"), "claude-v2");
        assert_eq!(strip_bedrock_prefix("us.anthropic.claude-x"), "claude-x");
        assert_eq!(strip_bedrock_prefix("gpt-4.1"), "gpt-4.1");
        assert_eq!(
            strip_at_version("claude-opus-4-1@20250805"),
            "claude-opus-4-1"
        );
        assert_eq!(
            strip_path_prefix("projects/p/locations/l/publishers/google/models/gemini-2.5-pro"),
            "gemini-2.5-pro"
        );
        assert_eq!(
            canonical_key("Bedrock/US.Anthropic.Claude-X-v1:0"),
            "claude-x-v1:0"
        );
        assert_eq!(
            strip_date("-20250929"),
            "-20250929",
            "never strips to nothing"
        );
    }
}
