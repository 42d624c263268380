//! The ABI shared by the observer's eBPF programs and its userspace daemon: `#[repr(C)]` event
//! structs, map keys and values, stat indices. With the `user` feature they implement `aya::Pod`.
#![no_std]

/// Bytes of TLS plaintext carried by one [`SslEvent`]; larger calls are split across events.
pub const CHUNK_SIZE: usize = 4096;
/// Most chunks one SSL call may produce; the per-call byte limit is clamped to this many chunks.
pub const MAX_CHUNKS: u32 = 64;
/// Upper bound of the configurable per-call byte limit.
pub const MAX_PER_CALL_BYTES: u32 = CHUNK_SIZE as u32 * MAX_CHUNKS;

/// [`SslEventHeader::kind`]: a chunk of plaintext.
pub const KIND_DATA: u8 = 1;
/// [`SslEventHeader::kind`]: the SSL object was freed (connection ended).
pub const KIND_CLOSE: u8 = 2;
/// [`SslEventHeader::kind`]: the process named the server of connection `ssl` for TLS SNI
/// (`SSL_set_tlsext_host_name`, i.e. `SSL_ctrl(ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, ..)`); the
/// data is the name, at most [`SNI_MAX`] bytes.
pub const KIND_SNI: u8 = 3;
/// Most bytes of a server name reported ([`KIND_SNI`]); longer names are cut.
pub const SNI_MAX: usize = 256;
/// [`SslEventHeader::kind`]: no data, only a wake-up. Sent (with `BPF_RB_FORCE_WAKEUP`) by a
/// program that wrote an event without waking the reader and then found the reader's sleep
/// flag ([`READER_ASLEEP`]) set: the reader may have looked at the ring just before that
/// event was committed, and would otherwise sleep past it.
pub const KIND_WAKE: u8 = 4;

/// The single entry of the `READER` array: 0 while the reader drains the rings on a timer,
/// `READER_ASLEEP` while it sleeps until an event wakes it. Every event written while it sleeps
/// wakes it (`BPF_RB_FORCE_WAKEUP`).
pub const READER_ASLEEP: u32 = 1;

/// Attach cookie of a Go probe on its function's stack check (`JBE` to `morestack`): the
/// program skips a hit whose branch is taken (CF or ZF set), since the entry then runs again.
pub const GO_AT_CHECK: u64 = 1;

/// [`SslEventHeader::direction`]: the process wrote (request side for a client).
pub const DIR_WRITE: u8 = 0;
/// [`SslEventHeader::direction`]: the process read (response side for a client).
pub const DIR_READ: u8 = 1;

/// [`ProcEvent::kind`]: a process called execve.
pub const PROC_EXEC: u32 = 1;
/// [`ProcEvent::kind`]: a process (thread group leader) exited.
pub const PROC_EXIT: u32 = 2;
/// [`ProcEvent::kind`]: a process renamed its main thread (`prctl(PR_SET_NAME)`,
/// `pthread_setname_np`, its own write to `/proc/self/comm`); `comm` is the new name.
pub const PROC_RENAME: u32 = 3;
/// [`ProcEvent::kind`]: a process is opening a file named like a TLS library (`libssl.so*`,
/// `libnode.so*`); `comm` holds the file name's first 16 bytes.
pub const PROC_TLS_OPEN: u32 = 4;

/// Index into the `STATS` per-CPU array: events the ring buffer had no room for.
pub const STAT_RINGBUF_DROPS: u32 = 0;
/// Index: plaintext bytes lost with those dropped events.
pub const STAT_DROPPED_BYTES: u32 = 1;
/// Index: plaintext bytes beyond the per-call limit, not copied.
pub const STAT_TRUNCATED_BYTES: u32 = 2;
/// Index: plaintext bytes not copied because the connection or process is filtered out.
pub const STAT_SKIPPED_BYTES: u32 = 3;
/// Index: events submitted.
pub const STAT_EVENTS: u32 = 4;
/// Index: plaintext bytes submitted.
pub const STAT_BYTES: u32 = 5;
/// Index: process events the process ring buffer had no room for.
pub const STAT_PROC_DROPS: u32 = 6;
/// Index: TCP connection events (egress accounting) the `TCP_EVENTS` ring had no room for.
pub const STAT_TCP_DROPS: u32 = 7;
/// Number of entries in the `STATS` array.
pub const STAT_COUNT: u32 = 8;

