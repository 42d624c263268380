//! Token counting: OpenAI's BPE encodings and the byte heuristic for other models.
//!
//! The encodings come from `bpe-openai` (GitHub's linear-time BPE): the same token counts as
//! OpenAI's tiktoken for o200k_base and cl100k_base (pinned by a test below), about six
//! times faster, which matters because the enforcer counts every prompt on its hot path.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once, PoisonError};

use siphasher::sip128::{Hash128, Hasher128, SipHasher13};

use super::pretokenize::{Pattern, split_ascii};

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
    static LOADED: [Once; 2] = [Once::new(), Once::new()];
    let (bpe, i) = match encoding {
        Encoding::O200k => (bpe_openai::o200k_base(), 0),
        Encoding::Cl100k => (bpe_openai::cl100k_base(), 1),
    };
    LOADED[i].call_once(|| {
        ADDRESSES[i].store(std::ptr::from_ref(bpe) as usize, Ordering::Relaxed);
        release_read_only_pages();
    });
    Some(bpe)
}

/// The addresses of the tokenizers [`bpe`] handed out (0 until then), so [`count_bpe`] can tell
/// which pre-tokeniser a tokenizer uses without loading the other encoding.
static ADDRESSES: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// The pre-tokeniser of `bpe`, when it is one of the two [`bpe`] handed out.
fn pattern_of(bpe: &Bpe) -> Option<Pattern> {
    let at = std::ptr::from_ref(bpe) as usize;
    if at == ADDRESSES[0].load(Ordering::Relaxed) {
        Some(Pattern::O200k)
    } else if at == ADDRESSES[1].load(Ordering::Relaxed) {
        Some(Pattern::Cl100k)
    } else {
        None
    }
}

/// Hands back to the kernel the pages of this executable's read-only data that are resident now.
///
/// The vocabularies are compiled into the binary (`include_bytes!`) and read once, whole, to build
/// the tokenizer: o200k_base's is about 30 MiB, cl100k_base's about 15 MiB. Those pages would
/// otherwise stay in the process's RSS (file-backed, clean) for its whole life although nothing
/// reads them again. Measured on a small program: RssFile 35 MiB after loading o200k_base, 6 MiB
/// after this; 21 MiB after cl100k_base, 6 MiB after this. `MADV_PAGEOUT` is only a hint: the
/// other read-only data (strings, tables) that is still used faults back in from the page cache.
fn release_read_only_pages() {
    #[cfg(target_os = "linux")]
    {
        let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
            return;
        };
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return;
        };
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (Some(range), Some(perms), Some(path)) = (f.next(), f.next(), f.nth(3)) else {
                continue;
            };
            if !perms.starts_with("r--") || std::path::Path::new(path) != exe {
                continue;
            }
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            else {
                continue;
            };
            // SAFETY: `[a, b)` is a whole mapping of this process, read-only and file-backed;
            // MADV_PAGEOUT changes no content, it only lets the kernel reclaim its pages.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_PAGEOUT) };
        }
    }
}

/// Tokens of `text` under `bpe`; special-token text is encoded as ordinary text (more tokens).
///
/// The same count as `bpe.count(text)`: the text is normalised and cut into pieces by the
/// encoding's pre-tokenising regex (for ASCII text, by [`split_ascii`]), and the pieces'
/// byte-pair encodings are counted and summed.
/// Short pieces (words, numbers, punctuation: nearly all of them) are counted once per thread
/// and then read from [`PIECES`], which saves the encoder's set-up (two allocations) and its
/// search for each.
pub(crate) fn count_bpe(bpe: &Bpe, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    // ASCII text is its own normal form, and is cut into pieces without the regex (the same
    // pieces: `pretokenize.rs`).
    if text.is_ascii()
        && let Some(pattern) = pattern_of(bpe)
    {
        return with_pieces(|mut t| {
            split_ascii(pattern, text)
                .map(|piece| piece_tokens(t.as_deref_mut(), bpe, piece.as_bytes()))
                .sum()
        });
    }
    let text = bpe.normalize(text);
    with_pieces(|mut t| {
        bpe.split(text.as_str())
            .map(|piece| piece_tokens(t.as_deref_mut(), bpe, piece.as_bytes()))
            .sum()
    })
}

/// Pieces up to this many bytes have their count kept in [`PIECES`].
const PIECE_MAX: usize = 22;

/// Slots of each thread's [`PIECES`] table (40 bytes each: 160 KiB per thread that counts).
const PIECE_SLOTS: usize = 4096;

/// One piece's count: the encoding (its tokenizer's address; 0 for an empty slot), the piece
/// (its [`PieceKey`]'s words and length, kept flat so the slot has no padding), and its token
/// count.
#[derive(Clone, Copy, Default)]
struct PieceSlot {
    encoding: usize,
    words: [u64; 3],
    len: u8,
    tokens: u8,
}

