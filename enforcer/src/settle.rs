//! Pricing and settling: turns a call's usage into integer nano-USD with the ledger's price table
//! (or the configured default price for unknown models, never $0), then settles or releases its
//! reservation, updates the metrics and writes the one log line of the call.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use ledger::Nanos;
use ledger::money::AttoUsd;
use ledger::price::{Cost, PriceTable};
use ledger::spool::SpoolEntry;
use ledger::store::{Ledger, Settlement, TokenCounts};
use ledger::usage::Usage;

use crate::config::{Config, DefaultPrice, UnknownModel};
use crate::error::ProxyError;
use crate::metrics::Metrics;

/// The price table plus the unknown-model policy.
pub struct Pricing {
    table: PriceTable,
    unknown: UnknownModel,
    default_in: AttoUsd,
    default_out: AttoUsd,
    default_max_output: u64,
}

fn per_token(usd_per_mtok: f64) -> AttoUsd {
    // USD per million tokens -> atto-USD per token = usd * 1e12, through its decimal form.
    AttoUsd::from_decimal_str(&format!("{usd_per_mtok}e-6")).unwrap_or(AttoUsd(1))
}

impl Pricing {
    /// Builds the table: built-in prices, then `prices_file` over them.
    ///
    /// # Errors
    /// When the prices file cannot be loaded.
    pub fn from_config(cfg: &Config) -> Result<Pricing, String> {
        let mut table = PriceTable::builtin();
        if let Some(p) = &cfg.prices_file {
            table
                .load_litellm_file(p)
                .map_err(|e| format!("prices_file: {e}"))?;
        }
        Ok(Pricing::new(
            table,
            cfg.unknown_model,
            &cfg.unknown_model_price,
        ))
    }

    /// From parts.
    #[must_use]
    pub fn new(table: PriceTable, unknown: UnknownModel, d: &DefaultPrice) -> Pricing {
        Pricing {
            table,
            unknown,
            default_in: per_token(d.input_usd_per_mtok),
            default_out: per_token(d.output_usd_per_mtok),
            default_max_output: d.max_output_tokens,
        }
    }

    /// Whether the table prices `model`.
    #[must_use]
    pub fn knows(&self, model: &str) -> bool {
        self.table.lookup(model).is_some()
    }

    /// The model's output limit from the table.
    #[must_use]
    pub fn max_output_tokens(&self, model: &str) -> Option<u64> {
        match self.table.lookup(model) {
            Some((_, p)) => p.max_output_tokens,
            None => Some(self.default_max_output),
        }
    }

    /// The worst case of a call.
    ///
    /// # Errors
    /// [`ProxyError::UnknownModel`] when the model has no price and unknown_model = "deny".
    pub fn max_cost(&self, model: &str, input: u64, output: u64) -> Result<Nanos, ProxyError> {
        match self.table.max_cost(model, input, output) {
            Cost::Priced { nanos, .. } => Ok(nanos),
            Cost::Unpriced { .. } if self.unknown == UnknownModel::Allow => Ok(Nanos(
                self.default_in
                    .times(input)
                    .plus(self.default_out.times(output))
                    .ceil_nanos(),
            )),
            Cost::Unpriced { .. } => Err(ProxyError::UnknownModel {
                model: model.to_owned(),
            }),
        }
    }

    /// The real cost of `usage`; unknown models at the default price (admission already enforced the policy).
    #[must_use]
    pub fn cost(&self, model: &str, usage: &Usage) -> Nanos {
        match self.table.cost(model, usage) {
            Cost::Priced { nanos, .. } => nanos,
            Cost::Unpriced { .. } => Nanos(
                self.default_in
                    .times(usage.prompt_tokens())
                    .plus(self.default_out.times(usage.output_tokens))
                    .ceil_nanos(),
            ),
        }
    }
}

/// Release reason that suppresses the settle log line (the error response logs the call).
const QUIET_RELEASE: &str = "quiet";

/// How a metered response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream finished the body.
    Complete,
    /// It broke off (client gone, upstream reset or stalled).
    Broken(&'static str),
}

