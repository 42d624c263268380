//! Unmetered provider connections: connections the observer saw going to an LLM provider that
//! carried no call it could meter (a TLS stack no probe decodes). Booked per tenant, service and
//! host in the tenant's slot (`llmw:{T}:unmetered:{d|m}:<period>`), once per connection id, and
//! announced on the bypass event stream with `kind = unmetered`. Layout in docs/redis-schema.md.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use redis::{AsyncCommands, Script};

use super::keys::{self, validate_tenant};
use super::scripts::ScriptCall;
use super::{Ledger, Period, duration_ms, ms};
use crate::Error;
use crate::names::{self, NameKind};

/// Books one connection (lua/unmetered.lua).
static UNMETERED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/common.lua"),
        include_str!("lua/unmetered.lua")
    ))
});

/// One unmetered connection, as the observer reports it. Metadata only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmeteredConn {
    /// Tenant (the observer's attribution rules).
    pub tenant: String,
    /// Service that opened the connection.
    pub service: String,
    /// Provider host as configured (`api.openai.com`, `10.0.0.5:8000`).
    pub host: String,
    /// Provider name.
    pub provider: String,
    /// Unique per connection (idempotency: a retried write books it once).
    pub conn_id: String,
    /// Process id (0 when unknown).
    pub pid: u32,
    /// Process name.
    pub comm: String,
    /// TCP payload bytes sent.
    pub bytes_out: u64,
    /// TCP payload bytes received.
    pub bytes_in: u64,
    /// When the connection was opened (or first seen).
    pub started_at: DateTime<Utc>,
    /// Its duration in ms.
    pub duration_ms: u64,
    /// Whether it predates the observer (its open was not seen).
    pub joined: bool,
}

/// One (service, host) of a tenant's unmetered traffic in a period.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnmeteredEntry {
    /// Service.
    pub service: String,
    /// Provider host.
    pub host: String,
    /// Connections.
    pub connections: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// First connection seen (unix ms).
    pub first_seen_ms: i64,
    /// Last connection seen (unix ms).
    pub last_seen_ms: i64,
}

/// A tenant's unmetered traffic in a period.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnmeteredSummary {
    /// Connections.
    pub connections: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Per (service, host), sorted.
    pub entries: Vec<UnmeteredEntry>,
}

/// What [`Ledger::record_unmetered`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmeteredOutcome {
    /// Booked now.
    Recorded,
    /// This connection id was already booked.
    Duplicate,
}

/// "llmw:{T}:unmetered:d:2026-12-04" / "llmw:{T}:unmetered:m:2026-12".
#[must_use]
pub fn unmetered_key(tenant: &str, period: Period, now: DateTime<Utc>) -> String {
    format!(
        "{}unmetered:{}:{}",
        keys::prefix(tenant),
        period.letter(),
        period.id(now)
    )
}

/// A host goes into a hash field after `|`: no `|`, braces or control characters.
fn validate_host(host: &str) -> Result<(), Error> {
    keys::validate_name("host", host)?;
    if host.contains('|') || host.contains(char::is_whitespace) {
        return Err(Error::Invalid {
            what: "host",
            detail: format!("{host:?} contains '|' or whitespace"),
        });
    }
    Ok(())
}

impl Ledger {
    /// Books an unmetered connection in the day and month of `c.started_at` (once per
    /// `conn_id` within the idempotency TTL) and lists the tenant as active.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names; [`Error::Redis`] when Redis is unavailable.
    pub async fn record_unmetered(&self, c: &UnmeteredConn) -> Result<UnmeteredOutcome, Error> {
        validate_tenant(&c.tenant)?;
        names::check(NameKind::Service, &c.service)?;
        validate_host(&c.host)?;
        keys::validate_name("conn_id", &c.conn_id)?;
        let at = c.started_at;
        let mut inv = ScriptCall::new(&UNMETERED);
        inv.key(format!("{}umc:{}", keys::prefix(&c.tenant), c.conn_id))
            .key(unmetered_key(&c.tenant, Period::Day, at))
            .key(unmetered_key(&c.tenant, Period::Month, at))
            .arg(duration_ms(self.cfg.idempotency_ttl))
            .arg(Period::Day.expire_at(at).timestamp())
            .arg(Period::Month.expire_at(at).timestamp())
            .arg(format!("{}|{}", c.service, c.host))
            .arg(c.bytes_out)
            .arg(c.bytes_in)
            .arg(ms(at))
            .arg(keys::prefix(&c.tenant));
        super::audit::unmetered_fields(c, inv.args_mut());
        let now = chrono::Utc::now();
        super::audit::tail(&mut inv, &self.cfg, now, &[]);
        let reply: String = self
            .timed("record_unmetered", async {
                self.mark_active(&c.tenant, at).await?;
                self.mark_audit_day(&c.tenant, now).await?;
                let mut conn = self.conn.clone();
                Ok(inv.invoke_async(&mut conn).await?)
            })
            .await?;
        match reply.as_str() {
            "RECORDED" => Ok(UnmeteredOutcome::Recorded),
            "DUPLICATE" => Ok(UnmeteredOutcome::Duplicate),
            _ => Err(Error::ScriptReply {
                script: "unmetered",
                detail: reply,
            }),
        }
    }

