//! The values the ledger takes and returns. Every amount is [`Nanos`] (integer nano-USD).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::Period;
use crate::Nanos;

/// Which side of llmwarden saw a call: the enforcer (proxy, with a reservation) or the observer
/// (eBPF, post hoc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The enforcer proxy: reserve, then settle.
    Enforcer,
    /// The eBPF observer: record only.
    Observer,
}

impl Source {
    /// "enforcer" / "observer", as in the `src:<source>` hash fields.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Enforcer => "enforcer",
            Source::Observer => "observer",
        }
    }
}

/// What a cap limits: the whole tenant, one feature of the tenant, or one session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapScope {
    /// All spend of the tenant in the period.
    Tenant,
    /// The tenant's spend attributed to this feature (X-Feature-Name) in the period.
    Feature(String),
    /// Cumulative spend of this session (X-Session-ID) over the session's life; the period is ignored.
    Session(String),
}

/// One limit that applies to a call, resolved by the caller (see [`super::resolve_caps`]) so the
/// reserve script only touches the tenant's slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cap {
    /// What is limited.
    pub scope: CapScope,
    /// The period the limit applies to (ignored for session caps).
    pub period: Period,
    /// The limit; committed + held + the new reservation may not exceed it.
    pub limit: Nanos,
}

/// A configured budget limit as stored in Redis (`llmw:budgets`), live-editable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// The tenant, or "*" for every tenant that has no budget of its own for this feature and period.
    pub tenant: String,
    /// Limits only this feature when set; the tenant's whole spend otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    /// Day or month (UTC).
    pub period: Period,
    /// The limit.
    pub limit: Nanos,
}

/// Token counts committed with a call's cost (the ledger's view of a `Usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Prompt tokens billed at the plain input rate (excluding cache reads and writes).
    pub input: u64,
    /// All billed output tokens, reasoning included.
    pub output: u64,
    /// Cached input tokens read.
    pub cache_read: u64,
    /// Cache-write tokens (5-minute and 1-hour together).
    pub cache_write: u64,
}

impl From<&crate::usage::Usage> for TokenCounts {
    fn from(u: &crate::usage::Usage) -> Self {
        TokenCounts {
            input: u.input_tokens,
            output: u.output_tokens,
            cache_read: u.cache_read_tokens,
            cache_write: u
                .cache_write_5m_tokens
                .saturating_add(u.cache_write_1h_tokens),
        }
    }
}

impl From<crate::usage::Usage> for TokenCounts {
    fn from(u: crate::usage::Usage) -> Self {
        TokenCounts::from(&u)
    }
}

/// A request to hold the worst-case cost of a call until its real usage is known, so concurrent
/// calls cannot overspend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    /// The tenant paying.
    pub tenant: String,
    /// The feature (X-Feature-Name), if any.
    pub feature: Option<String>,
    /// The session (X-Session-ID), if any.
    pub session: Option<String>,
    /// The enforcer's request id; it is also the reservation id, and a retried reserve with the
    /// same id returns the same reservation.
    pub request_id: String,
    /// Provider name ("openai", ...), informational.
    pub provider: String,
    /// Model, informational.
    pub model: Option<String>,
    /// The worst-case cost to hold.
    pub amount: Nanos,
    /// How long the hold lives if never settled or released; then it is reclaimed and committed
    /// at `amount` as estimated spend. Must exceed the longest call the caller allows.
    pub ttl: Duration,
    /// The caps to check, in order; a denial names the first one violated.
    pub caps: Vec<Cap>,
    /// The time of the call: picks the day and month the hold (and later its spend) belongs to.
    pub at: DateTime<Utc>,
    /// Request and token rate limits checked in the same script as the caps (empty: none).
    pub rates: Vec<RateLimit>,
    /// The tokens the call may use (input estimate + output limit), counted against `tpm` limits
    /// until [`Ledger::correct_rate_tokens`](super::Ledger::correct_rate_tokens) puts the real
    /// count in their place.
    pub tokens: u64,
}

