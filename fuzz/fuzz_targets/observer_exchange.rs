//! The observer's `Exchange` (HTTP/1.1 reassembly, request/response pairing, body decoding,
//! usage extraction) fed a captured connection: it must never panic, stay within its memory
//! bounds, and report the same calls whether each SSL call arrives whole or in pieces.
//!
//! Input: a chunking plan (see `llmwarden_fuzz::plan`), then a capture (see
//! `llmwarden_fuzz::capture`). Hosts: the built-in providers and `127.0.0.1:8443` (OpenAI API).
#![no_main]

use std::sync::LazyLock;

use ledger::provider::{ProviderDetector, ProviderKind};
use libfuzzer_sys::fuzz_target;
use llmwarden_fuzz::{CaptureKind, CaptureOp, capture, chunks, plan};
use observer::exchange::{
    End, Exchange, MAX_H2_BODIES, MAX_REQUEST_BODY, MAX_RESPONSE_BODY, Outcome,
};
use observer::http1::MAX_HEAD_BYTES;
use observer::http2::{MAX_FRAME, MAX_HEADER_BLOCK};

static DETECTOR: LazyLock<ProviderDetector> = LazyLock::new(|| {
    ProviderDetector::new().with_host("127.0.0.1:8443", ProviderKind::OpenAi, "mock")
});

/// Most bytes one connection may hold: the kept bodies (with `Vec` growth slack: the request
/// being written, those awaiting a response, the one being answered, and the response) and the
/// reassembler's heads and chunk lines; over HTTP/2, the bodies of all streams and a partial
/// frame and header block per side.
const MAX_BUFFERED: usize = 2 * (3 * MAX_REQUEST_BODY + MAX_RESPONSE_BODY)
    + 4 * (MAX_HEAD_BYTES + 4096)
    + 2 * (MAX_H2_BODIES + MAX_REQUEST_BODY + MAX_RESPONSE_BODY)
    + 4 * (MAX_FRAME + 9 + MAX_HEADER_BLOCK);

/// Runs the capture with each call cut by `lens` (none: whole); outcomes as debug text.
fn run(ops: &[CaptureOp<'_>], lens: Option<&[u8]>) -> Vec<String> {
    let det = &*DETECTOR;
    let mut x = Exchange::new();
    let mut out = Vec::new();
    for op in ops {
        match op.kind {
            CaptureKind::Call | CaptureKind::Continue => {
                let pieces = match lens {
                    Some(lens) => chunks(lens, op.data),
                    None => vec![op.data],
                };
                let mut fed = 0;
                for piece in pieces {
                    let start = op.kind == CaptureKind::Call && fed == 0;
                    x.feed(op.side(), piece, start, det, &mut out);
                    fed += piece.len();
                }
            }
            CaptureKind::Gap(n) => x.gap(op.side(), n, det, &mut out),
            CaptureKind::Close => x.finish(End::ConnectionClosed, det, &mut out),
        }
        assert!(
            x.buffered() <= MAX_BUFFERED,
            "buffered {} bytes",
            x.buffered()
        );
    }
    x.finish(End::ConnectionClosed, det, &mut out);
    // How many HTTP/1.1 desyncs come before HTTP/2 frames are found on a connection joined
    // mid-way depends on where in an SSL call they were found: not compared.
    out.iter()
        .filter(|o| !matches!(o, Outcome::ParseError("joined mid-connection")))
        .map(|o| format!("{o:?}"))
        .collect()
}

fuzz_target!(|input: &[u8]| {
    let (lens, rest) = plan(input);
    let ops = capture(rest);
    let whole = run(&ops, None);
    if lens.is_empty() {
        return;
    }
    let split = run(&ops, Some(lens));
    // A corrupt compressed body stops decoding where the corruption shows, which depends on
    // the pieces: what was metered before it differs.
    let corrupt = format!("{:?}", Outcome::ParseError("content-encoding"));
    if whole.contains(&corrupt) || split.contains(&corrupt) {
        return;
    }
    assert_eq!(
        whole, split,
        "the calls depend on how the SSL calls were cut into chunks"
    );
});
