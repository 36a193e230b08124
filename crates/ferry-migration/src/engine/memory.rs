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
/// same bytes, with the widest implementation this CPU runs: AVX2 where the CPU has it
/// (std caches the CPUID answer, so the check is one load), else [`xxh3_page_portable`].
///
/// Hashing where the page lies, rather than a copy, is what makes the digest cost no
/// more than hashing a slice would (measured over 1 GiB of cold pages: 17-18 GB/s here
/// and in place, 9-10 GB/s for copy then hash). The AVX2 loop hashes a page in L2 at
/// 32-43 GB/s against the portable loop's 12-18 (`measure_page_hash`); pages in memory
/// are hashed at about the speed memory delivers them with either (10-16 GB/s here),
/// but both sides of a migration hash pages that are in cache: the destination just
/// received them and the source sends them right after. Property tests hold both to
/// `xxh3_64`.
///
/// # Safety
///
/// `p` starts `PAGE_SIZE` readable bytes. Their contents may change meanwhile (the guest
/// may be writing); the hash is then of some mixture, which the dirty log makes harmless.
#[inline]
unsafe fn xxh3_page(p: *const u8) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU runs AVX2 (checked above); `p` as the caller vouches.
        return unsafe { avx2::xxh3_page(p) };
    }
    // SAFETY: as the caller vouches.
    unsafe { xxh3_page_portable(p) }
}

// XXH3's constants and the shape of its long-input loop for a 4 KiB input, shared by
// both implementations.
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
/// The accumulators' starting values.
const ACC_INIT: [u64; 8] = [P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1];
/// Where in the secret the scramble after each block and the last stripe take their keys.
const SCRAMBLE_KEY: usize = XXH3_SECRET.len() - STRIPE;
const LAST_STRIPE_KEY: usize = XXH3_SECRET.len() - STRIPE - 7;

