//! A page bitmap that many threads may set bits in while one harvests it.
//!
//! The engine keeps its "pages still to send" set in one of these, and the soft backend
//! uses one as its dirty log. Harvesting swaps whole words, so a bit set concurrently is
//! either taken by this harvest or left for the next one, never lost.
//!
//! # What it costs
//!
//! Nothing in proportion to guest RAM while nothing is set, so that an idle guest of a
//! terabyte migrates as fast as one of a gigabyte:
//!
//! * the words live in memory the kernel zero-fills on first touch ([`ZeroedWords`]), and
//!   no operation stores to a word that is and stays zero: the words of pages never set
//!   are never resident;
//! * a summary holds one bit per *group* of [`GROUP_WORDS`] words ([`GROUP_PAGES`] pages,
//!   16 MiB of guest RAM), set whenever a bit of the group may be set. Every scan (taking
//!   pages, draining, counting, copying, clearing) visits only marked groups: an empty
//!   bitmap of 1 TiB is 1024 summary words.
//!
//! # Why no bit is lost
//!
//! A setter sets the page's bit, then marks its group. A harvester clears a group's mark,
//! then takes (swaps out) the group's words. All four are sequentially consistent, so
//! if a setter's bit lands after the harvester took its word, the setter's mark comes
//! after the harvester cleared the mark: the group stays marked and the next harvest
//! takes the bit. A setter skips marking a group it sees marked; that load is ordered
//! after its bit too, so it can only see a mark set after a harvester cleared it, which
//! the next harvest honours. Between a setter's bit and its mark, a harvest may miss the
//! bit: it is left for the next one, as a bit set a moment later would be.
//!
//! Marks may be stale the other way (a marked group with no bit set: a bit cleared with
//! [`DirtyBitmap::clear`] or taken with [`DirtyBitmap::take_word`]); that costs one look
//! at the group, never a page.

use std::sync::atomic::Ordering::SeqCst;

use super::zeroed::ZeroedWords;

/// Words per summary bit.
pub const GROUP_WORDS: usize = 64;
/// Pages per summary bit.
pub const GROUP_PAGES: usize = GROUP_WORDS * 64;

/// One bit per page, with a summary bit per [`GROUP_PAGES`] pages.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: ZeroedWords,
    /// One bit per group of [`GROUP_WORDS`] words.
    summary: ZeroedWords,
    pages: usize,
}

impl DirtyBitmap {
    pub fn new(pages: usize) -> Self {
        let words = pages.div_ceil(64);
        let groups = words.div_ceil(GROUP_WORDS);
        Self {
            words: ZeroedWords::new(words),
            summary: ZeroedWords::new(groups.div_ceil(64)),
            pages,
        }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Groups of [`GROUP_WORDS`] words, the last one possibly shorter.
    pub fn groups(&self) -> usize {
        self.words.len().div_ceil(GROUP_WORDS)
    }

    /// Marks the group of word `i` as possibly holding set bits. Called after the bits
    /// are set (see the module docs).
    #[inline]
    fn mark(&self, i: usize) {
        let g = i / GROUP_WORDS;
        let (s, bit) = (&self.summary[g / 64], 1u64 << (g % 64));
        if s.load(SeqCst) & bit == 0 {
            s.fetch_or(bit, SeqCst);
        }
    }

    #[inline]
    pub fn set(&self, page: usize) {
        debug_assert!(page < self.pages);
        self.words[page / 64].fetch_or(1 << (page % 64), SeqCst);
        self.mark(page / 64);
    }

    #[inline]
    pub fn is_set(&self, page: usize) -> bool {
        self.words[page / 64].load(SeqCst) & (1 << (page % 64)) != 0
    }

    #[inline]
    pub fn clear(&self, page: usize) {
        let w = &self.words[page / 64];
        let bit = 1 << (page % 64);
        if w.load(SeqCst) & bit != 0 {
            w.fetch_and(!bit, SeqCst);
        }
    }

    /// Sets `count` pages from `first` on, a word at a time.
    pub fn set_range(&self, first: usize, count: usize) {
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.pages)
            .unwrap_or_else(|| {
                panic!(
                    "pages {first}..+{count} outside a bitmap of {} pages",
                    self.pages
                )
            });
        let mut p = first;
        while p < end {
            let lo = p % 64;
            let n = (64 - lo).min(end - p);
            let bits = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            self.or_word(p / 64, bits);
            p += n;
        }
    }

