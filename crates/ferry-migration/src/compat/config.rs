//! Reading a VM's effective properties, and comparing the wire-relevant ones with a peer's.

use std::collections::{BTreeMap, BTreeSet};
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

    /// `("driver.property", canonical value)` of every property marked `wire`, sorted: what a
    /// source states in its hello and a destination compares with [`wire_mismatches`].
    pub fn wire_properties(&self) -> Vec<(String, String)> {
        let mut wire: Vec<(String, String)> = self
            .values
            .iter()
            .flat_map(|(driver, settings)| {
                settings
                    .iter()
                    .filter(|(_, s)| s.def.wire)
                    .map(move |(property, s)| (format!("{driver}.{property}"), s.value.to_string()))
            })
            .collect();
        wire.sort();
        wire
    }

    /// `"driver.property"` of every wire property whose value a machine type's compat
    /// table set: the value that reproduces an older release, which a peer of that
    /// release has without knowing the property. A source states them in its hello so a
    /// destination can tell them from values set by default or `-global`.
    pub fn compat_pinned_wire_properties(&self) -> Vec<String> {
        let mut pinned: Vec<String> = self
            .values
            .iter()
            .flat_map(|(driver, settings)| {
                settings
                    .iter()
                    .filter(|(_, s)| s.def.wire && matches!(s.origin, Origin::Compat { .. }))
                    .map(move |(property, _)| format!("{driver}.{property}"))
            })
            .collect();
        pinned.sort();
        pinned
    }

    /// Every difference between this VM's wire properties and a peer's list.
    pub fn wire_mismatches(&self, peer: &[(String, String)]) -> Vec<WireMismatch> {
        wire_mismatches(&self.wire_properties(), peer)
    }

    /// Refuses a peer whose wire properties differ, listing every difference.
    pub fn check_wire(&self, peer: &[(String, String)]) -> Result<(), CompatError> {
        let mismatches = self.wire_mismatches(peer);
        if mismatches.is_empty() {
            Ok(())
        } else {
            Err(CompatError::WireMismatch { mismatches })
        }
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

/// A wire property on which the two sides of a migration disagree. `None` means that side does
/// not have the property at all (an older or newer release, or a different device set).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct WireMismatch {
    /// `driver.property`.
    pub property: String,
    pub local: Option<String>,
    pub peer: Option<String>,
}

impl fmt::Display for WireMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |value: &Option<String>| match value {
            Some(value) => value.clone(),
            None => "(absent)".to_string(),
        };
        write!(
            f,
            "{}: local {}, peer {}",
            self.property,
            side(&self.local),
            side(&self.peer)
        )
    }
}

/// Every difference between two lists of `(driver.property, value)`, sorted by property.
///
/// A property that one side lists and the other lacks is a mismatch. Neither list needs to be
/// sorted. A list should name each property once (a wire decoder ought to refuse duplicates);
/// should one not, every value it gives is compared, so a contradiction inside one list is
/// reported rather than hidden.
pub fn wire_mismatches(local: &[(String, String)], peer: &[(String, String)]) -> Vec<WireMismatch> {
    fn by_property(list: &[(String, String)]) -> BTreeMap<&str, BTreeSet<&str>> {
        let mut map: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (property, value) in list {
            map.entry(property).or_default().insert(value);
        }
        map
    }
    let local = by_property(local);
    let peer = by_property(peer);
    let properties: BTreeSet<&str> = local.keys().chain(peer.keys()).copied().collect();

    let mut mismatches = Vec::new();
    for property in properties {
        let sides = |map: &BTreeMap<&str, BTreeSet<&str>>| -> Vec<Option<String>> {
            match map.get(property) {
                Some(values) => values.iter().map(|v| Some(v.to_string())).collect(),
                None => vec![None],
            }
        };
        for local_value in sides(&local) {
            for peer_value in sides(&peer) {
                if local_value != peer_value {
                    mismatches.push(WireMismatch {
                        property: property.to_string(),
                        local: local_value.clone(),
                        peer: peer_value,
                    });
                }
            }
        }
    }
    mismatches
}
