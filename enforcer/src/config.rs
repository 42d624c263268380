//! The enforcer's TOML configuration: serde structs with commented defaults, validated at start-up
//! with errors that name the exact key. Secrets are never in the file, only the names of the
//! environment variables that hold them (`*_env`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use ledger::provider::ProviderKind;
use ledger::store::Period;
use serde::{Deserialize, Serialize};

/// The settle window without a lease pool (ms). Every call reserves, and at high concurrency a
/// reserve queued behind a larger settle batch waits for its script: on the bench VM a 10 ms window
/// cost ~1.5% of the calls at concurrency 64 (docs/benchmarks.md, "A longer settle window").
pub const SETTLE_WINDOW_MS: u64 = 2;

/// The settle window with a lease pool (ms). Most calls reserve nothing, so settles can wait for
/// more company: against 10 ms, at one sequential client (a call every ~21 ms) 100 ms cut the
/// enforcer's CPU per call by ~28% and Redis's by ~45%, and at 500 req/s Redis's by ~33%, with no
/// change at concurrency 64, where a window's settles fill a whole batch and leave at once
/// (docs/benchmarks.md, "A settle window of 100 ms with a pool"). Like the window without a pool,
/// capped at a quarter of `timeouts.redis_ms`, which the wait counts against.
pub const SETTLE_WINDOW_POOLED_MS: u64 = 100;

/// A configuration problem, naming the key and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    /// The dotted key ("providers.openai.base_url").
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

pub use ledger::billing::{DefaultPrice, UnknownModel};

/// What to do when Redis cannot be reached within `timeouts.redis_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisUnavailable {
    /// Answer 503 in the provider's error shape (fail closed). The default.
    #[default]
    Deny,
    /// Admit the call without a reservation and count it in `llmwarden_redis_unavailable_admissions_total`.
    Allow,
}

/// OpenAI Responses `background: true` requests: their creation returns no usage (the output
/// comes later from `GET /responses/{id}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackgroundResponses {
    /// Refused with 400 `usage_suppressed`. The default.
    #[default]
    Deny,
    /// Admitted and settled at their reservation (the worst case), flagged estimated.
    Reserve,
}

