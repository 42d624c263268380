//! Where each OpenSSL probe sits, so that a probe hit costs one trap and not two.
//!
//! The kernel runs the instruction under a uprobe's breakpoint one of two ways
//! (`arch/x86/kernel/uprobes.c`): a few it emulates (push of a register, relative call, jmp and
//! jcc, the one-byte nop); any other it copies to a page of the process and single-steps there,
//! a second trap. Measured on this project's 2-vCPU VM with tracefs probes on a loop of calls
//! (docs/observer.md, "Where the probes sit"): a hit on an emulated instruction costs ~0.7 µs,
//! one on a single-stepped instruction ~13 µs, and a return probe ~0.3 µs more. Debian's
//! `SSL_read` and `SSL_write` start with `sub $0x18,%rsp`, and every function of a CET build
//! (`-fcf-protection`, Ubuntu and Fedora) with `endbr64`: both single-stepped.
//!
//! So each probe goes on the first emulated instruction before which nothing it reads has
//! changed: the argument registers it reads, and for a function with a return probe the stack
//! pointer too (the kernel swaps the return address at `[rsp]` when the probe fires). The
//! instructions before it must run once per call: no branch, and no branch of the function
//! back into them. When an exported function has no such instruction, its wrapper shape is
//! used: OpenSSL's `SSL_read` and `SSL_read_ex` both call one internal function,
//! `ssl_read_internal(ssl, buf, num, &bytes)` (`SSL_write`, `SSL_write_ex` and
//! `ssl_write_internal` likewise; from OpenSSL 3.2 the write takes a flags argument before the
//! pointer), which starts with a push. The probes then go on that function, read as `_ex` (the
//! byte count through the pointer), found by following each exported function to its first call
//! and checking that the ssl and buffer arguments reach it unchanged and that the pointer
//! argument is a stack slot of the caller (`SSL_read`) or the caller's own pointer
//! (`SSL_read_ex`). Anything else keeps the probes on the entries, as before: slower, never
//! wrong.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess,
    OpKind, Register,
};

/// Instructions looked at past a function's start for a probe site or its first call.
const SCAN_INSNS: usize = 24;
/// Largest exported function decoded whole (for branches back into a probe's prefix).
pub const MAX_BODY: u64 = 64 << 10;
/// Bytes read at an internal function's start.
pub const INNER_BYTES: usize = 64;

/// How one direction (reads or writes) is probed, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placement {
    /// On the exported functions, each on an instruction the kernel emulates.
    Exported,
    /// On the internal function both exported ones call, on an emulated instruction.
    Inner,
    /// On the exported functions' entries, at least one single-stepped.
    Stepped,
}

impl Placement {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Exported => "exported",
            Placement::Inner => "inner",
            Placement::Stepped => "stepped",
        }
    }
}

/// An exported function's code, as the file holds it.
#[derive(Debug, Clone)]
pub struct Func {
    /// Virtual address (`st_value`).
    pub addr: u64,
    /// Its bytes (`st_size` of them, at most [`MAX_BODY`]).
    pub code: Vec<u8>,
}

/// Reads code by virtual address, within the exported functions' section only (a call into
/// `.plt` or another section is never followed).
pub trait Text {
    /// `len` bytes at `addr`, or `None` outside the section or on a read error.
    fn read(&mut self, addr: u64, len: usize) -> Option<Vec<u8>>;
}

/// One direction's functions and programs.
pub struct Direction<'a> {
    /// `SSL_read` / `SSL_write`: `(ssl, buf, int num)`, returns the byte count.
    pub plain: &'a Func,
    /// `SSL_read_ex` / `SSL_write_ex`: `(ssl, buf, num, size_t *bytes)`, OpenSSL 1.1.1+.
    pub ex: Option<&'a Func>,
    /// Programs: entry of the plain function, entry of `_ex` (pointer in the 4th argument),
    /// entry with the pointer in the 5th, and the return probe.
    pub programs: Programs,
}

/// The eBPF programs of one direction.
#[derive(Debug, Clone, Copy)]
pub struct Programs {
    /// Entry probe reading the count from the return value.
    pub plain: &'static str,
    /// Entry probe reading the count through the 4th argument.
    pub ex: &'static str,
    /// Entry probe reading the count through the 5th argument.
    pub ex5: &'static str,
    /// Return probe.
    pub ret: &'static str,
}

