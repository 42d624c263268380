//! Proxy-key authentication: the caller's key is found wherever its SDK puts it, hashed with
//! sha256 and compared in constant time against every configured hash, so neither timing nor the
//! config reveals a key.

use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};
use http::HeaderMap;
use ledger::store::ApiKey;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::KeyConfig;
use crate::error::ProxyError;

/// Lowercase hex sha256 of a key, as written in `[[keys]] sha256`.
#[must_use]
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Which tenants a key may name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    /// Any tenant ("*").
    Any,
    /// Exactly these (its own default tenant is always allowed).
    List(Vec<String>),
}

/// A configured key (file or runtime), known only by its hash.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    hash: [u8; 32],
    /// A runtime key's id (`k_...`); `None` for a key from the file.
    pub id: Option<String>,
    /// Models it may call (`None`: any), and the globs for the refusal's message.
    models: Option<GlobSet>,
    /// Provider routes it may use (empty: any).
    providers: Vec<String>,
    /// Requests per minute through it, per tenant (0: none).
    pub rpm: u64,
    /// Tokens per minute through it, per tenant (0: none).
    pub tpm: u64,
    /// The tenant billed when the request names none.
    pub tenant: String,
    allowed: Allowed,
    /// Features the key may bill; the first is the default. Empty: any.
    features: Vec<String>,
    /// Whether a wildcard key may bill tenants without a budget of their own.
    pub mint_tenants: bool,
    /// Unmetered paths open to this key beyond the defaults.
    pub open_paths: crate::access::OpenPaths,
}

/// The tenant a call bills and how the key came to allow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantGrant {
    /// The tenant.
    pub tenant: String,
    /// Allowed only through `allowed_tenants = ["*"]` (not the key's own, not listed): the
    /// caller must check the tenant has a budget of its own unless the key may mint tenants.
    pub by_wildcard: bool,
}

impl Allowed {
    /// `allowed_tenants` as given by the file or a runtime key: `["*"]` (among others) is any.
    fn new(list: &[String]) -> Allowed {
        if list.iter().any(|t| t == "*") {
            Allowed::Any
        } else {
            Allowed::List(list.to_vec())
        }
    }
}

/// The globs as one set (`None` when there are none: any model). Bad globs were refused by
/// the config check or the admin API; one that still fails to build refuses every model.
fn model_set(globs: &[String]) -> Option<GlobSet> {
    if globs.is_empty() {
        return None;
    }
    let mut b = GlobSetBuilder::new();
    for g in globs {
        if let Ok(g) = Glob::new(g) {
            b.add(g);
        }
    }
    Some(b.build().unwrap_or_else(|_| GlobSet::empty()))
}

impl KeyEntry {
    /// A runtime key's entry for one of its live secret hashes.
    #[must_use]
    pub fn from_api_key(k: &ApiKey, sha256: &str) -> Option<KeyEntry> {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(sha256, &mut hash).ok()?;
        Some(KeyEntry {
            hash,
            id: Some(k.id.clone()),
            models: model_set(&k.allowed_models),
            providers: k.allowed_providers.clone(),
            rpm: k.rpm,
            tpm: k.tpm,
            tenant: k.tenant.clone(),
            allowed: Allowed::new(&k.allowed_tenants),
            features: k.features.clone(),
            mint_tenants: false,
            open_paths: crate::access::OpenPaths::default(),
        })
    }

    /// The scope of its rate limits: `key:<id>` for a runtime key, `key:f<16 hex of its hash>`
    /// for a file key (never the secret).
    #[must_use]
    pub fn rate_scope(&self) -> String {
        match &self.id {
            Some(id) => format!("key:{id}"),
            None => format!("key:f{}", hex::encode(&self.hash[..8])),
        }
    }

    /// The hash this entry matches.
    #[must_use]
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// Refuses a model outside `allowed_models`.
    ///
    /// # Errors
    /// 403 `model_forbidden`.
    pub fn check_model(&self, model: &str) -> Result<(), ProxyError> {
        match &self.models {
            Some(set) if !set.is_match(model) => Err(ProxyError::ModelForbidden {
                model: model.chars().take(128).collect(),
            }),
            _ => Ok(()),
        }
    }

    /// Refuses a provider route outside `allowed_providers`.
    ///
    /// # Errors
    /// 403 `provider_forbidden`.
    pub fn check_provider(&self, provider: &str) -> Result<(), ProxyError> {
        if self.providers.is_empty() || self.providers.iter().any(|p| p == provider) {
            Ok(())
        } else {
            Err(ProxyError::ProviderForbidden {
                provider: provider.to_owned(),
            })
        }
    }

