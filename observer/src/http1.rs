//! Pure HTTP/1.1 reassembly of one TLS connection's two plaintext streams: bytes in, events out.
//!
//! Handles keep-alive, pipelining, Content-Length, chunked and read-until-close bodies. No I/O, no
//! clock: the daemon feeds it what the uprobes copied, in order, and reports holes (`gap`).

use std::collections::VecDeque;

/// Largest request or response head kept while waiting for its end.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// Most headers parsed per message.
const MAX_HEADERS: usize = 64;
/// Most requests awaiting their response: beyond it the response side is taken as lost (a
/// desync), so neither this side nor the exchange's pairing queue grows without bound.
pub const MAX_PIPELINED: usize = 64;
/// Longest chunk-size, chunk-end or trailer line (without its LF).
const MAX_CHUNK_LINE: usize = 4096;
/// What a response must start with to resynchronise on it.
const RESPONSE_MARKER: &[u8] = b"HTTP/1.";
/// What a request must start with to resynchronise on it; the HTTP/2 preface too (a
/// multi-threaded client's reader can report the server's first frames, a desync, before its
/// writer reports the preface).
const REQUEST_MARKERS: [&[u8]; 8] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"PATCH ",
    b"HEAD ",
    b"OPTIONS ",
    b"PRI * HTTP/2.0\r\n",
];
/// Longest of the markers above.
const MAX_MARKER: usize = 16;

/// Which side of the client connection bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// What the process wrote (the request, for a client).
    Request,
    /// What the process read (the response).
    Response,
}

