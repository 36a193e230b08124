//! The conformance kit on its reference VM, and on broken VMs it must catch: each breaks
//! one rule of the contract and must fail the check that states it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::engine::vm::{
    DeviceInfo, DirtyLog, GuestRam, MigratableVm, RamBlock, VmError,
};
use ferry_migration::state::{DeviceState, StateReader, StateSchema, StateWriter};
use ferry_migration::testing::{checks, conformance, Failure, RefVm, Report, Role};

fn reference(role: Role) -> Arc<dyn MigratableVm> {
    Arc::new(RefVm::new(role))
}

#[test]
fn the_reference_vm_passes_every_check() {
    let t = Instant::now();
    let report = conformance(&reference).unwrap_or_else(|f| panic!("{f}"));
    println!("{report}");
    assert_eq!(report.passed, checks::ALL);
    assert!(report.notes.is_empty(), "notes: {:?}", report.notes);
    assert!(t.elapsed().as_secs() < 5, "took {:?}", t.elapsed());
}

/// One way of breaking the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// `restore` forgets the pages it is given.
    RestoreDropsPages,
    /// `pause` returns at once and the guest keeps running, while `is_running` says it
    /// stopped.
    PauseKeepsRunning,
    /// `harvest` reports every page written since `start`, again and again.
    HarvestNeverClears,
    /// `populated` marks nothing, although the guest wrote pages.
    PopulatedMarksNothing,
    /// `load_device` accepts any state without looking at it.
    LoadAcceptsAnything,
    /// `save_device` writes its first field and returns as if it had written all.
    SaveStopsEarly,
    /// A `save_device` cut short by the stream leaves the device unable to resume, as
    /// a device left in STOP_COPY would be.
    SaveFailureWedges,
    /// `load_vcpu` unwraps the fields it reads.
    LoadPanics,
}

/// A [`RefVm`] with one [`Flaw`].
struct Broken {
    vm: RefVm,
    flaw: Flaw,
    /// For `HarvestNeverClears`: every page harvested so far, per block.
    kept: Vec<DirtyBitmap>,
    /// For `PauseKeepsRunning`: `pause` was called, and `is_running` says so.
    claims_paused: AtomicBool,
    /// For `SaveFailureWedges`: a save failed.
    wedged: AtomicBool,
}

impl Broken {
    fn new(role: Role, flaw: Flaw) -> Self {
        let vm = RefVm::new(role);
        let kept = vm
            .ram()
            .blocks()
            .iter()
            .map(|b| DirtyBitmap::new(b.pages()))
            .collect();
        Self {
            vm,
            flaw,
            kept,
            claims_paused: AtomicBool::new(false),
            wedged: AtomicBool::new(false),
        }
    }
}

/// RAM whose `populated` marks nothing.
struct Forgetful(Arc<dyn GuestRam>);

// SAFETY: every pointer and block comes unchanged from the wrapped `GuestRam`, which
// keeps its mappings alive while `self.0` (an `Arc` we hold) lives.
unsafe impl GuestRam for Forgetful {
    fn blocks(&self) -> &[RamBlock] {
        self.0.blocks()
    }

    fn host_ptr(&self, block: usize) -> *mut u8 {
        self.0.host_ptr(block)
    }

    fn populated(&self, _block: usize, _out: &DirtyBitmap) {}
}

impl DirtyLog for Broken {
    fn start(&self) -> Result<(), VmError> {
        self.vm.dirty_log().start()
    }

    fn stop(&self) {
        self.vm.dirty_log().stop()
    }

    fn harvest(&self, block: usize, into: &DirtyBitmap) -> Result<(), VmError> {
        if self.flaw == Flaw::HarvestNeverClears {
            self.vm.dirty_log().harvest(block, &self.kept[block])?;
            into.or_from(&self.kept[block]);
            return Ok(());
        }
        self.vm.dirty_log().harvest(block, into)
    }

    fn restore(&self, block: usize, pages: &DirtyBitmap) {
        if self.flaw != Flaw::RestoreDropsPages {
            self.vm.dirty_log().restore(block, pages)
        }
    }
}

impl MigratableVm for Broken {
    fn ram(&self) -> Arc<dyn GuestRam> {
        match self.flaw {
            Flaw::PopulatedMarksNothing => Arc::new(Forgetful(self.vm.ram())),
            _ => self.vm.ram(),
        }
    }

    fn dirty_log(&self) -> &dyn DirtyLog {
        self
    }

    fn vcpu_count(&self) -> usize {
        self.vm.vcpu_count()
    }