/// Where one direction's probes go: (program, virtual address) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// How.
    pub placement: Placement,
    /// (program, virtual address).
    pub probes: Vec<(&'static str, u64)>,
}

/// Plans one direction's probes.
pub fn plan(dir: &Direction<'_>, text: &mut dyn Text) -> Planned {
    let p = dir.programs;
    let plain_site = exported_site(dir.plain, &[Register::RDI, Register::RSI], true);
    let ex_site = dir
        .ex
        .map(|f| exported_site(f, &[Register::RDI, Register::RSI, Register::RCX], true));
    if let Some(plain_site) = plain_site
        && ex_site.is_none_or(|s| s.is_some())
    {
        let mut probes = vec![(p.plain, plain_site), (p.ret, plain_site)];
        if let Some(Some(ex_site)) = ex_site {
            probes.extend([(p.ex, ex_site), (p.ret, ex_site)]);
        }
        return Planned {
            placement: Placement::Exported,
            probes,
        };
    }
    if let Some((program, site)) = inner_site(dir, text) {
        return Planned {
            placement: Placement::Inner,
            probes: vec![(program, site), (p.ret, site)],
        };
    }
    let plain_at = plain_site.unwrap_or(dir.plain.addr);
    let mut probes = vec![(p.plain, plain_at), (p.ret, plain_at)];
    if let Some(ex) = dir.ex {
        let at = ex_site.flatten().unwrap_or(ex.addr);
        probes.extend([(p.ex, at), (p.ret, at)]);
    }
    Planned {
        placement: Placement::Stepped,
        probes,
    }
}

/// The exported functions' entries, whatever they start with (`probe_sites = "entry"`).
pub fn entries(dir: &Direction<'_>) -> Planned {
    let p = dir.programs;
    let mut probes = vec![(p.plain, dir.plain.addr), (p.ret, dir.plain.addr)];
    if let Some(ex) = dir.ex {
        probes.extend([(p.ex, ex.addr), (p.ret, ex.addr)]);
    }
    Planned {
        placement: Placement::Stepped,
        probes,
    }
}

/// Where an entry-only probe reading `args` goes in `f` (its start when nothing better).
pub fn entry_only_site(f: &Func, args: &[Register]) -> u64 {
    exported_site(f, args, false).unwrap_or(f.addr)
}

/// The probe site of an exported function: the first emulated instruction before which
/// nothing in `keep` (and the stack pointer, with `ret`) changed, when no branch of the
/// function lands between its start and that instruction.
fn exported_site(f: &Func, keep: &[Register], ret: bool) -> Option<u64> {
    let site = first_emulated(&f.code, f.addr, keep, ret, false)?;
    (site == f.addr || !reentered(&f.code, f.addr, site)).then_some(site)
}

/// The internal function both exported functions of `dir` call first, with the program that
/// reads it, when its start (past an `endbr64`) is emulated.
fn inner_site(dir: &Direction<'_>, text: &mut dyn Text) -> Option<(&'static str, u64)> {
    let call = first_call(&dir.plain.code, dir.plain.addr)?;
    // The plain function passes a slot of its own stack for the byte count.
    let (pointer, program) = match (call.rcx, call.r8) {
        (Holds::Stack, Holds::Arg(_) | Holds::Other) => (Register::RCX, dir.programs.ex),
        (Holds::Arg(_) | Holds::Other, Holds::Stack) => (Register::R8, dir.programs.ex5),
        _ => return None,
    };
    if let Some(ex) = dir.ex {
        // `_ex` calls the same function with its own 4th argument as the pointer.
        let ex_call = first_call(&ex.code, ex.addr)?;
        let passed = if pointer == Register::RCX {
            ex_call.rcx
        } else {
            ex_call.r8
        };
        if ex_call.target != call.target || passed != Holds::Arg(Register::RCX) {
            return None;
        }
    }
    let code = text.read(call.target, INNER_BYTES)?;
    let site = first_emulated(
        &code,
        call.target,
        &[Register::RDI, Register::RSI, pointer],
        true,
        true,
    )?;
    Some((program, site))
}

/// Whether the kernel emulates this instruction instead of single-stepping it.
pub(crate) fn emulated(bytes: &[u8]) -> bool {
    matches!(
        bytes,
        // push r64, push r8..r15
        [0x50..=0x57] | [0x41, 0x50..=0x57]
        // nop
        | [0x90]
        // call rel32, jmp rel32, jmp rel8
        | [0xe8, _, _, _, _] | [0xe9, _, _, _, _] | [0xeb, _]
        // jcc rel8, jcc rel32
        | [0x70..=0x7f, _] | [0x0f, 0x80..=0x8f, _, _, _, _]
    )
}

