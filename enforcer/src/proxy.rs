//! The request path of one proxied call, as named phases over one per-call context ([`Call`]):
//!
//! 1. **admit** ([`crate::admit`]): route, authenticate, attribute, read and parse the body;
//! 2. **decide** ([`crate::decide`]): loop check, price the worst case, reserve it ([`Hold`]);
//! 3. **forward** ([`crate::forward`]): build the upstream request, send it;
//! 4. **meter** ([`crate::meter`]): stream the response back while metering it;
//! 5. **settle** ([`crate::settle`]): bill, commit, count, log.
//!
//! A call refused in phases 1–2 costs nothing and is logged here; once a hold exists, the
//! [`Settler`] owns the call and ends it on every exit. Every call writes one [`CallLog`].
//!
//! [`Hold`]: crate::budget::Hold

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use ledger::provider::Endpoint;
use ledger::request::RequestInfo;
use ledger::usage::StreamMeter;

use crate::admit::{self, Admission};
use crate::call::{Admitting, Call, CallLog, Decision};
use crate::error::{Origin, ProxyError};
use crate::forward;
use crate::inflight::HeldBody;
use crate::meter::{MeteredBody, collect_bounded};
use crate::settle::{Settler, StoredObject};
use crate::{App, ProxyBody, REQUEST_ID_HEADER, Usd, full_body, route};
use crate::{decide, downgrade};

/// Serves one request on the proxy listener.
pub async fn handle(app: Arc<App>, req: http::Request<Incoming>) -> Response<ProxyBody> {
    let mut a = Admitting::new();
    let mut resp = match run(&app, req, &mut a).await {
        Ok(r) => r,
        Err(e) => refuse(&app, &a.call, e),
    };
    a.handed_off = true;
    if let Ok(v) = HeaderValue::from_str(&a.call.request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    if let Some(from) = &a.call.routed_from
        && let (Ok(f), Ok(t)) = (
            HeaderValue::from_str(from),
            HeaderValue::from_str(&a.call.model),
        )
    {
        resp.headers_mut().insert(downgrade::ROUTED_FROM, f);
        resp.headers_mut().insert(downgrade::ROUTED_TO, t);
    }
    resp
}

/// Runs the phases. An `Err` is a refusal before anything was held or forwarded.
async fn run(
    app: &App,
    req: http::Request<Incoming>,
    a: &mut Admitting,
) -> Result<Response<ProxyBody>, ProxyError> {
    let call = &mut a.call;
    let mut adm = admit::admit(app, req, call).await?;
    // Nothing reads the admission's endpoint after this: it is taken, not copied.
    let Some(endpoint) = adm.endpoint.take() else {
        let r = passthrough(app, call, &mut adm).await;
        a.handed_off = r.is_ok();
        return r;
    };
    let info = admit::parse(app, &adm, &endpoint, call).await?;
    let (info, mut decision) = match decide::decide(app, &adm, &info, call).await {
        Ok(d) => (info, d),
        Err(e @ ProxyError::Budget(_)) => {
            downgrade::try_chain(app, &mut adm, &endpoint, call, e).await?
        }
        Err(e) => return Err(e),
    };
    // A call on a spare hold is that hold's from here: settled or released under its id (no
    // await between taking it and this, so a dropped request cannot lose it).
    if let Some(id) = decision.lease.take() {
        call.request_id = id;
    }
    app.metrics
        .overhead
        .observe(call.start.elapsed().as_secs_f64());
    app.metrics.decision(&call.provider, "allowed");
    let settler = Settler {
        call: call.hand_off(),
        hold: decision.hold,
        input_estimate: decision.input_estimate,
        token_rates: decision.token_rates,
        sent: Arc::new(AtomicBool::new(false)),
        pricing: app.pricing.clone(),
        durable: app.durable.clone(),
        metrics: app.metrics.clone(),
        tracker: app.settles.clone(),
        stored: info.stores_object.then(|| StoredObject {
            api: endpoint.api,
            ttl: Duration::from_secs(app.cfg.object_ttl_secs),
            id: None,
        }),
    };
    // From here the settler ends the call and writes its log line, on every exit.
    let pending = Pending(Some(settler));
    a.handed_off = true;
    Ok(forward_and_meter(app, &mut adm, &endpoint, &info, pending).await)
}

/// An admitted call whose settler has not yet been handed to its response: if the request
/// future is dropped here (the client went away before the response head), the call is ended
/// by the same rule as a failure — released if the request never left, else settled.
struct Pending(Option<Settler>);

impl Pending {
    fn settler(&self) -> &Settler {
        self.0
            .as_ref()
            .expect("a pending call holds its settler until it is ended")
    }

    fn settler_mut(&mut self) -> &mut Settler {
        self.0
            .as_mut()
            .expect("a pending call holds its settler until it is ended")
    }

    fn take(mut self) -> Settler {
        self.0.take().expect("a pending call is ended once")
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.abandon();
        }
    }
}