    /// Appends an unmetered connection to the bypass event stream (`kind = unmetered`).
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names; [`Error::Redis`] when Redis is unavailable.
    pub async fn unmetered_event(&self, c: &UnmeteredConn) -> Result<String, Error> {
        validate_tenant(&c.tenant)?;
        names::check(NameKind::Service, &c.service)?;
        let fields = [
            ("kind", "unmetered".to_owned()),
            ("service", c.service.clone()),
            ("provider", c.provider.clone()),
            ("host", c.host.clone()),
            ("tenant", c.tenant.clone()),
            ("pid", c.pid.to_string()),
            ("comm", c.comm.clone()),
            ("bytes_out", c.bytes_out.to_string()),
            ("bytes_in", c.bytes_in.to_string()),
            ("duration_ms", c.duration_ms.to_string()),
            ("joined", if c.joined { "1" } else { "0" }.to_owned()),
            ("at", c.started_at.to_rfc3339()),
        ];
        let mut cmd = redis::cmd("XADD");
        cmd.arg(keys::BYPASS_EVENTS)
            .arg("MAXLEN")
            .arg("~")
            .arg(super::BYPASS_EVENTS_KEPT)
            .arg("*")
            .arg(&fields[..]);
        self.timed("unmetered_event", async {
            let mut conn = self.conn.clone();
            Ok(cmd.query_async(&mut conn).await?)
        })
        .await
    }

    /// `tenant`'s unmetered traffic in the period containing `now`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant; [`Error::Redis`] when Redis is unavailable.
    pub async fn unmetered(
        &self,
        tenant: &str,
        period: Period,
        now: DateTime<Utc>,
    ) -> Result<UnmeteredSummary, Error> {
        validate_tenant(tenant)?;
        let key = unmetered_key(tenant, period, now);
        let h: HashMap<String, String> = self
            .timed("unmetered", async {
                let mut c = self.conn.clone();
                Ok(c.hgetall(&key).await?)
            })
            .await?;
        Ok(summary(&h))
    }
}

/// Reads a period hash's fields.
fn summary(h: &HashMap<String, String>) -> UnmeteredSummary {
    let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let mut by: BTreeMap<(String, String), UnmeteredEntry> = BTreeMap::new();
    for (field, value) in h {
        let Some((tag, pair)) = field.split_once('|') else {
            continue;
        };
        let Some((service, host)) = pair.split_once('|') else {
            continue;
        };
        let e = by
            .entry((service.to_owned(), host.to_owned()))
            .or_insert_with(|| UnmeteredEntry {
                service: service.to_owned(),
                host: host.to_owned(),
                ..UnmeteredEntry::default()
            });
        let n: i64 = value.parse().unwrap_or(0);
        let u = u64::try_from(n).unwrap_or(0);
        match tag {
            "c" => e.connections = u,
            "o" => e.bytes_out = u,
            "i" => e.bytes_in = u,
            "f" => e.first_seen_ms = n,
            "l" => e.last_seen_ms = n,
            _ => {}
        }
    }
    UnmeteredSummary {
        connections: num("connections"),
        bytes_out: num("bytes_out"),
        bytes_in: num("bytes_in"),
        entries: by.into_values().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_fields() {
        let now = DateTime::parse_from_rfc3339("2026-12-04T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            unmetered_key("acme", Period::Month, now),
            "llmw:{acme}:unmetered:m:2026-12"
        );
        assert_eq!(
            unmetered_key("acme", Period::Day, now),
            "llmw:{acme}:unmetered:d:2026-12-04"
        );
        let h: HashMap<String, String> = [
            ("connections", "3"),
            ("bytes_out", "30"),
            ("bytes_in", "300"),
            ("c|agent|api.openai.com", "2"),
            ("o|agent|api.openai.com", "20"),
            ("i|agent|api.openai.com", "200"),
            ("f|agent|api.openai.com", "1000"),
            ("l|agent|api.openai.com", "2000"),
            ("c|cli|10.0.0.5:8000", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let s = summary(&h);
        assert_eq!((s.connections, s.bytes_out, s.bytes_in), (3, 30, 300));
        assert_eq!(s.entries.len(), 2);
        assert_eq!(s.entries[0].service, "agent");
        assert_eq!(s.entries[0].bytes_in, 200);
        assert_eq!(s.entries[0].last_seen_ms, 2000);
        assert_eq!(s.entries[1].host, "10.0.0.5:8000");
        assert!(validate_host("a|b").is_err());
        assert!(validate_host("api.openai.com").is_ok());
    }
}
