//! llmwarden's enforcer: a drop-in base URL for the official LLM SDKs that reserves the
//! worst-case cost of each call in the shared Redis ledger before forwarding it, streams the
//! answer back untouched while metering it, and settles the real cost afterwards.
//!
//! The request path ([`proxy`]) runs named phases over one per-call context ([`call::Call`]):
//! [`admit`] (route, auth, attribution, parse) → [`decide`] (loop check, worst case,
//! [`budget::Budgets::reserve`] → a [`budget::Hold`]) → [`forward`] → [`meter`] → [`settle`].
//! Billing policy and every Redis key belong to the `ledger` crate. Around the path: [`config`],
//! [`auth`], [`keys`], [`route`], [`loop_guard`], [`usage_filter`], [`usage_params`], [`admin`], [`metrics`], [`report`],
//! [`recovery`], [`server`].

pub mod access;
pub mod admin;
pub mod admin_keys;
pub mod admin_rules;
pub mod admit;
pub mod alerting;
pub mod alloc;
pub mod audit_export;
pub mod auth;
pub mod budget;
pub mod call;
pub mod config;
pub mod decide;
pub mod downgrade;
pub mod error;
pub mod forward;
pub mod inflight;
pub mod keys;
pub mod lease;
pub mod logs;
pub mod loop_guard;
pub mod meter;
pub mod metrics;
pub mod proxy;
pub mod rate;
pub mod recovery;
pub mod report;
pub mod route;
pub mod rules;
pub mod server;
pub mod settle;
mod spool_alert;
pub mod usage_filter;
pub mod usage_params;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use ledger::Nanos;
use ledger::billing::Pricing;
use ledger::durable::DurableLedger;
use ledger::store::Ledger;

use crate::auth::KeyStore;
use crate::budget::Budgets;
use crate::config::{Config, Provider};
use crate::error::{ProxyError, StartError};
use crate::forward::Upstreams;
use crate::loop_guard::LoopGuard;
use crate::metrics::Metrics;

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
    Usd::new(n).as_str().to_owned()
}

/// [`usd_string`]'s text on the stack: every call writes it (log line, cost header), and
/// `format!` there cost two allocations and the formatting machinery per amount.
pub struct Usd {
    buf: [u8; Usd::MAX],
    start: usize,
}

impl Usd {
    /// "-9223372036.854775807": the longest an `i64` of nano-USD gets.
    const MAX: usize = 21;

    /// `n` as USD text.
    #[must_use]
    pub fn new(n: Nanos) -> Usd {
        let a = n.0.unsigned_abs();
        let mut buf = [b'0'; Usd::MAX];
        let mut digits = itoa::Buffer::new();
        // Nine decimals, zero-padded on the left: the `0` the buffer starts with.
        let frac = digits.format(a % 1_000_000_000).as_bytes();
        buf[Usd::MAX - frac.len()..].copy_from_slice(frac);
        let dot = Usd::MAX - 10;
        buf[dot] = b'.';
        let whole = digits.format(a / 1_000_000_000).as_bytes();
        let mut start = dot - whole.len();
        buf[start..dot].copy_from_slice(whole);
        if n.0 < 0 {
            start -= 1;
            buf[start] = b'-';
        }
        Usd { buf, start }
    }

    /// The text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        // Only ASCII digits, '.' and '-' are ever written.
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or_default()
    }
}

