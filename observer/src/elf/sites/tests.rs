//! Plans over hand-assembled shapes of the functions met in OpenSSL builds (bytes from `as`).

use super::*;

/// Debian's OpenSSL 3.0 `SSL_read` up to its first call: `sub $0x18,%rsp`, stack protector,
/// `js` to the error path, `mov %rsp,%rcx` (the byte count's slot), `call ssl_read_internal`
/// (at +0x1e, target +0x1e+0x1000).
const DEB_READ: &[u8] = &[
    0x48, 0x83, 0xec, 0x18, 0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0x00, 0x00, 0x00, 0x48, 0x89, 0x44,
    0x24, 0x08, 0x31, 0xc0, 0x85, 0xd2, 0x78, 0x0b, 0x48, 0x89, 0xe1, 0x48, 0x63, 0xd2, 0xe8, 0xfb,
    0x0f, 0x00, 0x00, 0xc3,
];
/// Debian's `SSL_read_ex`: `sub $8,%rsp; call ssl_read_internal` (at +4, target +4+0xf84).
const DEB_READ_EX: &[u8] = &[
    0x48, 0x83, 0xec, 0x08, 0xe8, 0x7f, 0x0f, 0x00, 0x00, 0x48, 0x83, 0xc4, 0x08, 0xc3,
];
/// `ssl_read_internal`'s start: `push %r13; push %r12; sub $0x38,%rsp`.
const INNER: &[u8] = &[0x41, 0x55, 0x41, 0x54, 0x48, 0x83, 0xec, 0x38, 0xc3];
/// An internal function starting with `sub $0x38,%rsp`.
const SUB_INNER: &[u8] = &[0x48, 0x83, 0xec, 0x38, 0xc3];
/// A CET build's start: `endbr64; push %rbp; mov %rsp,%rbp`.
const CET: &[u8] = &[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3];
/// OpenSSL 3.2's `SSL_write`: the count's slot in `r8`, flags 0 in `rcx` (call at +12).
const W32: &[u8] = &[
    0x48, 0x83, 0xec, 0x18, 0x49, 0x89, 0xe0, 0x31, 0xc9, 0x48, 0x63, 0xd2, 0xe8, 0xfb, 0x0f, 0x00,
    0x00, 0x48, 0x83, 0xc4, 0x18, 0xc3,
];
/// OpenSSL 3.2's `SSL_write_ex`: `mov %rcx,%r8; xor %ecx,%ecx; call` (at +9, target +9+0xf84).
const W32_EX: &[u8] = &[
    0x48, 0x83, 0xec, 0x08, 0x49, 0x89, 0xc8, 0x31, 0xc9, 0xe8, 0x7f, 0x0f, 0x00, 0x00, 0x48, 0x83,
    0xc4, 0x08, 0xc3,
];
/// BoringSSL's `SSL_read` shape: `push %rbx; mov %rdi,%rbx; call SSL_peek`.
const BORING: &[u8] = &[
    0x53, 0x48, 0x89, 0xfb, 0xe8, 0xfb, 0x0f, 0x00, 0x00, 0x5b, 0xc3,
];
/// `SSL_free`'s start: `test %rdi,%rdi; je out; push %r13; mov %rdi,%rbx`.
const FREE: &[u8] = &[
    0x48, 0x85, 0xff, 0x74, 0x05, 0x41, 0x55, 0x48, 0x89, 0xfb, 0xc3,
];
/// A loop back onto its own `je`: `test; 1: je 2f; dec %rdi; jmp 1b; 2: ret`.
const LOOP: &[u8] = &[
    0x48, 0x85, 0xff, 0x74, 0x05, 0x48, 0xff, 0xcf, 0xeb, 0xf9, 0xc3,
];
/// `mov %rsi,%rdi; push %rbp`: the first argument is gone by the push.
const CLOBBER: &[u8] = &[0x48, 0x89, 0xf7, 0x55, 0xc3];

const READS: Programs = Programs {
    plain: "ssl_read",
    ex: "ssl_read_ex",
    ex5: "ssl_read_ex5",
    ret: "ssl_read_ret",
};

