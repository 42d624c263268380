//! The observer's kernel side: uprobes on OpenSSL's SSL_read/SSL_write (+ `_ex`) copy TLS plaintext
//! to a ring buffer, SSL_free ends a connection, sched tracepoints report process exec/exit, and
//! open syscall tracepoints report TLS libraries being opened (so discovery attaches at once).
//!
//! Kept tiny on purpose: everything that can be done in userspace is (parsing, classification).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_buf,
        bpf_probe_read_user_str_bytes,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns, bpf_loop},
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use core::ffi::c_void;

/// TCP connections to provider addresses, whatever the TLS library (egress accounting).
mod egress;

/// Go's crypto/tls probes (amd64 registers).
#[cfg(bpf_target_arch = "x86_64")]
mod golang;

use observer_common::{
    ActiveCall, CHUNK_SIZE, ConnKey, DIR_READ, DIR_WRITE, FLAG_CGROUP_ALLOWLIST,
    FLAG_PID_ALLOWLIST, HEADER_SIZE, KIND_CLOSE, KIND_DATA, KIND_SNI, KIND_WAKE, MAX_CHUNKS,
    MAX_PER_CALL_BYTES, ObserverConfig, PROC_EXEC, PROC_EXIT, PROC_RENAME, PROC_TLS_OPEN,
    ProcEvent, READER_ASLEEP, SNI_MAX, STAT_BYTES, STAT_COUNT, STAT_DROPPED_BYTES, STAT_EVENTS,
    STAT_PROC_DROPS, STAT_RINGBUF_DROPS, STAT_SKIPPED_BYTES, STAT_TRUNCATED_BYTES, SslEventBuf,
    SslEventHeader,
};

/// TLS plaintext events; userspace resizes it before load (ring_buffer_bytes).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
/// Process exec/exit events: small, separate so a full data ring never hides a new process.
#[map]
static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 16, 0);
/// Counters (see `STAT_*`), summed over CPUs by userspace.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);
/// Per-CPU scratch where one event is assembled before `bpf_ringbuf_output`.
#[map]
static SCRATCH: PerCpuArray<SslEventBuf> = PerCpuArray::with_max_entries(1, 0);
/// Global settings (one entry).
#[map]
static CONFIG: Array<ObserverConfig> = Array::with_max_entries(1, 0);
/// Whether the reader sleeps (one entry, [`READER_ASLEEP`] or 0), written by userspace only.
#[map]
static READER: Array<u32> = Array::with_max_entries(1, 0);
/// Writes in flight, keyed by pid_tgid.
#[map]
static ACTIVE_WRITE: LruHashMap<u64, ActiveCall> = LruHashMap::with_max_entries(16384, 0);
/// Reads in flight, keyed by pid_tgid.
#[map]
static ACTIVE_READ: LruHashMap<u64, ActiveCall> = LruHashMap::with_max_entries(16384, 0);
/// Connections userspace decided are not LLM traffic: counted, never copied.
#[map]
static SKIP_CONNS: LruHashMap<ConnKey, u8> = LruHashMap::with_max_entries(65536, 0);
/// Processes excluded by config.
#[map]
static SKIP_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);
/// When `FLAG_PID_ALLOWLIST` is set, only these processes are captured.
#[map]
static ALLOW_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);
/// When `FLAG_CGROUP_ALLOWLIST` is set, only these cgroup ids are captured.
#[map]
static ALLOW_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(4096, 0);

#[inline(always)]
fn stat_add(index: u32, n: u64) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; only this CPU touches it and the program is not preempted.
        unsafe { *p += n };
    }
}

#[inline(always)]
fn config() -> ObserverConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// Whether the process is not observed: excluded, or outside the pid / cgroup allow-lists.
#[inline(always)]
fn process_filtered(cfg: &ObserverConfig, pid: u32) -> bool {
    // SAFETY: map lookups return pointers into map values that live for the program's run.
    unsafe {
        if SKIP_PIDS.get(&pid).is_some() {
            return true;
        }
        if cfg.flags & FLAG_PID_ALLOWLIST != 0 && ALLOW_PIDS.get(&pid).is_none() {
            return true;
        }
        if cfg.flags & FLAG_CGROUP_ALLOWLIST != 0 {
            let cg = bpf_get_current_cgroup_id();
            if ALLOW_CGROUPS.get(&cg).is_none() {
                return true;
            }
        }
    }
    false
}

