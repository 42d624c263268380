//! The upstream client: hyper-util's pooled client over rustls (ring, webpki roots plus an
//! optional CA file per provider), HTTP/1.1 and HTTP/2 by ALPN, with connect and first-byte
//! deadlines. Upstream TLS stays on rustls so the observer never mistakes enforcer traffic for
//! OpenSSL bypass traffic.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::{Provider, Timeouts};
use crate::error::ProxyError;

/// One pooled client.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Clients per provider (a provider with its own CA file gets its own pool).
#[derive(Clone)]
pub struct Upstreams {
    default: HttpsClient,
    by_provider: HashMap<String, HttpsClient>,
    first_byte: Duration,
}

impl Upstreams {
    /// Builds the clients.
    ///
    /// # Errors
    /// When a CA file cannot be read or holds no certificate.
    pub fn new(providers: &[&Provider], t: &Timeouts) -> Result<Upstreams, String> {
        let default = client(None, t)?;
        let mut by_provider = HashMap::new();
        for p in providers {
            if let Some(ca) = &p.ca_file {
                by_provider.insert(
                    p.name.clone(),
                    client(Some(ca), t)
                        .map_err(|e| format!("providers.{}.ca_file: {e}", p.name))?,
                );
            }
        }
        Ok(Upstreams {
            default,
            by_provider,
            first_byte: Duration::from_millis(t.first_byte_ms),
        })
    }

    /// Sends `req` to `provider`'s upstream and waits for the response head.
    ///
    /// # Errors
    /// Connect failures ([`ProxyError::UpstreamConnect`]) and the first-byte deadline
    /// ([`ProxyError::UpstreamTimeout`]).
    pub async fn send(
        &self,
        provider: &str,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let c = self.by_provider.get(provider).unwrap_or(&self.default);
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

fn client(ca_file: Option<&Path>, t: &Timeouts) -> Result<HttpsClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_millis(t.connect_ms)));
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
