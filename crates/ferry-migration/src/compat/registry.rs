//! Looking up drivers and machine types, building a [`Config`], and the registry's self-check.

use std::collections::{BTreeMap, BTreeSet};

use super::config::Setting;
use super::{
    CompatError, Config, DriverDef, Global, MachineDef, Origin, PropDef, PropKind, PropValue,
    Registry, RegistryProblem,
};

/// The name that resolves to the newest machine type.
pub const NEWEST_ALIAS: &str = "ferry";

/// The prefix of every machine type name, `ferry-X.Y`.
pub const MACHINE_PREFIX: &str = "ferry-";

impl MachineDef {
    /// `(X, Y)` of a name `ferry-X.Y`, or `None` when the name is not of that form.
    pub fn version(&self) -> Option<(u32, u32)> {
        parse_machine_name(self.name)
    }
}

/// `(X, Y)` of `ferry-X.Y`. X and Y are decimal without leading zeros, so that two different
/// names never denote the same version.
pub fn parse_machine_name(name: &str) -> Option<(u32, u32)> {
    let (major, minor) = name.strip_prefix(MACHINE_PREFIX)?.split_once('.')?;
    Some((version_part(major)?, version_part(minor)?))
}

fn version_part(text: &str) -> Option<u32> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if canonical {
        text.parse().ok()
    } else {
        None
    }
}

impl PropDef {
    /// Parses `text` as a value of this property of `driver`, with an error that names both.
    pub fn parse(&self, driver: &str, text: &str) -> Result<PropValue, CompatError> {
        self.kind
            .parse(text)
            .map_err(|problem| CompatError::InvalidValue {
                driver: driver.to_string(),
                property: self.name.to_string(),
                value: text.to_string(),
                problem,
                kind: self.kind,
            })
    }
}

impl Registry {
    /// `machines` newest first.
    pub fn new(drivers: Vec<&'static DriverDef>, machines: Vec<&'static MachineDef>) -> Self {
        Self { drivers, machines }
    }

    /// Newest first.
    pub fn machines(&self) -> &[&'static MachineDef] {
        &self.machines
    }

    pub fn drivers(&self) -> &[&'static DriverDef] {
        &self.drivers
    }

