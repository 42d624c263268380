//! The Redis connection: one multiplexed, auto-reconnecting connection to a single node, or a
//! cluster connection, behind one type, with bounded waits so a dead or paused Redis never hangs a call.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::Error;

/// How the ledger talks to Redis. `Default` suits an enforcer on the same network as Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Each command's reply must arrive within this; a paused or overloaded Redis yields
    /// [`Error::Redis`] (timeout) instead of a hang. Default 500 ms.
    pub response_timeout: Duration,
    /// Each TCP connect attempt gives up after this. Default 1 s.
    pub connection_timeout: Duration,
    /// A whole ledger operation (including a NOSCRIPT reload and reconnect) gives up after this,
    /// whatever the client library does. Default 2 s.
    pub operation_timeout: Duration,
    /// Reconnect attempts of the single-node connection manager per failure. Default 2.
    pub reconnect_retries: usize,
    /// Session hashes expire this long after their last write. Default 24 h.
    pub session_ttl: Duration,
    /// How long settle's done markers and record's event markers live: the window in which a
    /// repeated settle or record is recognised (spool replays must happen within it). Default 7 days.
    pub idempotency_ttl: Duration,
    /// A hold hash outlives its expiry by this much, so an expired hold can still be reclaimed
    /// exactly even when nothing touched the tenant for a while. Default 7 days.
    pub hold_grace: Duration,
    /// Expired holds reclaimed per script call at most (bounds a script's run time). Default 64.
    pub reclaim_batch: u32,
    /// Group commit: concurrent reserves (settles) of one tenant that queue up while an earlier one
    /// is in flight go to Redis as one script call (store/batch.rs), several times the throughput
    /// under load; nothing waits at low load. `false` sends one script per call. Default true.
    pub group_commit: bool,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            response_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(2),
            reconnect_retries: 2,
            session_ttl: Duration::from_secs(24 * 3600),
            idempotency_ttl: Duration::from_secs(7 * 24 * 3600),
            hold_grace: Duration::from_secs(7 * 24 * 3600),
            reclaim_batch: 64,
            group_commit: true,
        }
    }
}

/// A single-node or cluster connection; both are cheap to clone and multiplexed.
#[derive(Clone)]
pub(crate) enum Conn {
    /// `redis://host:port[/db]`: one node, reconnected automatically.
    Single(ConnectionManager),
    /// `redis+cluster://h1:p1,h2:p2` or several comma-separated nodes.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Connects per `url` (see [`cluster_nodes`]). With `lazy`, a single-node connection is made on
    /// first use, so a process can start while Redis is down.
    pub(crate) async fn open(url: &str, cfg: &LedgerConfig, lazy: bool) -> Result<Conn, Error> {
        if let Some(nodes) = cluster_nodes(url) {
            let client = ClusterClientBuilder::new(nodes)
                .connection_timeout(cfg.connection_timeout)
                .response_timeout(cfg.response_timeout)
                .overall_response_timeout(Some(cfg.operation_timeout))
                .retries(1)
                .build()?;
            let conn = tokio::time::timeout(cfg.operation_timeout, client.get_async_connection())
                .await
                .map_err(|_| timeout_error("connect", cfg.operation_timeout))??;
            return Ok(Conn::Cluster(conn));
        }
        let client = redis::Client::open(url)?;
        let mcfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(cfg.response_timeout))
            .set_connection_timeout(Some(cfg.connection_timeout))
            .set_number_of_retries(cfg.reconnect_retries)
            .set_max_delay(Duration::from_millis(200));
        if lazy {
            return Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
                client, mcfg,
            )?));
        }
        let mgr = tokio::time::timeout(
            cfg.operation_timeout,
            ConnectionManager::new_with_config(client, mcfg),
        )
        .await
        .map_err(|_| timeout_error("connect", cfg.operation_timeout))??;
        Ok(Conn::Single(mgr))
    }
}

/// The node URLs when `url` names a cluster: `redis+cluster://h1:p1,h2:p2` (credentials on the
/// first node apply to all) or several comma-separated `redis://` URLs. `None` for a single node.
#[must_use]
pub(crate) fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        let mut parts = rest.split(',').map(str::trim).filter(|s| !s.is_empty());
        let first = parts.next()?;
        let creds = first.rsplit_once('@').map(|(c, _)| format!("{c}@"));
        let mut nodes = vec![format!("redis://{first}")];
        for p in parts {
            let p = p.strip_prefix("redis://").unwrap_or(p);
            match (&creds, p.contains('@')) {
                (Some(c), false) => nodes.push(format!("redis://{c}{p}")),
                _ => nodes.push(format!("redis://{p}")),
            }
        }
        return Some(nodes);
    }
    if url.contains(',') {
        let nodes = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_owned()
                } else {
                    format!("redis://{s}")
                }
            })
            .collect();
        return Some(nodes);
    }
    None
}

/// A timeout as a Redis I/O error, so callers see one "Redis unavailable" kind.
pub(crate) fn timeout_error(op: &'static str, after: Duration) -> Error {
    Error::timed_out(op, after)
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls() {
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379"), None);
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379/2"), None);
        assert_eq!(
            cluster_nodes("redis+cluster://a:1,b:2").unwrap(),
            vec!["redis://a:1".to_owned(), "redis://b:2".to_owned()]
        );
        assert_eq!(
            cluster_nodes("redis+cluster://u:p@a:1,b:2").unwrap(),
            vec!["redis://u:p@a:1".to_owned(), "redis://u:p@b:2".to_owned()]
        );
        assert_eq!(
            cluster_nodes("redis://a:1,redis://b:2").unwrap(),
            vec!["redis://a:1".to_owned(), "redis://b:2".to_owned()]
        );
        assert_eq!(
            cluster_nodes("a:1, b:2").unwrap(),
            vec!["redis://a:1".to_owned(), "redis://b:2".to_owned()]
        );
    }
}
