//! Pure HTTP/2 reassembly of one TLS connection's two plaintext streams (RFC 9113): frames in,
//! per-stream events out.
//!
//! The client side starts with the connection preface; after it both sides are frames. Header
//! blocks (HEADERS + CONTINUATION, and PUSH_PROMISE, which must be decoded to keep the table in
//! step) go through one stateful HPACK decoder per direction (`loona-hpack`), bounded by the
//! table size the other side advertised (`SETTINGS_HEADER_TABLE_SIZE`, at most [`MAX_TABLE`]).
//! DATA padding is stripped. Only the headers the observer needs are kept, never auth headers.
//!
//! A frame larger than [`MAX_FRAME`], a header block larger than [`MAX_HEADER_BLOCK`], an HPACK
//! error or lost bytes leave the connection [`H2Event::Broken`]: frame boundaries and the HPACK
//! state cannot be recovered, so nothing more is parsed (the streams in progress end with the
//! connection, as estimates).
//!
//! A connection joined mid-way ([`H2Connection::midway`]: the observer attached after the
//! preface) first finds its frame boundaries on each side (see [`sync`]); its HPACK tables are
//! unknown for good, so each header block is decoded on its own with an empty table: one that
//! only uses the static table and literals decodes exactly, any other is reported as
//! [`H2Event::HiddenHead`] and never reaches a table.

use loona_hpack::Decoder;

use crate::http1::{Head, Side};

pub mod sync;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest frame payload kept (the protocol default is 16 KiB; peers may allow up to 16 MiB).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest header block (HEADERS + CONTINUATION) decoded.
pub const MAX_HEADER_BLOCK: usize = 256 << 10;
/// Largest HPACK dynamic table allowed, whatever the peer advertises.
pub const MAX_TABLE: usize = 64 << 10;
/// The HPACK table size before any SETTINGS (RFC 9113 §6.5.2).
const DEFAULT_TABLE: usize = 4096;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;

/// What the reassembler recognised, per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum H2Event {
    /// A decoded header block (a request's or response's head, or trailers).
    Head(Side, u32, Head),
    /// A header block of a connection joined mid-way that refers to the unknown HPACK table:
    /// the stream has a head here, what it says is not known.
    HiddenHead(Side, u32),
    /// DATA payload, padding removed (still content-encoded).
    Body(Side, u32, Vec<u8>),
    /// The side ended the stream (END_STREAM).
    End(Side, u32),
    /// RST_STREAM from either side: the stream is over, whatever it delivered.
    Reset(u32),
    /// The connection can no longer be parsed (see the module docs); reported once.
    Broken(&'static str),
}

#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    /// A PUSH_PROMISE block: decoded for the table, otherwise ignored.
    push: bool,
    bytes: Vec<u8>,
}

struct Direction {
    buf: Vec<u8>,
    hpack: Decoder<'static>,
    block: Option<Block>,
    /// Frame boundaries are known (always, unless joined mid-way).
    synced: bool,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direction")
            .field("buf", &self.buf.len())
            .field("block", &self.block)
            .finish_non_exhaustive()
    }
}

impl Direction {
    fn new() -> Direction {
        let mut hpack = Decoder::new();
        hpack.set_max_allowed_table_size(DEFAULT_TABLE);
        Direction {
            buf: Vec::new(),
            hpack,
            block: None,
            synced: true,
        }
    }
}

/// One HTTP/2 connection's reassembler.
#[derive(Debug)]
pub struct H2Connection {
    req: Direction,
    resp: Direction,
    /// Bytes of the client preface still expected on the request side.
    preface_left: usize,
    broken: bool,
    /// Joined mid-connection: HPACK state unknown, frame boundaries found by [`sync`].
    midway: bool,
}

impl Default for H2Connection {
    fn default() -> Self {
        H2Connection::new()
    }
}

impl H2Connection {
    /// A connection whose request side starts with the client preface.
    pub fn new() -> H2Connection {
        H2Connection {
            req: Direction::new(),
            resp: Direction::new(),
            preface_left: PREFACE.len(),
            broken: false,
            midway: false,
        }
    }

