//! The enforcer's `UsageChunkFilter`, which cuts the usage-only event it asked OpenAI for out of
//! the stream the client sees: it must never panic, its output must not depend on how the
//! upstream chunked the stream, and a stream without a usage record must pass byte for byte.
//!
//! Input: a chunking plan (see `llmwarden_fuzz::plan`), then the upstream stream.
#![no_main]

use enforcer::usage_filter::UsageChunkFilter;
use libfuzzer_sys::fuzz_target;
use llmwarden_fuzz::{chunks, plan};

fn filter(chunks: &[&[u8]]) -> Vec<u8> {
    let mut f = UsageChunkFilter::default();
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&f.push(&bytes::Bytes::copy_from_slice(chunk)));
    }
    out.extend_from_slice(&f.finish());
    out
}

fuzz_target!(|input: &[u8]| {
    let (lens, body) = plan(input);
    let whole = filter(&[body]);
    let split = filter(&chunks(lens, body));
    assert_eq!(
        whole, split,
        "what the client sees depends on the upstream chunking"
    );
    if !body.windows(7).any(|w| w == b"\"usage\"") {
        assert_eq!(whole, body, "a stream without usage was changed");
    }
});
