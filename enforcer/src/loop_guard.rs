//! Agentic-loop protection per X-Session-ID: requests per minute and identical request bodies
//! within a window, counted in Redis under the tenant's hash tag so every replica sees the same
//! counts. (The session's cumulative spend cap is a ledger cap checked by reserve.)
//!
//! Keys (same slot as the rest of the tenant): `llmw:{T}:loop:{session}:rpm:{unix minute}` and
//! `llmw:{T}:loop:{session}:body:{sha256 prefix}`; both expire on their own.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::config::SessionConfig;

/// Why a loop check could not decide.
#[derive(Debug, thiserror::Error)]
#[error("redis unavailable for loop counters: {0}")]
pub struct Unavailable(pub String);

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The loop checker; cheap to clone.
#[derive(Clone)]
pub struct LoopGuard {
    url: Arc<str>,
    conn: Arc<Mutex<Option<Conn>>>,
    rpm: Option<u64>,
    identical: Option<u64>,
    window_secs: u64,
    timeout: Duration,
}

impl LoopGuard {
    /// A guard for `cfg`; the Redis connection opens on first use.
    #[must_use]
    pub fn new(url: &str, cfg: &SessionConfig, timeout: Duration) -> LoopGuard {
        LoopGuard {
            url: url.into(),
            conn: Arc::default(),
            rpm: cfg.max_requests_per_minute,
            identical: cfg.max_identical_requests,
            window_secs: cfg.identical_window_secs.unwrap_or(300).max(1),
            timeout,
        }
    }

    /// Whether any counter is configured.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.rpm.is_some() || self.identical.is_some()
    }

    async fn conn(&self) -> Result<Conn, Unavailable> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let u = Unavailable;
        let c = if let Some(rest) = self.url.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = rest.split(',').map(|n| format!("redis://{n}")).collect();
            let client = redis::cluster::ClusterClient::new(nodes).map_err(|e| u(e.to_string()))?;
            Conn::Cluster(
                client
                    .get_async_connection()
                    .await
                    .map_err(|e| u(e.to_string()))?,
            )
        } else {
            let client = redis::Client::open(&*self.url).map_err(|e| u(e.to_string()))?;
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(self.timeout))
                .set_connection_timeout(Some(self.timeout));
            Conn::Single(
                ConnectionManager::new_with_config(client, cfg)
                    .await
                    .map_err(|e| u(e.to_string()))?,
            )
        };
        *g = Some(c.clone());
        Ok(c)
    }

    /// Counts this call and returns `Some(message)` when the session is looping.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis does not answer within the timeout.
    pub async fn check(
        &self,
        tenant: &str,
        session: &str,
        body: &[u8],
    ) -> Result<Option<String>, Unavailable> {
        if !self.enabled() {
            return Ok(None);
        }
        let minute = chrono::Utc::now().timestamp() / 60;
        let base = format!("llmw:{{{tenant}}}:loop:{session}");
        let rpm_key = format!("{base}:rpm:{minute}");
        let digest = hex::encode(&Sha256::digest(body)[..12]);
        let body_key = format!("{base}:body:{digest}");
        let mut p = redis::pipe();
        p.cmd("INCR")
            .arg(&rpm_key)
            .cmd("EXPIRE")
            .arg(&rpm_key)
            .arg(120)
            .ignore();
        p.cmd("SET")
            .arg(&body_key)
            .arg(0)
            .arg("EX")
            .arg(self.window_secs)
            .arg("NX")
            .ignore();
        p.cmd("INCR").arg(&body_key);
        let fut = async {
            let c = self.conn().await?;
            let r: redis::RedisResult<(u64, u64)> = match c {
                Conn::Single(mut c) => p.query_async(&mut c).await,
                Conn::Cluster(mut c) => p.query_async(&mut c).await,
            };
            r.map_err(|e| Unavailable(e.to_string()))
        };
        let (rpm, same) = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| {
                Unavailable(format!("no reply within {} ms", self.timeout.as_millis()))
            })??;
        if let Some(max) = self.rpm
            && rpm > max
        {
            return Ok(Some(format!(
                "session {session} of tenant {tenant} sent {rpm} requests this minute (session.max_requests_per_minute = {max}); \
                 an agent may be looping. Wait a minute or start a new session (X-Session-ID)"
            )));
        }
        if let Some(max) = self.identical
            && same > max
        {
            return Ok(Some(format!(
                "session {session} of tenant {tenant} sent the same request body {same} times within {}s \
                 (session.max_identical_requests = {max}); an agent may be looping. Change the request or start a new session",
                self.window_secs
            )));
        }
        Ok(None)
    }
}