#[inline(always)]
fn filtered_out(cfg: &ObserverConfig, pid: u32, ssl: u64) -> bool {
    // SAFETY: as in process_filtered.
    process_filtered(cfg, pid) || unsafe { SKIP_CONNS.get(&ConnKey { ssl, pid, pad: 0 }).is_some() }
}

#[inline(always)]
fn enter(ctx: &ProbeContext, active: &LruHashMap<u64, ActiveCall>, len_arg: usize) -> u32 {
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let buf: u64 = ctx.arg(1).unwrap_or(0);
    let len_ptr: u64 = if len_arg == 0 {
        0
    } else {
        ctx.arg(len_arg).unwrap_or(0)
    };
    if ssl == 0 || buf == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let cfg = config();
    let skip = u32::from(filtered_out(&cfg, (pid_tgid >> 32) as u32, ssl));
    let call = ActiveCall {
        ssl,
        buf,
        len_ptr,
        skip,
        pad: 0,
    };
    let _ = active.insert(&pid_tgid, &call, 0);
    0
}

#[inline(always)]
fn leave(ctx: &RetProbeContext, active: &LruHashMap<u64, ActiveCall>, dir: u8) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(call) = (unsafe { active.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = active.remove(&pid_tgid);
    let ret: i64 = ctx.ret::<i64>() as i32 as i64;
    if ret <= 0 {
        return 0;
    }
    let n: u64 = if call.len_ptr != 0 {
        // SAFETY: reading a size_t the probed function just wrote; a fault returns Err.
        match unsafe { bpf_probe_read_user(call.len_ptr as *const u64) } {
            Ok(v) => v,
            Err(_) => return 0,
        }
    } else {
        ret as u64
    };
    if n == 0 {
        return 0;
    }
    let total = if n > u64::from(u32::MAX) {
        u32::MAX
    } else {
        n as u32
    };
    if call.skip != 0 {
        stat_add(STAT_SKIPPED_BYTES, u64::from(total));
        return 0;
    }
    emit_data(pid_tgid, call.ssl, call.buf, total, dir);
    0
}

/// Whether the reader sleeps until an event wakes it (it sets the flag only after its rings
/// stayed empty for a while; see `Loop::run` in the daemon).
#[inline(always)]
fn reader_asleep() -> bool {
    READER.get(0).is_some_and(|v| *v == READER_ASLEEP)
}

/// `otherwise`, or `BPF_RB_FORCE_WAKEUP` while the reader sleeps: every ring's events wake a
/// sleeping reader.
#[inline(always)]
pub(crate) fn ring_flags(otherwise: u64) -> u64 {
    if reader_asleep() {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        otherwise
    }
}

/// How an event on `EVENTS` is submitted: without a wake-up (the reader drains on its timer),
/// unless the reader sleeps or more than `wakeup_threshold` bytes are waiting.
#[inline(always)]
fn wakeup_flags(cfg: &ObserverConfig) -> u64 {
    if cfg.wakeup_threshold != 0
        && EVENTS.query(BPF_RB_AVAIL_DATA.into()) > u64::from(cfg.wakeup_threshold)
    {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        ring_flags(BPF_RB_NO_WAKEUP.into())
    }
}

/// Closes the race between an event submitted without a wake-up and a reader going to sleep.
/// The reader sets its flag, then looks at the ring; a program commits its event (a full
/// barrier), then reads the flag here. So either the reader saw the event, or this sees the
/// flag and wakes the reader with an empty [`KIND_WAKE`] event.
#[inline(always)]
fn wake_if_asleep(flags: u64) {
    if flags == u64::from(BPF_RB_FORCE_WAKEUP) || !reader_asleep() {
        return;
    }
    let header = SslEventHeader {
        kind: KIND_WAKE,
        ..SslEventHeader::default()
    };
    let _ = EVENTS.output::<SslEventHeader>(&header, BPF_RB_FORCE_WAKEUP.into());
}

/// State shared with [`emit_chunk`] across `bpf_loop` iterations (lives on the caller's stack).
#[repr(C)]
struct ChunkLoop {
    buf: u64,
    flags: u64,
    capture: u32,
    off: u32,
}

#[inline(always)]
fn emit_data(pid_tgid: u64, ssl: u64, buf: u64, total: u32, dir: u8) {
    let cfg = config();
    let mut limit = cfg.per_call_limit;
    if limit == 0 || limit > MAX_PER_CALL_BYTES {
        limit = MAX_PER_CALL_BYTES;
    }
    let capture = if total > limit { limit } else { total };
    let truncated = total - capture;
    if truncated > 0 {
        stat_add(STAT_TRUNCATED_BYTES, u64::from(truncated));
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `scratch` points at this CPU's map value, valid and exclusive for this run.
    let scratch = unsafe { &mut *scratch };
    scratch.header = SslEventHeader {
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        ssl,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        kind: KIND_DATA,
        direction: dir,
        pad: [0; 2],
        total_len: total,
        offset: 0,
        data_len: 0,
        truncated,
        pad2: 0,
    };
    let mut state = ChunkLoop {
        buf,
        flags: wakeup_flags(&cfg),
        capture,
        off: 0,
    };
    let chunks = capture.div_ceil(CHUNK_SIZE as u32);
    let chunks = if chunks > MAX_CHUNKS {
        MAX_CHUNKS
    } else {
        chunks
    };
    // bpf_loop verifies the body once instead of unrolling MAX_CHUNKS paths.
    // SAFETY: the callback has the signature bpf_loop expects and `state` outlives the call.
    unsafe {
        bpf_loop(
            chunks,
            emit_chunk as *mut c_void,
            (&raw mut state).cast(),
            0,
        );
    }
    wake_if_asleep(state.flags);
}

/// One `bpf_loop` iteration: copies the next chunk of the call into the scratch and outputs it.
/// Returns 1 (stop) when done or when the ring buffer is full.
#[inline(never)]
extern "C" fn emit_chunk(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `ChunkLoop` given by `emit_data`.
    let state = unsafe { &mut *ctx.cast::<ChunkLoop>() };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch value, exclusive for this run.
    let scratch = unsafe { &mut *scratch };
    let off = state.off;
    if off >= state.capture {
        return 1;
    }
    let mut n = state.capture - off;
    if n > CHUNK_SIZE as u32 {
        n = CHUNK_SIZE as u32;
    }
    // The mask proves the bound to the verifier (the scratch holds 2 * CHUNK_SIZE bytes).
    let n = (n as usize) & (2 * CHUNK_SIZE - 1);
    let src = (state.buf + u64::from(off)) as *const u8;
    // SAFETY: user pointer read through the helper, which faults safely.
    if unsafe { bpf_probe_read_user_buf(src, &mut scratch.data[..n]) }.is_err() {
        return 1;
    }
    scratch.header.offset = off;
    scratch.header.data_len = n as u32;
    let len = HEADER_SIZE + n;
    // SAFETY: `len` <= HEADER_SIZE + 2 * CHUNK_SIZE = size_of::<SslEventBuf>().
    let bytes =
        unsafe { core::slice::from_raw_parts((scratch as *const SslEventBuf).cast::<u8>(), len) };
    if EVENTS.output::<[u8]>(bytes, state.flags).is_err() {
        stat_add(STAT_RINGBUF_DROPS, 1);
        stat_add(STAT_DROPPED_BYTES, u64::from(state.capture - off));
        return 1;
    }
    stat_add(STAT_EVENTS, 1);
    stat_add(STAT_BYTES, n as u64);
    state.off = off + n as u32;
    0
}

/// `SSL_write(ssl, buf, num)`: the count is the return value.
#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, &ACTIVE_WRITE, 0)
}

/// `SSL_write_ex(ssl, buf, num, &written)`, and OpenSSL's `ssl_write_internal` of that shape.
#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, &ACTIVE_WRITE, 3)
}