    /// A connection joined after its preface: each side is searched for frames first.
    pub fn midway() -> H2Connection {
        let mut c = H2Connection {
            preface_left: 0,
            midway: true,
            ..H2Connection::new()
        };
        c.req.synced = false;
        c.resp.synced = false;
        c
    }

    /// Whether frames were found on either side (always, unless joined mid-way).
    pub fn is_synced(&self) -> bool {
        self.req.synced || self.resp.synced
    }

    /// Bytes of `side` were lost: a side of a mid-way connection not synced yet keeps
    /// searching from the next ones; once synced, it is a [`H2Connection::gap`].
    pub fn lost(&mut self, side: Side, out: &mut Vec<H2Event>) {
        let dir = match side {
            Side::Request => &mut self.req,
            Side::Response => &mut self.resp,
        };
        if dir.synced {
            self.gap(out);
        } else {
            dir.buf = Vec::new();
        }
    }

    /// Bytes buffered (partial frames and header blocks), for memory accounting.
    pub fn buffered(&self) -> usize {
        [&self.req, &self.resp]
            .iter()
            .map(|d| d.buf.capacity() + d.block.as_ref().map_or(0, |b| b.bytes.capacity()))
            .sum()
    }

    /// Whether parsing stopped for good.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Feeds bytes of one side, in order.
    pub fn feed(&mut self, side: Side, mut data: &[u8], out: &mut Vec<H2Event>) {
        if self.broken {
            return;
        }
        if side == Side::Request && self.preface_left > 0 {
            let at = PREFACE.len() - self.preface_left;
            let n = self.preface_left.min(data.len());
            if data[..n] != PREFACE[at..at + n] {
                return self.fail("bad client preface", out);
            }
            self.preface_left -= n;
            data = &data[n..];
        }
        if data.is_empty() {
            return;
        }
        let dir = match side {
            Side::Request => &mut self.req,
            Side::Response => &mut self.resp,
        };
        dir.buf.extend_from_slice(data);
        let mut buf = std::mem::take(&mut dir.buf);
        if !dir.synced {
            let other_synced = match side {
                Side::Request => self.resp.synced,
                Side::Response => self.req.synced,
            };
            let frames = if other_synced {
                sync::SYNC_FRAMES_OTHER_SYNCED
            } else {
                sync::SYNC_FRAMES
            };
            let dir = match side {
                Side::Request => &mut self.req,
                Side::Response => &mut self.resp,
            };
            match sync::find(&buf, frames) {
                sync::Sync::At(at) => {
                    buf.drain(..at);
                    dir.synced = true;
                }
                sync::Sync::Wait(at) => {
                    buf.drain(..at);
                    // A large read searched through: keep only what is left (≤ 3 frames).
                    if buf.capacity() > 4 * buf.len().max(1 << 12) {
                        buf.shrink_to_fit();
                    }
                    dir.buf = buf;
                    return;
                }
            }
        }
        let mut at = 0;
        while buf.len() - at >= 9 {
            let h = &buf[at..at + 9];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            if len > MAX_FRAME {
                return self.fail("frame larger than 1 MiB", out);
            }
            if buf.len() - at < 9 + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let payload = &buf[at + 9..at + 9 + len];
            at += 9 + len;
            if let Err(why) = self.frame(side, kind, flags, stream, payload, out) {
                return self.fail(why, out);
            }
        }
        let dir = match side {
            Side::Request => &mut self.req,
            Side::Response => &mut self.resp,
        };
        buf.drain(..at);
        if buf.is_empty() {
            buf = Vec::new();
        }
        dir.buf = buf;
    }

    /// Bytes of `side` were not captured: frame boundaries are lost.
    pub fn gap(&mut self, out: &mut Vec<H2Event>) {
        if !self.broken {
            self.fail("bytes lost", out);
        }
    }

