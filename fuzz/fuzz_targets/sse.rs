//! `SseParser` fed a stream split anywhere: it must never panic, must dispatch the same events
//! (and count the same dropped and invalid lines) whatever the split, and must agree with a plain
//! reference reading of the WHATWG rules.
//!
//! Input: a limit byte (high bit set: a line limit of its low 7 bits, to exercise the oversized
//! paths; else the default 4 MiB), then a chunking plan (see `llmwarden_fuzz::plan`), then the
//! stream.
#![no_main]

use ledger::sse::{SseEvent, SseParser};
use libfuzzer_sys::fuzz_target;
use llmwarden_fuzz::{chunks, plan, reference_sse};

/// What a parser made of a whole stream.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<SseEvent>,
    unterminated: Option<SseEvent>,
    dropped: u64,
    invalid_utf8_lines: u64,
}

fn parse(mut parser: SseParser, chunks: &[&[u8]]) -> Outcome {
    let mut events = Vec::new();
    for chunk in chunks {
        parser.feed(chunk, &mut events);
    }
    let unterminated = parser.take_unterminated();
    let dispatched = events.len();
    parser.finish(&mut events);
    assert_eq!(events.len(), dispatched, "finish() must dispatch nothing");
    Outcome {
        events,
        unterminated,
        dropped: parser.dropped(),
        invalid_utf8_lines: parser.invalid_utf8_lines(),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&limit, rest)) = input.split_first() else {
        return;
    };
    let small_limit = limit & 0x80 != 0;
    let parser = || {
        if small_limit {
            SseParser::with_max_line_bytes(usize::from(limit & 0x7f))
        } else {
            SseParser::new()
        }
    };
    let (lens, body) = plan(rest);
    let whole = parse(parser(), &[body]);
    let split = parse(parser(), &chunks(lens, body));
    assert_eq!(whole, split, "events depend on where the stream was split");
    if !small_limit {
        let (events, unterminated) = reference_sse(body);
        assert_eq!(
            whole.events, events,
            "events differ from the WHATWG reference"
        );
        assert_eq!(
            whole.unterminated, unterminated,
            "the unterminated event differs from the WHATWG reference"
        );
        assert_eq!(
            whole.dropped, 0,
            "nothing is dropped under the default limit"
        );
    }
});
