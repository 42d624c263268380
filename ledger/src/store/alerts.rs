//! Budget alerts, ledger side (docs/audit.md): the alert streams the scripts append to
//! (`llmw:{T}:alerts`), and what one dispatcher needs to deliver them: a lease
//! (`llmw:alerts:lease`), a read cursor per tenant (`llmw:alerts:cursor`) and a delivery status
//! per alert (`llmw:alerts:delivery:<alert id>`). The budgets the scripts compare with their
//! thresholds come from the process's budget cache (budget_cache.rs).

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::scripts::ScriptCall;
use super::{Ledger, Period, from_ms, keys};
use crate::Error;

/// The lease that makes one enforcer the dispatcher.
pub const ALERT_LEASE_KEY: &str = "llmw:alerts:lease";
/// Hash tenant → the id of the last alert of its stream the dispatcher finished with.
pub const ALERT_CURSOR_KEY: &str = "llmw:alerts:cursor";
/// How long an alert's delivery status is kept.
const DELIVERY_TTL_SECS: i64 = 400 * 86_400;

/// "llmw:alerts:delivery:<alert id>" — hash sink → its [`Delivery`] (JSON).
#[must_use]
pub fn delivery_key(alert_id: &str) -> String {
    format!("llmw:alerts:delivery:{alert_id}")
}

/// "llmw:{T}:alerts" — the tenant's alert stream.
#[must_use]
pub fn alerts_key(tenant: &str) -> String {
    format!("{}alerts", keys::prefix(tenant))
}

/// Takes or renews the lease when free or already ours; replies 1 when held.
static LEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0",
    )
});

/// Drops the lease only when it is ours.
static UNLEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0",
    )
});

/// The cursor field (in [`ALERT_CURSOR_KEY`]) of the bypass events stream; `*` is in no tenant name.
pub const BYPASS_CURSOR: &str = "*bypass";
/// On its first run a dispatcher delivers bypass events of the last hour, not the whole stream.
const FIRST_RUN_LOOKBACK_MS: i64 = 3_600_000;

/// One alert: a budget threshold the scripts decided, or a first bypass the observer reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Its entry id in the tenant's alert stream (the dispatcher's cursor).
    pub stream_id: String,
    /// The idempotency key: `tenant|feature|period|period id|threshold`, unique per (budget,
    /// period, threshold).
    pub id: String,
    /// `budget_threshold`, `first_bypass`, `first_unmetered`, `price_gap` or `spool_filling`.
    pub kind: String,
    /// The tenant.
    pub tenant: String,
    /// The budget's feature, or empty for the whole tenant.
    pub feature: String,
    /// `day` or `month`.
    pub period: String,
    /// The period id (`2026-12-04`, `2026-12`).
    pub period_id: String,
    /// The threshold crossed, in percent of the limit.
    pub threshold_pct: u32,
    /// The budget's limit.
    pub limit_nusd: i64,
    /// The committed spend when the threshold was crossed.
    pub spend_nusd: i64,
    /// When (the stream id's time), RFC 3339.
    pub at: String,
    /// `first_bypass`: the service that called the provider directly.
    pub service: String,
    /// `first_bypass`: the provider.
    pub provider: String,
    /// `first_bypass`: the model, or "unknown".
    pub model: String,
    /// `first_bypass`: the process id.
    pub pid: String,
    /// `first_bypass`, `first_unmetered`: the process name.
    pub comm: String,
    /// `first_unmetered`: the provider host the connection went to.
    pub host: String,
    /// `first_unmetered`: TCP payload bytes sent.
    pub bytes_out: u64,
    /// `first_unmetered`: TCP payload bytes received.
    pub bytes_in: u64,
    /// `price_gap`: the path that billed the call (`enforcer` or `observer`).
    pub path: String,
    /// `spool_filling`: the enforcer instance whose spool fills.
    pub instance: String,
    /// `spool_filling`: bytes in the spool when the threshold was reached.
    pub spool_bytes: u64,
    /// `spool_filling`: the spool's bound (`spool_max_bytes`).
    pub spool_max_bytes: u64,
}

/// Where one alert stands with one sink.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// `delivered`, `retrying` or `failed`.
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure, if any (status or error; never a URL's secret part).
    pub last_error: String,
    /// When it was delivered, RFC 3339, or empty.
    pub delivered_at: String,
}

