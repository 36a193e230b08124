//! Guest memory as the engine touches it: every dereference of guest memory the engine
//! makes is in this module.
//!
//! vCPUs write guest memory while the source reads it, and a running guest's memory is
//! not Rust's to reason about, so the engine never forms a reference (`&[u8]`,
//! `&mut [u8]`) into it. Instead:
//!
//! * the zero check reads a page with volatile loads, a cache line at a time, stopping
//!   at the first non-zero line;
//! * a page to hash is copied a cache-resident chunk at a time into a buffer of the
//!   engine's own with `ptr::copy_nonoverlapping`, and the chunks are what get hashed; a
//!   page to compress is copied into the compressor's input buffer the same way;
//! * the kernel moves page data between sockets and guest memory through iovecs built
//!   here ([`GuestMemory::push_iov`]), for `writev` on the source and `readv` on the
//!   destination;
//! * the destination writes pages from its decompression buffer with
//!   `ptr::copy_nonoverlapping` and zero pages with `ptr::write_bytes`.
//!
//! Every page index is checked against its block's size before a pointer is formed; the
//! mappings stay valid while the [`GuestRam`] this holds lives.
//!
//! A copy of a page the guest is writing may be torn. That is harmless by construction:
//! a page written after its dirty bit was harvested is dirty again and is sent again,
//! replacing both its data and its digest term, and the final pass runs with the guest
//! stopped.

use std::sync::Arc;

use xxhash_rust::xxh3::Xxh3;

use super::bitmap::DirtyBitmap;
use super::digest::{full_digest, zero_page_hash};
use super::vm::GuestRam;
use crate::PAGE_SIZE;

/// One block's mapping.
#[derive(Debug, Clone, Copy)]
struct Region {
    base: *mut u8,
    pages: usize,
}

/// The guest's RAM blocks as raw mappings, with bounds-checked page access.
pub(crate) struct GuestMemory {
    ram: Arc<dyn GuestRam>,
    regions: Vec<Region>,
}

// SAFETY: the raw pointers are the base addresses of mappings owned by `ram`, which
// this struct keeps alive; every access through them is a raw-pointer copy or an iovec
// handed to the kernel, never a Rust reference, so sharing them between threads adds no
// aliasing beyond what the guest itself does.
unsafe impl Send for GuestMemory {}
// SAFETY: as for `Send`: no method hands out a reference into guest memory.
unsafe impl Sync for GuestMemory {}

/// A page-sized buffer of the engine's own, 64-byte aligned.
#[repr(C, align(64))]
pub(crate) struct PageBuf(pub(crate) [u8; PAGE_SIZE]);

impl PageBuf {
    pub fn new() -> Box<Self> {
        Box::new(Self([0; PAGE_SIZE]))
    }
}

impl GuestMemory {
    pub fn new(ram: Arc<dyn GuestRam>) -> Self {
        let regions = ram
            .blocks()
            .iter()
            .enumerate()
            .map(|(b, info)| Region {
                base: ram.host_ptr(b),
                pages: info.pages(),
            })
            .collect();
        Self { ram, regions }
    }

    /// Pages in `block`, or `None` for a block that does not exist.
    pub fn block_pages(&self, block: usize) -> Option<usize> {
        self.regions.get(block).map(|r| r.pages)
    }

    pub fn block_count(&self) -> usize {
        self.regions.len()
    }

    /// The first byte of a page. Panics on an index outside the block: callers pass
    /// indices taken from the block's own bitmap or checked by a wire decoder.
    fn page_ptr(&self, block: usize, page: u64) -> *mut u8 {
        let r = self.regions[block];
        assert!(
            (page as usize) < r.pages,
            "page {page} outside block {block} ({} pages)",
            r.pages
        );
        // SAFETY: page < pages, so the offset stays inside the block's mapping.
        unsafe { r.base.add(page as usize * PAGE_SIZE) }
    }

    /// Whether every byte of the page is zero, read with volatile loads a cache line at
    /// a time so a non-zero page is rejected after its first line.
    pub fn is_zero(&self, block: usize, page: u64) -> bool {
        let p = self.page_ptr(block, page).cast::<[u64; 8]>().cast_const();
        (0..PAGE_SIZE / 64).all(|i| {
            // SAFETY: 64 bytes inside the page, 8-byte aligned as `[u64; 8]` needs
            // (mappings are page aligned); a volatile load, no reference formed.
            let line = unsafe { std::ptr::read_volatile(p.add(i)) };
            line.iter().fold(0, |a, w| a | w) == 0
        })
    }

    /// Copies a page into `out`.
    pub fn copy_page(&self, block: usize, page: u64, out: &mut [u8]) {
        assert_eq!(out.len(), PAGE_SIZE);
        let p = self.page_ptr(block, page);
        // SAFETY: PAGE_SIZE readable bytes at `p` (inside the mapping) into a buffer of
        // ours of the same size; the two never overlap.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), PAGE_SIZE) };
    }

    /// The content hash of a page (xxh3 of its bytes, as `digest::content_hash` gives
    /// it).
    ///
    /// The page is copied a small chunk at a time into a buffer that stays in the L1
    /// cache and fed to the streaming hasher, so the copy overlaps the hashing: measured
    /// here, as fast as hashing in place, where copying the whole page first and hashing
    /// the copy took twice as long.
    pub fn hash_page(&self, block: usize, page: u64) -> u64 {
        const CHUNK: usize = 512;
        let p = self.page_ptr(block, page).cast_const();
        let mut chunk = [0u8; CHUNK];
        let mut h = Xxh3::new();
        for c in 0..PAGE_SIZE / CHUNK {
            // SAFETY: CHUNK readable bytes inside the page into a stack buffer of ours;
            // the two never overlap.
            unsafe { std::ptr::copy_nonoverlapping(p.add(c * CHUNK), chunk.as_mut_ptr(), CHUNK) };
            h.update(&chunk);
        }
        h.digest()
    }

