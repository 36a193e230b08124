//! A device's state in pieces: a writer and a reader for states too large to hold twice.
//!
//! A migration moves each device's state as the bytes of the format in the parent module.
//! A device with a few hundred bytes of state builds a whole [`DeviceState`] and hands it
//! over ([`StateWriter::write_state`], [`StateReader::read_state`]). A device with memory
//! of its own (an accelerator's hundreds of MiB) instead writes its fields one by one, in
//! schema order, and its large `Bytes` fields in chunks straight from its memory; its
//! peer reads them back the same way into memory of its own. Neither side then holds a
//! copy of the state beside the device's, and the bytes are exactly those [`encode`] and
//! [`decode`] give for the same values, so a streamed state and a whole one are the same
//! state on the wire (the tests hold both paths to that).
//!
//! The two paths share the field codec (`check_value`, `put_fields`, `read_value`); what
//! this module adds is the order of fields, the zero-fill of fields a version lacks, and
//! lengths checked before a byte of a field is read.
//!
//! Rules a streamed state follows:
//!
//! * The writer is told, before the first byte, the length of every `Bytes` field
//!   ([`StateWriter::begin`]), so the whole length is known up front (a frame on the
//!   wire carries its length before its payload). A field written with another length is
//!   refused.
//! * Fields come in schema order; asking for another one is refused by name.
//! * A streamed state has no subsections: the writer writes a count of 0 and the reader
//!   refuses anything else. A schema with subsections streams only whole.
//! * The reader never reads past the length it was given, and refuses a state it did not
//!   read to the end.
//!
//! [`encode`]: super::encode
//! [`decode`]: super::decode

use std::io;

use super::codec::{check_value, put_fields, read_value, Reader};
use super::{DeviceState, FieldKind, FieldSchema, StateError, StateSchema, Value};

/// Where a [`StateWriter`] puts the bytes.
pub trait StateSink {
    /// Called once, before the first byte, with the exact length of the state.
    fn begin(&mut self, len: u64) -> io::Result<()>;

    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
}

/// Collects the state in memory.
impl StateSink for Vec<u8> {
    fn begin(&mut self, len: u64) -> io::Result<()> {
        self.reserve(usize::try_from(len).unwrap_or(0));
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

#[derive(Debug)]
enum Phase {
    /// Nothing written yet.
    Fresh,
    /// Streaming: the next field to write or read, and the bytes left of an open
    /// `Bytes` field.
    Fields {
        next: usize,
        open: Option<u64>,
    },
    Done,
}

/// The fields a state at `version` carries, in stream order.
fn stream_fields(schema: &StateSchema, version: u32) -> Vec<&'static FieldSchema> {
    schema.fields_at(version).collect()
}

fn no_subsections(schema: &StateSchema) -> Result<(), StateError> {
    if schema.subsections.is_empty() {
        Ok(())
    } else {
        Err(StateError::Schema {
            device: schema.name.to_string(),
            reason: "a state with subsections cannot stream; save it whole".into(),
        })
    }
}

/// Writes one device's state into a [`StateSink`]: whole, or field by field.
pub struct StateWriter<'a> {
    schema: &'static StateSchema,
    sink: &'a mut dyn StateSink,
    fields: Vec<&'static FieldSchema>,
    /// Declared lengths of the `Bytes` fields, by index into `fields`.
    lens: Vec<Option<u64>>,
    phase: Phase,
    len: u64,
    written: u64,
    failed: Option<io::Error>,
}

impl std::fmt::Debug for StateWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateWriter")
            .field("device", &self.schema.name)
            .field("phase", &self.phase)
            .field("len", &self.len)
            .field("written", &self.written)
            .finish()
    }
}

impl<'a> StateWriter<'a> {
    /// A writer of `schema`'s state at `schema.version`, the version this release writes.
    pub fn new(schema: &'static StateSchema, sink: &'a mut dyn StateSink) -> Self {
        Self {
            schema,
            sink,
            fields: stream_fields(schema, schema.version),
            lens: Vec::new(),
            phase: Phase::Fresh,
            len: 0,
            written: 0,
            failed: None,
        }
    }

