//! Zero-filled arrays of atomic words that cost memory only where they are written.
//!
//! The engine's per-page bookkeeping (the dirty bitmaps, the digest's terms) is sized by
//! guest RAM, but the entries of pages nothing ever sent or dirtied stay zero. These
//! arrays live in anonymous private mappings, which the kernel fills with zeros on first
//! touch: reading a word never written maps the shared zero page, and only a written
//! word's page becomes resident. A 1 TiB guest's 32 MiB bitmap costs nothing until bits
//! are set, whatever the allocator would have done with a zeroed allocation of that size.
//! The mappings are `MAP_NORESERVE`, like guest RAM itself: an array may be far larger
//! than what is ever touched, and does not count against the commit limit for its size.

use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// `len` atomic words, all zero when created.
pub(crate) struct ZeroedWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and only reached through `&[AtomicU64]`,
// whose elements are safe to share and use from any thread.
unsafe impl Send for ZeroedWords {}
// SAFETY: as for `Send`: shared access is only ever to atomics.
unsafe impl Sync for ZeroedWords {}

impl ZeroedWords {
    pub fn new(len: usize) -> Self {
        if len == 0 {
            return Self {
                ptr: NonNull::dangling(),
                len: 0,
            };
        }
        let bytes = len
            .checked_mul(std::mem::size_of::<AtomicU64>())
            .expect("word array size overflows usize");
        // SAFETY: a new anonymous mapping at an address the kernel chooses; it affects no
        // memory that exists.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let layout = std::alloc::Layout::array::<AtomicU64>(len).expect("word array layout");
            std::alloc::handle_alloc_error(layout);
        }
        Self {
            ptr: NonNull::new(p.cast()).expect("mmap returned a null mapping"),
            len,
        }
    }
}

impl Deref for ZeroedWords {
    type Target = [AtomicU64];

    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` starts `len` words of a live, page-aligned mapping (or is dangling
        // with `len` 0); all-zero bytes are valid `AtomicU64`s, and the memory is only ever
        // accessed through atomics.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for ZeroedWords {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: unmapping exactly the mapping made in `new`; no reference into it
        // outlives `self`.
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * 8) };
        debug_assert_eq!(r, 0, "munmap of a word array");
    }
}

impl std::fmt::Debug for ZeroedWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroedWords")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn words_start_zero_and_keep_what_is_stored() {
        let w = ZeroedWords::new(1000);
        assert_eq!(w.len(), 1000);
        assert!(w.iter().all(|x| x.load(Ordering::Relaxed) == 0));
        w[999].store(7, Ordering::Relaxed);
        assert_eq!(w[999].load(Ordering::Relaxed), 7);
        assert!(ZeroedWords::new(0).is_empty());
    }
}
