//! Incremental Content-Encoding decoding (gzip, deflate, br, zstd) of captured response bodies,
//! bounded so a compression bomb cannot grow the daemon.

use std::io::Write;

/// Most decoded bytes one body may produce; the rest is dropped (and the body flagged).
pub const MAX_DECODED: usize = 8 * 1024 * 1024;

/// Why decoding stopped.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The encoding is not one the observer decodes.
    #[error("unsupported content-encoding {0:?}")]
    Unsupported(String),
    /// The compressed stream is corrupt.
    #[error("corrupt {encoding} body: {source}")]
    Corrupt {
        /// The encoding.
        encoding: &'static str,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
}

/// The `zstd` content coding limits the window to 8 MiB (RFC 9659); a frame asking for more is
/// refused rather than allocated.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Where a decompressor writes: takes at most the room left under [`MAX_DECODED`], then refuses
/// with an error, which stops the decompressor within one of its internal buffers. A bomb
/// therefore never materialises beyond the limit.
#[derive(Debug)]
struct Bounded {
    /// Decoded bytes not yet handed to the caller.
    out: Vec<u8>,
    /// How many more bytes this body may produce.
    room: usize,
    /// Bytes the decompressor offered once the room was used up (not kept).
    refused: usize,
}

impl Bounded {
    fn new() -> Self {
        Bounded {
            out: Vec::new(),
            room: MAX_DECODED,
            refused: 0,
        }
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.room == 0 {
            self.refused += buf.len();
            return Err(std::io::Error::other(
                "decoded body limit reached (MAX_DECODED)",
            ));
        }
        let n = buf.len().min(self.room);
        self.out.extend_from_slice(&buf[..n]);
        self.room -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Inner {
    Identity(Bounded),
    Gzip(flate2::write::MultiGzDecoder<Bounded>),
    Deflate(flate2::write::ZlibDecoder<Bounded>),
    RawDeflate(flate2::write::DeflateDecoder<Bounded>),
    Brotli(Box<brotli::DecompressorWriter<Bounded>>),
    Zstd(zstd::stream::write::Decoder<'static, Bounded>),
}

/// A streaming decoder for one body.
pub struct BodyDecoder {
    inner: Inner,
    name: &'static str,
    produced: usize,
    /// Decoded bytes dropped past [`MAX_DECODED`]; non-zero means the body was truncated and
    /// decoding stopped. The decompressor stops at the first refusal, so this stays within one
    /// of its internal buffers (or the rest of an identity piece), whatever the body would
    /// decode to.
    refused: usize,
    first: bool,
}

impl std::fmt::Debug for BodyDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyDecoder")
            .field("encoding", &self.name)
            .field("produced", &self.produced)
            .field("refused", &self.refused)
            .finish()
    }
}

/// Writes `data` into a decompressor and flushes what it can decode so far.
fn drive(d: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    d.write_all(data)?;
    d.flush()
}

impl BodyDecoder {
    /// A decoder for a `Content-Encoding` value (None or "identity" = pass-through).
    pub fn new(encoding: Option<&str>) -> Result<BodyDecoder, DecodeError> {
        let enc = encoding
            .map(|e| e.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let zstd_err = |source| DecodeError::Corrupt {
            encoding: "zstd",
            source,
        };
        let (inner, name) = match enc.as_str() {
            "" | "identity" => (Inner::Identity(Bounded::new()), "identity"),
            "gzip" | "x-gzip" => (
                Inner::Gzip(flate2::write::MultiGzDecoder::new(Bounded::new())),
                "gzip",
            ),
            "deflate" => (
                Inner::Deflate(flate2::write::ZlibDecoder::new(Bounded::new())),
                "deflate",
            ),
            "br" => (
                Inner::Brotli(Box::new(brotli::DecompressorWriter::new(
                    Bounded::new(),
                    4096,
                ))),
                "br",
            ),
            "zstd" => {
                let mut d = zstd::stream::write::Decoder::new(Bounded::new()).map_err(zstd_err)?;
                d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(zstd_err)?;
                (Inner::Zstd(d), "zstd")
            }
            other => return Err(DecodeError::Unsupported(other.to_owned())),
        };
        Ok(BodyDecoder {
            inner,
            name,
            produced: 0,
            refused: 0,
            first: true,
        })
    }

    /// The body decoded to more than [`MAX_DECODED`] bytes: the rest was dropped.
    #[must_use]
    pub fn truncated(&self) -> bool {
        self.refused > 0
    }

    /// Decodes the next piece of the body; returns the newly available plaintext. Once the body
    /// has decoded to [`MAX_DECODED`] bytes the rest is dropped: decoding stops there and later
    /// pieces yield nothing.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>, DecodeError> {
        if self.truncated() {
            return Ok(Vec::new());
        }
        // "deflate" is zlib-wrapped per RFC 9110, but some servers send raw deflate: sniff it
        // from the first byte (an empty piece has none: keep waiting).
        if self.first && !data.is_empty() {
            self.first = false;
            if matches!(self.inner, Inner::Deflate(_)) && data[0] & 0x0f != 8 {
                self.inner = Inner::RawDeflate(flate2::write::DeflateDecoder::new(Bounded::new()));
            }
        }
        let (result, sink) = match &mut self.inner {
            Inner::Identity(s) => (s.write_all(data), s),
            Inner::Gzip(d) => (drive(d, data), d.get_mut()),
            Inner::Deflate(d) => (drive(d, data), d.get_mut()),
            Inner::RawDeflate(d) => (drive(d, data), d.get_mut()),
            Inner::Brotli(d) => (drive(d.as_mut(), data), d.get_mut()),
            Inner::Zstd(d) => (drive(d, data), d.get_mut()),
        };
        let out = std::mem::take(&mut sink.out);
        self.produced += out.len();
        if sink.refused > 0 {
            // The limit stopped the decompressor (whatever error it reported comes from that):
            // drop it now with its buffers and window.
            self.refused = sink.refused;
            self.inner = Inner::Identity(Bounded::new());
            return Ok(out);
        }
        result.map_err(|source| DecodeError::Corrupt {
            encoding: self.name,
            source,
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn roundtrip(encoding: &str, compressed: &[u8], plain: &[u8]) {
        let mut d = BodyDecoder::new(Some(encoding)).expect("decoder");
        let mut out = Vec::new();
        for piece in compressed.chunks(7) {
            out.extend(d.feed(piece).expect("decode"));
        }
        assert_eq!(out, plain, "{encoding}");
    }

    #[test]
    fn all_encodings_decode_incrementally() {
        let plain = b"data: {\"usage\":{\"prompt_tokens\":12}}\n\n".repeat(50);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).unwrap();
        roundtrip("gzip", &gz.finish().unwrap(), &plain);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&plain).unwrap();
        roundtrip("deflate", &z.finish().unwrap(), &plain);
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(&plain).unwrap();
        roundtrip("deflate", &raw.finish().unwrap(), &plain);
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(&plain).unwrap();
        }
        roundtrip("br", &br, &plain);
        roundtrip(
            "zstd",
            &zstd::encode_all(plain.as_slice(), 3).unwrap(),
            &plain,
        );
        roundtrip("identity", &plain, &plain);
    }

