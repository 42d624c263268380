//! Budget alert delivery (docs/audit.md): the ledger's scripts decide each alert once, in the
//! script that moves the money, and append it to the tenant's alert stream; this dispatcher reads
//! those streams and delivers every alert to the configured sinks (a generic JSON webhook signed
//! with HMAC-SHA256, a Slack-compatible incoming webhook). One enforcer dispatches at a time, the
//! holder of a Redis lease; retries back off; the delivery status of every (alert, sink) is kept
//! in Redis, so a new lease holder skips what was delivered. It runs in its own task: a dead sink
//! delays alerts, never calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ledger::Ledger;
use ledger::Nanos;
use ledger::store::Alert;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::ConfigError;

/// The `[alerts]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Thresholds in percent of each budget's limit; each fires once per (budget, period,
    /// threshold). Empty turns budget alerts off. Default 50, 80, 100.
    pub thresholds_pct: Vec<u32>,
    /// How often the dispatcher looks for new alerts (ms). Default 500.
    pub poll_ms: u64,
    /// The dispatcher lease's lifetime (ms); renewed every third of it. Default 10000.
    pub lease_ms: u64,
    /// Also deliver the observer's bypass events (`llmw:events:bypass`: a (service, provider) pair
    /// calling a provider directly for the first time in its window) as `first_bypass` alerts.
    /// Default true.
    pub bypass: bool,
    /// Also deliver price gaps (`llmw:{ops}:events`: a model the price table does not know,
    /// billed at `unknown_model_price`; once per provider, model and UTC day) as `price_gap`
    /// alerts. Default true.
    pub price_gaps: bool,
    /// Send a `spool_filling` alert when this instance's spool reaches this percent of
    /// `spool_max_bytes` (0 = never). It goes straight to the sinks, not through Redis (a spool
    /// fills because Redis does not answer); once per crossing, re-armed below half of it.
    /// Default 80.
    pub spool_filling_pct: u32,
    /// Where alerts go; none: alerts stay in Redis (`llmw:{T}:alerts`) and nothing is sent.
    pub sinks: Vec<SinkConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            thresholds_pct: vec![50, 80, 100],
            poll_ms: 500,
            lease_ms: 10_000,
            bypass: true,
            price_gaps: true,
            spool_filling_pct: 80,
            sinks: Vec::new(),
        }
    }
}

/// What a sink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// JSON body (docs/audit.md), `X-Llmwarden-Signature` when a secret is set.
    Webhook,
    /// `{"text": ...}` for a Slack (or compatible) incoming webhook.
    Slack,
}

/// One `[[alerts.sinks]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkConfig {
    /// Its name in delivery statuses and logs (unique).
    pub name: String,
    /// `webhook` or `slack`.
    pub kind: SinkKind,
    /// The URL (`http://` or `https://`), or
    pub url: Option<String>,
    /// the environment variable holding it (a Slack webhook URL is a secret).
    pub url_env: Option<String>,
    /// Environment variable holding the HMAC-SHA256 key of the webhook's signature.
    pub secret_env: Option<String>,
    /// Attempts per alert before it is marked `failed`. Default 8.
    pub max_attempts: u32,
    /// First retry delay (ms), doubled per attempt up to 60 s. Default 1000.
    pub backoff_ms: u64,
    /// Per-attempt timeout (ms). Default 5000.
    pub timeout_ms: u64,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            name: String::new(),
            kind: SinkKind::Webhook,
            url: None,
            url_env: None,
            secret_env: None,
            max_attempts: 8,
            backoff_ms: 1000,
            timeout_ms: 5000,
        }
    }
}

