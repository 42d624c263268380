//! Budgets: how they are stored in `llmw:budgets` and how the caps of one call are resolved from them.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::keys::{BUDGETS_KEY, validate_feature, validate_tenant};
use super::{Budget, Cap, CapScope, Period};
use crate::{Error, Nanos};

/// The `llmw:budgets` hash field of a budget: "tenant|feature|period" ("acme||month",
/// "*|support-bot|day").
#[must_use]
pub fn field(b: &Budget) -> String {
    format!(
        "{}|{}|{}",
        b.tenant,
        b.feature.as_deref().unwrap_or(""),
        b.period
    )
}

/// Parses a `llmw:budgets` field and value back into a [`Budget`].
///
/// # Errors
/// [`Error::Invalid`] when the field or value is malformed (someone edited the hash by hand).
pub fn parse(field: &str, value: &str) -> Result<Budget, Error> {
    let bad = |detail: String| Error::Invalid {
        what: "llmw:budgets entry",
        detail,
    };
    let mut parts = field.split('|');
    let (Some(tenant), Some(feature), Some(period), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!(
            "field {field:?} is not \"tenant|feature|period\""
        )));
    };
    let limit: i64 = value
        .parse()
        .map_err(|_| bad(format!("{field:?} has a non-integer limit {value:?}")))?;
    let b = Budget {
        tenant: tenant.to_owned(),
        feature: (!feature.is_empty()).then(|| feature.to_owned()),
        period: period
            .parse()
            .map_err(|_| bad(format!("{field:?} has an unknown period {period:?}")))?,
        limit: Nanos(limit),
    };
    validate(&b).map_err(|e| bad(format!("{field:?}: {e}")))?;
    Ok(b)
}

/// A malformed entry of `llmw:budgets`, as [`super::Ledger::check_budgets`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetProblem {
    /// The hash field ("tenant|feature|period").
    pub field: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

/// Checks a budget before it is stored.
///
/// # Errors
/// [`Error::Invalid`] for a bad tenant or feature name or a negative limit.
pub fn validate(b: &Budget) -> Result<(), Error> {
    if b.tenant != "*" {
        validate_tenant(&b.tenant)?;
    }
    if let Some(f) = &b.feature {
        validate_feature(f)?;
    }
    if b.limit.0 < 0 {
        return Err(Error::Invalid {
            what: "budget limit",
            detail: format!("{} is negative", b.limit),
        });
    }
    Ok(())
}

/// The caps that apply to one call, in the order they are checked: tenant per day, tenant per
/// month, tenant+feature per day, tenant+feature per month, then the session cap.
///
/// For each (feature-or-whole-tenant, period) a budget naming the tenant overrides a "*" budget;
/// when the list holds several budgets for the same slot the lowest limit wins. Pure: the enforcer
/// calls it with its cached budget list so the reserve script stays on the tenant's slot.
#[must_use]
pub fn resolve_caps(
    budgets: &[Budget],
    tenant: &str,
    feature: Option<&str>,
    session: Option<&str>,
    session_cap: Option<Nanos>,
) -> Vec<Cap> {
    let pick = |feat: Option<&str>, period: Period| -> Option<Nanos> {
        let matching = |who: &str| {
            budgets
                .iter()
                .filter(|b| b.tenant == who && b.feature.as_deref() == feat && b.period == period)
                .map(|b| b.limit)
                .min()
        };
        matching(tenant).or_else(|| matching("*"))
    };
    let mut caps = Vec::new();
    for period in Period::ALL {
        if let Some(limit) = pick(None, period) {
            caps.push(Cap {
                scope: CapScope::Tenant,
                period,
                limit,
            });
        }
    }
    if let Some(f) = feature {
        for period in Period::ALL {
            if let Some(limit) = pick(Some(f), period) {
                caps.push(Cap {
                    scope: CapScope::Feature(f.to_owned()),
                    period,
                    limit,
                });
            }
        }
    }
    if let (Some(s), Some(limit)) = (session, session_cap) {
        caps.push(Cap {
            scope: CapScope::Session(s.to_owned()),
            period: Period::Day,
            limit,
        });
    }
    caps
}

// === impl Ledger: budgets ===

impl super::Ledger {
    /// Stores (or replaces) a budget limit; it applies to the next reserve of every instance that
    /// reloads budgets.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad budget; [`Error::Redis`] when Redis is unavailable.
    pub async fn set_budget(&self, b: &Budget) -> Result<(), Error> {
        validate(b)?;
        let field = field(b);
        self.timed("set_budget", async {
            let mut c = self.conn.clone();
            let _: () = c.hset(BUDGETS_KEY, field, b.limit.0).await?;
            Ok(())
        })
        .await
    }

    /// Stores a budget only if none exists for its tenant, feature and period: how a config file
    /// seeds budgets without overwriting live edits. Returns whether it was stored.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad budget; [`Error::Redis`] when Redis is unavailable.
    pub async fn seed_budget(&self, b: &Budget) -> Result<bool, Error> {
        validate(b)?;
        let field = field(b);
        self.timed("seed_budget", async {
            let mut c = self.conn.clone();
            Ok(c.hset_nx(BUDGETS_KEY, field, b.limit.0).await?)
        })
        .await
    }

