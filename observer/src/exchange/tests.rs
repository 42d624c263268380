use std::io::Write as _;

use super::*;

fn det() -> ProviderDetector {
    ProviderDetector::new().with_host("127.0.0.1:8443", "openai".parse().unwrap(), "mock")
}

fn run(req: &[u8], resp: &[u8]) -> Vec<Outcome> {
    let d = det();
    let mut x = Exchange::new();
    let mut out = Vec::new();
    send(&mut x, Side::Request, req, &mut out);
    for piece in resp.chunks(13) {
        x.feed(Side::Response, piece, false, &d, &mut out);
    }
    x.finish(End::ConnectionClosed, &d, &mut out);
    out
}

const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

fn request(host: &str, body: &str) -> Vec<u8> {
    format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nX-Tenant-ID: acme\r\n\r\n{body}", body.len()).into_bytes()
}

#[test]
fn non_stream_gzip_response_gives_usage() {
    let json = br#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(json).unwrap();
    let gz = gz.finish().unwrap();
    let mut resp = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n", gz.len()).into_bytes();
    resp.extend_from_slice(&gz);
    let out = run(&request("127.0.0.1:8443", BODY), &resp);
    let [Outcome::Call(call)] = out.as_slice() else {
        panic!("{out:?}")
    };
    let usage = call.usage.expect("usage");
    assert_eq!((usage.input_tokens, usage.output_tokens), (11, 7));
    assert_eq!(call.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    assert_eq!(call.tenant_header.as_deref(), Some("acme"));
    assert!(!call.stream);
}

#[test]
fn chunked_sse_stream_gives_usage() {
    let sse = "data: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\ndata: [DONE]\n\n";
    let mut resp =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for piece in sse.as_bytes().chunks(40) {
        resp.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        resp.extend_from_slice(piece);
        resp.extend_from_slice(b"\r\n");
    }
    resp.extend_from_slice(b"0\r\n\r\n");
    let out = run(&request("127.0.0.1:8443", BODY), &resp);
    let [Outcome::Call(call)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert!(call.stream);
    let usage = call.usage.expect("usage");
    assert_eq!((usage.input_tokens, usage.output_tokens), (5, 3));
}

#[test]
fn other_hosts_are_not_llm() {
    let out = run(
        &request("example.com", "{}"),
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert!(matches!(out.as_slice(), [Outcome::NotLlm]), "{out:?}");
}

/// An SSE response framed with chunked encoding, without its terminating `0\r\n\r\n`.
fn chunked_sse(sse: &str) -> Vec<u8> {
    let mut resp =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for piece in sse.as_bytes().chunks(40) {
        resp.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        resp.extend_from_slice(piece);
        resp.extend_from_slice(b"\r\n");
    }
    resp
}

/// Feeds `bytes` as an SSL call of `side`.
fn send(x: &mut Exchange, side: Side, bytes: &[u8], out: &mut Vec<Outcome>) {
    x.feed(side, bytes, true, &det(), out);
}

fn calls(out: &[Outcome]) -> Vec<&ObservedCall> {
    out.iter()
        .filter_map(|o| match o {
            Outcome::Call(c) => Some(c.as_ref()),
            _ => None,
        })
        .collect()
}

const USAGE_STREAM: &str = "data: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\ndata: [DONE]\n\n";

/// The official Python SDK returns at `[DONE]` and closes: the chunked terminator, sent in a TLS
/// record of its own, is never read. The call is recorded at `[DONE]`, exactly, once, on a
/// connection that then carries on (the terminator arrives later) or ends.
#[test]
fn stream_is_recorded_at_its_end_event_once() {
    let d = det();
    for terminator_arrives in [false, true] {
        let mut x = Exchange::new();
        let mut out = Vec::new();
        send(
            &mut x,
            Side::Request,
            &request("127.0.0.1:8443", BODY),
            &mut out,
        );
        send(&mut x, Side::Response, &chunked_sse(USAGE_STREAM), &mut out);
        let got = calls(&out);
        assert_eq!(got.len(), 1, "recorded at [DONE]: {out:?}");
        assert_eq!(got[0].end, End::StreamEvent);
        assert_eq!(got[0].response, ResponseSeen::Complete);
        let u = got[0].usage.expect("usage");
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.estimated),
            (5, 3, false)
        );
        if terminator_arrives {
            send(&mut x, Side::Response, b"0\r\n\r\n", &mut out);
            // The connection is reused: the next call is metered too.
            send(
                &mut x,
                Side::Request,
                &request("127.0.0.1:8443", BODY),
                &mut out,
            );
            send(&mut x, Side::Response, &chunked_sse(USAGE_STREAM), &mut out);
            send(&mut x, Side::Response, b"0\r\n\r\n", &mut out);
        }
        x.finish(End::ConnectionClosed, &d, &mut out);
        let want = if terminator_arrives { 2 } else { 1 };
        assert_eq!(calls(&out).len(), want, "{out:?}");
        assert!(
            !out.iter().any(|o| matches!(o, Outcome::ParseError(_))),
            "{out:?}"
        );
    }
}

/// A stream cut before its usage record (the client went away mid-answer) is recorded when the
/// connection ends: an estimate of the request's input plus the delivered output, flagged.
#[test]
fn stream_cut_before_its_usage_is_an_estimate_at_connection_end() {
    let d = det();
    for end in [
        End::ConnectionClosed,
        End::ProcessExit,
        End::IdleTimeout,
        End::Evicted,
    ] {
        let mut x = Exchange::new();
        let mut out = Vec::new();
        send(
            &mut x,
            Side::Request,
            &request("127.0.0.1:8443", BODY),
            &mut out,
        );
        let partial = "data: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"Hello there, friend\"}}]}\n\n";
        send(&mut x, Side::Response, &chunked_sse(partial), &mut out);
        assert!(calls(&out).is_empty(), "{out:?}");
        x.finish(end, &d, &mut out);
        let got = calls(&out);
        assert_eq!(got.len(), 1, "{out:?}");
        assert_eq!((got[0].end, got[0].response), (end, ResponseSeen::Cut));
        let u = got[0].usage.expect("usage");
        assert!(u.estimated);
        assert!(u.output_tokens >= 4, "delivered text counted: {u:?}");
        assert!(
            u.input_tokens > 0,
            "input estimated from the request: {u:?}"
        );
        assert_eq!(got[0].model.as_deref(), Some("gpt-4o-mini"));
    }
}

/// A request sent whole whose response never showed up (the process was killed while waiting)
/// is recorded at its input estimate, flagged; a free API or a request cut mid-body is not.
#[test]
fn request_without_a_response_is_recorded_at_its_input_estimate() {
    let d = det();
    let mut x = Exchange::new();
    let mut out = Vec::new();
    send(
        &mut x,
        Side::Request,
        &request("127.0.0.1:8443", BODY),
        &mut out,
    );
    x.finish(End::ProcessExit, &d, &mut out);
    let got = calls(&out);
    assert_eq!(got.len(), 1, "{out:?}");
    assert_eq!(got[0].response, ResponseSeen::None);
    let u = got[0].usage.expect("usage");
    assert!(
        u.estimated && u.input_tokens > 0 && u.output_tokens == 0,
        "{u:?}"
    );
    assert_eq!(got[0].tenant_header.as_deref(), Some("acme"));

    let mut x = Exchange::new();
    let mut out = Vec::new();
    let req = request("127.0.0.1:8443", BODY);
    send(&mut x, Side::Request, &req[..req.len() - 5], &mut out);
    x.finish(End::ProcessExit, &d, &mut out);
    assert!(
        calls(&out).is_empty(),
        "half a request is not billed: {out:?}"
    );
}

/// A non-stream response cut mid-body is an estimate too; an error status is never billed.
#[test]
fn non_stream_cut_is_an_estimate_and_errors_are_free() {
    let d = det();
    let mut x = Exchange::new();
    let mut out = Vec::new();
    send(
        &mut x,
        Side::Request,
        &request("127.0.0.1:8443", BODY),
        &mut out,
    );
    send(&mut x, Side::Response, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"id\":\"c\",\"choices\":[{\"message\":{\"content\":\"Hello", &mut out);
    x.finish(End::ConnectionClosed, &d, &mut out);
    let got = calls(&out);
    assert_eq!(got.len(), 1, "{out:?}");
    assert_eq!(got[0].response, ResponseSeen::Cut);
    assert!(
        got[0]
            .usage
            .is_some_and(|u| u.estimated && u.input_tokens > 0)
    );

    let mut x = Exchange::new();
    let mut out = Vec::new();
    send(
        &mut x,
        Side::Request,
        &request("127.0.0.1:8443", BODY),
        &mut out,
    );
    send(
        &mut x,
        Side::Response,
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 100\r\n\r\n{\"error\"",
        &mut out,
    );
    x.finish(End::ConnectionClosed, &d, &mut out);
    assert!(calls(&out).is_empty(), "{out:?}");
}

/// HTTP/2: concurrent streams on one connection, each its own call (an SSE stream with usage
/// and a JSON answer, answered out of order), then a stream reset mid-answer: an estimate.
#[test]
fn http2_streams_are_calls_of_their_own() {
    use crate::http2::tests::{block, frame};
    use loona_hpack::Encoder;
    let d = det();
    let (mut client, mut server) = (Encoder::new(), Encoder::new());
    let head = |enc: &mut Encoder<'_>, tenant: &str| {
        block(
            enc,
            &[
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "127.0.0.1:8443"),
                (":path", "/v1/chat/completions"),
                ("x-tenant-id", tenant),
            ],
        )
    };
    let mut req = crate::http2::PREFACE.to_vec();
    req.extend(frame(0x4, 0, 0, &[]));
    for (id, tenant) in [(1, "t-stream"), (3, "t-json"), (5, "t-cut")] {
        req.extend(frame(0x1, 0x4, id, &head(&mut client, tenant)));
        req.extend(frame(0x0, 0x1, id, BODY.as_bytes()));
    }
    let mut x = Exchange::new();
    let mut out = Vec::new();
    // The preface arrives split, as a client may write it.
    send(&mut x, Side::Request, &req[..10], &mut out);
    send(&mut x, Side::Request, &req[10..], &mut out);
    let json = r#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}"#;
    let mut resp = frame(0x4, 0, 0, &[]);
    resp.extend(frame(
        0x1,
        0x4,
        3,
        &block(
            &mut server,
            &[(":status", "200"), ("content-type", "application/json")],
        ),
    ));
    resp.extend(frame(
        0x1,
        0x4,
        1,
        &block(
            &mut server,
            &[(":status", "200"), ("content-type", "text/event-stream")],
        ),
    ));
    resp.extend(frame(
        0x1,
        0x4,
        5,
        &block(
            &mut server,
            &[(":status", "200"), ("content-type", "text/event-stream")],
        ),
    ));
    resp.extend(frame(0x0, 0, 1, &USAGE_STREAM.as_bytes()[..50]));
    resp.extend(frame(0x0, 0x1, 3, json.as_bytes()));
    resp.extend(frame(0x0, 0, 5, b"data: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"Hello there\"}}]}\n\n"));
    resp.extend(frame(0x0, 0, 1, &USAGE_STREAM.as_bytes()[50..]));
    resp.extend(frame(0x3, 0, 5, &[0, 0, 0, 8]));
    for piece in resp.chunks(7) {
        x.feed(Side::Response, piece, false, &d, &mut out);
    }
    assert!(matches!(out.first(), Some(Outcome::Http2)), "{out:?}");
    let got = calls(&out);
    assert_eq!(got.len(), 3, "{out:?}");
    let by = |t: &str| {
        *got.iter()
            .find(|c| c.tenant_header.as_deref() == Some(t))
            .expect(t)
    };
    let json_call = by("t-json");
    let u = json_call.usage.expect("usage");
    assert_eq!(
        (u.input_tokens, u.output_tokens, json_call.end),
        (11, 7, End::BodyEnd)
    );
    let sse = by("t-stream");
    let u = sse.usage.expect("usage");
    assert_eq!(
        (u.input_tokens, u.output_tokens, sse.end),
        (5, 3, End::StreamEvent)
    );
    let cut = by("t-cut");
    let u = cut.usage.expect("usage");
    assert!(
        u.estimated && u.input_tokens > 0 && u.output_tokens > 0,
        "{u:?}"
    );
    assert_eq!(
        (cut.end, cut.response),
        (End::StreamReset, ResponseSeen::Cut)
    );
    x.finish(End::ConnectionClosed, &d, &mut out);
    assert_eq!(calls(&out).len(), 3, "nothing twice: {out:?}");
    assert!(
        !out.iter().any(|o| matches!(o, Outcome::ParseError(_))),
        "{out:?}"
    );
}

