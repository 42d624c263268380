//! Replaying the spool into Redis: one pass ([`Spool::replay_once`]), the background [`Replayer`]
//! with exponential backoff, and the start-up recovery of an instance ([`recover_instance`]).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;

use super::{Spool, SpoolEntry, format, io_err, writer::sync_dir};
use crate::store::{Ledger, RecordOutcome, SettleOutcome};
use crate::{Error, Nanos};

/// What one replay pass (or a start-up recovery) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Settlements committed.
    pub settled: u64,
    /// Settlements that replaced an abandoned hold's estimate with the real usage.
    pub replaced_estimates: u64,
    /// Settlements and records Redis already had (an earlier replay or a write that did land).
    pub duplicates: u64,
    /// Releases sent.
    pub released: u64,
    /// Observer records committed.
    pub recorded: u64,
    /// Entries Redis rejected as invalid (kept in `rejected.jsonl` in the spool directory).
    pub rejected: u64,
    /// Damaged or torn records skipped.
    pub corrupt: u64,
    /// Segments fully replayed and deleted.
    pub segments: u64,
    /// Holds of a previous run settled at their reserved amount ([`recover_instance`] only).
    pub abandoned: u64,
    /// Their total.
    pub abandoned_amount: Nanos,
}

impl ReplayReport {
    /// Entries re-sent to Redis (acknowledged).
    #[must_use]
    pub fn sent(&self) -> u64 {
        self.settled + self.duplicates + self.released + self.recorded
    }
}

/// Sends one entry. Errors other than invalid input leave it in the spool for the next pass.
async fn apply(ledger: &Ledger, e: &SpoolEntry, r: &mut ReplayReport) -> Result<(), Error> {
    match e {
        SpoolEntry::Settle(s) => match ledger.settle(s).await? {
            SettleOutcome::Settled { .. } => r.settled += 1,
            SettleOutcome::ReplacedEstimate { .. } => {
                r.settled += 1;
                r.replaced_estimates += 1;
            }
            SettleOutcome::AlreadySettled => r.duplicates += 1,
        },
        SpoolEntry::Release { tenant, request_id } => {
            ledger.release(tenant, request_id).await?;
            r.released += 1;
        }
        SpoolEntry::Record(u) => match ledger.record(u).await? {
            RecordOutcome::Recorded => r.recorded += 1,
            RecordOutcome::Duplicate => r.duplicates += 1,
        },
    }
    Ok(())
}

/// Keeps an entry Redis refused for good, one JSON line per entry, so nothing is dropped silently.
fn reject(dir: &Path, payload: &[u8], why: &Error) -> Result<(), Error> {
    let path = dir.join("rejected.jsonl");
    tracing::error!(spool = %dir.display(), error = %why, "spool entry rejected; kept in rejected.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| io_err(&path, "open", &e))?;
    f.write_all(payload)
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_data())
        .map_err(|e| io_err(&path, "append", &e))
}

impl Spool {
    /// Re-sends every record appended so far, in append order, and deletes each segment once all
    /// of its records are acknowledged. Stops at the first Redis failure (the remaining records,
    /// and the whole current segment, stay for the next pass; re-sending is idempotent).
    ///
    /// # Errors
    /// [`Error::Redis`] (or another non-input error) when Redis failed; [`Error::Spool`] on I/O.
    pub async fn replay_once(&self, ledger: &Ledger) -> Result<ReplayReport, Error> {
        let _one_at_a_time = self.shared.replaying.lock().await;
        let dir = self.shared.cfg.dir.clone();
        let mut rep = ReplayReport::default();
        for path in self.seal().await? {
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(|e| io_err(&path, "read", &e))?;
            let d = format::decode(&bytes);
            for payload in &d.records {
                match serde_json::from_slice::<SpoolEntry>(payload) {
                    Ok(entry) => match apply(ledger, &entry, &mut rep).await {
                        Ok(()) => {}
                        Err(e) if e.is_invalid_input() => {
                            reject(&dir, payload, &e)?;
                            rep.rejected += 1;
                        }
                        Err(e) => return Err(e),
                    },
                    Err(e) => {
                        let e = Error::Json {
                            what: "spool entry",
                            source: e,
                        };
                        reject(&dir, payload, &e)?;
                        rep.rejected += 1;
                    }
                }
            }
            let damaged = d.corrupt + u64::from(d.torn_bytes > 0);
            if damaged > 0 {
                tracing::warn!(segment = %path.display(), corrupt = d.corrupt, corrupt_bytes = d.corrupt_bytes,
                    torn_bytes = d.torn_bytes, "spool segment had damaged records; skipped them");
            }
            rep.corrupt += damaged;
            std::fs::remove_file(&path).map_err(|e| io_err(&path, "remove", &e))?;
            sync_dir(&dir)?;
            let s = &self.shared;
            s.used_bytes.fetch_sub(bytes.len() as u64, Ordering::AcqRel);
            s.corrupt.fetch_add(damaged, Ordering::Relaxed);
            rep.segments += 1;
        }
        let s = &self.shared;
        s.replayed.fetch_add(rep.sent(), Ordering::Relaxed);
        s.rejected.fetch_add(rep.rejected, Ordering::Relaxed);
        Ok(rep)
    }
}

