//! KVM's dirty ring: raw ioctls and the per-vCPU ring mapping.
//!
//! kvm-ioctls 0.25 wraps none of it. `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)` with the
//! ring's size in bytes, on the VM before any vCPU exists; each vCPU's ring is then an
//! array of `kvm_dirty_gfn` mapped from its fd at page offset
//! `KVM_DIRTY_LOG_PAGE_OFFSET`. KVM publishes an entry by setting `KVM_DIRTY_GFN_F_DIRTY`
//! in its flags after writing slot and offset; the reader takes entries in order from
//! where it stopped, marks each `KVM_DIRTY_GFN_F_RESET`, and `KVM_RESET_DIRTY_RINGS`
//! (on the VM) write-protects those pages again and frees their entries.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVMIO, KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::KvmError;

vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// kvm-bindings does not define the flags.
const GFN_F_DIRTY: u32 = 1;
const GFN_F_RESET: u32 = 2;

/// `KVM_EXIT_DIRTY_RING_FULL`, which kvm-ioctls returns as `VcpuExit::Unsupported`.
pub const EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;

/// Entries per vCPU ring: 256 KiB each. At the fastest this host dirties under logging
/// (about 100 k pages/s per vCPU, bounded by write-protect faults) that is 160 ms of
/// writes; a vCPU whose ring fills exits and empties it itself.
pub const RING_ENTRIES: u32 = 16 * 1024;

/// Enables the ring of `entries` on `vm` (before any vCPU is created) if KVM offers one
/// that large; `false` when it does not.
pub fn enable(vm: &VmFd, entries: u32) -> Result<bool, KvmError> {
    let bytes = entries as usize * size_of::<kvm_dirty_gfn>();
    let max = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING.into());
    if max <= 0 || (max as usize) < bytes {
        return Ok(false);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        ..Default::default()
    };
    cap.args[0] = bytes as u64;
    vm.enable_cap(&cap).map_err(|source| KvmError::VmIoctl {
        ioctl: "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)",
        source,
    })?;
    Ok(true)
}

/// Resets without blocking the kick: the broken mode the tests show losing pages.
#[doc(hidden)]
pub static UNMASKED_RESET: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// `KVM_RESET_DIRTY_RINGS`: re-protects the pages of every entry marked reset.
///
/// The kick signal is blocked in the calling thread for the ioctl. The kernel stops a
/// reset early when the calling thread has a signal pending (Linux 6.16 and later) and
/// still reports success; on this host such a reset was seen to leave pages of entries
/// it had already counted writable, so the guest's later writes to them never reached a
/// ring again and those pages went stale at the destination. vCPU threads reset when
/// their ring is full, and under a throttle they get the kick every 10 ms: without the
/// mask, a guest migrated with auto-converge lost pages. A kick that arrives meanwhile is
/// delivered when the mask is lifted, as any kick that lands outside `KVM_RUN`.
pub fn reset(vm: &VmFd) -> Result<(), KvmError> {
    let _masked = (!UNMASKED_RESET.load(Ordering::Relaxed)).then(KickMask::block);
    // SAFETY: a VM fd and an ioctl without argument.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if rc < 0 {
        return Err(KvmError::VmIoctl {
            ioctl: "KVM_RESET_DIRTY_RINGS",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

/// One vCPU's ring, mapped.
pub struct DirtyRing {
    gfns: *mut kvm_dirty_gfn,
    entries: u32,
    /// The next entry to read (free-running; the index is it modulo `entries`).
    next: Mutex<u32>,
    /// Entries read so far.
    pub reaped: AtomicU64,
}

// SAFETY: the mapping is shared memory owned by this struct; entries are read and
// written through atomics on their flags (KVM's protocol) under `next`'s lock.
unsafe impl Send for DirtyRing {}
// SAFETY: as above.
unsafe impl Sync for DirtyRing {}

impl DirtyRing {
    /// Maps `index`'s ring of `entries` from its fd.
    pub fn map(index: usize, fd: &VcpuFd, entries: u32) -> Result<Self, KvmError> {
        let len = entries as usize * size_of::<kvm_dirty_gfn>();
        // SAFETY: a new shared mapping of the vCPU fd at the offset KVM documents for the
        // ring; the kernel checks the length against the ring's size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * 4096,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KvmError::Vcpu {
                index,
                ioctl: "mmap of the dirty ring",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(Self {
            gfns: p.cast(),
            entries,
            next: Mutex::new(0),
            reaped: AtomicU64::new(0),
        })
    }

    /// Takes every entry KVM has published since the last call, calling `f(slot, page)`
    /// for each and marking it for reset; returns how many. The caller then issues
    /// [`reset`].
    pub fn collect(&self, mut f: impl FnMut(u32, u64)) -> u64 {
        let mut next = self.next.lock().expect("dirty ring lock");
        let mut n = 0;
        loop {
            // SAFETY: the index is inside the mapping (modulo its entry count); the
            // mapping lives as long as `self`.
            let gfn = unsafe { self.gfns.add((*next % self.entries) as usize) };
            // SAFETY: `flags` is the u32 at the start of the entry, aligned (entries are
            // 16-byte), and KVM accesses it atomically too.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*gfn).flags)) };
            if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: published (F_DIRTY seen with acquire), so KVM no longer writes it.
            let (slot, offset) = unsafe { ((*gfn).slot, (*gfn).offset) };
            f(slot, offset);
            flags.store(GFN_F_RESET, Ordering::Release);
            *next = next.wrapping_add(1);
            n += 1;
        }
        self.reaped.fetch_add(n, Ordering::Relaxed);
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping `map` made; nothing refers to it any more.
        unsafe { libc::munmap(self.gfns.cast(), len) };
    }
}

/// The kick signal blocked in this thread until dropped (the mask it replaced comes
/// back).
struct KickMask(libc::sigset_t);

impl KickMask {
    fn block() -> Self {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
        // pthread_sigmask only changes this thread's mask, saving the old one in `old`.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, super::vcpu::kick_signal());
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            KickMask(old)
        }
    }
}

impl Drop for KickMask {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `block`, in the same thread (the guard is
        // neither Send nor moved across threads: it lives in `reset`'s frame).
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}
