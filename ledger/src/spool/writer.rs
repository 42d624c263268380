//! The spool's single writer thread: appends framed records to the current segment with group
//! commit (every append waiting in the queue shares one fsync), rotates segments, and seals the
//! current segment for the replayer.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Durability, Shared, io_err, segment_path};
use crate::Error;

/// A request to the writer thread.
pub(crate) enum Cmd {
    /// Append one framed record; answered once it is durable (or written, in batch mode).
    Append {
        /// The framed record.
        bytes: Vec<u8>,
        /// The answer.
        done: oneshot::Sender<Result<(), Error>>,
    },
    /// Close the current segment (fsync'd) and start a new one; answers the sealed segments, oldest
    /// first: everything appended before this command.
    Seal {
        /// The answer.
        done: oneshot::Sender<Result<Vec<PathBuf>, Error>>,
    },
}

/// The writer's state: the open segment and what is not yet fsync'd.
pub(crate) struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) seq: u64,
    pub(crate) file: Option<File>,
    pub(crate) file_len: u64,
    pub(crate) dirty_since: Option<Instant>,
}

impl Writer {
    fn path(&self) -> PathBuf {
        segment_path(&self.shared.cfg.dir, self.seq)
    }

    fn file(&mut self) -> Result<&mut File, Error> {
        if self.file.is_none() {
            let path = self.path();
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_err(&path, "open segment", &e))?;
            sync_dir(&self.shared.cfg.dir)?;
            self.file = Some(f);
            self.file_len = 0;
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Writes one framed record, enforcing the byte bound.
    fn append(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let cfg = &self.shared.cfg;
        let len = bytes.len() as u64;
        let used = self.shared.used_bytes.load(Ordering::Acquire);
        if used.saturating_add(len) > cfg.max_bytes {
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Error::SpoolFull {
                dir: cfg.dir.display().to_string(),
                used,
                limit: cfg.max_bytes,
            });
        }
        if self.file_len > 0 && self.file_len + len > cfg.segment_bytes {
            self.rotate()?;
        }
        let path = self.path();
        let res = self.file()?.write_all(bytes);
        if let Err(e) = res {
            // A partial write leaves a torn record: keep it at the end of this segment (the reader
            // ignores it) and continue in a fresh one.
            let on_disk = std::fs::metadata(&path).map_or(self.file_len, |m| m.len());
            self.shared
                .used_bytes
                .fetch_add(on_disk.saturating_sub(self.file_len), Ordering::AcqRel);
            self.file_len = on_disk;
            let _ = self.rotate();
            return Err(io_err(&path, "append", &e));
        }
        self.file_len += len;
        self.shared.used_bytes.fetch_add(len, Ordering::AcqRel);
        self.shared.appended.fetch_add(1, Ordering::Relaxed);
        self.dirty_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// fsyncs the current segment if anything is unsynced.
    fn sync(&mut self) -> Result<(), Error> {
        if self.dirty_since.is_none() {
            return Ok(());
        }
        let path = self.path();
        if let Some(f) = &self.file {
            f.sync_data().map_err(|e| io_err(&path, "fsync", &e))?;
        }
        self.dirty_since = None;
        Ok(())
    }

    /// Closes the current segment (fsync'd) so the next append opens `seq + 1`.
    fn rotate(&mut self) -> Result<(), Error> {
        let synced = self.sync();
        if self.file.take().is_some() || self.file_len > 0 {
            self.seq += 1;
        }
        self.file_len = 0;
        synced
    }

    /// Every segment file older than the current one, oldest first.
    fn sealed(&self) -> Result<Vec<PathBuf>, Error> {
        let mut v: Vec<(u64, PathBuf)> = super::list_segments(&self.shared.cfg.dir)?
            .into_iter()
            .filter(|(seq, _)| *seq < self.seq)
            .collect();
        v.sort();
        Ok(v.into_iter().map(|(_, p)| p).collect())
    }
}

/// fsyncs a directory, so a created or removed file survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "fsync directory", &e))
}

/// The writer thread's loop; ends (after a final fsync) when every sender is dropped.
pub(crate) fn run(mut w: Writer, rx: &Receiver<Cmd>) {
    let batch_delay = match w.shared.cfg.durability {
        Durability::EveryRecord => None,
        Durability::Batch(d) => Some(d),
    };
    loop {
        let first = match (batch_delay, w.dirty_since) {
            (Some(d), Some(since)) => {
                let left = d.saturating_sub(since.elapsed());
                match rx.recv_timeout(left.max(Duration::from_millis(1))) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            _ => match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => break,
            },
        };
        let mut batch: Vec<Cmd> = first.into_iter().collect();
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut waiting = Vec::new();
        for cmd in batch {
            match cmd {
                Cmd::Append { bytes, done } => match w.append(&bytes) {
                    Ok(()) if batch_delay.is_none() => waiting.push(done),
                    res => {
                        let _ = done.send(res);
                    }
                },
                Cmd::Seal { done } => {
                    let res = w.rotate().and_then(|()| w.sealed());
                    let _ = done.send(res);
                }
            }
        }
        // Group commit: one fsync covers every append of this round.
        let due = match (batch_delay, w.dirty_since) {
            (None, _) => true,
            (Some(d), Some(since)) => since.elapsed() >= d,
            (Some(_), None) => false,
        };
        let synced = if due { w.sync() } else { Ok(()) };
        for done in waiting {
            let res = match &synced {
                Ok(()) => Ok(()),
                Err(e) => Err(Error::Spool {
                    path: w.shared.cfg.dir.display().to_string(),
                    detail: e.to_string(),
                }),
            };
            let _ = done.send(res);
        }
    }
    let _ = w.sync();
}
