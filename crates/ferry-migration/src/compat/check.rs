//! Comparing two releases' dumps: every change that would break migration between them.
//!
//! [`check`] takes the dump of an older release (OLD) and of a newer one (NEW), both made by
//! [`super::schema::dump`], and returns one [`Finding`] per change that would break a
//! migration from OLD to NEW, or from NEW back to OLD, of a VM on one of OLD's machine
//! types. It is a pure function of the two dumps: no registry, no VMM, no I/O. Machine types
//! only NEW has are not checked: OLD cannot run them, so nothing migrates between the
//! releases on them.
//!
//! # What is checked
//!
//! Machine types and properties (the model is in [`super`]):
//!
//! * every machine type of OLD exists in NEW ([`Finding::MachineRemoved`]), and its compat
//!   table in NEW still holds every entry it held in OLD, with the same value
//!   ([`Finding::CompatEntryRemoved`], [`Finding::CompatEntryChanged`]);
//! * every driver and property of OLD exists in NEW ([`Finding::DriverRemoved`],
//!   [`Finding::PropertyRemoved`]), still accepts every value it accepted
//!   ([`Finding::PropertyNarrowed`]) and keeps its `wire` flag
//!   ([`Finding::WireFlagChanged`]);
//! * the **effective value** of every property of OLD on every machine type of OLD is the
//!   same when computed from NEW's defaults and compat tables as from OLD's
//!   ([`Finding::ValueChanged`]). This is what catches a default changed without the compat
//!   entry that restores the old value: the guest would see a different device, or the
//!   stream would change, on a machine type that promised not to change;
//! * every property NEW adds gets its value on every machine type of OLD from a compat table,
//!   not from its default ([`Finding::NewPropertyUnpinned`]). OLD predates the property, so
//!   only a compat entry can say which value reproduces OLD's behaviour; a default is the
//!   newest machine type's behaviour.
//!
//! Device state (the rules are in [`crate::state`]):
//!
//! * every device state of OLD exists in NEW ([`Finding::DeviceRemoved`]);
//! * its version did not go down ([`Finding::VersionDecreased`]), NEW still loads OLD's
//!   version ([`Finding::NewCannotLoadOld`]) and OLD loads NEW's
//!   ([`Finding::OldCannotLoadNew`]). A release always writes its schema's version, on
//!   every machine type, so a version step cannot be gated by a machine type: it ends
//!   migration back to OLD everywhere. State that old machine types must not send goes in
//!   a subsection whose `needed_when` their compat tables keep false;
//! * the fields of every version both releases read (from NEW's `min_version` to the lower
//!   of the two versions) are identical in order, kind and size. Differences are named per
//!   field ([`Finding::FieldRemoved`], [`Finding::FieldRetyped`], [`Finding::FieldResized`],
//!   [`Finding::FieldSinceChanged`], [`Finding::FieldAdded`] for a field added at a version
//!   OLD already writes), or as [`Finding::FieldsReordered`] when only the order differs.
//!   Names are not on the wire: a field renamed in place is not a finding;
//! * every subsection of OLD exists in NEW ([`Finding::SubsectionRemoved`]) with the same
//!   version ([`Finding::SubsectionVersionDecreased`], [`Finding::SubsectionVersionRaised`])
//!   and the same fields, compared as above;
//! * a subsection NEW adds has a condition ([`Finding::SubsectionUnconditional`]). When the
//!   condition is made only of clauses `property DRIVER.PROP=VALUE` joined by ` and `, it is
//!   evaluated on every machine type of OLD with NEW's effective values: if it holds, NEW
//!   sends the subsection there and OLD refuses it ([`Finding::SubsectionSentOnOldMachine`]);
//!   a clause naming a property NEW does not define is [`Finding::SubsectionConditionUnknown`].
//!   A condition in other words (a runtime state) is taken at its word.
//!
//! # What is not checked
//!
//! Device states that NEW adds: whether a VM of an old machine type has the device is a
//! matter of its configuration, which a dump does not hold; the destination refuses a
//! device list that differs, by name, before any RAM moves. Neither are protocol versions
//! (negotiated in the stream header) nor the documentation strings.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use super::schema::{qualified, DeviceDump, Effective, FieldDump, FieldKindDump, VmStateDump};
use super::Origin;

