//! Rate limits, a step of the **decide** phase: which request and token limits apply to a call
//! (its key's `rpm`/`tpm`, the tenant's `[[rate_limits]]`, the tenant + model's), passed to the
//! ledger's reserve script with the caps, so a call is admitted or refused as a whole, exactly
//! across replicas. The window is the last 60 seconds in one-second slots (see the ledger's
//! lua/common.lua); a refusal is 429 `rate_limited` with `retry-after`.

use globset::{Glob, GlobMatcher};
use ledger::store::RateLimit;

use crate::auth::KeyEntry;
use crate::config::RateLimitConfig;

#[derive(Debug, Clone)]
struct Rule {
    tenant: String,
    model: Option<GlobMatcher>,
    rpm: u64,
    tpm: u64,
}

/// The configured `[[rate_limits]]`.
#[derive(Debug, Clone, Default)]
pub struct RateRules {
    rules: Vec<Rule>,
}

impl RateRules {
    /// Compiles validated entries (a glob that fails is skipped; the config check refused it).
    #[must_use]
    pub fn new(cfg: &[RateLimitConfig]) -> RateRules {
        let rules = cfg
            .iter()
            .filter_map(|r| {
                let model = match &r.model {
                    Some(m) => Some(Glob::new(m).ok()?.compile_matcher()),
                    None => None,
                };
                Some(Rule {
                    tenant: if r.tenant.is_empty() {
                        "*".into()
                    } else {
                        r.tenant.clone()
                    },
                    model,
                    rpm: r.rpm,
                    tpm: r.tpm,
                })
            })
            .collect();
        RateRules { rules }
    }

    /// The limits of a call of `tenant` to `model` through `key`: the key's, then the tenant's
    /// rule without a model, then the first rule whose model glob matches (a tenant's own rule
    /// wins over a `*` one in each case).
    #[must_use]
    pub fn limits(&self, key: &KeyEntry, tenant: &str, model: &str) -> Vec<RateLimit> {
        let mut out = Vec::new();
        if key.rpm > 0 || key.tpm > 0 {
            out.push(RateLimit {
                scope: key.rate_scope(),
                rpm: key.rpm,
                tpm: key.tpm,
            });
        }
        let pick = |want_model: bool| {
            let fits = |r: &&Rule| match &r.model {
                None => !want_model,
                Some(g) => want_model && g.is_match(model),
            };
            self.rules
                .iter()
                .filter(|r| r.tenant == tenant)
                .find(fits)
                .or_else(|| self.rules.iter().filter(|r| r.tenant == "*").find(fits))
        };
        if let Some(r) = pick(false) {
            out.push(RateLimit {
                scope: "tenant".into(),
                rpm: r.rpm,
                tpm: r.tpm,
            });
        }
        if let Some(r) = pick(true) {
            out.push(RateLimit {
                scope: format!("model:{model}"),
                rpm: r.rpm,
                tpm: r.tpm,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KeyStore;
    use crate::config::KeyConfig;

    #[test]
    fn a_call_gets_its_keys_its_tenants_and_its_models_limits() {
        let keys = KeyStore::new(&[KeyConfig {
            sha256: crate::auth::hash_key("sk-r"),
            tenant: "acme".into(),
            rpm: 10,
            ..KeyConfig::default()
        }]);
        let key = keys.authenticate("sk-r").unwrap();
        let rules = RateRules::new(&[
            RateLimitConfig {
                tenant: "*".into(),
                rpm: 100,
                ..RateLimitConfig::default()
            },
            RateLimitConfig {
                tenant: "acme".into(),
                rpm: 50,
                tpm: 9000,
                ..RateLimitConfig::default()
            },
            RateLimitConfig {
                tenant: "*".into(),
                model: Some("gpt-4o*".into()),
                tpm: 5000,
                ..RateLimitConfig::default()
            },
        ]);
        let l = rules.limits(key, "acme", "gpt-4o-mini");
        let scopes: Vec<_> = l.iter().map(|r| (r.scope.as_str(), r.rpm, r.tpm)).collect();
        assert_eq!(scopes[0].1, 10);
        assert!(scopes[0].0.starts_with("key:f") && !scopes[0].0.contains("sk-r"));
        assert_eq!(
            &scopes[1..],
            [("tenant", 50, 9000), ("model:gpt-4o-mini", 0, 5000)]
        );
        let other = rules.limits(key, "beta", "claude-haiku-4-5");
        assert_eq!(
            other.len(),
            2,
            "the key's and the * tenant rule; no model rule matches"
        );
        assert_eq!(other[1].rpm, 100);
    }
}
