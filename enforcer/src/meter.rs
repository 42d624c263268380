//! The response side of the hot path: a body wrapper that passes each upstream frame to the client
//! as it arrives, feeds it to the ledger's [`StreamMeter`], enforces the idle timeout, and settles
//! the reservation when the stream ends — or, if the client goes away, in a task spawned from Drop
//! (never blocking), cutting the usage-only event the enforcer asked for
//! ([`crate::usage_filter`]). Phase 4 of a call, **meter**; phase 5, settle, is [`crate::settle`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use ledger::usage::{StreamMeter, Usage};
use tokio::time::Sleep;

use crate::inflight::BodyPermit;
use crate::settle::{Outcome, Settler};
use crate::usage_filter::UsageChunkFilter;

/// Boxed error of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed upstream body being metered on its way to the client.
pub struct MeteredBody {
    inner: Incoming,
    meter: Option<StreamMeter>,
    filter: Option<UsageChunkFilter>,
    idle: Duration,
    /// Fires at the earliest possible idle deadline; when it does, the deadline is recomputed
    /// from `last_frame` (re-arming the timer on every frame would cost a timer-wheel update per
    /// SSE event).
    timer: Pin<Box<Sleep>>,
    /// When the upstream last sent a frame.
    last_frame: tokio::time::Instant,
    settler: Option<Settler>,
    /// The stream's first bytes, kept (up to [`OBJECT_HEAD_BYTES`]) only while the call stores
    /// an object whose id the first event names.
    head: Option<Vec<u8>>,
    delivered: bool,
    done: bool,
}

/// How many first bytes of a stream are kept to find a stored object's id (the first event).
const OBJECT_HEAD_BYTES: usize = 16 * 1024;

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
            last_frame: tokio::time::Instant::now(),
            head: settler.stored.is_some().then(Vec::new),
            settler: Some(settler),
            delivered: false,
            done: false,
        }
    }

    /// Keeps the first bytes until the stored object's id is found or the cap is reached.
    fn keep_head(&mut self, data: &[u8]) {
        let Some(head) = self.head.as_mut() else {
            return;
        };
        let room = OBJECT_HEAD_BYTES.saturating_sub(head.len());
        head.extend_from_slice(&data[..data.len().min(room)]);
        if let Some(s) = self.settler.as_mut() {
            s.note_object(head);
            if s.stored.as_ref().is_some_and(|o| o.id.is_some()) || head.len() >= OBJECT_HEAD_BYTES
            {
                self.head = None;
            }
        }
    }

    /// Settles with what the meter saw and how the stream ended (`outcome`).
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
                    while this.timer.as_mut().poll(cx).is_ready() {
                        let deadline = this.last_frame + this.idle;
                        if tokio::time::Instant::now() < deadline {
                            // Frames came since the timer was set: wait for the real deadline
                            // (polling again registers the waker).
                            this.timer.as_mut().reset(deadline);
                            continue;
                        }
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
                    this.last_frame = tokio::time::Instant::now();
                    let Ok(data) = frame.into_data() else {
                        continue;
                    }; // trailers: dropped
                    if let Some(m) = this.meter.as_mut() {
                        m.feed(&data);
                    }
                    this.keep_head(&data);
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

/// Why a non-stream response body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// No frame within `timeouts.idle_ms`.
    #[error("stalled for {ms} ms (timeouts.idle_ms)")]
    Stalled {
        /// The limit.
        ms: u128,
    },
    /// Larger than `max_response_body_bytes`.
    #[error("body larger than {limit} bytes (max_response_body_bytes)")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The connection failed.
    #[error(transparent)]
    Transport(#[from] hyper::Error),
}

/// Polls a body to the end, enforcing the idle timeout and a size limit (non-stream responses),
/// counting what it holds in `permit` (the in-flight budget).
///
/// # Errors
/// [`BodyError`] on timeout, size overflow or transport error.
pub async fn collect_bounded(
    mut body: Incoming,
    limit: usize,
    idle: Duration,
    permit: &mut BodyPermit,
) -> Result<Bytes, BodyError> {
    // A declared length sizes the buffer once instead of doubling it up to twice the body.
    let hint = body.size_hint().exact().unwrap_or(0);
    let mut buf = BytesMut::with_capacity(usize::try_from(hint).unwrap_or(0).min(limit));
    permit.grow(buf.capacity());
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
        match tokio::time::timeout(idle, frame).await {
            Err(_) => {
                return Err(BodyError::Stalled {
                    ms: idle.as_millis(),
                });
            }
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    if buf.len() + d.len() > limit {
                        return Err(BodyError::TooLarge { limit });
                    }
                    buf.extend_from_slice(&d);
                    if buf.capacity() > permit.bytes() {
                        permit.grow(buf.capacity() - permit.bytes());
                    }
                }
            }
        }
    }
}
