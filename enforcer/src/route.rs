//! Routing and header hygiene: `/proxy/{provider}/{rest}` → `{base_url}/{rest}?query`, with the
//! caller's key, the attribution headers and hop-by-hop headers removed and the real provider key
//! added in the provider's own header style.

use http::Uri;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ledger::provider::ProviderKind;

use crate::auth::{KEY_HEADERS, strip_key_param};
use crate::config::Provider;
use crate::error::ProxyError;

/// Attribution headers: read by the enforcer, never forwarded.
pub const ATTRIBUTION_HEADERS: [&str; 3] = ["x-tenant-id", "x-feature-name", "x-session-id"];

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus ones the enforcer recomputes.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The parts of a proxied path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPath<'a> {
    /// The provider name.
    pub provider: &'a str,
    /// The rest of the path, starting with '/' (may be just "/").
    pub rest: &'a str,
}

/// Splits `/proxy/{provider}/{rest}`.
///
/// # Errors
/// [`ProxyError::NoRoute`] for any other path.
pub fn split(path: &str) -> Result<ProxyPath<'_>, ProxyError> {
    let no = || ProxyError::NoRoute {
        path: path.chars().take(200).collect(),
    };
    let after = path.strip_prefix("/proxy/").ok_or_else(no)?;
    let (provider, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    };
    if provider.is_empty() || rest.contains("/../") || rest.ends_with("/..") {
        return Err(no());
    }
    Ok(ProxyPath { provider, rest })
}

/// The upstream URI: base URL + rest + the query without the proxy key and without parameters
/// that would hide the usage ([`crate::usage_params`]).
///
/// # Errors
/// [`ProxyError::NoRoute`] when the result is not a valid URI; [`ProxyError::UsageSuppressed`].
pub fn upstream_uri(p: &Provider, rest: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
    let mut s = String::with_capacity(p.base_url.len() + rest.len() + 32);
    s.push_str(&p.base_url);
    s.push_str(rest);
    if let Some(q) = query {
        let q = crate::usage_params::upstream_query(p.kind, q)?;
        if !q.is_empty() {
            s.push('?');
            s.push_str(&q);
        }
    }
    s.parse().map_err(|_| ProxyError::NoRoute {
        path: rest.chars().take(200).collect(),
    })
}

/// The URI of a call an OpenAI-family route hands to its `azure-openai` failover route `p`: the
/// model's deployment, the API's path under it and the route's `api-version`. `None` when the
/// route has no deployment for the model, no api-version, or the API has no deployment path
/// (then the route is not tried for this call).
#[must_use]
pub fn azure_failover_uri(p: &Provider, api: ledger::provider::Api, model: &str) -> Option<Uri> {
    use ledger::provider::Api;
    let path = match api {
        Api::ChatCompletions => "chat/completions",
        Api::Completions => "completions",
        Api::Embeddings => "embeddings",
        _ => return None,
    };
    let dep = p.deployments.get(model)?;
    let v = p.api_version.as_deref()?;
    format!(
        "{}/openai/deployments/{dep}/{path}?api-version={v}",
        p.base_url
    )
    .parse()
    .ok()
}

/// Whether `target` speaks another API than the call's route `from` (an `azure-openai` failover
/// of an OpenAI route): its URI comes from [`azure_failover_uri`].
#[must_use]
pub fn crosses_kind(from: &Provider, target: &Provider) -> bool {
    target.kind == ProviderKind::AzureOpenAi && from.kind != ProviderKind::AzureOpenAi
}

/// The path and query the ledger classifies (rest + query without the key).
#[must_use]
pub fn classify_target(rest: &str, query: Option<&str>) -> String {
    match query.map(strip_key_param).filter(|q| !q.is_empty()) {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    }
}

/// The header that carries a provider's real key, in the provider's own style, built once at
/// start (the value is marked sensitive, so it never reaches a log or an HPACK table).
#[derive(Clone)]
pub struct Credential {
    name: HeaderName,
    value: HeaderValue,
}

