//! Spare holds for a lease pool: holds of one standard amount, reserved ahead for a tenant in one
//! script call, so that most of its calls need no Redis round trip before they are forwarded. The
//! enforcer's pool (enforcer/src/lease.rs) hands one to a call whose worst case fits; the call
//! then settles, or is released, under the spare hold's id as if it had reserved it itself.
//!
//! A spare hold is an ordinary hold (lua/reserve_batch.lua builds it): it counts in `held`, a settle
//! or release ends it, and one left unused past its ttl is reclaimed and committed at its amount as
//! estimated spend, like a call's abandoned hold. So a crashed enforcer over-charges its tenants by
//! the spare holds it had not handed out, never under-charges (docs/enforcer.md, "Lease pool").
//! Spare holds may be a feature's: reserved with the feature's caps beside the tenant's, they count
//! in the feature's `held` too, and a call of that feature settles under one as under its own.
//! What differs:
//! - Its caps are checked with room to spare: a spare hold is granted only while each cap keeps
//!   [`LeaseRequest::room`] free after it, so a pool never takes the last of a tenant's budget from
//!   the calls of other replicas. Near a limit the pool is refused and calls reserve one by one.
//! - Creating or releasing one writes no audit record: no call was denied, settled or released.
//!   A call that takes one is recorded by its own settle or release, under the hold's id; a spare
//!   hold committed as an estimate is recorded like any other (`kind` `estimate`).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::batch::{self, MAX_BATCH, MAX_BATCHED_VALUE, Op};
use super::keys::{validate_name, validate_opt, validate_tenant};
use super::scripts::Reply;
use super::{Cap, CapScope, Ledger, ReserveRequest, from_ms};
use crate::{Error, Nanos};

/// Spare holds to reserve for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    /// The tenant paying.
    pub tenant: String,
    /// The feature the spare holds are for (`None`: the tenant's). A feature's count in its
    /// `held` as a reservation of that feature does; its calls may take them, no other call.
    pub feature: Option<String>,
    /// The amount of each spare hold.
    pub amount: Nanos,
    /// The ids of the spare holds to reserve (1 to 64, each new): chosen by the caller, so that
    /// after a timeout it can release whichever of them Redis did create.
    pub ids: Vec<String>,
    /// How long each lives if never settled or released (then it is committed at `amount` as
    /// estimated spend): the longest call plus the time it may wait in the pool.
    pub ttl: Duration,
    /// The caps: the tenant's, and the feature's when [`LeaseRequest::feature`] names one (a
    /// spare hold carries no session).
    pub caps: Vec<Cap>,
    /// What each cap must keep free after a spare hold ([`lease_room`]).
    pub room: Nanos,
    /// Now: picks the day and month the spare holds belong to.
    pub at: DateTime<Utc>,
}

/// One spare hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Its id: the request id of the call that takes it.
    pub id: String,
    /// What it holds.
    pub amount: Nanos,
    /// When it is reclaimed if still held.
    pub expires_at: DateTime<Utc>,
    /// The end of the UTC day it was checked against: a call at or after this must not take it
    /// (its day's and month's caps were not checked).
    pub day_end: DateTime<Utc>,
}

/// The billing rule for a pool's room: each cap must keep a whole pool's worth (`pool` spare holds
/// of `amount`) free after a spare hold is granted, so the spare holds of one replica never use
/// more than about half of what a tenant has left.
#[must_use]
pub fn lease_room(pool: usize, amount: Nanos) -> Nanos {
    Nanos(
        amount
            .0
            .saturating_mul(i64::try_from(pool).unwrap_or(i64::MAX)),
    )
}

