//! A local durable spool for usage that could not be written to Redis, replayed when Redis returns.
//!
//! When Redis is unreachable, the enforcer and the observer append each settlement, release or
//! observer record here instead of losing it. The spool is a directory of append-only segment files
//! (`<seq>.spool`, see [`format`] for the record framing: magic, length, CRC-32, JSON), written by one
//! thread with group commit and fsync, bounded in bytes (a full spool refuses and counts, never drops
//! silently), and crash-safe (a torn last record is detected and ignored on replay).
//!
//! Replay ([`Spool::replay_once`], or the [`Replayer`] task with backoff) seals the current segment,
//! re-sends every record of the sealed segments in append order, and deletes a segment once all of
//! its records are acknowledged. Settle, release and record are idempotent per request / event id
//! (for the ledger's `idempotency_ttl`, 7 days), so a replay interrupted by a crash or a new outage
//! simply runs again from the start of the segment: nothing lost, nothing counted twice.
//!
//! Default location: `/var/lib/llmwarden/spool/<instance>/` ([`SpoolConfig::for_instance`]); one
//! process per directory (a lock file enforces it).

mod format;
mod replay;
mod writer;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

pub use replay::{ReplayReport, Replayer, ReplayerConfig, recover_instance};

use crate::Error;
use crate::store::{Settlement, UsageRecord};

/// One piece of usage waiting for Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SpoolEntry {
    /// An enforcer call's real cost ([`crate::store::Ledger::settle`]).
    Settle(Settlement),
    /// An enforcer call that failed before anything was billed ([`crate::store::Ledger::release`]).
    Release {
        /// The tenant.
        tenant: String,
        /// The request (= reservation) id.
        request_id: String,
    },
    /// A call the observer saw ([`crate::store::Ledger::record`]).
    Record(UsageRecord),
}

/// When an append is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `append` returns after the record is fsync'd (appends waiting together share one fsync).
    EveryRecord,
    /// `append` returns after the record is written to the page cache; it is fsync'd at most this
    /// much later. A machine crash (not a process crash) inside that window can lose those records.
    Batch(Duration),
}

/// Where the spool lives and how big it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// The spool directory (created if missing). Default `/var/lib/llmwarden/spool/<instance>/`.
    pub dir: PathBuf,
    /// The bound on all segments together; a full spool refuses appends ([`Error::SpoolFull`]).
    /// Default 256 MiB (about a million settlements).
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size. Default 8 MiB.
    pub segment_bytes: u64,
    /// Default [`Durability::EveryRecord`].
    pub durability: Durability,
}

impl SpoolConfig {
    /// The base of the default location.
    pub const DEFAULT_BASE: &'static str = "/var/lib/llmwarden/spool";

    /// The defaults, in `dir`.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> SpoolConfig {
        SpoolConfig {
            dir: dir.into(),
            max_bytes: 256 << 20,
            segment_bytes: 8 << 20,
            durability: Durability::EveryRecord,
        }
    }

    /// The defaults at `/var/lib/llmwarden/spool/<instance>/`.
    #[must_use]
    pub fn for_instance(instance: &str) -> SpoolConfig {
        SpoolConfig::new(Path::new(Self::DEFAULT_BASE).join(instance))
    }
}

/// Counters, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Bytes in all segments (the bound applies to this).
    pub bytes: u64,
    /// Records appended since open.
    pub appended: u64,
    /// Appends refused because the spool was full.
    pub refused_full: u64,
    /// Records re-sent to Redis and acknowledged since open.
    pub replayed: u64,
    /// Records Redis rejected as invalid, kept in `rejected.jsonl`.
    pub rejected: u64,
    /// Damaged records skipped on replay, and torn last records ignored.
    pub corrupt: u64,
}

/// State shared by the handle, the writer thread and the replayer.
pub(crate) struct Shared {
    pub(crate) cfg: SpoolConfig,
    pub(crate) used_bytes: AtomicU64,
    pub(crate) appended: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) corrupt: AtomicU64,
    pub(crate) notify: Notify,
    /// Serialises replay passes (the enforcer's start-up replay and the background replayer).
    pub(crate) replaying: tokio::sync::Mutex<()>,
    _lock: File,
}

/// The spool handle: cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::Sender<writer::Cmd>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.shared.cfg.dir)
            .field("stats", &self.stats())
            .finish()
    }
}

pub(crate) fn io_err(path: &Path, what: &str, e: &std::io::Error) -> Error {
    Error::Spool {
        path: path.display().to_string(),
        detail: format!("{what}: {e}"),
    }
}

pub(crate) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.spool"))
}

