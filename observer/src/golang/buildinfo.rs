//! Go's build information (`.go.buildinfo`, written by the linker since Go 1.13): the Go version
//! a binary was built with. Go 1.18+ stores the strings inline; older binaries point at string
//! headers in the data segment, which the caller resolves with [`string_header`].

/// The 14-byte magic at the start of the section.
pub const MAGIC: &[u8; 14] = b"\xff Go buildinf:";
/// Flags bit: the binary is big-endian.
const FLAG_BIG_ENDIAN: u8 = 1;
/// Flags bit: the version and module strings follow the header inline (Go 1.18+).
const FLAG_INLINE: u8 = 2;
/// Longest version string accepted (`go1.22.3`, `devel go1.23-abcdef ...`).
const MAX_VERSION: u64 = 128;

/// Where a binary's Go version is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// The version string itself (Go 1.18+).
    Inline(String),
    /// The address of the version's string header (`{ptr, len}`), Go 1.13 - 1.17.
    At {
        /// Virtual address of the string header.
        addr: u64,
        /// Pointer size in bytes (4 or 8).
        ptr_size: u8,
        /// Byte order of the binary.
        big_endian: bool,
    },
}

/// Why a `.go.buildinfo` section was not understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildInfoError {
    /// The section does not start with [`MAGIC`].
    #[error("no Go build info magic")]
    Magic,
    /// The section ends before its header or strings do.
    #[error("Go build info truncated")]
    Truncated,
    /// A pointer size other than 4 or 8, or a version string that is not plausible.
    #[error("Go build info malformed")]
    Malformed,
}

/// Reads the header of a `.go.buildinfo` section.
///
/// # Errors
/// When the bytes are not Go build info.
pub fn parse(data: &[u8]) -> Result<Version, BuildInfoError> {
    if data.len() < 16 || &data[..14] != MAGIC {
        return Err(BuildInfoError::Magic);
    }
    let ptr_size = data[14];
    let flags = data[15];
    if flags & FLAG_INLINE != 0 {
        let rest = data.get(32..).ok_or(BuildInfoError::Truncated)?;
        let (len, used) = uvarint(rest).ok_or(BuildInfoError::Truncated)?;
        if len == 0 || len > MAX_VERSION {
            return Err(BuildInfoError::Malformed);
        }
        let bytes = rest
            .get(used..used + len as usize)
            .ok_or(BuildInfoError::Truncated)?;
        return version_string(bytes).map(Version::Inline);
    }
    let big_endian = flags & FLAG_BIG_ENDIAN != 0;
    let addr = uint(
        data.get(16..).ok_or(BuildInfoError::Truncated)?,
        ptr_size,
        big_endian,
    )?;
    Ok(Version::At {
        addr,
        ptr_size,
        big_endian,
    })
}

/// Decodes a Go string header (`{ptr, len}`) read at [`Version::At`]: (address, length).
///
/// # Errors
/// When the header is short or the length implausible.
pub fn string_header(
    data: &[u8],
    ptr_size: u8,
    big_endian: bool,
) -> Result<(u64, u64), BuildInfoError> {
    let addr = uint(data, ptr_size, big_endian)?;
    let len = uint(
        data.get(usize::from(ptr_size)..)
            .ok_or(BuildInfoError::Truncated)?,
        ptr_size,
        big_endian,
    )?;
    if len == 0 || len > MAX_VERSION {
        return Err(BuildInfoError::Malformed);
    }
    Ok((addr, len))
}

/// Checks that the bytes look like a Go version (printable ASCII).
///
/// # Errors
/// When they do not.
pub fn version_string(bytes: &[u8]) -> Result<String, BuildInfoError> {
    if bytes.is_empty() || !bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(BuildInfoError::Malformed);
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// (major, minor) of a Go version string: `go1.19.8` → (1, 19), `go1.21rc2` → (1, 21);
/// `devel go1.23-abc ...` → (1, 23). `None` when no `go1.N` is in it.
#[must_use]
pub fn major_minor(version: &str) -> Option<(u32, u32)> {
    let at = version.find("go1.")?;
    let rest = &version[at + 4..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((1, digits.parse().ok()?))
}

fn uint(data: &[u8], ptr_size: u8, big_endian: bool) -> Result<u64, BuildInfoError> {
    match ptr_size {
        4 => {
            let b: [u8; 4] = data
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or(BuildInfoError::Truncated)?;
            Ok(u64::from(if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }))
        }
        8 => {
            let b: [u8; 8] = data
                .get(..8)
                .and_then(|s| s.try_into().ok())
                .ok_or(BuildInfoError::Truncated)?;
            Ok(if big_endian {
                u64::from_be_bytes(b)
            } else {
                u64::from_le_bytes(b)
            })
        }
        _ => Err(BuildInfoError::Malformed),
    }
}

/// Go's `binary.Uvarint`: (value, bytes used); `None` when truncated or over 64 bits.
fn uvarint(data: &[u8]) -> Option<(u64, usize)> {
    let mut x = 0u64;
    for (i, &b) in data.iter().enumerate().take(10) {
        let bits = u64::from(b & 0x7f);
        if i == 9 && b > 1 {
            return None;
        }
        x |= bits << (7 * i);
        if b < 0x80 {
            return Some((x, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(version: &str) -> Vec<u8> {
        let mut d = MAGIC.to_vec();
        d.extend([8, FLAG_INLINE]);
        d.resize(32, 0);
        d.push(u8::try_from(version.len()).unwrap());
        d.extend(version.as_bytes());
        d.extend([3, b'm', b'o', b'd']);
        d
    }

    #[test]
    fn inline_version() {
        assert_eq!(
            parse(&inline("go1.19.8")),
            Ok(Version::Inline("go1.19.8".into()))
        );
        assert_eq!(major_minor("go1.19.8"), Some((1, 19)));
        assert_eq!(major_minor("go1.21rc2"), Some((1, 21)));
        assert_eq!(major_minor("devel go1.23-abc Tue"), Some((1, 23)));
        assert_eq!(major_minor("go2"), None);
    }

    #[test]
    fn pointer_version() {
        let mut d = MAGIC.to_vec();
        d.extend([8, 0]);
        d.extend(0x4d_2000u64.to_le_bytes());
        d.extend(0x4d_2010u64.to_le_bytes());
        assert_eq!(
            parse(&d),
            Ok(Version::At {
                addr: 0x4d_2000,
                ptr_size: 8,
                big_endian: false
            })
        );
        let mut h = 0x4a_0000u64.to_le_bytes().to_vec();
        h.extend(8u64.to_le_bytes());
        assert_eq!(string_header(&h, 8, false), Ok((0x4a_0000, 8)));
        assert_eq!(
            string_header(&h[..12], 8, false),
            Err(BuildInfoError::Truncated)
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(parse(b"\x7fELF"), Err(BuildInfoError::Magic));
        let mut d = inline("go1.19.8");
        d.truncate(35);
        assert_eq!(parse(&d), Err(BuildInfoError::Truncated));
        let mut d = inline("go1.19.8");
        d[33] = 0x01;
        assert_eq!(parse(&d), Err(BuildInfoError::Malformed));
        assert_eq!(uvarint(&[0xff; 11]), None);
    }
}
