//! Budgets on the hot path: the list lives in Redis (`llmw:budgets`, live-editable with PUT
//! /budgets) and is cached in memory, refreshed about every second and right after an admin edit,
//! so resolving a call's caps costs no Redis round trip. The reserve itself is one atomic script.
//!
//! Precedence: at start-up each `[[budgets]]` entry of the file is *seeded* (written only when
//! Redis has no budget for the same tenant/feature/period), so live edits survive restarts. With
//! `budgets_from_config = "overwrite"` the file wins at every start instead.

use std::sync::Arc;
use std::time::Duration;

use ledger::Nanos;
use ledger::store::{Budget, Cap, Ledger, resolve_caps};
use parking_lot::RwLock;

use crate::config::{BudgetSeed, Config};

/// The in-memory copy of the budget list.
#[derive(Clone)]
pub struct BudgetCache {
    ledger: Ledger,
    budgets: Arc<RwLock<Arc<Vec<Budget>>>>,
    session_cap: Option<Nanos>,
}

impl BudgetCache {
    /// An empty cache; call [`BudgetCache::refresh`] or [`BudgetCache::spawn_refresher`].
    #[must_use]
    pub fn new(ledger: Ledger, session_cap: Option<Nanos>) -> BudgetCache {
        BudgetCache {
            ledger,
            budgets: Arc::default(),
            session_cap,
        }
    }

    /// Seeds the file's budgets into Redis per `budgets_from_config`.
    ///
    /// # Errors
    /// When Redis refuses a budget or is unreachable.
    pub async fn seed(&self, cfg: &Config) -> Result<(), String> {
        let list = cfg.ledger_budgets().map_err(|e| e.to_string())?;
        for b in &list {
            match cfg.budgets_from_config {
                BudgetSeed::Seed => self.ledger.seed_budget(b).await.map(|_| ()),
                BudgetSeed::Overwrite => self.ledger.set_budget(b).await,
            }
            .map_err(|e| {
                format!(
                    "seeding budget {}/{}/{}: {e}",
                    b.tenant,
                    b.feature.as_deref().unwrap_or("-"),
                    b.period
                )
            })?;
        }
        Ok(())
    }

    /// Reloads the list from Redis.
    ///
    /// # Errors
    /// When Redis is unreachable (the previous list stays in use).
    pub async fn refresh(&self) -> Result<(), ledger::Error> {
        let list = self.ledger.budgets().await?;
        *self.budgets.write() = Arc::new(list);
        Ok(())
    }

    /// Refreshes every `every` in the background for the life of the process.
    pub fn spawn_refresher(&self, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = me.refresh().await {
                    tracing::debug!(error = %e, "budget refresh failed; keeping the cached list");
                }
            }
        });
    }

    /// The cached list.
    #[must_use]
    pub fn list(&self) -> Arc<Vec<Budget>> {
        self.budgets.read().clone()
    }

    /// The caps of one call, in check order.
    #[must_use]
    pub fn caps(&self, tenant: &str, feature: Option<&str>, session: Option<&str>) -> Vec<Cap> {
        resolve_caps(&self.list(), tenant, feature, session, self.session_cap)
    }
}

/// The local, per-instance allowance for calls admitted without a reservation while Redis is
/// unreachable (`on_redis_unavailable = "allow"`): worst-case amounts summed per UTC day.
#[derive(Debug)]
pub struct EmergencyCap {
    limit: Nanos,
    used: parking_lot::Mutex<(String, Nanos)>,
}

impl EmergencyCap {
    /// A cap of `limit` per UTC day.
    #[must_use]
    pub fn new(limit: Nanos) -> EmergencyCap {
        EmergencyCap {
            limit,
            used: parking_lot::Mutex::default(),
        }
    }

    /// Takes `amount` from today's allowance; false when it would exceed the cap.
    pub fn admit(&self, amount: Nanos) -> bool {
        let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
        let mut g = self.used.lock();
        if g.0 != today {
            *g = (today, Nanos::ZERO);
        }
        let next = g.1.saturating_add(amount);
        if next > self.limit {
            return false;
        }
        g.1 = next;
        true
    }
}

/// The budgets that apply to `tenant` (its own, else the "*" default per slot), for reports.
#[must_use]
pub fn applicable(budgets: &[Budget], tenant: &str) -> Vec<Budget> {
    let mut out: Vec<Budget> = Vec::new();
    for b in budgets.iter().filter(|b| b.tenant == tenant) {
        out.push(b.clone());
    }
    for b in budgets.iter().filter(|b| b.tenant == "*") {
        if !out
            .iter()
            .any(|o| o.feature == b.feature && o.period == b.period)
        {
            out.push(Budget {
                tenant: tenant.to_owned(),
                ..b.clone()
            });
        }
    }
    out.sort_by(|a, b| (&a.feature, a.period).cmp(&(&b.feature, b.period)));
    out
}

#[cfg(test)]
mod tests {
    use ledger::store::Period;

    use super::*;

    #[test]
    fn emergency_cap_bounds_unreserved_admissions() {
        let c = EmergencyCap::new(Nanos(10));
        assert!(c.admit(Nanos(6)));
        assert!(!c.admit(Nanos(5)));
        assert!(c.admit(Nanos(4)));
        assert!(!c.admit(Nanos(1)));
    }

    #[test]
    fn own_budget_overrides_the_default() {
        let b = |t: &str, f: Option<&str>, l: i64| Budget {
            tenant: t.into(),
            feature: f.map(Into::into),
            period: Period::Month,
            limit: Nanos(l),
        };
        let list = vec![
            b("*", None, 10),
            b("acme", None, 50),
            b("*", Some("bot"), 5),
        ];
        let a = applicable(&list, "acme");
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].limit, Nanos(50));
        assert_eq!(a[1].feature.as_deref(), Some("bot"));
        assert_eq!(applicable(&list, "zed")[0].limit, Nanos(10));
    }
}
