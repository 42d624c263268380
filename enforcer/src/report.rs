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
        out.push(tenant_json(&s, &budgets, period));
    }
    Ok(json!({"period": period.id(now), "tenants": out}))
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
        let t = text(&json!({"period": "2026-11", "tenants": [v]}));
        assert!(t.contains("acme") && t.contains("0.000000005"), "{t}");
    }
}