/// `ssl_write_internal(ssl, buf, num, flags, &written)` (OpenSSL 3.2+): the count through the
/// 5th argument. Userspace puts it there only after reading the code (`elf/sites.rs`).
#[uprobe]
pub fn ssl_write_ex5(ctx: ProbeContext) -> u32 {
    enter(&ctx, &ACTIVE_WRITE, 4)
}

#[uretprobe]
pub fn ssl_write_ret(ctx: RetProbeContext) -> u32 {
    leave(&ctx, &ACTIVE_WRITE, DIR_WRITE)
}

/// `SSL_read(ssl, buf, num)`: the count is the return value.
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, &ACTIVE_READ, 0)
}

/// `SSL_read_ex(ssl, buf, num, &readbytes)`, and OpenSSL's `ssl_read_internal`.
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, &ACTIVE_READ, 3)
}

/// A read function with the count's pointer in the 5th argument.
#[uprobe]
pub fn ssl_read_ex5(ctx: ProbeContext) -> u32 {
    enter(&ctx, &ACTIVE_READ, 4)
}

#[uretprobe]
pub fn ssl_read_ret(ctx: RetProbeContext) -> u32 {
    leave(&ctx, &ACTIVE_READ, DIR_READ)
}

/// `SSL_ctrl`'s command for `SSL_set_tlsext_host_name` (OpenSSL's `ssl.h`).
const SSL_CTRL_SET_TLSEXT_HOSTNAME: i32 = 55;

