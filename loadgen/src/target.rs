//! What every request of a run sends: one URL, fixed headers, one body, over pooled keep-alive HTTP/1.1.
//! A body may carry the placeholder [`SEQ`], replaced by each request's sequence number, so
//! requests share most of their text (a system prompt, earlier turns) but not all of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A pooled plain-HTTP/1.1 client (every server in the bench is on loopback without TLS).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One request, sent over and over.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port/path?query`.
    pub uri: Uri,
    /// GET without a body, POST with one.
    pub method: Method,
    /// Headers sent with every request.
    pub headers: HeaderMap,
    /// The request body (empty for GET).
    pub body: Bytes,
    /// The body split at its [`SEQ`] placeholder, when it has one.
    seq: Option<Arc<Seq>>,
}

/// Replaced in a body by the request's sequence number (10 digits, zero-padded, so every body
/// has the same length).
pub const SEQ: &str = "{{seq}}";

#[derive(Debug)]
struct Seq {
    before: Bytes,
    after: Bytes,
    next: AtomicU64,
}

impl Target {
    /// A target from a URL, `name: value` header lines and a body (POST when non-empty).
    pub fn new(url: &str, headers: &[String], body: Bytes) -> Result<Target> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        if uri.scheme_str() != Some("http") {
            bail!(
                "{url}: the load generator speaks plain http:// only (every bench server is on loopback)"
            );
        }
        let mut map = HeaderMap::new();
        for h in headers {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("header `{h}` is not `name: value`"))?;
            map.append(
                HeaderName::from_bytes(k.trim().as_bytes())
                    .with_context(|| format!("header name in `{h}`"))?,
                HeaderValue::from_str(v.trim())
                    .with_context(|| format!("header value in `{h}`"))?,
            );
        }
        if !body.is_empty() && !map.contains_key(http::header::CONTENT_TYPE) {
            map.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        let method = if body.is_empty() {
            Method::GET
        } else {
            Method::POST
        };
        let seq = body
            .windows(SEQ.len())
            .position(|w| w == SEQ.as_bytes())
            .map(|at| {
                Arc::new(Seq {
                    before: body.slice(..at),
                    after: body.slice(at + SEQ.len()..),
                    next: AtomicU64::new(0),
                })
            });
        Ok(Target {
            uri,
            method,
            headers: map,
            body,
            seq,
        })
    }

    /// The body of the next request.
    fn next_body(&self) -> Bytes {
        let Some(seq) = &self.seq else {
            return self.body.clone();
        };
        let n = seq.next.fetch_add(1, Ordering::Relaxed) % 10_000_000_000;
        let mut b = Vec::with_capacity(seq.before.len() + 10 + seq.after.len());
        b.extend_from_slice(&seq.before);
        b.extend_from_slice(format!("{n:010}").as_bytes());
        b.extend_from_slice(&seq.after);
        Bytes::from(b)
    }

    /// A fresh request for this target.
    #[must_use]
    pub fn request(&self) -> Request<Full<Bytes>> {
        let mut r = Request::new(Full::new(self.next_body()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// A keep-alive client whose pool never evicts a connection during a run.
#[must_use]
pub fn client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(90))
        .build(http)
}

/// Why one request failed, as a short label counted in the report.
#[must_use]
pub fn error_label(e: &hyper_util::client::legacy::Error) -> String {
    if e.is_connect() {
        "connect".to_owned()
    } else {
        "request".to_owned()
    }
}

/// Sends one request and reads the whole body; `Ok(status)` or an error label.
pub async fn send_full(
    client: &HttpClient,
    target: &Target,
    timeout: Duration,
) -> Result<u16, String> {
    read_whole(
        async {
            client
                .request(target.request())
                .await
                .map_err(|e| error_label(&e))
        },
        timeout,
    )
    .await
}

/// Awaits `response` and reads its whole body, within `timeout`: `Ok(status)` or an error label
/// (the response's own, "body" or "timeout").
pub async fn read_whole(
    response: impl Future<Output = Result<hyper::Response<hyper::body::Incoming>, String>>,
    timeout: Duration,
) -> Result<u16, String> {
    let fut = async {
        let resp = response.await?;
        let status = resp.status().as_u16();
        resp.into_body()
            .collect()
            .await
            .map_err(|_| "body".to_owned())?;
        Ok(status)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err("timeout".to_owned()))
}
