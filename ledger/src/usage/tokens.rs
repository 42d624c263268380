//! Token counting: OpenAI's BPE encodings and the byte heuristic for other models.
//!
//! The encodings come from `bpe-openai` (GitHub's linear-time BPE): the same token counts as
//! OpenAI's tiktoken for o200k_base and cl100k_base (pinned by a test below), about six
//! times faster, which matters because the enforcer counts every prompt on its hot path.

/// An OpenAI tokenizer (pre-tokenisation regex plus byte-pair encoding).
pub(crate) type Bpe = bpe_openai::Tokenizer;

/// An OpenAI BPE encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o-series, gpt-oss.
    O200k,
    /// gpt-4, gpt-3.5-turbo, text-embedding-3-*, text-embedding-ada-002.
    Cl100k,
}

/// UTF-8 bytes per token of the heuristic used for non-OpenAI models. English prose averages about
/// 4 bytes per token on every current tokenizer and code about 3.5, so 3 errs high; CJK text is
/// 3 bytes per character and at most about one token per character.
pub(crate) const BYTES_PER_TOKEN: u64 = 3;

/// The encoding an OpenAI model uses, from its name (provider prefixes such as `openai/` and
/// Azure-style dots are tolerated). `None` for models that are not OpenAI's.
pub(crate) fn encoding_for_model(model: &str) -> Option<Encoding> {
    let lower = model.trim().to_ascii_lowercase();
    let name = lower.rsplit('/').next().unwrap_or(&lower);
    const O200K: &[&str] = &[
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "gpt-oss",
        "chatgpt-4o",
        "o1",
        "o3",
        "o4",
        "codex-",
        "gpt-realtime",
        "gpt-audio",
        "computer-use",
    ];
    const CL100K: &[&str] = &[
        "gpt-4",
        "gpt-35",
        "gpt-3.5",
        "text-embedding-3",
        "text-embedding-ada-002",
        "davinci-002",
        "babbage-002",
    ];
    // A prefix ending in a digit must not run into another digit ("o1" is not "o10").
    let starts = |p: &&str| match name.strip_prefix(*p) {
        None => false,
        Some(rest) => {
            !(p.ends_with(|c: char| c.is_ascii_digit())
                && rest.starts_with(|c: char| c.is_ascii_digit()))
        }
    };
    if O200K.iter().any(starts) {
        Some(Encoding::O200k)
    } else if CL100K.iter().any(starts) {
        Some(Encoding::Cl100k)
    } else {
        None
    }
}

/// The tokenizer of an encoding, deserialised from the vocabulary compiled into the binary on
/// first use. Always `Some`; callers keep the byte heuristic for the models without one.
pub(crate) fn bpe(encoding: Encoding) -> Option<&'static Bpe> {
    Some(match encoding {
        Encoding::O200k => bpe_openai::o200k_base(),
        Encoding::Cl100k => bpe_openai::cl100k_base(),
    })
}

/// Tokens of `text` under `bpe`; special-token text is encoded as ordinary text (more tokens).
pub(crate) fn count_bpe(bpe: &Bpe, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    bpe.count(text) as u64
}

/// The byte heuristic: one token per [`BYTES_PER_TOKEN`] bytes, rounded up.
pub(crate) fn heuristic_tokens(bytes: u64) -> u64 {
    bytes.div_ceil(BYTES_PER_TOKEN)
}

/// Counts tokens of text delivered piecewise without keeping it: text is tokenised in pieces cut
/// at whitespace (where BPE pre-tokenisation splits anyway), so at most [`PENDING_MAX`] bytes are
/// held at any time.
#[derive(Clone, Default)]
pub(crate) struct TextCounter {
    bpe: Option<&'static Bpe>,
    pending: String,
    tokens: u64,
    bytes: u64,
}

/// Pending text is tokenised once it reaches this size.
const PENDING_MAX: usize = 16 * 1024;