/// A rate limit over the last 60 seconds in one scope of a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// The scope within the tenant: `tenant`, `key:<id>`, `model:<model>` (part of a key name).
    pub scope: String,
    /// Requests per minute (0: no limit).
    pub rpm: u64,
    /// Tokens per minute (0: no limit).
    pub tpm: u64,
}

/// Why a call was refused by a rate limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateDenial {
    /// The tenant.
    pub tenant: String,
    /// The limit's scope.
    pub scope: String,
    /// `true`: the token limit; `false`: the request limit.
    pub tokens: bool,
    /// Requests or tokens in the last 60 seconds.
    pub used: u64,
    /// The limit.
    pub limit: u64,
    /// Seconds until the window has room for this call.
    pub retry_after_secs: u64,
}

impl fmt::Display for RateDenial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.tokens { "tokens" } else { "requests" };
        write!(
            f,
            "rate limit exceeded for {} of tenant {}: {} {what} in the last minute, limit {} per minute; retry in {} s",
            self.scope, self.tenant, self.used, self.limit, self.retry_after_secs
        )
    }
}

/// A held amount, to be settled or released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The reservation id (equal to the request id).
    pub id: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The held amount.
    pub amount: Nanos,
    /// When it is reclaimed if neither settled nor released.
    pub expires_at: DateTime<Utc>,
    /// True when this reserve was a retry and the hold already existed (nothing new was held).
    pub existing: bool,
}

/// Why a call was denied: the first cap that committed + held + the new amount would exceed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// The tenant.
    pub tenant: String,
    /// The violated cap.
    pub cap: Cap,
    /// Its limit.
    pub limit: Nanos,
    /// Committed spend in the cap's scope and period.
    pub spent: Nanos,
    /// Spend held by calls in flight in the cap's scope and period.
    pub held: Nanos,
    /// The amount the denied call asked to hold.
    pub requested: Nanos,
    /// When the cap's period resets; `None` for session caps (a session never resets).
    pub reset_at: Option<DateTime<Utc>>,
}

impl Denial {
    /// What is left under the cap (never negative).
    #[must_use]
    pub fn remaining(&self) -> Nanos {
        Nanos(
            self.limit
                .0
                .saturating_sub(self.spent.0)
                .saturating_sub(self.held.0)
                .max(0),
        )
    }
}

