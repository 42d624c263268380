//! The Redis connection: one multiplexed, auto-reconnecting connection to a single node, or a
//! cluster connection, behind one type, with bounded waits so a dead or paused Redis never hangs a call.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, TlsCertificates, Value};

use crate::Error;

/// How the ledger talks to Redis. `Default` suits an enforcer on the same network as Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Password for Redis AUTH, over any in the URL (e.g. from a Kubernetes Secret through the
    /// environment, so it is not in a config file). Never printed.
    pub password: Option<String>,
    /// PEM certificates of the CA that signed the Redis server's certificate, for `rediss://`;
    /// `None` trusts the system's store.
    pub tls_ca_pem: Option<Vec<u8>>,
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
    /// With group commit, a settle that finds its tenant's settle lane idle waits this long for
    /// others to join it, instead of going to Redis alone; settles arriving while a batch is in
    /// flight wait until a window has passed since it left, so under load the tenant's settles
    /// leave one batch per window (or sooner, a whole batch). A settle runs after its response is
    /// complete, so the wait delays only when the spend shows (holds keep the worst case counted
    /// meanwhile), and saves Redis a script run and the enforcer a round trip per settle that
    /// joins. Zero (the default) sends at once: a caller that waits for its settle before its next
    /// call (a closed loop) would wait the window each time. The enforcer, whose settles run off
    /// the call's path, sets it.
    pub settle_window: Duration,
    /// The audit trail (docs/audit.md): every settle, record, denial, release and abandoned hold
    /// appends one record to the tenant's stream of the day, in the same script. Default true.
    pub audit: bool,
    /// A tenant-day audit stream expires this long after its day ends. Default 90 days.
    pub audit_retention: Duration,
    /// Records kept per tenant-day stream at most (`XADD MAXLEN ~`, so a few more may stay); 0
    /// keeps every record until the stream expires. Default 0.
    pub audit_max_per_day: u64,
    /// Budget alert thresholds in percent of a budget's limit (docs/audit.md); each is fired once
    /// per (budget, period, threshold) by the script that crosses it. Empty turns alerts off.
    /// Default 50, 80, 100.
    pub alert_thresholds_pct: Vec<u32>,
    /// Extra single-node connections for reserves and settles, one per thread that calls
    /// [`super::pin_thread_connection`] with its index: a thread-per-core server gives each of its
    /// runtimes a connection whose I/O task runs on that runtime, so a reserve wakes no other
    /// thread. 0 (the default) sends everything over the one shared connection; a cluster URL
    /// always does.
    pub thread_connections: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            password: None,
            tls_ca_pem: None,
            response_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(2),
            reconnect_retries: 2,
            session_ttl: Duration::from_secs(24 * 3600),
            idempotency_ttl: Duration::from_secs(7 * 24 * 3600),
            hold_grace: Duration::from_secs(7 * 24 * 3600),
            reclaim_batch: 64,
            group_commit: true,
            settle_window: Duration::ZERO,
            audit: true,
            audit_retention: Duration::from_secs(90 * 24 * 3600),
            audit_max_per_day: 0,
            alert_thresholds_pct: vec![50, 80, 100],
            thread_connections: 0,
        }
    }
}

impl std::fmt::Debug for LedgerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerConfig")
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(Vec::len))
            .field("response_timeout", &self.response_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("reconnect_retries", &self.reconnect_retries)
            .field("session_ttl", &self.session_ttl)
            .field("idempotency_ttl", &self.idempotency_ttl)
            .field("hold_grace", &self.hold_grace)
            .field("reclaim_batch", &self.reclaim_batch)
            .field("group_commit", &self.group_commit)
            .field("settle_window", &self.settle_window)
            .field("audit", &self.audit)
            .field("audit_retention", &self.audit_retention)
            .field("audit_max_per_day", &self.audit_max_per_day)
            .field("alert_thresholds_pct", &self.alert_thresholds_pct)
            .field("thread_connections", &self.thread_connections)
            .finish()
    }
}

