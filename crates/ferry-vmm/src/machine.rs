//! The machine types this release ships and the drivers they configure.
//!
//! Newest first. The newest machine type is always `ferry-X.Y` of the workspace version
//! (`tests/compat_releases.rs` checks it) and its compat table is empty: every property
//! has its default, the behaviour of this release. Every released machine type is frozen
//! (RELEASING.md): a change of this release to a default that matters to migration or to
//! the guest puts the entry that restores the old value into the table of the newest
//! *released* machine type, which every older one inherits (see
//! `ferry_migration::compat` for the rules).
//!
//! | machine type | release | what its table restores |
//! |---|---|---|
//! | `ferry-0.3` | 0.3 (being prepared) | nothing: the defaults |
//! | `ferry-0.2` | 0.2.0 | 10 s for a new connection to identify itself; 120 s of silence before a peer is taken for dead; no populated extents before the first pass |
//! | `ferry-0.1` | 0.1.0 | 0.1's multifd sync after every section; no device precopy or switchover-ack; no state digest |

use ferry_migration::compat::{CompatEntry, DriverDef, MachineDef, Registry};
use ferry_migration::engine::MIGRATION_DRIVER;
use ferry_migration::state::StateSchema;

use crate::{kvm, soft};

/// This build's release, as the hello states it.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

pub static FERRY_0_3: MachineDef = MachineDef {
    name: "ferry-0.3",
    release: "0.3",
    doc: "ferry 0.3 (being prepared)",
    compat: &[],
};

pub static FERRY_0_2: MachineDef = MachineDef {
    name: "ferry-0.2",
    release: "0.2",
    doc: "ferry 0.2: device precopy with a per-device switchover acknowledgement, one multifd sync per pass, a digest of device and vCPU state",
    compat: &[
        // 0.3 gives a new connection 5 s, not 10, to identify itself.
        CompatEntry {
            driver: "migration",
            property: "handshake-timeout",
            value: "10000",
        },
        // 0.2 allowed a silent peer 120 s; 0.3 takes it for dead after 5 s.
        CompatEntry {
            driver: "migration",
            property: "liveness-timeout",
            value: "120000",
        },
        // 0.3 tells the destination where memory is populated before the first pass,
        // a frame 0.2 does not know.
        CompatEntry {
            driver: "migration",
            property: "x-ferry-populate-ahead",
            value: "off",
        },
        // 0.3's convergence control. 0.2 had none: no throttle (these are 0.3's
        // defaults, off), and no timeout, which 0.3 gives every machine type alike, since
        // a migration that runs for ever is a defect to fix, not a behaviour to keep; none
        // of these changes the stream or what the guest sees.
        CompatEntry {
            driver: "migration",
            property: "auto-converge",
            value: "off",
        },
        CompatEntry {
            driver: "migration",
            property: "dirty-limit",
            value: "off",
        },
        CompatEntry {
            driver: "migration",
            property: "cpu-throttle-initial",
            value: "20",
        },
        CompatEntry {
            driver: "migration",
            property: "cpu-throttle-increment",
            value: "10",
        },
        CompatEntry {
            driver: "migration",
            property: "cpu-throttle-tailslow",
            value: "off",
        },
        CompatEntry {
            driver: "migration",
            property: "max-cpu-throttle",
            value: "99",
        },
        CompatEntry {
            driver: "migration",
            property: "throttle-trigger-threshold",
            value: "50",
        },
        CompatEntry {
            driver: "migration",
            property: "vcpu-dirty-limit",
            value: "1",
        },
        CompatEntry {
            driver: "migration",
            property: "x-vcpu-dirty-limit-period",
            value: "1000",
        },
        CompatEntry {
            driver: "migration",
            property: "x-ferry-timeout",
            value: "0",
        },
        CompatEntry {
            driver: "migration",
            property: "x-ferry-timeout-per-gib",
            value: "150",
        },
        CompatEntry {
            driver: "migration",
            property: "x-ferry-timeout-strategy",
            value: "cancel",
        },
        CompatEntry {
            driver: "migration",
            property: "x-ferry-switchover-ceiling",
            value: "2000",
        },
    ],
};

