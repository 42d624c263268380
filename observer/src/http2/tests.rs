use loona_hpack::Encoder;

use super::*;

pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub(crate) fn block(enc: &mut Encoder<'_>, headers: &[(&str, &str)]) -> Vec<u8> {
    enc.encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
}

/// A client and a server conversation: two interleaved streams, a header block split over
/// CONTINUATION, padded DATA, a priority field, SETTINGS, PING, WINDOW_UPDATE, a reset stream.
fn conversation() -> (Vec<u8>, Vec<u8>) {
    let mut client = Encoder::new();
    let mut server = Encoder::new();
    let mut req = PREFACE.to_vec();
    req.extend(frame(
        SETTINGS,
        0,
        0,
        &[0, 1, 0, 0, 0x10, 0, 0, 4, 0, 0, 0xff, 0xff],
    ));
    req.extend(frame(0x8, 0, 0, &[0, 0, 0x10, 0])); // WINDOW_UPDATE
    let req_headers = |path: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "127.0.0.1:8443"),
            (
                ":path",
                if path.is_empty() {
                    "/v1/chat/completions"
                } else {
                    path
                },
            ),
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-secret"),
            ("x-tenant-id", "acme"),
        ]
    };
    // Stream 1: its header block in HEADERS + CONTINUATION, with a priority field.
    let b1 = block(&mut client, &req_headers(""));
    let (a, b) = b1.split_at(b1.len() / 2);
    let mut first = vec![0, 0, 0, 0, 15];
    first.extend_from_slice(a);
    req.extend(frame(HEADERS, PRIORITY, 1, &first));
    req.extend(frame(CONTINUATION, END_HEADERS, 1, b));
    // Stream 3 opens before stream 1's body: the same headers, now from the dynamic table.
    let b3 = block(&mut client, &req_headers(""));
    assert!(b3.len() < b1.len(), "the second block reuses the table");
    req.extend(frame(HEADERS, END_HEADERS, 3, &b3));
    req.extend(frame(DATA, 0, 1, b"{\"model\":"));
    let mut padded = vec![4];
    padded.extend_from_slice(b"\"gpt-4o-mini\"}");
    padded.extend_from_slice(&[0; 4]);
    req.extend(frame(DATA, PADDED | END_STREAM, 1, &padded));
    req.extend(frame(DATA, END_STREAM, 3, b"{\"model\":\"gpt-4o\"}"));
    req.extend(frame(0x6, 0, 0, &[0; 8])); // PING
    // Stream 5 is reset by the client.
    let b5 = block(&mut client, &req_headers("/v1/embeddings"));
    req.extend(frame(HEADERS, END_HEADERS, 5, &b5));
    req.extend(frame(RST_STREAM, 0, 5, &[0, 0, 0, 8]));

    let mut resp = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
    resp.extend(frame(SETTINGS, ACK, 0, &[]));
    let h3 = block(
        &mut server,
        &[(":status", "200"), ("content-type", "text/event-stream")],
    );
    resp.extend(frame(HEADERS, END_HEADERS, 3, &h3));
    let h1 = block(
        &mut server,
        &[(":status", "200"), ("content-type", "application/json")],
    );
    resp.extend(frame(HEADERS, END_HEADERS, 1, &h1));
    resp.extend(frame(DATA, 0, 3, b"data: {}\n\n"));
    resp.extend(frame(DATA, END_STREAM, 1, b"{\"usage\":{}}"));
    let trailers = block(&mut server, &[("grpc-status", "0")]);
    resp.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &trailers));
    (req, resp)
}

fn expected() -> Vec<H2Event> {
    let req = |path: &str| Head {
        method: "POST".into(),
        path: path.into(),
        host: Some("127.0.0.1:8443".into()),
        content_type: Some("application/json".into()),
        tenant: Some("acme".into()),
        ..Head::default()
    };
    let resp = |ct: &str| Head {
        status: 200,
        content_type: Some(ct.into()),
        ..Head::default()
    };
    vec![
        H2Event::Head(Side::Request, 1, req("/v1/chat/completions")),
        H2Event::Head(Side::Request, 3, req("/v1/chat/completions")),
        H2Event::Body(Side::Request, 1, b"{\"model\":".to_vec()),
        H2Event::Body(Side::Request, 1, b"\"gpt-4o-mini\"}".to_vec()),
        H2Event::End(Side::Request, 1),
        H2Event::Body(Side::Request, 3, b"{\"model\":\"gpt-4o\"}".to_vec()),
        H2Event::End(Side::Request, 3),
        H2Event::Head(Side::Request, 5, req("/v1/embeddings")),
        H2Event::Reset(5),
        H2Event::Head(Side::Response, 3, resp("text/event-stream")),
        H2Event::Head(Side::Response, 1, resp("application/json")),
        H2Event::Body(Side::Response, 3, b"data: {}\n\n".to_vec()),
        H2Event::Body(Side::Response, 1, b"{\"usage\":{}}".to_vec()),
        H2Event::End(Side::Response, 1),
        H2Event::Head(Side::Response, 3, Head::default()),
        H2Event::End(Side::Response, 3),
    ]
}

