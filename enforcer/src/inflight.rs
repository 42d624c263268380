//! The global in-flight body budget: request bodies read and non-stream responses buffered are
//! counted against `max_inflight_body_bytes`, so many large calls at once cannot exhaust the
//! enforcer's memory. A call whose request body does not fit is refused with 503 before anything
//! is held or forwarded; a buffered response of an admitted call is counted but never refused
//! (the provider already did the work), so new calls wait for it to drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use prometheus_client::metrics::gauge::Gauge;

use crate::ProxyBody;
use crate::meter::BoxError;

/// How many times its size a request body is counted: the bytes, the parsed JSON tree of the
/// prompt (its strings copied) and the tokeniser's working memory. Measured: eight concurrent
/// 4 MiB embeddings requests with tiny answers raise the enforcer's RSS by about 12 MiB each
/// (`tests/tests/enforcer_memory.rs`).
pub const REQUEST_COST_FACTOR: usize = 3;

/// Bytes of bodies held at once, and the bound new request bodies must fit under.
#[derive(Debug)]
pub struct InflightBudget {
    limit: usize,
    used: AtomicUsize,
    gauge: Gauge,
}

/// Bytes counted for one call; returned to the budget when dropped.
#[derive(Debug)]
pub struct BodyPermit {
    budget: Arc<InflightBudget>,
    bytes: usize,
}

impl InflightBudget {
    /// A budget of `limit` bytes reporting its use in `gauge`.
    #[must_use]
    pub fn new(limit: usize, gauge: Gauge) -> Arc<InflightBudget> {
        Arc::new(InflightBudget {
            limit,
            used: AtomicUsize::new(0),
            gauge,
        })
    }

    /// The configured bound.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes counted now.
    #[must_use]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// An empty permit, grown as a body arrives.
    #[must_use]
    pub fn permit(self: &Arc<Self>) -> BodyPermit {
        BodyPermit {
            budget: self.clone(),
            bytes: 0,
        }
    }

    fn publish(&self) {
        self.gauge
            .set(i64::try_from(self.used()).unwrap_or(i64::MAX));
    }
}

impl BodyPermit {
    /// Counts `n` more bytes if the total stays within the limit; `false` (nothing counted)
    /// otherwise.
    #[must_use]
    pub fn try_grow(&mut self, n: usize) -> bool {
        let b = &self.budget;
        let ok = b
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= b.limit)
            })
            .is_ok();
        if ok {
            self.bytes += n;
            b.publish();
        }
        ok
    }

    /// Counts `n` more bytes even past the limit (a response of an admitted call).
    pub fn grow(&mut self, n: usize) {
        self.budget.used.fetch_add(n, Ordering::AcqRel);
        self.bytes += n;
        self.budget.publish();
    }

    /// Bytes this permit counts.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.publish();
    }
}

/// A response body that keeps its bytes counted until it is sent (or dropped).
pub struct HeldBody {
    inner: ProxyBody,
    _permit: BodyPermit,
}

impl HeldBody {
    /// `inner`, counted by `permit` until it is done.
    #[must_use]
    pub fn wrap(inner: ProxyBody, permit: BodyPermit) -> ProxyBody {
        BodyExt::boxed_unsync(HeldBody {
            inner,
            _permit: permit,
        })
    }
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_fit_under_the_limit_and_return_on_drop() {
        let b = InflightBudget::new(100, Gauge::default());
        let mut p1 = b.permit();
        assert!(p1.try_grow(60));
        let mut p2 = b.permit();
        assert!(!p2.try_grow(41), "over the limit");
        assert!(p2.try_grow(40));
        assert_eq!(b.used(), 100);
        p2.grow(10);
        assert_eq!(b.used(), 110, "a response is counted past the limit");
        drop(p1);
        assert_eq!(b.used(), 50);
        drop(p2);
        assert_eq!(b.used(), 0);
    }
}
