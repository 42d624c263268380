//! Held connections, for the memory bench: N keep-alive connections to one target, each its own TCP
//! connection (HTTP/1.1, or h2c with one stream), either sitting idle after one call each or all
//! carrying one call at the same moment, so the server's memory per connection and per call in
//! flight can be read while they are held.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::latency::{Latencies, Summary};
use crate::target::Target;

/// The protocol of every held connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 keep-alive.
    Http1,
    /// HTTP/2 over plain TCP (prior knowledge), one stream per call.
    H2c,
}

/// One set of held connections.
#[derive(Debug, Clone)]
pub struct HoldRun {
    /// What each call sends.
    pub target: Target,
    /// Connections to hold.
    pub connections: usize,
    /// Their protocol.
    pub protocol: Protocol,
    /// Connections opened (and, when idle, calls made) at once while opening.
    pub open_concurrency: usize,
    /// A call taking longer counts as a `timeout` error.
    pub timeout: Duration,
}

/// What a phase of a run saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HoldReport {
    /// `idle` (every connection made its call and sits open), `in_flight` (every call sent, the
    /// `pending` ones not answered yet) or `done`.
    pub phase: String,
    /// Connections open.
    pub connections: usize,
    /// Calls answered with 2xx.
    pub ok: u64,
    /// Calls not answered yet.
    pub pending: u64,
    /// Failures by label (`connect`, `handshake`, `status_503`, `timeout`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Latency of the answered calls.
    pub latency_us: Summary,
}

/// One open connection.
enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    H2c(http2::SendRequest<Full<Bytes>>),
}

/// An open connection and the task driving it (aborted, closing the socket, on drop).
pub struct Conn {
    sender: Sender,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Conn {
    /// Opens one connection to the target's host and port.
    async fn open(target: &Target, protocol: Protocol) -> Result<Conn, String> {
        let host = target.uri.host().unwrap_or("127.0.0.1");
        let port = target.uri.port_u16().unwrap_or(80);
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|_| "connect".to_owned())?;
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(tcp);
        match protocol {
            Protocol::Http1 => {
                let (s, c) = http1::handshake(io)
                    .await
                    .map_err(|_| "handshake".to_owned())?;
                let task = tokio::spawn(async move {
                    let _ = c.await;
                });
                Ok(Conn {
                    sender: Sender::Http1(s),
                    task,
                })
            }
            Protocol::H2c => {
                let (s, c) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|_| "handshake".to_owned())?;
                let task = tokio::spawn(async move {
                    let _ = c.await;
                });
                Ok(Conn {
                    sender: Sender::H2c(s),
                    task,
                })
            }
        }
    }

    /// Sends one call on this connection and reads its whole answer; `Ok(status)` or an error label.
    pub async fn call(&mut self, target: &Target, timeout: Duration) -> Result<u16, String> {
        let response = async {
            let req = target.request();
            match &mut self.sender {
                Sender::Http1(s) => {
                    s.ready().await.map_err(|_| "closed".to_owned())?;
                    s.send_request(req).await
                }
                Sender::H2c(s) => {
                    s.ready().await.map_err(|_| "closed".to_owned())?;
                    s.send_request(req).await
                }
            }
            .map_err(|_| "request".to_owned())
        };
        crate::target::read_whole(response, timeout).await
    }
}

/// Connections held open; dropping it closes them all.
pub struct Held {
    /// The open connections.
    pub conns: Vec<Conn>,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    lat: Latencies,
}

impl Tally {
    fn add(&mut self, res: &Result<u16, String>, latency: Duration) {
        match res {
            Ok(s) if (200..300).contains(s) => {
                self.ok += 1;
                self.lat.record(latency);
            }
            Ok(s) => *self.errors.entry(format!("status_{s}")).or_default() += 1,
            Err(e) => *self.errors.entry(e.clone()).or_default() += 1,
        }
    }

    fn report(&self, phase: &str, connections: usize, pending: u64) -> HoldReport {
        HoldReport {
            phase: phase.to_owned(),
            connections,
            ok: self.ok,
            pending,
            errors: self.errors.clone(),
            latency_us: self.lat.summary(),
        }
    }
}

/// Opens `run.connections` connections, at most `open_concurrency` at a time; when `call_each`,
/// each makes one call before the next opens in its slot.
async fn open_all(run: &HoldRun, call_each: bool) -> (Vec<Conn>, Tally) {
    let slots = Arc::new(Semaphore::new(run.open_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(run.connections);
    for _ in 0..run.connections {
        let (slots, target, protocol, timeout) = (
            Arc::clone(&slots),
            run.target.clone(),
            run.protocol,
            run.timeout,
        );
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.expect("semaphore open");
            let mut conn = Conn::open(&target, protocol).await?;
            if !call_each {
                return Ok((conn, None));
            }
            let t0 = Instant::now();
            let res = conn.call(&target, timeout).await;
            Ok::<_, String>((conn, Some((res, t0.elapsed()))))
        }));
    }
    let mut conns = Vec::with_capacity(run.connections);
    let mut tally = Tally::default();
    for t in tasks {
        match t.await.unwrap_or_else(|_| Err("panic".to_owned())) {
            Ok((conn, call)) => {
                if let Some((res, latency)) = call {
                    tally.add(&res, latency);
                }
                conns.push(conn);
            }
            Err(e) => *tally.errors.entry(e).or_default() += 1,
        }
    }
    (conns, tally)
}

/// Opens the connections, each making one call; returns them open and idle, with what the calls
/// got (phase `idle`).
pub async fn idle(run: &HoldRun) -> (Held, HoldReport) {
    let (conns, tally) = open_all(run, true).await;
    let report = tally.report("idle", conns.len(), 0);
    (Held { conns }, report)
}

/// Opens every connection first, then sends one call on each at the same moment. After `settle`,
/// `at_settle` gets the phase `in_flight` report (`pending`: the calls not answered by then); the
/// result is the `done` report once every call ended (the connections are closed by then).
pub async fn in_flight(
    run: &HoldRun,
    settle: Duration,
    at_settle: impl FnOnce(&HoldReport),
) -> HoldReport {
    let (conns, mut tally) = open_all(run, false).await;
    let n = conns.len();
    let tally_shared = Arc::new(std::sync::Mutex::new(Tally::default()));
    let mut tasks = Vec::with_capacity(n);
    for mut conn in conns {
        let (target, timeout, tally) = (run.target.clone(), run.timeout, Arc::clone(&tally_shared));
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let res = conn.call(&target, timeout).await;
            tally.lock().expect("tally lock").add(&res, t0.elapsed());
            drop(conn);
        }));
    }
    tokio::time::sleep(settle).await;
    {
        let t = tally_shared.lock().expect("tally lock");
        let answered = t.ok + t.errors.values().sum::<u64>();
        let mut r = t.report("in_flight", n, (n as u64).saturating_sub(answered));
        for (k, v) in &tally.errors {
            *r.errors.entry(k.clone()).or_default() += v;
        }
        at_settle(&r);
    }
    for t in tasks {
        let _ = t.await;
    }
    let t = tally_shared.lock().expect("tally lock");
    tally.ok += t.ok;
    tally.lat.merge(&t.lat);
    for (k, v) in &t.errors {
        *tally.errors.entry(k.clone()).or_default() += v;
    }
    tally.report("done", 0, 0)
}
