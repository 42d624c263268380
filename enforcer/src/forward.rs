//! Phase 3 of a call, **forward**: the upstream request is built only after the decision (the
//! provider's URI, the client's headers without keys and attribution, the real key, the body with
//! `stream_options.include_usage` added where the enforcer needs the usage), and sent with
//! hyper-util's pooled client over rustls (ring, webpki roots plus an optional CA file per
//! provider), HTTP/1.1 and HTTP/2 by ALPN, with connect and first-byte deadlines. Upstream TLS
//! stays on rustls so the observer never mistakes enforcer traffic for OpenSSL bypass traffic.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use ledger::provider::{Api, Endpoint};
use ledger::request::RequestInfo;

use crate::admit::Admission;
use crate::config::{Provider, Timeouts};
use crate::error::{ProxyError, StartError};
use crate::usage_filter::inject_include_usage;
use crate::{App, route};

mod connector;
use connector::Connector;

/// Whether the enforcer adds `stream_options.include_usage` to this request: an OpenAI-family
/// chat stream that did not ask for the usage record the settle needs (the extra event is cut
/// from what the client sees).
#[must_use]
pub fn injects_usage(provider: &Provider, endpoint: &Endpoint, info: &RequestInfo) -> bool {
    provider.inject_include_usage
        && endpoint.api == Api::ChatCompletions
        && endpoint.kind.is_openai_family()
        && info.stream
        && !info.include_usage
}

/// A request body that records when the client handed it to the connection: from then on the
/// provider may have the request (and may bill it), so a failure must settle an estimate, not
/// release the hold.
#[derive(Debug)]
pub struct SentBody {
    inner: Full<Bytes>,
    sent: Arc<AtomicBool>,
}

impl SentBody {
    /// Wraps `body`; `sent` turns true when its bytes are taken for the wire.
    #[must_use]
    pub fn new(body: Bytes, sent: Arc<AtomicBool>) -> SentBody {
        SentBody {
            inner: Full::new(body),
            sent,
        }
    }
}

