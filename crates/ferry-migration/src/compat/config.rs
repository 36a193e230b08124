//! Reading a VM's effective properties.

use std::fmt;

use super::{CompatError, Config, Origin, PropDef, PropKind, PropValue};

/// One effective property value and how it came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Setting {
    pub(super) def: &'static PropDef,
    pub(super) value: PropValue,
    pub(super) origin: Origin,
}

impl Config {
    /// The resolved machine type name (never the alias).
    pub fn machine(&self) -> &str {
        &self.machine
    }

    pub fn get(&self, driver: &str, property: &str) -> Option<&PropValue> {
        self.values
            .get(driver)
            .and_then(|settings| settings.get(property))
            .map(|setting| &setting.value)
    }

    /// Like [`Config::get`], with an error naming what is unknown.
    pub fn value(&self, driver: &str, property: &str) -> Result<&PropValue, CompatError> {
        self.setting(driver, property).map(|setting| &setting.value)
    }

    /// The value of a [`PropKind::Bool`] property.
    pub fn bool(&self, driver: &str, property: &str) -> Result<bool, CompatError> {
        match self.setting(driver, property)? {
            Setting {
                value: PropValue::Bool(b),
                ..
            } => Ok(*b),
            setting => Err(wrong_kind(driver, property, "a bool", setting)),
        }
    }

    /// The value of a [`PropKind::U64`] property, or of a [`PropKind::Size`] one in bytes.
    pub fn u64(&self, driver: &str, property: &str) -> Result<u64, CompatError> {
        match self.setting(driver, property)? {
            Setting {
                value: PropValue::U64(n),
                ..
            } => Ok(*n),
            setting => Err(wrong_kind(driver, property, "an integer", setting)),
        }
    }

    /// The word of a [`PropKind::Enum`] property.
    pub fn enum_str(&self, driver: &str, property: &str) -> Result<&str, CompatError> {
        match self.setting(driver, property)? {
            Setting {
                value: PropValue::Enum(word),
                ..
            } => Ok(word),
            setting => Err(wrong_kind(driver, property, "an enum word", setting)),
        }
    }

    /// Where the value of `driver.property` came from.
    pub fn origin(&self, driver: &str, property: &str) -> Result<&Origin, CompatError> {
        self.setting(driver, property)
            .map(|setting| &setting.origin)
    }

    /// The definition the value of `driver.property` was parsed against.
    pub fn definition(
        &self,
        driver: &str,
        property: &str,
    ) -> Result<&'static PropDef, CompatError> {
        self.setting(driver, property).map(|setting| setting.def)
    }

    /// Every property as `(driver, property, value, origin)`, ordered by driver name, then
    /// property name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &PropValue, &Origin)> + '_ {
        self.values.iter().flat_map(|(driver, settings)| {
            settings
                .iter()
                .map(move |(property, s)| (*driver, *property, &s.value, &s.origin))
        })
    }

    fn setting(&self, driver: &str, property: &str) -> Result<&Setting, CompatError> {
        let settings = self
            .values
            .get(driver)
            .ok_or_else(|| CompatError::UnknownDriver {
                driver: driver.to_string(),
                known: self.values.keys().map(|d| d.to_string()).collect(),
            })?;
        settings
            .get(property)
            .ok_or_else(|| CompatError::UnknownProperty {
                driver: driver.to_string(),
                property: property.to_string(),
                known: settings.keys().map(|p| p.to_string()).collect(),
            })
    }
}

fn wrong_kind(driver: &str, property: &str, wanted: &'static str, s: &Setting) -> CompatError {
    let kind: PropKind = s.def.kind;
    CompatError::WrongKind {
        driver: driver.to_string(),
        property: property.to_string(),
        wanted,
        kind,
    }
}

/// One line per property, `driver.property=value (origin)`, in [`Config::iter`] order.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "machine type {}", self.machine)?;
        for (driver, property, value, origin) in self.iter() {
            writeln!(f, "{driver}.{property}={value} ({origin})")?;
        }
        Ok(())
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::Compat { machine } => write!(f, "compat table of {machine}"),
            Origin::Global => f.write_str("-global"),
        }
    }
}
