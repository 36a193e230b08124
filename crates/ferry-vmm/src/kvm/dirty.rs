//! Dirty-page tracking: KVM's per-vCPU dirty ring, or its per-memslot bitmap.
//!
//! # Ring
//!
//! When the VM was made with a ring (`ring.rs`), every reap takes the entries of every
//! vCPU's ring into a bitmap per memslot, marks them reset and issues
//! `KVM_RESET_DIRTY_RINGS`, which write-protects those pages again. `harvest` of a block
//! reaps, then drains that block's bitmap into the engine's: a page written after the
//! reset faults and lands in a ring again, and a page written between the reap and the
//! reset was still writable, so no entry, but the engine copies it after `harvest`
//! returns. Reaps also happen when a vCPU's ring is full (the vCPU thread reaps) and
//! each period of a dirty-limit (the throttle thread reaps): what they take waits in
//! the per-memslot bitmaps for the next harvest. Each reap counts the entries of each
//! vCPU: those counts over a window are the vCPU's dirty rate ([`KvmDirtyLog::rates`]).
//! The ring counts a page once per reap however often it is written in between, as
//! QEMU's dirty-rate measurement does.
//!
//! # Bitmap
//!
//! `harvest` is `KVM_GET_DIRTY_LOG` and, when the kernel offers
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, `KVM_CLEAR_DIRTY_LOG` over the pages it returned,
//! both done before `harvest` returns: a page written after the CLEAR faults and is
//! reported next time, and the engine copies the page only after `harvest` returns, so no
//! write is lost. Manual protect is enabled without `INITIALLY_SET`: the first harvest
//! then reports only pages written since `start`, like the classic mode, instead of every
//! page (the engine sends every populated page in its first pass anyway).
//!
//! kvm-ioctls 0.25 wraps neither CLEAR nor a GET into a caller's buffer, so both are raw
//! ioctls here, with the structs from kvm-bindings.
//!
//! KVM sees only guest writes. Writes by the VMM go to a bitmap of its own per block
//! ([`KvmDirtyLog::mark`]), which `harvest` drains too, and which `restore` refills.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::engine::vm::{DirtyLog, GuestRam, VmError};
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;

use super::memory::KvmRam;
use super::ring::{self, DirtyRing};
use super::KvmError;

vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Pages per `KVM_CLEAR_DIRTY_LOG` call: 1 GiB. Smaller calls hold KVM's MMU lock for
/// shorter times while vCPUs fault on the pages being protected again.
const CLEAR_CHUNK_PAGES: usize = 1 << 18;

/// What one harvest of one block cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HarvestCost {
    /// `KVM_GET_DIRTY_LOG`; with the ring, reading every vCPU's ring.
    pub get: Duration,
    /// `KVM_CLEAR_DIRTY_LOG` calls (zero without manual protect); with the ring,
    /// `KVM_RESET_DIRTY_RINGS`.
    pub clear: Duration,
    /// Pages KVM reported dirty (the VMM's own writes not included); with the ring, the
    /// entries for this block this harvest read.
    pub kvm_pages: usize,
}

struct SlotLog {
    /// Buffer for `KVM_GET_DIRTY_LOG`, one bit per page of the slot.
    kvm: Mutex<Vec<u64>>,
    /// Pages known dirty and not yet harvested: the VMM's writes, pages put back by
    /// `restore`, and with the ring, the entries reaped.
    vmm: DirtyBitmap,
    pages: usize,
}

/// Why memslots log dirty pages.
#[derive(Debug, Default)]
struct Reasons {
    migration: bool,
    limit: bool,
}

/// Entries per vCPU at the start of the current rate window.
struct RateMeter {
    since: Instant,
    reaped: Vec<u64>,
}

/// The [`DirtyLog`] of a [`super::KvmVm`].
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    ram: Arc<KvmRam>,
    slots: Vec<SlotLog>,
    manual_protect: bool,
    logging: AtomicBool,
    switch: Mutex<Reasons>,
    /// One per vCPU with the ring; empty with the bitmap.
    rings: Vec<DirtyRing>,
    /// Serialises reaps; the rate window.
    meter: Mutex<RateMeter>,
    /// Bytes per second per vCPU over the last window; `u64::MAX` for none yet.
    rates: Vec<AtomicU64>,
    rate_window_ns: AtomicU64,
}

