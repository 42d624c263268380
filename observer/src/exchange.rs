//! Turns one connection's HTTP events into LLM calls: pairs requests with responses (HTTP/1.1 in
//! order, HTTP/2 by stream), classifies the provider from the Host header (`:authority`), decodes
//! bodies and extracts model and usage with the ledger.
//!
//! Pure: bytes in, [`Outcome`]s out. Bodies live only until the call is recorded.
//!
//! A call is recorded at the first of: the provider's end-of-stream event (clients stop reading
//! there, so the chunked terminator that follows may never be seen), the end of the response
//! body, or the end of the connection ([`Exchange::finish`]: SSL freed, process exit, idle
//! timeout, eviction). A response cut before its usage is an estimate flagged `estimated`: the
//! request's input estimate plus the delivered output. Each way is an [`End`].

use std::collections::{HashMap, VecDeque};

use ledger::provider::{Endpoint, ProviderDetector};
use ledger::request::{parse_request, request_model};
use ledger::usage::{ResponseMeta, StreamMeter, Usage, estimate_tokens_from_text, parse_response};

use crate::decode::BodyDecoder;
use crate::http1::{Connection, Head, HttpEvent, Side};
use crate::http2::{H2Connection, H2Event, PREFACE};

/// Largest request body kept for `request_model`.
pub const MAX_REQUEST_BODY: usize = 4 << 20;
/// Largest non-streamed response body kept for `parse_response`.
pub const MAX_RESPONSE_BODY: usize = 8 << 20;

/// How an exchange ended: the `end` label of `llmwarden_observer_exchanges_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The response body ended (Content-Length, chunked terminator, or close-delimited).
    BodyEnd,
    /// The provider's end-of-stream event (`[DONE]`, `message_stop`, `response.completed`).
    StreamEvent,
    /// The SSL object was freed with the exchange in progress.
    ConnectionClosed,
    /// The process exited with the exchange in progress.
    ProcessExit,
    /// The connection was idle for `idle_timeout_secs`.
    IdleTimeout,
    /// The connection was evicted for `max_connections` / `max_buffered_bytes`.
    Evicted,
    /// An HTTP/2 stream was reset (RST_STREAM) by either side.
    StreamReset,
}

impl End {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            End::BodyEnd => "body_end",
            End::StreamEvent => "stream_end_event",
            End::ConnectionClosed => "connection_closed",
            End::ProcessExit => "process_exit",
            End::IdleTimeout => "idle_timeout",
            End::Evicted => "evicted",
            End::StreamReset => "stream_reset",
        }
    }
}

/// What of the response the call was recorded from: the `response` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseSeen {
    /// The whole response, or its stream up to the end event.
    Complete,
    /// Part of it: the connection ended first.
    Cut,
    /// No response head: the request was sent and the connection ended.
    None,
}

impl ResponseSeen {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ResponseSeen::Complete => "complete",
            ResponseSeen::Cut => "cut",
            ResponseSeen::None => "none",
        }
    }
}

/// A provider call seen on the wire (metadata only).
#[derive(Debug, Clone)]
pub struct ObservedCall {
    /// Provider and API.
    pub endpoint: Endpoint,
    /// Model billed (response first, then request, then path).
    pub model: Option<String>,
    /// Usage; None when neither a usage record nor text to estimate from was seen.
    pub usage: Option<Usage>,
    /// Whether the response was an event stream.
    pub stream: bool,
    /// `X-Tenant-ID` of the request.
    pub tenant_header: Option<String>,
    /// `X-Feature-Name` of the request.
    pub feature_header: Option<String>,
    /// When the call was recorded.
    pub end: End,
    /// How much of the response was seen.
    pub response: ResponseSeen,
    /// Recorded on an HTTP/2 connection joined mid-way: what had to be guessed (see
    /// [`midway`]); `None` on connections seen from their start.
    pub midway: Option<&'static str>,
}

