//! Turns one connection's HTTP events into LLM calls: pairs requests with responses, classifies
//! the provider from the Host header, decodes bodies and extracts model and usage with the ledger.
//!
//! Pure: bytes in, [`Outcome`]s out. Bodies live only until the call is recorded.
//!
//! A call is recorded at the first of: the provider's end-of-stream event (clients stop reading
//! there, so the chunked terminator that follows may never be seen), the end of the response
//! body, or the end of the connection ([`Exchange::finish`]: SSL freed, process exit, idle
//! timeout, eviction). A response cut before its usage is an estimate flagged `estimated`: the
//! request's input estimate plus the delivered output. Each way is an [`End`].

use std::collections::VecDeque;

use ledger::provider::{Endpoint, ProviderDetector};
use ledger::request::{parse_request, request_model};
use ledger::usage::{ResponseMeta, StreamMeter, Usage, estimate_tokens_from_text, parse_response};

use crate::decode::BodyDecoder;
use crate::http1::{Connection, Head, HttpEvent, Side};

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
}

/// What a connection produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A completed provider call.
    Call(Box<ObservedCall>),
    /// The connection's first request went to a host that is not a provider: stop capturing it.
    NotLlm,
    /// HTTP/2: counted, not parsed.
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
        }
    }

    /// Bytes held for this connection.
    pub fn buffered(&self) -> usize {
        let req = |r: &PendingRequest| r.body.capacity();
        self.conn.buffered()
            + self.current_request.as_ref().map_or(0, req)
            + self.awaiting.iter().map(req).sum::<usize>()
            + self
                .current_response
                .as_ref()
                .map_or(0, |r| r.body.capacity() + req(&r.request))
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
        let mut events = std::mem::take(&mut self.events);
        self.conn.feed(side, data, call_start, &mut events);
        self.handle(&mut events, det, out);
        self.events = events;
    }

    /// Reports bytes that were not captured (truncation or a dropped event).
    pub fn gap(&mut self, side: Side, n: u64, det: &ProviderDetector, out: &mut Vec<Outcome>) {
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
                    if let Some(r) = self.current_request.as_mut()
                        && r.endpoint.is_some()
                    {
                        r.body_len = r.body_len.saturating_add(bytes.len());
                        if r.body.len() + bytes.len() > MAX_REQUEST_BODY {
                            r.complete = false;
                        } else {
                            r.body.extend_from_slice(&bytes);
                        }
                    }
                }
                HttpEvent::BodyGap(Side::Request, _) => {
                    if let Some(r) = self.current_request.as_mut() {
                        r.complete = false;
                    }
                }
                HttpEvent::End(Side::Request) => {
                    if let Some(mut r) = self.current_request.take() {
                        if let Some(ep) = r.endpoint.as_ref()
                            && r.complete
                        {
                            // Only the model: the observer bills the response's usage, so the
                            // prompt is never tokenised on the reader thread.
                            r.model = request_model(ep, &r.body).ok().flatten();
                        }
                        // Kept for a cut call's input estimate, at most MAX_REQUEST_BODY over
                        // the requests awaiting their responses.
                        let kept: usize = self.awaiting.iter().map(|a| a.body.len()).sum();
                        if r.endpoint.is_none() || kept + r.body.len() > MAX_REQUEST_BODY {
                            r.body = Vec::new();
                        } else {
                            r.body.shrink_to_fit();
                        }
                        self.awaiting.push_back(r);
                    }
                }
                HttpEvent::Head(Side::Response, head) => self.response_head(&head),
                HttpEvent::Body(Side::Response, bytes) => self.response_body(&bytes, out),
                HttpEvent::BodyGap(Side::Response, _) => {
                    if let Some(r) = self.current_response.as_mut() {
                        r.complete = false;
                    }
                }
                HttpEvent::End(Side::Response) => self.response_end(out),
                HttpEvent::Http2 => out.push(Outcome::Http2),
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
        self.current_response = Some(PendingResponse {
            request,
            status: head.status,
            decoder,
            meter,
            body: Vec::new(),
            complete: metered,
            recorded: false,
        });
    }

    fn response_body(&mut self, bytes: &[u8], out: &mut Vec<Outcome>) {
        let Some(r) = self.current_response.as_mut() else {
            return;
        };
        let Some(decoder) = r.decoder.as_mut() else {
            return;
        };
        let plain = match decoder.feed(bytes) {
            Ok(p) => p,
            Err(_) => {
                r.decoder = None;
                r.complete = false;
                out.push(Outcome::ParseError("content-encoding"));
                return;
            }
        };
        if decoder.truncated() {
            // Decoded past MAX_DECODED: what is kept is not the whole body.
            r.complete = false;
        }
        if let Some(m) = r.meter.as_mut() {
            m.feed(&plain);
            if m.is_complete() {
                // The client may stop reading here (the official Python SDK returns at
                // `[DONE]` and closes): record now, read past the rest.
                if let Some(call) = take_call(r, End::StreamEvent, ResponseSeen::Complete) {
                    out.push(Outcome::Call(Box::new(call)));
                }
            }
        } else if r.body.len() + plain.len() <= MAX_RESPONSE_BODY {
            r.body.extend_from_slice(&plain);
        } else {
            r.complete = false;
        }
    }

    fn response_end(&mut self, out: &mut Vec<Outcome>) {
        let Some(mut r) = self.current_response.take() else {
            return;
        };
        if r.recorded || !billed(&r) {
            return;
        }
        if r.meter.is_none() && !(r.complete && r.decoder.is_some()) {
            out.push(Outcome::ParseError("response body incomplete"));
            return;
        }
        match take_call(&mut r, End::BodyEnd, ResponseSeen::Complete) {
            Some(call) => out.push(Outcome::Call(Box::new(call))),
            None => out.push(Outcome::ParseError("response body")),
        }
    }

    /// The connection ended (`end` says how): a close-delimited response ends here; a response
    /// in progress is recorded from what it delivered (an estimate unless its usage record was
    /// seen); a request sent whole without a response seen is recorded at its input estimate.
    /// Nothing the provider may have billed is dropped without a record.
    pub fn finish(&mut self, end: End, det: &ProviderDetector, out: &mut Vec<Outcome>) {
        let mut events = std::mem::take(&mut self.events);
        self.conn.close(&mut events);
        self.handle(&mut events, det, out);
        self.events = events;
        if let Some(mut r) = self.current_response.take()
            && !r.recorded
            && billed(&r)
            && let Some(call) = take_call(&mut r, end, ResponseSeen::Cut)
        {
            out.push(Outcome::Call(Box::new(call)));
        }
        for r in self.awaiting.drain(..) {
            let Some(endpoint) = r.endpoint.clone() else {
                continue;
            };
            if !r.complete || endpoint.api.is_free() {
                continue;
            }
            let usage = Usage {
                input_tokens: r.input_estimate(&endpoint),
                estimated: true,
                ..Usage::default()
            };
            out.push(Outcome::Call(Box::new(ObservedCall {
                model: r.model.clone().or_else(|| endpoint.model_in_path.clone()),
                endpoint,
                usage: Some(usage),
                stream: false,
                tenant_header: r.tenant,
                feature_header: r.feature,
                end,
                response: ResponseSeen::None,
            })));
        }
        self.current_request = None;
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
fn take_call(r: &mut PendingResponse, end: End, seen: ResponseSeen) -> Option<ObservedCall> {
    let endpoint = r.request.endpoint.clone()?;
    r.recorded = true;
    r.decoder = None;
    let stream = r.meter.is_some();
    let body = std::mem::take(&mut r.body);
    let meta = if let Some(meter) = r.meter.take() {
        meter.finish()
    } else if seen == ResponseSeen::Complete {
        parse_response(&endpoint, &body).ok()?
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
    })
}

#[cfg(test)]
mod tests;