/// One change that breaks migration between OLD and NEW. `Display` gives one line that
/// names the machine type, driver, property, device, subsection or field at fault, and
/// says which direction breaks. With serde it is an object whose `kind` is the variant's
/// name in kebab case (`value-changed`), beside the variant's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Finding {
    MachineRemoved {
        machine: String,
    },
    CompatEntryRemoved {
        machine: String,
        driver: String,
        property: String,
        value: String,
    },
    CompatEntryChanged {
        machine: String,
        driver: String,
        property: String,
        old_value: String,
        new_value: String,
    },
    DriverRemoved {
        driver: String,
    },
    PropertyRemoved {
        driver: String,
        property: String,
    },
    PropertyNarrowed {
        driver: String,
        property: String,
        old_kind: String,
        new_kind: String,
    },
    WireFlagChanged {
        driver: String,
        property: String,
        old_wire: bool,
        new_wire: bool,
    },
    ValueChanged {
        machine: String,
        driver: String,
        property: String,
        wire: bool,
        old_value: String,
        new_value: String,
        /// Where NEW's value comes from: `default` or `compat table of ferry-X.Y`.
        new_origin: String,
        /// NEW's default when it differs from OLD's default (the usual cause), else `None`.
        default_changed_to: Option<String>,
    },
    NewPropertyUnpinned {
        machine: String,
        driver: String,
        property: String,
        wire: bool,
        default: String,
    },
    DeviceRemoved {
        device: String,
    },
    VersionDecreased {
        device: String,
        old_version: u32,
        new_version: u32,
    },
    NewCannotLoadOld {
        device: String,
        old_version: u32,
        new_min_version: u32,
        new_version: u32,
    },
    OldCannotLoadNew {
        device: String,
        new_version: u32,
        old_min_version: u32,
        old_version: u32,
    },
    FieldRemoved {
        device: String,
        subsection: Option<String>,
        field: String,
        since: u32,
    },
    FieldRetyped {
        device: String,
        subsection: Option<String>,
        field: String,
        old_kind: String,
        new_kind: String,
    },
    FieldResized {
        device: String,
        subsection: Option<String>,
        field: String,
        old_kind: String,
        new_kind: String,
    },
    FieldSinceChanged {
        device: String,
        subsection: Option<String>,
        field: String,
        old_since: u32,
        new_since: u32,
    },
    FieldAdded {
        device: String,
        subsection: Option<String>,
        field: String,
        since: u32,
        old_version: u32,
    },
    FieldsReordered {
        device: String,
        subsection: Option<String>,
        version: u32,
        old_order: Vec<String>,
        new_order: Vec<String>,
    },
    SubsectionRemoved {
        device: String,
        subsection: String,
    },
    SubsectionVersionDecreased {
        device: String,
        subsection: String,
        old_version: u32,
        new_version: u32,
    },
    SubsectionVersionRaised {
        device: String,
        subsection: String,
        old_version: u32,
        new_version: u32,
    },
    SubsectionUnconditional {
        device: String,
        subsection: String,
    },
    SubsectionSentOnOldMachine {
        device: String,
        subsection: String,
        machine: String,
        condition: String,
    },
    SubsectionConditionUnknown {
        device: String,
        subsection: String,
        driver: String,
        property: String,
    },
}

/// Every change between `old` and `new` that breaks migration on `old`'s machine types, in
/// a stable order: machine types, properties, effective values machine type by machine type,
/// properties NEW adds, then device states by name. Empty when the releases are compatible.
pub fn check(old: &VmStateDump, new: &VmStateDump) -> Vec<Finding> {
    let mut findings = Vec::new();
    check_machines(old, new, &mut findings);
    check_properties(old, new, &mut findings);
    check_values(old, new, &mut findings);
    check_new_properties(old, new, &mut findings);
    for device in &old.devices {
        match new.device(&device.name) {
            None => findings.push(Finding::DeviceRemoved {
                device: device.name.clone(),
            }),
            Some(newer) => check_device(device, newer, old, new, &mut findings),
        }
    }
    findings
}

fn check_machines(old: &VmStateDump, new: &VmStateDump, findings: &mut Vec<Finding>) {
    for machine in &old.machines {
        let Some(newer) = new.machine(&machine.name) else {
            findings.push(Finding::MachineRemoved {
                machine: machine.name.clone(),
            });
            continue;
        };
        for entry in &machine.compat {
            let found = newer
                .compat
                .iter()
                .find(|e| e.driver == entry.driver && e.property == entry.property);
            let same_value = |value: &str| {
                // Compare canonical texts where the property still parses them.
                let canonical = |dump: &VmStateDump, text: &str| {
                    dump.property(&entry.driver, &entry.property)
                        .and_then(|p| p.kind.canonical(text).ok())
                        .unwrap_or_else(|| text.to_string())
                };
                canonical(old, &entry.value) == canonical(new, value)
            };
            match found {
                None => findings.push(Finding::CompatEntryRemoved {
                    machine: machine.name.clone(),
                    driver: entry.driver.clone(),
                    property: entry.property.clone(),
                    value: entry.value.clone(),
                }),
                Some(e) if !same_value(&e.value) => findings.push(Finding::CompatEntryChanged {
                    machine: machine.name.clone(),
                    driver: entry.driver.clone(),
                    property: entry.property.clone(),
                    old_value: entry.value.clone(),
                    new_value: e.value.clone(),
                }),
                Some(_) => {}
            }
        }
    }
}

fn check_properties(old: &VmStateDump, new: &VmStateDump, findings: &mut Vec<Finding>) {
    for driver in &old.drivers {
        if new.driver(&driver.name).is_none() {
            findings.push(Finding::DriverRemoved {
                driver: driver.name.clone(),
            });
            continue;
        }
        for p in &driver.properties {
            let Some(q) = new.property(&driver.name, &p.name) else {
                findings.push(Finding::PropertyRemoved {
                    driver: driver.name.clone(),
                    property: p.name.clone(),
                });
                continue;
            };
            if !p.kind.accepted_by(&q.kind) {
                findings.push(Finding::PropertyNarrowed {
                    driver: driver.name.clone(),
                    property: p.name.clone(),
                    old_kind: p.kind.to_string(),
                    new_kind: q.kind.to_string(),
                });
            }
            if p.wire != q.wire {
                findings.push(Finding::WireFlagChanged {
                    driver: driver.name.clone(),
                    property: p.name.clone(),
                    old_wire: p.wire,
                    new_wire: q.wire,
                });
            }
        }
    }
}

fn check_values(old: &VmStateDump, new: &VmStateDump, findings: &mut Vec<Finding>) {
    for machine in &old.machines {
        let (Some(before), Some(after)) =
            (old.effective(&machine.name), new.effective(&machine.name))
        else {
            continue; // A machine type gone from NEW is reported already.
        };
        for ((driver, property), was) in &before {
            let Some(now) = after.get(&(driver.clone(), property.clone())) else {
                continue; // A property gone from NEW is reported already.
            };
            if was.value == now.value {
                continue;
            }
            let canonical_default = |dump: &VmStateDump| {
                dump.property(driver, property)
                    .map(|p| p.kind.canonical(&p.default).unwrap_or(p.default.clone()))
            };
            let new_def = new.property(driver, property);
            let default_changed_to =
                canonical_default(new).filter(|d| Some(d) != canonical_default(old).as_ref());
            findings.push(Finding::ValueChanged {
                machine: machine.name.clone(),
                driver: driver.clone(),
                property: property.clone(),
                wire: new_def.is_some_and(|q| q.wire),
                old_value: was.value.clone(),
                new_value: now.value.clone(),
                new_origin: now.origin.to_string(),
                default_changed_to,
            });
        }
    }
}