/// [`ObserverConfig::flags`]: only capture processes listed in `ALLOW_PIDS`.
pub const FLAG_PID_ALLOWLIST: u32 = 1;
/// [`ObserverConfig::flags`]: only capture processes whose cgroup id is in `ALLOW_CGROUPS`.
pub const FLAG_CGROUP_ALLOWLIST: u32 = 2;

/// Header of every event on the `EVENTS` ring buffer; `data_len` bytes of plaintext follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslEventHeader {
    /// `bpf_ktime_get_ns` when the call returned.
    pub ts_ns: u64,
    /// The `SSL*` the call was made on: with `pid` it names the connection.
    pub ssl: u64,
    /// Thread group id (the process id userspace sees).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// [`KIND_DATA`] or [`KIND_CLOSE`].
    pub kind: u8,
    /// [`DIR_WRITE`] or [`DIR_READ`].
    pub direction: u8,
    /// Reserved, zero.
    pub pad: [u8; 2],
    /// Bytes the SSL call accepted (write) or returned (read).
    pub total_len: u32,
    /// Offset of this chunk within the call's bytes.
    pub offset: u32,
    /// Plaintext bytes following this header.
    pub data_len: u32,
    /// Bytes of the call beyond the per-call limit that were not copied.
    pub truncated: u32,
    /// Reserved, zero.
    pub pad2: u32,
}

/// Size of [`SslEventHeader`] on the wire.
pub const HEADER_SIZE: usize = core::mem::size_of::<SslEventHeader>();

/// Per-CPU scratch buffer where the kernel assembles one event before copying it to the ring.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslEventBuf {
    /// The event header.
    pub header: SslEventHeader,
    /// Plaintext; twice the chunk size so a masked length always stays in bounds.
    pub data: [u8; CHUNK_SIZE * 2],
}

/// An SSL call in flight, saved at entry and consumed by the return probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ActiveCall {
    /// The `SSL*` argument.
    pub ssl: u64,
    /// The buffer argument.
    pub buf: u64,
    /// `size_t *` of the `_ex` variants (written / readbytes), 0 for `SSL_read` / `SSL_write`.
    pub len_ptr: u64,
    /// Non-zero when the connection or process is filtered out: count bytes, copy nothing.
    pub skip: u32,
    /// Reserved, zero.
    pub pad: u32,
}

/// Key of the `SKIP_CONNS` map: a connection userspace decided is not LLM traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The `SSL*`.
    pub ssl: u64,
    /// Thread group id.
    pub pid: u32,
    /// Reserved, zero.
    pub pad: u32,
}

/// Global settings userspace writes into the single-entry `CONFIG` array before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObserverConfig {
    /// Most plaintext bytes copied per SSL call (clamped to [`MAX_PER_CALL_BYTES`]); 0 = the maximum.
    pub per_call_limit: u32,
    /// Wake the reader only when more than this many bytes are waiting; 0 = never wake (poll only).
    pub wakeup_threshold: u32,
    /// [`FLAG_PID_ALLOWLIST`] | [`FLAG_CGROUP_ALLOWLIST`].
    pub flags: u32,
    /// Reserved, zero.
    pub pad: u32,
}

/// An event on the `PROC_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcEvent {
    /// `bpf_ktime_get_ns`.
    pub ts_ns: u64,
    /// Thread group id.
    pub pid: u32,
    /// [`PROC_EXEC`], [`PROC_EXIT`], [`PROC_RENAME`] or [`PROC_TLS_OPEN`].
    pub kind: u32,
    /// [`PROC_RENAME`]: the new name; [`PROC_TLS_OPEN`]: the file name; NUL-padded (or cut at
    /// 16 bytes); zero otherwise.
    pub comm: [u8; 16],
}

/// [`TcpEvent::kind`]: a connection to a provider address was opened (`connect`, `SYN_SENT`).
pub const TCP_OPEN: u32 = 1;
/// [`TcpEvent::kind`]: a connection to a provider address ended (`TCP_CLOSE`).
pub const TCP_CLOSE: u32 = 2;

/// [`TcpEvent::flags`]: the connection's open was not seen (it predates the observer or was
/// opened while the tracepoint was not attached): pid and start are unknown, bytes are whole.
pub const TCP_FLAG_JOINED: u32 = 1;

/// Key of the `PROVIDER_ADDRS` map: a resolved provider address (IPv4 as v4-mapped IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProviderAddr {
    /// IPv6 address; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// TCP port, host byte order.
    pub port: u16,
    /// Reserved, zero.
    pub pad: [u8; 6],
}

