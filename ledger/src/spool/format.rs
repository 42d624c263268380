//! The on-disk record format of a spool segment, and reading a segment back.
//!
//! A record is a 12-byte header followed by its payload (one JSON [`super::SpoolEntry`]):
//!
//! ```text
//! magic "LWSP" (4 bytes) | payload length, u32 little-endian | CRC-32 (IEEE) of the payload, u32 LE
//! ```
//!
//! A record is only trusted when its magic, length and CRC all check out. A torn last record (a crash
//! in the middle of a write) is detected by its length running past the end of the file, or by its
//! CRC, and ignored; a damaged record in the middle is skipped by scanning for the next magic, and
//! counted. Nothing after the damage is lost.

/// Marks the start of every record.
pub(crate) const MAGIC: [u8; 4] = *b"LWSP";
/// Header bytes before the payload.
pub(crate) const HEADER: usize = 12;
/// The largest payload accepted (a settlement is a few hundred bytes).
pub(crate) const MAX_PAYLOAD: usize = 1 << 20;

/// Frames `payload` as one record.
pub(crate) fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// What reading one segment found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Decoded<'a> {
    /// The payloads of every intact record, in file order.
    pub(crate) records: Vec<&'a [u8]>,
    /// Damaged records skipped in the middle of the segment.
    pub(crate) corrupt: u64,
    /// Bytes skipped because of damage.
    pub(crate) corrupt_bytes: u64,
    /// Bytes of an incomplete last record (a torn write), ignored.
    pub(crate) torn_bytes: u64,
}

fn u32_at(b: &[u8], at: usize) -> usize {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    usize::try_from(u32::from_le_bytes(w)).unwrap_or(usize::MAX)
}

/// The next offset at or after `from` where the magic starts, if any.
fn next_magic(b: &[u8], from: usize) -> Option<usize> {
    b.get(from..)?
        .windows(MAGIC.len())
        .position(|w| w == MAGIC)
        .map(|p| p + from)
}

/// Splits a segment's bytes into intact record payloads; see the module doc for the rules.
pub(crate) fn decode(b: &[u8]) -> Decoded<'_> {
    let mut d = Decoded::default();
    let mut pos = 0;
    while pos < b.len() {
        let ok_header = b.len() - pos >= HEADER && b[pos..pos + 4] == MAGIC;
        if ok_header {
            let len = u32_at(b, pos + 4);
            let crc = u32_at(b, pos + 8);
            let end = pos.saturating_add(HEADER).saturating_add(len);
            if len <= MAX_PAYLOAD && end <= b.len() {
                let payload = &b[pos + HEADER..end];
                if usize::try_from(crc32fast::hash(payload)).ok() == Some(crc) {
                    d.records.push(payload);
                    pos = end;
                    continue;
                }
            }
        }
        // Damage at `pos`: resynchronise on the next magic. With none left, this is a torn tail
        // when it is the only problem at the end, otherwise trailing corruption.
        match next_magic(b, pos + 1) {
            Some(next) => {
                d.corrupt += 1;
                d.corrupt_bytes += (next - pos) as u64;
                pos = next;
            }
            None => {
                d.torn_bytes += (b.len() - pos) as u64;
                pos = b.len();
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(payloads: &[&[u8]]) -> Vec<u8> {
        payloads.iter().flat_map(|p| encode(p)).collect()
    }

    #[test]
    fn round_trip() {
        let b = seg(&[b"{\"a\":1}", b"", b"xyz"]);
        let d = decode(&b);
        assert_eq!(d.records, vec![&b"{\"a\":1}"[..], b"", b"xyz"]);
        assert_eq!((d.corrupt, d.torn_bytes), (0, 0));
    }

    #[test]
    fn every_torn_tail_is_ignored_and_earlier_records_survive() {
        let full = seg(&[b"first record", b"second record"]);
        let first_len = HEADER + b"first record".len();
        for cut in first_len..full.len() {
            let d = decode(&full[..cut]);
            assert_eq!(d.records, vec![&b"first record"[..]], "cut at {cut}");
            assert_eq!(d.torn_bytes, (cut - first_len) as u64, "cut at {cut}");
            assert_eq!(d.corrupt, 0, "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_byte_loses_only_its_record() {
        let full = seg(&[b"one", b"two-two", b"three"]);
        let second = HEADER + 3;
        for at in second..second + HEADER + 7 {
            let mut b = full.clone();
            b[at] ^= 0x40;
            let d = decode(&b);
            assert_eq!(d.records, vec![&b"one"[..], b"three"], "flip at {at}");
            assert_eq!(d.corrupt, 1, "flip at {at}");
        }
    }

    #[test]
    fn garbage_and_huge_lengths_never_panic() {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        assert_eq!(decode(&b).records.len(), 0);
        assert_eq!(decode(b"LWS").torn_bytes, 3);
        let mut noise: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        noise.extend(seg(&[b"ok"]));
        let d = decode(&noise);
        assert_eq!(d.records, vec![&b"ok"[..]]);
        assert_eq!(d.corrupt, 1);
    }
}