impl Ledger {
    /// Takes the dispatcher lease for `holder` for `ttl`, or renews it when `holder` has it.
    /// Returns whether `holder` holds it now.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn alert_lease(&self, holder: &str, ttl: Duration) -> Result<bool, Error> {
        let mut inv = ScriptCall::new(&LEASE);
        inv.key(ALERT_LEASE_KEY)
            .arg(holder)
            .arg(super::duration_ms(ttl));
        self.timed("alert_lease", async {
            let mut c = self.conn.clone();
            let v: i64 = inv.invoke_async(&mut c).await?;
            Ok(v == 1)
        })
        .await
    }

    /// Gives the lease up when `holder` has it (a clean shutdown).
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn alert_unlease(&self, holder: &str) -> Result<(), Error> {
        let mut inv = ScriptCall::new(&UNLEASE);
        inv.key(ALERT_LEASE_KEY).arg(holder);
        self.timed("alert_unlease", async {
            let mut c = self.conn.clone();
            let _: i64 = inv.invoke_async(&mut c).await?;
            Ok(())
        })
        .await
    }

    /// The tenants whose alert streams a dispatcher reads: those active this month or today.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn alert_tenants(&self, now: DateTime<Utc>) -> Result<Vec<String>, Error> {
        let mut v = self.active_tenants(Period::Month, now).await?;
        v.extend(self.active_tenants(Period::Day, now).await?);
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// Up to `limit` alerts of `tenant` after the dispatcher's cursor, oldest first.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant; [`Error::Redis`] when Redis is unavailable.
    pub async fn pending_alerts(&self, tenant: &str, limit: usize) -> Result<Vec<Alert>, Error> {
        keys::validate_tenant(tenant)?;
        let key = alerts_key(tenant);
        self.timed("pending_alerts", async {
            let mut c = self.conn.clone();
            let cursor: Option<String> = c.hget(ALERT_CURSOR_KEY, tenant).await?;
            let start = cursor.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
            Ok(super::conn::xrange(&mut c, &key, &start, "+", limit)
                .await?
                .into_iter()
                .map(|(id, m)| alert_from(id, &m))
                .collect())
        })
        .await
    }

    /// Up to `limit` bypass events (`llmw:events:bypass`, written by the observer when a
    /// (service, provider) pair first calls a provider directly in its window) after the
    /// dispatcher's cursor [`BYPASS_CURSOR`], as `first_bypass` alerts; the first time, those of the
    /// last hour.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn pending_bypass_alerts(&self, limit: usize) -> Result<Vec<Alert>, Error> {
        let entries = self
            .timed("pending_bypass_alerts", async {
                self.after_cursor(keys::BYPASS_EVENTS, BYPASS_CURSOR, limit)
                    .await
            })
            .await?;
        Ok(entries
            .into_iter()
            .map(|(id, m)| {
                let s = |k: &str| m.get(k).cloned().unwrap_or_default();
                let n = |k: &str| m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
                // The observer's unmetered connections share the stream (`kind`).
                let unmetered = s("kind") == "unmetered";
                Alert {
                    id: format!("bypass|{id}"),
                    kind: if unmetered {
                        "first_unmetered"
                    } else {
                        "first_bypass"
                    }
                    .into(),
                    tenant: s("tenant"),
                    at: s("at"),
                    service: s("service"),
                    provider: s("provider"),
                    model: s("model"),
                    pid: s("pid"),
                    comm: s("comm"),
                    host: s("host"),
                    bytes_out: n("bytes_out"),
                    bytes_in: n("bytes_in"),
                    stream_id: id,
                    ..Alert::default()
                }
            })
            .collect())
    }

    /// Up to `limit` entries of the global stream `key` after the dispatcher's cursor field
    /// `cursor` in [`ALERT_CURSOR_KEY`]; the first time (no cursor yet), those of the last hour
    /// rather than the whole stream.
    pub(crate) async fn after_cursor(
        &self,
        key: &str,
        cursor: &str,
        limit: usize,
    ) -> Result<Vec<(String, std::collections::HashMap<String, String>)>, Error> {
        let mut c = self.conn.clone();
        let at: Option<String> = c.hget(ALERT_CURSOR_KEY, cursor).await?;
        let start = at.map_or_else(
            || (Utc::now().timestamp_millis() - FIRST_RUN_LOOKBACK_MS).to_string(),
            |id| format!("({id}"),
        );
        Ok(super::conn::xrange(&mut c, key, &start, "+", limit).await?)
    }

    /// Moves the dispatcher's cursor of `tenant` past `stream_id` (that alert is finished).
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn ack_alert(&self, tenant: &str, stream_id: &str) -> Result<(), Error> {
        self.timed("ack_alert", async {
            let mut c = self.conn.clone();
            let _: () = c.hset(ALERT_CURSOR_KEY, tenant, stream_id).await?;
            Ok(())
        })
        .await
    }

    /// The delivery status of alert `alert_id` with every sink that has one.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn alert_deliveries(
        &self,
        alert_id: &str,
    ) -> Result<HashMap<String, Delivery>, Error> {
        let key = delivery_key(alert_id);
        let h: HashMap<String, String> = self
            .timed("alert_deliveries", async {
                let mut c = self.conn.clone();
                Ok(c.hgetall(&key).await?)
            })
            .await?;
        Ok(h.into_iter()
            .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|d| (k, d)))
            .collect())
    }

    /// Stores the delivery status of alert `alert_id` with `sink` (kept 400 days).
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn set_alert_delivery(
        &self,
        alert_id: &str,
        sink: &str,
        d: &Delivery,
    ) -> Result<(), Error> {
        let key = delivery_key(alert_id);
        let v = serde_json::to_string(d).unwrap_or_default();
        self.timed("set_alert_delivery", async {
            let mut c = self.conn.clone();
            let _: () = redis::pipe()
                .hset(&key, sink, v)
                .ignore()
                .expire(&key, DELIVERY_TTL_SECS)
                .ignore()
                .query_async(&mut c)
                .await?;
            Ok(())
        })
        .await
    }
}

fn alert_from(stream_id: String, m: &HashMap<String, String>) -> Alert {
    let s = |k: &str| m.get(k).cloned().unwrap_or_default();
    let ms: i64 = stream_id
        .split('-')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Alert {
        at: from_ms(ms).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        stream_id,
        id: s("id"),
        kind: s("kind"),
        tenant: s("tenant"),
        feature: s("feature"),
        period: s("period"),
        period_id: s("period_id"),
        threshold_pct: s("threshold_pct").parse().unwrap_or(0),
        limit_nusd: s("limit_nusd").parse().unwrap_or(0),
        spend_nusd: s("spend_nusd").parse().unwrap_or(0),
        ..Alert::default()
    }
}
