//! The old/new release × old/new machine type matrix of the qemu-devel thread on
//! `hw_compat` tables, run as real migrations over loopback TCP.
//!
//! Two releases are built here the way two builds of a VMM would be:
//!
//! * release X (1.0) ships machine type `ferry-1.0` and device `dev` (property
//!   `dev.ring-size`; state version 1: `regs`, `buf`);
//! * release Y (1.1) adds machine type `ferry-1.1` (its newest) and the property
//!   `dev.x-feature` (wire, on by default), with a compat entry on `ferry-1.0` that turns it
//!   off. `dev`'s state gains the subsection `dev/feature`, sent only when the feature is on,
//!   so a VM of `ferry-1.0` sends under Y exactly what it sent under X.
//!
//! | source | destination | outcome |
//! |---|---|---|
//! | X, ferry-1.0 | X, ferry-1.0 | migrates |
//! | Y, ferry-1.0 | Y, ferry-1.0 | migrates, no subsection |
//! | Y, ferry-1.1 | Y, ferry-1.1 | migrates with the subsection |
//! | X, ferry-1.0 | Y, ferry-1.0 | migrates (see below) |
//! | Y, ferry-1.0 | X, ferry-1.0 | migrates (see below) |
//! | Y, ferry-1.1 | X | refused before any RAM moves: X has no ferry-1.1 |
//! | X, ferry-1.1 | - | X cannot even configure it |
//! | Y, ferry-1.0 + `-global dev.x-feature=on` | X, ferry-1.0 | refused: X does not know the property |
//!
//! The two mixed-release cells are the point of the compat table: Y states
//! `dev.x-feature=off`, which X does not know, and the hello marks that value as set by
//! `ferry-1.0`'s compat table, so X accepts it as the behaviour it has anyway. The same
//! property set by `-global` is refused. The checker follows the same rule and finds X to
//! Y compatible.
//!
//! The last tests run the compat checker on the two releases' dumps: X to Y is compatible,
//! and a Y that changes a default without a compat entry, or drops a field without a version
//! step, is caught; the default change is also refused by a real migration.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use ferry_migration::compat::check::{check, Finding};
use ferry_migration::compat::schema::{dump, VmStateDump};
use ferry_migration::compat::{
    CompatEntry, CompatError, Config, DriverDef, Global, MachineDef, PropDef, PropKind, Registry,
};
use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::engine::vm::{
    DeviceInfo, DirtyLog, GuestRam, MigratableVm, RamBlock, VmError,
};
use ferry_migration::engine::{
    self, DestinationIdentity, Incoming, MigrationError, MigrationInfo, MigrationMonitor,
    MigrationParams, SourceIdentity, MIGRATION_DRIVER,
};
use ferry_migration::state::{
    DeviceState, FieldKind, FieldSchema, StateReader, StateSchema, StateWriter, SubsectionSchema,
    SubsectionState, Value,
};
use ferry_migration::wire::RefuseCause;
use ferry_migration::PAGE_SIZE;

// ---- release X (1.0) ----

static X_DEV_DRIVER: DriverDef = DriverDef {
    name: "dev",
    doc: "the test device",
    props: &[RING_SIZE],
};

const RING_SIZE: PropDef = PropDef {
    name: "ring-size",
    kind: PropKind::U64 { min: 1, max: 256 },
    default: "16",
    wire: true,
    doc: "entries in the device's ring",
};

static X_FERRY_1_0: MachineDef = MachineDef {
    name: "ferry-1.0",
    release: "1.0",
    doc: "release 1.0",
    compat: &[],
};

const DEV_FIELDS: &[FieldSchema] = &[
    FieldSchema {
        name: "regs",
        kind: FieldKind::U32,
        since: 1,
    },
    FieldSchema {
        name: "buf",
        kind: FieldKind::Array { len: 16 },
        since: 1,
    },
];

static X_DEV_STATE: StateSchema = StateSchema {
    name: "dev",
    version: 1,
    min_version: 1,
    fields: DEV_FIELDS,
    subsections: &[],
};

// ---- release Y (1.1) ----

