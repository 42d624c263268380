//! The response body: pre-rendered frames sent with delays, optional gzip, injected faults, and a
//! ledger record written when the last frame leaves (before the client can see the end) or when the
//! connection drops.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::billing::{MockLedger, ServedCall};

/// Pause between the last frame and an injected reset.
const RESET_GRACE: Duration = Duration::from_millis(30);

/// What happens once `at` frames are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    /// Send everything.
    None,
    /// Error the body (hyper aborts the connection) and reset the TCP connection.
    Reset { at: usize },
    /// Stop sending, keep the connection open.
    Stall { at: usize },
}

/// A call's record, finished by the body.
pub(super) struct Pending {
    pub call: ServedCall,
    pub ledger: MockLedger,
    /// Frame index carrying the final usage record; the call counts as reported once it is sent.
    pub usage_frame: Option<usize>,
    /// Whether frames were altered (truncated / invalid), making the usage unreadable past this index.
    pub broken_from: Option<usize>,
}

/// Streams frames; see the module docs.
pub(super) struct MockBody {
    frames: std::vec::IntoIter<Bytes>,
    total: usize,
    sent: usize,
    delay: Duration,
    /// Frames from this index on are sent without the delay (the provider's trailer).
    trailer_from: usize,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Pause before the end of the body (taken once).
    end_delay: Duration,
    cut: Cut,
    gzip: Option<GzEncoder<Vec<u8>>>,
    size: Option<u64>,
    pending: Option<Pending>,
    reset_conn: Option<Arc<AtomicBool>>,
    reset_armed: bool,
}

/// Error that makes hyper abort the connection.
#[derive(Debug)]
pub(super) struct InjectedReset;

impl std::fmt::Display for InjectedReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock provider: injected connection reset")
    }
}

impl std::error::Error for InjectedReset {}

impl MockBody {
    /// A body of `frames`; `exact_len` sends a Content-Length (only when no frame is cut or delayed).
    pub(super) fn new(
        frames: Vec<Bytes>,
        delay: Duration,
        cut: Cut,
        gzip: bool,
        exact_len: bool,
    ) -> MockBody {
        let total = frames.len();
        let size = (exact_len && !gzip && cut == Cut::None)
            .then(|| frames.iter().map(|f| f.len() as u64).sum());
        MockBody {
            frames: frames.into_iter(),
            total,
            sent: 0,
            delay,
            trailer_from: usize::MAX,
            sleep: None,
            end_delay: Duration::ZERO,
            cut,
            gzip: gzip.then(|| GzEncoder::new(Vec::with_capacity(256), Compression::fast())),
            size,
            pending: None,
            reset_conn: None,
            reset_armed: false,
        }
    }

    /// An empty-or-fixed body with no record attached.
    pub(super) fn full(body: impl Into<Bytes>) -> MockBody {
        MockBody::new(vec![body.into()], Duration::ZERO, Cut::None, false, true)
    }

    /// Sends frames from index `from` on right after the one before, as providers send their
    /// trailer events.
    pub(super) fn with_trailer_from(mut self, from: usize) -> MockBody {
        self.trailer_from = from;
        self
    }

    /// Pauses `delay` after the last frame before ending the body, so the end of a chunked body
    /// is written on its own.
    pub(super) fn with_end_delay(mut self, delay: Duration) -> MockBody {
        self.end_delay = delay;
        self
    }

    /// Attaches the ledger record the body completes.
    pub(super) fn with_record(mut self, pending: Pending, reset_conn: Arc<AtomicBool>) -> MockBody {
        self.pending = Some(pending);
        self.reset_conn = Some(reset_conn);
        self
    }

    fn finish(&mut self, disconnected: bool) {
        if let Some(mut p) = self.pending.take() {
            p.call.chunks_sent = self.sent;
            p.call.chunks_planned = self.total;
            p.call.client_disconnected = disconnected;
            p.call.usage_reported = p
                .usage_frame
                .is_some_and(|u| self.sent > u && p.broken_from.is_none_or(|b| b > u));
            p.ledger.push(p.call);
        }
    }

    fn compress(&mut self, data: &[u8], last: bool) -> Bytes {
        let Some(gz) = self.gzip.as_mut() else {
            return Bytes::copy_from_slice(data);
        };
        let _ = gz.write_all(data);
        if last {
            let gz = self.gzip.take().expect("checked above");
            return Bytes::from(gz.finish().unwrap_or_default());
        }
        let _ = gz.flush();
        Bytes::from(std::mem::take(gz.get_mut()))
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = InjectedReset;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, InjectedReset>>> {
        let this = &mut *self;
        loop {
            if let Some(s) = this.sleep.as_mut() {
                if s.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            match this.cut {
                Cut::Reset { at } if this.sent >= at => {
                    if !this.reset_armed {
                        // Let the client read what was sent: a reset discards unread data on arrival.
                        this.reset_armed = true;
                        this.sleep = Some(Box::pin(tokio::time::sleep(RESET_GRACE)));
                        continue;
                    }
                    if let Some(flag) = &this.reset_conn {
                        flag.store(true, Ordering::Relaxed);
                    }
                    this.finish(false);
                    return Poll::Ready(Some(Err(InjectedReset)));
                }
                Cut::Stall { at } if this.sent >= at => {
                    // Park "forever"; the record is written when the client gives up.
                    this.sleep = Some(Box::pin(tokio::time::sleep(Duration::from_secs(24 * 3600))));
                    continue;
                }
                _ => {}
            }
            let Some(frame) = this.frames.next() else {
                this.finish(false);
                if let Some(gz) = this.gzip.take() {
                    let tail = gz.finish().unwrap_or_default();
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                    }
                }
                if !this.end_delay.is_zero() {
                    this.sleep = Some(Box::pin(tokio::time::sleep(this.end_delay)));
                    this.end_delay = Duration::ZERO;
                    continue;
                }
                return Poll::Ready(None);
            };
            this.sent += 1;
            let last = this.sent == this.total;
            if last && this.cut == Cut::None {
                // Record before the client can see the end of the body.
                this.finish(false);
            } else if !this.delay.is_zero() && this.sent < this.trailer_from {
                this.sleep = Some(Box::pin(tokio::time::sleep(this.delay)));
            }
            let data = this.compress(&frame, last && this.cut == Cut::None);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.total == 0 && self.pending.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.size
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl Drop for MockBody {
    fn drop(&mut self) {
        self.finish(true);
    }
}
