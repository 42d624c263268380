//! The spend report of the current period, shared by `enforcer report` and `GET /spend`: one
//! object per tenant with activity (including tenants only the observer has seen), amounts as
//! integer nano-USD, plus the limits that apply to it.

use chrono::{DateTime, Utc};
use ledger::store::{Budget, Ledger, Period, TenantSpend};
use serde_json::{Value, json};

use crate::budget::applicable;

fn limits(budgets: &[Budget], s: &TenantSpend, period: Period) -> Value {
    let list: Vec<Value> = applicable(budgets, &s.tenant)
        .into_iter()
        .filter(|b| b.period == period)
        .map(|b| {
            let (spent, held) = match &b.feature {
                None => (s.spend.0, s.held.0),
                Some(f) => (
                    s.by_feature.get(f).map_or(0, |n| n.0),
                    s.held_by_feature.get(f).map_or(0, |n| n.0),
                ),
            };
            json!({
                "scope": if b.feature.is_some() { "feature" } else { "tenant" },
                "feature": b.feature,
                "period": b.period.as_str(),
                "limit_nusd": b.limit.0,
                "spend_nusd": spent,
                "held_nusd": held,
                "remaining_nusd": (b.limit.0 - spent - held).max(0),
            })
        })
        .collect();
    Value::Array(list)
}

/// One tenant's object.
#[must_use]
pub fn tenant_json(s: &TenantSpend, budgets: &[Budget], period: Period) -> Value {
    let by_feature: serde_json::Map<String, Value> = s
        .by_feature
        .iter()
        .map(|(k, v)| (k.clone(), json!(v.0)))
        .collect();
    let by_model: serde_json::Map<String, Value> = s
        .by_model
        .iter()
        .map(|(k, v)| (k.clone(), json!(v.0)))
        .collect();
    json!({
        "tenant": s.tenant,
        "spend_nusd": s.spend.0,
        "held_nusd": s.held.0,
        "bypass_spend_nusd": s.bypass_spend.0,
        "estimated_spend_nusd": s.estimated_spend.0,
        "requests": s.requests,
        "input_tokens": s.input_tokens,
        "output_tokens": s.output_tokens,
        "by_source": {"enforcer": s.by_source.enforcer.0, "observer": s.by_source.observer.0},
        "by_feature": by_feature,
        "by_model": by_model,
        "limits": limits(budgets, s, period),
    })
}

/// The whole report: every active tenant of the period, or just `tenant`.
///
/// # Errors
/// When Redis does not answer.
pub async fn build(
    ledger: &Ledger,
    tenant: Option<&str>,
    period: Period,
    now: DateTime<Utc>,
) -> Result<Value, ledger::Error> {
    let budgets = ledger.budgets().await?;
    let tenants = match tenant {
        Some(t) => vec![t.to_owned()],
        None => {
            let mut v = ledger.active_tenants(period, now).await?;
            v.sort();
            v
        }
    };
    let mut out = Vec::with_capacity(tenants.len());
    for t in &tenants {
        let s = ledger.tenant_spend(t, period, now).await?;
        let mut v = tenant_json(&s, &budgets, period);
        add_unmetered(&mut v, &ledger.unmetered(t, period, now).await?);
        out.push(v);
    }
    Ok(json!({"period": period.id(now), "tenants": out}))
}

/// Adds the tenant's unmetered provider connections (the observer's egress accounting: traffic
/// to a provider that carried no call it could meter) to its object.
pub fn add_unmetered(v: &mut Value, u: &ledger::store::UnmeteredSummary) {
    let list: Vec<Value> = u
        .entries
        .iter()
        .map(|e| {
            json!({
                "service": e.service,
                "host": e.host,
                "connections": e.connections,
                "bytes_out": e.bytes_out,
                "bytes_in": e.bytes_in,
                "first_seen_ms": e.first_seen_ms,
                "last_seen_ms": e.last_seen_ms,
            })
        })
        .collect();
    if let Some(o) = v.as_object_mut() {
        o.insert("unmetered_connections".into(), json!(u.connections));
        o.insert("unmetered_bytes_out".into(), json!(u.bytes_out));
        o.insert("unmetered_bytes_in".into(), json!(u.bytes_in));
        o.insert("unmetered".into(), Value::Array(list));
    }
}

