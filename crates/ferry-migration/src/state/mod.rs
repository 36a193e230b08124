//! Versioned device state: schemas, values and their codec.
//!
//! (Module docs to be completed: format, versioning rules, subsections.)

use thiserror::Error;

mod codec;
mod schema;
#[cfg(test)]
mod tests;

pub use codec::{decode, encode};

/// The type of one field of a device state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FieldKind {
    U8,
    U16,
    U32,
    U64,
    Bool,
    /// Variable-length bytes, at most `max_len` of them.
    Bytes {
        max_len: u32,
    },
    /// Exactly `len` bytes.
    Array {
        len: u32,
    },
}

/// One field of a device state schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FieldSchema {
    pub name: &'static str,
    pub kind: FieldKind,
    /// The state version that added this field; absent from older versions' streams.
    pub since: u32,
}

/// A subsection: extra state sent only when its condition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SubsectionSchema {
    pub name: &'static str,
    pub version: u32,
    pub fields: &'static [FieldSchema],
    /// What decides that the subsection is sent (for example `property serial.x-foo=on`).
    pub needed_when: &'static str,
}

/// The schema of one device's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StateSchema {
    pub name: &'static str,
    pub version: u32,
    pub min_version: u32,
    pub fields: &'static [FieldSchema],
    pub subsections: &'static [SubsectionSchema],
}

/// A field value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    Bool(bool),
    Bytes(Vec<u8>),
}

/// A subsection's values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubsectionState {
    pub name: String,
    pub fields: Vec<(String, Value)>,
}

/// One device's state, as saved by the device and loaded by its peer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceState {
    /// The version the state was encoded at (set by `decode`; `encode` uses the schema's).
    pub version: u32,
    pub fields: Vec<(String, Value)>,
    pub subsections: Vec<SubsectionState>,
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("device {device}: state version {version} is newer than this release can load (at most {max})")]
    TooNew {
        device: String,
        version: u32,
        max: u32,
    },
    #[error("device {device}: state version {version} is older than this release can load (at least {min})")]
    TooOld {
        device: String,
        version: u32,
        min: u32,
    },
    #[error("device {device}: unknown subsection {subsection:?}")]
    UnknownSubsection { device: String, subsection: String },
    #[error("device {device}: malformed state: {reason}")]
    Malformed { device: String, reason: String },
    #[error("device {device}: field {field}: {reason}")]
    Field {
        device: String,
        field: String,
        reason: String,
    },
    #[error("device {device}: subsection {subsection:?} version {version} is newer than this release can load (at most {max})")]
    SubsectionTooNew {
        device: String,
        subsection: String,
        version: u32,
        max: u32,
    },
    #[error("device {device}: subsection {subsection:?} appears more than once")]
    DuplicateSubsection { device: String, subsection: String },
    /// The local schema itself is inconsistent: a bug in the release, not in the stream.
    #[error("device {device}: invalid schema: {reason}")]
    Schema { device: String, reason: String },
    /// A typed getter found no field of that name. The state does not know its device,
    /// so the caller adds that context.
    #[error("no field {field} in the state")]
    NoField { field: String },
    /// A typed getter found the field holding another kind of value.
    #[error("field {field} holds {found}, not {expected}")]
    WrongKind {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
}

impl DeviceState {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with(mut self, name: &str, value: Value) -> Self {
        self.fields.push((name.to_string(), value));
        self
    }
    /// Adds a subsection: call it only when the subsection's `needed_when` holds.
    pub fn with_subsection(mut self, subsection: SubsectionState) -> Self {
        self.subsections.push(subsection);
        self
    }
    pub fn get(&self, name: &str) -> Option<&Value> {
        lookup(&self.fields, name)
    }
    /// The subsection `name`, if the peer sent it (or the device added it).
    pub fn subsection(&self, name: &str) -> Option<&SubsectionState> {
        self.subsections.iter().find(|s| s.name == name)
    }
    pub fn get_u8(&self, name: &str) -> Result<u8, StateError> {
        get_u8(&self.fields, None, name)
    }
    pub fn get_u16(&self, name: &str) -> Result<u16, StateError> {
        get_u16(&self.fields, None, name)
    }
    pub fn get_u32(&self, name: &str) -> Result<u32, StateError> {
        get_u32(&self.fields, None, name)
    }
    pub fn get_u64(&self, name: &str) -> Result<u64, StateError> {
        get_u64(&self.fields, None, name)
    }
    pub fn get_bool(&self, name: &str) -> Result<bool, StateError> {
        get_bool(&self.fields, None, name)
    }
    /// The bytes of a `Bytes` or `Array` field.
    pub fn get_bytes(&self, name: &str) -> Result<&[u8], StateError> {
        get_bytes(&self.fields, None, name)
    }
}

