//! Go programs: their TLS is Go's own `crypto/tls`, not OpenSSL, so the observer probes
//! `crypto/tls.(*Conn).Write` (after its stack check: the buffer is in registers there) and
//! `crypto/tls.(*Conn).Read` (after its stack check, and at its copy of the plaintext out, or
//! at every `RET`, where `n` is returned),
//! plus `(*Conn).Close` to end a connection. This module finds those sites in an ELF file:
//! Go build info for the version, `.symtab` for the functions, or `.gopclntab` when the binary is
//! stripped, and iced-x86 for the body starts and `RET`s. Pure: bytes in, file offsets out.
//!
//! Go's register ABI (Go 1.17+, amd64), checked with `go tool objdump` on a Go 1.19 build (see
//! docs/observer.md): receiver in RAX, slice pointer in RBX, length in RCX, the result `n` in RAX
//! at return, the current goroutine (`g`) in R14 throughout.

pub mod buildinfo;
pub mod code;
pub mod pclntab;

use object::{Architecture, Object as _, ObjectSection as _, ReadRef};

/// `crypto/tls.(*Conn).Write`: the plaintext a Go program sends.
pub const WRITE: &str = "crypto/tls.(*Conn).Write";
/// `crypto/tls.(*Conn).Read`: the plaintext it receives.
pub const READ: &str = "crypto/tls.(*Conn).Read";
/// `crypto/tls.(*Conn).Close`: the connection ends.
pub const CLOSE: &str = "crypto/tls.(*Conn).Close";
/// `runtime.memmove`: `(*Conn).Read` calls it once, to copy the plaintext into the caller's
/// buffer (its inlined `bytes.(*Reader).Read`).
pub const MEMMOVE: &str = "runtime.memmove";
/// The oldest Go with the register ABI on amd64 (arguments in registers, `g` in R14).
pub const MIN_MINOR: u32 = 17;

/// Probe sites of a Go binary's TLS, as file offsets (what uprobes attach at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoTls {
    /// Go version from the build info (`go1.19.8`), or `unknown`.
    pub version: String,
    /// `(*Conn).Write`: its stack check's `JBE` when `at_check`, else past its stack check.
    pub write: u64,
    /// `(*Conn).Read`, placed as `write`.
    pub read: u64,
    /// Every `RET` of `(*Conn).Read`.
    pub read_rets: Vec<u64>,
    /// The one `CALL runtime.memmove` in `(*Conn).Read` (its copy of the plaintext out, with
    /// the source in RBX and the count, the `n` it returns, in RCX), when it has exactly one.
    /// A probe there replaces those on the `RET`s: the kernel emulates a call but single-steps
    /// a `RET` (~4–13 µs a hit on the test VMs against ~0.6 µs, docs/benchmarks.md).
    pub read_copy: Option<u64>,
    /// `(*Conn).Close`, placed as `write`, when the binary has it.
    pub close: Option<u64>,
    /// `write`, `read` and `close` are the stack checks' `JBE`s (all three have one): the
    /// programs skip a hit whose branch to `morestack` is taken (attach cookie
    /// `observer_common::GO_AT_CHECK`). Else they are the first instructions past the checks.
    pub at_check: bool,
    /// The functions came from `.gopclntab` (a stripped binary), not `.symtab`.
    pub stripped: bool,
}

/// What a file is, as far as Go TLS goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GoBinary {
    /// Not a Go binary (no Go build info, no Go function table), or not ELF.
    NotGo,
    /// A Go binary the probes cannot read: older than Go 1.17 (stack ABI) or not amd64.
    Unsupported {
        /// Go version, or `unknown`.
        version: String,
        /// Why.
        reason: &'static str,
    },
    /// A Go binary without `crypto/tls` (or whose functions could not be located).
    NoTls {
        /// Go version.
        version: String,
    },
    /// A Go binary with probe sites.
    Tls(GoTls),
}

