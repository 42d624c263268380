//! A reader for the function table of Go's `.gopclntab`, the one table a stripped Go binary
//! (`-ldflags="-s -w"`) keeps: the runtime needs it for stack traces, so it survives stripping.
//! Only what finding a function by name needs: the header, the `functab` (entry PC, `_func`
//! offset) and each `_func`'s name offset. Layouts: Go 1.16/1.17 (magic `0xfffffffa`), Go
//! 1.18/1.19 (`0xfffffff0`), Go 1.20+ (`0xfffffff1`, same layout as 1.18). No maintained Rust
//! crate reads it on its own (readers exist only inside large disassemblers), hence these lines;
//! every read is bounds-checked and the target `golang_pclntab` fuzzes it.

/// Go 1.16 and 1.17.
const MAGIC_116: u32 = 0xffff_fffa;
/// Go 1.18 and 1.19.
const MAGIC_118: u32 = 0xffff_fff0;
/// Go 1.20 and later.
const MAGIC_120: u32 = 0xffff_fff1;
/// Most functions believed (a large Go binary has ~200 000).
const MAX_FUNCS: u64 = 1 << 24;

/// Why a `.gopclntab` was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PclntabError {
    /// Not a layout this reader knows (Go 1.2 - 1.15 binaries are not probed anyway).
    #[error("unknown pclntab magic {0:#x}")]
    Magic(u32),
    /// An offset or count points outside the table.
    #[error("pclntab truncated or malformed")]
    Malformed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `functab` entries are (entry PC, func offset) as pointers.
    Go116,
    /// `functab` entries are (entry offset from the text start, func offset) as u32.
    Go118,
}

/// A parsed function table over the section's bytes.
#[derive(Debug, Clone, Copy)]
pub struct FuncTable<'a> {
    data: &'a [u8],
    layout: Layout,
    ptr_size: usize,
    nfunc: usize,
    text_start: u64,
    funcnames: usize,
    functab: usize,
}

/// A function found in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Func {
    /// Virtual address of its first instruction.
    pub entry: u64,
    /// Virtual address just past it (the next function's entry).
    pub end: u64,
}

impl<'a> FuncTable<'a> {
    /// Reads the header. Go 1.18+ tables store entries relative to `runtime.text`, which the
    /// header holds; `text_start` (the address of `.text`) is used when the header's copy is 0
    /// (a PIE binary's unrelocated value). With internal linking the two are equal; with external
    /// linking (cgo) C code may come first in `.text`, so the header's value wins.
    ///
    /// # Errors
    /// When the header is not a known layout or points outside `data`.
    pub fn parse(data: &'a [u8], text_start: u64) -> Result<FuncTable<'a>, PclntabError> {
        let magic = u32::from_le_bytes(
            data.get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or(PclntabError::Malformed)?,
        );
        let layout = match magic {
            MAGIC_116 => Layout::Go116,
            MAGIC_118 | MAGIC_120 => Layout::Go118,
            m => return Err(PclntabError::Magic(m)),
        };
        let ptr_size = usize::from(*data.get(7).ok_or(PclntabError::Malformed)?);
        if ptr_size != 8 && ptr_size != 4 {
            return Err(PclntabError::Malformed);
        }
        let mut t = FuncTable {
            data,
            layout,
            ptr_size,
            nfunc: 0,
            text_start,
            funcnames: 0,
            functab: 0,
        };
        let word = |i: usize| t.uint(8 + i * ptr_size, ptr_size);
        let nfunc = word(0)?;
        if nfunc > MAX_FUNCS {
            return Err(PclntabError::Malformed);
        }
        // Words after nfunc, nfiles: [textStart (1.18+),] funcnameOffset, cuOffset,
        // filetabOffset, pctabOffset, pclnOffset.
        let (names_word, pcln_word) = match layout {
            Layout::Go116 => (2, 6),
            Layout::Go118 => (3, 7),
        };
        let header_text = if layout == Layout::Go118 { word(2)? } else { 0 };
        let funcnames = to_usize(word(names_word)?)?;
        let functab = to_usize(word(pcln_word)?)?;
        if header_text != 0 {
            t.text_start = header_text;
        }
        t.nfunc = to_usize(nfunc)?;
        t.funcnames = funcnames;
        t.functab = functab;
        // The functab holds nfunc + 1 entries (the last one is the end of the text).
        let end = functab
            .checked_add((t.nfunc + 1) * 2 * t.field_size())
            .ok_or(PclntabError::Malformed)?;
        if funcnames >= data.len() || end > data.len() {
            return Err(PclntabError::Malformed);
        }
        Ok(t)
    }

    /// Number of functions in the table.
    #[must_use]
    pub fn len(&self) -> usize {
        self.nfunc
    }

    /// Whether the table lists no function.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.nfunc == 0
    }

    /// Looks up each of `names` in one pass; unknown names stay `None`.
    ///
    /// # Errors
    /// When an entry points outside the table.
    pub fn find(&self, names: &[&str]) -> Result<Vec<Option<Func>>, PclntabError> {
        let mut out = vec![None; names.len()];
        let mut left = names.len();
        for i in 0..self.nfunc {
            if left == 0 {
                break;
            }
            let name = self.name(i)?;
            if let Some(k) = names.iter().position(|n| n.as_bytes() == name)
                && out[k].is_none()
            {
                let entry = self.entry(i)?;
                let end = self.entry(i + 1)?;
                if end <= entry {
                    return Err(PclntabError::Malformed);
                }
                out[k] = Some(Func { entry, end });
                left -= 1;
            }
        }
        Ok(out)
    }

