//! Prometheus metrics: every drop, truncation, eviction and parse error is counted, never silent.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

use tokio::net::TcpListener;

/// Labels of `llmwarden_observer_calls`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// Provider name.
    pub provider: String,
    /// Model (or "unknown").
    pub model: String,
}

/// Labels of `llmwarden_observer_cost_nanousd`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    /// Tenant charged (bounded: see [`Metrics::tenant_label`]).
    pub tenant: String,
    /// Provider name.
    pub provider: String,
    /// Model label (the price table's id, or "unpriced").
    pub model: String,
}

/// Distinct tenant labels before new tenants share the label [`OTHER_TENANT_LABEL`]: a trusted
/// process's X-Tenant-ID is a claim, so the set must stay bounded.
pub const MAX_TENANT_LABELS: usize = 500;
/// The label of tenants beyond [`MAX_TENANT_LABELS`].
pub const OTHER_TENANT_LABEL: &str = "other";

/// Labels of `llmwarden_observer_parse_errors`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: String,
}

/// Labels of `llmwarden_observer_exchanges`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    /// How the exchange ended (`body_end`, `stream_end_event`, `connection_closed`,
    /// `process_exit`, `idle_timeout`, `evicted`).
    pub end: String,
    /// What of the response was seen (`complete`, `cut`, `none`).
    pub response: String,
}

/// Labels of `llmwarden_observer_attaches`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// What found the file: `startup` (the scan at start), `exec` (a process's exec), `open` (the
    /// kernel saw the library opened), `rescan` (a timed scan: the safety net, should stay 0).
    pub trigger: String,
}

/// Bounds (seconds) of `llmwarden_observer_attach_window_seconds`: 50 us to 1 s.
const ATTACH_WINDOW_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.25, 1.0,
];

/// Labels of `llmwarden_observer_go_binaries`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `attached`, `unsupported` (Go < 1.17, not amd64), `no_tls`, `error`.
    pub outcome: String,
}

/// Labels of `llmwarden_observer_midway_calls`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MidwayLabels {
    /// What had to be guessed (`nothing`, `api`, `api_no_request`; see `exchange::midway`).
    pub guessed: String,
}

/// All observer metrics.
#[derive(Debug)]
pub struct Metrics {
    /// TLS plaintext events read from the ring buffer.
    pub events: Counter,
    /// Plaintext bytes read.
    pub bytes: Counter,
    /// Times the reader stopped its drain timer because the rings stayed empty, sleeping until
    /// an event woke it.
    pub reader_sleeps: Counter,
    /// Times a sleeping reader found work at its once-a-second look instead of being woken by
    /// it (the kernel's wake-up missed: expected to stay 0, or near it).
    pub reader_late_wakes: Counter,
    /// Events the kernel could not put in the full ring buffer (from the per-CPU map).
    pub kernel_drops: Gauge<u64, AtomicU64>,
    /// Bytes lost with those events.
    pub kernel_dropped_bytes: Gauge<u64, AtomicU64>,
    /// Bytes beyond the per-call limit, not copied.
    pub truncated_bytes: Gauge<u64, AtomicU64>,
    /// Bytes not copied because the connection or process was filtered in the kernel.
    pub skipped_bytes: Gauge<u64, AtomicU64>,
    /// Process events lost.
    pub proc_event_drops: Gauge<u64, AtomicU64>,
    /// Connections tracked now.
    pub connections: Gauge,
    /// Connections marked not-LLM in the kernel filter.
    pub connections_ignored: Counter,
    /// Connections evicted (idle timeout or memory bound).
    pub evictions: Counter,
    /// HTTP/2 connections seen (parsed per stream).
    pub http2_connections: Counter,
    /// LLM calls by provider and model.
    pub calls: Family<CallLabels, Counter>,
    /// Cost of the calls recorded, nano-USD, by tenant, provider and model.
    pub cost: Family<CostLabels, Counter>,
    /// Tenants with a label of their own (at most [`MAX_TENANT_LABELS`]).
    tenants: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Calls recorded, by how their exchange ended and what of the response was seen.
    pub exchanges: Family<ExchangeLabels, Counter>,
    /// Parse errors by reason.
    pub parse_errors: Family<ReasonLabels, Counter>,
    /// Calls recorded on HTTP/2 connections joined mid-way, by what had to be guessed.
    pub midway_calls: Family<MidwayLabels, Counter>,
    /// Calls whose model has no price.
    pub price_gaps: Family<CallLabels, Counter>,
    /// Calls refused before the ledger because their usage is beyond any real call
    /// (`max_tokens_per_call`, `max_cost_per_call_usd`), by reason.
    pub records_refused: Family<ReasonLabels, Counter>,
    /// Ledger writes that failed.
    pub ledger_errors: Counter,
    /// Calls whose event id the ledger already held: booked once, so a second call given the
    /// same id would go unbilled. Expected to stay 0.
    pub ledger_duplicates: Counter,
    /// Calls dropped because the output queue (to Redis or stdout) was full.
    pub sink_queue_drops: Counter,
    /// Distinct files with probes attached.
    pub attached_files: Gauge,
    /// Files newly attached, by what found them.
    pub attaches: Family<TriggerLabels, Counter>,
    /// From the kernel seeing a TLS library opened to its probes being live.
    pub attach_window: Histogram,
    /// Processes with probes of their own (`attach = "on-connect"`).
    pub attached_processes: Gauge,
    /// From the kernel seeing a process connect to a provider to its probes being live
    /// (`attach = "on-connect"`).
    pub connect_attach: Histogram,
    /// Distinct Go binaries seen, by outcome.
    pub go_binaries: Family<OutcomeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            events: Counter::default(),
            bytes: Counter::default(),
            reader_sleeps: Counter::default(),
            reader_late_wakes: Counter::default(),
            kernel_drops: Gauge::default(),
            kernel_dropped_bytes: Gauge::default(),
            truncated_bytes: Gauge::default(),
            skipped_bytes: Gauge::default(),
            proc_event_drops: Gauge::default(),
            connections: Gauge::default(),
            connections_ignored: Counter::default(),
            evictions: Counter::default(),
            http2_connections: Counter::default(),
            calls: Family::default(),
            cost: Family::default(),
            tenants: std::sync::Mutex::default(),
            exchanges: Family::default(),
            parse_errors: Family::default(),
            price_gaps: Family::default(),
            records_refused: Family::default(),
            ledger_errors: Counter::default(),
            ledger_duplicates: Counter::default(),
            sink_queue_drops: Counter::default(),
            attached_files: Gauge::default(),
            attaches: Family::default(),
            attach_window: Histogram::new(ATTACH_WINDOW_BUCKETS),
            attached_processes: Gauge::default(),
            connect_attach: Histogram::new(ATTACH_WINDOW_BUCKETS),
            midway_calls: Family::default(),
            go_binaries: Family::default(),
        }
    }
}

