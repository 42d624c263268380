//! Where observed calls go: priced with the ledger's table, attributed, then either recorded in
//! the shared Redis ledger as bypass spend (daemon) or printed as JSON lines (`observer sniff`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use ledger::price::{Cost, PriceTable};
use ledger::spool::{Replayer, ReplayerConfig, Spool, SpoolConfig, SpoolEntry};
use ledger::store::{Ledger, LedgerConfig, TokenCounts, UsageRecord};
use ledger::usage::Usage;
use serde::Serialize;

use crate::attribution::{Attribution, ProcessInfo};
use crate::exchange::ObservedCall;
use crate::metrics::{CallLabels, Metrics};

/// Redis stream of bypass events (one per service and provider per window).
pub const BYPASS_STREAM: &str = "llmw:events:bypass";

/// A call ready to be written: who, what, how much. Metadata only, never bodies.
#[derive(Debug, Clone, Serialize)]
pub struct CallRecord {
    /// Unique per call: boot id, pid, SSL*, kernel timestamp.
    pub event_id: String,
    /// Provider name ("openai", or the configured name).
    pub provider: String,
    /// API ("chat.completions", ...).
    pub api: String,
    /// Model billed, if known.
    pub model: Option<String>,
    /// Plain input tokens.
    pub input_tokens: u64,
    /// Output tokens (reasoning included).
    pub output_tokens: u64,
    /// Cached input read.
    pub cache_read_tokens: u64,
    /// Cache writes (5 m + 1 h).
    pub cache_write_tokens: u64,
    /// Cost in nano-USD; None when the model has no price (a price gap, never a silent $0).
    pub cost_nusd: Option<i64>,
    /// Whether usage was estimated from text rather than read from the provider's record.
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
}

impl CallRecord {
    /// Prices and attributes an observed call.
    pub fn new(
        call: &ObservedCall,
        event_id: String,
        proc: &ProcessInfo,
        who: Attribution,
        prices: &PriceTable,
    ) -> CallRecord {
        let usage = call.usage.unwrap_or(Usage {
            estimated: true,
            ..Usage::default()
        });
        let cost = call.model.as_deref().map(|m| prices.cost(m, &usage));
        let (model, cost_nusd) = match cost {
            Some(Cost::Priced { model, nanos }) => (Some(model), Some(nanos.0)),
            Some(Cost::Unpriced { model }) => (Some(model), None),
            None => (None, None),
        };
        CallRecord {
            event_id,
            provider: call.endpoint.provider.clone(),
            api: call.endpoint.api.as_str().to_owned(),
            model,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            cache_read_tokens: usage.cache_read_tokens,
            cache_write_tokens: usage.cache_write_5m_tokens + usage.cache_write_1h_tokens,
            cost_nusd,
            estimated: usage.estimated || call.usage.is_none(),
            stream: call.stream,
            pid: proc.pid,
            comm: proc.comm.clone(),
            service: who.service,
            tenant: who.tenant,
            feature: who.feature,
        }
    }
}

