//! The byte codec of device state; the format is described in the parent module.

use std::collections::{HashMap, HashSet};

use super::{
    qualified, DeviceState, FieldKind, FieldSchema, StateError, StateSchema, SubsectionState, Value,
};

/// Encodes `state` at `schema.version`, checking it against the schema.
///
/// Fields are written in schema order whatever their order in `state`, and subsections in
/// the order the schema declares them, so equal states always encode to equal bytes.
/// `state.version` is ignored: a release always writes its own version.
pub fn encode(schema: &StateSchema, state: &DeviceState) -> Result<Vec<u8>, StateError> {
    schema.validate()?;
    let device = schema.name;
    let fields = resolve(device, None, schema.fields, schema.version, &state.fields)?;

    let mut seen = HashSet::new();
    for sub in &state.subsections {
        if schema.subsection(&sub.name).is_none() {
            return Err(StateError::UnknownSubsection {
                device: device.to_string(),
                subsection: sub.name.clone(),
            });
        }
        if !seen.insert(sub.name.as_str()) {
            return Err(StateError::DuplicateSubsection {
                device: device.to_string(),
                subsection: sub.name.clone(),
            });
        }
    }
    let subsections = schema
        .subsections
        .iter()
        .filter_map(|s| state.subsection(s.name).map(|given| (s, given)))
        .map(|(s, given)| {
            resolve(device, Some(s.name), s.fields, s.version, &given.fields).map(|v| (s, v))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let payload_lens: Vec<usize> = subsections.iter().map(|(_, v)| encoded_len(v)).collect();
    let total = encoded_len(&fields)
        + 1
        + subsections
            .iter()
            .zip(&payload_lens)
            .map(|((s, _), len)| 1 + s.name.len() + 4 + 4 + len)
            .sum::<usize>();

    // `validate` bounds the subsection count, name lengths and payload lengths, so the
    // conversions below cannot fail; they say so instead of truncating silently.
    let beyond = |what: &str| StateError::Schema {
        device: device.to_string(),
        reason: format!("{what} does not fit its length field"),
    };
    let mut out = Vec::with_capacity(total);
    put_fields(&mut out, &fields);
    out.push(u8::try_from(subsections.len()).map_err(|_| beyond("the subsection count"))?);
    for ((sub, values), len) in subsections.iter().zip(payload_lens) {
        out.push(u8::try_from(sub.name.len()).map_err(|_| beyond("a subsection name"))?);
        out.extend_from_slice(sub.name.as_bytes());
        out.extend_from_slice(&sub.version.to_le_bytes());
        let len = u32::try_from(len).map_err(|_| beyond("a subsection payload"))?;
        out.extend_from_slice(&len.to_le_bytes());
        put_fields(&mut out, values);
    }
    debug_assert_eq!(out.len(), total);
    Ok(out)
}

/// Decodes a state that the peer encoded at `version`. Untrusted input.
///
/// The result holds every field of the local schema at its own version, in schema order:
/// those the stream carries with their values, the rest (added after `version`) with
/// [`Value::zero`]. Subsection fields newer than the subsection's sent version are filled
/// the same way. `DeviceState::version` is `version`, so the device can tell.
pub fn decode(schema: &StateSchema, version: u32, bytes: &[u8]) -> Result<DeviceState, StateError> {
    schema.validate()?;
    let device = schema.name;
    if version > schema.version {
        return Err(StateError::TooNew {
            device: device.to_string(),
            version,
            max: schema.version,
        });
    }
    if version < schema.min_version {
        return Err(StateError::TooOld {
            device: device.to_string(),
            version,
            min: schema.min_version,
        });
    }
    let malformed = |reason: String| StateError::Malformed {
        device: device.to_string(),
        reason,
    };

    let mut r = Reader::new(bytes);
    let fields = read_fields(&mut r, device, None, schema.fields, version)?;

    let count = r
        .u8()
        .ok_or_else(|| malformed(r.truncated("the subsection count", 1)))?;
    let mut subsections: Vec<SubsectionState> = Vec::new();
    for index in 0..count {
        let what = |part: &str| format!("{part} of subsection #{index}");
        let name_len = r
            .u8()
            .ok_or_else(|| malformed(r.truncated(&what("the name length"), 1)))?;
        let name_at = r.pos;
        let name = r
            .take(usize::from(name_len))
            .ok_or_else(|| malformed(r.truncated(&what("the name"), usize::from(name_len))))?;
        let name = std::str::from_utf8(name).map_err(|_| {
            malformed(format!(
                "the name of subsection #{index} at offset {name_at} is not UTF-8"
            ))
        })?;
        let sub_schema = schema
            .subsection(name)
            .ok_or_else(|| StateError::UnknownSubsection {
                device: device.to_string(),
                subsection: name.to_string(),
            })?;
        if subsections.iter().any(|s| s.name == name) {
            return Err(StateError::DuplicateSubsection {
                device: device.to_string(),
                subsection: name.to_string(),
            });
        }
        let sub_version = r
            .u32()
            .ok_or_else(|| malformed(r.truncated(&what("the version"), 4)))?;
        if sub_version > sub_schema.version {
            return Err(StateError::SubsectionTooNew {
                device: device.to_string(),
                subsection: name.to_string(),
                version: sub_version,
                max: sub_schema.version,
            });
        }
        let len = r
            .u32()
            .ok_or_else(|| malformed(r.truncated(&what("the payload length"), 4)))?;
        let payload_at = r.pos;
        let mut payload = usize::try_from(len)
            .ok()
            .and_then(|len| r.split(len))
            .ok_or_else(|| {
                malformed(format!(
                    "subsection {name:?} claims {len} payload bytes at offset {payload_at}, only {} remain",
                    r.remaining()
                ))
            })?;
        let fields = read_fields(
            &mut payload,
            device,
            Some(name),
            sub_schema.fields,
            sub_version,
        )?;
        if payload.remaining() > 0 {
            return Err(malformed(format!(
                "subsection {name:?}: {} bytes left after its fields at offset {}",
                payload.remaining(),
                payload.pos
            )));
        }
        subsections.push(SubsectionState {
            name: name.to_string(),
            fields,
        });
    }
    if r.remaining() > 0 {
        return Err(malformed(format!(
            "{} trailing bytes at offset {}",
            r.remaining(),
            r.pos
        )));
    }
    Ok(DeviceState {
        version,
        fields,
        subsections,
    })
}

/// Matches the values a device gave against the fields of `schema_fields` present at
/// `version`, returning them in schema order.
fn resolve<'s>(
    device: &str,
    sub: Option<&str>,
    schema_fields: &'static [FieldSchema],
    version: u32,
    given: &'s [(String, Value)],
) -> Result<Vec<(FieldKind, &'s Value)>, StateError> {
    let field_error = |name: &str, reason: String| StateError::Field {
        device: device.to_string(),
        field: qualified(sub, name),
        reason,
    };
    let mut by_name: HashMap<&str, &Value> = HashMap::with_capacity(given.len());
    for (name, value) in given {
        if !schema_fields
            .iter()
            .any(|f| f.name == name && f.since <= version)
        {
            return Err(field_error(
                name,
                format!("not a field of version {version}"),
            ));
        }
        if by_name.insert(name, value).is_some() {
            return Err(field_error(name, "given more than once".into()));
        }
    }
    let mut out = Vec::with_capacity(by_name.len());
    for field in schema_fields.iter().filter(|f| f.since <= version) {
        let value = *by_name.get(field.name).ok_or_else(|| {
            field_error(
                field.name,
                format!("missing (needed since version {})", field.since),
            )
        })?;
        check_value(field.kind, value).map_err(|reason| field_error(field.name, reason))?;
        out.push((field.kind, value));
    }
    Ok(out)
}

pub(super) fn check_value(kind: FieldKind, value: &Value) -> Result<(), String> {
    match (kind, value) {
        (FieldKind::U8, Value::U8(_))
        | (FieldKind::U16, Value::U16(_))
        | (FieldKind::U32, Value::U32(_))
        | (FieldKind::U64, Value::U64(_))
        | (FieldKind::Bool, Value::Bool(_)) => Ok(()),
        (FieldKind::Bytes { max_len }, Value::Bytes(b)) => {
            if b.len() as u64 > u64::from(max_len) {
                Err(format!(
                    "{} bytes, more than its maximum of {max_len}",
                    b.len()
                ))
            } else {
                Ok(())
            }
        }
        (FieldKind::Array { len }, Value::Bytes(b)) => {
            if b.len() as u64 != u64::from(len) {
                Err(format!("{} bytes, the array holds exactly {len}", b.len()))
            } else {
                Ok(())
            }
        }
        (kind, value) => Err(format!(
            "holds {}, the schema says {}",
            value.kind_name(),
            kind.name()
        )),
    }
}

fn encoded_len(values: &[(FieldKind, &Value)]) -> usize {
    values
        .iter()
        .map(|(kind, value)| match (kind, value) {
            (FieldKind::Bytes { .. }, Value::Bytes(b)) => 4 + b.len(),
            (_, Value::Bytes(b)) => b.len(),
            (_, Value::U8(_) | Value::Bool(_)) => 1,
            (_, Value::U16(_)) => 2,
            (_, Value::U32(_)) => 4,
            (_, Value::U64(_)) => 8,
        })
        .sum()
}

/// Writes values that `resolve` checked.
pub(super) fn put_fields(out: &mut Vec<u8>, values: &[(FieldKind, &Value)]) {
    for (kind, value) in values {
        match value {
            Value::U8(x) => out.push(*x),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::Bytes(b) => {
                if let FieldKind::Bytes { .. } = kind {
                    // `check_value` bounded the length by a u32 `max_len`.
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                }
                out.extend_from_slice(b);
            }
        }
    }
}

/// Reads the fields of `schema_fields` at `version`, and fills those the version lacks.
fn read_fields(
    r: &mut Reader<'_>,
    device: &str,
    sub: Option<&str>,
    schema_fields: &'static [FieldSchema],
    version: u32,
) -> Result<Vec<(String, Value)>, StateError> {
    let mut out = Vec::with_capacity(schema_fields.len());
    for field in schema_fields {
        let value = if field.since <= version {
            read_value(r, field.kind).map_err(|reason| StateError::Field {
                device: device.to_string(),
                field: qualified(sub, field.name),
                reason,
            })?
        } else {
            Value::zero(field.kind)
        };
        out.push((field.name.to_string(), value));
    }
    Ok(out)
}

pub(super) fn read_value(r: &mut Reader<'_>, kind: FieldKind) -> Result<Value, String> {
    let kind_name = kind.name();
    Ok(match kind {
        FieldKind::U8 => Value::U8(r.u8().ok_or_else(|| r.truncated(kind_name, 1))?),
        FieldKind::U16 => Value::U16(r.u16().ok_or_else(|| r.truncated(kind_name, 2))?),
        FieldKind::U32 => Value::U32(r.u32().ok_or_else(|| r.truncated(kind_name, 4))?),
        FieldKind::U64 => Value::U64(r.u64().ok_or_else(|| r.truncated(kind_name, 8))?),
        FieldKind::Bool => {
            let at = r.offset();
            match r.u8().ok_or_else(|| r.truncated(kind_name, 1))? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => {
                    return Err(format!(
                        "bool byte {other} at offset {at} is neither 0 nor 1"
                    ))
                }
            }
        }
        FieldKind::Bytes { max_len } => {
            let at = r.offset();
            let len = r
                .u32()
                .ok_or_else(|| r.truncated("the length of bytes", 4))?;
            if len > max_len {
                return Err(format!(
                    "length {len} at offset {at} is above its maximum of {max_len}"
                ));
            }
            // Checked against what remains before anything is allocated for it.
            let data = usize::try_from(len)
                .ok()
                .and_then(|len| r.take(len))
                .ok_or_else(|| r.truncated("bytes", len as usize))?;
            Value::Bytes(data.to_vec())
        }
        FieldKind::Array { len } => {
            let data = usize::try_from(len)
                .ok()
                .and_then(|len| r.take(len))
                .ok_or_else(|| r.truncated("an array", len as usize))?;
            Value::Bytes(data.to_vec())
        }
    })
}

/// A cursor over `bytes[..end]` that reports absolute offsets, so an error inside a
/// subsection's payload points at the same byte a hex dump of the whole state shows.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    end: usize,
    /// Where `bytes[0]` sits in the whole state, for a reader over a piece of it.
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self::at(bytes, 0)
    }

    /// A reader over a piece of a state that starts `base` bytes into it.
    pub(super) fn at(bytes: &'a [u8], base: usize) -> Self {
        Self {
            bytes,
            pos: 0,
            end: bytes.len(),
            base,
        }
    }

    /// The offset of the next byte in the whole state.
    fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn remaining(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.remaining() {
            return None;
        }
        let data = self.bytes.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(data)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// Splits off the next `n` bytes as a reader of their own, and skips them here.
    fn split(&mut self, n: usize) -> Option<Reader<'a>> {
        if n > self.remaining() {
            return None;
        }
        let sub = Reader {
            bytes: self.bytes,
            pos: self.pos,
            end: self.pos + n,
            base: self.base,
        };
        self.pos += n;
        Some(sub)
    }

    fn truncated(&self, what: &str, needed: usize) -> String {
        format!(
            "truncated at offset {}: {what} needs {needed} bytes, {} remain",
            self.offset(),
            self.remaining()
        )
    }
}
