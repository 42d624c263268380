//! `parse_request` for every endpoint kind on arbitrary bytes: it must never panic (the enforcer
//! runs it on every client body before forwarding).
//!
//! Input: an endpoint selector byte (see `llmwarden_fuzz::endpoint`), then the body.
#![no_main]

use ledger::provider::Api;
use ledger::request::parse_request;
use libfuzzer_sys::fuzz_target;
use llmwarden_fuzz::endpoint;

fuzz_target!(|input: &[u8]| {
    let Some((&selector, body)) = input.split_first() else {
        return;
    };
    let endpoint = endpoint(selector);
    let Ok(info) = parse_request(&endpoint, body) else {
        return;
    };
    if endpoint.api.is_free() || endpoint.api == Api::Embeddings {
        assert_eq!(
            info.max_output_tokens,
            Some(0),
            "{endpoint:?}: an API without output must reserve no output"
        );
    }
});