impl std::fmt::Debug for TextCounter {
    // Deliberately omits the pending text: it is model output and must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCounter")
            .field("bpe", &self.bpe.is_some())
            .field("pending_bytes", &self.pending.len())
            .field("tokens", &self.tokens)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl TextCounter {
    /// A counter using `bpe`, or the byte heuristic when `None`.
    pub(crate) fn new(bpe: Option<&'static Bpe>) -> Self {
        Self {
            bpe,
            ..Self::default()
        }
    }

    /// Whether any text was pushed.
    pub(crate) fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Adds delivered text.
    pub(crate) fn push(&mut self, text: &str) {
        self.bytes += text.len() as u64;
        let Some(bpe) = self.bpe else { return };
        self.pending.push_str(text);
        if self.pending.len() < PENDING_MAX {
            return;
        }
        // Cut before the last whitespace so no word is split; without any, cut everything.
        let cut = self
            .pending
            .rfind([' ', '\n'])
            .filter(|&i| i > 0)
            .unwrap_or(self.pending.len());
        self.tokens += count_bpe(bpe, &self.pending[..cut]);
        self.pending.drain(..cut);
    }

    /// The token estimate of everything pushed so far.
    pub(crate) fn tokens(&self) -> u64 {
        match self.bpe {
            Some(bpe) => self.tokens + count_bpe(bpe, &self.pending),
            None => heuristic_tokens(self.bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token counts of OpenAI's tiktoken (tiktoken-rs 0.7 `encode_ordinary`), pinned so a
    /// tokenizer change that miscounts fails here: (text, o200k_base, cl100k_base).
    const TIKTOKEN_COUNTS: &[(&str, u64, u64)] = &[
        ("Hello world", 2, 2),
        ("  leading and trailing   ", 5, 5),
        ("It's 12345678 o'clock, isn't it?", 11, 13),
        ("fn main() {\n    println!(\"{}\", x);\n}\n", 10, 10),
        ("日本語のテキストと絵文字 🎉👩\u{200d}👩\u{200d}👧", 20, 28),
        ("Ünïcödé naïve café — “quotes” ‘single’", 15, 17),
        ("\t\ttabs\n\n\nnewlines   \r\n", 7, 7),
        ("https://api.openai.com/v1/chat/completions?x=1&y=2", 20, 20),
        ("<|endoftext|> is ordinary text here", 11, 11),
        (
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            10,
            10,
        ),
    ];

    #[test]
    fn counts_match_tiktoken() {
        let o200k = bpe(Encoding::O200k).expect("o200k");
        let cl100k = bpe(Encoding::Cl100k).expect("cl100k");
        for &(text, want_o200k, want_cl100k) in TIKTOKEN_COUNTS {
            assert_eq!(count_bpe(o200k, text), want_o200k, "o200k {text:?}");
            assert_eq!(count_bpe(cl100k, text), want_cl100k, "cl100k {text:?}");
        }
    }

    #[test]
    fn encodings_by_model_name() {
        for m in [
            "gpt-4o-mini-2024-07-18",
            "gpt-4.1",
            "gpt-5-nano",
            "o1",
            "o3-mini",
            "o4-mini-2025-04-16",
            "openai/gpt-4o",
            "GPT-4O",
            "gpt-oss-120b",
        ] {
            assert_eq!(encoding_for_model(m), Some(Encoding::O200k), "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-4-turbo",
            "gpt-3.5-turbo",
            "gpt-35-turbo",
            "text-embedding-3-small",
            "text-embedding-ada-002",
        ] {
            assert_eq!(encoding_for_model(m), Some(Encoding::Cl100k), "{m}");
        }
        for m in [
            "claude-sonnet-4-5",
            "gemini-2.5-flash",
            "llama-3.1-8b",
            "o10-fake",
            "mistral-large-latest",
            "",
        ] {
            assert_eq!(encoding_for_model(m), None, "{m}");
        }
    }

    #[test]
    fn bpe_counts_are_exact() {
        let o200k = bpe(Encoding::O200k).expect("o200k");
        let cl100k = bpe(Encoding::Cl100k).expect("cl100k");
        assert_eq!(count_bpe(o200k, "Hello world"), 2);
        assert_eq!(count_bpe(cl100k, "Hello world"), 2);
        assert_eq!(count_bpe(o200k, ""), 0);
        // Special-token text counts as ordinary text: several tokens, not one.
        assert!(count_bpe(o200k, "<|endoftext|>") > 1);
    }

    #[test]
    fn heuristic_rounds_up() {
        assert_eq!(heuristic_tokens(0), 0);
        assert_eq!(heuristic_tokens(1), 1);
        assert_eq!(heuristic_tokens(3), 1);
        assert_eq!(heuristic_tokens(4), 2);
    }

    #[test]
    fn text_counter_in_pieces_matches_whole_text_closely() {
        let bpe = bpe(Encoding::O200k);
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(2000);
        let whole = count_bpe(bpe.expect("bpe"), &text);
        let mut counter = TextCounter::new(bpe);
        for piece in text.as_bytes().chunks(7) {
            counter.push(std::str::from_utf8(piece).expect("ascii"));
        }
        assert!(counter.pending.len() < PENDING_MAX + 7);
        let pieces = counter.tokens();
        assert!(
            pieces.abs_diff(whole) <= 10,
            "pieces {pieces} whole {whole}"
        );
        let mut heuristic = TextCounter::new(None);
        heuristic.push("abcd");
        heuristic.push("e");
        assert_eq!(heuristic.tokens(), 2);
        assert!(heuristic.pending.is_empty());
    }
}
