//! The machine types this release ships and the drivers they configure.
//!
//! `ferry-0.1` is the first release's machine type and, for now, the newest, so its
//! compat table is empty: every property has its default. When release 0.2 changes a
//! default that matters to migration or to the guest, it adds `ferry-0.2` at the front
//! of [`MACHINES`] and puts the entry that restores the old value into `ferry-0.1`'s
//! table (see `ferry_migration::compat` for the rules).

use ferry_migration::compat::{DriverDef, MachineDef, Registry};
use ferry_migration::engine::MIGRATION_DRIVER;

/// This build's release, as the hello states it.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

pub static FERRY_0_1: MachineDef = MachineDef {
    name: "ferry-0.1",
    release: "0.1",
    doc: "ferry 0.1: one soft or KVM guest, a console, precopy migration over one channel",
    compat: &[],
};

/// Newest first.
pub static MACHINES: &[&MachineDef] = &[&FERRY_0_1];

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
