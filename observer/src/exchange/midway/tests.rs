use loona_hpack::Encoder;

use super::*;
use crate::exchange::{Exchange, ObservedCall};
use crate::http2::tests::{block, frame};

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const JSON: &str = r#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}"#;
const SSE: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\ndata: [DONE]\n\n";

fn det() -> ProviderDetector {
    ProviderDetector::new().with_host("127.0.0.1:8443", "openai".parse().unwrap(), "mock")
}

/// Both sides' HPACK encoders, primed by a call the observer did not see.
struct Peer {
    client: Encoder<'static>,
    server: Encoder<'static>,
}

impl Peer {
    fn new() -> Peer {
        let mut p = Peer {
            client: Encoder::new(),
            server: Encoder::new(),
        };
        let _ = p.request(1, CHAT);
        let _ = p.response(1, "application/json", JSON);
        p
    }

    fn request(&mut self, id: u32, body: &str) -> Vec<u8> {
        let head = block(
            &mut self.client,
            &[
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "127.0.0.1:8443"),
                (":path", "/v1/chat/completions"),
                ("content-type", "application/json"),
                ("x-tenant-id", "acme"),
            ],
        );
        let mut b = frame(0x1, 0x4, id, &head);
        b.extend(frame(0x0, 0, id, body.as_bytes()));
        b.extend(frame(0x0, 0x1, id, b""));
        b
    }

    fn response(&mut self, id: u32, content_type: &str, body: &str) -> Vec<u8> {
        let head = block(
            &mut self.server,
            &[(":status", "200"), ("content-type", content_type)],
        );
        let mut b = frame(0x1, 0x4, id, &head);
        b.extend(frame(0x0, 0x1, id, body.as_bytes()));
        b
    }
}

fn feed(x: &mut Exchange, side: Side, bytes: &[u8], out: &mut Vec<Outcome>) {
    x.feed(side, bytes, true, &det(), out);
}

fn calls(out: &[Outcome]) -> Vec<&ObservedCall> {
    out.iter()
        .filter_map(|o| match o {
            Outcome::Call(c) => Some(&**c),
            _ => None,
        })
        .collect()
}

