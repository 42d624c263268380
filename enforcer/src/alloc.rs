//! How the enforcer's allocator gives memory back.
//!
//! Blocks below [`BIG`] (headers, JSON, tokenizer scratch, Redis commands, body frames) come from
//! mimalloc, which keeps the pages of freed blocks committed for a second (`purge_delay` = 1000 ms
//! in mimalloc v3's options.c) so that the next calls reuse them. Blocks of [`BIG`] and more
//! (large request bodies and answers) come from the C library's `malloc`, told here to map each
//! such block on its own (`M_MMAP_THRESHOLD`), so it is unmapped the moment it is freed.
//!
//! Why the split: under 64 concurrent 4 MiB embeddings calls every body and answer is a multi-MiB
//! block, freed and allocated again within mimalloc's delay, often on another thread, and the
//! pages mimalloc kept added 20–40 MiB to the peak RSS. The enforcer used to shorten the delay for
//! every block to 10 ms instead, but then the pages of small calls went back to the kernel between
//! calls and were faulted in again, often as a 2 MiB transparent huge page zeroed whole: ~5 µs per
//! call at concurrency 64. docs/benchmarks.md ("Big blocks apart") has the runs.
//!
//! `MIMALLOC_PURGE_DELAY` and mimalloc's other variables still work as mimalloc documents them.

use std::alloc::{GlobalAlloc, Layout, System};

// mimalloc's C library is linked through `mimalloc` (also in builds that do not use it as the
// global allocator, such as the unit tests).
use mimalloc::MiMalloc;

/// Blocks of this size and more are mapped on their own and unmapped when freed. At 1 MiB the
/// peak of the bench's 4 MiB calls was higher than with the 10 ms purge (175–204 MiB against
/// 167–173): the frames and buffers between 256 KiB and 1 MiB that mimalloc kept made up for the
/// big blocks. No block of a small call (a chat request, a Redis batch) reaches 256 KiB.
pub const BIG: usize = 256 * 1024;

/// The enforcer's global allocator: mimalloc below [`BIG`], the C library's `malloc` (one
/// mapping per block, see [`map_big_blocks_alone`]) from [`BIG`] up.
pub struct Split;

fn big(size: usize) -> bool {
    size >= BIG
}

// SAFETY: every block is freed (and resized) by the allocator that made it: the layout Rust passes
// to `dealloc` and `realloc` is the one the block was last allocated or resized with, and its size
// picks the same allocator as it did then. A resize across `BIG` moves the block between them.
unsafe impl GlobalAlloc for Split {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees (a layout of non-zero size).
        unsafe {
            if big(layout.size()) {
                System.alloc(layout)
            } else {
                MiMalloc.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if big(layout.size()) {
                System.alloc_zeroed(layout)
            } else {
                MiMalloc.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from the allocator this size picks (see the impl's comment).
        unsafe {
            if big(layout.size()) {
                System.dealloc(ptr, layout);
            } else {
                MiMalloc.dealloc(ptr, layout);
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` and `layout` describe a live block of the allocator `big(layout.size())`
        // picks; a move copies the bytes both blocks hold and frees the old block only once the
        // new one exists (on failure the old block stays valid, as `realloc` promises).
        unsafe {
            match (big(layout.size()), big(new_size)) {
                (false, false) => MiMalloc.realloc(ptr, layout, new_size),
                (true, true) => System.realloc(ptr, layout, new_size),
                _ => {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

/// Makes the C library map every block of [`BIG`] or more on its own and unmap it when freed.
/// Without it glibc raises its mapping threshold to the size of the last mapped block it freed,
/// and later big blocks come from its heap, which keeps freed memory. Call before serving.
pub fn map_big_blocks_alone() {
    #[cfg(target_env = "gnu")]
    {
        let threshold = libc::c_int::try_from(BIG).unwrap_or(libc::c_int::MAX);
        // SAFETY: sets a documented malloc tunable; glibc takes it at any time.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) };
        if ok != 1 {
            eprintln!("mallopt(M_MMAP_THRESHOLD) refused; freed big blocks may be kept");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start and end of the mapping holding `addr`, from `/proc/self/maps`.
    fn mapping_of(addr: usize) -> Option<(usize, usize)> {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
        maps.lines().find_map(|line| {
            let range = line.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            );
            (a..b).contains(&addr).then_some((a, b))
        })
    }

    #[test]
    fn blocks_keep_their_bytes_across_the_threshold() {
        map_big_blocks_alone();
        let a = Split;
        // SAFETY: each block is used within its size and freed once with its last layout.
        unsafe {
            let small = Layout::from_size_align(4096, 8).unwrap();
            let p = a.alloc(small);
            assert!(!p.is_null());
            for i in 0..4096 {
                *p.add(i) = (i % 251) as u8;
            }
            // Small to big: moved, bytes kept.
            let p = a.realloc(p, small, 3 * BIG);
            assert!(!p.is_null());
            assert!((0..4096).all(|i| *p.add(i) == (i % 251) as u8));
            *p.add(3 * BIG - 1) = 7;
            // Big to bigger: the C library's realloc.
            let big3 = Layout::from_size_align(3 * BIG, 8).unwrap();
            let p = a.realloc(p, big3, 5 * BIG);
            assert!(!p.is_null());
            assert_eq!(*p.add(3 * BIG - 1), 7);
            assert!((0..4096).all(|i| *p.add(i) == (i % 251) as u8));
            // Big to small: moved back, the first bytes kept.
            let big5 = Layout::from_size_align(5 * BIG, 8).unwrap();
            let p = a.realloc(p, big5, 100);
            assert!(!p.is_null());
            assert!((0..100).all(|i| *p.add(i) == (i % 251) as u8));
            a.dealloc(p, Layout::from_size_align(100, 8).unwrap());

            let zeroed = Layout::from_size_align(2 * BIG, 64).unwrap();
            let z = a.alloc_zeroed(zeroed);
            assert!(!z.is_null() && (z as usize).is_multiple_of(64));
            assert!((0..2 * BIG).step_by(4093).all(|i| *z.add(i) == 0));
            a.dealloc(z, zeroed);
        }
    }

    #[test]
    fn a_big_block_is_a_mapping_of_its_own_and_goes_back_when_freed() {
        map_big_blocks_alone();
        let a = Split;
        // SAFETY: each block is written within its size and freed once with its layout.
        unsafe {
            // Left to itself, glibc would now raise its mapping threshold to 16 MiB and serve
            // the next block from its heap.
            let huge = Layout::from_size_align(16 << 20, 16).unwrap();
            let h = a.alloc(huge);
            assert!(!h.is_null());
            h.write_bytes(1, huge.size());
            a.dealloc(h, huge);

            let layout = Layout::from_size_align(4 * BIG, 16).unwrap();
            let p = a.alloc(layout);
            assert!(!p.is_null());
            p.write_bytes(1, layout.size());
            let addr = p as usize;
            let (start, end) = mapping_of(addr).expect("the block is mapped");
            // Its own mapping: the block and the C library's header, rounded to pages.
            assert!(
                start <= addr && addr + layout.size() <= end,
                "{start:x}-{end:x}"
            );
            assert!(
                end - start < layout.size() + 2 * 4096,
                "{start:x}-{end:x} holds more than the block"
            );
            a.dealloc(p, layout);
            // Unmapped at once (another test's block may have been mapped in its place since;
            // then it is not the same mapping).
            assert_ne!(mapping_of(addr), Some((start, end)));
        }
    }
}
