//! The observer's pure parts, as a library so tests and fuzz targets reach them without the eBPF
//! object: HTTP/1.1 and HTTP/2 reassembly, body decoding, request/response pairing and metering, and the
//! config. Everything that loads programs, reads ring buffers or talks to Redis stays in the
//! binary (`main.rs`).

pub mod config;
pub mod decode;
pub mod exchange;
pub mod golang;
pub mod http1;
pub mod http2;
