//! Operational events for the alert dispatcher: a **price gap** (a call billed for a model the
//! price table does not know, at `unknown_model_price`) is announced once per (provider, model)
//! and UTC day across every enforcer and observer, on the stream [`keys::OPS_EVENTS`]. Layout in
//! docs/redis-schema.md; alert payloads in docs/audit.md.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};

use super::alerts::Alert;
use super::scripts::ScriptCall;
use super::{Ledger, keys};
use crate::Error;

/// Entries the ops event stream keeps (`MAXLEN ~`).
pub const OPS_EVENTS_KEPT: u64 = 10_000;

/// The cursor field (in [`super::ALERT_CURSOR_KEY`]) of the ops event stream; `*` is in no tenant name.
pub const OPS_CURSOR: &str = "*ops";

/// A day's marker lives a little longer than the day.
const MARKER_TTL_S: u64 = 2 * 86_400;

/// Sets the day's marker NX and appends the event only when the marker was new, so N processes
/// announce a gap once. Both keys share the `{ops}` hash tag (one slot in a cluster).
/// KEYS[1] marker, KEYS[2] stream; ARGV[1] marker ttl s, ARGV[2] maxlen, then field, value pairs.
static ANNOUNCE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return false end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))",
    )
});

/// A call billed for a model the price table does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceGap {
    /// `enforcer` or `observer`.
    pub path: String,
    /// Provider name.
    pub provider: String,
    /// The model name as the call gave it.
    pub model: String,
    /// The tenant of the call that found the gap.
    pub tenant: String,
    /// The service (observer) or empty.
    pub service: String,
    /// When.
    pub at: DateTime<Utc>,
}

impl Ledger {
    /// Announces a price gap once per (provider, model) and UTC day across all processes.
    /// Returns whether this call appended the event. A process asks Redis once per (provider,
    /// model) and day; a failed attempt is retried with the next call.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant or an empty provider or model; [`Error::Redis`] when
    /// Redis is unavailable.
    pub async fn price_gap(&self, g: &PriceGap) -> Result<bool, Error> {
        super::validate_tenant(&g.tenant)?;
        if g.provider.is_empty() || g.model.is_empty() {
            return Err(Error::Invalid {
                what: "price gap",
                detail: "provider and model must be named".into(),
            });
        }
        let day = g.at.format("%Y-%m-%d").to_string();
        let marker = keys::price_gap(&day, &g.provider, &g.model);
        if self.marked(&marker) {
            return Ok(false);
        }
        let fields = [
            ("kind", "price_gap"),
            ("path", g.path.as_str()),
            ("provider", g.provider.as_str()),
            ("model", g.model.as_str()),
            ("tenant", g.tenant.as_str()),
            ("service", g.service.as_str()),
        ];
        let at = g.at.to_rfc3339();
        let mut inv = ScriptCall::new(&ANNOUNCE);
        inv.key(&marker)
            .key(keys::OPS_EVENTS)
            .arg(MARKER_TTL_S)
            .arg(OPS_EVENTS_KEPT);
        for (f, v) in fields {
            inv.arg(f).arg(v);
        }
        inv.arg("at").arg(&at);
        let added: Option<String> = self
            .timed("price_gap", async {
                let mut c = self.conn.clone();
                Ok(inv.invoke_async(&mut c).await?)
            })
            .await?;
        self.mark(marker);
        Ok(added.is_some())
    }

    /// Up to `limit` ops events after the dispatcher's cursor [`OPS_CURSOR`] (acknowledged with
    /// [`Ledger::ack_alert`]`(OPS_CURSOR, ..)`), as alerts of their kind; the first time, those of
    /// the last hour.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn pending_ops_alerts(&self, limit: usize) -> Result<Vec<Alert>, Error> {
        let entries = self
            .timed("pending_ops_alerts", async {
                self.after_cursor(keys::OPS_EVENTS, OPS_CURSOR, limit).await
            })
            .await?;
        Ok(entries
            .into_iter()
            .map(|(id, m)| {
                let s = |k: &str| m.get(k).cloned().unwrap_or_default();
                Alert {
                    id: format!("ops|{id}"),
                    kind: s("kind"),
                    tenant: s("tenant"),
                    at: s("at"),
                    service: s("service"),
                    provider: s("provider"),
                    model: s("model"),
                    path: s("path"),
                    stream_id: id,
                    ..Alert::default()
                }
            })
            .collect())
    }
}