impl http_body::Body for SentBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        // The head is on the wire before hyper asks for the body.
        self.sent.store(true, Ordering::Release);
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream request of an admitted call to `target` (its own route, or one of that route's
/// `failover` routes), from the client's `headers` (cleaned here); `sent` turns true once it is
/// written.
///
/// # Errors
/// [`ProxyError::NoRoute`] for a path that makes no valid URI; [`ProxyError::BadBody`] when
/// include_usage cannot be added; [`ProxyError::NoUpstreamKey`].
pub fn upstream_request(
    app: &App,
    adm: &Admission<'_>,
    mut headers: http::HeaderMap,
    target: &Provider,
    uri: http::Uri,
    inject_usage: bool,
    sent: Arc<AtomicBool>,
) -> Result<Request<SentBody>, ProxyError> {
    route::upstream_headers(&mut headers, target.kind, app.upstream_key(target)?);
    if let Some(host) = app.upstream_host(target, &uri) {
        headers.insert(http::header::HOST, host.clone());
    }
    let body = if inject_usage {
        inject_include_usage(&adm.body)?
    } else {
        adm.body.clone()
    };
    let method = adm.parts.method.clone();
    if !body.is_empty() || method == Method::POST || method == Method::PUT {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let mut req = Request::new(SentBody::new(body, sent));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// The URI of an admitted call at `target`: the call's own path on its route or a same-kind
/// failover route, or the model's deployment on an `azure-openai` failover of an OpenAI route.
///
/// # Errors
/// [`ProxyError::NoRoute`] for a path that makes no valid URI, or an Azure route without a
/// deployment for `model` and `api`.
pub fn target_uri(
    adm: &Admission<'_>,
    target: &Provider,
    api: Api,
    model: &str,
) -> Result<http::Uri, ProxyError> {
    if route::crosses_kind(adm.provider, target) {
        route::azure_failover_uri(target, api, model).ok_or_else(|| ProxyError::NoRoute {
            path: adm.rest.chars().take(200).collect(),
        })
    } else {
        route::upstream_uri(target, &adm.rest, adm.parts.uri.query())
    }
}

/// One pooled client.
pub type HttpsClient = Client<Connector, SentBody>;

/// One set of pools: the default client and one per provider with its own CA file.
struct Pools {
    default: HttpsClient,
    by_provider: HashMap<String, HttpsClient>,
}

thread_local! {
    /// This thread's pools among [`Upstreams`]'s ([`pin_thread_pool`]).
    static THREAD_POOL: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Sends this thread's upstream calls through pool set `index + 1` (set 0 serves unpinned
/// threads). A pooled connection's I/O task runs on the runtime that opened it, so a proxy
/// runtime thread that only uses its own pools wakes no other thread per call.
pub fn pin_thread_pool(index: usize) {
    THREAD_POOL.with(|c| c.set(Some(index)));
}

/// Clients per provider (a provider with its own CA file gets its own pool), one set per proxy
/// thread plus a shared one; the TLS configs are shared by every set.
#[derive(Clone)]
pub struct Upstreams {
    pools: Arc<[Pools]>,
    first_byte: Duration,
    /// Calls so far per route with failover routes: picks the first attempt by weight.
    turns: Arc<HashMap<String, AtomicU64>>,
}

/// Whether an upstream answer is worth another upstream: rate limited or a server error, before
/// any byte of the body reached the client (the provider bills neither).
#[must_use]
pub fn retryable_status(s: http::StatusCode) -> bool {
    s == http::StatusCode::TOO_MANY_REQUESTS || s.is_server_error()
}

/// The routes of a call to `p` in attempt order: the first by weight (a deterministic weighted
/// rotation over `turn`, so weights 3 and 1 give exactly three of every four first attempts to
/// the first), then the others in configured order (`p` itself first). Unknown names were
/// refused by the config check.
#[must_use]
pub fn attempt_order<'a>(
    p: &'a Provider,
    providers: &'a std::collections::BTreeMap<String, Provider>,
    turn: u64,
) -> Vec<&'a Provider> {
    let mut order: Vec<&Provider> = std::iter::once(p)
        .chain(p.failover.iter().filter_map(|n| providers.get(n)))
        .collect();
    let total: u64 = order.iter().map(|t| u64::from(t.weight)).sum();
    if total > 0 && order.len() > 1 {
        let mut at = turn % total;
        if let Some(i) = order.iter().position(|t| {
            let w = u64::from(t.weight);
            if at < w {
                true
            } else {
                at -= w;
                false
            }
        }) {
            let first = order.remove(i);
            order.insert(0, first);
        }
    }
    order
}

impl Upstreams {
    /// Builds the clients.
    ///
    /// # Errors
    /// [`StartError::UpstreamTls`] when a CA file cannot be read or holds no certificate.
    pub fn new(
        providers: &[&Provider],
        t: &Timeouts,
        threads: usize,
    ) -> Result<Upstreams, StartError> {
        let default = connector(None, t).map_err(|e| e.under("upstream TLS client".into()))?;
        let mut by_provider = Vec::new();
        for p in providers {
            if let Some(ca) = &p.ca_file {
                by_provider.push((
                    p.name.clone(),
                    connector(Some(ca), t)
                        .map_err(|e| e.under(format!("providers.{}.ca_file", p.name)))?,
                ));
            }
        }
        let pools = (0..=threads)
            .map(|_| Pools {
                default: pool(default.clone()),
                by_provider: by_provider
                    .iter()
                    .map(|(n, c)| (n.clone(), pool(c.clone())))
                    .collect(),
            })
            .collect();
        let turns = providers
            .iter()
            .filter(|p| !p.failover.is_empty())
            .map(|p| (p.name.clone(), AtomicU64::new(0)))
            .collect();
        Ok(Upstreams {
            pools,
            first_byte: Duration::from_millis(t.first_byte_ms),
            turns: Arc::new(turns),
        })
    }

    /// The routes of the next call to `p`, in attempt order ([`attempt_order`]).
    #[must_use]
    pub fn order<'a>(
        &self,
        p: &'a Provider,
        providers: &'a std::collections::BTreeMap<String, Provider>,
    ) -> Vec<&'a Provider> {
        let turn = self
            .turns
            .get(&p.name)
            .map_or(0, |c| c.fetch_add(1, Ordering::Relaxed));
        attempt_order(p, providers, turn)
    }

    /// Sends `req` to `provider`'s upstream and waits for the response head.
    ///
    /// # Errors
    /// Connect failures ([`ProxyError::UpstreamConnect`]) and the first-byte deadline
    /// ([`ProxyError::UpstreamTimeout`]).
    pub async fn send(
        &self,
        provider: &str,
        req: Request<SentBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let set = THREAD_POOL
            .with(std::cell::Cell::get)
            .and_then(|i| self.pools.get(i + 1))
            .unwrap_or(&self.pools[0]);
        let c = set.by_provider.get(provider).unwrap_or(&set.default);
        match tokio::time::timeout(self.first_byte, c.request(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                let mut detail = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    detail.push_str(": ");
                    detail.push_str(&s.to_string());
                    src = s.source();
                }
                Err(ProxyError::UpstreamConnect {
                    provider: provider.to_owned(),
                    detail,
                })
            }
            Err(_) => Err(ProxyError::UpstreamTimeout {
                provider: provider.to_owned(),
                ms: u64::try_from(self.first_byte.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }
}

/// Why a TLS client could not be built (the caller names the config key).
struct ClientError {
    detail: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ClientError {
    fn new(detail: String, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        ClientError {
            detail,
            source: Some(Box::new(source)),
        }
    }

    fn under(self, key: String) -> StartError {
        StartError::UpstreamTls {
            key,
            detail: self.detail,
            source: self.source,
        }
    }
}

fn pool(c: Connector) -> HttpsClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(c)
}

fn connector(ca_file: Option<&Path>, t: &Timeouts) -> Result<Connector, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let at = || path.display().to_string();
        let pem = std::fs::read(path).map_err(|e| ClientError::new(at(), e))?;
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| ClientError::new(at(), e))?;
            roots.add(cert).map_err(|e| ClientError::new(at(), e))?;
            n += 1;
        }
        if n == 0 {
            return Err(ClientError {
                detail: format!("{} holds no PEM certificate", at()),
                source: None,
            });
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::new("TLS protocol versions".into(), e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_millis(t.connect_ms)));
    http.set_nodelay(true);
    Ok(Connector::new(
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ledger::provider::ProviderKind;

    use super::*;

    fn route(name: &str, weight: u32, failover: &[&str]) -> Provider {
        Provider {
            name: name.into(),
            kind: ProviderKind::OpenAi,
            base_url: "http://127.0.0.1:9/v1".into(),
            api_key_env: "K".into(),
            ca_file: None,
            inject_include_usage: true,
            weight,
            failover: failover.iter().map(|s| (*s).to_owned()).collect(),
            deployments: BTreeMap::new(),
            api_version: None,
        }
    }

    #[test]
    fn weights_pick_the_first_attempt_and_the_rest_follow_in_order() {
        let ps: BTreeMap<String, Provider> = [
            route("a", 3, &["b", "c"]),
            route("b", 1, &[]),
            route("c", 0, &[]),
        ]
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect();
        let names = |turn| {
            attempt_order(&ps["a"], &ps, turn)
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(0), ["a", "b", "c"]);
        assert_eq!(names(2), ["a", "b", "c"]);
        assert_eq!(names(3), ["b", "a", "c"]);
        assert_eq!(names(4), ["a", "b", "c"]);
        let firsts: Vec<_> = (0..400).map(|t| names(t)[0]).collect();
        assert_eq!(firsts.iter().filter(|n| **n == "a").count(), 300);
        assert_eq!(firsts.iter().filter(|n| **n == "b").count(), 100);
        assert!(!firsts.contains(&"c"), "weight 0: failover only");
        assert_eq!(
            attempt_order(&ps["b"], &ps, 7).len(),
            1,
            "no failover: its own route"
        );
        assert!(retryable_status(http::StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable_status(http::StatusCode::BAD_GATEWAY));
        assert!(!retryable_status(http::StatusCode::BAD_REQUEST));
    }
}
