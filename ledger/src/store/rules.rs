//! Routing rule sets edited at runtime (the enforcer's `[[downgrades]]` and `[[rate_limits]]`,
//! through its admin API): one hash, [`keys::RULES_KEY`], one field per set holding the set as a
//! JSON array, plus a `#version` counter every write bumps. The enforcer validates a set before
//! it stores it and owns its schema; the ledger stores, versions and reads it. A set present in
//! Redis replaces the config file's set of the same name on every replica.

use std::collections::BTreeMap;

use redis::AsyncCommands as _;

use super::{Ledger, keys};
use crate::Error;

/// The rule sets that can be stored.
pub const RULE_SETS: [&str; 2] = ["downgrades", "rate_limits"];

/// The version field of [`keys::RULES_KEY`].
const VERSION_FIELD: &str = "#version";

/// The stored rule sets: set name → its JSON array, and the hash's version (0 when never written).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredRules {
    /// Set name → JSON array text.
    pub sets: BTreeMap<String, String>,
    /// Bumped by every write; a reader that saw this version has nothing new to parse.
    pub version: u64,
}

fn check_set(name: &str) -> Result<(), Error> {
    if RULE_SETS.contains(&name) {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "rule set",
            detail: format!("{name:?} is none of {RULE_SETS:?}"),
        })
    }
}

impl Ledger {
    /// The rule sets stored in Redis.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn rules(&self) -> Result<StoredRules, Error> {
        let mut h: BTreeMap<String, String> = self
            .timed("rules", async {
                let mut c = self.conn.clone();
                Ok(c.hgetall(keys::RULES_KEY).await?)
            })
            .await?;
        let version = h
            .remove(VERSION_FIELD)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        h.retain(|k, _| RULE_SETS.contains(&k.as_str()));
        Ok(StoredRules { sets: h, version })
    }

    /// The version of the stored rule sets (one `HGET`: what a refresher polls).
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn rules_version(&self) -> Result<u64, Error> {
        let v: Option<u64> = self
            .timed("rules_version", async {
                let mut c = self.conn.clone();
                Ok(c.hget(keys::RULES_KEY, VERSION_FIELD).await?)
            })
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// Stores rule set `name` (a JSON array the caller validated) and bumps the version.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an unknown set or a value that is not a JSON array;
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn set_rule_set(&self, name: &str, json: &str) -> Result<(), Error> {
        check_set(name)?;
        if !matches!(
            serde_json::from_str::<serde_json::Value>(json),
            Ok(serde_json::Value::Array(_))
        ) {
            return Err(Error::Invalid {
                what: "rule set",
                detail: format!("{name}: not a JSON array"),
            });
        }
        let mut p = redis::pipe();
        p.atomic()
            .hset(keys::RULES_KEY, name, json)
            .ignore()
            .hincr(keys::RULES_KEY, VERSION_FIELD, 1)
            .ignore();
        self.timed("set_rule_set", async {
            let mut c = self.conn.clone();
            let _: () = p.query_async(&mut c).await?;
            Ok(())
        })
        .await
    }

    /// Removes rule set `name` from Redis (the config file's set applies again); returns whether
    /// it was stored.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an unknown set; [`Error::Redis`] when Redis is unavailable.
    pub async fn delete_rule_set(&self, name: &str) -> Result<bool, Error> {
        check_set(name)?;
        let mut p = redis::pipe();
        p.atomic()
            .hdel(keys::RULES_KEY, name)
            .hincr(keys::RULES_KEY, VERSION_FIELD, 1)
            .ignore();
        let (n,): (u64,) = self
            .timed("delete_rule_set", async {
                let mut c = self.conn.clone();
                Ok(p.query_async(&mut c).await?)
            })
            .await?;
        Ok(n > 0)
    }
}
