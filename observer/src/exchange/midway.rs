//! HTTP/2 connections joined mid-way: the observer attached after the client preface, so the
//! HPACK tables are unknown and most heads are [`H2Event::HiddenHead`]s. What can still be
//! billed is: the request and response bodies of each stream, paired by stream id.
//!
//! Each stream is kept whole until its response ends, then recorded like any other: the API
//! and provider come from the request head when it decoded on its own (static table and
//! literals only), else from the response body's shape ([`infer`]); the provider is then the
//! API family's name ("openai", "anthropic", "gemini"): an OpenAI-compatible server is told
//! from OpenAI by its host only. A hidden response head is taken as a 2xx (an error body
//! carries no usage, so it bills nothing) and its content encoding is read from the body's
//! magic bytes (gzip, zstd; brotli has none and is not read). Headers of a hidden head
//! (`X-Tenant-ID`, `X-Feature-Name`) are unknown: attribution falls back to the process rules.
//!
//! A call whose request was not seen from its start (the stream began before the observer)
//! is billed from its response alone only when that carries both the model and the provider's
//! usage; a response not seen from its head is never billed (its usage may be half of it).
//! Every stream dropped is counted under a named reason.

use std::collections::{HashMap, VecDeque};

use ledger::provider::{Api, Endpoint, ProviderDetector, ProviderKind};
use serde_json::Value;

use super::{
    End, MAX_H2_BODIES, MAX_H2_STREAMS, MAX_REQUEST_BODY, MAX_RESPONSE_BODY, Outcome,
    PendingRequest, PendingResponse,
};
use crate::decode::BodyDecoder;
use crate::http1::{Head, Side};
use crate::http2::H2Event;

/// What was guessed to record a call: the `guessed` label of
/// `llmwarden_observer_midway_calls_total`.
pub const GUESSED_NOTHING: &str = "nothing";
/// The API, provider and response status came from the bodies (the heads were hidden).
pub const GUESSED_API: &str = "api";
/// As [`GUESSED_API`], and the request was not seen: billed from the response alone.
pub const GUESSED_API_NO_REQUEST: &str = "api_no_request";

/// Ended streams remembered, so that late frames do not open them again.
const MAX_DONE: usize = 512;

/// One side of a stream.
#[derive(Debug, Default)]
struct Half {
    /// `Some(None)`: a hidden head; `None`: no head seen (joined inside this message).
    head: Option<Option<Head>>,
    body: Vec<u8>,
    /// The body went over a bound and was dropped.
    over: bool,
    ended: bool,
}

impl Half {
    /// Seen from its head and whole.
    fn whole(&self) -> bool {
        self.head.is_some() && !self.over
    }
}

#[derive(Debug, Default)]
struct Stream {
    req: Half,
    resp: Half,
}

/// The streams of one connection joined mid-way.
#[derive(Debug, Default)]
pub(super) struct Streams {
    streams: HashMap<u32, Stream>,
    done: VecDeque<u32>,
}

impl Streams {
    /// Body bytes held.
    pub(super) fn buffered(&self) -> usize {
        self.streams
            .values()
            .map(|s| s.req.body.capacity() + s.resp.body.capacity())
            .sum()
    }

    fn bodies(&self) -> usize {
        self.streams
            .values()
            .map(|s| s.req.body.len() + s.resp.body.len())
            .sum()
    }

    fn mark_done(&mut self, id: u32) {
        if self.done.len() >= MAX_DONE {
            self.done.pop_front();
        }
        self.done.push_back(id);
    }

    /// The stream `id`, opened if new (`None`: ended already, or over [`MAX_H2_STREAMS`]).
    fn stream(&mut self, id: u32, out: &mut Vec<Outcome>) -> Option<&mut Stream> {
        if self.done.contains(&id) {
            return None;
        }
        if !self.streams.contains_key(&id) && self.streams.len() >= MAX_H2_STREAMS {
            self.mark_done(id);
            out.push(Outcome::ParseError("http2: too many concurrent streams"));
            return None;
        }
        Some(self.streams.entry(id).or_default())
    }

