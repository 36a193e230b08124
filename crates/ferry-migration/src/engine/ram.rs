//! Reading guest pages: the engine's only dereferences of guest memory.

use super::bitmap::DirtyBitmap;
use super::digest::full_digest;
use super::vm::GuestRam;
use crate::PAGE_SIZE;

/// A guest page as a byte slice.
///
/// # Safety
///
/// `ptr` must start `PAGE_SIZE` mapped, readable bytes that stay mapped while the slice
/// is used. The guest may change them meanwhile: callers only hash or test what they
/// read and rely on the dirty log to send a page again if it changed.
#[inline]
pub(crate) unsafe fn page_slice<'a>(ptr: *const u8) -> &'a [u8] {
    // SAFETY: forwarded to the caller's contract.
    unsafe { std::slice::from_raw_parts(ptr, PAGE_SIZE) }
}

/// True when every byte of the page is zero. Reads 64 bytes at a time so the common
/// non-zero page is rejected after its first cache line.
#[inline]
pub(crate) fn page_is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|line| {
        line.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
        }) == 0
    })
}

/// Digest of all of guest memory; pages the backend reports unpopulated count as zero
/// without being read. Only called with the guest stopped.
pub(crate) fn full_memory_digest(ram: &dyn GuestRam) -> u64 {
    let blocks = ram.blocks();
    let pages: Vec<usize> = blocks.iter().map(|b| b.pages()).collect();
    let populated: Vec<DirtyBitmap> = pages
        .iter()
        .enumerate()
        .map(|(b, &n)| {
            let bm = DirtyBitmap::new(n);
            ram.populated(b, &bm);
            bm
        })
        .collect();
    let bases: Vec<*mut u8> = (0..blocks.len()).map(|b| ram.host_ptr(b)).collect();
    full_digest(&pages, |b, p| {
        populated[b].is_set(p).then(|| {
            // SAFETY: p < pages of block b, inside the mapping; the guest is stopped.
            unsafe { page_slice(bases[b].add(p * PAGE_SIZE)) }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_sees_the_last_byte() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(page_is_zero(&p));
        p[PAGE_SIZE - 1] = 1;
        assert!(!page_is_zero(&p));
    }
}
