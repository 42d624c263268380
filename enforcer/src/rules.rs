//! Routing rules that change at runtime: the `[[downgrades]]` and `[[rate_limits]]` in force.
//! Each set comes from the config file until the admin API stores one in Redis
//! (`PUT /rules/<set>`, ledger `llmw:rules`); a stored set replaces the file's set on every
//! replica within about a second (a refresher polls the sets' version once a second, and the
//! replica that took the edit reloads at once); `DELETE /rules/<set>` returns to the file's.
//!
//! A stored set is validated by the admin API before it is stored. One that no longer parses
//! (written to Redis by hand) is not applied: the replica keeps the set it had and logs it.

use std::sync::Arc;
use std::time::Duration;

use ledger::store::Ledger;
use parking_lot::RwLock;
use serde::Serialize;

use crate::config::{
    ConfigError, DowngradeConfig, RateLimitConfig, check_downgrades, check_rate_limits,
};
use crate::downgrade::Downgrades;
use crate::rate::RateRules;

/// Where a set in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The config file.
    File,
    /// The admin API (Redis).
    Redis,
}

/// The sets in force, compiled.
#[derive(Debug, Clone)]
pub struct Current {
    /// The downgrade chains.
    pub downgrades: Downgrades,
    /// The rate limits.
    pub rates: RateRules,
    /// The downgrade entries and where they came from (for `GET /rules`).
    pub downgrade_entries: (Vec<DowngradeConfig>, Source),
    /// The rate limit entries and where they came from.
    pub rate_entries: (Vec<RateLimitConfig>, Source),
}

impl Current {
    fn new(d: (Vec<DowngradeConfig>, Source), r: (Vec<RateLimitConfig>, Source)) -> Current {
        Current {
            downgrades: Downgrades::new(&d.0),
            rates: RateRules::new(&r.0),
            downgrade_entries: d,
            rate_entries: r,
        }
    }
}

/// The live rule sets of one replica.
pub struct LiveRules {
    ledger: Ledger,
    file_downgrades: Vec<DowngradeConfig>,
    file_rates: Vec<RateLimitConfig>,
    current: RwLock<Arc<Current>>,
    /// The stored version last applied (0: none yet).
    version: RwLock<u64>,
}

/// A stored set as its entries, checked like the file's.
fn parse<T: serde::de::DeserializeOwned>(
    name: &str,
    json: &str,
    check: impl Fn(&[T]) -> Result<(), ConfigError>,
) -> Result<Vec<T>, String> {
    let v: Vec<T> = serde_json::from_str(json).map_err(|e| format!("{name}: {e}"))?;
    check(&v).map_err(|e| e.to_string())?;
    Ok(v)
}

/// Checks a set the admin API is about to store: `Ok(entries)` as JSON text, or why not.
///
/// # Errors
/// The problem, naming the set, the entry and the key.
pub fn validate_set(name: &str, body: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(body).map_err(|_| format!("{name}: body is not UTF-8"))?;
    match name {
        "downgrades" => {
            let v = parse::<DowngradeConfig>(name, text, check_downgrades)?;
            serde_json::to_string(&v).map_err(|e| e.to_string())
        }
        "rate_limits" => {
            let v = parse::<RateLimitConfig>(name, text, check_rate_limits)?;
            serde_json::to_string(&v).map_err(|e| e.to_string())
        }
        _ => Err(format!("no rule set {name:?}: downgrades or rate_limits")),
    }
}

impl LiveRules {
    /// The file's sets, in force until a refresh finds stored ones.
    #[must_use]
    pub fn new(
        ledger: Ledger,
        downgrades: Vec<DowngradeConfig>,
        rates: Vec<RateLimitConfig>,
    ) -> LiveRules {
        let current = Current::new(
            (downgrades.clone(), Source::File),
            (rates.clone(), Source::File),
        );
        LiveRules {
            ledger,
            file_downgrades: downgrades,
            file_rates: rates,
            current: RwLock::new(Arc::new(current)),
            version: RwLock::new(0),
        }
    }

    /// The sets in force.
    #[must_use]
    pub fn current(&self) -> Arc<Current> {
        self.current.read().clone()
    }

    /// Reloads the stored sets when their version moved (`force`: whatever the version).
    ///
    /// # Errors
    /// The ledger's error; the sets in force stay.
    pub async fn refresh(&self, force: bool) -> Result<(), ledger::Error> {
        if !force {
            let v = self.ledger.rules_version().await?;
            if v == *self.version.read() {
                return Ok(());
            }
        }
        let stored = self.ledger.rules().await?;
        let now = self.current();
        let downgrades = match stored.sets.get("downgrades") {
            None => (self.file_downgrades.clone(), Source::File),
            Some(j) => match parse::<DowngradeConfig>("downgrades", j, check_downgrades) {
                Ok(v) => (v, Source::Redis),
                Err(e) => {
                    tracing::error!(error = %e, "the stored downgrades do not parse; keeping the set in force (PUT /rules/downgrades to fix)");
                    now.downgrade_entries.clone()
                }
            },
        };
        let rates = match stored.sets.get("rate_limits") {
            None => (self.file_rates.clone(), Source::File),
            Some(j) => match parse::<RateLimitConfig>("rate_limits", j, check_rate_limits) {
                Ok(v) => (v, Source::Redis),
                Err(e) => {
                    tracing::error!(error = %e, "the stored rate limits do not parse; keeping the set in force (PUT /rules/rate_limits to fix)");
                    now.rate_entries.clone()
                }
            },
        };
        *self.current.write() = Arc::new(Current::new(downgrades, rates));
        *self.version.write() = stored.version;
        Ok(())
    }

    /// Polls the stored version every `every` for the life of the process.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = ledger::store::poll_ticks(every);
            loop {
                tick.tick().await;
                if let Err(e) = me.refresh(false).await {
                    tracing::debug!(error = %e, "rule refresh failed; keeping the sets in force");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::validate_set;

    #[test]
    fn sets_are_checked_like_the_file() {
        assert!(validate_set("downgrades", br#"[{"from":"gpt-4o","to":["gpt-4o-mini"]}]"#).is_ok());
        let e = validate_set("downgrades", br#"[{"from":"gpt-4o","to":[]}]"#).unwrap_err();
        assert!(e.contains("downgrades[0].to"), "{e}");
        let e = validate_set("rate_limits", br#"[{"tenant":"a","rpm":0}]"#).unwrap_err();
        assert!(e.contains("rate_limits[0].rpm"), "{e}");
        let e = validate_set("rate_limits", br#"[{"tenant":"a","rpn":5}]"#).unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        assert!(validate_set("rate_limits", b"{}").is_err());
        assert!(validate_set("routes", b"[]").is_err());
    }
}