/// Code by address: a few functions placed in one section.
struct Mem(Vec<(u64, &'static [u8])>);

impl Text for Mem {
    fn read(&mut self, addr: u64, len: usize) -> Option<Vec<u8>> {
        self.0.iter().find_map(|(at, code)| {
            let from = usize::try_from(addr.checked_sub(*at)?).ok()?;
            let b = code.get(from..)?;
            Some(b[..len.min(b.len())].to_vec())
        })
    }
}

fn func(addr: u64, code: &[u8]) -> Func {
    Func {
        addr,
        code: code.to_vec(),
    }
}

#[test]
fn debian_reads_go_on_the_function_both_call() {
    let plain = func(0x1000, DEB_READ);
    let target = 0x1000 + 0x1e + 0x1000;
    let ex = func(target - 4 - 0xf84, DEB_READ_EX);
    let dir = Direction {
        plain: &plain,
        ex: Some(&ex),
        programs: READS,
    };
    let planned = plan(&dir, &mut Mem(vec![(target, INNER)]));
    assert_eq!(planned.placement, Placement::Inner);
    assert_eq!(
        planned.probes,
        vec![("ssl_read_ex", target), ("ssl_read_ret", target)]
    );
}

#[test]
fn a_pointer_in_the_fifth_argument_gets_its_own_program() {
    let plain = func(0x1000, W32);
    let target = 0x1000 + 12 + 0x1000;
    let ex = func(target - 9 - 0xf84, W32_EX);
    let dir = Direction {
        plain: &plain,
        ex: Some(&ex),
        programs: READS,
    };
    let planned = plan(&dir, &mut Mem(vec![(target, CET)]));
    assert_eq!(planned.placement, Placement::Inner);
    // Past the internal function's endbr64, on its push.
    assert_eq!(
        planned.probes,
        vec![("ssl_read_ex5", target + 4), ("ssl_read_ret", target + 4)]
    );
}

#[test]
fn cet_entries_are_probed_past_endbr64() {
    let plain = func(0x1000, CET);
    let ex = func(0x2000, CET);
    let dir = Direction {
        plain: &plain,
        ex: Some(&ex),
        programs: READS,
    };
    let planned = plan(&dir, &mut Mem(vec![]));
    assert_eq!(planned.placement, Placement::Exported);
    assert_eq!(
        planned.probes,
        vec![
            ("ssl_read", 0x1004),
            ("ssl_read_ret", 0x1004),
            ("ssl_read_ex", 0x2004),
            ("ssl_read_ret", 0x2004),
        ]
    );
}

#[test]
fn anything_unproven_keeps_the_entries() {
    let stepped = |plain: &Func, ex: Option<&Func>, mem: Vec<(u64, &'static [u8])>| {
        let dir = Direction {
            plain,
            ex,
            programs: READS,
        };
        let planned = plan(&dir, &mut Mem(mem));
        assert_eq!(planned.placement, Placement::Stepped, "{planned:?}");
        assert_eq!(planned.probes[0], ("ssl_read", plain.addr));
    };
    let plain = func(0x1000, DEB_READ);
    let target = 0x1000 + 0x1e + 0x1000;
    // The internal function starts with an instruction that is single-stepped.
    stepped(&plain, None, vec![(target, SUB_INNER)]);
    // Its code cannot be read (outside the section).
    stepped(&plain, None, vec![]);
    // `_ex` calls another function.
    let ex = func(0x1800, DEB_READ_EX);
    stepped(&plain, Some(&ex), vec![(target, INNER)]);
    // A plain function passing no stack slot for the count: not the wrapper shape.
    let no_slot = func(0x1000, DEB_READ_EX);
    stepped(&no_slot, None, vec![(0x1000 + 4 + 0xf84, INNER)]);
}

#[test]
fn an_entry_the_kernel_emulates_keeps_its_probe() {
    // BoringSSL's SSL_read starts with a push: probed there, whatever it calls.
    let boring = func(0x1000, BORING);
    let dir = Direction {
        plain: &boring,
        ex: None,
        programs: READS,
    };
    let planned = plan(&dir, &mut Mem(vec![]));
    assert_eq!(planned.placement, Placement::Exported);
    assert_eq!(
        planned.probes,
        vec![("ssl_read", 0x1000), ("ssl_read_ret", 0x1000)]
    );
}

#[test]
fn entry_only_probes_move_past_what_keeps_their_arguments() {
    // SSL_free: the `je` after the null test still has the ssl in rdi.
    assert_eq!(
        entry_only_site(&func(0x1000, FREE), &[Register::RDI]),
        0x1003
    );
    // A branch back onto the `je` would fire the probe twice per call: the start instead.
    assert_eq!(
        entry_only_site(&func(0x1000, LOOP), &[Register::RDI]),
        0x1000
    );
    // The argument is overwritten before the push.
    assert_eq!(
        entry_only_site(&func(0x1000, CLOBBER), &[Register::RDI]),
        0x1000
    );
    // A push at the start stays there; a function with a return probe needs the stack as
    // the caller left it, which a push at the site itself still is.
    assert_eq!(
        exported_site(&func(0x1000, INNER), &[Register::RDI], true),
        Some(0x1000)
    );
    assert_eq!(
        exported_site(&func(0x1000, FREE), &[Register::RDI], true),
        Some(0x1003)
    );
    assert_eq!(
        exported_site(&func(0x1000, DEB_READ), &[Register::RDI], true),
        None
    );
}

#[test]
fn the_emulated_set_is_exactly_the_measured_one() {
    // push %rbp, push %r13, nop, call, jmp, jcc: emulated.
    for bytes in [
        &[0x55][..],
        &[0x41, 0x55],
        &[0x90],
        &[0xe8, 0, 0, 0, 0],
        &[0xeb, 0],
        &[0x74, 0x05],
        &[0x0f, 0x84, 0, 0, 0, 0],
    ] {
        assert!(emulated(bytes), "{bytes:x?}");
    }
    // endbr64, sub $0x18,%rsp, test %rdi,%rdi, ret, a multi-byte nop: single-stepped.
    for bytes in [
        &[0xf3, 0x0f, 0x1e, 0xfa][..],
        &[0x48, 0x83, 0xec, 0x18],
        &[0x48, 0x85, 0xff],
        &[0xc3],
        &[0x0f, 0x1f, 0x00],
    ] {
        assert!(!emulated(bytes), "{bytes:x?}");
    }
}
