//! The pre-tokenisation of o200k_base and cl100k_base for ASCII text, without the regex.
//!
//! Before byte-pair encoding, OpenAI's tokenizers cut text into pieces with a regex (words with
//! their leading space, runs of up to three digits, punctuation runs, whitespace runs). After the
//! per-thread piece table (`tokens.rs`), that regex was most of the enforcer's token counting:
//! ~69 ns per piece, 9.6 of 12 µs for the bench's 654-byte message, and a third more on every
//! thread but the first that used it (the regex's cache pool takes its locked path there).
//!
//! For ASCII text, which is most prompts, the pieces are cut here by hand: each alternative of
//! the patterns below is matched the way the regex engine does (leftmost-first: the first
//! alternative that matches, quantifiers greedy), in the character classes' ASCII meaning. The
//! patterns are those `bpe-openai` 0.3 builds its pre-tokeniser from (tiktoken's, with the
//! negative look-ahead `\s+(?!\S)` written as a match of `\s+\s` whose last character is given
//! back). Text with any non-ASCII byte goes through the regex. The tests compare the pieces with
//! `bpe-openai`'s own split on generated text.
//!
//! o200k_base, in order:
//! 1. `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
//! 2. `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
//! 3. `\p{N}{1,3}`
//! 4. ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
//! 5. `\s*[\r\n]+`
//! 6. `\s+$`
//! 7. `\s+\s`, its last character given back
//! 8. `\s+`
//!
//! cl100k_base: `(?i:'s|'t|'re|'ve|'m|'ll|'d)`, `[^\r\n\p{L}\p{N}]?\p{L}+`, `\p{N}{1,3}`,
//! ` ?[^\s\p{L}\p{N}]+[\r\n]*`, then 5 to 8 as above.
//!
//! In ASCII: `\p{L}` is `[A-Za-z]`, `\p{Lu}` `[A-Z]`, `\p{Ll}` `[a-z]`, `\p{Lt}`, `\p{Lm}`,
//! `\p{Lo}` and `\p{M}` are empty, `\p{N}` is `[0-9]`, and `\s` (Unicode White_Space) is
//! tab, line feed, vertical tab, form feed, carriage return and space.

/// The two pre-tokenisers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pattern {
    /// o200k_base's.
    O200k,
    /// cl100k_base's.
    Cl100k,
}

/// The pieces of ASCII `text` under `pattern`, as `bpe-openai`'s `split` gives them. `text` must
/// be ASCII (checked by the caller; a non-ASCII byte would be treated as punctuation).
pub(crate) fn split_ascii(pattern: Pattern, text: &str) -> impl Iterator<Item = &str> {
    let b = text.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= b.len() {
            return None;
        }
        let end = match pattern {
            Pattern::O200k => o200k_piece(b, at),
            Pattern::Cl100k => cl100k_piece(b, at),
        };
        // Every ASCII byte starts some alternative (the last takes any whitespace, the fourth
        // any other non-letter non-digit), so `end > at`; the `max` only guards the loop.
        let end = end.max(at + 1).min(b.len());
        let piece = &text[at..end];
        at = end;
        Some(piece)
    })
}

