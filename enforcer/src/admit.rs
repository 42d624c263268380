//! Phase 1 of a call, **admit**: route to a provider, authenticate the proxy key, attribute the
//! call (tenant, feature, session by the ledger's one name rule), read the bounded request body
//! and classify it. Nothing here touches Redis or the upstream; a refusal costs nothing.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Request;
use http::header::CONTENT_LENGTH;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ledger::names::{self, NameKind};
use ledger::provider::Endpoint;
use ledger::request::RequestInfo;

use crate::access::{self, Access};
use crate::auth::KeyEntry;
use crate::call::Call;
use crate::config::{BackgroundResponses, Provider, UnknownModel};
use crate::error::ProxyError;
use crate::inflight::{BodyPermit, REQUEST_COST_FACTOR};
use crate::{App, auth, route};

/// An admitted request: who sends it where, with its body read.
pub struct Admission<'a> {
    /// The provider it goes to.
    pub provider: &'a Provider,
    /// The request head.
    pub parts: http::request::Parts,
    /// The path after `/proxy/{provider}`.
    pub rest: String,
    /// The request body.
    pub body: Bytes,
    /// Its bytes counted in the in-flight budget while the call holds them.
    pub permit: BodyPermit,
    /// What the ledger meters, or `None` for a call forwarded unmetered.
    pub endpoint: Option<Endpoint>,
    /// The caller's key (what it may bill, call and reach).
    pub key: Arc<KeyEntry>,
}

/// Routes, authenticates, attributes and reads the body of `req`, recording what it learns in
/// `call`.
///
/// # Errors
/// The [`ProxyError`] the client gets (404, 401, 403, 400, 413).
pub async fn admit<'a>(
    app: &'a App,
    req: Request<Incoming>,
    call: &mut Call,
) -> Result<Admission<'a>, ProxyError> {
    let (parts, body) = req.into_parts();
    let pp = route::split(parts.uri.path())?;
    let provider = app
        .providers
        .get(pp.provider)
        .ok_or_else(|| ProxyError::UnknownProvider {
            name: pp.provider.chars().take(64).collect(),
        })?;
    call.kind = provider.kind;
    call.provider.clone_from(&provider.name);
    let rest = pp.rest.to_owned();
    let entry = authenticate(app, &parts, call)?;
    entry.check_provider(&provider.name)?;
    // Without the real key nothing can be forwarded: refuse before anything is held; the same
    // for a parameter that would hide the usage.
    app.upstream_key(provider)?;
    if let Some(q) = parts.uri.query() {
        crate::usage_params::upstream_query(provider.kind, q)?;
    }
    let target = route::classify_target(&rest, parts.uri.query());
    let endpoint = ledger::provider::classify(
        provider.kind,
        &provider.name,
        parts.method.as_str(),
        &target,
    );
    match &endpoint {
        Some(ep) if !ep.api.is_free() => call.api = ep.api.as_str(),
        Some(_) => {} // free token counting: forwarded unmetered
        None => check_unmetered(app, &entry, &parts.method, &rest, call).await?,
    }
    let endpoint = endpoint.filter(|ep| !ep.api.is_free());
    let (body, permit) = read_body(app, &parts, body).await?;
    Ok(Admission {
        provider,
        parts,
        rest,
        body,
        permit,
        endpoint,
        key: entry,
    })
}

fn is_read(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    )
}

/// An unmetered request goes out with the shared provider key: only public data and the
/// tenant's own stored objects pass, unless the key (`open_paths`) or the config
/// (`unmetered_endpoints = "allow"`) opens more ([`crate::access`]).
async fn check_unmetered(
    app: &App,
    entry: &KeyEntry,
    method: &http::Method,
    rest: &str,
    call: &Call,
) -> Result<(), ProxyError> {
    let path = rest.split('?').next().unwrap_or(rest);
    if entry.open_paths.allows(method, path) || app.cfg.unmetered_endpoints == UnknownModel::Allow {
        return Ok(());
    }
    match access::classify(call.kind, method, rest) {
        Access::Public => Ok(()),
        Access::Object(id) => match app.ledger.owns_object(&call.tenant, &id).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(ProxyError::ObjectForbidden {
                id,
                tenant: call.tenant.clone(),
            }),
            Err(e) => Err(ProxyError::LedgerUnavailable(e)),
        },
        Access::Other if is_read(method) || *method == http::Method::DELETE => {
            Err(ProxyError::EndpointForbidden {
                method: method.to_string(),
                path: path.chars().take(200).collect(),
            })
        }
        Access::Other => Err(ProxyError::Unmetered {
            method: method.to_string(),
            path: path.chars().take(200).collect(),
        }),
    }
}

/// The proxy key, the tenant it may bill, and the feature and session headers.
fn authenticate(
    app: &App,
    parts: &http::request::Parts,
    call: &mut Call,
) -> Result<Arc<KeyEntry>, ProxyError> {
    let key = auth::extract_key(&parts.headers, parts.uri.query()).ok_or(ProxyError::MissingKey)?;
    let entry = app.authenticate(&key).ok_or(ProxyError::BadKey)?;
    drop(key);
    let grant = entry.tenant_for(route::header_str(&parts.headers, "x-tenant-id"))?;
    if grant.by_wildcard && !entry.mint_tenants && !app.budgets.cache.has_own(&grant.tenant) {
        return Err(ProxyError::TenantNotProvisioned {
            tenant: grant.tenant,
        });
    }
    call.tenant = grant.tenant;
    call.feature = entry.feature_for(route::header_str(&parts.headers, "x-feature-name"))?;
    call.session = attribution(&parts.headers, "x-session-id", NameKind::Session)?;
    Ok(entry)
}

