//! [`HeapRam`]: guest RAM on the heap for test VMs, one page-aligned zeroed allocation per
//! block, with the bookkeeping `GuestRam::populated` needs. [`super::RefVm`] runs on it,
//! and so do the engine's own test VM and fuzz targets.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::engine::bitmap::DirtyBitmap;
use crate::engine::vm::{GuestRam, RamBlock, VmError};
use crate::PAGE_SIZE;

/// One page-aligned, zeroed heap allocation standing in for a RAM block.
struct Region {
    ptr: NonNull<u8>,
    layout: Layout,
}

/// Regions of RAM that was dropped, zeroed again, for the next on the same thread: a
/// fuzz target builds a VM per execution, and fresh memory costs it page faults.
struct Spare(Vec<(NonNull<u8>, Layout)>);

impl Drop for Spare {
    fn drop(&mut self) {
        for &(ptr, layout) in &self.0 {
            // SAFETY: allocated in `Region::new` with this layout, owned by the pool.
            unsafe { dealloc(ptr.as_ptr(), layout) }
        }
    }
}

thread_local! {
    static SPARE: RefCell<Spare> = const { RefCell::new(Spare(Vec::new())) };
}

impl Region {
    fn new(pages: usize) -> Self {
        assert!(pages > 0, "a RAM block has at least one page");
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE)
            .expect("a page-aligned layout of a few pages");
        let spare = SPARE
            .try_with(|s| {
                let mut s = s.borrow_mut();
                let i = s.0.iter().position(|r| r.1 == layout)?;
                Some(s.0.swap_remove(i).0)
            })
            .ok()
            .flatten();
        if let Some(ptr) = spare {
            return Self { ptr, layout };
        }
        // SAFETY: the layout has a non-zero size (at least one page).
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| handle_alloc_error(layout));
        Self { ptr, layout }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        const KEEP: usize = 4;
        let (ptr, layout) = (self.ptr, self.layout);
        let kept = SPARE
            .try_with(|s| {
                let mut s = s.borrow_mut();
                if s.0.len() >= KEEP {
                    return false;
                }
                // SAFETY: the whole allocation, which nothing else uses any more.
                unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, layout.size()) };
                s.0.push((ptr, layout));
                true
            })
            .unwrap_or(false);
        if !kept {
            // SAFETY: allocated in `Region::new` with this layout, freed only here.
            unsafe { dealloc(ptr.as_ptr(), layout) }
        }
    }
}

// SAFETY: a Region owns its allocation and Rust code never holds a reference into it:
// every access is a raw-pointer copy (by `HeapRam`, or by the engine and the kernel
// through `host_ptr`), so moving it to or sharing it with another thread is sound.
unsafe impl Send for Region {}
// SAFETY: as for `Send`.
unsafe impl Sync for Region {}

/// Guest RAM on the heap (see the module docs).
pub struct HeapRam {
    blocks: Vec<RamBlock>,
    regions: Vec<Region>,
    /// Pages ever written through [`HeapRam::write`] or [`HeapRam::write_page`], even
    /// with zeros: reported populated, like a backend that knows which pages were ever
    /// faulted in.
    touched: Vec<DirtyBitmap>,
    /// What [`GuestRam::populated_is_exact`] answers (true unless a test says otherwise).
    exact: AtomicBool,
}

impl std::fmt::Debug for HeapRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeapRam")
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

impl HeapRam {
    /// RAM of blocks `(name, guest-physical address, pages)`, all zero.
    pub fn new(layout: &[(&str, u64, usize)]) -> Self {
        Self {
            blocks: layout
                .iter()
                .map(|&(name, gpa, pages)| RamBlock {
                    name: name.into(),
                    gpa,
                    size: (pages * PAGE_SIZE) as u64,
                })
                .collect(),
            regions: layout.iter().map(|&(_, _, p)| Region::new(p)).collect(),
            touched: layout
                .iter()
                .map(|&(_, _, p)| DirtyBitmap::new(p))
                .collect(),
            exact: AtomicBool::new(true),
        }
    }

    /// Makes [`GuestRam::populated_is_exact`] answer `exact`: false stands in for a
    /// backend whose scan could not tell and marked every page it reports.
    pub fn set_populated_exact(&self, exact: bool) {
        self.exact.store(exact, Ordering::Relaxed);
    }

    fn page_ptr(&self, block: usize, page: usize) -> *mut u8 {
        assert!(
            page < self.blocks[block].pages(),
            "page {page} outside block {block}"
        );
        // SAFETY: in bounds of the block's allocation, checked above.
        unsafe { self.regions[block].ptr.as_ptr().add(page * PAGE_SIZE) }
    }

    /// The block holding all of `[gpa, gpa + len)` and the offset of `gpa` in it.
    pub fn locate(&self, gpa: u64, len: usize) -> Result<(usize, usize), VmError> {
        self.blocks
            .iter()
            .enumerate()
            .find_map(|(i, b)| {
                let off = gpa.checked_sub(b.gpa)?;
                let end = off.checked_add(len as u64)?;
                (end <= b.size).then_some((i, off as usize))
            })
            .ok_or_else(|| {
                VmError::Failed(format!(
                    "guest range {gpa:#x}+{len:#x} is not inside one RAM block"
                ))
            })
    }