    /// Sets every page.
    pub fn set_all(&self) {
        for (i, w) in self.words.iter().enumerate() {
            w.store(Self::valid_mask(self.pages, i), SeqCst);
        }
        let groups = self.groups();
        for (k, s) in self.summary.iter().enumerate() {
            s.store(Self::valid_mask(groups, k), SeqCst);
        }
    }

    /// Clears every page, storing only to words that hold bits.
    pub fn clear_all(&self) {
        self.each_marked_group(|g| {
            self.unmark(g);
            for w in &self.words[self.group_words(g)] {
                if w.load(SeqCst) != 0 {
                    w.store(0, SeqCst);
                }
            }
        });
    }

    /// Reads word `i` without changing it.
    #[inline]
    pub fn word(&self, i: usize) -> u64 {
        self.words[i].load(SeqCst)
    }

    /// ORs `bits` into word `i`.
    #[inline]
    pub fn or_word(&self, i: usize, bits: u64) {
        if bits == 0 {
            return;
        }
        let bits = bits & Self::valid_mask(self.pages, i);
        if bits != 0 {
            self.words[i].fetch_or(bits, SeqCst);
            self.mark(i);
        }
    }

    /// Takes word `i`, leaving it zero. A zero word is read, not written.
    #[inline]
    pub fn take_word(&self, i: usize) -> u64 {
        let w = &self.words[i];
        if w.load(SeqCst) == 0 {
            return 0;
        }
        w.swap(0, SeqCst)
    }

    /// The first group at or after `g` that may hold set bits.
    pub fn next_marked_group(&self, g: usize) -> Option<usize> {
        let groups = self.groups();
        let mut g = g;
        while g < groups {
            let s = self.summary[g / 64].load(SeqCst) >> (g % 64);
            if s != 0 {
                let found = g + s.trailing_zeros() as usize;
                debug_assert!(found < groups, "a summary bit past the last group");
                return Some(found);
            }
            g = (g / 64 + 1) * 64;
        }
        None
    }

    /// Takes every bit of group `g`, leaving it clear: word `k` of the group into
    /// `out[k]` (0 past the bitmap's last word). Returns whether any bit was set.
    pub fn take_group(&self, g: usize, out: &mut [u64; GROUP_WORDS]) -> bool {
        self.unmark(g);
        let range = self.group_words(g);
        let first = range.start;
        let mut any = 0;
        for (k, o) in out.iter_mut().enumerate() {
            *o = if range.contains(&(first + k)) {
                self.take_word(first + k)
            } else {
                0
            };
            any |= *o;
        }
        any != 0
    }

    /// Calls `f(i, bits)` for every non-zero word `i`, in ascending order, leaving the
    /// bitmap unchanged. Visits marked groups only.
    pub fn for_each_word(&self, mut f: impl FnMut(usize, u64)) {
        self.each_marked_group(|g| {
            for i in self.group_words(g) {
                let bits = self.word(i);
                if bits != 0 {
                    f(i, bits);
                }
            }
        });
    }

