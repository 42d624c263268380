//! Deterministic completion text: common English words that are one token each in the OpenAI
//! tokenizers (with their leading space), so text-based estimates of the output land near the truth.

const WORDS: [&str; 48] = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no",
];

/// `tokens` words split into `pieces` consecutive non-empty pieces (fewer when there are fewer words);
/// joined, they form one text with single spaces.
pub(super) fn pieces(tokens: u64, pieces: usize) -> Vec<String> {
    let n = usize::try_from(tokens).unwrap_or(usize::MAX).min(1 << 20);
    let k = pieces.clamp(1, n.max(1));
    let mut out = Vec::with_capacity(k);
    for j in 0..k {
        let (lo, hi) = (j * n / k, (j + 1) * n / k);
        let mut s = String::with_capacity((hi - lo) * 6);
        for i in lo..hi {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(WORDS[(i * 7) % WORDS.len()]);
        }
        out.push(s);
    }
    out
}

/// The whole completion text of `tokens` words.
pub(super) fn text(tokens: u64) -> String {
    pieces(tokens, 1).pop().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_join_to_the_text() {
        for (n, k) in [(0, 1), (1, 1), (5, 64), (16, 3), (100, 7)] {
            let p = pieces(n, k);
            assert_eq!(p.concat(), text(n), "n={n} k={k}");
            assert_eq!(text(n).split_whitespace().count() as u64, n);
            assert!(p.len() <= k.max(1));
        }
        assert_eq!(pieces(100, 7).len(), 7);
    }
}
