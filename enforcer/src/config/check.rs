//! Validation of a whole config: every key checked at start-up, the first problem wins, and the
//! error names the exact key and what is allowed.

use std::net::SocketAddr;

use ledger::Nanos;
use ledger::names::{RULE, is_valid};

use super::{Config, ConfigError, bad};

impl Config {
    /// Checks every key; the first problem wins.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_listeners()?;
        self.validate_storage()?;
        self.validate_pricing()?;
        self.validate_limits()?;
        self.resolved_providers()?;
        self.validate_keys()?;
        check_downgrades(&self.downgrades)?;
        self.validate_downgrade_routes()?;
        check_rate_limits(&self.rate_limits)?;
        self.validate_budgets()?;
        self.alerts.validate()
    }

    fn validate_listeners(&self) -> Result<(), ConfigError> {
        self.listen
            .parse::<SocketAddr>()
            .map_err(|e| bad("listen", format!("{e} (want host:port)")))?;
        if let Some(a) = self.admin_addr() {
            a.parse::<SocketAddr>()
                .map_err(|e| bad("admin_listen", format!("{e} (want host:port, or \"off\")")))?;
            if self.admin_token_env.is_empty() {
                return Err(bad("admin_token_env", "required while admin_listen is on"));
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(bad(
                "tls_key_file",
                "tls_cert_file and tls_key_file go together",
            ));
        }
        if self.max_connections == 0 {
            return Err(bad("max_connections", "at least 1"));
        }
        if self.proxy_threads > 1024 {
            return Err(bad("proxy_threads", "at most 1024 (0: one per CPU)"));
        }
        if self.settle_window_ms.is_some_and(|ms| ms > 1000) {
            return Err(bad(
                "settle_window_ms",
                "at most 1000 (spend shows this much later; 0: settle at once)",
            ));
        }
        if let Some(ms) = self.settle_window_ms
            && ms >= self.timeouts.redis_ms
        {
            return Err(bad(
                "settle_window_ms",
                format!(
                    "below timeouts.redis_ms ({}): a settle's wait for company counts against its \
                     Redis timeout, so a window that long would time every settle out to the spool",
                    self.timeouts.redis_ms
                ),
            ));
        }
        let factor = crate::inflight::REQUEST_COST_FACTOR;
        if self.max_inflight_body_bytes / factor < self.max_request_body_bytes {
            return Err(bad(
                "max_inflight_body_bytes",
                format!(
                    "at least {factor} x max_request_body_bytes (a request body is counted \
                     {factor} times its size; else the largest allowed request never fits)"
                ),
            ));
        }
        if self.max_streams_per_connection == 0 {
            return Err(bad("max_streams_per_connection", "at least 1"));
        }
        if self.timeouts.connection_idle_ms < 1_000 {
            return Err(bad("timeouts.connection_idle_ms", "at least 1000 (ms)"));
        }
        if !matches!(self.log_format.as_str(), "json" | "text") {
            return Err(bad("log_format", "must be \"json\" or \"text\""));
        }
        Ok(())
    }

    /// The instance id, the spool and Redis.
    fn validate_storage(&self) -> Result<(), ConfigError> {
        if !self.instance_id.is_empty() {
            ledger::store::validate_name("instance_id", &self.instance_id)
                .map_err(|e| bad("instance_id", e.to_string()))?;
            if self.instance_id.contains('/') || self.instance_id.starts_with('.') {
                return Err(bad(
                    "instance_id",
                    "names a directory: no '/' and no leading '.'",
                ));
            }
        }
        if self.spool_max_bytes < 64 << 10 {
            return Err(bad("spool_max_bytes", "at least 65536 bytes"));
        }
        self.validate_redis_url()
    }

    /// The price file exists and the unknown-model price is a positive figure (the ledger's
    /// billing policy says why when it is not).
    fn validate_pricing(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.prices_file
            && !p.is_file()
        {
            return Err(bad(
                "prices_file",
                format!("{} is not a readable file", p.display()),
            ));
        }
        match ledger::billing::Pricing::new(ledger::PriceTable::empty(), &self.pricing()) {
            Ok(_) => Ok(()),
            Err(ledger::Error::Invalid { what, detail }) => Err(bad(what, detail)),
            Err(e) => Err(bad("unknown_model_price", e.to_string())),
        }
    }

    /// Timeouts, holds and money figures.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        if self.max_output_tokens_cap.is_some() {
            return Err(bad(
                "max_output_tokens_cap",
                "was removed: it reserved less output than a model can bill. A request without a \
                 limit now reserves the model's maximum; to reserve less for a model, set \
                 [output_token_limits] \"<model>\" = <tokens>",
            ));
        }
        let t = &self.timeouts;
        for (k, v) in [
            ("timeouts.connect_ms", t.connect_ms),
            ("timeouts.first_byte_ms", t.first_byte_ms),
            ("timeouts.idle_ms", t.idle_ms),
            ("timeouts.redis_ms", t.redis_ms),
            ("reserve_ttl_secs", self.reserve_ttl_secs),
        ] {
            if v == 0 {
                return Err(bad(k, "must be greater than 0"));
            }
        }
        if self.reserve_ttl_secs * 1000 <= t.first_byte_ms {
            return Err(bad(
                "reserve_ttl_secs",
                "must exceed timeouts.first_byte_ms, or holds expire under live calls",
            ));
        }
        let usd = |k: &'static str, v: f64| {
            Nanos::from_usd_f64(v)
                .map(|_| ())
                .map_err(|_| bad(k, "must be a non-negative USD figure"))
        };
        usd("redis_unavailable_cap_usd", self.redis_unavailable_cap_usd)?;
        if self.lease_pool > 64 {
            return Err(bad(
                "lease_pool",
                "at most 64 spare holds per tenant (0: off)",
            ));
        }
        if self.lease_idle_secs == 0 || self.lease_idle_secs > 3600 {
            return Err(bad("lease_idle_secs", "between 1 and 3600"));
        }
        match Nanos::from_usd_f64(self.lease_max_usd) {
            // 70,000 USD keeps a pool's sums exact in the ledger's batch script (below 2^46 nano-USD).
            Ok(n) if n > Nanos::ZERO && n.0 <= 70_000_000_000_000 => {}
            _ => {
                return Err(bad(
                    "lease_max_usd",
                    "must be above 0 and at most 70000 USD",
                ));
            }
        }
        if let Some(v) = self.session.limit_usd {
            usd("session.limit_usd", v)?;
        }
        Ok(())
    }

    /// A file chain's `route` names a configured route (a chain stored through the admin API is
    /// checked when a call uses it).
    fn validate_downgrade_routes(&self) -> Result<(), ConfigError> {
        let providers = self.resolved_providers()?;
        for (i, d) in self.downgrades.iter().enumerate() {
            if let Some(r) = &d.route
                && !providers.contains_key(r)
            {
                return Err(bad(
                    format!("downgrades[{i}].route"),
                    format!("{r:?} is not a configured provider route"),
                ));
            }
        }
        Ok(())
    }

    fn validate_keys(&self) -> Result<(), ConfigError> {
        if self.keys.is_empty() && !self.runtime_keys {
            return Err(bad(
                "keys",
                "at least one [[keys]] entry is required when runtime_keys = false (sha256 from \
                 `enforcer hash-key`)",
            ));
        }
        if !(50..=60_000).contains(&self.runtime_keys_refresh_ms) {
            return Err(bad(
                "runtime_keys_refresh_ms",
                "must be 50 to 60000 (a revoked key stays usable for up to this long)",
            ));
        }
        for (i, k) in self.keys.iter().enumerate() {
            let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
            if k.sha256.len() != 64 || !k.sha256.bytes().all(hex) {
                return Err(bad(
                    format!("keys[{i}].sha256"),
                    "must be 64 lowercase hex digits (enforcer hash-key)",
                ));
            }
            if !is_valid(&k.tenant) {
                return Err(bad(
                    format!("keys[{i}].tenant"),
                    format!("required: {RULE}"),
                ));
            }
            for (j, p) in k.open_paths.iter().enumerate() {
                globset::Glob::new(p).map_err(|e| {
                    bad(
                        format!("keys[{i}].open_paths[{j}]"),
                        format!("not a glob: {e}"),
                    )
                })?;
                if !p.contains(' ') {
                    return Err(bad(
                        format!("keys[{i}].open_paths[{j}]"),
                        "write \"METHOD /path\", e.g. \"GET /v1/files*\"",
                    ));
                }
            }
            for (j, m) in k.allowed_models.iter().enumerate() {
                globset::Glob::new(m).map_err(|e| {
                    bad(
                        format!("keys[{i}].allowed_models[{j}]"),
                        format!("not a glob: {e}"),
                    )
                })?;
            }
            for (j, f) in k.features.iter().enumerate() {
                if !is_valid(f) {
                    return Err(bad(
                        format!("keys[{i}].features[{j}]"),
                        format!("a feature name: {RULE}"),
                    ));
                }
            }
            for (j, t) in k.allowed_tenants.iter().enumerate() {
                if t != "*" && !is_valid(t) {
                    return Err(bad(
                        format!("keys[{i}].allowed_tenants[{j}]"),
                        format!("\"*\" or a tenant name: {RULE}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_budgets(&self) -> Result<(), ConfigError> {
        for (i, b) in self.budgets.iter().enumerate() {
            if b.tenant != "*" && !is_valid(&b.tenant) {
                return Err(bad(
                    format!("budgets[{i}].tenant"),
                    format!("\"*\" or a tenant name: {RULE}"),
                ));
            }
            if let Some(f) = &b.feature
                && !is_valid(f)
            {
                return Err(bad(
                    format!("budgets[{i}].feature"),
                    format!("a feature name: {RULE}"),
                ));
            }
        }
        self.ledger_budgets().map(|_| ())
    }
}

/// Checks `[[rate_limits]]` entries (from the file or the admin API); the first problem wins.
///
/// # Errors
/// A [`ConfigError`] naming `rate_limits[i].<key>`.
pub fn check_rate_limits(list: &[super::RateLimitConfig]) -> Result<(), ConfigError> {
    for (i, r) in list.iter().enumerate() {
        let key = |k: &str| format!("rate_limits[{i}].{k}");
        if r.tenant != "*" && !r.tenant.is_empty() && !is_valid(&r.tenant) {
            return Err(bad(key("tenant"), format!("\"*\" or a tenant: {RULE}")));
        }
        if let Some(m) = &r.model {
            globset::Glob::new(m).map_err(|e| bad(key("model"), format!("not a glob: {e}")))?;
        }
        if r.rpm == 0 && r.tpm == 0 {
            return Err(bad(
                key("rpm"),
                "give rpm, tpm or both (per minute, above 0)",
            ));
        }
    }
    Ok(())
}

/// Checks `[[downgrades]]` entries (from the file or the admin API); the first problem wins.
///
/// # Errors
/// A [`ConfigError`] naming `downgrades[i].<key>`.
pub fn check_downgrades(list: &[super::DowngradeConfig]) -> Result<(), ConfigError> {
    for (i, d) in list.iter().enumerate() {
        let key = |k: &str| format!("downgrades[{i}].{k}");
        if d.tenant != "*" && !d.tenant.is_empty() && !is_valid(&d.tenant) {
            return Err(bad(key("tenant"), format!("\"*\" or a tenant: {RULE}")));
        }
        if let Some(f) = &d.feature
            && !is_valid(f)
        {
            return Err(bad(key("feature"), format!("a feature name: {RULE}")));
        }
        globset::Glob::new(&d.from).map_err(|e| bad(key("from"), format!("not a glob: {e}")))?;
        if d.route.as_deref().is_some_and(str::is_empty) {
            return Err(bad(key("route"), "a provider route name, or leave it out"));
        }
        if d.from.is_empty() || d.to.is_empty() || d.to.iter().any(String::is_empty) {
            return Err(bad(
                key("to"),
                "give `from` (a model glob) and `to` (models to try, in order)",
            ));
        }
    }
    Ok(())
}