    /// The machine type the alias `ferry` stands for, if any is defined.
    pub fn newest(&self) -> Option<&'static MachineDef> {
        self.machines.first().copied()
    }

    /// Resolves a machine name or the alias `ferry` (the newest).
    pub fn resolve_machine(&self, name: &str) -> Result<&'static MachineDef, CompatError> {
        let index = self.machine_index(name)?;
        Ok(self.machines[index])
    }

    pub fn driver(&self, name: &str) -> Result<&'static DriverDef, CompatError> {
        self.drivers
            .iter()
            .copied()
            .find(|driver| driver.name == name)
            .ok_or_else(|| CompatError::UnknownDriver {
                driver: name.to_string(),
                known: self.drivers.iter().map(|d| d.name.to_string()).collect(),
            })
    }

    /// The definition of `driver.property`, with the driver it belongs to.
    pub fn property(
        &self,
        driver: &str,
        property: &str,
    ) -> Result<(&'static DriverDef, &'static PropDef), CompatError> {
        let driver = self.driver(driver)?;
        let def = driver
            .props
            .iter()
            .find(|def| def.name == property)
            .ok_or_else(|| CompatError::UnknownProperty {
                driver: driver.name.to_string(),
                property: property.to_string(),
                known: driver.props.iter().map(|d| d.name.to_string()).collect(),
            })?;
        Ok((driver, def))
    }

    /// Parses `text` as a value of `driver.property`.
    pub fn parse_value(
        &self,
        driver: &str,
        property: &str,
        text: &str,
    ) -> Result<PropValue, CompatError> {
        let (driver, def) = self.property(driver, property)?;
        def.parse(driver.name, text)
    }

    /// The effective properties of a VM of machine type `machine` (a name or the alias):
    /// every default, then the compat tables from the newest machine type down to `machine`
    /// (older entries win), then `globals` in order (a later one wins).
    ///
    /// A default or compat entry that does not fit its definition is refused with
    /// [`CompatError::InvalidRegistry`]; [`Registry::validate`] finds those in tests.
    pub fn configure(&self, machine: &str, globals: &[Global]) -> Result<Config, CompatError> {
        let index = self.machine_index(machine)?;
        let mut values: BTreeMap<&'static str, BTreeMap<&'static str, Setting>> = BTreeMap::new();

        for driver in self.drivers.iter().copied() {
            let settings = values.entry(driver.name).or_default();
            for def in driver.props {
                let value = def.kind.parse(def.default).map_err(|problem| {
                    CompatError::InvalidRegistry {
                        problems: vec![bad_default(driver, def, problem)],
                    }
                })?;
                settings.insert(
                    def.name,
                    Setting {
                        def,
                        value,
                        origin: Origin::Default,
                    },
                );
            }
        }

        for table_owner in &self.machines[..=index] {
            for entry in table_owner.compat {
                let bad_entry = |problem| CompatError::InvalidRegistry {
                    problems: vec![RegistryProblem::BadCompatEntry {
                        machine: table_owner.name.to_string(),
                        problem: Box::new(problem),
                    }],
                };
                let (driver, def) = self
                    .property(entry.driver, entry.property)
                    .map_err(bad_entry)?;
                let value = def.parse(driver.name, entry.value).map_err(bad_entry)?;
                let origin = Origin::Compat {
                    machine: table_owner.name.to_string(),
                };
                set(&mut values, driver, def, value, origin);
            }
        }

        for global in globals {
            let (driver, def) = self.property(&global.driver, &global.property)?;
            let value = def.parse(driver.name, &global.value)?;
            set(&mut values, driver, def, value, Origin::Global);
        }

        Ok(Config {
            machine: self.machines[index].name.to_string(),
            values,
        })
    }

    /// Checks the definitions: machine names of the form `ferry-X.Y`, unique, newest first, the
    /// newest one's compat table empty; driver and property names unique and usable in a
    /// `-global`; ranges and enum words sane; every default and every compat entry valid.
    ///
    /// Every problem found is reported, not just the first. Whoever builds a registry should
    /// call this in a test.
    pub fn validate(&self) -> Result<(), CompatError> {
        let mut problems = Vec::new();
        self.check_machines(&mut problems);
        self.check_drivers(&mut problems);
        self.check_compat_tables(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CompatError::InvalidRegistry { problems })
        }
    }

    fn machine_index(&self, name: &str) -> Result<usize, CompatError> {
        let found = if name == NEWEST_ALIAS && !self.machines.is_empty() {
            Some(0)
        } else {
            self.machines.iter().position(|m| m.name == name)
        };
        found.ok_or_else(|| CompatError::UnknownMachine {
            name: name.to_string(),
            known: self.known_machines(),
        })
    }

    /// Every name `resolve_machine` accepts, for error messages: the alias first.
    fn known_machines(&self) -> Vec<String> {
        let alias = self
            .newest()
            .map(|newest| format!("{NEWEST_ALIAS} (alias of {})", newest.name));
        alias
            .into_iter()
            .chain(self.machines.iter().map(|m| m.name.to_string()))
            .collect()
    }

    fn check_machines(&self, problems: &mut Vec<RegistryProblem>) {
        let Some(newest) = self.newest() else {
            problems.push(RegistryProblem::NoMachines);
            return;
        };
        if !newest.compat.is_empty() {
            problems.push(RegistryProblem::NewestTableNotEmpty {
                machine: newest.name.to_string(),
                entries: newest.compat.len(),
            });
        }
        let mut seen = BTreeSet::new();
        let mut previous: Option<(&str, (u32, u32))> = None;
        for machine in &self.machines {
            if !seen.insert(machine.name) {
                problems.push(RegistryProblem::DuplicateMachine {
                    name: machine.name.to_string(),
                });
                continue;
            }
            let Some(version) = machine.version() else {
                problems.push(RegistryProblem::BadMachineName {
                    name: machine.name.to_string(),
                });
                continue;
            };
            if let Some((older, older_version)) = previous {
                if version > older_version {
                    problems.push(RegistryProblem::NotNewestFirst {
                        older: older.to_string(),
                        newer: machine.name.to_string(),
                    });
                }
            }
            previous = Some((machine.name, version));
        }
    }

    fn check_drivers(&self, problems: &mut Vec<RegistryProblem>) {
        let mut seen = BTreeSet::new();
        for driver in self.drivers.iter().copied() {
            if driver.name.is_empty() || driver.name.contains(['.', '=']) {
                problems.push(RegistryProblem::BadDriverName {
                    driver: driver.name.to_string(),
                });
            }
            if !seen.insert(driver.name) {
                problems.push(RegistryProblem::DuplicateDriver {
                    driver: driver.name.to_string(),
                });
            }
            let mut seen_props = BTreeSet::new();
            for def in driver.props {
                check_property(driver, def, &mut seen_props, problems);
            }
        }
    }

    fn check_compat_tables(&self, problems: &mut Vec<RegistryProblem>) {
        for machine in &self.machines {
            let mut seen = BTreeSet::new();
            for entry in machine.compat {
                if !seen.insert((entry.driver, entry.property)) {
                    problems.push(RegistryProblem::DuplicateCompatEntry {
                        machine: machine.name.to_string(),
                        driver: entry.driver.to_string(),
                        property: entry.property.to_string(),
                    });
                }
                if let Err(problem) = self.parse_value(entry.driver, entry.property, entry.value) {
                    problems.push(RegistryProblem::BadCompatEntry {
                        machine: machine.name.to_string(),
                        problem: Box::new(problem),
                    });
                }
            }
        }
    }
}

