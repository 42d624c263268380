//! The observer's `BodyDecoder` (gzip, deflate incl. raw, br, zstd, identity) fed a body in
//! arbitrary pieces: it must never panic, never yield more than `MAX_DECODED` bytes, and a body
//! that decodes whole must decode to the same bytes in pieces.
//!
//! Input: an encoding selector byte, a chunking plan (see `llmwarden_fuzz::plan`), then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmwarden_fuzz::{chunks, plan};
use observer::decode::{BodyDecoder, MAX_DECODED};

const ENCODINGS: [Option<&str>; 8] = [
    Some("gzip"),
    Some("deflate"),
    Some("br"),
    Some("zstd"),
    Some("identity"),
    None,
    Some(" X-GZIP "),
    Some("Deflate"),
];

/// The decoded bytes, and whether a piece was refused as corrupt (decoding stops there, as the
/// observer's exchange does).
fn decode(encoding: Option<&str>, pieces: &[&[u8]]) -> (Vec<u8>, bool) {
    let mut d = BodyDecoder::new(encoding).expect("a supported encoding");
    let mut out = Vec::new();
    for piece in pieces {
        match d.feed(piece) {
            Ok(plain) => out.extend_from_slice(&plain),
            Err(_) => return (out, true),
        }
        assert!(
            out.len() <= MAX_DECODED,
            "{encoding:?}: decoded {} bytes, more than MAX_DECODED",
            out.len()
        );
    }
    (out, false)
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, rest)) = input.split_first() else {
        return;
    };
    let encoding = ENCODINGS[usize::from(selector % 8)];
    let (lens, body) = plan(rest);
    let (whole, whole_corrupt) = decode(encoding, &[body]);
    let (split, split_corrupt) = decode(encoding, &chunks(lens, body));
    if encoding == Some("br") {
        // brotli-decompressor, written a malformed stream whole, can report the stream's end
        // early and keep output it has not flushed, where pieces drain that output or find the
        // corruption: on such input only one decoding being a prefix of the other holds.
        // Valid streams decode the same (see the seeds).
        if !whole_corrupt && !split_corrupt {
            assert!(
                whole.starts_with(&split) || split.starts_with(&whole),
                "br: decodes to {} bytes whole, {} bytes in pieces, neither a prefix of the other",
                whole.len(),
                split.len()
            );
        }
        return;
    }
    if !whole_corrupt {
        assert!(
            !split_corrupt,
            "{encoding:?}: decodes whole but is corrupt in pieces"
        );
        assert!(
            whole == split,
            "{encoding:?}: decodes to {} bytes whole, {} bytes in pieces (or other bytes)",
            whole.len(),
            split.len()
        );
    }
});
