//! Where observed calls go: billed with the ledger's policy (the same [`Pricing::bill`] the
//! enforcer settles with), attributed, then either recorded in the shared Redis ledger as bypass
//! spend through the ledger's durable writer (Redis, else the spool) or printed as JSON lines
//! (`observer sniff`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use ledger::billing::Pricing;
use ledger::durable::{DurableLedger, Written};
use ledger::spool::{Replayer, ReplayerConfig, Spool, SpoolConfig};
use ledger::store::{BypassEvent, Ledger, LedgerConfig, TokenCounts, UsageRecord};
use serde::Serialize;

use crate::attribution::{Attribution, ProcessInfo};
use crate::exchange::ObservedCall;
use crate::metrics::{CallLabels, CostLabels, Metrics};

/// A call ready to be written: who, what, how much. Metadata only, never bodies.
#[derive(Debug, Clone, Serialize)]
pub struct CallRecord {
    /// Unique per call: boot id, pid, SSL*, kernel timestamp.
    pub event_id: String,
    /// Provider name ("openai", or the configured name).
    pub provider: String,
    /// API ("chat.completions", ...).
    pub api: String,
    /// Model billed: the table's canonical id when priced, else the name seen.
    pub model: Option<String>,
    /// Plain input tokens.
    pub input_tokens: u64,
    /// Output tokens (reasoning included).
    pub output_tokens: u64,
    /// Cached input read.
    pub cache_read_tokens: u64,
    /// Cache writes (5 m + 1 h).
    pub cache_write_tokens: u64,
    /// Cost in nano-USD: the model's price, or `unknown_model_price` for a model the table
    /// does not know (then `priced` is false): never a silent $0.
    pub cost_nusd: i64,
    /// Whether the model has a price (false: a price gap, billed at the default price).
    pub priced: bool,
    /// Whether the cost is an estimate (no provider usage record, or no price).
    pub estimated: bool,
    /// Whether the response was streamed.
    pub stream: bool,
    /// Process id.
    pub pid: u32,
    /// Process name.
    pub comm: String,
    /// Service.
    pub service: String,
    /// Tenant charged.
    pub tenant: String,
    /// Feature (X-Feature-Name), if any.
    pub feature: Option<String>,
    /// On an HTTP/2 connection joined mid-way: what was guessed (`nothing`, `api`,
    /// `api_no_request`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joined_midway: Option<&'static str>,
}

/// Per-call sanity bounds: usage beyond them is no real call (a fake provider, a corrupt body)
/// and is refused before the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordCaps {
    /// Most tokens (input + output + cache read + cache write) one call may report.
    pub max_tokens: u64,
    /// Most one call may cost.
    pub max_cost: ledger::Nanos,
}

/// The metric label of a model: the price table's id for a priced model, "unpriced" for every
/// other name (any process can send any model name; labels must stay bounded).
pub const UNPRICED_MODEL_LABEL: &str = "unpriced";

