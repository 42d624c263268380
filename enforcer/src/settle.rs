//! Phase 5 of a call, **settle**: bill the usage with the ledger's policy ([`Pricing::bill`]),
//! commit it through the durable writer (Redis, else the spool), update the metrics and write the
//! call's one log line. Every exit of an admitted call ends here: a complete response, a broken
//! stream, a client gone, an upstream failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ledger::Nanos;
use ledger::billing::{Bill, Pricing};
use ledger::durable::{DurableLedger, Written};
use ledger::store::Settlement;
use ledger::usage::Usage;

use crate::ProxyBody;
use crate::budget::Hold;
use crate::call::{Call, CallLog, Decision};
use crate::error::ProxyError;
use crate::metrics::{Metrics, SettledCall};

/// How a metered response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream finished the body.
    Complete,
    /// It broke off (client gone, upstream reset or stalled).
    Broken(&'static str),
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Broken(r) => r,
        }
    }
}

/// What a call is billed on (docs/enforcer.md, "What an admitted call is billed"): the
/// provider's usage when it sent one; otherwise never $0 once the request reached the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Basis {
    /// The provider's usage record.
    Usage,
    /// A stream broke after output was delivered: the input estimate plus the delivered output.
    Delivered,
    /// The provider may have billed anything up to the worst case: a complete response without a
    /// usage record, or a call that failed after its request was sent, before any output.
    Reservation,
    /// Nothing reached the provider, or it answered with an error status: nothing is billed.
    Release,
}

/// What a settle committed, for the response header.
#[derive(Debug, Clone, Copy)]
pub struct Billed {
    /// Cost committed (zero when released).
    pub cost: Nanos,
    /// Usage committed.
    pub usage: Usage,
}

/// Everything needed to end one admitted call, moved into its response body.
#[derive(Clone)]
pub struct Settler {
    /// The call.
    pub call: Call,
    /// What it holds.
    pub hold: Hold,
    /// The input tokens its worst case assumed (the floor of an estimate).
    pub input_estimate: u64,
    /// The token rate limit scopes it was counted in and the tokens counted there (its worst
    /// case), replaced with the real count once it ends.
    pub token_rates: (Vec<String>, u64),
    /// Turns true once the request was handed to the upstream connection.
    pub sent: Arc<AtomicBool>,
    /// The billing policy.
    pub pricing: Arc<Pricing>,
    /// Where usage is written.
    pub durable: DurableLedger,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Tracks settles spawned after the response, so shutdown can wait for them.
    pub tracker: tokio_util::task::TaskTracker,
    /// When the provider keeps the result as an object (a stored response or completion): the
    /// API, how long to remember its creator, and (once the response named it) its id.
    pub stored: Option<StoredObject>,
}

/// A provider-stored result whose creator the ledger remembers, so only that tenant reads it.
#[derive(Clone, Debug)]
pub struct StoredObject {
    /// The API that created it.
    pub api: ledger::provider::Api,
    /// How long to remember it.
    pub ttl: std::time::Duration,
    /// Its id, once read from the response.
    pub id: Option<String>,
}

impl Settler {
    /// Reads the stored object's id from the response's first bytes (a JSON body, or the first
    /// event of a stream).
    pub fn note_object(&mut self, head: &[u8]) {
        if let Some(o) = &mut self.stored
            && o.id.is_none()
        {
            o.id = ledger::usage::object_id(o.api, head);
        }
    }

    /// Remembers the tenant as the object's creator (not in the spool: a lost record only
    /// means the tenant cannot read the object back through the enforcer).
    async fn remember_object(&self) {
        let Some(StoredObject {
            id: Some(id), ttl, ..
        }) = &self.stored
        else {
            return;
        };
        if let Err(e) = self
            .durable
            .ledger()
            .remember_object(&self.call.tenant, id, *ttl)
            .await
        {
            tracing::warn!(request_id = %self.call.request_id, error = %e,
                "could not remember the stored object's tenant; reads of it will be refused");
        }
    }

