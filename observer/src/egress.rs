//! Egress accounting: every TCP connection to a provider address, whatever TLS library carried
//! it, and the verdict on it once it ends — **metered** (the decoding path recorded a call of the
//! same process during its lifetime), **ignored** (the enforcer's own upstream, by
//! `unmetered_ignore`) or **unmetered** (a bypass no probe could decode: rustls, BoringSSL, JSSE,
//! ...), which goes to the ledger as a first-class bypass record.
//!
//! The kernel side is `observer-ebpf/src/egress.rs`; the addresses it accounts are the configured
//! and built-in provider hosts, resolved by a thread of their own (`Resolver`).

mod hello;
mod metrics;
mod resolve;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::discovery::ProcNote;
use aya::maps::{MapData, RingBuf};
use ledger::provider::ProviderDetector;
use observer_common::{
    HELLO_MAX, ProviderAddr, TCP_CLOSE, TCP_FLAG_JOINED, TCP_OPEN, TcpEvent, TcpHello,
};
use serde::Serialize;
use tokio::sync::mpsc;

pub use metrics::{EgressMetrics, HelloLabels, ProviderLabels, VerdictLabels};
use resolve::{Dest, Joined, Names, Resolver, dest, socket_addr};

use crate::attribution::{CompiledMatcher, ProcessInfo, Rules};
use crate::stop::StopSignal;

/// How long after a connection's close its verdict waits: the TLS plaintext events of its last
/// call travel on another ring buffer and may be drained after the close event.
const VERDICT_GRACE: Duration = Duration::from_secs(2);
/// Metered call times kept per process (the newest).
const METERED_PER_PID: usize = 256;

/// A provider connection that carried no metered call: what goes to the ledger. Metadata only.
#[derive(Debug, Clone, Serialize)]
pub struct UnmeteredRecord {
    /// Always `"unmetered"` (the sniff line's and the stream entry's kind).
    pub kind: &'static str,
    /// Unique per connection: boot id, `struct sock *`, close time.
    pub conn_id: String,
    /// Provider name.
    pub provider: String,
    /// Destination host: the TLS server name (SNI) the process sent when seen, else the
    /// configured host whose resolved address the peer is.
    pub host: String,
    /// The TLS server name (SNI) of the connection's ClientHello; `None` when it sent none or the
    /// kernel did not see it (joined connections, hello cut before the name).
    pub sni: Option<String>,
    /// Peer address.
    pub addr: String,
    /// Process id (0 when the connection predates the observer).
    pub pid: u32,
    /// Process name.
    pub comm: String,
    /// Executable.
    pub exe: String,
    /// Service (attribution rules).
    pub service: String,
    /// Tenant (attribution rules; headers are never seen here).
    pub tenant: String,
    /// TCP payload bytes sent and acknowledged (TLS records, handshake included).
    pub bytes_out: u64,
    /// TCP payload bytes received.
    pub bytes_in: u64,
    /// When the connection was opened (the first sight for a joined one).
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// From open to close, ms (0 for a joined one: its start is unknown).
    pub duration_ms: u64,
    /// The connection predates the observer: its open was not seen (pid unknown, bytes whole).
    pub joined: bool,
}