    pub fn schema(&self) -> &'static StateSchema {
        self.schema
    }

    fn err(&self, reason: impl Into<String>) -> StateError {
        StateError::Malformed {
            device: self.schema.name.to_string(),
            reason: reason.into(),
        }
    }

    fn field_err(&self, field: &str, reason: impl Into<String>) -> StateError {
        StateError::Field {
            device: self.schema.name.to_string(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        if let Err(e) = self.sink.write(bytes) {
            self.failed = Some(e);
            return Err(StateError::Interrupted {
                device: self.schema.name.to_string(),
            });
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn open_sink(&mut self, len: u64) -> Result<(), StateError> {
        if let Err(e) = self.sink.begin(len) {
            self.failed = Some(e);
            return Err(StateError::Interrupted {
                device: self.schema.name.to_string(),
            });
        }
        self.len = len;
        Ok(())
    }

    /// Writes a whole state, checked and encoded as [`super::encode`] does.
    pub fn write_state(&mut self, state: &DeviceState) -> Result<(), StateError> {
        if !matches!(self.phase, Phase::Fresh) {
            return Err(self.err("a whole state written after other bytes of it"));
        }
        let bytes = super::encode(self.schema, state)?;
        self.open_sink(bytes.len() as u64)?;
        self.put(&bytes)?;
        self.phase = Phase::Done;
        Ok(())
    }

    /// Starts a streamed state: `lens` gives the length of every `Bytes` field, by name.
    pub fn begin(&mut self, lens: &[(&str, u64)]) -> Result<(), StateError> {
        if !matches!(self.phase, Phase::Fresh) {
            return Err(self.err("a streamed state begun twice"));
        }
        self.schema.validate()?;
        no_subsections(self.schema)?;
        for (name, _) in lens {
            if !self
                .fields
                .iter()
                .any(|f| f.name == *name && matches!(f.kind, FieldKind::Bytes { .. }))
            {
                return Err(self.field_err(name, "given a length but is not a bytes field"));
            }
        }
        let mut total = 1u64; // the subsection count
        let mut declared = Vec::with_capacity(self.fields.len());
        for f in &self.fields {
            let len = match f.kind {
                FieldKind::Bytes { max_len } => {
                    let mut given = lens.iter().filter(|(n, _)| *n == f.name);
                    let Some(&(_, len)) = given.next() else {
                        return Err(self.field_err(f.name, "no length given for it"));
                    };
                    if given.next().is_some() {
                        return Err(self.field_err(f.name, "length given more than once"));
                    }
                    if len > u64::from(max_len) {
                        return Err(self.field_err(
                            f.name,
                            format!("{len} bytes, more than its maximum of {max_len}"),
                        ));
                    }
                    declared.push(Some(len));
                    4 + len
                }
                kind => {
                    declared.push(None);
                    kind.max_encoded_len()
                }
            };
            total += len;
        }
        self.lens = declared;
        self.open_sink(total)?;
        self.phase = Phase::Fields {
            next: 0,
            open: None,
        };
        Ok(())
    }

    /// The next field's schema, which must be `name`.
    fn next_field(&self, name: &str) -> Result<(usize, &'static FieldSchema), StateError> {
        match self.phase {
            Phase::Fields { next, open: None } => match self.fields.get(next) {
                Some(f) if f.name == name => Ok((next, f)),
                Some(f) => Err(self.field_err(
                    name,
                    format!("written out of order: the next field is {}", f.name),
                )),
                None => Err(self.field_err(name, "written after the last field")),
            },
            Phase::Fields {
                open: Some(left), ..
            } => Err(self.field_err(
                name,
                format!("written while {left} bytes of the open bytes field are missing"),
            )),
            Phase::Fresh => Err(self.field_err(name, "written before begin()")),
            Phase::Done => Err(self.field_err(name, "written after the state was finished")),
        }
    }

    /// Writes the next field whole.
    pub fn field(&mut self, name: &str, value: &Value) -> Result<(), StateError> {
        let (i, f) = self.next_field(name)?;
        check_value(f.kind, value).map_err(|r| self.field_err(name, r))?;
        if let (Some(len), Value::Bytes(b)) = (self.lens[i], value) {
            if b.len() as u64 != len {
                return Err(self.field_err(name, format!("{} bytes, {len} were declared", b.len())));
            }
        }
        let mut out = Vec::new();
        put_fields(&mut out, &[(f.kind, value)]);
        self.put(&out)?;
        self.phase = Phase::Fields {
            next: i + 1,
            open: None,
        };
        Ok(())
    }

    pub fn u64(&mut self, name: &str, value: u64) -> Result<(), StateError> {
        self.field(name, &Value::U64(value))
    }

    /// Opens the next field, a `Bytes` field, for [`Self::chunk`]s that add up to the
    /// length declared in [`Self::begin`].
    pub fn open_bytes(&mut self, name: &str) -> Result<(), StateError> {
        let (i, _) = self.next_field(name)?;
        let Some(len) = self.lens[i] else {
            return Err(self.field_err(name, "opened for chunks but is not a bytes field"));
        };
        // `begin` bounded the length by a u32 `max_len`.
        self.put(&(len as u32).to_le_bytes())?;
        self.phase = Phase::Fields {
            next: i + 1,
            open: (len > 0).then_some(len),
        };
        Ok(())
    }

    /// The next bytes of the open `Bytes` field.
    pub fn chunk(&mut self, data: &[u8]) -> Result<(), StateError> {
        let Phase::Fields {
            next,
            open: Some(left),
        } = self.phase
        else {
            if data.is_empty() {
                return Ok(());
            }
            return Err(self.err("a chunk written with no bytes field open"));
        };
        if data.len() as u64 > left {
            let name = self.fields[next - 1].name;
            return Err(self.field_err(
                name,
                format!("a chunk of {} bytes where {left} remain", data.len()),
            ));
        }
        self.put(data)?;
        let left = left - data.len() as u64;
        self.phase = Phase::Fields {
            next,
            open: (left > 0).then_some(left),
        };
        Ok(())
    }

    /// Ends a streamed state after its last field.
    pub fn finish(&mut self) -> Result<(), StateError> {
        match self.phase {
            Phase::Fields { next, open: None } if next == self.fields.len() => {}
            Phase::Done => return Err(self.err("finished twice")),
            Phase::Fields { next, .. } if next < self.fields.len() => {
                let name = self.fields[next].name;
                return Err(self.field_err(name, "missing: the state was finished without it"));
            }
            _ => return Err(self.err("finished with a bytes field still open or before begin()")),
        }
        self.put(&[0])?;
        debug_assert_eq!(self.written, self.len);
        self.phase = Phase::Done;
        Ok(())
    }

    /// Whether the whole state was written.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The sink's error that stopped the writer, if one did.
    pub fn take_io_error(&mut self) -> Option<io::Error> {
        self.failed.take()
    }
}

/// Reads one device's state, which a peer sent at `version`, from `len` untrusted bytes.
pub struct StateReader<'a> {
    schema: &'static StateSchema,
    version: u32,
    src: &'a mut dyn io::Read,
    fields: Vec<&'static FieldSchema>,
    phase: Phase,
    len: u64,
    pos: u64,
    failed: Option<io::Error>,
}

impl std::fmt::Debug for StateReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateReader")
            .field("device", &self.schema.name)
            .field("version", &self.version)
            .field("phase", &self.phase)
            .field("len", &self.len)
            .field("pos", &self.pos)
            .finish()
    }
}

