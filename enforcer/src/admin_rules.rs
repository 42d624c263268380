//! The admin API's routing rules ([`crate::rules`]): `GET /rules` (the sets in force and where
//! each came from), `PUT /rules/downgrades` and `PUT /rules/rate_limits` (a JSON array of entries,
//! the file's `[[downgrades]]` / `[[rate_limits]]` keys; replaces the whole set on every replica
//! within a second), `DELETE /rules/<set>` (back to the file's set).

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::admin::{err, json_resp};
use crate::{App, ProxyBody};

/// Serves `/rules` and `/rules/<set>`.
pub async fn handle(app: &App, req: Request<Incoming>, path: &str) -> Response<ProxyBody> {
    let set = path.strip_prefix("/rules/").unwrap_or("");
    match (req.method().clone(), set) {
        (Method::GET, "") => {
            let c = app.rules.current();
            json_resp(
                StatusCode::OK,
                &json!({
                    "downgrades": {"source": c.downgrade_entries.1, "rules": c.downgrade_entries.0},
                    "rate_limits": {"source": c.rate_entries.1, "rules": c.rate_entries.0},
                }),
            )
        }
        (Method::PUT, "downgrades" | "rate_limits") => {
            let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return err(StatusCode::BAD_REQUEST, format!("cannot read body: {e}")),
            };
            let json = match crate::rules::validate_set(set, &body) {
                Ok(j) => j,
                Err(e) => return err(StatusCode::BAD_REQUEST, e),
            };
            if let Err(e) = app.ledger.set_rule_set(set, &json).await {
                return err(StatusCode::SERVICE_UNAVAILABLE, e);
            }
            reload(app).await;
            tracing::info!(set, "rule set stored through the admin API");
            json_resp(StatusCode::OK, &json!({"stored": set}))
        }
        (Method::DELETE, "downgrades" | "rate_limits") => {
            match app.ledger.delete_rule_set(set).await {
                Ok(existed) => {
                    reload(app).await;
                    json_resp(StatusCode::OK, &json!({"deleted": existed}))
                }
                Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        _ => err(
            StatusCode::NOT_FOUND,
            "rules: GET /rules, PUT or DELETE /rules/downgrades or /rules/rate_limits",
        ),
    }
}

/// This replica applies the edit at once (the others within their refresh interval).
async fn reload(app: &App) {
    if let Err(e) = app.rules.refresh(true).await {
        tracing::warn!(error = %e, "could not reload the rules after an edit; the refresher retries");
    }
}
