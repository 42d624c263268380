//! Phase 5 of a call, **settle**: bill the usage with the ledger's policy ([`Pricing::bill`]),
//! commit it through the durable writer (Redis, else the spool), update the metrics and write the
//! call's one log line. Every exit of an admitted call ends here: a complete response, a broken
//! stream, a client gone, an upstream failure.

use std::sync::Arc;

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
    /// The billing policy.
    pub pricing: Arc<Pricing>,
    /// Where usage is written.
    pub durable: DurableLedger,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Tracks settles spawned after the response, so shutdown can wait for them.
    pub tracker: tokio_util::task::TaskTracker,
}

impl Settler {
    /// Bills a response with `usage` (or an estimate without one).
    fn bill(&self, response_model: Option<&str>, usage: Option<Usage>) -> Bill {
        self.pricing.bill(
            Some(&self.call.model),
            response_model,
            usage,
            self.input_estimate,
        )
    }

    /// Settles a complete response in a tracked task and returns what it bills, computed now,
    /// so the response need not wait for Redis.
    pub fn settle_in_background(
        self,
        response_model: Option<String>,
        usage: Option<Usage>,
    ) -> Billed {
        let bill = self.bill(response_model.as_deref(), usage);
        let billed = Billed {
            cost: bill.cost,
            usage: bill.usage,
        };
        self.spawn_settle(response_model, usage, Outcome::Complete, true);
        billed
    }

    /// Ends the call: with usage, or with output delivered, it is billed (an estimate when the
    /// response carried no usage record); otherwise its hold is released.
    pub async fn settle(
        self,
        response_model: Option<String>,
        usage: Option<Usage>,
        outcome: Outcome,
        delivered: bool,
    ) -> Billed {
        if usage.is_none() && !delivered {
            self.release_hold().await;
            let log = self.log(Decision::Released, outcome.as_str(), 200);
            log.write();
            return Billed {
                cost: Nanos::ZERO,
                usage: Usage::default(),
            };
        }
        let bill = self.bill(response_model.as_deref(), usage);
        if outcome != Outcome::Complete && bill.usage.estimated {
            self.metrics.estimated_settlements.inc();
        }
        self.commit(&bill).await;
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
        let mut log = self.log(Decision::Settled, outcome.as_str(), 200);
        log.model = Some(&bill.model);
        log.usage = bill.usage;
        log.cost = bill.cost;
        log.write();
        Billed {
            cost: bill.cost,
            usage: bill.usage,
        }
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
        self.release_hold().await;
        self.log(Decision::Released, "upstream error status", status.as_u16())
            .write();
    }

    /// Ends a call that failed after its hold was taken (the upstream unreachable, timed out,
    /// or its body failed): releases the hold, counts and logs the error, and renders it.
    pub async fn fail(self, err: ProxyError) -> http::Response<ProxyBody> {
        self.release_hold().await;
        self.metrics.decision(&self.call.provider, "error");
        let mut log = self.log(Decision::Error, err.code(), err.status().as_u16());
        log.message = Some(err.to_string());
        log.write();
        err.into_response(self.call.kind, &self.call.request_id)
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

    async fn commit(&self, bill: &Bill) {
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
            Written::Committed => {}
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
