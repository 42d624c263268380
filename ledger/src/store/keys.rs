//! Key names and name validation. The layout is documented in docs/redis-schema.md, a stable
//! interface: change both together.

use chrono::{DateTime, Utc};

use super::Period;
use crate::Error;
use crate::names::{self, NameKind};

/// The longest tenant, feature, session, model, request or event id the ledger accepts, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// The hash holding every budget limit (one slot, read by the enforcer, not by scripts).
pub const BUDGETS_KEY: &str = "llmw:budgets";

/// The hash of routing rule sets edited at runtime (store/rules.rs; no hash tag: its own slot).
pub const RULES_KEY: &str = "llmw:rules";

/// The hash holding every runtime proxy key record and its `#version` (see apikeys.rs).
pub const API_KEYS_KEY: &str = "llmw:apikeys";

/// Checks a name that becomes part of a key or hash field: non-empty, at most [`MAX_NAME_LEN`]
/// bytes, no `{` or `}` (they would break the per-tenant Cluster hash tag) and no control characters.
///
/// # Errors
/// [`Error::Invalid`] naming `what` and the reason.
pub fn validate_name(what: &'static str, s: &str) -> Result<(), Error> {
    let bad = |detail: String| Err(Error::Invalid { what, detail });
    if s.is_empty() {
        return bad("must not be empty".into());
    }
    if s.len() > MAX_NAME_LEN {
        return bad(format!(
            "is {} bytes; at most {MAX_NAME_LEN} are allowed",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| matches!(c, '{' | '}') || c.is_control()) {
        return bad(format!(
            "{s:?} contains {c:?}; braces and control characters are not allowed"
        ));
    }
    Ok(())
}

/// A tenant: the one name rule of [`crate::names`] (no `|`, `*`, braces or spaces, so it fits in
/// keys, the Cluster hash tag and budget fields).
pub fn validate_tenant(s: &str) -> Result<(), Error> {
    names::check(NameKind::Tenant, s)
}

/// A feature: the one name rule of [`crate::names`].
pub fn validate_feature(s: &str) -> Result<(), Error> {
    names::check(NameKind::Feature, s)
}

/// Validates an optional argument, treating `None` as absent: features and sessions by the name
/// rule of [`crate::names`], other values (models, ids) by [`validate_name`].
pub fn validate_opt(what: &'static str, s: Option<&str>) -> Result<(), Error> {
    match (what, s) {
        (_, None) => Ok(()),
        ("feature", Some(f)) => names::check(NameKind::Feature, f),
        ("session", Some(v)) => names::check(NameKind::Session, v),
        (_, Some(v)) => validate_name(what, v),
    }
}

/// "llmw:{T}:" — the prefix of every key of tenant `T`; `{T}` is the Redis Cluster hash tag.
#[must_use]
pub fn prefix(tenant: &str) -> String {
    prefix_of(tenant).to_string()
}

/// The tenant's per-period hash: "llmw:{T}:spend:d:2026-11-27" / "llmw:{T}:spend:m:2026-11".
#[must_use]
pub fn spend(tenant: &str, period: Period, now: DateTime<Utc>) -> String {
    format!(
        "{}spend:{}:{}",
        prefix(tenant),
        period.letter(),
        period.id(now)
    )
}

/// "llmw:{T}:session:<S>".
#[must_use]
pub fn session(tenant: &str, session: &str) -> String {
    format!("{}session:{session}", prefix(tenant))
}

/// "llmw:{T}:holds" — ZSET of reservation ids scored by expiry (unix ms).
#[must_use]
pub fn holds(tenant: &str) -> String {
    holds_of(tenant).to_string()
}

/// "llmw:{T}:hold:<id>".
#[must_use]
pub fn hold(tenant: &str, id: &str) -> String {
    hold_of(tenant, id).to_string()
}

/// "llmw:{T}:done:<request id>" — settle's idempotency marker.
#[must_use]
pub fn done(tenant: &str, request_id: &str) -> String {
    done_of(tenant, request_id).to_string()
}

/// A key of tenant `T` written by `Display` where it goes (a script's keys), not into a `String`
/// of its own: "llmw:{T}:" then `kind` then `id`.
pub(crate) struct TenantKey<'a> {
    tenant: &'a str,
    kind: &'static str,
    id: &'a str,
}

impl std::fmt::Display for TenantKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "llmw:{{{}}}:{}{}", self.tenant, self.kind, self.id)
    }
}

/// [`prefix`] as a [`TenantKey`].
pub(crate) fn prefix_of(tenant: &str) -> TenantKey<'_> {
    TenantKey {
        tenant,
        kind: "",
        id: "",
    }
}

/// [`holds`] as a [`TenantKey`].
pub(crate) fn holds_of(tenant: &str) -> TenantKey<'_> {
    TenantKey {
        tenant,
        kind: "holds",
        id: "",
    }
}