    /// The tenant this call bills: X-Tenant-ID when given and allowed, else the key's own.
    ///
    /// # Errors
    /// 400 for a malformed name, 403 for a tenant outside `allowed_tenants`.
    pub fn tenant_for(&self, requested: Option<&str>) -> Result<TenantGrant, ProxyError> {
        let Some(t) = requested else {
            return Ok(TenantGrant {
                tenant: self.tenant.clone(),
                by_wildcard: false,
            });
        };
        if ledger::names::check(ledger::names::NameKind::Tenant, t).is_err() {
            return Err(ProxyError::BadAttribution {
                header: "X-Tenant-ID",
                reason: ledger::names::RULE,
            });
        }
        let listed = t == self.tenant
            || matches!(&self.allowed, Allowed::List(l) if l.iter().any(|a| a == t));
        if listed || self.allowed == Allowed::Any {
            Ok(TenantGrant {
                tenant: t.to_owned(),
                by_wildcard: !listed,
            })
        } else {
            Err(ProxyError::TenantForbidden {
                tenant: t.to_owned(),
            })
        }
    }

    /// The feature this call bills: X-Feature-Name when given (and, for a key bound to
    /// features, in its list), else the key's first feature, else none.
    ///
    /// # Errors
    /// 400 for a malformed name, 403 for a feature the key is not bound to.
    pub fn feature_for(&self, requested: Option<&str>) -> Result<Option<String>, ProxyError> {
        let Some(f) = requested else {
            return Ok(self.features.first().cloned());
        };
        if ledger::names::check(ledger::names::NameKind::Feature, f).is_err() {
            return Err(ProxyError::BadAttribution {
                header: "X-Feature-Name",
                reason: ledger::names::RULE,
            });
        }
        if self.features.is_empty() || self.features.iter().any(|a| a == f) {
            Ok(Some(f.to_owned()))
        } else {
            Err(ProxyError::FeatureForbidden {
                feature: f.to_owned(),
            })
        }
    }
}

/// Every key of the config file.
#[derive(Debug, Clone, Default)]
pub struct KeyStore {
    keys: Vec<Arc<KeyEntry>>,
}

impl KeyStore {
    /// Builds the store from validated config entries (bad hex is skipped; validation rejects it first).
    #[must_use]
    pub fn new(cfg: &[KeyConfig]) -> KeyStore {
        let keys = cfg
            .iter()
            .filter_map(|k| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&k.sha256, &mut hash).ok()?;
                let allowed = Allowed::new(&k.allowed_tenants);
                Some(Arc::new(KeyEntry {
                    hash,
                    id: None,
                    models: model_set(&k.allowed_models),
                    providers: k.allowed_providers.clone(),
                    rpm: k.rpm,
                    tpm: k.tpm,
                    tenant: k.tenant.clone(),
                    allowed,
                    features: k.features.clone(),
                    mint_tenants: k.mint_tenants,
                    open_paths: crate::access::OpenPaths::new(&k.open_paths).ok()?,
                }))
            })
            .collect();
        KeyStore { keys }
    }

    /// The entry whose hash matches `key`. Every entry is compared, whatever matches, in constant
    /// time per entry.
    #[must_use]
    pub fn authenticate(&self, key: &str) -> Option<&Arc<KeyEntry>> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.authenticate_digest(&digest)
    }

    /// As [`KeyStore::authenticate`], given the key's sha256.
    #[must_use]
    pub fn authenticate_digest(&self, digest: &[u8; 32]) -> Option<&Arc<KeyEntry>> {
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.hash.ct_eq(digest)) && found.is_none() {
                found = Some(k);
            }
        }
        found
    }
}

/// Headers an SDK may carry its key in (Azure uses `api-key`).
pub const KEY_HEADERS: [&str; 4] = ["authorization", "x-api-key", "x-goog-api-key", "api-key"];

/// The caller's key from the first place an SDK puts it: Authorization: Bearer, x-api-key,
/// x-goog-api-key, api-key, or the `key` query parameter.
#[must_use]
pub fn extract_key(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .unwrap_or(v)
            .trim();
        if !token.is_empty() {
            return Some(token.to_owned());
        }
    }
    for h in &KEY_HEADERS[1..] {
        if let Some(v) = headers
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            return Some(v.to_owned());
        }
    }
    query.and_then(|q| {
        q.split('&').find_map(|kv| {
            kv.strip_prefix("key=")
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        })
    })
}

