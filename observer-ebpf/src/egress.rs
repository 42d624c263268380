//! Egress accounting that does not depend on the TLS library: one program on the
//! `sock/inet_sock_set_state` tracepoint. A TCP socket entering `SYN_SENT` towards a provider
//! address (`PROVIDER_ADDRS`, written by userspace from the configured hosts' resolved addresses)
//! is remembered with the connecting task's pid, cgroup and start; when it reaches `TCP_CLOSE`
//! its payload byte counters are read from `struct tcp_sock` (offsets from the running kernel's
//! BTF, `TCP_OFFSETS`) and reported. The state tracepoint fires on state changes only (about six
//! per connection), and every change that is not a connect or a close returns after two loads.
//!
//! The destination's name: the first bytes a process writes on a provider connection (its TLS
//! ClientHello, whatever library built it) are copied once, so userspace reads the SNI. The
//! connect's fd is kept by `sys_enter_connect`; `SYN_SENT` keys the socket by `(tgid, fd)`; the
//! write-like syscall tracepoints cost one map lookup for every other write of the host.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_buf,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::TracePointContext,
};
use observer_common::{
    CONN_FLAG_SENT, HELLO_MAX, ProviderAddr, STAT_TCP_DROPS, TCP_CLOSE, TCP_FLAG_JOINED, TCP_OPEN,
    TcpConn, TcpEvent, TcpHello, TcpOffsets,
};

use crate::{ring_flags, stat_add};

/// Provider addresses (peer address + port) whose connections are accounted.
#[map]
static PROVIDER_ADDRS: HashMap<ProviderAddr, u32> = HashMap::with_max_entries(4096, 0);
/// Connections to providers in flight, keyed by `struct sock *`.
#[map]
static TCP_CONNS: LruHashMap<u64, TcpConn> = LruHashMap::with_max_entries(65536, 0);
/// Connection opens and closes for userspace.
#[map]
static TCP_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);
/// Offsets of the byte counters in `struct tcp_sock` (one entry; 0 = unknown, not read).
#[map]
static TCP_OFFSETS: Array<TcpOffsets> = Array::with_max_entries(1, 0);
/// The fd of each thread's latest `connect(2)` (`syscalls/sys_enter_connect`): `SYN_SENT` runs
/// inside that call, so it finds the fd of the socket it accounts here.
#[map]
static CONNECT_FD: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);
/// Provider connections whose first send is awaited, by `tgid << 32 | fd`: the `struct sock *`.
#[map]
static FIRST_SEND: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

/// `BPF_RB_NO_WAKEUP`: the connection's close (or the next open) wakes the reader.
const RB_NO_WAKEUP: u64 = 1;

/// Field offsets in `sock/inet_sock_set_state` (its tracefs format on 6.18; userspace checks the
/// running kernel's format before attaching).
const SKADDR: usize = 8;
const OLDSTATE: usize = 16;
const NEWSTATE: usize = 20;
const SPORT: usize = 24;
const DPORT: usize = 26;
const FAMILY: usize = 28;
const PROTOCOL: usize = 30;
const DADDR: usize = 36;
const DADDR_V6: usize = 56;

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const TCP_SYN_SENT: i32 = 2;
const TCP_STATE_CLOSE: i32 = 7;

/// Reads a field of the tracepoint's record directly (the verifier allows aligned loads from a
/// tracepoint's context; `read_at` would call `bpf_probe_read` for each field, and this program
/// runs on every TCP state change of the host).
///
/// # Safety
/// `off` must be a field offset of the record, aligned for `T`.
#[inline(always)]
unsafe fn field<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    // SAFETY: the caller passes an aligned offset inside the record.
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(off).cast::<T>()) }
}

/// The peer as a [`ProviderAddr`] key.
#[inline(always)]
fn peer(ctx: &TracePointContext) -> Option<ProviderAddr> {
    // SAFETY: offsets from the tracepoint's format, each aligned for its type.
    unsafe {
        let family: u16 = field(ctx, FAMILY);
        let port: u16 = field(ctx, DPORT);
        let mut addr = [0u8; 16];
        if family == AF_INET {
            let v4: u32 = field(ctx, DADDR);
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12..16].copy_from_slice(&v4.to_ne_bytes());
        } else if family == AF_INET6 {
            let hi: u64 = field(ctx, DADDR_V6);
            let lo: u64 = field(ctx, DADDR_V6 + 8);
            addr[..8].copy_from_slice(&hi.to_ne_bytes());
            addr[8..].copy_from_slice(&lo.to_ne_bytes());
        } else {
            return None;
        }
        Some(ProviderAddr {
            addr,
            port,
            pad: [0; 6],
        })
    }
}

