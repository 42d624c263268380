//! Resolves the OpenSSL entry points of an ELF file by reading only its section headers and the
//! dynamic symbol and string tables, once per file: a 100 MB binary with debug info (node with
//! built-in OpenSSL, a freshly built test binary) is never read in full, and the probes are
//! attached at absolute file offsets so aya does not re-read and re-parse the file per probe.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

pub mod sites;

use sites::{Direction, Func, Placement, Programs};

const SHT_DYNSYM: u32 = 11;
/// `st_shndx` of an undefined (imported) symbol.
const SHN_UNDEF: u16 = 0;
/// First reserved section index (`SHN_ABS`, `SHN_COMMON`, ...): not a real section.
const SHN_LORESERVE: u16 = 0xff00;
/// `STT_FUNC`.
const STT_FUNC: u8 = 2;
/// `STT_GNU_IFUNC`.
const STT_GNU_IFUNC: u8 = 10;
/// Size of an `Elf64_Sym`.
const SYM_SIZE: usize = 24;
/// Largest .dynstr / .dynsym read (node's are a few MB).
const MAX_TABLE: u64 = 64 << 20;

/// The symbols the probes hook. `SSL_write` must be defined for a file to count as OpenSSL.
pub const SSL_SYMBOLS: [&str; 6] = [
    "SSL_write",
    "SSL_write_ex",
    "SSL_read",
    "SSL_read_ex",
    "SSL_free",
    "SSL_ctrl",
];

/// The programs of writes and reads (observer-ebpf).
const WRITES: Programs = Programs {
    plain: "ssl_write",
    ex: "ssl_write_ex",
    ex5: "ssl_write_ex5",
    ret: "ssl_write_ret",
};
const READS: Programs = Programs {
    plain: "ssl_read",
    ex: "ssl_read_ex",
    ex5: "ssl_read_ex5",
    ret: "ssl_read_ret",
};

/// Whether probes go on instructions the kernel emulates (`probe_sites = "emulated"`, the
/// default) or on the exported functions' entries (`"entry"`). Set once at start.
static EMULATED_SITES: AtomicBool = AtomicBool::new(true);

/// Sets where probes go (`probe_sites`); before the first file is resolved.
pub fn set_emulated_sites(on: bool) {
    EMULATED_SITES.store(on, Ordering::Relaxed);
}

/// Whether probes go on instructions the kernel emulates (see [`set_emulated_sites`]).
pub fn emulated_sites() -> bool {
    EMULATED_SITES.load(Ordering::Relaxed)
}

/// The OpenSSL functions a file defines (not merely imports) and where its probes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SslSymbols {
    /// (name from [`SSL_SYMBOLS`], file offset) for each defined one.
    pub offsets: Vec<(&'static str, u64)>,
    /// (program, file offset) of every probe, `SSL_write`'s first (`sites`).
    pub probes: Vec<(&'static str, u64)>,
    /// How writes are probed.
    pub writes: Placement,
    /// How reads are probed.
    pub reads: Placement,
}

impl SslSymbols {
    /// File offset of `name`, if the file defines it.
    #[cfg(test)]
    pub fn offset(&self, name: &str) -> Option<u64> {
        self.offsets
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, o)| *o)
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Whether the (64-bit little-endian) ELF file defines `SSL_write` in its dynamic symbols.
/// Anything unreadable or not ELF64 is "no".
#[cfg(test)]
pub fn exports_ssl_write(path: &Path) -> bool {
    ssl_symbols(path).is_some()
}

/// The OpenSSL functions `path` defines, with their file offsets; `None` when it does not define
/// `SSL_write` (not OpenSSL, only importing it, unreadable, not ELF64 little-endian).
pub fn ssl_symbols(path: &Path) -> Option<SslSymbols> {
    let mut f = File::open(path).ok()?;
    resolve(&mut f).ok().flatten()
}

/// The GNU build id of an ELF file (`NT_GNU_BUILD_ID` in a `PT_NOTE` segment), reading only the
/// header, the program headers and the notes.
pub fn build_id(file: &File) -> Option<Vec<u8>> {
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    let data = object::ReadCache::new(file);
    let header = object::elf::FileHeader64::<object::Endianness>::parse(&data).ok()?;
    let endian = header.endian().ok()?;
    for segment in header.program_headers(endian, &data).ok()? {
        let Ok(Some(mut notes)) = segment.notes(endian, &data) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == object::elf::ELF_NOTE_GNU
                && note.n_type(endian) == object::elf::NT_GNU_BUILD_ID
            {
                return Some(note.desc().to_vec());
            }
        }
    }
    None
}

/// Bytes compared at each probe offset before a cached resolution is reused.
const CODE_CHECK: usize = 16;
/// Most build ids remembered (the cache is cleared when full).
const MAX_CACHED_BUILDS: usize = 1024;