/// The query string without any `key=` parameter (the caller's key never goes upstream).
#[must_use]
pub fn strip_key_param(query: &str) -> String {
    query
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("key="))
        .collect::<Vec<_>>()
        .join("&")
}

/// Compares an admin bearer token in constant time.
#[must_use]
pub fn admin_token_ok(headers: &HeaderMap, token: &str) -> bool {
    let got = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let a: [u8; 32] = Sha256::digest(got.as_bytes()).into();
    let b: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    !got.is_empty() && bool::from(a.ct_eq(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> KeyStore {
        KeyStore::new(&[
            KeyConfig {
                sha256: hash_key("sk-a"),
                tenant: "acme".into(),
                features: vec!["bot".into(), "triage".into()],
                ..KeyConfig::default()
            },
            KeyConfig {
                sha256: hash_key("sk-b"),
                tenant: "ops".into(),
                allowed_tenants: vec!["*".into()],
                ..KeyConfig::default()
            },
        ])
    }

    #[test]
    fn hashes_and_authenticates() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let s = store();
        assert_eq!(
            s.authenticate("sk-a").map(|k| k.tenant.as_str()),
            Some("acme")
        );
        assert!(s.authenticate("sk-c").is_none());
        let a = s.authenticate("sk-a").unwrap();
        assert_eq!(a.tenant_for(None).unwrap().tenant, "acme");
        assert_eq!(a.feature_for(None).unwrap().as_deref(), Some("bot"));
        assert_eq!(
            a.feature_for(Some("triage")).unwrap().as_deref(),
            Some("triage")
        );
        assert!(matches!(
            a.feature_for(Some("other")),
            Err(ProxyError::FeatureForbidden { .. })
        ));
        assert!(matches!(
            a.tenant_for(Some("other")),
            Err(ProxyError::TenantForbidden { .. })
        ));
        assert!(matches!(
            a.tenant_for(Some("a{b}")),
            Err(ProxyError::BadAttribution { .. })
        ));
        let b = s.authenticate("sk-b").unwrap();
        assert_eq!(
            b.tenant_for(Some("other")).unwrap(),
            TenantGrant {
                tenant: "other".into(),
                by_wildcard: true
            }
        );
        assert!(!b.tenant_for(Some("ops")).unwrap().by_wildcard);
        assert_eq!(b.feature_for(None).unwrap(), None);
        assert_eq!(b.feature_for(Some("any")).unwrap().as_deref(), Some("any"));
    }

    #[test]
    fn file_keys_bind_models_and_providers() {
        let s = KeyStore::new(&[KeyConfig {
            sha256: hash_key("sk-m"),
            tenant: "acme".into(),
            allowed_models: vec!["gpt-4o-mini*".into(), "claude-*".into()],
            allowed_providers: vec!["openai".into()],
            ..KeyConfig::default()
        }]);
        let k = s.authenticate("sk-m").unwrap();
        assert!(k.check_model("gpt-4o-mini-2024-07-18").is_ok());
        assert!(k.check_model("claude-haiku-4-5").is_ok());
        assert!(matches!(
            k.check_model("gpt-4o"),
            Err(ProxyError::ModelForbidden { .. })
        ));
        assert!(k.check_provider("openai").is_ok());
        assert!(matches!(
            k.check_provider("anthropic"),
            Err(ProxyError::ProviderForbidden { .. })
        ));
        let any = store();
        let a = any.authenticate("sk-a").unwrap();
        assert!(a.check_model("anything").is_ok() && a.check_provider("gemini").is_ok());
    }

    #[test]
    fn finds_keys_where_sdks_put_them() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer sk-1".parse().unwrap());
        assert_eq!(extract_key(&h, None).as_deref(), Some("sk-1"));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "sk-2".parse().unwrap());
        assert_eq!(extract_key(&h, None).as_deref(), Some("sk-2"));
        let h = HeaderMap::new();
        assert_eq!(
            extract_key(&h, Some("alt=sse&key=sk-3")).as_deref(),
            Some("sk-3")
        );
        assert_eq!(strip_key_param("alt=sse&key=sk-3"), "alt=sse");
        assert_eq!(extract_key(&h, None), None);
    }
}
