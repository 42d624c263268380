//! A faithful mock LLM provider (OpenAI, Anthropic, Gemini) over plain HTTP and real TLS on one port.
//!
//! The integration tests, the benchmark and the demo all use it as the one honest stand-in for the real
//! providers: responses come in the exact shapes the official SDKs parse, usage is deterministic and
//! configurable, and every served call lands in a [`MockLedger`] that says what the mock billed and
//! which request headers it saw.
//!
//! ```no_run
//! # async fn f() {
//! use llmwarden_tests::mock::{MockConfig, MockProvider};
//! let mock = MockProvider::start(MockConfig::default()).await;
//! let base = format!("{}/v1", mock.https_url()); // OpenAI SDK base_url; trust mock.ca_pem_path()
//! let calls = mock.ledger().wait_for(1, std::time::Duration::from_secs(5)).await;
//! # }
//! ```
//!
//! # Routes
//! Matched by path suffix, so `/v1/chat/completions`, `/chat/completions`, `/proxy/openai/chat/completions`
//! and Azure's `/openai/deployments/{d}/chat/completions` all work:
//! `…/chat/completions`, `…/completions`, `…/responses`, `…/embeddings` (OpenAI: `Authorization: Bearer`,
//! Azure `api-key`), `…/messages`, `…/messages/count_tokens` (Anthropic: `x-api-key`, or `Authorization: Bearer` as
//! anthropic-python 2.x sends it),
//! `…models/{m}:generateContent`, `…:streamGenerateContent` (`?alt=sse` → SSE, else a streamed JSON array),
//! `…:countTokens` (Gemini: `x-goog-api-key` or `?key=`). `GET /healthz` answers `ok`.
//!
//! # Usage the mock bills
//! Unless overridden, input tokens = ceil(text bytes / 4) (min 1), where text bytes are the UTF-8 bytes of
//! every string under a `content`, `text`, `input`, `prompt`, `system`, `instructions`, `contents` or
//! `parts` key of the request JSON (keys named `type` excluded); output tokens = min(the request's max
//! tokens, [`MockConfig::output_tokens`]) (embeddings and count-tokens: 0). The completion text is made of
//! common English words, one token each, so text-based estimates land close to the truth.
//!
//! # Per-request control headers (`x-mock-*`; see [`Knobs`])
//! - `x-mock-usage: input=100,cached=20,cache_write_5m=0,cache_write_1h=0,output=30,reasoning=5` — fields
//!   use the ledger's meaning (`input` excludes cache reads and writes, `output` includes reasoning);
//!   fields not given keep their default. Providers that cannot express a field fold it as the real API
//!   would (OpenAI/Gemini have no cache writes: they count as plain input).
//! - `x-mock-chunks: 64` (stream content chunks), `x-mock-chunk-delay-ms: 5`, `x-mock-latency-ms: 20`
//! - `x-mock-gzip: 1` (gzip when the client accepts it), `x-mock-chunked: 1` (non-stream bodies chunked)
//! - `x-mock-fault: status=500 | status=429 | reset-mid-stream=K | stall=K | truncated-sse=K |
//!   slow-first-byte=MS | invalid-json` (K = body frames sent first; default half of them)
//!
//! Every response carries `x-mock-call-id`, the id of its [`ServedCall`] in the ledger.

mod billing;
mod body;
mod knobs;
mod render;
mod server;
mod suppress;
mod tls;
mod words;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use billing::{MockLedger, ServedCall};
pub use knobs::{Fault, Knobs, UsageSpec};
pub use render::MockApi;

/// The ledger's normalised usage, which the mock bills in.
pub use ledger::usage::Usage;

