//! HTTP/2 joined mid-connection: `observer::http2::H2Connection::midway` and the `Exchange`
//! fed a capture that starts anywhere in a connection (no preface). Neither may panic or grow
//! past its bounds; both give the same events / calls whether each SSL call arrives whole or in
//! pieces (but for how many HTTP/1.1 desyncs came before the frames were found); a broken
//! connection reports once and nothing after; and bytes that cannot hold a
//! frame header (no zero byte: a frame's first length byte is 0 while syncing) never switch the
//! connection to HTTP/2 nor make a call.
//!
//! Input: a chunking plan (see `llmwarden_fuzz::plan`), a mode byte (bit 0: clear every zero
//! byte of the capture, the garbage case), then a capture (see `llmwarden_fuzz::capture`).
#![no_main]

use std::sync::LazyLock;

use ledger::provider::{ProviderDetector, ProviderKind};
use libfuzzer_sys::fuzz_target;
use llmwarden_fuzz::{CaptureKind, CaptureOp, capture, chunks, plan};
use observer::exchange::{End, Exchange, MAX_H2_BODIES, MAX_REQUEST_BODY, MAX_RESPONSE_BODY, Outcome};
use observer::http1::MAX_HEAD_BYTES;
use observer::http2::{H2Connection, H2Event, MAX_FRAME, MAX_HEADER_BLOCK};

static DETECTOR: LazyLock<ProviderDetector> = LazyLock::new(|| {
    ProviderDetector::new().with_host("127.0.0.1:8443", ProviderKind::OpenAi, "mock")
});

/// As `observer_http2`: a partial frame and a header block per side.
const MAX_H2_BUFFERED: usize = 2 * 2 * (MAX_FRAME + 9 + MAX_HEADER_BLOCK);
/// As `observer_exchange`, plus the mid-way streams' bodies.
const MAX_EXCHANGE_BUFFERED: usize = 2 * (3 * MAX_REQUEST_BODY + MAX_RESPONSE_BODY)
    + 4 * (MAX_HEAD_BYTES + 4096)
    + 4 * (MAX_H2_BODIES + MAX_REQUEST_BODY + MAX_RESPONSE_BODY)
    + 4 * (MAX_FRAME + 9 + MAX_HEADER_BLOCK);

fn pieces<'a>(op: &CaptureOp<'a>, lens: Option<&[u8]>) -> Vec<&'a [u8]> {
    match lens {
        Some(lens) => chunks(lens, op.data),
        None => vec![op.data],
    }
}

fn run_h2(ops: &[CaptureOp<'_>], lens: Option<&[u8]>) -> Vec<H2Event> {
    let mut c = H2Connection::midway();
    let mut out = Vec::new();
    for op in ops {
        match op.kind {
            CaptureKind::Call | CaptureKind::Continue => {
                for piece in pieces(op, lens) {
                    c.feed(op.side(), piece, &mut out);
                }
            }
            CaptureKind::Gap(_) => c.lost(op.side(), &mut out),
            CaptureKind::Close => {}
        }
        assert!(c.buffered() <= MAX_H2_BUFFERED, "buffered {}", c.buffered());
    }
    // Bodies joined per side and stream: how bytes were cut does not matter.
    let mut merged: Vec<H2Event> = Vec::new();
    for e in out {
        if let H2Event::Body(s, id, b) = &e
            && let Some(H2Event::Body(ps, pid, pb)) = merged.last_mut()
            && ps == s
            && pid == id
        {
            pb.extend_from_slice(b);
            continue;
        }
        merged.push(e);
    }
    merged
}

fn run_exchange(ops: &[CaptureOp<'_>], lens: Option<&[u8]>) -> Vec<Outcome> {
    let det = &*DETECTOR;
    let mut x = Exchange::new();
    let mut out = Vec::new();
    for op in ops {
        match op.kind {
            CaptureKind::Call | CaptureKind::Continue => {
                // An empty first piece does not start the call: the first bytes do.
                let mut fed = 0;
                for piece in pieces(op, lens) {
                    let start = op.kind == CaptureKind::Call && fed == 0;
                    x.feed(op.side(), piece, start, det, &mut out);
                    fed += piece.len();
                }
            }
            CaptureKind::Gap(n) => x.gap(op.side(), n, det, &mut out),
            CaptureKind::Close => x.finish(End::ConnectionClosed, det, &mut out),
        }
        assert!(x.buffered() <= MAX_EXCHANGE_BUFFERED, "buffered {}", x.buffered());
    }
    x.finish(End::ConnectionClosed, det, &mut out);
    out
}

fuzz_target!(|input: &[u8]| {
    let (lens, rest) = plan(input);
    let Some((&mode, rest)) = rest.split_first() else {
        return;
    };
    let garbage = mode & 1 != 0;
    let owned: Vec<u8>;
    let rest = if garbage {
        // Zero bytes become 1 in the data (the capture's op and length bytes too: the ops
        // differ, which does not matter, none can hold a frame header).
        owned = rest.iter().map(|&b| b.max(1)).collect();
        &owned[..]
    } else {
        rest
    };
    let ops = capture(rest);

    let events = run_h2(&ops, None);
    if let Some(at) = events.iter().position(|e| matches!(e, H2Event::Broken(_))) {
        assert_eq!(at + 1, events.len(), "events after Broken: {events:?}");
    }
    let outcomes = run_exchange(&ops, None);
    if garbage {
        assert!(events.is_empty(), "frames found in bytes without a zero: {events:?}");
        // Unless it is an HTTP/1.1 message or starts like the HTTP/2 preface (both parsed as
        // such on their own), such bytes neither switch to HTTP/2 nor make a call.
        let has = |s: &[u8]| rest.windows(s.len()).any(|w| w == s);
        if !has(b"HTTP/1.") && !has(b"PRI * HTTP/2.0") {
            assert!(
                !outcomes
                    .iter()
                    .any(|o| matches!(o, Outcome::Http2 | Outcome::Call(_))),
                "garbage taken for HTTP/2 or a call: {outcomes:?}"
            );
        }
    }
    if !lens.is_empty() {
        assert_eq!(
            events,
            run_h2(&ops, Some(lens)),
            "the events depend on how the SSL calls were cut"
        );
        let corrupt = format!("{:?}", Outcome::ParseError("content-encoding"));
        // The HTTP/1.1 reassembler's desyncs before the frames were found depend on where in
        // an SSL call they were found (the rest of that call is not given to it): not compared.
        let shown = |o: &Outcome| {
            (!matches!(o, Outcome::ParseError("joined mid-connection"))).then(|| format!("{o:?}"))
        };
        let whole: Vec<String> = outcomes.iter().filter_map(shown).collect();
        let split: Vec<String> = run_exchange(&ops, Some(lens))
            .iter()
            .filter_map(shown)
            .collect();
        if !whole.contains(&corrupt) && !split.contains(&corrupt) {
            assert_eq!(whole, split, "the calls depend on how the SSL calls were cut");
        }
    }
});
