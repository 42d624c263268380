use super::*;
use proptest::prelude::*;

fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
    let mut parser = SseParser::new();
    let mut out = Vec::new();
    for chunk in chunks {
        parser.feed(chunk, &mut out);
    }
    parser.finish(&mut out);
    out
}

fn ev(event: Option<&str>, data: &str, id: Option<&str>) -> SseEvent {
    SseEvent {
        event: event.map(str::to_owned),
        data: data.to_owned(),
        id: id.map(str::to_owned),
    }
}

#[test]
fn lf_cr_and_crlf_line_ends() {
    let want = vec![
        ev(None, "a", None),
        ev(Some("x"), "b", None),
        ev(None, "c", None),
    ];
    assert_eq!(
        parse_all(&[b"data: a\n\nevent: x\ndata: b\n\ndata: c\n\n"]),
        want
    );
    assert_eq!(
        parse_all(&[b"data: a\r\revent: x\rdata: b\r\rdata: c\r\r"]),
        want
    );
    assert_eq!(
        parse_all(&[b"data: a\r\n\r\nevent: x\r\ndata: b\r\n\r\ndata: c\r\n\r\n"]),
        want
    );
}

#[test]
fn crlf_split_between_chunks_is_one_line_end() {
    // "data: a\r" | "\n\r" | "\n": two line ends, one event; not four.
    let out = parse_all(&[b"data: a\r", b"\n\r", b"\ndata: b\r", b"\n", b"\r\n"]);
    assert_eq!(out, vec![ev(None, "a", None), ev(None, "b", None)]);
}

#[test]
fn empty_chunk_after_cr_keeps_the_pending_cr() {
    let out = parse_all(&[b"data: a\r", b"", b"\ndata: b\n\n"]);
    assert_eq!(out, vec![ev(None, "a\nb", None)]);
}

#[test]
fn comments_multiline_data_and_fields_without_colon() {
    let input = b": keep-alive\ndata: line1\ndata:line2\ndata\ndata:  two spaces\n\n";
    assert_eq!(
        parse_all(&[input]),
        vec![ev(None, "line1\nline2\n\n two spaces", None)]
    );
}

#[test]
fn event_without_data_is_not_dispatched_and_type_resets() {
    let out = parse_all(&[b"event: ping\n\ndata: x\n\n"]);
    assert_eq!(out, vec![ev(None, "x", None)]);
}

#[test]
fn empty_data_field_dispatches_empty_string() {
    assert_eq!(parse_all(&[b"data:\n\n"]), vec![ev(None, "", None)]);
}

#[test]
fn id_persists_and_nul_ids_are_ignored() {
    let out = parse_all(&[b"id: 7\ndata: a\n\ndata: b\n\nid: 8\0\ndata: c\n\nid\ndata: d\n\n"]);
    assert_eq!(
        out,
        vec![
            ev(None, "a", Some("7")),
            ev(None, "b", Some("7")),
            ev(None, "c", Some("7")),
            ev(None, "d", Some("")),
        ]
    );
}

#[test]
fn unknown_fields_and_retry_are_ignored() {
    assert_eq!(
        parse_all(&[b"retry: 10\nfoo: bar\ndata: x\n\n"]),
        vec![ev(None, "x", None)]
    );
}

#[test]
fn leading_bom_is_stripped_once() {
    let out = parse_all(&[b"\xEF\xBB", b"\xBFdata: x\n\n"]);
    assert_eq!(out, vec![ev(None, "x", None)]);
}

#[test]
fn utf8_split_across_chunks() {
    let bytes = "data: h\u{e9}llo \u{2713}\n\n".as_bytes();
    for i in 0..bytes.len() {
        let (a, b) = bytes.split_at(i);
        assert_eq!(
            parse_all(&[a, b]),
            vec![ev(None, "h\u{e9}llo \u{2713}", None)],
            "split at {i}"
        );
    }
}

#[test]
fn invalid_utf8_is_lossy_and_counted() {
    let mut parser = SseParser::new();
    let mut out = Vec::new();
    parser.feed(b"data: a\xFFb\n\n", &mut out);
    assert_eq!(out, vec![ev(None, "a\u{FFFD}b", None)]);
    assert_eq!(parser.invalid_utf8_lines(), 1);
}

#[test]
fn unterminated_event_is_not_dispatched_by_finish() {
    let mut parser = SseParser::new();
    let mut out = Vec::new();
    parser.feed(b"data: a\n\ndata: b\n", &mut out);
    parser.finish(&mut out);
    assert_eq!(out, vec![ev(None, "a", None)]);
}

