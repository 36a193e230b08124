//! Typed properties, machine types and compat tables: what lets a VM started under one release
//! of ferry migrate to and from another.
//!
//! This is QEMU's `hw_compat_X_Y` mechanism, kept to its essentials.
//!
//! # The model
//!
//! * A **driver** ([`DriverDef`]) is a named set of typed properties ([`PropDef`]): a device
//!   type such as `virtio-blk`, or the `migration` pseudo-device (below). A property has a kind
//!   ([`PropKind`]: bool, bounded integer, size, or one of a set of words), a default, and a
//!   `wire` flag saying that both sides of a migration must agree on its value because it
//!   changes the stream or what the guest sees.
//! * **Defaults are those of the newest machine type.** The code always describes the newest
//!   behaviour; older behaviour is expressed only as data, in compat tables.
//! * A **machine type** ([`MachineDef`]) `ferry-X.Y` exists for every release X.Y. A
//!   [`Registry`] holds them newest first; the alias `ferry` names the newest.
//! * Each machine type carries its release's **compat table**, a list of
//!   ([`CompatEntry`]) `driver.property=value`: the entries that restore, for that machine
//!   type *and every older one*, what later releases changed. The table of `ferry-1.1` holds
//!   what release 1.2 changed; the newest machine type's table is empty, because nothing newer
//!   has changed anything yet.
//! * A user can override any property with `-global driver.property=value` ([`Global`]), as in
//!   QEMU. That is for developers and tests; an administrator picks a machine type instead.
//!
//! [`Registry::configure`] turns a machine type and the globals into a [`Config`]: the
//! effective typed value of every property of every driver, each with its [`Origin`].
//!
//! # The ordering rule
//!
//! Configuring the machine type at position `i` of the newest-first list applies, in order,
//! each step overriding the previous ones:
//!
//! 1. every property default;
//! 2. the compat tables of `machines[0]`, `machines[1]`, ..., `machines[i]`, that is from the
//!    newest machine type down to the chosen one. For one property, an older table's entry is
//!    applied later and so **wins** over a newer table's;
//! 3. the user's globals, in command-line order (the last one for a property wins).
//!
//! Because every table from the newest down is applied, an older machine type *inherits* the
//! entries of all newer tables without repeating them, and only adds what was different before.
//!
//! ## Worked example
//!
//! Three releases. `virtio-blk.num-queues` was 1 in 1.0, became 2 in 1.1 and 4 in 1.2;
//! `virtio-blk.discard` appeared in 1.2, on by default; `migration.multifd-flush-after-each-section`
//! turned off in 1.1 (one multifd sync per pass over memory instead of one per section).
//!
//! | machine type | compat table |
//! |---|---|
//! | `ferry-1.2` (newest, alias `ferry`) | empty |
//! | `ferry-1.1` | `virtio-blk.num-queues=2`, `virtio-blk.discard=off` |
//! | `ferry-1.0` | `virtio-blk.num-queues=1`, `migration.multifd-flush-after-each-section=on` |
//!
//! The effective values, with their origin:
//!
//! | machine type | `num-queues` | `discard` | `multifd-flush-after-each-section` |
//! |---|---|---|---|
//! | `ferry-1.2` | 4, default | on, default | off, default |
//! | `ferry-1.1` | 2, table of 1.1 | off, table of 1.1 | off, default |
//! | `ferry-1.0` | 1, table of 1.0 (applied after 1.1's 2) | off, table of 1.1 (inherited) | on, table of 1.0 |
//!
//! With `-global virtio-blk.num-queues=8` every machine type gets 8, with origin
//! [`Origin::Global`].
//!
//! It is the machine type, not the binary, that decides. A guest started on release 1.0 with
//! `ferry-1.0` and migrated to a 1.2 binary keeps one queue there, so it can move on again to
//! another 1.0 host: the A → B → C chain QEMU's compatibility documentation warns about.
//!
//! # Why `migration` is a pseudo-device
//!
//! Some migration behaviour changes the stream itself: how often multifd channels sync, how
//! zero pages are sent. A 1.2 binary migrating a `ferry-1.0` VM to a 1.0 binary must behave as
//! 1.0 did, so these knobs must follow the machine type exactly as device properties do, and a
//! developer must be able to flip them the same way. Declaring `migration` as a driver gives it
//! compat entries and `-global migration.multifd-flush-after-each-section=on` with no second
//! mechanism. It is a *pseudo*-device because there is no device behind it: no guest-visible
//! hardware, no device state in the stream, a single instance per VM whose properties the
//! engine reads from the [`Config`]. QEMU does the same: its `migration` object is a device
//! that is never realised, only so that globals and compat properties reach it.
//!
//! # Every change of a default needs a compat entry
//!
//! Once release X.Y has shipped, machine type `ferry-X.Y` is frozen: a VM of that type must
//! look the same to its guest and on the wire under every later release. So from then on,
//! **every change of a property default** (a new value, or a new property whose default differs
//! from the old behaviour) comes with an entry in the compat table of the newest machine type
//! that has shipped, restoring the old value. For `wire` properties this is what keeps
//! migration working (a wire change may instead be negotiated as a capability); for the others
//! it keeps an old machine type behaving as it did, and costs one line, so the rule has no
//! exceptions. When a release is cut, its machine type is added at the front with an empty
//! table, and the previously newest one starts collecting entries.
//!
//! A registry's builder should call [`Registry::validate`] in a test, and is encouraged to pin
//! the [`Config::wire_properties`] of every shipped machine type in another, so that a changed
//! default without its compat entry fails a test instead of a migration.
//!
//! # Text forms
//!
//! * Bool: `on`, `off`; also `true`/`false`, `yes`/`no`. Canonical: `on`/`off`.
//! * Integer: plain decimal, in the property's range.
//! * Size: decimal bytes, optionally followed by `K`, `M`, `G`, `T` or `KiB`, `MiB`, `GiB`,
//!   `TiB` (all binary; `B` for bytes is allowed, `KB` is refused as ambiguous). Canonical:
//!   decimal bytes.
//! * Enum: exactly one of the property's words.
//!
//! The canonical text ([`PropValue`]'s `Display`) always parses back to the same value; it is
//! what [`Config::wire_properties`] sends and compares.
//!
//! # Comparing two releases
//!
//! [`schema::dump`] writes a release's machine types, drivers and device state schemas as
//! JSON (`ferry dump-vmstate`); [`check::check`] compares two such dumps and lists every
//! change that breaks migration between them on the older release's machine types
//! (`ferry compat-check`). Run it against the previous release's dump before shipping.
//!
//! # Differences from QEMU
//!
//! Driver names match exactly (QEMU also matches QOM parent types, so one entry can cover every
//! virtio device); entries are never optional; there are no accelerator or legacy-option
//! slots; and a bad default or compat entry is an error, [`CompatError::InvalidRegistry`], not
//! an abort.

use std::collections::BTreeMap;

pub mod check;
mod config;
mod error;
mod global;
mod registry;
pub mod schema;
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