/// A call refused before it was forwarded: counted, logged once, rendered in the provider's shape.
fn refuse(app: &App, call: &Call, e: ProxyError) -> Response<ProxyBody> {
    let decision = if e.origin() == Origin::Downstream {
        app.metrics.deny(&call.provider, e.code());
        Decision::Denied
    } else {
        app.metrics.decision(&call.provider, "error");
        Decision::Error
    };
    let mut log = CallLog::new(call, decision, e.code(), e.status().as_u16());
    log.message = Some(e.to_string());
    log.write();
    e.into_response(call.kind, &call.request_id)
}

/// Phases 3–5 of an admitted call. Infallible: a failure settles or releases the hold and
/// becomes the error response.
async fn forward_and_meter(
    app: &App,
    adm: &mut Admission<'_>,
    endpoint: &Endpoint,
    info: &RequestInfo,
    pending: Pending,
) -> Response<ProxyBody> {
    let mut pending = pending;
    let (resp, inject) = match send_with_failover(app, adm, endpoint, info, &mut pending).await {
        Ok(r) => r,
        Err(e) => return pending.take().fail(e).await,
    };
    let (mut parts, body) = resp.into_parts();
    route::downstream_headers(&mut parts.headers);
    let idle = Duration::from_millis(app.cfg.timeouts.idle_ms);
    if !parts.status.is_success() {
        // The provider refused: nothing is billed; its error body goes back as is.
        let mut permit = app.inflight.permit();
        let bytes = collect_bounded(body, app.cfg.max_response_body_bytes, idle, &mut permit)
            .await
            .unwrap_or_default();
        pending.take().refused_upstream(parts.status).await;
        parts.headers.remove(CONTENT_LENGTH);
        return Response::from_parts(parts, HeldBody::wrap(full_body(bytes), permit));
    }
    let sse = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if sse || info.stream || endpoint.stream_in_path {
        if inject {
            parts.headers.remove(CONTENT_LENGTH);
        }
        let meter = StreamMeter::new(endpoint);
        let body = MeteredBody::new(body, meter, inject, idle, pending.take());
        return Response::from_parts(parts, BodyExt::boxed_unsync(body));
    }
    meter_whole(app, endpoint, parts, body, pending).await
}

/// Phase 3: sends the call to its route, or (weights) to one of the route's `failover` routes
/// first; a connect error before the request left, a 429 or a 5xx moves it to the next route
/// in order. The call keeps its one hold throughout: a provider bills none of those failures.
/// Returns the answer and whether its request had `include_usage` injected.
async fn send_with_failover(
    app: &App,
    adm: &mut Admission<'_>,
    endpoint: &Endpoint,
    info: &RequestInfo,
    pending: &mut Pending,
) -> Result<(Response<Incoming>, bool), ProxyError> {
    let mut order = app.upstreams.order(adm.provider, &app.providers);
    let model = pending.settler().call.model.clone();
    // A failover route whose key variable was empty at start cannot be tried (the call's own
    // route was checked at admission), nor an azure-openai failover without a deployment for
    // the call's model and API.
    order.retain(|t| {
        t.name == adm.provider.name
            || (app.upstream_key(t).is_ok()
                && (!crate::route::crosses_kind(adm.provider, t)
                    || crate::route::azure_failover_uri(t, endpoint.api, &model).is_some()))
    });
    let sent = pending.settler().sent.clone();
    for (i, target) in order.iter().enumerate() {
        let inject = forward::injects_usage(target, endpoint, info);
        let uri = forward::target_uri(adm, target, endpoint.api, &model)?;
        // The last attempt takes the client's headers; an earlier one leaves them for the next.
        let headers = if i + 1 == order.len() {
            std::mem::take(&mut adm.parts.headers)
        } else {
            adm.parts.headers.clone()
        };
        let req = forward::upstream_request(app, adm, headers, target, uri, inject, sent.clone())?;
        let up_start = Instant::now();
        let result = app.upstreams.send(&target.name, req).await;
        let call = &mut pending.settler_mut().call;
        call.attempts = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if i > 0 || target.name != adm.provider.name {
            call.upstream.clone_from(&target.name);
        }
        let reason = match &result {
            Ok(r) if forward::retryable_status(r.status()) => r.status().as_str().to_owned(),
            Err(ProxyError::UpstreamConnect { .. }) if !sent.load(Ordering::Acquire) => {
                "connect".to_owned()
            }
            _ => String::new(),
        };
        let Some(to) = order.get(i + 1).filter(|_| !reason.is_empty()) else {
            if result.is_ok() {
                app.metrics
                    .upstream_latency
                    .observe(up_start.elapsed().as_secs_f64());
            }
            return result.map(|r| (r, inject));
        };
        // The provider answered with an error (or never got the request): nothing was billed,
        // so the next attempt starts unsent. Its error body is dropped unread.
        sent.store(false, Ordering::Release);
        tracing::debug!(from = %target.name, to = %to.name, reason = %reason, "failing over");
        app.metrics.failover(&target.name, &to.name, reason);
    }
    // `order` always holds the call's own route, so the loop returned.
    Err(ProxyError::UpstreamConnect {
        provider: adm.provider.name.clone(),
        detail: "no upstream route to try".into(),
    })
}

