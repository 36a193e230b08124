//! Typed properties, machine types and compat tables.
//!
//! (Module docs to be completed.)

use std::collections::BTreeMap;

mod error;
mod global;
mod value;

pub use error::{CompatError, GlobalProblem, RegistryProblem};
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropValue {
    Bool(bool),
    U64(u64),
    Enum(String),
}

/// Where an effective property value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    machine: String,
    values: BTreeMap<(String, String), (PropValue, Origin)>,
}

impl Registry {
    /// `machines` newest first.
    pub fn new(drivers: Vec<&'static DriverDef>, machines: Vec<&'static MachineDef>) -> Self {
        Self { drivers, machines }
    }
    pub fn machines(&self) -> &[&'static MachineDef] {
        &self.machines
    }
    pub fn drivers(&self) -> &[&'static DriverDef] {
        &self.drivers
    }
    /// Resolves a machine name or the alias `ferry` (the newest).
    pub fn resolve_machine(&self, name: &str) -> Result<&'static MachineDef, CompatError> {
        let _ = name;
        todo!()
    }
    pub fn configure(&self, machine: &str, globals: &[Global]) -> Result<Config, CompatError> {
        let _ = (machine, globals);
        todo!()
    }
}

impl Config {
    /// The resolved machine type name (never the alias).
    pub fn machine(&self) -> &str {
        &self.machine
    }
    pub fn get(&self, driver: &str, property: &str) -> Option<&PropValue> {
        self.values
            .get(&(driver.to_string(), property.to_string()))
            .map(|(v, _)| v)
    }
}