    /// Handles the reassembler's events.
    pub(super) fn handle(
        &mut self,
        events: &mut Vec<H2Event>,
        det: &ProviderDetector,
        out: &mut Vec<Outcome>,
    ) {
        for ev in events.drain(..) {
            match ev {
                H2Event::Head(side, id, head) => self.head(side, id, Some(head), out),
                H2Event::HiddenHead(side, id) => self.head(side, id, None, out),
                H2Event::Body(side, id, bytes) => {
                    let over = self.bodies() + bytes.len() > MAX_H2_BODIES;
                    let Some(s) = self.stream(id, out) else {
                        continue;
                    };
                    let (half, max) = match side {
                        Side::Request => (&mut s.req, MAX_REQUEST_BODY),
                        Side::Response => (&mut s.resp, MAX_RESPONSE_BODY),
                    };
                    if half.over {
                        continue;
                    }
                    if over || half.body.len() + bytes.len() > max {
                        half.over = true;
                        half.body = Vec::new();
                    } else {
                        half.body.extend_from_slice(&bytes);
                    }
                }
                H2Event::End(Side::Request, id) => {
                    if let Some(s) = self.stream(id, out) {
                        s.req.ended = true;
                    }
                }
                H2Event::End(Side::Response, id) => {
                    if let Some(mut s) = self.streams.remove(&id) {
                        self.mark_done(id);
                        s.resp.ended = true;
                        record(s, End::BodyEnd, det, out);
                    }
                }
                H2Event::Reset(id) => {
                    if let Some(s) = self.streams.remove(&id) {
                        self.mark_done(id);
                        record(s, End::StreamReset, det, out);
                    }
                }
                H2Event::Broken(why) => out.push(Outcome::ParseError(match why {
                    "bytes lost" => "http2: bytes lost",
                    _ => "http2: framing",
                })),
            }
        }
    }

    fn head(&mut self, side: Side, id: u32, head: Option<Head>, out: &mut Vec<Outcome>) {
        let Some(s) = self.stream(id, out) else {
            return;
        };
        let half = match side {
            Side::Request => &mut s.req,
            Side::Response => &mut s.resp,
        };
        if half.head.is_some() || !half.body.is_empty() || half.over {
            return; // trailers, or a head after body bytes (not this message's start)
        }
        if side == Side::Response
            && head
                .as_ref()
                .is_some_and(|h| (100..200).contains(&h.status))
        {
            return; // interim response
        }
        half.head = Some(head);
    }

    /// The connection ended (`end` says how): the streams in progress are recorded from what
    /// they delivered.
    pub(super) fn finish(&mut self, end: End, det: &ProviderDetector, out: &mut Vec<Outcome>) {
        let mut ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(s) = self.streams.remove(&id) {
                record(s, end, det, out);
            }
        }
    }
}

/// Records a stream whose response ended (`resp.ended`) or was cut (`end` says how).
fn record(s: Stream, end: End, det: &ProviderDetector, out: &mut Vec<Outcome>) {
    if !response_seen(&s, out) {
        return;
    }
    let resp_head = s.resp.head.clone().flatten();
    if resp_head
        .as_ref()
        .is_some_and(|h| !(200..300).contains(&h.status))
    {
        return; // not billed by the provider
    }
    let Some((plain, truncated)) = decode(&s.resp.body, resp_head.as_ref(), out) else {
        return;
    };
    let shape = infer(&plain);
    let req_head = s.req.head.clone().flatten();
    let Some((endpoint, mut guessed)) = endpoint(req_head.as_ref(), shape.as_ref(), det, out)
    else {
        return;
    };
    if endpoint.api.is_free() {
        return;
    }
    let request_seen = s.req.whole() && s.req.ended;
    if !request_seen {
        guessed = GUESSED_API_NO_REQUEST;
    }
    let sse = match resp_head.as_ref().and_then(|h| h.content_type.as_deref()) {
        Some(ct) => ct.to_ascii_lowercase().contains("text/event-stream"),
        None => shape.as_ref().is_some_and(|(_, sse)| *sse),
    };
    let request = rebuilt_request(&s.req, endpoint, req_head.as_ref(), request_seen);
    let mut response = PendingResponse::new(request, &rebuilt_head(resp_head.as_ref(), sse));
    let mut recorded = Vec::new();
    response.body_bytes(&plain, &mut recorded);
    if truncated {
        response.complete = false;
    }
    if s.resp.ended {
        response.ended(&mut recorded);
    } else {
        response.cut(end, &mut recorded);
    }
    out.extend(
        recorded
            .into_iter()
            .map(|o| as_midway(o, request_seen, guessed)),
    );
}