    fn fail(&mut self, why: &'static str, out: &mut Vec<H2Event>) {
        self.broken = true;
        // Synced stays as it was: a broken connection is not searched again.
        let synced = (self.req.synced, self.resp.synced);
        self.req = Direction::new();
        self.resp = Direction::new();
        (self.req.synced, self.resp.synced) = synced;
        out.push(H2Event::Broken(why));
    }

    fn frame(
        &mut self,
        side: Side,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<H2Event>,
    ) -> Result<(), &'static str> {
        let midway = self.midway;
        let (dir, other) = match side {
            Side::Request => (&mut self.req, &mut self.resp),
            Side::Response => (&mut self.resp, &mut self.req),
        };
        let f = Frame {
            kind,
            flags,
            stream,
            payload,
        };
        if dir.block.is_some() {
            return continue_block(side, dir, &f, midway, out);
        }
        match kind {
            DATA => data(side, &f, out)?,
            HEADERS | PUSH_PROMISE => open_block(side, dir, &f, midway, out)?,
            // Joined mid-way, the frames found may start inside a header block.
            CONTINUATION if midway => {}
            CONTINUATION => return Err("CONTINUATION without a header block"),
            RST_STREAM if stream != 0 => out.push(H2Event::Reset(stream)),
            SETTINGS if flags & ACK == 0 => settings(other, payload)?,
            // PRIORITY, SETTINGS ACK, PING, GOAWAY, WINDOW_UPDATE and extension frames carry
            // nothing the observer needs.
            _ => {}
        }
        Ok(())
    }
}

/// One frame: its header's fields and its payload.
struct Frame<'a> {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &'a [u8],
}

/// A frame while a header block is open: only CONTINUATION of the same stream may follow;
/// the block is decoded at END_HEADERS.
fn continue_block(
    side: Side,
    dir: &mut Direction,
    f: &Frame<'_>,
    midway: bool,
    out: &mut Vec<H2Event>,
) -> Result<(), &'static str> {
    let Some(block) = dir.block.as_mut() else {
        return Ok(());
    };
    if f.kind != CONTINUATION || f.stream != block.stream {
        return Err("frame inside a header block");
    }
    if block.bytes.len() + f.payload.len() > MAX_HEADER_BLOCK {
        return Err("header block larger than 256 KiB");
    }
    block.bytes.extend_from_slice(f.payload);
    if f.flags & END_HEADERS != 0 {
        let block = dir.block.take().expect("checked above");
        decode(side, dir, block, midway, out)?;
    }
    Ok(())
}

/// A DATA frame: its body bytes (padding removed) and the stream's end.
fn data(side: Side, f: &Frame<'_>, out: &mut Vec<H2Event>) -> Result<(), &'static str> {
    if f.stream == 0 {
        return Err("DATA on stream 0");
    }
    let data = unpad(f.flags, f.payload)?;
    if !data.is_empty() {
        out.push(H2Event::Body(side, f.stream, data.to_vec()));
    }
    if f.flags & END_STREAM != 0 {
        out.push(H2Event::End(side, f.stream));
    }
    Ok(())
}

/// A HEADERS or PUSH_PROMISE frame starts a header block: decoded now if it ends here
/// (END_HEADERS), else kept open for CONTINUATION frames.
fn open_block(
    side: Side,
    dir: &mut Direction,
    f: &Frame<'_>,
    midway: bool,
    out: &mut Vec<H2Event>,
) -> Result<(), &'static str> {
    let block = if f.kind == PUSH_PROMISE {
        let fragment = unpad(f.flags, f.payload)?;
        let fragment = fragment.get(4..).ok_or("PUSH_PROMISE cut short")?;
        Block {
            stream: f.stream,
            end_stream: false,
            push: true,
            bytes: fragment.to_vec(),
        }
    } else {
        if f.stream == 0 {
            return Err("HEADERS on stream 0");
        }
        let mut fragment = unpad(f.flags, f.payload)?;
        if f.flags & PRIORITY != 0 {
            fragment = fragment.get(5..).ok_or("HEADERS priority cut short")?;
        }
        Block {
            stream: f.stream,
            end_stream: f.flags & END_STREAM != 0,
            push: false,
            bytes: fragment.to_vec(),
        }
    };
    if f.flags & END_HEADERS != 0 {
        decode(side, dir, block, midway, out)?;
    } else {
        dir.block = Some(block);
    }
    Ok(())
}