impl Ledger {
    /// Reserves spare holds under `r.ids` in one script call. Returns those granted, in order:
    /// fewer than asked (maybe none) when a cap has less than `amount + room` left.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant or feature, an amount that is not positive or too large
    /// to sum exactly in a batch, 0 or more than 64 ids or a bad one, or a cap that is neither the
    /// tenant's nor the request's feature's;
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn lease(&self, r: &LeaseRequest) -> Result<Vec<Lease>, Error> {
        validate(r)?;
        // The caps as the script checks them: the room is taken off each limit. A limit that has
        // no room at all refuses without asking Redis.
        let mut caps = Vec::with_capacity(r.caps.len());
        for cap in &r.caps {
            let limit = cap.limit.0.saturating_sub(r.room.0);
            if limit < r.amount.0 {
                return Ok(Vec::new());
            }
            caps.push(Cap {
                limit: Nanos(limit),
                ..cap.clone()
            });
        }
        let day_end = super::Period::Day.reset_at(r.at);
        let items: Vec<_> = r
            .ids
            .iter()
            .map(|id| {
                self.reserve_item(&ReserveRequest {
                    tenant: r.tenant.clone(),
                    feature: r.feature.clone(),
                    session: None,
                    request_id: id.clone(),
                    provider: String::new(),
                    model: None,
                    amount: r.amount,
                    ttl: r.ttl,
                    caps: caps.clone(),
                    at: r.at,
                    rates: Vec::new(),
                    tokens: 0,
                })
            })
            .collect();
        let mut inv = batch::batch_call(Op::Reserve, &r.tenant, items.iter(), &self.cfg);
        super::audit::tail_off(&mut inv);
        let replies = self
            .timed("lease", async {
                self.mark_active(&r.tenant, r.at).await?;
                let mut c = self.batch.thread_conn();
                Ok(inv.invoke_async::<Vec<Vec<String>>>(&mut c).await?)
            })
            .await?;
        if replies.len() != items.len() {
            return Err(Error::ScriptReply {
                script: "lease",
                detail: format!("{} replies for {} spare holds", replies.len(), items.len()),
            });
        }
        let mut granted = Vec::with_capacity(items.len());
        for (item, fields) in items.iter().zip(replies) {
            let reply = Reply::new("lease", fields);
            match reply.status() {
                "ALLOW" => granted.push(Lease {
                    id: item.args.str(0).to_owned(),
                    amount: Nanos(reply.int(1)?),
                    expires_at: from_ms(reply.int(2)?),
                    day_end,
                }),
                // Every later spare hold is refused by the same cap.
                "DENY" => break,
                _ => return Err(reply.unexpected()),
            }
        }
        Ok(granted)
    }

    /// Releases a spare hold nobody took, without an audit record. Returns its amount, or `None`
    /// when it no longer exists (a call settled it, or it was reclaimed).
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names; [`Error::Redis`] when Redis is unavailable.
    pub async fn release_lease(&self, tenant: &str, id: &str) -> Result<Option<Nanos>, Error> {
        self.release_audited(tenant, id, false).await
    }
}

fn validate(r: &LeaseRequest) -> Result<(), Error> {
    validate_tenant(&r.tenant)?;
    validate_opt("feature", r.feature.as_deref())?;
    let bad = |what: &'static str, detail: String| Err(Error::Invalid { what, detail });
    if r.amount.0 <= 0 || r.amount.0 >= MAX_BATCHED_VALUE {
        return bad(
            "lease amount",
            format!(
                "{} is not between 0 and {}",
                r.amount,
                Nanos(MAX_BATCHED_VALUE)
            ),
        );
    }
    if r.ids.is_empty() || r.ids.len() > MAX_BATCH {
        return bad(
            "lease count",
            format!("{} ids is not between 1 and {MAX_BATCH}", r.ids.len()),
        );
    }
    for id in &r.ids {
        validate_name("lease id", id)?;
    }
    if r.room.0 < 0 {
        return bad("lease room", format!("{} is negative", r.room));
    }
    let fits = |c: &Cap| match &c.scope {
        CapScope::Tenant => true,
        CapScope::Feature(f) => r.feature.as_deref() == Some(f.as_str()),
        CapScope::Session(_) => false,
    };
    if let Some(cap) = r.caps.iter().find(|c| !fits(c)) {
        return bad(
            "lease cap",
            format!(
                "{cap:?} is neither the tenant's nor the feature's ({:?}): spare holds carry no session",
                r.feature
            ),
        );
    }
    Ok(())
}
