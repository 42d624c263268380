//! Proxy keys made at runtime (admin API `POST /keys`, `enforcer keys create`): stored hashed
//! in Redis by the ledger (`llmw:apikeys`), cached here by secret hash so authenticating a call
//! costs no Redis round trip. Each replica asks Redis for the hash's version every
//! `runtime_keys_refresh_ms` (one `HGET`) and reloads the whole hash only after a change, so a
//! key created, rotated or revoked on any replica is live (or refused) everywhere within that
//! interval. Expiry and the end of a rotation's grace are checked against the clock at each call,
//! not at reload. When Redis cannot be read the previous set stays in force.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ledger::store::{ApiKeySnapshot, Ledger};
use parking_lot::RwLock;

use crate::auth::KeyEntry;

/// One live secret of a runtime key.
#[derive(Debug)]
struct Live {
    entry: Arc<KeyEntry>,
    /// When this secret stops working (expiry, or the end of a rotation's grace).
    until: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
struct State {
    version: Option<i64>,
    by_hash: HashMap<[u8; 32], Live>,
}

/// The cached runtime keys; cheap to clone.
#[derive(Clone, Debug)]
pub struct RuntimeKeys {
    ledger: Ledger,
    state: Arc<RwLock<State>>,
}

/// The secrets of `snap` that work at `now`, by hash.
fn index(snap: &ApiKeySnapshot, now: DateTime<Utc>) -> HashMap<[u8; 32], Live> {
    let mut by_hash = HashMap::new();
    for k in &snap.keys {
        let hashes = k.live_hashes(now);
        if hashes.is_empty() {
            continue;
        }
        for h in hashes {
            let Some(entry) = KeyEntry::from_api_key(k, h) else {
                continue;
            };
            let grace_end = k
                .previous
                .as_ref()
                .filter(|p| p.sha256 == h)
                .map(|p| p.valid_until);
            let until = match (k.expires_at, grace_end) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            by_hash.insert(
                entry.hash(),
                Live {
                    entry: Arc::new(entry),
                    until,
                },
            );
        }
    }
    by_hash
}

impl RuntimeKeys {
    /// An empty cache; call [`RuntimeKeys::refresh`] or [`RuntimeKeys::spawn_refresher`].
    #[must_use]
    pub fn new(ledger: Ledger) -> RuntimeKeys {
        RuntimeKeys {
            ledger,
            state: Arc::default(),
        }
    }

    /// Reloads the keys if their version changed since the last load (or `force`).
    ///
    /// # Errors
    /// The ledger's error; the cache keeps what it had.
    pub async fn refresh(&self, force: bool) -> Result<(), ledger::Error> {
        let version = self.ledger.api_keys_version().await?;
        if !force && self.state.read().version == Some(version) {
            return Ok(());
        }
        let snap = self.ledger.api_keys().await?;
        for (field, why) in &snap.broken {
            tracing::error!(field = %field, error = %why, "a runtime key record does not parse; that key is refused until it is fixed");
        }
        let by_hash = index(&snap, Utc::now());
        let mut st = self.state.write();
        st.version = Some(snap.version);
        st.by_hash = by_hash;
        Ok(())
    }

    /// Refreshes every `every` for the life of the process.
    pub fn spawn_refresher(&self, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = ledger::store::poll_ticks(every);
            loop {
                tick.tick().await;
                if let Err(e) = me.refresh(false).await {
                    tracing::debug!(error = %e, "runtime key refresh failed; keeping the cached keys");
                }
            }
        });
    }

    /// The runtime key whose live secret hashes to `digest`, if it still works at `now`.
    #[must_use]
    pub fn authenticate_digest(
        &self,
        digest: &[u8; 32],
        now: DateTime<Utc>,
    ) -> Option<Arc<KeyEntry>> {
        let st = self.state.read();
        let live = st.by_hash.get(digest)?;
        if live.until.is_some_and(|t| t <= now) {
            return None;
        }
        Some(live.entry.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ledger::store::{ApiKey, PreviousSecret, secret_hash};
    use sha2::{Digest, Sha256};

    use super::*;

    fn digest(s: &str) -> [u8; 32] {
        Sha256::digest(s.as_bytes()).into()
    }

    #[test]
    fn indexes_live_secrets_with_their_deadlines() {
        let now = Utc::now();
        let key = |id: &str, secret: &str| ApiKey {
            id: id.into(),
            sha256: secret_hash(secret),
            previous: None,
            tenant: "acme".into(),
            allowed_tenants: vec![],
            features: vec![],
            allowed_models: vec![],
            allowed_providers: vec![],
            rpm: 0,
            tpm: 0,
            metadata: BTreeMap::new(),
            created_at: now,
            expires_at: None,
            revoked_at: None,
        };
        let mut rotated = key("k_0000000000000001", "new");
        rotated.previous = Some(PreviousSecret {
            sha256: secret_hash("old"),
            valid_until: now + chrono::Duration::seconds(5),
        });
        rotated.expires_at = Some(now + chrono::Duration::seconds(60));
        let mut revoked = key("k_0000000000000002", "gone");
        revoked.revoked_at = Some(now);
        let snap = ApiKeySnapshot {
            version: 3,
            keys: vec![rotated, revoked],
            broken: vec![],
        };
        let by_hash = index(&snap, now);
        assert_eq!(by_hash.len(), 2, "new and old secret of the rotated key");
        assert_eq!(
            by_hash[&digest("old")].until,
            Some(now + chrono::Duration::seconds(5))
        );
        assert_eq!(
            by_hash[&digest("new")].until,
            Some(now + chrono::Duration::seconds(60))
        );
        assert!(!by_hash.contains_key(&digest("gone")));
        assert_eq!(
            by_hash[&digest("new")].entry.id.as_deref(),
            Some("k_0000000000000001")
        );
    }
}
