//! A page bitmap that many threads may set bits in while one harvests it.
//!
//! The engine keeps its "pages still to send" set in one of these, and the soft backend
//! uses one as its dirty log. Harvesting swaps whole words, so a bit set concurrently is
//! either taken by this harvest or left for the next one, never lost.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: usize,
}

impl DirtyBitmap {
    pub fn new(pages: usize) -> Self {
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { words, pages }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn words(&self) -> usize {
        self.words.len()
    }

    #[inline]
    pub fn set(&self, page: usize) {
        debug_assert!(page < self.pages);
        self.words[page / 64].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    #[inline]
    pub fn is_set(&self, page: usize) -> bool {
        self.words[page / 64].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    #[inline]
    pub fn clear(&self, page: usize) {
        self.words[page / 64].fetch_and(!(1 << (page % 64)), Ordering::Relaxed);
    }

    /// Sets every page.
    pub fn set_all(&self) {
        for (i, w) in self.words.iter().enumerate() {
            w.store(Self::valid_mask(self.pages, i), Ordering::Relaxed);
        }
    }

    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Reads word `i` without changing it.
    #[inline]
    pub fn word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Relaxed)
    }

    /// ORs `bits` into word `i`.
    #[inline]
    pub fn or_word(&self, i: usize, bits: u64) {
        if bits != 0 {
            self.words[i].fetch_or(bits & Self::valid_mask(self.pages, i), Ordering::Relaxed);
        }
    }

    /// Takes word `i`, leaving it zero.
    #[inline]
    pub fn take_word(&self, i: usize) -> u64 {
        self.words[i].swap(0, Ordering::AcqRel)
    }

    /// Moves every set bit of `self` into `into` and clears `self`.
    pub fn drain_into(&self, into: &DirtyBitmap) {
        assert_eq!(self.pages, into.pages, "bitmaps of different sizes");
        for i in 0..self.words.len() {
            let bits = self.take_word(i);
            into.or_word(i, bits);
        }
    }

    /// ORs every set bit of `from` into `self`, leaving `from` unchanged.
    pub fn or_from(&self, from: &DirtyBitmap) {
        assert_eq!(self.pages, from.pages, "bitmaps of different sizes");
        for i in 0..self.words.len() {
            self.or_word(i, from.word(i));
        }
    }

    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }

    fn valid_mask(pages: usize, word: usize) -> u64 {
        let first = word * 64;
        if first + 64 <= pages {
            u64::MAX
        } else {
            (1u64 << (pages - first)) - 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_all_stops_at_the_last_page() {
        let b = DirtyBitmap::new(70);
        b.set_all();
        assert_eq!(b.count(), 70);
    }

    #[test]
    fn drain_moves_bits_and_clears_the_source() {
        let a = DirtyBitmap::new(130);
        let b = DirtyBitmap::new(130);
        a.set(0);
        a.set(129);
        b.set(64);
        a.drain_into(&b);
        assert_eq!(a.count(), 0);
        assert!(b.is_set(0) && b.is_set(64) && b.is_set(129));
        assert_eq!(b.count(), 3);
    }
}
