//! The observer's HTTP/2 reassembler (`observer::http2::H2Connection`) fed a captured
//! connection: it must never panic, stay within its buffer bounds, report a broken connection
//! at most once and nothing after it, and give the same events (bodies joined per stream)
//! whether each SSL call arrives whole or in pieces. Random interleavings of the two sides
//! come from the capture format itself.
//!
//! Input: a chunking plan (see `llmwarden_fuzz::plan`), then a capture (see
//! `llmwarden_fuzz::capture`) whose request side starts with the client preface.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmwarden_fuzz::{CaptureKind, CaptureOp, capture, chunks, plan};
use observer::http2::{H2Connection, H2Event, MAX_FRAME, MAX_HEADER_BLOCK};

/// Most bytes a connection may hold: a partial frame and a header block per side, with `Vec`
/// growth slack.
const MAX_BUFFERED: usize = 2 * 2 * (MAX_FRAME + 9 + MAX_HEADER_BLOCK);

fn run(ops: &[CaptureOp<'_>], lens: Option<&[u8]>) -> Vec<H2Event> {
    let mut c = H2Connection::new();
    let mut out = Vec::new();
    for op in ops {
        match op.kind {
            CaptureKind::Call | CaptureKind::Continue => {
                let pieces = match lens {
                    Some(lens) => chunks(lens, op.data),
                    None => vec![op.data],
                };
                for piece in pieces {
                    c.feed(op.side(), piece, &mut out);
                }
            }
            CaptureKind::Gap(_) => c.gap(&mut out),
            CaptureKind::Close => {}
        }
        assert!(
            c.buffered() <= MAX_BUFFERED,
            "buffered {} bytes",
            c.buffered()
        );
    }
    out
}

/// Joins adjacent bodies of one side and stream: how bytes were cut does not matter.
fn merge(events: Vec<H2Event>) -> Vec<H2Event> {
    let mut out: Vec<H2Event> = Vec::new();
    for e in events {
        if let H2Event::Body(s, id, b) = &e
            && let Some(H2Event::Body(ps, pid, pb)) = out.last_mut()
            && ps == s
            && pid == id
        {
            pb.extend_from_slice(b);
            continue;
        }
        out.push(e);
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let (lens, rest) = plan(input);
    // The preface is prepended unless the first op byte's unused high bit says not (so the
    // preface check itself is fuzzed too).
    let with_preface = rest.first().is_none_or(|b| b & 0x80 == 0);
    let mut ops_with_preface = Vec::new();
    if with_preface {
        ops_with_preface.push(CaptureOp {
            response: false,
            kind: CaptureKind::Call,
            data: observer::http2::PREFACE.as_slice(),
        });
    }
    ops_with_preface.extend(capture(rest));
    let whole = merge(run(&ops_with_preface, None));
    let broken = whole.iter().position(|e| matches!(e, H2Event::Broken(_)));
    if let Some(at) = broken {
        assert_eq!(at + 1, whole.len(), "events after Broken: {whole:?}");
    }
    if !lens.is_empty() {
        let split = merge(run(&ops_with_preface, Some(lens)));
        assert_eq!(
            whole, split,
            "the events depend on how the SSL calls were cut into chunks"
        );
    }
});
