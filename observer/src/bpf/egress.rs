//! Loading the egress accounting program (`observer-ebpf/src/egress.rs`) on
//! `sock/inet_sock_set_state`, with the byte-counter offsets of this kernel's `struct tcp_sock`.

use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, RingBuf};
use aya::programs::TracePoint;
use observer_common::{ProviderAddr, TcpOffsets};

use super::format_has;

/// The maps the egress accounting needs after loading.
pub struct EgressMaps {
    /// Opens and closes of connections to provider addresses (drained by the reader).
    pub events: RingBuf<MapData>,
    /// The provider addresses the kernel accounts (written by the resolver thread).
    pub addrs: HashMap<MapData, ProviderAddr, u32>,
    /// Whether the first send of each provider connection (its TLS ClientHello) is reported,
    /// so that the destination is named by its SNI.
    pub hello: bool,
}

/// Loads and attaches the program when the tracepoint's format is the one it reads and the
/// kernel's BTF names the counters; `None` (with a WARN saying why) otherwise.
pub(super) fn load(ebpf: &mut Ebpf, server_names: bool) -> Option<EgressMaps> {
    match try_load(ebpf, server_names) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "egress accounting off: connections to providers that no TLS probe decodes are not reported"
            );
            None
        }
    }
}

fn try_load(ebpf: &mut Ebpf, server_names: bool) -> Result<EgressMaps> {
    format_has(
        "sock",
        "inet_sock_set_state",
        &[
            ("const void * skaddr", 8),
            ("int oldstate", 16),
            ("int newstate", 20),
            ("__u16 sport", 24),
            ("__u16 dport", 26),
            ("__u16 family", 28),
            ("__u16 protocol", 30),
            ("__u8 daddr[4]", 36),
            ("__u8 daddr_v6[16]", 56),
        ],
    )?;
    let (acked, received) = crate::btf::tcp_byte_offsets()?;
    let mut offsets: Array<_, TcpOffsets> =
        Array::try_from(ebpf.map_mut("TCP_OFFSETS").context("map TCP_OFFSETS")?)?;
    offsets
        .set(
            0,
            TcpOffsets {
                bytes_acked: acked,
                bytes_received: received,
            },
            0,
        )
        .context("writing TCP_OFFSETS")?;
    let prog: &mut TracePoint = ebpf
        .program_mut("tcp_state")
        .context("program tcp_state")?
        .try_into()?;
    prog.load().context("verifier rejected tcp_state")?;
    prog.attach("sock", "inet_sock_set_state")
        .context("attaching tracepoint sock/inet_sock_set_state")?;
    let hello = match server_names.then(|| attach_send(ebpf)) {
        None => false,
        Some(Ok(())) => true,
        Some(Err(e)) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "TLS server names of provider connections not read (syscall tracepoints): \
                 unmetered connections are named by address only"
            );
            false
        }
    };
    Ok(EgressMaps {
        hello,
        events: RingBuf::try_from(ebpf.take_map("TCP_EVENTS").context("map TCP_EVENTS")?)?,
        addrs: HashMap::try_from(
            ebpf.take_map("PROVIDER_ADDRS")
                .context("map PROVIDER_ADDRS")?,
        )?,
    })
}

/// Attaches the first-send programs (`syscalls/sys_enter_{connect,write,sendto,writev,sendmsg}`)
/// when their records have the layout they read.
fn attach_send(ebpf: &mut Ebpf) -> Result<()> {
    for (prog, call, second) in [
        ("sys_connect", "connect", "struct sockaddr * uservaddr"),
        ("sys_write", "write", "const char * buf"),
        ("sys_sendto", "sendto", "void * buff"),
        ("sys_writev", "writev", "const struct iovec * vec"),
        ("sys_sendmsg", "sendmsg", "struct user_msghdr * msg"),
    ] {
        let event = format!("sys_enter_{call}");
        let fd = if call == "write" {
            "unsigned int fd"
        } else if call == "writev" {
            "unsigned long fd"
        } else {
            "int fd"
        };
        format_has("syscalls", &event, &[(fd, 16), (second, 24)])?;
        let p: &mut TracePoint = ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog}"))?
            .try_into()?;
        p.load()
            .with_context(|| format!("verifier rejected {prog}"))?;
        p.attach("syscalls", &event)
            .with_context(|| format!("attaching tracepoint syscalls/{event}"))?;
    }
    Ok(())
}