/// What a connection produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A completed provider call.
    Call(Box<ObservedCall>),
    /// The connection's first request went to a host that is not a provider: stop capturing it.
    NotLlm,
    /// The client sent the HTTP/2 preface: counted; the connection is parsed as HTTP/2 from
    /// here on.
    Http2,
    /// Something could not be parsed (reason for the metric label).
    ParseError(&'static str),
}

#[derive(Debug)]
struct PendingRequest {
    endpoint: Option<Endpoint>,
    tenant: Option<String>,
    feature: Option<String>,
    /// The body (up to [`MAX_REQUEST_BODY`]), kept until the call is recorded: only a call cut
    /// before its usage reads it again, for its input estimate.
    body: Vec<u8>,
    /// Bytes of the body seen (kept or not).
    body_len: usize,
    complete: bool,
    /// The model the request body names.
    model: Option<String>,
}

impl PendingRequest {
    fn new(endpoint: Option<Endpoint>, tenant: Option<String>, feature: Option<String>) -> Self {
        PendingRequest {
            endpoint,
            tenant,
            feature,
            body: Vec::new(),
            body_len: 0,
            complete: true,
            model: None,
        }
    }

    /// Body bytes of a metered request (kept up to [`MAX_REQUEST_BODY`]).
    fn body_bytes(&mut self, bytes: &[u8]) {
        if self.endpoint.is_none() {
            return;
        }
        self.body_len = self.body_len.saturating_add(bytes.len());
        if self.body.len() + bytes.len() > MAX_REQUEST_BODY {
            self.complete = false;
        } else {
            self.body.extend_from_slice(bytes);
        }
    }

    /// The request was sent whole: reads its model; keeps the body for a cut call's input
    /// estimate unless `kept` bytes of other requests already are (at most MAX_REQUEST_BODY).
    fn ended(&mut self, kept: usize) {
        if let Some(ep) = self.endpoint.as_ref()
            && self.complete
        {
            // Only the model: the observer bills the response's usage.
            self.model = request_model(ep, &self.body).ok().flatten();
        }
        if self.endpoint.is_none() || kept + self.body.len() > MAX_REQUEST_BODY {
            self.body = Vec::new();
        } else {
            self.body.shrink_to_fit();
        }
    }

    /// Input tokens estimated from the request (as the enforcer estimates them); a body that
    /// was not kept (pipelined past [`MAX_REQUEST_BODY`] in all) counts one token per 3 bytes,
    /// erring high; 0 when the body was not seen whole.
    fn input_estimate(&self, endpoint: &Endpoint) -> u64 {
        if !self.complete {
            return 0;
        }
        if self.body.len() == self.body_len && !self.body.is_empty() {
            return parse_request(endpoint, &self.body).map_or(0, |i| i.input_tokens_estimate);
        }
        u64::try_from(self.body_len.div_ceil(3)).unwrap_or(u64::MAX)
    }

    /// A request sent whole whose response was never seen: its input estimate, flagged.
    fn unanswered(self, end: End, out: &mut Vec<Outcome>) {
        let Some(endpoint) = self.endpoint.clone() else {
            return;
        };
        if !self.complete || endpoint.api.is_free() {
            return;
        }
        let usage = Usage {
            input_tokens: self.input_estimate(&endpoint),
            estimated: true,
            ..Usage::default()
        };
        out.push(Outcome::Call(Box::new(ObservedCall {
            model: self
                .model
                .clone()
                .or_else(|| endpoint.model_in_path.clone()),
            endpoint,
            usage: Some(usage),
            stream: false,
            tenant_header: self.tenant,
            feature_header: self.feature,
            end,
            response: ResponseSeen::None,
            midway: None,
        })));
    }
}

#[derive(Debug)]
struct PendingResponse {
    request: PendingRequest,
    status: u16,
    decoder: Option<BodyDecoder>,
    meter: Option<StreamMeter>,
    body: Vec<u8>,
    complete: bool,
    /// Already recorded at its stream's end event; what follows is only read past.
    recorded: bool,
}

