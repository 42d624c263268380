//! The hot path of one proxied call: route → authenticate → attribute → classify → read the
//! (bounded) request body → loop check → price the worst case → reserve → forward → meter the
//! response back → settle. Everything the enforcer refuses is a [`ProxyError`] rendered in the
//! provider's error shape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use ledger::provider::{Api, Endpoint, ProviderKind};
use ledger::store::{ReserveOutcome, ReserveRequest, is_unavailable};
use ledger::usage::StreamMeter;

use crate::config::{OnRedisUnavailable, Provider, UnknownModel};
use crate::error::{Origin, ProxyError};
use crate::meter::{MeteredBody, collect_bounded, inject_include_usage};
use crate::settle::Settler;
use crate::{App, ProxyBody, REQUEST_ID_HEADER, auth, full_body, route, usd_string};

/// What is known of a call so far, for the error response and the log line.
struct Ctx {
    request_id: String,
    kind: ProviderKind,
    provider: String,
    tenant: String,
    feature: String,
    session: String,
    model: String,
    start: Instant,
}

/// Serves one request on the proxy listener.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<ProxyBody> {
    let mut ctx = Ctx {
        request_id: uuid::Uuid::now_v7().to_string(),
        kind: ProviderKind::OpenAi,
        provider: "unknown".into(),
        tenant: String::new(),
        feature: String::new(),
        session: String::new(),
        model: String::new(),
        start: Instant::now(),
    };
    let mut resp = match proxy(&app, req, &mut ctx).await {
        Ok(r) => r,
        Err(e) => {
            let decision = if e.origin() == Origin::Downstream {
                "denied"
            } else {
                "error"
            };
            if decision == "denied" {
                app.metrics.deny(&ctx.provider, e.code());
            } else {
                app.metrics.decision(&ctx.provider, "error");
            }
            tracing::info!(
                target: "llmwarden::request",
                request_id = %ctx.request_id, tenant = %ctx.tenant, feature = %ctx.feature, session = %ctx.session,
                provider = %ctx.provider, model = %ctx.model, input_tokens = 0u64, output_tokens = 0u64,
                cost_usd = "0.000000000", latency_ms = u64::try_from(ctx.start.elapsed().as_millis()).unwrap_or(0),
                decision, reason = e.code(), status = e.status().as_u16(), message = %e,
            );
            e.into_response(ctx.kind, &ctx.request_id)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

fn attribution(h: &http::HeaderMap, name: &'static str) -> Result<Option<String>, ProxyError> {
    match route::header_str(h, name) {
        None => Ok(None),
        Some(v) if auth::valid_name(v) => Ok(Some(v.to_owned())),
        Some(_) => Err(ProxyError::BadAttribution {
            header: name,
            reason: "1-128 chars of A-Z a-z 0-9 . _ - : @",
        }),
    }
}

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ProxyError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(e) => Err(ProxyError::BodyRead(e.to_string())),
    }
}