/// A resolution remembered under a build id.
struct CachedBuild {
    size: u64,
    symbols: Option<SslSymbols>,
    /// The first bytes of each resolved function, as found in the file first resolved.
    code: Vec<(u64, [u8; CODE_CHECK])>,
}

/// Resolutions by GNU build id: a container's or chroot's own copy of a library or runtime (a
/// new inode, the same build) reuses the host's resolution instead of reading a node binary's
/// megabytes of symbol tables again while the process it belongs to starts.
static BY_BUILD: std::sync::Mutex<Option<std::collections::HashMap<Vec<u8>, CachedBuild>>> =
    std::sync::Mutex::new(None);

/// [`ssl_symbols`] for an open file (`path` reaches it, e.g. `/proc/self/fd/N`), reusing the
/// resolution of an earlier file with the same build id — only when the size matches and the
/// first bytes at every probe offset are the same, so a binary rewritten after linking (patchelf
/// moves sections but keeps the build id) is resolved afresh, never probed at a wrong offset.
pub fn ssl_symbols_of(file: &File, path: &Path) -> Option<SslSymbols> {
    lookup(file, path).0
}

/// [`ssl_symbols_of`], and whether the cache answered.
fn lookup(file: &File, path: &Path) -> (Option<SslSymbols>, bool) {
    let Ok(size) = file.metadata().map(|m| m.len()) else {
        return (None, false);
    };
    let Some(id) = build_id(file) else {
        return (ssl_symbols(path), false);
    };
    let mut cache = BY_BUILD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cache = cache.get_or_insert_with(Default::default);
    if let Some(c) = cache.get(&id)
        && c.size == size
        && c.code
            .iter()
            .all(|(off, bytes)| code_at(file, *off).as_ref() == Some(bytes))
    {
        return (c.symbols.clone(), true);
    }
    let symbols = ssl_symbols(path);
    let code = symbols
        .iter()
        .flat_map(|s| s.offsets.iter().chain(&s.probes))
        .filter_map(|(_, off)| Some((*off, code_at(file, *off)?)))
        .collect();
    if cache.len() >= MAX_CACHED_BUILDS {
        cache.clear();
    }
    cache.insert(
        id,
        CachedBuild {
            size,
            symbols: symbols.clone(),
            code,
        },
    );
    (symbols, false)
}

/// The [`CODE_CHECK`] bytes of `file` at `off`.
fn code_at(file: &File, off: u64) -> Option<[u8; CODE_CHECK]> {
    use std::os::unix::fs::FileExt as _;
    let mut b = [0u8; CODE_CHECK];
    file.read_exact_at(&mut b, off).ok()?;
    Some(b)
}

fn read_at(f: &mut File, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    if len > MAX_TABLE {
        return Err(std::io::Error::other("table too large"));
    }
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut buf)?;
    Ok(buf)
}

fn resolve(f: &mut File) -> std::io::Result<Option<SslSymbols>> {
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh)?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Ok(None);
    }
    let shoff = u64_at(&eh, 0x28);
    let shentsize = usize::from(u16_at(&eh, 0x3a));
    let shnum = usize::from(u16_at(&eh, 0x3c));
    if shentsize < 64 || shnum == 0 || shnum > 65_535 {
        return Ok(None);
    }
    let sh = read_at(f, shoff, (shentsize * shnum) as u64)?;
    let section = |i: usize| &sh[i * shentsize..(i + 1) * shentsize];
    let Some(dynsym) = (0..shnum).find(|&i| u32_at(section(i), 4) == SHT_DYNSYM) else {
        return Ok(None);
    };
    let sym_hdr = section(dynsym);
    let link = u32_at(sym_hdr, 0x28) as usize;
    if link >= shnum {
        return Ok(None);
    }
    let str_hdr = section(link);
    let names = read_at(f, u64_at(str_hdr, 0x18), u64_at(str_hdr, 0x20))?;
    let syms = read_at(f, u64_at(sym_hdr, 0x18), u64_at(sym_hdr, 0x20))?;
    let mut found: Vec<Found> = Vec::new();
    for sym in syms.chunks_exact(SYM_SIZE) {
        let name_off = u32_at(sym, 0) as usize;
        let kind = sym[4] & 0xf;
        let shndx = u16_at(sym, 6);
        if shndx == SHN_UNDEF
            || shndx >= SHN_LORESERVE
            || !(kind == STT_FUNC || kind == STT_GNU_IFUNC)
        {
            continue;
        }
        let Some(name) = names
            .get(name_off..)
            .and_then(|n| n.split(|&b| b == 0).next())
        else {
            continue;
        };
        let Some(&wanted) = SSL_SYMBOLS.iter().find(|s| s.as_bytes() == name) else {
            continue;
        };
        if found.iter().any(|f| f.name == wanted) || usize::from(shndx) >= shnum {
            continue;
        }
        let sec = section(usize::from(shndx));
        let section = Section {
            addr: u64_at(sec, 0x10),
            offset: u64_at(sec, 0x18),
            size: u64_at(sec, 0x20),
        };
        let addr = u64_at(sym, 8);
        if section.file_offset(addr).is_none() {
            continue;
        }
        found.push(Found {
            name: wanted,
            addr,
            size: u64_at(sym, 16),
            section,
        });
    }
    let Some(write) = found.iter().find(|f| f.name == "SSL_write") else {
        return Ok(None);
    };
    let mut text = SectionText {
        file: f,
        section: write.section,
    };
    Ok(Some(place(&found, &mut text)))
}