/// `SSL_ctrl(ssl, cmd, larg, parg)`: reports the server name a client sets for SNI on `ssl`
/// before its handshake (`SSL_set_tlsext_host_name` is a macro over `SSL_ctrl`). Userspace
/// names a decoded call's provider by it, not by the plaintext Host header alone. Every other
/// command returns after one compare.
#[uprobe]
pub fn ssl_ctrl(ctx: ProbeContext) -> u32 {
    let cmd: i32 = ctx.arg(1).unwrap_or(0);
    if cmd != SSL_CTRL_SET_TLSEXT_HOSTNAME {
        return 0;
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let name: u64 = ctx.arg(3).unwrap_or(0);
    if ssl == 0 || name == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let cfg = config();
    if filtered_out(&cfg, pid, ssl) {
        return 0;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch value, exclusive for this run.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: user pointer read through the helper, which faults safely and stops at the NUL.
    let Ok(read) =
        (unsafe { bpf_probe_read_user_str_bytes(name as *const u8, &mut scratch.data[..SNI_MAX]) })
    else {
        return 0;
    };
    let n = read.len() & (SNI_MAX - 1);
    scratch.header = SslEventHeader {
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        ssl,
        pid,
        tid: pid_tgid as u32,
        kind: KIND_SNI,
        direction: 0,
        pad: [0; 2],
        total_len: n as u32,
        offset: 0,
        data_len: n as u32,
        truncated: 0,
        pad2: 0,
    };
    let len = HEADER_SIZE + n;
    // SAFETY: `len` <= HEADER_SIZE + SNI_MAX <= size_of::<SslEventBuf>().
    let bytes =
        unsafe { core::slice::from_raw_parts((scratch as *const SslEventBuf).cast::<u8>(), len) };
    let flags = wakeup_flags(&cfg);
    if EVENTS.output::<[u8]>(bytes, flags).is_err() {
        stat_add(STAT_RINGBUF_DROPS, 1);
    }
    wake_if_asleep(flags);
    0
}

#[uprobe]
pub fn ssl_free(ctx: ProbeContext) -> u32 {
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    if ssl == 0 {
        return 0;
    }
    close_connection(ssl);
    0
}

/// Reports the end of connection `ssl` of the current process (OpenSSL's `SSL_free`, Go's
/// `(*Conn).Close`).
#[inline(always)]
fn close_connection(ssl: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let _ = SKIP_CONNS.remove(&ConnKey { ssl, pid, pad: 0 });
    let cfg = config();
    // A process that is not observed sent no data, so its connection ends matter to nobody.
    if process_filtered(&cfg, pid) {
        return;
    }
    let header = SslEventHeader {
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        ssl,
        pid,
        tid: pid_tgid as u32,
        kind: KIND_CLOSE,
        direction: 0,
        ..SslEventHeader::default()
    };
    let flags = wakeup_flags(&cfg);
    if EVENTS.output::<SslEventHeader>(&header, flags).is_err() {
        stat_add(STAT_RINGBUF_DROPS, 1);
    }
    wake_if_asleep(flags);
}

#[inline(always)]
fn proc_event(kind: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    if kind == PROC_EXIT {
        let _ = ACTIVE_READ.remove(&pid_tgid);
        let _ = ACTIVE_WRITE.remove(&pid_tgid);
        if pid != pid_tgid as u32 {
            return; // a thread, not the process
        }
    }
    // SAFETY: helper without preconditions.
    let ev = ProcEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid,
        kind,
        comm: [0; 16],
    };
    // Process events are rare: wake the reader at once so it attaches before the first TLS call.
    if PROC_EVENTS.output::<ProcEvent>(&ev, 0).is_err() {
        stat_add(STAT_PROC_DROPS, 1);
    }
}

#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    proc_event(PROC_EXEC);
    0
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    proc_event(PROC_EXIT);
    0
}