/// XXH3's merge of the eight accumulators into the 64-bit hash of a 4 KiB input.
#[inline(always)]
fn xxh3_merge(acc: &[u64; 8]) -> u64 {
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

/// xxh3 of the page at `p` in plain Rust: XXH3's long-input loop (blocks of 16 stripes,
/// a scramble after each, the last partial block, the last stripe, then the merge),
/// specialised to a 4 KiB input and fed by unaligned raw-pointer loads.
///
/// # Safety
///
/// As [`xxh3_page`].
unsafe fn xxh3_page_portable(p: *const u8) -> u64 {
    let mut acc = ACC_INIT;
    for b in 0..BLOCKS {
        for s in 0..STRIPES_PER_BLOCK {
            // SAFETY: b * BLOCK + s * STRIPE + 64 <= BLOCKS * BLOCK <= PAGE_SIZE.
            unsafe { xxh3_stripe(&mut acc, p.add(b * BLOCK + s * STRIPE), s * 8) };
        }
        for (i, a) in acc.iter_mut().enumerate() {
            let mut v = *a;
            v ^= v >> 47;
            v ^= secret(SCRAMBLE_KEY + 8 * i);
            *a = v.wrapping_mul(P32_1);
        }
    }
    for s in 0..LAST_STRIPES {
        // SAFETY: BLOCKS * BLOCK + s * STRIPE + 64 < PAGE_SIZE for s < LAST_STRIPES.
        unsafe { xxh3_stripe(&mut acc, p.add(BLOCKS * BLOCK + s * STRIPE), s * 8) };
    }
    // SAFETY: the last 64 bytes of the page.
    unsafe { xxh3_stripe(&mut acc, p.add(PAGE_SIZE - STRIPE), LAST_STRIPE_KEY) };
    xxh3_merge(&acc)
}

/// XXH3's loop on 256-bit vectors: the eight accumulators in two registers, a stripe as
/// two loads.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi64, _mm256_loadu_si256, _mm256_mul_epu32, _mm256_set1_epi32,
        _mm256_shuffle_epi32, _mm256_slli_epi64, _mm256_srli_epi64, _mm256_storeu_si256,
        _mm256_xor_si256,
    };

    use super::{
        xxh3_merge, ACC_INIT, BLOCK, BLOCKS, LAST_STRIPES, LAST_STRIPE_KEY, P32_1, PAGE_SIZE,
        SCRAMBLE_KEY, STRIPE, STRIPES_PER_BLOCK, XXH3_SECRET,
    };

    /// One 64-byte stripe at `p` into the accumulators, keyed by the secret at `k`: per
    /// 64-bit lane, the lane's two 32-bit halves of (data ^ key) multiplied, plus the
    /// data of the neighbouring lane.
    ///
    /// # Safety
    ///
    /// AVX2; `p` and `k` start 64 readable bytes each.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn stripe(acc: &mut [__m256i; 2], p: *const u8, k: *const u8) {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: 32 bytes each at offset 0 or 32 of the 64 the caller vouches for;
            // unaligned loads, no reference formed.
            let (d, key) = unsafe {
                (
                    _mm256_loadu_si256(p.add(32 * i).cast()),
                    _mm256_loadu_si256(k.add(32 * i).cast()),
                )
            };
            let x = _mm256_xor_si256(d, key);
            let product = _mm256_mul_epu32(x, _mm256_shuffle_epi32::<0x31>(x));
            let swapped = _mm256_shuffle_epi32::<0x4E>(d);
            *a = _mm256_add_epi64(*a, _mm256_add_epi64(swapped, product));
        }
    }

    /// The scramble after each block: acc = (acc ^ acc >> 47 ^ key) * PRIME32_1.
    ///
    /// # Safety
    ///
    /// AVX2; `k` starts 64 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scramble(acc: &mut [__m256i; 2], k: *const u8) {
        let prime = _mm256_set1_epi32(P32_1 as i32);
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: 32 bytes at offset 0 or 32 of the 64 the caller vouches for.
            let key = unsafe { _mm256_loadu_si256(k.add(32 * i).cast()) };
            let v = _mm256_xor_si256(_mm256_xor_si256(*a, _mm256_srli_epi64::<47>(*a)), key);
            let lo = _mm256_mul_epu32(v, prime);
            let hi = _mm256_mul_epu32(_mm256_shuffle_epi32::<0x31>(v), prime);
            *a = _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi));
        }
    }

    /// xxh3 of the page at `p`, as [`super::xxh3_page_portable`] computes it.
    ///
    /// # Safety
    ///
    /// AVX2; `p` starts `PAGE_SIZE` readable bytes (their contents may change meanwhile).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn xxh3_page(p: *const u8) -> u64 {
        let sec = XXH3_SECRET.as_ptr();
        let mut acc = ACC_INIT;
        // SAFETY: 64 bytes of our array, as two unaligned loads.
        let mut v = unsafe {
            [
                _mm256_loadu_si256(acc.as_ptr().cast()),
                _mm256_loadu_si256(acc.as_ptr().add(4).cast()),
            ]
        };
        for b in 0..BLOCKS {
            for s in 0..STRIPES_PER_BLOCK {
                // SAFETY: the portable loop's offsets, inside the page; the key's 64
                // bytes end inside the secret (s * 8 + 64 <= 192).
                unsafe { stripe(&mut v, p.add(b * BLOCK + s * STRIPE), sec.add(s * 8)) };
            }
            // SAFETY: the secret's last 64 bytes.
            unsafe { scramble(&mut v, sec.add(SCRAMBLE_KEY)) };
        }
        for s in 0..LAST_STRIPES {
            // SAFETY: as in the blocks: inside the page and the secret.
            unsafe { stripe(&mut v, p.add(BLOCKS * BLOCK + s * STRIPE), sec.add(s * 8)) };
        }
        // SAFETY: the page's last 64 bytes, keyed by 64 bytes inside the secret; then
        // two stores into our array.
        unsafe {
            stripe(&mut v, p.add(PAGE_SIZE - STRIPE), sec.add(LAST_STRIPE_KEY));
            _mm256_storeu_si256(acc.as_mut_ptr().cast(), v[0]);
            _mm256_storeu_si256(acc.as_mut_ptr().add(4).cast(), v[1]);
        }
        xxh3_merge(&acc)
    }
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
            let want = content_hash(&page);
            proptest::prop_assert_eq!(m.hash_page(0, 0), want);
            // SAFETY: the page is a whole PAGE_SIZE buffer of ours.
            let portable = unsafe { xxh3_page_portable(page.as_ptr()) };
            proptest::prop_assert_eq!(portable, want);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: as above, on a CPU with AVX2.
                let vector = unsafe { avx2::xxh3_page(page.as_ptr()) };
                proptest::prop_assert_eq!(vector, want);
            }
        }
    }

    /// The loop the CPU runs is the one the property test checked: a machine without
    /// AVX2 would test only the portable loop, and say so here rather than pass quietly.
    #[test]
    fn the_vector_hash_runs_where_the_cpu_has_it() {
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("this CPU has no AVX2: only the portable page hash was tested");
            return;
        }
        let mut page = vec![0u8; PAGE_SIZE];
        page.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 7 + 3) as u8);
        // SAFETY: a whole page of ours.
        let (fast, portable) =
            unsafe { (xxh3_page(page.as_ptr()), xxh3_page_portable(page.as_ptr())) };
        assert_eq!(fast, content_hash(&page));
        assert_eq!(portable, content_hash(&page));
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

    /// Not a test: prints the page hash on raw pointers (the loop this CPU runs and the
    /// portable one) against the `xxhash-rust` slice hash of the same pages, on 1 and 4
    /// threads, over pages in memory (256 MiB per thread) and over 128 pages in cache
    /// (a batch), in the same run. Run with
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
        #[derive(Clone, Copy, PartialEq)]
        enum Hash {
            Raw,
            Portable,
            Slice,
        }
        let run = |threads: usize, how: Hash, window: usize| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for b in bufs.iter().take(threads) {
                    s.spawn(move || {
                        let mut x = 0u64;
                        for i in 0..PAGES {
                            let p = i % window;
                            let ptr = b[p * PAGE_SIZE / 8..].as_ptr().cast::<u8>();
                            x ^= if how == Hash::Raw {
                                // SAFETY: each page lies inside `b`.
                                unsafe { xxh3_page(ptr) }
                            } else if how == Hash::Portable {
                                // SAFETY: each page lies inside `b`.
                                unsafe { xxh3_page_portable(ptr) }
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
            for (what, window) in [("memory", PAGES), ("cache", 128)] {
                println!(
                    "round {round}, pages in {what}: 1 thread raw {:.1} GB/s, portable {:.1}, slice {:.1} | 4 threads raw {:.1}, portable {:.1}, slice {:.1}",
                    run(1, Hash::Raw, window),
                    run(1, Hash::Portable, window),
                    run(1, Hash::Slice, window),
                    run(4, Hash::Raw, window),
                    run(4, Hash::Portable, window),
                    run(4, Hash::Slice, window)
                );
            }
        }
    }
}
