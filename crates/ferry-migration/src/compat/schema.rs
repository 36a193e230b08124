//! A release's migration surface as data: the dump that `ferry dump-vmstate` writes and
//! [`super::check`] compares.
//!
//! Whether two releases can migrate to each other depends on three things a release defines
//! in code: its machine types with their compat tables, the typed properties of its drivers,
//! and the schema of every device (and vCPU) state it can send. [`dump`] turns a
//! [`Registry`] and a list of [`StateSchema`]s into a [`VmStateDump`], plain owned data that
//! serialises to JSON and parses back ([`VmStateDump::to_json`], [`VmStateDump::from_json`]),
//! so that two builds can be compared without either being able to run the other. Nothing
//! here knows a VMM: the caller says which schemas it can migrate.
//!
//! # JSON shape (`format` 1)
//!
//! ```json
//! {
//!   "format": 1,
//!   "release": "1.1",
//!   "machines": [
//!     { "name": "ferry-1.1", "release": "1.1", "doc": "...", "compat": [] },
//!     { "name": "ferry-1.0", "release": "1.0", "doc": "...",
//!       "compat": [ { "driver": "dev", "property": "x-feature", "value": "off" } ] }
//!   ],
//!   "drivers": [
//!     { "name": "dev", "doc": "...",
//!       "properties": [
//!         { "name": "ring-size", "kind": { "type": "u64", "min": 1, "max": 256 },
//!           "default": "16", "wire": true, "doc": "..." },
//!         { "name": "x-feature", "kind": { "type": "bool" },
//!           "default": "on", "wire": true, "doc": "..." } ] }
//!   ],
//!   "devices": [
//!     { "name": "dev", "version": 1, "min_version": 1, "max_encoded_size": 56,
//!       "fields": [
//!         { "name": "regs", "kind": { "type": "u32" }, "since": 1,
//!           "encoded_size": 4, "max_encoded_size": 4 },
//!         { "name": "log", "kind": { "type": "bytes", "max_len": 16 }, "since": 1,
//!           "encoded_size": null, "max_encoded_size": 20 } ],
//!       "subsections": [
//!         { "name": "dev/feature", "version": 1,
//!           "needed_when": "property dev.x-feature=on", "max_encoded_size": 28,
//!           "fields": [ { "name": "feature-state", "kind": { "type": "u64" }, "since": 1,
//!                         "encoded_size": 8, "max_encoded_size": 8 } ] } ] }
//!   ]
//! }
//! ```
//!
//! * `kind` of a property: `{"type": "bool"}`, `{"type": "u64", "min", "max"}`,
//!   `{"type": "size", "min", "max"}` (bytes) or `{"type": "enum", "words": [...]}`.
//! * `kind` of a field: `{"type": T}` for `u8`, `u16`, `u32`, `u64`, `bool`;
//!   `{"type": "bytes", "max_len": N}` (a u32 length, then up to N bytes);
//!   `{"type": "array", "len": N}` (exactly N bytes). `encoded_size` is the field's size on
//!   the wire when it is fixed, `null` otherwise; `max_encoded_size` its largest size.
//!   Both follow from `kind` and are there for people reading a dump; a dump whose sizes
//!   disagree with its kinds is refused.
//! * `max_encoded_size` of a device and a subsection: the largest encoding at its version
//!   (for a subsection, including its header), as the destination bounds it.
//! * Every value (`default`, compat `value`) is in canonical text: `on`/`off`, decimal
//!   numbers (bytes for sizes), the enum word. A value in another accepted form (`128M`,
//!   `true`) is read as the value it denotes.
//!
//! # Order
//!
//! Two dumps of the same definitions are byte-identical, and a change shows up as a small
//! diff:
//!
//! * `machines`: newest first, the order of the ordering rule (see [`super`]); a valid
//!   registry's order is also descending version order.
//! * `drivers`, their `properties`, `devices`, `subsections`: by name.
//! * `compat` entries: by driver, then property (a table sets a property at most once, so
//!   its order carries no meaning).
//! * `fields`: stream order, which is part of the format and is never re-sorted.
//!
//! # Stability
//!
//! `format` changes when a key is removed, renamed or changes meaning. Keys may be added
//! without a change of `format`; readers ignore keys they do not know. [`VmStateDump::from_json`]
//! refuses any other `format` than [`DUMP_FORMAT`] by name.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{
    parse_machine_name, CompatError, Origin, PropKind, Registry, ValueProblem, BOOL_FALSE_WORDS,
    BOOL_TRUE_WORDS,
};
use crate::state::{FieldKind, FieldSchema, StateError, StateSchema, SubsectionSchema};

/// The `format` this release writes and reads.
pub const DUMP_FORMAT: u32 = 1;