impl AlertsConfig {
    /// Checks names, URLs and limits.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: String, reason: &str| ConfigError {
            key,
            reason: reason.into(),
        };
        if self.thresholds_pct.iter().any(|p| *p == 0 || *p > 1000) {
            return Err(bad(
                "alerts.thresholds_pct".into(),
                "each threshold must be 1..=1000 (percent of the budget)",
            ));
        }
        if self.spool_filling_pct > 100 {
            return Err(bad(
                "alerts.spool_filling_pct".into(),
                "must be 0 (off) to 100 (percent of spool_max_bytes)",
            ));
        }
        if self.poll_ms == 0 || self.lease_ms < 3 * self.poll_ms.max(100) {
            return Err(bad(
                "alerts.lease_ms".into(),
                "must be at least 3 × poll_ms (and poll_ms > 0)",
            ));
        }
        for (i, s) in self.sinks.iter().enumerate() {
            let key = |k: &str| format!("alerts.sinks[{i}].{k}");
            if s.name.is_empty() || self.sinks.iter().filter(|o| o.name == s.name).count() > 1 {
                return Err(bad(key("name"), "required and unique"));
            }
            match (&s.url, &s.url_env) {
                (Some(u), None) if u.starts_with("http://") || u.starts_with("https://") => {}
                (None, Some(_)) => {}
                _ => {
                    return Err(bad(
                        key("url"),
                        "give exactly one of url (http:// or https://) and url_env",
                    ));
                }
            }
            if s.max_attempts == 0 || s.timeout_ms == 0 {
                return Err(bad(
                    key("max_attempts"),
                    "max_attempts and timeout_ms must be > 0",
                ));
            }
        }
        Ok(())
    }
}

pub(crate) type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A sink ready to send: its URL and key read from the environment at start.
#[derive(Clone)]
pub(crate) struct Sink {
    pub(crate) cfg: SinkConfig,
    url: String,
    secret: Option<Vec<u8>>,
}

/// Builds the sinks, reading their URL and secret variables.
///
/// # Errors
/// A [`ConfigError`] naming a variable that is unset or empty.
fn sinks(cfg: &AlertsConfig) -> Result<Vec<Sink>, ConfigError> {
    let env = |key: String, var: &str| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or(ConfigError {
                key,
                reason: format!("environment variable {var} is not set or empty"),
            })
    };
    cfg.sinks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let url = match (&s.url, &s.url_env) {
                (Some(u), _) => u.clone(),
                (None, Some(v)) => env(format!("alerts.sinks[{i}].url_env"), v)?,
                (None, None) => String::new(),
            };
            let secret = match &s.secret_env {
                Some(v) => Some(env(format!("alerts.sinks[{i}].secret_env"), v)?.into_bytes()),
                None => None,
            };
            Ok(Sink {
                cfg: s.clone(),
                url,
                secret,
            })
        })
        .collect()
}

fn client() -> HttpsClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_or_else(
            |_| {
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth()
            },
            |b| {
                b.with_root_certificates(roots.clone())
                    .with_no_client_auth()
            },
        );
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

/// The JSON a webhook receives (docs/audit.md).
#[must_use]
pub fn webhook_body(a: &Alert) -> serde_json::Value {
    match a.kind.as_str() {
        "first_unmetered" => serde_json::json!({
            "id": a.id,
            "kind": a.kind,
            "tenant": a.tenant,
            "service": a.service,
            "provider": a.provider,
            "host": a.host,
            "pid": a.pid,
            "comm": a.comm,
            "bytes_out": a.bytes_out,
            "bytes_in": a.bytes_in,
            "at": a.at,
        }),
        "spool_filling" => serde_json::json!({
            "id": a.id,
            "kind": a.kind,
            "instance": a.instance,
            "spool_bytes": a.spool_bytes,
            "spool_max_bytes": a.spool_max_bytes,
            "threshold_pct": a.threshold_pct,
            "at": a.at,
        }),
        "price_gap" => serde_json::json!({
            "id": a.id,
            "kind": a.kind,
            "path": a.path,
            "provider": a.provider,
            "model": a.model,
            "tenant": a.tenant,
            "service": if a.service.is_empty() { None } else { Some(&a.service) },
            "at": a.at,
        }),
        "first_bypass" => serde_json::json!({
            "id": a.id,
            "kind": a.kind,
            "tenant": a.tenant,
            "service": a.service,
            "provider": a.provider,
            "model": a.model,
            "pid": a.pid,
            "comm": a.comm,
            "at": a.at,
        }),
        _ => {
            serde_json::json!({
                "id": a.id,
                "kind": a.kind,
                "tenant": a.tenant,
                "feature": if a.feature.is_empty() { None } else { Some(&a.feature) },
                "period": a.period,
                "period_id": a.period_id,
                "threshold_pct": a.threshold_pct,
                "limit_nusd": a.limit_nusd,
                "spend_nusd": a.spend_nusd,
                "at": a.at,
            })
        }
    }
}