static Y_DEV_DRIVER: DriverDef = DriverDef {
    name: "dev",
    doc: "the test device",
    props: &[
        RING_SIZE,
        PropDef {
            name: "x-feature",
            kind: PropKind::Bool,
            default: "on",
            wire: true,
            doc: "the feature release 1.1 added; its state travels in dev/feature",
        },
    ],
};

static Y_FERRY_1_1: MachineDef = MachineDef {
    name: "ferry-1.1",
    release: "1.1",
    doc: "release 1.1",
    compat: &[],
};

static Y_FERRY_1_0: MachineDef = MachineDef {
    name: "ferry-1.0",
    release: "1.0",
    doc: "release 1.0, as release 1.1 runs it",
    compat: &[CompatEntry {
        driver: "dev",
        property: "x-feature",
        value: "off",
    }],
};

const FEATURE_SUBSECTION: &str = "dev/feature";

static Y_DEV_STATE: StateSchema = StateSchema {
    name: "dev",
    version: 1,
    min_version: 1,
    fields: DEV_FIELDS,
    subsections: &[SubsectionSchema {
        name: FEATURE_SUBSECTION,
        version: 1,
        fields: &[FieldSchema {
            name: "feature-state",
            kind: FieldKind::U64,
            since: 1,
        }],
        needed_when: "property dev.x-feature=on",
    }],
};

// ---- Y', broken two ways ----

static Y_BROKEN_DEV_DRIVER: DriverDef = DriverDef {
    name: "dev",
    doc: "the test device",
    props: &[
        PropDef {
            default: "32", // changed without a compat entry on ferry-1.0
            ..RING_SIZE
        },
        PropDef {
            name: "x-feature",
            kind: PropKind::Bool,
            default: "on",
            wire: true,
            doc: "the feature release 1.1 added",
        },
    ],
};

static Y_BROKEN_DEV_STATE: StateSchema = StateSchema {
    name: "dev",
    version: 1, // `regs` dropped without a version step
    min_version: 1,
    fields: &[FieldSchema {
        name: "buf",
        kind: FieldKind::Array { len: 16 },
        since: 1,
    }],
    subsections: Y_DEV_STATE.subsections,
};

static VCPU_STATE: StateSchema = StateSchema {
    name: "test-vcpu",
    version: 1,
    min_version: 1,
    fields: &[FieldSchema {
        name: "pc",
        kind: FieldKind::U64,
        since: 1,
    }],
    subsections: &[],
};

/// What a release is made of, as far as migration is concerned.
#[derive(Clone, Copy)]
struct Release {
    name: &'static str,
    drivers: &'static [&'static DriverDef],
    machines: &'static [&'static MachineDef],
    dev_state: &'static StateSchema,
}

const X: Release = Release {
    name: "1.0",
    drivers: &[&MIGRATION_DRIVER, &X_DEV_DRIVER],
    machines: &[&X_FERRY_1_0],
    dev_state: &X_DEV_STATE,
};

const Y: Release = Release {
    name: "1.1",
    drivers: &[&MIGRATION_DRIVER, &Y_DEV_DRIVER],
    machines: &[&Y_FERRY_1_1, &Y_FERRY_1_0],
    dev_state: &Y_DEV_STATE,
};

const Y_BROKEN: Release = Release {
    name: "1.1-broken",
    drivers: &[&MIGRATION_DRIVER, &Y_BROKEN_DEV_DRIVER],
    machines: Y.machines,
    dev_state: &Y_BROKEN_DEV_STATE,
};

impl Release {
    fn registry(&self) -> Registry {
        Registry::new(self.drivers.to_vec(), self.machines.to_vec())
    }

    fn configure(&self, machine: &str, globals: &[&str]) -> Result<Config, CompatError> {
        let globals: Vec<Global> = globals.iter().map(|g| g.parse().unwrap()).collect();
        self.registry().configure(machine, &globals)
    }

    fn dump(&self) -> VmStateDump {
        let dumped = dump(self.name, &self.registry(), &[self.dev_state, &VCPU_STATE]).unwrap();
        // Through JSON, as `ferry compat-check` reads it.
        VmStateDump::from_json(&dumped.to_json()).unwrap()
    }
}

