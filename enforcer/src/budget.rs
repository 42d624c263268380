//! Budgets on the hot path: the list lives in Redis (`llmw:budgets`, live-editable with PUT
//! /budgets) and is cached in memory by the ledger (one copy per process, which the scripts' alert
//! thresholds read too), refreshed about every second and right after an admin edit, so resolving
//! a call's caps costs no Redis round trip. The reserve itself is one atomic script
//! ([`Budgets::reserve`]), which returns the call's [`Hold`].
//!
//! Precedence: at start-up each `[[budgets]]` entry of the file is *seeded* (written only when
//! Redis has no budget for the same tenant/feature/period), so live edits survive restarts. With
//! `budgets_from_config = "overwrite"` the file wins at every start instead.

use std::sync::Arc;
use std::time::Duration;

use ledger::Nanos;
use ledger::store::{Budget, Cap, Ledger, ReserveOutcome, ReserveRequest};

use crate::config::{BudgetSeed, Config, OnRedisUnavailable};
use crate::error::{ProxyError, StartError};
use crate::lease::{LeaseCounters, LeasePool, LeaseSettings};
use crate::metrics::Metrics;

/// The enforcer's view of the ledger's budget list cache ([`ledger::store::BudgetCache`], one per
/// process, also behind the scripts' alert thresholds): config seeding, the session cap, and the
/// fail-closed refusal as a [`ProxyError`].
#[derive(Clone)]
pub struct BudgetCache {
    ledger: Ledger,
    cache: ledger::store::BudgetCache,
    session_cap: Option<Nanos>,
}

impl BudgetCache {
    /// The ledger's cache; call [`BudgetCache::refresh`] or [`BudgetCache::spawn_refresher`].
    #[must_use]
    pub fn new(ledger: Ledger, session_cap: Option<Nanos>) -> BudgetCache {
        BudgetCache {
            cache: ledger.budget_cache(),
            ledger,
            session_cap,
        }
    }

    /// Seeds the file's budgets into Redis per `budgets_from_config`.
    ///
    /// # Errors
    /// [`StartError::SeedBudget`] when Redis refuses a budget or is unreachable.
    pub async fn seed(&self, cfg: &Config) -> Result<(), StartError> {
        let list = cfg.ledger_budgets()?;
        for b in &list {
            match cfg.budgets_from_config {
                BudgetSeed::Seed => self.ledger.seed_budget(b).await.map(|_| ()),
                BudgetSeed::Overwrite => self.ledger.set_budget(b).await,
            }
            .map_err(|source| StartError::SeedBudget {
                budget: format!(
                    "{}/{}/{}",
                    b.tenant,
                    b.feature.as_deref().unwrap_or("-"),
                    b.period
                ),
                source,
            })?;
        }
        Ok(())
    }

    /// Rereads the list from Redis now (at start, after an admin edit). A malformed entry makes
    /// the cache refuse calls (fail closed) until a refresh reads a clean list; an unreachable
    /// Redis keeps the previous list.
    ///
    /// # Errors
    /// The ledger's error (the cache keeps its previous list, or turns broken).
    pub async fn refresh(&self) -> Result<(), ledger::Error> {
        self.cache.refresh().await
    }

    /// Rereads the list every `every` in the background (once per process; the ledger's alert
    /// checks share the same task).
    pub fn spawn_refresher(&self, every: Duration) {
        self.cache.spawn_refresher(every);
    }

    /// The cached list (the last clean one).
    #[must_use]
    pub fn list(&self) -> Arc<Vec<Budget>> {
        self.cache.list()
    }

    /// Whether `tenant` has a budget of its own (not only the "*" default).
    #[must_use]
    pub fn has_own(&self, tenant: &str) -> bool {
        self.cache.has_own(tenant)
    }

    /// The caps of one call, in check order. Until the list has been read once it is read now,
    /// so a fresh enforcer never admits a call against an empty list.
    ///
    /// # Errors
    /// [`ProxyError::BudgetsInvalid`] while a stored budget is malformed (fail closed).
    pub async fn caps(
        &self,
        tenant: &str,
        feature: Option<&str>,
        session: Option<&str>,
    ) -> Result<Vec<Cap>, ProxyError> {
        self.cache
            .caps(tenant, feature, session, self.session_cap)
            .await
            .map_err(ProxyError::BudgetsInvalid)
    }
}

/// What a call holds once admitted: the worst case reserved in the ledger, or (Redis unreachable
/// under `on_redis_unavailable = "allow"`) an amount taken from this instance's emergency
/// allowance, whose usage goes to the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Reserved atomically against every cap; settle or release ends it.
    Reserved(Nanos),
    /// Admitted without a reservation; the settlement is spooled for replay.
    Unreserved(Nanos),
}