/// How `[[budgets]]` from the file meet budgets already in Redis at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetSeed {
    /// Write a file budget only when Redis has none for its tenant/feature/period: once seeded,
    /// Redis (and PUT /budgets) is the source of truth. The default.
    #[default]
    Seed,
    /// Write every file budget at each start, overwriting live edits of the same slot.
    Overwrite,
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Proxy listener (HTTP/1.1 and h2c; TLS when `tls_cert_file` is set).
    pub listen: String,
    /// Admin listener; "" or "off" disables it.
    pub admin_listen: String,
    /// Environment variable holding the admin bearer token (required when the admin listener is on).
    pub admin_token_env: String,
    /// Redis: `redis://[user@]host:port[/db]`, `rediss://` (TLS), `redis+cluster://h1:p1,h2:p2`,
    /// `rediss+cluster://...`.
    pub redis_url: String,
    /// Environment variable holding the Redis password (ACL user from the URL); unset: the URL's.
    pub redis_password_env: Option<String>,
    /// PEM CA bundle that signed the Redis server's certificate (`rediss://`); unset: the system's.
    pub redis_ca_file: Option<PathBuf>,
    /// Optional PEM certificate chain for a TLS proxy listener.
    pub tls_cert_file: Option<PathBuf>,
    /// Optional PEM private key for the TLS proxy listener.
    pub tls_key_file: Option<PathBuf>,
    /// Optional LiteLLM-format price file layered over the built-in table.
    pub prices_file: Option<PathBuf>,
    /// "deny" (default) or "allow" (at `unknown_model_price`).
    pub unknown_model: UnknownModel,
    /// Price of models missing from the table when `unknown_model = "allow"`.
    pub unknown_model_price: DefaultPrice,
    /// Model names priced as another model: Azure OpenAI deployment names, internal aliases
    /// (`"prod-chat" = "gpt-4o-mini"`).
    pub model_aliases: BTreeMap<String, String>,
    /// "deny" (default, 503) or "allow" when Redis is unreachable.
    pub on_redis_unavailable: OnRedisUnavailable,
    /// Worst-case USD one instance may admit per UTC day without reservations while Redis is down
    /// (`on_redis_unavailable = "allow"`); past it calls get 503.
    pub redis_unavailable_cap_usd: f64,
    /// This instance's id: tags its holds in Redis and names its spool, so a restart with the same
    /// config finds what the previous run left. Default "<hostname>-<listen port>".
    pub instance_id: String,
    /// Where usage that could not be written to Redis waits (fsync'd) for replay. Default
    /// `/var/lib/llmwarden/spool/<instance_id>/`.
    pub spool_dir: Option<PathBuf>,
    /// Bound of the spool in bytes; when full, usage that cannot reach Redis is refused and
    /// counted (`llmwarden_spool_refused`). Default 256 MiB.
    pub spool_max_bytes: u64,
    /// How a reservation lives if never settled (seconds); must exceed the longest call.
    pub reserve_ttl_secs: u64,
    /// Removed: it clamped the output reserved for a request without a limit below what the
    /// model can bill. Kept only to refuse it with the fix (`output_token_limits`).
    #[serde(skip_serializing)]
    pub max_output_tokens_cap: Option<u64>,
    /// Output tokens reserved per choice for a request without a limit, by model; default: the
    /// model's own maximum from the price table (a lower figure can under-reserve).
    pub output_token_limits: BTreeMap<String, u64>,
    /// Input tokens reserved for a request that refers to context the enforcer cannot see
    /// (`previous_response_id`, `cachedContent`, file ids, hosted tools); default: the model's
    /// context window.
    pub unseen_context_tokens: Option<u64>,
    /// Percent added to the input token estimate when the tokenizer is not exact for the model.
    pub input_estimate_margin_pct: u64,
    /// Client connections the proxy listener serves at once; past it, new connections wait in the
    /// kernel's accept queue until one closes.
    pub max_connections: usize,
    /// Proxy runtime threads, each serving its connections start to end with its own Redis
    /// connection and upstream pools; 0 (the default) is one per CPU.
    pub proxy_threads: usize,
    /// Milliseconds a settle waits for others of its tenant to share one Redis script, when none
    /// is in flight (`ledger::store::LedgerConfig::settle_window`); 0 sends each at once. Unset:
    /// [`Config::settle_window`] picks it from `lease_pool`.
    pub settle_window_ms: Option<u64>,
    /// Spare holds kept per tenant so most calls are forwarded without a Redis round trip first
    /// (enforcer/src/lease.rs, docs/enforcer.md "Lease pool"); 0 (the default) is off.
    pub lease_pool: usize,
    /// Seconds a spare hold may wait for a call before it is released.
    pub lease_idle_secs: u64,
    /// The largest spare hold (USD): calls whose worst case is above it reserve their own.
    pub lease_max_usd: f64,
    /// Concurrent requests (streams) one h2 connection may carry.
    pub max_streams_per_connection: u32,
    /// Largest request body accepted (bytes); larger gets 413.
    pub max_request_body_bytes: usize,
    /// Largest non-stream response body buffered to price it (bytes); larger gets 502.
    pub max_response_body_bytes: usize,
    /// Bytes of request bodies (and buffered non-stream responses) held at once, over all calls;
    /// a call whose request body does not fit gets 503 before anything is held or sent.
    pub max_inflight_body_bytes: usize,
    /// Forward POSTs to endpoints the enforcer cannot meter ("deny", the default, or "allow").
    pub unmetered_endpoints: UnknownModel,
    /// OpenAI Responses `background: true`: "deny" (default) or "reserve" (billed at the
    /// reservation, since the creation carries no usage).
    pub background_responses: BackgroundResponses,
    /// How long the enforcer remembers which tenant created a stored response or completion
    /// (only its creator may read it back). Default 30 days, OpenAI's retention.
    pub object_ttl_secs: u64,
    /// "seed" (default) or "overwrite": see [`BudgetSeed`].
    pub budgets_from_config: BudgetSeed,
    /// Accept keys made at runtime (admin API `POST /keys`, `enforcer keys create`), stored
    /// hashed in Redis and reloaded within `runtime_keys_refresh_ms` (default true, 250 ms).
    pub runtime_keys: bool,
    /// How often each replica asks Redis whether a runtime key changed (one HGET).
    pub runtime_keys_refresh_ms: u64,
    /// Log format: "json" (default) or "text".
    pub log_format: String,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Agentic-loop protection per X-Session-ID.
    pub session: SessionConfig,
    /// Metrics label cardinality bounds.
    pub metrics: MetricsConfig,
    /// Upstream providers by name (the `{provider}` of `/proxy/{provider}/...`).
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Proxy keys (hashed) and the tenants they may bill.
    pub keys: Vec<KeyConfig>,
    /// Budgets seeded into Redis at start.
    pub budgets: Vec<BudgetConfig>,
    /// Budget-aware downgrades: when a cap would deny a model, the next model of a chain.
    pub downgrades: Vec<DowngradeConfig>,
    /// Request and token rate limits per tenant and per tenant + model.
    pub rate_limits: Vec<RateLimitConfig>,
    /// Budget alerts: thresholds and where they are delivered (docs/audit.md).
    pub alerts: crate::alerting::AlertsConfig,
}