/// Everything needed to settle one call, moved into the response body.
#[derive(Clone)]
pub struct Settler {
    /// None when the call was admitted without a reservation (Redis unavailable, "allow").
    pub ledger: Option<Ledger>,
    /// Prices.
    pub pricing: Arc<Pricing>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Tenant.
    pub tenant: String,
    /// Feature.
    pub feature: Option<String>,
    /// Session.
    pub session: Option<String>,
    /// Request id (= reservation id).
    pub request_id: String,
    /// Provider name.
    pub provider: String,
    /// API name for the operation label.
    pub api: &'static str,
    /// The model the request named (or the path's).
    pub model: String,
    /// The request's input token estimate (margin included).
    pub input_estimate: u64,
    /// When the call started.
    pub started_at: DateTime<Utc>,
    /// Monotonic start.
    pub start: Instant,
    /// The reserved amount.
    pub reserved: Nanos,
    /// Where usage goes when Redis cannot take it.
    pub spool: ledger::spool::Spool,
    /// Tracks settles spawned after the response, so shutdown can wait for them.
    pub tracker: tokio_util::task::TaskTracker,
}

/// What a settle did, for the response header and the log.
#[derive(Debug, Clone, Copy)]
pub struct Billed {
    /// Cost committed (zero when released).
    pub cost: Nanos,
    /// Usage committed.
    pub usage: Usage,
}

impl Settler {
    /// The model to price with: the response's when the table knows it, else the request's.
    fn pricing_model(&self, response_model: Option<&str>) -> String {
        match response_model {
            Some(m) if self.pricing.knows(m) => m.to_owned(),
            _ => self.model.clone(),
        }
    }

    /// The model priced, the usage committed (an estimate when the response had none) and its
    /// cost: what [`Settler::settle`] commits for a call that produced output.
    fn priced(&self, response_model: Option<&str>, usage: Option<Usage>) -> (String, Usage, Nanos) {
        let mut usage = usage.unwrap_or(Usage {
            estimated: true,
            ..Usage::default()
        });
        if usage.estimated {
            usage.input_tokens = usage.input_tokens.max(self.input_estimate);
        }
        let model = self.pricing_model(response_model);
        let cost = self.pricing.cost(&model, &usage);
        (model, usage, cost)
    }

    /// Settles a complete response in a tracked task and returns what it bills, computed now,
    /// so the response need not wait for Redis.
    pub fn settle_in_background(
        self,
        response_model: Option<String>,
        usage: Option<Usage>,
    ) -> Billed {
        let (_, billed_usage, cost) = self.priced(response_model.as_deref(), usage);
        self.spawn_settle(response_model, usage, Outcome::Complete, true);
        Billed {
            cost,
            usage: billed_usage,
        }
    }