    /// `zeros` zero bytes compressed with `encoding`, written a MiB at a time.
    fn bomb(encoding: &str, zeros: usize) -> Vec<u8> {
        fn fill(w: &mut impl Write, zeros: usize) {
            let mib = vec![0u8; 1024 * 1024];
            let mut left = zeros;
            while left > 0 {
                let n = left.min(mib.len());
                w.write_all(&mib[..n]).unwrap();
                left -= n;
            }
        }
        match encoding {
            "gzip" => {
                let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                fill(&mut w, zeros);
                w.finish().unwrap()
            }
            "deflate" => {
                let mut w =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                fill(&mut w, zeros);
                w.finish().unwrap()
            }
            "br" => {
                let mut out = Vec::new();
                {
                    let mut w = brotli::CompressorWriter::new(&mut out, 4096, 1, 22);
                    fill(&mut w, zeros);
                }
                out
            }
            "zstd" => {
                let mut w = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
                fill(&mut w, zeros);
                w.finish().unwrap()
            }
            "identity" => vec![0; zeros],
            other => panic!("no bomb for {other}"),
        }
    }

    #[test]
    fn bombs_are_capped_and_stop_decoding_early() {
        for encoding in ["gzip", "deflate", "br", "zstd", "identity"] {
            let compressed = bomb(encoding, 64 * 1024 * 1024);
            let mut d = BodyDecoder::new(Some(encoding)).expect("decoder");
            let out = d.feed(&compressed).expect("a capped bomb is not an error");
            assert_eq!(out.len(), MAX_DECODED, "{encoding}: output is capped");
            assert!(out.iter().all(|&b| b == 0), "{encoding}");
            // The decompressor stopped at the limit: past it, it offered at most one of its
            // buffers, not the 56 MiB the body would still decode to.
            assert!(d.truncated(), "{encoding}: truncation is flagged");
            if encoding != "identity" {
                assert!(
                    d.refused <= 256 * 1024,
                    "{encoding}: {} bytes decoded past the limit",
                    d.refused
                );
            }
            assert_eq!(d.produced, MAX_DECODED);
            assert!(matches!(d.inner, Inner::Identity(_)), "{encoding}: dropped");
            // Later pieces yield nothing.
            assert!(d.feed(&compressed).expect("after the cap").is_empty());
            assert_eq!(d.produced, MAX_DECODED);
        }
    }

