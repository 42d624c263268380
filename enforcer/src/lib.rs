//! llmwarden's enforcer: a drop-in base URL for the official LLM SDKs that reserves the
//! worst-case cost of each call in the shared Redis ledger before forwarding it, streams the
//! answer back untouched while metering it, and settles the real cost afterwards.
//!
//! One module per concern: [`config`], [`auth`], [`route`], [`budget`], [`loop_guard`],
//! [`forward`] (upstream client), [`meter`] (response metering), [`settle`] (pricing and
//! settlement), [`proxy`] (the hot path), [`admin`], [`metrics`], [`report`], [`server`].

pub mod admin;
pub mod auth;
pub mod budget;
pub mod config;
pub mod error;
pub mod forward;
pub mod loop_guard;
pub mod meter;
pub mod metrics;
pub mod proxy;
pub mod recovery;
pub mod report;
pub mod route;
pub mod server;
pub mod settle;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use ledger::Nanos;
use ledger::store::{Ledger, LedgerConfig};

use crate::auth::KeyStore;
use crate::budget::BudgetCache;
use crate::config::{Config, Provider};
use crate::error::ProxyError;
use crate::forward::Upstreams;
use crate::loop_guard::LoopGuard;
use crate::metrics::Metrics;
use crate::settle::Pricing;

/// The header naming the enforcer's id of a call (also its reservation id).
pub const REQUEST_ID_HEADER: &str = "x-warden-request-id";

/// The body type of every response the enforcer sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, meter::BoxError>;

/// A complete body.
#[must_use]
pub fn full_body(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

/// An amount as a plain decimal USD string with nine decimals ("0.000167550"), for headers.
#[must_use]
pub fn usd_string(n: Nanos) -> String {
    let sign = if n.0 < 0 { "-" } else { "" };
    let a = n.0.unsigned_abs();
    format!("{sign}{}.{:09}", a / 1_000_000_000, a % 1_000_000_000)
}

/// Shared state of a running enforcer.
pub struct App {
    /// The validated config.
    pub cfg: Config,
    /// Providers by route name.
    pub providers: BTreeMap<String, Provider>,
    /// Real provider keys by provider name (read from the environment at start).
    upstream_keys: BTreeMap<String, String>,
    /// Proxy keys.
    pub keys: KeyStore,
    /// Upstream clients.
    pub upstreams: Upstreams,
    /// The Redis ledger.
    pub ledger: Ledger,
    /// Cached budgets.
    pub budgets: BudgetCache,
    /// Loop protection.
    pub loops: LoopGuard,
    /// Prices.
    pub pricing: Arc<Pricing>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Allowance for unreserved admissions while Redis is down.
    pub emergency: budget::EmergencyCap,
    /// Admin token (None when the admin listener is off).
    pub admin_token: Option<String>,
    /// This instance's id (tags its holds, names its spool).
    pub instance: String,
    /// Usage waiting for Redis.
    pub spool: ledger::spool::Spool,
    /// Replays the spool while the enforcer runs.
    pub replayer: ledger::spool::Replayer,
    /// Settles running after their response was sent; shutdown waits for them.
    pub settles: tokio_util::task::TaskTracker,
    /// Token counts of prompt texts seen recently (per tenant), for the input estimate.
    pub token_cache: ledger::request::TokenCache,
}

impl App {
    /// Builds the state from a validated config: reads secrets from the environment, loads
    /// prices, connects to Redis (lazily, so the enforcer starts while Redis is down).
    ///
    /// # Errors
    /// A message naming the key or variable at fault.
    pub async fn build(cfg: Config) -> Result<App, String> {
        let providers = cfg.resolved_providers().map_err(|e| e.to_string())?;
        let mut upstream_keys = BTreeMap::new();
        for p in providers.values() {
            match std::env::var(&p.api_key_env) {
                Ok(v) if !v.is_empty() => {
                    upstream_keys.insert(p.name.clone(), v);
                }
                _ if cfg.providers.contains_key(&p.name) => {
                    return Err(format!(
                        "providers.{}.api_key_env: environment variable {} is not set",
                        p.name, p.api_key_env
                    ));
                }
                _ => {}
            }
        }
        let admin_token = match cfg.admin_addr() {
            None => None,
            Some(_) => match std::env::var(&cfg.admin_token_env) {
                Ok(t) if !t.is_empty() => Some(t),
                _ => {
                    return Err(format!(
                        "admin_token_env: environment variable {} is not set; set it or disable the admin listener with admin_listen = \"off\"",
                        cfg.admin_token_env
                    ));
                }
            },
        };
        let pricing = Arc::new(Pricing::from_config(&cfg)?);
        let refs: Vec<&Provider> = providers.values().collect();
        let upstreams = Upstreams::new(&refs, &cfg.timeouts)?;
        let redis_timeout = Duration::from_millis(cfg.timeouts.redis_ms);
        let lcfg = LedgerConfig {
            response_timeout: redis_timeout,
            operation_timeout: redis_timeout,
            connection_timeout: redis_timeout,
            ..LedgerConfig::default()
        };
        let instance = recovery::instance_id(&cfg);
        let ledger = Ledger::connect_lazy(&cfg.redis_url, lcfg)
            .await
            .map_err(|e| format!("redis_url: {e}"))?
            .with_instance(&instance);
        let spool = recovery::open_spool(&cfg, &instance)?;
        let replayer = recovery::start(&spool, &ledger, instance.clone(), chrono::Utc::now());
        let budgets = BudgetCache::new(ledger.clone(), cfg.session_cap());
        let loops = LoopGuard::new(&cfg.redis_url, &cfg.session, redis_timeout);
        let metrics = Arc::new(Metrics::new(&cfg.metrics));
        let keys = KeyStore::new(&cfg.keys);
        let emergency = budget::EmergencyCap::new(
            Nanos::from_usd_f64(cfg.redis_unavailable_cap_usd).unwrap_or(Nanos::ZERO),
        );
        Ok(App {
            cfg,
            providers,
            upstream_keys,
            keys,
            upstreams,
            ledger,
            budgets,
            loops,
            pricing,
            metrics,
            emergency,
            admin_token,
            instance,
            spool,
            replayer,
            settles: tokio_util::task::TaskTracker::new(),
            token_cache: ledger::request::TokenCache::new(),
        })
    }

    /// The real key for `p`.
    ///
    /// # Errors
    /// [`ProxyError::NoUpstreamKey`] when its variable was empty at start.
    pub fn upstream_key(&self, p: &Provider) -> Result<&str, ProxyError> {
        self.upstream_keys
            .get(&p.name)
            .map(String::as_str)
            .ok_or_else(|| ProxyError::NoUpstreamKey {
                provider: p.name.clone(),
                env: p.api_key_env.clone(),
            })
    }
}