// ---- a small VM: mmapped RAM, one vCPU, the device ----

const RAM_SIZE: usize = 4 << 20;

struct TestRam {
    blocks: Vec<RamBlock>,
    base: *mut u8,
}

// SAFETY: the mapping is plain memory owned by this value; the engine's contract for
// concurrent access is that of `GuestRam`.
unsafe impl Send for TestRam {}
// SAFETY: as above.
unsafe impl Sync for TestRam {}

impl TestRam {
    fn new() -> Self {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap of guest RAM failed");
        Self {
            blocks: vec![RamBlock {
                name: "ram0".into(),
                gpa: 0,
                size: RAM_SIZE as u64,
            }],
            base: base.cast(),
        }
    }

    /// A copy of guest RAM. Only called while neither side writes it.
    fn contents(&self) -> Vec<u8> {
        // SAFETY: the mapping is RAM_SIZE bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.base, RAM_SIZE) }.to_vec()
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= RAM_SIZE);
        // SAFETY: inside the mapping, checked above; the test writes only while no
        // migration runs.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(offset), bytes.len())
        };
    }
}

impl Drop for TestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.base.cast(), RAM_SIZE) };
    }
}

// SAFETY: `host_ptr(0)` is the start of a RAM_SIZE-byte read-write mapping that lives as
// long as the `TestRam`.
unsafe impl GuestRam for TestRam {
    fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    fn host_ptr(&self, block: usize) -> *mut u8 {
        assert_eq!(block, 0);
        self.base
    }
}

/// The device's migratable state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dev {
    regs: u32,
    buf: Vec<u8>,
    /// Present when the feature is on.
    feature_state: Option<u64>,
}

struct TestVm {
    ram: Arc<TestRam>,
    dirty: DirtyBitmap,
    running: AtomicBool,
    dev_state: &'static StateSchema,
    /// `dev.x-feature` of this VM's configuration; off when the release predates it.
    feature: bool,
    pc: Mutex<u64>,
    dev: Mutex<Dev>,
}

impl TestVm {
    /// A source VM with its memory and device filled in, or an empty destination.
    fn new(release: Release, config: &Config, incoming: bool) -> Arc<Self> {
        let feature = config.bool("dev", "x-feature").unwrap_or(false);
        let vm = Arc::new(Self {
            ram: Arc::new(TestRam::new()),
            dirty: DirtyBitmap::new(RAM_SIZE / PAGE_SIZE),
            running: AtomicBool::new(!incoming),
            dev_state: release.dev_state,
            feature,
            pc: Mutex::new(0),
            dev: Mutex::new(Dev {
                regs: 0,
                buf: vec![0; 16],
                feature_state: None,
            }),
        });
        if !incoming {
            for page in (0..RAM_SIZE / PAGE_SIZE).step_by(3) {
                vm.ram
                    .write(page * PAGE_SIZE, &(page as u64 * 0x9e37_79b9).to_le_bytes());
            }
            *vm.pc.lock().unwrap() = 0x1000;
            *vm.dev.lock().unwrap() = Dev {
                regs: 0xdead_beef,
                buf: (0..16).collect(),
                feature_state: feature.then_some(0xfea7),
            };
        }
        vm
    }
}

impl DirtyLog for TestVm {
    fn start(&self) -> Result<(), VmError> {
        Ok(())
    }

    fn stop(&self) {}

    fn harvest(&self, _block: usize, into: &DirtyBitmap) -> Result<(), VmError> {
        self.dirty.drain_into(into);
        Ok(())
    }

    fn restore(&self, _block: usize, pages: &DirtyBitmap) {
        self.dirty.or_from(pages);
    }
}

impl MigratableVm for TestVm {
    fn ram(&self) -> Arc<dyn GuestRam> {
        self.ram.clone()
    }

    fn dirty_log(&self) -> &dyn DirtyLog {
        self
    }

    fn vcpu_count(&self) -> usize {
        1
    }

