//! Typed properties, machine types and compat tables.
//!
//! (Module docs to be completed.)

use std::collections::BTreeMap;

mod config;
mod error;
mod global;
mod registry;
#[cfg(test)]
mod tests;
mod value;

use config::Setting;
pub use config::{wire_mismatches, WireMismatch};
pub use error::{CompatError, GlobalProblem, RegistryProblem};
pub use registry::{parse_machine_name, MACHINE_PREFIX, NEWEST_ALIAS};
pub use value::{parse_size, ValueProblem, BOOL_FALSE_WORDS, BOOL_TRUE_WORDS};

/// What values a property takes. Its `Display` describes the valid values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PropKind {
    Bool,
    /// An integer in `min..=max`.
    U64 {
        min: u64,
        max: u64,
    },
    /// A size in bytes; accepts suffixes (`512K`, `64M`, `1G`). In `min..=max`.
    Size {
        min: u64,
        max: u64,
    },
    /// One of a fixed set of words.
    Enum(&'static [&'static str]),
}

/// One property of a driver (a device type, or the `migration` pseudo-device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PropDef {
    pub name: &'static str,
    pub kind: PropKind,
    /// Default for the newest machine type, as text parsed by `kind`.
    pub default: &'static str,
    /// True when the value changes the wire or what the guest sees: both sides must agree.
    pub wire: bool,
    pub doc: &'static str,
}

/// A driver: a named set of properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DriverDef {
    pub name: &'static str,
    pub doc: &'static str,
    pub props: &'static [PropDef],
}

/// One (driver, property, value) entry of a compat table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CompatEntry {
    pub driver: &'static str,
    pub property: &'static str,
    pub value: &'static str,
}

/// A machine type. `compat` restores, for this machine type and every older one, what the
/// releases after it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MachineDef {
    pub name: &'static str,
    pub release: &'static str,
    pub doc: &'static str,
    pub compat: &'static [CompatEntry],
}

/// A parsed property value. A size is a `U64` of bytes. `Display` gives the canonical text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum PropValue {
    Bool(bool),
    U64(u64),
    Enum(String),
}

/// Where an effective property value came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Origin {
    Default,
    /// The compat table of the named machine type.
    Compat {
        machine: String,
    },
    Global,
}

/// A user's `-global driver.prop=value`. Parsed with `FromStr`, printed back with `Display`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    pub driver: String,
    pub property: String,
    pub value: String,
}

/// All drivers and machine types a release knows.
#[derive(Debug, Clone)]
pub struct Registry {
    drivers: Vec<&'static DriverDef>,
    /// Newest first.
    machines: Vec<&'static MachineDef>,
}

/// The effective properties of one VM: its machine type's defaults, compat entries and globals.
/// Holds every property of every driver of the registry it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    machine: String,
    /// Driver name → property name → setting; the maps give the stable iteration order.
    values: BTreeMap<&'static str, BTreeMap<&'static str, Setting>>,
}
