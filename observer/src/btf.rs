//! Member offsets of a kernel struct from the running kernel's BTF (`/sys/kernel/btf/vmlinux`),
//! so the egress program reads `struct tcp_sock`'s byte counters at the right place on any kernel
//! build. aya parses BTF but does not expose struct members; this walks the type section (the
//! format of the kernel's `Documentation/bpf/btf.rst`) and needs nothing else.

use anyhow::{Context as _, Result, bail};

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One type's header and where its trailing data starts.
struct Type {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// Offset of the trailing data in the type section.
    data: usize,
    /// `size` or `type` (the third word).
    size_or_type: u32,
}

/// A parsed BTF blob: types by id (1-based) and the string section.
pub struct Btf<'a> {
    types: Vec<Type>,
    type_sec: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    let s = b.get(off..off + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Bytes of data after a type's 12-byte header, by kind.
fn trailing(kind: u32, vlen: usize) -> Result<usize> {
    Ok(match kind {
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        2 | 7..=12 | 16 | 18 => 0,
        // INT, VAR, DECL_TAG
        1 | 14 | 17 => 4,
        // ARRAY
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO
        6 | 13 => 8 * vlen,
        k => bail!("BTF kind {k} unknown"),
    })
}

impl<'a> Btf<'a> {
    /// Parses a little-endian BTF blob.
    pub fn parse(b: &'a [u8]) -> Result<Btf<'a>> {
        let magic = b.get(..2).context("BTF empty")?;
        if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
            bail!("not little-endian BTF");
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let type_sec = b
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .context("BTF type section out of bounds")?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?;
        let mut types = Vec::new();
        let mut off = 0;
        while off < type_sec.len() {
            let info = u32_at(type_sec, off + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            types.push(Type {
                name_off: u32_at(type_sec, off)?,
                kind,
                vlen,
                kind_flag: info >> 31 != 0,
                data: off + 12,
                size_or_type: u32_at(type_sec, off + 8)?,
            });
            off += 12 + trailing(kind, vlen)?;
        }
        Ok(Btf {
            types,
            type_sec,
            strings,
        })
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// The byte offset of `member` in struct `name`, searching anonymous struct/union members
    /// too; `None` when absent or a bitfield.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let ty = self
            .types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == name)?;
        self.find_in(ty, member, 0)
    }

    fn find_in(&self, ty: &Type, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for i in 0..ty.vlen {
            let at = ty.data + 12 * i;
            let m_name = u32_at(self.type_sec, at).ok()?;
            let m_type = u32_at(self.type_sec, at + 4).ok()?;
            let raw = u32_at(self.type_sec, at + 8).ok()?;
            let bits = if ty.kind_flag { raw & 0x00ff_ffff } else { raw };
            if m_name != 0 && self.name(m_name) == member {
                return (bits % 8 == 0).then_some(bits / 8);
            }
            if m_name == 0 {
                let inner = self.resolve(m_type)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(o) = self.find_in(inner, member, depth + 1)
                {
                    return Some(bits / 8 + o);
                }
            }
        }
        None
    }

    /// Type `id`, through typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..16 {
            let t = self.types.get((id as usize).checked_sub(1)?)?;
            match t.kind {
                8..=11 | 18 => id = t.size_or_type,
                _ => return Some(t),
            }
        }
        None
    }
}

/// Offsets of `tcp_sock.bytes_acked` and `tcp_sock.bytes_received` in the running kernel.
///
/// # Errors
/// When the kernel has no BTF or the struct lacks a field.
pub fn tcp_byte_offsets() -> Result<(u32, u32)> {
    let raw =
        std::fs::read("/sys/kernel/btf/vmlinux").context("reading /sys/kernel/btf/vmlinux")?;
    let btf = Btf::parse(&raw)?;
    let acked = btf
        .member_offset("tcp_sock", "bytes_acked")
        .context("struct tcp_sock has no bytes_acked")?;
    let received = btf
        .member_offset("tcp_sock", "bytes_received")
        .context("struct tcp_sock has no bytes_received")?;
    Ok((acked, received))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tcp_sock_counters_in_this_kernel() {
        let (acked, received) = tcp_byte_offsets().expect("BTF of the running kernel");
        // Both are u64 fields deep inside tcp_sock (after struct inet_connection_sock).
        assert!(acked > 1000 && received > 1000, "{acked} {received}");
        assert_eq!(acked % 8, 0);
        assert_eq!(received % 8, 0);
        assert_ne!(acked, received);
    }

    #[test]
    fn refuses_garbage() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0u8; 24]).is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        hdr.extend_from_slice(&[0, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        // A 12-byte type section that points past the end.
        assert!(Btf::parse(&hdr).is_err());
    }
}
