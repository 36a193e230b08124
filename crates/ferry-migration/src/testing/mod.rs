//!
//! It checks that a [`MigratableVm`] keeps the contract of [`crate::engine::vm`], the way
//! crosvm tests every `Suspendable` device against one lifecycle contract. Only built with
//! the crate's `testing` feature.
//!
//! The engine trusts the VM in ways it cannot check while it migrates: a page missing from
//! a harvest is a page of guest memory that silently keeps its old contents on the
//! destination, and a `pause` that returns too early loses the guest's last writes. This
//! kit drives one VM through the calls the engine makes, in the order it makes them, and
//! checks what each call promises. An embedder runs it in a test of its own VMM.
//!
//! # The contract
//!
//! Each item is one check; a [`Failure`] names the check (its [`checks`] constant) first.
//!
//! * [`checks::SCHEMAS`]: the vCPU schema and every [`DeviceInfo`]'s schema pass
//!   [`StateSchema::validate`], each device is named like its schema, and no two devices
//!   share a name and an instance.
//! * [`checks::RAM_BLOCKS`]: at least one block; names non-empty and unique; sizes
//!   multiples of [`PAGE_SIZE`]; guest-physical ranges that neither overlap nor wrap;
//!   `host_ptr` non-null, the same on every call and through every `ram()` handle, with
//!   host ranges that do not overlap.
//! * [`checks::SHAPE`]: the incoming VM has the source's blocks, vCPU count, vCPU schema
//!   and devices (names, instances, schemas, configuration), and `devices()` gives the
//!   same list every time it is called.
//! * [`checks::INCOMING_STOPPED`]: an incoming VM is created not running.
//! * [`checks::RESUME`]: `resume` returns with `is_running` true and the guest writing
//!   memory again; on a source that was paused and saved, too (a failed migration).
//! * [`checks::DIRTY_START`]: the dirty log starts on a running VM.
//! * [`checks::DIRTY_GUEST_WRITES`]: within [`Options::timeout`] of `start`, a harvest
//!   reports pages the guest wrote. The kit never writes guest memory itself: the VM's
//!   guest must write on its own while it runs (a workload, a clock page, anything).
//! * [`checks::PAUSE`]: `pause` returns with `is_running` false, and from then on guest RAM
//!   does not change (compared over [`Options::settle`]) and the dirty log gains no page.
//! * [`checks::PAUSE_TWICE`]: pausing a paused VM succeeds and leaves it paused.
//! * [`checks::DIRTY_HARVEST_CLEARS`]: a harvest forgets what it reported: two harvests in a
//!   row on a paused VM, the second is empty.
//! * [`checks::RAM_POPULATED`]: on the paused source and on the incoming VM, `populated`
//!   marks every page that holds a non-zero byte.
//! * [`checks::DIRTY_RESTORE`]: after `restore` of the pages of an earlier harvest, the next
//!   harvest reports all of them (and the one after, none); restoring nothing adds nothing.
//! * [`checks::DIRTY_TRACKS_WRITES`]: with the log on, every page whose contents changed
//!   between a paused snapshot and the next pause shows in a harvest.
//! * [`checks::DIRTY_STOP`]: the log stops, and starts again (a retried migration).
//! * [`checks::STATE_SAVE`]: on the paused source, every vCPU and device saves: a vCPU's
//!   state encodes with its schema ([`state::encode`]); a device writes its whole state
//!   into a [`state::StateWriter`], whole or streamed, and returns only after the last
//!   byte.
//! * [`checks::STATE_SAVE_INTERRUPTED`]: a device save whose stream breaks halfway
//!   returns an error, and the source resumes afterwards (a failed migration resumes the
//!   guest; a device left mid-save must not stop that).
//! * [`checks::STATE_LOAD`]: those bytes decode with the incoming VM's schemas
//!   ([`state::decode`]) and load into it, as the engine's destination does: a device
//!   reads them from a [`state::StateReader`] to the last byte.
//! * [`checks::STATE_OLDER_VERSIONS`]: a schema with `min_version < version` loads what a
//!   stream at each older version carries (later fields zero, no subsections), and a
//!   state without its optional subsections loads too.
//! * [`checks::STATE_REFUSES_VERSION`]: bytes claiming a version the schema cannot load
//!   are refused before anything reaches the VM, and a `load_*` given a state at such a
//!   version does not panic (a vCPU accepting it is reported as a note: the engine never
//!   passes one, so the traits do not require a refusal).
//! * [`checks::STATE_REFUSES_FOREIGN`]: a `load_vcpu` given a state of another schema (none
//!   of its fields), or its own fields holding the wrong kinds of value, and a
//!   `load_device` given the bytes of another schema's state, return an error rather than
//!   loading or panicking. Schemas without fields are exempt.
//! * [`checks::RAM_STABLE`]: at the end, both VMs still report the blocks and host
//!   pointers they started with.
//!
//! A panic in any call of the VM fails the check that made the call. The run stops at the
//! first failure, since later checks build on earlier ones.
//!
//! Some findings are not failures but [`Report::notes`]: a source created paused, state
//! that changes between two saves of a paused VM (clocks that keep counting), a state
//! that does not read back identical after a load, a `load_*` that accepts a state whose
//! `version` its schema cannot load.
//!
//! # Running it
//!
//! Give [`conformance`] a closure that builds a fresh VM for a [`Role`]: a source (running
//! or paused: the kit resumes it) or an incoming destination (created paused, with the
//! same RAM layout and devices). It is called once for each. Keep the VM small: the kit
//! reads all of the source's guest RAM four times and the incoming VM's once.
//! The incoming VM is never resumed (the states it is given last are deliberately bad);
//! the source is left running with its dirty log stopped.
//!
//! ```
//! use std::sync::Arc;
//!
//! use ferry_migration::engine::vm::MigratableVm;
//! use ferry_migration::testing::{conformance, RefVm, Role};
//!
//! let report = conformance(&|role: Role| -> Arc<dyn MigratableVm> { Arc::new(RefVm::new(role)) })
//!     .unwrap_or_else(|failure| panic!("{failure}"));
//! println!("{report}");
//! assert!(report.notes.is_empty());
//! ```
//!
//! [`RefVm`] is a complete in-memory VM that passes the suite, and a model of what each
//! trait method has to do.
//!
// The `///` line on `mod testing` in lib.rs makes rustdoc resolve this module's links from
// the crate root, hence these definitions.
//! [`DeviceInfo`]: crate::engine::vm::DeviceInfo
//! [`Failure`]: crate::testing::Failure
//! [`MigratableVm`]: crate::engine::vm::MigratableVm
//! [`Options::settle`]: crate::testing::Options::settle
//! [`Options::timeout`]: crate::testing::Options::timeout
//! [`RefVm`]: crate::testing::RefVm
//! [`Report::notes`]: crate::testing::Report::notes
//! [`Role`]: crate::testing::Role
//! [`StateSchema::validate`]: crate::state::StateSchema::validate
//! [`checks`]: crate::testing::checks
//! [`conformance`]: crate::testing::conformance
//! [`checks::DIRTY_GUEST_WRITES`]: crate::testing::checks::DIRTY_GUEST_WRITES
//! [`checks::DIRTY_HARVEST_CLEARS`]: crate::testing::checks::DIRTY_HARVEST_CLEARS
//! [`checks::DIRTY_RESTORE`]: crate::testing::checks::DIRTY_RESTORE
//! [`checks::DIRTY_START`]: crate::testing::checks::DIRTY_START
//! [`checks::DIRTY_STOP`]: crate::testing::checks::DIRTY_STOP
//! [`checks::DIRTY_TRACKS_WRITES`]: crate::testing::checks::DIRTY_TRACKS_WRITES
//! [`checks::INCOMING_STOPPED`]: crate::testing::checks::INCOMING_STOPPED
//! [`checks::PAUSE`]: crate::testing::checks::PAUSE
//! [`checks::PAUSE_TWICE`]: crate::testing::checks::PAUSE_TWICE
//! [`checks::RAM_BLOCKS`]: crate::testing::checks::RAM_BLOCKS
//! [`checks::RAM_POPULATED`]: crate::testing::checks::RAM_POPULATED
//! [`checks::RAM_STABLE`]: crate::testing::checks::RAM_STABLE
//! [`checks::RESUME`]: crate::testing::checks::RESUME
//! [`checks::SCHEMAS`]: crate::testing::checks::SCHEMAS
//! [`checks::SHAPE`]: crate::testing::checks::SHAPE
//! [`checks::STATE_LOAD`]: crate::testing::checks::STATE_LOAD
//! [`checks::STATE_OLDER_VERSIONS`]: crate::testing::checks::STATE_OLDER_VERSIONS
//! [`checks::STATE_REFUSES_FOREIGN`]: crate::testing::checks::STATE_REFUSES_FOREIGN
//! [`checks::STATE_REFUSES_VERSION`]: crate::testing::checks::STATE_REFUSES_VERSION
//! [`checks::STATE_SAVE`]: crate::testing::checks::STATE_SAVE
//! [`checks::STATE_SAVE_INTERRUPTED`]: crate::testing::checks::STATE_SAVE_INTERRUPTED

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::vm::MigratableVm;