impl CallRecord {
    /// Why the record is beyond `caps` ("tokens" or "cost"), or `None` when it is within them.
    #[must_use]
    pub fn over_caps(&self, caps: &RecordCaps) -> Option<&'static str> {
        let tokens = self
            .input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_read_tokens)
            .saturating_add(self.cache_write_tokens);
        if tokens > caps.max_tokens {
            Some("tokens")
        } else if self.cost_nusd > caps.max_cost.get() {
            Some("cost")
        } else {
            None
        }
    }

    /// The model's metric label (bounded: see [`UNPRICED_MODEL_LABEL`]).
    #[must_use]
    pub fn model_label(&self) -> String {
        match (&self.model, self.priced) {
            (Some(m), true) => m.clone(),
            _ => UNPRICED_MODEL_LABEL.to_owned(),
        }
    }

    /// Bills and attributes an observed call.
    pub fn new(
        call: &ObservedCall,
        event_id: String,
        proc: &ProcessInfo,
        who: Attribution,
        pricing: &Pricing,
    ) -> CallRecord {
        let bill = pricing.bill(None, call.model.as_deref(), call.usage, 0);
        let tokens = bill.tokens();
        CallRecord {
            event_id,
            provider: call.endpoint.provider.clone(),
            api: call.endpoint.api.as_str().to_owned(),
            model: call.model.is_some().then(|| bill.model.clone()),
            input_tokens: tokens.input,
            output_tokens: tokens.output,
            cache_read_tokens: tokens.cache_read,
            cache_write_tokens: tokens.cache_write,
            cost_nusd: bill.cost.0,
            priced: bill.priced,
            estimated: bill.estimated(),
            stream: call.stream,
            pid: proc.pid,
            comm: proc.comm.clone(),
            service: who.service,
            tenant: who.tenant,
            feature: who.feature,
            joined_midway: call.midway,
        }
    }

    /// The ledger's record of this call.
    fn usage_record(&self) -> UsageRecord {
        UsageRecord {
            tenant: self.tenant.clone(),
            event_id: self.event_id.clone(),
            feature: self.feature.clone(),
            session: None,
            provider: self.provider.clone(),
            model: self.model.clone(),
            cost: ledger::Nanos(self.cost_nusd),
            tokens: TokenCounts {
                input: self.input_tokens,
                output: self.output_tokens,
                cache_read: self.cache_read_tokens,
                cache_write: self.cache_write_tokens,
            },
            bypass: true,
            estimated: self.estimated,
            at: chrono::Utc::now(),
            meta: ledger::store::CallMeta {
                api: Some(self.api.clone()),
                service: Some(self.service.clone()),
                pid: Some(self.pid),
                comm: Some(self.comm.clone()),
                ..ledger::store::CallMeta::default()
            },
        }
    }
}

/// Destination of call records.
pub enum Sink {
    /// Print one JSON line per call.
    Stdout,
    /// Record in the shared ledger and emit bypass events.
    Ledger(LedgerSink),
}

/// The daemon's sink: the durable writer and the bypass events.
pub struct LedgerSink {
    durable: DurableLedger,
    /// Per (service, provider): when the window's bypass event was due, and whether it reached
    /// Redis (if not, the next call of the pair retries it).
    last_bypass: HashMap<(String, String), (Instant, bool)>,
    /// Bypass event window.
    window: Duration,
    /// Replays the spool in the background.
    _replayer: Replayer,
}

/// The observer's spool: `spool_dir`, else `/var/lib/llmwarden/spool/observer-<hostname>-<metrics
/// port>/` (stable across restarts, distinct for several observers on one host).
#[must_use]
pub fn spool_config(
    dir: Option<&std::path::Path>,
    metrics_listen: &str,
    max_bytes: u64,
) -> SpoolConfig {
    let mut c = match dir {
        Some(d) => SpoolConfig::new(d),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().replace('/', "_"))
                .unwrap_or_default();
            let port = metrics_listen.rsplit(':').next().unwrap_or("0");
            SpoolConfig::for_instance(&format!("observer-{host}-{port}"))
        }
    };
    c.max_bytes = max_bytes;
    c
}

impl Sink {
    /// Connects to Redis for the daemon. The connection is lazy, so the observer starts (and
    /// spools what it sees) while Redis is down.
    pub async fn ledger(
        url: &str,
        lcfg: LedgerConfig,
        window: Duration,
        spool: SpoolConfig,
    ) -> Result<Sink> {
        let ledger = Ledger::connect_lazy(url, lcfg).await?;
        let spool = Spool::open(spool)?;
        let replayer = Replayer::spawn(spool.clone(), ledger.clone(), ReplayerConfig::default());
        Ok(Sink::Ledger(LedgerSink {
            durable: DurableLedger::new(ledger, spool),
            last_bypass: HashMap::new(),
            window,
            _replayer: replayer,
        }))
    }

    /// The ledger handle of the daemon's sink (`None` for stdout), for the unmetered writer.
    pub fn ledger_handle(&self) -> Option<Ledger> {
        match self {
            Sink::Stdout => None,
            Sink::Ledger(s) => Some(s.durable.ledger().clone()),
        }
    }

