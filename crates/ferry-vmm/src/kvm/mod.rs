//! The KVM backend: a VM whose vCPUs run a tiny workload that migration tests can check
//! page by page, and that the engine migrates through [`MigratableVm`].
//!
//! ```no_run
//! use ferry_vmm::kvm::{KvmConfig, KvmVm};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = KvmConfig {
//!     mem_size: 256 << 20,
//!     vcpus: 2,
//!     dirty_size: 16 << 20,
//!     vcpu_work: Vec::new(),
//!     dirty_rate: 0,
//!     fill: 0,
//!     incoming: false,
//!     accels: Vec::new(),
//!     dirty_ring: true,
//! };
//! let vm = KvmVm::create(&cfg)?;
//! vm.start()?;
//! // ... migrate it through `MigratableVm`, or:
//! vm.stop()?;
//! vm.check_pattern()?;
//! println!("passes per vCPU: {:?}", vm.passes());
//! # Ok(()) }
//! ```
//!
//! # Memory layout
//!
//! Two memslots from vm-memory anonymous mappings (details in `layout.rs`):
//!
//! | block / slot | GPA | holds |
//! |---|---|---|
//! | 0 `ram-low` | `[0, 2 MiB)` | GDT, TSS, page tables, guest code, one control page per vCPU (its pass counter) |
//! | 1 `ram` | `[4 GiB, 4 GiB + mem_size)` | RAM under test; vCPU `i` dirties `[4 GiB + i * dirty_size, + dirty_size)`, the fill follows |
//!
//! The hole below 4 GiB keeps the in-kernel LAPIC and IOAPIC pages off RAM. The RAM slot
//! is `madvise(MADV_HUGEPAGE)`: first touches into fresh memory (a destination's first
//! pass) are the slowest thing on these nested hosts, and THP roughly halves them.
//! [`GuestRam::populated`] asks `/proc/self/pagemap` ([`pagemap::mark_populated`]) so
//! the engine skips pages the guest never touched without reading (and faulting) them.
//!
//! # The guest program
//!
//! 137 bytes of 64-bit code, hand-encoded in `guest.rs` (with the assembly beside each
//! instruction and tests that check the offsets, jumps and constants the VMM relies on).
//! KVM here is the PVM backend, which emulates CPL-0 code one instruction at a time, so
//! the vCPU enters long mode at CPL 3 straight from `KVM_SET_SREGS` (DPL-3 flat
//! segments, paging on, identity map with user-accessible 2 MiB pages): no BIOS, no real
//! mode, no ring 0. Each vCPU loops: increment byte 0 of every 4 KiB page of its range,
//! increment its pass counter, `out` the counter's low byte to port `0x10 + i`. The VMM
//! checks on each exit that the values follow each other and match the counter in
//! memory. Every 1024 passes the vCPU prints `vcpu<i> pass <n>` on the serial console
//! (COM1), one `out` per byte: at most a few dozen exits per thousand passes.
//!
//! # Dirty rate, idle guests, fill
//!
//! The run flags mean on KVM what they mean on the soft backend, per vCPU:
//!
//! - `dirty_rate` (`--dirty-rate`): each vCPU writes at most that many pages a second.
//!   Such a vCPU runs a second program, the paced one, which stops to report every 64
//!   pages; the vCPU thread sleeps in that exit until the pages are due. Why the VMM
//!   and not the guest keeps time, and what it costs, is in `guest.rs` and `vcpu.rs`.
//! - `dirty_size` 0 (`--dirty 0`): an idle guest. Its vCPUs run the paced program over
//!   an empty range: they write no RAM under test, only their pass counter (one page of
//!   the low slot each), and the VMM holds each pass for 10 ms, so they still count
//!   passes (about 100 a second) at no CPU cost. A migration of it sends the pages it
//!   ever touched once and then a page per vCPU.
//! - `fill` (`--fill`): before the vCPUs first run, the VMM writes that many bytes of
//!   the soft backend's pseudo-random, non-zero data ([`crate::memory::fill_words`])
//!   after the last vCPU's range, and where it did in the low slot (which migrates with
//!   the guest). [`KvmVm::check_pattern`] then also checks the fill, wherever the guest
//!   has moved since.
//!
//! Without a rate and with a range, a vCPU runs the original program, byte for byte
//! what every release so far runs: such a guest still migrates to and from them. A vCPU
//! in the paced program adds the subsection `kvm-vcpu/paced-program` to its state, which
//! those releases do not know: they refuse it by name, before the guest leaves the
//! source, instead of running it and stopping at its first report.
//!
//! Two things the probe did not say: (1) PVM does not keep IOPL=3 for guest user mode,
//! so `out` is checked against the TSS I/O bitmap, which grants the workload's ports and
//! COM1's (IOPL stays 3 for hosts that honour it); (2) with the in-kernel LAPIC, vCPUs
//! other than 0 start waiting for INIT/SIPI and are made runnable explicitly.
//!
//! # Devices
//!
//! [`MigratableVm::devices`] lists, in this order: `kvm-vm` (the in-kernel irqchip and
//! clock, below), `serial` ([`crate::devices::serial`], always present; vCPU threads
//! route its port I/O exits to it through an [`IoBus`]) and, with a non-zero
//! [`KvmConfig::accels`], `accel` instance 0, 1, ... ([`crate::devices::accel`]). The VM's
//! pause stops the vCPUs, then the accelerators; resume runs them, then runs
//! the vCPUs. Its save and load take the VFIO stop-copy and resuming arcs, so its whole
//! memory moves in the downtime.
//!
//! [`KvmVm::check_pattern`] uses the guest's registers: at any instruction boundary a
//! prefix of the range (as long as the guest's position in the pass) holds `pass + 1`
//! and the rest `pass` (as `u8`). The workload's progress lives in guest memory and
//! registers only, so migrating RAM and vCPU state is all it takes to carry it on.
//!
//! # Pause protocol
//!
//! A thread per running vCPU owns its `VcpuFd`. `pause` sets a stop flag and sends
//! [`kick_signal`] (`SIGRTMIN`) to each thread, whose handler sets `immediate_exit`
//! through a thread-local pointer; the thread re-enters `KVM_RUN` once with
//! `immediate_exit` set to complete any I/O exit, parks its fd and ends; `pause` joins
//! them all. Measured here with two vCPUs on the two cores: median 0.2-1.6 ms, worst
//! 4-12 ms (the host is oversubscribed: two vCPU threads plus the test). Details and the
//! races in `vcpu.rs`.
//!
//! # State format
//!
//! `kvm-vcpu` v1 ([`VCPU_SCHEMA`]): regs, sregs, xsave (4 KiB), xcrs, debugregs, lapic,
//! vcpu_events, mp_state, every MSR of `KVM_GET_MSR_INDEX_LIST` that reads (41 here, all
//! of them), tsc_khz; the empty subsection `kvm-vcpu/paced-program` for a vCPU in the
//! paced program (above). `kvm-vm` v1 ([`VM_SCHEMA`]): kvmclock, PIC master and slave,
//! IOAPIC. KVM structs travel as their raw bytes in fixed-length fields, like
//! kvm-bindings' serde; this requires the same struct layouts on both sides (same arch,
//! uAPI unchanged), which the fixed lengths enforce (see `state.rs`). Loading checks
//! every field before the first ioctl, and `KVM_SET_MSRS` is retried past each MSR it
//! rejects, which are then reported together. A vCPU saved and loaded back reads back
//! identical except for the TSC, which moves on.
//!
//! # Dirty tracking: the ring, the bitmap as fallback
//!
//! With [`KvmConfig::dirty_ring`] (the default; `ferry run --dirty-ring off` clears it)
//! and `KVM_CAP_DIRTY_LOG_RING` offered, the VM is made with a dirty ring of
//! 16 k entries (256 KiB) per vCPU, enabled before the first vCPU exists; otherwise it
//! uses `KVM_MEM_LOG_DIRTY_PAGES` bitmaps with `KVM_GET_DIRTY_LOG` plus
//! `KVM_CLEAR_DIRTY_LOG` (manual protect) in 1 GiB chunks. Both log only while
//! `KVM_MEM_LOG_DIRTY_PAGES` is on (a migration, or a dirty-limit), and both add the
//! VMM's own bitmap for writes KVM cannot see. Details in `dirty.rs` and `ring.rs`.
//!
//! **Why the ring.** A dirty-limit (QEMU 8.1's, which the engine asks for through
//! [`MigratableVm::set_vcpu_throttle`]) slows only the vCPUs that dirty faster than the
//! limit, so it needs each vCPU's dirty rate; the bitmap is per memslot and cannot say
//! who wrote a page, the ring is per vCPU and can. It also costs no scan of clean
//! bitmap words. What it costs: it must be chosen before the vCPUs exist and then
//! excludes `KVM_GET_DIRTY_LOG` for the whole VM (hence a per-VM choice, not a per-
//! migration one), a vCPU whose ring fills exits (`KVM_EXIT_DIRTY_RING_FULL`) until it
//! is reaped (its own thread does that), and a page is counted once per reap however
//! often it is written in between. `DIRTY_LOG_RING_WITH_BITMAP` is not offered here, so
//! there is no mixed mode.
//!
//! Measured on this host (`kvm_measure_dirty_bitmap_cost`, optimised test build, one
//! vCPU dirtying a working set on the other core, the host busy with other work);
//! "read" is GET or reading the rings, "clear" is CLEAR or `KVM_RESET_DIRTY_RINGS`:
//!
//! | RAM slot | working set | harvest every | dirty pages | ring read + reset | bitmap GET + CLEAR |
//! |---|---|---|---|---|---|
//! | 1 GiB | 64 MiB | 100 ms | 3.4-3.5 k | 13 + 119 µs | 15 + 90 µs |
//! | 8 GiB | 64 MiB | 100 ms | 3.4-3.5 k | 14 + 117 µs | 46 + 101 µs |
//! | 8 GiB | 1 GiB | 100 ms | 3.2-3.3 k | 12 + 133 µs | 48 + 103 µs |
//! | 8 GiB | 1 GiB | 500 ms | 16 k | 64 + 514 µs | 45 + 398 µs |
//! | 8 GiB | paused | - | 0 | 0.04 µs | 14-16 µs |
//!
//! So the ring reads in time proportional to the dirty pages, not to the slot, and its
//! reset costs about what CLEAR does (25-35 ns a page against 25-30); a round costs
//! about the same either way, well under 1% of a 100 ms round. Turning logging on took
//! 0.3-20 ms with either (it varies run to run with the host's load). The guest's
//! write-protect fault, 10-40 µs a page here, is what both pay and dwarfs the VMM's
//! share.
//!
//! # Throttle
//!
//! [`MigratableVm::set_vcpu_throttle`] is carried out by the vCPU threads, which a
//! throttle thread kicks (the pause's signal and `immediate_exit`) every 10 ms with the
//! hold each must sleep, so a guest that never exits is held too; a dirty-limit turns
//! logging on, reaps the rings every period and sets each vCPU's share of running time
//! from its own rate. Without the ring a dirty-limit is refused; the CPU throttle works
//! with either. See `vcpu.rs` and [`crate::throttle`].