/// Destination of call records.
pub enum Sink {
    /// Print one JSON line per call.
    Stdout,
    /// Record in the shared ledger and emit bypass events.
    Ledger {
        /// The ledger.
        ledger: Ledger,
        /// A plain connection for the bypass stream.
        redis: redis::aio::ConnectionManager,
        /// Last bypass event per (service, provider).
        /// Per (service, provider): when the window's bypass event was due, and whether it
        /// reached Redis (if not, the next call of the pair retries it).
        last_bypass: HashMap<(String, String), (Instant, bool)>,
        /// Bypass event window.
        window: Duration,
        /// Records Redis could not take, replayed by `_replayer` when it answers again.
        spool: Spool,
        /// Replays the spool in the background.
        _replayer: Replayer,
    },
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
    /// Connects to Redis for the daemon. The connections are lazy, so the observer starts (and
    /// spools what it sees) while Redis is down.
    pub async fn ledger(url: &str, window: Duration, spool: SpoolConfig) -> Result<Sink> {
        let ledger = Ledger::connect_lazy(url, LedgerConfig::default()).await?;
        let spool = Spool::open(spool)?;
        let replayer = Replayer::spawn(spool.clone(), ledger.clone(), ReplayerConfig::default());
        let plain = url.replace("redis+cluster://", "redis://");
        let plain = plain.split(',').next().unwrap_or(&plain).to_owned();
        let redis = redis::aio::ConnectionManager::new_lazy_with_config(
            redis::Client::open(plain)?,
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(Duration::from_millis(500))),
        )?;
        Ok(Sink::Ledger {
            ledger,
            redis,
            last_bypass: HashMap::new(),
            window,
            spool,
            _replayer: replayer,
        })
    }

    /// Writes one call; errors are logged and counted (the call is not retried yet).
    pub async fn write(&mut self, rec: &CallRecord, metrics: &Arc<Metrics>) {
        let labels = CallLabels {
            provider: rec.provider.clone(),
            model: rec.model.clone().unwrap_or_else(|| "unknown".to_owned()),
        };
        metrics.calls.get_or_create(&labels).inc();
        if rec.cost_nusd.is_none() {
            metrics.price_gaps.get_or_create(&labels).inc();
            tracing::warn!(provider = %rec.provider, model = %labels.model, service = %rec.service,
                "price gap: no price for this model; tokens recorded, cost unknown");
        }
        match self {
            Sink::Stdout => {
                if let Ok(line) = serde_json::to_string(rec) {
                    println!("{line}");
                }
            }
            Sink::Ledger {
                ledger,
                redis,
                last_bypass,
                window,
                spool,
                ..
            } => {
                let record = UsageRecord {
                    tenant: rec.tenant.clone(),
                    event_id: rec.event_id.clone(),
                    feature: rec.feature.clone(),
                    session: None,
                    provider: rec.provider.clone(),
                    model: rec.model.clone(),
                    // An unpriced call records its tokens with cost 0 and estimated=true until
                    // UsageRecord has an `unpriced` flag (see docs/observer.md).
                    cost: ledger::Nanos(rec.cost_nusd.unwrap_or(0)),
                    tokens: TokenCounts {
                        input: rec.input_tokens,
                        output: rec.output_tokens,
                        cache_read: rec.cache_read_tokens,
                        cache_write: rec.cache_write_tokens,
                    },
                    bypass: true,
                    estimated: rec.estimated || rec.cost_nusd.is_none(),
                    at: chrono::Utc::now(),
                };
                if let Err(e) = ledger.record(&record).await {
                    metrics.ledger_errors.inc();
                    if matches!(e, ledger::Error::Invalid { .. }) {
                        tracing::error!(error = %e, tenant = %rec.tenant, "ledger record refused");
                    } else {
                        // Redis unreachable: keep the record on disk until the replayer sends it.
                        match spool.append(&SpoolEntry::Record(record)).await {
                            Ok(()) => tracing::warn!(error = %e, tenant = %rec.tenant,
                                "ledger record failed; spooled until Redis answers"),
                            Err(se) => {
                                tracing::error!(error = %e, spool_error = %se, tenant = %rec.tenant,
                                "ledger record failed and the spool refused it: call lost")
                            }
                        }
                    }
                }
                let key = (rec.service.clone(), rec.provider.clone());
                let new_window = last_bypass
                    .get(&key)
                    .is_none_or(|(t, _)| t.elapsed() >= *window);
                let undelivered = last_bypass.get(&key).is_some_and(|(_, sent)| !sent);
                if new_window || undelivered {
                    if new_window {
                        last_bypass.insert(key.clone(), (Instant::now(), false));
                        tracing::warn!(service = %rec.service, provider = %rec.provider, tenant = %rec.tenant,
                            pid = rec.pid, comm = %rec.comm, "bypass: LLM call that did not pass through the enforcer");
                    }
                    let fields = [
                        ("service", rec.service.clone()),
                        ("provider", rec.provider.clone()),
                        ("tenant", rec.tenant.clone()),
                        ("model", labels.model.clone()),
                        ("pid", rec.pid.to_string()),
                        ("comm", rec.comm.clone()),
                        ("at", chrono::Utc::now().to_rfc3339()),
                    ];
                    let r: redis::RedisResult<String> = redis::cmd("XADD")
                        .arg(BYPASS_STREAM)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(10_000)
                        .arg("*")
                        .arg(&fields[..])
                        .query_async(redis)
                        .await;
                    match r {
                        Ok(_) => {
                            if let Some(entry) = last_bypass.get_mut(&key) {
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
        }
    }
}