    /// All stored budgets, sorted by tenant, feature, period.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the hash holds a malformed entry; [`Error::Redis`] when Redis is
    /// unavailable.
    pub async fn budgets(&self) -> Result<Vec<Budget>, Error> {
        let h: HashMap<String, String> = self
            .timed("budgets", async {
                let mut c = self.conn.clone();
                Ok(c.hgetall(BUDGETS_KEY).await?)
            })
            .await?;
        let mut v = h
            .iter()
            .map(|(f, l)| parse(f, l))
            .collect::<Result<Vec<_>, _>>()?;
        v.sort_by(|a, b| (&a.tenant, &a.feature, a.period).cmp(&(&b.tenant, &b.feature, b.period)));
        Ok(v)
    }

    /// Every malformed entry of `llmw:budgets` (empty when all parse): what `enforcer budgets
    /// check` and `GET /budgets/check` show, since one bad entry makes every enforcer refuse
    /// calls until it is fixed (fail closed).
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn check_budgets(&self) -> Result<Vec<BudgetProblem>, Error> {
        let h: HashMap<String, String> = self
            .timed("check_budgets", async {
                let mut c = self.conn.clone();
                Ok(c.hgetall(BUDGETS_KEY).await?)
            })
            .await?;
        let mut v: Vec<BudgetProblem> = h
            .iter()
            .filter_map(|(f, l)| {
                parse(f, l).err().map(|e| BudgetProblem {
                    field: f.clone(),
                    problem: format!(
                        "{e}; fix it with PUT /budgets or remove it with HDEL {BUDGETS_KEY} {f:?}"
                    ),
                })
            })
            .collect();
        v.sort_by(|a, b| a.field.cmp(&b.field));
        Ok(v)
    }

    /// Deletes a budget; returns whether it existed.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names; [`Error::Redis`] when Redis is unavailable.
    pub async fn delete_budget(
        &self,
        tenant: &str,
        feature: Option<&str>,
        period: Period,
    ) -> Result<bool, Error> {
        if tenant != "*" {
            validate_tenant(tenant)?;
        }
        if let Some(f) = feature {
            validate_feature(f)?;
        }
        let field = field(&Budget {
            tenant: tenant.to_owned(),
            feature: feature.map(str::to_owned),
            period,
            limit: Nanos::ZERO,
        });
        self.timed("delete_budget", async {
            let mut c = self.conn.clone();
            let n: u64 = c.hdel(BUDGETS_KEY, field).await?;
            Ok(n > 0)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(tenant: &str, feature: Option<&str>, period: Period, limit: i64) -> Budget {
        Budget {
            tenant: tenant.into(),
            feature: feature.map(Into::into),
            period,
            limit: Nanos(limit),
        }
    }

    #[test]
    fn tenant_budget_overrides_wildcard() {
        let budgets = [
            b("*", None, Period::Month, 100),
            b("acme", None, Period::Month, 50),
            b("*", None, Period::Day, 10),
            b("*", Some("bot"), Period::Day, 3),
            b("acme", Some("bot"), Period::Month, 20),
            b("other", None, Period::Day, 1),
        ];
        let caps = resolve_caps(&budgets, "acme", Some("bot"), Some("s1"), Some(Nanos(7)));
        assert_eq!(
            caps,
            vec![
                Cap {
                    scope: CapScope::Tenant,
                    period: Period::Day,
                    limit: Nanos(10)
                },
                Cap {
                    scope: CapScope::Tenant,
                    period: Period::Month,
                    limit: Nanos(50)
                },
                Cap {
                    scope: CapScope::Feature("bot".into()),
                    period: Period::Day,
                    limit: Nanos(3)
                },
                Cap {
                    scope: CapScope::Feature("bot".into()),
                    period: Period::Month,
                    limit: Nanos(20)
                },
                Cap {
                    scope: CapScope::Session("s1".into()),
                    period: Period::Day,
                    limit: Nanos(7)
                },
            ]
        );
        // Another tenant gets the wildcard month; no feature, no session.
        let caps = resolve_caps(&budgets, "beta", None, None, Some(Nanos(7)));
        assert_eq!(
            caps,
            vec![
                Cap {
                    scope: CapScope::Tenant,
                    period: Period::Day,
                    limit: Nanos(10)
                },
                Cap {
                    scope: CapScope::Tenant,
                    period: Period::Month,
                    limit: Nanos(100)
                },
            ]
        );
        // A feature without budgets adds nothing; no budgets at all gives no caps.
        assert_eq!(
            resolve_caps(&budgets, "beta", Some("none"), None, None).len(),
            2
        );
        assert!(resolve_caps(&[], "acme", Some("bot"), None, None).is_empty());
    }

    #[test]
    fn duplicate_budgets_take_the_lowest() {
        let budgets = [
            b("acme", None, Period::Day, 9),
            b("acme", None, Period::Day, 4),
        ];
        assert_eq!(
            resolve_caps(&budgets, "acme", None, None, None)[0].limit,
            Nanos(4)
        );
    }

    #[test]
    fn fields_round_trip() {
        for x in [
            b("acme", None, Period::Month, 5),
            b("*", Some("support-bot"), Period::Day, 7),
        ] {
            let f = field(&x);
            assert_eq!(parse(&f, &x.limit.0.to_string()).unwrap(), x);
        }
        assert_eq!(field(&b("acme", None, Period::Month, 5)), "acme||month");
        assert!(parse("acme|month", "5").is_err());
        assert!(parse("acme||week", "5").is_err());
        assert!(parse("acme||day", "5.0").is_err());
        assert!(validate(&b("*", None, Period::Day, 1)).is_ok());
        assert!(validate(&b("a{b", None, Period::Day, 1)).is_err());
        assert!(validate(&b("a", Some("x|y"), Period::Day, 1)).is_err());
        assert!(validate(&b("a", None, Period::Day, -1)).is_err());
    }
}
