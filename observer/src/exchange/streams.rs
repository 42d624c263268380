//! HTTP/2 connections seen from their preface: each stream pairs its own request and response.
//! One method per kind of event; [`H2::handle`] routes them and holds response events that
//! come before their request (see [`H2::early`]).

use std::collections::VecDeque;

use ledger::provider::ProviderDetector;

use super::{
    End, H2, H2Stream, MAX_EARLY_BYTES, MAX_EARLY_EVENTS, MAX_H2_BODIES, MAX_H2_STREAMS, Outcome,
    PendingRequest, PendingResponse, early_stream, ev_len, finish_stream,
};
use crate::http1::{Head, Side};
use crate::http2::H2Event;

impl H2 {
    /// Handles `events` (drained) after the events held from earlier calls. `first_request`
    /// is the connection's: its first request to a host that is not a provider's makes it
    /// [`Outcome::NotLlm`].
    pub(super) fn handle(
        &mut self,
        events: &mut Vec<H2Event>,
        first_request: &mut bool,
        det: &ProviderDetector,
        out: &mut Vec<Outcome>,
    ) {
        let mut queue = std::mem::take(&mut self.queue);
        queue.extend(events.drain(..));
        while let Some(ev) = queue.pop_front() {
            let Some(ev) = self.hold_early(ev, out) else {
                continue;
            };
            match ev {
                H2Event::Head(Side::Request, id, head) => {
                    self.request_head(id, head, &mut queue, first_request, det, out);
                }
                H2Event::Body(Side::Request, id, bytes) => self.request_body(id, &bytes, out),
                H2Event::End(Side::Request, id) => self.request_end(id),
                H2Event::Head(Side::Response, id, head) => self.response_head(id, &head),
                H2Event::Body(Side::Response, id, bytes) => self.response_body(id, &bytes, out),
                H2Event::End(Side::Response, id) => {
                    if let Some(s) = self.streams.remove(&id)
                        && let Some(r) = s.response
                    {
                        r.ended(out);
                    }
                }
                H2Event::Reset(id) => {
                    if let Some(s) = self.streams.remove(&id) {
                        self.mark_done(id);
                        finish_stream(s, End::StreamReset, out);
                    }
                }
                // Only connections joined mid-way have hidden heads (handled in `midway`).
                H2Event::HiddenHead(..) => {}
                H2Event::Broken(why) => out.push(Outcome::ParseError(match why {
                    "bytes lost" => "http2: bytes lost",
                    "HPACK decoding failed" => "http2: HPACK decoding failed",
                    _ => "http2: framing",
                })),
            }
        }
        self.events = std::mem::take(events);
        self.queue = queue;
    }

    /// Holds a response event of a stream whose request is not seen yet (within
    /// [`MAX_EARLY_EVENTS`] and [`MAX_EARLY_BYTES`]; past them it is a parse error); returns
    /// any other event.
    fn hold_early(&mut self, ev: H2Event, out: &mut Vec<Outcome>) -> Option<H2Event> {
        let response_event = match &ev {
            H2Event::Head(Side::Response, id, _)
            | H2Event::Body(Side::Response, id, _)
            | H2Event::End(Side::Response, id)
            | H2Event::Reset(id) => Some(*id),
            _ => None,
        };
        if let Some(id) = response_event
            && !self.streams.contains_key(&id)
            && id % 2 == 1
            && !self.done.contains(&id)
        {
            if self.early.len() < MAX_EARLY_EVENTS
                && self.early_bytes() + ev_len(&ev) <= MAX_EARLY_BYTES
            {
                self.early.push(ev);
            } else {
                out.push(Outcome::ParseError("http2: response before its request"));
            }
            return None;
        }
        Some(ev)
    }

    /// A request head opens a stream (up to [`MAX_H2_STREAMS`]); its response events held
    /// until now go to the front of `queue`, in order.
    fn request_head(
        &mut self,
        id: u32,
        head: Head,
        queue: &mut VecDeque<H2Event>,
        first_request: &mut bool,
        det: &ProviderDetector,
        out: &mut Vec<Outcome>,
    ) {
        if self.streams.contains_key(&id) {
            return; // trailers
        }
        // Its response events that came first go next, in order.
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early)
            .into_iter()
            .partition(|e| early_stream(e) == id);
        self.early = rest;
        for e in mine.into_iter().rev() {
            queue.push_front(e);
        }
        let host = head.host.clone().unwrap_or_default();
        if *first_request && !det.is_provider_host(&host) {
            out.push(Outcome::NotLlm);
        }
        *first_request = false;
        if self.streams.len() >= MAX_H2_STREAMS {
            self.mark_done(id);
            out.push(Outcome::ParseError("http2: too many concurrent streams"));
            return;
        }
        let endpoint = det.detect(&host, &head.method, &head.path);
        self.streams.insert(
            id,
            H2Stream {
                request: Some(PendingRequest::new(endpoint, head.tenant, head.feature)),
                ..H2Stream::default()
            },
        );
    }

    /// Request body bytes, kept while all streams' bodies fit [`MAX_H2_BODIES`].
    fn request_body(&mut self, id: u32, bytes: &[u8], out: &mut Vec<Outcome>) {
        let over = self.bodies() + bytes.len() > MAX_H2_BODIES;
        if let Some(r) = self.streams.get_mut(&id).and_then(|s| s.request.as_mut()) {
            if over {
                if r.complete {
                    out.push(Outcome::ParseError("http2: connection body cap"));
                }
                r.complete = false;
                r.body_len = r.body_len.saturating_add(bytes.len());
                r.body = Vec::new();
            } else {
                r.body_bytes(bytes);
            }
        }
    }

    fn request_end(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id)
            && let Some(r) = s.request.as_mut()
        {
            // Each stream keeps its own body (bounded by MAX_H2_STREAMS).
            r.ended(0);
            s.request_ended = true;
        }
    }

    /// The final response head pairs the stream's request with its response.
    fn response_head(&mut self, id: u32, head: &Head) {
        let Some(s) = self.streams.get_mut(&id) else {
            return; // a stream not metered (over the cap) or already ended
        };
        if s.response.is_some() || (100..200).contains(&head.status) {
            return; // trailers, or an interim response
        }
        if let Some(mut request) = s.request.take() {
            if !s.request_ended {
                // Answered before the request ended (rare): what was sent counts.
                request.ended(0);
            }
            s.response = Some(PendingResponse::new(request, head));
            s.response_left = head.content_length;
        }
    }

    /// Response body bytes; the stream ends here when its `content-length` is reached.
    fn response_body(&mut self, id: u32, bytes: &[u8], out: &mut Vec<Outcome>) {
        let over = self.bodies() + bytes.len() > MAX_H2_BODIES;
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if let Some(r) = s.response.as_mut() {
            if over && r.meter.is_none() {
                // A JSON body that cannot be kept: what it says is lost.
                if r.complete {
                    out.push(Outcome::ParseError("http2: connection body cap"));
                }
                r.complete = false;
                r.body = Vec::new();
            } else {
                r.body_bytes(bytes, out);
            }
        }
        if let Some(left) = s.response_left.as_mut() {
            *left = left.saturating_sub(bytes.len() as u64);
            if *left == 0
                && let Some(s) = self.streams.remove(&id)
            {
                self.mark_done(id);
                if let Some(r) = s.response {
                    r.ended(out);
                }
            }
        }
    }
}
