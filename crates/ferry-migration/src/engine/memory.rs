//! Guest memory as the engine touches it: every dereference of guest memory the engine
//! makes is in this module.
//!
//! vCPUs write guest memory while the source reads it, and a running guest's memory is
//! not Rust's to reason about, so the engine never forms a reference (`&[u8]`,
//! `&mut [u8]`) into it. Instead:
//!
//! * the zero check reads a page with volatile loads, a cache line at a time, stopping
//!   at the first non-zero line;
//! * a page is hashed where it lies, by an xxh3 that reads it through raw pointers
//!   ([`xxh3_page`]); a page to compress is copied into the compressor's input buffer
//!   with `ptr::copy_nonoverlapping`;
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

use super::bitmap::DirtyBitmap;
use super::digest::full_digest;
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

    /// The content hash of a page: xxh3 of its bytes, as `digest::content_hash` gives
    /// it (and release 0.1.0 computes it), read straight from guest memory through raw
    /// pointers, without a copy (see [`xxh3_page`]).
    pub fn hash_page(&self, block: usize, page: u64) -> u64 {
        let p = self.page_ptr(block, page).cast_const();
        // SAFETY: `p` starts PAGE_SIZE readable bytes inside the block's mapping.
        unsafe { xxh3_page(p) }
    }

    /// Writes `data` (one page) into a page. Destination only, guest stopped.
    pub fn store_page(&self, block: usize, page: u64, data: &[u8]) {
        assert_eq!(data.len(), PAGE_SIZE);
        let p = self.page_ptr(block, page);
        // SAFETY: PAGE_SIZE writable bytes at `p`; `data` is our buffer, not guest memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, PAGE_SIZE) };
    }

    /// Writes `data` into a page from byte `at` of it: part of a page that arrives in
    /// pieces. Destination only, guest stopped.
    pub fn store_part(&self, block: usize, page: u64, at: usize, data: &[u8]) {
        assert!(at <= PAGE_SIZE && data.len() <= PAGE_SIZE - at);
        let p = self.page_ptr(block, page);
        // SAFETY: `at + data.len() <= PAGE_SIZE` writable bytes inside the mapping;
        // `data` is a buffer of ours or the transport's, not guest memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(at), data.len()) };
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

/// XXH3's default secret, as the XXH3 specification defines it: 192 bytes every
/// implementation of XXH3 with seed 0 (the `xxhash-rust` crate's `xxh3_64` among them)
/// uses.
const XXH3_SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

#[inline(always)]
fn secret(at: usize) -> u64 {
    u64::from_le_bytes(XXH3_SECRET[at..at + 8].try_into().expect("8 bytes"))
}

/// One 64-byte stripe into the accumulators.
///
/// # Safety
///
/// `p` starts 64 readable bytes.
#[inline(always)]
unsafe fn xxh3_stripe(acc: &mut [u64; 8], p: *const u8, key: usize) {
    for (i, k) in (0..8).zip((key..).step_by(8)) {
        // SAFETY: 8 bytes inside the stripe the caller vouches for; unaligned read
        // through a raw pointer, no reference formed.
        let v = u64::from_le(unsafe { std::ptr::read_unaligned(p.add(8 * i).cast::<u64>()) });
        let mixed = v ^ secret(k);
        acc[i ^ 1] = acc[i ^ 1].wrapping_add(v);
        acc[i] = acc[i].wrapping_add((mixed & 0xFFFF_FFFF).wrapping_mul(mixed >> 32));
    }
}

/// xxh3 (64-bit, seed 0) of the page at `p`, bit for bit what `xxh3_64` gives for the
/// same bytes: XXH3's long-input loop (blocks of 16 stripes, a scramble after each, the
/// last partial block, the last stripe, then the merge), specialised to a 4 KiB input
/// and fed by unaligned raw-pointer loads. Hashing where the page lies, rather than a
/// copy, is what makes the digest cost no more than hashing a slice would (measured
/// over 1 GiB of cold pages: 17-18 GB/s here and in place, 9-10 GB/s for copy then
/// hash). A property test holds it to `xxh3_64`.
///
/// # Safety
///
/// `p` starts `PAGE_SIZE` readable bytes. Their contents may change meanwhile (the guest
/// may be writing); the hash is then of some mixture, which the dirty log makes harmless.
unsafe fn xxh3_page(p: *const u8) -> u64 {
    const P32_1: u64 = 0x9E37_79B1;
    const P32_2: u64 = 0x85EB_CA77;
    const P32_3: u64 = 0xC2B2_AE3D;
    const P64_1: u64 = 0x9E37_79B1_85EB_CA87;
    const P64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P64_3: u64 = 0x1656_67B1_9E37_79F9;
    const P64_4: u64 = 0x85EB_CA77_C2B2_AE63;
    const P64_5: u64 = 0x27D4_EB2F_1656_67C5;
    const STRIPE: usize = 64;
    const STRIPES_PER_BLOCK: usize = (XXH3_SECRET.len() - STRIPE) / 8;
    const BLOCK: usize = STRIPE * STRIPES_PER_BLOCK;
    const BLOCKS: usize = (PAGE_SIZE - 1) / BLOCK;
    const LAST_STRIPES: usize = (PAGE_SIZE - 1 - BLOCK * BLOCKS) / STRIPE;
    let mut acc = [P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1];
    for b in 0..BLOCKS {
        for s in 0..STRIPES_PER_BLOCK {
            // SAFETY: b * BLOCK + s * STRIPE + 64 <= BLOCKS * BLOCK <= PAGE_SIZE.
            unsafe { xxh3_stripe(&mut acc, p.add(b * BLOCK + s * STRIPE), s * 8) };
        }
        for (i, a) in acc.iter_mut().enumerate() {
            let mut v = *a;
            v ^= v >> 47;
            v ^= secret(XXH3_SECRET.len() - STRIPE + 8 * i);
            *a = v.wrapping_mul(P32_1);
        }
    }
    for s in 0..LAST_STRIPES {
        // SAFETY: BLOCKS * BLOCK + s * STRIPE + 64 < PAGE_SIZE for s < LAST_STRIPES.
        unsafe { xxh3_stripe(&mut acc, p.add(BLOCKS * BLOCK + s * STRIPE), s * 8) };
    }
    // SAFETY: the last 64 bytes of the page.
    unsafe {
        xxh3_stripe(
            &mut acc,
            p.add(PAGE_SIZE - STRIPE),
            XXH3_SECRET.len() - STRIPE - 7,
        )
    };
    let mut h = (PAGE_SIZE as u64).wrapping_mul(P64_1);
    for i in 0..4 {
        let a = acc[2 * i] ^ secret(11 + 16 * i);
        let b = acc[2 * i + 1] ^ secret(11 + 16 * i + 8);
        let m = u128::from(a) * u128::from(b);
        h = h.wrapping_add((m as u64) ^ ((m >> 64) as u64));
    }
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9E37_79F9);
    h ^ (h >> 32)
}