/// Offsets in `task/task_rename` (its tracefs format on the 6.18 kernel this was built on:
/// `pid_t pid` at 8, `char newcomm[16]` at 28). Userspace checks the running kernel's format
/// and does not attach this program when they differ.
const RENAME_PID: usize = 8;
const RENAME_NEWCOMM: usize = 28;

/// A process renamed its main thread: processes name themselves after exec (workers, the demo's
/// workload), and `comm` attribution rules are written against that name. Only renames of the
/// current process's main thread are reported (by itself, `prctl(PR_SET_NAME)`, or by one of its
/// threads, `pthread_setname_np` on the main thread): a thread naming itself does not name the
/// process, and a write to another process's `/proc/PID/comm` is not followed (documented).
#[tracepoint]
pub fn task_rename(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the tracepoint's format; read_at checks the access.
    let Ok(target) = (unsafe { ctx.read_at::<i32>(RENAME_PID) }) else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if target as u32 != tgid {
        return 0;
    }
    // SAFETY: as above.
    let Ok(comm) = (unsafe { ctx.read_at::<[u8; 16]>(RENAME_NEWCOMM) }) else {
        return 0;
    };
    let ev = ProcEvent {
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid: tgid,
        kind: PROC_RENAME,
        comm,
    };
    if PROC_EVENTS.output::<ProcEvent>(&ev, 0).is_err() {
        stat_add(STAT_PROC_DROPS, 1);
    }
    0
}

/// How much of an opened path is read: longer paths are not matched (the periodic rescan still
/// finds their library; documented).
const OPEN_PATH_BYTES: usize = 256;

/// Scratch for the opened path (too big for the 512-byte stack next to the rest).
#[map]
static OPEN_PATH: PerCpuArray<[u8; OPEN_PATH_SCRATCH]> = PerCpuArray::with_max_entries(1, 0);

/// The scratch: the path plus room for a prefix compared at any index below
/// [`OPEN_PATH_BYTES`], so every access is in bounds by construction (the verifier sees a mask,
/// not a chain of checks the compiler may merge).
const OPEN_PATH_SCRATCH: usize = OPEN_PATH_BYTES + 16;

/// Longest version suffix after `libssl.so` / `libnode.so` that is matched (`.3`, `.1.1`,
/// `.3.0.13`, `.108`).
const MAX_SONAME_SUFFIX: usize = 16;

/// Whether the file name of `path[..len]` is `libssl.so` or `libnode.so` followed by a version
/// suffix of digits and dots (at most [`MAX_SONAME_SUFFIX`] bytes): the libraries discovery
/// attaches to (`discovery::is_tls_library`). Runs on every open of the host, so it walks back
/// over the suffix and compares the two names ending there — a path ending in a letter (most
/// do) costs two mismatching first bytes — instead of scanning the whole path.
///
/// Returns where the file name starts.
#[inline(always)]
fn tls_library_name(path: &[u8; OPEN_PATH_SCRATCH], len: usize) -> Option<usize> {
    if len > OPEN_PATH_BYTES {
        return None;
    }
    let mut end = len;
    let mut k = 0usize;
    while k < MAX_SONAME_SUFFIX && end > 0 {
        let c = path[(end - 1) & (OPEN_PATH_BYTES - 1)];
        if !(c == b'.' || c.is_ascii_digit()) {
            break;
        }
        end -= 1;
        k += 1;
    }
    name_at(path, end, 9, b"libssl.so").or_else(|| name_at(path, end, 10, b"libnode.so"))
}

