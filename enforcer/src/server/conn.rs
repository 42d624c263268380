//! Client connections: how many are served at once, how the accept loop survives errors, and
//! when an idle one is closed.
//!
//! Every listener (proxy and admin) runs the same loop: take a connection slot (a semaphore
//! permit; past `max_connections` new connections wait in the kernel's accept queue), accept,
//! and serve the connection in its own task that holds the slot until it ends. An accept error
//! (`EMFILE`/`ENFILE` when file descriptors run out, `ECONNABORTED`, ...) is counted and backs off
//! (10 ms doubling to 1 s) instead of spinning. Each connection tracks its requests in flight; one
//! with none for `timeouts.connection_idle_ms` is shut down gracefully (HTTP/1.1: closed between
//! requests; h2/h2c: GOAWAY, then closed, at most 5 s later if the client never acknowledges the
//! shutdown's PING). hyper's own keep-alive PINGs only find dead peers, and
//! its header read timeout only covers HTTP/1.1 heads, so neither bounds an idle h2 connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ProxyThreads;
use crate::meter::BoxError;
use crate::metrics::Listener;
use crate::{App, ProxyBody, admin, proxy};

/// A TLS handshake must finish within this, or the connection is dropped.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// Connections the admin listener serves at once (Prometheus scrapes and operators).
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// First pause after an accept error; doubles to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long a connection asked to shut down may stay open with no request in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// h2 PING interval and how long a PING may go unanswered before the connection is closed.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest h2 header list a client may send (decoded).
const H2_MAX_HEADER_LIST: u32 = 256 << 10;

/// What every connection task shares: the stop signal and the tracker the drain waits on.
#[derive(Clone, Default)]
pub struct Connections {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Connections {
    /// Stops accepting, asks every connection to finish (GOAWAY / close after the response in
    /// flight) and waits for them, up to `wait`. Returns false when some were still open.
    pub async fn drain(&self, wait: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(wait, self.tasks.wait()).await.is_ok()
    }
}

/// Which listener a loop serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The proxy (`listen`), optionally TLS.
    Proxy,
    /// The admin API (`admin_listen`).
    Admin,
}

impl Kind {
    fn label(self) -> Listener {
        Listener {
            listener: match self {
                Kind::Proxy => "proxy",
                Kind::Admin => "admin",
            }
            .to_owned(),
        }
    }
}

/// Accepts on `tcp` until the stop signal, serving each connection in its own task: on the
/// proxy thread with the fewest connections when `threads` is given, else on this runtime.
pub async fn accept_loop(
    app: Arc<App>,
    tcp: TcpListener,
    kind: Kind,
    max: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conns: Connections,
    threads: Option<Arc<ProxyThreads>>,
) {
    let slots = Arc::new(Semaphore::new(max));
    let label = kind.label();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        if slots.available_permits() == 0 {
            app.metrics
                .connection_limit_waits
                .get_or_create(&label)
                .inc();
        }
        let slot = tokio::select! {
            () = conns.stop.cancelled() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = conns.stop.cancelled() => return,
            r = tcp.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let _ = stream.set_nodelay(true);
                let (app, tls, c) = (app.clone(), tls.clone(), conns.clone());
                match &threads {
                    None => {
                        conns.tasks.spawn(serve(app, stream, kind, tls, c, slot));
                    }
                    Some(t) => place(
                        t,
                        stream,
                        move |s| serve(app, s, kind, tls, c, slot),
                        &conns,
                    ),
                }
            }
            Err(e) => {
                app.metrics.accept_errors.get_or_create(&label).inc();
                tracing::warn!(listener = label.listener, error = %e, pause_ms = backoff.as_millis() as u64, "accept failed; pausing before the next accept");
                drop(slot);
                tokio::select! {
                    () = conns.stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Moves an accepted connection to the proxy thread with the fewest and serves it there with
/// `serve` (its socket leaves this runtime's reactor for that thread's).
fn place<F, Fut>(threads: &ProxyThreads, stream: TcpStream, serve: F, conns: &Connections)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let std = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "could not hand an accepted connection to a proxy thread; closing it");
            return;
        }
    };
    let (handle, placed) = threads.least_loaded();
    let task = async move {
        let _placed = placed;
        match TcpStream::from_std(std) {
            Ok(s) => serve(s).await,
            Err(e) => {
                tracing::warn!(error = %e, "a proxy thread could not take an accepted connection; closing it");
            }
        }
    };
    conns.tasks.spawn_on(task, &handle);
}

/// One connection: the TLS handshake if any, then HTTP until it ends, goes idle or the stop
/// signal comes. Holds its slot until it returns.
async fn serve(
    app: Arc<App>,
    stream: TcpStream,
    kind: Kind,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conns: Connections,
    slot: OwnedSemaphorePermit,
) {
    let label = kind.label();
    let open = app.metrics.connections_open.get_or_create(&label).clone();
    open.inc();
    match tls {
        None => drive(&app, TokioIo::new(stream), kind, &conns).await,
        Some(acc) => {
            let handshake = tokio::select! {
                () = conns.stop.cancelled() => None,
                r = tokio::time::timeout(TLS_HANDSHAKE, acc.accept(stream)) => r.ok().and_then(Result::ok),
            };
            if let Some(s) = handshake {
                drive(&app, TokioIo::new(s), kind, &conns).await;
            }
        }
    }
    open.dec();
    drop(slot);
}