pub static FERRY_0_1: MachineDef = MachineDef {
    name: "ferry-0.1",
    release: "0.1",
    doc: "ferry 0.1: one soft or KVM guest, a console, precopy migration over one channel",
    compat: &[
        // 0.2 syncs the data channels once per pass over memory.
        CompatEntry {
            driver: "migration",
            property: "multifd-flush-after-each-section",
            value: "on",
        },
        // 0.2 precopies devices both hosts can precopy, with a per-device switchover
        // acknowledgement, and sends a digest of device and vCPU state.
        CompatEntry {
            driver: "migration",
            property: "switchover-ack",
            value: "off",
        },
        CompatEntry {
            driver: "migration",
            property: "state-digest",
            value: "off",
        },
    ],
};

/// Newest first.
pub static MACHINES: &[&MachineDef] = &[&FERRY_0_3, &FERRY_0_2, &FERRY_0_1];

/// Every driver with properties.
pub static DRIVERS: &[&DriverDef] = &[&MIGRATION_DRIVER];

/// The registry of this release.
pub fn registry() -> Registry {
    Registry::new(DRIVERS.to_vec(), MACHINES.to_vec())
}

/// Names of every machine type this release knows.
pub fn machine_names() -> Vec<String> {
    MACHINES.iter().map(|m| m.name.to_string()).collect()
}

/// Every device and vCPU state schema this release can migrate, whichever backend runs the VM.
///
/// `ferry dump-vmstate` publishes these so that `ferry compat-check` can compare two releases
/// before anyone migrates between them; a schema missing here is a state nobody checks. So
/// every state a `MigratableVm` of this crate reports (its `vcpu_schema` and each device's
/// `schema`) must be listed, which a test checks for the soft backend.
pub fn state_schemas() -> Vec<&'static StateSchema> {
    vec![
        // vCPUs, one kind per backend.
        &soft::SOFT_VCPU_SCHEMA,
        &kvm::VCPU_SCHEMA,
        // VM-wide state of a backend (in-kernel irqchip, clock).
        &kvm::VM_SCHEMA,
        // Devices. A device under `src/devices/` adds its schema here.
        &soft::SOFT_CONSOLE_SCHEMA,
        &crate::devices::serial::SERIAL_SCHEMA,
        &crate::devices::accel::ACCEL_SCHEMA,
        // Precopy records of devices that can move state while the guest runs.
        &crate::devices::accel::ACCEL_PRECOPY_SCHEMA,
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ferry_migration::compat::check::check;
    use ferry_migration::compat::schema::{dump, VmStateDump};
    use ferry_migration::engine::vm::MigratableVm;

    use super::*;
    use crate::soft::{SoftConfig, SoftVm};

    #[test]
    fn the_registry_is_valid() {
        registry().validate().unwrap();
    }

    #[test]
    fn state_schemas_are_valid_and_named_once() {
        let schemas = state_schemas();
        let mut names = BTreeSet::new();
        for schema in &schemas {
            schema.validate().unwrap();
            assert!(names.insert(schema.name), "{} is listed twice", schema.name);
        }
    }

    #[test]
    fn every_state_of_the_soft_backend_is_listed() {
        let vm = SoftVm::create(&SoftConfig {
            mem_size: 1 << 20,
            dirty_size: 0,
            incoming: true,
            accels: vec![crate::devices::accel::AccelConfig::new(1 << 20, true)],
            ..SoftConfig::default()
        })
        .unwrap();
        let listed = state_schemas();
        let is_listed = |schema: &'static StateSchema| listed.contains(&schema);
        assert!(is_listed(vm.vcpu_schema()), "{}", vm.vcpu_schema().name);
        for device in vm.devices() {
            assert!(is_listed(device.schema), "{}", device.name);
            if let Some(p) = device.precopy {
                assert!(is_listed(p), "{} of {}", p.name, device.name);
            }
        }
        assert!(vm.devices().iter().any(|d| d.precopy.is_some()));
    }

    #[test]
    fn this_release_dumps_and_is_compatible_with_itself() {
        let dumped = dump(RELEASE, &registry(), &state_schemas()).unwrap();
        let parsed = VmStateDump::from_json(&dumped.to_json()).unwrap();
        assert_eq!(parsed, dumped);
        assert_eq!(check(&parsed, &dumped), vec![]);
    }
}