// The table's size in its documentation.
const _: () = assert!(std::mem::size_of::<PieceSlot>() == 40);

/// A piece of at most [`PIECE_MAX`] bytes as its length and three words read straight from its
/// bytes (overlapping where it is shorter than 24 bytes), which together cover every byte: two
/// pieces have the same key only if they are the same bytes. Read in place, never copied to a
/// buffer first: the copy and the reads of it right after stalled the CPU on every piece
/// (store-to-load forwarding), 29% of the time in [`piece_tokens`] (docs/benchmarks.md).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct PieceKey {
    len: u8,
    words: [u64; 3],
}

impl PieceKey {
    /// The key of `piece` (at most [`PIECE_MAX`] bytes; longer pieces are never keyed).
    fn of(piece: &[u8]) -> PieceKey {
        let n = piece.len();
        debug_assert!(n <= PIECE_MAX);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&piece[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let u32_at = |i: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&piece[i..i + 4]);
            u64::from(u32::from_le_bytes(w))
        };
        let words = match n {
            0 => [0; 3],
            // Bytes 0, n/2 and n-1 cover 1, 2 or 3 bytes.
            1..=3 => [
                u64::from(piece[0]),
                u64::from(piece[n / 2]),
                u64::from(piece[n - 1]),
            ],
            4..=7 => [u32_at(0), u32_at(n - 4), 0],
            8..=16 => [u64_at(0), u64_at(n - 8), 0],
            _ => [u64_at(0), u64_at(8), u64_at(n - 8)],
        };
        PieceKey {
            len: n as u8, // at most PIECE_MAX
            words,
        }
    }

    /// The slot of the key under `encoding`: a multiplicative hash. Its quality only decides how
    /// often two common pieces evict each other; a hit compares whole keys.
    fn slot(&self, encoding: usize) -> usize {
        const K: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut h = (encoding as u64) ^ u64::from(self.len);
        for w in self.words {
            h = (h ^ w).wrapping_mul(K).rotate_left(29);
        }
        (h.wrapping_mul(K) >> 40) as usize % PIECE_SLOTS
    }
}

thread_local! {
    /// Token counts of short pieces counted recently on this thread: a direct-mapped table, keyed
    /// by the piece's exact bytes (no false hit), where a new piece replaces whatever used its
    /// slot. Per thread, so there is no lock. The pieces are words; unlike [`TokenCache`] the
    /// table is shared by tenants, and a hit saves ~0.1 µs per word (docs/benchmarks.md), far
    /// below what a client could time across a network.
    static PIECES: std::cell::RefCell<Box<[PieceSlot]>> =
        std::cell::RefCell::new(vec![PieceSlot::default(); PIECE_SLOTS].into_boxed_slice());
}

/// Runs `count` with this thread's [`PIECES`] table, borrowed once for a whole text; without a
/// table (the thread is exiting, or the table is in use further up) it counts without one.
fn with_pieces(count: impl Fn(Option<&mut [PieceSlot]>) -> u64) -> u64 {
    PIECES
        .try_with(|t| match t.try_borrow_mut() {
            Ok(mut t) => count(Some(&mut t)),
            Err(_) => count(None),
        })
        .unwrap_or_else(|_| count(None))
}

/// Tokens of one pre-tokenised piece, from `table` when this thread counted it recently.
fn piece_tokens(table: Option<&mut [PieceSlot]>, bpe: &Bpe, piece: &[u8]) -> u64 {
    let Some(table) = table.filter(|_| piece.len() <= PIECE_MAX) else {
        return bpe.bpe.count(piece) as u64;
    };
    let encoding = std::ptr::from_ref(bpe) as usize;
    let key = PieceKey::of(piece);
    let s = &mut table[key.slot(encoding)];
    if s.encoding == encoding && s.len == key.len && s.words == key.words {
        return u64::from(s.tokens);
    }
    let n = bpe.bpe.count(piece);
    // A piece of at most 22 bytes has at most 22 tokens.
    if let Ok(tokens) = u8::try_from(n) {
        *s = PieceSlot {
            encoding,
            words: key.words,
            len: key.len,
            tokens,
        };
    }
    n as u64
}

/// Texts shorter than this are counted every time: they are cheap to tokenise and would only
/// evict the long texts that are worth keeping.
pub const CACHE_MIN_BYTES: usize = 256;

/// Slots per shard and shards of a [`TokenCache`].
const CACHE_SHARD_SLOTS: usize = 256;
const CACHE_SHARDS: usize = 16;

