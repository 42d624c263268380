//! Log lines to stderr in batches, from a thread of their own.
//!
//! The enforcer logs a line per call. `tracing_appender::non_blocking` hands each line to its
//! writer thread through a channel, so at 500 calls/s that thread woke 1.27 times and made 4.6
//! syscalls per call (issue 20's profile, docs/benchmarks.md). Here a line is appended to a
//! shared buffer under a mutex (no wake-up), and the writer thread writes whatever is there
//! every [`FLUSH_EVERY`], or as soon as [`FLUSH_BYTES`] are waiting or a warning or error is
//! logged: one `write` and one wake-up per batch.
//!
//! A slow reader (a full pipe to the journal) still never blocks a proxy worker. Lines beyond
//! [`MAX_BUFFERED`] are dropped and counted, and the count is logged with the next batch that
//! gets through. Info lines (one per call) are at most [`FLUSH_EVERY`] late; warnings and errors
//! are written at once. Dropping the [`LogGuard`] (at exit)
//! writes what is left.
//!
//! An idle enforcer logs nothing, and the writer does not tick then: after a tick that found no
//! line it sleeps until the next line wakes it (one wake-up per idle spell, not 20 a second; an
//! idle sidecar's wake-ups are measured in docs/benchmarks.md). That line still waits out a tick
//! for company, unless it is a warning.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often buffered lines are written.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Waiting bytes that wake the writer before its tick.
const FLUSH_BYTES: usize = 64 * 1024;
/// Waiting bytes beyond which lines are dropped.
const MAX_BUFFERED: usize = 8 * 1024 * 1024;

struct Shared {
    buf: Mutex<Pending>,
    dropped: AtomicU64,
    stop: AtomicBool,
    /// The writer's wake-ups (ticks and idle ends), for the tests.
    ticks: AtomicU64,
}

/// The lines waiting for the writer thread, and how to wake it.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// The writer found nothing at its last tick and sleeps until a line wakes it.
    idle: bool,
    /// A warning, or [`FLUSH_BYTES`] waiting: write without waiting out a tick.
    now: bool,
}

/// The writer that [`write_line`] appends to, once JSON logs are on ([`enable_direct`]).
static DIRECT: std::sync::OnceLock<BatchedStderr> = std::sync::OnceLock::new();

/// Lets lines written with [`write_line`] skip tracing's formatter and go straight to `w` (for
/// the JSON log format: their writer builds the same line).
pub fn enable_direct(w: &BatchedStderr) {
    let _ = DIRECT.set(w.clone());
}

/// Appends the line `fill` writes (without its newline) to the batch, as tracing's writer
/// would; `false` (and nothing written) when direct lines are off.
pub fn write_line(fill: impl FnOnce(&mut Vec<u8>)) -> bool {
    thread_local! {
        static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let Some(w) = DIRECT.get() else {
        return false;
    };
    LINE.with(|l| {
        let Ok(mut line) = l.try_borrow_mut() else {
            return false;
        };
        line.clear();
        fill(&mut line);
        line.push(b'\n');
        let mut out = LineWriter {
            shared: &w.shared,
            writer: &w.writer,
            urgent: false,
        };
        let _ = std::io::Write::write(&mut out, &line);
        true
    })
}

/// The `MakeWriter` for `tracing_subscriber::fmt`.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<Shared>,
    writer: Arc<std::thread::Thread>,
}

/// Writes what is left when dropped.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// One event's writer: appends to the shared buffer.
pub struct LineWriter<'a> {
    shared: &'a Shared,
    writer: &'a std::thread::Thread,
    /// A warning or an error: the writer thread is woken at once, not at its next tick.
    urgent: bool,
}

/// Starts the writer thread.
///
/// # Errors
/// When the thread cannot be spawned.
pub fn batched_stderr() -> std::io::Result<(BatchedStderr, LogGuard)> {
    batched(std::io::stderr())
}