/// Why a Go binary's TLS functions could not be located.
#[derive(Debug, thiserror::Error)]
pub enum GoError {
    /// The ELF file could not be read.
    #[error("reading ELF: {0}")]
    Elf(#[from] object::Error),
    /// Its function table is malformed.
    #[error(transparent)]
    Pclntab(#[from] pclntab::PclntabError),
    /// A function's code did not decode.
    #[error("{func}: {source}")]
    Code {
        /// The function.
        func: &'static str,
        /// What went wrong.
        source: code::CodeError,
    },
    /// An address is outside every section with file bytes.
    #[error("{0:#x} is not in a loaded section")]
    Address(u64),
}

/// Inspects an ELF file (a `&[u8]` or an `&object::ReadCache<&File>`, which reads only the parts
/// it needs): whether it is a Go binary and where its TLS probes go.
///
/// # Errors
/// When the file is a Go binary with `crypto/tls` whose tables or code cannot be read.
pub fn inspect<'d, R: ReadRef<'d>>(data: R) -> Result<GoBinary, GoError> {
    let Ok(file) = object::File::parse(data) else {
        return Ok(GoBinary::NotGo);
    };
    // Elf64 only: the Go probes are amd64, and `.symtab` is read as `Elf64_Sym`.
    if !matches!(file, object::File::Elf64(_)) {
        return Ok(GoBinary::NotGo);
    }
    let buildinfo = file.section_by_name(".go.buildinfo");
    // PIE builds put it in RELRO under another name.
    let pcln = file
        .section_by_name(".gopclntab")
        .or_else(|| file.section_by_name(".data.rel.ro.gopclntab"));
    if buildinfo.is_none() && pcln.is_none() {
        return Ok(GoBinary::NotGo);
    }
    let version = buildinfo
        .and_then(|s| version(&file, data, s.data().ok()?))
        .unwrap_or_else(|| "unknown".to_owned());
    if file.architecture() != Architecture::X86_64 {
        return Ok(GoBinary::Unsupported {
            version,
            reason: "not amd64",
        });
    }
    if let Some((1, minor)) = buildinfo::major_minor(&version)
        && minor < MIN_MINOR
    {
        return Ok(GoBinary::Unsupported {
            version,
            reason: "older than Go 1.17 (stack ABI)",
        });
    }
    // (address, size) of Write, Read, Close, memmove.
    let mut funcs: [Option<(u64, u64)>; 4] = [None; 4];
    let names = [WRITE, READ, CLOSE, MEMMOVE];
    symtab_lookup(&file, &names, &mut funcs)?;
    let mut stripped = false;
    if (funcs[0].is_none() || funcs[1].is_none())
        && let Some(pcln) = &pcln
    {
        let text = file.section_by_name(".text").map_or(0, |s| s.address());
        let data = pcln.data()?;
        let table = match pclntab::FuncTable::parse(data, text) {
            Ok(t) => t,
            // Go 1.2 - 1.15 tables: no build info said so, but the table does.
            Err(pclntab::PclntabError::Magic(0xffff_fffb)) => {
                return Ok(GoBinary::Unsupported {
                    version,
                    reason: "older than Go 1.16 (stack ABI)",
                });
            }
            Err(e) => return Err(e.into()),
        };
        for (i, f) in table.find(&names)?.into_iter().enumerate() {
            if let Some(f) = f {
                funcs[i] = Some((f.entry, f.end - f.entry));
            }
        }
        stripped = true;
    }
    let (Some(write), Some(read)) = (funcs[0], funcs[1]) else {
        return Ok(GoBinary::NoTls { version });
    };
    let memmove = funcs[3].map(|(addr, _)| addr);
    let write_sites = sites(&file, data, WRITE, write, None)?;
    let read_sites = sites(&file, data, READ, read, memmove)?;
    let close_sites = match funcs[2] {
        Some(f) => Some(sites(&file, data, CLOSE, f, None)?),
        None => None,
    };
    // On the checks' JBEs (emulated by the kernel) only when every function has one: a body
    // site past no check is the entry, where the flags are the caller's.
    let at_check = [Some(&write_sites), Some(&read_sites), close_sites.as_ref()]
        .into_iter()
        .flatten()
        .all(|s| s.check.is_some());
    let site = |s: &code::FuncSites| {
        file_offset(
            &file,
            if at_check {
                s.check.unwrap_or(s.body)
            } else {
                s.body
            },
        )
    };
    let close = match &close_sites {
        Some(s) => Some(site(s)?),
        None => None,
    };
    let read_copy = match read_sites.calls.as_slice() {
        [one] => Some(file_offset(&file, *one)?),
        _ => None,
    };
    Ok(GoBinary::Tls(GoTls {
        version,
        write: site(&write_sites)?,
        read: site(&read_sites)?,
        read_rets: read_sites
            .rets
            .iter()
            .map(|&a| file_offset(&file, a))
            .collect::<Result<_, _>>()?,
        read_copy,
        close,
        at_check,
        stripped,
    }))
}

/// Finds `names` in `.symtab` (Elf64) with two reads: the table and its strings. object's
/// symbol iterator reads each name separately, which through a `ReadCache` is a read per symbol
/// (~50 ms for a small Go binary).
fn symtab_lookup<'d, R: ReadRef<'d>>(
    file: &object::File<'d, R>,
    names: &[&str],
    funcs: &mut [Option<(u64, u64)>],
) -> Result<(), GoError> {
    let (Some(symtab), Some(strtab)) = (
        file.section_by_name(".symtab"),
        file.section_by_name(".strtab"),
    ) else {
        return Ok(());
    };
    let (syms, strs) = (symtab.data()?, strtab.data()?);
    for sym in syms.chunks_exact(24) {
        let name_off = u32::from_le_bytes([sym[0], sym[1], sym[2], sym[3]]) as usize;
        let Some(rest) = strs.get(name_off..) else {
            continue;
        };
        let name = rest.split(|&b| b == 0).next().unwrap_or_default();
        if let Some(i) = names.iter().position(|n| n.as_bytes() == name) {
            let word = |at: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&sym[at..at + 8]);
                u64::from_le_bytes(b)
            };
            let (addr, size) = (word(8), word(16));
            if size > 0 {
                funcs[i] = Some((addr, size));
            }
        }
    }
    Ok(())
}

