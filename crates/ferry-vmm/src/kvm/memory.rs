//! Guest RAM: two anonymous mappings from vm-memory, registered as KVM memslots.

use std::sync::Once;

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::engine::vm::{GuestRam, RamBlock};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{LOW_SIZE, RAM_GPA};
use super::{pagemap, KvmError};

/// Block (and memslot) numbers.
pub const LOW_BLOCK: usize = 0;
pub const RAM_BLOCK: usize = 1;

/// Guest RAM of a [`super::KvmVm`]: block 0 is the low slot (`ram-low`), block 1 the RAM
/// under test (`ram`), and memslot `i` is block `i`.
pub struct KvmRam {
    // Owns the mappings the host addresses below point into.
    _mem: GuestMemoryMmap,
    blocks: Vec<RamBlock>,
    host: Vec<usize>,
    scan: pagemap::PopulatedScan,
}

impl KvmRam {
    pub(super) fn new(mem_size: u64) -> Result<Self, KvmError> {
        let ranges = [
            (GuestAddress(0), LOW_SIZE as usize),
            (GuestAddress(RAM_GPA), mem_size as usize),
        ];
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|source| KvmError::Memory {
                size: mem_size,
                source,
            })?;
        let blocks = vec![
            RamBlock {
                name: "ram-low".into(),
                gpa: 0,
                size: LOW_SIZE,
            },
            RamBlock {
                name: "ram".into(),
                gpa: RAM_GPA,
                size: mem_size,
            },
        ];
        let host = blocks
            .iter()
            .map(|b| {
                let region = mem
                    .find_region(GuestAddress(b.gpa))
                    .expect("region just created");
                debug_assert_eq!(region.len(), b.size);
                region.as_ptr() as usize
            })
            .collect();
        let ram = Self {
            _mem: mem,
            blocks,
            host,
            scan: pagemap::PopulatedScan::default(),
        };
        ram.advise_huge_pages();
        Ok(ram)
    }

    /// Transparent huge pages halve the cost of first touches (the probe measured 1.0-3.7
    /// GB/s against 0.7-1.4 GB/s into fresh memory); THP is "madvise" on these hosts.
    fn advise_huge_pages(&self) {
        let (host, len) = (self.host[RAM_BLOCK], self.blocks[RAM_BLOCK].size as usize);
        // SAFETY: advice on a mapping this struct owns; it changes no mapping contents.
        let rc = unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            static WARNED: Once = Once::new();
            let err = std::io::Error::last_os_error();
            WARNED.call_once(|| tracing::debug!(%err, "madvise(MADV_HUGEPAGE) on guest RAM"));
        }
    }

    /// Registers block `slot` as memslot `slot` with `flags`.
    pub(super) fn set_memslot(&self, vm: &VmFd, slot: usize, flags: u32) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: self.blocks[slot].gpa,
            memory_size: self.blocks[slot].size,
            userspace_addr: self.host[slot] as u64,
        };
        // SAFETY: the mapping lives in `self._mem`; every `KvmVm` keeps its `KvmRam` (in an
        // `Arc`) alive for as long as its VM fd, so KVM never sees a dangling address.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| KvmError::Memslot {
            slot: slot as u32,
            source,
        })
    }

    /// The host address of `[gpa, gpa + len)`, which must lie inside one block.
    pub(super) fn host_addr(&self, gpa: u64, len: usize) -> Option<(usize, *mut u8)> {
        self.blocks.iter().enumerate().find_map(|(i, b)| {
            let off = gpa.checked_sub(b.gpa)?;
            (off + len as u64 <= b.size).then(|| (i, (self.host[i] + off as usize) as *mut u8))
        })
    }

    /// Reads a `u64` the guest may be writing concurrently.
    pub(super) fn read_u64(&self, gpa: u64) -> u64 {
        let (_, p) = self.host_addr(gpa, 8).expect("address inside guest RAM");
        assert_eq!(p as usize % 8, 0, "unaligned guest u64 at {gpa:#x}");
        // SAFETY: inside a live mapping (host_addr checked the bounds) and aligned.
        unsafe { (p as *const u64).read_volatile() }
    }

    /// Reads one byte the guest may be writing concurrently.
    pub(super) fn read_u8(&self, gpa: u64) -> u8 {
        let (_, p) = self.host_addr(gpa, 1).expect("address inside guest RAM");
        // SAFETY: inside a live mapping (host_addr checked the bounds).
        unsafe { p.read_volatile() }
    }

    /// Writes the `--fill` data ([`crate::memory::fill_words`]) to `len` bytes of the RAM
    /// block from `offset`, before any vCPU runs.
    pub(super) fn fill(&self, offset: u64, len: u64) {
        let block = &self.blocks[RAM_BLOCK];
        assert!(
            offset % 8 == 0 && offset.checked_add(len).is_some_and(|end| end <= block.size),
            "fill outside the RAM block"
        );
        let base = self.host[RAM_BLOCK] as *mut u64;
        let words = (len / 8) as usize;
        for (i, x) in crate::memory::fill_words(offset).take(words).enumerate() {
            // SAFETY: word i of [offset, offset + len), inside the block (asserted) and
            // aligned (the mapping is page-aligned, offset a multiple of 8); no vCPU
            // runs yet.
            unsafe { base.add(offset as usize / 8 + i).write(x) };
        }
    }

    /// Copies `bytes` to `gpa`; returns the block written.
    pub(super) fn write(&self, gpa: u64, bytes: &[u8]) -> usize {
        let (block, p) = self
            .host_addr(gpa, bytes.len())
            .expect("write inside guest RAM");
        // SAFETY: `[p, p + len)` is inside a live mapping and cannot overlap `bytes`, a
        // Rust slice the VMM owns.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
        block
    }
}

// SAFETY: `host_ptr(i)` is the start of the vm-memory mapping backing block `i`, exactly
// `blocks()[i].size` bytes, readable and writable, owned by `self._mem` and so mapped for
// as long as `self` lives.
unsafe impl GuestRam for KvmRam {
    fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    fn host_ptr(&self, block: usize) -> *mut u8 {
        self.host[block] as *mut u8
    }

    fn populated(&self, block: usize, out: &DirtyBitmap) {
        let (host, len) = (
            self.host[block] as *const u8,
            self.blocks[block].size as usize,
        );
        self.scan.mark(host, len, out);
    }

    fn populated_is_exact(&self) -> bool {
        self.scan.is_exact()
    }
}