impl SubsectionState {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            fields: Vec::new(),
        }
    }
    pub fn with(mut self, name: &str, value: Value) -> Self {
        self.fields.push((name.to_string(), value));
        self
    }
    pub fn get(&self, name: &str) -> Option<&Value> {
        lookup(&self.fields, name)
    }
    // The getters name a missing field `subsection/field` so the error says where it looked.
    pub fn get_u8(&self, name: &str) -> Result<u8, StateError> {
        get_u8(&self.fields, Some(&self.name), name)
    }
    pub fn get_u16(&self, name: &str) -> Result<u16, StateError> {
        get_u16(&self.fields, Some(&self.name), name)
    }
    pub fn get_u32(&self, name: &str) -> Result<u32, StateError> {
        get_u32(&self.fields, Some(&self.name), name)
    }
    pub fn get_u64(&self, name: &str) -> Result<u64, StateError> {
        get_u64(&self.fields, Some(&self.name), name)
    }
    pub fn get_bool(&self, name: &str) -> Result<bool, StateError> {
        get_bool(&self.fields, Some(&self.name), name)
    }
    /// The bytes of a `Bytes` or `Array` field.
    pub fn get_bytes(&self, name: &str) -> Result<&[u8], StateError> {
        get_bytes(&self.fields, Some(&self.name), name)
    }
}

impl Value {
    /// The value a field of `kind` takes when the stream's version predates the field.
    pub fn zero(kind: FieldKind) -> Self {
        match kind {
            FieldKind::U8 => Value::U8(0),
            FieldKind::U16 => Value::U16(0),
            FieldKind::U32 => Value::U32(0),
            FieldKind::U64 => Value::U64(0),
            FieldKind::Bool => Value::Bool(false),
            FieldKind::Bytes { .. } => Value::Bytes(Vec::new()),
            FieldKind::Array { len } => Value::Bytes(vec![0; len as usize]),
        }
    }

    /// A short name of the value's kind, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::U16(_) => "u16",
            Value::U32(_) => "u32",
            Value::U64(_) => "u64",
            Value::Bool(_) => "bool",
            Value::Bytes(_) => "bytes",
        }
    }
}

fn lookup<'a>(fields: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

fn qualified(subsection: Option<&str>, field: &str) -> String {
    match subsection {
        Some(sub) => format!("{sub}/{field}"),
        None => field.to_string(),
    }
}

fn typed<'a, T>(
    fields: &'a [(String, Value)],
    subsection: Option<&str>,
    name: &str,
    expected: &'static str,
    pick: impl FnOnce(&'a Value) -> Option<T>,
) -> Result<T, StateError> {
    let value = lookup(fields, name).ok_or_else(|| StateError::NoField {
        field: qualified(subsection, name),
    })?;
    pick(value).ok_or_else(|| StateError::WrongKind {
        field: qualified(subsection, name),
        expected,
        found: value.kind_name(),
    })
}

fn get_u8(fields: &[(String, Value)], sub: Option<&str>, name: &str) -> Result<u8, StateError> {
    typed(fields, sub, name, "u8", |v| match v {
        Value::U8(x) => Some(*x),
        _ => None,
    })
}

fn get_u16(fields: &[(String, Value)], sub: Option<&str>, name: &str) -> Result<u16, StateError> {
    typed(fields, sub, name, "u16", |v| match v {
        Value::U16(x) => Some(*x),
        _ => None,
    })
}

fn get_u32(fields: &[(String, Value)], sub: Option<&str>, name: &str) -> Result<u32, StateError> {
    typed(fields, sub, name, "u32", |v| match v {
        Value::U32(x) => Some(*x),
        _ => None,
    })
}

fn get_u64(fields: &[(String, Value)], sub: Option<&str>, name: &str) -> Result<u64, StateError> {
    typed(fields, sub, name, "u64", |v| match v {
        Value::U64(x) => Some(*x),
        _ => None,
    })
}

fn get_bool(fields: &[(String, Value)], sub: Option<&str>, name: &str) -> Result<bool, StateError> {
    typed(fields, sub, name, "bool", |v| match v {
        Value::Bool(x) => Some(*x),
        _ => None,
    })
}

fn get_bytes<'a>(
    fields: &'a [(String, Value)],
    sub: Option<&str>,
    name: &str,
) -> Result<&'a [u8], StateError> {
    typed(fields, sub, name, "bytes", |v| match v {
        Value::Bytes(x) => Some(x.as_slice()),
        _ => None,
    })
}