/// Shared state of a running enforcer.
pub struct App {
    /// The validated config.
    pub cfg: Config,
    /// Providers by route name.
    pub providers: BTreeMap<String, Provider>,
    /// Real provider keys by provider name (read from the environment at start), as the
    /// header each provider reads.
    upstream_keys: BTreeMap<String, route::Credential>,
    /// The `Host` header of each route's requests by provider name (built at start).
    upstream_hosts: BTreeMap<String, route::HostHeader>,
    /// Proxy keys of the config file.
    pub keys: KeyStore,
    /// Budget-aware downgrade chains and rate limits, from the file or the admin API.
    pub rules: Arc<rules::LiveRules>,
    /// Proxy keys made at runtime (`None` with `runtime_keys = false`).
    pub runtime_keys: Option<keys::RuntimeKeys>,
    /// Upstream clients.
    pub upstreams: Upstreams,
    /// The Redis ledger.
    pub ledger: Ledger,
    /// The ledger with this instance's spool: where usage is written.
    pub durable: DurableLedger,
    /// Budgets: the cached caps and the reserve.
    pub budgets: Budgets,
    /// Loop protection.
    pub loops: LoopGuard,
    /// The billing policy (prices, unknown models).
    pub pricing: Arc<Pricing>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Admin token (None when the admin listener is off).
    pub admin_token: Option<String>,
    /// This instance's id (tags its holds, names its spool).
    pub instance: String,
    /// Replays the spool while the enforcer runs.
    pub replayer: ledger::spool::Replayer,
    /// Settles running after their response was sent; shutdown waits for them.
    pub settles: tokio_util::task::TaskTracker,
    /// Bytes of bodies held by calls in flight (`max_inflight_body_bytes`).
    pub inflight: Arc<inflight::InflightBudget>,
    /// Large bodies parsed and tokenised at once (one per CPU), so that many large prompts
    /// neither stall the async workers nor hold their parse trees all at the same time.
    pub parse_slots: tokio::sync::Semaphore,
    /// Token counts of prompt texts seen recently (per tenant), for the input estimate.
    pub token_cache: Arc<ledger::request::TokenCache>,
}

impl App {
    /// Builds the state from a validated config: reads secrets from the environment, loads
    /// prices, connects to Redis (lazily, so the enforcer starts while Redis is down).
    ///
    /// # Errors
    /// A [`StartError`] naming the key or variable at fault.
    pub async fn build(cfg: Config) -> Result<App, StartError> {
        let providers = cfg.resolved_providers()?;
        let upstream_keys = upstream_keys(&cfg, &providers)?;
        let upstream_hosts = providers
            .values()
            .filter_map(|p| Some((p.name.clone(), route::HostHeader::new(&p.base_url)?)))
            .collect();
        let admin_token =
            match cfg.admin_addr() {
                None => None,
                Some(_) => Some(env_secret(&cfg.admin_token_env).ok_or_else(|| {
                    StartError::MissingEnv {
                        key: "admin_token_env".into(),
                        var: cfg.admin_token_env.clone(),
                        hint: "; set it or disable the admin listener with admin_listen = \"off\"",
                    }
                })?),
            };
        let pricing = Arc::new(Pricing::load(&cfg.pricing()).map_err(StartError::Pricing)?);
        let refs: Vec<&Provider> = providers.values().collect();
        let threads = cfg.proxy_threads();
        let upstreams = Upstreams::new(&refs, &cfg.timeouts, threads)?;
        let redis_timeout = Duration::from_millis(cfg.timeouts.redis_ms);
        let lcfg = ledger::store::LedgerConfig {
            thread_connections: threads,
            ..cfg
                .ledger_config(redis_timeout)
                .map_err(StartError::Redis)?
        };
        let instance = recovery::instance_id(&cfg);
        let ledger = Ledger::connect_lazy(&cfg.redis_url, lcfg)
            .await
            .map_err(StartError::Redis)?
            .with_instance(&instance);
        let spool = recovery::open_spool(&cfg, &instance)?;
        let replayer = recovery::start(&spool, &ledger, instance.clone(), chrono::Utc::now());
        let metrics = Arc::new(Metrics::new(&cfg.metrics));
        // Built now rather than by the first call that needs one: that call's thread would stall
        // every call it carries for tens of milliseconds (docs/enforcer.md, "Runtime threads").
        // Only routes that can be called (a provider without its key is unavailable).
        if upstream_keys
            .keys()
            .filter_map(|name| providers.get(name))
            .any(|p| p.kind.counts_with_bpe())
        {
            let t = std::time::Instant::now();
            tokio::task::spawn_blocking(ledger::load_tokenizers)
                .await
                .map_err(|e| StartError::Tokenizers(e.to_string()))?;
            tracing::info!(
                ms = t.elapsed().as_millis(),
                "tokenizers loaded (o200k_base, cl100k_base)"
            );
        }
        Ok(App {
            budgets: Budgets::new(ledger.clone(), &cfg, metrics.leases.clone()),
            loops: LoopGuard::new(ledger.clone(), &cfg.session),
            inflight: inflight::InflightBudget::new(
                cfg.max_inflight_body_bytes,
                metrics.inflight_body_bytes.clone(),
            ),
            metrics,
            keys: KeyStore::new(&cfg.keys),
            rules: Arc::new(rules::LiveRules::new(
                ledger.clone(),
                cfg.downgrades.clone(),
                cfg.rate_limits.clone(),
            )),
            runtime_keys: cfg
                .runtime_keys
                .then(|| keys::RuntimeKeys::new(ledger.clone())),
            durable: DurableLedger::new(ledger.clone(), spool),
            cfg,
            providers,
            upstream_keys,
            upstream_hosts,
            upstreams,
            ledger,
            pricing,
            admin_token,
            instance,
            replayer,
            settles: tokio_util::task::TaskTracker::new(),
            parse_slots: tokio::sync::Semaphore::new(config::cpus()),
            token_cache: Arc::new(ledger::request::TokenCache::new()),
        })
    }