#[test]
fn streams_headers_and_bodies_of_both_sides() {
    let (req, resp) = conversation();
    let mut c = H2Connection::new();
    let mut out = Vec::new();
    c.feed(Side::Request, &req, &mut out);
    c.feed(Side::Response, &resp, &mut out);
    assert_eq!(out, expected());
    assert!(!c.is_broken());
    assert_eq!(c.buffered(), 0);
}

/// Frames and header blocks split at every byte give the same events (DATA payloads may come
/// in pieces; joined per stream they are the same).
#[test]
fn every_split_gives_the_same_events() {
    let (req, resp) = conversation();
    for cut in 1..req.len().max(resp.len()) {
        let mut c = H2Connection::new();
        let mut out = Vec::new();
        let (a, b) = req.split_at(cut.min(req.len()));
        c.feed(Side::Request, a, &mut out);
        c.feed(Side::Request, b, &mut out);
        let (a, b) = resp.split_at(cut.min(resp.len()));
        c.feed(Side::Response, a, &mut out);
        c.feed(Side::Response, b, &mut out);
        assert_eq!(out, expected(), "cut at {cut}");
    }
}

#[test]
fn a_table_size_above_what_the_peer_allowed_breaks_the_connection() {
    // The server allowed no more than the default 4096: a 65536-byte table is an error.
    let mut c = H2Connection::new();
    let mut out = Vec::new();
    let mut req = PREFACE.to_vec();
    // Dynamic table size update to 65536 (001xxxxx, 5-bit prefix integer), then :method GET.
    let mut b = vec![0x3f, 0xe1, 0xff, 0x03];
    b.push(0x82);
    req.extend(frame(HEADERS, END_HEADERS, 1, &b));
    c.feed(Side::Request, &req, &mut out);
    assert_eq!(out, vec![H2Event::Broken("HPACK decoding failed")]);

    // Once the server advertised 65536, the same block decodes.
    let mut c = H2Connection::new();
    let mut out = Vec::new();
    c.feed(
        Side::Response,
        &frame(SETTINGS, 0, 0, &[0, 1, 0, 1, 0, 0]),
        &mut out,
    );
    c.feed(Side::Request, &req, &mut out);
    assert!(
        matches!(out.as_slice(), [H2Event::Head(Side::Request, 1, h)] if h.method == "GET"),
        "{out:?}"
    );
}

#[test]
fn malformed_input_breaks_once_and_stops() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n".to_vec(),
            "bad client preface",
        ),
        (
            [PREFACE.as_slice(), &[0x20, 0, 0, 0, 0, 0, 0, 0, 1]].concat(),
            "frame larger than 1 MiB",
        ),
        (
            [
                PREFACE.as_slice(),
                &frame(CONTINUATION, END_HEADERS, 1, b"x"),
            ]
            .concat(),
            "CONTINUATION without a header block",
        ),
        (
            [PREFACE.as_slice(), &frame(DATA, PADDED, 1, &[9, 1, 2])].concat(),
            "padding longer than the frame",
        ),
        (
            [
                PREFACE.as_slice(),
                &frame(HEADERS, 0, 1, &[0x82]),
                &frame(DATA, 0, 1, b"x"),
            ]
            .concat(),
            "frame inside a header block",
        ),
    ];
    for (bytes, why) in cases {
        let mut c = H2Connection::new();
        let mut out = Vec::new();
        c.feed(Side::Request, &bytes, &mut out);
        c.feed(Side::Request, &frame(DATA, 0, 1, b"more"), &mut out);
        assert_eq!(out, vec![H2Event::Broken(why)]);
        assert!(c.is_broken());
    }
    let mut c = H2Connection::new();
    let mut out = Vec::new();
    c.gap(&mut out);
    c.gap(&mut out);
    assert_eq!(out, vec![H2Event::Broken("bytes lost")]);
}

/// A PUSH_PROMISE block is decoded (the table stays in step) and reported as nothing.
#[test]
fn push_promise_keeps_the_table_in_step() {
    let mut server = Encoder::new();
    let mut resp = Vec::new();
    let mut promise = 2u32.to_be_bytes().to_vec();
    promise.extend(block(
        &mut server,
        &[(":method", "GET"), (":path", "/pushed")],
    ));
    resp.extend(frame(PUSH_PROMISE, END_HEADERS, 1, &promise));
    let h = block(&mut server, &[(":status", "200"), (":path", "/pushed")]);
    resp.extend(frame(HEADERS, END_HEADERS, 1, &h));
    let mut c = H2Connection::new();
    let mut out = Vec::new();
    c.feed(Side::Response, &resp, &mut out);
    assert_eq!(
        out,
        vec![H2Event::Head(
            Side::Response,
            1,
            Head {
                status: 200,
                path: "/pushed".into(),
                ..Head::default()
            }
        )]
    );
}