fn upstream_request(
    parts: &http::request::Parts,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body.clone()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    if !body.is_empty() || parts.method == Method::POST || parts.method == Method::PUT {
        req.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    req
}

async fn proxy(
    app: &App,
    req: Request<Incoming>,
    ctx: &mut Ctx,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, body) = req.into_parts();
    let pp = route::split(parts.uri.path())?;
    let provider: &Provider =
        app.providers
            .get(pp.provider)
            .ok_or_else(|| ProxyError::UnknownProvider {
                name: pp.provider.chars().take(64).collect(),
            })?;
    ctx.kind = provider.kind;
    ctx.provider.clone_from(&provider.name);
    let query = parts.uri.query();
    let key = auth::extract_key(&parts.headers, query).ok_or(ProxyError::MissingKey)?;
    let entry = app.keys.authenticate(&key).ok_or(ProxyError::BadKey)?;
    drop(key);
    let tenant = entry.tenant_for(route::header_str(&parts.headers, "x-tenant-id"))?;
    ctx.tenant.clone_from(&tenant);
    let feature = attribution(&parts.headers, "x-feature-name")?;
    let session = attribution(&parts.headers, "x-session-id")?;
    ctx.feature = feature.clone().unwrap_or_default();
    ctx.session = session.clone().unwrap_or_default();

    let target = route::classify_target(pp.rest, query);
    let endpoint = ledger::provider::classify(
        provider.kind,
        &provider.name,
        parts.method.as_str(),
        &target,
    );
    let uri = route::upstream_uri(provider, pp.rest, query)?;
    let real_key = app.upstream_key(provider)?;
    let mut headers = parts.headers.clone();
    route::upstream_headers(&mut headers, provider.kind, real_key);
    // A declared length over the limit gets 413 at once, without waiting for the body.
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = app.cfg.max_request_body_bytes;
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let client_wait = Duration::from_millis(app.cfg.timeouts.client_ms);
    let body = tokio::time::timeout(client_wait, read_body(body, app.cfg.max_request_body_bytes))
        .await
        .map_err(|_| {
            ProxyError::BodyRead(format!(
                "the request body did not arrive within {} ms (timeouts.client_ms)",
                client_wait.as_millis()
            ))
        })??;

    let endpoint: Endpoint = match endpoint {
        Some(ep) if !ep.api.is_free() => ep,
        Some(_) => {
            return passthrough(app, ctx, upstream_request(&parts, uri, headers, body)).await;
        }
        None => {
            let reads = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
            if reads || app.cfg.unmetered_endpoints == UnknownModel::Allow {
                return passthrough(app, ctx, upstream_request(&parts, uri, headers, body)).await;
            }
            return Err(ProxyError::Unmetered {
                method: parts.method.to_string(),
                path: pp.rest.chars().take(200).collect(),
            });
        }
    };
    let info = ledger::request::parse_request_cached(&endpoint, &body, &app.token_cache, &tenant)
        .map_err(|e| ProxyError::BadBody(e.to_string()))?;
    let model = info
        .model
        .clone()
        .or_else(|| endpoint.model_in_path.clone())
        .ok_or_else(|| ProxyError::BadBody("the request names no model".into()))?;
    ctx.model.clone_from(&model);

    let redis_allow = app.cfg.on_redis_unavailable == OnRedisUnavailable::Allow;
    if let Some(s) = &session {
        match app.loops.check(&tenant, s, &body).await {
            Ok(Some(msg)) => return Err(ProxyError::LoopDetected(msg)),
            Ok(None) => {}
            Err(e) if redis_allow => {
                tracing::warn!(error = %e, "loop counters unavailable; admitting")
            }
            Err(e) => return Err(ProxyError::LedgerUnavailable(e.to_string())),
        }
    }

    // The worst case: input estimate (+ margin unless exact) and the output limit.
    let margin = if info.input_estimate_exact {
        0
    } else {
        app.cfg.input_estimate_margin_pct
    };
    let input = info
        .input_tokens_estimate
        .saturating_mul(100 + margin)
        .div_ceil(100);
    let output = info.max_output_tokens.unwrap_or_else(|| {
        let cap = app.cfg.max_output_tokens_cap;
        app.pricing
            .max_output_tokens(&model)
            .map_or(cap, |m| m.min(cap))
    });
    let amount = app.pricing.max_cost(&model, input, output)?;

    let started_at = chrono::Utc::now();
    let rr = ReserveRequest {
        tenant: tenant.clone(),
        feature: feature.clone(),
        session: session.clone(),
        request_id: ctx.request_id.clone(),
        provider: provider.name.clone(),
        model: Some(model.clone()),
        amount,
        ttl: Duration::from_secs(app.cfg.reserve_ttl_secs),
        caps: app
            .budgets
            .caps(&tenant, feature.as_deref(), session.as_deref()),
        at: started_at,
    };
    let ledger = reserve(app, &rr).await?;

    let inject = provider.inject_include_usage
        && endpoint.api == Api::ChatCompletions
        && endpoint.kind.is_openai_family()
        && info.stream
        && !info.include_usage;
    let body = if inject {
        inject_include_usage(&body)?
    } else {
        body
    };
    let settler = Settler {
        ledger,
        pricing: app.pricing.clone(),
        metrics: app.metrics.clone(),
        tenant,
        feature,
        session,
        request_id: ctx.request_id.clone(),
        provider: provider.name.clone(),
        api: endpoint.api.as_str(),
        model,
        input_estimate: input,
        started_at,
        start: ctx.start,
        reserved: amount,
        spool: app.spool.clone(),
        tracker: app.settles.clone(),
    };
    app.metrics
        .overhead
        .observe(ctx.start.elapsed().as_secs_f64());
    app.metrics.decision(&provider.name, "allowed");

    let up_start = Instant::now();
    let resp = match app
        .upstreams
        .send(&provider.name, upstream_request(&parts, uri, headers, body))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            settler.release("upstream error", false).await;
            return Err(e);
        }
    };
    app.metrics
        .upstream_latency
        .observe(up_start.elapsed().as_secs_f64());
    let (mut rparts, rbody) = resp.into_parts();
    route::downstream_headers(&mut rparts.headers);
    let idle = Duration::from_millis(app.cfg.timeouts.idle_ms);
    let limit = app.cfg.max_response_body_bytes;
    if !rparts.status.is_success() {
        // The provider refused: nothing is billed; its error body goes back as is.
        let bytes = collect_bounded(rbody, limit, idle)
            .await
            .unwrap_or_default();
        settler.release("upstream error status", true).await;
        rparts.headers.remove(CONTENT_LENGTH);
        return Ok(Response::from_parts(rparts, full_body(bytes)));
    }
    let sse = rparts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if sse || info.stream || endpoint.stream_in_path {
        if inject {
            rparts.headers.remove(CONTENT_LENGTH);
        }
        let body = MeteredBody::new(rbody, StreamMeter::new(&endpoint), inject, idle, settler);
        return Ok(Response::from_parts(rparts, BodyExt::boxed_unsync(body)));
    }
    let bytes = match collect_bounded(rbody, limit, idle).await {
        Ok(b) => b,
        Err(detail) => {
            settler.release("upstream body failed", false).await;
            return Err(ProxyError::UpstreamBody {
                provider: provider.name.clone(),
                detail,
            });
        }
    };
    let (model, usage) = match ledger::usage::parse_response(&endpoint, &bytes) {
        Ok(m) if m.usage.is_some() => (m.model, m.usage),
        _ => {
            let mut m = StreamMeter::new(&endpoint);
            m.feed(&bytes);
            let meta = m.finish();
            (meta.model, meta.usage)
        }
    };
    // The cost is known now; committing it to Redis need not delay the response.
    let billed = settler.settle_in_background(model, usage);
    if let Ok(v) = HeaderValue::from_str(&usd_string(billed.cost)) {
        rparts.headers.insert("x-warden-cost-usd", v);
    }
    rparts.headers.remove(CONTENT_LENGTH);
    Ok(Response::from_parts(rparts, full_body(bytes)))
}

