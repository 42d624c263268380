//! Provider addresses for the egress accounting: the configured and built-in hosts resolved
//! now and every minute into the kernel's `PROVIDER_ADDRS` (on a thread of its own: resolving
//! may block), and, once at start, the provider connections already open (`/proc/net/tcp{,6}`
//! and `/proc/*/fd`), so one that predates the observer is attributed when it ends.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs as _};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData};
use observer_common::ProviderAddr;

use crate::attribution::ProcessInfo;
use crate::stop::StopSignal;

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

pub(super) fn socket_addr(a: &ProviderAddr) -> SocketAddr {
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
    /// `attach = "on-connect"`: the discovery thread, told of the processes holding them.
    pub connect_notes: Option<std::sync::mpsc::Sender<crate::discovery::ProcNote>>,
    /// Told once the first resolution and the scan of open connections are done.
    pub first_pass: Option<std::sync::mpsc::Sender<()>>,
}

impl Resolver {
    /// Runs until `stop`.
    pub fn run(mut self, stop: &StopSignal) {
        let mut next = Instant::now();
        let mut first = true;
        while !stop.stopped() {
            if Instant::now() >= next {
                self.resolve_all();
                next = Instant::now() + RESOLVE_EVERY;
                if first {
                    first = false;
                    let open = scan_preexisting(&self.names, &self.joined);
                    self.attach_preexisting();
                    let addrs = self.names.read().map(|n| n.len()).unwrap_or(0);
                    tracing::info!(
                        provider_addresses = addrs,
                        open_before_start = open,
                        "egress accounting on"
                    );
                    if let Some(tx) = self.first_pass.take() {
                        let _ = tx.send(());
                    }
                }
            }
            stop.sleep(next.saturating_duration_since(Instant::now()));
        }
    }

    /// On connect: the processes holding provider connections at the start get their probes.
    fn attach_preexisting(&self) {
        let Some(tx) = &self.connect_notes else {
            return;
        };
        let pids: std::collections::BTreeSet<u32> = self
            .joined
            .lock()
            .map(|j| j.values().map(|p| p.proc.pid).collect())
            .unwrap_or_default();
        for pid in pids {
            let _ = tx.send(crate::discovery::ProcNote::Connect { pid, ts_ns: 0 });
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

/// Where `addr`:`port` leads, if it is a resolved provider address.
pub(super) fn dest(names: &Names, addr: [u8; 16], port: u16) -> Option<Dest> {
    let key = ProviderAddr {
        addr,
        port,
        pad: [0; 6],
    };
    names.read().ok().and_then(|n| n.get(&key).cloned())
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