/// A release's machine types, drivers and device state schemas. See the module docs for
/// the JSON form and its order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStateDump {
    pub format: u32,
    pub release: String,
    /// Newest first.
    pub machines: Vec<MachineDump>,
    pub drivers: Vec<DriverDump>,
    pub devices: Vec<DeviceDump>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDump {
    pub name: String,
    pub release: String,
    pub doc: String,
    pub compat: Vec<CompatEntryDump>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CompatEntryDump {
    pub driver: String,
    pub property: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverDump {
    pub name: String,
    pub doc: String,
    pub properties: Vec<PropertyDump>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropertyDump {
    pub name: String,
    pub kind: PropKindDump,
    /// Canonical text.
    pub default: String,
    pub wire: bool,
    pub doc: String,
}

/// [`PropKind`] as owned data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PropKindDump {
    Bool,
    U64 { min: u64, max: u64 },
    Size { min: u64, max: u64 },
    Enum { words: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDump {
    pub name: String,
    pub version: u32,
    pub min_version: u32,
    pub max_encoded_size: u64,
    /// Stream order.
    pub fields: Vec<FieldDump>,
    pub subsections: Vec<SubsectionDump>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDump {
    pub name: String,
    pub kind: FieldKindDump,
    pub since: u32,
    /// Bytes on the wire when fixed; `None` for variable-length `bytes`.
    pub encoded_size: Option<u64>,
    pub max_encoded_size: u64,
}

/// [`FieldKind`] as owned data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FieldKindDump {
    U8,
    U16,
    U32,
    U64,
    Bool,
    Bytes { max_len: u32 },
    Array { len: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsectionDump {
    pub name: String,
    pub version: u32,
    pub needed_when: String,
    pub max_encoded_size: u64,
    pub fields: Vec<FieldDump>,
}

/// The effective value of one property on one machine type, computed from a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    /// Canonical text.
    pub value: String,
    pub origin: Origin,
}

/// Why a dump could not be made or read.
#[derive(Debug, Error)]
pub enum DumpError {
    /// The registry fails [`Registry::validate`]; the error lists every problem.
    #[error(transparent)]
    Registry(#[from] CompatError),
    /// A schema fails [`StateSchema::validate`]; the error names the device.
    #[error(transparent)]
    Schema(#[from] StateError),
    #[error("two different state schemas are both named {device}; every device state needs its own name")]
    ConflictingSchemas { device: String },
    #[error("not a vmstate dump")]
    Json(#[source] serde_json::Error),
    #[error("vmstate dump format {found} is not supported; this release reads format {supported}")]
    UnsupportedFormat { found: u64, supported: u32 },
    #[error("vmstate dump has no numeric \"format\" key")]
    NoFormat,
    #[error("the vmstate dump is inconsistent: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Inconsistent { problems: Vec<DumpProblem> },
}

/// One inconsistency inside a dump, found by [`VmStateDump::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DumpProblem {
    #[error("machine type {name:?} is not of the form ferry-X.Y")]
    BadMachineName { name: String },
    #[error("machine type {name} appears twice")]
    DuplicateMachine { name: String },
    #[error("machine type {newer} comes after the older {older}; machine types go newest first")]
    NotNewestFirst { older: String, newer: String },
    #[error("driver {driver} appears twice")]
    DuplicateDriver { driver: String },
    #[error("property {driver}.{property} appears twice")]
    DuplicateProperty { driver: String, property: String },
    #[error("property {driver}.{property} has an empty kind (no value is valid)")]
    EmptyKind { driver: String, property: String },
    #[error("default {value:?} of {driver}.{property} is invalid: {problem}")]
    BadDefault {
        driver: String,
        property: String,
        value: String,
        problem: ValueProblem,
    },
    #[error("compat table of {machine} sets {driver}.{property}, which no driver defines")]
    UnknownCompatTarget {
        machine: String,
        driver: String,
        property: String,
    },
    #[error("compat table of {machine} sets {driver}.{property}={value:?}: {problem}")]
    BadCompatValue {
        machine: String,
        driver: String,
        property: String,
        value: String,
        problem: ValueProblem,
    },
    #[error("compat table of {machine} sets {driver}.{property} twice")]
    DuplicateCompatEntry {
        machine: String,
        driver: String,
        property: String,
    },
    #[error("device {device} appears twice")]
    DuplicateDevice { device: String },
    #[error("device {device}: min_version {min_version} is above version {version}")]
    BadVersions {
        device: String,
        min_version: u32,
        version: u32,
    },
    #[error("device {device}: subsection {subsection} appears twice")]
    DuplicateSubsection { device: String, subsection: String },
    #[error("device {device}: field {field} appears twice")]
    DuplicateField { device: String, field: String },
    #[error(
        "device {device}: field {field} is since version {since}, after its version {version}"
    )]
    FieldTooNew {
        device: String,
        field: String,
        since: u32,
        version: u32,
    },
    #[error(
        "device {device}: field {field} says it takes {stated:?} (at most {stated_max}) bytes, \
         but its kind takes {expected:?} (at most {expected_max})"
    )]
    WrongFieldSize {
        device: String,
        field: String,
        stated: Option<u64>,
        stated_max: u64,
        expected: Option<u64>,
        expected_max: u64,
    },
}

/// Everything `registry` and `schemas` define, as a [`VmStateDump`] of release `release`.
///
/// Refuses a registry that fails [`Registry::validate`] or a schema that fails
/// [`StateSchema::validate`]: a checker must be able to trust what it compares. A schema
/// listed twice is dumped once; two different schemas with one name are refused.
pub fn dump(
    release: &str,
    registry: &Registry,
    schemas: &[&StateSchema],
) -> Result<VmStateDump, DumpError> {
    registry.validate()?;
    let machines = registry
        .machines()
        .iter()
        .map(|m| {
            let mut compat = m
                .compat
                .iter()
                .map(|e| {
                    // `validate` has parsed every entry, so this gives the canonical text.
                    let value = registry
                        .parse_value(e.driver, e.property, e.value)
                        .map(|v| v.to_string())?;
                    Ok(CompatEntryDump {
                        driver: e.driver.to_string(),
                        property: e.property.to_string(),
                        value,
                    })
                })
                .collect::<Result<Vec<_>, CompatError>>()?;
            compat.sort();
            Ok(MachineDump {
                name: m.name.to_string(),
                release: m.release.to_string(),
                doc: m.doc.to_string(),
                compat,
            })
        })
        .collect::<Result<Vec<_>, CompatError>>()?;

    let mut drivers = registry
        .drivers()
        .iter()
        .map(|d| {
            let mut properties = d
                .props
                .iter()
                .map(|p| {
                    let default = p.parse(d.name, p.default)?.to_string();
                    Ok(PropertyDump {
                        name: p.name.to_string(),
                        kind: PropKindDump::from(p.kind),
                        default,
                        wire: p.wire,
                        doc: p.doc.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, CompatError>>()?;
            properties.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(DriverDump {
                name: d.name.to_string(),
                doc: d.doc.to_string(),
                properties,
            })
        })
        .collect::<Result<Vec<_>, CompatError>>()?;
    drivers.sort_by(|a, b| a.name.cmp(&b.name));

    let mut by_name: BTreeMap<&str, &StateSchema> = BTreeMap::new();
    for schema in schemas {
        schema.validate()?;
        match by_name.get(schema.name) {
            Some(seen) if *seen != *schema => {
                return Err(DumpError::ConflictingSchemas {
                    device: schema.name.to_string(),
                })
            }
            _ => {
                by_name.insert(schema.name, schema);
            }
        }
    }
    let devices = by_name.values().map(|s| DeviceDump::from(*s)).collect();

    Ok(VmStateDump {
        format: DUMP_FORMAT,
        release: release.to_string(),
        machines,
        drivers,
        devices,
    })
}

impl From<PropKind> for PropKindDump {
    fn from(kind: PropKind) -> Self {
        match kind {
            PropKind::Bool => Self::Bool,
            PropKind::U64 { min, max } => Self::U64 { min, max },
            PropKind::Size { min, max } => Self::Size { min, max },
            PropKind::Enum(words) => Self::Enum {
                words: words.iter().map(|w| w.to_string()).collect(),
            },
        }
    }
}

impl PropKindDump {
    /// The canonical text of `text` read as a value of this kind, with the same rules as
    /// [`PropKind::parse`].
    pub fn canonical(&self, text: &str) -> Result<String, ValueProblem> {
        let builtin = match *self {
            Self::Bool => PropKind::Bool,
            Self::U64 { min, max } => PropKind::U64 { min, max },
            Self::Size { min, max } => PropKind::Size { min, max },
            Self::Enum { ref words } => {
                if text.is_empty() {
                    return Err(ValueProblem::Empty);
                }
                return words
                    .iter()
                    .find(|w| *w == text)
                    .cloned()
                    .ok_or(ValueProblem::UnknownWord);
            }
        };
        builtin.parse(text).map(|v| v.to_string())
    }

    /// Whether some value is valid.
    fn is_inhabited(&self) -> bool {
        match self {
            Self::Bool => true,
            Self::U64 { min, max } | Self::Size { min, max } => min <= max,
            Self::Enum { words } => !words.is_empty(),
        }
    }

    /// Every canonical value of `self` is also valid under `other`. Conservative: a
    /// different type never counts as accepted, even where texts happen to overlap.
    pub fn accepted_by(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Bool, Self::Bool) => true,
            (Self::U64 { min, max }, Self::U64 { min: m2, max: x2 })
            | (Self::Size { min, max }, Self::Size { min: m2, max: x2 }) => {
                min > max || (m2 <= min && max <= x2)
            }
            (Self::Enum { words }, Self::Enum { words: w2 }) => {
                words.iter().all(|w| w2.contains(w))
            }
            _ => false,
        }
    }
}

/// Describes the valid values, as the `-global` error messages do.
impl std::fmt::Display for PropKindDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bool => write!(
                f,
                "bool ({} or {})",
                BOOL_TRUE_WORDS[0], BOOL_FALSE_WORDS[0]
            ),
            Self::U64 { min, max } => write!(f, "integer {min}..={max}"),
            Self::Size { min, max } => write!(f, "size {min}..={max} bytes"),
            Self::Enum { words } => write!(f, "one of {}", words.join("|")),
        }
    }
}

impl From<FieldKind> for FieldKindDump {
    fn from(kind: FieldKind) -> Self {
        match kind {
            FieldKind::U8 => Self::U8,
            FieldKind::U16 => Self::U16,
            FieldKind::U32 => Self::U32,
            FieldKind::U64 => Self::U64,
            FieldKind::Bool => Self::Bool,
            FieldKind::Bytes { max_len } => Self::Bytes { max_len },
            FieldKind::Array { len } => Self::Array { len },
        }
    }
}

impl From<FieldKindDump> for FieldKind {
    fn from(kind: FieldKindDump) -> Self {
        match kind {
            FieldKindDump::U8 => Self::U8,
            FieldKindDump::U16 => Self::U16,
            FieldKindDump::U32 => Self::U32,
            FieldKindDump::U64 => Self::U64,
            FieldKindDump::Bool => Self::Bool,
            FieldKindDump::Bytes { max_len } => Self::Bytes { max_len },
            FieldKindDump::Array { len } => Self::Array { len },
        }
    }
}

impl FieldKindDump {
    /// The type without its length: `u32`, `bytes`, `array`.
    pub fn type_name(self) -> &'static str {
        FieldKind::from(self).name()
    }

    /// Bytes on the wire when fixed, `None` for variable-length `bytes`.
    pub fn encoded_size(self) -> Option<u64> {
        match self {
            Self::Bytes { .. } => None,
            kind => Some(FieldKind::from(kind).max_encoded_len()),
        }
    }

    pub fn max_encoded_size(self) -> u64 {
        FieldKind::from(self).max_encoded_len()
    }
}

/// `u32`, `array[16]`, `bytes[..=4096]`.
impl std::fmt::Display for FieldKindDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bytes { max_len } => write!(f, "bytes[..={max_len}]"),
            Self::Array { len } => write!(f, "array[{len}]"),
            kind => f.write_str(kind.type_name()),
        }
    }
}