/// The text a Slack-compatible webhook receives.
#[must_use]
pub fn slack_text(a: &Alert) -> String {
    match a.kind.as_str() {
        "first_unmetered" => format!(
            "llmwarden: service {} opened a connection to {} ({}) that no probe could meter: its spend is unknown (tenant {}, process {} pid {}, {} bytes out, {} in)",
            a.service, a.provider, a.host, a.tenant, a.comm, a.pid, a.bytes_out, a.bytes_in
        ),
        "spool_filling" => format!(
            "llmwarden: enforcer {} cannot reach Redis and its spool is {}% full ({} of {} bytes); usage beyond it is lost",
            a.instance,
            a.spool_bytes.saturating_mul(100) / a.spool_max_bytes.max(1),
            a.spool_bytes,
            a.spool_max_bytes
        ),
        "price_gap" => format!(
            "llmwarden: model {} of {} has no price; the {} billed it at unknown_model_price (tenant {}). Add it to the price table.",
            a.model, a.provider, a.path, a.tenant
        ),
        "first_bypass" => format!(
            "llmwarden: service {} called {} directly, bypassing the enforcer (tenant {}, process {} pid {})",
            a.service, a.provider, a.tenant, a.comm, a.pid
        ),
        _ => {
            let what = if a.feature.is_empty() {
                format!("tenant {}", a.tenant)
            } else {
                format!("feature {} of tenant {}", a.feature, a.tenant)
            };
            format!(
                "llmwarden: {what} reached {}% of its {} budget for {} (spent {} of {})",
                a.threshold_pct,
                a.period,
                a.period_id,
                Nanos(a.spend_nusd),
                Nanos(a.limit_nusd)
            )
        }
    }
}

/// `sha256=<hex>` of HMAC-SHA256(`secret`, "<timestamp>.<body>").
#[must_use]
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| {
        // HMAC takes keys of any length; this cannot happen.
        <Hmac<Sha256> as Mac>::new_from_slice(b"-").expect("hmac key")
    });
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Starts the dispatcher task when any sink is configured.
///
/// # Errors
/// A [`ConfigError`] naming a sink variable that is unset or empty.
pub fn spawn(
    ledger: Ledger,
    instance: String,
    cfg: &AlertsConfig,
    metrics: &crate::metrics::Metrics,
    spool: &ledger::spool::Spool,
) -> Result<(), ConfigError> {
    let sinks = Arc::new(sinks(cfg)?);
    if sinks.is_empty() {
        return Ok(());
    }
    let client = client();
    if cfg.spool_filling_pct > 0 {
        crate::spool_alert::spawn(
            spool.clone(),
            instance.clone(),
            cfg.spool_filling_pct,
            Arc::clone(&sinks),
            client.clone(),
        );
    }
    let d = Arc::new(Dispatcher {
        ledger,
        holder: format!("{instance}:{}", uuid::Uuid::new_v4()),
        sinks,
        client,
        poll: Duration::from_millis(cfg.poll_ms),
        lease: Duration::from_millis(cfg.lease_ms),
        leader: AtomicBool::new(false),
        bypass: cfg.bypass,
        price_gaps: cfg.price_gaps,
        delivered: metrics.alerts_delivered.clone(),
        failures: metrics.alert_delivery_failures.clone(),
    });
    tokio::spawn(Arc::clone(&d).keep_lease());
    tokio::spawn(d.run());
    Ok(())
}

struct Dispatcher {
    ledger: Ledger,
    /// Unique per process: a restarted instance does not inherit its previous run's lease.
    holder: String,
    sinks: Arc<Vec<Sink>>,
    client: HttpsClient,
    poll: Duration,
    lease: Duration,
    leader: AtomicBool,
    bypass: bool,
    price_gaps: bool,
    /// `llmwarden_alerts_delivered_total`.
    delivered: prometheus_client::metrics::counter::Counter,
    /// `llmwarden_alert_delivery_failures_total`.
    failures: prometheus_client::metrics::counter::Counter,
}

