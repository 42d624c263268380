//! The admin API (its own listener, loopback by default): GET /healthz and /readyz without a
//! token (probes), everything else behind `Authorization: Bearer <admin token>`:
//! GET /spend, GET/PUT/DELETE /budgets, GET /budgets/check, GET /audit, GET /metrics, the
//! runtime keys ([`crate::admin_keys`]: /keys) and the routing rules ([`crate::admin_rules`]:
//! /rules).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ledger::Nanos;
use ledger::store::{Budget, Period};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{App, ProxyBody, auth, full_body};

fn respond(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(full_body(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

pub(crate) fn json_resp(status: StatusCode, v: &Value) -> Response<ProxyBody> {
    respond(status, "application/json", v.to_string())
}

pub(crate) fn err(status: StatusCode, msg: impl std::fmt::Display) -> Response<ProxyBody> {
    json_resp(
        status,
        &json!({"error": {"message": msg.to_string(), "code": status.as_u16()}}),
    )
}

fn query_param<'a>(q: Option<&'a str>, name: &str) -> Option<&'a str> {
    q?.split('&')
        .find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .filter(|v| !v.is_empty())
}

fn period(q: Option<&str>) -> Result<Period, String> {
    match query_param(q, "period") {
        None => Ok(Period::Month),
        Some(p) => p
            .parse()
            .map_err(|_| format!("period must be day or month, not {p:?}")),
    }
}

/// A budget as PUT takes it: `limit_usd` (decimal) or `limit_nusd` (integer).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetIn {
    tenant: String,
    #[serde(default)]
    feature: Option<String>,
    period: Period,
    #[serde(default)]
    limit_usd: Option<f64>,
    #[serde(default)]
    limit_nusd: Option<i64>,
}

impl BudgetIn {
    fn into_budget(self) -> Result<Budget, String> {
        let limit = match (self.limit_usd, self.limit_nusd) {
            (Some(u), None) => Nanos::from_usd_f64(u).map_err(|e| e.to_string())?,
            (None, Some(n)) if n >= 0 => Nanos(n),
            _ => return Err("give exactly one of limit_usd or limit_nusd (non-negative)".into()),
        };
        Ok(Budget {
            tenant: self.tenant,
            feature: self.feature,
            period: self.period,
            limit,
        })
    }
}

fn budget_json(b: &Budget) -> Value {
    json!({"tenant": b.tenant, "feature": b.feature, "period": b.period.as_str(), "limit_nusd": b.limit.0,
           "limit_usd": crate::usd_string(b.limit)})
}

/// Serves one admin request.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    let q = req.uri().query().map(str::to_owned);
    let q = q.as_deref();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => return respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            return match app.ledger.ping().await {
                Ok(()) => respond(StatusCode::OK, "text/plain", "ready\n"),
                Err(e) => respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("redis unreachable: {e}\n"),
                ),
            };
        }
        _ => {}
    }
    let token = app.admin_token.as_deref().unwrap_or("");
    if !auth::admin_token_ok(req.headers(), token) {
        return err(
            StatusCode::UNAUTHORIZED,
            "admin token required: Authorization: Bearer <value of admin_token_env>",
        );
    }
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            app.metrics.encode(),
        ),
        (Method::GET, "/spend") => {
            let p = match period(q) {
                Ok(p) => p,
                Err(e) => return err(StatusCode::BAD_REQUEST, e),
            };
            match crate::report::build(&app.ledger, query_param(q, "tenant"), p, chrono::Utc::now())
                .await
            {
                Ok(v) => json_resp(StatusCode::OK, &v),
                Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        (Method::GET, "/budgets") => match app.ledger.budgets().await {
            Ok(l) => json_resp(
                StatusCode::OK,
                &json!({"budgets": l.iter().map(budget_json).collect::<Vec<_>>()}),
            ),
            Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        (Method::PUT, "/budgets") => put_budgets(&app, req).await,
        (_, p) if p == "/keys" || p.starts_with("/keys/") => {
            crate::admin_keys::handle(&app, req, &path).await
        }
        (_, p) if p == "/rules" || p.starts_with("/rules/") => {
            crate::admin_rules::handle(&app, req, &path).await
        }
        (Method::GET, "/audit") => {
            let (status, v) = crate::audit_export::page(&app.ledger, q).await;
            json_resp(status, &v)
        }
        (Method::GET, "/budgets/check") => match app.ledger.check_budgets().await {
            Ok(p) => json_resp(
                StatusCode::OK,
                &json!({"valid": p.is_empty(), "problems": p.iter()
                    .map(|p| json!({"field": p.field, "problem": p.problem})).collect::<Vec<_>>()}),
            ),
            Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        (Method::DELETE, "/budgets") => {
            let (Some(tenant), Ok(p)) = (query_param(q, "tenant"), period(q)) else {
                return err(
                    StatusCode::BAD_REQUEST,
                    "DELETE /budgets?tenant=T&period=day|month[&feature=F]",
                );
            };
            match app
                .ledger
                .delete_budget(tenant, query_param(q, "feature"), p)
                .await
            {
                Ok(existed) => {
                    let _ = app.budgets.cache.refresh().await;
                    json_resp(StatusCode::OK, &json!({"deleted": existed}))
                }
                Err(e) => err(StatusCode::BAD_REQUEST, e),
            }
        }
        _ => err(
            StatusCode::NOT_FOUND,
            format!("no admin route {path}; see docs/enforcer.md"),
        ),
    }
}

async fn put_budgets(app: &App, req: Request<Incoming>) -> Response<ProxyBody> {
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("cannot read body: {e}")),
    };
    let items: Vec<BudgetIn> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(a)) => match a.into_iter().map(serde_json::from_value).collect() {
            Ok(v) => v,
            Err(e) => return err(StatusCode::BAD_REQUEST, e),
        },
        Ok(v) => match serde_json::from_value(v) {
            Ok(b) => vec![b],
            Err(e) => return err(StatusCode::BAD_REQUEST, e),
        },
        Err(e) => return err(StatusCode::BAD_REQUEST, e),
    };
    let mut stored = Vec::new();
    for it in items {
        let b = match it.into_budget() {
            Ok(b) => b,
            Err(e) => return err(StatusCode::BAD_REQUEST, e),
        };
        if let Err(e) = app.ledger.set_budget(&b).await {
            let st = if e.is_transient() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_REQUEST
            };
            return err(st, e);
        }
        stored.push(budget_json(&b));
    }
    // Take effect on this instance now; other replicas pick it up within a second.
    let _ = app.budgets.cache.refresh().await;
    json_resp(StatusCode::OK, &json!({"stored": stored}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_query_and_budgets() {
        assert_eq!(
            query_param(Some("tenant=acme&period=day"), "tenant"),
            Some("acme")
        );
        assert_eq!(period(Some("period=day")).unwrap(), Period::Day);
        assert!(period(Some("period=year")).is_err());
        let b: BudgetIn =
            serde_json::from_str(r#"{"tenant":"acme","period":"month","limit_usd":0.1}"#).unwrap();
        assert_eq!(b.into_budget().unwrap().limit, Nanos(100_000_000));
        let b: BudgetIn = serde_json::from_str(r#"{"tenant":"acme","period":"month"}"#).unwrap();
        assert!(b.into_budget().is_err());
    }
}
