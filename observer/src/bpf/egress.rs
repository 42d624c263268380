//! Loading the egress accounting program (`observer-ebpf/src/egress.rs`) on
//! `sock/inet_sock_set_state`, with the byte-counter offsets of this kernel's `struct tcp_sock`.

use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, RingBuf};
use aya::programs::{FEntry, TracePoint};
use observer_common::{ProviderAddr, SendOffsets, TcpOffsets};

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
pub(super) fn load(ebpf: &mut Ebpf) -> Option<EgressMaps> {
    match try_load(ebpf) {
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

fn try_load(ebpf: &mut Ebpf) -> Result<EgressMaps> {
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
    let hello = match attach_send(ebpf) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "TLS server names of provider connections not read (fentry tcp_sendmsg): \
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

/// Attaches `tcp_send` (fentry on `tcp_sendmsg`) once the `struct msghdr` offsets of this kernel
/// are written.
fn attach_send(ebpf: &mut Ebpf) -> Result<()> {
    let o = crate::btf::send_offsets()?;
    let mut offsets: Array<_, SendOffsets> =
        Array::try_from(ebpf.map_mut("SEND_OFFSETS").context("map SEND_OFFSETS")?)?;
    offsets.set(0, o, 0).context("writing SEND_OFFSETS")?;
    let btf = aya::Btf::from_sys_fs().context("kernel BTF")?;
    let prog: &mut FEntry = ebpf
        .program_mut("tcp_send")
        .context("program tcp_send")?
        .try_into()?;
    prog.load("tcp_sendmsg", &btf)
        .context("verifier rejected tcp_send")?;
    prog.attach().context("attaching fentry tcp_sendmsg")?;
    Ok(())
}