/// Whether the response was seen from its head and kept whole; the reason it cannot be billed
/// goes to `out` when it was not.
fn response_seen(s: &Stream, out: &mut Vec<Outcome>) -> bool {
    if s.resp.head.is_none() {
        if s.resp.body.is_empty() && !s.resp.over {
            if s.req.head.is_some() && s.req.ended {
                out.push(Outcome::ParseError(
                    "http2 midway: request without a response",
                ));
            }
        } else {
            out.push(Outcome::ParseError(
                "http2 midway: response joined mid-body",
            ));
        }
        return false;
    }
    if s.resp.over {
        out.push(Outcome::ParseError("http2: connection body cap"));
        return false;
    }
    true
}

/// The response body decoded by its head's content encoding (by its magic bytes when the head
/// was hidden), and whether the decoder cut it short.
fn decode(body: &[u8], head: Option<&Head>, out: &mut Vec<Outcome>) -> Option<(Vec<u8>, bool)> {
    let encoding = match head {
        Some(h) => h.content_encoding.clone(),
        None => sniff_encoding(body).map(str::to_owned),
    };
    let Ok(mut decoder) = BodyDecoder::new(encoding.as_deref()) else {
        out.push(Outcome::ParseError("content-encoding"));
        return None;
    };
    let Ok(plain) = decoder.feed(body) else {
        out.push(Outcome::ParseError("content-encoding"));
        return None;
    };
    Some((plain, decoder.truncated()))
}

/// The API called and what of it was guessed: from the request head when it decoded, else
/// from the response body's `shape`. `None` when the call is not metered (or, with the reason
/// in `out`, cannot be told).
fn endpoint(
    req_head: Option<&Head>,
    shape: Option<&(Endpoint, bool)>,
    det: &ProviderDetector,
    out: &mut Vec<Outcome>,
) -> Option<(Endpoint, &'static str)> {
    match req_head {
        Some(h) => det
            .detect(h.host.as_deref().unwrap_or_default(), &h.method, &h.path)
            .map(|ep| (ep, GUESSED_NOTHING)), // None: not a metered API
        None => match shape {
            Some((ep, _)) => Some((ep.clone(), GUESSED_API)),
            None => {
                out.push(Outcome::ParseError("http2 midway: unknown body shape"));
                None
            }
        },
    }
}

/// The stream's request as the HTTP/2 path would have kept it; its body only when it was
/// seen whole.
fn rebuilt_request(
    req: &Half,
    endpoint: Endpoint,
    head: Option<&Head>,
    request_seen: bool,
) -> PendingRequest {
    let mut request = PendingRequest::new(
        Some(endpoint),
        head.and_then(|h| h.tenant.clone()),
        head.and_then(|h| h.feature.clone()),
    );
    if request_seen {
        request.body_bytes(&req.body);
        request.ended(0);
    } else {
        request.complete = false;
    }
    request
}

/// The response head to meter with: the real status (200 for a hidden head) and the body's
/// kind (SSE or JSON).
fn rebuilt_head(head: Option<&Head>, sse: bool) -> Head {
    Head {
        status: head.map_or(200, |h| h.status),
        content_type: Some(
            if sse {
                "text/event-stream"
            } else {
                "application/json"
            }
            .to_owned(),
        ),
        ..Head::default()
    }
}