impl PendingResponse {
    /// The response to `request` that `head` starts.
    fn new(request: PendingRequest, head: &Head) -> PendingResponse {
        let metered = request.endpoint.is_some() && (200..300).contains(&head.status);
        let sse = head
            .content_type
            .as_deref()
            .is_some_and(|c| c.to_ascii_lowercase().contains("text/event-stream"));
        let decoder = if metered {
            BodyDecoder::new(head.content_encoding.as_deref()).ok()
        } else {
            None
        };
        let meter = match (&request.endpoint, sse && metered) {
            (Some(ep), true) => Some(StreamMeter::new(ep)),
            _ => None,
        };
        PendingResponse {
            request,
            status: head.status,
            decoder,
            meter,
            body: Vec::new(),
            complete: metered,
            recorded: false,
        }
    }

    fn buffered(&self) -> usize {
        self.body.capacity() + self.request.body.capacity()
    }

    /// Body bytes (transfer-decoded, still content-encoded).
    fn body_bytes(&mut self, bytes: &[u8], out: &mut Vec<Outcome>) {
        let Some(decoder) = self.decoder.as_mut() else {
            return;
        };
        let plain = match decoder.feed(bytes) {
            Ok(p) => p,
            Err(_) => {
                self.decoder = None;
                self.complete = false;
                out.push(Outcome::ParseError("content-encoding"));
                return;
            }
        };
        if decoder.truncated() {
            // Decoded past MAX_DECODED: what is kept is not the whole body.
            self.complete = false;
        }
        if let Some(m) = self.meter.as_mut() {
            m.feed(&plain);
            if m.is_complete() {
                // The client may stop reading here (the official Python SDK returns at
                // `[DONE]` and closes): record now, read past the rest.
                if let Some(call) = take_call(self, End::StreamEvent, ResponseSeen::Complete) {
                    out.push(Outcome::Call(Box::new(call)));
                }
            }
        } else if self.body.len() + plain.len() <= MAX_RESPONSE_BODY {
            self.body.extend_from_slice(&plain);
        } else {
            self.complete = false;
        }
    }

    /// The body ended.
    fn ended(mut self, out: &mut Vec<Outcome>) {
        if self.recorded || !billed(&self) {
            return;
        }
        if self.meter.is_none() && !(self.complete && self.decoder.is_some()) {
            out.push(Outcome::ParseError("response body incomplete"));
            return;
        }
        match take_call(&mut self, End::BodyEnd, ResponseSeen::Complete) {
            Some(call) => out.push(Outcome::Call(Box::new(call))),
            None => out.push(Outcome::ParseError("response body")),
        }
    }

    /// The response was cut (`end` says how): recorded from what it delivered.
    fn cut(mut self, end: End, out: &mut Vec<Outcome>) {
        if !self.recorded
            && billed(&self)
            && let Some(call) = take_call(&mut self, end, ResponseSeen::Cut)
        {
            out.push(Outcome::Call(Box::new(call)));
        }
    }
}

/// One HTTP/2 stream: its request while it is being sent, then its response.
#[derive(Debug, Default)]
struct H2Stream {
    request: Option<PendingRequest>,
    request_ended: bool,
    response: Option<PendingResponse>,
    /// Response body bytes still to come by its `content-length`: a client that has them all
    /// may close without reading the frame that carries END_STREAM (curl does).
    response_left: Option<u64>,
}

/// An HTTP/2 connection's state: each stream is its own exchange.
#[derive(Debug, Default)]
struct H2 {
    conn: H2Connection,
    streams: HashMap<u32, H2Stream>,
    events: Vec<H2Event>,
    /// The events being handled, with held ones replayed in front (kept: no allocation per
    /// TLS event).
    queue: VecDeque<H2Event>,
    /// Streams ended before their last frame (by `content-length`, or reset), most recent last:
    /// frames that still come for them are read past.
    done: VecDeque<u32>,
    /// Set when the connection was joined mid-way: its streams are paired there instead.
    midway: Option<Box<midway::Streams>>,
    /// Response events of streams whose request is not seen yet: a multi-threaded client's
    /// reader can return (and its probe report) a response before the writer's probe reports
    /// the request. Replayed when the request arrives; bounded by [`MAX_EARLY_EVENTS`].
    early: Vec<H2Event>,
}