fn usd(v: &Value) -> String {
    crate::usd_string(ledger::Nanos(v.as_i64().unwrap_or(0)))
}

/// A readable table of a report.
#[must_use]
pub fn text(report: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "period {}", report["period"].as_str().unwrap_or("?"));
    let _ = writeln!(
        s,
        "{:<24} {:>16} {:>14} {:>14} {:>9} {:>12} {:>12}",
        "TENANT", "SPEND USD", "HELD USD", "BYPASS USD", "REQUESTS", "IN TOKENS", "OUT TOKENS"
    );
    for t in report["tenants"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:<24} {:>16} {:>14} {:>14} {:>9} {:>12} {:>12}",
            t["tenant"].as_str().unwrap_or("?"),
            usd(&t["spend_nusd"]),
            usd(&t["held_nusd"]),
            usd(&t["bypass_spend_nusd"]),
            t["requests"],
            t["input_tokens"],
            t["output_tokens"]
        );
        for l in t["limits"].as_array().into_iter().flatten() {
            let scope = l["feature"]
                .as_str()
                .map_or_else(|| "tenant".to_owned(), |f| format!("feature {f}"));
            let _ = writeln!(
                s,
                "  limit {scope} per {}: {} of {} used, {} left",
                l["period"].as_str().unwrap_or("?"),
                usd(&l["spend_nusd"]),
                usd(&l["limit_nusd"]),
                usd(&l["remaining_nusd"])
            );
        }
        for (f, v) in t["by_feature"].as_object().into_iter().flatten() {
            let _ = writeln!(s, "  feature {f}: {}", usd(v));
        }
        for u in t["unmetered"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "  UNMETERED {} -> {}: {} connections, {} bytes out, {} bytes in",
                u["service"].as_str().unwrap_or("?"),
                u["host"].as_str().unwrap_or("?"),
                u["connections"],
                u["bytes_out"],
                u["bytes_in"]
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use ledger::Nanos;

    use super::*;

    #[test]
    fn json_shape() {
        let mut s = TenantSpend {
            tenant: "acme".into(),
            spend: Nanos(5),
            ..TenantSpend::default()
        };
        s.by_feature.insert("bot".into(), Nanos(3));
        let b = vec![Budget {
            tenant: "*".into(),
            feature: None,
            period: Period::Month,
            limit: Nanos(10),
        }];
        let v = tenant_json(&s, &b, Period::Month);
        assert_eq!(v["spend_nusd"], 5);
        assert_eq!(v["by_feature"]["bot"], 3);
        assert_eq!(v["by_source"]["observer"], 0);
        assert_eq!(v["limits"][0]["remaining_nusd"], 5);
        let t = text(&json!({"period": "2026-11", "tenants": [v.clone()]}));
        assert!(t.contains("acme") && t.contains("0.000000005"), "{t}");
        let mut v = v;
        add_unmetered(
            &mut v,
            &ledger::store::UnmeteredSummary {
                connections: 1,
                bytes_out: 10,
                bytes_in: 20,
                entries: vec![ledger::store::UnmeteredEntry {
                    service: "agent".into(),
                    host: "api.openai.com".into(),
                    connections: 1,
                    bytes_out: 10,
                    bytes_in: 20,
                    ..Default::default()
                }],
            },
        );
        assert_eq!(v["unmetered_connections"], 1);
        assert_eq!(v["unmetered"][0]["host"], "api.openai.com");
        let t = text(&json!({"period": "2026-11", "tenants": [v]}));
        assert!(t.contains("UNMETERED agent -> api.openai.com"), "{t}");
    }
}
