//! What the engine needs from a VM, and nothing more.
//!
//! A VMM implements these traits for its VM; the engine never sees KVM, threads of the
//! VMM or device models. Both sides use the same traits: the source saves through them,
//! the destination (a VM created paused, with the same RAM layout) loads through them.

use std::io;
use std::sync::Arc;

use thiserror::Error;

use super::bitmap::DirtyBitmap;
use crate::state::{DeviceState, StateError, StateReader, StateSchema, StateWriter};

/// One contiguous block of guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// Stable name, the same on both sides (for example `ram0`).
    pub name: String,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes, a multiple of [`crate::PAGE_SIZE`].
    pub size: u64,
}

impl RamBlock {
    pub fn pages(&self) -> usize {
        (self.size / crate::PAGE_SIZE as u64) as usize
    }
}

/// Guest RAM as host memory.
///
/// # Safety
///
/// Implementors guarantee that `host_ptr(i)` is the start of a readable and writable
/// mapping of `blocks()[i].size` bytes that stays mapped for as long as the implementor
/// lives. vCPUs and devices may write to it at any time while the VM runs; the engine
/// reads pages racily on the source (the dirty log catches every page written after it
/// was harvested) and writes pages only on a destination whose VM is not running.
pub unsafe trait GuestRam: Send + Sync {
    fn blocks(&self) -> &[RamBlock];

    fn host_ptr(&self, block: usize) -> *mut u8;

    /// Marks in `out` every page of `block` that may hold non-zero data. A page left
    /// unmarked must read as zero. The default marks every page.
    ///
    /// `out` starts empty and costs nothing where nothing is set, so an implementation
    /// that learns populated *extents* (and marks them with [`DirtyBitmap::set_range`])
    /// makes an idle guest's migration cost nothing in proportion to its RAM.
    fn populated(&self, block: usize, out: &DirtyBitmap) {
        let _ = block;
        out.set_all();
    }

    /// Whether [`populated`](Self::populated) marked only pages that may hold data (as
    /// read from the host's page tables or an allocation map), rather than every page
    /// as the default does or as an implementation does that could not tell. The source
    /// tells a destination that populates ahead (`migration.x-ferry-populate-ahead`)
    /// where memory is only when this is true, so a destination never faults in all of
    /// a guest's RAM on the word of a scan that marked everything. Asked after
    /// `populated`, so an implementation may answer for the scan it just made.
    fn populated_is_exact(&self) -> bool {
        false
    }