/// Token counts of texts counted recently, so a text sent again is not tokenised again.
///
/// Chat requests resend most of their text on every call: the system prompt, tool definitions
/// and every earlier turn of the conversation. Tokenising them again costs the enforcer about
/// 0.1 us per token on each call; a hit costs one pass of a hash over the text (SipHash-1-3).
///
/// A fixed, direct-mapped table (4,096 slots of 24 bytes, 16 locked shards): a new text replaces
/// whatever used its slot, so memory never grows and there is nothing to evict. A slot is keyed by
/// the 128-bit SipHash-1-3 value (a process-random key) of the encoding, the caller's scope and
/// the text, so a false hit needs a 128-bit collision; the count only sizes a
/// reservation, and settlement uses the provider's real usage. No text is kept. The scope (the
/// enforcer passes the tenant) keeps one tenant's cache hits from telling another, by timing,
/// which texts it sent.
pub struct TokenCache {
    /// The SipHash key, random per cache.
    keys: [u64; 2],
    shards: Box<[Mutex<Box<[Slot]>>]>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: (u64, u64),
    tokens: u32,
    used: bool,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (hits, misses) = self.stats();
        f.debug_struct("TokenCache")
            .field("slots", &(CACHE_SHARDS * CACHE_SHARD_SLOTS))
            .field("hits", &hits)
            .field("misses", &misses)
            .finish_non_exhaustive()
    }
}

/// A SipHash key from the operating system's generator; should that fail, from the standard
/// library's per-process random hasher keys (which come from the same source when it works).
fn random_key() -> [u64; 2] {
    let mut b = [0u8; 16];
    if getrandom::getrandom(&mut b).is_ok() {
        let (k0, k1) = b.split_at(8);
        let word = |k: &[u8]| u64::from_le_bytes(k.try_into().unwrap_or([0; 8]));
        return [word(k0), word(k1)];
    }
    let (a, b) = (RandomState::new(), RandomState::new());
    [a.hash_one(0u8), b.hash_one(1u8)]
}