    #[test]
    fn bomb_fed_in_pieces_is_capped_too() {
        for encoding in ["gzip", "br", "zstd"] {
            let compressed = bomb(encoding, 2 * MAX_DECODED);
            let mut d = BodyDecoder::new(Some(encoding)).expect("decoder");
            let mut total = 0;
            for piece in compressed.chunks(64) {
                total += d.feed(piece).expect("decode").len();
            }
            assert_eq!(total, MAX_DECODED, "{encoding}");
            assert!(d.refused > 0 && d.refused <= 256 * 1024, "{encoding}");
        }
    }

    #[test]
    fn a_body_exactly_at_the_limit_is_not_truncated() {
        for encoding in ["gzip", "zstd", "identity"] {
            let compressed = bomb(encoding, MAX_DECODED);
            let mut d = BodyDecoder::new(Some(encoding)).expect("decoder");
            let out = d.feed(&compressed).expect("decode");
            assert_eq!(out.len(), MAX_DECODED, "{encoding}");
            assert!(!d.truncated(), "{encoding}: nothing was dropped");
        }
    }

    #[test]
    fn zstd_window_over_8_mib_is_refused() {
        let mut w = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        w.window_log(24).unwrap();
        w.write_all(b"hello").unwrap();
        let frame = w.finish().unwrap();
        let mut d = BodyDecoder::new(Some("zstd")).expect("decoder");
        assert!(matches!(
            d.feed(&frame),
            Err(DecodeError::Corrupt {
                encoding: "zstd",
                ..
            })
        ));
        let mut w = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        w.window_log(23).unwrap();
        w.write_all(b"hello").unwrap();
        let frame = w.finish().unwrap();
        let mut d = BodyDecoder::new(Some("zstd")).expect("decoder");
        assert_eq!(d.feed(&frame).expect("8 MiB window"), b"hello");
    }

    #[test]
    fn raw_deflate_is_sniffed_after_an_empty_first_piece() {
        // Found by the observer_decode fuzz target: an empty first piece used to end the sniffing,
        // so a raw deflate body was then read as zlib and reported corrupt.
        let plain = b"data: {\"usage\":{\"prompt_tokens\":12}}\n\n".repeat(5);
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(&plain).unwrap();
        let raw = raw.finish().unwrap();
        let mut d = BodyDecoder::new(Some("deflate")).expect("decoder");
        let mut out = d.feed(b"").expect("an empty piece");
        out.extend(d.feed(&raw).expect("raw deflate"));
        assert_eq!(out, plain);
    }

    #[test]
    fn corrupt_and_unknown_are_errors() {
        assert!(BodyDecoder::new(Some("compress")).is_err());
        let mut d = BodyDecoder::new(Some("gzip")).unwrap();
        assert!(d.feed(b"definitely not gzip at all").is_err());
    }
}
