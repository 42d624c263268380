//! Proxy keys managed at runtime: one hash, `llmw:apikeys`, field = key id, value = the key's
//! JSON record ([`ApiKey`]), plus a `#version` field bumped by every write so each enforcer's
//! cache knows when to reload (one `HGET` per poll, `HGETALL` only after a change).
//!
//! Only the sha256 of a secret is stored. The secret is made here (32 bytes from the OS's random
//! source) and returned once, by [`Ledger::create_api_key`] and [`Ledger::rotate_api_key`].
//! Revoking keeps the record (for audit) with `revoked_at` set. Every write is a compare-and-set
//! script on the one hash (one slot, so Redis Cluster is fine), retried when two admins race.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Ledger;
pub use super::keys::API_KEYS_KEY;
use super::keys::validate_name;
use crate::Error;
use crate::names::{self, NameKind};

/// The field of [`API_KEYS_KEY`] counting writes (key ids never start with `#`).
pub const API_KEYS_VERSION_FIELD: &str = "#version";
/// The prefix of every secret this ledger makes, so a leaked one is recognisable in a scan.
pub const SECRET_PREFIX: &str = "llmw-";
/// At most this many metadata entries per key, each key and value at most 256 bytes.
pub const MAX_METADATA: usize = 32;

static WRITE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/apikey_write.lua")));

/// A runtime proxy key as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Its public id (`k_` and 16 hex digits): what the admin API and CLI name it by.
    pub id: String,
    /// Lowercase hex sha256 of the current secret.
    pub sha256: String,
    /// The secret it was rotated from, valid until a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousSecret>,
    /// The tenant billed when a call names none.
    pub tenant: String,
    /// Other tenants it may name in X-Tenant-ID (`*`: any).
    #[serde(default)]
    pub allowed_tenants: Vec<String>,
    /// Features it may bill; the first is the default. Empty: any.
    #[serde(default)]
    pub features: Vec<String>,
    /// Models it may call, as globs (`gpt-4o*`). Empty: any.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Provider routes it may use (`openai`, ...). Empty: any.
    #[serde(default)]
    pub allowed_providers: Vec<String>,
    /// Requests per minute through it, per tenant it bills (0: none).
    #[serde(default)]
    pub rpm: u64,
    /// Tokens per minute through it, per tenant it bills (0: none).
    #[serde(default)]
    pub tpm: u64,
    /// Free-form labels (owner, ticket, ...); never secrets.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A rotated-out secret that still works until `valid_until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousSecret {
    /// Lowercase hex sha256 of the old secret.
    pub sha256: String,
    /// The end of the grace period.
    pub valid_until: DateTime<Utc>,
}

/// What a new key may do (everything of [`ApiKey`] but its id, secret and times).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// The tenant billed when a call names none.
    pub tenant: String,
    /// Other tenants it may name (`*`: any).
    #[serde(default)]
    pub allowed_tenants: Vec<String>,
    /// Features it may bill; the first is the default.
    #[serde(default)]
    pub features: Vec<String>,
    /// Models it may call, as globs.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Provider routes it may use.
    #[serde(default)]
    pub allowed_providers: Vec<String>,
    /// Requests per minute (0: none).
    #[serde(default)]
    pub rpm: u64,
    /// Tokens per minute (0: none).
    #[serde(default)]
    pub tpm: u64,
    /// Free-form labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// When it stops working.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// Whether a key works now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// It authenticates.
    Active,
    /// Revoked by an admin.
    Revoked,
    /// Past `expires_at`.
    Expired,
}

impl ApiKey {
    /// Whether it works at `now`.
    #[must_use]
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        if self.revoked_at.is_some_and(|t| t <= now) {
            KeyStatus::Revoked
        } else if self.expires_at.is_some_and(|t| t <= now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }

    /// The secrets' hashes that authenticate it at `now` (none when revoked or expired; the
    /// rotated-out one only inside its grace period).
    #[must_use]
    pub fn live_hashes(&self, now: DateTime<Utc>) -> Vec<&str> {
        if self.status(now) != KeyStatus::Active {
            return Vec::new();
        }
        let mut v = vec![self.sha256.as_str()];
        if let Some(p) = &self.previous
            && p.valid_until > now
        {
            v.push(p.sha256.as_str());
        }
        v
    }
}