impl TokenCache {
    /// An empty cache with a fresh random hash key.
    #[must_use]
    pub fn new() -> Self {
        Self {
            keys: random_key(),
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(vec![Slot::default(); CACHE_SHARD_SLOTS].into_boxed_slice()))
                .collect(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Lookups that found the text's count, and lookups that counted it.
    #[must_use]
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// `count_bpe(bpe, text)`, from the cache when `text` (under the same tokenizer and scope)
    /// was counted recently.
    pub(crate) fn count(&self, bpe: &'static Bpe, scope: &str, text: &str) -> u64 {
        if text.len() < CACHE_MIN_BYTES {
            return count_bpe(bpe, text);
        }
        let mut h = SipHasher13::new_with_keys(self.keys[0], self.keys[1]);
        // The tokenizer's address tells the encodings apart (each is a static).
        h.write_usize(std::ptr::from_ref(bpe) as usize);
        h.write(scope.as_bytes());
        h.write_u8(0xff);
        h.write(text.as_bytes());
        let Hash128 { h1, h2 } = h.finish128();
        let key = (h1, h2);
        let slot = (key.0 as usize) % (CACHE_SHARDS * CACHE_SHARD_SLOTS);
        let shard = &self.shards[slot / CACHE_SHARD_SLOTS];
        let i = slot % CACHE_SHARD_SLOTS;
        {
            let slots = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let s = slots[i];
            if s.used && s.key == key {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return u64::from(s.tokens);
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let n = count_bpe(bpe, text);
        if let Ok(tokens) = u32::try_from(n) {
            let mut slots = shard.lock().unwrap_or_else(PoisonError::into_inner);
            slots[i] = Slot {
                key,
                tokens,
                used: true,
            };
        }
        n
    }
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

    /// The per-thread piece table gives `bpe_openai`'s own count, on first sight (counted) and
    /// again (read from the table), for both encodings, across texts whose pieces share slots,
    /// exceed the table's piece length, and mix scripts.
    #[test]
    fn piece_table_counts_equal_the_tokenizers() {
        let o200k = bpe(Encoding::O200k).expect("o200k");
        let cl100k = bpe(Encoding::Cl100k).expect("cl100k");
        let mut texts: Vec<String> = TIKTOKEN_COUNTS.iter().map(|t| t.0.to_owned()).collect();
        texts.push("supercalifragilisticexpialidocious antidisestablishmentarianism".into());
        texts.push("x".repeat(23) + " " + &"y".repeat(22) + " 1234567890123456789012345");
        // Enough distinct words to wrap the table several times (evictions and reuse).
        texts.push(
            (0..20_000)
                .map(|i| format!("w{i:x}q{} ", i * 7919 % 1000))
                .collect(),
        );
        for _ in 0..2 {
            for t in &texts {
                for b in [o200k, cl100k] {
                    assert_eq!(count_bpe(b, t), b.count(t.as_str()) as u64, "{t:.60}");
                }
            }
        }
    }

    /// A piece's key is read from overlapping words; every byte of every length must still
    /// count, or two pieces would share a table entry and one would get the other's count.
    #[test]
    fn piece_keys_tell_every_byte_apart() {
        let base: Vec<u8> = (0..PIECE_MAX as u8).map(|i| b'a' + i).collect();
        for len in 0..=PIECE_MAX {
            let piece = &base[..len];
            let key = PieceKey::of(piece);
            // The same bytes elsewhere in memory: the same key.
            let copy = piece.to_vec();
            assert_eq!(key, PieceKey::of(&copy));
            for pos in 0..len {
                for v in [0u8, b'Z', 0xff] {
                    let mut other = piece.to_vec();
                    other[pos] = v;
                    assert_ne!(PieceKey::of(&other), key, "length {len}, byte {pos}");
                }
            }
            if len < PIECE_MAX {
                assert_ne!(
                    PieceKey::of(&base[..=len]),
                    key,
                    "length {len} and one more"
                );
                let mut zero_padded = piece.to_vec();
                zero_padded.push(0);
                assert_ne!(PieceKey::of(&zero_padded), key, "length {len} and a zero");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn piece_table_counts_equal_the_tokenizers_on_any_text(t in "\\PC{0,200}", u in "[a-z0-9 .,'\\n]{0,300}") {
            let o200k = bpe(Encoding::O200k).expect("o200k");
            let cl100k = bpe(Encoding::Cl100k).expect("cl100k");
            for text in [&t, &u, &t, &u] {
                proptest::prop_assert_eq!(count_bpe(o200k, text), o200k.count(text.as_str()) as u64);
                proptest::prop_assert_eq!(count_bpe(cl100k, text), cl100k.count(text.as_str()) as u64);
            }
        }

        #[test]
        fn piece_keys_are_equal_only_for_equal_pieces(
            a in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=PIECE_MAX),
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=PIECE_MAX),
        ) {
            proptest::prop_assert_eq!(PieceKey::of(&a) == PieceKey::of(&b), a == b);
        }
    }

    #[test]
    fn load_tokenizers_builds_both_encodings() {
        crate::load_tokenizers();
        for (i, e) in [Encoding::O200k, Encoding::Cl100k].into_iter().enumerate() {
            assert_ne!(ADDRESSES[i].load(Ordering::Relaxed), 0, "{e:?} not built");
            let bpe = bpe(e).expect("built");
            assert!(pattern_of(bpe).is_some(), "{e:?}");
        }
        assert!(crate::ProviderKind::OpenAiCompatible.counts_with_bpe());
        assert!(!crate::ProviderKind::Anthropic.counts_with_bpe());
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

    #[test]
    fn the_cache_returns_the_count_and_keeps_scopes_and_encodings_apart() {
        let (o200k, cl100k) = (
            bpe(Encoding::O200k).expect("bpe"),
            bpe(Encoding::Cl100k).expect("bpe"),
        );
        let long = "日本語のテキスト and some English, with numbers 12345. ".repeat(20);
        let cache = TokenCache::new();
        let want = count_bpe(o200k, &long);
        assert_eq!(cache.count(o200k, "tenant-a", &long), want);
        assert_eq!(cache.stats(), (0, 1));
        assert_eq!(cache.count(o200k, "tenant-a", &long), want);
        assert_eq!(cache.stats(), (1, 1), "the second count is a hit");
        // Another scope, another encoding, another text: misses, each with its own exact count.
        assert_eq!(cache.count(o200k, "tenant-b", &long), want);
        assert_eq!(
            cache.count(cl100k, "tenant-a", &long),
            count_bpe(cl100k, &long)
        );
        let other = format!("{long}!");
        assert_eq!(
            cache.count(o200k, "tenant-a", &other),
            count_bpe(o200k, &other)
        );
        assert_eq!(cache.stats(), (1, 4));
        // Short texts are counted, never cached.
        assert_eq!(cache.count(o200k, "tenant-a", "Hello world"), 2);
        assert_eq!(cache.count(o200k, "tenant-a", "Hello world"), 2);
        assert_eq!(cache.stats(), (1, 4));
    }

    #[test]
    fn the_cache_stays_exact_when_texts_share_slots() {
        // Many more distinct texts than slots: every answer is still the text's own count.
        let o200k = bpe(Encoding::O200k).expect("bpe");
        let cache = TokenCache::new();
        let base = "word ".repeat(60);
        for round in 0..2 {
            for i in 0..6000 {
                let text = format!("{base}{i} {}", "x".repeat(i % 7));
                assert_eq!(
                    cache.count(o200k, "t", &text),
                    count_bpe(o200k, &text),
                    "round {round} text {i}"
                );
            }
        }
        let (hits, misses) = cache.stats();
        assert_eq!(hits + misses, 12_000);
        assert!(
            misses > 6000,
            "the table is bounded: {hits} hits, {misses} misses"
        );
    }
}
