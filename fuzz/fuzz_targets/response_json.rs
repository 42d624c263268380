//! `parse_response` for every endpoint kind on arbitrary bytes: it must never panic, and a body
//! it reads must meter the same through `StreamMeter` (the enforcer meters non-stream bodies
//! that way).
//!
//! Input: an endpoint selector byte (see `llmwarden_fuzz::endpoint`), then the body.
#![no_main]

use ledger::usage::{StreamMeter, parse_response};
use libfuzzer_sys::fuzz_target;
use llmwarden_fuzz::endpoint;

fuzz_target!(|input: &[u8]| {
    let Some((&selector, body)) = input.split_first() else {
        return;
    };
    let endpoint = endpoint(selector);
    let Ok(meta) = parse_response(&endpoint, body) else {
        return;
    };
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let mut meter = StreamMeter::new(&endpoint);
        meter.feed(body);
        assert_eq!(
            meter.finish(),
            meta,
            "{endpoint:?}: StreamMeter and parse_response disagree on a JSON body"
        );
    }
});
