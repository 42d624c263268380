//! [`StreamMeter`]: usage of a response body fed in arbitrary byte chunks.
//!
//! The framing is chosen from the first non-whitespace byte: `{` is a plain JSON body (metered
//! with [`super::parse_response`] at the end), `[` is Gemini's streamed JSON array, anything
//! else is `text/event-stream`. The caller de-chunks and decompresses the body first.

use super::anthropic;
use super::json_array::JsonArraySplitter;
use super::tokens::{self, Encoding, TextCounter};
use super::{ResponseMeta, Usage, gemini, openai, parse_response};
use crate::json::Json;
use crate::provider::{Api, Endpoint, ProviderKind};
use crate::sse::{DEFAULT_MAX_LINE_BYTES, SseParser};

/// A plain JSON body is buffered up to this size; beyond it only [`BODY_EDGE`] bytes at each end
/// are kept, and usage and model are searched there (OpenAI and Gemini put usage at the end).
const BODY_MAX: usize = 8 * 1024 * 1024;
const BODY_EDGE: usize = 256 * 1024;

#[cfg(test)]
thread_local! {
    /// Tests compare the sparse chat chunk parse with the whole tree it replaced.
    pub(super) static WHOLE_CHUNKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether chat chunks are built whole (only ever in tests).
fn whole_chunks() -> bool {
    #[cfg(test)]
    return WHOLE_CHUNKS.with(std::cell::Cell::get);
    #[cfg(not(test))]
    false
}

/// What the meter knows so far, shared with the per-provider event handlers.
#[derive(Debug)]
pub(super) struct StreamState {
    kind: ProviderKind,
    model_in_path: Option<String>,
    model: Option<String>,
    record: Option<Usage>,
    /// The stream reached its end marker (final usage chunk, `message_delta`, `finishReason`,
    /// `response.completed`...), so the record is complete.
    final_record: bool,
    /// The provider's end-of-stream event arrived (`[DONE]`, `message_stop`, a terminal
    /// `response.*` event): nothing billable follows, whether or not the client reads on.
    ended: bool,
    text: Option<TextCounter>,
    pub(super) errors: u64,
}

impl StreamState {
    pub(super) fn set_model(&mut self, model: &str) {
        if !model.is_empty() && self.model.as_deref() != Some(model) {
            self.model = Some(model.to_owned());
        }
    }

    /// Replaces the usage record (records are cumulative: never added).
    pub(super) fn set_record(&mut self, usage: Usage, last: bool) {
        self.record = Some(usage);
        self.final_record |= last;
    }

    pub(super) fn mark_final(&mut self) {
        self.final_record = true;
    }

    /// The stream's own end event arrived.
    pub(super) fn mark_ended(&mut self) {
        self.ended = true;
    }

    /// Counts delivered output text. The text itself is not kept beyond a small tokenising window.
    pub(super) fn push_text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        let counter = self.text.get_or_insert_with(|| {
            let model = self.model.as_deref().or(self.model_in_path.as_deref());
            let encoding = model.and_then(tokens::encoding_for_model).or(
                // Azure deployments and OpenAI's own API serve OpenAI models.
                matches!(self.kind, ProviderKind::OpenAi | ProviderKind::AzureOpenAi)
                    .then_some(Encoding::O200k),
            );
            TextCounter::new(encoding.and_then(tokens::bpe))
        });
        counter.push(text);
    }

    fn estimated_output(&self) -> u64 {
        self.text.as_ref().map_or(0, TextCounter::tokens)
    }

    /// The usage so far. The delivered text is only tokenised when there is no final record.
    fn usage(&self, finished: bool) -> Option<Usage> {
        match self.record {
            Some(record) if self.final_record => Some(record),
            Some(mut record) => {
                // The stream stopped before its final record: output is at least what was delivered.
                record.output_tokens = record.output_tokens.max(self.estimated_output());
                record.estimated = true;
                Some(record)
            }
            None if finished || self.text.as_ref().is_some_and(|t| !t.is_empty()) => Some(Usage {
                output_tokens: self.estimated_output(),
                estimated: true,
                ..Usage::default()
            }),
            None => None,
        }
    }
}

/// The whitespace a body starts with, before its first other byte decides the framing, kept in a
/// compact form: only an event stream replays it, and whitespace-only lines never produce events.
/// What can still matter to the SSE parser is whether a line ended (the first line may start
/// with a BOM) and whether a partial line of blanks is pending (it prefixes the next field
/// name), so at most two bytes stand for any amount of leading whitespace.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Preamble {
    line_ended: bool,
    blanks_pending: bool,
}