#[test]
fn take_unterminated_returns_pending_event_including_last_line() {
    let mut parser = SseParser::new();
    let mut out = Vec::new();
    parser.feed(b"data: a\n\ndata: {\"x\":\ndata: 1}", &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(
        parser.take_unterminated(),
        Some(ev(None, "{\"x\":\n1}", None))
    );
    assert_eq!(parser.take_unterminated(), None);
}

#[test]
fn oversized_line_is_dropped_counted_and_parser_recovers() {
    let mut parser = SseParser::with_max_line_bytes(16);
    let mut out = Vec::new();
    parser.feed(b"data: 0123456789", &mut out);
    parser.feed(b"0123456789abcdef\n\n", &mut out);
    parser.feed(b"data: ok\n\n", &mut out);
    assert_eq!(out, vec![ev(None, "ok", None)]);
    assert_eq!(parser.dropped(), 1);
}

#[test]
fn oversized_joined_data_drops_the_event() {
    let mut parser = SseParser::with_max_line_bytes(16);
    let mut out = Vec::new();
    parser.feed(
        b"data: 0123456\ndata: 0123456\ndata: x\n\ndata: ok\n\n",
        &mut out,
    );
    assert_eq!(out, vec![ev(None, "ok", None)]);
    assert_eq!(parser.dropped(), 1);
}

/// `stream` cut at `cuts` (any order; past the end means the end).
fn cut(stream: &[u8], mut cuts: Vec<usize>) -> Vec<&[u8]> {
    cuts.iter_mut().for_each(|c| *c = (*c).min(stream.len()));
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut last = 0;
    for c in cuts {
        chunks.push(&stream[last..c]);
        last = c;
    }
    chunks.push(&stream[last..]);
    chunks
}

const MIXED: &[u8] = b"\xEF\xBB\xBF: hi\r\nevent: a\r\ndata: 1\r\ndata: \xE2\x9C\x93\r\n\r\nid: 5\rdata:2\r\rdata: 3\n\n";

proptest! {
    #[test]
    fn any_chunking_gives_the_same_events(cuts in proptest::collection::vec(0..MIXED.len(), 0..8)) {
        let whole = parse_all(&[MIXED]);
        prop_assert_eq!(parse_all(&cut(MIXED, cuts)), whole);
    }
}

#[test]
fn byte_at_a_time_equals_whole() {
    let whole = parse_all(&[MIXED]);
    assert_eq!(whole.len(), 3);
    let bytes: Vec<&[u8]> = MIXED.chunks(1).collect();
    assert_eq!(parse_all(&bytes), whole);
}

/// Events lent one by one carry what the owned events carry, whatever the chunking, while the
/// parser reuses its data buffer between them.
#[test]
fn lent_events_equal_owned_ones() {
    let stream: &[u8] = b"id: 7\nevent: delta\ndata: {\"a\":\ndata: 1}\n\n: comment\ndata: two\n\n\
        event: stop\ndata: \xFF\r\n\r\ndata: last\r\r";
    let owned = parse_all(&[stream]);
    assert_eq!(
        owned,
        [
            ev(Some("delta"), "{\"a\":\n1}", Some("7")),
            ev(None, "two", Some("7")),
            ev(Some("stop"), "\u{FFFD}", Some("7")),
            ev(None, "last", Some("7")),
        ]
    );
    for split in 0..=stream.len() {
        let mut parser = SseParser::new();
        let mut lent = Vec::new();
        for chunk in [&stream[..split], &stream[split..]] {
            parser.feed_each(chunk, |e| lent.push(e.to_event()));
        }
        assert_eq!(lent, owned, "split at {split}");
    }
}

/// Events, counters and leftovers of `stream` fed in the given chunks to a parser with `max`.
fn run(max: usize, chunks: &[&[u8]]) -> (Vec<SseEvent>, u64, u64, Option<SseEvent>) {
    let mut parser = SseParser::with_max_line_bytes(max);
    let mut out = Vec::new();
    for chunk in chunks {
        parser.feed_each(chunk, |e| out.push(e.to_event()));
    }
    let left = parser.take_unterminated();
    (out, parser.dropped(), parser.invalid_utf8_lines(), left)
}

/// One line of a generated stream.
fn line() -> impl Strategy<Value = Vec<u8>> {
    let text = proptest::collection::vec(
        prop_oneof![
            8 => proptest::char::range('a', 'z').prop_map(|c| c.to_string().into_bytes()),
            2 => Just(b" ".to_vec()),
            1 => Just(b":".to_vec()),
            1 => Just("\u{2713}".as_bytes().to_vec()),
            1 => Just(b"\xFF".to_vec()),
            1 => Just(b"\0".to_vec()),
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat());
    let body = prop_oneof![
        6 => text.clone().prop_map(|t| [b"data: ".as_slice(), &t].concat()),
        2 => text.clone().prop_map(|t| [b"data:".as_slice(), &t].concat()),
        1 => Just(b"data".to_vec()),
        1 => text.clone().prop_map(|t| [b"event: ".as_slice(), &t].concat()),
        1 => text.clone().prop_map(|t| [b"id: ".as_slice(), &t].concat()),
        1 => text.clone().prop_map(|t| [b": ".as_slice(), &t].concat()),
        1 => text.prop_map(|t| [b"retry: ".as_slice(), &t].concat()),
        3 => Just(Vec::new()),
    ];
    let end = prop_oneof![
        4 => Just(b"\n".to_vec()),
        1 => Just(b"\r".to_vec()),
        1 => Just(b"\r\n".to_vec()),
    ];
    (body, end).prop_map(|(b, e)| [b, e].concat())
}

proptest! {
    /// Lines read in place (whole in a chunk, the first data line lent from it) give exactly
    /// what lines gathered byte by byte give: events, drops, invalid lines and the leftover,
    /// with a line limit small enough to be hit.
    #[test]
    fn in_place_lines_equal_gathered_ones(
        lines in proptest::collection::vec(line(), 0..24),
        bom in proptest::bool::ANY,
        max in prop_oneof![Just(DEFAULT_MAX_LINE_BYTES), 4usize..24],
        cuts in proptest::collection::vec(0usize..400, 0..6),
    ) {
        let mut stream = if bom { b"\xEF\xBB\xBF".to_vec() } else { Vec::new() };
        for l in &lines {
            stream.extend_from_slice(l);
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let gathered = run(max, &bytes);
        prop_assert_eq!(&run(max, &[&stream]), &gathered);
        prop_assert_eq!(&run(max, &cut(&stream, cuts)), &gathered);
    }
}