/// Most response events held for requests not seen yet.
const MAX_EARLY_EVENTS: usize = 64;
/// Most body bytes of those events.
const MAX_EARLY_BYTES: usize = 1 << 20;
/// Ended streams remembered (see `H2::done`).
const MAX_DONE: usize = 512;

fn ev_len(e: &H2Event) -> usize {
    match e {
        H2Event::Body(_, _, b) => b.len(),
        _ => 0,
    }
}

impl H2 {
    fn early_bytes(&self) -> usize {
        self.early.iter().map(ev_len).sum()
    }

    fn mark_done(&mut self, id: u32) {
        if self.done.len() >= MAX_DONE {
            self.done.pop_front();
        }
        self.done.push_back(id);
    }
}

/// Most HTTP/2 streams tracked at once per connection (a client's default concurrency limit
/// is 100); streams beyond it are counted and not metered.
pub const MAX_H2_STREAMS: usize = 256;
/// Most body bytes kept over all streams of one HTTP/2 connection; past it a stream's body is
/// not kept (counted; its call is then an estimate or a parse error, never silent).
pub const MAX_H2_BODIES: usize = 32 << 20;

impl H2 {
    /// Body bytes kept over all streams.
    fn bodies(&self) -> usize {
        self.streams
            .values()
            .map(|s| {
                s.request.as_ref().map_or(0, |r| r.body.len())
                    + s.response
                        .as_ref()
                        .map_or(0, |r| r.body.len() + r.request.body.len())
            })
            .sum()
    }
}

/// One connection's pairing and metering state.
#[derive(Debug)]
pub struct Exchange {
    conn: Connection,
    current_request: Option<PendingRequest>,
    awaiting: VecDeque<PendingRequest>,
    current_response: Option<PendingResponse>,
    first_request: bool,
    /// No head of either side parsed yet: a desync now means the capture joined an established
    /// connection mid-message (a process started before the observer), not a parse failure.
    fresh: bool,
    events: Vec<HttpEvent>,
    /// Set once the client sent the HTTP/2 preface: everything after goes there.
    h2: Option<Box<H2>>,
    /// While `fresh`: the same bytes searched for HTTP/2 frames, in case the connection is an
    /// HTTP/2 one joined after its preface (see [`midway`]).
    sniff: Option<Box<H2Connection>>,
    /// What the sniffer parsed since it found frames: handled when the connection switches
    /// to HTTP/2 at the next SSL call's start (an HTTP/1.1 head parsed first wins, whatever
    /// the chunking of the call in progress).
    sniffed: Vec<H2Event>,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange::new()
    }
}

impl Exchange {
    /// A fresh connection.
    pub fn new() -> Exchange {
        Exchange {
            conn: Connection::new(),
            current_request: None,
            awaiting: VecDeque::new(),
            current_response: None,
            first_request: true,
            fresh: true,
            events: Vec::new(),
            h2: None,
            sniff: None,
            sniffed: Vec::new(),
        }
    }

    /// Bytes held for this connection.
    pub fn buffered(&self) -> usize {
        let req = |r: &PendingRequest| r.body.capacity();
        let h2 = self.h2.as_ref().map_or(0, |h| {
            h.conn.buffered()
                + h.early_bytes()
                + h.streams
                    .values()
                    .map(|s| {
                        s.request.as_ref().map_or(0, req)
                            + s.response.as_ref().map_or(0, PendingResponse::buffered)
                    })
                    .sum::<usize>()
                + h.midway.as_ref().map_or(0, |m| m.buffered())
        });
        let h2 = h2
            + self.sniff.as_ref().map_or(0, |s| s.buffered())
            + self.sniffed.iter().map(ev_len).sum::<usize>();
        self.conn.buffered()
            + self.current_request.as_ref().map_or(0, req)
            + self.awaiting.iter().map(req).sum::<usize>()
            + self
                .current_response
                .as_ref()
                .map_or(0, PendingResponse::buffered)
            + h2
    }

