//! The mock's own ledger: every call it served, what it billed, and the request headers it saw.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::HeaderMap;
use tokio::sync::Notify;

use super::{MockApi, Usage};

/// One served call, recorded when its body ended (or the connection dropped).
#[derive(Debug, Clone)]
pub struct ServedCall {
    /// Sequential id, also sent to the client as `x-mock-call-id`.
    pub id: u64,
    /// Which API the path selected.
    pub api: MockApi,
    /// Request path and query, as received.
    pub path_and_query: String,
    /// Model as the request named it (body, or path for Gemini / Azure deployment), without snapshot suffix.
    pub model: String,
    /// Model echoed in the response (with [`super::MockConfig::model_snapshot`]).
    pub response_model: String,
    /// Whether the response was a stream.
    pub stream: bool,
    /// HTTP status answered.
    pub status: u16,
    /// What the provider bills for this call (normalised like the ledger's); zero for errors and
    /// count-tokens calls.
    pub usage: Usage,
    /// Whether the usage record reached the client in the body (false for OpenAI streams without
    /// `include_usage`, and for streams cut before the usage event).
    pub usage_reported: bool,
    /// Visible completion text in output tokens (output minus reasoning).
    pub text_tokens: u64,
    /// The injected fault, if any.
    pub fault: Option<super::Fault>,
    /// Body frames planned (for a stream: SSE events or JSON array elements).
    pub chunks_planned: usize,
    /// Body frames handed to the connection.
    pub chunks_sent: usize,
    /// The client went away (connection dropped) before the body ended.
    pub client_disconnected: bool,
    /// Every request header, exactly as received.
    pub headers: HeaderMap,
    /// The HTTP version the request came in on (HTTP/2 when a client negotiated `h2`).
    pub version: http::Version,
    /// Request body length in bytes.
    pub request_bytes: usize,
}

impl ServedCall {
    /// Whether a header reached the mock (case-insensitive name).
    #[must_use]
    pub fn has_header(&self, name: &str) -> bool {
        self.headers.contains_key(name)
    }

    /// A header's value as text (first occurrence).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The JSON line written to `--ledger-out` (no header values: they may hold keys).
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "api": self.api.as_str(),
            "path": self.path_and_query.split('?').next().unwrap_or_default(),
            "model": self.model,
            "response_model": self.response_model,
            "stream": self.stream,
            "status": self.status,
            "usage": self.usage,
            "usage_reported": self.usage_reported,
            "text_tokens": self.text_tokens,
            "fault": self.fault.map(|f| f.to_string()),
            "chunks_planned": self.chunks_planned,
            "chunks_sent": self.chunks_sent,
            "client_disconnected": self.client_disconnected,
            "header_names": self.headers.keys().map(http::HeaderName::as_str).collect::<Vec<_>>(),
            "request_bytes": self.request_bytes,
        })
    }
}

#[derive(Debug)]
struct Inner {
    calls: Mutex<Vec<ServedCall>>,
    changed: Notify,
    out: Option<Mutex<File>>,
    /// Keep calls in memory (off for long-running benches that only need `out`).
    retain: bool,
}

/// Shared, cloneable view of what a mock served.
#[derive(Debug, Clone)]
pub struct MockLedger(Arc<Inner>);

impl MockLedger {
    pub(super) fn new(out: Option<&Path>, retain: bool) -> io::Result<MockLedger> {
        let out = out
            .map(|p| {
                File::options()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot open the mock ledger file {}: {e}", p.display()),
                        )
                    })
            })
            .transpose()?
            .map(Mutex::new);
        Ok(MockLedger(Arc::new(Inner {
            calls: Mutex::new(Vec::new()),
            changed: Notify::new(),
            out,
            retain,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<ServedCall>> {
        self.0
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn push(&self, call: ServedCall) {
        if let Some(out) = &self.0.out {
            let mut line = call.to_json().to_string();
            line.push('\n');
            let mut f = out
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::warn!(error = %e, "mock provider: cannot append to the ledger file");
            }
        }
        if self.0.retain {
            self.lock().push(call);
        }
        self.0.changed.notify_waiters();
    }

    /// A snapshot of every call recorded so far, in completion order.
    #[must_use]
    pub fn calls(&self) -> Vec<ServedCall> {
        self.lock().clone()
    }

    /// How many calls were recorded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was recorded yet.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The call with this id (the `x-mock-call-id` response header).
    #[must_use]
    pub fn get(&self, id: u64) -> Option<ServedCall> {
        self.lock().iter().find(|c| c.id == id).cloned()
    }

    /// The most recently recorded call.
    #[must_use]
    pub fn last(&self) -> Option<ServedCall> {
        self.lock().last().cloned()
    }

    /// Forgets every recorded call.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Sum of the usage billed over all calls (`estimated` stays false).
    #[must_use]
    pub fn total_usage(&self) -> Usage {
        let mut t = Usage::default();
        for c in self.lock().iter() {
            t.input_tokens += c.usage.input_tokens;
            t.cache_read_tokens += c.usage.cache_read_tokens;
            t.cache_write_5m_tokens += c.usage.cache_write_5m_tokens;
            t.cache_write_1h_tokens += c.usage.cache_write_1h_tokens;
            t.output_tokens += c.usage.output_tokens;
            t.reasoning_tokens += c.usage.reasoning_tokens;
        }
        t
    }

    /// Whether any recorded call carried this header.
    #[must_use]
    pub fn any_call_had_header(&self, name: &str) -> bool {
        self.lock().iter().any(|c| c.has_header(name))
    }

    /// Every value of this header over all recorded calls.
    #[must_use]
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.lock()
            .iter()
            .flat_map(|c| {
                c.headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            })
            .collect()
    }

    /// Waits until at least `n` calls are recorded and returns them; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ServedCall> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.0.changed.notified();
            {
                let calls = self.lock();
                if calls.len() >= n {
                    return calls.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let got = self.len();
                assert!(
                    got >= n,
                    "mock provider recorded {got} calls, expected at least {n} within {timeout:?}"
                );
            }
        }
    }

    /// [`Self::wait_for`] for synchronous tests (polls).
    #[must_use]
    pub fn wait_for_blocking(&self, n: usize, timeout: Duration) -> Vec<ServedCall> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            {
                let calls = self.lock();
                if calls.len() >= n {
                    return calls.clone();
                }
            }
            let got = self.len();
            assert!(
                std::time::Instant::now() < deadline,
                "mock provider recorded {got} calls, expected at least {n} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the call with this id to be recorded; panics after `timeout`.
    pub async fn wait_call(&self, id: u64, timeout: Duration) -> ServedCall {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.0.changed.notified();
            if let Some(c) = self.get(id) {
                return c;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self
                    .get(id)
                    .unwrap_or_else(|| panic!("mock call {id} not recorded within {timeout:?}"));
            }
        }
    }
}