/// Start-up recovery of an enforcer instance: replays the spool its previous run left (real usage
/// first), then settles every hold that run left in Redis (tagged with `instance`, created before
/// `started_before`) at its reserved amount, flagged estimated. A later real settle of one of them
/// (from another spool) replaces the estimate.
///
/// # Errors
/// As [`Spool::replay_once`]; call again (or let the [`Replayer`] finish) when Redis is down.
pub async fn recover_instance(
    spool: &Spool,
    ledger: &Ledger,
    instance: &str,
    started_before: DateTime<Utc>,
) -> Result<ReplayReport, Error> {
    let mut rep = spool.replay_once(ledger).await?;
    for (tenant, hold) in ledger.instance_holds(instance, Utc::now(), 100_000).await? {
        if hold.created_at >= started_before {
            continue;
        }
        if let Some(amount) = ledger.settle_abandoned(&tenant, &hold.id).await? {
            rep.abandoned += 1;
            rep.abandoned_amount = Nanos(rep.abandoned_amount.0.saturating_add(amount.0));
        }
    }
    Ok(rep)
}

/// Backoff of the [`Replayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayerConfig {
    /// First retry delay after a failed pass, and the pause between passes. Default 200 ms.
    pub min_backoff: Duration,
    /// The longest retry delay (doubling from `min_backoff`, with jitter). Default 30 s.
    pub max_backoff: Duration,
    /// How often an idle replayer looks at the spool even without a new append. Default 5 s.
    pub idle_check: Duration,
}

impl Default for ReplayerConfig {
    fn default() -> Self {
        ReplayerConfig {
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            idle_check: Duration::from_secs(5),
        }
    }
}

/// A background task that replays the spool whenever it holds records, retrying with exponential
/// backoff while Redis is unavailable. Dropping it stops the task.
#[derive(Debug)]
pub struct Replayer {
    task: JoinHandle<()>,
}

impl Replayer {
    /// Starts the task on the current tokio runtime.
    #[must_use]
    pub fn spawn(spool: Spool, ledger: Ledger, cfg: ReplayerConfig) -> Replayer {
        let task = tokio::spawn(async move {
            let mut backoff = cfg.min_backoff;
            loop {
                if spool.is_empty() {
                    tokio::select! {
                        () = spool.shared.notify.notified() => {}
                        () = tokio::time::sleep(cfg.idle_check) => {}
                    }
                    continue;
                }
                match spool.replay_once(&ledger).await {
                    Ok(r) => {
                        if r.sent() + r.rejected + r.corrupt > 0 {
                            tracing::info!(
                                settled = r.settled,
                                released = r.released,
                                recorded = r.recorded,
                                duplicates = r.duplicates,
                                replaced_estimates = r.replaced_estimates,
                                rejected = r.rejected,
                                corrupt = r.corrupt,
                                "spool replayed"
                            );
                        }
                        backoff = cfg.min_backoff;
                        tokio::time::sleep(cfg.min_backoff).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "spool replay failed; retrying");
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(cfg.max_backoff);
                    }
                }
            }
        });
        Replayer { task }
    }

    /// Whether the task is still running.
    #[must_use]
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `d` scaled by a factor in [0.75, 1.25), so instances do not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let f = 0.75 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(f)
}