impl<'a> StateReader<'a> {
    /// A reader of the next `len` bytes of `src`: a state of `schema` at `version`.
    pub fn new(
        schema: &'static StateSchema,
        version: u32,
        src: &'a mut dyn io::Read,
        len: u64,
    ) -> Self {
        Self {
            schema,
            version,
            src,
            fields: schema.fields.iter().collect(),
            phase: Phase::Fresh,
            len,
            pos: 0,
            failed: None,
        }
    }

    pub fn schema(&self) -> &'static StateSchema {
        self.schema
    }

    /// The version the peer wrote, as [`DeviceState::version`] says it after a decode.
    pub fn version(&self) -> u32 {
        self.version
    }

    fn malformed(&self, reason: impl Into<String>) -> StateError {
        StateError::Malformed {
            device: self.schema.name.to_string(),
            reason: reason.into(),
        }
    }

    fn field_err(&self, field: &str, reason: impl Into<String>) -> StateError {
        StateError::Field {
            device: self.schema.name.to_string(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// Reads exactly `buf.len()` bytes, never past the state's end.
    fn take(&mut self, buf: &mut [u8], what: &str) -> Result<(), StateError> {
        let left = self.len - self.pos;
        if buf.len() as u64 > left {
            return Err(self.malformed(format!(
                "truncated at offset {}: {what} needs {} bytes, {left} remain",
                self.pos,
                buf.len()
            )));
        }
        if let Err(e) = self.src.read_exact(buf) {
            self.failed = Some(e);
            return Err(StateError::Interrupted {
                device: self.schema.name.to_string(),
            });
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Reads the whole state and decodes it as [`super::decode`] does.
    pub fn read_state(&mut self) -> Result<DeviceState, StateError> {
        if !matches!(self.phase, Phase::Fresh) {
            return Err(self.malformed("read whole after parts of it were read"));
        }
        let max = self.schema.max_encoded_len();
        if self.len > max {
            return Err(self.malformed(format!(
                "{} bytes, more than this schema's maximum of {max}",
                self.len
            )));
        }
        let mut bytes = vec![0u8; self.len as usize];
        self.take(&mut bytes, "the state")?;
        let st = super::decode(self.schema, self.version, &bytes)?;
        // Done only once it decoded: a device that drops the error has not loaded it.
        self.phase = Phase::Done;
        Ok(st)
    }

    fn begin(&mut self) -> Result<(), StateError> {
        self.schema.validate()?;
        no_subsections(self.schema)?;
        let device = self.schema.name.to_string();
        if self.version > self.schema.version {
            return Err(StateError::TooNew {
                device,
                version: self.version,
                max: self.schema.version,
            });
        }
        if self.version < self.schema.min_version {
            return Err(StateError::TooOld {
                device,
                version: self.version,
                min: self.schema.min_version,
            });
        }
        self.phase = Phase::Fields {
            next: 0,
            open: None,
        };
        Ok(())
    }

    /// The next field's schema, which must be `name`.
    fn next_field(&mut self, name: &str) -> Result<(usize, &'static FieldSchema), StateError> {
        if matches!(self.phase, Phase::Fresh) {
            self.begin()?;
        }
        match self.phase {
            Phase::Fields { next, open: None } => match self.fields.get(next) {
                Some(f) if f.name == name => Ok((next, f)),
                Some(f) => Err(self.field_err(
                    name,
                    format!("read out of order: the next field is {}", f.name),
                )),
                None => Err(self.field_err(name, "read after the last field")),
            },
            Phase::Fields {
                open: Some(left), ..
            } => Err(self.field_err(
                name,
                format!("read while {left} bytes of the open bytes field are unread"),
            )),
            _ => Err(self.field_err(name, "read after the state was finished")),
        }
    }

    /// Reads the next field whole; a field the sent version lacks reads as
    /// [`Value::zero`], as [`super::decode`] fills it.
    pub fn field(&mut self, name: &str) -> Result<Value, StateError> {
        let (i, f) = self.next_field(name)?;
        self.phase = Phase::Fields {
            next: i + 1,
            open: None,
        };
        if f.since > self.version {
            return Ok(Value::zero(f.kind));
        }
        let at = self.pos as usize;
        let device = self.schema.name;
        let wrap = |reason: String| StateError::Field {
            device: device.to_string(),
            field: f.name.to_string(),
            reason,
        };
        let bytes = match f.kind {
            FieldKind::Bytes { .. } => {
                let len = self.bytes_len(f)?;
                let mut b = vec![0u8; 4 + len as usize];
                b[..4].copy_from_slice(&(len as u32).to_le_bytes());
                self.take(&mut b[4..], "bytes")?;
                b
            }
            kind => {
                let mut b = vec![0u8; kind.max_encoded_len() as usize];
                self.take(&mut b, kind.name())?;
                b
            }
        };
        read_value(&mut Reader::at(&bytes, at), f.kind).map_err(wrap)
    }

    pub fn u64(&mut self, name: &str) -> Result<u64, StateError> {
        match self.field(name)? {
            Value::U64(v) => Ok(v),
            other => Err(StateError::WrongKind {
                field: name.to_string(),
                expected: "u64",
                found: other.kind_name(),
            }),
        }
    }

    /// Reads a `Bytes` field's length and bounds it by its maximum and what remains.
    fn bytes_len(&mut self, f: &FieldSchema) -> Result<u64, StateError> {
        let FieldKind::Bytes { max_len } = f.kind else {
            unreachable!("called for bytes fields")
        };
        let at = self.pos;
        let mut b = [0u8; 4];
        self.take(&mut b, "the length of bytes")?;
        let len = u32::from_le_bytes(b);
        if len > max_len {
            return Err(self.field_err(
                f.name,
                format!("length {len} at offset {at} is above its maximum of {max_len}"),
            ));
        }
        let left = self.len - self.pos;
        if u64::from(len) > left {
            return Err(self.field_err(
                f.name,
                format!(
                    "truncated at offset {}: bytes needs {len} bytes, {left} remain",
                    self.pos
                ),
            ));
        }
        Ok(u64::from(len))
    }

    /// Opens the next field, a `Bytes` field, for [`Self::chunk`]s: returns its length,
    /// checked against its maximum and against the bytes that remain (0 for a field the
    /// sent version lacks).
    pub fn open_bytes(&mut self, name: &str) -> Result<u64, StateError> {
        let (i, f) = self.next_field(name)?;
        if !matches!(f.kind, FieldKind::Bytes { .. }) {
            return Err(self.field_err(name, "opened for chunks but is not a bytes field"));
        }
        let len = if f.since > self.version {
            0
        } else {
            self.bytes_len(f)?
        };
        self.phase = Phase::Fields {
            next: i + 1,
            open: (len > 0).then_some(len),
        };
        Ok(len)
    }

    /// Fills `buf` with the next bytes of the open `Bytes` field.
    pub fn chunk(&mut self, buf: &mut [u8]) -> Result<(), StateError> {
        let Phase::Fields {
            next,
            open: Some(left),
        } = self.phase
        else {
            if buf.is_empty() {
                return Ok(());
            }
            return Err(self.malformed("a chunk read with no bytes field open"));
        };
        if buf.len() as u64 > left {
            let name = self.fields[next - 1].name;
            return Err(self.field_err(
                name,
                format!("a chunk of {} bytes where {left} remain", buf.len()),
            ));
        }
        self.take(buf, "bytes")?;
        let left = left - buf.len() as u64;
        self.phase = Phase::Fields {
            next,
            open: (left > 0).then_some(left),
        };
        Ok(())
    }

    /// Ends a streamed state: every field read, no subsections, nothing left over.
    pub fn finish(&mut self) -> Result<(), StateError> {
        if matches!(self.phase, Phase::Fresh) {
            // A state without fields.
            self.begin()?;
        }
        match self.phase {
            Phase::Fields { next, open: None } if next == self.fields.len() => {}
            Phase::Fields { next, .. } if next < self.fields.len() => {
                let name = self.fields[next].name;
                return Err(self.field_err(name, "not read: the state was finished before it"));
            }
            Phase::Done => return Err(self.malformed("finished twice")),
            _ => {
                return Err(
                    self.malformed("finished with a bytes field still open or before any field")
                )
            }
        }
        let mut count = [0u8; 1];
        self.take(&mut count, "the subsection count")?;
        if count[0] != 0 {
            return Err(self.malformed(format!(
                "{} subsections in a state that streams without any",
                count[0]
            )));
        }
        if self.pos != self.len {
            return Err(self.malformed(format!(
                "{} trailing bytes at offset {}",
                self.len - self.pos,
                self.pos
            )));
        }
        self.phase = Phase::Done;
        Ok(())
    }

    /// Whether the whole state was read.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The source's error that stopped the reader, if one did.
    pub fn take_io_error(&mut self) -> Option<io::Error> {
        self.failed.take()
    }
}

/// Saves a state through `save` into memory: the bytes [`super::encode`] gives for the
/// same values. Refuses a save that did not write the whole state.
pub fn save_to_vec<E: From<StateError>>(
    schema: &'static StateSchema,
    save: impl FnOnce(&mut StateWriter<'_>) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    let mut out = Vec::new();
    let mut w = StateWriter::new(schema, &mut out);
    save(&mut w)?;
    if !w.is_done() {
        return Err(incomplete(
            schema,
            "its save returned before the whole state was written",
        )
        .into());
    }
    Ok(out)
}

/// Loads `bytes`, a state at `version`, through `load`. Refuses a load that did not read
/// the whole state.
pub fn load_from_slice<E: From<StateError>>(
    schema: &'static StateSchema,
    version: u32,
    bytes: &[u8],
    load: impl FnOnce(&mut StateReader<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut src = bytes;
    let mut r = StateReader::new(schema, version, &mut src, bytes.len() as u64);
    load(&mut r)?;
    if !r.is_done() {
        return Err(incomplete(schema, "its load returned before the whole state was read").into());
    }
    Ok(())
}

/// The error for a device that returned without writing or reading its whole state.
pub fn incomplete(schema: &StateSchema, what: &str) -> StateError {
    StateError::Malformed {
        device: schema.name.to_string(),
        reason: what.to_string(),
    }
}