impl LedgerConfig {
    /// Adds the Redis credentials a deployment keeps outside its config file: the password from
    /// the environment variable `password_env` (a Kubernetes Secret, a systemd credential) and
    /// the PEM CA bundle at `ca_file` that signed the server's certificate for `rediss://`. The
    /// ACL user name, if any, is the URL's (`redis://llmwarden@redis:6379`).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the variable or file when the variable is unset or empty, or the
    /// file is unreadable or holds no PEM certificate.
    pub fn with_credentials(
        mut self,
        password_env: Option<&str>,
        ca_file: Option<&std::path::Path>,
    ) -> Result<LedgerConfig, Error> {
        if let Some(var) = password_env {
            let pw = std::env::var(var).ok().filter(|v| !v.is_empty());
            self.password = Some(pw.ok_or_else(|| Error::Invalid {
                what: "redis_password_env",
                detail: format!("environment variable {var} is not set or empty"),
            })?);
        }
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| Error::Invalid {
                what: "redis_ca_file",
                detail: format!("{}: {e}", path.display()),
            })?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(Error::Invalid {
                    what: "redis_ca_file",
                    detail: format!("{}: no PEM certificate in it", path.display()),
                });
            }
            self.tls_ca_pem = Some(pem);
        }
        Ok(self)
    }
}

/// TLS for `rediss://`: the configured CA, else the system's trust store. rustls in redis uses
/// the process-wide crypto provider; ring is installed when none is (the workspace's provider).
fn tls(cfg: &LedgerConfig) -> TlsCertificates {
    let _ = rustls::crypto::ring::default_provider().install_default();
    TlsCertificates {
        client_tls: None,
        root_cert: cfg.tls_ca_pem.clone(),
    }
}