    /// Feeds captured plaintext.
    pub fn feed(
        &mut self,
        side: Side,
        data: &[u8],
        call_start: bool,
        det: &ProviderDetector,
        out: &mut Vec<Outcome>,
    ) {
        // A call that starts with the client preface is a new HTTP/2 connection's start, whatever
        // frames came before it on the other side (a reader thread's probe can report the
        // server's SETTINGS before the writer's reports the preface): the HTTP/1.1 reassembler
        // takes it. Told by the first byte alone ('P', never a frame's first byte at the sizes
        // searched), so that it does not depend on how much of the call this event holds. An
        // empty call start decides nothing.
        let preface = side == Side::Request && data.first() == Some(&PREFACE[0]);
        if call_start && !data.is_empty() && !preface {
            self.switch_to_midway(det, out);
        }
        if let Some(h2) = self.h2.as_mut() {
            let mut events = std::mem::take(&mut h2.events);
            h2.conn.feed(side, data, &mut events);
            self.handle_h2(&mut events, det, out);
            return;
        }
        let mut events = std::mem::take(&mut self.events);
        self.conn.feed(side, data, call_start, &mut events);
        self.handle(&mut events, det, out);
        self.events = events;
        self.sniff_midway(side, data);
    }

    /// Searches a connection that has shown no HTTP/1.1 head nor HTTP/2 preface for HTTP/2
    /// frames; once found on either side, the connection becomes HTTP/2 joined mid-way at the
    /// next SSL call's start (see [`Exchange::switch_to_midway`]).
    fn sniff_midway(&mut self, side: Side, data: &[u8]) {
        if self.h2.is_some() || !self.fresh {
            self.sniff = None;
            self.sniffed = Vec::new();
            return;
        }
        let sniff = self
            .sniff
            .get_or_insert_with(|| Box::new(H2Connection::midway()));
        sniff.feed(side, data, &mut self.sniffed);
    }

    /// The connection is HTTP/2 joined mid-way if the sniffer found frames and no HTTP/1.1 head
    /// came first; the switch waits for a call boundary so that it does not depend on how the
    /// call in progress was cut into events.
    fn switch_to_midway(&mut self, det: &ProviderDetector, out: &mut Vec<Outcome>) {
        if !self.fresh || self.h2.is_some() || !self.sniff.as_ref().is_some_and(|s| s.is_synced()) {
            return;
        }
        let conn = self.sniff.take().expect("checked above");
        let mut events = std::mem::take(&mut self.sniffed);
        out.push(Outcome::Http2);
        self.conn = Connection::new();
        self.current_request = None;
        self.current_response = None;
        self.awaiting.clear();
        self.h2 = Some(Box::new(H2 {
            conn: *conn,
            midway: Some(Box::default()),
            ..H2::default()
        }));
        self.handle_h2(&mut events, det, out);
    }

    /// Reports bytes that were not captured (truncation or a dropped event).
    pub fn gap(&mut self, side: Side, n: u64, det: &ProviderDetector, out: &mut Vec<Outcome>) {
        // A gap is a call boundary too.
        self.switch_to_midway(det, out);
        if let Some(sniff) = self.sniff.as_mut() {
            sniff.lost(side, &mut self.sniffed);
        }
        if let Some(h2) = self.h2.as_mut() {
            let mut events = std::mem::take(&mut h2.events);
            h2.conn.gap(&mut events);
            self.handle_h2(&mut events, det, out);
            return;
        }
        let mut events = std::mem::take(&mut self.events);
        self.conn.gap(side, n, &mut events);
        self.handle(&mut events, det, out);
        self.events = events;
    }