impl KvmDirtyLog {
    pub(super) fn new(vm: Arc<VmFd>, ram: Arc<KvmRam>, rings: Vec<DirtyRing>) -> Self {
        // With the ring, KVM_GET_DIRTY_LOG fails (ENXIO): no bitmap, no manual protect.
        let manual_protect = rings.is_empty() && enable_manual_protect(&vm);
        let slots = ram
            .blocks()
            .iter()
            .map(|b| {
                let pages = b.pages();
                SlotLog {
                    kvm: Mutex::new(vec![0; pages.div_ceil(64)]),
                    vmm: DirtyBitmap::new(pages),
                    pages,
                }
            })
            .collect();
        Self {
            vm,
            ram,
            slots,
            manual_protect,
            logging: AtomicBool::new(false),
            switch: Mutex::new(Reasons::default()),
            meter: Mutex::new(RateMeter {
                since: Instant::now(),
                reaped: vec![0; rings.len()],
            }),
            rates: rings.iter().map(|_| AtomicU64::new(u64::MAX)).collect(),
            rate_window_ns: AtomicU64::new(crate::throttle::RATE_WINDOW.as_nanos() as u64),
            rings,
        }
    }

    /// Whether dirty pages come from the ring (else the bitmap).
    pub fn uses_ring(&self) -> bool {
        !self.rings.is_empty()
    }

    /// Logs dirty pages for a dirty-limit, whether a migration does or not.
    pub(super) fn set_limit_logging(&self, on: bool) -> Result<(), KvmError> {
        self.set_reason(|r| r.limit = on)
    }