#[inline(always)]
fn output(ev: &TcpEvent) {
    // Rare (two per provider connection): wake the reader at once (a sleeping reader is woken
    // whether or not it drained the ring since the last event).
    if TCP_EVENTS.output::<TcpEvent>(ev, ring_flags(0)).is_err() {
        stat_add(STAT_TCP_DROPS, 1);
    }
}

/// `sock/inet_sock_set_state`: connect and close of TCP connections to provider addresses.
#[tracepoint]
pub fn tcp_state(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the tracepoint's format, each aligned for its type.
    let newstate: i32 = unsafe { field(&ctx, NEWSTATE) };
    if newstate != TCP_SYN_SENT && newstate != TCP_STATE_CLOSE {
        return 0;
    }
    // SAFETY: as above.
    let (protocol, sk, oldstate): (u16, u64, i32) = unsafe {
        (
            field(&ctx, PROTOCOL),
            field(&ctx, SKADDR),
            field(&ctx, OLDSTATE),
        )
    };
    if protocol != IPPROTO_TCP {
        return 0;
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if newstate == TCP_SYN_SENT {
        let Some(key) = peer(&ctx) else {
            return 0;
        };
        // SAFETY: a lookup; the value is not kept.
        if unsafe { PROVIDER_ADDRS.get(&key) }.is_none() {
            return 0;
        }
        // connect(2) runs in the connecting task: its pid and cgroup are the caller's.
        let pid_tgid = bpf_get_current_pid_tgid();
        let pid = (pid_tgid >> 32) as u32;
        // SAFETY: a lookup; the value is copied.
        if let Some(&fd) = unsafe { CONNECT_FD.get(&pid_tgid) } {
            let _ = FIRST_SEND.insert(&((pid_tgid & !0xffff_ffff) | u64::from(fd)), &sk, 0);
            let _ = CONNECT_FD.remove(&pid_tgid);
        }
        let conn = TcpConn {
            start_ns: now,
            // SAFETY: helper without preconditions.
            cgroup: unsafe { bpf_get_current_cgroup_id() },
            pid,
            flags: 0,
        };
        let _ = TCP_CONNS.insert(&sk, &conn, 0);
        output(&TcpEvent {
            ts_ns: now,
            start_ns: now,
            sk,
            cgroup: conn.cgroup,
            addr: key.addr,
            pid,
            kind: TCP_OPEN,
            port: key.port,
            ..TcpEvent::default()
        });
        return 0;
    }
    // TCP_CLOSE: the close may run in softirq context (the peer's last ACK), so the identity is
    // the one saved at connect.
    // SAFETY: the value is copied out before the entry is removed.
    let known = unsafe { TCP_CONNS.get(&sk) }.copied();
    if known.is_some() {
        let _ = TCP_CONNS.remove(&sk);
    }
    if oldstate == TCP_SYN_SENT {
        return 0; // never established: no traffic
    }
    let Some(key) = peer(&ctx) else {
        return 0;
    };
    let (conn, flags) = match known {
        Some(c) => (c, 0),
        None => {
            // A connection opened before the observer: reported when it ends, if it is a
            // provider's (its bytes are whole, its pid unknown).
            // SAFETY: a lookup; the value is not kept.
            if unsafe { PROVIDER_ADDRS.get(&key) }.is_none() {
                return 0;
            }
            (TcpConn::default(), TCP_FLAG_JOINED)
        }
    };
    let offsets = TCP_OFFSETS.get(0).copied().unwrap_or_default();
    let read = |off: u32| -> u64 {
        if off == 0 {
            return 0;
        }
        // SAFETY: `sk` is the tracepoint's live `struct sock *`, a `tcp_sock` (protocol TCP);
        // the helper faults safely.
        unsafe { bpf_probe_read_kernel((sk + u64::from(off)) as *const u64) }.unwrap_or(0)
    };
    output(&TcpEvent {
        ts_ns: now,
        start_ns: conn.start_ns,
        sk,
        cgroup: conn.cgroup,
        bytes_out: read(offsets.bytes_acked),
        bytes_in: read(offsets.bytes_received),
        addr: key.addr,
        pid: conn.pid,
        kind: TCP_CLOSE,
        flags,
        port: key.port,
        // SAFETY: as above.
        lport: unsafe { field(&ctx, SPORT) },
    });
    0
}

/// Offsets in the `syscalls/sys_enter_*` records (the same for connect, write, sendto, writev and
/// sendmsg on 6.18; checked in tracefs by userspace): the fd, then the buffer (or iovec array,
/// or `struct user_msghdr *`), then its length.
const SYS_FD: usize = 16;
const SYS_BUF: usize = 24;
const SYS_LEN: usize = 32;

/// `syscalls/sys_enter_connect`: remembers the fd the thread connects (one map update).
#[tracepoint]
pub fn sys_connect(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the tracepoint's format, aligned.
    let fd: u64 = unsafe { field(&ctx, SYS_FD) };
    let _ = CONNECT_FD.insert(&bpf_get_current_pid_tgid(), &(fd as u32), 0);
    0
}

/// How a write-like syscall passes its bytes.
#[derive(Clone, Copy)]
enum Buf {
    /// `write`, `sendto`: a buffer and its length.
    Plain,
    /// `writev`: an iovec array (the first is read).
    Iovec,
    /// `sendmsg`: a `struct user_msghdr *` (its first iovec is read).
    Msghdr,
}

/// `sys_enter_write`.
#[tracepoint]
pub fn sys_write(ctx: TracePointContext) -> u32 {
    first_send(&ctx, Buf::Plain);
    0
}

/// `sys_enter_sendto`.
#[tracepoint]
pub fn sys_sendto(ctx: TracePointContext) -> u32 {
    first_send(&ctx, Buf::Plain);
    0
}

/// `sys_enter_writev`.
#[tracepoint]
pub fn sys_writev(ctx: TracePointContext) -> u32 {
    first_send(&ctx, Buf::Iovec);
    0
}

/// `sys_enter_sendmsg`.
#[tracepoint]
pub fn sys_sendmsg(ctx: TracePointContext) -> u32 {
    first_send(&ctx, Buf::Msghdr);
    0
}

/// The first send on a provider connection carries the TLS ClientHello, whatever library built
/// it: its first bytes go to userspace, which reads the server name (SNI). Every other write of
/// the host costs one map lookup.
#[inline(always)]
fn first_send(ctx: &TracePointContext, how: Buf) {
    // SAFETY: offset from the tracepoint's format, aligned.
    let fd: u64 = unsafe { field(ctx, SYS_FD) };
    let key = (bpf_get_current_pid_tgid() & !0xffff_ffff) | (fd & 0xffff_ffff);
    // SAFETY: a lookup; the value is copied.
    let Some(&sk) = (unsafe { FIRST_SEND.get(&key) }) else {
        return;
    };
    let _ = FIRST_SEND.remove(&key);
    let Some(conn) = TCP_CONNS.get_ptr_mut(&sk) else {
        return; // closed (and the fd number reused) before any send
    };
    // SAFETY: the map's value for `sk`, valid for this run.
    let conn = unsafe { &mut *conn };
    if conn.flags & CONN_FLAG_SENT != 0 {
        return;
    }
    conn.flags |= CONN_FLAG_SENT;
    let start_ns = conn.start_ns;
    // SAFETY: as above.
    let (arg, len): (u64, u64) = unsafe { (field(ctx, SYS_BUF), field(ctx, SYS_LEN)) };
    // SAFETY: user pointers read through the helper, which faults safely; the layouts are the
    // x86-64 user ABI (`struct iovec` {base, len}; `struct user_msghdr`'s `msg_iov` at 16).
    let (base, len): (u64, u64) = unsafe {
        match how {
            Buf::Plain => (arg, len),
            Buf::Iovec => (
                bpf_probe_read_user(arg as *const u64).unwrap_or(0),
                bpf_probe_read_user((arg + 8) as *const u64).unwrap_or(0),
            ),
            Buf::Msghdr => {
                let iov: u64 = bpf_probe_read_user((arg + 16) as *const u64).unwrap_or(0);
                (
                    bpf_probe_read_user(iov as *const u64).unwrap_or(0),
                    bpf_probe_read_user((iov + 8) as *const u64).unwrap_or(0),
                )
            }
        }
    };
    if base == 0 || len == 0 {
        return;
    }
    let Some(mut entry) = TCP_EVENTS.reserve::<TcpHello>(0) else {
        stat_add(STAT_TCP_DROPS, 1);
        return;
    };
    let hello = entry.as_mut_ptr();
    let n = if len > HELLO_MAX as u64 {
        HELLO_MAX
    } else {
        len as usize
    };
    // SAFETY: the reserved record, ours until submitted; `n` <= HELLO_MAX.
    let ok = unsafe {
        (*hello).sk = sk;
        (*hello).start_ns = start_ns;
        (*hello).len = n as u32;
        (*hello).total = len.min(u64::from(u32::MAX)) as u32;
        bpf_probe_read_user_buf(base as *const u8, &mut (&mut (*hello).data)[..n]).is_ok()
    };
    if ok {
        entry.submit(ring_flags(RB_NO_WAKEUP));
    } else {
        entry.discard(0);
    }
}