impl Dispatcher {
    /// Takes and renews the lease every third of its lifetime.
    async fn keep_lease(self: Arc<Self>) {
        loop {
            let held = match self.ledger.alert_lease(&self.holder, self.lease).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(error = %e, "alert lease not renewed");
                    false
                }
            };
            if held != self.leader.swap(held, Ordering::AcqRel) {
                tracing::info!(leader = held, "alert dispatcher lease");
            }
            let wait = if held { self.lease / 3 } else { self.poll };
            tokio::time::sleep(wait).await;
        }
    }

    fn leading(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.poll).await;
            if !self.leading() {
                continue;
            }
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "alert dispatch pass failed; retrying");
            }
        }
    }

    /// Delivers every pending alert of every active tenant while the lease is held.
    async fn pass(&self) -> Result<(), ledger::Error> {
        for tenant in self.ledger.alert_tenants(chrono::Utc::now()).await? {
            loop {
                let alerts = self.ledger.pending_alerts(&tenant, 100).await?;
                if alerts.is_empty() {
                    break;
                }
                for a in alerts {
                    if !self.leading() {
                        return Ok(());
                    }
                    if !self.deliver(&a).await? {
                        return Ok(());
                    }
                    self.ledger.ack_alert(&tenant, &a.stream_id).await?;
                }
            }
        }
        if self.bypass && !self.global(ledger::store::BYPASS_CURSOR).await? {
            return Ok(());
        }
        if self.price_gaps {
            self.global(ledger::store::OPS_CURSOR).await?;
        }
        Ok(())
    }

    /// Delivers the pending events of a global stream (`cursor`: bypass or ops) while the lease
    /// is held. Returns false when the lease was lost on the way.
    async fn global(&self, cursor: &str) -> Result<bool, ledger::Error> {
        loop {
            let alerts = if cursor == ledger::store::OPS_CURSOR {
                self.ledger.pending_ops_alerts(100).await?
            } else {
                self.ledger.pending_bypass_alerts(100).await?
            };
            if alerts.is_empty() {
                return Ok(true);
            }
            for a in alerts {
                if !self.leading() || !self.deliver(&a).await? {
                    return Ok(false);
                }
                self.ledger.ack_alert(cursor, &a.stream_id).await?;
            }
        }
    }

    /// Sends one alert to every sink that does not have it yet, retrying with backoff. Returns
    /// false when the lease was lost on the way (the alert is not finished: the next lease holder
    /// resumes it from its delivery status).
    async fn deliver(&self, a: &Alert) -> Result<bool, ledger::Error> {
        let done = self.ledger.alert_deliveries(&a.id).await?;
        for sink in self.sinks.iter() {
            let mut status = done.get(&sink.cfg.name).cloned().unwrap_or_default();
            if status.state == "delivered" || status.state == "failed" {
                continue;
            }
            let mut backoff = Duration::from_millis(sink.cfg.backoff_ms);
            while status.attempts < sink.cfg.max_attempts {
                if !self.leading() {
                    return Ok(false);
                }
                status.attempts += 1;
                match self.send(sink, a).await {
                    Ok(()) => {
                        self.delivered.inc();
                        status.state = "delivered".into();
                        status.delivered_at =
                            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                        break;
                    }
                    Err(e) => {
                        self.failures.inc();
                        tracing::warn!(alert = %a.id, sink = %sink.cfg.name, attempt = status.attempts, error = %e, "alert delivery failed");
                        status.state = if status.attempts < sink.cfg.max_attempts {
                            "retrying".into()
                        } else {
                            "failed".into()
                        };
                        status.last_error = e;
                    }
                }
                self.ledger
                    .set_alert_delivery(&a.id, &sink.cfg.name, &status)
                    .await?;
                if status.state == "retrying" {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
            if status.state == "delivered" {
                self.ledger
                    .set_alert_delivery(&a.id, &sink.cfg.name, &status)
                    .await?;
                tracing::info!(alert = %a.id, sink = %sink.cfg.name, attempts = status.attempts, "alert delivered");
            }
        }
        Ok(true)
    }

    /// One POST ([`post`]).
    async fn send(&self, sink: &Sink, a: &Alert) -> Result<(), String> {
        post(&self.client, sink, a).await
    }
}

/// One POST of `a` to `sink`; Ok on a 2xx answer. The error names the status or the failure,
/// never the URL.
pub(crate) async fn post(client: &HttpsClient, sink: &Sink, a: &Alert) -> Result<(), String> {
    let body = match sink.cfg.kind {
        SinkKind::Webhook => webhook_body(a).to_string(),
        SinkKind::Slack => serde_json::json!({ "text": slack_text(a) }).to_string(),
    };
    let ts = chrono::Utc::now().timestamp();
    let mut req = http::Request::post(&sink.url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "llmwarden-alerts")
        .header("idempotency-key", &a.id);
    if let Some(secret) = &sink.secret {
        req = req.header("x-llmwarden-timestamp", ts.to_string()).header(
            "x-llmwarden-signature",
            signature(secret, ts, body.as_bytes()),
        );
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("request: {e}"))?;
    let timeout = Duration::from_millis(sink.cfg.timeout_ms);
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| format!("no answer within {} ms", sink.cfg.timeout_ms))?
        .map_err(|e| format!("connection: {e}"))?;
    let status = resp.status();
    // Read the (small) body so the connection can be reused; its content is not logged.
    let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let c: AlertsConfig = toml::from_str(
            r#"
            thresholds_pct = [25, 90]
            [[sinks]]
            name = "ops"
            kind = "webhook"
            url = "http://127.0.0.1:9/hook"
            secret_env = "X"
            [[sinks]]
            name = "chat"
            kind = "slack"
            url_env = "SLACK_URL"
            "#,
        )
        .unwrap();
        assert_eq!(c.thresholds_pct, vec![25, 90]);
        assert_eq!(c.sinks[1].kind, SinkKind::Slack);
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.sinks[0].url = Some("ftp://x".into());
        assert!(
            bad.validate()
                .unwrap_err()
                .key
                .starts_with("alerts.sinks[0]")
        );
        let mut bad = c;
        bad.thresholds_pct = vec![0];
        assert_eq!(bad.validate().unwrap_err().key, "alerts.thresholds_pct");
        assert!(toml::from_str::<AlertsConfig>("nope = 1").is_err());
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        let s = signature(b"key", 1_700_000_000, b"{}");
        // python3 -c "import hmac,hashlib;print(hmac.new(b'key',b'1700000000.{}',hashlib.sha256).hexdigest())"
        assert_eq!(
            s,
            "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
        assert_ne!(s, signature(b"key", 1_700_000_001, b"{}"));
    }

    #[test]
    fn slack_text_names_budget_and_amounts() {
        let a = Alert {
            stream_id: "1-0".into(),
            id: "acme||month|2026-12|80".into(),
            kind: "budget_threshold".into(),
            tenant: "acme".into(),
            feature: String::new(),
            period: "month".into(),
            period_id: "2026-12".into(),
            threshold_pct: 80,
            limit_nusd: 50_000_000_000,
            spend_nusd: 40_000_000_000,
            ..Alert::default()
        };
        assert_eq!(
            slack_text(&a),
            "llmwarden: tenant acme reached 80% of its month budget for 2026-12 (spent $40.00 of $50.00)"
        );
    }

    #[test]
    fn unmetered_and_price_gap_alerts_say_what_happened() {
        let un = Alert {
            kind: "first_unmetered".into(),
            tenant: "acme".into(),
            service: "agent".into(),
            provider: "anthropic".into(),
            host: "api.anthropic.com".into(),
            pid: "42".into(),
            comm: "agent".into(),
            bytes_out: 1200,
            bytes_in: 9000,
            ..Alert::default()
        };
        assert_eq!(
            slack_text(&un),
            "llmwarden: service agent opened a connection to anthropic (api.anthropic.com) that no probe could meter: its spend is unknown (tenant acme, process agent pid 42, 1200 bytes out, 9000 in)"
        );
        assert_eq!(webhook_body(&un)["bytes_in"], 9000);
        let gap = Alert {
            kind: "price_gap".into(),
            tenant: "acme".into(),
            provider: "openai".into(),
            model: "acme-internal-1".into(),
            path: "enforcer".into(),
            ..Alert::default()
        };
        assert_eq!(
            slack_text(&gap),
            "llmwarden: model acme-internal-1 of openai has no price; the enforcer billed it at unknown_model_price (tenant acme). Add it to the price table."
        );
        assert_eq!(webhook_body(&gap)["service"], serde_json::Value::Null);
    }
}