fn check_new_properties(old: &VmStateDump, new: &VmStateDump, findings: &mut Vec<Finding>) {
    for machine in &old.machines {
        let Some(after) = new.effective(&machine.name) else {
            continue;
        };
        for ((driver, property), now) in &after {
            if old.property(driver, property).is_some() || now.origin != Origin::Default {
                continue;
            }
            findings.push(Finding::NewPropertyUnpinned {
                machine: machine.name.clone(),
                driver: driver.clone(),
                property: property.clone(),
                wire: new.property(driver, property).is_some_and(|p| p.wire),
                default: now.value.clone(),
            });
        }
    }
}

fn check_device(
    old: &DeviceDump,
    new: &DeviceDump,
    old_dump: &VmStateDump,
    new_dump: &VmStateDump,
    findings: &mut Vec<Finding>,
) {
    let device = || old.name.clone();
    if new.version < old.version {
        findings.push(Finding::VersionDecreased {
            device: device(),
            old_version: old.version,
            new_version: new.version,
        });
    } else if new.min_version > old.version {
        findings.push(Finding::NewCannotLoadOld {
            device: device(),
            old_version: old.version,
            new_min_version: new.min_version,
            new_version: new.version,
        });
    }
    if new.version > old.version || new.version < old.min_version {
        findings.push(Finding::OldCannotLoadNew {
            device: device(),
            new_version: new.version,
            old_min_version: old.min_version,
            old_version: old.version,
        });
    }
    compare_fields(
        &old.name,
        None,
        &old.fields,
        &new.fields,
        new.min_version,
        old.version.min(new.version),
        findings,
    );

    for sub in &old.subsections {
        let Some(newer) = new.subsection(&sub.name) else {
            findings.push(Finding::SubsectionRemoved {
                device: device(),
                subsection: sub.name.clone(),
            });
            continue;
        };
        if newer.version < sub.version {
            findings.push(Finding::SubsectionVersionDecreased {
                device: device(),
                subsection: sub.name.clone(),
                old_version: sub.version,
                new_version: newer.version,
            });
        } else if newer.version > sub.version {
            findings.push(Finding::SubsectionVersionRaised {
                device: device(),
                subsection: sub.name.clone(),
                old_version: sub.version,
                new_version: newer.version,
            });
        }
        compare_fields(
            &old.name,
            Some(&sub.name),
            &sub.fields,
            &newer.fields,
            0,
            sub.version.min(newer.version),
            findings,
        );
    }

    for sub in &new.subsections {
        if old.subsection(&sub.name).is_some() {
            continue;
        }
        if sub.needed_when.trim().is_empty() {
            findings.push(Finding::SubsectionUnconditional {
                device: device(),
                subsection: sub.name.clone(),
            });
            continue;
        }
        check_condition(
            &old.name,
            &sub.name,
            &sub.needed_when,
            old_dump,
            new_dump,
            findings,
        );
    }
}

/// One clause `property DRIVER.PROP=VALUE` of a `needed_when`.
fn property_clause(clause: &str) -> Option<(&str, &str, &str)> {
    let rest = clause.trim().strip_prefix("property ")?.trim();
    let (target, value) = rest.split_once('=')?;
    let (driver, property) = target.split_once('.')?;
    let well_formed = |s: &str| !s.is_empty() && !s.contains(char::is_whitespace);
    (well_formed(driver) && well_formed(property) && well_formed(value))
        .then_some((driver, property, value))
}

/// Evaluates a condition made only of property clauses on each machine type of OLD.
fn check_condition(
    device: &str,
    subsection: &str,
    condition: &str,
    old: &VmStateDump,
    new: &VmStateDump,
    findings: &mut Vec<Finding>,
) {
    let Some(clauses) = condition
        .split(" and ")
        .map(property_clause)
        .collect::<Option<Vec<_>>>()
    else {
        return; // Not only property clauses: a runtime condition, taken at its word.
    };
    let mut known = true;
    for (driver, property, _) in &clauses {
        if new.property(driver, property).is_none() {
            known = false;
            findings.push(Finding::SubsectionConditionUnknown {
                device: device.to_string(),
                subsection: subsection.to_string(),
                driver: driver.to_string(),
                property: property.to_string(),
            });
        }
    }
    if !known {
        return;
    }
    for machine in &old.machines {
        let Some(values) = new.effective(&machine.name) else {
            continue;
        };
        let holds = |&(driver, property, value): &(&str, &str, &str)| {
            let wanted = new
                .property(driver, property)
                .and_then(|p| p.kind.canonical(value).ok())
                .unwrap_or_else(|| value.to_string());
            values
                .get(&(driver.to_string(), property.to_string()))
                .is_some_and(|e: &Effective| e.value == wanted)
        };
        if clauses.iter().all(holds) {
            findings.push(Finding::SubsectionSentOnOldMachine {
                device: device.to_string(),
                subsection: subsection.to_string(),
                machine: machine.name.clone(),
                condition: condition.to_string(),
            });
        }
    }
}