    /// The window rates are measured over.
    pub(super) fn set_rate_window(&self, window: Duration) {
        self.rate_window_ns
            .store(window.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Each vCPU's dirty rate in bytes per second over the last window measured; none
    /// without the ring or while nothing logs.
    pub fn rates(&self) -> Vec<Option<u64>> {
        let logging = {
            let r = self.switch.lock().expect("dirty log switch lock");
            r.migration || r.limit
        };
        self.rates
            .iter()
            .map(|r| match r.load(Ordering::Relaxed) {
                u64::MAX => None,
                _ if !logging => None,
                v => Some(v),
            })
            .collect()
    }

    /// Reads every vCPU's ring into the per-memslot bitmaps and resets the rings;
    /// returns the entries read per memslot and what reading and resetting took. Ends
    /// a rate window if it is long enough. Does nothing without the ring.
    pub(super) fn reap(&self) -> Result<(Vec<usize>, Duration, Duration), KvmError> {
        let mut counts = vec![0usize; self.slots.len()];
        if self.rings.is_empty() {
            return Ok((counts, Duration::ZERO, Duration::ZERO));
        }
        let mut meter = self.meter.lock().expect("dirty ring meter lock");
        let t0 = Instant::now();
        let mut total = 0;
        for r in &self.rings {
            total += r.collect(|slot, page| {
                // The low 16 bits are the slot, the high ones the address space (0).
                let slot = (slot & 0xffff) as usize;
                if let Some(log) = self.slots.get(slot) {
                    if (page as usize) < log.pages {
                        log.vmm.set(page as usize);
                        counts[slot] += 1;
                    }
                }
            });
        }
        let t1 = Instant::now();
        if total > 0 {
            ring::reset(&self.vm)?;
        }
        let t2 = Instant::now();
        let window = Duration::from_nanos(self.rate_window_ns.load(Ordering::Relaxed));
        let elapsed = t2.saturating_duration_since(meter.since);
        // A window ends at the first reap past 90% of it, so reaps every window (the
        // throttle thread's) do not drift into every other one.
        if elapsed >= window.mul_f64(0.9) {
            for (i, r) in self.rings.iter().enumerate() {
                let now = r.reaped.load(Ordering::Relaxed);
                let pages = now - meter.reaped[i];
                meter.reaped[i] = now;
                let rate =
                    (pages * ferry_migration::PAGE_SIZE as u64) as f64 / elapsed.as_secs_f64();
                self.rates[i].store(rate as u64, Ordering::Relaxed);
            }
            meter.since = t2;
        }
        Ok((counts, t1 - t0, t2 - t1))
    }

    /// Whether `KVM_CLEAR_DIRTY_LOG` is in use.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }

    /// Records that the VMM wrote pages `[first, first + count)` of `block`. Call it
    /// after the write, so a harvest that takes the bit also sees the data.
    pub fn mark(&self, block: usize, first: usize, count: usize) {
        for p in first..first + count {
            self.slots[block].vmm.set(p);
        }
    }

    fn set_logging(&self, on: bool) -> Result<(), KvmError> {
        self.set_reason(|r| r.migration = on)?;
        self.logging.store(on, Ordering::Release);
        Ok(())
    }

    /// Changes why memslots log, and turns logging on or off when that changes.
    fn set_reason(&self, change: impl FnOnce(&mut Reasons)) -> Result<(), KvmError> {
        let mut reasons = self.switch.lock().expect("dirty log switch lock");
        let was = reasons.migration || reasons.limit;
        change(&mut reasons);
        let on = reasons.migration || reasons.limit;
        if was != on || !self.uses_ring() {
            let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            for slot in 0..self.slots.len() {
                self.ram.set_memslot(&self.vm, slot, flags)?;
            }
        }
        if on && !was {
            // The first window starts now.
            let mut meter = self.meter.lock().expect("dirty ring meter lock");
            meter.since = Instant::now();
            for (i, r) in self.rings.iter().enumerate() {
                meter.reaped[i] = r.reaped.load(Ordering::Relaxed);
                self.rates[i].store(u64::MAX, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Harvests `block` into `into` and says what the ioctls cost.
    pub fn harvest_with_cost(
        &self,
        block: usize,
        into: &DirtyBitmap,
    ) -> Result<HarvestCost, KvmError> {
        let slot = self.slots.get(block).ok_or(KvmError::NoBlock(block))?;
        if into.pages() != slot.pages {
            return Err(KvmError::BitmapSize {
                block,
                pages: into.pages(),
                expected: slot.pages,
            });
        }
        if !self.is_logging() {
            return Err(KvmError::NotLogging);
        }
        if self.uses_ring() {
            let (counts, read, reset) = self.reap()?;
            slot.vmm.drain_into(into);
            return Ok(HarvestCost {
                get: read,
                clear: reset,
                kvm_pages: counts[block],
            });
        }
        let mut buf = slot.kvm.lock().expect("dirty bitmap lock");
        let t0 = Instant::now();
        get_dirty_log(&self.vm, block as u32, &mut buf)?;
        let t1 = Instant::now();
        if self.manual_protect {
            clear_dirty_log(&self.vm, block as u32, &buf, slot.pages)?;
        }
        let t2 = Instant::now();
        let mut kvm_pages = 0;
        for (i, &w) in buf.iter().enumerate() {
            kvm_pages += w.count_ones() as usize;
            into.or_word(i, w);
        }
        slot.vmm.drain_into(into);
        Ok(HarvestCost {
            get: t1 - t0,
            clear: t2 - t1,
            kvm_pages,
        })
    }
}

impl DirtyLog for KvmDirtyLog {
    fn start(&self) -> Result<(), VmError> {
        self.set_logging(true)
            .map_err(|e| e.into_vm("start dirty logging"))
    }

    fn stop(&self) {
        if let Err(err) = self.set_logging(false) {
            tracing::warn!(err = %super::chain(&err), "stopping dirty logging");
        }
    }

    fn harvest(&self, block: usize, into: &DirtyBitmap) -> Result<(), VmError> {
        self.harvest_with_cost(block, into)
            .map(drop)
            .map_err(|e| e.into_vm("harvest dirty pages"))
    }

    fn restore(&self, block: usize, pages: &DirtyBitmap) {
        match self.slots.get(block) {
            Some(slot) if slot.pages == pages.pages() => slot.vmm.or_from(pages),
            _ => tracing::error!(
                block,
                pages = pages.pages(),
                "restore of dirty pages that match no block"
            ),
        }
    }
}

/// Turns on `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (without `INITIALLY_SET`) if offered.
fn enable_manual_protect(vm: &VmFd) -> bool {
    let offered = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    if offered as u32 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
        return false;
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.into();
    match vm.enable_cap(&cap) {
        Ok(()) => true,
        Err(err) => {
            tracing::debug!(%err, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)");
            false
        }
    }
}

/// `KVM_GET_DIRTY_LOG` of `slot` into `buf` (one bit per page, `buf` sized for the slot).
pub(super) fn get_dirty_log(vm: &VmFd, slot: u32, buf: &mut [u64]) -> Result<(), KvmError> {
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: buf.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd, the struct matches the ioctl number's size, and `buf` has a
    // bit for every page of the slot (callers size it from the slot), which is all the
    // kernel writes.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if rc != 0 {
        return Err(KvmError::DirtyLog {
            ioctl: "KVM_GET_DIRTY_LOG",
            slot,
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

/// `KVM_CLEAR_DIRTY_LOG` of the pages set in `bits`, 1 GiB at a time, skipping ranges
/// with nothing to clear.
pub(super) fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    bits: &[u64],
    pages: usize,
) -> Result<(), KvmError> {
    let words = CLEAR_CHUNK_PAGES / 64;
    for (chunk, chunk_bits) in bits.chunks(words).enumerate() {
        if chunk_bits.iter().all(|&w| w == 0) {
            continue;
        }
        let first = chunk * CLEAR_CHUNK_PAGES;
        let clear = kvm_clear_dirty_log {
            slot,
            // The kernel requires a multiple of 64 unless the range ends the slot, which
            // only the last chunk does.
            num_pages: CLEAR_CHUNK_PAGES.min(pages - first) as u32,
            first_page: first as u64,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: chunk_bits.as_ptr() as *mut _,
            },
        };
        // SAFETY: `vm` is a VM fd, the struct matches the ioctl number's size, and the
        // kernel only reads `num_pages` bits from `chunk_bits`, which holds that many.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc != 0 {
            return Err(KvmError::DirtyLog {
                ioctl: "KVM_CLEAR_DIRTY_LOG",
                slot,
                source: kvm_ioctls::Error::last(),
            });
        }
    }
    Ok(())
}