/// The observer attaches between calls: the next calls' heads refer to the HPACK tables it
/// never saw, their bodies still bill exactly.
#[test]
fn calls_after_joining_are_billed_from_their_bodies() {
    let mut peer = Peer::new();
    let mut x = Exchange::new();
    let mut out = Vec::new();
    feed(&mut x, Side::Request, &peer.request(3, CHAT), &mut out);
    feed(
        &mut x,
        Side::Response,
        &peer.response(3, "application/json", JSON),
        &mut out,
    );
    let stream = CHAT.replace("\"messages\"", "\"stream\":true,\"messages\"");
    feed(&mut x, Side::Request, &peer.request(5, &stream), &mut out);
    feed(
        &mut x,
        Side::Response,
        &peer.response(5, "text/event-stream", SSE),
        &mut out,
    );
    x.finish(End::ConnectionClosed, &det(), &mut out);
    assert!(out.iter().any(|o| matches!(o, Outcome::Http2)), "{out:?}");
    let c = calls(&out);
    assert_eq!(c.len(), 2, "{out:?}");
    let u = c[0].usage.expect("usage");
    assert_eq!(
        (u.input_tokens, u.output_tokens, u.estimated),
        (11, 7, false)
    );
    assert_eq!(c[0].model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    assert_eq!(c[0].midway, Some(GUESSED_API));
    assert_eq!(c[0].endpoint.api, Api::ChatCompletions);
    assert_eq!(c[0].endpoint.provider, "openai");
    assert_eq!(
        c[0].tenant_header, None,
        "hidden head: its headers are unknown"
    );
    assert!(!c[0].stream);
    let u = c[1].usage.expect("usage");
    assert_eq!(
        (u.input_tokens, u.output_tokens, u.estimated),
        (5, 3, false)
    );
    assert!(c[1].stream);
    assert_eq!(c[1].midway, Some(GUESSED_API));
}

/// Whatever the cut of the SSL calls, the same calls.
#[test]
fn every_split_gives_the_same_calls() {
    let mut peer = Peer::new();
    let req = peer.request(3, CHAT);
    let resp = peer.response(3, "application/json", JSON);
    for n in [1, 2, 7, 9, 10, 64] {
        let mut x = Exchange::new();
        let mut out = Vec::new();
        for (i, piece) in req.chunks(n).enumerate() {
            x.feed(Side::Request, piece, i == 0, &det(), &mut out);
        }
        for piece in resp.chunks(n) {
            x.feed(Side::Response, piece, false, &det(), &mut out);
        }
        x.finish(End::ConnectionClosed, &det(), &mut out);
        let c = calls(&out);
        assert_eq!(c.len(), 1, "split {n}: {out:?}");
        assert_eq!(c[0].usage.expect("usage").output_tokens, 7);
    }
}

/// The first bytes seen are the end of a frame: the frames after it are found.
#[test]
fn joins_inside_a_frame() {
    let mut peer = Peer::new();
    let mut x = Exchange::new();
    let mut out = Vec::new();
    let mut req = frame(0x0, 0, 1, b"the end of stream 1's body");
    req.drain(..12);
    req.extend(peer.request(3, CHAT));
    feed(&mut x, Side::Request, &req, &mut out);
    feed(
        &mut x,
        Side::Response,
        &peer.response(3, "application/json", JSON),
        &mut out,
    );
    assert_eq!(calls(&out).len(), 1, "{out:?}");
}

/// A stream that started before the observer: its response alone carries model and usage.
/// One joined inside its response body is not billed (its usage may be half of it).
#[test]
fn response_alone_is_billed_only_when_seen_from_its_head() {
    let mut peer = Peer::new();
    let mut x = Exchange::new();
    let mut out = Vec::new();
    // Stream 3's request was written before the observer attached.
    let _ = peer.request(3, CHAT);
    let mut resp = peer.response(3, "application/json", JSON);
    // A WINDOW_UPDATE and a PING make the chain long enough on their own.
    resp.extend(frame(0x8, 0, 0, &[0, 0, 0x10, 0]));
    feed(&mut x, Side::Response, &resp, &mut out);
    assert!(
        calls(&out).is_empty(),
        "HTTP/2 from the next SSL call: {out:?}"
    );
    feed(
        &mut x,
        Side::Request,
        &frame(0x8, 0, 0, &[0, 0, 0x10, 0]),
        &mut out,
    );
    let c = calls(&out);
    assert_eq!(c.len(), 1, "{out:?}");
    assert_eq!(c[0].midway, Some(GUESSED_API_NO_REQUEST));
    assert_eq!(c[0].usage.expect("usage").input_tokens, 11);

    let mut x = Exchange::new();
    let mut out = Vec::new();
    let _ = peer.request(5, CHAT);
    let mut resp = frame(0x0, 0, 5, &JSON.as_bytes()[..40]);
    resp.extend(frame(0x0, 0x1, 5, &JSON.as_bytes()[40..]));
    resp.extend(frame(0x8, 0, 0, &[0, 0, 0x10, 0]));
    feed(&mut x, Side::Response, &resp, &mut out);
    x.finish(End::ConnectionClosed, &det(), &mut out);
    assert!(calls(&out).is_empty(), "{out:?}");
    assert!(
        out.iter().any(|o| matches!(
            o,
            Outcome::ParseError("http2 midway: response joined mid-body")
        )),
        "{out:?}"
    );
}

/// A head that decodes without the table (first use of each header, or literals) is read: the
/// call is classified by its host and path, and its tenant header is kept.
#[test]
fn a_head_that_decodes_alone_is_used() {
    let mut peer = Peer {
        client: Encoder::new(),
        server: Encoder::new(),
    };
    let mut x = Exchange::new();
    let mut out = Vec::new();
    feed(&mut x, Side::Request, &peer.request(1, CHAT), &mut out);
    feed(
        &mut x,
        Side::Response,
        &peer.response(1, "application/json", JSON),
        &mut out,
    );
    let c = calls(&out);
    assert_eq!(c.len(), 1, "{out:?}");
    assert_eq!(c[0].midway, Some(GUESSED_NOTHING));
    assert_eq!(c[0].endpoint.provider, "mock");
    assert_eq!(c[0].tenant_header.as_deref(), Some("acme"));
}

#[test]
fn anthropic_and_gemini_bodies_are_recognised() {
    let anthropic = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-haiku-4-5\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":4}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let (ep, sse) = infer(anthropic.as_bytes()).expect("anthropic");
    assert_eq!((ep.api, sse), (Api::AnthropicMessages, true));
    let json = r#"{"id":"m","type":"message","model":"claude-haiku-4-5","content":[],"usage":{"input_tokens":9,"output_tokens":4}}"#;
    assert_eq!(
        infer(json.as_bytes()).expect("anthropic").0.api,
        Api::AnthropicMessages
    );
    let gemini = r#"{"candidates":[{"content":{"parts":[{"text":"hi"}]}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2},"modelVersion":"gemini-2.0-flash"}"#;
    let (ep, _) = infer(gemini.as_bytes()).expect("gemini");
    assert_eq!(
        (ep.kind, ep.api),
        (ProviderKind::Gemini, Api::GeminiGenerateContent)
    );
    let array = format!("[{gemini}]");
    assert_eq!(
        infer(array.as_bytes()).expect("array").0.api,
        Api::GeminiStreamGenerateContent
    );
    let events = format!("data: {gemini}\r\n\r\n");
    let (ep, sse) = infer(events.as_bytes()).expect("gemini sse");
    assert!(sse && ep.sse_in_query);
    let responses = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"object\":\"response\"}}\n\n";
    assert_eq!(
        infer(responses.as_bytes()).expect("responses").0.api,
        Api::Responses
    );
    for other in [
        &b"{\"error\":{\"message\":\"no\"}}"[..],
        b"[1,2]",
        b"<html>",
        b"",
        b"data: [DONE]",
    ] {
        assert!(infer(other).is_none(), "{other:?}");
    }

    // End to end over frames: an Anthropic stream billed from its body.
    let mut peer = Peer::new();
    let mut x = Exchange::new();
    let mut out = Vec::new();
    feed(
        &mut x,
        Side::Request,
        &peer.request(
            3,
            r#"{"model":"claude-haiku-4-5","max_tokens":20,"messages":[]}"#,
        ),
        &mut out,
    );
    feed(
        &mut x,
        Side::Response,
        &peer.response(3, "text/event-stream", anthropic),
        &mut out,
    );
    let c = calls(&out);
    assert_eq!(c.len(), 1, "{out:?}");
    let u = c[0].usage.expect("usage");
    assert_eq!((u.input_tokens, u.output_tokens), (9, 4));
    assert_eq!(c[0].endpoint.provider, "anthropic");
}

/// Bytes that are not HTTP/2 frames never make a call, nor switch the connection to HTTP/2.
#[test]
fn garbage_never_makes_a_call() {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..200 {
        let mut x = Exchange::new();
        let mut out = Vec::new();
        for _ in 0..8 {
            let len = (next() % 4096) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let side = if next() % 2 == 0 {
                Side::Request
            } else {
                Side::Response
            };
            feed(&mut x, side, &bytes, &mut out);
        }
        x.finish(End::ConnectionClosed, &det(), &mut out);
        assert!(
            !out.iter()
                .any(|o| matches!(o, Outcome::Call(_) | Outcome::Http2)),
            "{out:?}"
        );
    }
}

/// An HTTP/1.1 connection joined mid-body still resynchronises as HTTP/1.1.
#[test]
fn http1_joined_midway_is_not_taken_for_http2() {
    let mut x = Exchange::new();
    let mut out = Vec::new();
    feed(&mut x, Side::Response, &JSON.as_bytes()[20..], &mut out);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nContent-Length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    );
    feed(&mut x, Side::Request, req.as_bytes(), &mut out);
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{JSON}",
        JSON.len()
    );
    feed(&mut x, Side::Response, resp.as_bytes(), &mut out);
    let c = calls(&out);
    assert_eq!(c.len(), 1, "{out:?}");
    assert_eq!(c[0].midway, None, "{out:?}");
    assert!(x.sniff.is_none());
}

/// A reader thread's probe can report the server's first frames before the writer's reports
/// the client preface: the connection is still a new HTTP/2 one, not one joined mid-way.
#[test]
fn server_frames_before_the_preface_are_not_a_midway_join() {
    let mut peer = Peer {
        client: Encoder::new(),
        server: Encoder::new(),
    };
    let mut x = Exchange::new();
    let mut out = Vec::new();
    let mut server = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    server.extend(frame(0x8, 0, 0, &[0, 0, 0x10, 0]));
    server.extend(frame(0x4, 0x1, 0, &[]));
    feed(&mut x, Side::Response, &server, &mut out);
    let mut req = crate::http2::PREFACE.to_vec();
    req.extend(frame(0x4, 0, 0, &[]));
    feed(&mut x, Side::Request, &req, &mut out);
    feed(&mut x, Side::Request, &peer.request(1, CHAT), &mut out);
    feed(
        &mut x,
        Side::Response,
        &peer.response(1, "application/json", JSON),
        &mut out,
    );
    let c = calls(&out);
    assert_eq!(c.len(), 1, "{out:?}");
    assert_eq!(c[0].midway, None, "{out:?}");
    assert_eq!(c[0].tenant_header.as_deref(), Some("acme"));
}
