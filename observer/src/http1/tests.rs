use proptest::prelude::*;

use super::*;

/// Feeds `req` and `resp` split at the given points (as separate SSL calls) and collapses the
/// events into (heads, bodies, ends) per side.
fn run(req: &[u8], resp: &[u8], req_cuts: &[usize], resp_cuts: &[usize]) -> Vec<HttpEvent> {
    let mut c = Connection::new();
    let mut out = Vec::new();
    for piece in split(req, req_cuts) {
        c.feed(Side::Request, piece, true, &mut out);
    }
    for piece in split(resp, resp_cuts) {
        c.feed(Side::Response, piece, true, &mut out);
    }
    c.close(&mut out);
    merge_bodies(out)
}

fn split<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in cuts.into_iter().chain([data.len()]) {
        if c > prev {
            out.push(&data[prev..c]);
            prev = c;
        }
    }
    out
}

fn merge_bodies(events: Vec<HttpEvent>) -> Vec<HttpEvent> {
    let mut out: Vec<HttpEvent> = Vec::new();
    for e in events {
        if let (HttpEvent::Body(s, b), Some(HttpEvent::Body(ps, pb))) = (&e, out.last_mut())
            && s == ps
        {
            pb.extend_from_slice(b);
            continue;
        }
        if matches!(&e, HttpEvent::Body(_, b) if b.is_empty()) {
            continue;
        }
        out.push(e);
    }
    out
}