/// Compares the field lists of versions `lo..=hi`, which both releases read. When every
/// version's list has the same kinds in the same order the lists agree (renames are not on
/// the wire); otherwise each difference is named by field, or reported as a reordering.
fn compare_fields(
    device: &str,
    subsection: Option<&str>,
    old: &[FieldDump],
    new: &[FieldDump],
    lo: u32,
    hi: u32,
    findings: &mut Vec<Finding>,
) {
    if lo > hi {
        return;
    }
    // The lists only change at a field's `since`, so these versions cover `lo..=hi`.
    let versions: BTreeSet<u32> = std::iter::once(lo)
        .chain(old.iter().chain(new).map(|f| f.since))
        .filter(|v| (lo..=hi).contains(v))
        .collect();
    let at = |fields: &[FieldDump], v: u32| -> Vec<FieldKindDump> {
        fields
            .iter()
            .filter(|f| f.since <= v)
            .map(|f| f.kind)
            .collect()
    };
    let Some(&first_difference) = versions.iter().find(|&&v| at(old, v) != at(new, v)) else {
        return;
    };

    let base = || (device.to_string(), subsection.map(str::to_string));
    let before = findings.len();
    for f in old.iter().filter(|f| f.since <= hi) {
        let (device, subsection) = base();
        let field = f.name.clone();
        let Some(g) = new.iter().find(|g| g.name == f.name) else {
            findings.push(Finding::FieldRemoved {
                device,
                subsection,
                field,
                since: f.since,
            });
            continue;
        };
        if f.kind.type_name() != g.kind.type_name() {
            findings.push(Finding::FieldRetyped {
                device,
                subsection,
                field,
                old_kind: f.kind.to_string(),
                new_kind: g.kind.to_string(),
            });
        } else if f.kind != g.kind {
            findings.push(Finding::FieldResized {
                device,
                subsection,
                field,
                old_kind: f.kind.to_string(),
                new_kind: g.kind.to_string(),
            });
        } else if f.since != g.since {
            findings.push(Finding::FieldSinceChanged {
                device,
                subsection,
                field,
                old_since: f.since,
                new_since: g.since,
            });
        }
    }
    for g in new.iter().filter(|g| g.since <= hi) {
        if old.iter().all(|f| f.name != g.name) {
            let (device, subsection) = base();
            findings.push(Finding::FieldAdded {
                device,
                subsection,
                field: g.name.clone(),
                since: g.since,
                old_version: hi,
            });
        }
    }
    if findings.len() == before {
        let names = |fields: &[FieldDump]| {
            fields
                .iter()
                .filter(|f| f.since <= first_difference)
                .map(|f| f.name.clone())
                .collect()
        };
        let (device, subsection) = base();
        findings.push(Finding::FieldsReordered {
            device,
            subsection,
            version: first_difference,
            old_order: names(old),
            new_order: names(new),
        });
    }
}

