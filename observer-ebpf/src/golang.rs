//! Go's `crypto/tls` (amd64, Go 1.17+ register ABI): `(*Conn).Write` and `(*Conn).Read` are
//! probed on their stack check's `JBE` (cookie `GO_AT_CHECK`; a hit whose branch to
//! `morestack` is taken is skipped, since the entry re-runs) or past it, `Read` again at its
//! copy of the plaintext out (`CALL runtime.memmove`) or, where that is not found, at each of
//! its `RET`s (never a uretprobe: it would rewrite a return address on a goroutine stack the
//! runtime moves). Userspace finds those sites. Registers there: receiver RAX, buffer RBX,
//! length RCX; at a `RET`, `n` in RAX; the goroutine `g` in R14 throughout, which keys a read in
//! flight: a goroutine blocked in `Read` may resume on another thread.

use aya_ebpf::{
    EbpfContext as _,
    bindings::pt_regs,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    macros::map,
    macros::uprobe,
    maps::LruHashMap,
    programs::ProbeContext,
};
use observer_common::{ActiveCall, ConnKey, DIR_READ, DIR_WRITE, GO_AT_CHECK, STAT_SKIPPED_BYTES};

use crate::{close_connection, config, emit_data, filtered_out, stat_add};

/// Go reads in flight, keyed by (goroutine `g`, pid) — `ConnKey::ssl` holds `g`.
#[map]
static GO_READS: LruHashMap<ConnKey, ActiveCall> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn regs(ctx: &ProbeContext) -> pt_regs {
    // SAFETY: the probe's context is the user registers, readable for the program's run.
    unsafe { *ctx.regs }
}

/// x86 flags a `JBE` tests: carry and zero.
const CF_ZF: u64 = 0x1 | 0x40;

/// Whether this hit is on a stack check's `JBE` that will branch to `morestack`: the stack
/// grows and the function's entry runs again, so the hit that counts is the next one. The flags
/// are those the check's `CMPQ` just set, exactly what the branch will test.
#[inline(always)]
fn stack_grows(ctx: &ProbeContext, r: &pt_regs) -> bool {
    // SAFETY: the helper reads the cookie of the link that ran this program.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    cookie == GO_AT_CHECK && r.eflags & CF_ZF != 0
}

/// Largest single Write/Read length believed (a Go slice length is an int).
#[inline(always)]
fn clamp(n: u64) -> u32 {
    if n > u64::from(u32::MAX) {
        u32::MAX
    } else {
        n as u32
    }
}

#[uprobe]
pub fn go_tls_write(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let (conn, buf, len) = (r.rax, r.rbx, r.rcx as i64);
    if conn == 0 || buf == 0 || len <= 0 || stack_grows(&ctx, &r) {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let cfg = config();
    let total = clamp(len as u64);
    if filtered_out(&cfg, (pid_tgid >> 32) as u32, conn) {
        stat_add(STAT_SKIPPED_BYTES, u64::from(total));
        return 0;
    }
    // Reported at the call: Go's Write sends all of `b` or fails the connection.
    emit_data(pid_tgid, conn, buf, total, DIR_WRITE);
    0
}

#[uprobe]
pub fn go_tls_read(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let (conn, buf, g) = (r.rax, r.rbx, r.r14);
    if conn == 0 || buf == 0 || g == 0 || stack_grows(&ctx, &r) {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let cfg = config();
    let call = ActiveCall {
        ssl: conn,
        buf,
        len_ptr: 0,
        skip: u32::from(filtered_out(&cfg, pid, conn)),
        pad: 0,
    };
    let _ = GO_READS.insert(
        &ConnKey {
            ssl: g,
            pid,
            pad: 0,
        },
        &call,
        0,
    );
    0
}

/// The read this goroutine started (keyed by its `g`, R14 in Go's register ABI), taken out of
/// the map: whichever probe finishes a read owns its entry.
#[inline(always)]
fn take_read(pid_tgid: u64, g: u64) -> Option<ActiveCall> {
    let key = ConnKey {
        ssl: g,
        pid: (pid_tgid >> 32) as u32,
        pad: 0,
    };
    // SAFETY: the value is copied out before the entry is removed.
    let call = (unsafe { GO_READS.get(&key) }).copied()?;
    let _ = GO_READS.remove(&key);
    Some(call)
}

/// Reports `n` plaintext bytes at `data` as read on the call's connection, or counts them as
/// skipped when the kernel filter stopped copying it.
#[inline(always)]
fn report_read(pid_tgid: u64, call: &ActiveCall, data: u64, n: i64) {
    if data == 0 || n <= 0 {
        return;
    }
    let total = clamp(n as u64);
    if call.skip != 0 {
        stat_add(STAT_SKIPPED_BYTES, u64::from(total));
        return;
    }
    emit_data(pid_tgid, call.ssl, data, total, DIR_READ);
}

#[uprobe]
pub fn go_tls_read_ret(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(call) = take_read(pid_tgid, r.r14) {
        // RAX is what `Read` returns: the bytes now in the caller's buffer.
        report_read(pid_tgid, &call, call.buf, r.rax as i64);
    }
    0
}

/// At `(*Conn).Read`'s one `CALL runtime.memmove`, which copies the plaintext into the caller's
/// buffer: source RBX, count RCX (what `Read` returns). Read from the source, before the copy:
/// the destination is still stale. Used instead of `go_tls_read_ret` where userspace found the
/// call (the kernel emulates a `CALL`; a `RET` is single-stepped).
#[uprobe]
pub fn go_tls_read_copy(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(call) = take_read(pid_tgid, r.r14) {
        report_read(pid_tgid, &call, r.rbx, r.rcx as i64);
    }
    0
}

#[uprobe]
pub fn go_tls_close(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let conn = r.rax;
    if conn != 0 && !stack_grows(&ctx, &r) {
        close_connection(conn);
    }
    0
}
