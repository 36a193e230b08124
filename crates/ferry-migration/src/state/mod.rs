//! Versioned device state: schemas, values and their codec.
//!
//! (Module docs to be completed: format, versioning rules, subsections.)

use thiserror::Error;

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

#[derive(Debug, Error, PartialEq, Eq)]
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
}

impl DeviceState {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with(mut self, name: &str, value: Value) -> Self {
        self.fields.push((name.to_string(), value));
        self
    }
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

impl StateSchema {
    /// An upper bound of the encoded size of any valid state of this schema.
    pub fn max_encoded_len(&self) -> u64 {
        todo!()
    }
}

/// Encodes `state` at `schema.version`, checking it against the schema.
pub fn encode(schema: &StateSchema, state: &DeviceState) -> Result<Vec<u8>, StateError> {
    let _ = (schema, state);
    todo!()
}

/// Decodes a state that the peer encoded at `version`. Untrusted input.
pub fn decode(schema: &StateSchema, version: u32, bytes: &[u8]) -> Result<DeviceState, StateError> {
    let _ = (schema, version, bytes);
    todo!()
}