/// Starts the resolver thread and returns the reader's state; `None` when the kernel side is
/// not loaded (egress accounting off or unsupported).
///
/// # Errors
/// When an `unmetered_ignore` glob does not compile or the thread cannot be spawned.
pub fn start(
    maps: Option<crate::bpf::EgressMaps>,
    cfg: &crate::config::Config,
    stop: &Arc<StopSignal>,
    tx: mpsc::Sender<UnmeteredRecord>,
    metrics: Arc<EgressMetrics>,
    boot_id: &str,
    connect_notes: Option<std::sync::mpsc::Sender<ProcNote>>,
) -> anyhow::Result<Option<Egress>> {
    let Some(maps) = maps else {
        if cfg.attach == "on-connect" {
            anyhow::bail!(
                "attach = \"on-connect\" needs the egress accounting tracepoint \
                 (sock/inet_sock_set_state), which did not load: see the log above"
            );
        }
        return Ok(None);
    };
    let ignore = cfg
        .unmetered_ignore
        .iter()
        .map(CompiledMatcher::new)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut hosts: Vec<(String, String)> = cfg
        .providers
        .iter()
        .map(|p| {
            (
                p.host.clone(),
                p.name.clone().unwrap_or_else(|| p.kind.clone()),
            )
        })
        .collect();
    hosts.extend(
        ledger::provider::builtin_hosts()
            .into_iter()
            .map(|(h, n)| (h.to_owned(), n.to_owned())),
    );
    let detector = cfg.provider_detector()?;
    if !maps.hello {
        tracing::info!("unmetered connections are named by address (no ClientHello capture)");
    }
    let names: Names = Arc::default();
    let joined: Joined = Arc::default();
    let (first_pass, first_pass_rx) = std::sync::mpsc::channel();
    let resolver = Resolver {
        hosts,
        map: maps.addrs,
        names: names.clone(),
        joined: joined.clone(),
        connect_notes: connect_notes.clone(),
        first_pass: Some(first_pass),
    };
    let stop = stop.clone();
    std::thread::Builder::new()
        .name("observer-resolver".into())
        .spawn(move || resolver.run(&stop))?;
    let mut egress = Egress::new(
        maps.events,
        names,
        joined,
        ignore,
        tx,
        metrics,
        boot_id.to_owned(),
    );
    egress.connect_notes = connect_notes;
    egress.detector = detector;
    egress.first_pass = Some(first_pass_rx);
    Ok(Some(egress))
}

/// A connection seen opening.
struct Open {
    start_ns: u64,
    /// The connecting process (as the kernel saw it).
    pid: u32,
    proc: ProcessInfo,
    /// The server name its ClientHello carried.
    sni: Option<String>,
}

/// A connection that ended, waiting for its verdict.
struct Closed {
    due: Instant,
    ev: TcpEvent,
    proc: ProcessInfo,
    /// For a connection that predates the observer: when the scan at start saw it.
    seen: Option<chrono::DateTime<chrono::Utc>>,
    /// The server name its ClientHello carried.
    sni: Option<String>,
}

/// The reader's side: pairs opens and closes, remembers metered calls, decides.
pub struct Egress {
    /// The kernel's connection ring, until the reader takes it ([`Egress::take_ring`]) to wait
    /// on it.
    events: Option<RingBuf<MapData>>,
    names: Names,
    joined: Joined,
    open: HashMap<u64, Open>,
    closed: VecDeque<Closed>,
    /// Kernel times of metered calls, per process.
    metered: HashMap<u32, VecDeque<u64>>,
    /// Kernel time of the last metered call per provider (for connections whose pid is unknown).
    metered_provider: HashMap<String, u64>,
    ignore: Vec<CompiledMatcher>,
    tx: mpsc::Sender<UnmeteredRecord>,
    metrics: Arc<EgressMetrics>,
    boot_id: String,
    /// Provider connections per process (provider name, kernel start; closed ones kept
    /// [`CONNECTED_KEEP`]), for `provider_identity = "connection"`.
    connected: HashMap<u32, Vec<Connected>>,
    /// `attach = "on-connect"`: the discovery thread, told of each provider connect first.
    connect_notes: Option<std::sync::mpsc::Sender<ProcNote>>,
    /// Which server names are provider hosts (configured and built-in).
    detector: ProviderDetector,
    /// Ends once the provider addresses are known and the connections open before the start
    /// are found, until the daemon takes it ([`Egress::take_first_pass`]) to wait for that.
    first_pass: Option<std::sync::mpsc::Receiver<()>>,
}

/// A provider connection of a process, as `provider_identity = "connection"` needs it.
struct Connected {
    provider: String,
    start_ns: u64,
    /// When its close was drained (None: open).
    closed: Option<Instant>,
}

/// How long a closed provider connection still vouches for its process's calls: a call is
/// recorded when its response ends, at the connection's end, or at the latest 5 s after its
/// process exits (`EXIT_GRACE`).
const CONNECTED_KEEP: Duration = Duration::from_secs(30);

/// `CLOCK_MONOTONIC` now, ns (the clock of `bpf_ktime_get_ns`).
pub(crate) fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Wall-clock time of kernel time `ns`.
fn wall(ns: u64) -> chrono::DateTime<chrono::Utc> {
    let ago = mono_ns().saturating_sub(ns);
    chrono::Utc::now() - chrono::Duration::nanoseconds(i64::try_from(ago).unwrap_or(0))
}