    /// Writes one call; what could not be written is spooled, and what could not be spooled is
    /// logged and counted.
    pub async fn write(&mut self, rec: &CallRecord, metrics: &Arc<Metrics>) {
        let labels = CallLabels {
            provider: rec.provider.clone(),
            model: rec.model_label(),
        };
        metrics.calls.get_or_create(&labels).inc();
        metrics
            .cost
            .get_or_create(&CostLabels {
                tenant: metrics.tenant_label(&rec.tenant),
                provider: labels.provider.clone(),
                model: labels.model.clone(),
            })
            .inc_by(u64::try_from(rec.cost_nusd).unwrap_or(0));
        if !rec.priced {
            metrics.price_gaps.get_or_create(&labels).inc();
            let model = rec.model.as_deref().unwrap_or("none");
            tracing::warn!(provider = %rec.provider, model = %model, service = %rec.service,
                "price gap: no price for this model; recorded at unknown_model_price, flagged estimated");
        }
        match self {
            Sink::Stdout => {
                if let Ok(line) = serde_json::to_string(rec) {
                    println!("{line}");
                }
            }
            Sink::Ledger(s) => {
                s.record(rec, metrics).await;
                if !rec.priced {
                    s.price_gap(rec).await;
                }
                let model = rec.model.clone().unwrap_or_else(|| "unknown".to_owned());
                s.bypass_event(rec, &model, metrics).await;
            }
        }
    }
}

impl LedgerSink {
    async fn record(&self, rec: &CallRecord, metrics: &Metrics) {
        match self.durable.record_or_spool(&rec.usage_record()).await {
            Written::Committed => {}
            Written::Duplicate => {
                metrics.ledger_duplicates.inc();
                tracing::warn!(tenant = %rec.tenant, event_id = %rec.event_id,
                    "the ledger already held this call's event id: not booked again");
            }
            Written::Spooled { cause } => {
                metrics.ledger_errors.inc();
                tracing::warn!(error = ?cause.map(|e| e.to_string()), tenant = %rec.tenant,
                    "ledger record failed; spooled until Redis answers");
            }
            Written::Refused(e) => {
                metrics.ledger_errors.inc();
                tracing::error!(error = %e, tenant = %rec.tenant, "ledger record refused as invalid: call lost");
            }
            Written::Lost { cause, spool } => {
                metrics.ledger_errors.inc();
                tracing::error!(error = ?cause.map(|e| e.to_string()), spool_error = %spool, tenant = %rec.tenant,
                    "ledger record failed and the spool refused it: call lost");
            }
        }
    }

    /// Announces a model without a price (the ledger dedupes per provider, model and day
    /// across every process; a failure is retried with the next such call).
    async fn price_gap(&self, rec: &CallRecord) {
        let gap = ledger::store::PriceGap {
            path: "observer".into(),
            provider: rec.provider.clone(),
            model: rec.model.clone().unwrap_or_else(|| "unknown".to_owned()),
            tenant: rec.tenant.clone(),
            service: rec.service.clone(),
            at: chrono::Utc::now(),
        };
        if let Err(e) = self.durable.ledger().price_gap(&gap).await {
            tracing::debug!(error = %e, "price gap not announced; retried with the next call");
        }
    }

    /// The first call of a (service, provider) pair in a window becomes a bypass event; one that
    /// Redis did not take is retried with the pair's next call.
    async fn bypass_event(&mut self, rec: &CallRecord, model: &str, metrics: &Metrics) {
        let key = (rec.service.clone(), rec.provider.clone());
        let last = self.last_bypass.get(&key);
        let new_window = last.is_none_or(|(t, _)| t.elapsed() >= self.window);
        let undelivered = last.is_some_and(|(_, sent)| !sent);
        if !new_window && !undelivered {
            return;
        }
        if new_window {
            self.last_bypass
                .insert(key.clone(), (Instant::now(), false));
            tracing::warn!(service = %rec.service, provider = %rec.provider, tenant = %rec.tenant,
                pid = rec.pid, comm = %rec.comm, "bypass: LLM call that did not pass through the enforcer");
        }
        let ev = BypassEvent {
            service: rec.service.clone(),
            provider: rec.provider.clone(),
            tenant: rec.tenant.clone(),
            model: model.to_owned(),
            pid: rec.pid,
            comm: rec.comm.clone(),
            at: chrono::Utc::now(),
        };
        match self.durable.ledger().bypass_event(&ev).await {
            Ok(_) => {
                if let Some(entry) = self.last_bypass.get_mut(&key) {
                    entry.1 = true;
                }
            }
            Err(e) => {
                metrics.ledger_errors.inc();
                if new_window {
                    tracing::error!(error = %e,
                        "bypass event XADD failed; retried with the pair's next call");
                }
            }
        }
    }
}