    fn vcpu_schema(&self) -> &'static StateSchema {
        &VCPU_STATE
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        vec![DeviceInfo {
            name: self.dev_state.name.into(),
            instance: 0,
            schema: self.dev_state,
            config: Vec::new(),
            precopy: None,
        }]
    }

    fn pause(&self) -> Result<(), VmError> {
        self.running.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    fn save_vcpu(&self, _index: usize) -> Result<DeviceState, VmError> {
        Ok(DeviceState::new().with("pc", Value::U64(*self.pc.lock().unwrap())))
    }

    fn load_vcpu(&self, _index: usize, state: DeviceState) -> Result<(), VmError> {
        *self.pc.lock().unwrap() = state.get_u64("pc")?;
        Ok(())
    }

    fn save_device(&self, _index: usize, out: &mut StateWriter<'_>) -> Result<(), VmError> {
        let dev = self.dev.lock().unwrap().clone();
        let mut state = DeviceState::new()
            .with("regs", Value::U32(dev.regs))
            .with("buf", Value::Bytes(dev.buf));
        // The subsection goes exactly when its `needed_when` holds.
        if self.feature {
            let value = dev.feature_state.unwrap_or_default();
            state = state.with_subsection(
                SubsectionState::new(FEATURE_SUBSECTION).with("feature-state", Value::U64(value)),
            );
        }
        out.write_state(&state)?;
        Ok(())
    }

    fn load_device(&self, _index: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        let state = input.read_state()?;
        let feature_state = match state.subsection(FEATURE_SUBSECTION) {
            Some(sub) => Some(sub.get_u64("feature-state")?),
            None => None,
        };
        if feature_state.is_some() && !self.feature {
            return Err(VmError::Failed(format!(
                "device dev: the source sent {FEATURE_SUBSECTION} but dev.x-feature is off here"
            )));
        }
        *self.dev.lock().unwrap() = Dev {
            regs: state.get_u32("regs")?,
            buf: state.get_bytes("buf")?.to_vec(),
            feature_state,
        };
        Ok(())
    }
}

// ---- running one cell ----

/// One side of a cell: a release, a machine type and `-global`s.
struct Side {
    release: Release,
    machine: &'static str,
    globals: &'static [&'static str],
}

fn side(release: Release, machine: &'static str) -> Side {
    Side {
        release,
        machine,
        globals: &[],
    }
}

struct Outcome {
    source: Result<MigrationInfo, MigrationError>,
    destination: Result<MigrationInfo, MigrationError>,
    /// What the destination reported at the end (its strays list refused hellos).
    dest_info: MigrationInfo,
    src: Arc<TestVm>,
    dst: Arc<TestVm>,
}

/// Migrates a VM configured as `from` to one configured as `to`, over loopback TCP, with
/// identities built as a VMM builds them from its registry and configuration.
fn migrate(from: Side, to: Side) -> Outcome {
    let src_config = from.release.configure(from.machine, from.globals).unwrap();
    let dst_config = to.release.configure(to.machine, to.globals).unwrap();
    let src = TestVm::new(from.release, &src_config, false);
    let dst = TestVm::new(to.release, &dst_config, true);

    let source_id = SourceIdentity {
        release: from.release.name.into(),
        machine: src_config.machine().into(),
        wire_props: src_config.wire_properties(),
        compat_pinned: src_config.compat_pinned_wire_properties(),
    };
    let destination_id = DestinationIdentity {
        release: to.release.name.into(),
        machine: dst_config.machine().into(),
        known_machines: to
            .release
            .registry()
            .machines()
            .iter()
            .map(|m| m.name.to_string())
            .collect(),
        wire_props: dst_config.wire_properties(),
        compat_pinned: dst_config.compat_pinned_wire_properties(),
    };
    let src_params = MigrationParams {
        verify_full: true,
        ..MigrationParams::from_config(&src_config).unwrap()
    };
    let dst_params = MigrationParams::from_config(&dst_config).unwrap();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = common::Dial::Tcp(listener.local_addr().unwrap());
    let listener = Incoming::acceptor(listener);
    let dst_vm = dst.clone();
    let dest_monitor = Arc::new(MigrationMonitor::new());
    let dm = Arc::clone(&dest_monitor);
    let receiver = thread::spawn(move || {
        engine::receive(
            dst_vm.as_ref(),
            &destination_id,
            &dst_params,
            listener,
            dm.as_ref(),
        )
    });
    let source = engine::migrate(
        src.as_ref(),
        &source_id,
        &src_params,
        &uri,
        &MigrationMonitor::new(),
    );
    // A destination that refused a hello keeps waiting for a source it can take, as it
    // would for a real one; the test stops the wait.
    if matches!(source, Err(MigrationError::Refused { .. })) {
        let _ = dest_monitor.cancel();
    }
    let destination = receiver.join().unwrap();
    Outcome {
        source,
        destination,
        dest_info: dest_monitor.info(),
        src,
        dst,
    }
}

