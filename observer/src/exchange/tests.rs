use std::io::Write as _;

use super::*;

fn det() -> ProviderDetector {
    ProviderDetector::new().with_host("127.0.0.1:8443", "openai".parse().unwrap(), "mock")
}

fn run(req: &[u8], resp: &[u8]) -> Vec<Outcome> {
    let d = det();
    let mut x = Exchange::new();
    let mut out = Vec::new();
    x.feed(Side::Request, req, true, &d, &mut out);
    for piece in resp.chunks(13) {
        x.feed(Side::Response, piece, false, &d, &mut out);
    }
    x.close(&d, &mut out);
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