/// How a [`MockProvider`] behaves by default; `x-mock-*` request headers override it per call.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Accept TLS connections (detected per connection, on the same port as plain HTTP).
    pub tls: bool,
    /// Offer `h2` in ALPN besides `http/1.1` (plain connections may always speak h2c).
    pub h2: bool,
    /// Require this provider key (Bearer / x-api-key / x-goog-api-key / ?key=); 401 otherwise.
    pub require_key: Option<String>,
    /// Default usage; fields left `None` are derived from the request (see the module docs).
    pub usage: UsageSpec,
    /// Output tokens when the request gives no smaller max tokens.
    pub output_tokens: u64,
    /// Stream content chunks (None: one per visible output token).
    pub chunks: Option<usize>,
    /// Delay between stream frames.
    pub chunk_delay: Duration,
    /// Delay before the response head (time to first byte).
    pub latency: Duration,
    /// Pause between the last body frame and the body's end, so the end of a chunked body (its
    /// `0\r\n\r\n`) leaves in a TLS record of its own, as real provider edges send it.
    pub end_delay: Duration,
    /// Wait this long after accepting a TLS connection before answering its ClientHello: a
    /// provider this far away (the client's first request cannot be written sooner).
    pub handshake_delay: Duration,
    /// Gzip responses when the client sends `Accept-Encoding: gzip`.
    pub gzip: bool,
    /// Send non-stream bodies with chunked transfer encoding instead of Content-Length.
    pub chunked: bool,
    /// A fault applied to every call that does not name its own.
    pub fault: Option<Fault>,
    /// Appended to the echoed model, like a dated snapshot (`Some("-2024-07-18")`).
    pub model_snapshot: Option<String>,
    /// Where to write the CA certificate (PEM); default a fresh temp dir removed on drop.
    pub ca_out: Option<PathBuf>,
    /// Append one JSON line per served call to this file.
    pub ledger_out: Option<PathBuf>,
    /// Length of each embedding vector.
    pub embedding_dims: usize,
    /// Keep served calls in memory for [`MockProvider::ledger`]; turn off for long benches (the
    /// `ledger_out` file still gets every call).
    pub retain_calls: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: true,
            h2: false,
            require_key: None,
            usage: UsageSpec::default(),
            output_tokens: 16,
            chunks: None,
            chunk_delay: Duration::ZERO,
            latency: Duration::ZERO,
            end_delay: Duration::ZERO,
            handshake_delay: Duration::ZERO,
            gzip: false,
            chunked: false,
            fault: None,
            model_snapshot: None,
            ca_out: None,
            ledger_out: None,
            embedding_dims: 8,
            retain_calls: true,
        }
    }
}

/// A running mock provider; dropping it stops the server and every connection it serves.
#[derive(Debug)]
pub struct MockProvider {
    addr: SocketAddr,
    tls: bool,
    ca: Option<tls::CaFile>,
    ledger: MockLedger,
    task: tokio::task::JoinHandle<()>,
    /// For [`MockProvider::start_background`]: dropping it ends the runtime thread.
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl MockProvider {
    /// Starts the mock on the current tokio runtime; panics with the cause when it cannot.
    pub async fn start(config: MockConfig) -> MockProvider {
        Self::try_start(config)
            .await
            .unwrap_or_else(|e| panic!("cannot start the mock provider: {e}"))
    }

    /// Starts the mock on the current tokio runtime.
    ///
    /// # Errors
    /// When the address cannot be bound, or the certificate or ledger file cannot be written.
    pub async fn try_start(config: MockConfig) -> std::io::Result<MockProvider> {
        let ca = if config.tls {
            Some(tls::CaFile::generate(config.ca_out.as_deref(), config.h2)?)
        } else {
            None
        };
        let ledger = MockLedger::new(config.ledger_out.as_deref(), config.retain_calls)?;
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let acceptor = ca.as_ref().map(tls::CaFile::acceptor);
        let tls = config.tls;
        let shared = Arc::new(server::Shared::new(config, ledger.clone()));
        let task = tokio::spawn(server::accept_loop(listener, acceptor, shared));
        Ok(MockProvider {
            addr,
            tls,
            ca,
            ledger,
            task,
            _stop: None,
        })
    }

    /// Starts the mock on its own runtime thread (for synchronous tests); dropping it stops the thread.
    #[must_use]
    pub fn start_background(config: MockConfig) -> MockProvider {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("mock-provider".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(async move {
                        let started = MockProvider::try_start(config).await;
                        let ok = started.is_ok();
                        let _ = tx.send(started);
                        if ok {
                            let _ = stop_rx.await;
                        }
                    }),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .expect("spawn the mock provider thread");
        let mut mock = rx
            .recv()
            .expect("the mock provider thread died")
            .unwrap_or_else(|e| panic!("cannot start the mock provider: {e}"));
        mock._stop = Some(stop_tx);
        mock
    }

    /// The bound address (plain HTTP and TLS share it).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    #[must_use]
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://127.0.0.1:PORT` (the certificate also names `localhost`); panics when TLS is off.
    #[must_use]
    pub fn https_url(&self) -> String {
        assert!(
            self.tls,
            "this mock was started with MockConfig.tls = false"
        );
        format!("https://{}", self.addr)
    }

    /// The CA certificate (PEM file) that clients must trust for [`Self::https_url`].
    #[must_use]
    pub fn ca_pem_path(&self) -> &Path {
        self.ca
            .as_ref()
            .map(tls::CaFile::path)
            .expect("this mock was started with MockConfig.tls = false")
    }

    /// The CA certificate as PEM text.
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        self.ca
            .as_ref()
            .map(tls::CaFile::pem)
            .expect("this mock was started with MockConfig.tls = false")
    }

    /// What the mock served and billed.
    #[must_use]
    pub fn ledger(&self) -> &MockLedger {
        &self.ledger
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}
