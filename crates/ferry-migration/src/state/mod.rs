//! Versioned device state: schemas, values and their codec.
//!
//! Every device (and every vCPU) describes its migratable state with a [`StateSchema`]: a
//! name, the `version` this release writes, the `min_version` it can still load, fields that
//! each record the version that added them (`since`), and subsections that carry state only
//! when it is needed. The source device saves a [`DeviceState`] (named [`Value`]s);
//! [`encode`] checks it against the schema and writes it at `schema.version`. The destination
//! passes the bytes, which it does not trust, and the version they were written at to
//! [`decode`], which checks both against its own schema and hands the device a
//! [`DeviceState`] holding every field the destination knows.
//!
//! The version is not part of these bytes: whatever frames a device's state carries it
//! beside them. Schemas derive `Serialize`, so a release can dump all of them and a checker
//! can compare two releases' dumps before anyone migrates.
//!
//! # Byte format
//!
//! Integers are little-endian, nothing is padded. A state at version `v` is:
//!
//! | part | bytes |
//! |---|---|
//! | every field with `since <= v`, in schema order | as below |
//! | subsection count | u8 |
//! | each subsection | u8 name length, name (UTF-8), u32 subsection version, u32 payload length, payload |
//!
//! A subsection's payload is its fields with `since <=` the subsection version, encoded the
//! same way, and nothing more. Nothing follows the last subsection. Fields:
//!
//! | kind | bytes |
//! |---|---|
//! | `U8` | 1 |
//! | `U16`, `U32`, `U64` | 2, 4, 8 |
//! | `Bool` | 1: `0` or `1`; any other byte is refused |
//! | `Bytes { max_len }` | u32 length (at most `max_len`), then that many bytes |
//! | `Array { len }` | exactly `len` bytes, no length ([`Value::Bytes`] in memory) |
//!
//! Given the schema and the version the format delimits itself, so a strict prefix of a valid
//! encoding never decodes. No encoding is longer than [`StateSchema::max_encoded_len`], which
//! lets the layer that frames it refuse an oversized state before allocating for it.
//! [`encode`] writes fields and subsections in schema order whatever order the device gave
//! them in, so equal states give equal bytes.
//!
//! # Decoding
//!
//! * A version above `schema.version` is [`StateError::TooNew`]; below `schema.min_version`,
//!   [`StateError::TooOld`].
//! * Fields the version lacks (added later) are filled with [`Value::zero`] of their kind: 0,
//!   `false`, empty bytes, an all-zero array. [`DeviceState::version`] is the version that was
//!   sent, so a device's load can tell a zero that was sent from one that was filled in.
//! * A subsection the destination does not know is [`StateError::UnknownSubsection`]: state it
//!   cannot interpret is never dropped silently. One newer than the destination's version of
//!   it is [`StateError::SubsectionTooNew`]; an older one loads with its missing fields zero.
//!   A subsection sent twice is [`StateError::DuplicateSubsection`]. Subsections may come in
//!   any order, and any subsection may be missing: that is what makes them optional.
//! * Every length is checked against the bytes that remain before anything is allocated, and
//!   bytes left over, in a subsection payload or at the end, are refused. Errors name the
//!   device, the field (`subsection/field` inside a subsection) or subsection, and the byte
//!   offset from the start of the state.
//! * [`encode`] and [`decode`] both refuse a schema that fails [`StateSchema::validate`].
//!
//! # Versioning rules
//!
//! A release loads any version in `min_version..=version`, so migrating from an older release
//! keeps working as long as `min_version` stays low. Migrating *to* an older release does not
//! survive a version bump: the older release refuses every stream above its own version,
//! whatever the machine type. A subsection is refused only when it is actually sent.
//!
//! 1. Never change a field that a released version carries: not its kind, not its `since`, and
//!    not its place among the fields of its version (both sides derive the stream order from
//!    their schemas). Names are not on the wire, but device code and schema checkers use them.
//! 2. Bump `version`, giving the new fields `since = version`, when the new state is needed in
//!    every migration and migrating to older releases may stop working. Choose the field so
//!    its zero value means "what the older release did", because that is what loading an older
//!    stream gives; if zero is also a meaningful value, look at [`DeviceState::version`].
//! 3. Use a subsection when the new state must reach older releases only sometimes: when a
//!    feature is on (a property that older machine types' compat tables turn off), or in a
//!    runtime condition older releases never produced. Put the condition in `needed_when`
//!    and add the subsection on save exactly when it holds. A VM on an older machine type
//!    then migrates to the older release, and one that uses the feature fails loudly with
//!    [`StateError::UnknownSubsection`] instead of losing state.
//! 4. Raise `min_version` only when removing the code that loads older streams (the fallbacks
//!    for zero-filled fields); it ends migration from every release that writes below it.
//! 5. A field cannot leave the stream without a version bump: keep it and write a fixed value.
//! 6. A subsection's `version` follows the same rules for its own fields. A loaded
//!    [`SubsectionState`] does not say which version it came at, so a field added to a
//!    subsection needs a zero value that means the old behaviour (or goes in a new subsection).
//!
//! # Example
//!
//! An RTC whose second release started saving a pending alarm instead of recomputing it on
//! load, with lost-tick bookkeeping that only one tick policy produces:
//!
//! ```
//! use ferry_migration::state::*;
//!
//! static RTC: StateSchema = StateSchema {
//!     name: "rtc",
//!     version: 2,
//!     min_version: 1,
//!     fields: &[
//!         FieldSchema { name: "cmos", kind: FieldKind::Array { len: 128 }, since: 1 },
//!         FieldSchema { name: "base_ns", kind: FieldKind::U64, since: 1 },
//!         FieldSchema { name: "alarm_pending", kind: FieldKind::Bool, since: 2 },
//!     ],
//!     subsections: &[SubsectionSchema {
//!         name: "rtc/irq-reinject",
//!         version: 1,
//!         fields: &[FieldSchema { name: "coalesced", kind: FieldKind::U32, since: 1 }],
//!         needed_when: "property rtc.lost-tick-policy=slew and ticks are coalesced",
//!     }],
//! };
//!
//! let saved = DeviceState::new()
//!     .with("cmos", Value::Bytes(vec![0; 128]))
//!     .with("base_ns", Value::U64(1_000))
//!     .with("alarm_pending", Value::Bool(true))
//!     .with_subsection(SubsectionState::new("rtc/irq-reinject").with("coalesced", Value::U32(3)));
//! let bytes = encode(&RTC, &saved)?;
//! // 128 + 8 + 1, count, then 1 + 16 + 4 + 4 header bytes and a 4-byte payload.
//! assert_eq!(bytes.len(), 137 + 1 + 25 + 4);
//! assert!(bytes.len() as u64 <= RTC.max_encoded_len());
//!
//! let loaded = decode(&RTC, RTC.version, &bytes)?;
//! assert_eq!(loaded.get_u64("base_ns")?, 1_000);
//! let coalesced = match loaded.subsection("rtc/irq-reinject") {
//!     Some(sub) => sub.get_u32("coalesced")?,
//!     None => 0,
//! };
//! assert_eq!(coalesced, 3);
//!
//! // The previous release writes version 1: no alarm_pending, no subsection.
//! let mut v1 = vec![0; 128];
//! v1.extend_from_slice(&1_000u64.to_le_bytes());
//! v1.push(0);
//! let old = decode(&RTC, 1, &v1)?;
//! assert_eq!(old.version, 1); // so the device recomputes the alarm as version 1 did
//! assert!(!old.get_bool("alarm_pending")?);
//!
//! // The release after this one, at version 3, is refused by name.
//! assert_eq!(
//!     decode(&RTC, 3, &bytes).unwrap_err().to_string(),
//!     "device rtc: state version 3 is newer than this release can load (at most 2)"
//! );
//! # Ok::<(), StateError>(())
//! ```

use thiserror::Error;

mod codec;
mod schema;
pub mod stream;
#[cfg(test)]
mod tests;

pub use codec::{decode, encode};
pub use stream::{load_from_slice, save_to_vec, StateReader, StateSink, StateWriter};

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
    /// The stream a [`StateWriter`] or [`StateReader`] was moving the state through
    /// failed; the writer or reader holds the I/O error.
    #[error("device {device}: the migration stream failed while the state was moving")]
    Interrupted { device: String },
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