/// A parsed message head; only the headers the observer needs are kept (never auth headers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// Request method (requests only).
    pub method: String,
    /// Request target (requests only).
    pub path: String,
    /// Response status (responses only).
    pub status: u16,
    /// `Host`.
    pub host: Option<String>,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Content-Encoding`.
    pub content_encoding: Option<String>,
    /// `Content-Length` of an HTTP/2 message (HTTP/1.1 frames its bodies itself and leaves this
    /// empty).
    pub content_length: Option<u64>,
    /// `X-Tenant-ID`.
    pub tenant: Option<String>,
    /// `X-Feature-Name`.
    pub feature: Option<String>,
}

/// What the reassembler recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpEvent {
    /// A complete head.
    Head(Side, Head),
    /// Body bytes, transfer-decoded (still content-encoded).
    Body(Side, Vec<u8>),
    /// `n` body bytes were lost (truncated by the per-call limit): the body is incomplete.
    BodyGap(Side, u64),
    /// The message ended.
    End(Side),
    /// The client sent the HTTP/2 connection preface: nothing else will be parsed here. The
    /// request side's bytes from the preface on, for the HTTP/2 reassembler.
    Http2(Vec<u8>),
    /// The stream is not HTTP/1.1 or lost sync: state was reset, pending messages are gone.
    Desync(Side, &'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a head; `resync` = only accept one at the start of an SSL call (the buffer
    /// then holds the start of a call too short to tell, such as `HT`).
    Head {
        resync: bool,
    },
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

#[derive(Debug)]
struct Stream {
    state: State,
    buf: Vec<u8>,
}

/// One connection's reassembler.
#[derive(Debug)]
pub struct Connection {
    req: Stream,
    resp: Stream,
    /// Methods of requests whose responses have not started, for HEAD / body-less framing.
    pending_methods: VecDeque<String>,
    http2: bool,
}

impl Default for Connection {
    fn default() -> Self {
        Connection::new()
    }
}

impl Connection {
    /// A connection at its start.
    pub fn new() -> Connection {
        Connection {
            req: Stream {
                state: State::Head { resync: false },
                buf: Vec::new(),
            },
            resp: Stream {
                state: State::Head { resync: false },
                buf: Vec::new(),
            },
            pending_methods: VecDeque::new(),
            http2: false,
        }
    }

    /// Bytes currently buffered (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.req.buf.capacity() + self.resp.buf.capacity()
    }

    /// Feeds bytes of one side. `call_start` is true when they begin an SSL call (resync point);
    /// it applies to the first byte only: after a desync, the rest of the call is skipped, never
    /// read as a new message (a body may hold anything, `HTTP/1.1 200` included).
    pub fn feed(
        &mut self,
        side: Side,
        mut data: &[u8],
        call_start: bool,
        out: &mut Vec<HttpEvent>,
    ) {
        if self.http2 {
            return;
        }
        let mut at_call_start = call_start;
        while !data.is_empty() {
            let used = self.step(side, data, at_call_start, out);
            at_call_start = false;
            if self.http2 {
                return;
            }
            data = &data[used..];
        }
    }

    /// Reports `n` bytes of `side` that were not captured (nothing once HTTP/2 was seen).
    pub fn gap(&mut self, side: Side, n: u64, out: &mut Vec<HttpEvent>) {
        if self.http2 {
            return;
        }
        let stream = self.stream(side);
        match stream.state {
            State::Length(rem) if n <= rem => {
                out.push(HttpEvent::BodyGap(side, n));
                stream.state = State::Length(rem - n);
                if rem == n {
                    self.end_message(side, out);
                }
            }
            State::UntilClose => out.push(HttpEvent::BodyGap(side, n)),
            // Already out of sync: lost bytes change nothing, except that held bytes of a call
            // start no longer continue into what comes next.
            State::Head { resync: true } => stream.buf.clear(),
            _ => self.desync(side, "bytes lost inside a head or chunk framing", out),
        }
    }

    /// The connection closed: a read-until-close response ends here.
    pub fn close(&mut self, out: &mut Vec<HttpEvent>) {
        if self.resp.state == State::UntilClose && !self.http2 {
            self.resp.state = State::Head { resync: false };
            out.push(HttpEvent::End(Side::Response));
        }
    }

    fn stream(&mut self, side: Side) -> &mut Stream {
        match side {
            Side::Request => &mut self.req,
            Side::Response => &mut self.resp,
        }
    }

    fn desync(&mut self, side: Side, why: &'static str, out: &mut Vec<HttpEvent>) {
        out.push(HttpEvent::Desync(side, why));
        for s in [&mut self.req, &mut self.resp] {
            s.buf = Vec::new();
            s.state = State::Head { resync: true };
        }
        self.pending_methods.clear();
    }

    fn end_message(&mut self, side: Side, out: &mut Vec<HttpEvent>) {
        let s = self.stream(side);
        s.state = State::Head { resync: false };
        out.push(HttpEvent::End(side));
    }

    /// Parses from the start of `data`; returns the bytes consumed (at least one).
    fn step(
        &mut self,
        side: Side,
        data: &[u8],
        call_start: bool,
        out: &mut Vec<HttpEvent>,
    ) -> usize {
        match self.stream(side).state {
            State::Head { resync: true } => match self.resync(side, data, call_start) {
                Some(used) => used,
                None => self.parse_head(side, data, out),
            },
            State::Head { resync: false } => self.parse_head(side, data, out),
            _ => self.step_body(side, data, out),
        }
    }

    /// After a desync a head is trusted only where an SSL call starts with `HTTP/1.` (or a
    /// method): returns the bytes of `data` skipped or held, or `None` when a head starts here.
    /// A call start too short to tell (`HT`) is held until the next bytes decide.
    fn resync(&mut self, side: Side, data: &[u8], call_start: bool) -> Option<usize> {
        let stream = self.stream(side);
        if !stream.buf.is_empty() {
            let probe: Vec<u8> = stream
                .buf
                .iter()
                .chain(data)
                .take(MAX_MARKER)
                .copied()
                .collect();
            match marker(side, &probe) {
                Marker::Found => {
                    stream.state = State::Head { resync: false };
                    return None;
                }
                Marker::Partial => {
                    stream.buf.extend_from_slice(data);
                    return Some(data.len());
                }
                // A new call may still start a head on its own.
                Marker::No => stream.buf.clear(),
            }
        }
        if !call_start {
            return Some(data.len());
        }
        match marker(side, data) {
            Marker::Found => {
                stream.state = State::Head { resync: false };
                None
            }
            Marker::Partial => {
                stream.buf.extend_from_slice(data);
                Some(data.len())
            }
            Marker::No => Some(data.len()),
        }
    }

    /// Appends to the head buffer and parses; returns bytes of `data` consumed.
    fn parse_head(&mut self, side: Side, data: &[u8], out: &mut Vec<HttpEvent>) -> usize {
        let stream = self.stream(side);
        let before = stream.buf.len();
        let take = data
            .len()
            .min(MAX_HEAD_BYTES + 1 - before.min(MAX_HEAD_BYTES));
        stream.buf.extend_from_slice(&data[..take]);
        if side == Side::Request && stream.buf.starts_with(H2_PREFACE) {
            let mut bytes = std::mem::take(&mut stream.buf);
            bytes.extend_from_slice(&data[take..]);
            self.http2 = true;
            out.push(HttpEvent::Http2(bytes));
            return data.len();
        }
        if side == Side::Request && H2_PREFACE.starts_with(&stream.buf) {
            return take; // could still become the HTTP/2 preface
        }
        let parsed = match side {
            Side::Request => parse_request_head(&stream.buf),
            Side::Response => parse_response_head(&stream.buf),
        };
        match parsed {
            Ok(Some(_)) if side == Side::Request && self.pending_methods.len() >= MAX_PIPELINED => {
                self.desync(side, "too many requests without a response", out);
                data.len()
            }
            Ok(Some((head_len, head, framing))) => {
                let used = head_len - before;
                self.stream(side).buf = Vec::new();
                self.start_body(side, head, framing, out);
                used
            }
            Ok(None) if self.stream(side).buf.len() > MAX_HEAD_BYTES => {
                self.desync(side, "head larger than 64 KiB", out);
                data.len()
            }
            Ok(None) => take,
            Err(why) => {
                self.desync(side, why, out);
                data.len()
            }
        }
    }

    fn start_body(&mut self, side: Side, head: Head, framing: Framing, out: &mut Vec<HttpEvent>) {
        let state = match side {
            Side::Request => {
                self.pending_methods.push_back(head.method.clone());
                match framing {
                    Framing::Chunked => State::Chunked(Chunk::Size),
                    Framing::Length(n) if n > 0 => State::Length(n),
                    _ => State::Head { resync: false },
                }
            }
            Side::Response => {
                let interim = (100..200).contains(&head.status) && head.status != 101;
                let method = if interim {
                    None
                } else {
                    self.pending_methods.pop_front()
                };
                let bodiless = interim
                    || method.as_deref() == Some("HEAD")
                    || head.status == 204
                    || head.status == 304;
                match framing {
                    _ if bodiless => State::Head { resync: false },
                    Framing::Chunked => State::Chunked(Chunk::Size),
                    Framing::Length(n) if n > 0 => State::Length(n),
                    Framing::Length(_) => State::Head { resync: false },
                    Framing::None => State::UntilClose,
                }
            }
        };
        out.push(HttpEvent::Head(side, head));
        self.stream(side).state = state;
        if matches!(state, State::Head { .. }) {
            out.push(HttpEvent::End(side));
        }
    }

    fn step_body(&mut self, side: Side, data: &[u8], out: &mut Vec<HttpEvent>) -> usize {
        let stream = self.stream(side);
        match stream.state {
            State::Length(rem) => {
                let n = usize::try_from(rem).unwrap_or(usize::MAX).min(data.len());
                out.push(HttpEvent::Body(side, data[..n].to_vec()));
                stream.state = State::Length(rem - n as u64);
                if rem == n as u64 {
                    self.end_message(side, out);
                }
                n
            }
            State::UntilClose => {
                out.push(HttpEvent::Body(side, data.to_vec()));
                data.len()
            }
            State::Chunked(chunk) => self.step_chunked(side, chunk, data, out),
            State::Head { .. } => 0,
        }
    }

    fn step_chunked(
        &mut self,
        side: Side,
        chunk: Chunk,
        data: &[u8],
        out: &mut Vec<HttpEvent>,
    ) -> usize {
        let stream = self.stream(side);
        match chunk {
            Chunk::Data(rem) => {
                let n = usize::try_from(rem).unwrap_or(usize::MAX).min(data.len());
                out.push(HttpEvent::Body(side, data[..n].to_vec()));
                let left = rem - n as u64;
                stream.state = State::Chunked(if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                });
                n
            }
            Chunk::Size | Chunk::DataEnd | Chunk::Trailers => {
                // Line-oriented parts: buffer up to the next LF, with the same length limit
                // whether the line arrives whole or in pieces.
                let Some(lf) = data.iter().position(|&b| b == b'\n') else {
                    stream.buf.extend_from_slice(data);
                    if stream.buf.len() > MAX_CHUNK_LINE {
                        self.desync(side, "chunk size line too long", out);
                    }
                    return data.len();
                };
                if stream.buf.len() + lf > MAX_CHUNK_LINE {
                    self.desync(side, "chunk size line too long", out);
                    return data.len();
                }
                stream.buf.extend_from_slice(&data[..=lf]);
                let line = std::mem::take(&mut stream.buf);
                let why = match chunk {
                    Chunk::DataEnd if line == b"\r\n" || line == b"\n" => {
                        stream.state = State::Chunked(Chunk::Size);
                        None
                    }
                    Chunk::DataEnd => Some("missing CRLF after chunk"),
                    Chunk::Size => match httparse::parse_chunk_size(&line) {
                        Ok(httparse::Status::Complete((_, 0))) => {
                            stream.state = State::Chunked(Chunk::Trailers);
                            None
                        }
                        Ok(httparse::Status::Complete((_, n))) => {
                            stream.state = State::Chunked(Chunk::Data(n));
                            None
                        }
                        _ => Some("bad chunk size"),
                    },
                    Chunk::Trailers if line == b"\r\n" || line == b"\n" => {
                        self.end_message(side, out);
                        None
                    }
                    Chunk::Trailers | Chunk::Data(_) => None,
                };
                match why {
                    // Out of sync: the rest of this call is body bytes of unknown meaning.
                    Some(why) => {
                        self.desync(side, why, out);
                        data.len()
                    }
                    None => lf + 1,
                }
            }
        }
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    None,
}

type HeadResult = Result<Option<(usize, Head, Framing)>, &'static str>;

/// Whether bytes at a call start begin a head of `side`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    /// They start with `HTTP/1.` (responses) or a method and a space (requests).
    Found,
    /// Too few bytes to tell, but they could.
    Partial,
    /// They cannot.
    No,
}

fn marker(side: Side, data: &[u8]) -> Marker {
    let markers: &[&[u8]] = match side {
        Side::Request => &REQUEST_MARKERS,
        Side::Response => &[RESPONSE_MARKER],
    };
    if markers.iter().any(|m| data.starts_with(m)) {
        Marker::Found
    } else if markers.iter().any(|m| m.starts_with(data)) {
        Marker::Partial
    } else {
        Marker::No
    }
}

fn parse_request_head(buf: &[u8]) -> HeadResult {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let mut head = Head {
                method: req.method.unwrap_or_default().to_owned(),
                path: req.path.unwrap_or_default().to_owned(),
                ..Head::default()
            };
            let framing = collect_headers(req.headers, &mut head)?;
            Ok(Some((n, head, framing.unwrap_or(Framing::Length(0)))))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err("not an HTTP/1.x request"),
    }
}

fn parse_response_head(buf: &[u8]) -> HeadResult {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let mut head = Head {
                status: resp.code.unwrap_or(0),
                ..Head::default()
            };
            let framing = collect_headers(resp.headers, &mut head)?;
            Ok(Some((n, head, framing.unwrap_or(Framing::None))))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err("not an HTTP/1.x response"),
    }
}

/// Keeps the headers the observer needs; returns the body framing when the headers state one.
fn collect_headers(
    headers: &[httparse::Header<'_>],
    head: &mut Head,
) -> Result<Option<Framing>, &'static str> {
    let mut framing = None;
    for h in headers {
        let value = || String::from_utf8_lossy(h.value).trim().to_owned();
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if value().to_ascii_lowercase().ends_with("chunked") {
                framing = Some(Framing::Chunked);
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            if framing != Some(Framing::Chunked) {
                let n = value().parse::<u64>().map_err(|_| "bad Content-Length")?;
                framing = Some(Framing::Length(n));
            }
        } else if name.eq_ignore_ascii_case("host") {
            head.host = Some(value());
        } else if name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(value());
        } else if name.eq_ignore_ascii_case("content-encoding") {
            head.content_encoding = Some(value().to_ascii_lowercase());
        } else if name.eq_ignore_ascii_case("x-tenant-id") {
            head.tenant = Some(value());
        } else if name.eq_ignore_ascii_case("x-feature-name") {
            head.feature = Some(value());
        }
    }
    Ok(framing)
}

#[cfg(test)]
mod tests;
