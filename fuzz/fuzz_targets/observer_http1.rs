//! The observer's HTTP/1.1 reassembler (`observer::http1::Connection`) fed a captured
//! connection: it must never panic, stay within its buffer bounds, emit well-formed messages,
//! and give the same events whether each SSL call arrives whole or in pieces (the kernel splits
//! a call into ring-buffer chunks; only the first piece starts the call).
//!
//! Input: a chunking plan (see `llmwarden_fuzz::plan`), then a capture (see
//! `llmwarden_fuzz::capture`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmwarden_fuzz::{CaptureKind, CaptureOp, capture, chunks, plan};
use observer::http1::{Connection, HttpEvent, MAX_HEAD_BYTES, Side};

/// Most bytes a connection may hold: a head per side, a chunk line, small change.
const MAX_BUFFERED: usize = 2 * (MAX_HEAD_BYTES + 4096) + 1024;

/// Runs the capture with each call cut by `lens` (none: whole).
fn run(ops: &[CaptureOp<'_>], lens: Option<&[u8]>) -> Vec<HttpEvent> {
    let mut c = Connection::new();
    let mut out = Vec::new();
    for op in ops {
        match op.kind {
            CaptureKind::Call | CaptureKind::Continue => {
                let pieces = match lens {
                    Some(lens) => chunks(lens, op.data),
                    None => vec![op.data],
                };
                // As in the daemon: a piece starts the call while nothing of it was fed (an
                // empty first chunk leaves the next one at offset 0).
                let mut fed = 0;
                for piece in pieces {
                    let start = op.kind == CaptureKind::Call && fed == 0;
                    c.feed(op.side(), piece, start, &mut out);
                    fed += piece.len();
                }
            }
            CaptureKind::Gap(n) => c.gap(op.side(), n, &mut out),
            CaptureKind::Close => c.close(&mut out),
        }
        assert!(
            c.buffered() <= MAX_BUFFERED,
            "buffered {} bytes",
            c.buffered()
        );
    }
    out
}

/// Joins adjacent bodies of one side and drops empty ones: how bytes were cut does not matter.
/// The bytes an `Http2` event hands over are those of the call it was detected in (later calls
/// go to the HTTP/2 reassembler, which this target does not run), so only the event counts here;
/// `observer_exchange` checks that the handover gives the same calls however the bytes are cut.
fn merge(events: Vec<HttpEvent>) -> Vec<HttpEvent> {
    let mut out: Vec<HttpEvent> = Vec::new();
    for mut e in events {
        if let HttpEvent::Http2(bytes) = &mut e {
            bytes.clear();
        }
        if let HttpEvent::Body(s, b) = &e {
            if b.is_empty() {
                continue;
            }
            if let Some(HttpEvent::Body(ps, pb)) = out.last_mut()
                && ps == s
            {
                pb.extend_from_slice(b);
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// Every side's events read Head, Body/BodyGap*, End; a desync ends both sides' messages;
/// nothing follows HTTP/2.
fn check_well_formed(events: &[HttpEvent]) {
    let mut open = [false, false];
    let ix = |s: &Side| usize::from(*s == Side::Response);
    for (i, e) in events.iter().enumerate() {
        match e {
            HttpEvent::Head(s, _) => {
                assert!(!open[ix(s)], "event {i}: a head inside a message: {e:?}");
                open[ix(s)] = true;
            }
            HttpEvent::Body(s, _) | HttpEvent::BodyGap(s, _) => {
                assert!(open[ix(s)], "event {i}: a body outside a message: {e:?}");
            }
            HttpEvent::End(s) => {
                assert!(open[ix(s)], "event {i}: an end outside a message: {e:?}");
                open[ix(s)] = false;
            }
            HttpEvent::Desync(..) => open = [false, false],
            HttpEvent::Http2(_) => assert_eq!(i + 1, events.len(), "events after HTTP/2"),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let (lens, rest) = plan(input);
    let ops = capture(rest);
    let whole = merge(run(&ops, None));
    check_well_formed(&whole);
    if !lens.is_empty() {
        let split = merge(run(&ops, Some(lens)));
        assert_eq!(
            whole, split,
            "the events depend on how the SSL calls were cut into chunks"
        );
    }
});
