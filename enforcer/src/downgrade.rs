//! Budget-aware downgrade, a step of the **decide** phase: when a cap would deny the model a
//! call names, the first model of the matching `[[downgrades]]` chain that the caller's key may
//! use and that every cap admits is reserved instead (each try one atomic reserve, so no chain
//! gets around a budget), the request's `model` is rewritten, and the client is told with
//! `x-warden-routed-from` / `x-warden-routed-to`. Models named in the path (Gemini, Azure
//! deployments) are not rewritten: those calls keep their denial.

use bytes::Bytes;
use globset::{Glob, GlobMatcher};
use ledger::provider::Endpoint;
use ledger::request::RequestInfo;

use crate::App;
use crate::admit::Admission;
use crate::call::Call;
use crate::config::DowngradeConfig;
use crate::decide::{self, Decision};
use crate::error::ProxyError;

/// Response header: the model the request named.
pub const ROUTED_FROM: &str = "x-warden-routed-from";
/// Response header: the model that ran instead.
pub const ROUTED_TO: &str = "x-warden-routed-to";

/// One compiled chain.
#[derive(Debug, Clone)]
struct Rule {
    tenant: String,
    feature: Option<String>,
    from: GlobMatcher,
    to: Vec<String>,
    route: Option<String>,
}

/// The chain a denied call may try: models in order, and the route they run on (`None`: the
/// call's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain<'a> {
    /// Models to try, in order.
    pub to: &'a [String],
    /// Another provider route of the same API kind.
    pub route: Option<&'a str>,
}

/// The configured chains, in file order (the first that matches a call applies).
#[derive(Debug, Clone, Default)]
pub struct Downgrades {
    rules: Vec<Rule>,
}

impl Downgrades {
    /// Compiles validated config entries (a glob that fails to compile is skipped; the config
    /// check refused it first).
    #[must_use]
    pub fn new(cfg: &[DowngradeConfig]) -> Downgrades {
        let rules = cfg
            .iter()
            .filter_map(|d| {
                Some(Rule {
                    tenant: if d.tenant.is_empty() {
                        "*".into()
                    } else {
                        d.tenant.clone()
                    },
                    feature: d.feature.clone(),
                    from: Glob::new(&d.from).ok()?.compile_matcher(),
                    to: d.to.clone(),
                    route: d.route.clone(),
                })
            })
            .collect();
        Downgrades { rules }
    }

    /// The chain for a call of `tenant` / `feature` to `model`: a tenant's own rule wins over a
    /// `*` one, then file order.
    #[must_use]
    pub fn chain(&self, tenant: &str, feature: Option<&str>, model: &str) -> Option<Chain<'_>> {
        let fits = |r: &&Rule| {
            r.from.is_match(model) && r.feature.as_deref().is_none_or(|f| feature == Some(f))
        };
        self.rules
            .iter()
            .filter(|r| r.tenant == tenant)
            .find(fits)
            .or_else(|| self.rules.iter().filter(|r| r.tenant == "*").find(fits))
            .map(|r| Chain {
                to: &r.to,
                route: r.route.as_deref(),
            })
    }
}

/// The body with its top-level `model` replaced.
fn with_model(body: &[u8], model: &str) -> Result<Bytes, ProxyError> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ProxyError::BadBody(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| ProxyError::BadBody("the body is not a JSON object".into()))?;
    obj.insert("model".into(), serde_json::Value::String(model.to_owned()));
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| ProxyError::BadBody(e.to_string()))
}