impl From<&FieldSchema> for FieldDump {
    fn from(f: &FieldSchema) -> Self {
        let kind = FieldKindDump::from(f.kind);
        Self {
            name: f.name.to_string(),
            kind,
            since: f.since,
            encoded_size: kind.encoded_size(),
            max_encoded_size: kind.max_encoded_size(),
        }
    }
}

impl From<&SubsectionSchema> for SubsectionDump {
    fn from(s: &SubsectionSchema) -> Self {
        Self {
            name: s.name.to_string(),
            version: s.version,
            needed_when: s.needed_when.to_string(),
            max_encoded_size: s.max_encoded_len(),
            fields: s.fields.iter().map(FieldDump::from).collect(),
        }
    }
}

impl From<&StateSchema> for DeviceDump {
    fn from(s: &StateSchema) -> Self {
        let mut subsections: Vec<SubsectionDump> =
            s.subsections.iter().map(SubsectionDump::from).collect();
        subsections.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            name: s.name.to_string(),
            version: s.version,
            min_version: s.min_version,
            max_encoded_size: s.max_encoded_len(),
            fields: s.fields.iter().map(FieldDump::from).collect(),
            subsections,
        }
    }
}

impl DeviceDump {
    /// The fields a stream at `version` carries, in stream order.
    pub fn fields_at(&self, version: u32) -> impl Iterator<Item = &FieldDump> {
        self.fields.iter().filter(move |f| f.since <= version)
    }

