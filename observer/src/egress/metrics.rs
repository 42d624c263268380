//! The egress accounting's metrics (`llmwarden_observer_unmetered_*`,
//! `llmwarden_observer_provider_connections`), documented in docs/observer.md.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of the egress metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// Provider name.
    pub provider: String,
}

/// Labels of `llmwarden_observer_provider_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// `metered`, `unmetered`, `ignored`, `not_provider` (its SNI names no provider host).
    pub verdict: String,
}

/// Labels of `llmwarden_observer_provider_hellos`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HelloLabels {
    /// `sni` (a server name read), `no_sni` (a whole ClientHello without one), `truncated` (cut
    /// before the name), `not_tls`.
    pub result: String,
}

/// The egress metrics (documented in docs/observer.md).
#[derive(Debug, Default)]
pub struct EgressMetrics {
    /// `llmwarden_observer_unmetered_connections_total{provider}`.
    pub connections: Family<ProviderLabels, Counter>,
    /// `llmwarden_observer_unmetered_bytes_out_total{provider}`.
    pub bytes_out: Family<ProviderLabels, Counter>,
    /// `llmwarden_observer_unmetered_bytes_in_total{provider}`.
    pub bytes_in: Family<ProviderLabels, Counter>,
    /// `llmwarden_observer_unmetered_joined_total`: unmetered connections that predate the observer.
    pub joined: Counter,
    /// `llmwarden_observer_unmetered_ledger_errors_total`.
    pub ledger_errors: Counter,
    /// `llmwarden_observer_unmetered_kernel_drops`: connection events the kernel ring lost.
    pub kernel_drops: Gauge,
    /// `llmwarden_observer_provider_connections_total{verdict}`.
    pub verdicts: Family<VerdictLabels, Counter>,
    /// `llmwarden_observer_provider_hellos_total{result}`: first sends of provider connections
    /// seen by the kernel, by what they named.
    pub hellos: Family<HelloLabels, Counter>,
}

impl EgressMetrics {
    /// Registers under `llmwarden_observer_`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("llmwarden_observer");
        r.register(
            "unmetered_connections",
            "connections to a provider that carried no metered call",
            self.connections.clone(),
        );
        r.register(
            "unmetered_bytes_out",
            "TCP payload bytes sent on unmetered provider connections",
            self.bytes_out.clone(),
        );
        r.register(
            "unmetered_bytes_in",
            "TCP payload bytes received on unmetered provider connections",
            self.bytes_in.clone(),
        );
        r.register(
            "unmetered_joined",
            "unmetered connections opened before the observer saw them",
            self.joined.clone(),
        );
        r.register(
            "unmetered_ledger_errors",
            "unmetered records Redis did not take",
            self.ledger_errors.clone(),
        );
        r.register(
            "unmetered_kernel_drops",
            "provider connection events lost in the kernel (ring full)",
            self.kernel_drops.clone(),
        );
        r.register(
            "provider_connections",
            "ended connections to provider addresses, by verdict",
            self.verdicts.clone(),
        );
        r.register(
            "provider_hellos",
            "first sends (TLS ClientHellos) of provider connections, by what their server name read gave",
            self.hellos.clone(),
        );
    }
}
