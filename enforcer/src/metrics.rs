//! Prometheus metrics. Names follow the OpenTelemetry GenAI semantic conventions where one fits
//! (`gen_ai_client_token_usage`, `gen_ai_client_operation_duration`); the rest are `llmwarden_*`.
//! Tenant and model labels are bounded: past the configured count new values fold into "other".

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::MetricsConfig;

/// Labels of per-call counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// Tenant (bounded).
    pub tenant: String,
    /// Provider name.
    pub provider: String,
    /// Model (bounded).
    pub model: String,
}

/// Labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Provider name (or "unknown").
    pub provider: String,
    /// allowed, denied, error, passthrough.
    pub decision: &'static str,
}

/// Labels of the denial counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The error code (budget_exceeded, loop_detected, invalid_api_key, ...).
    pub reason: String,
}

/// Labels of the failover counter: the route that failed, the one tried next, and why.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverLabels {
    /// The route that failed.
    pub from: String,
    /// The route tried next.
    pub to: String,
    /// `connect` or the status (`429`, `503`, ...).
    pub reason: String,
}

/// Labels of the connection families.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Listener {
    /// proxy or admin.
    pub listener: String,
}

/// OTel GenAI token usage labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// `gen_ai.system`: provider name.
    pub gen_ai_system: String,
    /// `gen_ai.request.model` (bounded).
    pub gen_ai_request_model: String,
    /// `gen_ai.token.type`: input or output.
    pub gen_ai_token_type: String,
}

/// OTel GenAI operation labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `gen_ai.system`.
    pub gen_ai_system: String,
    /// `gen_ai.operation.name`: chat_completions, messages, ...
    pub gen_ai_operation_name: String,
}

/// One settled call, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct SettledCall<'a> {
    /// Tenant.
    pub tenant: &'a str,
    /// Provider name.
    pub provider: &'a str,
    /// Model billed.
    pub model: &'a str,
    /// API name (operation).
    pub api: &'a str,
    /// Input tokens of all kinds.
    pub input: u64,
    /// Output tokens.
    pub output: u64,
    /// Cost in nano-USD.
    pub nanos: i64,
    /// Whole-call seconds.
    pub secs: f64,
}

/// Label bounding: the first `max` distinct values keep their name.
#[derive(Debug)]
struct Bounded {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl Bounded {
    fn label(&self, v: &str) -> String {
        let mut seen = self.seen.lock();
        if seen.contains(v) {
            return v.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(v.to_owned());
            return v.to_owned();
        }
        "other".to_owned()
    }
}

/// Every metric the enforcer exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by provider and decision.
    pub requests: Family<DecisionLabels, Counter>,
    /// Denials by reason.
    pub denials: Family<ReasonLabels, Counter>,
    /// Committed cost in nano-USD.
    pub cost_nanos: Family<CallLabels, Counter>,
    /// Input tokens.
    pub input_tokens: Family<CallLabels, Counter>,
    /// Output tokens.
    pub output_tokens: Family<CallLabels, Counter>,
    /// OTel token usage histogram.
    pub token_usage: Family<TokenLabels, Histogram>,
    /// OTel operation duration (seconds, whole call).
    pub operation_duration: Family<OperationLabels, Histogram>,
    /// Time to upstream response head (seconds).
    pub upstream_latency: Histogram,
    /// Time the enforcer adds before forwarding (auth, parse, reserve; seconds).
    pub overhead: Histogram,
    /// Calls admitted without a reservation because Redis was unreachable.
    pub redis_unavailable_admissions: Counter<u64, AtomicU64>,
    /// The lease pool's counters (shared with [`crate::lease::LeasePool`]).
    pub leases: crate::lease::LeaseCounters,
    /// Calls settled from an estimate (disconnects, missing usage).
    pub estimated_settlements: Counter<u64, AtomicU64>,
    /// Settles or releases that failed (the hold expires by TTL).
    pub ledger_errors: Counter<u64, AtomicU64>,
    /// Settles and releases written to the local spool because Redis was unreachable.
    pub spooled: Counter<u64, AtomicU64>,
    /// Settles and releases the spool refused (full or failing disk): usage not saved locally.
    pub spool_refused: Counter<u64, AtomicU64>,
    /// Nano-USD settled above the call's reservation (the worst case was not one).
    pub over_reservation: Counter<u64, AtomicU64>,
    /// Alerts delivered to a sink by this instance's dispatcher (docs/audit.md).
    pub alerts_delivered: Counter<u64, AtomicU64>,
    /// Failed alert delivery attempts (each retried until `max_attempts`).
    pub alert_delivery_failures: Counter<u64, AtomicU64>,
    /// Client connections open, by listener.
    pub connections_open: Family<Listener, Gauge>,
    /// Times a listener stopped accepting because its connection limit was reached.
    pub connection_limit_waits: Family<Listener, Counter>,
    /// Failed accepts (EMFILE, ...), each followed by a pause.
    pub accept_errors: Family<Listener, Counter>,
    /// Connections closed for having no request in flight for `timeouts.connection_idle_ms`.
    pub idle_closes: Family<Listener, Counter>,
    /// Bytes of request and buffered response bodies held now (`max_inflight_body_bytes`).
    pub inflight_body_bytes: Gauge,
    /// Calls refused with 503 because their body did not fit `max_inflight_body_bytes`.
    pub inflight_refusals: Counter<u64, AtomicU64>,
    /// Attempts moved to another upstream route after a failure before any response byte.
    pub failovers: Family<FailoverLabels, Counter>,
    tenants: Bounded,
    models: Bounded,
    /// The series a settled call updates, by (tenant, provider, model, api) as the caller names
    /// them (see [`Metrics::settled`]).
    settled_series: Mutex<SeriesMap>,
    /// Hashes the names of [`Self::settled_series`] (keyed per process, so names that collide
    /// cannot be chosen).
    series_hasher: RandomState,
}