/// The guest runs at the destination with the source's memory, vCPU and device state.
#[track_caller]
fn assert_migrated(o: &Outcome, subsection_expected: bool) {
    let info = o.source.as_ref().expect("the source reports success");
    o.destination
        .as_ref()
        .expect("the destination reports success");
    assert_eq!(info.verified.as_deref(), Some("digest+full"));
    assert!(!o.src.is_running() && o.dst.is_running());
    assert!(
        o.src.ram.contents() == o.dst.ram.contents(),
        "guest RAM differs after migration"
    );
    assert_eq!(*o.dst.pc.lock().unwrap(), 0x1000);
    let arrived = o.dst.dev.lock().unwrap().clone();
    assert_eq!(arrived.regs, 0xdead_beef);
    assert_eq!(arrived.buf, (0..16).collect::<Vec<u8>>());
    assert_eq!(
        arrived.feature_state,
        subsection_expected.then_some(0xfea7),
        "the feature's subsection should {}have arrived",
        if subsection_expected { "" } else { "not " }
    );
}

/// Both sides report the refusal, the source keeps running and no RAM reached the
/// destination. Returns the reason the source was given.
#[track_caller]
fn assert_refused(o: &Outcome, cause: RefuseCause) -> String {
    let reason = match &o.source {
        Err(MigrationError::Refused { cause: c, reason }) if *c == cause => reason.clone(),
        other => panic!("expected a refusal ({cause}), got {other:?}"),
    };
    // The destination turned the hello away, named its cause, and went on waiting
    // (until the test stopped it).
    assert!(
        matches!(&o.destination, Err(MigrationError::Cancelled)),
        "{:?}",
        o.destination
    );
    let strays = o
        .dest_info
        .multifd
        .as_ref()
        .map(|m| m.strays.clone())
        .unwrap_or_default();
    assert!(
        strays
            .iter()
            .any(|s| s.contains("refused") && s.contains(&cause.to_string())),
        "{strays:?}"
    );
    assert!(o.src.is_running(), "a refused source must keep running");
    assert!(!o.dst.is_running());
    assert!(
        o.dst.ram.contents().iter().all(|b| *b == 0),
        "RAM reached a destination that refused"
    );
    reason
}

// ---- the cells ----

#[test]
fn x_1_0_to_x_1_0() {
    assert_migrated(&migrate(side(X, "ferry-1.0"), side(X, "ferry-1.0")), false);
}

#[test]
fn y_1_0_to_y_1_0_without_the_feature() {
    let o = migrate(side(Y, "ferry-1.0"), side(Y, "ferry-1.0"));
    assert!(
        !o.src.feature,
        "ferry-1.0's compat table turns the feature off"
    );
    assert_migrated(&o, false);
}

#[test]
fn y_1_1_to_y_1_1_with_the_feature() {
    let o = migrate(side(Y, "ferry-1.1"), side(Y, "ferry-1.1"));
    assert!(o.src.feature);
    assert_migrated(&o, true);
}

#[test]
fn the_feature_forced_on_an_old_machine_type_travels_between_y_releases() {
    let forced = || Side {
        globals: &["dev.x-feature=on"],
        ..side(Y, "ferry-1.0")
    };
    assert_migrated(&migrate(forced(), forced()), true);
}

#[test]
fn x_1_0_to_y_1_0() {
    assert_migrated(&migrate(side(X, "ferry-1.0"), side(Y, "ferry-1.0")), false);
}

