//! How the enforcer's allocator (mimalloc) gives memory back.
//!
//! mimalloc v3 (what libmimalloc-sys builds) keeps the pages of freed blocks committed for a whole
//! second (`purge_delay` = 1000 ms in its options.c; v2 used 10 ms) before it returns them to the
//! kernel, so that later allocations can reuse them. Large calls defeat that: under 64 concurrent
//! 4 MB embeddings calls every body and answer is a multi-MiB block, freed and allocated again
//! within that delay, often on another thread, and the retained pages added 20–40 MiB to the peak
//! RSS (bench memory row: 185–214 MiB with the default, 163–174 MiB with purging at once).
//!
//! Purging at once (0 ms) cost latency, though: the enforcer's added p99 at 500 req/s was
//! 1.062×, 1.101× and 1.355× of direct in three runs with it, against 1.037× and 1.002× without
//! (freed pages of small calls are returned and faulted in again on the next call). So the delay
//! is v2's 10 ms: long enough for the pages of small calls to be reused, short enough that a
//! large call's pages go back before the next large call needs new ones. docs/benchmarks.md has
//! the runs.

use std::ffi::{c_int, c_long};

// The functions below live in mimalloc's C library, which this crate links through `mimalloc`
// (also in builds that do not use it as the global allocator, such as the unit tests).
extern crate mimalloc as _;

// mimalloc's C API (libmimalloc-sys links it for the global allocator). `mi_option_t` is a C enum.
unsafe extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (the version libmimalloc-sys builds by
/// default); pinned by the test below.
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// How long freed pages stay committed before mimalloc returns them (ms).
pub const PURGE_DELAY_MS: c_long = 10;

/// Makes mimalloc return wholly free pages to the kernel after [`PURGE_DELAY_MS`] instead of a
/// second. Call before serving.
pub fn purge_freed_pages_sooner() {
    // SAFETY: sets a documented runtime option; mimalloc reads options atomically.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        fn mi_option_get(option: c_int) -> c_long;
    }

    /// The current purge delay in ms.
    fn purge_delay_ms() -> c_long {
        // SAFETY: reads a runtime option.
        unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }
    }

    #[test]
    fn the_option_numbers_are_mimallocs() {
        // Defaults from mimalloc v3's options.c: purge_delay 1000 ms (id 15), max_errors and
        // max_warnings 32 (ids 19 and 20).
        // SAFETY: reads runtime options.
        unsafe {
            assert_eq!(mi_option_get(19), 32, "max_errors");
            assert_eq!(mi_option_get(20), 32, "max_warnings");
        }
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(purge_delay_ms(), 1000, "purge_delay's default");
        }
        purge_freed_pages_sooner();
        assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
    }
}