    pub fn subsection(&self, name: &str) -> Option<&SubsectionDump> {
        self.subsections.iter().find(|s| s.name == name)
    }
}

impl VmStateDump {
    /// Pretty-printed JSON with a final newline: what `ferry dump-vmstate` writes.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self)
            .expect("a dump holds only strings, numbers, booleans and lists");
        text.push('\n');
        text
    }

    /// Parses a dump and checks it with [`VmStateDump::validate`]. Refuses a `format`
    /// other than [`DUMP_FORMAT`] before reading anything else, so a future format fails
    /// with that reason rather than with a missing key.
    pub fn from_json(text: &str) -> Result<Self, DumpError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(DumpError::Json)?;
        let format = value
            .get("format")
            .and_then(serde_json::Value::as_u64)
            .ok_or(DumpError::NoFormat)?;
        if format != u64::from(DUMP_FORMAT) {
            return Err(DumpError::UnsupportedFormat {
                found: format,
                supported: DUMP_FORMAT,
            });
        }
        let dump: Self = serde_json::from_value(value).map_err(DumpError::Json)?;
        dump.validate()?;
        Ok(dump)
    }

    /// Checks what a checker relies on: unique names, machine types `ferry-X.Y` newest
    /// first, every default and compat value valid for its property, compat entries naming
    /// defined properties, field versions within their device's, and field sizes matching
    /// their kinds. Every problem is reported.
    pub fn validate(&self) -> Result<(), DumpError> {
        let mut problems = Vec::new();
        self.check_machines(&mut problems);
        self.check_drivers(&mut problems);
        self.check_devices(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DumpError::Inconsistent { problems })
        }
    }

    pub fn machine(&self, name: &str) -> Option<&MachineDump> {
        self.machines.iter().find(|m| m.name == name)
    }

    pub fn driver(&self, name: &str) -> Option<&DriverDump> {
        self.drivers.iter().find(|d| d.name == name)
    }

    pub fn property(&self, driver: &str, property: &str) -> Option<&PropertyDump> {
        self.driver(driver)
            .and_then(|d| d.properties.iter().find(|p| p.name == property))
    }

    pub fn device(&self, name: &str) -> Option<&DeviceDump> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The effective value of every property on machine type `machine`, keyed by
    /// `(driver, property)`, by the ordering rule of [`super`]: defaults, then the compat
    /// tables from the newest machine type down to `machine`. `None` when the dump has no
    /// such machine type. Values are canonical text.
    pub fn effective(&self, machine: &str) -> Option<BTreeMap<(String, String), Effective>> {
        let index = self.machines.iter().position(|m| m.name == machine)?;
        let mut values = BTreeMap::new();
        for driver in &self.drivers {
            for p in &driver.properties {
                values.insert(
                    (driver.name.clone(), p.name.clone()),
                    Effective {
                        value: p.kind.canonical(&p.default).unwrap_or(p.default.clone()),
                        origin: Origin::Default,
                    },
                );
            }
        }
        for table_owner in &self.machines[..=index] {
            for e in &table_owner.compat {
                let Some(p) = self.property(&e.driver, &e.property) else {
                    continue; // `validate` refuses such a dump.
                };
                values.insert(
                    (e.driver.clone(), e.property.clone()),
                    Effective {
                        value: p.kind.canonical(&e.value).unwrap_or(e.value.clone()),
                        origin: Origin::Compat {
                            machine: table_owner.name.clone(),
                        },
                    },
                );
            }
        }
        Some(values)
    }

    fn check_machines(&self, problems: &mut Vec<DumpProblem>) {
        let mut seen = BTreeSet::new();
        let mut previous: Option<(&str, (u32, u32))> = None;
        for m in &self.machines {
            if !seen.insert(m.name.as_str()) {
                problems.push(DumpProblem::DuplicateMachine {
                    name: m.name.clone(),
                });
            }
            match parse_machine_name(&m.name) {
                None => problems.push(DumpProblem::BadMachineName {
                    name: m.name.clone(),
                }),
                Some(version) => {
                    if let Some((older, older_version)) = previous {
                        if version > older_version {
                            problems.push(DumpProblem::NotNewestFirst {
                                older: older.to_string(),
                                newer: m.name.clone(),
                            });
                        }
                    }
                    previous = Some((&m.name, version));
                }
            }
            let mut set = BTreeSet::new();
            for e in &m.compat {
                if !set.insert((&e.driver, &e.property)) {
                    problems.push(DumpProblem::DuplicateCompatEntry {
                        machine: m.name.clone(),
                        driver: e.driver.clone(),
                        property: e.property.clone(),
                    });
                }
                match self.property(&e.driver, &e.property) {
                    None => problems.push(DumpProblem::UnknownCompatTarget {
                        machine: m.name.clone(),
                        driver: e.driver.clone(),
                        property: e.property.clone(),
                    }),
                    Some(p) => {
                        if let Err(problem) = p.kind.canonical(&e.value) {
                            problems.push(DumpProblem::BadCompatValue {
                                machine: m.name.clone(),
                                driver: e.driver.clone(),
                                property: e.property.clone(),
                                value: e.value.clone(),
                                problem,
                            });
                        }
                    }
                }
            }
        }
    }

    fn check_drivers(&self, problems: &mut Vec<DumpProblem>) {
        let mut seen = BTreeSet::new();
        for d in &self.drivers {
            if !seen.insert(d.name.as_str()) {
                problems.push(DumpProblem::DuplicateDriver {
                    driver: d.name.clone(),
                });
            }
            let mut props = BTreeSet::new();
            for p in &d.properties {
                if !props.insert(p.name.as_str()) {
                    problems.push(DumpProblem::DuplicateProperty {
                        driver: d.name.clone(),
                        property: p.name.clone(),
                    });
                }
                if !p.kind.is_inhabited() {
                    problems.push(DumpProblem::EmptyKind {
                        driver: d.name.clone(),
                        property: p.name.clone(),
                    });
                } else if let Err(problem) = p.kind.canonical(&p.default) {
                    problems.push(DumpProblem::BadDefault {
                        driver: d.name.clone(),
                        property: p.name.clone(),
                        value: p.default.clone(),
                        problem,
                    });
                }
            }
        }
    }

    fn check_devices(&self, problems: &mut Vec<DumpProblem>) {
        let mut seen = BTreeSet::new();
        for d in &self.devices {
            if !seen.insert(d.name.as_str()) {
                problems.push(DumpProblem::DuplicateDevice {
                    device: d.name.clone(),
                });
            }
            if d.min_version > d.version {
                problems.push(DumpProblem::BadVersions {
                    device: d.name.clone(),
                    min_version: d.min_version,
                    version: d.version,
                });
            }
            check_fields(&d.name, None, &d.fields, d.version, problems);
            let mut subs = BTreeSet::new();
            for s in &d.subsections {
                if !subs.insert(s.name.as_str()) {
                    problems.push(DumpProblem::DuplicateSubsection {
                        device: d.name.clone(),
                        subsection: s.name.clone(),
                    });
                }
                check_fields(&d.name, Some(&s.name), &s.fields, s.version, problems);
            }
        }
    }
}