impl Metrics {
    /// The metric label of `tenant`: itself for the first [`MAX_TENANT_LABELS`] tenants seen,
    /// [`OTHER_TENANT_LABEL`] after that.
    pub fn tenant_label(&self, tenant: &str) -> String {
        let mut seen = self
            .tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(tenant) {
            return tenant.to_owned();
        }
        if seen.len() < MAX_TENANT_LABELS {
            seen.insert(tenant.to_owned());
            return tenant.to_owned();
        }
        OTHER_TENANT_LABEL.to_owned()
    }

    /// Registers everything under `llmwarden_observer_` (the enforcer's families are
    /// `llmwarden_*`: one prefix for both binaries).
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("llmwarden_observer");
        self.register_kernel(r);
        self.register_connections(r);
        self.register_calls(r);
        self.register_output(r);
        self.register_discovery(r);
    }

    /// The kernel side and the ring buffer: what was read, dropped and not copied.
    fn register_kernel(&self, r: &mut Registry) {
        r.register(
            "events",
            "TLS plaintext events read from the ring buffer",
            self.events.clone(),
        );
        r.register("bytes", "TLS plaintext bytes read", self.bytes.clone());
        r.register(
            "reader_sleeps",
            "Times the reader stopped draining on a timer because its ring buffers stayed empty \
             (it then sleeps until an event wakes it)",
            self.reader_sleeps.clone(),
        );
        r.register(
            "reader_late_wakes",
            "Times a sleeping reader found events at its once-a-second look, not woken by them \
             (expected to stay 0 or near it)",
            self.reader_late_wakes.clone(),
        );
        r.register(
            "kernel_drops",
            "Events dropped in the kernel because the ring buffer was full",
            self.kernel_drops.clone(),
        );
        r.register(
            "kernel_dropped_bytes",
            "Plaintext bytes lost with dropped events",
            self.kernel_dropped_bytes.clone(),
        );
        r.register(
            "truncated_bytes",
            "Plaintext bytes beyond per_call_bytes, not copied",
            self.truncated_bytes.clone(),
        );
        r.register(
            "skipped_bytes",
            "Plaintext bytes of filtered connections, not copied",
            self.skipped_bytes.clone(),
        );
        r.register(
            "proc_event_drops",
            "Process exec/exit events lost",
            self.proc_event_drops.clone(),
        );
    }

    /// The connections the reader tracks.
    fn register_connections(&self, r: &mut Registry) {
        r.register(
            "connections",
            "TLS connections tracked",
            self.connections.clone(),
        );
        r.register(
            "connections_ignored",
            "Connections marked not-LLM in the kernel filter",
            self.connections_ignored.clone(),
        );
        r.register(
            "evictions",
            "Connections evicted by idle timeout or memory bounds",
            self.evictions.clone(),
        );
        r.register(
            "http2_connections",
            "HTTP/2 connections seen (parsed per stream)",
            self.http2_connections.clone(),
        );
    }

    /// The calls decoded from them, and what could not be.
    fn register_calls(&self, r: &mut Registry) {
        r.register("calls", "LLM calls observed", self.calls.clone());
        r.register(
            "cost_nanousd",
            "Cost of the LLM calls recorded (nano-USD), by tenant (bounded), provider and model",
            self.cost.clone(),
        );
        r.register(
            "exchanges",
            "Calls recorded, by how the exchange ended (end) and what of the response was seen (response)",
            self.exchanges.clone(),
        );
        r.register(
            "parse_errors",
            "HTTP or body parse errors",
            self.parse_errors.clone(),
        );
        r.register(
            "midway_calls",
            "Calls recorded on HTTP/2 connections joined mid-way (observer started after them), by what was guessed",
            self.midway_calls.clone(),
        );
        r.register(
            "records_refused",
            "Calls refused before the ledger: usage beyond max_tokens_per_call or max_cost_per_call_usd",
            self.records_refused.clone(),
        );
        r.register(
            "price_gaps",
            "Calls whose model has no price (tokens recorded, cost unknown)",
            self.price_gaps.clone(),
        );
    }

    /// Writes to the ledger (or stdout).
    fn register_output(&self, r: &mut Registry) {
        r.register(
            "ledger_errors",
            "Ledger writes that failed",
            self.ledger_errors.clone(),
        );
        r.register(
            "ledger_duplicates",
            "Calls whose event id the ledger already held (not booked again); expected 0",
            self.ledger_duplicates.clone(),
        );
        r.register(
            "sink_queue_drops",
            "Calls dropped because the output queue to Redis/stdout was full (see sink_queue)",
            self.sink_queue_drops.clone(),
        );
    }

    /// The discovery thread: files attached and how fast.
    fn register_discovery(&self, r: &mut Registry) {
        r.register(
            "attached_files",
            "Distinct OpenSSL files with probes attached",
            self.attached_files.clone(),
        );
        r.register(
            "attaches",
            "Files newly attached, by what found them (startup, exec, open, connect, rescan; rescan is the safety net and should stay 0)",
            self.attaches.clone(),
        );
        r.register(
            "attach_window_seconds",
            "From the kernel seeing a TLS library opened to its probes being live",
            self.attach_window.clone(),
        );
        r.register(
            "attached_processes",
            "Processes with probes of their own (attach = \"on-connect\")",
            self.attached_processes.clone(),
        );
        r.register(
            "connect_attach_seconds",
            "From the kernel seeing a process connect to a provider to its probes being live (attach = \"on-connect\")",
            self.connect_attach.clone(),
        );
        r.register(
            "go_binaries",
            "Distinct Go binaries seen, by outcome (attached, unsupported, no_tls, error)",
            self.go_binaries.clone(),
        );
    }

    /// Counts files newly attached by `trigger`.
    pub fn attached(&self, trigger: &str, files: usize) {
        if files > 0 {
            self.attaches
                .get_or_create(&TriggerLabels {
                    trigger: trigger.to_owned(),
                })
                .inc_by(files as u64);
        }
    }

    /// Counts a parse error.
    pub fn parse_error(&self, reason: &str) {
        self.parse_errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Serves `GET /metrics` (and `GET /healthz`) on `listen` with hyper, HTTP/1.1 only: a request
/// head must arrive within 5 s and a connection lives at most 30 s, so idle or slow clients
/// cannot pile up; at most 64 connections are served at once (more wait in the listen queue).
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(listen: std::net::SocketAddr, registry: Arc<Registry>) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(%listen, "metrics on /metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "metrics accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &registry)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            drop(permit);
        });
    }
}

/// Connections the metrics endpoint serves at once.
const MAX_METRICS_CONNECTIONS: usize = 64;

fn respond(
    req: &hyper::Request<hyper::body::Incoming>,
    registry: &Registry,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            let mut body = String::new();
            let _ = prometheus_client::encoding::text::encode(&mut body, registry);
            (
                hyper::StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            )
        }
        (&hyper::Method::GET, "/healthz") => (hyper::StatusCode::OK, "text/plain", "ok\n".into()),
        _ => (
            hyper::StatusCode::NOT_FOUND,
            "text/plain",
            "see /metrics\n".into(),
        ),
    };
    let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tenant labels stay bounded: the first MAX_TENANT_LABELS tenants keep their name, later
    /// ones share "other", and a tenant seen before keeps its label.
    #[test]
    fn tenant_labels_are_bounded() {
        let m = Metrics::default();
        for i in 0..MAX_TENANT_LABELS {
            assert_eq!(m.tenant_label(&format!("t{i}")), format!("t{i}"));
        }
        assert_eq!(m.tenant_label("late"), OTHER_TENANT_LABEL);
        assert_eq!(m.tenant_label("t0"), "t0");
        assert_eq!(m.tenant_label("late"), OTHER_TENANT_LABEL);
    }
}