thread_local! {
    /// This thread's index into the ledger's thread connections ([`pin_thread_connection`]).
    static THREAD_CONN: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Sends this thread's reserves and settles over the ledger's thread connection `index` (see
/// [`LedgerConfig::thread_connections`]); an index past their number uses the shared one. Call it
/// once, first thing on each of a thread-per-core server's runtime threads, so that connection's
/// I/O task is spawned on (and its replies wake) that thread only.
pub fn pin_thread_connection(index: usize) {
    THREAD_CONN.with(|c| c.set(Some(index)));
}

/// This thread's pinned index ([`pin_thread_connection`]), if any.
pub(crate) fn current_thread() -> Option<usize> {
    THREAD_CONN.with(std::cell::Cell::get)
}

/// The connection this thread uses among `locals`, else `shared`.
pub(crate) fn thread_conn<'a>(shared: &'a Conn, locals: &'a [Conn]) -> &'a Conn {
    current_thread()
        .and_then(|i| locals.get(i))
        .unwrap_or(shared)
}

/// A single-node or cluster connection; both are cheap to clone and multiplexed.
#[derive(Clone)]
pub(crate) enum Conn {
    /// `redis://host:port[/db]`: one node, reconnected automatically.
    Single(ConnectionManager),
    /// `redis+cluster://h1:p1,h2:p2` (`rediss+cluster://` for TLS) or several comma-separated nodes.
    Cluster(ClusterConnection),
}

impl Conn {
    /// The [`LedgerConfig::thread_connections`] for `url`: lazy single-node connections, made on
    /// first use by the thread pinned to each, so their I/O tasks run there. None for a cluster
    /// (its connection manages a connection per node already).
    pub(crate) async fn open_thread_locals(
        url: &str,
        cfg: &LedgerConfig,
    ) -> Result<Vec<Conn>, Error> {
        if cluster_nodes(url).is_some() {
            return Ok(Vec::new());
        }
        let mut v = Vec::with_capacity(cfg.thread_connections);
        for _ in 0..cfg.thread_connections {
            v.push(Conn::open(url, cfg, true).await?);
        }
        Ok(v)
    }

    /// Connects per `url` (see [`cluster_nodes`]). With `lazy`, a single-node connection is made on
    /// first use, so a process can start while Redis is down.
    pub(crate) async fn open(url: &str, cfg: &LedgerConfig, lazy: bool) -> Result<Conn, Error> {
        if let Some(nodes) = cluster_nodes(url) {
            let tls_nodes = nodes.iter().any(|n| n.starts_with("rediss://"));
            let mut builder = ClusterClientBuilder::new(nodes);
            if let Some(p) = &cfg.password {
                builder = builder.password(p.clone());
            }
            if tls_nodes {
                builder = builder.certs(tls(cfg));
            }
            let client = builder
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
        let mut info = url.into_connection_info()?;
        if let Some(p) = &cfg.password {
            let settings = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(settings);
        }
        let client = if url.starts_with("rediss://") {
            redis::Client::build_with_tls(info, tls(cfg))?
        } else {
            redis::Client::open(info)?
        };
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

/// The node URLs when `url` names a cluster: `redis+cluster://h1:p1,h2:p2` or
/// `rediss+cluster://...` for TLS (credentials on the
/// first node apply to all) or several comma-separated `redis://` URLs. `None` for a single node.
#[must_use]
pub(crate) fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", Some(rest))
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", Some(rest))
    } else {
        ("redis", None)
    };
    if let Some(rest) = rest {
        let mut parts = rest.split(',').map(str::trim).filter(|s| !s.is_empty());
        let first = parts.next()?;
        let creds = first.rsplit_once('@').map(|(c, _)| format!("{c}@"));
        let mut nodes = vec![format!("{scheme}://{first}")];
        for p in parts {
            let p = p.strip_prefix(&format!("{scheme}://")).unwrap_or(p);
            match (&creds, p.contains('@')) {
                (Some(c), false) => nodes.push(format!("{scheme}://{c}{p}")),
                _ => nodes.push(format!("{scheme}://{p}")),
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
/// `XRANGE key start end COUNT count`: each entry's id and its fields (a value that is not a
/// string is left out), in stream order.
pub(crate) async fn xrange(
    c: &mut Conn,
    key: &str,
    start: &str,
    end: &str,
    count: usize,
) -> Result<Vec<(String, std::collections::HashMap<String, String>)>, redis::RedisError> {
    let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query_async(c)
        .await?;
    Ok(r.ids
        .into_iter()
        .map(|e| {
            let fields = e
                .map
                .into_iter()
                .filter_map(|(k, v)| redis::from_redis_value::<String>(v).ok().map(|v| (k, v)))
                .collect();
            (e.id, fields)
        })
        .collect())
}

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
    fn credentials_come_from_the_environment_and_a_pem_file_never_printed() {
        let var = "LLMWARDEN_TEST_REDIS_PASSWORD_CONN";
        // SAFETY: this test alone reads or writes this variable.
        unsafe { std::env::set_var(var, "s3cret-pw") };
        let cfg = LedgerConfig::default()
            .with_credentials(Some(var), None)
            .unwrap();
        assert_eq!(cfg.password.as_deref(), Some("s3cret-pw"));
        assert!(!format!("{cfg:?}").contains("s3cret-pw"));
        let err = LedgerConfig::default()
            .with_credentials(Some("LLMWARDEN_TEST_UNSET_VAR_X"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis_password_env") && err.contains("LLMWARDEN_TEST_UNSET_VAR_X"));
        let dir = std::env::temp_dir().join(format!("llmw-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let err = LedgerConfig::default()
            .with_credentials(None, Some(&bad))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("redis_ca_file") && err.contains("no PEM certificate"),
            "{err}"
        );
        let missing = dir.join("missing.pem");
        let err = LedgerConfig::default()
            .with_credentials(None, Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
            cluster_nodes("rediss+cluster://u@a:1,b:2").unwrap(),
            vec!["rediss://u@a:1".to_owned(), "rediss://u@b:2".to_owned()]
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