/// Reserves the worst case. `Ok(None)` admits the call without a reservation (Redis unavailable
/// under `on_redis_unavailable = "allow"`).
async fn reserve(
    app: &App,
    rr: &ReserveRequest,
) -> Result<Option<ledger::store::Ledger>, ProxyError> {
    let redis_timeout = Duration::from_millis(app.cfg.timeouts.redis_ms);
    let cause = match tokio::time::timeout(redis_timeout, app.ledger.reserve(rr)).await {
        Ok(Ok(ReserveOutcome::Allowed(_))) => return Ok(Some(app.ledger.clone())),
        Ok(Ok(ReserveOutcome::Denied(d))) => return Err(ProxyError::Budget(Box::new(d))),
        Ok(Err(ledger::Error::Invalid { what, detail })) => {
            return Err(ProxyError::BadBody(format!("{what}: {detail}")));
        }
        Ok(Err(e)) if !is_unavailable(&e) => {
            return Err(ProxyError::LedgerUnavailable(e.to_string()));
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!(
            "no reply within {} ms (timeouts.redis_ms)",
            redis_timeout.as_millis()
        ),
    };
    // The reserve may still have landed in Redis: release it once Redis answers again, so an
    // outage never leaves phantom holds blocking the budget until their ttl.
    let (ledger, tenant, id) = (app.ledger.clone(), rr.tenant.clone(), rr.request_id.clone());
    tokio::spawn(async move {
        for wait in [1u64, 5, 30, 120] {
            tokio::time::sleep(Duration::from_secs(wait)).await;
            if ledger.release(&tenant, &id).await.is_ok() {
                return;
            }
        }
    });
    if app.cfg.on_redis_unavailable == OnRedisUnavailable::Allow {
        if !app.emergency.admit(rr.amount) {
            return Err(ProxyError::LedgerUnavailable(format!(
                "{cause}; this instance's allowance for calls without a ledger (redis_unavailable_cap_usd) is used up"
            )));
        }
        app.metrics.redis_unavailable_admissions.inc();
        tracing::warn!(request_id = %rr.request_id, cause = %cause, "ledger unavailable; admitting without reservation");
        return Ok(None);
    }
    Err(ProxyError::LedgerUnavailable(cause))
}

/// Forwards a call the enforcer does not meter (reads such as GET /models, free count-tokens).
async fn passthrough(
    app: &App,
    ctx: &Ctx,
    req: Request<Full<Bytes>>,
) -> Result<Response<ProxyBody>, ProxyError> {
    app.metrics.decision(&ctx.provider, "passthrough");
    let resp = app.upstreams.send(&ctx.provider, req).await?;
    let (mut parts, body) = resp.into_parts();
    route::downstream_headers(&mut parts.headers);
    tracing::info!(
        target: "llmwarden::request",
        request_id = %ctx.request_id, tenant = %ctx.tenant, feature = %ctx.feature, session = %ctx.session,
        provider = %ctx.provider, model = "", input_tokens = 0u64, output_tokens = 0u64, cost_usd = "0.000000000",
        latency_ms = u64::try_from(ctx.start.elapsed().as_millis()).unwrap_or(0),
        decision = "passthrough", status = parts.status.as_u16(),
    );
    let body = body.map_err(|e| -> crate::meter::BoxError { Box::new(e) });
    Ok(Response::from_parts(parts, BodyExt::boxed_unsync(body)))
}
