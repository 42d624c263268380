//! Reads the machine code of one Go function (amd64) with iced-x86: its stack-growth check's
//! `JBE`, where its body starts past it, and where it returns. Probes go there instead of on the
//! entry and a uretprobe: Go re-runs a function's entry after growing the stack (`morestack`
//! jumps back to it, which would report a write twice; a probe on the `JBE` tells that hit by
//! the flags), and a uretprobe rewrites the return address on a goroutine stack that the
//! runtime may move, which corrupts Go programs.

use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic, OpKind, Register};

/// Offset of `stackguard0` in the runtime's `g` struct (stable since Go 1.0).
const STACKGUARD0: u64 = 0x10;
/// Instructions searched for the stack check at a function's start.
const PROLOGUE_INSNS: usize = 4;
/// Largest function decoded (Go's `(*Conn).Read` is under 1 KiB).
pub const MAX_FUNC_BYTES: usize = 64 << 10;

/// Probe sites in one function, as virtual addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuncSites {
    /// First instruction after the stack check (the entry itself when there is none): the
    /// arguments are still in their registers there, and it runs once per call.
    pub body: u64,
    /// The stack check's `JBE` (to `morestack`), when there is one. The kernel emulates a jcc,
    /// so a probe there costs a fraction of one on the body's `SUBQ` (single-stepped); it fires
    /// again when the stack grows and the entry re-runs, which the program tells apart by the
    /// flags the `CMPQ` left (the branch is taken when CF or ZF is set).
    pub check: Option<u64>,
    /// Every `RET` instruction.
    pub rets: Vec<u64>,
    /// Every direct `CALL` to the address asked for (`runtime.memmove`): in `(*Conn).Read`,
    /// the copy of the plaintext into the caller's buffer, with the destination in RAX, the
    /// source in RBX and the byte count in RCX. The kernel emulates a `CALL rel32`.
    pub calls: Vec<u64>,
}

/// Why a function's code was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// The bytes do not decode as amd64 code (wrong offset, not code).
    #[error("undecodable instruction at {0:#x}")]
    Invalid(u64),
    /// The function is empty or larger than [`MAX_FUNC_BYTES`].
    #[error("function size {0} out of range")]
    Size(usize),
    /// No `RET` found: reads could not be reported.
    #[error("no RET instruction")]
    NoRet,
}

/// Finds the body start, every `RET` and every direct `CALL` to `callee` (when given) of the
/// function whose code is `code`, loaded at `addr`.
///
/// # Errors
/// When the code does not decode or has no `RET`.
pub fn sites(code: &[u8], addr: u64, callee: Option<u64>) -> Result<FuncSites, CodeError> {
    if code.is_empty() || code.len() > MAX_FUNC_BYTES {
        return Err(CodeError::Size(code.len()));
    }
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut body = addr;
    let mut check = None;
    let mut rets = Vec::new();
    let mut calls = Vec::new();
    let mut index = 0;
    let mut after_check = false;
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.code() == Code::INVALID {
            // Go pads between functions with INT3; anything else undecodable is not code.
            return Err(CodeError::Invalid(insn.ip()));
        }
        if index < PROLOGUE_INSNS {
            if after_check && matches!(insn.mnemonic(), Mnemonic::Jbe | Mnemonic::Jb) {
                body = insn.next_ip();
                check = (insn.mnemonic() == Mnemonic::Jbe).then_some(insn.ip());
            }
            // `CMPQ 0x10(R14), SP` or `CMPQ 0x10(R14), R12`: compares against g.stackguard0.
            after_check = insn.mnemonic() == Mnemonic::Cmp
                && (0..insn.op_count()).any(|i| {
                    insn.op_kind(i) == OpKind::Memory
                        && insn.memory_base() == Register::R14
                        && insn.memory_displacement64() == STACKGUARD0
                });
        }
        if insn.mnemonic() == Mnemonic::Ret {
            rets.push(insn.ip());
        }
        if insn.code() == Code::Call_rel32_64 && Some(insn.near_branch64()) == callee {
            calls.push(insn.ip());
        }
        index += 1;
    }
    if rets.is_empty() {
        return Err(CodeError::NoRet);
    }
    Ok(FuncSites {
        body,
        check,
        rets,
        calls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_body_and_every_ret() {
        // CMPQ 0x10(R14), SP; JBE +8; SUBQ $0x68, SP; XOR EAX,EAX; ADDQ $0x68, SP; RET;
        // ADDQ $0x68, SP; RET; (morestack) CALL ...; JMP start
        let code = [
            0x49, 0x3b, 0x66, 0x10, // cmp rsp, [r14+0x10]
            0x76, 0x0f, // jbe +15
            0x48, 0x83, 0xec, 0x68, // sub rsp, 0x68
            0x31, 0xc0, // xor eax, eax
            0x48, 0x83, 0xc4, 0x68, // add rsp, 0x68
            0xc3, // ret
            0x48, 0x83, 0xc4, 0x68, // add rsp, 0x68
            0xc3, // ret
            0xe8, 0x00, 0x10, 0x00, 0x00, // call 0x201b
            0xe8, 0x00, 0x20, 0x00, 0x00, // call 0x3020
            0xeb, 0xde, // jmp start
        ];
        let s = sites(&code, 0x1000, Some(0x3020)).unwrap();
        assert_eq!(s.body, 0x1006);
        assert_eq!(s.check, Some(0x1004));
        assert_eq!(s.rets, vec![0x1010, 0x1015]);
        assert_eq!(
            s.calls,
            vec![0x101b],
            "only the call to the callee asked for"
        );
        assert!(sites(&code, 0x1000, None).unwrap().calls.is_empty());
    }

    #[test]
    fn a_function_without_stack_check_starts_at_its_entry() {
        let s = sites(&[0x31, 0xc0, 0xc3, 0xcc, 0xcc], 0x2000, None).unwrap();
        assert_eq!(s.body, 0x2000);
        assert_eq!(s.check, None);
        assert_eq!(s.rets, vec![0x2002]);
        assert_eq!(sites(&[0x31, 0xc0], 0, None), Err(CodeError::NoRet));
        assert_eq!(sites(&[], 0, None), Err(CodeError::Size(0)));
    }
}