impl Hold {
    /// The worst case held.
    #[must_use]
    pub fn amount(self) -> Nanos {
        match self {
            Hold::Reserved(n) | Hold::Unreserved(n) => n,
        }
    }
}

/// The budget check of the request path: cached caps, the atomic reserve, and the policy for an
/// unreachable Redis.
pub struct Budgets {
    /// The cached budget list.
    pub cache: BudgetCache,
    /// Spare holds handed to calls without a round trip (`lease_pool`; off when 0).
    pub leases: Arc<LeasePool>,
    ledger: Ledger,
    emergency: EmergencyCap,
    on_unavailable: OnRedisUnavailable,
    timeout: Duration,
}

impl Budgets {
    /// The budget check of `cfg` over `ledger`.
    #[must_use]
    pub fn new(ledger: Ledger, cfg: &Config, lease_counters: LeaseCounters) -> Budgets {
        Budgets {
            cache: BudgetCache::new(ledger.clone(), cfg.session_cap()),
            leases: LeasePool::new(
                ledger.clone(),
                LeaseSettings {
                    size: cfg.lease_pool,
                    max_amount: Nanos::from_usd_f64(cfg.lease_max_usd).unwrap_or(Nanos::ZERO),
                    call_ttl: Duration::from_secs(cfg.reserve_ttl_secs),
                    idle: Duration::from_secs(cfg.lease_idle_secs),
                },
                lease_counters,
            ),
            emergency: EmergencyCap::new(
                Nanos::from_usd_f64(cfg.redis_unavailable_cap_usd).unwrap_or(Nanos::ZERO),
            ),
            on_unavailable: cfg.on_redis_unavailable,
            timeout: Duration::from_millis(cfg.timeouts.redis_ms),
            ledger,
        }
    }

    /// Reserves the worst case of a call against every cap of its tenant, feature and session.
    ///
    /// # Errors
    /// [`ProxyError::Budget`] when a cap would be exceeded; [`ProxyError::LedgerUnavailable`]
    /// when Redis cannot be reached and the policy (or the emergency allowance) refuses.
    pub async fn reserve(
        &self,
        rr: &ReserveRequest,
        metrics: &Metrics,
    ) -> Result<Hold, ProxyError> {
        // Dropped mid-reserve (the client went away): the hold may exist, so release it.
        let mut guard = ReleaseOnDrop(Some((
            self.ledger.clone(),
            rr.tenant.clone(),
            rr.request_id.clone(),
        )));
        let res = tokio::time::timeout(self.timeout, self.ledger.reserve(rr)).await;
        guard.0 = None;
        let cause = match res {
            Ok(Ok(ReserveOutcome::Allowed(_))) => return Ok(Hold::Reserved(rr.amount)),
            Ok(Ok(ReserveOutcome::Denied(d))) => return Err(ProxyError::Budget(Box::new(d))),
            Ok(Ok(ReserveOutcome::RateLimited(d))) => {
                return Err(ProxyError::RateLimited(Box::new(d)));
            }
            Ok(Err(e)) if e.is_invalid_input() => return Err(ProxyError::BadBody(e.to_string())),
            Ok(Err(e)) if !e.is_transient() => return Err(ProxyError::LedgerUnavailable(e)),
            Ok(Err(e)) => e,
            Err(_) => ledger::Error::timed_out("reserve", self.timeout),
        };
        self.release_when_back(rr);
        if self.on_unavailable == OnRedisUnavailable::Deny {
            return Err(ProxyError::LedgerUnavailable(cause));
        }
        if !self.emergency.admit(rr.amount) {
            return Err(ProxyError::EmergencyAllowanceUsed(cause));
        }
        metrics.redis_unavailable_admissions.inc();
        tracing::warn!(request_id = %rr.request_id, cause = %cause, "ledger unavailable; admitting without reservation");
        Ok(Hold::Unreserved(rr.amount))
    }

    /// The reserve may still have landed in Redis: release it once Redis answers again, so an
    /// outage never leaves phantom holds blocking the budget until their ttl.
    fn release_when_back(&self, rr: &ReserveRequest) {
        let (ledger, tenant, id) = (
            self.ledger.clone(),
            rr.tenant.clone(),
            rr.request_id.clone(),
        );
        tokio::spawn(async move {
            for wait in [1u64, 5, 30, 120] {
                tokio::time::sleep(Duration::from_secs(wait)).await;
                if ledger.release(&tenant, &id).await.is_ok() {
                    return;
                }
            }
        });
    }
}

/// Releases a reservation whose reserve was abandoned mid-flight (the request future dropped).
struct ReleaseOnDrop(Option<(Ledger, String, String)>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let Some((ledger, tenant, id)) = self.0.take() else {
            return;
        };
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                for wait in [0u64, 1, 5, 30] {
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                    if ledger.release(&tenant, &id).await.is_ok() {
                        return;
                    }
                }
            });
        }
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