/// An attribution header, checked by the ledger's name rule for `kind`.
fn attribution(
    h: &http::HeaderMap,
    header: &'static str,
    kind: NameKind,
) -> Result<Option<String>, ProxyError> {
    match route::header_str(h, header) {
        None => Ok(None),
        Some(v) => match names::check(kind, v) {
            Ok(()) => Ok(Some(v.to_owned())),
            Err(_) => Err(ProxyError::BadAttribution {
                header,
                reason: names::RULE,
            }),
        },
    }
}

/// The body, bounded by `max_request_body_bytes` (a declared length over it gets 413 at once),
/// by `timeouts.client_ms`, and by what is left of `max_inflight_body_bytes` (503), counted
/// ([`REQUEST_COST_FACTOR`] times its size) as it arrives so that a body that does not fit is
/// never held whole.
async fn read_body(
    app: &App,
    parts: &http::request::Parts,
    body: Incoming,
) -> Result<(Bytes, BodyPermit), ProxyError> {
    let limit = app.cfg.max_request_body_bytes;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let mut permit = app.inflight.permit();
    let overloaded = || {
        app.metrics.inflight_refusals.inc();
        ProxyError::Overloaded {
            limit: app.inflight.limit(),
        }
    };
    // A declared length is counted before a byte is read; a chunked body frame by frame. A body
    // that does not fit is still read to its end, discarding it, so that the client (which
    // sends its whole body before reading the answer) gets the 503 rather than a reset.
    let upfront = declared.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let mut fits = permit.try_grow(upfront.saturating_mul(REQUEST_COST_FACTOR));
    let wait = Duration::from_millis(app.cfg.timeouts.client_ms);
    let mut body = Limited::new(body, limit);
    // Each frame is copied into one buffer as it arrives and then freed: a frame is a slice of
    // the connection's read buffer, so holding frames until the end would keep up to a whole
    // read buffer per frame alive, then need a second copy of the body to join them. A declared
    // length sizes the buffer once; a chunked body grows it by doubling.
    let mut buf = BytesMut::new();
    // A body that came whole in its first frame (most calls) is kept as is, without a copy.
    let mut whole: Option<Bytes> = None;
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue; // trailers
            };
            let cost = (buf.len() + data.len()).saturating_mul(REQUEST_COST_FACTOR);
            if fits && cost > permit.bytes() && !permit.try_grow(cost - permit.bytes()) {
                fits = false;
                buf = BytesMut::new();
                whole = None;
            }
            if !fits {
                continue;
            }
            if buf.is_empty() && whole.is_none() && data.len() == upfront {
                whole = Some(data);
                continue;
            }
            if let Some(first) = whole.take() {
                buf.reserve(first.len() + data.len());
                buf.extend_from_slice(&first);
            } else if buf.is_empty() {
                buf.reserve(upfront.min(limit).max(data.len()));
            }
            buf.extend_from_slice(&data);
        }
        Ok::<bool, Box<dyn std::error::Error + Send + Sync>>(fits)
    };
    match tokio::time::timeout(wait, read).await {
        Err(_) => Err(ProxyError::BodyRead(format!(
            "the request body did not arrive within {} ms (timeouts.client_ms)",
            wait.as_millis()
        ))),
        Ok(Ok(true)) => Ok((whole.unwrap_or_else(|| buf.freeze()), permit)),
        Ok(Ok(false)) => Err(overloaded()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Ok(Err(e)) => Err(ProxyError::BodyRead(e.to_string())),
    }
}

/// Parses the body of a metered call: model, stream, output limit, input estimate.
///
/// # Errors
/// [`ProxyError::BadBody`] when the body is not the JSON the API takes or names no model.
pub async fn parse(
    app: &App,
    adm: &Admission<'_>,
    endpoint: &Endpoint,
    call: &mut Call,
) -> Result<RequestInfo, ProxyError> {
    let info = if adm.body.len() >= BLOCKING_PARSE_BYTES {
        // A large body waits (without blocking a worker) for one of the CPU-count parse slots,
        // then is parsed on the blocking pool.
        let _slot = app.parse_slots.acquire().await.ok();
        let (e, body, cache, tenant) = (
            endpoint.clone(),
            adm.body.clone(),
            app.token_cache.clone(),
            call.tenant.clone(),
        );
        on_blocking_pool(move || ledger::request::parse_request_cached(&e, &body, &cache, &tenant))
            .await
            .ok_or_else(|| ProxyError::BodyRead("the enforcer is shutting down".into()))?
    } else {
        ledger::request::parse_request_cached(endpoint, &adm.body, &app.token_cache, &call.tenant)
    }
    .map_err(|e| ProxyError::BadBody(e.to_string()))?;
    // The model in the path is the one the provider runs and bills (Gemini
    // `models/{m}:generateContent`, an Azure deployment): it wins over a model named in the body.
    let model = endpoint
        .model_in_path
        .clone()
        .or_else(|| info.model.clone())
        .ok_or_else(|| ProxyError::BadBody("the request names no model".into()))?;
    adm.key.check_model(&model)?;
    call.model = model;
    if info.background && app.cfg.background_responses == BackgroundResponses::Deny {
        return Err(ProxyError::UsageSuppressed {
            param: "background: true",
            why: "a background response carries no usage when it is created; set \
                  background_responses = \"reserve\" to allow them, billed at their reservation",
        });
    }
    Ok(info)
}

/// Bodies from this size are parsed and tokenised off the async workers.
pub const BLOCKING_PARSE_BYTES: usize = 64 << 10;

/// Runs `f`, CPU-heavy work over a large body (parsing, tokenising megabytes of prompt), on
/// tokio's blocking pool, so that it does not stall the other calls of this proxy thread. `None`
/// when the runtime is shutting down; a panic in `f` goes on in the caller.
pub async fn on_blocking_pool<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Some(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}