mod dirty;
mod guest;
mod layout;
mod memory;
pub use crate::pagemap;
mod ring;
mod state;
mod vcpu;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_migration::engine::human_bytes;
use ferry_migration::engine::vm::{
    DeviceInfo, DevicePending, DirtyLog, GuestRam, MigratableVm, VcpuThrottle, VcpuThrottleStats,
    VmError,
};
use ferry_migration::state::{DeviceState, StateError, StateReader, StateSchema, StateWriter};
use ferry_migration::PAGE_SIZE;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use thiserror::Error;

use crate::devices::accel::{Accel, AccelConfig, AccelError, Accels};
use crate::devices::serial::{Serial, SerialError, SERIAL_SCHEMA};
use crate::devices::IoBus;
use crate::guest::VcpuWork;

pub use dirty::{HarvestCost, KvmDirtyLog};
pub use guest::PRINT_EVERY;
pub use memory::{KvmRam, LOW_BLOCK, RAM_BLOCK};
pub use state::{VCPU_SCHEMA, VM_SCHEMA};
pub use vcpu::kick_signal;

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmConfig {
    /// Bytes of RAM under test (the `ram` block at 4 GiB), a multiple of 4 KiB.
    pub mem_size: u64,
    pub vcpus: usize,
    /// Bytes each vCPU's workload dirties, each vCPU in its own range; a multiple of
    /// 4 KiB, 0 for an idle guest, and `vcpus * dirty_size + fill <= mem_size`.
    pub dirty_size: u64,
    /// Each vCPU's work, one per vCPU, instead of `dirty_size` for all; empty for none.
    /// Ranges follow each other in vCPU order.
    pub vcpu_work: Vec<VcpuWork>,
    /// Pages per second each vCPU's workload dirties at most; 0 for as fast as it runs.
    pub dirty_rate: u64,
    /// Bytes of pseudo-random data written after the vCPUs' ranges before they first
    /// run, a multiple of 4 KiB (none for an incoming VM: it gets the source's).
    pub fill: u64,
    /// A migration destination: RAM left empty, vCPUs without state until it is loaded.
    pub incoming: bool,
    /// The accelerators ([`crate::devices::accel`]), in order; empty for none.
    pub accels: Vec<AccelConfig>,
    /// Track dirty pages with KVM's dirty ring when KVM offers it, else (or when false)
    /// with the per-memslot bitmap. See "Dirty tracking" above.
    pub dirty_ring: bool,
}