const REQ: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-secret\r\nContent-Type: application/json\r\nContent-Length: 17\r\nX-Tenant-ID: acme\r\n\r\n{\"model\":\"gpt-4\"}";
const RESP_CL: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"id\":\"x\"}\n";
const RESP_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n6;ext=1\r\ndata: \r\n5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n";

fn bodies(events: &[HttpEvent], side: Side) -> Vec<Vec<u8>> {
    events
        .iter()
        .filter_map(|e| match e {
            HttpEvent::Body(s, b) if *s == side => Some(b.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn request_and_content_length_response() {
    let ev = run(REQ, RESP_CL, &[], &[]);
    let HttpEvent::Head(Side::Request, head) = &ev[0] else {
        panic!("{ev:?}")
    };
    assert_eq!(head.method, "POST");
    assert_eq!(head.host.as_deref(), Some("api.openai.com"));
    assert_eq!(head.tenant.as_deref(), Some("acme"));
    assert_eq!(
        bodies(&ev, Side::Request),
        vec![b"{\"model\":\"gpt-4\"}".to_vec()]
    );
    assert_eq!(
        bodies(&ev, Side::Response),
        vec![b"{\"id\":\"x\"}\n".to_vec()]
    );
    assert_eq!(
        ev.iter().filter(|e| matches!(e, HttpEvent::End(_))).count(),
        2
    );
    assert!(
        !format!("{ev:?}").contains("sk-secret"),
        "auth headers are never kept"
    );
}

#[test]
fn chunked_with_extensions_and_trailers() {
    let ev = run(REQ, RESP_CHUNKED, &[], &[]);
    assert_eq!(bodies(&ev, Side::Response), vec![b"data: hello".to_vec()]);
    assert_eq!(ev.last(), Some(&HttpEvent::End(Side::Response)));
}

#[test]
fn keep_alive_and_pipelining() {
    let reqs = [REQ, REQ, b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n".as_slice()].concat();
    let resps = [
        RESP_CL,
        RESP_CHUNKED,
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n".as_slice(),
        RESP_CL,
    ]
    .concat();
    let reqs = [reqs.as_slice(), REQ].concat();
    let ev = run(&reqs, &resps, &[], &[]);
    let ends = |side| ev.iter().filter(|e| **e == HttpEvent::End(side)).count();
    assert_eq!(ends(Side::Request), 4);
    assert_eq!(
        ends(Side::Response),
        4,
        "HEAD response has no body despite Content-Length: {ev:?}"
    );
}

#[test]
fn http2_preface_is_detected() {
    let mut c = Connection::new();
    let mut out = Vec::new();
    c.feed(
        Side::Request,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
        true,
        &mut out,
    );
    c.feed(Side::Response, b"\x00\x00\x12\x04", true, &mut out);
    assert_eq!(
        out,
        vec![HttpEvent::Http2(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00".to_vec()
        )]
    );
}

#[test]
fn http2_preface_split_anywhere_is_detected() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for cut in 1..preface.len() {
        let mut c = Connection::new();
        let mut out = Vec::new();
        c.feed(Side::Request, &preface[..cut], true, &mut out);
        c.feed(Side::Request, &preface[cut..], false, &mut out);
        // Detected once the first 16 bytes are in; the rest goes to the HTTP/2 reassembler.
        let seen = if cut >= 16 {
            &preface[..cut]
        } else {
            &preface[..]
        };
        assert_eq!(out, vec![HttpEvent::Http2(seen.to_vec())], "cut at {cut}");
    }
}

#[test]
fn garbage_desyncs_then_resyncs_on_next_request() {
    let mut c = Connection::new();
    let mut out = Vec::new();
    c.feed(
        Side::Request,
        b"\x16\x03\x01garbage\r\n\r\n",
        true,
        &mut out,
    );
    assert!(matches!(out[0], HttpEvent::Desync(..)));
    c.feed(Side::Request, b"more garbage", false, &mut out);
    c.feed(Side::Request, REQ, true, &mut out);
    assert!(
        out.iter()
            .any(|e| matches!(e, HttpEvent::Head(Side::Request, _)))
    );
}

#[test]
fn gap_in_content_length_body_is_reported() {
    let mut c = Connection::new();
    let mut out = Vec::new();
    c.feed(Side::Request, &REQ[..REQ.len() - 10], true, &mut out);
    c.gap(Side::Request, 10, &mut out);
    assert!(out.contains(&HttpEvent::BodyGap(Side::Request, 10)));
    assert_eq!(out.last(), Some(&HttpEvent::End(Side::Request)));
}

#[test]
fn read_until_close() {
    let ev = run(
        REQ,
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc",
        &[],
        &[],
    );
    assert_eq!(bodies(&ev, Side::Response), vec![b"abc".to_vec()]);
    assert_eq!(ev.last(), Some(&HttpEvent::End(Side::Response)));
}

/// Feeds one SSL call in pieces cut at `cuts`: only the first piece starts the call.
fn feed_call(
    c: &mut Connection,
    side: Side,
    call: &[u8],
    cuts: &[usize],
    out: &mut Vec<HttpEvent>,
) {
    for (i, piece) in split(call, cuts).into_iter().enumerate() {
        c.feed(side, piece, i == 0, out);
    }
}

/// Feeds whole SSL calls of one side, each cut at `cuts`, and merges the bodies.
fn calls(side: Side, calls: &[&[u8]], cuts: &[usize]) -> Vec<HttpEvent> {
    let mut c = Connection::new();
    let mut out = Vec::new();
    for call in calls {
        feed_call(&mut c, side, call, cuts, &mut out);
    }
    merge_bodies(out)
}

/// A chunked response whose chunk is not followed by CRLF, then bytes that look like a
/// response: all in one SSL call, so they are body bytes of unknown meaning, not a response.
const RESP_BAD_CHUNK_END: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfake!";
/// The same with a bad chunk size line.
const RESP_BAD_CHUNK_SIZE: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfake!";

fn heads(events: &[HttpEvent], side: Side) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, HttpEvent::Head(s, _) if *s == side))
        .count()
}

#[test]
fn desync_skips_the_rest_of_the_call() {
    for resp in [RESP_BAD_CHUNK_END, RESP_BAD_CHUNK_SIZE] {
        let whole = calls(Side::Response, &[resp], &[]);
        assert_eq!(heads(&whole, Side::Response), 1, "{whole:?}");
        assert!(
            matches!(whole.last(), Some(HttpEvent::Desync(Side::Response, _))),
            "{whole:?}"
        );
        assert!(!format!("{whole:?}").contains("fake"), "{whole:?}");
        // Fed in two pieces of the same call: the same events, whatever the cut.
        for cut in 1..resp.len() {
            let split = calls(Side::Response, &[resp], &[cut]);
            assert_eq!(split, whole, "cut at {cut}");
        }
        // The next call resynchronises.
        let next = calls(Side::Response, &[resp, RESP_CL], &[]);
        assert_eq!(heads(&next, Side::Response), 2, "{next:?}");
        assert_eq!(next.last(), Some(&HttpEvent::End(Side::Response)));
    }
}

#[test]
fn resync_holds_a_call_start_too_short_to_tell() {
    let desync = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".as_slice();
    // Every cut of the next response into two SSL calls resynchronises on it.
    for cut in 1..RESP_CL.len() {
        let ev = calls(
            Side::Response,
            &[desync, &RESP_CL[..cut], &RESP_CL[cut..]],
            &[],
        );
        assert_eq!(heads(&ev, Side::Response), 2, "cut at {cut}: {ev:?}");
        assert_eq!(
            bodies(&ev, Side::Response).last(),
            Some(&b"{\"id\":\"x\"}\n".to_vec()),
            "cut at {cut}"
        );
    }
    // Two-byte reads, one SSL call each.
    let mut pieces: Vec<&[u8]> = vec![desync];
    pieces.extend(RESP_CL.chunks(2));
    assert_eq!(
        heads(&calls(Side::Response, &pieces, &[]), Side::Response),
        2
    );
    // Held bytes that the next call does not continue are dropped; that call may start a head.
    let ev = calls(Side::Response, &[desync, b"HT", RESP_CL], &[]);
    assert_eq!(heads(&ev, Side::Response), 2, "{ev:?}");
    let ev = calls(
        Side::Response,
        &[desync, b"HT", b"TX/1.1 200 OK\r\n\r\n"],
        &[],
    );
    assert_eq!(heads(&ev, Side::Response), 1, "{ev:?}");
    // Requests too: `PO` + `ST /v1/...`.
    let garbage = b"\x16\x03\x01garbage\r\n\r\n".as_slice();
    let ev = calls(Side::Request, &[garbage, &REQ[..2], &REQ[2..]], &[]);
    assert_eq!(heads(&ev, Side::Request), 1, "{ev:?}");
    assert_eq!(ev.last(), Some(&HttpEvent::End(Side::Request)));
    // Bytes in the middle of a call never start a head, however short the first piece.
    let ev = calls(Side::Request, &[garbage, &[b"x", REQ].concat()], &[1]);
    assert_eq!(heads(&ev, Side::Request), 0, "{ev:?}");
}

#[test]
fn gap_while_resyncing_drops_held_bytes_quietly() {
    let mut c = Connection::new();
    let mut out = Vec::new();
    feed_call(
        &mut c,
        Side::Response,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        &[],
        &mut out,
    );
    c.feed(Side::Response, b"HTTP", true, &mut out);
    let before = out.len();
    c.gap(Side::Response, 10, &mut out);
    assert_eq!(out.len(), before, "no second desync: {out:?}");
    c.feed(Side::Response, b"/1.1 200 OK\r\n\r\n", false, &mut out);
    assert_eq!(heads(&out, Side::Response), 1, "{out:?}");
}

#[test]
fn chunk_line_limit_holds_whole_or_split() {
    let mut resp =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Long: "
            .to_vec();
    resp.resize(resp.len() + MAX_CHUNK_LINE, b'a');
    resp.extend_from_slice(b"\r\n\r\n");
    let whole = calls(Side::Response, &[&resp], &[]);
    assert!(
        matches!(whole.last(), Some(HttpEvent::Desync(Side::Response, _))),
        "{whole:?}"
    );
    for cut in [resp.len() - 3, resp.len() - 100, resp.len() - 4000] {
        assert_eq!(
            calls(Side::Response, &[&resp], &[cut]),
            whole,
            "cut at {cut}"
        );
    }
}

proptest! {
    #[test]
    fn splits_after_a_desync_give_the_same_events(
        cuts in proptest::collection::vec(0usize..200, 0..8),
        bad_size in any::<bool>(),
    ) {
        let resp = if bad_size { RESP_BAD_CHUNK_SIZE } else { RESP_BAD_CHUNK_END };
        let seq: [&[u8]; 3] = [resp, RESP_CHUNKED, RESP_CL];
        prop_assert_eq!(calls(Side::Response, &seq, &cuts), calls(Side::Response, &seq, &[]));
    }

    #[test]
    fn arbitrary_splits_give_the_same_events(
        req_cuts in proptest::collection::vec(0usize..400, 0..12),
        resp_cuts in proptest::collection::vec(0usize..400, 0..12),
        chunked in any::<bool>(),
    ) {
        let resp = if chunked { RESP_CHUNKED } else { RESP_CL };
        let whole = run(REQ, resp, &[], &[]);
        // Splits are not call starts here except the first: feed through one call per side.
        let mut c = Connection::new();
        let mut out = Vec::new();
        for (i, piece) in split(REQ, &req_cuts).into_iter().enumerate() {
            c.feed(Side::Request, piece, i == 0, &mut out);
        }
        for (i, piece) in split(resp, &resp_cuts).into_iter().enumerate() {
            c.feed(Side::Response, piece, i == 0, &mut out);
        }
        c.close(&mut out);
        prop_assert_eq!(merge_bodies(out), whole);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600), cuts in proptest::collection::vec(0usize..600, 0..8)) {
        let mut c = Connection::new();
        let mut out = Vec::new();
        for piece in split(&data, &cuts) {
            c.feed(Side::Request, piece, true, &mut out);
            c.feed(Side::Response, piece, true, &mut out);
        }
        c.close(&mut out);
        prop_assert!(c.buffered() <= 2 * (MAX_HEAD_BYTES + 4096) + 1024);
    }
}

#[test]
fn nothing_follows_http2() {
    let mut c = Connection::new();
    let mut out = Vec::new();
    c.feed(Side::Request, REQ, true, &mut out);
    c.feed(
        Side::Response,
        b"HTTP/1.1 200 OK\r\n\r\nabc",
        true,
        &mut out,
    );
    out.clear();
    c.feed(
        Side::Request,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        true,
        &mut out,
    );
    c.gap(Side::Response, 10, &mut out);
    c.gap(Side::Request, 10, &mut out);
    c.close(&mut out);
    assert_eq!(
        out,
        vec![HttpEvent::Http2(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
        )]
    );
}

#[test]
fn requests_without_responses_are_bounded() {
    let mut c = Connection::new();
    let mut out = Vec::new();
    for _ in 0..MAX_PIPELINED {
        c.feed(Side::Request, REQ, true, &mut out);
    }
    assert_eq!(heads(&out, Side::Request), MAX_PIPELINED);
    assert!(!out.iter().any(|e| matches!(e, HttpEvent::Desync(..))));
    c.feed(Side::Request, REQ, true, &mut out);
    assert!(
        matches!(out.last(), Some(HttpEvent::Desync(Side::Request, _))),
        "{:?}",
        out.last()
    );
    assert_eq!(heads(&out, Side::Request), MAX_PIPELINED);
    // The next request starts afresh.
    c.feed(Side::Request, REQ, true, &mut out);
    c.feed(Side::Response, RESP_CL, true, &mut out);
    assert_eq!(out.last(), Some(&HttpEvent::End(Side::Response)));
}