    /// Settles (or releases) and logs; returns what was billed.
    pub async fn settle(
        self,
        response_model: Option<String>,
        usage: Option<Usage>,
        outcome: Outcome,
        delivered: bool,
    ) -> Billed {
        let reason = match outcome {
            Outcome::Complete => "complete",
            Outcome::Broken(r) => r,
        };
        if usage.is_none() && !delivered {
            // Nothing reached the client and no usage record: release the hold.
            if let Some(l) = &self.ledger
                && let Err(e) = l.release(&self.tenant, &self.request_id).await
            {
                self.metrics.ledger_errors.inc();
                tracing::warn!(request_id = %self.request_id, error = %e, "release failed");
                if crate::recovery::should_spool(&e) {
                    let entry = SpoolEntry::Release {
                        tenant: self.tenant.clone(),
                        request_id: self.request_id.clone(),
                    };
                    crate::recovery::spool(&self.spool, &self.metrics, entry, &self.request_id)
                        .await;
                }
            }
            if reason != QUIET_RELEASE {
                self.log("released", reason, None, Nanos::ZERO, &Usage::default());
            }
            return Billed {
                cost: Nanos::ZERO,
                usage: Usage::default(),
            };
        }
        let (model, usage, cost) = self.priced(response_model.as_deref(), usage);
        if outcome != Outcome::Complete && usage.estimated {
            self.metrics.estimated_settlements.inc();
        }
        {
            let s = Settlement {
                tenant: self.tenant.clone(),
                request_id: self.request_id.clone(),
                feature: self.feature.clone(),
                session: self.session.clone(),
                model: Some(model.clone()),
                cost,
                tokens: TokenCounts {
                    input: usage.input_tokens,
                    output: usage.output_tokens,
                    cache_read: usage.cache_read_tokens,
                    cache_write: usage.cache_write_5m_tokens + usage.cache_write_1h_tokens,
                },
                estimated: usage.estimated,
                started_at: self.started_at,
            };
            // No reservation (admitted while Redis was unreachable): straight to the spool.
            let res = match &self.ledger {
                Some(l) => l.settle(&s).await.map(|_| ()),
                None => Err(ledger::Error::Spool {
                    path: String::new(),
                    detail: "admitted without a reservation".into(),
                }),
            };
            if let Err(e) = res {
                if self.ledger.is_some() {
                    self.metrics.ledger_errors.inc();
                    tracing::warn!(request_id = %self.request_id, error = %e, "settle failed");
                }
                if crate::recovery::should_spool(&e) {
                    let rid = self.request_id.clone();
                    crate::recovery::spool(&self.spool, &self.metrics, SpoolEntry::Settle(s), &rid)
                        .await;
                }
            }
        }
        let secs = self.start.elapsed().as_secs_f64();
        self.metrics.settled(&crate::metrics::SettledCall {
            tenant: &self.tenant,
            provider: &self.provider,
            model: &model,
            api: self.api,
            input: usage.prompt_tokens(),
            output: usage.output_tokens,
            nanos: cost.0,
            secs,
        });
        self.log("settled", reason, Some(&model), cost, &usage);
        Billed { cost, usage }
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

    /// Releases the hold of a call that produced nothing (upstream error before output). With
    /// `log = false` the caller writes the call's log line itself (it ends in an error response).
    pub async fn release(self, reason: &'static str, log: bool) {
        let reason = if log { reason } else { QUIET_RELEASE };
        self.settle(None, None, Outcome::Broken(reason), false)
            .await;
    }

    fn log(&self, decision: &str, outcome: &str, model: Option<&str>, cost: Nanos, u: &Usage) {
        tracing::info!(
            target: "llmwarden::request",
            request_id = %self.request_id,
            tenant = %self.tenant,
            feature = self.feature.as_deref().unwrap_or(""),
            session = self.session.as_deref().unwrap_or(""),
            provider = %self.provider,
            model = model.unwrap_or(&self.model),
            input_tokens = u.prompt_tokens(),
            output_tokens = u.output_tokens,
            estimated = u.estimated,
            cost_usd = %crate::usd_string(cost),
            reserved_usd = %crate::usd_string(self.reserved),
            latency_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX),
            decision,
            outcome,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_models_follow_the_policy_and_are_never_free() {
        let d = DefaultPrice::default();
        let deny = Pricing::new(PriceTable::builtin(), UnknownModel::Deny, &d);
        assert!(matches!(
            deny.max_cost("no-such-model", 10, 10),
            Err(ProxyError::UnknownModel { .. })
        ));
        let allow = Pricing::new(PriceTable::builtin(), UnknownModel::Allow, &d);
        // 1000 x $15/M + 100 x $75/M = $0.0225.
        assert_eq!(
            allow.max_cost("no-such-model", 1000, 100).unwrap(),
            Nanos(22_500_000)
        );
        let u = Usage {
            input_tokens: 1000,
            output_tokens: 100,
            ..Usage::default()
        };
        assert_eq!(allow.cost("no-such-model", &u), Nanos(22_500_000));
        assert_eq!(allow.max_output_tokens("no-such-model"), Some(32_768));
        assert!(allow.knows("gpt-4o-mini"));
        assert_eq!(per_token(0.15), AttoUsd(150_000_000_000));
    }
}
