//! Crash recovery: finding the holds an instance left behind and committing them as estimates.
//!
//! A hold whose owner never settles or releases it is committed at its reserved amount, flagged
//! `estimated` (lua/abandon.lua, and `abandon_hold` in lua/common.lua when a hold expires), so a
//! crash never turns spent money into free money. A later real settle of the same request id (a
//! spool replay) replaces the estimate; a later release reverses it.

use std::collections::{BTreeSet, HashMap};

use redis::AsyncCommands;

use chrono::{DateTime, Datelike, Duration as ChronoDuration, Utc};

use super::{Hold, Ledger, Period, from_ms, keys, scripts};
use crate::{Error, Nanos};

use super::keys::validate_tenant;

impl Ledger {
    /// Commits hold `reservation_id` of `tenant` now, expired or not, at its reserved amount as
    /// estimated spend (one request, `src:enforcer`), exactly once per request id. Returns the
    /// amount, or `None` when the hold no longer exists (settled, released or already reclaimed).
    /// A restarted enforcer calls this for the holds its previous run left, after replaying its
    /// spool; a later [`Ledger::settle`] with the real usage replaces the estimate.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names; [`Error::Redis`] when Redis is unavailable.
    pub async fn settle_abandoned(
        &self,
        tenant: &str,
        reservation_id: &str,
    ) -> Result<Option<Nanos>, Error> {
        let reply = self
            .hold_script(&scripts::ABANDON, "abandon", tenant, reservation_id, true)
            .await?;
        match reply.status() {
            "ESTIMATED" => Ok(Some(Nanos(reply.int(1)?))),
            "UNKNOWN" => Ok(None),
            _ => Err(reply.unexpected()),
        }
    }

    /// Every hold tagged with `instance` ([`Ledger::with_instance`]) among the tenants active this
    /// month or last month (a hold never outlives its TTL plus the grace, far less than a month),
    /// as `(tenant, hold)`. At most `per_tenant` holds are inspected per tenant.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn instance_holds(
        &self,
        instance: &str,
        now: DateTime<Utc>,
        per_tenant: usize,
    ) -> Result<Vec<(String, Hold)>, Error> {
        let mut tenants = BTreeSet::new();
        let last_month = now - ChronoDuration::days(i64::from(now.day()));
        for at in [now, last_month] {
            tenants.extend(self.active_tenants(Period::Month, at).await?);
        }
        let mut out = Vec::new();
        for t in tenants {
            if validate_tenant(&t).is_err() {
                continue;
            }
            for h in self.holds(&t, per_tenant).await? {
                if h.instance.as_deref() == Some(instance) {
                    out.push((t.clone(), h));
                }
            }
        }
        Ok(out)
    }

    /// The tenant's holds (in flight or expired but not yet reclaimed), oldest expiry first; at
    /// most `limit`. For crash recovery and inspection.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant; [`Error::Redis`] when Redis is unavailable.
    pub async fn holds(&self, tenant: &str, limit: usize) -> Result<Vec<Hold>, Error> {
        validate_tenant(tenant)?;
        let zkey = keys::holds(tenant);
        self.timed("holds", async {
            let mut c = self.conn.clone();
            let stop = isize::try_from(limit)
                .unwrap_or(isize::MAX)
                .saturating_sub(1);
            let ids: Vec<String> = c.zrange(&zkey, 0, stop).await?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let h: HashMap<String, String> = c.hgetall(keys::hold(tenant, &id)).await?;
                let Some(amount) = h.get("amount").and_then(|v| v.parse().ok()) else {
                    continue;
                };
                let s = |f: &str| h.get(f).cloned().unwrap_or_default();
                let opt = |f: &str| h.get(f).filter(|v| !v.is_empty()).cloned();
                let t = |f: &str| from_ms(h.get(f).and_then(|v| v.parse().ok()).unwrap_or(0));
                out.push(Hold {
                    model: opt("model"),
                    instance: opt("instance"),
                    id,
                    amount: Nanos(amount),
                    day: s("day"),
                    month: s("month"),
                    feature: opt("feature"),
                    session: opt("session"),
                    created_at: t("created"),
                    expires_at: t("expires"),
                });
            }
            Ok(out)
        })
        .await
    }
}