    /// Calls `f(first, pages)` for every run of set pages, in ascending order, runs
    /// fewer than `gap` clear pages apart merged into one (the clear pages between them
    /// counted in), leaving the bitmap unchanged.
    pub fn extents(&self, gap: u64, mut f: impl FnMut(u64, u64)) {
        let mut cur: Option<(u64, u64)> = None;
        self.for_each_word(|i, mut bits| {
            let base = i as u64 * 64;
            while bits != 0 {
                let tz = u64::from(bits.trailing_zeros());
                let rest = bits >> tz;
                let len = if rest == u64::MAX {
                    64
                } else {
                    u64::from((!rest).trailing_zeros())
                };
                let (s, e) = (base + tz, base + tz + len);
                match &mut cur {
                    Some((_, end)) if s <= *end + gap => *end = e,
                    _ => {
                        if let Some((first, end)) = cur.replace((s, e)) {
                            f(first, end - first);
                        }
                    }
                }
                bits = if tz + len >= 64 {
                    0
                } else {
                    bits & !(((1u64 << len) - 1) << tz)
                };
            }
        });
        if let Some((first, end)) = cur {
            f(first, end - first);
        }
    }

    /// Moves every set bit of `self` into `into` and clears `self`.
    pub fn drain_into(&self, into: &DirtyBitmap) {
        assert_eq!(self.pages, into.pages, "bitmaps of different sizes");
        let mut buf = [0u64; GROUP_WORDS];
        self.each_marked_group(|g| {
            if self.take_group(g, &mut buf) {
                for (k, &bits) in buf.iter().enumerate() {
                    into.or_word(g * GROUP_WORDS + k, bits);
                }
            }
        });
    }

    /// ORs every set bit of `from` into `self`, leaving `from` unchanged.
    pub fn or_from(&self, from: &DirtyBitmap) {
        assert_eq!(self.pages, from.pages, "bitmaps of different sizes");
        from.for_each_word(|i, bits| self.or_word(i, bits));
    }

    pub fn count(&self) -> usize {
        let mut n = 0;
        self.for_each_word(|_, bits| n += bits.count_ones() as usize);
        n
    }

    /// Calls `f` with each marked group in ascending order. A group marked while this
    /// runs is visited if it lies ahead.
    fn each_marked_group(&self, mut f: impl FnMut(usize)) {
        let mut g = 0;
        while let Some(m) = self.next_marked_group(g) {
            f(m);
            g = m + 1;
        }
    }

    fn unmark(&self, g: usize) {
        self.summary[g / 64].fetch_and(!(1u64 << (g % 64)), SeqCst);
    }

    fn group_words(&self, g: usize) -> std::ops::Range<usize> {
        let first = g * GROUP_WORDS;
        first..(first + GROUP_WORDS).min(self.words.len())
    }