impl std::fmt::Debug for Credential {
    // The key itself is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// The header for `key` at a provider of `kind`; `None` when the key cannot be a header
    /// value (a control character, say).
    #[must_use]
    pub fn new(kind: ProviderKind, key: &str) -> Option<Credential> {
        let (name, text) = match kind {
            ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), key.to_owned()),
            ProviderKind::Gemini => (HeaderName::from_static("x-goog-api-key"), key.to_owned()),
            ProviderKind::AzureOpenAi => (HeaderName::from_static("api-key"), key.to_owned()),
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => {
                (header::AUTHORIZATION, format!("Bearer {key}"))
            }
        };
        let mut value = HeaderValue::from_str(&text).ok()?;
        value.set_sensitive(true);
        Some(Credential { name, value })
    }
}

/// The `Host` header of a route's requests, built once at start. Without it hyper-util's client
/// formats one for every request (`host:port`, a `String` and a header value each call); with it
/// the client keeps the one given. Built by the client's own rule: the URI's host, and its port
/// unless it is the scheme's default (443 for https, 80 otherwise).
#[derive(Debug, Clone)]
pub struct HostHeader {
    scheme: Option<http::uri::Scheme>,
    authority: http::uri::Authority,
    value: HeaderValue,
}

impl HostHeader {
    /// The header of requests to `base_url`; `None` when it is no absolute URI (such a route
    /// fails at its first call, with its own error).
    #[must_use]
    pub fn new(base_url: &str) -> Option<HostHeader> {
        let uri: Uri = base_url.parse().ok()?;
        let authority = uri.authority()?.clone();
        let host = uri.host()?;
        let secure = matches!(uri.scheme_str(), Some("https" | "wss"));
        let text = match uri.port() {
            Some(p) if !(secure && p.as_u16() == 443 || !secure && p.as_u16() == 80) => {
                // The number, as the client writes it (`:08443` is `:8443`).
                format!("{host}:{}", p.as_u16())
            }
            _ => host.to_owned(),
        };
        Some(HostHeader {
            scheme: uri.scheme().cloned(),
            authority,
            value: HeaderValue::from_str(&text).ok()?,
        })
    }

    /// The value for a request to `uri`: `None` when `uri` is at another scheme or authority
    /// (an `azure-openai` failover's deployment URI elsewhere), whose header the client builds.
    #[must_use]
    pub fn value_for(&self, uri: &Uri) -> Option<&HeaderValue> {
        (uri.authority() == Some(&self.authority) && uri.scheme() == self.scheme.as_ref())
            .then_some(&self.value)
    }
}

/// Whether a client header never goes upstream: a key, an attribution header, a hop-by-hop
/// header, or Content-Length (recomputed).
fn never_forwarded(name: &HeaderName) -> bool {
    let n = name.as_str();
    n == header::CONTENT_LENGTH.as_str()
        || KEY_HEADERS.contains(&n)
        || ATTRIBUTION_HEADERS.contains(&n)
        || HOP_BY_HOP.contains(&n)
}

/// Rewrites the client's headers for the upstream in place: drops keys, attribution, hop-by-hop
/// headers (and those named in Connection), Accept-Encoding (the enforcer asks for identity so
/// metering sees plaintext) and Content-Length (recomputed), then adds the real key.
///
/// The headers present are each checked once against the names that never go upstream (a
/// removal by a name given as text parses and hashes that name whether or not the header is
/// there, and there are 18 of them).
pub fn upstream_headers(h: &mut HeaderMap, kind: ProviderKind, key: &Credential) {
    let mut doomed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    doomed.extend(h.keys().filter(|n| never_forwarded(n)).cloned());
    for n in doomed {
        h.remove(n);
    }
    crate::usage_params::strip_headers(kind, h);
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    h.insert(key.name.clone(), key.value.clone());
}