/// A multi-threaded client's reader can report a response before its writer reports the
/// request: the response is held and paired when the request arrives, not lost.
#[test]
fn http2_response_reported_before_its_request_is_paired() {
    use crate::http2::tests::{block, frame};
    use loona_hpack::Encoder;
    let d = det();
    let (mut client, mut server) = (Encoder::new(), Encoder::new());
    let mut x = Exchange::new();
    let mut out = Vec::new();
    let mut preface = crate::http2::PREFACE.to_vec();
    preface.extend(frame(0x4, 0, 0, &[]));
    send(&mut x, Side::Request, &preface, &mut out);
    let json = r#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}"#;
    let mut resp = frame(
        0x1,
        0x4,
        1,
        &block(
            &mut server,
            &[(":status", "200"), ("content-type", "application/json")],
        ),
    );
    resp.extend(frame(0x0, 0x1, 1, json.as_bytes()));
    send(&mut x, Side::Response, &resp, &mut out);
    assert!(calls(&out).is_empty(), "{out:?}");
    let mut req = frame(
        0x1,
        0x4,
        1,
        &block(
            &mut client,
            &[
                (":method", "POST"),
                (":authority", "127.0.0.1:8443"),
                (":path", "/v1/chat/completions"),
            ],
        ),
    );
    req.extend(frame(0x0, 0x1, 1, BODY.as_bytes()));
    send(&mut x, Side::Request, &req, &mut out);
    let got = calls(&out);
    assert_eq!(got.len(), 1, "{out:?}");
    let u = got[0].usage.expect("usage");
    assert_eq!(
        (u.input_tokens, u.output_tokens, u.estimated),
        (11, 7, false)
    );
    x.finish(End::ConnectionClosed, &d, &mut out);
    assert!(
        !out.iter().any(|o| matches!(o, Outcome::ParseError(_))),
        "{out:?}"
    );
}
