//! What the ledger keeps besides money: the agentic-loop counters of a session (requests per
//! minute, identical request bodies within a window), in the tenant's slot so every enforcer
//! replica counts the same calls, and the stream of bypass events the observer appends.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::Ledger;
use super::keys::{self, validate_tenant};
use crate::Error;
use crate::names::{self, NameKind};

/// Requests a session made this minute and how often its current body was sent in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopCounts {
    /// Calls of the session in the current UTC minute, this one included.
    pub per_minute: u64,
    /// Calls of the session with this exact body within the window, this one included.
    pub identical: u64,
}

/// A bypass event: the first call of a (service, provider) pair in a window that did not pass
/// through the enforcer. Metadata only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BypassEvent {
    /// The service that made the call.
    pub service: String,
    /// The provider it called.
    pub provider: String,
    /// The tenant charged.
    pub tenant: String,
    /// The model, or "unknown".
    pub model: String,
    /// The process id.
    pub pid: u32,
    /// The process name.
    pub comm: String,
    /// When it was seen.
    pub at: DateTime<Utc>,
}

/// Bypass events kept in the stream (approximately: `XADD MAXLEN ~`).
pub const BYPASS_EVENTS_KEPT: u64 = 10_000;

/// How long a per-minute counter lives (two minutes, so the minute it counts always has it).
const MINUTE_KEY_TTL_SECS: u64 = 120;

impl Ledger {
    /// Counts one call of `session` (tenant `tenant`) with `body`: in this UTC minute, and among
    /// calls with the same body within `window`. Both counters live in the tenant's slot and
    /// expire on their own.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names; [`Error::Redis`] when Redis is unavailable.
    pub async fn count_session_call(
        &self,
        tenant: &str,
        session: &str,
        body: &[u8],
        window: Duration,
        now: DateTime<Utc>,
    ) -> Result<LoopCounts, Error> {
        validate_tenant(tenant)?;
        names::check(NameKind::Session, session)?;
        let minute_key = keys::loop_minute(tenant, session, now.timestamp() / 60);
        let digest = hex::encode(&Sha256::digest(body)[..12]);
        let body_key = keys::loop_body(tenant, session, &digest);
        let mut p = redis::pipe();
        p.cmd("INCR")
            .arg(&minute_key)
            .cmd("EXPIRE")
            .arg(&minute_key)
            .arg(MINUTE_KEY_TTL_SECS)
            .ignore();
        p.cmd("SET")
            .arg(&body_key)
            .arg(0)
            .arg("EX")
            .arg(window.as_secs().max(1))
            .arg("NX")
            .ignore();
        p.cmd("INCR").arg(&body_key);
        let (per_minute, identical): (u64, u64) = self
            .timed("count_session_call", async {
                let mut c = self.conn.clone();
                Ok(p.query_async(&mut c).await?)
            })
            .await?;
        Ok(LoopCounts {
            per_minute,
            identical,
        })
    }

    /// Remembers that `tenant` created the provider-stored object `id` (for `ttl`), so the
    /// enforcer lets only that tenant read it back.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant or id; [`Error::Redis`] when Redis is unavailable.
    pub async fn remember_object(
        &self,
        tenant: &str,
        id: &str,
        ttl: Duration,
    ) -> Result<(), Error> {
        validate_tenant(tenant)?;
        super::validate_name("object id", id)?;
        let key = keys::object(tenant, id);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(1).arg("EX").arg(ttl.as_secs().max(1));
        self.timed("remember_object", async {
            let mut c = self.conn.clone();
            let _: () = cmd.query_async(&mut c).await?;
            Ok(())
        })
        .await
    }

    /// Whether `tenant` created the provider-stored object `id` through the enforcer.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant; [`Error::Redis`] when Redis is unavailable.
    pub async fn owns_object(&self, tenant: &str, id: &str) -> Result<bool, Error> {
        validate_tenant(tenant)?;
        if super::validate_name("object id", id).is_err() {
            return Ok(false);
        }
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(keys::object(tenant, id));
        self.timed("owns_object", async {
            let mut c = self.conn.clone();
            let n: u64 = cmd.query_async(&mut c).await?;
            Ok(n > 0)
        })
        .await
    }

    /// Appends a bypass event to `llmw:events:bypass` (capped at about
    /// [`BYPASS_EVENTS_KEPT`] entries) and returns its stream id.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant; [`Error::Redis`] when Redis is unavailable.
    pub async fn bypass_event(&self, ev: &BypassEvent) -> Result<String, Error> {
        validate_tenant(&ev.tenant)?;
        names::check(NameKind::Service, &ev.service)?;
        let fields = [
            ("service", ev.service.clone()),
            ("provider", ev.provider.clone()),
            ("tenant", ev.tenant.clone()),
            ("model", ev.model.clone()),
            ("pid", ev.pid.to_string()),
            ("comm", ev.comm.clone()),
            ("at", ev.at.to_rfc3339()),
        ];
        let mut cmd = redis::cmd("XADD");
        cmd.arg(keys::BYPASS_EVENTS)
            .arg("MAXLEN")
            .arg("~")
            .arg(BYPASS_EVENTS_KEPT)
            .arg("*")
            .arg(&fields[..]);
        self.timed("bypass_event", async {
            let mut c = self.conn.clone();
            Ok(cmd.query_async(&mut c).await?)
        })
        .await
    }

    /// The newest `count` bypass events, newest first, as (stream id, fields).
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn recent_bypass_events(
        &self,
        count: usize,
    ) -> Result<Vec<(String, Vec<(String, String)>)>, Error> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(keys::BYPASS_EVENTS)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count);
        self.timed("recent_bypass_events", async {
            let mut c = self.conn.clone();
            Ok(cmd.query_async(&mut c).await?)
        })
        .await
    }
}