/// [`hold`] as a [`TenantKey`].
pub(crate) fn hold_of<'a>(tenant: &'a str, id: &'a str) -> TenantKey<'a> {
    TenantKey {
        tenant,
        kind: "hold:",
        id,
    }
}

/// [`done`] as a [`TenantKey`].
pub(crate) fn done_of<'a>(tenant: &'a str, request_id: &'a str) -> TenantKey<'a> {
    TenantKey {
        tenant,
        kind: "done:",
        id: request_id,
    }
}

/// "llmw:{T}:ev:<event id>" — record's idempotency marker.
#[must_use]
pub fn event(tenant: &str, event_id: &str) -> String {
    format!("{}ev:{event_id}", prefix(tenant))
}

/// "llmw:{T}:loop:<S>:rpm:<unix minute>" — a session's calls in one UTC minute (loop guard).
#[must_use]
pub fn loop_minute(tenant: &str, session: &str, minute: i64) -> String {
    format!("{}loop:{session}:rpm:{minute}", prefix(tenant))
}

/// "llmw:{T}:loop:<S>:body:<24 hex digits>" — calls of a session with one request body (the
/// first 96 bits of its sha256) within the identical-request window (loop guard).
#[must_use]
pub fn loop_body(tenant: &str, session: &str, digest: &str) -> String {
    format!("{}loop:{session}:body:{digest}", prefix(tenant))
}

/// "llmw:{T}:obj:<id>" — a provider-stored object (a stored response or chat completion) the
/// tenant created through the enforcer; only its creator may read it back.
#[must_use]
pub fn object(tenant: &str, id: &str) -> String {
    format!("{}obj:{id}", prefix(tenant))
}

/// "llmw:{T}:audit:<YYYY-MM-DD>" — the tenant's audit stream of one UTC day (docs/audit.md).
#[must_use]
pub fn audit(tenant: &str, day: &str) -> String {
    format!("{}audit:{day}", prefix(tenant))
}

/// The stream of bypass events (no hash tag: one key in its own slot).
pub const BYPASS_EVENTS: &str = "llmw:events:bypass";

/// The stream of operational events (price gaps) the alert dispatcher delivers.
pub const OPS_EVENTS: &str = "llmw:{ops}:events";

/// "llmw:{ops}:gap:<day>:<provider>|<model>" — set once a price gap was announced that day.
#[must_use]
pub fn price_gap(day: &str, provider: &str, model: &str) -> String {
    format!("llmw:{{ops}}:gap:{day}:{provider}|{model}")
}

/// "llmw:tenants:<period id>" — tenants with activity in the period (no hash tag: its own slot).
#[must_use]
pub fn tenants(period: Period, now: DateTime<Utc>) -> String {
    format!("llmw:tenants:{}", period.id(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("tenant", "acme").is_ok());
        assert!(validate_name("model", "ft:gpt-4o:org:x/y@z").is_ok());
        assert!(validate_name("tenant", "").is_err());
        assert!(validate_name("tenant", &"a".repeat(129)).is_err());
        assert!(validate_name("tenant", &"a".repeat(128)).is_ok());
        assert!(validate_name("tenant", "a{b").is_err());
        assert!(validate_name("tenant", "a}b").is_err());
        assert!(validate_name("tenant", "a\nb").is_err());
        assert!(validate_name("tenant", "a\u{7f}").is_err());
        assert!(validate_tenant("a|b").is_err());
        assert!(validate_tenant("*").is_err());
        assert!(validate_feature("x|y").is_err());
        assert!(validate_opt("session", Some("s|1")).is_err());
        assert!(validate_opt("session", Some("s-1:a@b")).is_ok());
        assert!(validate_opt("model", Some("ft:gpt-4o:org:x/y@z")).is_ok());
    }

    #[test]
    fn key_layout() {
        let now = DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            spend("acme", Period::Month, now),
            "llmw:{acme}:spend:m:2026-11"
        );
        assert_eq!(
            spend("acme", Period::Day, now),
            "llmw:{acme}:spend:d:2026-11-27"
        );
        assert_eq!(session("acme", "s1"), "llmw:{acme}:session:s1");
        assert_eq!(holds("acme"), "llmw:{acme}:holds");
        assert_eq!(hold("acme", "r1"), "llmw:{acme}:hold:r1");
        assert_eq!(done("acme", "r1"), "llmw:{acme}:done:r1");
        assert_eq!(event("acme", "e1"), "llmw:{acme}:ev:e1");
        assert_eq!(tenants(Period::Day, now), "llmw:tenants:2026-11-27");
        assert_eq!(
            loop_minute("acme", "s1", 29_000_000),
            "llmw:{acme}:loop:s1:rpm:29000000"
        );
        assert_eq!(
            loop_body("acme", "s1", "00ff"),
            "llmw:{acme}:loop:s1:body:00ff"
        );
    }
}