/// Marks a call with what was guessed; a call billed from its response alone must carry the
/// model and the provider's usage, or it is a parse error.
fn as_midway(o: Outcome, request_seen: bool, guessed: &'static str) -> Outcome {
    match o {
        Outcome::Call(mut call) => {
            let exact = call.model.is_some() && call.usage.is_some_and(|u| !u.estimated);
            if !request_seen && !exact {
                Outcome::ParseError("http2 midway: response without model and usage")
            } else {
                call.midway = Some(guessed);
                Outcome::Call(call)
            }
        }
        other => other,
    }
}

/// The content encoding a body's first bytes announce.
fn sniff_encoding(body: &[u8]) -> Option<&'static str> {
    if body.starts_with(&[0x1f, 0x8b]) {
        Some("gzip")
    } else if body.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd")
    } else {
        None
    }
}

/// The API a response body's shape belongs to, and whether it is an event stream: OpenAI
/// `object`s (`chat.completion[.chunk]`, `text_completion`, `response`, embedding lists) and
/// Responses events, Anthropic `message` / `message_start`, Gemini `candidates` /
/// `usageMetadata` (one object, a streamed JSON array, or events). Anything else is `None`.
pub fn infer(body: &[u8]) -> Option<(Endpoint, bool)> {
    let text = body.trim_ascii_start();
    let first_event = |text: &[u8]| -> Option<Value> {
        text.split(|&b| b == b'\n')
            .filter_map(|l| l.strip_prefix(b"data:"))
            .map(<[u8]>::trim_ascii)
            .find(|d| d.first() == Some(&b'{'))
            .and_then(|d| serde_json::from_slice(d).ok())
    };
    let (v, sse, array) = match text.first()? {
        b'{' => (serde_json::from_slice::<Value>(text).ok()?, false, false),
        b'[' => {
            let v = serde_json::from_slice::<Value>(text).ok()?;
            (v.as_array()?.first()?.clone(), false, true)
        }
        _ if text.starts_with(b"data:") || text.starts_with(b"event:") => {
            (first_event(text)?, true, false)
        }
        _ => return None,
    };
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    let (kind, api) = match (field("object"), field("type")) {
        (Some("chat.completion" | "chat.completion.chunk"), _) => {
            (ProviderKind::OpenAi, Api::ChatCompletions)
        }
        (Some("text_completion"), _) => (ProviderKind::OpenAi, Api::Completions),
        (Some("response"), _) => (ProviderKind::OpenAi, Api::Responses),
        (Some("list"), _)
            if v.get("data")
                .and_then(|d| d.get(0))
                .and_then(|e| e.get("object"))
                .and_then(Value::as_str)
                == Some("embedding") =>
        {
            (ProviderKind::OpenAi, Api::Embeddings)
        }
        (None, Some(t)) if sse && t.starts_with("response.") && v.get("response").is_some() => {
            (ProviderKind::OpenAi, Api::Responses)
        }
        (None, Some("message")) if !sse => (ProviderKind::Anthropic, Api::AnthropicMessages),
        (None, Some("message_start")) if sse => (ProviderKind::Anthropic, Api::AnthropicMessages),
        (None, None) if v.get("candidates").is_some() || v.get("usageMetadata").is_some() => {
            let api = if sse || array {
                Api::GeminiStreamGenerateContent
            } else {
                Api::GeminiGenerateContent
            };
            (ProviderKind::Gemini, api)
        }
        _ => return None,
    };
    if array && kind != ProviderKind::Gemini {
        return None;
    }
    let endpoint = Endpoint {
        kind,
        api,
        provider: kind.as_str().to_owned(),
        model_in_path: None,
        stream_in_path: api == Api::GeminiStreamGenerateContent,
        sse_in_query: api == Api::GeminiStreamGenerateContent && sse,
    };
    Some((endpoint, sse))
}

#[cfg(test)]
mod tests;