/// A section's placement in memory and in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Section {
    addr: u64,
    offset: u64,
    size: u64,
}

impl Section {
    /// Same translation as aya: address - section address + section file offset.
    fn file_offset(&self, addr: u64) -> Option<u64> {
        let d = addr.checked_sub(self.addr)?;
        (d < self.size)
            .then(|| self.offset.checked_add(d))
            .flatten()
    }
}

/// A wanted symbol the file defines.
struct Found {
    name: &'static str,
    addr: u64,
    size: u64,
    section: Section,
}

/// Code of one section of an open file, by virtual address.
struct SectionText<'a> {
    file: &'a mut File,
    section: Section,
}

impl sites::Text for SectionText<'_> {
    fn read(&mut self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let off = self.section.file_offset(addr)?;
        let room = self.section.size - (addr - self.section.addr);
        let len = u64::try_from(len).ok()?.min(room);
        read_at(self.file, off, len).ok()
    }
}

/// Where the probes of the functions `found` go (`SSL_write` among them).
fn place(found: &[Found], text: &mut SectionText<'_>) -> SslSymbols {
    let emulated = emulated_sites();
    let offsets: Vec<(&'static str, u64)> = found
        .iter()
        .filter_map(|f| Some((f.name, f.section.file_offset(f.addr)?)))
        .collect();
    let mut code = |name: &str| -> Option<Func> {
        let f = found.iter().find(|f| f.name == name)?;
        let len = if emulated {
            f.size.clamp(1, sites::MAX_BODY)
        } else {
            1
        };
        // Unreadable code (another section) still gets its probes, on the entry.
        let code = sites::Text::read(text, f.addr, usize::try_from(len).ok()?).unwrap_or_default();
        Some(Func { addr: f.addr, code })
    };
    let funcs: Vec<(&str, Option<Func>)> = SSL_SYMBOLS.iter().map(|n| (*n, code(n))).collect();
    let func = |name: &str| {
        funcs
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, f)| f.as_ref())
    };
    let mut probes = Vec::new();
    let mut placements = [Placement::Stepped; 2];
    for (i, (plain, ex, programs)) in [
        ("SSL_write", "SSL_write_ex", WRITES),
        ("SSL_read", "SSL_read_ex", READS),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(plain) = func(plain) else { continue };
        let dir = Direction {
            plain,
            ex: func(ex),
            programs,
        };
        let planned = if emulated {
            sites::plan(&dir, text)
        } else {
            sites::entries(&dir)
        };
        placements[i] = planned.placement;
        probes.extend(planned.probes);
    }
    for (name, program, args) in [
        ("SSL_free", "ssl_free", &[iced_x86::Register::RDI][..]),
        (
            "SSL_ctrl",
            "ssl_ctrl",
            &[
                iced_x86::Register::RDI,
                iced_x86::Register::RSI,
                iced_x86::Register::RCX,
            ],
        ),
    ] {
        if let Some(f) = func(name) {
            let at = if emulated {
                sites::entry_only_site(f, args)
            } else {
                f.addr
            };
            probes.push((program, at));
        }
    }
    let to_file = |addr: u64| {
        std::iter::once(text.section)
            .chain(found.iter().map(|f| f.section))
            .find_map(|s| s.file_offset(addr))
    };
    SslSymbols {
        offsets,
        probes: probes
            .into_iter()
            .filter_map(|(p, addr)| Some((p, to_file(addr)?)))
            .collect(),
        writes: placements[0],
        reads: placements[1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libssl_exports_and_others_do_not() {
        let libssl = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        if libssl.exists() {
            assert!(exports_ssl_write(libssl));
        }
        assert!(!exports_ssl_write(Path::new("/bin/sh")));
        assert!(!exports_ssl_write(Path::new("/etc/hostname")));
        assert!(!exports_ssl_write(Path::new("/nonexistent")));
    }

    /// The offsets match where the dynamic loader actually placed the functions: dlsym's address
    /// minus the start of the mapping that holds it, plus that mapping's file offset.
    #[test]
    fn offsets_match_the_loaded_library() {
        let path = "/usr/lib/x86_64-linux-gnu/libssl.so.3";
        let Some(syms) = ssl_symbols(Path::new(path)) else {
            assert!(
                !Path::new(path).exists(),
                "{path} exists but was not resolved"
            );
            return;
        };
        assert_eq!(syms.offsets.len(), SSL_SYMBOLS.len(), "{syms:?}");
        let lib = c"/usr/lib/x86_64-linux-gnu/libssl.so.3";
        // SAFETY: dlopen/dlsym with NUL-terminated strings; the handle is never closed.
        let handle = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW) };
        assert!(!handle.is_null(), "dlopen libssl");
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        for (name, off) in &syms.offsets {
            let cname = std::ffi::CString::new(*name).expect("name");
            // SAFETY: as above.
            let addr = unsafe { libc::dlsym(handle, cname.as_ptr()) } as u64;
            assert_ne!(addr, 0, "dlsym {name}");
            let file_off = maps
                .lines()
                .filter(|l| l.ends_with("libssl.so.3"))
                .find_map(|l| {
                    let mut p = l.split_whitespace();
                    let (lo, hi) = p.next()?.split_once('-')?;
                    let (lo, hi) = (
                        u64::from_str_radix(lo, 16).ok()?,
                        u64::from_str_radix(hi, 16).ok()?,
                    );
                    let map_off = u64::from_str_radix(p.nth(1)?, 16).ok()?;
                    (lo..hi).contains(&addr).then(|| addr - lo + map_off)
                })
                .expect("address inside a libssl mapping");
            assert_eq!(*off, file_off, "{name}");
        }
    }

    /// The host's libssl gets every probe on an instruction the kernel emulates: Debian's
    /// `SSL_read`/`SSL_write` start with `sub`, so reads and writes go on the internal functions
    /// both exported pairs call; `SSL_free` moves to the `je` after its null test.
    #[test]
    fn the_host_libssl_is_probed_on_emulated_instructions_only() {
        use std::os::unix::fs::FileExt as _;
        let path = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        let syms = ssl_symbols(path).expect("the host's libssl resolves");
        assert_ne!(syms.writes, Placement::Stepped, "{syms:?}");
        assert_ne!(syms.reads, Placement::Stepped, "{syms:?}");
        let file = File::open(path).expect("open");
        let programs: Vec<&str> = syms.probes.iter().map(|(p, _)| *p).collect();
        for (program, off) in &syms.probes {
            let mut b = [0u8; 16];
            file.read_exact_at(&mut b, *off).expect("code");
            let len = iced_x86::Decoder::new(64, &b, iced_x86::DecoderOptions::NONE)
                .decode()
                .len();
            assert!(sites::emulated(&b[..len]), "{program} at {off:#x}: {b:x?}");
        }
        for p in ["ssl_write_ret", "ssl_read_ret", "ssl_free", "ssl_ctrl"] {
            assert!(programs.contains(&p), "{programs:?}");
        }
        assert!(programs[0].starts_with("ssl_write"), "{programs:?}");
        // On the inner function, a read is probed once per call: not on the exported ones too.
        let rets = programs.iter().filter(|p| **p == "ssl_read_ret").count();
        let want = if syms.reads == Placement::Inner { 1 } else { 2 };
        assert_eq!(rets, want, "{syms:?}");
    }

    /// A copy of the host's libssl (a new inode, the same build) reuses the resolution; a copy
    /// whose code differs at a probe offset (a binary rewritten after linking) does not.
    #[test]
    fn copies_of_a_build_reuse_its_resolution_only_when_the_code_matches() {
        let host = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |p: &Path| File::open(p).expect("open");
        let id = build_id(&open(host)).expect("libssl has a build id");
        assert_eq!(id.len(), 20, "sha1 build id");
        let (first, _) = lookup(&open(host), host);
        let first = first.expect("libssl resolves");
        let copy = dir.path().join("libssl.so.3");
        std::fs::copy(host, &copy).expect("copy");
        let (again, hit) = lookup(&open(&copy), &copy);
        assert!(hit, "an identical copy is answered from the cache");
        assert_eq!(again.as_ref(), Some(&first));
        let patched = dir.path().join("patched.so.3");
        let mut bytes = std::fs::read(host).expect("read");
        let off = usize::try_from(first.offset("SSL_write").expect("SSL_write")).expect("usize");
        bytes[off] ^= 0xff;
        std::fs::write(&patched, bytes).expect("write");
        let (fresh, hit) = lookup(&open(&patched), &patched);
        assert!(!hit, "different code at a probe offset is resolved afresh");
        assert_eq!(fresh.as_ref(), Some(&first), "same symbol tables");
    }
}
