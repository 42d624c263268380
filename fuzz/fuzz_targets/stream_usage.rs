//! `StreamMeter` for every endpoint kind fed a body in arbitrary chunks: it must never panic,
//! `finish()` must return, and the result must not depend on the chunking.
//!
//! Input: an endpoint selector byte (see `llmwarden_fuzz::endpoint`), a chunking plan (see
//! `llmwarden_fuzz::plan`), then the body.
#![no_main]

use ledger::provider::{Api, Endpoint};
use ledger::usage::{ResponseMeta, StreamMeter};
use libfuzzer_sys::fuzz_target;
use llmwarden_fuzz::{chunks, endpoint, plan};

/// What the meter made of a whole body.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    meta: ResponseMeta,
    parse_errors: u64,
}

fn meter(endpoint: &Endpoint, chunks: &[&[u8]]) -> Outcome {
    let mut meter = StreamMeter::new(endpoint);
    for chunk in chunks {
        meter.feed(chunk);
        // The enforcer reads these between chunks (mid-stream settlement on abort).
        let _ = meter.model();
        let _ = meter.usage_so_far();
    }
    let parse_errors = meter.parse_errors();
    Outcome {
        meta: meter.finish(),
        parse_errors,
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, rest)) = input.split_first() else {
        return;
    };
    let endpoint = endpoint(selector);
    let (lens, body) = plan(rest);
    let whole = meter(&endpoint, &[body]);
    let split = meter(&endpoint, &chunks(lens, body));
    assert_eq!(
        whole, split,
        "{endpoint:?}: the metered result depends on the chunking"
    );
    // A stream (anything but a plain JSON body) always ends with a usage, estimated if need be:
    // "never None for a stream" is what lets the enforcer always settle.
    let plain_body = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !plain_body && endpoint.api != Api::Embeddings {
        assert!(
            whole.meta.usage.is_some(),
            "{endpoint:?}: a stream ended without a usage"
        );
    }
});