impl Egress {
    /// The reader's egress state.
    pub fn new(
        events: RingBuf<MapData>,
        names: Names,
        joined: Joined,
        ignore: Vec<CompiledMatcher>,
        tx: mpsc::Sender<UnmeteredRecord>,
        metrics: Arc<EgressMetrics>,
        boot_id: String,
    ) -> Egress {
        Egress {
            events: Some(events),
            names,
            joined,
            open: HashMap::new(),
            closed: VecDeque::new(),
            metered: HashMap::new(),
            metered_provider: HashMap::new(),
            ignore,
            tx,
            metrics,
            boot_id,
            connected: HashMap::new(),
            connect_notes: None,
            detector: ProviderDetector::new(),
            first_pass: None,
        }
    }

    /// Whether process `pid` had a TCP connection to `provider`'s addresses, opened before kernel
    /// time `ts_ns` (open then, or closed within [`CONNECTED_KEEP`]), or one the scan at start
    /// found: what identifies the provider of a decoded call under
    /// `provider_identity = "connection"` (a Host header alone is only a claim).
    pub fn vouches(&self, pid: u32, provider: &str, ts_ns: u64) -> bool {
        let live = self.connected.get(&pid).is_some_and(|v| {
            v.iter()
                .any(|c| c.provider == provider && c.start_ns <= ts_ns)
        });
        live || self.joined.lock().is_ok_and(|j| {
            j.iter().any(|((_, key), p)| {
                p.proc.pid == pid
                    && dest(&self.names, key.addr, key.port).is_some_and(|d| d.provider == provider)
            })
        })
    }

    /// The metrics (the reader sets the kernel drop gauge).
    pub fn metrics(&self) -> &EgressMetrics {
        &self.metrics
    }

    /// A call of `pid` to `provider` was metered at kernel time `ts_ns`.
    pub fn note_metered(&mut self, pid: u32, provider: &str, ts_ns: u64) {
        let q = self.metered.entry(pid).or_default();
        if q.len() == METERED_PER_PID {
            q.pop_front();
        }
        q.push_back(ts_ns);
        self.metered_provider.insert(provider.to_owned(), ts_ns);
    }

    /// Forgets an exited process's metered calls (after its connections' verdicts).
    pub fn forget(&mut self, pid: u32) {
        if !self.closed.iter().any(|c| c.ev.pid == pid) {
            self.metered.remove(&pid);
        }
    }

    /// What ends once the resolver's first pass is done (provider addresses known, connections
    /// open before the start found): the daemon says it is ready only after that, so a call on
    /// such a connection is vouched for from the first moment it reports ready.
    pub fn take_first_pass(&mut self) -> Option<std::sync::mpsc::Receiver<()>> {
        self.first_pass.take()
    }