/// A rate limit over the last 60 seconds: per tenant, or (with `model`) per tenant and model.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Tenant, or "*" (default): every tenant, each counted on its own.
    pub tenant: String,
    /// A model glob: the limit applies per tenant and model (each model its own window).
    pub model: Option<String>,
    /// Requests per minute (0: none).
    pub rpm: u64,
    /// Tokens per minute (0: none): input estimate + output limit at admission, corrected to
    /// the real count at settle.
    pub tpm: u64,
}

/// One downgrade chain: calls of `tenant` (and `feature`) to a model matching `from` that a
/// budget would deny are reserved and sent as the first model of `to` that fits.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DowngradeConfig {
    /// Tenant, or "*" (default) for every tenant.
    pub tenant: String,
    /// Only calls billing this feature (default: any).
    pub feature: Option<String>,
    /// A model glob, e.g. "gpt-4o" or "claude-sonnet-*".
    pub from: String,
    /// Models to try, in order, each reserved atomically against every cap.
    pub to: Vec<String>,
    /// The provider route the downgraded call goes to (another key, region or host of the same
    /// API kind; default: the call's own route).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:8081".into(),
            admin_token_env: "WARDEN_ADMIN_TOKEN".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_password_env: None,
            redis_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            prices_file: None,
            unknown_model: UnknownModel::Deny,
            unknown_model_price: DefaultPrice::default(),
            model_aliases: BTreeMap::new(),
            on_redis_unavailable: OnRedisUnavailable::Deny,
            redis_unavailable_cap_usd: 10.0,
            instance_id: String::new(),
            spool_dir: None,
            spool_max_bytes: 256 << 20,
            // 15 minutes: longer than any sane completion, short enough that a crash frees budget soon.
            reserve_ttl_secs: 900,
            max_output_tokens_cap: None,
            output_token_limits: BTreeMap::new(),
            unseen_context_tokens: None,
            input_estimate_margin_pct: 10,
            max_connections: 4096,
            proxy_threads: 0,
            settle_window_ms: None,
            lease_pool: 0,
            lease_idle_secs: 10,
            lease_max_usd: 1.0,
            max_streams_per_connection: 100,
            // 32 MiB: large enough for base64 images in a prompt.
            max_request_body_bytes: 32 << 20,
            max_response_body_bytes: 256 << 20,
            // 96 MiB: one maximum-size request (counted three times its size), or hundreds of
            // ordinary ones, at once; keeps 64 worst-case calls under 256 MiB of RSS.
            max_inflight_body_bytes: 96 << 20,
            unmetered_endpoints: UnknownModel::Deny,
            background_responses: BackgroundResponses::Deny,
            object_ttl_secs: 30 * 24 * 3600,
            budgets_from_config: BudgetSeed::Seed,
            runtime_keys: true,
            runtime_keys_refresh_ms: 250,
            log_format: "json".into(),
            timeouts: Timeouts::default(),
            session: SessionConfig::default(),
            metrics: MetricsConfig::default(),
            providers: BTreeMap::new(),
            keys: Vec::new(),
            budgets: Vec::new(),
            downgrades: Vec::new(),
            rate_limits: Vec::new(),
            alerts: crate::alerting::AlertsConfig::default(),
        }
    }
}

