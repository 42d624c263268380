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
    assert_eq!(out, vec![HttpEvent::Http2]);
}

#[test]
fn http2_preface_split_anywhere_is_detected() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for cut in 1..preface.len() {
        let mut c = Connection::new();
        let mut out = Vec::new();
        c.feed(Side::Request, &preface[..cut], true, &mut out);
        c.feed(Side::Request, &preface[cut..], false, &mut out);
        assert_eq!(out, vec![HttpEvent::Http2], "cut at {cut}");
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

proptest! {
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