/// After `denied` (a budget denial of `call.model`): tries the call's downgrade chain. On
/// success the admission carries the rewritten body, `call.model` and `call.routed_from` are
/// set, and the new request info and decision are returned; otherwise the original denial.
///
/// # Errors
/// `denied` when no model of the chain fits; any other error of a reserve.
pub async fn try_chain<'a>(
    app: &'a App,
    adm: &mut Admission<'a>,
    endpoint: &Endpoint,
    call: &mut Call,
    denied: ProxyError,
) -> Result<(RequestInfo, Decision), ProxyError> {
    let rules = app.rules.current();
    let Some(chain) = rules
        .downgrades
        .chain(&call.tenant, call.feature.as_deref(), &call.model)
    else {
        return Err(denied);
    };
    if endpoint.model_in_path.is_some() {
        return Err(denied);
    }
    let Some(target) = chain_route(app, adm, chain.route) else {
        return Err(denied);
    };
    let (original, original_route) = (call.model.clone(), call.provider.clone());
    call.provider.clone_from(&target.name);
    let restore = |call: &mut Call| {
        call.model.clone_from(&original);
        call.provider.clone_from(&original_route);
    };
    for model in chain.to {
        if *model == original || adm.key.check_model(model).is_err() {
            continue;
        }
        let body = with_model(&adm.body, model)?;
        let info =
            ledger::request::parse_request_cached(endpoint, &body, &app.token_cache, &call.tenant)
                .map_err(|e| ProxyError::BadBody(e.to_string()))?;
        call.model.clone_from(model);
        match decide::reserve_worst_case(app, &adm.key, &info, call).await {
            Ok(d) => {
                tracing::debug!(from = %original, to = %model, route = %target.name, "budget-aware downgrade");
                adm.body = body;
                adm.provider = target;
                call.routed_from = Some(original);
                return Ok((info, d));
            }
            Err(ProxyError::Budget(_) | ProxyError::UnknownModel { .. }) => {}
            Err(e) => {
                restore(call);
                return Err(e);
            }
        }
    }
    restore(call);
    Err(denied)
}

/// The route a chain runs on: the call's own, or the chain's `route` when it exists, speaks the
/// call's API kind, the key may use it and its upstream key is set (else the chain is skipped
/// and the denial stands).
fn chain_route<'a>(
    app: &'a App,
    adm: &Admission<'a>,
    route: Option<&str>,
) -> Option<&'a crate::config::Provider> {
    let Some(r) = route else {
        return Some(adm.provider);
    };
    let usable = app.providers.get(r).filter(|p| {
        p.kind == adm.provider.kind
            && adm.key.check_provider(r).is_ok()
            && app.upstream_key(p).is_ok()
    });
    if usable.is_none() {
        tracing::warn!(
            route = r,
            "downgrade route not usable for this call (unknown, another API kind, not allowed for the key, or no upstream key): the denial stands"
        );
    }
    usable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_match_tenant_first_then_star() {
        let d = Downgrades::new(&[
            DowngradeConfig {
                tenant: "*".into(),
                from: "gpt-4o".into(),
                to: vec!["gpt-4o-mini".into()],
                ..DowngradeConfig::default()
            },
            DowngradeConfig {
                tenant: "acme".into(),
                feature: Some("bot".into()),
                from: "gpt-4o*".into(),
                to: vec!["gpt-4.1-nano".into()],
                route: Some("openai-eu".into()),
            },
        ]);
        let bot = d.chain("acme", Some("bot"), "gpt-4o").unwrap();
        assert_eq!(
            (bot.to, bot.route),
            (&["gpt-4.1-nano".to_owned()][..], Some("openai-eu"))
        );
        let star = d.chain("acme", None, "gpt-4o").unwrap();
        assert_eq!(
            (star.to, star.route),
            (&["gpt-4o-mini".to_owned()][..], None)
        );
        assert_eq!(
            d.chain("other", None, "gpt-4o").unwrap().to,
            ["gpt-4o-mini"]
        );
        assert!(d.chain("other", None, "gpt-4o-mini").is_none());
        let b = with_model(br#"{"model":"gpt-4o","messages":[]}"#, "gpt-4o-mini").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], "gpt-4o-mini");
        assert!(with_model(b"[1]", "m").is_err());
    }
}
