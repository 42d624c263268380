//! A bench-only pass-through proxy: the floor the enforcer's CPU per call is compared with.
//!
//! It is built from the enforcer's own stack and nothing else: hyper-util's auto server (HTTP/1.1
//! and h2c, the same header-read timeout and h2 settings), hyper-util's pooled legacy client over
//! hyper-rustls (rustls with ring, webpki roots plus an optional CA file, HTTP/1.1 and HTTP/2 by
//! ALPN, `TCP_NODELAY`, 90 s idle pool) and the same first-byte deadline. It has no auth, no
//! budgets, no metering, no logging, no metrics: a request on `/NAME/rest` goes to route `NAME`'s
//! base URL + `/rest` with its body streamed through, and the response comes back untouched (SSE
//! included). Listens on loopback only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[cfg(test)]
mod tests;

/// The enforcer's defaults (`timeouts.connect_ms`, `timeouts.first_byte_ms`, `timeouts.client_ms`,
/// `max_streams_per_connection`), so both run with the same timers.
const CONNECT: Duration = Duration::from_millis(5_000);
const FIRST_BYTE: Duration = Duration::from_millis(600_000);
const HEADER_READ: Duration = Duration::from_millis(30_000);
const H2_MAX_STREAMS: u32 = 100;

/// Headers of one hop only: never forwarded (RFC 9110 §7.6.1), as the enforcer drops them.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The pooled upstream client: the enforcer's (`forward::HttpsClient`) with a streamed body.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Incoming>;

/// What a response carries: the upstream's body untouched, or a short error of our own.
type Body = Either<Incoming, Full<Bytes>>;

/// Route name → base URL (`http://127.0.0.1:PORT/v1`), and the client that reaches them.
pub struct Passthrough {
    routes: HashMap<String, String>,
    client: UpstreamClient,
}

impl Passthrough {
    /// Parses `routes` (`NAME=URL`, http or https) and builds the client (`ca_file`: an extra
    /// trusted CA for a TLS upstream such as the bench's mock).
    ///
    /// # Errors
    /// A malformed route, an unreadable CA file or one without a certificate.
    pub fn new(routes: &[String], ca_file: Option<&Path>) -> Result<Passthrough> {
        let mut map = HashMap::new();
        for r in routes {
            let Some((name, url)) = r.split_once('=') else {
                bail!("route {r:?}: expected NAME=URL");
            };
            let u: Uri = url.parse().with_context(|| format!("route {r:?}"))?;
            if u.authority().is_none() || !matches!(u.scheme_str(), Some("http" | "https")) {
                bail!("route {r:?}: the URL needs http:// or https:// and a host");
            }
            map.insert(name.to_owned(), url.trim_end_matches('/').to_owned());
        }
        if map.is_empty() {
            bail!("no route: give --route NAME=URL at least once");
        }
        Ok(Passthrough {
            routes: map,
            client: client(ca_file)?,
        })
    }

    /// Forwards one request; a 404 for an unknown route, a 502 when the upstream fails.
    async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let rest = pq.strip_prefix('/').unwrap_or(pq);
        let (name, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let Some(uri) = self
            .routes
            .get(name)
            .and_then(|base| format!("{base}{tail}").parse::<Uri>().ok())
        else {
            return error(StatusCode::NOT_FOUND, "no such route");
        };
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let up = Request::from_parts(parts, body);
        match tokio::time::timeout(FIRST_BYTE, self.client.request(up)).await {
            Ok(Ok(r)) => {
                let (mut parts, body) = r.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Ok(Err(_)) => error(StatusCode::BAD_GATEWAY, "upstream failed"),
            Err(_) => error(StatusCode::GATEWAY_TIMEOUT, "upstream first byte timeout"),
        }
    }
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

fn error(status: StatusCode, msg: &'static str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(msg.as_bytes()))));
    *r.status_mut() = status;
    r
}

/// The enforcer's upstream client (enforcer/src/forward.rs `client`), built the same way.
///
/// # Errors
/// An unreadable CA file, or one without a PEM certificate.
pub fn client(ca_file: Option<&Path>) -> Result<UpstreamClient> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.with_context(|| path.display().to_string())?)?;
            n += 1;
        }
        if n == 0 {
            bail!("{} holds no PEM certificate", path.display());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https))
}

/// Binds `listen`, which must be a loopback address.
///
/// # Errors
/// A non-loopback address or a failed bind.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener> {
    if !listen.ip().is_loopback() {
        bail!("{listen}: the pass-through listens on loopback only");
    }
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))
}

/// Serves connections on `listener` until the task is dropped: one task per connection on this
/// runtime.
pub async fn serve(listener: TcpListener, p: Arc<Passthrough>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_one(stream, p.clone()));
    }
}

async fn serve_one(stream: tokio::net::TcpStream, p: Arc<Passthrough>) {
    let svc = service_fn(move |req| {
        let p = p.clone();
        async move { Ok::<_, Infallible>(p.forward(req).await) }
    });
    let _ = builder()
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await;
}

/// The enforcer's threading (enforcer/src/server/threads.rs): `threads` current-thread runtimes,
/// each with its own upstream pool (`make` builds one per thread); the accept loop here places
/// each connection on the thread with the fewest open ones. Runs until the task is dropped.
///
/// # Errors
/// When a runtime, a thread or a pool cannot be made.
pub async fn serve_threads(
    listener: TcpListener,
    threads: usize,
    make: impl Fn() -> Result<Passthrough>,
) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut places = Vec::new();
    for i in 0..threads.max(1) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        places.push((
            rt.handle().clone(),
            Arc::new(make()?),
            Arc::new(AtomicUsize::new(0)),
        ));
        std::thread::Builder::new()
            .name(format!("passthrough-{i}"))
            .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok(std) = stream.into_std() else { continue };
        let Some((handle, p, open)) = places.iter().min_by_key(|t| t.2.load(Ordering::Relaxed))
        else {
            bail!("no thread");
        };
        open.fetch_add(1, Ordering::Relaxed);
        let (p, open) = (p.clone(), open.clone());
        handle.spawn(async move {
            if let Ok(s) = tokio::net::TcpStream::from_std(std) {
                serve_one(s, p).await;
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The enforcer's server builder (enforcer/src/server/conn.rs `builder`) with its defaults.
fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(256 << 10)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}