/// A SETTINGS frame (not an ACK): the only setting read is the header table size, which bounds
/// the other direction's HPACK table.
fn settings(other: &mut Direction, payload: &[u8]) -> Result<(), &'static str> {
    if !payload.len().is_multiple_of(6) {
        return Err("SETTINGS length not a multiple of 6");
    }
    for s in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([s[0], s[1]]);
        let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
        if id == SETTINGS_HEADER_TABLE_SIZE {
            // What this side's decoder allows bounds the other side's encoder.
            let allowed = usize::try_from(value).unwrap_or(usize::MAX).min(MAX_TABLE);
            other
                .hpack
                .set_max_allowed_table_size(allowed.max(DEFAULT_TABLE));
        }
    }
    Ok(())
}

/// A padded frame's content (RFC 9113 §6.1).
fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], &'static str> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let (&pad, rest) = payload
        .split_first()
        .ok_or("padded frame without its length")?;
    rest.len()
        .checked_sub(usize::from(pad))
        .map(|n| &rest[..n])
        .ok_or("padding longer than the frame")
}

/// Decodes a complete header block (always, to keep the table in step) and reports it. Joined
/// mid-way, the block is decoded alone with an empty table (see the module docs).
fn decode(
    side: Side,
    dir: &mut Direction,
    block: Block,
    midway: bool,
    out: &mut Vec<H2Event>,
) -> Result<(), &'static str> {
    if midway {
        let mut alone = Decoder::new();
        alone.set_max_allowed_table_size(MAX_TABLE);
        let decoded = read_block(&mut alone, &block.bytes);
        if block.push {
            return Ok(());
        }
        out.push(match decoded {
            Ok((head, true)) => H2Event::Head(side, block.stream, head),
            _ => H2Event::HiddenHead(side, block.stream),
        });
        if block.end_stream {
            out.push(H2Event::End(side, block.stream));
        }
        return Ok(());
    }
    let (head, status_ok) = read_block(&mut dir.hpack, &block.bytes)?;
    if block.push {
        return Ok(());
    }
    if !status_ok {
        return Err("malformed :status");
    }
    out.push(H2Event::Head(side, block.stream, head));
    if block.end_stream {
        out.push(H2Event::End(side, block.stream));
    }
    Ok(())
}

/// The head a header block carries (the headers the observer keeps), and whether its `:status`
/// (if any) is a number.
fn read_block(hpack: &mut Decoder<'static>, bytes: &[u8]) -> Result<(Head, bool), &'static str> {
    let mut head = Head::default();
    let mut status_ok = true;
    hpack
        .decode_with_cb(bytes, |name, value| {
            let Ok(value) = std::str::from_utf8(&value) else {
                return;
            };
            match &*name {
                b":method" => head.method = value.to_owned(),
                b":path" => head.path = value.to_owned(),
                b":authority" => head.host = Some(value.to_owned()),
                b"host" if head.host.is_none() => head.host = Some(value.to_owned()),
                b":status" => match value.parse() {
                    Ok(s) => head.status = s,
                    Err(_) => status_ok = false,
                },
                b"content-type" => head.content_type = Some(value.to_owned()),
                b"content-encoding" => head.content_encoding = Some(value.to_owned()),
                b"content-length" => head.content_length = value.parse().ok(),
                b"x-tenant-id" => head.tenant = Some(value.to_owned()),
                b"x-feature-name" => head.feature = Some(value.to_owned()),
                _ => {}
            }
        })
        .map_err(|_| "HPACK decoding failed")?;
    Ok((head, status_ok))
}

#[cfg(test)]
pub(crate) mod tests;
