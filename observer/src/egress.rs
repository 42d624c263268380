//! Egress accounting: every TCP connection to a provider address, whatever TLS library carried
//! it, and the verdict on it once it ends — **metered** (the decoding path recorded a call of the
//! same process during its lifetime), **ignored** (the enforcer's own upstream, by
//! `unmetered_ignore`) or **unmetered** (a bypass no probe could decode: rustls, BoringSSL, JSSE,
//! ...), which goes to the ledger as a first-class bypass record.
//!
//! The kernel side is `observer-ebpf/src/egress.rs`; the addresses it accounts are the configured
//! and built-in provider hosts, resolved by a thread of their own (`Resolver`).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use observer_common::{ProviderAddr, TCP_CLOSE, TCP_FLAG_JOINED, TCP_OPEN, TcpEvent};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::attribution::{CompiledMatcher, ProcessInfo, Rules};

/// How long after a connection's close its verdict waits: the TLS plaintext events of its last
/// call travel on another ring buffer and may be drained after the close event.
const VERDICT_GRACE: Duration = Duration::from_secs(2);
/// Metered call times kept per process (the newest).
const METERED_PER_PID: usize = 256;
/// How often provider hosts are resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(60);

/// Where a provider address leads: the host as configured and the provider's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    /// `host[:port]` as configured (built-in hosts: the name, port 443 implied).
    pub host: String,
    /// Provider name recorded in the ledger.
    pub provider: String,
}

/// Resolved provider addresses → destination, shared by the resolver and the reader.
pub type Names = Arc<RwLock<HashMap<ProviderAddr, Dest>>>;

/// A provider connection that was open when the observer started: its process and when the
/// scan saw it.
#[derive(Debug, Clone)]
pub struct Preexisting {
    /// The process holding the socket (read at the scan).
    pub proc: ProcessInfo,
    /// When the scan saw it.
    pub seen: chrono::DateTime<chrono::Utc>,
}

/// Connections open before the observer started, by (local port, peer).
pub type Joined = Arc<std::sync::Mutex<HashMap<(u16, ProviderAddr), Preexisting>>>;

/// Parses an address of `/proc/net/tcp` (`0100007F:1F90`) or `/proc/net/tcp6` (32 hex digits):
/// each 32-bit word is printed as the native (little-endian here) integer of network-order bytes.
fn proc_net_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..addr.len()).step_by(8) {
        let w = u32::from_str_radix(addr.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?),
        _ => return None,
    };
    Some((ip, port))
}

/// The host's TCP sockets connected to a provider address: inode → (local port, peer).
fn provider_sockets(names: &HashMap<ProviderAddr, Dest>) -> HashMap<u64, (u16, ProviderAddr)> {
    let mut out = HashMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] == "0A" {
                continue;
            }
            let (Some((_, lport)), Some((rip, rport))) = (proc_net_addr(f[1]), proc_net_addr(f[2]))
            else {
                continue;
            };
            let key = provider_addr(rip, rport);
            if let (true, Ok(inode)) = (names.contains_key(&key), f[9].parse::<u64>())
                && inode != 0
            {
                out.insert(inode, (lport, key));
            }
        }
    }
    out
}

/// Finds the processes holding the provider connections open now (`/proc/*/fd`), so a
/// connection that predates the observer is attributed when it ends. Returns how many.
fn scan_preexisting(names: &Names, joined: &Joined) -> usize {
    let sockets = match names.read() {
        Ok(n) => provider_sockets(&n),
        Err(_) => return 0,
    };
    if sockets.is_empty() {
        return 0;
    }
    let seen = chrono::Utc::now();
    let mut found = 0;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(&(lport, key)) = sockets.get(&inode) else {
                continue;
            };
            let proc =
                ProcessInfo::read(std::path::Path::new("/proc"), pid).unwrap_or(ProcessInfo {
                    pid,
                    ..ProcessInfo::default()
                });
            if let Ok(mut j) = joined.lock() {
                j.insert((lport, key), Preexisting { proc, seen });
                found += 1;
            }
        }
    }
    found
}

/// A provider connection that carried no metered call: what goes to the ledger. Metadata only.
#[derive(Debug, Clone, Serialize)]
pub struct UnmeteredRecord {
    /// Always `"unmetered"` (the sniff line's and the stream entry's kind).
    pub kind: &'static str,
    /// Unique per connection: boot id, `struct sock *`, close time.
    pub conn_id: String,
    /// Provider name.
    pub provider: String,
    /// Provider host as configured.
    pub host: String,
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

/// Labels of the egress metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// Provider name.
    pub provider: String,
}

