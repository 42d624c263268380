//! [`Ledger::reserve`]: names and caps are checked in Rust, then the request joins its tenant's
//! group commit (batch.rs, lua/reserve_batch.lua), or takes the single script (lua/reserve.lua)
//! when its amount is too large to sum exactly in Lua or its period hashes are already expiring.

use super::batch::{self, Item, MAX_BATCHED_VALUE, Op};
use super::keys::{validate_name, validate_opt, validate_tenant};
use super::scripts::{Args, Reply};
use super::{
    CapScope, Denial, Ledger, Period, RateDenial, Reservation, ReserveOutcome, ReserveRequest,
    duration_ms, from_ms, ms,
};
use crate::{Error, Nanos};

impl Ledger {
    /// Holds the worst-case cost of a call until its real usage is known, so concurrent calls
    /// cannot overspend: atomically checks every cap in `r.caps` against committed + held + amount.
    /// A retry with the same request id returns the same reservation.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names, a negative amount, a cap naming another feature or session,
    /// or a request id that was already settled; [`Error::Redis`] when Redis is unavailable.
    pub async fn reserve(&self, r: &ReserveRequest) -> Result<ReserveOutcome, Error> {
        validate(r)?;
        let reply = self
            .timed("reserve", async {
                self.mark_active(&r.tenant, r.at).await?;
                self.mark_audit_day(&r.tenant, chrono::Utc::now()).await?;
                let mut item = self.reserve_item(r);
                item.alerts = self.alert_caps(&r.tenant, None).await;
                let fields = if self.cfg.group_commit
                    && r.amount.0 < MAX_BATCHED_VALUE
                    && batch::live_period(r.at)
                {
                    self.batch.submit(Op::Reserve, &r.tenant, item).await?
                } else {
                    let mut c = self.batch.thread_conn();
                    batch::single(Op::Reserve, &r.tenant, &item, &self.cfg)
                        .invoke_async(&mut c)
                        .await?
                };
                Ok(Reply::new("reserve", fields))
            })
            .await?;
        outcome(r, &reply)
    }

    /// The request's part of lua/reserve_batch.lua's arguments.
    pub(super) fn reserve_item(&self, r: &ReserveRequest) -> Item {
        let at = r.at;
        let mut args = Args::with_capacity(
            256 + 48 * (r.caps.len() + r.rates.len()),
            24 + 3 * (r.caps.len() + r.rates.len()),
        );
        args.push(&r.request_id)
            .push(ms(at))
            .push(r.amount.0)
            .push(duration_ms(r.ttl))
            .push_fmt(Period::Day.id_of(at))
            .push_fmt(Period::Month.id_of(at))
            .push(Period::Day.expire_at(at).timestamp())
            .push(Period::Month.expire_at(at).timestamp())
            .push(r.feature.as_deref().unwrap_or(""))
            .push(r.session.as_deref().unwrap_or(""))
            .push(r.model.as_deref().unwrap_or(""))
            .push(self.instance.as_deref().unwrap_or(""))
            .push(r.caps.len());
        for cap in &r.caps {
            let (kind, period, limit) = cap_args(cap);
            args.push(kind).push(period).push(limit);
        }
        args.push(r.rates.len());
        for rl in &r.rates {
            args.push(&rl.scope).push(rl.rpm).push(rl.tpm);
        }
        args.push(r.tokens);
        super::audit::deny_fields(r, &mut args);
        Item {
            now_ms: ms(at),
            args,
            alerts: std::sync::Arc::default(),
        }
    }
}

/// Names, amount and caps, checked before anything is sent.
fn validate(r: &ReserveRequest) -> Result<(), Error> {
    validate_tenant(&r.tenant)?;
    validate_name("request_id", &r.request_id)?;
    validate_opt("feature", r.feature.as_deref())?;
    validate_opt("session", r.session.as_deref())?;
    validate_opt("model", r.model.as_deref())?;
    if r.amount.0 < 0 {
        return Err(Error::Invalid {
            what: "reserve amount",
            detail: format!("{} is negative", r.amount),
        });
    }
    for rl in &r.rates {
        validate_name("rate limit scope", &rl.scope)?;
    }
    for cap in &r.caps {
        let ok = match &cap.scope {
            CapScope::Tenant => true,
            CapScope::Feature(f) => r.feature.as_deref() == Some(f.as_str()),
            CapScope::Session(s) => r.session.as_deref() == Some(s.as_str()),
        };
        if !ok {
            return Err(Error::Invalid {
                what: "cap",
                detail: format!("{cap:?} does not match the request's feature/session"),
            });
        }
    }
    Ok(())
}

/// A cap as the scripts take it: kind (`t` / `f` / `s`), period (`d` / `m`), limit.
fn cap_args(cap: &super::Cap) -> (&'static str, &'static str, String) {
    let kind = match cap.scope {
        CapScope::Tenant => "t",
        CapScope::Feature(_) => "f",
        CapScope::Session(_) => "s",
    };
    (kind, cap.period.letter(), cap.limit.0.to_string())
}

/// A reserve reply (the same from either script) as the caller's outcome.
fn outcome(r: &ReserveRequest, reply: &Reply) -> Result<ReserveOutcome, Error> {
    match reply.status() {
        "ALLOW" => Ok(ReserveOutcome::Allowed(Reservation {
            id: r.request_id.clone(),
            tenant: r.tenant.clone(),
            amount: Nanos(reply.int(1)?),
            expires_at: from_ms(reply.int(2)?),
            existing: reply.str(3)? == "existing",
        })),
        "RATE" => {
            let idx = usize::try_from(reply.int(1)?).map_err(|_| reply.unexpected())?;
            let rl = r
                .rates
                .get(idx.wrapping_sub(1))
                .ok_or_else(|| reply.unexpected())?;
            let num = |i| u64::try_from(reply.int(i)?).map_err(|_| reply.unexpected());
            Ok(ReserveOutcome::RateLimited(RateDenial {
                tenant: r.tenant.clone(),
                scope: rl.scope.clone(),
                tokens: reply.str(2)? == "t",
                used: num(3)?,
                limit: num(4)?,
                retry_after_secs: num(5)?.max(1),
            }))
        }
        "DENY" => {
            let idx = usize::try_from(reply.int(1)?).map_err(|_| reply.unexpected())?;
            let cap = r
                .caps
                .get(idx.wrapping_sub(1))
                .ok_or_else(|| reply.unexpected())?
                .clone();
            let reset_at = match cap.scope {
                CapScope::Session(_) => None,
                _ => Some(cap.period.reset_at(r.at)),
            };
            Ok(ReserveOutcome::Denied(Denial {
                tenant: r.tenant.clone(),
                limit: cap.limit,
                cap,
                spent: Nanos(reply.int(2)?),
                held: Nanos(reply.int(3)?),
                requested: r.amount,
                reset_at,
            }))
        }
        "SETTLED" => Err(Error::Invalid {
            what: "request_id",
            detail: format!(
                "{} was already settled; every call needs a fresh request id",
                r.request_id
            ),
        }),
        _ => Err(reply.unexpected()),
    }
}
