//! What a schema promises about its encodings: which fields a version carries, how large
//! an encoding can get, and the consistency rules a schema must follow for both to hold.

use std::collections::HashSet;

use super::{FieldKind, FieldSchema, StateError, StateSchema, SubsectionSchema};

/// Subsection names and the subsection count are one byte on the wire.
const MAX_SUBSECTION_NAME: usize = u8::MAX as usize;
const MAX_SUBSECTIONS: usize = u8::MAX as usize;

impl FieldKind {
    /// A short name of the kind, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            FieldKind::U8 => "u8",
            FieldKind::U16 => "u16",
            FieldKind::U32 => "u32",
            FieldKind::U64 => "u64",
            FieldKind::Bool => "bool",
            FieldKind::Bytes { .. } => "bytes",
            FieldKind::Array { .. } => "array",
        }
    }

    /// The most bytes a field of this kind takes on the wire.
    pub fn max_encoded_len(self) -> u64 {
        match self {
            FieldKind::U8 | FieldKind::Bool => 1,
            FieldKind::U16 => 2,
            FieldKind::U32 => 4,
            FieldKind::U64 => 8,
            FieldKind::Bytes { max_len } => 4 + u64::from(max_len),
            FieldKind::Array { len } => u64::from(len),
        }
    }
}

/// The most bytes the fields of `fields` present at `version` take.
fn fields_max_len(fields: &[FieldSchema], version: u32) -> u64 {
    fields
        .iter()
        .filter(|f| f.since <= version)
        .fold(0u64, |sum, f| sum.saturating_add(f.kind.max_encoded_len()))
}

impl SubsectionSchema {
    /// The fields a subsection at `version` carries, in stream order.
    pub fn fields_at(&self, version: u32) -> impl Iterator<Item = &'static FieldSchema> {
        self.fields.iter().filter(move |f| f.since <= version)
    }

    /// The most bytes of this subsection's payload (its fields, without the header).
    pub fn max_payload_len(&self) -> u64 {
        fields_max_len(self.fields, self.version)
    }

    /// The most bytes this subsection takes in a stream, header included.
    pub fn max_encoded_len(&self) -> u64 {
        // u8 name length, name, u32 version, u32 payload length, payload.
        (self.name.len() as u64)
            .saturating_add(1 + 4 + 4)
            .saturating_add(self.max_payload_len())
    }
}

impl StateSchema {
    /// The fields a stream at `version` carries, in stream order.
    pub fn fields_at(&self, version: u32) -> impl Iterator<Item = &'static FieldSchema> {
        self.fields.iter().filter(move |f| f.since <= version)
    }

    /// The subsection called `name`.
    pub fn subsection(&self, name: &str) -> Option<&'static SubsectionSchema> {
        self.subsections.iter().find(|s| s.name == name)
    }

    /// An upper bound of the length of [`super::encode`]'s output for any state this schema
    /// accepts: every `Bytes` field at its `max_len` and every subsection present. The wire
    /// layer uses it to refuse a device-state section before allocating for it.
    pub fn max_encoded_len(&self) -> u64 {
        let subsections = self
            .subsections
            .iter()
            .fold(0u64, |sum, s| sum.saturating_add(s.max_encoded_len()));
        // The u8 subsection count.
        fields_max_len(self.fields, self.version)
            .saturating_add(1)
            .saturating_add(subsections)
    }

    /// Checks that the schema can describe a stream at all: `min_version <= version`, no field
    /// newer than its (sub)section's version, unique non-empty names, subsection names and
    /// count that fit their one-byte lengths, and subsection payloads that fit their u32
    /// length. [`super::encode`] and [`super::decode`] refuse to work with a schema that
    /// fails this, so a schema mistake surfaces in the first test that saves the device.
    pub fn validate(&self) -> Result<(), StateError> {
        let fail = |reason: String| StateError::Schema {
            device: self.name.to_string(),
            reason,
        };
        if self.name.is_empty() {
            return Err(fail("the device name is empty".into()));
        }
        if self.min_version > self.version {
            return Err(fail(format!(
                "min_version {} is above version {}",
                self.min_version, self.version
            )));
        }
        check_fields(self.fields, self.version, None).map_err(fail)?;
        if self.subsections.len() > MAX_SUBSECTIONS {
            return Err(fail(format!(
                "{} subsections, at most {MAX_SUBSECTIONS} fit the stream",
                self.subsections.len()
            )));
        }
        let mut names = HashSet::new();
        for sub in self.subsections {
            if sub.name.is_empty() || sub.name.len() > MAX_SUBSECTION_NAME {
                return Err(fail(format!(
                    "subsection name {:?} is not 1 to {MAX_SUBSECTION_NAME} bytes long",
                    sub.name
                )));
            }
            if !names.insert(sub.name) {
                return Err(fail(format!("subsection {:?} is declared twice", sub.name)));
            }
            check_fields(sub.fields, sub.version, Some(sub.name)).map_err(fail)?;
            if sub.max_payload_len() > u64::from(u32::MAX) {
                return Err(fail(format!(
                    "subsection {:?} can reach {} bytes, more than its u32 length holds",
                    sub.name,
                    sub.max_payload_len()
                )));
            }
        }
        Ok(())
    }
}

fn check_fields(fields: &[FieldSchema], version: u32, sub: Option<&str>) -> Result<(), String> {
    let owner = match sub {
        Some(name) => format!("subsection {name:?}"),
        None => "the state".to_string(),
    };
    let mut names = HashSet::new();
    for f in fields {
        if f.name.is_empty() {
            return Err(format!("{owner} has a field with an empty name"));
        }
        if !names.insert(f.name) {
            return Err(format!("{owner} declares field {} twice", f.name));
        }
        if f.since > version {
            return Err(format!(
                "field {} of {owner} is since version {}, after its version {version}",
                f.name, f.since
            ));
        }
    }
    Ok(())
}