/// Whether `insn` writes (even conditionally) one of `regs`, by full register.
fn writes(factory: &mut InstructionInfoFactory, insn: &Instruction, regs: &[Register]) -> bool {
    factory.info(insn).used_registers().iter().any(|u| {
        matches!(
            u.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        ) && regs.contains(&u.register().full_register())
    })
}

/// The address of the first emulated instruction from `addr`, if it comes before any branch,
/// any write to `keep` (and to the stack pointer with `stack`), within [`SCAN_INSNS`]; with
/// `only_endbr`, only `endbr64` may come before it.
fn first_emulated(
    code: &[u8],
    addr: u64,
    keep: &[Register],
    stack: bool,
    only_endbr: bool,
) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    for _ in 0..SCAN_INSNS {
        if !decoder.can_decode() {
            return None;
        }
        let pos = decoder.position();
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        if emulated(code.get(pos..pos + insn.len())?) {
            return Some(insn.ip());
        }
        if insn.code() == Code::Endbr64 {
            continue;
        }
        if only_endbr
            || insn.flow_control() != FlowControl::Next
            || writes(&mut factory, &insn, keep)
            || (stack && writes(&mut factory, &insn, &[Register::RSP]))
        {
            return None;
        }
    }
    None
}

/// Whether a branch of the function (its whole `code`) lands in `(addr, site]`, or its code
/// does not decode (nothing can then be said).
fn reentered(code: &[u8], addr: u64, site: u64) -> bool {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return true;
        }
        if matches!(
            insn.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) {
            let t = insn.near_branch_target();
            if t > addr && t <= site {
                return true;
            }
        }
    }
    false
}

/// What a register holds at a call, relative to the function's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holds {
    /// The caller's value of this argument register.
    Arg(Register),
    /// An address in the function's own stack frame.
    Stack,
    /// Anything else.
    Other,
}

/// A direct call and what the 4th and 5th argument registers hold at it.
#[derive(Debug, Clone, Copy)]
struct Call {
    target: u64,
    rcx: Holds,
    r8: Holds,
}

/// The first direct call on the fall-through path from `addr` (conditional branches not
/// taken), if the ssl and buffer arguments (`rdi`, `rsi`) reach it unchanged.
fn first_call(code: &[u8], addr: u64) -> Option<Call> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let (mut rcx, mut r8) = (Holds::Arg(Register::RCX), Holds::Arg(Register::R8));
    for _ in 0..SCAN_INSNS {
        if !decoder.can_decode() {
            return None;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        match insn.flow_control() {
            FlowControl::Next | FlowControl::ConditionalBranch => {}
            FlowControl::Call if insn.op0_kind() == OpKind::NearBranch64 => {
                return Some(Call {
                    target: insn.near_branch_target(),
                    rcx,
                    r8,
                });
            }
            _ => return None,
        }
        if writes(&mut factory, &insn, &[Register::RDI, Register::RSI]) {
            return None;
        }
        let (new_rcx, new_r8) = (
            writes(&mut factory, &insn, &[Register::RCX]).then(|| holds_after(&insn, rcx)),
            writes(&mut factory, &insn, &[Register::R8]).then(|| holds_after(&insn, rcx)),
        );
        rcx = new_rcx.unwrap_or(rcx);
        r8 = new_r8.unwrap_or(r8);
    }
    None
}

/// What the register `insn` writes holds after it, given what `rcx` held before.
fn holds_after(insn: &Instruction, rcx: Holds) -> Holds {
    match insn.code() {
        Code::Mov_r64_rm64 | Code::Mov_rm64_r64
            if insn.op0_kind() == OpKind::Register && insn.op1_kind() == OpKind::Register =>
        {
            match insn.op1_register() {
                Register::RSP => Holds::Stack,
                Register::RCX => rcx,
                _ => Holds::Other,
            }
        }
        Code::Lea_r64_m
            if insn.memory_base() == Register::RSP && insn.memory_index() == Register::None =>
        {
            Holds::Stack
        }
        _ => Holds::Other,
    }
}

#[cfg(test)]
mod tests;