/// Per-call deadlines (milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// TCP + TLS connect to the upstream.
    pub connect_ms: u64,
    /// From sending the request to the upstream's response head.
    pub first_byte_ms: u64,
    /// Longest silence between two body chunks of the upstream response.
    pub idle_ms: u64,
    /// Each Redis operation on the hot path (reserve, loop counters).
    pub redis_ms: u64,
    /// A client must send its request head, and separately its whole body, within this (slow
    /// clients: the connection is closed, or the call gets 400).
    pub client_ms: u64,
    /// A client connection (HTTP/1.1 keep-alive, h2, h2c; proxy and admin) with no request in
    /// flight for this long is closed (h2: GOAWAY first).
    pub connection_idle_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        // Non-stream reasoning calls may think for minutes before the head arrives.
        Timeouts {
            connect_ms: 5_000,
            first_byte_ms: 600_000,
            idle_ms: 120_000,
            redis_ms: 1_000,
            client_ms: 30_000,
            connection_idle_ms: 120_000,
        }
    }
}

/// Loop protection per X-Session-ID; every limit is off when unset.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Cumulative spend cap of one session (USD).
    pub limit_usd: Option<f64>,
    /// Requests one session may make per minute.
    pub max_requests_per_minute: Option<u64>,
    /// Identical request bodies one session may send within `identical_window_secs`.
    pub max_identical_requests: Option<u64>,
    /// Window for `max_identical_requests` (seconds, default 300).
    pub identical_window_secs: Option<u64>,
}

/// Bounds on metric label values (the rest are folded into "other").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Distinct tenants labelled individually.
    pub max_tenants: usize,
    /// Distinct models labelled individually.
    pub max_models: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_tenants: 100,
            max_models: 50,
        }
    }
}

impl Config {
    /// How long a settle of an idle tenant waits for company: `settle_window_ms` when set, else
    /// [`SETTLE_WINDOW_POOLED_MS`] with a lease pool and [`SETTLE_WINDOW_MS`] without one, either
    /// at most a quarter of `timeouts.redis_ms`, which the wait counts against.
    #[must_use]
    pub fn settle_window(&self) -> std::time::Duration {
        let default = if self.lease_pool > 0 {
            SETTLE_WINDOW_POOLED_MS
        } else {
            SETTLE_WINDOW_MS
        };
        let ms = self
            .settle_window_ms
            .unwrap_or(default.min(self.timeouts.redis_ms / 4));
        std::time::Duration::from_millis(ms)
    }

    /// How the ledger connects to Redis: `timeout` per reply, connect and operation, plus the
    /// password and CA the config names (read now, so a missing Secret fails at start).
    ///
    /// # Errors
    /// The variable or file named by `redis_password_env` / `redis_ca_file` is missing or bad.
    pub fn ledger_config(
        &self,
        timeout: std::time::Duration,
    ) -> Result<ledger::store::LedgerConfig, ledger::Error> {
        ledger::store::LedgerConfig {
            response_timeout: timeout,
            operation_timeout: timeout,
            connection_timeout: timeout,
            alert_thresholds_pct: self.alerts.thresholds_pct.clone(),
            settle_window: self.settle_window(),
            ..ledger::store::LedgerConfig::default()
        }
        .with_credentials(
            self.redis_password_env.as_deref(),
            self.redis_ca_file.as_deref(),
        )
    }

    /// The number of proxy runtime threads: `proxy_threads`, or one per CPU.
    #[must_use]
    pub fn proxy_threads(&self) -> usize {
        match self.proxy_threads {
            0 => cpus(),
            n => n,
        }
    }

    /// The billing policy's part of the config.
    #[must_use]
    pub fn pricing(&self) -> ledger::billing::PricingConfig {
        ledger::billing::PricingConfig {
            prices_file: self.prices_file.clone(),
            unknown_model: self.unknown_model,
            unknown_model_price: self.unknown_model_price.clone(),
            model_aliases: self.model_aliases.clone(),
            output_token_limits: self.output_token_limits.clone(),
            unseen_context_tokens: self.unseen_context_tokens,
        }
    }
}