impl fmt::Display for Denial {
    /// "budget exceeded for tenant acme (month, limit $50.00, spent $49.98); raise it with PUT
    /// /budgets or wait until 2026-12-01T00:00:00Z".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.tenant;
        let (limit, spent) = (self.limit, self.spent);
        let held = if self.held.0 > 0 {
            format!(", {} held by calls in flight", self.held)
        } else {
            String::new()
        };
        match (&self.cap.scope, self.reset_at) {
            (CapScope::Session(s), _) => write!(
                f,
                "session budget exceeded for session {s} of tenant {t} (limit {limit}, spent {spent}{held}); \
                 start a new session (X-Session-ID) or raise the session limit_usd"
            ),
            (scope, reset) => {
                let what = match scope {
                    CapScope::Feature(feat) => format!("feature {feat} of tenant {t}"),
                    _ => format!("tenant {t}"),
                };
                let p = self.cap.period;
                write!(
                    f,
                    "budget exceeded for {what} ({p}, limit {limit}, spent {spent}{held}); raise it with PUT /budgets"
                )?;
                match reset {
                    Some(r) => write!(
                        f,
                        " or wait until {}",
                        r.to_rfc3339_opts(SecondsFormat::Secs, true)
                    ),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The result of a reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Every cap has room: the amount is held.
    Allowed(Reservation),
    /// A cap would be exceeded; nothing was held.
    Denied(Denial),
    /// A rate limit would be exceeded; nothing was held or counted.
    RateLimited(RateDenial),
}

/// The real cost of a call made under a reservation (or, for a spool replay, without one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// The tenant.
    pub tenant: String,
    /// The request id (= reservation id); settle is idempotent per request id.
    pub request_id: String,
    /// The feature, if any.
    pub feature: Option<String>,
    /// The session, if any.
    pub session: Option<String>,
    /// The model that was billed (counted under `model:<m>:*`).
    pub model: Option<String>,
    /// The actual cost.
    pub cost: Nanos,
    /// The tokens billed.
    pub tokens: TokenCounts,
    /// True when the cost is an estimate (no provider usage record); also counted in `estimated`.
    pub estimated: bool,
    /// When the call started (the reserve's `at`): picks the day and month the spend is booked in.
    pub started_at: DateTime<Utc>,
    /// What the audit trail records beyond the usage (provider, API, outcome, latency).
    #[serde(default, skip_serializing_if = "CallMeta::is_empty")]
    pub meta: CallMeta,
}

/// The result of a settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    /// Spend committed. `released` is the hold it replaced, `None` when the hold had already expired,
    /// been released or never existed.
    Settled {
        /// The held amount dropped.
        released: Option<Nanos>,
    },
    /// This request id was settled before; nothing changed.
    AlreadySettled,
    /// The call's hold had been abandoned (it expired, or its restarted owner gave it up) and
    /// committed at its reserved amount as an estimate; that estimate was reversed and this real
    /// usage committed instead, once (a late settle, typically a spool replay).
    ReplacedEstimate {
        /// The estimated amount that was removed.
        estimate: Nanos,
    },
}

/// Spend the observer saw (no reservation); idempotent per event id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The tenant.
    pub tenant: String,
    /// A unique id of the observed call; a repeated record with the same id changes nothing.
    pub event_id: String,
    /// The feature, if known.
    pub feature: Option<String>,
    /// The session, if known.
    pub session: Option<String>,
    /// Provider name, informational.
    pub provider: String,
    /// The model billed.
    pub model: Option<String>,
    /// The cost.
    pub cost: Nanos,
    /// The tokens billed.
    pub tokens: TokenCounts,
    /// True when the call bypassed the enforcer (also counted in `bypass`).
    pub bypass: bool,
    /// True when the cost is an estimate.
    pub estimated: bool,
    /// When the call happened: picks the day and month.
    pub at: DateTime<Utc>,
    /// What the audit trail records beyond the usage (API, process identity, service).
    #[serde(default, skip_serializing_if = "CallMeta::is_empty")]
    pub meta: CallMeta,
}

/// What the audit trail (docs/audit.md) records about a call beyond its usage: where it was seen,
/// what answered, how it ended. Never prompts, completions or keys. Every field is optional; text
/// is cleaned of control characters and cut to 128 bytes before it is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CallMeta {
    /// `enforcer`, `observer` or `unmetered`; empty means the writer's own (settle: enforcer,
    /// record: observer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Provider name (settles; records carry theirs in [`UsageRecord::provider`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The API called (`chat_completions`, `messages`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// How the call ended: `ok`, `cut` (client disconnect, upstream reset or stall), or a short
    /// word of the writer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The call's duration as its writer measured it, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// The service the observer attributed the call to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The calling process (observer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The calling process's command name (observer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

impl CallMeta {
    /// True when nothing is set (kept out of spool records then).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == CallMeta::default()
    }
}

/// The result of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Spend committed.
    Recorded,
    /// This event id was recorded before; nothing changed.
    Duplicate,
}

/// Spend by source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BySource {
    /// Committed through the enforcer.
    pub enforcer: Nanos,
    /// Recorded by the observer.
    pub observer: Nanos,
}

/// One tenant's figures for one period, read from its period hash.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSpend {
    /// The tenant.
    pub tenant: String,
    /// The period id ("2026-11").
    pub period_id: String,
    /// Committed spend.
    pub spend: Nanos,
    /// Spend held by calls in flight.
    pub held: Nanos,
    /// Spend of calls that bypassed the enforcer (seen by the observer).
    pub bypass_spend: Nanos,
    /// Spend committed from estimates rather than provider usage records.
    pub estimated_spend: Nanos,
    /// Committed calls.
    pub requests: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cached input tokens read.
    pub cache_read_tokens: u64,
    /// Cache-write tokens.
    pub cache_write_tokens: u64,
    /// Spend by source.
    pub by_source: BySource,
    /// Committed spend per feature.
    pub by_feature: BTreeMap<String, Nanos>,
    /// Held spend per feature (only features with something held).
    pub held_by_feature: BTreeMap<String, Nanos>,
    /// Committed spend per model.
    pub by_model: BTreeMap<String, Nanos>,
    /// Committed calls per model.
    pub requests_by_model: BTreeMap<String, u64>,
}