/// A secret, made from 32 bytes of the OS's random source.
fn new_secret() -> Result<String, Error> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| Error::Invalid {
        what: "random source",
        detail: format!("the OS gave no random bytes for a key secret: {e}"),
    })?;
    Ok(format!("{SECRET_PREFIX}{}", hex::encode(b)))
}

fn new_id() -> Result<String, Error> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(|e| Error::Invalid {
        what: "random source",
        detail: format!("the OS gave no random bytes for a key id: {e}"),
    })?;
    Ok(format!("k_{}", hex::encode(b)))
}

/// Lowercase hex sha256 of a secret.
#[must_use]
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Checks what a new key may do: the names by the ledger's one rule, the globs and providers as
/// names, the metadata bounded.
///
/// # Errors
/// [`Error::Invalid`] naming the field.
pub fn validate_new(k: &NewApiKey, now: DateTime<Utc>) -> Result<(), Error> {
    names::check(NameKind::Tenant, &k.tenant)?;
    for t in &k.allowed_tenants {
        if t != "*" {
            names::check(NameKind::Tenant, t)?;
        }
    }
    for f in &k.features {
        names::check(NameKind::Feature, f)?;
    }
    for m in &k.allowed_models {
        validate_name("allowed_models entry", m)?;
    }
    for p in &k.allowed_providers {
        validate_name("allowed_providers entry", p)?;
    }
    if k.metadata.len() > MAX_METADATA {
        return Err(Error::Invalid {
            what: "metadata",
            detail: format!("{} entries; at most {MAX_METADATA}", k.metadata.len()),
        });
    }
    for (a, b) in &k.metadata {
        if a.is_empty()
            || a.len() > 256
            || b.len() > 256
            || a.chars().chain(b.chars()).any(char::is_control)
        {
            return Err(Error::Invalid {
                what: "metadata",
                detail: format!(
                    "entry {a:?}: keys 1-256 bytes, values at most 256, no control characters"
                ),
            });
        }
    }
    if k.expires_at.is_some_and(|t| t <= now) {
        return Err(Error::Invalid {
            what: "expires_at",
            detail: "is not in the future".into(),
        });
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), Error> {
    let ok = id.len() == 18
        && id.starts_with("k_")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "key id",
            detail: format!(
                "{:?} is not a key id (k_ and 16 lowercase hex digits)",
                id.chars().take(40).collect::<String>()
            ),
        })
    }
}

fn parse(id: &str, json: &str) -> Result<ApiKey, Error> {
    let k: ApiKey = serde_json::from_str(json).map_err(|e| Error::Invalid {
        what: "stored api key",
        detail: format!("{API_KEYS_KEY} field {id}: {e}"),
    })?;
    if k.id != id {
        return Err(Error::Invalid {
            what: "stored api key",
            detail: format!("{API_KEYS_KEY} field {id} holds key {}", k.id),
        });
    }
    Ok(k)
}

/// Every stored key and the hash's version.
#[derive(Debug, Clone, Default)]
pub struct ApiKeySnapshot {
    /// The `#version` read with them (0 before any write).
    pub version: i64,
    /// The keys, sorted by id.
    pub keys: Vec<ApiKey>,
    /// Fields that did not parse: (field, why). The enforcer refuses those keys, loudly.
    pub broken: Vec<(String, String)>,
}