/// Labels of `llmwarden_observer_provider_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// `metered`, `unmetered`, `ignored`.
    pub verdict: String,
}

/// The egress metrics (documented in docs/observer.md).
#[derive(Debug, Default)]
pub struct EgressMetrics {
    /// `llmwarden_observer_unmetered_connections_total{provider}`.
    pub connections: Family<ProviderLabels, Counter>,
    /// `llmwarden_observer_unmetered_bytes_out_total{provider}`.
    pub bytes_out: Family<ProviderLabels, Counter>,
    /// `llmwarden_observer_unmetered_bytes_in_total{provider}`.
    pub bytes_in: Family<ProviderLabels, Counter>,
    /// `llmwarden_observer_unmetered_joined_total`: unmetered connections that predate the observer.
    pub joined: Counter,
    /// `llmwarden_observer_unmetered_ledger_errors_total`.
    pub ledger_errors: Counter,
    /// `llmwarden_observer_unmetered_kernel_drops`: connection events the kernel ring lost.
    pub kernel_drops: Gauge,
    /// `llmwarden_observer_provider_connections_total{verdict}`.
    pub verdicts: Family<VerdictLabels, Counter>,
}

impl EgressMetrics {
    /// Registers under `llmwarden_observer_`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("llmwarden_observer");
        r.register(
            "unmetered_connections",
            "connections to a provider that carried no metered call",
            self.connections.clone(),
        );
        r.register(
            "unmetered_bytes_out",
            "TCP payload bytes sent on unmetered provider connections",
            self.bytes_out.clone(),
        );
        r.register(
            "unmetered_bytes_in",
            "TCP payload bytes received on unmetered provider connections",
            self.bytes_in.clone(),
        );
        r.register(
            "unmetered_joined",
            "unmetered connections opened before the observer saw them",
            self.joined.clone(),
        );
        r.register(
            "unmetered_ledger_errors",
            "unmetered records Redis did not take",
            self.ledger_errors.clone(),
        );
        r.register(
            "unmetered_kernel_drops",
            "provider connection events lost in the kernel (ring full)",
            self.kernel_drops.clone(),
        );
        r.register(
            "provider_connections",
            "ended connections to provider addresses, by verdict",
            self.verdicts.clone(),
        );
    }
}

/// `ip`, `port` as the kernel's map key.
#[must_use]
pub fn provider_addr(ip: IpAddr, port: u16) -> ProviderAddr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    ProviderAddr {
        addr: v6.octets(),
        port,
        pad: [0; 6],
    }
}

fn socket_addr(a: &ProviderAddr) -> SocketAddr {
    let v6 = Ipv6Addr::from(a.addr);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, a.port)
}

/// Splits `host[:port]` (`[v6]:port` too); port 443 when absent.
#[must_use]
pub fn split_host(host_port: &str) -> (String, u16) {
    let s = host_port.trim();
    if let Some(rest) = s.strip_prefix('[')
        && let Some((h, tail)) = rest.split_once(']')
    {
        let port = tail
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(443);
        return (h.to_owned(), port);
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_owned(), p.parse().unwrap_or(443)),
        _ => (s.to_owned(), 443),
    }
}

/// Resolves the provider hosts now and every [`RESOLVE_EVERY`], writing their addresses into
/// the kernel's `PROVIDER_ADDRS` and into [`Names`]; on its own thread (resolving may block).
pub struct Resolver {
    /// (host as configured, provider name).
    pub hosts: Vec<(String, String)>,
    /// The kernel map.
    pub map: BpfHashMap<MapData, ProviderAddr, u32>,
    /// Shared with the reader.
    pub names: Names,
    /// Connections open before start, found after the first resolution.
    pub joined: Joined,
}

