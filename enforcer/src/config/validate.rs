//! Defaults of the built-in providers, validation naming the exact key, and the effective config
//! that `check-config` prints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use ledger::Nanos;
use ledger::provider::ProviderKind;
use ledger::store::Budget;

use super::{Config, ConfigError, Provider, ProviderConfig, bad};

/// Built-in providers: (name, kind, base_url, key env).
const BUILTIN: [(&str, ProviderKind, &str, &str); 3] = [
    (
        "openai",
        ProviderKind::OpenAi,
        "https://api.openai.com/v1",
        "OPENAI_API_KEY",
    ),
    (
        "anthropic",
        ProviderKind::Anthropic,
        "https://api.anthropic.com",
        "ANTHROPIC_API_KEY",
    ),
    (
        "gemini",
        ProviderKind::Gemini,
        "https://generativelanguage.googleapis.com",
        "GEMINI_API_KEY",
    ),
];

impl Config {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file or the bad key.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(path.display().to_string(), e.to_string()))?;
        Config::parse(&text)
    }

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the bad key.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_owned();
            bad(
                format!("config (at {:?})", e.span().unwrap_or_default()),
                msg,
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a config for a read-only subcommand (`report`): only what reaching the ledger needs
    /// (`redis_url`) is checked, so an ops user's report-only file without `[[keys]]`, providers
    /// or listeners works.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file or the bad key.
    pub fn load_for_reading(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(path.display().to_string(), e.to_string()))?;
        Config::parse_for_reading(&text)
    }

    /// Parses TOML text for a read-only subcommand; see [`Config::load_for_reading`].
    ///
    /// # Errors
    /// A [`ConfigError`] naming the bad key.
    pub fn parse_for_reading(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_owned();
            bad(
                format!("config (at {:?})", e.span().unwrap_or_default()),
                msg,
            )
        })?;
        cfg.validate_redis_url()?;
        Ok(cfg)
    }

    fn validate_redis_url(&self) -> Result<(), ConfigError> {
        if !(self.redis_url.starts_with("redis://")
            || self.redis_url.starts_with("rediss://")
            || self.redis_url.starts_with("redis+cluster://"))
        {
            return Err(bad(
                "redis_url",
                "must start with redis://, rediss:// or redis+cluster://",
            ));
        }
        Ok(())
    }

    /// The admin listener address, `None` when disabled.
    #[must_use]
    pub fn admin_addr(&self) -> Option<&str> {
        let a = self.admin_listen.trim();
        (!a.is_empty() && a != "off").then_some(a)
    }

    /// Every provider (built-ins plus configured), defaults filled in.
    ///
    /// # Errors
    /// When a configured provider lacks a key that has no default.
    pub fn resolved_providers(&self) -> Result<BTreeMap<String, Provider>, ConfigError> {
        let mut out = BTreeMap::new();
        for (name, kind, url, env) in BUILTIN {
            let p = Provider {
                name: name.into(),
                kind,
                base_url: url.into(),
                api_key_env: env.into(),
                ca_file: None,
                inject_include_usage: true,
            };
            out.insert(name.to_owned(), p);
        }
        for (name, pc) in &self.providers {
            let key = |k: &str| format!("providers.{name}.{k}");
            let builtin = BUILTIN.iter().find(|b| b.0 == name);
            let kind = pc.kind.or(builtin.map(|b| b.1)).ok_or_else(|| {
                bad(
                    key("kind"),
                    "required for a provider that is not openai, anthropic or gemini",
                )
            })?;
            let base_url = pc
                .base_url
                .clone()
                .or(builtin.map(|b| b.2.to_owned()))
                .ok_or_else(|| {
                    bad(
                        key("base_url"),
                        "required for a provider that is not openai, anthropic or gemini",
                    )
                })?;
            let base_url = base_url.trim_end_matches('/').to_owned();
            let uri: http::Uri = base_url
                .parse()
                .map_err(|e| bad(key("base_url"), format!("not a URL: {e}")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(bad(
                    key("base_url"),
                    "must be an absolute http:// or https:// URL",
                ));
            }
            let api_key_env = pc
                .api_key_env
                .clone()
                .or(builtin.map(|b| b.3.to_owned()))
                .ok_or_else(|| {
                    bad(
                        key("api_key_env"),
                        "required: the environment variable holding the real key",
                    )
                })?;
            if let Some(ca) = &pc.ca_file
                && !ca.is_file()
            {
                return Err(bad(
                    key("ca_file"),
                    format!("{} is not a readable file", ca.display()),
                ));
            }
            let p = Provider {
                name: name.clone(),
                kind,
                base_url,
                api_key_env,
                ca_file: pc.ca_file.clone(),
                inject_include_usage: pc.inject_include_usage.unwrap_or(true),
            };
            out.insert(name.clone(), p);
        }
        Ok(out)
    }

    /// The session spend cap in nano-USD.
    #[must_use]
    pub fn session_cap(&self) -> Option<Nanos> {
        self.session
            .limit_usd
            .and_then(|v| Nanos::from_usd_f64(v).ok())
    }

    /// The file's budgets as ledger budgets.
    ///
    /// # Errors
    /// When a limit is not a valid amount.
    pub fn ledger_budgets(&self) -> Result<Vec<Budget>, ConfigError> {
        self.budgets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let limit = Nanos::from_usd_f64(b.limit_usd)
                    .map_err(|e| bad(format!("budgets[{i}].limit_usd"), e.to_string()))?;
                Ok(Budget {
                    tenant: b.tenant.clone(),
                    feature: b.feature.clone(),
                    period: b.period,
                    limit,
                })
            })
            .collect()
    }

    /// Checks every key; the first problem wins.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        self.validate_redis_url()?;
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(bad(
                "tls_key_file",
                "tls_cert_file and tls_key_file go together",
            ));
        }
        if let Some(p) = &self.prices_file
            && !p.is_file()
        {
            return Err(bad(
                "prices_file",
                format!("{} is not a readable file", p.display()),
            ));
        }
        if !matches!(self.log_format.as_str(), "json" | "text") {
            return Err(bad("log_format", "must be \"json\" or \"text\""));
        }
        for (k, v) in [
            (
                "unknown_model_price.input_usd_per_mtok",
                self.unknown_model_price.input_usd_per_mtok,
            ),
            (
                "unknown_model_price.output_usd_per_mtok",
                self.unknown_model_price.output_usd_per_mtok,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(
                    k,
                    "must be a positive USD figure (unknown models are never free)",
                ));
            }
        }
        let t = &self.timeouts;
        for (k, v) in [
            ("timeouts.connect_ms", t.connect_ms),
            ("timeouts.first_byte_ms", t.first_byte_ms),
            ("timeouts.idle_ms", t.idle_ms),
            ("timeouts.redis_ms", t.redis_ms),
            ("reserve_ttl_secs", self.reserve_ttl_secs),
            ("max_output_tokens_cap", self.max_output_tokens_cap),
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
        if Nanos::from_usd_f64(self.redis_unavailable_cap_usd).is_err() {
            return Err(bad(
                "redis_unavailable_cap_usd",
                "must be a non-negative USD figure",
            ));
        }
        if let Some(v) = self.session.limit_usd
            && Nanos::from_usd_f64(v).is_err()
        {
            return Err(bad(
                "session.limit_usd",
                "must be a non-negative USD figure",
            ));
        }
        self.resolved_providers()?;
        if self.keys.is_empty() {
            return Err(bad(
                "keys",
                "at least one [[keys]] entry is required (sha256 from `enforcer hash-key`)",
            ));
        }
        for (i, k) in self.keys.iter().enumerate() {
            if k.sha256.len() != 64
                || !k
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(bad(
                    format!("keys[{i}].sha256"),
                    "must be 64 lowercase hex digits (enforcer hash-key)",
                ));
            }
            if !ledger::names::is_valid(&k.tenant) {
                return Err(bad(
                    format!("keys[{i}].tenant"),
                    format!("required: {}", ledger::names::RULE),
                ));
            }
            for (j, t) in k.allowed_tenants.iter().enumerate() {
                if t != "*" && !ledger::names::is_valid(t) {
                    return Err(bad(
                        format!("keys[{i}].allowed_tenants[{j}]"),
                        format!("\"*\" or a tenant name: {}", ledger::names::RULE),
                    ));
                }
            }
        }
        for (i, b) in self.budgets.iter().enumerate() {
            if b.tenant != "*" && !ledger::names::is_valid(&b.tenant) {
                return Err(bad(
                    format!("budgets[{i}].tenant"),
                    format!("\"*\" or a tenant name: {}", ledger::names::RULE),
                ));
            }
            if let Some(f) = &b.feature
                && !ledger::names::is_valid(f)
            {
                return Err(bad(
                    format!("budgets[{i}].feature"),
                    format!("a feature name: {}", ledger::names::RULE),
                ));
            }
        }
        self.ledger_budgets()?;
        Ok(())
    }

    /// The effective configuration as TOML, environment-variable names shown, their values never.
    #[must_use]
    pub fn effective_toml(&self) -> String {
        let mut c = self.clone();
        if let Ok(ps) = self.resolved_providers() {
            c.providers = ps
                .into_values()
                .map(|p| {
                    let pc = ProviderConfig {
                        base_url: Some(p.base_url),
                        api_key_env: Some(p.api_key_env),
                        kind: Some(p.kind),
                        ca_file: p.ca_file,
                        inject_include_usage: Some(p.inject_include_usage),
                    };
                    (p.name, pc)
                })
                .collect();
        }
        // Key hashes are not secrets, but they identify keys: show a prefix only.
        for k in &mut c.keys {
            k.sha256 = format!("{}…", &k.sha256[..k.sha256.len().min(12)]);
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render the config: {e}\n"))
    }
}
