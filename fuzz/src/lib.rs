//! Helpers shared by the fuzz targets: how an input picks an endpoint and splits its body into
//! chunks, and a plain reference reading of `text/event-stream` to check the incremental parser
//! against.

use ledger::provider::{Api, Endpoint, ProviderKind};
use ledger::sse::SseEvent;

/// The (kind, API) pairs the detectors produce for real traffic.
const ENDPOINTS: [(ProviderKind, Api); 16] = [
    (ProviderKind::OpenAi, Api::ChatCompletions),
    (ProviderKind::OpenAi, Api::Completions),
    (ProviderKind::OpenAi, Api::Responses),
    (ProviderKind::OpenAi, Api::Embeddings),
    (ProviderKind::AzureOpenAi, Api::ChatCompletions),
    (ProviderKind::AzureOpenAi, Api::Responses),
    (ProviderKind::AzureOpenAi, Api::Embeddings),
    (ProviderKind::OpenAiCompatible, Api::ChatCompletions),
    (ProviderKind::OpenAiCompatible, Api::Completions),
    (ProviderKind::OpenAiCompatible, Api::Responses),
    (ProviderKind::OpenAiCompatible, Api::Embeddings),
    (ProviderKind::Anthropic, Api::AnthropicMessages),
    (ProviderKind::Anthropic, Api::AnthropicCountTokens),
    (ProviderKind::Gemini, Api::GeminiGenerateContent),
    (ProviderKind::Gemini, Api::GeminiStreamGenerateContent),
    (ProviderKind::Gemini, Api::GeminiCountTokens),
];

/// A realistic endpoint chosen by one byte: the low four bits pick (kind, API), the high bits
/// whether the path names a model, asks for SSE (`alt=sse`) and for a stream.
#[must_use]
pub fn endpoint(selector: u8) -> Endpoint {
    let (kind, api) = ENDPOINTS[usize::from(selector & 0x0f)];
    let model = match kind {
        ProviderKind::Anthropic => "claude-sonnet-4-5",
        ProviderKind::Gemini => "gemini-2.5-flash",
        ProviderKind::AzureOpenAi => "my-gpt-4o-deployment",
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => "gpt-4o-mini",
    };
    let gemini = kind == ProviderKind::Gemini;
    Endpoint {
        kind,
        api,
        provider: kind.as_str().to_owned(),
        model_in_path: (selector & 0x10 != 0 || gemini).then(|| model.to_owned()),
        stream_in_path: api == Api::GeminiStreamGenerateContent,
        sse_in_query: gemini && selector & 0x20 != 0,
    }
}

/// Splits a fuzz input into a chunking plan and the body: the first byte says how many of the
/// following bytes are chunk lengths (0–7; none means the body arrives whole).
#[must_use]
pub fn plan(input: &[u8]) -> (&[u8], &[u8]) {
    let Some((&n, rest)) = input.split_first() else {
        return (&[], &[]);
    };
    rest.split_at(usize::from(n % 8).min(rest.len()))
}

/// The body cut into chunks whose lengths cycle through `lens`; a 0 is an empty chunk. With no
/// lengths the body is one chunk.
#[must_use]
pub fn chunks<'a>(lens: &[u8], body: &'a [u8]) -> Vec<&'a [u8]> {
    if lens.is_empty() {
        return vec![body];
    }
    let mut out = Vec::new();
    let mut rest = body;
    let mut zeros = 0;
    for &len in lens.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        if len == 0 {
            // An empty chunk, at most a few in a row so an all-zero plan still ends.
            zeros += 1;
            if zeros <= 2 {
                out.push(&rest[..0]);
                continue;
            }
        }
        zeros = 0;
        let (head, tail) = rest.split_at(usize::from(len.max(1)).min(rest.len()));
        out.push(head);
        rest = tail;
    }
    out
}

/// The events of a complete stream per the WHATWG rules, written for clarity rather than speed:
/// the reference the incremental parser must agree with. Also returns the event the stream left
/// without its blank line (a final line without a line end included), as
/// `SseParser::take_unterminated` should.
#[must_use]
pub fn reference_sse(stream: &[u8]) -> (Vec<SseEvent>, Option<SseEvent>) {
    let stream = stream.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(stream);
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut rest = stream;
    while let Some(i) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
        lines.push(&rest[..i]);
        let crlf = rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n');
        rest = &rest[i + if crlf { 2 } else { 1 }..];
    }
    let mut events = Vec::new();
    let mut reader = Reference::default();
    for line in lines {
        if line.is_empty() {
            events.extend(reader.dispatch());
        } else {
            reader.field(line);
        }
    }
    if !rest.is_empty() {
        reader.field(rest);
    }
    let pending = reader.dispatch();
    (events, pending)
}

/// The state of [`reference_sse`] between lines.
#[derive(Default)]
struct Reference {
    event_type: String,
    /// The joined `data` lines; `None` until the event has one.
    data: Option<String>,
    id: Option<String>,
}

impl Reference {
    fn field(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        if text.starts_with(':') {
            return;
        }
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => value.clone_into(&mut self.event_type),
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event_type = std::mem::take(&mut self.event_type);
        Some(SseEvent {
            event: (!event_type.is_empty()).then_some(event_type),
            data: self.data.take()?,
            id: self.id.clone(),
        })
    }
}

/// What one step of a captured TLS connection does (the observer targets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureKind {
    /// An SSL call's bytes, from its start.
    Call,
    /// More bytes of a call whose start was lost (after a gap).
    Continue,
    /// This many bytes of the side were not captured.
    Gap(u64),
    /// The connection closed.
    Close,
}

/// One step of a captured connection, the unit the observer's reassembler is fed.
#[derive(Debug, Clone, Copy)]
pub struct CaptureOp<'a> {
    /// Bytes the process read (the response side), else wrote.
    pub response: bool,
    /// What happens.
    pub kind: CaptureKind,
    /// The bytes of a `Call` or `Continue`.
    pub data: &'a [u8],
}

impl CaptureOp<'_> {
    /// The side of the connection the op is about, as the observer's reassemblers name it.
    #[must_use]
    pub fn side(&self) -> observer::http1::Side {
        if self.response {
            observer::http1::Side::Response
        } else {
            observer::http1::Side::Request
        }
    }
}

/// Reads a capture: a sequence of an op byte (bit 0: response side; bits 1–2: call, continue,
/// gap, close), then for call/continue a little-endian u16 length and that many bytes (fewer at
/// the end of the input), for a gap a little-endian u16 byte count.
#[must_use]
pub fn capture(mut input: &[u8]) -> Vec<CaptureOp<'_>> {
    let mut ops = Vec::new();
    while let Some((&op, rest)) = input.split_first() {
        input = rest;
        let mut len = || {
            let n = match input {
                [a, b, ..] => u16::from_le_bytes([*a, *b]),
                [a] => u16::from(*a),
                [] => 0,
            };
            input = &input[input.len().min(2)..];
            usize::from(n)
        };
        let response = op & 1 != 0;
        let (kind, data) = match (op >> 1) & 3 {
            k @ (0 | 1) => {
                let n = len().min(input.len());
                let (data, rest) = input.split_at(n);
                input = rest;
                let kind = if k == 0 {
                    CaptureKind::Call
                } else {
                    CaptureKind::Continue
                };
                (kind, data)
            }
            2 => (CaptureKind::Gap(len() as u64), &input[..0]),
            _ => (CaptureKind::Close, &input[..0]),
        };
        ops.push(CaptureOp {
            response,
            kind,
            data,
        });
    }
    ops
}