fn is_space(c: u8) -> bool {
    matches!(c, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

/// `[^\r\n\p{L}\p{N}]`.
fn is_lead(c: u8) -> bool {
    !matches!(c, b'\r' | b'\n') && !c.is_ascii_alphanumeric()
}

/// `[^\s\p{L}\p{N}]`.
fn is_symbol(c: u8) -> bool {
    !is_space(c) && !c.is_ascii_alphanumeric()
}

fn run(b: &[u8], mut i: usize, class: impl Fn(u8) -> bool) -> usize {
    while i < b.len() && class(b[i]) {
        i += 1;
    }
    i
}

/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)` at `i`: its end, or `None`.
fn contraction(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'\'') {
        return None;
    }
    let lower = |k: usize| b.get(i + k).map(u8::to_ascii_lowercase);
    match lower(1)? {
        b's' | b't' | b'm' | b'd' => Some(i + 2),
        b'r' if lower(2) == Some(b'e') => Some(i + 3),
        b'v' if lower(2) == Some(b'e') => Some(i + 3),
        b'l' if lower(2) == Some(b'l') => Some(i + 3),
        _ => None,
    }
}

/// ` ?[^\s\p{L}\p{N}]+` then `tail`*: the punctuation alternative.
fn symbols(b: &[u8], i: usize, tail: impl Fn(u8) -> bool) -> Option<usize> {
    let start = if b[i] == b' ' { i + 1 } else { i };
    if start >= b.len() || !is_symbol(b[start]) {
        return None;
    }
    Some(run(b, run(b, start, is_symbol), tail))
}

/// The whitespace alternatives shared by both patterns (5 to 8), at a whitespace byte `i`.
fn whitespace(b: &[u8], i: usize) -> usize {
    let end = run(b, i, is_space);
    // 5. `\s*[\r\n]+`: the run up to and including its last line break.
    if let Some(last) = b[i..end].iter().rposition(|&c| c == b'\r' || c == b'\n') {
        return i + last + 1;
    }
    // 6. `\s+$`: a run that ends the text.
    if end == b.len() {
        return end;
    }
    // 7. `\s+\s` giving back its last character: all but the run's last space, which then
    // leads the next piece; 8. `\s+`: a run of one.
    if end - i >= 2 { end - 1 } else { end }
}

fn o200k_piece(b: &[u8], i: usize) -> usize {
    let c = b[i];
    let j = if is_lead(c) { i + 1 } else { i };
    if j < b.len() {
        // 1. `lead? upper* lower+ contraction?` (giving the lead back cannot help: the byte
        // is then no letter).
        let k = run(b, j, |c| c.is_ascii_uppercase());
        if k < b.len() && b[k].is_ascii_lowercase() {
            let m = run(b, k, |c| c.is_ascii_lowercase());
            return contraction(b, m).unwrap_or(m);
        }
        // 2. `lead? upper+ lower* contraction?`; `lower*` is empty here (1 failed).
        if k > j {
            return contraction(b, k).unwrap_or(k);
        }
    }
    // 3. `\p{N}{1,3}`.
    if c.is_ascii_digit() {
        return run(b, i, |c| c.is_ascii_digit()).min(i + 3);
    }
    // 4. ` ?[^\s\p{L}\p{N}]+[\r\n/]*`.
    if let Some(end) = symbols(b, i, |c| matches!(c, b'\r' | b'\n' | b'/')) {
        return end;
    }
    if is_space(c) {
        return whitespace(b, i);
    }
    i + 1
}

fn cl100k_piece(b: &[u8], i: usize) -> usize {
    let c = b[i];
    // 1. a contraction.
    if let Some(end) = contraction(b, i) {
        return end;
    }
    // 2. `lead? letter+`.
    let j = if is_lead(c) { i + 1 } else { i };
    if j < b.len() && b[j].is_ascii_alphabetic() {
        return run(b, j, |c| c.is_ascii_alphabetic());
    }
    // 3. `\p{N}{1,3}`.
    if c.is_ascii_digit() {
        return run(b, i, |c| c.is_ascii_digit()).min(i + 3);
    }
    // 4. ` ?[^\s\p{L}\p{N}]+[\r\n]*`.
    if let Some(end) = symbols(b, i, |c| matches!(c, b'\r' | b'\n')) {
        return end;
    }
    if is_space(c) {
        return whitespace(b, i);
    }
    i + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) {
        assert!(text.is_ascii(), "{text:?}");
        for (pattern, bpe) in [
            (Pattern::O200k, bpe_openai::o200k_base()),
            (Pattern::Cl100k, bpe_openai::cl100k_base()),
        ] {
            let ours: Vec<&str> = split_ascii(pattern, text).collect();
            let theirs: Vec<&str> = bpe.split(text).collect();
            assert_eq!(ours, theirs, "{pattern:?} {text:?}");
        }
    }

    #[test]
    fn pieces_equal_bpe_openais_on_known_texts() {
        for t in [
            "",
            "Hello world",
            "  hello",
            " 123",
            "a\n\n b",
            "x  \n  y",
            "trailing   ",
            "DON'T you'LL we've I'd she's THEY'RE",
            "'s 'S 'll 're 've 'x '",
            "https://api.openai.com/v1/chat/completions?x=1&y=2",
            "a//b\r\n/c\n\r\n",
            "1234567 12 1",
            "MixedCASEWords camelCase snake_case kebab-case",
            "\t\ttabs\n\n\nnewlines   \r\n",
            "\x0b\x0c\x1c\x1f\x7f\0 ctl",
            "fn main() {\n    println!(\"{}\", x);\n}\n",
            "Ticket 12345. My order 48213 arrived with a cracked screen protector.",
        ] {
            check(t);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        #[test]
        fn pieces_equal_bpe_openais_on_every_ascii_byte(t in "[\\x00-\\x7f]{0,40}") {
            check(&t);
        }

        #[test]
        fn pieces_equal_bpe_openais_on_any_ascii(t in "[a-zA-Z0-9 \t\r\n\x0b\x0c\x1c\x7f'.,/!?_-]{0,60}") {
            check(&t);
        }

        #[test]
        fn pieces_equal_bpe_openais_on_words_and_contractions(
            t in "('([sStTmMdDrvl]|[rR][eE]|[vV][eE]|[lL][lL])|[A-Z]{0,3}[a-z]{0,3}|[0-9]{1,5}| {1,3}|\n|\r\n|[/.,]{1,2}){0,16}"
        ) {
            check(&t);
        }
    }
}
