//! Turns one connection's HTTP events into LLM calls: pairs requests with responses, classifies
//! the provider from the Host header, decodes bodies and extracts model and usage with the ledger.
//!
//! Pure: bytes in, [`Outcome`]s out. Bodies live only until they are parsed.

use std::collections::VecDeque;

use ledger::provider::{Endpoint, ProviderDetector};
use ledger::request::request_model;
use ledger::usage::{StreamMeter, Usage, parse_response};

use crate::decode::BodyDecoder;
use crate::http1::{Connection, Head, HttpEvent, Side};

/// Largest request body kept for `request_model`.
pub const MAX_REQUEST_BODY: usize = 4 << 20;
/// Largest non-streamed response body kept for `parse_response`.
pub const MAX_RESPONSE_BODY: usize = 8 << 20;

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
    body: Vec<u8>,
    complete: bool,
    /// The model the request body names.
    model: Option<String>,
}

#[derive(Debug)]
struct PendingResponse {
    request: PendingRequest,
    status: u16,
    decoder: Option<BodyDecoder>,
    meter: Option<StreamMeter>,
    body: Vec<u8>,
    complete: bool,
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

    /// The SSL object was freed.
    pub fn close(&mut self, det: &ProviderDetector, out: &mut Vec<Outcome>) {
        let mut events = std::mem::take(&mut self.events);
        self.conn.close(&mut events);
        self.handle(&mut events, det, out);
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
                        r.body = Vec::new();
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
        self.current_request = Some(PendingRequest {
            endpoint,
            tenant: head.tenant,
            feature: head.feature,
            body: Vec::new(),
            complete: true,
            model: None,
        });
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
                endpoint: None,
                tenant: None,
                feature: None,
                body: Vec::new(),
                complete: false,
                model: None,
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
        } else if r.body.len() + plain.len() <= MAX_RESPONSE_BODY {
            r.body.extend_from_slice(&plain);
        } else {
            r.complete = false;
        }
    }

    fn response_end(&mut self, out: &mut Vec<Outcome>) {
        let Some(r) = self.current_response.take() else {
            return;
        };
        let Some(endpoint) = r.request.endpoint else {
            return;
        };
        if !(200..300).contains(&r.status) || endpoint.api.is_free() {
            return;
        }
        let stream = r.meter.is_some();
        let meta = if let Some(meter) = r.meter {
            meter.finish()
        } else if r.complete && r.decoder.is_some() {
            match parse_response(&endpoint, &r.body) {
                Ok(m) => m,
                Err(_) => {
                    out.push(Outcome::ParseError("response body"));
                    return;
                }
            }
        } else {
            out.push(Outcome::ParseError("response body incomplete"));
            return;
        };
        let model = meta
            .model
            .or(r.request.model)
            .or_else(|| endpoint.model_in_path.clone());
        out.push(Outcome::Call(Box::new(ObservedCall {
            endpoint,
            model,
            usage: meta.usage,
            stream,
            tenant_header: r.request.tenant,
            feature_header: r.request.feature,
        })));
    }
}

#[cfg(test)]
mod tests;