/// One upstream provider.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// Upstream base URL; `/proxy/{name}/{rest}` goes to `{base_url}/{rest}`.
    pub base_url: Option<String>,
    /// Environment variable holding the real provider key.
    pub api_key_env: Option<String>,
    /// API family; defaults from the name for openai/anthropic/gemini.
    pub kind: Option<ProviderKind>,
    /// Extra CA certificates (PEM) trusted for this upstream, besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Add `stream_options.include_usage` to OpenAI-family chat streams (default true); turn it off
    /// for servers that reject the field (such streams are then billed from an estimate).
    pub inject_include_usage: Option<bool>,
    /// This upstream's share of first attempts among itself and its `failover` routes (default
    /// 1; 0: only tried after another failed).
    pub weight: Option<u32>,
    /// Other provider routes of the same kind (another key, region or host) tried, in order,
    /// when an attempt fails before any response byte: connect error, 429 or 5xx. They also
    /// share first attempts by weight. The call keeps its one reservation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<Vec<String>>,
    /// `azure-openai` only: model → deployment name, for calls this route takes as a failover
    /// of an OpenAI-family route (the model is in the body there, in the path here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployments: Option<BTreeMap<String, String>>,
    /// `azure-openai` only: the `api-version` sent with those calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
}

/// One proxy key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyConfig {
    /// Lowercase hex sha256 of the key (`enforcer hash-key`).
    pub sha256: String,
    /// Tenant billed when the request names none.
    pub tenant: String,
    /// Tenants the key may name in X-Tenant-ID: ["*"] or a list (default: only its own).
    pub allowed_tenants: Vec<String>,
    /// Features the key may bill (X-Feature-Name); the first is used when the header is absent,
    /// and a feature outside the list is refused (403). Empty: any feature, none by default.
    pub features: Vec<String>,
    /// With `allowed_tenants = ["*"]`: may the key bill a tenant that has no budget of its own
    /// (only the "*" default)? Off by default, so a wildcard key cannot mint an unlimited number
    /// of tenants, each with a fresh default budget.
    pub mint_tenants: bool,
    /// Unmetered requests this key may make beyond the defaults (model listings, its tenant's
    /// own stored objects): globs over `"METHOD /path"` (path after `/proxy/{provider}`), e.g.
    /// `["GET /v1/files*"]`. They go out with the shared provider key: trusted callers only.
    pub open_paths: Vec<String>,
    /// Models the key may call, as globs (`["gpt-4o*", "claude-*"]`); another model is refused
    /// (403 `model_forbidden`). Empty: any.
    pub allowed_models: Vec<String>,
    /// Provider routes the key may use (`["openai"]`); another is refused (403
    /// `provider_forbidden`). Empty: any.
    pub allowed_providers: Vec<String>,
    /// Requests per minute through this key (per tenant it bills; 0: none).
    pub rpm: u64,
    /// Tokens per minute through this key (per tenant it bills; 0: none).
    pub tpm: u64,
}

/// One budget seeded from the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Tenant or "*".
    pub tenant: String,
    /// Optional feature (X-Feature-Name).
    #[serde(default)]
    pub feature: Option<String>,
    /// "day" or "month".
    pub period: Period,
    /// Limit in USD.
    pub limit_usd: f64,
}

/// A provider with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// The route name.
    pub name: String,
    /// API family.
    pub kind: ProviderKind,
    /// Base URL without a trailing slash.
    pub base_url: String,
    /// Environment variable of the real key.
    pub api_key_env: String,
    /// Extra CA file.
    pub ca_file: Option<PathBuf>,
    /// Whether OpenAI chat streams get include_usage injected.
    pub inject_include_usage: bool,
    /// Share of first attempts (among itself and `failover`).
    pub weight: u32,
    /// Routes tried after a failure before any response byte, in order.
    pub failover: Vec<String>,
    /// `azure-openai`: model → deployment, for calls taken as a failover of an OpenAI route.
    pub deployments: BTreeMap<String, String>,
    /// `azure-openai`: the `api-version` of those calls.
    pub api_version: Option<String>,
}

/// The CPUs this process may use (2 when the system does not say).
#[must_use]
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
}

mod check;
pub use check::{check_downgrades, check_rate_limits};
mod validate;

#[cfg(test)]
mod tests;