fn check_property(
    driver: &DriverDef,
    def: &PropDef,
    seen: &mut BTreeSet<&'static str>,
    problems: &mut Vec<RegistryProblem>,
) {
    let driver_name = driver.name.to_string();
    let property = def.name.to_string();
    if def.name.is_empty() || def.name.contains('=') {
        problems.push(RegistryProblem::BadPropertyName {
            driver: driver_name.clone(),
            property: property.clone(),
        });
    }
    if !seen.insert(def.name) {
        problems.push(RegistryProblem::DuplicateProperty {
            driver: driver_name.clone(),
            property: property.clone(),
        });
    }
    match def.kind {
        PropKind::U64 { min, max } | PropKind::Size { min, max } if min > max => {
            problems.push(RegistryProblem::EmptyRange {
                driver: driver_name.clone(),
                property: property.clone(),
                min,
                max,
            });
        }
        PropKind::Enum(words) => {
            let mut seen_words = BTreeSet::new();
            for word in words {
                if word.is_empty() || !seen_words.insert(*word) {
                    problems.push(RegistryProblem::BadEnumWord {
                        driver: driver_name.clone(),
                        property: property.clone(),
                        word: word.to_string(),
                    });
                }
            }
        }
        _ => {}
    }
    if let Err(problem) = def.kind.parse(def.default) {
        problems.push(bad_default(driver, def, problem));
    }
}

fn bad_default(driver: &DriverDef, def: &PropDef, problem: super::ValueProblem) -> RegistryProblem {
    RegistryProblem::BadDefault {
        driver: driver.name.to_string(),
        property: def.name.to_string(),
        value: def.default.to_string(),
        problem,
        kind: def.kind,
    }
}

fn set(
    values: &mut BTreeMap<&'static str, BTreeMap<&'static str, Setting>>,
    driver: &'static DriverDef,
    def: &'static PropDef,
    value: PropValue,
    origin: Origin,
) {
    values
        .entry(driver.name)
        .or_default()
        .insert(def.name, Setting { def, value, origin });
}