    fn vcpu_schema(&self) -> &'static StateSchema {
        self.vm.vcpu_schema()
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        self.vm.devices()
    }

    fn pause(&self) -> Result<(), VmError> {
        match self.flaw {
            Flaw::PauseKeepsRunning => {
                self.claims_paused.store(true, Ordering::SeqCst);
                Ok(())
            }
            _ => self.vm.pause(),
        }
    }

    fn resume(&self) -> Result<(), VmError> {
        if self.wedged.load(Ordering::SeqCst) {
            return Err(VmError::Failed(
                "ref-counter: invalid transition STOP_COPY -> RUNNING".into(),
            ));
        }
        self.claims_paused.store(false, Ordering::SeqCst);
        self.vm.resume()
    }

    fn is_running(&self) -> bool {
        // The lie that goes with a pause that does nothing: only guest RAM tells.
        self.vm.is_running() && !self.claims_paused.load(Ordering::SeqCst)
    }

    fn save_vcpu(&self, index: usize) -> Result<DeviceState, VmError> {
        self.vm.save_vcpu(index)
    }

    fn load_vcpu(&self, index: usize, state: DeviceState) -> Result<(), VmError> {
        if self.flaw == Flaw::LoadPanics {
            state.get_u64("steps").unwrap();
        }
        self.vm.load_vcpu(index, state)
    }

    fn save_device(&self, index: usize, out: &mut StateWriter<'_>) -> Result<(), VmError> {
        match self.flaw {
            Flaw::SaveStopsEarly => {
                out.begin(&[])?;
                out.u64("ticks", 0)?;
                Ok(())
            }
            Flaw::SaveFailureWedges => {
                let saved = self.vm.save_device(index, out);
                if saved.is_err() {
                    self.wedged.store(true, Ordering::SeqCst);
                }
                saved
            }
            _ => self.vm.save_device(index, out),
        }
    }

    fn load_device(&self, index: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        match self.flaw {
            Flaw::LoadAcceptsAnything => Ok(()),
            _ => self.vm.load_device(index, input),
        }
    }
}

fn run_broken(flaw: Flaw) -> Result<Report, Failure> {
    conformance(&|role| Arc::new(Broken::new(role, flaw)))
}

fn fails(flaw: Flaw, check: &str, says: &str) {
    let t = Instant::now();
    let failure = match run_broken(flaw) {
        Ok(report) => panic!("{flaw:?} passed: {report}"),
        Err(f) => f,
    };
    println!("{flaw:?} in {:?}: {failure}", t.elapsed());
    assert_eq!(failure.check, check, "{failure}");
    assert!(
        failure
            .to_string()
            .starts_with(&format!("conformance check {check} failed: ")),
        "{failure}"
    );
    assert!(failure.message.contains(says), "{failure}");
}

#[test]
fn a_restore_that_drops_pages_fails_the_restore_check() {
    fails(
        Flaw::RestoreDropsPages,
        checks::DIRTY_RESTORE,
        "the next harvest reported 0 of them",
    );
}

#[test]
fn a_pause_that_leaves_the_guest_running_fails_the_pause_check() {
    fails(
        Flaw::PauseKeepsRunning,
        checks::PAUSE,
        "guest RAM changed in the 50 ms after pause() returned",
    );
}

#[test]
fn a_harvest_that_never_clears_fails_the_harvest_check() {
    fails(
        Flaw::HarvestNeverClears,
        checks::DIRTY_HARVEST_CLEARS,
        "a harvest must forget what it reports",
    );
}

#[test]
fn a_populated_that_misses_pages_fails_the_populated_check() {
    fails(
        Flaw::PopulatedMarksNothing,
        checks::RAM_POPULATED,
        "hold data but populated() does not mark them",
    );
}

#[test]
fn a_load_that_accepts_anything_unread_fails_the_load_check() {
    fails(
        Flaw::LoadAcceptsAnything,
        checks::STATE_LOAD,
        "its load returned before the whole state was read",
    );
}

#[test]
fn a_save_that_stops_early_fails_the_save_check() {
    fails(
        Flaw::SaveStopsEarly,
        checks::STATE_SAVE,
        "its save returned before the whole state was written",
    );
}

#[test]
fn a_save_cut_short_that_wedges_the_device_fails_the_interrupted_save_check() {
    fails(
        Flaw::SaveFailureWedges,
        checks::STATE_SAVE_INTERRUPTED,
        "STOP_COPY -> RUNNING",
    );
}

#[test]
fn a_load_that_panics_on_a_foreign_state_fails_the_foreign_state_check() {
    fails(Flaw::LoadPanics, checks::STATE_REFUSES_FOREIGN, "panicked");
}