    /// Writes `data` (one page) into a page. Destination only, guest stopped.
    pub fn store_page(&self, block: usize, page: u64, data: &[u8]) {
        assert_eq!(data.len(), PAGE_SIZE);
        let p = self.page_ptr(block, page);
        // SAFETY: PAGE_SIZE writable bytes at `p`; `data` is our buffer, not guest memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, PAGE_SIZE) };
    }

    /// Zeroes a page. Destination only, guest stopped.
    pub fn zero_page(&self, block: usize, page: u64) {
        let p = self.page_ptr(block, page);
        // SAFETY: PAGE_SIZE writable bytes inside the mapping; no reference aliases them.
        unsafe { std::ptr::write_bytes(p, 0, PAGE_SIZE) };
    }

    /// Appends an iovec for a whole page, merged into the previous entry when that one
    /// ends where the page starts, unless the previous entry is before `first` (a
    /// header of ours). The one place the engine builds iovecs over guest memory.
    pub fn push_iov(&self, iov: &mut Vec<libc::iovec>, first: usize, block: usize, page: u64) {
        let p = self.page_ptr(block, page);
        let n = iov.len();
        match iov.last_mut() {
            Some(last)
                if n > first && last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == p =>
            {
                last.iov_len += PAGE_SIZE;
            }
            _ => iov.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: PAGE_SIZE,
            }),
        }
    }

    /// Digest of all of guest memory; pages the backend reports unpopulated count as
    /// zero without being read. Only called with the guest stopped.
    pub fn full_digest(&self) -> u64 {
        let pages: Vec<usize> = self.regions.iter().map(|r| r.pages).collect();
        let populated: Vec<DirtyBitmap> = pages
            .iter()
            .enumerate()
            .map(|(b, &n)| {
                let bm = DirtyBitmap::new(n);
                self.ram.populated(b, &bm);
                bm
            })
            .collect();
        full_digest(&pages, |b, p| {
            populated[b].is_set(p).then(|| self.hash_page(b, p as u64))
        })
    }
}

/// The content hash of a page known to be zero.
pub(crate) fn zero_hash() -> u64 {
    zero_page_hash()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::digest::content_hash;
    use crate::engine::vm::RamBlock;

    /// One block over a buffer of u64s: 8-byte aligned, as the volatile loads need.
    struct Ram(Vec<RamBlock>, Vec<Box<[u64]>>);

    // SAFETY: the buffer lives as long as the struct and is never moved or resized.
    unsafe impl GuestRam for Ram {
        fn blocks(&self) -> &[RamBlock] {
            &self.0
        }
        fn host_ptr(&self, block: usize) -> *mut u8 {
            self.1[block].as_ptr().cast_mut().cast()
        }
    }

    fn ram(pages: usize) -> Arc<dyn GuestRam> {
        Arc::new(Ram(
            vec![RamBlock {
                name: "ram".into(),
                gpa: 0,
                size: (pages * PAGE_SIZE) as u64,
            }],
            vec![vec![0u64; pages * PAGE_SIZE / 8].into_boxed_slice()],
        ))
    }

    #[test]
    fn zero_detection_sees_the_last_byte_and_copies_are_exact() {
        let m = GuestMemory::new(ram(2));
        assert!(m.is_zero(0, 0) && m.is_zero(0, 1));
        let mut page = vec![0u8; PAGE_SIZE];
        page[PAGE_SIZE - 1] = 7;
        m.store_page(0, 1, &page);
        assert!(m.is_zero(0, 0));
        assert!(!m.is_zero(0, 1));
        let mut back = vec![0u8; PAGE_SIZE];
        m.copy_page(0, 1, &mut back);
        assert_eq!(back, page);
        assert_eq!(m.hash_page(0, 1), content_hash(&page));
        m.zero_page(0, 1);
        assert!(m.is_zero(0, 1));
        assert_eq!(m.hash_page(0, 1), zero_hash());
    }

    proptest::proptest! {
        #[test]
        fn the_chunked_hash_is_the_hash_of_the_page(seed in proptest::prelude::any::<u64>(), zeros in 0usize..PAGE_SIZE) {
            let m = GuestMemory::new(ram(1));
            let mut page = vec![0u8; PAGE_SIZE];
            let mut x = seed | 1;
            for b in page.iter_mut().skip(zeros) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            m.store_page(0, 0, &page);
            proptest::prop_assert_eq!(m.hash_page(0, 0), content_hash(&page));
        }
    }

    #[test]
    fn adjacent_pages_share_one_iovec_but_never_a_header() {
        let m = GuestMemory::new(ram(4));
        let head = [0u8; 8];
        let mut iov = vec![libc::iovec {
            iov_base: head.as_ptr() as *mut _,
            iov_len: head.len(),
        }];
        for p in [0, 1, 3] {
            m.push_iov(&mut iov, 1, 0, p);
        }
        let lens: Vec<usize> = iov.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [8, 2 * PAGE_SIZE, PAGE_SIZE]);
    }

    #[test]
    #[should_panic(expected = "outside block")]
    fn a_page_outside_its_block_is_never_touched() {
        GuestMemory::new(ram(1)).zero_page(0, 1);
    }
}