    /// Writes guest memory at `gpa` and marks the pages touched; returns the block and
    /// the pages written, for a caller that also keeps a dirty log.
    pub fn write(
        &self,
        gpa: u64,
        bytes: &[u8],
    ) -> Result<(usize, std::ops::Range<usize>), VmError> {
        let (block, off) = self.locate(gpa, bytes.len())?;
        if bytes.is_empty() {
            return Ok((block, 0..0));
        }
        // SAFETY: `locate` put `[off, off + len)` inside block `block`'s allocation, which
        // lives as long as `self`; `bytes` is a Rust slice, not guest memory, so the
        // ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.regions[block].ptr.as_ptr().add(off),
                bytes.len(),
            )
        };
        let pages = off / PAGE_SIZE..(off + bytes.len() - 1) / PAGE_SIZE + 1;
        for page in pages.clone() {
            self.touched[block].set(page);
        }
        Ok((block, pages))
    }

    /// Reads guest memory at `gpa`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), VmError> {
        let (block, off) = self.locate(gpa, out.len())?;
        // SAFETY: `locate` put the range inside the block's allocation, which lives as
        // long as `self`; `out` is a Rust buffer, not guest memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.regions[block].ptr.as_ptr().add(off),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// Copies a page out. Only while nothing writes it (the engine calls into the VM
    /// from its own thread, and tests read after it returned).
    pub fn read_page(&self, block: usize, page: usize, out: &mut [u8; PAGE_SIZE]) {
        let p = self.page_ptr(block, page);
        // SAFETY: a whole page inside the allocation; `out` is a distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), PAGE_SIZE) }
    }

    /// Overwrites a page, like a guest store (`None` writes zeros), and marks it touched.
    pub fn write_page(&self, block: usize, page: usize, content: Option<&[u8; PAGE_SIZE]>) {
        let p = self.page_ptr(block, page);
        match content {
            // SAFETY: a whole page inside the allocation; `c` is a distinct buffer.
            Some(c) => unsafe { std::ptr::copy_nonoverlapping(c.as_ptr(), p, PAGE_SIZE) },
            // SAFETY: a whole page inside the allocation.
            None => unsafe { std::ptr::write_bytes(p, 0, PAGE_SIZE) },
        }
        self.touched[block].set(page);
    }

    /// Every block's bytes.
    pub fn contents(&self) -> Vec<Vec<u8>> {
        (0..self.blocks.len())
            .map(|b| {
                let mut v = vec![0u8; self.blocks[b].size as usize];
                // SAFETY: the whole block, copied into a buffer of the same size.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.regions[b].ptr.as_ptr(),
                        v.as_mut_ptr(),
                        v.len(),
                    )
                };
                v
            })
            .collect()
    }

    /// Pages of all blocks.
    pub fn total_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.pages() as u64).sum()
    }

    /// The block and page of the `n`th page of guest RAM, counting blocks in order.
    pub fn nth_page(&self, mut n: u64) -> (usize, usize) {
        for (i, b) in self.blocks.iter().enumerate() {
            if n < b.pages() as u64 {
                return (i, n as usize);
            }
            n -= b.pages() as u64;
        }
        panic!("page index beyond guest RAM")
    }

    /// Whether every byte of a page is zero.
    pub fn page_is_zero(&self, block: usize, page: usize) -> bool {
        let p = self.page_ptr(block, page);
        (0..PAGE_SIZE / 8).all(|w| {
            // SAFETY: an aligned u64 inside that page (the allocation is page-aligned).
            // Volatile, because the engine or a guest thread may write it concurrently, as
            // `GuestRam` allows; a torn read only makes a page look populated.
            unsafe { std::ptr::read_volatile(p.cast::<u64>().add(w)) == 0 }
        })
    }
}

// SAFETY: `host_ptr(i)` is the start of region i, a live heap allocation of exactly
// `blocks()[i].size` bytes, page-aligned, readable and writable. Regions are created with
// the HeapRam and freed (or pooled, zeroed) only when it drops, and the engine holds it
// through an `Arc`, so every pointer stays valid for as long as anyone can reach it.
unsafe impl GuestRam for HeapRam {
    fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    fn host_ptr(&self, block: usize) -> *mut u8 {
        self.regions[block].ptr.as_ptr()
    }

    fn populated_is_exact(&self) -> bool {
        self.exact.load(Ordering::Relaxed)
    }

    /// Every page written through this type or holding a non-zero byte (the engine
    /// writes through `host_ptr`): unmarked pages read as zero, as the contract asks.
    fn populated(&self, block: usize, out: &DirtyBitmap) {
        for p in 0..self.blocks[block].pages() {
            if self.touched[block].is_set(p) || !self.page_is_zero(block, p) {
                out.set(p);
            }
        }
    }
}
