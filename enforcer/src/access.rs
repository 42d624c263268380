//! Which unmetered requests a caller may make with the enforcer's one provider key. Every read
//! of a provider-stored object (stored responses and completions, files, batches, ...) would
//! otherwise let any key holder read every tenant's data. By default only these pass:
//!
//! - the metered APIs (the ledger classifies them) and the free token-counting ones;
//! - model listings (`GET .../models`, `GET .../models/{id}`): public catalogue data;
//! - reads and deletes of a stored OpenAI response or chat completion **the same tenant created
//!   through the enforcer** (its id is remembered in the ledger, `llmw:{T}:obj:<id>`).
//!
//! Anything else is refused: reads with 403 `endpoint_forbidden`, other methods with 404
//! `unmetered_endpoint`. A key's `open_paths` (globs over `"METHOD /path"`), or the global
//! `unmetered_endpoints = "allow"`, opens more — with the shared provider key, so only for
//! trusted callers.

use globset::{Glob, GlobSet, GlobSetBuilder};
use http::Method;
use ledger::provider::ProviderKind;

/// What an unmetered request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Public data (model listings): forwarded.
    Public,
    /// A stored object by id: forwarded only to the tenant that created it.
    Object(String),
    /// Anything else.
    Other,
}

/// Collections whose objects the enforcer remembers per tenant (OpenAI).
const OBJECT_COLLECTIONS: [&str; 2] = ["responses", "chat/completions"];

/// Classifies an unmetered request by its path after `/proxy/{provider}`.
#[must_use]
pub fn classify(kind: ProviderKind, method: &Method, rest: &str) -> Access {
    let path = rest.split('?').next().unwrap_or(rest).trim_end_matches('/');
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Versions prefixes differ per provider and per base URL: /v1, /v1beta, /openai/v1, none.
    let start = segs
        .iter()
        .position(|s| {
            !(s.starts_with('v') && s[1..].starts_with(|c: char| c.is_ascii_digit()))
                && *s != "openai"
        })
        .unwrap_or(segs.len());
    let segs = &segs[start..];
    if *method == Method::GET && segs.first() == Some(&"models") && segs.len() <= 2 {
        return Access::Public;
    }
    if kind.is_openai_family() {
        for coll in OBJECT_COLLECTIONS {
            let parts: Vec<&str> = coll.split('/').collect();
            if segs.len() > parts.len() && segs[..parts.len()] == parts[..] {
                let id = segs[parts.len()];
                let tail = &segs[parts.len() + 1..];
                let allowed = match tail {
                    [] => matches!(*method, Method::GET | Method::DELETE | Method::POST),
                    ["input_items"] | ["messages"] => *method == Method::GET,
                    ["cancel"] => *method == Method::POST,
                    _ => false,
                };
                if allowed {
                    return Access::Object(id.to_owned());
                }
            }
        }
    }
    Access::Other
}

/// A key's extra reachable paths: globs over `"METHOD /path"` (path after the provider name).
#[derive(Debug, Clone, Default)]
pub struct OpenPaths(Option<GlobSet>);

impl OpenPaths {
    /// Compiles `patterns` (validated at start).
    ///
    /// # Errors
    /// The first pattern that is not a glob.
    pub fn new(patterns: &[String]) -> Result<OpenPaths, globset::Error> {
        if patterns.is_empty() {
            return Ok(OpenPaths(None));
        }
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            b.add(Glob::new(p)?);
        }
        Ok(OpenPaths(Some(b.build()?)))
    }

    /// Whether `method path` is open to the key.
    #[must_use]
    pub fn allows(&self, method: &Method, path: &str) -> bool {
        self.0
            .as_ref()
            .is_some_and(|g| g.is_match(format!("{method} {path}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_and_owned_objects() {
        let o = ProviderKind::OpenAi;
        assert_eq!(classify(o, &Method::GET, "/models"), Access::Public);
        assert_eq!(
            classify(o, &Method::GET, "/v1/models/gpt-4o"),
            Access::Public
        );
        assert_eq!(
            classify(ProviderKind::Gemini, &Method::GET, "/v1beta/models"),
            Access::Public
        );
        assert_eq!(
            classify(o, &Method::GET, "/responses/resp_123"),
            Access::Object("resp_123".into())
        );
        assert_eq!(
            classify(o, &Method::GET, "/v1/responses/resp_1/input_items"),
            Access::Object("resp_1".into())
        );
        assert_eq!(
            classify(o, &Method::DELETE, "/chat/completions/chatcmpl-9"),
            Access::Object("chatcmpl-9".into())
        );
        // Listings of stored objects, files, batches: other tenants' data.
        for (m, p) in [
            (Method::GET, "/chat/completions"),
            (Method::GET, "/files"),
            (Method::GET, "/files/file-1/content"),
            (Method::GET, "/batches/batch_1"),
            (Method::POST, "/models"),
            (Method::GET, "/responses/resp_1/other"),
        ] {
            assert_eq!(classify(o, &m, p), Access::Other, "{m} {p}");
        }
        // Anthropic keeps no object the enforcer creates.
        assert_eq!(
            classify(
                ProviderKind::Anthropic,
                &Method::GET,
                "/v1/messages/batches/x"
            ),
            Access::Other
        );
        let open = OpenPaths::new(&["GET /v1/files*".into()]).unwrap();
        assert!(open.allows(&Method::GET, "/v1/files/file-1"));
        assert!(!open.allows(&Method::DELETE, "/v1/files/file-1"));
        assert!(!OpenPaths::default().allows(&Method::GET, "/v1/files"));
    }
}