    fn handle(
        &mut self,
        events: &mut Vec<HttpEvent>,
        det: &ProviderDetector,
        out: &mut Vec<Outcome>,
    ) {
        for ev in events.drain(..) {
            if matches!(ev, HttpEvent::Head(..)) {
                self.fresh = false;
            }
            match ev {
                HttpEvent::Head(Side::Request, head) => self.request_head(head, det, out),
                HttpEvent::Body(Side::Request, bytes) => {
                    if let Some(r) = self.current_request.as_mut() {
                        r.body_bytes(&bytes);
                    }
                }
                HttpEvent::BodyGap(Side::Request, _) => {
                    if let Some(r) = self.current_request.as_mut() {
                        r.complete = false;
                    }
                }
                HttpEvent::End(Side::Request) => {
                    if let Some(mut r) = self.current_request.take() {
                        let kept = self.awaiting.iter().map(|a| a.body.len()).sum();
                        r.ended(kept);
                        self.awaiting.push_back(r);
                    }
                }
                HttpEvent::Head(Side::Response, head) => self.response_head(&head),
                HttpEvent::Body(Side::Response, bytes) => {
                    if let Some(r) = self.current_response.as_mut() {
                        r.body_bytes(&bytes, out);
                    }
                }
                HttpEvent::BodyGap(Side::Response, _) => {
                    if let Some(r) = self.current_response.as_mut() {
                        r.complete = false;
                    }
                }
                HttpEvent::End(Side::Response) => {
                    if let Some(r) = self.current_response.take() {
                        r.ended(out);
                    }
                }
                HttpEvent::Http2(bytes) => {
                    out.push(Outcome::Http2);
                    let mut h2 = Box::<H2>::default();
                    let mut events = Vec::new();
                    h2.conn.feed(Side::Request, &bytes, &mut events);
                    self.h2 = Some(h2);
                    self.handle_h2(&mut events, det, out);
                }
                HttpEvent::Desync(_, why) => {
                    self.current_request = None;
                    self.current_response = None;
                    self.awaiting.clear();
                    // Resynchronises on the next request that starts an SSL call.
                    out.push(Outcome::ParseError(if self.fresh {
                        "joined mid-connection"
                    } else {
                        why
                    }));
                }
            }
        }
    }

    /// HTTP/2 events: each stream pairs its own request and response.
    fn handle_h2(
        &mut self,
        events: &mut Vec<H2Event>,
        det: &ProviderDetector,
        out: &mut Vec<Outcome>,
    ) {
        let Some(h2) = self.h2.as_mut() else {
            return;
        };
        if let Some(m) = h2.midway.as_mut() {
            m.handle(events, det, out);
            return;
        }
        h2.handle(events, &mut self.first_request, det, out);
    }

    fn request_head(&mut self, head: Head, det: &ProviderDetector, out: &mut Vec<Outcome>) {
        let host = head.host.clone().unwrap_or_default();
        let endpoint = det.detect(&host, &head.method, &head.path);
        if self.first_request && !det.is_provider_host(&host) {
            out.push(Outcome::NotLlm);
        }
        self.first_request = false;
        if let Some(unfinished) = self.current_request.take() {
            self.awaiting.push_back(unfinished);
        }
        self.current_request = Some(PendingRequest::new(endpoint, head.tenant, head.feature));
    }

    fn response_head(&mut self, head: &Head) {
        if (100..200).contains(&head.status) && head.status != 101 {
            return; // interim response: the real one follows
        }
        let request = match self
            .awaiting
            .pop_front()
            .or_else(|| self.current_request.take())
        {
            Some(r) => r,
            None => PendingRequest {
                complete: false,
                ..PendingRequest::new(None, None, None)
            },
        };
        self.current_response = Some(PendingResponse::new(request, head));
    }

