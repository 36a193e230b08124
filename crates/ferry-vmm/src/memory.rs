//! Guest RAM in host memory, shared by the soft and KVM backends.
//!
//! Allocation goes through rust-vmm's vm-memory (`GuestMemoryMmap`): anonymous private
//! mappings, one per RAM block, which a KVM backend can register as memslots as they
//! are. Each mapping is advised for transparent huge pages, which halves the cost of
//! first-touch faults on these hosts (see the design notes), and is reported to the
//! engine through [`GuestRam`], whose `populated` reads `/proc/self/pagemap` so pages
//! the guest never touched are never read.

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::engine::vm::{GuestRam, RamBlock, VmError};
use ferry_migration::PAGE_SIZE;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::pagemap;

/// Faults in every page of guest RAM without changing its contents
/// ([`GuestRam::prepare`]: `MADV_POPULATE_WRITE`), so later writes find memory the host
/// has already handed out. Returns the bytes covered. Linux 5.14 or later.
pub fn prefault(ram: &dyn GuestRam) -> std::io::Result<u64> {
    let mut total = 0;
    for (b, block) in ram.blocks().iter().enumerate() {
        ram.prepare(b, 0, block.pages())?;
        total += block.size;
    }
    Ok(total)
}

/// Guest RAM blocks mapped in this process.
#[derive(Debug)]
pub struct HostRam {
    mem: GuestMemoryMmap,
    blocks: Vec<RamBlock>,
    ptrs: Vec<usize>,
    scan: pagemap::PopulatedScan,
}

impl HostRam {
    /// Maps one block per `(name, guest address, size)`.
    pub fn new(layout: &[(&str, u64, u64)]) -> Result<Self, VmError> {
        let ranges: Vec<(GuestAddress, usize)> = layout
            .iter()
            .map(|&(_, gpa, size)| (GuestAddress(gpa), size as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| {
            VmError::Failed(format!("cannot map {} of guest memory: {e}", human(layout)))
        })?;
        let mut ptrs = Vec::with_capacity(layout.len());
        for &(name, gpa, size) in layout {
            let region = mem
                .find_region(GuestAddress(gpa))
                .ok_or_else(|| VmError::Failed(format!("RAM block {name} was not mapped")))?;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VmError::Failed(format!("RAM block {name}: {e}")))?;
            // SAFETY: madvise on a range we just mapped; it only changes paging policy.
            let r = unsafe { libc::madvise(host.cast(), size as usize, libc::MADV_HUGEPAGE) };
            if r != 0 {
                tracing::debug!(block = name, "transparent huge pages not available");
            }
            ptrs.push(host as usize);
        }
        let blocks = layout
            .iter()
            .map(|&(name, gpa, size)| RamBlock {
                name: name.to_string(),
                gpa,
                size,
            })
            .collect();
        Ok(Self {
            mem,
            blocks,
            ptrs,
            scan: pagemap::PopulatedScan::default(),
        })
    }

    /// The vm-memory view, for registering memslots.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Writes pseudo-random (incompressible, non-zero) bytes into `len` bytes of `block`
    /// from `offset`, for benchmarks that need real data.
    pub fn fill_random(&self, block: usize, offset: u64, len: u64) {
        let b = &self.blocks[block];
        assert!(offset + len <= b.size, "fill outside block {}", b.name);
        let base = self.host_ptr(block);
        for (i, x) in (offset..offset + len).step_by(8).zip(fill_words(offset)) {
            // SAFETY: i + 8 <= offset + len <= block size (sizes are page multiples), so
            // the write is inside the mapping; nothing runs in the guest yet.
            unsafe { std::ptr::write_unaligned(base.add(i as usize).cast::<u64>(), x) };
        }
    }
}

/// The words `--fill` writes from byte `offset` of a RAM block on, one per 8 bytes:
/// xorshift64 seeded by the offset, never zero, so the data neither compresses nor has
/// zero pages. The same on every backend, so that a filled range can be checked again
/// after a migration ([`fill_pages_wrong`]).
pub fn fill_words(offset: u64) -> impl Iterator<Item = u64> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ offset;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x | 1
    })
}

/// Pages of `[offset, offset + len)` of the block at `base` that do not hold what
/// [`fill_words`] wrote there.
///
/// # Safety
///
/// `[base + offset, base + offset + len)` must be inside one live mapping of guest RAM
/// whose vCPUs are stopped; `offset` and `len` must be multiples of [`PAGE_SIZE`].
pub unsafe fn fill_pages_wrong(base: *const u8, offset: u64, len: u64) -> u64 {
    let mut words = fill_words(offset);
    let mut wrong = 0;
    for page in (offset..offset + len).step_by(PAGE_SIZE) {
        let mut ok = true;
        for i in (page..page + PAGE_SIZE as u64).step_by(8) {
            let want = words.next().unwrap_or_default();
            // SAFETY: inside the range the caller vouches for, 8-byte aligned (the
            // mapping is page-aligned and `i` a multiple of 8).
            let got = unsafe { base.add(i as usize).cast::<u64>().read_volatile() };
            ok &= got == want;
        }
        wrong += u64::from(!ok);
    }
    wrong
}

fn human(layout: &[(&str, u64, u64)]) -> String {
    ferry_migration::engine::human_bytes(layout.iter().map(|l| l.2).sum())
}

// SAFETY: every pointer in `ptrs` is the start of the mapping of the block with the same
// index, `blocks[i].size` bytes long, readable and writable, owned by `mem` and unmapped
// only when `self` is dropped.
unsafe impl GuestRam for HostRam {
    fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    fn host_ptr(&self, block: usize) -> *mut u8 {
        self.ptrs[block] as *mut u8
    }

    fn populated(&self, block: usize, out: &DirtyBitmap) {
        let len = self.blocks[block].size as usize;
        self.scan.mark(self.host_ptr(block), len, out);
    }

    fn populated_is_exact(&self) -> bool {
        self.scan.is_exact()
    }
}

const _: () = assert!(PAGE_SIZE == 4096);