impl Preamble {
    /// Notes `whitespace`, a run of ASCII whitespace bytes.
    fn push(&mut self, whitespace: &[u8]) {
        match whitespace.iter().rposition(|&b| b == b'\n' || b == b'\r') {
            Some(end) => {
                self.line_ended = true;
                self.blanks_pending = end + 1 < whitespace.len();
            }
            None => self.blanks_pending |= !whitespace.is_empty(),
        }
    }

    /// Bytes the SSE parser treats like the whitespace noted. The byte that follows is never a
    /// line end, so whether the last one was CR or LF makes no difference.
    fn replay(self) -> &'static [u8] {
        match (self.line_ended, self.blanks_pending) {
            (false, false) => b"",
            (false, true) => b" ",
            (true, false) => b"\n",
            (true, true) => b"\n ",
        }
    }
}

#[derive(Debug)]
enum Framing {
    Undecided(Preamble),
    /// Boxed: the parser is taken out of the meter and put back for every chunk
    /// ([`StreamMeter::feed_framed`]), so only a pointer moves.
    Sse(Box<SseParser>),
    Array(JsonArraySplitter),
    Body {
        head: Vec<u8>,
        tail: Vec<u8>,
        overflow: bool,
    },
}

/// Meters a streamed (or plain) response body fed in arbitrary chunks, with bounded memory.
#[derive(Debug)]
pub struct StreamMeter {
    endpoint: Endpoint,
    framing: Framing,
    state: StreamState,
    anthropic: anthropic::Raw,
    body_meta: Option<ResponseMeta>,
}

impl StreamMeter {
    /// A meter for a response from `endpoint`.
    #[must_use]
    pub fn new(endpoint: &Endpoint) -> Self {
        Self {
            endpoint: endpoint.clone(),
            framing: Framing::Undecided(Preamble::default()),
            state: StreamState {
                kind: endpoint.kind,
                model_in_path: endpoint.model_in_path.clone(),
                model: None,
                record: None,
                final_record: false,
                ended: false,
                text: None,
                errors: 0,
            },
            anthropic: anthropic::Raw::default(),
            body_meta: None,
        }
    }