mod ram;
mod refvm;
mod suite;

pub use ram::HeapRam;
pub use refvm::{RefVm, REF_COUNTER_SCHEMA, REF_LAYOUT, REF_VCPU_SCHEMA};

/// Which VM the kit asks the embedder's closure for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A VM whose guest runs (or can be resumed) and that the engine would migrate out of.
    Source,
    /// A destination: created paused with the source's RAM layout and devices, waiting
    /// for state to be loaded.
    Incoming,
}

/// The names of the checks, as [`Failure::check`] and [`Report::passed`] give them.
pub mod checks {
    pub const SCHEMAS: &str = "state/schemas";
    pub const RAM_BLOCKS: &str = "ram/blocks";
    pub const SHAPE: &str = "shape";
    pub const INCOMING_STOPPED: &str = "incoming/stopped";
    pub const RESUME: &str = "run/resume";
    pub const DIRTY_START: &str = "dirty-log/start";
    pub const DIRTY_GUEST_WRITES: &str = "dirty-log/guest-writes";
    pub const PAUSE: &str = "run/pause";
    pub const PAUSE_TWICE: &str = "run/pause-twice";
    pub const DIRTY_HARVEST_CLEARS: &str = "dirty-log/harvest-clears";
    pub const RAM_POPULATED: &str = "ram/populated";
    pub const DIRTY_RESTORE: &str = "dirty-log/restore";
    pub const DIRTY_TRACKS_WRITES: &str = "dirty-log/tracks-writes";
    pub const DIRTY_STOP: &str = "dirty-log/stop";
    pub const STATE_SAVE: &str = "state/save";
    pub const STATE_SAVE_INTERRUPTED: &str = "state/save-interrupted";
    pub const STATE_LOAD: &str = "state/load";
    pub const STATE_OLDER_VERSIONS: &str = "state/older-versions";
    pub const STATE_REFUSES_VERSION: &str = "state/refuses-version";
    pub const STATE_REFUSES_FOREIGN: &str = "state/refuses-foreign";
    pub const RAM_STABLE: &str = "ram/stable";