impl KvmConfig {
    /// Each vCPU's work.
    pub fn work(&self) -> Vec<VcpuWork> {
        VcpuWork::per_vcpu(&self.vcpu_work, self.vcpus, self.dirty_size)
    }
}

#[derive(Debug, Error)]
pub enum KvmError {
    /// `/dev/kvm` missing, not accessible, or refusing to make a VM.
    #[error("/dev/kvm is not usable: {what}: {}", io::Error::from_raw_os_error(*errno))]
    Unusable { what: &'static str, errno: i32 },
    #[error("/dev/kvm speaks KVM API version {0}, this VMM needs 12")]
    ApiVersion(i32),
    #[error("KVM on this host lacks {0}")]
    Unsupported(String),
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("allocating {size} bytes of guest RAM")]
    Memory {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM_SET_USER_MEMORY_REGION of memslot {slot}")]
    Memslot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{ioctl} of memslot {slot}")]
    DirtyLog {
        ioctl: &'static str,
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{ioctl} on the VM")]
    VmIoctl {
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {ioctl}")]
    Vcpu {
        index: usize,
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM_SET_MSRS rejected MSRs {}", hex_list(msrs))]
    MsrsRejected { index: usize, msrs: Vec<u32> },
    #[error("vCPU {index} stopped: {reason}")]
    GuestStopped { index: usize, reason: String },
    #[error("vCPU {0}: its thread panicked")]
    VcpuPanicked(usize),
    #[error("spawning the thread of vCPU {index}")]
    Thread {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("spawning the vCPU throttle thread")]
    ThrottleThread {
        #[source]
        source: io::Error,
    },
    #[error("installing the vCPU kick signal handler")]
    KickSignal {
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("no vCPU {0}")]
    NoVcpu(usize),
    #[error("no RAM block {0}")]
    NoBlock(usize),
    #[error("no device {0}")]
    NoDevice(usize),
    #[error("dirty bitmap of {pages} pages for block {block} of {expected}")]
    BitmapSize {
        block: usize,
        pages: usize,
        expected: usize,
    },
    #[error("dirty logging is not started")]
    NotLogging,
    #[error("the VM is running; pause it first")]
    Running,
    #[error("vCPU {0} has no state: load it before starting an incoming VM")]
    NotLoaded(usize),
    #[error("guest address {gpa:#x}+{len:#x} is outside guest RAM")]
    OutsideRam { gpa: u64, len: usize },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error(transparent)]
    Accel(#[from] AccelError),
}

fn words(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn hex_list(v: &[u32]) -> String {
    v.iter()
        .map(|m| format!("{m:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `err` and its sources on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

impl KvmError {
    /// The engine's error for this one, under the name of what the engine asked for.
    fn into_vm(self, op: &'static str) -> VmError {
        match self {
            KvmError::State(e) => VmError::State(e),
            other => VmError::Io {
                op,
                source: io::Error::other(other),
            },
        }
    }
}

/// Whether this host can run [`KvmVm`]s: `/dev/kvm` opens, speaks API 12, makes a VM,
/// and offers what the pause protocol relies on.
pub fn kvm_usable() -> Result<(), KvmError> {
    let kvm = open_kvm()?;
    let vm = create_vm(&kvm)?;
    check_caps(&kvm, &vm)
}

fn open_kvm() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| KvmError::Unusable {
        what: "open",
        errno: e.errno(),
    })?;
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v => Err(KvmError::ApiVersion(v)),
    }
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    kvm.create_vm().map_err(|e| KvmError::Unusable {
        what: "KVM_CREATE_VM",
        errno: e.errno(),
    })
}

fn check_caps(kvm: &Kvm, vm: &VmFd) -> Result<(), KvmError> {
    for (cap, name) in [
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::Unsupported(name.into()));
        }
    }
    state::check_xsave_size(vm)
}

/// A KVM VM running the ferry workload (see the module docs).
pub struct KvmVm {
    // Declared first so vCPU threads stop before anything else goes.
    vcpus: vcpu::Vcpus,
    dirty: Arc<KvmDirtyLog>,
    ram: Arc<KvmRam>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    cfg: KvmConfig,
    msr_indices: Vec<u32>,
    /// Per vCPU: has state (from `create` or `load_vcpu`), so it may run.
    has_state: Vec<AtomicBool>,
    serial: Arc<Serial>,
    accels: Accels,
}

/// The devices of [`MigratableVm::devices`], by index.
enum Device<'a> {
    KvmVm,
    Serial(&'a Serial),
    Accel(&'a Accel),
}

impl KvmVm {
    /// Creates the VM with its RAM, irqchip and vCPUs. vCPUs do not run until
    /// [`KvmVm::start`] (or `resume`).
    pub fn create(cfg: &KvmConfig) -> Result<KvmVm, KvmError> {
        validate(cfg)?;
        let accels = Accels::new(&cfg.accels, cfg.incoming)?;
        let kvm = open_kvm()?;
        let vm = create_vm(&kvm)?;
        check_caps(&kvm, &vm)?;
        // Without an in-kernel LAPIC, KVM_SET_MSRS refuses MSR_KVM_ASYNC_PF_INT and a
        // restored vCPU misses MSRs; with one, all of them restore.
        vm.create_irq_chip().map_err(|source| KvmError::VmIoctl {
            ioctl: "KVM_CREATE_IRQCHIP",
            source,
        })?;
        // The ring must be on before the first vCPU exists.
        let use_ring = cfg.dirty_ring && ring::enable(&vm, ring::RING_ENTRIES)?;
        let vm = Arc::new(vm);
        let ram = Arc::new(KvmRam::new(cfg.mem_size)?);
        for slot in 0..ram.blocks().len() {
            ram.set_memslot(&vm, slot, 0)?;
        }
        if !cfg.incoming {
            for (gpa, bytes) in layout::low_slot_image(cfg.mem_size) {
                ram.write(gpa, &bytes);
            }
            for index in 0..cfg.vcpus {
                ram.write(layout::rate_gpa(index), &cfg.dirty_rate.to_le_bytes());
            }
            if cfg.fill > 0 {
                let offset = cfg.work().iter().map(|w| w.dirty_size()).sum::<u64>();
                ram.fill(offset, cfg.fill);
                let info = [layout::RAM_GPA + offset, cfg.fill];
                ram.write(layout::FILL_INFO_GPA, &words(&info));
            }
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| KvmError::VmIoctl {
                ioctl: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let mut fds = Vec::with_capacity(cfg.vcpus);
        let mut range = layout::RAM_GPA;
        for (index, work) in cfg.work().into_iter().enumerate() {
            let pages = work.dirty_size() / PAGE_SIZE as u64;
            let program = match work {
                VcpuWork::Compute => guest::Program::Compute,
                VcpuWork::Dirty(_) => guest::Program::for_workload(pages, cfg.dirty_rate),
            };
            fds.push(create_vcpu(
                &vm,
                index,
                &cpuid,
                (!cfg.incoming).then_some((range, pages, program)),
            )?);
            range += work.dirty_size();
        }
        let rings = if use_ring {
            fds.iter()
                .enumerate()
                .map(|(index, fd)| ring::DirtyRing::map(index, fd, ring::RING_ENTRIES))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let dirty = Arc::new(KvmDirtyLog::new(vm.clone(), ram.clone(), rings));
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(|source| KvmError::VmIoctl {
                ioctl: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?
            .as_slice()
            .to_vec();
        let serial = Arc::new(Serial::new());
        let io = Arc::new(IoBus::new().with(serial.clone()));
        Ok(KvmVm {
            vcpus: vcpu::Vcpus::new(fds, ram.clone(), dirty.clone(), io)?,
            dirty,
            ram,
            vm,
            _kvm: kvm,
            cfg: cfg.clone(),
            msr_indices,
            has_state: (0..cfg.vcpus)
                .map(|_| AtomicBool::new(!cfg.incoming))
                .collect(),
            serial,
            accels,
        })
    }

    pub fn config(&self) -> &KvmConfig {
        &self.cfg
    }

    /// Runs the accelerator, then the vCPUs. The same as `resume`; an incoming VM must
    /// have every vCPU and the accelerator loaded.
    pub fn start(&self) -> Result<(), KvmError> {
        if let Some(i) = self
            .has_state
            .iter()
            .position(|s| !s.load(Ordering::Acquire))
        {
            return Err(KvmError::NotLoaded(i));
        }
        self.accels.run()?;
        let started = self.vcpus.resume();
        if started.is_err() {
            self.accels.pause()?;
        }
        started
    }

    /// Stops the vCPUs, then the accelerator; returns once no vCPU is in `KVM_RUN` and
    /// the device no longer changes. An error from the vCPUs says that one had stopped
    /// by itself (its guest failed); all are stopped either way.
    pub fn stop(&self) -> Result<(), KvmError> {
        let stopped = self.vcpus.pause();
        self.accels.pause()?;
        stopped
    }

    /// The serial console.
    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// Accelerator `instance`, if this VM has it.
    pub fn accel(&self, instance: usize) -> Option<&Accel> {
        self.accels.get(instance)
    }

    /// The accelerators, in order.
    pub fn accels(&self) -> &Accels {
        &self.accels
    }

    fn device(&self, index: usize) -> Result<Device<'_>, KvmError> {
        match index {
            0 => Ok(Device::KvmVm),
            1 => Ok(Device::Serial(&self.serial)),
            i => match self.accels.get(i - 2) {
                Some(a) => Ok(Device::Accel(a)),
                None => Err(KvmError::NoDevice(index)),
            },
        }
    }

    /// Device `index` of [`MigratableVm::devices`] as an accelerator: only they precopy.
    fn accel_at(&self, index: usize, op: &'static str) -> Result<&Accel, VmError> {
        match self.device(index) {
            Ok(Device::Accel(a)) => Ok(a),
            _ => Err(KvmError::NoDevice(index).into_vm(op)),
        }
    }

    pub fn running(&self) -> bool {
        self.vcpus.is_running()
    }

    /// The pass counter of every vCPU, read from guest memory.
    pub fn passes(&self) -> Vec<u64> {
        (0..self.cfg.vcpus)
            .map(|i| self.ram.read_u64(layout::pass_gpa(i)))
            .collect()
    }

    /// `out` exits the VMM saw per vCPU (one per pass since this VM started).
    pub fn exits(&self) -> Vec<u64> {
        self.vcpus
            .stats
            .iter()
            .map(|s| s.exits.load(Ordering::Relaxed))
            .collect()
    }

    /// Per vCPU, `out` values that broke the sequence (should stay 0).
    pub fn out_errors(&self) -> Vec<u64> {
        self.vcpus
            .stats
            .iter()
            .map(|s| s.out_errors.load(Ordering::Relaxed))
            .collect()
    }

    /// Per vCPU, pages the paced program reported writing, and how long the VMM held it
    /// to its rate (both 0 for a vCPU running the original program).
    pub fn pacing(&self) -> Vec<(u64, Duration)> {
        self.vcpus
            .stats
            .iter()
            .map(|s| {
                (
                    s.reported_pages.load(Ordering::Relaxed),
                    Duration::from_micros(s.paced_us.load(Ordering::Relaxed)),
                )
            })
            .collect()
    }

    /// The dirty log, with the KVM-specific extras ([`KvmDirtyLog::harvest_with_cost`]).
    pub fn dirty(&self) -> &KvmDirtyLog {
        &self.dirty
    }

    /// Writes guest memory as a device would, and records the pages in the VMM's dirty
    /// bitmap (KVM does not see these writes).
    pub fn write_guest(&self, gpa: u64, bytes: &[u8]) -> Result<(), KvmError> {
        let (block, _) = self
            .ram
            .host_addr(gpa, bytes.len())
            .ok_or(KvmError::OutsideRam {
                gpa,
                len: bytes.len(),
            })?;
        self.ram.write(gpa, bytes);
        if !bytes.is_empty() {
            let base = self.ram.blocks()[block].gpa;
            let first = ((gpa - base) / PAGE_SIZE as u64) as usize;
            let last = ((gpa - base + bytes.len() as u64 - 1) / PAGE_SIZE as u64) as usize;
            self.dirty.mark(block, first, last - first + 1);
        }
        Ok(())
    }

    /// Checks, while paused, that every vCPU's range holds what its workload wrote: a
    /// prefix of pages at `pass + 1` (as `u8`) as long as the guest's position in its
    /// current pass (from its registers), the rest at `pass`. The guest bumps its counter
    /// after the pass, so between passes every page holds `pass`. Then that the fill,
    /// if the guest has one, holds what was written there. Returns the pages checked.
    pub fn check_pattern(&self) -> Result<u64, String> {
        if self.running() {
            return Err("the VM is running; pause it first".into());
        }
        let mut problems = Vec::new();
        let mut checked = 0;
        for i in 0..self.cfg.vcpus {
            match self.check_vcpu_pattern(i) {
                Ok(pages) => checked += pages,
                Err(e) => problems.push(format!("vCPU {i}: {e}")),
            }
        }
        match self.check_fill() {
            Ok(pages) => checked += pages,
            Err(e) => problems.push(format!("fill: {e}")),
        }
        if problems.is_empty() {
            Ok(checked)
        } else {
            Err(problems.join("; "))
        }
    }

    fn check_vcpu_pattern(&self, i: usize) -> Result<u64, String> {
        let regs = self
            .vcpus
            .parked(i)
            .map_err(|e| e.to_string())?
            .get_regs()
            .map_err(|e| e.to_string())?;
        if regs.rbx != layout::pass_gpa(i) || regs.r9 & 0xffff != guest::port(i) as u64 {
            return Err(format!(
                "registers do not hold the workload (rbx {:#x}, r9 {:#x})",
                regs.rbx, regs.r9
            ));
        }
        let Some((program, rip_off)) = guest::Program::at(regs.rip) else {
            return Err(format!("rip {:#x} is in no guest program", regs.rip));
        };
        let (start, pages) = (regs.rsi, regs.r8);
        let ram = &self.ram.blocks()[memory::RAM_BLOCK];
        // An idle vCPU (the paced program over no pages) and a computing one have
        // nothing to check.
        let idle =
            (program == guest::Program::Paced && pages == 0) || program == guest::Program::Compute;
        if idle {
            return Ok(0);
        }
        if start < ram.gpa
            || start % 4096 != 0
            || pages == 0
            || start + pages * 4096 > ram.gpa + ram.size
        {
            return Err(format!(
                "range {start:#x} of {pages} pages is not inside the RAM block"
            ));
        }
        let pass = self.ram.read_u64(layout::pass_gpa(i));
        let ahead = program.pages_ahead(rip_off, regs.rdi, start, pages)?;
        let mut bad = Vec::new();
        let mut bad_count = 0;
        for p in 0..pages {
            let want = if p < ahead {
                pass.wrapping_add(1)
            } else {
                pass
            } as u8;
            let got = self.ram.read_u8(start + p * 4096);
            if got != want {
                bad_count += 1;
                if bad.len() < 4 {
                    bad.push(format!("page {p} holds {got}, expected {want}"));
                }
            }
        }
        if bad_count == 0 {
            Ok(pages)
        } else {
            Err(format!(
                "pass {pass}, {ahead} pages ahead: {bad_count} pages wrong ({})",
                bad.join(", ")
            ))
        }
    }

    /// Checks the fill the low slot says the guest has (none from a release without
    /// `--fill` on KVM: the words are zero there); returns its pages.
    fn check_fill(&self) -> Result<u64, String> {
        let gpa = self.ram.read_u64(layout::FILL_INFO_GPA);
        let len = self.ram.read_u64(layout::FILL_INFO_GPA + 8);
        if len == 0 {
            return Ok(0);
        }
        let ram = &self.ram.blocks()[memory::RAM_BLOCK];
        let offset = gpa.wrapping_sub(ram.gpa);
        if gpa < ram.gpa
            || offset % 4096 != 0
            || len % 4096 != 0
            || offset.checked_add(len).is_none_or(|end| end > ram.size)
        {
            return Err(format!(
                "the range {gpa:#x} of {len:#x} bytes is not inside the RAM block"
            ));
        }
        // SAFETY: inside the RAM block (checked above), whose vCPUs are paused.
        let wrong = unsafe {
            crate::memory::fill_pages_wrong(self.ram.host_ptr(memory::RAM_BLOCK), offset, len)
        };
        match wrong {
            0 => Ok(len / 4096),
            n => Err(format!(
                "{n} of {} pages do not hold the data written there",
                len / 4096
            )),
        }
    }
}

fn validate(cfg: &KvmConfig) -> Result<(), KvmError> {
    let bad = |m: String| Err(KvmError::Config(m));
    let page = PAGE_SIZE as u64;
    if cfg.mem_size == 0 || cfg.mem_size % page != 0 || cfg.mem_size > layout::MAX_RAM {
        return bad(format!(
            "mem_size {} must be a non-zero multiple of 4 KiB of at most {} GiB",
            cfg.mem_size,
            layout::MAX_RAM >> 30
        ));
    }
    if cfg.vcpus == 0 || cfg.vcpus > layout::MAX_VCPUS {
        return bad(format!(
            "{} vCPUs: between 1 and {} are supported",
            cfg.vcpus,
            layout::MAX_VCPUS
        ));
    }
    if cfg.dirty_size % page != 0 {
        return bad(format!(
            "the dirtied range (--dirty {}) must be a multiple of 4 KiB",
            cfg.dirty_size
        ));
    }
    if !cfg.vcpu_work.is_empty() && cfg.vcpu_work.len() != cfg.vcpus {
        return bad(format!(
            "{} vCPUs with work (--vcpu-dirty) given for {}",
            cfg.vcpus,
            cfg.vcpu_work.len()
        ));
    }
    if let Some(size) = cfg
        .vcpu_work
        .iter()
        .map(|w| w.dirty_size())
        .find(|s| s % page != 0)
    {
        return bad(format!(
            "a vCPU's dirtied range (--vcpu-dirty {size}) must be a multiple of 4 KiB"
        ));
    }
    if cfg.fill % page != 0 {
        return bad(format!(
            "the filled range (--fill {}) must be a multiple of 4 KiB",
            cfg.fill
        ));
    }
    let ranges = cfg
        .work()
        .iter()
        .try_fold(0u64, |sum, w| sum.checked_add(w.dirty_size()));
    if ranges
        .and_then(|ranges| ranges.checked_add(cfg.fill))
        .is_none_or(|total| total > cfg.mem_size)
    {
        return bad(format!(
            "{} vCPUs dirtying {} each (--dirty) and the filled range (--fill {}) do not \
             fit in guest RAM (--mem {})",
            cfg.vcpus,
            human_bytes(cfg.dirty_size),
            human_bytes(cfg.fill),
            human_bytes(cfg.mem_size)
        ));
    }
    Ok(())
}

/// Creates vCPU `index` with the host's CPUID (its APIC ID patched in); with a
/// `workload` (its range's address and pages, and its program), also puts it at the
/// first instruction of that program.
fn create_vcpu(
    vm: &VmFd,
    index: usize,
    cpuid: &kvm_bindings::CpuId,
    workload: Option<(u64, u64, guest::Program)>,
) -> Result<VcpuFd, KvmError> {
    let e = |ioctl| {
        move |source| KvmError::Vcpu {
            index,
            ioctl,
            source,
        }
    };
    let fd = vm.create_vcpu(index as u64).map_err(e("KVM_CREATE_VCPU"))?;
    let mut cpuid = cpuid.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | ((index as u32) << 24),
            0xb | 0x1f => entry.edx = index as u32,
            _ => {}
        }
    }
    fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    if let Some((range, pages, program)) = workload {
        let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
        fd.set_sregs(&layout::initial_sregs(&sregs))
            .map_err(e("KVM_SET_SREGS"))?;
        fd.set_regs(&layout::initial_regs(index, range, pages, program))
            .map_err(e("KVM_SET_REGS"))?;
        // With an in-kernel LAPIC every vCPU but 0 starts waiting for INIT/SIPI, which
        // nobody here sends: make it runnable, as the BSP is.
        let runnable = kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        };
        fd.set_mp_state(runnable).map_err(e("KVM_SET_MP_STATE"))?;
    }
    Ok(fd)
}

impl MigratableVm for KvmVm {
    fn ram(&self) -> Arc<dyn GuestRam> {
        self.ram.clone()
    }

    fn dirty_log(&self) -> &dyn DirtyLog {
        &*self.dirty
    }

    fn vcpu_count(&self) -> usize {
        self.cfg.vcpus
    }

    fn vcpu_schema(&self) -> &'static StateSchema {
        &VCPU_SCHEMA
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        [&VM_SCHEMA, &SERIAL_SCHEMA]
            .into_iter()
            .map(|schema| DeviceInfo {
                name: schema.name.into(),
                instance: 0,
                schema,
                config: Vec::new(),
                precopy: None,
            })
            .chain(self.accels.device_infos())
            .collect()
    }

    fn pause(&self) -> Result<(), VmError> {
        self.stop().map_err(|e| e.into_vm("pause the VM"))
    }

    fn resume(&self) -> Result<(), VmError> {
        self.start().map_err(|e| e.into_vm("resume the VM"))
    }

    fn is_running(&self) -> bool {
        self.running()
    }

    fn save_vcpu(&self, index: usize) -> Result<DeviceState, VmError> {
        let op = "save vCPU state";
        let fd = self.vcpus.parked(index).map_err(|e| e.into_vm(op))?;
        state::save_vcpu(index, &fd, &self.msr_indices).map_err(|e| e.into_vm(op))
    }

    fn load_vcpu(&self, index: usize, state: DeviceState) -> Result<(), VmError> {
        let op = "load vCPU state";
        let fd = self.vcpus.parked(index).map_err(|e| e.into_vm(op))?;
        state::load_vcpu(index, &fd, &state).map_err(|e| e.into_vm(op))?;
        self.has_state[index].store(true, Ordering::Release);
        Ok(())
    }

    fn device_pending(&self, index: usize) -> DevicePending {
        match self.device(index) {
            Ok(Device::Accel(a)) => a.pending(),
            _ => DevicePending::default(),
        }
    }

    fn save_device(&self, index: usize, out: &mut StateWriter<'_>) -> Result<(), VmError> {
        let device = self
            .device(index)
            .map_err(|e| e.into_vm("save device state"))?;
        let op = match device {
            Device::KvmVm => "save KVM VM state",
            Device::Serial(_) => "save serial state",
            Device::Accel(_) => "save accel state",
        };
        if self.running() {
            return Err(KvmError::Running.into_vm(op));
        }
        match device {
            Device::KvmVm => {
                state::save_vm(&self.vm).and_then(|st| out.write_state(&st).map_err(KvmError::from))
            }
            Device::Serial(serial) => out.write_state(&serial.save()).map_err(KvmError::from),
            // Streams from the device's memory into the migration stream.
            Device::Accel(accel) => accel.save(out).map_err(KvmError::from),
        }
        .map_err(|e| e.into_vm(op))
    }

    fn load_device(&self, index: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        let device = self
            .device(index)
            .map_err(|e| e.into_vm("load device state"))?;
        let op = match device {
            Device::KvmVm => "load KVM VM state",
            Device::Serial(_) => "load serial state",
            Device::Accel(_) => "load accel state",
        };
        if self.running() {
            return Err(KvmError::Running.into_vm(op));
        }
        match device {
            Device::KvmVm => input
                .read_state()
                .map_err(KvmError::from)
                .and_then(|st| state::load_vm(&self.vm, &st)),
            Device::Serial(serial) => input
                .read_state()
                .map_err(KvmError::from)
                .and_then(|st| serial.load(&st).map_err(KvmError::from)),
            // Streams from the migration stream into the device's memory.
            Device::Accel(accel) => accel.load(input).map_err(KvmError::from),
        }
        .map_err(|e| e.into_vm(op))
    }

    fn precopy_begin(&self, index: usize) -> Result<(), VmError> {
        self.accel_at(index, "begin precopy")?
            .precopy_begin()
            .map_err(|e| KvmError::from(e).into_vm("begin precopy"))
    }

    fn save_precopy(&self, index: usize, out: &mut StateWriter<'_>) -> Result<bool, VmError> {
        self.accel_at(index, "save precopy record")?
            .save_precopy(out)
            .map_err(|e| KvmError::from(e).into_vm("save precopy record"))
    }

    fn load_precopy(&self, index: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        self.accel_at(index, "load precopy record")?
            .load_precopy(input)
            .map_err(|e| KvmError::from(e).into_vm("load precopy record"))
    }

    fn precopy_abandon(&self, index: usize) {
        if let Ok(Device::Accel(a)) = self.device(index) {
            a.precopy_abandon();
        }
    }

    fn set_vcpu_throttle(&self, throttle: VcpuThrottle) -> Result<(), VmError> {
        crate::throttle::check(throttle)?;
        let op = "set the vCPU throttle";
        let limit = matches!(throttle, VcpuThrottle::DirtyLimit { .. });
        if limit && !self.dirty.uses_ring() {
            return Err(VmError::Failed(
                "a dirty-limit needs each vCPU's dirty rate, which this VM cannot measure: \
                 it tracks dirty pages with the bitmap (ferry run --dirty-ring off, or KVM \
                 here lacks KVM_CAP_DIRTY_LOG_RING)"
                    .into(),
            ));
        }
        self.dirty
            .set_rate_window(crate::throttle::rate_window(throttle));
        // Logging starts before the throttle thread measures, and stops after it ends.
        if limit {
            self.dirty
                .set_limit_logging(true)
                .map_err(|e| e.into_vm(op))?;
        }
        self.vcpus
            .set_throttle(throttle)
            .map_err(|e| e.into_vm(op))?;
        if !limit {
            self.dirty
                .set_limit_logging(false)
                .map_err(|e| e.into_vm(op))?;
        }
        Ok(())
    }

    fn vcpu_throttle_stats(&self) -> Vec<VcpuThrottleStats> {
        let rates = self.dirty.rates();
        self.vcpus
            .holds
            .iter()
            .zip(rates.into_iter().chain(std::iter::repeat(None)))
            .map(|(h, rate)| VcpuThrottleStats {
                dirty_rate: rate,
                ..h.counters.stats()
            })
            .collect()
    }
}