/// Settled calls' series by the hash of their names; a hash's few names are compared in turn.
type SeriesMap = HashMap<u64, Vec<(SeriesKey, Arc<SettledSeries>)>>;

/// Distinct (tenant, provider, model, api) whose series [`Metrics::settled`] keeps; past it the
/// map starts again (the series themselves stay in their families).
const SETTLED_SERIES_MAX: usize = 4096;

/// A settled call's names, as the caller gave them (before label bounding).
#[derive(Debug, PartialEq, Eq)]
struct SeriesKey {
    tenant: String,
    provider: String,
    model: String,
    api: String,
}

impl SeriesKey {
    fn is(&self, c: &SettledCall<'_>) -> bool {
        self.tenant == c.tenant
            && self.provider == c.provider
            && self.model == c.model
            && self.api == c.api
    }
}

/// The six series one settled call updates. Each is a handle on the family's own series (the
/// metric types share their value between clones), so updating it is what `get_or_create` and
/// an update would do, without building the labels and hashing them six times.
#[derive(Debug)]
struct SettledSeries {
    cost_nanos: Counter,
    input_tokens: Counter,
    output_tokens: Counter,
    input_usage: Histogram,
    output_usage: Histogram,
    duration: Histogram,
}

impl Metrics {
    /// Creates and registers every metric.
    #[must_use]
    pub fn new(cfg: &MetricsConfig) -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            denials: Family::default(),
            cost_nanos: Family::default(),
            input_tokens: Family::default(),
            output_tokens: Family::default(),
            token_usage: Family::new_with_constructor(
                (|| Histogram::new(exponential_buckets(1.0, 4.0, 14))) as fn() -> Histogram,
            ),
            operation_duration: Family::new_with_constructor(
                (|| Histogram::new(exponential_buckets(0.01, 2.0, 16))) as fn() -> Histogram,
            ),
            upstream_latency: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            overhead: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            redis_unavailable_admissions: Counter::default(),
            leases: crate::lease::LeaseCounters::default(),
            estimated_settlements: Counter::default(),
            ledger_errors: Counter::default(),
            spooled: Counter::default(),
            spool_refused: Counter::default(),
            over_reservation: Counter::default(),
            alerts_delivered: Counter::default(),
            alert_delivery_failures: Counter::default(),
            connections_open: Family::default(),
            connection_limit_waits: Family::default(),
            accept_errors: Family::default(),
            idle_closes: Family::default(),
            inflight_body_bytes: Gauge::default(),
            inflight_refusals: Counter::default(),
            failovers: Family::default(),
            tenants: Bounded {
                max: cfg.max_tenants,
                seen: Mutex::default(),
            },
            models: Bounded {
                max: cfg.max_models,
                seen: Mutex::default(),
            },
            settled_series: Mutex::default(),
            series_hasher: RandomState::new(),
        };
        m.register_calls();
        m.register_health();
        m.register_connections();
        m
    }

    /// Families about the calls: decisions, denials, cost, tokens, OTel GenAI histograms.
    fn register_calls(&mut self) {
        let r = &mut self.registry;
        r.register(
            "llmwarden_requests",
            "Proxied requests by decision",
            self.requests.clone(),
        );
        r.register(
            "llmwarden_denials",
            "Requests refused by the enforcer, by reason",
            self.denials.clone(),
        );
        r.register(
            "llmwarden_cost_nanousd",
            "Committed cost in nano-USD",
            self.cost_nanos.clone(),
        );
        r.register(
            "llmwarden_input_tokens",
            "Billed input tokens (all kinds)",
            self.input_tokens.clone(),
        );
        r.register(
            "llmwarden_output_tokens",
            "Billed output tokens",
            self.output_tokens.clone(),
        );
        r.register(
            "gen_ai_client_token_usage",
            "Tokens per call (OTel GenAI)",
            self.token_usage.clone(),
        );
        r.register(
            "gen_ai_client_operation_duration_seconds",
            "Whole call duration (OTel GenAI)",
            self.operation_duration.clone(),
        );
    }

    /// Families about client connections: open, limited, failed accepts, idle closes.
    fn register_connections(&mut self) {
        let r = &mut self.registry;
        r.register(
            "llmwarden_connections_open",
            "Client connections open, by listener",
            self.connections_open.clone(),
        );
        r.register(
            "llmwarden_connection_limit_waits",
            "Times a listener paused accepting at its connection limit",
            self.connection_limit_waits.clone(),
        );
        r.register(
            "llmwarden_accept_errors",
            "Failed accepts (e.g. out of file descriptors), each followed by a pause",
            self.accept_errors.clone(),
        );
        r.register(
            "llmwarden_connection_idle_closes",
            "Connections closed after timeouts.connection_idle_ms with no request in flight",
            self.idle_closes.clone(),
        );
    }

    /// Families about the enforcer itself: latency added, the ledger, the spool.
    fn register_health(&mut self) {
        let r = &mut self.registry;
        r.register(
            "llmwarden_upstream_latency_seconds",
            "Time to the upstream response head",
            self.upstream_latency.clone(),
        );
        r.register(
            "llmwarden_overhead_seconds",
            "Enforcer time before forwarding",
            self.overhead.clone(),
        );
        r.register(
            "llmwarden_lease_taken",
            "Calls forwarded on a spare hold of the lease pool, without a reserve of their own",
            self.leases.taken.clone(),
        );
        r.register(
            "llmwarden_lease_reserved",
            "Spare holds the lease pool reserved",
            self.leases.reserved.clone(),
        );
        r.register(
            "llmwarden_lease_released",
            "Spare holds the lease pool released unused",
            self.leases.released.clone(),
        );
        r.register(
            "llmwarden_lease_spare_holds",
            "Spare holds waiting in the lease pools for a call",
            self.leases.spare.clone(),
        );
        r.register(
            "llmwarden_lease_spare_nanousd",
            "What the spare holds waiting in the lease pools hold: a crash now would charge at most this as estimates",
            self.leases.spare_nanousd.clone(),
        );
        r.register(
            "llmwarden_lease_refused",
            "Lease pool refills refused near a limit, or failed",
            self.leases.refused.clone(),
        );
        r.register(
            "llmwarden_redis_unavailable_admissions",
            "Calls admitted without reservation while Redis was unreachable",
            self.redis_unavailable_admissions.clone(),
        );
        r.register(
            "llmwarden_estimated_settlements",
            "Calls settled from an estimate",
            self.estimated_settlements.clone(),
        );
        r.register(
            "llmwarden_ledger_errors",
            "Failed settles or releases",
            self.ledger_errors.clone(),
        );
        r.register(
            "llmwarden_spooled_records",
            "Settles and releases written to the local spool while Redis was unreachable",
            self.spooled.clone(),
        );
        r.register(
            "llmwarden_alerts_delivered",
            "Alerts delivered to a sink by this instance's dispatcher",
            self.alerts_delivered.clone(),
        );
        r.register(
            "llmwarden_alert_delivery_failures",
            "Failed alert delivery attempts (retried with backoff up to max_attempts)",
            self.alert_delivery_failures.clone(),
        );
        r.register(
            "llmwarden_spool_refused",
            "Settles and releases the local spool refused (full or disk error)",
            self.spool_refused.clone(),
        );
        r.register(
            "llmwarden_settle_over_reservation_nusd",
            "Nano-USD settled above the call's reservation (the worst case under-reserved)",
            self.over_reservation.clone(),
        );
        r.register(
            "llmwarden_inflight_body_bytes",
            "Bytes of request and buffered response bodies held now",
            self.inflight_body_bytes.clone(),
        );
        r.register(
            "llmwarden_inflight_refusals",
            "Calls refused with 503 because max_inflight_body_bytes was full",
            self.inflight_refusals.clone(),
        );
        r.register(
            "llmwarden_upstream_failovers",
            "Attempts moved to another upstream route (failover) after a connect error, 429 or 5xx before any response byte",
            self.failovers.clone(),
        );
    }

    /// Counts an attempt moved from route `from` to `to`.
    pub fn failover(&self, from: &str, to: &str, reason: String) {
        self.failovers
            .get_or_create(&FailoverLabels {
                from: from.to_owned(),
                to: to.to_owned(),
                reason,
            })
            .inc();
    }

    /// Counts a request decision.
    pub fn decision(&self, provider: &str, decision: &'static str) {
        self.requests
            .get_or_create(&DecisionLabels {
                provider: provider.to_owned(),
                decision,
            })
            .inc();
    }

    /// Counts a denial.
    pub fn deny(&self, provider: &str, reason: &str) {
        self.decision(provider, "denied");
        self.denials
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Records a settled call.
    pub fn settled(&self, c: &SettledCall<'_>) {
        let series = self.settled_series(c);
        series
            .cost_nanos
            .inc_by(u64::try_from(c.nanos).unwrap_or(0));
        series.input_tokens.inc_by(c.input);
        series.output_tokens.inc_by(c.output);
        #[expect(clippy::cast_precision_loss, reason = "histogram observation")]
        {
            series.input_usage.observe(c.input as f64);
            series.output_usage.observe(c.output as f64);
        }
        series.duration.observe(c.secs);
    }

    /// The series of `c`'s tenant, provider, model and api: found again by those names, or looked
    /// up in the families (labels bounded) the first time.
    fn settled_series(&self, c: &SettledCall<'_>) -> Arc<SettledSeries> {
        let hash = self
            .series_hasher
            .hash_one((c.tenant, c.provider, c.model, c.api));
        if let Some(found) = self
            .settled_series
            .lock()
            .get(&hash)
            .and_then(|v| v.iter().find(|(k, _)| k.is(c)))
        {
            return Arc::clone(&found.1);
        }
        let l = CallLabels {
            tenant: self.tenants.label(c.tenant),
            provider: c.provider.to_owned(),
            model: self.models.label(c.model),
        };
        let usage = |ty: &str| {
            self.token_usage
                .get_or_create(&TokenLabels {
                    gen_ai_system: c.provider.to_owned(),
                    gen_ai_request_model: l.model.clone(),
                    gen_ai_token_type: ty.to_owned(),
                })
                .clone()
        };
        let series = Arc::new(SettledSeries {
            cost_nanos: self.cost_nanos.get_or_create(&l).clone(),
            input_tokens: self.input_tokens.get_or_create(&l).clone(),
            output_tokens: self.output_tokens.get_or_create(&l).clone(),
            input_usage: usage("input"),
            output_usage: usage("output"),
            duration: self
                .operation_duration
                .get_or_create(&OperationLabels {
                    gen_ai_system: c.provider.to_owned(),
                    gen_ai_operation_name: c.api.to_owned(),
                })
                .clone(),
        });
        let mut map = self.settled_series.lock();
        if map.len() >= SETTLED_SERIES_MAX {
            map.clear();
        }
        let same = map.entry(hash).or_default();
        // Another thread may have added the names meanwhile: its handles are the same series.
        if same.iter().any(|(k, _)| k.is(c)) {
            return series;
        }
        same.push((
            SeriesKey {
                tenant: c.tenant.to_owned(),
                provider: c.provider.to_owned(),
                model: c.model.to_owned(),
                api: c.api.to_owned(),
            },
            Arc::clone(&series),
        ));
        series
    }

    /// The text exposition.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut s = String::new();
        if prometheus_client::encoding::text::encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A settled call's series are found again by name, and they are the families' own: the
    /// exposition after calls of two tenants (the second one twice, and a third tenant past the
    /// bound) holds each series' sum, whether a call was the first of its names or a repeat.
    #[test]
    fn repeated_calls_update_the_families_series() {
        let m = Metrics::new(&MetricsConfig {
            max_tenants: 2,
            max_models: 10,
        });
        let call = |tenant, nanos, input| SettledCall {
            tenant,
            provider: "openai",
            model: "gpt-4o-mini",
            api: "chat_completions",
            input,
            output: 2,
            nanos,
            secs: 0.1,
        };
        m.settled(&call("a", 5, 10));
        m.settled(&call("b", 7, 20));
        m.settled(&call("b", 11, 30));
        m.settled(&call("c", 13, 40));
        m.settled(&call("d", 17, 50));
        let s = m.encode();
        let line = |series: &str| {
            s.lines()
                .find(|l| l.starts_with(series))
                .unwrap_or_else(|| panic!("no {series} in {s}"))
                .to_owned()
        };
        let cost = |t: &str| {
            line(&format!(
                "llmwarden_cost_nanousd_total{{tenant=\"{t}\",provider=\"openai\",model=\"gpt-4o-mini\"}}"
            ))
        };
        assert!(cost("a").ends_with(" 5"), "{s}");
        assert!(cost("b").ends_with(" 18"), "{s}");
        assert!(cost("other").ends_with(" 30"), "c and d share other: {s}");
        let input_count = line(
            "gen_ai_client_token_usage_count{gen_ai_system=\"openai\",gen_ai_request_model=\"gpt-4o-mini\",gen_ai_token_type=\"input\"}",
        );
        assert!(input_count.ends_with(" 5"), "{s}");
        let input_sum = line(
            "gen_ai_client_token_usage_sum{gen_ai_system=\"openai\",gen_ai_request_model=\"gpt-4o-mini\",gen_ai_token_type=\"input\"}",
        );
        assert!(input_sum.ends_with(" 150.0"), "{s}");
    }

    #[test]
    fn labels_are_bounded() {
        let m = Metrics::new(&MetricsConfig {
            max_tenants: 2,
            max_models: 1,
        });
        for t in ["a", "b", "c", "d"] {
            m.settled(&SettledCall {
                tenant: t,
                provider: "openai",
                model: t,
                api: "chat_completions",
                input: 1,
                output: 2,
                nanos: 3,
                secs: 0.1,
            });
        }
        let s = m.encode();
        assert!(s.contains("tenant=\"a\"") && s.contains("tenant=\"b\""));
        assert!(
            !s.contains("tenant=\"c\"") && s.contains("tenant=\"other\""),
            "{s}"
        );
        assert!(s.contains("gen_ai_client_token_usage"));
    }

    /// Every metric family the enforcer exports has a row in docs/enforcer.md's metrics table
    /// (counters are exported with the `_total` suffix the table uses).
    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../docs/enforcer.md");
        let m = Metrics::new(&MetricsConfig::default());
        // Labelled families appear once they have a sample.
        m.decision("openai", "allowed");
        m.deny("openai", "budget_exceeded");
        m.settled(&SettledCall {
            tenant: "acme",
            provider: "openai",
            model: "gpt-4o-mini",
            api: "chat_completions",
            input: 1,
            output: 1,
            nanos: 1,
            secs: 0.1,
        });
        let text = m.encode();
        let mut names = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            names.push(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            });
        }
        assert!(names.len() > 10, "{text}");
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !doc.contains(&format!("`{n}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "metrics missing from docs/enforcer.md: {missing:?}"
        );
    }
}