#[test]
fn y_1_0_to_x_1_0() {
    assert_migrated(&migrate(side(Y, "ferry-1.0"), side(X, "ferry-1.0")), false);
}

#[test]
fn y_1_1_to_x_is_refused_naming_the_machine_type() {
    let o = migrate(side(Y, "ferry-1.1"), side(X, "ferry-1.0"));
    let reason = assert_refused(&o, RefuseCause::UnknownMachine);
    assert!(reason.contains("machine type ferry-1.1"), "{reason}");
    assert!(reason.contains("it knows ferry-1.0"), "{reason}");
    let info = o.source.as_ref().unwrap_err();
    assert!(info.to_string().contains("ferry-1.1"), "{info}");
}

#[test]
fn x_cannot_configure_ferry_1_1() {
    let err = X.configure("ferry-1.1", &[]).unwrap_err();
    assert!(matches!(err, CompatError::UnknownMachine { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("\"ferry-1.1\""), "{message}");
    assert!(message.contains("ferry-1.0"), "{message}");
}

#[test]
fn the_feature_forced_on_is_refused_by_x_naming_the_property() {
    let o = migrate(
        Side {
            globals: &["dev.x-feature=on"],
            ..side(Y, "ferry-1.0")
        },
        side(X, "ferry-1.0"),
    );
    let reason = assert_refused(&o, RefuseCause::PropertyMismatch);
    // X does not know the property, so it says so, with the source's value.
    assert!(
        reason.contains("dev.x-feature=on of the source is unknown to this release"),
        "{reason}"
    );
}

#[test]
fn a_wire_value_differing_between_two_y_hosts_is_refused_with_both_values() {
    let o = migrate(
        Side {
            globals: &["dev.x-feature=on"],
            ..side(Y, "ferry-1.0")
        },
        side(Y, "ferry-1.0"),
    );
    let reason = assert_refused(&o, RefuseCause::PropertyMismatch);
    assert!(
        reason.contains("property dev.x-feature is on on the source and off here"),
        "{reason}"
    );
}

// ---- the checker on the two releases ----

#[test]
fn both_registries_are_valid() {
    X.registry().validate().unwrap();
    Y.registry().validate().unwrap();
    Y_BROKEN.registry().validate().unwrap();
}

#[test]
fn the_checker_finds_x_to_y_compatible() {
    assert_eq!(check(&X.dump(), &Y.dump()), vec![]);
    assert_eq!(check(&Y.dump(), &Y.dump()), vec![]);
}

#[test]
fn the_checker_catches_a_default_changed_without_a_compat_entry_and_a_dropped_field() {
    let findings = check(&X.dump(), &Y_BROKEN.dump());
    let lines: Vec<String> = findings.iter().map(ToString::to_string).collect();
    assert_eq!(findings.len(), 2, "{lines:#?}");
    assert!(
        matches!(
            &findings[0],
            Finding::ValueChanged { machine, driver, property, old_value, new_value, .. }
                if machine == "ferry-1.0" && driver == "dev" && property == "ring-size"
                    && old_value == "16" && new_value == "32"
        ),
        "{lines:#?}"
    );
    assert!(
        matches!(
            &findings[1],
            Finding::FieldRemoved { device, field, subsection: None, .. }
                if device == "dev" && field == "regs"
        ),
        "{lines:#?}"
    );
    // Y' against Y: the changed default shows on ferry-1.1 as well, since Y shipped it.
    let findings = check(&Y.dump(), &Y_BROKEN.dump());
    let machines: Vec<&str> = findings
        .iter()
        .filter_map(|f| match f {
            Finding::ValueChanged { machine, .. } => Some(machine.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(machines, ["ferry-1.1", "ferry-1.0"]);
    assert_eq!(findings.len(), 3);
}

#[test]
fn the_changed_default_the_checker_reports_is_what_a_migration_refuses() {
    let o = migrate(side(Y, "ferry-1.0"), side(Y_BROKEN, "ferry-1.0"));
    let reason = assert_refused(&o, RefuseCause::PropertyMismatch);
    assert!(
        reason.contains("property dev.ring-size is 16 on the source and 32 here"),
        "{reason}"
    );
}