    /// Size of one functab field: a pointer (1.16) or a u32 (1.18+).
    fn field_size(&self) -> usize {
        match self.layout {
            Layout::Go116 => self.ptr_size,
            Layout::Go118 => 4,
        }
    }

    fn entry(&self, i: usize) -> Result<u64, PclntabError> {
        let at = self.functab + i * 2 * self.field_size();
        match self.layout {
            Layout::Go116 => self.uint(at, self.ptr_size),
            Layout::Go118 => self
                .text_start
                .checked_add(self.uint(at, 4)?)
                .ok_or(PclntabError::Malformed),
        }
    }

    fn name(&self, i: usize) -> Result<&'a [u8], PclntabError> {
        let fs = self.field_size();
        let func_off = to_usize(self.uint(self.functab + (i * 2 + 1) * fs, fs)?)?;
        // `_func` starts with its entry (pointer or u32), then `nameOff int32`.
        let func = self
            .functab
            .checked_add(func_off)
            .ok_or(PclntabError::Malformed)?;
        let name_at = func.checked_add(fs).ok_or(PclntabError::Malformed)?;
        let name_off = to_usize(self.uint(name_at, 4)?)?;
        let start = self
            .funcnames
            .checked_add(name_off)
            .ok_or(PclntabError::Malformed)?;
        let rest = self.data.get(start..).ok_or(PclntabError::Malformed)?;
        let len = rest
            .iter()
            .take(4096)
            .position(|&b| b == 0)
            .ok_or(PclntabError::Malformed)?;
        Ok(&rest[..len])
    }

    fn uint(&self, at: usize, size: usize) -> Result<u64, PclntabError> {
        let end = at.checked_add(size).ok_or(PclntabError::Malformed)?;
        let b = self.data.get(at..end).ok_or(PclntabError::Malformed)?;
        Ok(match size {
            4 => u64::from(u32::from_le_bytes(
                b.try_into().map_err(|_| PclntabError::Malformed)?,
            )),
            8 => u64::from_le_bytes(b.try_into().map_err(|_| PclntabError::Malformed)?),
            _ => return Err(PclntabError::Malformed),
        })
    }
}

fn to_usize(v: u64) -> Result<usize, PclntabError> {
    usize::try_from(v).map_err(|_| PclntabError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Go 1.18-layout table with the given (name, entry offset) functions.
    pub(crate) fn synthetic(funcs: &[(&str, u32)], end: u32) -> Vec<u8> {
        let mut names = Vec::new();
        let mut name_offs = Vec::new();
        for (n, _) in funcs {
            name_offs.push(u32::try_from(names.len()).unwrap());
            names.extend(n.as_bytes());
            names.push(0);
        }
        let header = 8 + 8 * 8;
        let funcnames = header;
        let functab = funcnames + names.len();
        let mut d = MAGIC_118.to_le_bytes().to_vec();
        d.extend([0, 0, 1, 8]);
        for w in [
            funcs.len() as u64,
            0,
            0x40_1000,
            funcnames as u64,
            0,
            0,
            0,
            functab as u64,
        ] {
            d.extend(w.to_le_bytes());
        }
        d.extend(&names);
        let tab_len = (funcs.len() + 1) * 8;
        for (i, (_, entry)) in funcs.iter().enumerate() {
            d.extend(entry.to_le_bytes());
            d.extend(u32::try_from(tab_len + i * 8).unwrap().to_le_bytes());
        }
        d.extend(end.to_le_bytes());
        d.extend(0u32.to_le_bytes());
        for (i, (_, entry)) in funcs.iter().enumerate() {
            d.extend(entry.to_le_bytes());
            d.extend(name_offs[i].to_le_bytes());
        }
        d
    }

    #[test]
    fn finds_functions_by_name() {
        let d = synthetic(
            &[("main.main", 0), ("crypto/tls.(*Conn).Write", 0x40)],
            0x100,
        );
        // The header's runtime.text (0x401000) wins over the section address given.
        let t = FuncTable::parse(&d, 0x40_0000).unwrap();
        assert_eq!(t.len(), 2);
        let found = t
            .find(&["crypto/tls.(*Conn).Write", "main.main", "nope"])
            .unwrap();
        assert_eq!(
            found,
            vec![
                Some(Func {
                    entry: 0x40_1040,
                    end: 0x40_1100
                }),
                Some(Func {
                    entry: 0x40_1000,
                    end: 0x40_1040
                }),
                None
            ]
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let d = synthetic(&[("a", 0), ("b", 0x10)], 0x20);
        for cut in 0..d.len() {
            if let Ok(t) = FuncTable::parse(&d[..cut], 0) {
                let _ = t.find(&["a", "b"]);
            }
        }
        assert_eq!(
            FuncTable::parse(&[0xfb, 0xff, 0xff, 0xff, 0, 0, 1, 8], 0).unwrap_err(),
            PclntabError::Magic(0xffff_fffb)
        );
    }
}
