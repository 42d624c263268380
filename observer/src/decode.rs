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

enum Inner {
    Identity,
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    RawDeflate(flate2::write::DeflateDecoder<Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

/// A streaming decoder for one body.
pub struct BodyDecoder {
    inner: Inner,
    name: &'static str,
    produced: usize,
    first: bool,
}

impl std::fmt::Debug for BodyDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyDecoder")
            .field("encoding", &self.name)
            .field("produced", &self.produced)
            .finish()
    }
}

impl BodyDecoder {
    /// A decoder for a `Content-Encoding` value (None or "identity" = pass-through).
    pub fn new(encoding: Option<&str>) -> Result<BodyDecoder, DecodeError> {
        let enc = encoding
            .map(|e| e.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let (inner, name) = match enc.as_str() {
            "" | "identity" => (Inner::Identity, "identity"),
            "gzip" | "x-gzip" => (
                Inner::Gzip(flate2::write::MultiGzDecoder::new(Vec::new())),
                "gzip",
            ),
            "deflate" => (
                Inner::Deflate(flate2::write::ZlibDecoder::new(Vec::new())),
                "deflate",
            ),
            "br" => (
                Inner::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096))),
                "br",
            ),
            "zstd" => {
                let d = zstd::stream::write::Decoder::new(Vec::new()).map_err(|source| {
                    DecodeError::Corrupt {
                        encoding: "zstd",
                        source,
                    }
                })?;
                (Inner::Zstd(d), "zstd")
            }
            other => return Err(DecodeError::Unsupported(other.to_owned())),
        };
        Ok(BodyDecoder {
            inner,
            name,
            produced: 0,
            first: true,
        })
    }

    /// Decodes the next piece of the body; returns the newly available plaintext.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>, DecodeError> {
        if self.produced >= MAX_DECODED {
            return Ok(Vec::new());
        }
        // "deflate" is zlib-wrapped per RFC 9110, but some servers send raw deflate: sniff it.
        if self.first
            && matches!(self.inner, Inner::Deflate(_))
            && !data.is_empty()
            && data[0] & 0x0f != 8
        {
            self.inner = Inner::RawDeflate(flate2::write::DeflateDecoder::new(Vec::new()));
        }
        self.first = false;
        let name = self.name;
        let err = |source| DecodeError::Corrupt {
            encoding: name,
            source,
        };
        let mut out = match &mut self.inner {
            Inner::Identity => data.to_vec(),
            Inner::Gzip(d) => {
                d.write_all(data).and_then(|()| d.flush()).map_err(err)?;
                std::mem::take(d.get_mut())
            }
            Inner::Deflate(d) => {
                d.write_all(data).and_then(|()| d.flush()).map_err(err)?;
                std::mem::take(d.get_mut())
            }
            Inner::RawDeflate(d) => {
                d.write_all(data).and_then(|()| d.flush()).map_err(err)?;
                std::mem::take(d.get_mut())
            }
            Inner::Brotli(d) => {
                d.write_all(data).and_then(|()| d.flush()).map_err(err)?;
                std::mem::take(d.get_mut())
            }
            Inner::Zstd(d) => {
                d.write_all(data).and_then(|()| d.flush()).map_err(err)?;
                std::mem::take(d.get_mut())
            }
        };
        let room = MAX_DECODED - self.produced;
        out.truncate(room);
        self.produced += out.len();
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

    #[test]
    fn corrupt_and_unknown_are_errors() {
        assert!(BodyDecoder::new(Some("compress")).is_err());
        let mut d = BodyDecoder::new(Some("gzip")).unwrap();
        assert!(d.feed(b"definitely not gzip at all").is_err());
    }
}