/// A connection to a provider address in flight, kept by the kernel from `SYN_SENT` to `TCP_CLOSE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpConn {
    /// `bpf_ktime_get_ns` at connect.
    pub start_ns: u64,
    /// `bpf_get_current_cgroup_id` of the connecting task.
    pub cgroup: u64,
    /// Thread group id of the connecting task.
    pub pid: u32,
    /// [`CONN_FLAG_SENT`].
    pub flags: u32,
}

/// [`TcpConn::flags`]: the connection's first send was seen (its first bytes, the TLS
/// ClientHello, were reported as a [`TcpHello`] when readable).
pub const CONN_FLAG_SENT: u32 = 1;

/// Most bytes of a connection's first send reported ([`TcpHello`]): a ClientHello with a
/// post-quantum key share is ~1.5-1.9 KB, so this holds it whole.
pub const HELLO_MAX: usize = 4096;

/// The first bytes a process sent on a connection to a provider address (the TLS ClientHello),
/// on the `TCP_EVENTS` ring; told from a [`TcpEvent`] by its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpHello {
    /// The kernel's `struct sock *` (as [`TcpEvent::sk`]).
    pub sk: u64,
    /// The connection's start ([`TcpConn::start_ns`]).
    pub start_ns: u64,
    /// Bytes of `data` read.
    pub len: u32,
    /// Bytes the send carried in its first buffer (more than `len` when cut).
    pub total: u32,
    /// The bytes.
    pub data: [u8; HELLO_MAX],
}

/// An event on the `TCP_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpEvent {
    /// `bpf_ktime_get_ns` of the state change.
    pub ts_ns: u64,
    /// The connection's start ([`TcpConn::start_ns`]); 0 when joined.
    pub start_ns: u64,
    /// The kernel's `struct sock *`: names the connection while it lives.
    pub sk: u64,
    /// Cgroup id of the connecting task (0 when joined).
    pub cgroup: u64,
    /// Payload bytes sent and acknowledged by the peer (`tcp_sock.bytes_acked`); close only.
    pub bytes_out: u64,
    /// Payload bytes received (`tcp_sock.bytes_received`); close only.
    pub bytes_in: u64,
    /// Peer address (IPv4 as v4-mapped IPv6).
    pub addr: [u8; 16],
    /// Thread group id of the connecting task (0 when joined).
    pub pid: u32,
    /// [`TCP_OPEN`] or [`TCP_CLOSE`].
    pub kind: u32,
    /// [`TCP_FLAG_JOINED`].
    pub flags: u32,
    /// Peer port, host byte order.
    pub port: u16,
    /// Local port, host byte order (with the peer, finds a connection opened before the
    /// observer in userspace's scan of the host's sockets at start).
    pub lport: u16,
}

/// Where the kernel finds the byte counters in `struct tcp_sock` (from the running kernel's BTF,
/// written by userspace before the program is attached).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOffsets {
    /// Byte offset of `u64 bytes_acked`.
    pub bytes_acked: u32,
    /// Byte offset of `u64 bytes_received`.
    pub bytes_received: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers and explicit padding only.
    unsafe impl aya::Pod for super::ProviderAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TcpConn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TcpEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TcpOffsets {}
    // SAFETY: all these are #[repr(C)], Copy, contain only integers and explicit padding fields, so
    // every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::SslEventHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ActiveCall {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ObserverConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_has_no_implicit_padding() {
        assert_eq!(HEADER_SIZE, 8 + 8 + 4 + 4 + 1 + 1 + 2 + 4 * 5);
        assert_eq!(HEADER_SIZE % 8, 0);
        assert_eq!(core::mem::size_of::<ActiveCall>(), 32);
        assert_eq!(core::mem::size_of::<ConnKey>(), 16);
        assert_eq!(core::mem::size_of::<ProcEvent>(), 8 + 4 + 4 + 16);
        assert_eq!(core::mem::size_of::<ProviderAddr>(), 24);
        assert_eq!(core::mem::size_of::<TcpConn>(), 24);
        assert_eq!(core::mem::size_of::<TcpEvent>(), 6 * 8 + 16 + 4 * 3 + 2 + 2);
        assert_eq!(core::mem::size_of::<TcpHello>(), 8 + 8 + 4 + 4 + HELLO_MAX);
        assert_ne!(
            core::mem::size_of::<TcpHello>(),
            core::mem::size_of::<TcpEvent>()
        );
    }
}