impl Ledger {
    /// The version of the runtime key hash: changes whenever a key is created, revoked or rotated.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn api_keys_version(&self) -> Result<i64, Error> {
        self.timed("api_keys_version", async {
            let mut c = self.conn.clone();
            let v: Option<i64> = c.hget(API_KEYS_KEY, API_KEYS_VERSION_FIELD).await?;
            Ok(v.unwrap_or(0))
        })
        .await
    }

    /// Every runtime key (revoked and expired ones too), with the version read in the same reply.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn api_keys(&self) -> Result<ApiKeySnapshot, Error> {
        let h: HashMap<String, String> = self
            .timed("api_keys", async {
                let mut c = self.conn.clone();
                Ok(c.hgetall(API_KEYS_KEY).await?)
            })
            .await?;
        let mut snap = ApiKeySnapshot::default();
        for (field, value) in h {
            if field == API_KEYS_VERSION_FIELD {
                snap.version = value.parse().unwrap_or(0);
                continue;
            }
            match parse(&field, &value) {
                Ok(k) => snap.keys.push(k),
                Err(e) => snap.broken.push((field, e.to_string())),
            }
        }
        snap.keys.sort_by(|a, b| a.id.cmp(&b.id));
        snap.broken.sort();
        Ok(snap)
    }

    /// One key by id.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a malformed id or record; [`Error::Redis`] when Redis is unavailable.
    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, Error> {
        check_id(id)?;
        Ok(self.api_key_raw(id).await?.map(|(k, _)| k))
    }

    async fn api_key_raw(&self, id: &str) -> Result<Option<(ApiKey, String)>, Error> {
        let raw: Option<String> = self
            .timed("api_key", async {
                let mut c = self.conn.clone();
                Ok(c.hget(API_KEYS_KEY, id).await?)
            })
            .await?;
        raw.map(|json| parse(id, &json).map(|k| (k, json)))
            .transpose()
    }

    /// Stores `new` (the record) in place of `old` (the JSON read, "" for none). `Ok(false)`:
    /// someone else wrote the record in between.
    async fn write_api_key(&self, old: &str, new: &ApiKey) -> Result<bool, Error> {
        let json = serde_json::to_string(new).map_err(|e| Error::Invalid {
            what: "api key",
            detail: e.to_string(),
        })?;
        let v: i64 = self
            .timed("write_api_key", async {
                let mut c = self.conn.clone();
                Ok(WRITE
                    .key(API_KEYS_KEY)
                    .arg(&new.id)
                    .arg(old)
                    .arg(json)
                    .invoke_async(&mut c)
                    .await?)
            })
            .await?;
        Ok(v >= 0)
    }

    /// Makes a key. Returns the record and its secret, which is not stored and cannot be shown
    /// again.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad field; [`Error::Redis`] when Redis is unavailable.
    pub async fn create_api_key(
        &self,
        spec: NewApiKey,
        now: DateTime<Utc>,
    ) -> Result<(ApiKey, String), Error> {
        validate_new(&spec, now)?;
        let secret = new_secret()?;
        let key = ApiKey {
            id: new_id()?,
            sha256: secret_hash(&secret),
            previous: None,
            tenant: spec.tenant,
            allowed_tenants: spec.allowed_tenants,
            features: spec.features,
            allowed_models: spec.allowed_models,
            allowed_providers: spec.allowed_providers,
            rpm: spec.rpm,
            tpm: spec.tpm,
            metadata: spec.metadata,
            created_at: now,
            expires_at: spec.expires_at,
            revoked_at: None,
        };
        if self.write_api_key("", &key).await? {
            Ok((key, secret))
        } else {
            // 64 random bits collided with a stored id.
            Err(Error::Invalid {
                what: "key id",
                detail: format!("{} already exists; try again", key.id),
            })
        }
    }

    /// Reads a key, changes it with `edit` and writes it back unless it changed in between
    /// (then reads again; at most 5 tries). `Ok(None)`: no such key.
    async fn edit_api_key<T>(
        &self,
        id: &str,
        mut edit: impl FnMut(&mut ApiKey) -> Result<T, Error>,
    ) -> Result<Option<(ApiKey, T)>, Error> {
        check_id(id)?;
        for _ in 0..5 {
            let Some((mut key, json)) = self.api_key_raw(id).await? else {
                return Ok(None);
            };
            let out = edit(&mut key)?;
            if self.write_api_key(&json, &key).await? {
                return Ok(Some((key, out)));
            }
        }
        Err(Error::Invalid {
            what: "key id",
            detail: format!("{id} kept changing while it was being written; try again"),
        })
    }

    /// Revokes a key (kept, with `revoked_at`, for audit). Revoking twice keeps the first time.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad id; [`Error::Redis`] when Redis is unavailable.
    pub async fn revoke_api_key(
        &self,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ApiKey>, Error> {
        Ok(self
            .edit_api_key(id, |k| {
                k.revoked_at.get_or_insert(now);
                Ok(())
            })
            .await?
            .map(|(k, ())| k))
    }

    /// Gives a key a new secret; the old one keeps working for `grace` (zero: not at all).
    /// Returns the record and the new secret (shown once).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad id or a key that is revoked or expired; [`Error::Redis`]
    /// when Redis is unavailable.
    pub async fn rotate_api_key(
        &self,
        id: &str,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<(ApiKey, String)>, Error> {
        let grace = chrono::Duration::from_std(grace).map_err(|e| Error::Invalid {
            what: "grace",
            detail: e.to_string(),
        })?;
        self.edit_api_key(id, |k| {
            if k.status(now) != KeyStatus::Active {
                return Err(Error::Invalid {
                    what: "key",
                    detail: format!(
                        "{} is {:?}; only an active key can be rotated",
                        k.id,
                        k.status(now)
                    ),
                });
            }
            let secret = new_secret()?;
            k.previous = (grace > chrono::Duration::zero()).then(|| PreviousSecret {
                sha256: k.sha256.clone(),
                valid_until: now + grace,
            });
            k.sha256 = secret_hash(&secret);
            Ok(secret)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(now: DateTime<Utc>) -> ApiKey {
        ApiKey {
            id: "k_0123456789abcdef".into(),
            sha256: secret_hash("new"),
            previous: Some(PreviousSecret {
                sha256: secret_hash("old"),
                valid_until: now + chrono::Duration::seconds(10),
            }),
            tenant: "acme".into(),
            allowed_tenants: vec![],
            features: vec![],
            allowed_models: vec!["gpt-4o*".into()],
            allowed_providers: vec![],
            rpm: 0,
            tpm: 0,
            metadata: BTreeMap::new(),
            created_at: now,
            expires_at: Some(now + chrono::Duration::seconds(60)),
            revoked_at: None,
        }
    }

    #[test]
    fn status_and_live_hashes_follow_the_clock() {
        let now = Utc::now();
        let k = key(now);
        assert_eq!(k.live_hashes(now).len(), 2, "both secrets inside the grace");
        let later = now + chrono::Duration::seconds(11);
        assert_eq!(k.live_hashes(later), vec![secret_hash("new").as_str()]);
        let expired = now + chrono::Duration::seconds(61);
        assert_eq!(k.status(expired), KeyStatus::Expired);
        assert!(k.live_hashes(expired).is_empty());
        let mut r = k.clone();
        r.revoked_at = Some(now);
        assert_eq!(r.status(now), KeyStatus::Revoked);
        assert!(r.live_hashes(now).is_empty());
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(parse(&k.id, &json).unwrap(), k);
        assert!(
            parse("k_ffffffffffffffff", &json).is_err(),
            "field and id must agree"
        );
    }

    #[test]
    fn secrets_ids_and_validation() {
        let a = new_secret().unwrap();
        assert!(a.starts_with(SECRET_PREFIX) && a.len() == SECRET_PREFIX.len() + 64);
        assert_ne!(a, new_secret().unwrap());
        check_id(&new_id().unwrap()).unwrap();
        assert!(check_id("k_0123").is_err());
        assert!(check_id("../etc").is_err());
        let now = Utc::now();
        let ok = NewApiKey {
            tenant: "acme".into(),
            allowed_tenants: vec!["*".into()],
            ..NewApiKey::default()
        };
        validate_new(&ok, now).unwrap();
        for bad in [
            NewApiKey {
                tenant: "a|b".into(),
                ..ok.clone()
            },
            NewApiKey {
                features: vec!["x y".into()],
                ..ok.clone()
            },
            NewApiKey {
                expires_at: Some(now),
                ..ok.clone()
            },
            NewApiKey {
                allowed_models: vec![String::new()],
                ..ok.clone()
            },
        ] {
            assert!(validate_new(&bad, now).is_err(), "{bad:?}");
        }
    }
}