    /// Feeds the next chunk of the (de-chunked, decompressed) body. Never panics.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut chunk = chunk;
        if let Framing::Undecided(preamble) = &mut self.framing {
            // Leading whitespace goes through the same compact form whether it arrives alone or
            // with the first byte that decides, so the result does not depend on the chunking.
            let first = chunk.iter().position(|b| !b.is_ascii_whitespace());
            preamble.push(&chunk[..first.unwrap_or(chunk.len())]);
            let Some(first) = first else {
                return;
            };
            let replay = preamble.replay();
            self.framing = match chunk[first] {
                b'{' => Framing::Body {
                    head: Vec::new(),
                    tail: Vec::new(),
                    overflow: false,
                },
                b'[' => Framing::Array(JsonArraySplitter::new(DEFAULT_MAX_LINE_BYTES)),
                _ => Framing::Sse(Box::default()),
            };
            if let Framing::Sse(_) = self.framing {
                self.feed_framed(replay);
            }
            chunk = &chunk[first..];
        }
        self.feed_framed(chunk);
    }

    fn feed_framed(&mut self, chunk: &[u8]) {
        match &mut self.framing {
            Framing::Undecided(_) => {}
            Framing::Sse(_) => {
                // The parser lends each event while the meter reads it: taken out of `self`
                // for the call, then put back.
                let mut framing =
                    std::mem::replace(&mut self.framing, Framing::Undecided(Preamble::default()));
                if let Framing::Sse(parser) = &mut framing {
                    parser.feed_each(chunk, |event| self.on_data(event.data));
                }
                self.framing = framing;
            }
            Framing::Array(splitter) => {
                let mut elements = Vec::new();
                splitter.feed(chunk, |e| elements.push(e.to_vec()));
                for element in elements {
                    match Json::parse(&element) {
                        Ok(value) => self.on_value(&value),
                        Err(_) => self.state.errors += 1,
                    }
                }
            }
            Framing::Body {
                head,
                tail,
                overflow,
            } => {
                if !*overflow && head.len() + chunk.len() <= BODY_MAX {
                    head.extend_from_slice(chunk);
                    return;
                }
                if !*overflow {
                    *overflow = true;
                    let mut t = head.split_off(BODY_EDGE.min(head.len()));
                    t.extend_from_slice(chunk);
                    *tail = t;
                    head.shrink_to_fit();
                } else {
                    tail.extend_from_slice(chunk);
                }
                if tail.len() > BODY_EDGE {
                    tail.drain(..tail.len() - BODY_EDGE);
                }
            }
        }
    }

    fn on_data(&mut self, data: &str) {
        let data = data.trim();
        if data == "[DONE]" {
            self.state.mark_ended();
            return;
        }
        if data.is_empty() {
            return;
        }
        if matches!(self.endpoint.api, Api::ChatCompletions | Api::Completions) && !whole_chunks() {
            // Only what metering reads is taken, its texts borrowed from `data`.
            match super::chat_chunk::parse(data) {
                Ok(Some(chunk)) => super::chat_chunk::apply(&mut self.state, &chunk),
                Ok(None) | Err(_) => self.state.errors += 1,
            }
            return;
        }
        let parsed = Json::parse_str(data);
        match parsed {
            Ok(value) => self.on_value(&value),
            Err(_) => self.state.errors += 1,
        }
    }

    fn on_value(&mut self, value: &Json<'_>) {
        match self.endpoint.api {
            Api::ChatCompletions | Api::Completions => {
                openai::on_chat_chunk(&mut self.state, value)
            }
            Api::Responses => openai::on_responses_event(&mut self.state, value),
            Api::AnthropicMessages => {
                anthropic::on_event(&mut self.state, &mut self.anthropic, value)
            }
            Api::GeminiGenerateContent | Api::GeminiStreamGenerateContent => {
                gemini::on_chunk(&mut self.state, value)
            }
            Api::Embeddings | Api::AnthropicCountTokens | Api::GeminiCountTokens => {
                let body = value.to_string();
                match parse_response(&self.endpoint, body.as_bytes()) {
                    Ok(meta) => self.body_meta = Some(meta),
                    Err(_) => self.state.errors += 1,
                }
            }
        }
    }

    /// The model the response named so far.
    #[must_use]
    pub fn model(&self) -> Option<&str> {
        self.body_meta
            .as_ref()
            .and_then(|m| m.model.as_deref())
            .or(self.state.model.as_deref())
    }

    /// The usage known so far: the provider's record (completed with delivered output while the
    /// stream is still running), else an estimate from the output delivered so far, else `None`.
    #[must_use]
    pub fn usage_so_far(&self) -> Option<Usage> {
        if let Some(meta) = &self.body_meta {
            return meta.usage;
        }
        self.state.usage(false)
    }

    /// Whether the provider's end-of-stream event arrived: OpenAI's `data: [DONE]`, Anthropic's
    /// `message_stop` (or an `error` event), a terminal Responses event (`response.completed`,
    /// `.incomplete`, `.failed`). Clients stop reading there (the official Python SDK returns
    /// at `[DONE]` and closes), so the transfer framing that follows may never be seen: a caller
    /// that meters a connection records the call now instead of waiting for the body's end.
    /// Gemini streams have no such event (their SDKs read to the end of the body).
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.state.ended
    }

    /// Malformed events, oversized lines or elements, invalid UTF-8 lines seen so far.
    #[must_use]
    pub fn parse_errors(&self) -> u64 {
        let framing = match &self.framing {
            Framing::Sse(parser) => parser.dropped() + parser.invalid_utf8_lines(),
            Framing::Array(splitter) => splitter.errors(),
            Framing::Undecided(_) | Framing::Body { .. } => 0,
        };
        self.state.errors + framing
    }

    /// Ends the stream. The usage is the provider's record when the stream carried a complete one;
    /// otherwise an estimate (`estimated: true`) whose output is the larger of a partial record's
    /// output and the tokens of the delivered text, and whose input comes from a partial record or
    /// is 0: the caller merges its request-side input estimate. Never `None` for a stream.
    ///
    /// An SSE event left without its terminating blank line is used if its data is complete JSON.
    #[must_use]
    pub fn finish(mut self) -> ResponseMeta {
        match std::mem::replace(&mut self.framing, Framing::Undecided(Preamble::default())) {
            Framing::Sse(mut parser) => {
                if let Some(event) = parser.take_unterminated() {
                    self.on_data(&event.data);
                }
            }
            Framing::Body {
                head,
                tail,
                overflow,
            } => {
                let meta = if overflow {
                    super::body_scan::meta_from_edges(&self.endpoint, &head, &tail)
                } else {
                    parse_response(&self.endpoint, &head).ok()
                };
                return match meta {
                    Some(mut meta) => {
                        if meta.model.is_none() {
                            meta.model.clone_from(&self.endpoint.model_in_path);
                        }
                        meta
                    }
                    None => ResponseMeta {
                        model: self.endpoint.model_in_path.clone(),
                        usage: Some(Usage {
                            estimated: true,
                            ..Usage::default()
                        }),
                    },
                };
            }
            Framing::Array(_) | Framing::Undecided(_) => {}
        }
        if let Some(meta) = self.body_meta {
            return meta;
        }
        if self.endpoint.api.is_free() {
            return ResponseMeta {
                model: self.state.model.or(self.endpoint.model_in_path),
                usage: Some(Usage::default()),
            };
        }
        let usage = self.state.usage(true);
        ResponseMeta {
            model: self.state.model.or(self.endpoint.model_in_path),
            usage,
        }
    }
}
