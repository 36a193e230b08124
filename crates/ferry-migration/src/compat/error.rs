//! Errors of the compat layer. Each message names the thing at fault (machine type, driver,
//! property, value) and lists what would have been valid, so a user can fix a command line from
//! the message alone.

use std::fmt;

use thiserror::Error;

use super::{PropKind, ValueProblem, WireMismatch};

/// Joins items with `sep`, or says `(none)` so an empty list never reads as a truncated message.
fn list<T: fmt::Display>(items: &[T], sep: &str) -> String {
    if items.is_empty() {
        return "(none)".to_string();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(sep)
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum CompatError {
    #[error("unknown machine type {name:?}; known machine types: {}", list(.known, ", "))]
    UnknownMachine { name: String, known: Vec<String> },

    #[error("unknown driver {driver:?}; known drivers: {}", list(.known, ", "))]
    UnknownDriver { driver: String, known: Vec<String> },

    #[error(
        "driver {driver} has no property {property:?}; its properties: {}",
        list(.known, ", ")
    )]
    UnknownProperty {
        driver: String,
        property: String,
        known: Vec<String>,
    },

    #[error("invalid value {value:?} for {driver}.{property}: {problem}; expected {kind}")]
    InvalidValue {
        driver: String,
        property: String,
        value: String,
        problem: ValueProblem,
        kind: PropKind,
    },

    #[error("malformed -global {text:?}: {problem}; expected driver.property=value")]
    MalformedGlobal {
        text: String,
        problem: GlobalProblem,
    },

    /// A program asked for a property as the wrong type, e.g. `Config::bool` on an integer.
    #[error("{driver}.{property} was read as {wanted}, but it takes {kind}")]
    WrongKind {
        driver: String,
        property: String,
        wanted: &'static str,
        kind: PropKind,
    },

    /// The two sides of a migration disagree on properties that change the wire or the guest.
    #[error(
        "wire properties differ from the peer's: {}",
        list(.mismatches, "; ")
    )]
    WireMismatch { mismatches: Vec<WireMismatch> },

    /// The driver and machine-type definitions themselves are wrong: a programming error that
    /// [`Registry::validate`](super::Registry::validate) finds in tests.
    #[error("the compat registry is inconsistent: {}", list(.problems, "; "))]
    InvalidRegistry { problems: Vec<RegistryProblem> },
}

/// What is wrong with the text of a `-global`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum GlobalProblem {
    #[error("no '=' between property and value")]
    MissingEquals,
    #[error("no '.' between driver and property")]
    MissingDot,
    #[error("the driver name is empty")]
    EmptyDriver,
    #[error("the property name is empty")]
    EmptyProperty,
    #[error("the value is empty")]
    EmptyValue,
}

/// One defect in a registry's definitions, found by
/// [`Registry::validate`](super::Registry::validate).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RegistryProblem {
    #[error("no machine types are defined")]
    NoMachines,

    #[error("machine type {name:?} is not of the form ferry-X.Y (decimal, no leading zeros)")]
    BadMachineName { name: String },

    #[error("machine type {name} is defined twice")]
    DuplicateMachine { name: String },

    #[error(
        "machine type {newer} is listed after the older {older}; machine types go newest first"
    )]
    NotNewestFirst { older: String, newer: String },

    #[error(
        "the newest machine type {machine} has {entries} compat entries; its values are the \
         property defaults, so its table must be empty"
    )]
    NewestTableNotEmpty { machine: String, entries: usize },

    #[error("driver name {driver:?} is empty or contains '.' or '='")]
    BadDriverName { driver: String },

    #[error("driver {driver} is defined twice")]
    DuplicateDriver { driver: String },

    #[error("property name {property:?} of driver {driver} is empty or contains '='")]
    BadPropertyName { driver: String, property: String },

    #[error("property {driver}.{property} is defined twice")]
    DuplicateProperty { driver: String, property: String },

    #[error("property {driver}.{property} has an empty range: min {min} is above max {max}")]
    EmptyRange {
        driver: String,
        property: String,
        min: u64,
        max: u64,
    },

    #[error("property {driver}.{property} has an empty or repeated enum word {word:?}")]
    BadEnumWord {
        driver: String,
        property: String,
        word: String,
    },

    #[error("default {value:?} of {driver}.{property} is invalid: {problem}; expected {kind}")]
    BadDefault {
        driver: String,
        property: String,
        value: String,
        problem: ValueProblem,
        kind: PropKind,
    },

    /// `problem` is the error the entry gives when applied; it names driver, property and value.
    #[error("compat table of {machine}: {problem}")]
    BadCompatEntry {
        machine: String,
        problem: Box<CompatError>,
    },

    #[error("compat table of {machine} sets {driver}.{property} more than once")]
    DuplicateCompatEntry {
        machine: String,
        driver: String,
        property: String,
    },
}