/// The model and usage a whole non-stream response reports (SSE-framed bodies too); none found
/// leaves the settle to bill its estimate.
fn response_usage(
    endpoint: &Endpoint,
    bytes: &[u8],
) -> (Option<String>, Option<ledger::usage::Usage>) {
    // The ledger builds only the members it reads: a large answer costs no tree.
    match ledger::usage::parse_response(endpoint, bytes) {
        Ok(m) if m.usage.is_some() => (m.model, m.usage),
        _ => {
            let mut m = StreamMeter::new(endpoint);
            m.feed(bytes);
            let meta = m.finish();
            (meta.model, meta.usage)
        }
    }
}

/// Phase 4 for a non-stream response: read it whole (bounded), read its usage, settle in the
/// background and answer with the cost header.
async fn meter_whole(
    app: &App,
    endpoint: &Endpoint,
    mut parts: http::response::Parts,
    body: Incoming,
    pending: Pending,
) -> Response<ProxyBody> {
    let idle = Duration::from_millis(app.cfg.timeouts.idle_ms);
    let mut permit = app.inflight.permit();
    let limit = app.cfg.max_response_body_bytes;
    let bytes = match collect_bounded(body, limit, idle, &mut permit).await {
        Ok(b) => b,
        Err(source) => {
            let provider = pending.settler().call.provider.clone();
            return pending
                .take()
                .fail(ProxyError::UpstreamBody { provider, source })
                .await;
        }
    };
    let mut settler = pending.take();
    settler.note_object(&bytes);
    let (model, usage) = if bytes.len() >= admit::BLOCKING_PARSE_BYTES {
        let (e, b) = (endpoint.clone(), bytes.clone());
        admit::on_blocking_pool(move || response_usage(&e, &b))
            .await
            .unwrap_or_default()
    } else {
        response_usage(endpoint, &bytes)
    };
    // The cost is known now; committing it to Redis need not delay the response.
    let billed = settler.settle_in_background(model, usage);
    if let Ok(v) = HeaderValue::from_str(Usd::new(billed.cost).as_str()) {
        parts.headers.insert("x-warden-cost-usd", v);
    }
    parts.headers.remove(CONTENT_LENGTH);
    Response::from_parts(parts, HeldBody::wrap(full_body(bytes), permit))
}

/// Forwards a call the enforcer does not meter (reads such as GET /models, free count-tokens).
async fn passthrough(
    app: &App,
    call: &Call,
    adm: &mut Admission<'_>,
) -> Result<Response<ProxyBody>, ProxyError> {
    app.metrics.decision(&call.provider, "passthrough");
    let uri = crate::route::upstream_uri(adm.provider, &adm.rest, adm.parts.uri.query())?;
    let headers = std::mem::take(&mut adm.parts.headers);
    let req =
        forward::upstream_request(app, adm, headers, adm.provider, uri, false, Arc::default())?;
    let resp = app.upstreams.send(&call.provider, req).await?;
    let (mut parts, body) = resp.into_parts();
    route::downstream_headers(&mut parts.headers);
    CallLog::new(
        call,
        Decision::Passthrough,
        "forwarded",
        parts.status.as_u16(),
    )
    .write();
    let body = body.map_err(|e| -> crate::meter::BoxError { Box::new(e) });
    Ok(Response::from_parts(parts, BodyExt::boxed_unsync(body)))
}
