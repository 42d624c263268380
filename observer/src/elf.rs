//! A cheap "does this file export SSL_write?" check that reads only the ELF headers and the
//! dynamic string table, so a 100 MB freshly built binary with debug info is not parsed in full
//! (aya's symbol resolution reads the whole file, once per probe) just to learn it is not OpenSSL.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

const SHT_DYNSYM: u32 = 11;
/// Largest .dynstr read (node's is ~1 MB).
const MAX_DYNSTR: u64 = 64 << 20;

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

/// Whether the (64-bit little-endian) ELF file's dynamic symbol names include `SSL_write`.
/// Anything unreadable or not ELF64 is "no".
pub fn exports_ssl_write(path: &Path) -> bool {
    check(path).unwrap_or(false)
}

fn check(path: &Path) -> std::io::Result<bool> {
    let mut f = File::open(path)?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh)?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Ok(false);
    }
    let shoff = u64_at(&eh, 0x28);
    let shentsize = usize::from(u16_at(&eh, 0x3a));
    let shnum = usize::from(u16_at(&eh, 0x3c));
    if shentsize < 64 || shnum == 0 || shnum > 4096 {
        return Ok(false);
    }
    let mut sh = vec![0u8; shentsize * shnum];
    f.seek(SeekFrom::Start(shoff))?;
    f.read_exact(&mut sh)?;
    let section = |i: usize| &sh[i * shentsize..(i + 1) * shentsize];
    for i in 0..shnum {
        let s = section(i);
        if u32_at(s, 4) != SHT_DYNSYM {
            continue;
        }
        let link = u32_at(s, 0x28) as usize;
        if link >= shnum {
            return Ok(false);
        }
        let strtab = section(link);
        let (off, size) = (u64_at(strtab, 0x18), u64_at(strtab, 0x20));
        if size > MAX_DYNSTR {
            return Ok(false);
        }
        let mut names = vec![0u8; usize::try_from(size).unwrap_or(0)];
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(&mut names)?;
        return Ok(names.split(|&b| b == 0).any(|n| n == b"SSL_write"));
    }
    Ok(false)
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
}
