//! The integrity digest of guest memory carried by the end of stream.
//!
//! Each page contributes a term `page_term(global page number, hash of its bytes)`, and
//! the digest is the wrapping sum of the terms of every page sent. Both sides keep the
//! term each page last contributed; re-sending a page subtracts its old term and adds
//! the new one. The cost is one hash per page sent and 8 bytes of memory per page, with
//! nothing left to do at switchover, so the check adds no downtime in proportion to RAM.
//!
//! What it proves: the destination applied, for every page, exactly the last copy the
//! source sent. A stale copy that lands after a newer one (the multifd hazard) leaves the
//! stale term in the destination's sum, and the sums differ. It does not look at pages
//! never sent; the opt-in full verification ([`full_digest`]) hashes all of memory on both
//! sides at switchover for that, at a cost in downtime.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use super::zeroed::ZeroedWords;
use crate::PAGE_SIZE;

/// xxh3 of a page of zeros, the content hash every zero page has.
pub fn zero_page_hash() -> u64 {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| xxh3_64(&ZERO))
}

/// Hash of a page's bytes.
#[inline]
pub fn content_hash(page: &[u8]) -> u64 {
    xxh3_64(page)
}

/// A page's term: its content hash bound to its position, so equal pages at different
/// addresses contribute differently and swapped pages are caught.
#[inline]
pub fn page_term(global_page: u64, content: u64) -> u64 {
    // splitmix64 finaliser over the combination.
    let mut z = content ^ global_page.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The running digest and the term each page contributes, for one side.
///
/// Shared by the channel threads of a multifd migration: a page is in at most one packet
/// at a time (the sync barrier orders its copies), so the swap of its slot never races
/// with another update of the same page, and the sum is a wrapping atomic add, which
/// commutes.
#[derive(Debug)]
pub struct PageDigest {
    /// Per block: the term of each page, 0 for a page never sent. Zero-filled on first
    /// touch, so the terms of pages never sent cost no memory.
    terms: Vec<ZeroedWords>,
    /// Global page number of each block's first page.
    base: Vec<u64>,
    sum: AtomicU64,
}

impl PageDigest {
    /// `block_pages[i]` pages in block i.
    pub fn new(block_pages: &[usize]) -> Self {
        let mut base = Vec::with_capacity(block_pages.len());
        let mut next = 0u64;
        for &p in block_pages {
            base.push(next);
            next += p as u64;
        }
        let terms = block_pages.iter().map(|&p| ZeroedWords::new(p)).collect();
        Self {
            terms,
            base,
            sum: AtomicU64::new(0),
        }
    }

    /// Records that `page` of `block` now holds bytes hashing to `content`.
    #[inline]
    pub fn update(&self, block: usize, page: usize, content: u64) {
        self.sum
            .fetch_add(self.replace(block, page, content), Ordering::Relaxed);
    }

    /// Records pages of `block`, each with the hash of its bytes, with one update of the
    /// sum for all of them. The channel threads share the sum's cache line: updated once
    /// per page, it moved between the cores at every page of a multifd migration.
    #[inline]
    pub fn update_all(&self, block: usize, pages: impl IntoIterator<Item = (usize, u64)>) {
        let delta = pages.into_iter().fold(0u64, |acc, (page, content)| {
            acc.wrapping_add(self.replace(block, page, content))
        });
        self.sum.fetch_add(delta, Ordering::Relaxed);
    }

    /// Puts the page's new term in its slot; returns what the sum must add.
    #[inline]
    fn replace(&self, block: usize, page: usize, content: u64) -> u64 {
        let term = page_term(self.base[block] + page as u64, content);
        let old = self.terms[block][page].swap(term, Ordering::Relaxed);
        term.wrapping_sub(old)
    }

    /// The digest. Exact once every thread that updated it has been joined or has
    /// synchronised with the caller (a channel's flush does).
    pub fn value(&self) -> u64 {
        self.sum.load(Ordering::Acquire)
    }
}

/// Digest of the whole of guest memory: every page's term, zero pages included, where
/// `page_hash(block, index)` yields the page's content hash, or `None` for a page known
/// to be zero without reading it.
pub fn full_digest(
    block_pages: &[usize],
    mut page_hash: impl FnMut(usize, usize) -> Option<u64>,
) -> u64 {
    let zero = zero_page_hash();
    let mut sum = 0u64;
    let mut global = 0u64;
    for (b, &pages) in block_pages.iter().enumerate() {
        for p in 0..pages {
            let h = page_hash(b, p).unwrap_or(zero);
            sum = sum.wrapping_add(page_term(global, h));
            global += 1;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resending_a_page_replaces_its_term() {
        let a = PageDigest::new(&[4]);
        let b = PageDigest::new(&[4]);
        a.update(0, 1, 10);
        a.update(0, 1, 20);
        b.update(0, 1, 20);
        assert_eq!(a.value(), b.value());
    }

    #[test]
    fn a_stale_copy_applied_last_changes_the_digest() {
        let src = PageDigest::new(&[4]);
        let dst = PageDigest::new(&[4]);
        src.update(0, 2, 1);
        src.update(0, 2, 2);
        dst.update(0, 2, 2);
        dst.update(0, 2, 1);
        assert_ne!(src.value(), dst.value());
    }

    #[test]
    fn a_batch_update_equals_its_pages_one_by_one() {
        let one = PageDigest::new(&[8, 8]);
        let all = PageDigest::new(&[8, 8]);
        for (p, h) in [(1, 10), (3, 11), (1, 12)] {
            one.update(1, p, h);
        }
        all.update_all(1, [(1, 10), (3, 11)]);
        all.update_all(1, [(1, 12)]);
        assert_eq!(one.value(), all.value());
        assert_ne!(all.value(), 0);
    }

    #[test]
    fn pages_are_bound_to_their_position() {
        let a = PageDigest::new(&[2, 2]);
        let b = PageDigest::new(&[2, 2]);
        a.update(0, 0, 5);
        a.update(1, 1, 6);
        b.update(0, 0, 6);
        b.update(1, 1, 5);
        assert_ne!(a.value(), b.value());
    }
}
