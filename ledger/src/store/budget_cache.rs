//! The one in-memory copy of the budget list (`llmw:budgets`) of a process: shared by every clone
//! of a [`Ledger`], read by the enforcer's budget check ([`BudgetCache::caps`]) and by every money
//! script's alert thresholds ([`Ledger::alert_caps`]), refreshed about every second by one
//! background task and right after an admin edit ([`BudgetCache::refresh`]).
//!
//! Fail closed: while a stored entry is malformed, [`BudgetCache::caps`] refuses (the enforcer
//! answers 503 `budgets_invalid`) until a refresh reads a clean list. Alert thresholds then use the
//! entries that do parse, so spend the observer records (and settles of calls already admitted) is
//! booked and alerted as before; the malformed entry alone has no alert. Until the first read
//! `caps` reads inline, so a fresh process never admits a call against an empty list; an
//! unreachable Redis keeps the previous list.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, PoisonError, RwLock};
use std::time::Duration;

use redis::AsyncCommands;

use super::conn::{Conn, timeout_error};
use super::{Budget, Cap, CapScope, Ledger, budget, keys, resolve_caps};
use crate::{Error, Nanos};

/// How often the background task rereads the list when a caller did not choose
/// ([`BudgetCache::spawn_refresher`]): the first alert-checking write starts it.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Memoised alert arguments are dropped wholesale past this many tenants (bounded memory).
const MAX_MEMO_TENANTS: usize = 10_000;

/// No alert arguments (alerts off, or no budget applies).
static NO_ALERTS: LazyLock<Arc<[String]>> = LazyLock::new(|| Arc::from(Vec::new()));

/// What every clone of a [`Ledger`] shares.
#[derive(Default)]
pub(crate) struct Shared {
    state: RwLock<State>,
    /// Reads finished (successful or not): a caller that waited for another's read uses it.
    attempts: AtomicU64,
    /// Serialises the inline reads of callers that find the list never read.
    first: tokio::sync::Mutex<()>,
    /// The background refresher was started (once per ledger).
    refresher: AtomicBool,
    /// Alert arguments per tenant and feature, for the [`State::version`] they were built from.
    memo: RwLock<AlertMemo>,
}

/// What the cache knows.
#[derive(Default)]
struct State {
    /// The last clean list: what calls are checked against.
    list: Arc<Vec<Budget>>,
    /// The entries of the last read that parse (the same as `list` when it was clean): what alert
    /// thresholds are checked against.
    valid: Arc<Vec<Budget>>,
    /// A read has succeeded with a clean list at least once.
    loaded: bool,
    /// The last read met a malformed entry: calls are refused until it is fixed.
    broken: Option<Arc<Error>>,
    /// Bumped whenever `valid` changes.
    version: u64,
}

#[derive(Default)]
struct AlertMemo {
    version: u64,
    tenants: HashMap<String, TenantAlerts>,
}

#[derive(Default)]
struct TenantAlerts {
    whole: Option<Arc<[String]>>,
    features: HashMap<String, Arc<[String]>>,
}

/// A handle on the process's budget list cache (a clone of the ledger's); see the module doc.
#[derive(Clone)]
pub struct BudgetCache {
    ledger: Ledger,
}

impl Ledger {
    /// The budget list cache this ledger (and every clone of it) shares.
    #[must_use]
    pub fn budget_cache(&self) -> BudgetCache {
        BudgetCache {
            ledger: self.clone(),
        }
    }

    /// The flat budget arguments (kind, period, feature, limit per budget) the scripts check
    /// thresholds against for `tenant` (and `feature`); empty when alerts are off. Built once per
    /// tenant and feature for each version of the cached list. The first use reads the list
    /// (once) and starts the background refresher, so no call waits for a read afterwards.
    pub(crate) async fn alert_caps(&self, tenant: &str, feature: Option<&str>) -> Arc<[String]> {
        if self.cfg.alert_thresholds_pct.is_empty() {
            return Arc::clone(&NO_ALERTS);
        }
        let cache = &self.budget_cache;
        cache.start_refresher(&self.conn, self.cfg.operation_timeout, REFRESH_EVERY);
        if cache.attempts.load(Ordering::Acquire) == 0 {
            let _ = cache
                .read_once(&self.conn, self.cfg.operation_timeout)
                .await;
        }
        cache.alerts_for(tenant, feature)
    }
}

impl BudgetCache {
    /// Rereads the list from Redis now (after an admin edit). A malformed entry makes
    /// [`BudgetCache::caps`] refuse until a refresh reads a clean list; an unreachable Redis
    /// keeps the previous list.
    ///
    /// # Errors
    /// The ledger's error: [`Error::Invalid`] for a malformed entry (the cache is then broken),
    /// [`Error::Redis`] when Redis is unavailable (the cache keeps its list).
    pub async fn refresh(&self) -> Result<(), Error> {
        let l = &self.ledger;
        l.budget_cache
            .refresh(&l.conn, l.cfg.operation_timeout)
            .await
    }

