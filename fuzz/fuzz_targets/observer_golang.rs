//! The observer's Go binary readers (`observer::golang`) on arbitrary bytes: the `.gopclntab`
//! function table, the `.go.buildinfo` header, the code scan for body starts and `RET`s, and
//! `inspect` over a whole (ELF) file. They read files of any process on the host, so they must
//! never panic, and every answer must point inside what was given.
//!
//! Input: selector byte (bit 0-1: which reader), then the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::golang::{self, buildinfo, code, pclntab};

const NAMES: [&str; 3] = [golang::WRITE, golang::READ, golang::CLOSE];

fuzz_target!(|input: &[u8]| {
    let Some((&sel, data)) = input.split_first() else {
        return;
    };
    match sel & 3 {
        0 => {
            let text = 0x40_1000;
            if let Ok(table) = pclntab::FuncTable::parse(data, text)
                && let Ok(found) = table.find(&NAMES)
            {
                for f in found.into_iter().flatten() {
                    assert!(f.entry < f.end, "{f:?}");
                }
            }
        }
        1 => {
            if let Ok(buildinfo::Version::Inline(v)) = buildinfo::parse(data) {
                assert!(!v.is_empty() && v.len() <= 128);
                let _ = buildinfo::major_minor(&v);
            }
        }
        2 => {
            let addr = 0x1000;
            // Calls to an address inside the input, so that some are found.
            if let Ok(s) = code::sites(data, addr, Some(addr + 0x10)) {
                let end = addr + data.len() as u64;
                assert!(s.body >= addr && s.body <= end, "{s:?}");
                assert!(!s.rets.is_empty());
                assert!(s.rets.iter().all(|r| *r >= addr && *r < end), "{s:?}");
                assert!(s.calls.iter().all(|c| *c >= addr && *c < end), "{s:?}");
            }
        }
        _ => {
            if let Ok(golang::GoBinary::Tls(t)) = golang::inspect(data) {
                let len = data.len() as u64;
                assert!(t.write < len && t.read < len, "{t:?}");
                assert!(t.read_rets.iter().all(|r| *r < len), "{t:?}");
                assert!(t.read_copy.is_none_or(|c| c < len), "{t:?}");
            }
        }
    }
});