impl Resolver {
    /// Runs until `stop`.
    pub fn run(mut self, stop: &AtomicBool) {
        let mut next = Instant::now();
        let mut first = true;
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                self.resolve_all();
                next = Instant::now() + RESOLVE_EVERY;
                if first {
                    first = false;
                    let open = scan_preexisting(&self.names, &self.joined);
                    let addrs = self.names.read().map(|n| n.len()).unwrap_or(0);
                    tracing::info!(
                        provider_addresses = addrs,
                        open_before_start = open,
                        "egress accounting on"
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn resolve_all(&mut self) {
        for (i, (host, provider)) in self.hosts.iter().enumerate() {
            let (name, port) = split_host(host);
            let addrs = match (name.as_str(), port).to_socket_addrs() {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(host = %host, error = %e, "provider host not resolved");
                    continue;
                }
            };
            for a in addrs {
                let key = provider_addr(a.ip(), a.port());
                if let Err(e) = self.map.insert(key, u32::try_from(i).unwrap_or(0), 0) {
                    tracing::warn!(host = %host, error = %e, "provider address not accounted (PROVIDER_ADDRS full?)");
                    continue;
                }
                if let Ok(mut n) = self.names.write() {
                    n.insert(
                        key,
                        Dest {
                            host: host.clone(),
                            provider: provider.clone(),
                        },
                    );
                }
            }
        }
    }
}

/// Starts the resolver thread and returns the reader's state; `None` when the kernel side is
/// not loaded (egress accounting off or unsupported).
///
/// # Errors
/// When an `unmetered_ignore` glob does not compile or the thread cannot be spawned.
pub fn start(
    maps: Option<crate::bpf::EgressMaps>,
    cfg: &crate::config::Config,
    stop: &Arc<AtomicBool>,
    tx: mpsc::Sender<UnmeteredRecord>,
    metrics: Arc<EgressMetrics>,
    boot_id: &str,
) -> anyhow::Result<Option<Egress>> {
    let Some(maps) = maps else {
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
    let names: Names = Arc::default();
    let joined: Joined = Arc::default();
    let resolver = Resolver {
        hosts,
        map: maps.addrs,
        names: names.clone(),
        joined: joined.clone(),
    };
    let stop = stop.clone();
    std::thread::Builder::new()
        .name("observer-resolver".into())
        .spawn(move || resolver.run(&stop))?;
    Ok(Some(Egress::new(
        maps.events,
        names,
        joined,
        ignore,
        tx,
        metrics,
        boot_id.to_owned(),
    )))
}

/// Where `addr`:`port` leads, if it is a resolved provider address.
fn dest(names: &Names, addr: [u8; 16], port: u16) -> Option<Dest> {
    let key = ProviderAddr {
        addr,
        port,
        pad: [0; 6],
    };
    names.read().ok().and_then(|n| n.get(&key).cloned())
}

/// A connection seen opening.
struct Open {
    start_ns: u64,
    proc: ProcessInfo,
}

/// A connection that ended, waiting for its verdict.
struct Closed {
    due: Instant,
    ev: TcpEvent,
    proc: ProcessInfo,
    /// For a connection that predates the observer: when the scan at start saw it.
    seen: Option<chrono::DateTime<chrono::Utc>>,
}

/// The reader's side: pairs opens and closes, remembers metered calls, decides.
pub struct Egress {
    events: RingBuf<MapData>,
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
fn mono_ns() -> u64 {
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
            events,
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

    /// Drains the kernel's connection events; `process` gives the identity of a pid (read while
    /// the process surely exists: at its connect).
    pub fn drain(&mut self, mut process: impl FnMut(u32) -> ProcessInfo) {
        let now = Instant::now();
        while let Some(item) = self.events.next() {
            if item.len() < std::mem::size_of::<TcpEvent>() {
                continue;
            }
            // SAFETY: the kernel writes whole TcpEvent records.
            let ev: TcpEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            match ev.kind {
                TCP_OPEN => {
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
                            proc,
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
                    let proc = match self.open.remove(&ev.sk) {
                        Some(o) if o.start_ns == ev.start_ns => o.proc,
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
            provider: dest.provider,
            host: dest.host,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_split_with_and_without_port() {
        assert_eq!(split_host("127.0.0.1:8443"), ("127.0.0.1".into(), 8443));
        assert_eq!(split_host("api.openai.com"), ("api.openai.com".into(), 443));
        assert_eq!(split_host("[::1]:9000"), ("::1".into(), 9000));
        assert_eq!(split_host("[::1]"), ("::1".into(), 443));
    }

    #[test]
    fn proc_net_tcp_addresses() {
        assert_eq!(
            proc_net_addr("0100007F:1F90"),
            Some(("127.0.0.1".parse().unwrap(), 8080))
        );
        assert_eq!(
            proc_net_addr("00000000000000000000000001000000:01BB"),
            Some(("::1".parse().unwrap(), 443))
        );
        assert_eq!(proc_net_addr("zz:1"), None);
    }

    #[test]
    fn addresses_round_trip_as_v4_mapped() {
        let k = provider_addr("127.0.0.1".parse().unwrap(), 443);
        assert_eq!(k.addr[10..12], [0xff, 0xff]);
        assert_eq!(socket_addr(&k).to_string(), "127.0.0.1:443");
        let k6 = provider_addr("2001:db8::1".parse().unwrap(), 8443);
        assert_eq!(socket_addr(&k6).to_string(), "[2001:db8::1]:8443");
    }
}