    /// Rereads the list every `every` in the background while the ledger (any clone) lives.
    /// Once per ledger: a second call (or the refresher the first alert check starts) is a no-op.
    pub fn spawn_refresher(&self, every: Duration) {
        let l = &self.ledger;
        l.budget_cache
            .start_refresher(&l.conn, l.cfg.operation_timeout, every);
    }

    /// The last clean list.
    #[must_use]
    pub fn list(&self) -> Arc<Vec<Budget>> {
        Arc::clone(&self.ledger.budget_cache.read().list)
    }

    /// Whether `tenant` has a budget of its own (not only the "*" default).
    #[must_use]
    pub fn has_own(&self, tenant: &str) -> bool {
        self.ledger
            .budget_cache
            .read()
            .list
            .iter()
            .any(|b| b.tenant == tenant)
    }

    /// The caps of one call, in check order ([`resolve_caps`]). Until the list has been read
    /// clean once it is read now, so a fresh process never admits a call against an empty list
    /// (when Redis does not answer, the reserve that follows meets the same outage).
    ///
    /// # Errors
    /// The malformed entry's error while the stored list is malformed (fail closed).
    pub async fn caps(
        &self,
        tenant: &str,
        feature: Option<&str>,
        session: Option<&str>,
        session_cap: Option<Nanos>,
    ) -> Result<Vec<Cap>, Arc<Error>> {
        let l = &self.ledger;
        let cache = &l.budget_cache;
        if !cache.read().loaded {
            let _ = cache.read_once(&l.conn, l.cfg.operation_timeout).await;
        }
        let st = cache.read();
        if let Some(e) = &st.broken {
            return Err(Arc::clone(e));
        }
        Ok(resolve_caps(
            &st.list,
            tenant,
            feature,
            session,
            session_cap,
        ))
    }
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the list unless another caller's read finished while this one waited for its turn.
    async fn read_once(&self, conn: &Conn, timeout: Duration) -> Result<(), Error> {
        let seen = self.attempts.load(Ordering::Acquire);
        let _turn = self.first.lock().await;
        if self.attempts.load(Ordering::Acquire) != seen {
            return Ok(());
        }
        self.refresh(conn, timeout).await
    }

    /// One HGETALL of `llmw:budgets`, applied.
    async fn refresh(&self, conn: &Conn, timeout: Duration) -> Result<(), Error> {
        let mut c = conn.clone();
        let got = tokio::time::timeout(timeout, async move {
            let h: redis::RedisResult<HashMap<String, String>> = c.hgetall(keys::BUDGETS_KEY).await;
            h
        })
        .await;
        let res = match got {
            Ok(Ok(h)) => self.apply(&h),
            Ok(Err(e)) => Err(Error::Redis(e)),
            Err(_) => Err(timeout_error("budgets", timeout)),
        };
        self.attempts.fetch_add(1, Ordering::AcqRel);
        res
    }

    /// Takes a fresh read of the hash: clean, it becomes the list; with a malformed entry the
    /// cache turns broken (the previous clean list stays for [`BudgetCache::list`]).
    fn apply(&self, h: &HashMap<String, String>) -> Result<(), Error> {
        let mut fields: Vec<(&String, &String)> = h.iter().collect();
        fields.sort();
        let mut valid = Vec::with_capacity(fields.len());
        let mut bad = None;
        for (f, l) in fields {
            match budget::parse(f, l) {
                Ok(b) => valid.push(b),
                Err(e) => {
                    bad.get_or_insert(e);
                }
            }
        }
        valid.sort_by(|a, b| {
            (&a.tenant, &a.feature, a.period).cmp(&(&b.tenant, &b.feature, b.period))
        });
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if *st.valid != valid {
            st.valid = Arc::new(valid);
            st.version += 1;
        }
        let Some(e) = bad else {
            st.list = Arc::clone(&st.valid);
            st.loaded = true;
            st.broken = None;
            return Ok(());
        };
        let detail = e.to_string();
        if st.broken.as_ref().is_none_or(|b| b.to_string() != detail) {
            tracing::error!(error = %detail, "a stored budget is malformed: calls are refused until it is fixed (enforcer check-budgets); alert thresholds use the other entries and recorded spend is booked");
        }
        st.broken = Some(Arc::new(e));
        Err(Error::Invalid {
            what: "llmw:budgets entry",
            detail,
        })
    }