/// Where `prefix` (`back` bytes long) starts if it is a whole file name ending at `path[end]`.
#[inline(always)]
fn name_at(
    path: &[u8; OPEN_PATH_SCRATCH],
    end: usize,
    back: usize,
    prefix: &[u8],
) -> Option<usize> {
    if back > end {
        return None;
    }
    // black_box keeps the compiler from folding `- back` into a negative constant offset of the
    // access, which the verifier refuses; the mask then bounds the index it sees.
    let at = core::hint::black_box(end - back) & (OPEN_PATH_BYTES - 1);
    ((at == 0 || path[(at - 1) & (OPEN_PATH_BYTES - 1)] == b'/') && starts_at(path, at, prefix))
        .then_some(at)
}

/// Whether `path[at..]` starts with `prefix` (at most 16 bytes). The path is NUL-terminated, so
/// a comparison never runs past it into stale scratch bytes.
#[inline(always)]
fn starts_at(path: &[u8; OPEN_PATH_SCRATCH], at: usize, prefix: &[u8]) -> bool {
    let at = at & (OPEN_PATH_BYTES - 1);
    let mut j = 0usize;
    while j < prefix.len() && j < 16 {
        if path[at + j] != prefix[j] {
            return false;
        }
        j += 1;
    }
    true
}

/// Entry of an open syscall: when the path's file name is a TLS library's, tells discovery
/// (pid and file name) so it attaches while the loader is still mapping the file. Runs for every
/// open on the host, so it only reads the path (bounded) and compares its end. Reported before
/// the open's outcome (the loader's failed tries along its search path are reported too): one
/// program at entry costs less on every open than an entry/exit pair.
#[inline(always)]
fn open_enter(ctx: &TracePointContext, filename_at: usize) -> u32 {
    // SAFETY: offset from the tracepoint's format (checked by userspace before attaching).
    let Ok(filename) = (unsafe { ctx.read_at::<u64>(filename_at) }) else {
        return 0;
    };
    let Some(buf) = OPEN_PATH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch is ours for this program's run.
    let buf = unsafe { &mut *buf };
    // SAFETY: reads at most the buffer's length from a user pointer; failure is handled.
    let Ok(path) = (unsafe {
        bpf_probe_read_user_str_bytes(filename as *const u8, &mut buf[..OPEN_PATH_BYTES])
    }) else {
        return 0;
    };
    let len = path.len();
    let Some(at) = tls_library_name(buf, len) else {
        return 0;
    };
    // The file name's first 16 bytes (NUL-terminated when shorter: the helper wrote the NUL).
    let mut name = [0u8; 16];
    let mut i = 0usize;
    while i < 16 {
        name[i] = buf[(at & (OPEN_PATH_BYTES - 1)) + i];
        i += 1;
    }
    let ev = ProcEvent {
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        kind: PROC_TLS_OPEN,
        comm: name,
    };
    if PROC_EVENTS.output::<ProcEvent>(&ev, 0).is_err() {
        stat_add(STAT_PROC_DROPS, 1);
    }
    0
}

/// Field offsets in `syscalls/sys_enter_open*` (tracefs formats of the 6.18 kernel this was
/// built on; userspace checks them on the running kernel before attaching).
const OPEN_FILENAME: usize = 16;
const OPENAT_FILENAME: usize = 24;

/// `syscalls/sys_enter_open` (the legacy syscall: musl and static binaries still use it).
#[tracepoint]
pub fn tls_open_enter(ctx: TracePointContext) -> u32 {
    open_enter(&ctx, OPEN_FILENAME)
}

/// `syscalls/sys_enter_openat` and `sys_enter_openat2` (glibc's loader and `dlopen`).
#[tracepoint]
pub fn tls_openat_enter(ctx: TracePointContext) -> u32 {
    open_enter(&ctx, OPENAT_FILENAME)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