    /// The connection ended (`end` says how): a close-delimited response ends here; a response
    /// in progress is recorded from what it delivered (an estimate unless its usage record was
    /// seen); a request sent whole without a response seen is recorded at its input estimate.
    /// Nothing the provider may have billed is dropped without a record.
    pub fn finish(&mut self, end: End, det: &ProviderDetector, out: &mut Vec<Outcome>) {
        self.switch_to_midway(det, out);
        self.sniff = None;
        self.sniffed = Vec::new();
        if let Some(mut h2) = self.h2.take() {
            if let Some(m) = h2.midway.as_mut() {
                m.finish(end, det, out);
                return;
            }
            if !h2.early.is_empty() {
                out.push(Outcome::ParseError("http2: response before its request"));
            }
            let mut ids: Vec<u32> = h2.streams.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                if let Some(s) = h2.streams.remove(&id) {
                    finish_stream(s, end, out);
                }
            }
            return;
        }
        let mut events = std::mem::take(&mut self.events);
        self.conn.close(&mut events);
        self.handle(&mut events, det, out);
        self.events = events;
        if let Some(r) = self.current_response.take() {
            r.cut(end, out);
        }
        for r in self.awaiting.drain(..) {
            r.unanswered(end, out);
        }
        self.current_request = None;
    }
}

/// The stream of a held response event.
fn early_stream(e: &H2Event) -> u32 {
    match e {
        H2Event::Head(_, id, _)
        | H2Event::HiddenHead(_, id)
        | H2Event::Body(_, id, _)
        | H2Event::End(_, id)
        | H2Event::Reset(id) => *id,
        H2Event::Broken(_) => 0,
    }
}

/// An HTTP/2 stream that ended without its response's end: cut, or never answered.
fn finish_stream(s: H2Stream, end: End, out: &mut Vec<Outcome>) {
    if let Some(r) = s.response {
        r.cut(end, out);
    } else if let Some(r) = s.request
        && s.request_ended
    {
        r.unanswered(end, out);
    }
}

/// Whether the response is one the provider bills: a 2xx of a metered, non-free API.
fn billed(r: &PendingResponse) -> bool {
    r.request
        .endpoint
        .as_ref()
        .is_some_and(|ep| (200..300).contains(&r.status) && !ep.api.is_free())
}

/// The call a billed response makes, from what was seen of it; marks it recorded and frees its
/// buffers. A complete non-stream body that does not parse gives `None`. A cut one is an
/// estimate from its delivered bytes; a stream's estimate comes from its meter. An estimate
/// without input gets the request's input estimate.
fn take_call(r: &mut PendingResponse, end: End, mut seen: ResponseSeen) -> Option<ObservedCall> {
    let endpoint = r.request.endpoint.clone()?;
    r.recorded = true;
    r.decoder = None;
    let stream = r.meter.is_some();
    let body = std::mem::take(&mut r.body);
    let meta = if let Some(meter) = r.meter.take() {
        meter.finish()
    } else if seen == ResponseSeen::Complete {
        parse_response(&endpoint, &body).ok()?
    } else if let Some(meta) = parse_response(&endpoint, &body)
        .ok()
        .filter(|m| m.usage.is_some())
    {
        // The end of the body was not seen, but all of it was: the client had it all and went.
        seen = ResponseSeen::Complete;
        meta
    } else {
        // A non-stream body cut short: its text so far, JSON and all, errs high.
        let model = r
            .request
            .model
            .as_deref()
            .or(endpoint.model_in_path.as_deref());
        ResponseMeta {
            model: None,
            usage: Some(Usage {
                output_tokens: estimate_tokens_from_text(model, &String::from_utf8_lossy(&body)),
                estimated: true,
                ..Usage::default()
            }),
        }
    };
    let mut usage = meta.usage;
    if let Some(u) = usage.as_mut()
        && u.estimated
        && u.prompt_tokens() == 0
    {
        u.input_tokens = r.request.input_estimate(&endpoint);
    }
    r.request.body = Vec::new();
    let model = meta
        .model
        .or_else(|| r.request.model.clone())
        .or_else(|| endpoint.model_in_path.clone());
    Some(ObservedCall {
        endpoint,
        model,
        usage,
        stream,
        tenant_header: r.request.tenant.clone(),
        feature_header: r.request.feature.clone(),
        end,
        response: seen,
        midway: None,
    })
}

pub mod midway;
mod streams;

#[cfg(test)]
mod tests;