/// Drops hop-by-hop headers from an upstream response before it goes to the client (each
/// header present checked once, as in [`upstream_headers`]).
pub fn downstream_headers(h: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = h
        .keys()
        .filter(|n| HOP_BY_HOP.contains(&n.as_str()))
        .cloned()
        .collect();
    for n in doomed {
        h.remove(n);
    }
}

/// A header value as a str, if present and valid.
#[must_use]
pub fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai() -> Provider {
        Provider {
            name: "openai".into(),
            kind: ProviderKind::OpenAi,
            base_url: "http://127.0.0.1:9/v1".into(),
            api_key_env: "K".into(),
            ca_file: None,
            inject_include_usage: true,
            weight: 1,
            failover: Vec::new(),
            deployments: std::collections::BTreeMap::new(),
            api_version: None,
        }
    }

    /// The Host the client would have written (hyper-util's rule: the host, and the port unless
    /// it is the scheme's default), for each kind of base URL a route may have.
    #[test]
    fn host_headers_are_the_ones_the_client_would_write() {
        for (base, host) in [
            ("http://127.0.0.1:9/v1", "127.0.0.1:9"),
            ("https://api.openai.com/v1", "api.openai.com"),
            ("https://api.openai.com:443/v1", "api.openai.com"),
            ("https://api.example.com:8443", "api.example.com:8443"),
            ("https://api.example.com:08443", "api.example.com:8443"),
            ("http://llm.internal:80/v1", "llm.internal"),
            ("http://llm.internal:443/v1", "llm.internal:443"),
            ("https://gw.example:80", "gw.example:80"),
            ("http://[::1]:9000/v1", "[::1]:9000"),
            ("https://[2001:db8::1]/v1", "[2001:db8::1]"),
        ] {
            let h = HostHeader::new(base).unwrap_or_else(|| panic!("{base}"));
            let uri: Uri = format!("{base}/chat/completions?x=1").parse().unwrap();
            assert_eq!(
                h.value_for(&uri).map(|v| v.to_str().unwrap()),
                Some(host),
                "{base}"
            );
        }
        let h = HostHeader::new("https://api.example.com/v1").unwrap();
        for other in [
            "https://eu.example.azure.com/openai/deployments/d/chat/completions",
            "http://api.example.com/v1/chat/completions",
            "https://api.example.com:8443/v1/chat/completions",
        ] {
            assert!(h.value_for(&other.parse().unwrap()).is_none(), "{other}");
        }
        assert!(HostHeader::new("not a url").is_none());
        assert!(HostHeader::new("/v1").is_none());
    }

    #[test]
    fn azure_failover_uri_names_the_deployment_and_version() {
        use ledger::provider::Api;
        let mut az = openai();
        az.kind = ProviderKind::AzureOpenAi;
        az.base_url = "https://eu.example.azure.com".into();
        az.deployments
            .insert("gpt-4o-mini".into(), "mini-eu".into());
        az.api_version = Some("2024-10-21".into());
        assert_eq!(
            azure_failover_uri(&az, Api::ChatCompletions, "gpt-4o-mini")
                .map(|u| u.to_string())
                .as_deref(),
            Some(
                "https://eu.example.azure.com/openai/deployments/mini-eu/chat/completions?api-version=2024-10-21"
            )
        );
        assert!(azure_failover_uri(&az, Api::ChatCompletions, "gpt-4o").is_none());
        assert!(azure_failover_uri(&az, Api::Responses, "gpt-4o-mini").is_none());
        assert!(crosses_kind(&openai(), &az));
        assert!(!crosses_kind(&az, &az));
        assert!(!crosses_kind(&openai(), &openai()));
    }

    #[test]
    fn splits_and_builds() {
        let p = split("/proxy/openai/chat/completions").unwrap();
        assert_eq!(
            p,
            ProxyPath {
                provider: "openai",
                rest: "/chat/completions"
            }
        );
        assert!(split("/v1/chat").is_err());
        assert!(split("/proxy//x").is_err());
        assert!(split("/proxy/openai/../admin").is_err());
        let u = upstream_uri(&openai(), "/chat/completions", Some("a=1&key=sk")).unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:9/v1/chat/completions?a=1");
        assert_eq!(classify_target("/x", Some("key=1")), "/x");
    }

    /// Every name that never goes upstream is dropped, whatever its case on the wire, and
    /// nothing else is; the real key arrives in each provider's own header, marked sensitive.
    #[test]
    fn every_unforwarded_header_is_dropped_and_only_those() {
        let never: Vec<&str> = KEY_HEADERS
            .iter()
            .chain(&ATTRIBUTION_HEADERS)
            .chain(&HOP_BY_HOP)
            .copied()
            .chain(["content-length"])
            .collect();
        let kept = [
            "anthropic-version",
            "openai-organization",
            "x-request-id",
            "user-agent",
        ];
        for (kind, name, value) in [
            (ProviderKind::OpenAi, "authorization", "Bearer real"),
            (
                ProviderKind::OpenAiCompatible,
                "authorization",
                "Bearer real",
            ),
            (ProviderKind::Anthropic, "x-api-key", "real"),
            (ProviderKind::AzureOpenAi, "api-key", "real"),
            (ProviderKind::Gemini, "x-goog-api-key", "real"),
        ] {
            let mut h = HeaderMap::new();
            for n in never.iter().chain(&kept) {
                h.append(
                    HeaderName::from_bytes(n.to_uppercase().as_bytes()).unwrap(),
                    "v".parse().unwrap(),
                );
            }
            let key = Credential::new(kind, "real").unwrap();
            upstream_headers(&mut h, kind, &key);
            let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            left.sort_unstable();
            let mut want: Vec<&str> = kept
                .iter()
                .copied()
                .chain(["accept-encoding", name])
                .collect();
            want.sort_unstable();
            assert_eq!(left, want, "{kind:?}");
            let v = h.get(name).unwrap();
            assert_eq!(v, value);
            assert!(v.is_sensitive());
            assert_eq!(h.get_all(name).iter().count(), 1);
        }
        assert!(Credential::new(ProviderKind::OpenAi, "sk-1\nx").is_none());
        assert!(
            !format!(
                "{:?}",
                Credential::new(ProviderKind::OpenAi, "sk-secret").unwrap()
            )
            .contains("secret")
        );
    }

    #[test]
    fn responses_lose_hop_by_hop_headers_only() {
        let mut h = HeaderMap::new();
        for n in HOP_BY_HOP
            .iter()
            .chain(&["content-type", "x-request-id", "openai-processing-ms"])
        {
            h.append(*n, "v".parse().unwrap());
            h.append(*n, "w".parse().unwrap());
        }
        downstream_headers(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["content-type", "openai-processing-ms", "x-request-id"]
        );
        assert_eq!(h.get_all("x-request-id").iter().count(), 2);
    }

    #[test]
    fn strips_and_adds_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer sk-proxy"),
            ("x-tenant-id", "acme"),
            ("x-session-id", "s"),
            ("x-feature-name", "f"),
            ("connection", "keep-alive, x-foo"),
            ("x-foo", "1"),
            ("accept-encoding", "gzip"),
            ("anthropic-version", "2023-06-01"),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        let key = Credential::new(ProviderKind::Anthropic, "real").unwrap();
        upstream_headers(&mut h, ProviderKind::Anthropic, &key);
        assert_eq!(h.get("x-api-key").unwrap(), "real");
        assert!(h.get("authorization").is_none());
        assert!(
            h.get("x-tenant-id").is_none()
                && h.get("x-session-id").is_none()
                && h.get("x-feature-name").is_none()
        );
        assert!(h.get("x-foo").is_none() && h.get("connection").is_none());
        assert_eq!(h.get("accept-encoding").unwrap(), "identity");
        assert_eq!(h.get("anthropic-version").unwrap(), "2023-06-01");
    }
}