/// The most an HTTP/1.1 connection reads ahead (hyper's default is ~400 KiB). Every connection
/// sending a large body fills its read buffer to this size, and while a frame cut from it is on
/// its way to the handler the next read needs a second buffer: 64 clients sending 4 MB bodies
/// held ~52 MiB in these buffers with the default (heaptrack). A request head must still fit.
const H1_MAX_BUF: usize = 64 << 10;

fn builder(app: &App) -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    // A request head must arrive within timeouts.client_ms (slow-loris on HTTP/1.1).
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(app.cfg.timeouts.client_ms))
        .max_buf_size(H1_MAX_BUF);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(app.cfg.max_streams_per_connection)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .keep_alive_interval(Some(H2_KEEPALIVE))
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    b
}

/// Serves HTTP on `io` until the connection ends; shuts it down gracefully when it has been idle
/// for `timeouts.connection_idle_ms` or the stop signal comes, then lets it finish.
async fn drive<I>(app: &Arc<App>, io: I, kind: Kind, conns: &Connections)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let svc = Svc {
        app: app.clone(),
        kind,
        activity: activity.clone(),
    };
    let conn = builder(app)
        .serve_connection_with_upgrades(io, svc)
        .into_owned();
    tokio::pin!(conn);
    let idle = Duration::from_millis(app.cfg.timeouts.connection_idle_ms);
    // The task is woken for every frame the connection moves (each SSE event of a stream): the
    // stop signal and the idle watch sit in a `FuturesUnordered`, which polls them only when
    // their own wakers fired, instead of on every wake-up (two mutexed `Notified` polls each).
    let mut watch = FuturesUnordered::new();
    watch.push(async {
        tokio::select! {
            () = conns.stop.cancelled() => false,
            () = activity.idle_for(idle) => true,
        }
    });
    tokio::select! {
        biased;
        _ = conn.as_mut() => return,
        Some(went_idle) = watch.next() => {
            if went_idle {
                app.metrics.idle_closes.get_or_create(&kind.label()).inc();
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    // h2 finishes a graceful shutdown only once the client acknowledges a PING; one that never
    // does would keep the connection forever. Calls in flight always finish; with none, the
    // connection is dropped after SHUTDOWN_GRACE.
    activity.touch();
    tokio::select! {
        _ = conn.as_mut() => {}
        () = activity.idle_for(SHUTDOWN_GRACE) => {}
    }
}

/// The requests in flight on one connection and when the last one ended.
struct Activity {
    born: Instant,
    active: AtomicUsize,
    /// Milliseconds after `born` when a request last ended (or the connection opened).
    last_ms: AtomicU64,
    quiet: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            quiet: Notify::new(),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Starts the quiet period again from now.
    fn touch(&self) {
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(now, Ordering::AcqRel);
    }

    /// Resolves once no request has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            if self.active.load(Ordering::Acquire) > 0 {
                // notify_one keeps a permit when nobody waits yet: an end between the load and
                // this await is not lost.
                self.quiet.notified().await;
                continue;
            }
            let since = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
            let deadline = self.born + since + idle;
            if Instant::now() >= deadline {
                if self.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                continue;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One request in flight, until its response body has been sent or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.touch();
        if a.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.quiet.notify_one();
        }
    }
}

/// The response body with the request's [`InFlight`] mark: the request ends with its body.
struct Tracked {
    inner: ProxyBody,
    _flight: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The service of one connection: the proxy or the admin handler, with each request tracked.
#[derive(Clone)]
struct Svc {
    app: Arc<App>,
    kind: Kind,
    activity: Arc<Activity>,
}

impl hyper::service::Service<http::Request<Incoming>> for Svc {
    type Response = http::Response<ProxyBody>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let flight = self.activity.begin();
        let app = self.app.clone();
        let kind = self.kind;
        Box::pin(async move {
            let resp = match kind {
                Kind::Proxy => proxy::handle(app, req).await,
                Kind::Admin => admin::handle(app, req).await,
            };
            Ok(resp.map(|inner| {
                Tracked {
                    inner,
                    _flight: flight,
                }
                .boxed_unsync()
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_in_flight_then_the_quiet_period() {
        let a = Arc::new(Activity::new());
        let idle = Duration::from_secs(10);
        let flight = a.begin();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move {
            a2.idle_for(idle).await;
            Instant::now()
        });
        // A request in flight for 60 s: not idle meanwhile.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiter.is_finished());
        let ended = Instant::now();
        drop(flight);
        let idle_at = waiter.await.expect("waiter");
        let quiet = idle_at - ended;
        assert!(
            quiet >= idle && quiet < idle + Duration::from_secs(1),
            "closed {quiet:?} after the last request ended, want {idle:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_asks_is_idle_after_the_period() {
        let a = Arc::new(Activity::new());
        let start = Instant::now();
        a.idle_for(Duration::from_secs(5)).await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(5) && waited < Duration::from_secs(6));
    }
}
