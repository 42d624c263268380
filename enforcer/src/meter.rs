//! The response side of the hot path: a body wrapper that passes each upstream frame to the client
//! as it arrives, feeds it to the ledger's [`StreamMeter`], enforces the idle timeout, and settles
//! the reservation when the stream ends — or, if the client goes away, in a task spawned from Drop
//! (never blocking). For OpenAI chat streams where the enforcer added
//! `stream_options.include_usage`, the extra usage-only event is cut out before the client sees it,
//! leaving every other byte untouched.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use ledger::usage::{StreamMeter, Usage};
use tokio::time::Sleep;

use crate::error::ProxyError;
use crate::settle::{Outcome, Settler};

/// Boxed error of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Removes usage-only chat-completion chunks (`"choices": []` with a `usage` object) from an SSE
/// stream, working on whole events so every other byte passes unchanged.
#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    pending: BytesMut,
}

/// Position just past the first event terminator (blank line) in `b`, if any.
fn event_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'\n', b'\n') | (b'\r', b'\r') => return Some(i + 2),
            (b'\r', b'\n') if b.get(i + 2) == Some(&b'\r') && b.get(i + 3) == Some(&b'\n') => {
                return Some(i + 4);
            }
            (b'\n', b'\r') if b.get(i + 2) == Some(&b'\n') => return Some(i + 3),
            _ => i += 1,
        }
    }
    None
}

/// Whether one SSE event is a usage-only chat chunk.
fn is_usage_only(event: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(event) else {
        return false;
    };
    if !text.contains("\"usage\"") {
        return false;
    }
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect::<Vec<_>>()
        .join("\n");
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) else {
        return false;
    };
    v.get("choices")
        .and_then(serde_json::Value::as_array)
        .is_some_and(Vec::is_empty)
        && v.get("usage").is_some_and(serde_json::Value::is_object)
}

impl UsageChunkFilter {
    /// Takes a chunk; returns the bytes of every complete event except usage-only ones.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            let ev = self.pending.split_to(end);
            if !is_usage_only(&ev) {
                out.extend_from_slice(&ev);
            }
        }
        out.freeze()
    }

    /// The unterminated tail at end of stream, unchanged.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split().freeze();
        if is_usage_only(&rest) {
            Bytes::new()
        } else {
            rest
        }
    }
}

/// Adds `stream_options.include_usage = true` to an OpenAI chat request (the enforcer then
/// strips the extra usage event with [`UsageChunkFilter`]).
///
/// # Errors
/// [`ProxyError::BadBody`] when the body is not a JSON object.
pub fn inject_include_usage(body: &[u8]) -> Result<Bytes, ProxyError> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ProxyError::BadBody(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| ProxyError::BadBody("the body is not a JSON object".into()))?;
    let so = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    if !so.is_object() {
        *so = serde_json::json!({});
    }
    so["include_usage"] = serde_json::Value::Bool(true);
    Ok(Bytes::from(
        serde_json::to_vec(&v).map_err(|e| ProxyError::BadBody(e.to_string()))?,
    ))
}

/// A streamed upstream body being metered on its way to the client.
pub struct MeteredBody {
    inner: Incoming,
    meter: Option<StreamMeter>,
    filter: Option<UsageChunkFilter>,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    settler: Option<Settler>,
    delivered: bool,
    done: bool,
}

impl MeteredBody {
    /// Wraps `inner`; `strip_usage_chunk` when the enforcer injected include_usage.
    #[must_use]
    pub fn new(
        inner: Incoming,
        meter: StreamMeter,
        strip_usage_chunk: bool,
        idle: Duration,
        settler: Settler,
    ) -> Self {
        MeteredBody {
            inner,
            meter: Some(meter),
            filter: strip_usage_chunk.then(UsageChunkFilter::default),
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            settler: Some(settler),
            delivered: false,
            done: false,
        }
    }

    /// Settles with what the meter saw; `complete` is false when the stream broke off.
    fn settle(&mut self, outcome: Outcome) {
        let (Some(meter), Some(settler)) = (self.meter.take(), self.settler.take()) else {
            return;
        };
        let meta = meter.finish();
        let usage: Option<Usage> = meta.usage;
        settler.spawn_settle(meta.model, usage, outcome, self.delivered);
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    if this.timer.as_mut().poll(cx).is_ready() {
                        this.done = true;
                        this.settle(Outcome::Broken("idle timeout"));
                        let ms = this.idle.as_millis();
                        return Poll::Ready(Some(Err(format!(
                            "upstream stalled for {ms} ms (timeouts.idle_ms)"
                        )
                        .into())));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let tail = this
                        .filter
                        .as_mut()
                        .map(UsageChunkFilter::finish)
                        .unwrap_or_default();
                    this.settle(Outcome::Complete);
                    if tail.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(tail))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.settle(Outcome::Broken("upstream reset"));
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.timer.as_mut().reset(deadline);
                    let Ok(data) = frame.into_data() else {
                        continue;
                    }; // trailers: dropped
                    if let Some(m) = this.meter.as_mut() {
                        m.feed(&data);
                    }
                    let out = match this.filter.as_mut() {
                        Some(f) => f.push(&data),
                        None => data,
                    };
                    if out.is_empty() {
                        continue;
                    }
                    this.delivered = true;
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // Still holding the settler: the client went away before the end.
        self.settle(Outcome::Broken("client disconnected"));
    }
}

/// Polls a body to the end, enforcing the idle timeout and a size limit (non-stream responses).
///
/// # Errors
/// A message on timeout, size overflow or transport error.
pub async fn collect_bounded(
    mut body: Incoming,
    limit: usize,
    idle: Duration,
) -> Result<Bytes, String> {
    let mut buf = BytesMut::new();
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
        match tokio::time::timeout(idle, frame).await {
            Err(_) => {
                return Err(format!(
                    "stalled for {} ms (timeouts.idle_ms)",
                    idle.as_millis()
                ));
            }
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    if buf.len() + d.len() > limit {
                        return Err(format!(
                            "body larger than {limit} bytes (max_response_body_bytes)"
                        ));
                    }
                    buf.extend_from_slice(&d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_only_the_usage_chunk() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n\
                      data: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut f = UsageChunkFilter::default();
            let mut out = Vec::new();
            out.extend_from_slice(&f.push(&stream.as_bytes()[..split]));
            out.extend_from_slice(&f.push(&stream.as_bytes()[split..]));
            out.extend_from_slice(&f.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n",
                "split at {split}"
            );
        }
        let mut f = UsageChunkFilter::default();
        let crlf = "data: {\"choices\":[],\"usage\":{}}\r\n\r\ndata: x\r\n\r\n";
        assert_eq!(&f.push(crlf.as_bytes())[..], b"data: x\r\n\r\n");
    }

    #[test]
    fn injects_include_usage() {
        let b = inject_include_usage(br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
        let b = inject_include_usage(br#"{"model":"m","stream":true}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }
}