    /// Faults in `pages` pages of `block` from page `first` without changing what they
    /// hold: a destination's populate-ahead (`migration.x-ferry-populate-ahead`), run on
    /// a thread of its own while the pages are on their way, so that they land in
    /// memory that is already there. The engine only asks for pages inside the block.
    ///
    /// The default asks the kernel (`MADV_POPULATE_WRITE`, Linux 5.14), which suits any
    /// ordinary shared or private mapping. An embedder whose memory must stay allocated
    /// lazily returns `Ok(())` without doing anything; an error stops the populating
    /// for the rest of the migration (the pages are then faulted in as they land).
    fn prepare(&self, block: usize, first: usize, pages: usize) -> std::io::Result<()> {
        let b = &self.blocks()[block];
        assert!(
            first.checked_add(pages).is_some_and(|e| e <= b.pages()),
            "prepare past the end of block {block}"
        );
        if pages == 0 {
            return Ok(());
        }
        // SAFETY: the range lies inside the block's mapping (checked above), which the
        // trait's contract keeps mapped; MADV_POPULATE_WRITE faults pages in without
        // writing to them, so what the guest or the engine put there is unchanged.
        let rc = unsafe {
            libc::madvise(
                self.host_ptr(block).add(first * crate::PAGE_SIZE).cast(),
                pages * crate::PAGE_SIZE,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// Write tracking of guest RAM.
pub trait DirtyLog: Send + Sync {
    /// Starts tracking writes to guest RAM.
    fn start(&self) -> Result<(), VmError>;

    /// Stops tracking.
    fn stop(&self);

    /// ORs into `into` the pages of `block` written since tracking started or since the
    /// previous harvest, and forgets them.
    fn harvest(&self, block: usize, into: &DirtyBitmap) -> Result<(), VmError>;

    /// Puts back pages that a failed migration harvested but did not deliver, so the next
    /// harvest reports them again.
    fn restore(&self, block: usize, pages: &DirtyBitmap);
}

/// A device whose state migrates.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// The device's state name (also its schema's name).
    pub name: String,
    pub instance: u32,
    pub schema: &'static StateSchema,
    /// How the device is configured, as `(key, value)` with exact values in the
    /// units a user gives them (`size` = `256M`). Both sides of a migration must agree;
    /// the hello carries it so that the destination refuses a difference before any RAM
    /// moves. Empty for a device with nothing to configure.
    pub config: Vec<(String, String)>,
    /// Whether this host can move the device's state while the guest runs (VFIO's
    /// `VFIO_MIGRATION_PRE_COPY`, which depends on the host's driver, not only on the
    /// release): the schema of one precopy record, or `None` when its state moves at the
    /// switchover only. See [`MigratableVm::precopy_begin`].
    pub precopy: Option<&'static StateSchema>,
}

/// A VM the engine can migrate out of or into.
pub trait MigratableVm: Send + Sync {
    fn ram(&self) -> Arc<dyn GuestRam>;

    fn dirty_log(&self) -> &dyn DirtyLog;

    fn vcpu_count(&self) -> usize;

    /// The schema of one vCPU's state.
    fn vcpu_schema(&self) -> &'static StateSchema;

    fn devices(&self) -> Vec<DeviceInfo>;

    /// Stops vCPUs and devices. When it returns, neither writes guest RAM nor changes its
    /// state until [`MigratableVm::resume`].
    fn pause(&self) -> Result<(), VmError>;

    fn resume(&self) -> Result<(), VmError>;

    fn is_running(&self) -> bool;

    /// Saves vCPU `index`. Only called while paused.
    fn save_vcpu(&self, index: usize) -> Result<DeviceState, VmError>;

    /// Loads vCPU `index`. Only called on a destination that is not running.
    fn load_vcpu(&self, index: usize, state: DeviceState) -> Result<(), VmError>;

    /// Saves device `index` of [`MigratableVm::devices`] into `out`, which the engine
    /// has pointed at the migration stream. Only called while paused.
    ///
    /// A device with a small state builds a [`DeviceState`] and hands it over with
    /// [`StateWriter::write_state`]; one with memory of its own streams it: fields in
    /// schema order, large `Bytes` fields in chunks read straight from its memory
    /// ([`StateWriter::begin`], [`StateWriter::open_bytes`], [`StateWriter::chunk`],
    /// [`StateWriter::finish`]), so no copy of the state is ever held beside the device's.
    /// The bytes leave for the peer as they are written. The engine refuses a save that
    /// returns before the whole state is written.
    fn save_device(&self, index: usize, out: &mut StateWriter<'_>) -> Result<(), VmError>;

    /// Loads device `index` of [`MigratableVm::devices`] from `input`, bytes straight
    /// from the peer, which the reader checks as it goes (they are untrusted): whole with
    /// [`StateReader::read_state`] or in pieces as they were written. The engine refuses
    /// a load that returns before the whole state is read. Only called on a destination
    /// that is not running.
    fn load_device(&self, index: usize, input: &mut StateReader<'_>) -> Result<(), VmError>;

    /// What device `index` still has to move, as far as it can tell now (VFIO's
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`, QEMU's `state_pending_estimate`). The source
    /// counts every device's stop-copy bytes into the downtime a switchover would
    /// cost, so a device with large state keeps the guest running until it fits. The
    /// default, nothing pending, suits devices whose state is a few bytes.
    fn device_pending(&self, index: usize) -> DevicePending {
        let _ = index;
        DevicePending::default()
    }

    /// Device precopy: both hosts can precopy device `index` and the peers agreed to
    /// (see [`DeviceInfo::precopy`] and `migration.switchover-ack`), in the spirit of
    /// VFIO migration v2's PRE_COPY state and QEMU's `save_live_iterate`.
    ///
    /// * Source: the device starts tracking what it changes (VFIO RUNNING -> PRE_COPY)
    ///   and from now on reports `initial` and `precopy` bytes in
    ///   [`MigratableVm::device_pending`]. The engine calls
    ///   [`MigratableVm::save_precopy`] while the guest runs, and after
    ///   [`MigratableVm::pause`] until nothing is pending; then
    ///   [`MigratableVm::save_device`] writes the final state, which relies on the
    ///   records sent before it.
    /// * Destination: the device expects precopy records
    ///   ([`MigratableVm::load_precopy`]) and then a final state that relies on them.
    ///
    /// Called once per migration, before any record. The default refuses: a device
    /// that sets [`DeviceInfo::precopy`] implements all four precopy calls.
    fn precopy_begin(&self, index: usize) -> Result<(), VmError> {
        Err(VmError::Failed(format!(
            "device {index} cannot precopy its state"
        )))
    }

    /// Source: writes device `index`'s next precopy record into `out`: one state of its
    /// [`DeviceInfo::precopy`] schema, of a bounded size. Returns `false`, having
    /// written nothing, when nothing is pending now. A record may be written while the
    /// guest runs and, once it is paused, until the device has nothing left.
    fn save_precopy(&self, index: usize, out: &mut StateWriter<'_>) -> Result<bool, VmError> {
        let _ = out;
        Err(VmError::Failed(format!(
            "device {index} cannot precopy its state"
        )))
    }

    /// Destination: loads one precopy record of device `index`, bytes straight from the
    /// peer (untrusted, checked by the reader as it goes). Only called on a destination
    /// that is not running, after [`MigratableVm::precopy_begin`].
    fn load_precopy(&self, index: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        let _ = input;
        Err(VmError::Failed(format!(
            "device {index} cannot load precopy records"
        )))
    }

    /// Slows the guest's vCPUs so that a migration can converge (QEMU's auto-converge
    /// and dirty-limit): the engine decides when and how much, the VMM carries it out in
    /// its vCPU threads, and it holds until the next call (`VcpuThrottle::None` lifts
    /// it; the engine always lifts it when a migration ends). The default refuses: a VMM
    /// without throttling runs its guest at full speed, and the engine says so.
    fn set_vcpu_throttle(&self, throttle: VcpuThrottle) -> Result<(), VmError> {
        match throttle {
            VcpuThrottle::None => Ok(()),
            _ => Err(VmError::Failed("this VMM cannot throttle its vCPUs".into())),
        }
    }

    /// What throttling has cost the guest so far, per vCPU, and the dirty rate each
    /// vCPU has now, as far as the VMM can measure it (on KVM, from the vCPU's dirty
    /// ring). Empty when the VMM does not measure.
    fn vcpu_throttle_stats(&self) -> Vec<VcpuThrottleStats> {
        Vec::new()
    }

    /// The migration that began precopy of device `index` ended without handing the
    /// guest over: the source's device stops tracking (PRE_COPY -> RUNNING, or STOP if
    /// the guest is stopped), the destination's forgets the records it loaded. Called
    /// before the source resumes the guest.
    fn precopy_abandon(&self, index: usize) {
        let _ = index;
    }
}

/// How a VMM is to slow its vCPUs ([`MigratableVm::set_vcpu_throttle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VcpuThrottle {
    /// Full speed.
    None,
    /// Auto-converge (QEMU's CPU throttle): every vCPU sleeps `percent` (1 to 99) of
    /// each period of [`CPU_THROTTLE_PERIOD`] and runs the rest, whatever it does.
    Cpu { percent: u8 },
    /// Dirty-limit (QEMU 8.1's): a vCPU that dirties guest memory faster than
    /// `bytes_per_sec`, measured over `period`, is slowed until it does not; a vCPU
    /// that does not write runs at full speed.
    DirtyLimit {
        bytes_per_sec: u64,
        period: std::time::Duration,
    },
}

/// The period of the CPU throttle, as QEMU's (`CPU_THROTTLE_TIMESLICE_NS`, 10 ms).
pub const CPU_THROTTLE_PERIOD: std::time::Duration = std::time::Duration::from_millis(10);

/// One vCPU's throttle figures ([`MigratableVm::vcpu_throttle_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuThrottleStats {
    /// Time this vCPU was held back by a throttle, in all, so far.
    pub throttled: std::time::Duration,
    /// The bytes of guest memory per second this vCPU dirtied over the last period
    /// measured, if the VMM measures it.
    pub dirty_rate: Option<u64>,
}

/// A device's estimate of the state it has left to send (VFIO's
/// `VFIO_MIG_GET_PRECOPY_INFO` and `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DevicePending {
    /// In precopy: bytes it could send now while the guest runs, `initial` included.
    pub precopy: u64,
    /// In precopy: of `precopy`, the initial data not yet sent (VFIO's
    /// `initial_bytes`). Once it reaches 0 the engine tells the destination, which
    /// acknowledges the device when that data has loaded.
    pub initial: u64,
    /// Bytes it would send at the switchover if the guest stopped now.
    pub stop_copy: u64,
}

impl DevicePending {
    /// A device whose state moves at the switchover only.
    pub fn stop_copy(bytes: u64) -> Self {
        Self {
            precopy: 0,
            initial: 0,
            stop_copy: bytes,
        }
    }

    /// A device in precopy: `initial` bytes of its first data not yet sent, `dirty`
    /// bytes changed since they were sent, and `stop_copy` bytes it would send at the
    /// switchover if the guest stopped now.
    pub fn precopy(initial: u64, dirty: u64, stop_copy: u64) -> Self {
        Self {
            precopy: initial + dirty,
            initial,
            stop_copy,
        }
    }
}

#[derive(Debug, Error)]
pub enum VmError {
    #[error("{op} failed")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Failed(String),
}
