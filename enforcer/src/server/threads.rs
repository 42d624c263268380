//! The proxy's runtime threads. Each runs a current-thread tokio runtime and serves the
//! connections placed on it start to end: request, reserve, upstream call, response, settle,
//! with its own Redis connection ([`ledger::store::pin_thread_connection`]) and upstream pools
//! ([`crate::forward::pin_thread_pool`]). The I/O task of a connection runs where the connection
//! was opened, so on a multi-thread runtime a call handed its work between workers: 7.8 context
//! switches per call at 500 calls/s against 4.9 here (docs/benchmarks.md). The accept loop (on
//! the main runtime) places each new connection on the thread with the fewest open ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The running proxy threads.
pub struct ProxyThreads {
    first: ProxyThread,
    rest: Vec<ProxyThread>,
    /// Cancelled after the drain: each runtime then stops.
    done: CancellationToken,
    joins: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

struct ProxyThread {
    handle: Handle,
    /// Connections open on it.
    open: Arc<AtomicUsize>,
}

/// A connection's place on a thread; counted until dropped.
pub struct Placed(Arc<AtomicUsize>);

impl Drop for Placed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ProxyThreads {
    /// Starts `n` threads (at least one), each with its runtime.
    ///
    /// # Errors
    /// When a runtime or a thread cannot be made.
    pub fn start(n: usize) -> std::io::Result<ProxyThreads> {
        let done = CancellationToken::new();
        let spawn = |i: usize| -> std::io::Result<(ProxyThread, JoinHandle<()>)> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let t = ProxyThread {
                handle: rt.handle().clone(),
                open: Arc::default(),
            };
            let done = done.clone();
            let join = std::thread::Builder::new()
                .name(format!("enforcer-proxy-{i}"))
                .spawn(move || {
                    ledger::store::pin_thread_connection(i);
                    crate::forward::pin_thread_pool(i);
                    rt.block_on(done.cancelled());
                })?;
            Ok((t, join))
        };
        let (first, j) = spawn(0)?;
        let mut joins = vec![j];
        let mut rest = Vec::new();
        for i in 1..n {
            let (t, j) = spawn(i)?;
            rest.push(t);
            joins.push(j);
        }
        Ok(ProxyThreads {
            first,
            rest,
            done,
            joins: std::sync::Mutex::new(joins),
        })
    }

    /// The thread with the fewest open connections (the first of equals), and the new
    /// connection's place on it.
    pub fn least_loaded(&self) -> (Handle, Placed) {
        let load = |t: &ProxyThread| t.open.load(Ordering::Relaxed);
        let t = self.rest.iter().fold(
            &self.first,
            |best, t| if load(t) < load(best) { t } else { best },
        );
        t.open.fetch_add(1, Ordering::Relaxed);
        (t.handle.clone(), Placed(t.open.clone()))
    }

    /// Every thread's runtime, the first first.
    pub fn handles(&self) -> impl Iterator<Item = &Handle> {
        std::iter::once(&self.first)
            .chain(&self.rest)
            .map(|t| &t.handle)
    }

    /// Stops the runtimes (after the drain: connections and settles are over) and joins them.
    pub async fn stop(&self) {
        self.done.cancel();
        let joins = std::mem::take(&mut *self.joins.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for j in joins {
                let _ = j.join();
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_of(h: &Handle) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        h.spawn(async move {
            let _ = tx.send(std::thread::current().name().unwrap_or("").to_owned());
        });
        rx.recv().expect("the task ran")
    }

    /// Connections go to the thread with the fewest open (the first of equals) and run on it; a
    /// connection that ends frees its place; stop ends every thread.
    #[tokio::test]
    async fn connections_go_to_the_least_loaded_thread_and_run_there() {
        let t = ProxyThreads::start(2).expect("start");
        let (h0, p0) = t.least_loaded();
        let (h1, _p1) = t.least_loaded();
        let (h2, _p2) = t.least_loaded();
        assert_eq!(thread_of(&h0), "enforcer-proxy-0");
        assert_eq!(thread_of(&h1), "enforcer-proxy-1");
        assert_eq!(
            thread_of(&h2),
            "enforcer-proxy-0",
            "a tie goes to the first"
        );
        let (h3, _p3) = t.least_loaded();
        assert_eq!(
            thread_of(&h3),
            "enforcer-proxy-1",
            "2 open on thread 0, 1 on thread 1"
        );
        drop(p0);
        let (h4, _p4) = t.least_loaded();
        assert_eq!(
            thread_of(&h4),
            "enforcer-proxy-0",
            "a closed connection frees its place"
        );
        t.stop().await;
        assert!(t.joins.lock().expect("joins").is_empty());
        assert!(
            h0.spawn(async {}).await.is_err(),
            "the runtime is gone after stop"
        );
    }
}