    /// Starts the background refresher unless it runs already. It holds only a weak reference:
    /// it stops once every clone of the ledger is dropped.
    fn start_refresher(self: &Arc<Self>, conn: &Conn, timeout: Duration, every: Duration) {
        // A plain load first: this runs on every money call, the swap only until it is started.
        if self.refresher.load(Ordering::Acquire) || self.refresher.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut tick = super::poll_ticks(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = cache.refresh(&conn, timeout).await {
                    tracing::debug!(error = %e, "budget refresh failed; keeping the cached list");
                }
            }
        });
    }

    /// The alert arguments of `tenant` (and `feature`) for the current list, memoised per version.
    fn alerts_for(&self, tenant: &str, feature: Option<&str>) -> Arc<[String]> {
        let (valid, version) = {
            let st = self.read();
            (Arc::clone(&st.valid), st.version)
        };
        {
            let m = self.memo.read().unwrap_or_else(PoisonError::into_inner);
            if m.version == version
                && let Some(t) = m.tenants.get(tenant)
            {
                let hit = match feature {
                    None => t.whole.clone(),
                    Some(f) => t.features.get(f).cloned(),
                };
                if let Some(a) = hit {
                    return a;
                }
            }
        }
        let built = build_alert_caps(&valid, tenant, feature);
        let mut m = self.memo.write().unwrap_or_else(PoisonError::into_inner);
        if m.version != version {
            if m.version > version {
                return built; // a newer list arrived meanwhile: do not memoise an old one
            }
            m.tenants.clear();
            m.version = version;
        }
        if m.tenants.len() >= MAX_MEMO_TENANTS && !m.tenants.contains_key(tenant) {
            m.tenants.clear();
        }
        let t = m.tenants.entry(tenant.to_owned()).or_default();
        match feature {
            None => t.whole = Some(Arc::clone(&built)),
            Some(f) => {
                t.features.insert(f.to_owned(), Arc::clone(&built));
            }
        }
        built
    }
}

/// The alert arguments of one tenant (and feature): its tenant caps, then its feature caps, as
/// kind (`t` / `f`), period letter, feature, limit; no duplicates.
fn build_alert_caps(budgets: &[Budget], tenant: &str, feature: Option<&str>) -> Arc<[String]> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |caps: Vec<Cap>| {
        for c in caps {
            let (kind, feature) = match &c.scope {
                CapScope::Tenant => ("t", String::new()),
                CapScope::Feature(f) => ("f", f.clone()),
                CapScope::Session(_) => continue,
            };
            let v = [
                kind.to_owned(),
                c.period.letter().to_owned(),
                feature,
                c.limit.0.to_string(),
            ];
            if !out.chunks(4).any(|w: &[String]| w == v) {
                out.extend(v);
            }
        }
    };
    push(resolve_caps(budgets, tenant, None, None, None));
    if let Some(f) = feature {
        push(
            resolve_caps(budgets, tenant, Some(f), None, None)
                .into_iter()
                .filter(|c| matches!(c.scope, CapScope::Feature(_)))
                .collect(),
        );
    }
    if out.is_empty() {
        return Arc::clone(&NO_ALERTS);
    }
    Arc::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Period;

    fn b(tenant: &str, feature: Option<&str>, period: Period, limit: i64) -> Budget {
        Budget {
            tenant: tenant.into(),
            feature: feature.map(Into::into),
            period,
            limit: Nanos(limit),
        }
    }

    #[test]
    fn alert_caps_are_tenant_then_feature_without_duplicates() {
        let list = [
            b("*", None, Period::Month, 100),
            b("acme", None, Period::Day, 7),
            b("*", Some("bot"), Period::Month, 30),
            b("acme", Some("bot"), Period::Day, 3),
        ];
        let a = build_alert_caps(&list, "acme", Some("bot"));
        let want = [
            "t", "d", "", "7", "t", "m", "", "100", "f", "d", "bot", "3", "f", "m", "bot", "30",
        ];
        assert_eq!(&*a, &want.map(String::from));
        let a = build_alert_caps(&list, "zed", None);
        assert_eq!(&*a, &["t", "m", "", "100"].map(String::from));
        assert!(build_alert_caps(&[], "zed", Some("bot")).is_empty());
    }

    #[test]
    fn a_malformed_entry_breaks_caps_but_alerts_keep_the_valid_entries() {
        let shared = Shared::default();
        let mut h = HashMap::from([
            ("acme||month".to_owned(), "50".to_owned()),
            ("beta||day".to_owned(), "9".to_owned()),
        ]);
        shared.apply(&h).expect("clean");
        let v1 = shared.read().version;
        assert_eq!(shared.alerts_for("acme", None).len(), 4);
        h.insert("beta||month".to_owned(), "lots".to_owned());
        let e = shared.apply(&h).expect_err("malformed");
        assert!(e.to_string().contains("beta||month"), "{e}");
        let st = shared.read();
        assert!(st.broken.is_some() && st.loaded);
        assert_eq!(st.list.len(), 2, "the last clean list stays");
        assert_eq!(st.version, v1, "the parseable entries did not change");
        drop(st);
        // A changed limit elsewhere reaches alerts while the list is broken.
        h.insert("acme||month".to_owned(), "60".to_owned());
        shared.apply(&h).expect_err("still malformed");
        assert_eq!(
            &*shared.alerts_for("acme", None),
            &["t", "m", "", "60"].map(String::from)
        );
        h.remove("beta||month");
        shared.apply(&h).expect("fixed");
        let st = shared.read();
        assert!(st.broken.is_none());
        assert_eq!(
            st.list.iter().map(|b| b.limit.0).collect::<Vec<_>>(),
            [60, 9]
        );
    }
}