/// One block over a buffer of u64s (8-byte aligned, as the volatile loads need), for
/// the engine's unit tests.
#[cfg(test)]
struct TestRam(Vec<super::vm::RamBlock>, Vec<Box<[u64]>>);

// SAFETY: the buffer lives as long as the struct and is never moved or resized.
#[cfg(test)]
unsafe impl GuestRam for TestRam {
    fn blocks(&self) -> &[super::vm::RamBlock] {
        &self.0
    }
    fn host_ptr(&self, block: usize) -> *mut u8 {
        self.1[block].as_ptr().cast_mut().cast()
    }
}

/// Zeroed guest RAM of one block of `pages` pages, for unit tests.
#[cfg(test)]
pub(crate) fn test_ram(pages: usize) -> Arc<dyn GuestRam> {
    Arc::new(TestRam(
        vec![super::vm::RamBlock {
            name: "ram".into(),
            gpa: 0,
            size: (pages * PAGE_SIZE) as u64,
        }],
        vec![vec![0u64; pages * PAGE_SIZE / 8].into_boxed_slice()],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::digest::{content_hash, zero_page_hash};

    use super::test_ram as ram;

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
        assert_eq!(m.hash_page(0, 1), zero_page_hash());
    }

    proptest::proptest! {
        #[test]
        fn the_raw_pointer_hash_is_xxh3_of_the_page(seed in proptest::prelude::any::<u64>(), zeros in 0usize..PAGE_SIZE) {
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

#[cfg(test)]
mod measure {
    use super::*;
    use std::time::Instant;

    /// Not a test: prints the page hash on raw pointers against the `xxhash-rust` slice
    /// hash of the same pages, on 1 and 4 threads, in the same run. Run with
    /// `cargo test -p ferry-migration --release measure_page_hash -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_page_hash() {
        const PAGES: usize = 64 << 10; // 256 MiB per thread
        let bufs: Vec<Vec<u64>> = (0..4)
            .map(|t| {
                (0..PAGES * PAGE_SIZE / 8)
                    .map(|i| (i as u64 ^ t).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .collect()
            })
            .collect();
        let run = |threads: usize, raw: bool| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for b in bufs.iter().take(threads) {
                    s.spawn(move || {
                        let mut x = 0u64;
                        for p in 0..PAGES {
                            let ptr = b[p * PAGE_SIZE / 8..].as_ptr().cast::<u8>();
                            x ^= if raw {
                                // SAFETY: each page lies inside `b`.
                                unsafe { xxh3_page(ptr) }
                            } else {
                                let bytes: &[u64] = &b[p * PAGE_SIZE / 8..(p + 1) * PAGE_SIZE / 8];
                                // SAFETY: the same bytes, viewed as u8; nothing writes them.
                                let bytes = unsafe {
                                    std::slice::from_raw_parts(
                                        bytes.as_ptr().cast::<u8>(),
                                        PAGE_SIZE,
                                    )
                                };
                                xxhash_rust::xxh3::xxh3_64(bytes)
                            };
                        }
                        std::hint::black_box(x);
                    });
                }
            });
            (threads * PAGES * PAGE_SIZE) as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        for round in 0..3 {
            println!(
                "round {round}: 1 thread raw {:.1} GB/s, slice {:.1} GB/s | 4 threads raw {:.1} GB/s, slice {:.1} GB/s",
                run(1, true),
                run(1, false),
                run(4, true),
                run(4, false)
            );
        }
    }
}
