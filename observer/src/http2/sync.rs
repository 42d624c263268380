//! Finding frame boundaries in an HTTP/2 byte stream joined mid-connection (the observer
//! attached after the client preface): a position is taken as a frame start only when
//! [`SYNC_FRAMES`] frame headers chain from it, each one plausible as a real peer writes it
//! (known type, defined flags only, length within the protocol default, reserved bit clear,
//! stream-id and length rules of its type, CONTINUATION only inside a header block). Text never
//! matches (a frame's first byte is 0 at these lengths) and random bytes match a chain of three
//! with a probability below 1e-15 per offset, so garbage does not become frames.
//!
//! The decision at each offset depends only on the bytes (an offset is rejected by an
//! implausible header, accepted by a complete chain, otherwise undecided), and the first
//! non-rejected offset decides: the result does not depend on how the bytes were cut.

use super::{CONTINUATION, DATA, END_HEADERS, END_STREAM, HEADERS, PADDED, PRIORITY};

/// Frames that must chain before a side is taken as HTTP/2.
pub const SYNC_FRAMES: usize = 3;
/// Frames that must chain when the other side of the connection is already synced (a
/// non-streamed response can be just HEADERS + DATA).
pub const SYNC_FRAMES_OTHER_SYNCED: usize = 2;
/// Largest frame accepted while syncing: `SETTINGS_MAX_FRAME_SIZE`'s initial value, which the
/// common clients and servers keep (a peer sending larger frames syncs on its smaller ones).
pub const SYNC_MAX_FRAME: usize = 1 << 14;

const PRIORITY_FRAME: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const ACK: u8 = 0x1;

/// Where the frames start, or from where to keep looking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// `frames` plausible frames chain from this offset.
    At(usize),
    /// Every offset before this one is rejected; this one needs more bytes to decide.
    Wait(usize),
}

/// The first offset of `buf` where `frames` plausible frames chain (see the module docs).
pub fn find(buf: &[u8], frames: usize) -> Sync {
    for at in 0..buf.len() {
        match chain(&buf[at..], frames) {
            Some(true) => return Sync::At(at),
            Some(false) => {}
            None => return Sync::Wait(at),
        }
    }
    Sync::Wait(buf.len())
}

/// Whether `frames` plausible frames chain from the start of `b`: `None` when more bytes are
/// needed to tell.
fn chain(b: &[u8], frames: usize) -> Option<bool> {
    let mut at = 0;
    // The stream of a header block left open by the previous frame (HEADERS without
    // END_HEADERS): only its CONTINUATION may follow.
    let mut open_block: Option<u32> = None;
    for n in 0..frames {
        let h = b.get(at..at + 9)?;
        let Some((len, kind, flags, stream)) = plausible(h) else {
            return Some(false);
        };
        match (open_block, kind) {
            (Some(s), CONTINUATION) if s == stream => {}
            (Some(_), _) => return Some(false),
            // A chain may start inside a header block, never continue one it did not open.
            (None, CONTINUATION) if n > 0 => return Some(false),
            _ => {}
        }
        open_block = match kind {
            HEADERS | PUSH_PROMISE | CONTINUATION if flags & END_HEADERS == 0 => Some(stream),
            _ => None,
        };
        if b.len() - at - 9 < len {
            return None;
        }
        at += 9 + len;
    }
    Some(true)
}