    /// The key a caller presented: the config file's keys first (compared in constant time),
    /// then the runtime keys (looked up by the secret's sha256, so timing reveals nothing about
    /// a secret either).
    #[must_use]
    pub fn authenticate(&self, key: &str) -> Option<Arc<auth::KeyEntry>> {
        use sha2::Digest as _;
        let digest: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
        if let Some(e) = self.keys.authenticate_digest(&digest) {
            return Some(e.clone());
        }
        self.runtime_keys
            .as_ref()?
            .authenticate_digest(&digest, chrono::Utc::now())
    }

    /// The real key for `p`, as the header that carries it.
    ///
    /// # Errors
    /// [`ProxyError::NoUpstreamKey`] when its variable was empty at start, or held a key no
    /// header can carry.
    pub fn upstream_key(&self, p: &Provider) -> Result<&route::Credential, ProxyError> {
        self.upstream_keys
            .get(&p.name)
            .ok_or_else(|| ProxyError::NoUpstreamKey {
                provider: p.name.clone(),
                env: p.api_key_env.clone(),
            })
    }

    /// The `Host` header of a request to `uri` on route `p`, when `uri` is at the route's own
    /// base (built at start; otherwise the client builds it).
    #[must_use]
    pub fn upstream_host(&self, p: &Provider, uri: &http::Uri) -> Option<&http::HeaderValue> {
        self.upstream_hosts.get(&p.name)?.value_for(uri)
    }
}

/// A non-empty environment variable.
fn env_secret(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

/// The real provider keys by provider name; a configured provider without its key (or with one
/// no HTTP header can carry) is an error, a built-in one the config does not mention is simply
/// unavailable.
fn upstream_keys(
    cfg: &Config,
    providers: &BTreeMap<String, Provider>,
) -> Result<BTreeMap<String, route::Credential>, StartError> {
    let mut keys = BTreeMap::new();
    for p in providers.values() {
        let configured = cfg.providers.contains_key(&p.name);
        match env_secret(&p.api_key_env) {
            Some(v) => match route::Credential::new(p.kind, &v) {
                Some(c) => {
                    keys.insert(p.name.clone(), c);
                }
                None if configured => {
                    return Err(StartError::InvalidEnv {
                        key: format!("providers.{}.api_key_env", p.name),
                        var: p.api_key_env.clone(),
                        why: "holds a character an HTTP header cannot carry",
                    });
                }
                None => tracing::warn!(
                    provider = %p.name,
                    var = %p.api_key_env,
                    "provider unavailable: its key holds a character an HTTP header cannot carry"
                ),
            },
            None if configured => {
                return Err(StartError::MissingEnv {
                    key: format!("providers.{}.api_key_env", p.name),
                    var: p.api_key_env.clone(),
                    hint: "",
                });
            }
            None => {}
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stack-written amount is what `format!` wrote before, for every edge and a spread
    /// of amounts in between.
    #[test]
    fn usd_text_is_the_formatted_amount() {
        let old = |n: i64| {
            let sign = if n < 0 { "-" } else { "" };
            let a = n.unsigned_abs();
            format!("{sign}{}.{:09}", a / 1_000_000_000, a % 1_000_000_000)
        };
        let mut cases = vec![
            0,
            1,
            -1,
            999_999_999,
            1_000_000_000,
            -1_000_000_000,
            167_550,
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..10_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            cases.push(i64::from_ne_bytes(seed.to_ne_bytes()) >> (seed % 60));
        }
        for n in cases {
            assert_eq!(Usd::new(Nanos(n)).as_str(), old(n), "{n}");
            assert_eq!(usd_string(Nanos(n)), old(n));
        }
    }
}