/// `device state dev` or `device state dev, subsection dev/x`.
fn state(device: &str, subsection: &Option<String>) -> String {
    match subsection {
        Some(sub) => format!("device state {device}, subsection {sub}"),
        None => format!("device state {device}"),
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::MachineRemoved { machine } => write!(
                f,
                "machine type {machine} is gone from NEW: VMs of {machine} cannot migrate to NEW"
            ),
            Finding::CompatEntryRemoved {
                machine,
                driver,
                property,
                value,
            } => write!(
                f,
                "machine type {machine}: compat entry {driver}.{property}={value} of OLD is gone from NEW's table"
            ),
            Finding::CompatEntryChanged {
                machine,
                driver,
                property,
                old_value,
                new_value,
            } => write!(
                f,
                "machine type {machine}: compat entry {driver}.{property} is {old_value} in OLD but {new_value} in NEW; a shipped table never changes"
            ),
            Finding::DriverRemoved { driver } => write!(
                f,
                "driver {driver} is gone from NEW: its properties, -global {driver}.… and compat entries no longer work"
            ),
            Finding::PropertyRemoved { driver, property } => write!(
                f,
                "property {driver}.{property} is gone from NEW: a -global or wire value for it is refused"
            ),
            Finding::PropertyNarrowed {
                driver,
                property,
                old_kind,
                new_kind,
            } => write!(
                f,
                "property {driver}.{property} takes {old_kind} in OLD but only {new_kind} in NEW: values valid under OLD are refused"
            ),
            Finding::WireFlagChanged {
                driver,
                property,
                old_wire,
                new_wire,
            } => {
                let side = |wire: &bool| if *wire { "a wire property" } else { "not a wire property" };
                write!(
                    f,
                    "property {driver}.{property} is {} in OLD but {} in NEW: one side states it in the hello and the other refuses or misses it",
                    side(old_wire),
                    side(new_wire)
                )
            }
            Finding::ValueChanged {
                machine,
                driver,
                property,
                wire,
                old_value,
                new_value,
                new_origin,
                default_changed_to,
            } => {
                write!(
                    f,
                    "machine type {machine}: {driver}.{property} is {old_value} under OLD but {new_value} under NEW (from NEW's {new_origin})"
                )?;
                if let Some(default) = default_changed_to {
                    write!(
                        f,
                        "; NEW changed the default to {default} and no compat entry sets {driver}.{property}={old_value} for {machine}"
                    )?;
                }
                if *wire {
                    f.write_str("; it is a wire property, so the two releases refuse each other")
                } else {
                    write!(f, "; {machine} would behave differently under NEW")
                }
            }
            Finding::NewPropertyUnpinned {
                machine,
                driver,
                property,
                wire,
                default,
            } => write!(
                f,
                "machine type {machine}: NEW adds {}property {driver}.{property} and gives it its default {default} there; OLD predates it, so a compat entry must state the value that keeps {machine} as OLD runs it",
                if *wire { "wire " } else { "" }
            ),
            Finding::DeviceRemoved { device } => write!(
                f,
                "device state {device} is gone from NEW: NEW cannot load it from OLD nor send it back"
            ),
            Finding::VersionDecreased {
                device,
                old_version,
                new_version,
            } => write!(
                f,
                "device state {device}: version went down from {old_version} in OLD to {new_version} in NEW: NEW cannot load OLD's version {old_version}"
            ),
            Finding::NewCannotLoadOld {
                device,
                old_version,
                new_min_version,
                new_version,
            } => write!(
                f,
                "device state {device}: OLD writes version {old_version}, NEW loads only {new_min_version}..={new_version}: migration from OLD to NEW is refused"
            ),
            Finding::OldCannotLoadNew {
                device,
                new_version,
                old_min_version,
                old_version,
            } => write!(
                f,
                "device state {device}: NEW writes version {new_version}, OLD loads only {old_min_version}..={old_version}: migration from NEW back to OLD is refused on every machine type (gate the new state in a subsection instead)"
            ),
            Finding::FieldRemoved {
                device,
                subsection,
                field,
                since,
            } => write!(
                f,
                "{}: field {} (since version {since}) is gone from NEW without a version step",
                state(device, subsection),
                qualified(subsection.as_deref(), field)
            ),
            Finding::FieldRetyped {
                device,
                subsection,
                field,
                old_kind,
                new_kind,
            } => write!(
                f,
                "{}: field {} is {old_kind} in OLD but {new_kind} in NEW without a version step",
                state(device, subsection),
                qualified(subsection.as_deref(), field)
            ),
            Finding::FieldResized {
                device,
                subsection,
                field,
                old_kind,
                new_kind,
            } => write!(
                f,
                "{}: field {} is resized from {old_kind} in OLD to {new_kind} in NEW without a version step",
                state(device, subsection),
                qualified(subsection.as_deref(), field)
            ),
            Finding::FieldSinceChanged {
                device,
                subsection,
                field,
                old_since,
                new_since,
            } => write!(
                f,
                "{}: field {} is in the stream from version {old_since} in OLD but from {new_since} in NEW",
                state(device, subsection),
                qualified(subsection.as_deref(), field)
            ),
            Finding::FieldAdded {
                device,
                subsection,
                field,
                since,
                old_version,
            } => write!(
                f,
                "{}: field {} is added in NEW at version {since}, which OLD already writes (OLD is at {old_version}) without it; add it at a new version or in a subsection",
                state(device, subsection),
                qualified(subsection.as_deref(), field)
            ),
            Finding::FieldsReordered {
                device,
                subsection,
                version,
                old_order,
                new_order,
            } => write!(
                f,
                "{}: the fields of version {version} are in order [{}] in OLD but [{}] in NEW",
                state(device, subsection),
                old_order.join(", "),
                new_order.join(", ")
            ),
            Finding::SubsectionRemoved { device, subsection } => write!(
                f,
                "device state {device}: subsection {subsection} is gone from NEW: NEW refuses OLD's state whenever OLD sends it"
            ),
            Finding::SubsectionVersionDecreased {
                device,
                subsection,
                old_version,
                new_version,
            } => write!(
                f,
                "device state {device}: subsection {subsection} went down from version {old_version} in OLD to {new_version} in NEW: NEW refuses it from OLD"
            ),
            Finding::SubsectionVersionRaised {
                device,
                subsection,
                old_version,
                new_version,
            } => write!(
                f,
                "device state {device}: subsection {subsection} went up from version {old_version} in OLD to {new_version} in NEW: OLD refuses it from NEW whenever it is sent"
            ),
            Finding::SubsectionUnconditional { device, subsection } => write!(
                f,
                "device state {device}: NEW adds subsection {subsection} with an empty needed_when: it may be sent on every machine type and OLD refuses it as unknown"
            ),
            Finding::SubsectionSentOnOldMachine {
                device,
                subsection,
                machine,
                condition,
            } => write!(
                f,
                "device state {device}: NEW sends its new subsection {subsection} on machine type {machine}, where {condition:?} holds under NEW; OLD refuses it as unknown"
            ),
            Finding::SubsectionConditionUnknown {
                device,
                subsection,
                driver,
                property,
            } => write!(
                f,
                "device state {device}: the condition of new subsection {subsection} names {driver}.{property}, which NEW does not define"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::schema::{
        CompatEntryDump, DeviceDump, DriverDump, MachineDump, PropKindDump, PropertyDump,
        SubsectionDump, DUMP_FORMAT,
    };
    use super::*;

    // Small hand-made dumps: OLD is release 1.0 with ferry-1.0; NEW is release 1.1, which
    // adds ferry-1.1, the property dev.x-feature (off on ferry-1.0) and a subsection sent
    // only when it is on. Each test breaks NEW in one way and expects exactly its finding.

    fn field(name: &str, kind: FieldKindDump, since: u32) -> FieldDump {
        FieldDump {
            name: name.into(),
            kind,
            since,
            encoded_size: kind.encoded_size(),
            max_encoded_size: kind.max_encoded_size(),
        }
    }

    fn prop(name: &str, kind: PropKindDump, default: &str, wire: bool) -> PropertyDump {
        PropertyDump {
            name: name.into(),
            kind,
            default: default.into(),
            wire,
            doc: String::new(),
        }
    }

    fn entry(driver: &str, property: &str, value: &str) -> CompatEntryDump {
        CompatEntryDump {
            driver: driver.into(),
            property: property.into(),
            value: value.into(),
        }
    }

    fn machine(name: &str, compat: Vec<CompatEntryDump>) -> MachineDump {
        MachineDump {
            name: name.into(),
            release: name.trim_start_matches("ferry-").into(),
            doc: String::new(),
            compat,
        }
    }

    fn ring_size() -> PropertyDump {
        prop(
            "ring-size",
            PropKindDump::U64 { min: 1, max: 256 },
            "16",
            true,
        )
    }

    fn old() -> VmStateDump {
        VmStateDump {
            format: DUMP_FORMAT,
            release: "1.0".into(),
            machines: vec![machine("ferry-1.0", vec![])],
            drivers: vec![DriverDump {
                name: "dev".into(),
                doc: String::new(),
                properties: vec![
                    prop(
                        "mode",
                        PropKindDump::Enum {
                            words: vec!["fast".into(), "slow".into()],
                        },
                        "fast",
                        false,
                    ),
                    ring_size(),
                ],
            }],
            devices: vec![DeviceDump {
                name: "dev".into(),
                version: 1,
                min_version: 1,
                max_encoded_size: 0,
                fields: vec![
                    field("regs", FieldKindDump::U32, 1),
                    field("buf", FieldKindDump::Array { len: 16 }, 1),
                ],
                subsections: vec![SubsectionDump {
                    name: "dev/irq".into(),
                    version: 1,
                    needed_when: "an interrupt is pending".into(),
                    max_encoded_size: 0,
                    fields: vec![field("line", FieldKindDump::U8, 1)],
                }],
            }],
        }
    }

    fn new() -> VmStateDump {
        let mut d = old();
        d.release = "1.1".into();
        d.machines = vec![
            machine("ferry-1.1", vec![]),
            machine("ferry-1.0", vec![entry("dev", "x-feature", "off")]),
        ];
        d.drivers[0]
            .properties
            .push(prop("x-feature", PropKindDump::Bool, "on", true));
        d.devices[0].subsections.push(SubsectionDump {
            name: "dev/feature".into(),
            version: 1,
            needed_when: "property dev.x-feature=on".into(),
            max_encoded_size: 0,
            fields: vec![field("feature-state", FieldKindDump::U64, 1)],
        });
        d
    }

    #[track_caller]
    fn only(findings: Vec<Finding>) -> Finding {
        assert_eq!(findings.len(), 1, "{findings:#?}");
        findings.into_iter().next().unwrap()
    }

    #[track_caller]
    fn assert_mentions(finding: &Finding, needles: &[&str]) {
        let line = finding.to_string();
        assert!(!line.contains('\n'), "{line:?} is not one line");
        for needle in needles {
            assert!(
                line.contains(needle),
                "{line:?} does not mention {needle:?}"
            );
        }
    }

    #[test]
    fn good_releases_are_compatible_both_ways_round() {
        assert_eq!(check(&old(), &new()), vec![]);
        assert_eq!(check(&old(), &old()), vec![]);
        assert_eq!(check(&new(), &new()), vec![]);
        for d in [old(), new()] {
            d.validate().unwrap();
        }
    }

    #[test]
    fn a_machine_type_gone() {
        let mut n = new();
        n.machines.pop();
        let f = only(check(&old(), &n));
        assert_eq!(
            f,
            Finding::MachineRemoved {
                machine: "ferry-1.0".into()
            }
        );
        assert_mentions(&f, &["ferry-1.0", "gone"]);
    }

    #[test]
    fn a_compat_entry_removed_or_changed() {
        let mut o = new();
        o.machines[1].compat.push(entry("dev", "ring-size", "8"));

        let mut n = o.clone();
        n.machines[1].compat.retain(|e| e.property != "ring-size");
        let findings = check(&o, &n);
        assert_eq!(findings.len(), 2, "{findings:#?}");
        assert!(matches!(findings[0], Finding::CompatEntryRemoved { .. }));
        assert_mentions(&findings[0], &["ferry-1.0", "dev.ring-size=8", "gone"]);
        // Which changes the value on ferry-1.0 back to the default.
        assert!(matches!(findings[1], Finding::ValueChanged { .. }));

        let mut n = o.clone();
        n.machines[1].compat[1].value = "4".into();
        let findings = check(&o, &n);
        assert_eq!(findings.len(), 2, "{findings:#?}");
        assert!(matches!(findings[0], Finding::CompatEntryChanged { .. }));
        assert_mentions(&findings[0], &["ferry-1.0", "dev.ring-size", "8", "4"]);
        assert!(matches!(findings[1], Finding::ValueChanged { .. }));

        // The same value in another form is no change.
        let mut n = o.clone();
        n.machines[1].compat[0].value = "no".into();
        assert_eq!(check(&o, &n), vec![]);
    }

    #[test]
    fn a_driver_or_property_gone() {
        let mut n = new();
        n.drivers[0].properties.retain(|p| p.name != "mode");
        let f = only(check(&old(), &n));
        assert_eq!(
            f,
            Finding::PropertyRemoved {
                driver: "dev".into(),
                property: "mode".into()
            }
        );
        assert_mentions(&f, &["dev.mode"]);

        let mut n = new();
        n.drivers[0].name = "dev2".into();
        n.machines[1].compat.clear();
        n.devices[0].subsections.pop();
        let findings = check(&old(), &n);
        assert_eq!(
            findings[0],
            Finding::DriverRemoved {
                driver: "dev".into()
            }
        );
        assert_mentions(&findings[0], &["driver dev "]);
    }

    #[test]
    fn a_property_narrowed() {
        let mut n = new();
        n.drivers[0].properties[0].kind = PropKindDump::Enum {
            words: vec!["fast".into()],
        };
        let f = only(check(&old(), &n));
        assert!(matches!(f, Finding::PropertyNarrowed { .. }), "{f:?}");
        assert_mentions(&f, &["dev.mode", "fast|slow", "one of fast"]);
        // Widening is fine.
        let mut n = new();
        n.drivers[0].properties[1].kind = PropKindDump::U64 { min: 1, max: 1024 };
        assert_eq!(check(&old(), &n), vec![]);
    }

    #[test]
    fn a_wire_flag_changed() {
        let mut n = new();
        n.drivers[0].properties[0].wire = true;
        let f = only(check(&old(), &n));
        assert_eq!(
            f,
            Finding::WireFlagChanged {
                driver: "dev".into(),
                property: "mode".into(),
                old_wire: false,
                new_wire: true
            }
        );
        assert_mentions(&f, &["dev.mode", "not a wire property in OLD"]);
    }

    #[test]
    fn a_default_changed_without_a_compat_entry() {
        let mut n = new();
        n.drivers[0].properties[1].default = "32".into();
        let f = only(check(&old(), &n));
        assert_eq!(
            f,
            Finding::ValueChanged {
                machine: "ferry-1.0".into(),
                driver: "dev".into(),
                property: "ring-size".into(),
                wire: true,
                old_value: "16".into(),
                new_value: "32".into(),
                new_origin: "default".into(),
                default_changed_to: Some("32".into()),
            }
        );
        assert_mentions(
            &f,
            &[
                "ferry-1.0",
                "dev.ring-size is 16 under OLD but 32 under NEW",
                "NEW changed the default to 32 and no compat entry sets dev.ring-size=16 for ferry-1.0",
            ],
        );

        // With the entry that restores 16 it is compatible.
        n.machines[1].compat.push(entry("dev", "ring-size", "16"));
        assert_eq!(check(&old(), &n), vec![]);

        // An entry in the table of a machine type between the two releases is inherited
        // by ferry-1.0, and restores its value there just as well.
        let mut n = new();
        n.release = "1.2".into();
        n.drivers[0].properties[0].default = "slow".into();
        n.machines.insert(0, machine("ferry-1.2", vec![]));
        n.machines[1].compat.push(entry("dev", "mode", "fast"));
        n.validate().unwrap();
        assert_eq!(check(&old(), &n), vec![]);

        // A compat entry that sets another value than OLD had, default unchanged.
        let mut n = new();
        n.machines[1].compat.push(entry("dev", "mode", "slow"));
        let f = only(check(&old(), &n));
        assert!(
            matches!(
                &f,
                Finding::ValueChanged {
                    default_changed_to: None,
                    wire: false,
                    ..
                }
            ),
            "{f:?}"
        );
        assert_mentions(
            &f,
            &[
                "dev.mode is fast under OLD but slow under NEW (from NEW's compat table of ferry-1.0)",
                "ferry-1.0 would behave differently under NEW",
            ],
        );
    }

    #[test]
    fn a_new_property_left_at_its_default_on_an_old_machine_type() {
        let mut n = new();
        n.machines[1].compat.clear();
        let findings = check(&old(), &n);
        assert_eq!(
            findings[0],
            Finding::NewPropertyUnpinned {
                machine: "ferry-1.0".into(),
                driver: "dev".into(),
                property: "x-feature".into(),
                wire: true,
                default: "on".into(),
            }
        );
        assert_mentions(&findings[0], &["ferry-1.0", "dev.x-feature", "default on"]);
        // And so the new subsection is sent there.
        assert!(matches!(
            findings[1],
            Finding::SubsectionSentOnOldMachine { .. }
        ));
        assert_eq!(findings.len(), 2);
    }

    #[test]
    fn a_device_state_gone() {
        let mut n = new();
        n.devices.clear();
        let f = only(check(&old(), &n));
        assert_eq!(
            f,
            Finding::DeviceRemoved {
                device: "dev".into()
            }
        );
        assert_mentions(&f, &["device state dev"]);
    }

    #[test]
    fn versions_that_cannot_be_loaded() {
        let mut o = new();
        o.devices[0].version = 2;
        let mut n = o.clone();
        n.devices[0].version = 1;
        let findings = check(&o, &n);
        assert_eq!(
            findings,
            vec![Finding::VersionDecreased {
                device: "dev".into(),
                old_version: 2,
                new_version: 1
            }]
        );
        assert_mentions(&findings[0], &["dev", "from 2 in OLD to 1 in NEW"]);

        // NEW raised its minimum above what OLD writes; and writes what OLD cannot load.
        let mut n = new();
        n.devices[0].version = 3;
        n.devices[0].min_version = 2;
        let findings = check(&old(), &n);
        assert_eq!(
            findings,
            vec![
                Finding::NewCannotLoadOld {
                    device: "dev".into(),
                    old_version: 1,
                    new_min_version: 2,
                    new_version: 3
                },
                Finding::OldCannotLoadNew {
                    device: "dev".into(),
                    new_version: 3,
                    old_min_version: 1,
                    old_version: 1
                }
            ]
        );
        assert_mentions(&findings[0], &["OLD writes version 1", "2..=3"]);
        assert_mentions(
            &findings[1],
            &["NEW writes version 3", "every machine type"],
        );
    }

    #[test]
    fn a_version_step_with_new_fields_only_breaks_the_way_back() {
        let mut n = new();
        n.devices[0].version = 2;
        n.devices[0]
            .fields
            .push(field("extra", FieldKindDump::U16, 2));
        let f = only(check(&old(), &n));
        assert!(matches!(f, Finding::OldCannotLoadNew { .. }), "{f:?}");
    }

    #[test]
    fn a_field_removed_without_a_version_step() {
        let mut n = new();
        n.devices[0].fields.remove(0);
        let f = only(check(&old(), &n));
        assert_eq!(
            f,
            Finding::FieldRemoved {
                device: "dev".into(),
                subsection: None,
                field: "regs".into(),
                since: 1
            }
        );
        assert_mentions(
            &f,
            &["device state dev", "field regs", "without a version step"],
        );
    }

    #[test]
    fn a_field_retyped_or_resized() {
        let mut n = new();
        n.devices[0].fields[0] = field("regs", FieldKindDump::U64, 1);
        n.devices[0].fields[1] = field("buf", FieldKindDump::Array { len: 32 }, 1);
        let findings = check(&old(), &n);
        assert_eq!(findings.len(), 2, "{findings:#?}");
        assert!(matches!(findings[0], Finding::FieldRetyped { .. }));
        assert_mentions(&findings[0], &["field regs", "u32 in OLD but u64 in NEW"]);
        assert!(matches!(findings[1], Finding::FieldResized { .. }));
        assert_mentions(&findings[1], &["field buf", "array[16]", "array[32]"]);
    }

    #[test]
    fn a_field_added_at_a_version_old_already_writes() {
        let mut n = new();
        n.devices[0]
            .fields
            .push(field("late", FieldKindDump::U8, 1));
        let f = only(check(&old(), &n));
        assert_eq!(
            f,
            Finding::FieldAdded {
                device: "dev".into(),
                subsection: None,
                field: "late".into(),
                since: 1,
                old_version: 1
            }
        );
        assert_mentions(&f, &["field late", "version 1"]);
    }

    #[test]
    fn a_field_moving_to_another_version() {
        let mut o = old();
        o.devices[0].version = 2;
        o.devices[0].fields.push(field("id", FieldKindDump::U8, 2));
        let mut n = o.clone();
        n.devices[0].fields[2].since = 1;
        let f = only(check(&o, &n));
        assert!(matches!(f, Finding::FieldSinceChanged { .. }), "{f:?}");
        assert_mentions(&f, &["field id", "version 2 in OLD but from 1"]);
    }

    #[test]
    fn fields_reordered_and_renamed() {
        let mut n = new();
        n.devices[0].fields.swap(0, 1);
        let f = only(check(&old(), &n));
        assert_eq!(
            f,
            Finding::FieldsReordered {
                device: "dev".into(),
                subsection: None,
                version: 1,
                old_order: vec!["regs".into(), "buf".into()],
                new_order: vec!["buf".into(), "regs".into()],
            }
        );
        // A rename in place is not on the wire.
        let mut n = new();
        n.devices[0].fields[0].name = "registers".into();
        assert_eq!(check(&old(), &n), vec![]);
    }

    #[test]
    fn subsection_fields_are_compared_too() {
        let mut n = new();
        n.devices[0].subsections[0].fields[0] = field("line", FieldKindDump::U16, 1);
        let f = only(check(&old(), &n));
        assert!(matches!(f, Finding::FieldRetyped { .. }), "{f:?}");
        assert_mentions(&f, &["subsection dev/irq", "field dev/irq/line"]);
    }

    #[test]
    fn a_subsection_removed_or_reversioned() {
        let mut n = new();
        n.devices[0].subsections.retain(|s| s.name != "dev/irq");
        let f = only(check(&old(), &n));
        assert_eq!(
            f,
            Finding::SubsectionRemoved {
                device: "dev".into(),
                subsection: "dev/irq".into()
            }
        );
        assert_mentions(&f, &["dev/irq", "gone"]);

        let mut n = new();
        n.devices[0].subsections[0].version = 2;
        let f = only(check(&old(), &n));
        assert!(
            matches!(f, Finding::SubsectionVersionRaised { .. }),
            "{f:?}"
        );
        let f = only(check(&n, &new()));
        assert!(
            matches!(f, Finding::SubsectionVersionDecreased { .. }),
            "{f:?}"
        );
    }

    #[test]
    fn a_subsection_added_without_a_condition() {
        let mut n = new();
        n.devices[0].subsections[1].needed_when = "  ".into();
        let f = only(check(&old(), &n));
        assert_eq!(
            f,
            Finding::SubsectionUnconditional {
                device: "dev".into(),
                subsection: "dev/feature".into()
            }
        );
        assert_mentions(&f, &["dev/feature", "empty needed_when"]);
    }

    #[test]
    fn subsection_conditions_are_evaluated_on_old_machine_types() {
        // The compat entry sets the feature on: the subsection is sent on ferry-1.0.
        let mut n = new();
        n.machines[1].compat[0].value = "on".into();
        let findings = check(&old(), &n);
        let f = findings
            .iter()
            .find(|f| matches!(f, Finding::SubsectionSentOnOldMachine { .. }))
            .expect("the subsection is sent on ferry-1.0");
        assert_mentions(
            f,
            &["dev/feature", "ferry-1.0", "property dev.x-feature=on"],
        );

        // A conjunction holds only when every clause does.
        let mut n = new();
        n.devices[0].subsections[1].needed_when =
            "property dev.x-feature=on and property dev.mode=fast".into();
        assert_eq!(check(&old(), &n), vec![]);
        n.devices[0].subsections[1].needed_when =
            "property dev.x-feature=off and property dev.mode=fast".into();
        assert!(matches!(
            only(check(&old(), &n)),
            Finding::SubsectionSentOnOldMachine { .. }
        ));
        // A condition in words is taken at its word; a property that does not exist is not.
        n.devices[0].subsections[1].needed_when = "the guest enabled the feature".into();
        assert_eq!(check(&old(), &n), vec![]);
        n.devices[0].subsections[1].needed_when = "property dev.nope=on".into();
        let f = only(check(&old(), &n));
        assert!(
            matches!(f, Finding::SubsectionConditionUnknown { .. }),
            "{f:?}"
        );
        assert_mentions(&f, &["dev.nope"]);
    }

    #[test]
    fn findings_serialise_with_their_kind() {
        let f = Finding::FieldRemoved {
            device: "dev".into(),
            subsection: None,
            field: "regs".into(),
            since: 1,
        };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["kind"], "field-removed");
        assert_eq!(v["device"], "dev");
        assert_eq!(v["field"], "regs");
    }
}