fn check_fields(
    device: &str,
    subsection: Option<&str>,
    fields: &[FieldDump],
    version: u32,
    problems: &mut Vec<DumpProblem>,
) {
    let mut seen = BTreeSet::new();
    for f in fields {
        let field = qualified(subsection, &f.name);
        if !seen.insert(f.name.as_str()) {
            problems.push(DumpProblem::DuplicateField {
                device: device.to_string(),
                field: field.clone(),
            });
        }
        if f.since > version {
            problems.push(DumpProblem::FieldTooNew {
                device: device.to_string(),
                field: field.clone(),
                since: f.since,
                version,
            });
        }
        let (expected, expected_max) = (f.kind.encoded_size(), f.kind.max_encoded_size());
        if f.encoded_size != expected || f.max_encoded_size != expected_max {
            problems.push(DumpProblem::WrongFieldSize {
                device: device.to_string(),
                field,
                stated: f.encoded_size,
                stated_max: f.max_encoded_size,
                expected,
                expected_max,
            });
        }
    }
}

/// `field`, or `subsection/field` inside a subsection, as state errors name them.
pub(super) fn qualified(subsection: Option<&str>, field: &str) -> String {
    match subsection {
        Some(sub) => format!("{sub}/{field}"),
        None => field.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::{CompatEntry, DriverDef, MachineDef, PropDef};
    use crate::state::{FieldKind, FieldSchema, StateSchema, SubsectionSchema};

    static DEV: DriverDef = DriverDef {
        name: "dev",
        doc: "a test device",
        props: &[
            PropDef {
                name: "x-feature",
                kind: PropKind::Bool,
                default: "on",
                wire: true,
                doc: "the new feature",
            },
            PropDef {
                name: "buffer",
                kind: PropKind::Size {
                    min: 0,
                    max: 1 << 30,
                },
                default: "64K",
                wire: false,
                doc: "a size",
            },
            PropDef {
                name: "mode",
                kind: PropKind::Enum(&["fast", "slow"]),
                default: "fast",
                wire: true,
                doc: "an enum",
            },
        ],
    };
    static AAA: DriverDef = DriverDef {
        name: "aaa",
        doc: "sorts first",
        props: &[PropDef {
            name: "n",
            kind: PropKind::U64 { min: 1, max: 8 },
            default: "2",
            wire: false,
            doc: "an integer",
        }],
    };
    static M11: MachineDef = MachineDef {
        name: "ferry-1.1",
        release: "1.1",
        doc: "newest",
        compat: &[],
    };
    static M10: MachineDef = MachineDef {
        name: "ferry-1.0",
        release: "1.0",
        doc: "older",
        compat: &[
            CompatEntry {
                driver: "dev",
                property: "x-feature",
                value: "no",
            },
            CompatEntry {
                driver: "aaa",
                property: "n",
                value: "1",
            },
        ],
    };
    static SCHEMA: StateSchema = StateSchema {
        name: "dev",
        version: 2,
        min_version: 1,
        fields: &[
            FieldSchema {
                name: "regs",
                kind: FieldKind::U32,
                since: 1,
            },
            FieldSchema {
                name: "log",
                kind: FieldKind::Bytes { max_len: 16 },
                since: 1,
            },
            FieldSchema {
                name: "id",
                kind: FieldKind::Array { len: 6 },
                since: 2,
            },
        ],
        subsections: &[
            SubsectionSchema {
                name: "dev/z",
                version: 1,
                fields: &[],
                needed_when: "never",
            },
            SubsectionSchema {
                name: "dev/feature",
                version: 1,
                fields: &[FieldSchema {
                    name: "feature-state",
                    kind: FieldKind::U64,
                    since: 1,
                }],
                needed_when: "property dev.x-feature=on",
            },
        ],
    };
    static VCPU: StateSchema = StateSchema {
        name: "a-vcpu",
        version: 1,
        min_version: 1,
        fields: &[FieldSchema {
            name: "pc",
            kind: FieldKind::U64,
            since: 1,
        }],
        subsections: &[],
    };

    fn registry() -> Registry {
        Registry::new(vec![&DEV, &AAA], vec![&M11, &M10])
    }

    fn sample() -> VmStateDump {
        dump("1.1", &registry(), &[&SCHEMA, &VCPU, &SCHEMA]).unwrap()
    }

    #[test]
    fn dump_is_sorted_and_canonical() {
        let d = sample();
        assert_eq!(d.format, DUMP_FORMAT);
        let names = |v: Vec<&str>| v.into_iter().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            d.machines
                .iter()
                .map(|m| m.name.clone())
                .collect::<Vec<_>>(),
            names(vec!["ferry-1.1", "ferry-1.0"])
        );
        assert_eq!(
            d.drivers.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
            names(vec!["aaa", "dev"])
        );
        let dev = d.driver("dev").unwrap();
        assert_eq!(
            dev.properties
                .iter()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>(),
            names(vec!["buffer", "mode", "x-feature"])
        );
        assert_eq!(d.property("dev", "buffer").unwrap().default, "65536");
        // Entries sorted by driver, values canonical.
        let compat = &d.machine("ferry-1.0").unwrap().compat;
        assert_eq!(compat[0].driver, "aaa");
        assert_eq!(compat[1].value, "off");
        // Devices by name, listed once; fields in stream order; subsections by name.
        assert_eq!(
            d.devices.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
            names(vec!["a-vcpu", "dev"])
        );
        let dev = d.device("dev").unwrap();
        assert_eq!(
            dev.fields
                .iter()
                .map(|f| f.name.clone())
                .collect::<Vec<_>>(),
            names(vec!["regs", "log", "id"])
        );
        assert_eq!(dev.subsections[0].name, "dev/feature");
        assert_eq!(dev.max_encoded_size, SCHEMA.max_encoded_len());
        assert_eq!(dev.fields[1].encoded_size, None);
        assert_eq!(dev.fields[1].max_encoded_size, 20);
        assert_eq!(dev.fields[2].encoded_size, Some(6));
    }

    #[test]
    fn dump_round_trips_through_json() {
        let d = sample();
        let text = d.to_json();
        assert!(text.ends_with('\n'));
        let back = VmStateDump::from_json(&text).unwrap();
        assert_eq!(back, d);
        // And prints back byte for byte, so two dumps of one build diff as empty.
        assert_eq!(back.to_json(), text);
    }

    #[test]
    fn json_has_the_documented_keys() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(v["format"], 1);
        assert_eq!(v["release"], "1.1");
        assert_eq!(v["machines"][1]["compat"][1]["property"], "x-feature");
        assert_eq!(v["drivers"][0]["properties"][0]["kind"]["type"], "u64");
        assert_eq!(v["drivers"][0]["properties"][0]["kind"]["max"], 8);
        assert_eq!(v["drivers"][1]["properties"][1]["kind"]["words"][1], "slow");
        let dev = &v["devices"][1];
        assert_eq!(dev["min_version"], 1);
        assert_eq!(dev["fields"][1]["kind"]["type"], "bytes");
        assert_eq!(dev["fields"][1]["kind"]["max_len"], 16);
        assert_eq!(dev["fields"][2]["since"], 2);
        assert_eq!(
            dev["subsections"][0]["needed_when"],
            "property dev.x-feature=on"
        );
    }

    #[test]
    fn effective_values_follow_the_ordering_rule() {
        let d = sample();
        let newest = d.effective("ferry-1.1").unwrap();
        let key = |d: &str, p: &str| (d.to_string(), p.to_string());
        assert_eq!(newest[&key("dev", "x-feature")].value, "on");
        assert_eq!(newest[&key("dev", "x-feature")].origin, Origin::Default);
        let old = d.effective("ferry-1.0").unwrap();
        assert_eq!(old[&key("dev", "x-feature")].value, "off");
        assert_eq!(
            old[&key("dev", "x-feature")].origin,
            Origin::Compat {
                machine: "ferry-1.0".into()
            }
        );
        // Agrees with the registry's own configure.
        let config = registry().configure("ferry-1.0", &[]).unwrap();
        for (driver, property, value, origin) in config.iter() {
            let e = &old[&key(driver, property)];
            assert_eq!((&e.value, &e.origin), (&value.to_string(), origin));
        }
        assert!(d.effective("ferry-0.9").is_none());
    }

    #[test]
    fn conflicting_schemas_with_one_name_are_refused() {
        static OTHER: StateSchema = StateSchema {
            name: "dev",
            version: 1,
            min_version: 1,
            fields: &[],
            subsections: &[],
        };
        let err = dump("1.1", &registry(), &[&SCHEMA, &OTHER]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "two different state schemas are both named dev; every device state needs its own name"
        );
    }

    #[test]
    fn an_invalid_registry_or_schema_is_not_dumped() {
        static BAD: MachineDef = MachineDef {
            name: "ferry-1.0",
            release: "1.0",
            doc: "",
            compat: &[CompatEntry {
                driver: "dev",
                property: "x-feature",
                value: "maybe",
            }],
        };
        let reg = Registry::new(vec![&DEV], vec![&M11, &BAD]);
        let err = dump("1.1", &reg, &[]).unwrap_err().to_string();
        assert!(err.contains("ferry-1.0") && err.contains("maybe"), "{err}");

        static BAD_SCHEMA: StateSchema = StateSchema {
            name: "bad",
            version: 1,
            min_version: 2,
            fields: &[],
            subsections: &[],
        };
        let err = dump("1.1", &registry(), &[&BAD_SCHEMA])
            .unwrap_err()
            .to_string();
        assert!(err.contains("device bad"), "{err}");
    }

    #[test]
    fn other_formats_and_garbage_are_refused_by_name() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        v["format"] = 2.into();
        let err = VmStateDump::from_json(&v.to_string()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vmstate dump format 2 is not supported; this release reads format 1"
        );
        assert!(matches!(
            VmStateDump::from_json("{}"),
            Err(DumpError::NoFormat)
        ));
        assert!(matches!(
            VmStateDump::from_json("not json"),
            Err(DumpError::Json(_))
        ));
        v["format"] = 1.into();
        v["machines"][0].as_object_mut().unwrap().remove("compat");
        assert!(matches!(
            VmStateDump::from_json(&v.to_string()),
            Err(DumpError::Json(_))
        ));
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        v["added-later"] = true.into();
        v["devices"][0]["also-later"] = 3.into();
        assert_eq!(VmStateDump::from_json(&v.to_string()).unwrap(), sample());
    }

    #[test]
    fn hand_edited_inconsistencies_are_all_reported() {
        let mut d = sample();
        d.machines.reverse();
        d.machines[0].compat[1].value = "maybe".into();
        d.machines[0].compat.push(CompatEntryDump {
            driver: "dev".into(),
            property: "gone".into(),
            value: "1".into(),
        });
        d.drivers[0].properties[0].default = "9".into();
        d.devices[1].fields[0].kind = FieldKindDump::U64;
        d.devices[1].fields[2].since = 3;
        d.devices.push(d.devices[0].clone());
        let Err(DumpError::Inconsistent { problems }) = d.validate() else {
            panic!("an inconsistent dump passed validation");
        };
        assert_eq!(
            problems,
            vec![
                DumpProblem::BadCompatValue {
                    machine: "ferry-1.0".into(),
                    driver: "dev".into(),
                    property: "x-feature".into(),
                    value: "maybe".into(),
                    problem: ValueProblem::UnknownWord
                },
                DumpProblem::UnknownCompatTarget {
                    machine: "ferry-1.0".into(),
                    driver: "dev".into(),
                    property: "gone".into()
                },
                DumpProblem::NotNewestFirst {
                    older: "ferry-1.0".into(),
                    newer: "ferry-1.1".into()
                },
                DumpProblem::BadDefault {
                    driver: "aaa".into(),
                    property: "n".into(),
                    value: "9".into(),
                    problem: ValueProblem::OutOfRange
                },
                DumpProblem::WrongFieldSize {
                    device: "dev".into(),
                    field: "regs".into(),
                    stated: Some(4),
                    stated_max: 4,
                    expected: Some(8),
                    expected_max: 8
                },
                DumpProblem::FieldTooNew {
                    device: "dev".into(),
                    field: "id".into(),
                    since: 3,
                    version: 2
                },
                DumpProblem::DuplicateDevice {
                    device: "a-vcpu".into()
                },
            ]
        );
    }

    #[test]
    fn kinds_know_what_they_accept() {
        let u = |min, max| PropKindDump::U64 { min, max };
        assert!(u(2, 4).accepted_by(&u(1, 8)));
        assert!(!u(1, 8).accepted_by(&u(2, 8)));
        assert!(!u(1, 8).accepted_by(&PropKindDump::Size { min: 1, max: 8 }));
        let e = |w: &[&str]| PropKindDump::Enum {
            words: w.iter().map(|s| s.to_string()).collect(),
        };
        assert!(e(&["a"]).accepted_by(&e(&["b", "a"])));
        assert!(!e(&["a", "c"]).accepted_by(&e(&["a"])));
        assert_eq!(PropKindDump::Bool.canonical("yes"), Ok("on".into()));
        assert_eq!(
            PropKindDump::Size {
                min: 0,
                max: 1 << 20
            }
            .canonical("1K"),
            Ok("1024".into())
        );
        assert_eq!(e(&["a"]).canonical("b"), Err(ValueProblem::UnknownWord));
    }
}
