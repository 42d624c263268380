//! The one rule for the names that attribute spend — tenant, feature, session, service — used by
//! the enforcer's authentication, the observer's attribution and the ledger's scripts alike, so a
//! name one side accepts is never refused by another (a refused record would be spend lost).
//!
//! A name is 1–128 bytes of `A-Z a-z 0-9 . _ - : @`. That excludes what would break a key or a
//! field: the Cluster hash-tag braces, the `|` that separates budget fields, the `*` that means
//! "every tenant" in budgets, whitespace and control characters.

use crate::Error;

/// The longest name, in bytes.
pub const MAX_LEN: usize = 128;

/// The rule in words, for error messages.
pub const RULE: &str = "1-128 chars of A-Z a-z 0-9 . _ - : @";

/// What a name names; it appears in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// The tenant billed.
    Tenant,
    /// A feature of the tenant (`X-Feature-Name`).
    Feature,
    /// An agent session (`X-Session-ID`).
    Session,
    /// The service that made a call (observer attribution).
    Service,
}

impl NameKind {
    /// "tenant", "feature", "session", "service".
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            NameKind::Tenant => "tenant",
            NameKind::Feature => "feature",
            NameKind::Session => "session",
            NameKind::Service => "service",
        }
    }
}

/// Whether `s` follows the rule.
#[must_use]
pub fn is_valid(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_LEN && s.bytes().all(allowed)
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._-:@".contains(&b)
}

/// Checks `s` as a name of `kind`.
///
/// # Errors
/// [`Error::Invalid`] naming the kind and what is wrong.
pub fn check(kind: NameKind, s: &str) -> Result<(), Error> {
    if is_valid(s) {
        return Ok(());
    }
    let detail = if s.is_empty() {
        "must not be empty".to_owned()
    } else if s.len() > MAX_LEN {
        format!("is {} bytes; at most {MAX_LEN} are allowed", s.len())
    } else {
        let bad = s
            .chars()
            .find(|c| !c.is_ascii() || !allowed(*c as u8))
            .unwrap_or('?');
        format!("{:?} contains {bad:?}; a name is {RULE}", truncate(s))
    };
    Err(Error::Invalid {
        what: kind.as_str(),
        detail,
    })
}

/// Checks an optional name; `None` is fine.
///
/// # Errors
/// As [`check`].
pub fn check_opt(kind: NameKind, s: Option<&str>) -> Result<(), Error> {
    s.map_or(Ok(()), |s| check(kind, s))
}

/// A valid name made from free text (a process's comm, a unit name): every byte outside the rule
/// becomes `_`, it is cut to [`MAX_LEN`], and an empty text becomes `fallback`.
#[must_use]
pub fn sanitize(text: &str, fallback: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_ascii() && allowed(c as u8) {
                c
            } else {
                '_'
            }
        })
        .take(MAX_LEN)
        .collect();
    if out.is_empty() {
        out = fallback.to_owned();
    }
    out
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule() {
        for ok in ["acme", "a.b_c-d:e@f", "A9", &"a".repeat(128)] {
            assert!(is_valid(ok), "{ok}");
            assert!(check(NameKind::Tenant, ok).is_ok());
        }
        for bad in [
            "",
            "a|b",
            "*",
            "a{b",
            "a}b",
            "a b",
            "a\nb",
            "é",
            &"a".repeat(129),
        ] {
            assert!(!is_valid(bad), "{bad:?}");
            let e = check(NameKind::Feature, bad).unwrap_err().to_string();
            assert!(e.contains("feature"), "{e}");
        }
        let e = check(NameKind::Tenant, "a|b").unwrap_err().to_string();
        assert!(e.contains("'|'") && e.contains(RULE), "{e}");
        assert!(check_opt(NameKind::Session, None).is_ok());
    }

    #[test]
    fn sanitized_names_are_valid() {
        assert_eq!(sanitize("kworker/0:1", "unknown"), "kworker_0:1");
        assert_eq!(sanitize("python3.11", "unknown"), "python3.11");
        assert_eq!(sanitize("", "unknown"), "unknown");
        assert_eq!(sanitize("naïve app", "x"), "na_ve_app");
        for t in ["a b", "{x}", &"é".repeat(200)] {
            assert!(is_valid(&sanitize(t, "x")), "{t}");
        }
    }
}