/// Every segment file in `dir` as (sequence number, path), unsorted.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let rd = std::fs::read_dir(dir).map_err(|e| io_err(dir, "list", &e))?;
    let mut v = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| io_err(dir, "list", &e))?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".spool"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        v.push((seq, entry.path()));
    }
    Ok(v)
}

impl Spool {
    /// Opens (creating it if needed) the spool in `cfg.dir` and starts its writer thread. Records
    /// left by a previous run stay in place for replay; new ones go to a new segment.
    ///
    /// # Errors
    /// [`Error::Spool`] when the directory cannot be created or read, or another process holds it.
    pub fn open(cfg: SpoolConfig) -> Result<Spool, Error> {
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_err(&dir, "create (set spool_dir to a writable directory)", &e))?;
        let lock_path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, "open lock", &e))?;
        // A handle of this process that was just dropped releases the lock when its writer thread
        // ends: wait briefly for that, not for another process.
        let mut tries = 0;
        while let Err(e) = lock.try_lock() {
            tries += 1;
            if tries > 40 {
                return Err(Error::Spool {
                    path: dir.display().to_string(),
                    detail: format!(
                        "locked by another process ({e}); give each instance its own instance id / spool dir"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let segments = list_segments(&dir)?;
        let mut used = 0;
        for (_, p) in &segments {
            used += std::fs::metadata(p)
                .map_err(|e| io_err(p, "stat", &e))?
                .len();
        }
        let next = segments.iter().map(|(s, _)| s + 1).max().unwrap_or(1);
        let shared = Arc::new(Shared {
            cfg,
            used_bytes: AtomicU64::new(used),
            appended: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            notify: Notify::new(),
            replaying: tokio::sync::Mutex::new(()),
            _lock: lock,
        });
        let (tx, rx) = mpsc::channel();
        let w = writer::Writer {
            shared: Arc::clone(&shared),
            seq: next,
            file: None,
            file_len: 0,
            dirty_since: None,
        };
        std::thread::Builder::new()
            .name("llmw-spool".into())
            .spawn(move || writer::run(w, &rx))
            .map_err(|e| io_err(&dir, "start writer thread", &e))?;
        Ok(Spool { shared, tx })
    }

    /// The spool directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.shared.cfg.dir
    }

    /// Appends one entry; returns once it is durable per [`SpoolConfig::durability`].
    ///
    /// # Errors
    /// [`Error::SpoolFull`] when the bound is reached (the entry is refused and counted);
    /// [`Error::Spool`] when the disk write or fsync fails; [`Error::Invalid`] for an entry over
    /// 1 MiB.
    pub async fn append(&self, entry: &SpoolEntry) -> Result<(), Error> {
        let payload = serde_json::to_vec(entry).map_err(|e| Error::Json {
            what: "spool entry",
            source: e,
        })?;
        if payload.len() > format::MAX_PAYLOAD {
            return Err(Error::Invalid {
                what: "spool entry",
                detail: format!("{} bytes; at most 1 MiB", payload.len()),
            });
        }
        let (done, rx) = oneshot::channel();
        self.send(writer::Cmd::Append {
            bytes: format::encode(&payload),
            done,
        })?;
        let res = rx.await.map_err(|_| self.writer_gone())?;
        if res.is_ok() {
            self.shared.notify.notify_one();
        }
        res
    }

    /// Closes the current segment and returns every sealed segment, oldest first.
    pub(crate) async fn seal(&self) -> Result<Vec<PathBuf>, Error> {
        let (done, rx) = oneshot::channel();
        self.send(writer::Cmd::Seal { done })?;
        rx.await.map_err(|_| self.writer_gone())?
    }

    fn send(&self, cmd: writer::Cmd) -> Result<(), Error> {
        self.tx.send(cmd).map_err(|_| self.writer_gone())
    }

    fn writer_gone(&self) -> Error {
        Error::Spool {
            path: self.shared.cfg.dir.display().to_string(),
            detail: "the spool writer thread stopped".into(),
        }
    }

    /// The bound on [`SpoolStats::bytes`] (`max_bytes`): appends beyond it are refused.
    #[must_use]
    pub fn max_bytes(&self) -> u64 {
        self.shared.cfg.max_bytes
    }

    /// Whether any record is waiting for replay.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.shared.used_bytes.load(Ordering::Acquire) == 0
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> SpoolStats {
        let s = &self.shared;
        SpoolStats {
            bytes: s.used_bytes.load(Ordering::Acquire),
            appended: s.appended.load(Ordering::Relaxed),
            refused_full: s.refused.load(Ordering::Relaxed),
            replayed: s.replayed.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            corrupt: s.corrupt.load(Ordering::Relaxed),
        }
    }
}