/// One session's cumulative figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpend {
    /// Committed spend.
    pub spend: Nanos,
    /// Held spend.
    pub held: Nanos,
    /// Committed calls.
    pub requests: u64,
}

/// A hold as stored, for crash recovery and inspection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Reservation id (= request id).
    pub id: String,
    /// Held amount.
    pub amount: Nanos,
    /// Day id the hold counts against.
    pub day: String,
    /// Month id the hold counts against.
    pub month: String,
    /// Feature, if any.
    pub feature: Option<String>,
    /// Session, if any.
    pub session: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Expiry time.
    pub expires_at: DateTime<Utc>,
    /// The model of the reserve, if any (an abandoned hold's estimate is booked under it).
    pub model: Option<String>,
    /// The instance that created it ([`super::Ledger::with_instance`]), if any.
    pub instance: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(scope: CapScope, period: Period, reset: Option<&str>) -> Denial {
        Denial {
            tenant: "acme".into(),
            cap: Cap {
                scope,
                period,
                limit: Nanos(50_000_000_000),
            },
            limit: Nanos(50_000_000_000),
            spent: Nanos(49_980_000_000),
            held: Nanos(0),
            requested: Nanos(100_000_000),
            reset_at: reset.map(|r| DateTime::parse_from_rfc3339(r).unwrap().with_timezone(&Utc)),
        }
    }

    #[test]
    fn denial_messages_name_the_fix() {
        let d = denial(
            CapScope::Tenant,
            Period::Month,
            Some("2026-12-01T00:00:00Z"),
        );
        assert_eq!(
            d.to_string(),
            "budget exceeded for tenant acme (month, limit $50.00, spent $49.98); raise it with PUT /budgets \
             or wait until 2026-12-01T00:00:00Z"
        );
        assert_eq!(d.remaining(), Nanos(20_000_000));
        let d = denial(
            CapScope::Feature("support-bot".into()),
            Period::Day,
            Some("2026-11-28T00:00:00Z"),
        );
        assert!(
            d.to_string()
                .starts_with("budget exceeded for feature support-bot of tenant acme (day,"),
            "{d}"
        );
        let mut d = denial(CapScope::Session("s1".into()), Period::Day, None);
        d.held = Nanos(10_000_000);
        assert_eq!(
            d.to_string(),
            "session budget exceeded for session s1 of tenant acme (limit $50.00, spent $49.98, $0.01 held by \
             calls in flight); start a new session (X-Session-ID) or raise the session limit_usd"
        );
    }

    #[test]
    fn token_counts_from_usage() {
        let u = crate::usage::Usage {
            input_tokens: 10,
            cache_read_tokens: 3,
            cache_write_5m_tokens: 2,
            cache_write_1h_tokens: 1,
            output_tokens: 7,
            reasoning_tokens: 5,
            estimated: false,
        };
        assert_eq!(
            TokenCounts::from(u),
            TokenCounts {
                input: 10,
                output: 7,
                cache_read: 3,
                cache_write: 3
            }
        );
    }

    #[test]
    fn budget_serde() {
        let b: Budget =
            serde_json::from_str(r#"{"tenant":"*","period":"day","limit":5000000000}"#).unwrap();
        assert_eq!(
            b,
            Budget {
                tenant: "*".into(),
                feature: None,
                period: Period::Day,
                limit: Nanos(5_000_000_000)
            }
        );
        assert!(
            serde_json::from_str::<Budget>(r#"{"tenant":"a","period":"day","limit":1,"x":1}"#)
                .is_err()
        );
    }
}