fn batched<W: std::io::Write + Send + 'static>(
    mut out: W,
) -> std::io::Result<(BatchedStderr, LogGuard)> {
    let shared = Arc::new(Shared {
        buf: Mutex::new(Pending {
            bytes: Vec::with_capacity(FLUSH_BYTES),
            ..Pending::default()
        }),
        dropped: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        ticks: AtomicU64::new(0),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("enforcer-log".into())
        .spawn(move || {
            let mut spare = Vec::with_capacity(FLUSH_BYTES);
            let mut wait = true;
            loop {
                if wait {
                    std::thread::park_timeout(FLUSH_EVERY);
                }
                wait = true;
                s.ticks.fetch_add(1, Ordering::Relaxed);
                let stop = s.stop.load(Ordering::Acquire);
                if let Ok(mut buf) = s.buf.lock() {
                    std::mem::swap(&mut buf.bytes, &mut spare);
                    buf.now = false;
                }
                let dropped = s.dropped.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    spare.extend_from_slice(
                        format!(
                            "{dropped} log lines dropped: stderr did not keep up (more than {MAX_BUFFERED} bytes waiting)\n"
                        )
                        .as_bytes(),
                    );
                }
                let wrote = !spare.is_empty();
                if wrote {
                    let _ = out.write_all(&spare);
                    let _ = out.flush();
                    spare.clear();
                }
                if stop {
                    return;
                }
                if !wrote && let Some(now) = s.sleep_until_a_line() {
                    // A line (or the guard) woke it: wait out a tick for company unless the
                    // line is urgent or the process is ending.
                    wait = !now && !s.stop.load(Ordering::Acquire);
                }
            }
        })?;
    let writer = Arc::new(thread.thread().clone());
    Ok((
        BatchedStderr {
            shared: shared.clone(),
            writer,
        },
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

impl Shared {
    /// Parks the writer until a line arrives, when none is waiting, and returns whether that
    /// line asked to be written at once (clearing the ask); `None`, at once, when lines wait.
    fn sleep_until_a_line(&self) -> Option<bool> {
        let mut buf = self.buf.lock().ok()?;
        if !buf.bytes.is_empty() {
            return None;
        }
        buf.idle = true;
        drop(buf);
        // A line appended after the unlock unparks first; `park` then returns at once.
        std::thread::park();
        let mut buf = self.buf.lock().ok()?;
        buf.idle = false;
        Some(std::mem::take(&mut buf.now))
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedStderr {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            shared: &self.shared,
            writer: &self.writer,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            shared: &self.shared,
            writer: &self.writer,
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

impl std::io::Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let Ok(mut buf) = self.shared.buf.lock() else {
            return Ok(bytes.len());
        };
        if buf.bytes.len() + bytes.len() > MAX_BUFFERED {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            // A line larger than the whole buffer, dropped while the writer sleeps: wake it, so
            // the count is written within a tick.
            let wake = std::mem::take(&mut buf.idle);
            drop(buf);
            if wake {
                self.writer.unpark();
            }
            return Ok(bytes.len());
        }
        let was_below = buf.bytes.len() < FLUSH_BYTES;
        buf.bytes.extend_from_slice(bytes);
        let now = self.urgent || (was_below && buf.bytes.len() >= FLUSH_BYTES);
        buf.now |= now;
        // The first line after an idle spell wakes the writer (which then waits out a tick).
        let wake = now || std::mem::take(&mut buf.idle);
        drop(buf);
        if wake {
            self.writer.unpark();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use tracing_subscriber::fmt::MakeWriter as _;

    /// A sink the test can read while the writer thread owns its clone.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_and_the_guard_writes_the_rest() {
        let sink = Sink::default();
        let (w, guard) = batched(sink.clone()).expect("writer");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let line = format!("thread {t} line {i:04} {}\n", "x".repeat(100));
                        w.make_writer().write_all(line.as_bytes()).expect("write");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        // Within a tick the first batch is out; the guard writes the rest at once.
        std::thread::sleep(FLUSH_EVERY * 3);
        assert!(
            !sink.0.lock().expect("sink").is_empty(),
            "nothing written after a tick"
        );
        w.make_writer().write_all(b"last\n").expect("write");
        drop(guard);
        let text = String::from_utf8(sink.0.lock().expect("sink").clone()).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2001);
        assert_eq!(lines.last(), Some(&"last"));
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            assert_eq!(mine.len(), 500, "thread {t}");
            for (i, l) in mine.iter().enumerate() {
                assert!(l.starts_with(&format!("thread {t} line {i:04} ")), "{l}");
                assert_eq!(l.len(), format!("thread {t} line {i:04} ").len() + 100);
            }
        }
    }

    #[test]
    fn a_warning_is_written_at_once() {
        let sink = Sink::default();
        let (w, _guard) = batched(sink.clone()).expect("writer");
        // Let the writer's first tick pass, so the next one is ~50 ms away.
        std::thread::sleep(FLUSH_EVERY + FLUSH_EVERY / 2);
        let mut urgent = LineWriter {
            shared: &w.shared,
            writer: &w.writer,
            urgent: true,
        };
        let started = std::time::Instant::now();
        urgent.write_all(b"warn\n").expect("write");
        while sink.0.lock().expect("sink").is_empty() {
            assert!(
                started.elapsed() < FLUSH_EVERY / 2,
                "the warning waited for the tick"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn an_idle_writer_sleeps_until_the_next_line() {
        let sink = Sink::default();
        let (w, guard) = batched(sink.clone()).expect("writer");
        let written = |n: usize| {
            let started = std::time::Instant::now();
            while sink.0.lock().expect("sink").len() < n {
                assert!(started.elapsed() < FLUSH_EVERY * 20, "line not written");
                std::thread::sleep(Duration::from_millis(1));
            }
            started.elapsed()
        };
        // Until the writer has found an empty buffer and is going to sleep.
        let asleep = || {
            let started = std::time::Instant::now();
            while !w.shared.buf.lock().expect("buf").idle {
                assert!(
                    started.elapsed() < FLUSH_EVERY * 40,
                    "the writer never slept"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        w.make_writer().write_all(b"one\n").expect("write");
        written(4);
        // One tick finds nothing and the writer sleeps: no more ticks while nothing is logged.
        asleep();
        let idle_from = w.shared.ticks.load(Ordering::Relaxed);
        std::thread::sleep(FLUSH_EVERY * 6);
        assert_eq!(
            w.shared.ticks.load(Ordering::Relaxed),
            idle_from,
            "the writer ticked while nothing was logged"
        );
        // The next info line wakes it and waits out one tick for company.
        w.make_writer().write_all(b"two\n").expect("write");
        w.make_writer().write_all(b"three\n").expect("write");
        written(4 + 4 + 6);
        // A warning after an idle spell is written at once.
        asleep();
        let mut urgent = LineWriter {
            shared: &w.shared,
            writer: &w.writer,
            urgent: true,
        };
        urgent.write_all(b"warn\n").expect("write");
        assert!(
            written(4 + 4 + 6 + 5) < FLUSH_EVERY / 2,
            "the warning waited for a tick"
        );
        // The guard ends a sleeping writer at once.
        asleep();
        let started = std::time::Instant::now();
        drop(guard);
        assert!(
            started.elapsed() < FLUSH_EVERY / 2,
            "the guard waited for a tick"
        );
        assert_eq!(
            String::from_utf8_lossy(&sink.0.lock().expect("sink")),
            "one\ntwo\nthree\nwarn\n"
        );
    }

    #[test]
    fn a_reader_that_does_not_keep_up_loses_lines_counted_never_blocks() {
        /// Blocks every write until released.
        struct Stuck(Arc<std::sync::Barrier>, Sink);
        impl std::io::Write for Stuck {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.wait();
                self.1.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new(std::sync::Barrier::new(2));
        let sink = Sink::default();
        let (w, guard) = batched(Stuck(gate.clone(), sink.clone())).expect("writer");
        w.make_writer().write_all(b"first\n").expect("write");
        std::thread::sleep(FLUSH_EVERY * 3); // the writer is now stuck writing "first"
        let line = vec![b'y'; 1024 * 1024];
        let started = std::time::Instant::now();
        for _ in 0..12 {
            w.make_writer().write_all(&line).expect("write");
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a writer blocked"
        );
        assert_eq!(
            w.shared.dropped.load(Ordering::Relaxed),
            4,
            "8 MiB kept, 4 dropped"
        );
        gate.wait(); // "first"
        gate.wait(); // the kept 8 MiB and the drop count
        drop(guard);
        let text = String::from_utf8_lossy(&sink.0.lock().expect("sink")).into_owned();
        assert!(text.starts_with("first\n"));
        assert!(
            text.contains("4 log lines dropped"),
            "drop count not logged"
        );
    }
}
