//! [`Ledger::settle`]: names and cost are checked in Rust, then the settlement joins its tenant's
//! group commit (batch.rs, lua/settle_batch.lua), or takes the single script (lua/settle.lua) when
//! its cost or token counts are too large to sum exactly in Lua or its period hashes are already
//! expiring.

use std::sync::Arc;

use chrono::Utc;

use super::batch::{self, Item, MAX_BATCHED_VALUE, Op};
use super::keys::{validate_name, validate_opt, validate_tenant};
use super::scripts::{Args, Reply};
use super::{Ledger, Period, SettleOutcome, Settlement, check_usage, ms};
use crate::{Error, Nanos};

impl Ledger {
    /// Replaces a reservation with the actual cost: drops the hold (if it still exists), commits
    /// the cost and tokens everywhere. Idempotent per request id (within
    /// [`super::LedgerConfig::idempotency_ttl`]); correct when the hold already expired or never
    /// existed (spool replay).
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names, a negative cost, or a cost or token count above
    /// [`MAX_CALL_COST`](super::MAX_CALL_COST) / [`MAX_CALL_TOKENS`](super::MAX_CALL_TOKENS); [`Error::Redis`] when Redis is
    /// unavailable (then it is safe to retry or spool: a retry never double-counts).
    pub async fn settle(&self, s: &Settlement) -> Result<SettleOutcome, Error> {
        validate_tenant(&s.tenant)?;
        validate_name("request_id", &s.request_id)?;
        validate_opt("feature", s.feature.as_deref())?;
        validate_opt("session", s.session.as_deref())?;
        validate_opt("model", s.model.as_deref())?;
        check_usage(s.cost, &s.tokens)?;
        let reply = self
            .timed("settle", async {
                self.mark_active(&s.tenant, s.started_at).await?;
                self.mark_audit_day(&s.tenant, Utc::now()).await?;
                let item = settle_item(s, self.alert_caps(&s.tenant, s.feature.as_deref()).await);
                let fields = if self.cfg.group_commit && batchable(s) {
                    self.batch.submit(Op::Settle, &s.tenant, item).await?
                } else {
                    let mut c = self.batch.thread_conn();
                    batch::single(Op::Settle, &s.tenant, &item, &self.cfg)
                        .invoke_async(&mut c)
                        .await?
                };
                Ok(Reply::new("settle", fields))
            })
            .await?;
        outcome(&reply)
    }
}

/// Whether every number the batch script sums stays exact in Lua (and the period is live).
fn batchable(s: &Settlement) -> bool {
    let t = s.tokens;
    let small = |v: u64| i64::try_from(v).is_ok_and(|v| v < MAX_BATCHED_VALUE);
    s.cost.0 < MAX_BATCHED_VALUE
        && [t.input, t.output, t.cache_read, t.cache_write]
            .into_iter()
            .all(small)
        && batch::live_period(s.started_at)
}

/// The settlement's part of the scripts' arguments (see [`Item::args`]).
fn settle_item(s: &Settlement, alerts: Arc<[String]>) -> Item {
    let at = s.started_at;
    let t = s.tokens;
    let mut args = Args::with_capacity(640, 48);
    args.push(&s.request_id)
        .push_fmt(Period::Day.id_of(at))
        .push_fmt(Period::Month.id_of(at))
        .push(Period::Day.expire_at(at).timestamp())
        .push(Period::Month.expire_at(at).timestamp())
        .push(s.cost.0)
        .push(t.input)
        .push(t.output)
        .push(t.cache_read)
        .push(t.cache_write)
        .push(s.model.as_deref().unwrap_or(""))
        .push(s.feature.as_deref().unwrap_or(""))
        .push(s.session.as_deref().unwrap_or(""))
        .push(if s.estimated { "1" } else { "0" });
    super::audit::settle_fields(s, &mut args);
    Item {
        now_ms: ms(Utc::now()),
        args,
        alerts,
    }
}

/// A settle reply (the same from either script) as the caller's outcome.
fn outcome(reply: &Reply) -> Result<SettleOutcome, Error> {
    match reply.status() {
        "SETTLED" => {
            let opt = |i| match reply.str(i) {
                Ok("") => Ok(None),
                Ok(v) => v
                    .parse()
                    .map(|n| Some(Nanos(n)))
                    .map_err(|_| reply.unexpected()),
                Err(e) => Err(e),
            };
            match opt(2)? {
                Some(estimate) => Ok(SettleOutcome::ReplacedEstimate { estimate }),
                None => Ok(SettleOutcome::Settled { released: opt(1)? }),
            }
        }
        "DUPLICATE" => Ok(SettleOutcome::AlreadySettled),
        _ => Err(reply.unexpected()),
    }
}