/// A frame header as real peers write it: (length, type, flags, stream) or `None`.
fn plausible(h: &[u8]) -> Option<(usize, u8, u8, u32)> {
    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
    let (kind, flags) = (h[3], h[4]);
    if len > SYNC_MAX_FRAME || h[5] & 0x80 != 0 {
        return None;
    }
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
    // Streams are client-initiated (odd) unless pushed; clients of LLM APIs turn push off.
    let client_stream = stream % 2 == 1;
    let ok = match kind {
        DATA => flags & !(END_STREAM | PADDED) == 0 && client_stream,
        HEADERS => {
            flags & !(END_STREAM | END_HEADERS | PADDED | PRIORITY) == 0 && client_stream && len > 0
        }
        PRIORITY_FRAME => flags == 0 && stream != 0 && len == 5,
        RST_STREAM => flags == 0 && stream != 0 && len == 4,
        SETTINGS => {
            stream == 0 && (flags == ACK && len == 0 || flags == 0 && len.is_multiple_of(6))
        }
        PUSH_PROMISE => flags & !(END_HEADERS | PADDED) == 0 && client_stream && len >= 4,
        PING => flags & !ACK == 0 && stream == 0 && len == 8,
        GOAWAY => flags == 0 && stream == 0 && len >= 8,
        WINDOW_UPDATE => flags == 0 && len == 4,
        CONTINUATION => flags & !END_HEADERS == 0 && client_stream,
        _ => false,
    };
    ok.then_some((len, kind, flags, stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http2::tests::frame;

    fn frames() -> Vec<u8> {
        let mut b = frame(HEADERS, END_HEADERS, 5, b"\x82\x86");
        b.extend(frame(DATA, 0, 5, b"{\"model\":\"x\"}"));
        b.extend(frame(DATA, END_STREAM, 5, b""));
        b
    }

    #[test]
    fn finds_frames_after_a_partial_one() {
        let mut b = b"tail of a previous frame".to_vec();
        let at = b.len();
        b.extend(frames());
        assert_eq!(find(&b, SYNC_FRAMES), Sync::At(at));
    }

    #[test]
    fn waits_for_a_whole_chain() {
        let b = frames();
        assert_eq!(find(&b[..b.len() - 1], SYNC_FRAMES), Sync::Wait(0));
        assert_eq!(find(&b[..20], SYNC_FRAMES), Sync::Wait(0));
        // Two frames are enough once the other side is synced.
        let two = frame(HEADERS, END_HEADERS, 5, b"\x88").into_iter();
        let two: Vec<u8> = two.chain(frame(DATA, END_STREAM, 5, b"{}")).collect();
        assert_eq!(find(&two, SYNC_FRAMES), Sync::Wait(0));
        assert_eq!(find(&two, SYNC_FRAMES_OTHER_SYNCED), Sync::At(0));
    }

    /// What searching costs on bytes that are not frames (a connection joined inside an
    /// HTTP/1.1 body, or another protocol): `cargo test -p observer --release --lib
    /// search_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, run in release"]
    fn search_throughput() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let random: Vec<u8> = (0..(16 << 20))
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed.to_le_bytes()[0]
            })
            .collect();
        let text = br#"{"id":"c","object":"chat.completion","choices":[{"text":"hello"}]} "#
            .repeat((16 << 20) / 70);
        for (what, bytes) in [("random", &random), ("json text", &text)] {
            // As the exchange feeds it: 16 KiB reads, undecided bytes kept for the next one.
            let mut c = crate::http2::H2Connection::midway();
            let mut out = Vec::new();
            let t = std::time::Instant::now();
            for chunk in bytes.chunks(16 << 10) {
                c.feed(crate::http1::Side::Response, chunk, &mut out);
            }
            let secs = t.elapsed().as_secs_f64();
            #[expect(clippy::cast_precision_loss, reason = "a measurement")]
            let mbps = bytes.len() as f64 / secs / 1e6;
            println!(
                "{what}: {mbps:.0} MB/s searched, synced: {}, {} bytes held",
                c.is_synced(),
                c.buffered()
            );
            assert!(!c.is_synced() && out.is_empty());
        }
    }

    #[test]
    fn text_and_implausible_headers_are_rejected() {
        let text = br#"{"model":"gpt-4o-mini","messages":[{"role":"user"}]} HTTP/1.1 200 OK"#;
        // Rejected up to where fewer than 9 bytes are left to tell.
        assert_eq!(find(text, 1), Sync::Wait(text.len() - 8));
        // An even stream, an unknown type, an undefined flag, a HEADERS inside a block.
        for bad in [
            frame(DATA, 0, 2, b"x"),
            frame(0x0b, 0, 1, b"x"),
            frame(DATA, 0x2, 1, b"x"),
            [
                frame(HEADERS, 0, 1, b"\x82"),
                frame(HEADERS, END_HEADERS, 1, b"\x82"),
            ]
            .concat(),
        ] {
            let mut b = bad.clone();
            b.extend(frame(DATA, 0, 1, b"y"));
            b.extend(frame(DATA, 0, 1, b"z"));
            assert!(
                !matches!(find(&b, SYNC_FRAMES), Sync::At(0)),
                "{bad:?} accepted"
            );
        }
    }
}