    /// Every check, in the order the suite runs them first.
    pub const ALL: &[&str] = &[
        SCHEMAS,
        RAM_BLOCKS,
        SHAPE,
        INCOMING_STOPPED,
        RESUME,
        DIRTY_START,
        DIRTY_GUEST_WRITES,
        PAUSE,
        PAUSE_TWICE,
        DIRTY_HARVEST_CLEARS,
        RAM_POPULATED,
        DIRTY_RESTORE,
        DIRTY_TRACKS_WRITES,
        DIRTY_STOP,
        STATE_SAVE,
        STATE_SAVE_INTERRUPTED,
        STATE_LOAD,
        STATE_OLDER_VERSIONS,
        STATE_REFUSES_VERSION,
        STATE_REFUSES_FOREIGN,
        RAM_STABLE,
    ];
}

/// How long the kit waits for things.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait for the guest to write memory (after `start`, after `resume`).
    pub timeout: Duration,
    /// How long a paused VM is watched for writes it should not make.
    pub settle: Duration,
    /// Pause between two harvests while waiting for the guest.
    pub poll: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            settle: Duration::from_millis(50),
            poll: Duration::from_millis(2),
        }
    }
}

/// What a passing run saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The checks that passed, in the order they first ran: every one of [`checks::ALL`].
    pub passed: Vec<&'static str>,
    /// Findings that break no rule of the contract but that an embedder may want to know,
    /// each prefixed with the check that made it.
    pub notes: Vec<String>,
    /// The source VM's shape: blocks, vCPUs, devices.
    pub shape: String,
    /// How long the run took, the closure's VM construction included.
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} conformance checks passed in {} ms on {}",
            self.passed.len(),
            self.elapsed.as_millis(),
            self.shape
        )?;
        for note in &self.notes {
            write!(f, "\n  note: {note}")?;
        }
        Ok(())
    }
}

/// The first check that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// One of [`checks`].
    pub check: &'static str,
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "conformance check {} failed: {}",
            self.check, self.message
        )
    }
}

impl std::error::Error for Failure {}

/// Runs every check with the default [`Options`] on VMs that `make` builds: one
/// [`Role::Source`] and one [`Role::Incoming`].
pub fn conformance(make: &dyn Fn(Role) -> Arc<dyn MigratableVm>) -> Result<Report, Failure> {
    conformance_with(make, &Options::default())
}

/// [`conformance`] with other waits.
pub fn conformance_with(
    make: &dyn Fn(Role) -> Arc<dyn MigratableVm>,
    options: &Options,
) -> Result<Report, Failure> {
    suite::run(make, options)
}
