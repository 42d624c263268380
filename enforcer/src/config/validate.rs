//! Defaults of the built-in providers, loading (with validation, see `check.rs`), and the
//! effective config that `check-config` prints.

use std::collections::BTreeMap;
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

    pub(super) fn validate_redis_url(&self) -> Result<(), ConfigError> {
        if !(self.redis_url.starts_with("redis://")
            || self.redis_url.starts_with("rediss://")
            || self.redis_url.starts_with("redis+cluster://")
            || self.redis_url.starts_with("rediss+cluster://"))
        {
            return Err(bad(
                "redis_url",
                "must start with redis://, rediss://, redis+cluster:// or rediss+cluster://",
            ));
        }
        if self
            .redis_password_env
            .as_deref()
            .is_some_and(str::is_empty)
        {
            return Err(bad(
                "redis_password_env",
                "names no variable; remove the key or name one",
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
                weight: 1,
                failover: Vec::new(),
                deployments: BTreeMap::new(),
                api_version: None,
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
                weight: pc.weight.unwrap_or(1),
                failover: pc.failover.clone().unwrap_or_default(),
                deployments: pc.deployments.clone().unwrap_or_default(),
                api_version: pc.api_version.clone(),
            };
            if kind != ProviderKind::AzureOpenAi
                && (!p.deployments.is_empty() || p.api_version.is_some())
            {
                return Err(bad(
                    key("deployments"),
                    "deployments and api_version are for azure-openai routes",
                ));
            }
            for (model, dep) in &p.deployments {
                if model.is_empty() || !is_path_segment(dep) {
                    return Err(bad(
                        key("deployments"),
                        format!(
                            "{model:?} = {dep:?}: a model and a deployment name (letters, digits, '-', '_', '.')"
                        ),
                    ));
                }
            }
            if let Some(v) = &p.api_version
                && !is_path_segment(v)
            {
                return Err(bad(key("api_version"), "e.g. \"2024-10-21\""));
            }
            out.insert(name.clone(), p);
        }
        check_failover(&out)?;
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
                        weight: Some(p.weight),
                        failover: (!p.failover.is_empty()).then_some(p.failover),
                        deployments: (!p.deployments.is_empty()).then_some(p.deployments),
                        api_version: p.api_version,
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

/// Each route's `failover` names other routes of the same kind, once each, and its weight is at
/// most 1000; a route with failover routes and those routes do not all have weight 0 (a route
/// called directly with no failover always goes to itself, whatever its weight).
fn check_failover(ps: &BTreeMap<String, Provider>) -> Result<(), ConfigError> {
    for p in ps.values() {
        let key = |k: &str| format!("providers.{}.{k}", p.name);
        if p.weight > 1000 {
            return Err(bad(key("weight"), "must be 0 to 1000"));
        }
        for (i, f) in p.failover.iter().enumerate() {
            let Some(other) = ps.get(f) else {
                return Err(bad(
                    format!("providers.{}.failover[{i}]", p.name),
                    format!("{f:?} is not a configured provider"),
                ));
            };
            if f == &p.name || p.failover[..i].contains(f) {
                return Err(bad(
                    format!("providers.{}.failover[{i}]", p.name),
                    format!("{f:?} is the route itself or listed twice"),
                ));
            }
            let to_azure = matches!(
                p.kind,
                ProviderKind::OpenAi | ProviderKind::OpenAiCompatible
            ) && other.kind == ProviderKind::AzureOpenAi;
            if to_azure && (other.deployments.is_empty() || other.api_version.is_none()) {
                return Err(bad(
                    format!("providers.{}.failover[{i}]", p.name),
                    format!(
                        "{f:?} is an azure-openai route: as a failover of an OpenAI route it needs `deployments` (model -> deployment) and `api_version`"
                    ),
                ));
            }
            if other.kind != p.kind && !to_azure {
                return Err(bad(
                    format!("providers.{}.failover[{i}]", p.name),
                    format!(
                        "{f:?} is a {:?} provider, not {:?}: a failover route must speak the same API (or be azure-openai with deployments, for an OpenAI route)",
                        other.kind, p.kind
                    ),
                ));
            }
        }
        let total: u32 = std::iter::once(p.weight)
            .chain(
                p.failover
                    .iter()
                    .filter_map(|f| ps.get(f))
                    .map(|o| o.weight),
            )
            .sum();
        if total == 0 && !p.failover.is_empty() {
            return Err(bad(
                key("weight"),
                "the route and its failover routes all have weight 0: no upstream would get a first attempt",
            ));
        }
    }
    Ok(())
}

/// A deployment name or api-version: one URL path segment of letters, digits, '-', '_', '.'.
fn is_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}