    /// The connection ring, for the reader to wait on (it is woken per event: a process that
    /// connects and exits at once must still be read while it exists).
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Drains the kernel's connection events from `ring`; `process` gives the identity of a pid
    /// (read while the process surely exists: at its connect).
    pub fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        mut process: impl FnMut(u32) -> ProcessInfo,
    ) {
        let now = Instant::now();
        while let Some(item) = ring.next() {
            if item.len() == std::mem::size_of::<TcpHello>() {
                // SAFETY: the kernel writes whole TcpHello records (told apart by size).
                let h: TcpHello = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                drop(item);
                self.hello(&h);
                continue;
            }
            if item.len() < std::mem::size_of::<TcpEvent>() {
                continue;
            }
            // SAFETY: the kernel writes whole TcpEvent records.
            let ev: TcpEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            match ev.kind {
                TCP_OPEN => {
                    // Before anything slow: the process is about to write its first TLS record.
                    if let Some(tx) = &self.connect_notes {
                        let _ = tx.send(ProcNote::Connect {
                            pid: ev.pid,
                            ts_ns: ev.start_ns,
                        });
                    }
                    if let Some(d) = dest(&self.names, ev.addr, ev.port) {
                        self.connected.entry(ev.pid).or_default().push(Connected {
                            provider: d.provider,
                            start_ns: ev.start_ns,
                            closed: None,
                        });
                    }
                    let proc = process(ev.pid);
                    self.open.insert(
                        ev.sk,
                        Open {
                            start_ns: ev.start_ns,
                            pid: ev.pid,
                            proc,
                            sni: None,
                        },
                    );
                }
                TCP_CLOSE => {
                    if let Some(v) = self.connected.get_mut(&ev.pid)
                        && let Some(c) = v
                            .iter_mut()
                            .find(|c| c.start_ns == ev.start_ns && c.closed.is_none())
                    {
                        c.closed = Some(now);
                    }
                    let mut ev = ev;
                    let mut seen = None;
                    let mut sni = None;
                    let proc = match self.open.remove(&ev.sk) {
                        Some(o) if o.start_ns == ev.start_ns => {
                            sni = o.sni;
                            o.proc
                        }
                        _ if ev.pid != 0 => process(ev.pid),
                        _ => {
                            let key = ProviderAddr {
                                addr: ev.addr,
                                port: ev.port,
                                pad: [0; 6],
                            };
                            let pre = self
                                .joined
                                .lock()
                                .ok()
                                .and_then(|mut j| j.remove(&(ev.lport, key)));
                            match pre {
                                Some(p) => {
                                    ev.pid = p.proc.pid;
                                    seen = Some(p.seen);
                                    // It still vouches for the calls its close completes
                                    // (`vouches`), like a connection seen opening.
                                    if let Some(d) = dest(&self.names, ev.addr, ev.port) {
                                        self.connected.entry(ev.pid).or_default().push(Connected {
                                            provider: d.provider,
                                            start_ns: 0,
                                            closed: Some(now),
                                        });
                                    }
                                    p.proc
                                }
                                None => ProcessInfo::default(),
                            }
                        }
                    };
                    self.closed.push_back(Closed {
                        due: now + VERDICT_GRACE,
                        ev,
                        proc,
                        seen,
                        sni,
                    });
                }
                _ => {}
            }
        }
        // Opens whose close was lost (ring full) must not grow without bound.
        if self.open.len() > 65_536 {
            self.open.clear();
        }
    }

    /// The first bytes of an open connection: its server name, if a ClientHello names one.
    fn hello(&mut self, h: &TcpHello) {
        let data = &h.data[..(h.len as usize).min(HELLO_MAX)];
        let (result, sni) = match hello::parse(data) {
            hello::Hello::Sni(n) => ("sni", Some(n)),
            hello::Hello::NoSni => ("no_sni", None),
            hello::Hello::Truncated => ("truncated", None),
            hello::Hello::NotTls => ("not_tls", None),
        };
        self.metrics
            .hellos
            .get_or_create(&HelloLabels {
                result: result.to_owned(),
            })
            .inc();
        let Some(o) = self
            .open
            .get_mut(&h.sk)
            .filter(|o| o.start_ns == h.start_ns)
        else {
            return;
        };
        // The name, not the address, says which provider (if any) this connection vouches for
        // under `provider_identity = "connection"`.
        if let Some(name) = &sni
            && let Some(v) = self.connected.get_mut(&o.pid)
        {
            match self.detector.provider_of_server_name(name) {
                Some(p) => v
                    .iter_mut()
                    .filter(|c| c.start_ns == h.start_ns)
                    .for_each(|c| p.clone_into(&mut c.provider)),
                None => v.retain(|c| c.start_ns != h.start_ns),
            }
        }
        o.sni = sni;
    }

    /// Whether a closed connection waits for its verdict (its grace has not passed yet).
    pub fn verdicts_pending(&self) -> bool {
        !self.closed.is_empty()
    }

    /// Decides the connections whose grace has passed.
    pub fn decide(&mut self, rules: &Rules) {
        let now = Instant::now();
        self.connected.retain(|_, v| {
            v.retain(|c| {
                c.closed
                    .is_none_or(|t| now.duration_since(t) < CONNECTED_KEEP)
            });
            !v.is_empty()
        });
        while self.closed.front().is_some_and(|c| c.due <= now) {
            let Some(c) = self.closed.pop_front() else {
                break;
            };
            self.verdict(&c, rules);
        }
    }

    fn verdict(&mut self, c: &Closed, rules: &Rules) {
        let ev = &c.ev;
        let joined = ev.flags & TCP_FLAG_JOINED != 0;
        let key = ProviderAddr {
            addr: ev.addr,
            port: ev.port,
            pad: [0; 6],
        };
        let addr = socket_addr(&key);
        let dest = self
            .names
            .read()
            .ok()
            .and_then(|n| n.get(&key).cloned())
            .unwrap_or_else(|| Dest {
                host: addr.to_string(),
                provider: "unknown".to_owned(),
            });
        // A server name that is no provider host: the address was a coincidence (a CDN address
        // shared with other sites), not a provider connection at all.
        let named = c
            .sni
            .as_deref()
            .map(|n| (n, self.detector.provider_of_server_name(n)));
        if let Some((name, None)) = named {
            tracing::debug!(server_name = name, addr = %addr, pid = ev.pid,
                "connection to a provider address names another host: not a provider connection");
            self.metrics
                .verdicts
                .get_or_create(&VerdictLabels {
                    verdict: "not_provider".to_owned(),
                })
                .inc();
            return;
        }
        let until = ev.ts_ns + u64::try_from(VERDICT_GRACE.as_nanos()).unwrap_or(u64::MAX);
        let metered = if joined && ev.pid == 0 {
            // No pid: any call metered to this provider up to its close counts for it.
            self.metered_provider
                .get(&dest.provider)
                .is_some_and(|&t| t <= until)
        } else if joined {
            // Its start is unknown: any call of its process up to its close counts for it.
            self.metered
                .get(&ev.pid)
                .is_some_and(|q| q.iter().any(|&t| t <= until))
        } else {
            self.metered
                .get(&ev.pid)
                .is_some_and(|q| q.iter().any(|&t| t >= ev.start_ns && t <= until))
        };
        let verdict = if metered {
            "metered"
        } else if self.ignore.iter().any(|m| m.matches(&c.proc)) {
            "ignored"
        } else {
            "unmetered"
        };
        self.metrics
            .verdicts
            .get_or_create(&VerdictLabels {
                verdict: verdict.to_owned(),
            })
            .inc();
        if verdict != "unmetered" {
            return;
        }
        let who = rules.attribute(&c.proc, None, None);
        let labels = ProviderLabels {
            provider: dest.provider.clone(),
        };
        self.metrics.connections.get_or_create(&labels).inc();
        self.metrics
            .bytes_out
            .get_or_create(&labels)
            .inc_by(ev.bytes_out);
        self.metrics
            .bytes_in
            .get_or_create(&labels)
            .inc_by(ev.bytes_in);
        if joined {
            self.metrics.joined.inc();
        }
        let rec = UnmeteredRecord {
            kind: "unmetered",
            conn_id: format!("tcp:{}:{:x}:{}", self.boot_id, ev.sk, ev.ts_ns),
            provider: match named {
                Some((_, Some(p))) => p.to_owned(),
                _ => dest.provider,
            },
            host: c.sni.clone().unwrap_or(dest.host),
            sni: c.sni.clone(),
            addr: addr.to_string(),
            pid: ev.pid,
            comm: c.proc.comm.clone(),
            exe: c.proc.exe.clone(),
            service: who.service,
            tenant: who.tenant,
            bytes_out: ev.bytes_out,
            bytes_in: ev.bytes_in,
            started_at: c
                .seen
                .unwrap_or_else(|| wall(if joined { ev.ts_ns } else { ev.start_ns })),
            duration_ms: match c.seen {
                Some(seen) => {
                    u64::try_from((wall(ev.ts_ns) - seen).num_milliseconds()).unwrap_or(0)
                }
                None if joined => 0,
                None => ev.ts_ns.saturating_sub(ev.start_ns) / 1_000_000,
            },
            joined,
        };
        // Logged at WARN once per (service, host) and window by the writer (unmetered.rs).
        tracing::debug!(service = %rec.service, tenant = %rec.tenant, host = %rec.host,
            pid = rec.pid, bytes_out = rec.bytes_out, bytes_in = rec.bytes_in, joined,
            "unmetered provider connection");
        if self.tx.try_send(rec).is_err() {
            self.metrics.ledger_errors.inc();
        }
    }
}
