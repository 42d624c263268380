//! Durability of usage across Redis outages and crashes: the instance id, the local spool, its
//! background replayer, and the start-up recovery of the holds a previous run left.
//!
//! Every settle or release that cannot reach Redis (and the usage of every call admitted without a
//! reservation under `on_redis_unavailable = "allow"`) is appended to the spool by the ledger's
//! durable writer (`ledger::durable`, called from [`crate::settle`]), fsync'd, and replayed
//! idempotently once Redis answers. At start the enforcer
//! replays the spool its previous run left, then settles that run's remaining holds (tagged with
//! the same `instance_id`) at their reserved amount, flagged estimated.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ledger::spool::{Replayer, ReplayerConfig, Spool, SpoolConfig, recover_instance};
use ledger::store::Ledger;

use crate::config::Config;
use crate::error::StartError;

/// This instance's id: `instance_id`, else "<hostname>-<listen port>" (stable across restarts
/// with the same config on the same host).
#[must_use]
pub fn instance_id(cfg: &Config) -> String {
    if !cfg.instance_id.is_empty() {
        return cfg.instance_id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains(['/', '{', '}']))
        .unwrap_or_else(|| "enforcer".into());
    let port = cfg.listen.rsplit(':').next().unwrap_or("0");
    format!("{host}-{port}")
}

/// The spool directory: `spool_dir`, else `/var/lib/llmwarden/spool/<instance id>/`.
#[must_use]
pub fn spool_dir(cfg: &Config, instance: &str) -> PathBuf {
    cfg.spool_dir
        .clone()
        .unwrap_or_else(|| SpoolConfig::for_instance(instance).dir)
}

/// Opens the spool.
///
/// # Errors
/// [`StartError::Spool`] when it cannot be created or is in use by another process.
pub fn open_spool(cfg: &Config, instance: &str) -> Result<Spool, StartError> {
    let mut sc = SpoolConfig::new(spool_dir(cfg, instance));
    sc.max_bytes = cfg.spool_max_bytes;
    Spool::open(sc).map_err(StartError::Spool)
}

/// Starts the background replayer and the start-up recovery (retried with backoff while Redis is
/// down; it only touches holds created before `started`).
#[must_use]
pub fn start(spool: &Spool, ledger: &Ledger, instance: String, started: DateTime<Utc>) -> Replayer {
    let (s, l) = (spool.clone(), ledger.clone());
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(200);
        loop {
            match recover_instance(&s, &l, &instance, started).await {
                Ok(r) => {
                    tracing::info!(instance = %instance, replayed = r.sent(), replaced_estimates = r.replaced_estimates,
                        abandoned_holds = r.abandoned, abandoned_usd = %crate::usd_string(r.abandoned_amount),
                        rejected = r.rejected, corrupt = r.corrupt, "start-up recovery done");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "start-up recovery failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
    Replayer::spawn(spool.clone(), ledger.clone(), ReplayerConfig::default())
}