    /// The bits of word `word` that stand for one of `bits` bits in all.
    fn valid_mask(bits: usize, word: usize) -> u64 {
        let first = word * 64;
        if first + 64 <= bits {
            u64::MAX
        } else {
            (1u64 << (bits - first)) - 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    fn pages_of(b: &DirtyBitmap) -> Vec<usize> {
        let mut v = Vec::new();
        b.for_each_word(|i, mut bits| {
            while bits != 0 {
                v.push(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        });
        v
    }

    #[test]
    fn set_all_stops_at_the_last_page() {
        let b = DirtyBitmap::new(70);
        b.set_all();
        assert_eq!(b.count(), 70);
        let b = DirtyBitmap::new(GROUP_PAGES * 65 + 3);
        b.set_all();
        assert_eq!(b.count(), GROUP_PAGES * 65 + 3);
        assert_eq!(b.next_marked_group(65), Some(65));
        assert_eq!(b.next_marked_group(66), None);
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

    #[test]
    fn only_groups_with_bits_are_marked() {
        let b = DirtyBitmap::new(1 << 28);
        assert_eq!(b.next_marked_group(0), None);
        b.set(5 * GROUP_PAGES + 7);
        b.set_range(200 * GROUP_PAGES - 1, 2);
        assert_eq!(b.next_marked_group(0), Some(5));
        assert_eq!(b.next_marked_group(6), Some(199));
        assert_eq!(b.next_marked_group(200), Some(200));
        assert_eq!(b.next_marked_group(201), None);
        assert_eq!(b.count(), 3);
        b.clear_all();
        assert_eq!(b.next_marked_group(0), None);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn set_range_sets_exactly_the_range() {
        let b = DirtyBitmap::new(1000);
        b.set_range(3, 0);
        assert_eq!(b.count(), 0);
        b.set_range(60, 200);
        assert_eq!(pages_of(&b), (60..260).collect::<Vec<_>>());
        b.set_range(999, 1);
        assert!(b.is_set(999));
    }

    #[test]
    #[should_panic(expected = "outside a bitmap")]
    fn set_range_past_the_end_panics() {
        DirtyBitmap::new(100).set_range(90, 11);
    }

    #[test]
    fn take_group_takes_every_word_of_the_group() {
        let b = DirtyBitmap::new(GROUP_PAGES + 100);
        b.set(0);
        b.set(GROUP_PAGES - 1);
        b.set(GROUP_PAGES + 99);
        let mut out = [0; GROUP_WORDS];
        assert!(b.take_group(0, &mut out));
        assert_eq!(out[0], 1);
        assert_eq!(out[GROUP_WORDS - 1], 1 << 63);
        assert!(b.take_group(1, &mut out));
        assert_eq!(out[1], 1 << 35);
        assert!(out[2..].iter().all(|&w| w == 0));
        assert_eq!(b.count(), 0);
        assert!(!b.take_group(1, &mut out));
    }

    #[test]
    fn a_bit_set_while_a_harvester_drains_is_never_lost() {
        use std::sync::atomic::AtomicBool;
        const PAGES: usize = GROUP_PAGES * 8;
        let log = DirtyBitmap::new(PAGES);
        let into = DirtyBitmap::new(PAGES);
        let done = AtomicBool::new(false);
        let mut expected = vec![false; PAGES];
        std::thread::scope(|s| {
            let setter = s.spawn(|| {
                let mut set = Vec::new();
                let mut x = 0x9E37_79B9_7F4A_7C15u64;
                for _ in 0..200_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = x as usize % PAGES;
                    log.set(p);
                    set.push(p);
                }
                done.store(true, SeqCst);
                set
            });
            while !done.load(SeqCst) {
                log.drain_into(&into);
            }
            for p in setter.join().unwrap() {
                expected[p] = true;
            }
        });
        log.drain_into(&into);
        let want: Vec<usize> = (0..PAGES).filter(|&p| expected[p]).collect();
        assert_eq!(pages_of(&into), want);
        assert_eq!(log.count(), 0);
    }

    /// What the bitmap does, written the obvious way.
    #[derive(Debug, Clone)]
    enum Op {
        Set(usize),
        Clear(usize),
        SetRange(usize, usize),
        OrWord(usize, u64),
        TakeWord(usize),
        TakeGroup(usize),
        DrainInto,
        OrFrom,
        ClearAll,
        SetAll,
    }

    fn op(pages: usize) -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let words = pages.div_ceil(64);
        let groups = words.div_ceil(GROUP_WORDS);
        prop_oneof![
            8 => (0..pages).prop_map(Op::Set),
            2 => (0..pages).prop_map(Op::Clear),
            3 => (0..pages, 0usize..3 * GROUP_PAGES)
                .prop_map(move |(f, n)| Op::SetRange(f, n.min(pages - f))),
            2 => (0..words, any::<u64>()).prop_map(|(i, b)| Op::OrWord(i, b)),
            2 => (0..words).prop_map(Op::TakeWord),
            2 => (0..groups).prop_map(Op::TakeGroup),
            1 => Just(Op::DrainInto),
            1 => Just(Op::OrFrom),
            1 => Just(Op::ClearAll),
            1 => Just(Op::SetAll),
        ]
    }

    fn bits_of(model: &[bool], word: usize) -> u64 {
        (0..64)
            .filter(|k| model.get(word * 64 + k).copied().unwrap_or(false))
            .fold(0, |w, k| w | 1 << k)
    }

    proptest::proptest! {
        /// The bitmap against two `Vec<bool>`s (itself and a second bitmap that
        /// `drain_into` and `or_from` work with): after every operation, the same pages
        /// are set, scans that skip unmarked groups see all of them, and what a take
        /// returns is what the model held.
        #[test]
        fn the_bitmap_behaves_like_a_set_of_pages(
            (pages, ops) in (1usize..4 * GROUP_PAGES + 200)
                .prop_flat_map(|p| (proptest::strategy::Just(p), proptest::collection::vec(op(p), 1..60)))
        ) {
            let b = DirtyBitmap::new(pages);
            let other = DirtyBitmap::new(pages);
            let mut m = vec![false; pages];
            let mut mo = vec![false; pages];
            for o in ops {
                match o {
                    Op::Set(p) => { b.set(p); m[p] = true; }
                    Op::Clear(p) => { b.clear(p); m[p] = false; }
                    Op::SetRange(f, n) => { b.set_range(f, n); m[f..f + n].fill(true); }
                    Op::OrWord(i, bits) => {
                        b.or_word(i, bits);
                        for k in 0..64 {
                            if bits & 1 << k != 0 && i * 64 + k < pages { m[i * 64 + k] = true; }
                        }
                    }
                    Op::TakeWord(i) => {
                        proptest::prop_assert_eq!(b.take_word(i), bits_of(&m, i));
                        for k in 0..64 { if let Some(x) = m.get_mut(i * 64 + k) { *x = false; } }
                    }
                    Op::TakeGroup(g) => {
                        let mut out = [0; GROUP_WORDS];
                        let any = b.take_group(g, &mut out);
                        for (k, &w) in out.iter().enumerate() {
                            proptest::prop_assert_eq!(w, bits_of(&m, g * GROUP_WORDS + k));
                        }
                        proptest::prop_assert_eq!(any, out.iter().any(|&w| w != 0));
                        let first = g * GROUP_PAGES;
                        let end = (first + GROUP_PAGES).min(pages);
                        m[first..end].fill(false);
                    }
                    Op::DrainInto => {
                        b.drain_into(&other);
                        for p in 0..pages { mo[p] |= m[p]; m[p] = false; }
                    }
                    Op::OrFrom => {
                        b.or_from(&other);
                        for p in 0..pages { m[p] |= mo[p]; }
                    }
                    Op::ClearAll => { b.clear_all(); m.fill(false); }
                    Op::SetAll => { b.set_all(); m.fill(true); }
                }
                let want: Vec<usize> = (0..pages).filter(|&p| m[p]).collect();
                proptest::prop_assert_eq!(pages_of(&b), want.clone());
                proptest::prop_assert_eq!(b.count(), want.len());
                let want_other: Vec<usize> = (0..pages).filter(|&p| mo[p]).collect();
                proptest::prop_assert_eq!(pages_of(&other), want_other);
                for p in [0, pages / 2, pages - 1] {
                    proptest::prop_assert_eq!(b.is_set(p), m[p]);
                }
            }
            // Extents: the model's runs, merged across gaps of fewer than `gap` pages.
            for gap in [0u64, 1, 16, 100] {
                let mut want: Vec<(u64, u64)> = Vec::new();
                for p in (0..pages).filter(|&p| m[p]) {
                    let p = p as u64;
                    match want.last_mut() {
                        Some((f, n)) if p <= *f + *n + gap => *n = p + 1 - *f,
                        _ => want.push((p, 1)),
                    }
                }
                let mut got = Vec::new();
                b.extents(gap, |f, n| got.push((f, n)));
                proptest::prop_assert_eq!(got, want);
            }
            // The picker's way through: marked groups, taken whole.
            let mut taken = Vec::new();
            let mut g = 0;
            let mut out = [0; GROUP_WORDS];
            while let Some(n) = b.next_marked_group(g) {
                b.take_group(n, &mut out);
                for (k, &w) in out.iter().enumerate() {
                    for bit in 0..64 {
                        if w & 1 << bit != 0 { taken.push((n * GROUP_WORDS + k) * 64 + bit); }
                    }
                }
                g = n + 1;
            }
            let want: Vec<usize> = (0..pages).filter(|&p| m[p]).collect();
            proptest::prop_assert_eq!(taken, want);
            proptest::prop_assert_eq!(b.count(), 0);
        }
    }
}
