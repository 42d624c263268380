//! Agentic-loop protection per X-Session-ID: requests per minute and identical request bodies
//! within a window. The counters are the ledger's ([`Ledger::count_session_call`], in the tenant's
//! slot), so every replica counts the same calls. (The session's cumulative spend cap is a ledger
//! cap checked by reserve.)

use std::time::Duration;

use ledger::store::Ledger;

use crate::config::SessionConfig;

/// The loop checker; cheap to clone.
#[derive(Clone)]
pub struct LoopGuard {
    ledger: Ledger,
    rpm: Option<u64>,
    identical: Option<u64>,
    window: Duration,
}

impl LoopGuard {
    /// A guard for `cfg` counting in `ledger`.
    #[must_use]
    pub fn new(ledger: Ledger, cfg: &SessionConfig) -> LoopGuard {
        LoopGuard {
            ledger,
            rpm: cfg.max_requests_per_minute,
            identical: cfg.max_identical_requests,
            window: Duration::from_secs(cfg.identical_window_secs.unwrap_or(300).max(1)),
        }
    }

    /// Whether any counter is configured.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.rpm.is_some() || self.identical.is_some()
    }

    /// Counts this call and returns `Some(message)` when the session is looping.
    ///
    /// # Errors
    /// The ledger's error when Redis does not answer (within the ledger's operation timeout).
    pub async fn check(
        &self,
        tenant: &str,
        session: &str,
        body: &[u8],
    ) -> Result<Option<String>, ledger::Error> {
        if !self.enabled() {
            return Ok(None);
        }
        let n = self
            .ledger
            .count_session_call(tenant, session, body, self.window, chrono::Utc::now())
            .await?;
        if let Some(max) = self.rpm
            && n.per_minute > max
        {
            return Ok(Some(format!(
                "session {session} of tenant {tenant} sent {} requests this minute (session.max_requests_per_minute = {max}); \
                 an agent may be looping. Wait a minute or start a new session (X-Session-ID)",
                n.per_minute
            )));
        }
        if let Some(max) = self.identical
            && n.identical > max
        {
            return Ok(Some(format!(
                "session {session} of tenant {tenant} sent the same request body {} times within {}s \
                 (session.max_identical_requests = {max}); an agent may be looping. Change the request or start a new session",
                n.identical,
                self.window.as_secs()
            )));
        }
        Ok(None)
    }
}