/// The Go version in a `.go.buildinfo` section, following the pointer of pre-1.18 binaries.
fn version<'d, R: ReadRef<'d>>(
    file: &object::File<'d, R>,
    data: R,
    section: &[u8],
) -> Option<String> {
    match buildinfo::parse(section).ok()? {
        buildinfo::Version::Inline(v) => Some(v),
        buildinfo::Version::At {
            addr,
            ptr_size,
            big_endian,
        } => {
            let header = data_at(file, data, addr, 2 * u64::from(ptr_size))?;
            let (ptr, len) = buildinfo::string_header(header, ptr_size, big_endian).ok()?;
            buildinfo::version_string(data_at(file, data, ptr, len)?).ok()
        }
    }
}

/// `len` bytes at virtual address `addr`, read from the file alone (a section's `data_range`
/// would read the whole section first: megabytes of `.text` for a few hundred bytes).
fn data_at<'d, R: ReadRef<'d>>(
    file: &object::File<'d, R>,
    data: R,
    addr: u64,
    len: u64,
) -> Option<&'d [u8]> {
    let offset = file_offset(file, addr).ok()?;
    let last = file_offset(file, addr.checked_add(len.checked_sub(1)?)?).ok()?;
    (last - offset == len - 1).then_some(())?;
    data.read_bytes_at(offset, len).ok()
}

fn sites<'d, R: ReadRef<'d>>(
    file: &object::File<'d, R>,
    data: R,
    func: &'static str,
    (addr, size): (u64, u64),
    callee: Option<u64>,
) -> Result<code::FuncSites, GoError> {
    let size_ok = usize::try_from(size)
        .ok()
        .filter(|s| *s <= code::MAX_FUNC_BYTES);
    let Some(size) = size_ok else {
        return Err(GoError::Code {
            func,
            source: code::CodeError::Size(usize::MAX),
        });
    };
    let bytes = data_at(file, data, addr, size as u64).ok_or(GoError::Address(addr))?;
    code::sites(bytes, addr, callee).map_err(|source| GoError::Code { func, source })
}

/// The file offset of virtual address `addr` (what a uprobe attaches at).
fn file_offset<'d, R: ReadRef<'d>>(file: &object::File<'d, R>, addr: u64) -> Result<u64, GoError> {
    file.sections()
        .find_map(|s| {
            let (off, len) = s.file_range()?;
            let start = s.address();
            (addr >= start && addr - start < len).then(|| off.checked_add(addr - start))?
        })
        .ok_or(GoError::Address(addr))
}

#[cfg(test)]
mod tests;