    fn basis(&self, usage: Option<&Usage>, outcome: Outcome, delivered: bool) -> Basis {
        if usage.is_some_and(|u| !u.estimated) {
            return Basis::Usage;
        }
        match outcome {
            Outcome::Complete => Basis::Reservation,
            Outcome::Broken(_) if delivered => Basis::Delivered,
            Outcome::Broken(_) if self.sent.load(Ordering::Acquire) => Basis::Reservation,
            Outcome::Broken(_) => Basis::Release,
        }
    }

    /// Bills a response on `basis`.
    fn bill(&self, response_model: Option<&str>, usage: Option<Usage>, basis: Basis) -> Bill {
        let mut bill = self.pricing.bill(
            Some(&self.call.model),
            response_model,
            usage,
            self.input_estimate,
        );
        if basis == Basis::Reservation && bill.cost < self.hold.amount() {
            bill.cost = self.hold.amount();
            bill.usage.estimated = true;
        }
        bill
    }

    /// Settles a complete response in a tracked task and returns what it bills, computed now,
    /// so the response need not wait for Redis.
    pub fn settle_in_background(
        self,
        response_model: Option<String>,
        usage: Option<Usage>,
    ) -> Billed {
        let basis = self.basis(usage.as_ref(), Outcome::Complete, true);
        let bill = self.bill(response_model.as_deref(), usage, basis);
        let billed = Billed {
            cost: bill.cost,
            usage: bill.usage,
        };
        // The task commits this same bill: it is not priced twice.
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let tracker = self.tracker.clone();
            let outcome = Outcome::Complete.as_str();
            tracker.spawn_on(
                async move {
                    self.end_billed(bill, basis, Decision::Settled, outcome, 200, None)
                        .await
                },
                &h,
            );
        }
        billed
    }

    /// Ends the call on the basis its usage, outcome and delivery give.
    pub async fn settle(
        self,
        response_model: Option<String>,
        usage: Option<Usage>,
        outcome: Outcome,
        delivered: bool,
    ) -> Billed {
        let basis = self.basis(usage.as_ref(), outcome, delivered);
        let decision = if basis == Basis::Release {
            Decision::Released
        } else {
            Decision::Settled
        };
        self.end(
            response_model,
            usage,
            basis,
            decision,
            outcome.as_str(),
            200,
            None,
        )
        .await
    }

    /// Settles in a new task (from Drop or poll: never blocks the caller).
    pub fn spawn_settle(
        self,
        response_model: Option<String>,
        usage: Option<Usage>,
        outcome: Outcome,
        delivered: bool,
    ) {
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let tracker = self.tracker.clone();
            tracker.spawn_on(self.settle(response_model, usage, outcome, delivered), &h);
        }
    }

    /// The provider answered with an error status: nothing is billed, its body goes back as is.
    pub async fn refused_upstream(self, status: http::StatusCode) {
        let reason = "upstream error status";
        self.end(
            None,
            None,
            Basis::Release,
            Decision::Released,
            reason,
            status.as_u16(),
            None,
        )
        .await;
    }

    /// Ends a call that failed after its hold was taken (the upstream unreachable, timed out,
    /// reset, or its body failed): released when the request never left, else settled at the
    /// reservation; counted, logged and rendered.
    pub async fn fail(self, err: ProxyError) -> http::Response<ProxyBody> {
        self.metrics.decision(&self.call.provider, "error");
        let basis = self.basis(None, Outcome::Broken(err.code()), false);
        let (kind, rid) = (self.call.kind, self.call.request_id.clone());
        let (code, status, msg) = (err.code(), err.status().as_u16(), err.to_string());
        self.end(None, None, basis, Decision::Error, code, status, Some(msg))
            .await;
        err.into_response(kind, &rid)
    }

    /// The call was dropped before its response head (the client went away): the same rule as
    /// a failure, in a tracked task.
    pub fn abandon(self) {
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let tracker = self.tracker.clone();
            let reason = "client gone before the response";
            tracker.spawn_on(
                async move {
                    let basis = self.basis(None, Outcome::Broken(reason), false);
                    let decision = if basis == Basis::Release {
                        Decision::Released
                    } else {
                        Decision::Settled
                    };
                    self.end(None, None, basis, decision, reason, 499, None)
                        .await;
                },
                &h,
            );
        }
    }

    /// Commits (or releases), counts and logs once.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call's whole ending, used by four callers"
    )]
    async fn end(
        &self,
        response_model: Option<String>,
        usage: Option<Usage>,
        basis: Basis,
        decision: Decision,
        outcome: &'static str,
        status: u16,
        message: Option<String>,
    ) -> Billed {
        if basis == Basis::Release {
            self.correct_token_rates(0);
            self.release_hold().await;
            let mut log = self.log(decision, outcome, status);
            log.message = message;
            log.write();
            return Billed {
                cost: Nanos::ZERO,
                usage: Usage::default(),
            };
        }
        let bill = self.bill(response_model.as_deref(), usage, basis);
        self.end_billed(bill, basis, decision, outcome, status, message)
            .await
    }

    /// [`Settler::end`] of a call billed `bill` on `basis` (not a release).
    async fn end_billed(
        &self,
        bill: Bill,
        basis: Basis,
        decision: Decision,
        outcome: &'static str,
        status: u16,
        message: Option<String>,
    ) -> Billed {
        if basis != Basis::Usage {
            self.metrics.estimated_settlements.inc();
        }
        if !bill.priced {
            self.announce_price_gap(&bill.model);
        }
        self.check_over_reservation(&bill);
        self.correct_token_rates(
            bill.usage
                .prompt_tokens()
                .saturating_add(bill.usage.output_tokens),
        );
        self.commit(&bill, outcome).await;
        self.remember_object().await;
        self.metrics.settled(&SettledCall {
            tenant: &self.call.tenant,
            provider: &self.call.provider,
            model: &bill.model,
            api: self.call.api,
            input: bill.usage.prompt_tokens(),
            output: bill.usage.output_tokens,
            nanos: bill.cost.0,
            secs: self.call.start.elapsed().as_secs_f64(),
        });
        let mut log = self.log(decision, outcome, status);
        log.model = Some(&bill.model);
        log.usage = bill.usage;
        log.cost = bill.cost;
        log.message = message;
        log.write();
        Billed {
            cost: bill.cost,
            usage: bill.usage,
        }
    }

    /// Announces a model without a price (once per provider, model and day across every
    /// process: the ledger dedupes), in a tracked task; a failure is retried with the next call.
    fn announce_price_gap(&self, model: &str) {
        let ledger = self.durable.ledger().clone();
        let gap = ledger::store::PriceGap {
            path: "enforcer".into(),
            provider: self.call.provider.clone(),
            model: model.to_owned(),
            tenant: self.call.tenant.clone(),
            service: String::new(),
            at: chrono::Utc::now(),
        };
        self.tracker.spawn(async move {
            if let Err(e) = ledger.price_gap(&gap).await {
                tracing::debug!(error = %e, "price gap not announced; retried with the next call");
            }
        });
    }

    /// Puts the call's real token count (`real`) in place of its worst case in the token rate
    /// windows it was counted in, in a tracked task (a failure only leaves the window at the
    /// worst case: stricter, never looser).
    fn correct_token_rates(&self, real: u64) {
        let (scopes, counted) = &self.token_rates;
        if scopes.is_empty() || real == *counted {
            return;
        }
        let delta = i64::try_from(real)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(*counted).unwrap_or(i64::MAX));
        let ledger = self.durable.ledger().clone();
        let (tenant, scopes, at) = (
            self.call.tenant.clone(),
            scopes.clone(),
            self.call.started_at,
        );
        self.tracker.spawn(async move {
            if let Err(e) = ledger.correct_rate_tokens(&tenant, &scopes, at, delta).await {
                tracing::warn!(error = %e, "token rate window not corrected; it counts the worst case until it moves on");
            }
        });
    }

    /// A settle above its reservation means the worst case was not one: counted and logged so
    /// the gap is visible (the ledger still commits the real cost).
    fn check_over_reservation(&self, bill: &Bill) {
        let held = self.hold.amount();
        if bill.cost > held {
            let over = bill.cost.0 - held.0;
            self.metrics
                .over_reservation
                .inc_by(u64::try_from(over).unwrap_or(0));
            tracing::warn!(request_id = %self.call.request_id, model = %bill.model,
                cost_usd = %crate::usd_string(bill.cost), reserved_usd = %crate::usd_string(held),
                "settle above its reservation: the worst case under-reserved this call");
        }
    }

    /// A log line of this call with its hold.
    fn log(&self, decision: Decision, outcome: &'static str, status: u16) -> CallLog<'_> {
        let mut l = CallLog::new(&self.call, decision, outcome, status);
        l.reserved = self.hold.amount();
        l
    }

    async fn release_hold(&self) {
        if let Hold::Reserved(_) = self.hold {
            let w = self
                .durable
                .release_or_spool(&self.call.tenant, &self.call.request_id)
                .await;
            self.count(w, "release");
        }
    }

    async fn commit(&self, bill: &Bill, outcome: &'static str) {
        // The audit record (docs/audit.md): "ok" for a complete call, "cut" for one that broke off.
        let meta = ledger::store::CallMeta {
            provider: Some(self.call.provider.clone()),
            api: (!self.call.api.is_empty()).then(|| self.call.api.to_owned()),
            outcome: Some(if outcome == "complete" { "ok" } else { "cut" }.to_owned()),
            latency_ms: u64::try_from(self.call.start.elapsed().as_millis()).ok(),
            ..ledger::store::CallMeta::default()
        };
        let s = Settlement {
            tenant: self.call.tenant.clone(),
            request_id: self.call.request_id.clone(),
            feature: self.call.feature.clone(),
            session: self.call.session.clone(),
            model: Some(bill.model.clone()),
            cost: bill.cost,
            tokens: bill.tokens(),
            estimated: bill.estimated(),
            started_at: self.call.started_at,
            meta,
        };
        let w = match self.hold {
            Hold::Reserved(_) => self.durable.settle_or_spool(&s).await,
            Hold::Unreserved(_) => self.durable.spool_settlement(&s).await,
        };
        self.count(w, "settle");
    }

    /// Counts and logs where a write ended.
    fn count(&self, w: Written, what: &'static str) {
        let rid = &self.call.request_id;
        match w {
            Written::Committed | Written::Duplicate => {}
            Written::Spooled { cause } => {
                if let Some(e) = &cause {
                    self.metrics.ledger_errors.inc();
                    tracing::warn!(request_id = %rid, error = %e, "{what} failed");
                }
                self.metrics.spooled.inc();
                tracing::info!(request_id = %rid, spool = %self.durable.spool().dir().display(), "usage spooled until Redis answers");
            }
            Written::Refused(e) => {
                self.metrics.ledger_errors.inc();
                tracing::error!(request_id = %rid, error = %e, "{what} refused as invalid; nothing was written");
            }
            Written::Lost { cause, spool } => {
                if cause.is_some() {
                    self.metrics.ledger_errors.inc();
                }
                self.metrics.spool_refused.inc();
                tracing::error!(request_id = %rid, error = ?cause.map(|e| e.to_string()), spool_error = %spool,
                    "usage could not be spooled; it is lost unless the hold's ttl estimate covers it");
            }
        }
    }
}
