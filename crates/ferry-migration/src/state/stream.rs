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
    /// Nothing written or read yet.
    Fresh,
    /// Streaming: the next field, and the bytes left of an open `Bytes` field.
    Fields {
        next: usize,
        open: Option<u64>,
    },
    Done,
}

fn malformed(schema: &StateSchema, reason: impl Into<String>) -> StateError {
    StateError::Malformed {
        device: schema.name.to_string(),
        reason: reason.into(),
    }
}

fn field_err(schema: &StateSchema, field: &str, reason: impl Into<String>) -> StateError {
    StateError::Field {
        device: schema.name.to_string(),
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Where a streamed state is, the same for the writer and the reader: which field
/// comes next and what is left of an open `Bytes` field.
#[derive(Debug)]
struct Order {
    schema: &'static StateSchema,
    fields: Vec<&'static FieldSchema>,
    phase: Phase,
    /// "written" or "read", for the errors.
    verb: &'static str,
}

impl Order {
    fn new(schema: &'static StateSchema, version: u32, verb: &'static str) -> Self {
        Self {
            schema,
            fields: schema.fields_at(version).collect(),
            phase: Phase::Fresh,
            verb,
        }
    }

    fn is_fresh(&self) -> bool {
        matches!(self.phase, Phase::Fresh)
    }

    fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn start(&mut self) {
        self.phase = Phase::Fields {
            next: 0,
            open: None,
        };
    }

    /// The next field's index and schema, which must be `name`.
    fn next(&self, name: &str) -> Result<(usize, &'static FieldSchema), StateError> {
        let (schema, verb) = (self.schema, self.verb);
        match self.phase {
            Phase::Fields { next, open: None } => match self.fields.get(next) {
                Some(f) if f.name == name => Ok((next, f)),
                Some(f) => Err(field_err(
                    schema,
                    name,
                    format!("{verb} out of order: the next field is {}", f.name),
                )),
                None => Err(field_err(
                    schema,
                    name,
                    format!("{verb} after the last field"),
                )),
            },
            Phase::Fields {
                open: Some(left), ..
            } => Err(field_err(
                schema,
                name,
                format!("{verb} while {left} bytes of the open bytes field remain"),
            )),
            Phase::Fresh => Err(field_err(schema, name, format!("{verb} before begin()"))),
            Phase::Done => Err(field_err(
                schema,
                name,
                format!("{verb} after the state was finished"),
            )),
        }
    }

    /// Moves past field `i`, leaving `open` of its bytes to come in chunks.
    fn past(&mut self, i: usize, open: u64) {
        self.phase = Phase::Fields {
            next: i + 1,
            open: (open > 0).then_some(open),
        };
    }

    /// Counts a chunk of `n` bytes of the open field.
    fn chunk(&mut self, n: usize) -> Result<(), StateError> {
        let Phase::Fields {
            next,
            open: Some(left),
        } = self.phase
        else {
            if n == 0 {
                return Ok(());
            }
            return Err(malformed(
                self.schema,
                format!("a chunk {} with no bytes field open", self.verb),
            ));
        };
        if n as u64 > left {
            let name = self.fields[next - 1].name;
            return Err(field_err(
                self.schema,
                name,
                format!("a chunk of {n} bytes where {left} remain"),
            ));
        }
        self.past(next - 1, left - n as u64);
        Ok(())
    }

    /// Checks that every field went and none is open, before the end of the state.
    fn check_end(&self) -> Result<(), StateError> {
        match self.phase {
            Phase::Fields { next, open: None } if next == self.fields.len() => Ok(()),
            Phase::Fields { next, .. } if next < self.fields.len() => Err(field_err(
                self.schema,
                self.fields[next].name,
                format!("not {}: the state was finished before it", self.verb),
            )),
            Phase::Done => Err(malformed(self.schema, "finished twice")),
            Phase::Fresh => Err(malformed(self.schema, "finished before begin()")),
            Phase::Fields { .. } => Err(malformed(
                self.schema,
                "finished with a bytes field still open",
            )),
        }
    }
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
    order: Order,
    sink: &'a mut dyn StateSink,
    /// Declared lengths of the `Bytes` fields, by index into `order.fields`.
    lens: Vec<Option<u64>>,
    len: u64,
    written: u64,
    failed: Option<io::Error>,
}

impl std::fmt::Debug for StateWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateWriter")
            .field("device", &self.order.schema.name)
            .field("phase", &self.order.phase)
            .field("len", &self.len)
            .field("written", &self.written)
            .finish()
    }
}

impl<'a> StateWriter<'a> {
    /// A writer of `schema`'s state at `schema.version`, the version this release writes.
    pub fn new(schema: &'static StateSchema, sink: &'a mut dyn StateSink) -> Self {
        Self {
            order: Order::new(schema, schema.version, "written"),
            sink,
            lens: Vec::new(),
            len: 0,
            written: 0,
            failed: None,
        }
    }

    pub fn schema(&self) -> &'static StateSchema {
        self.order.schema
    }

    /// Keeps the sink's error for [`Self::take_io_error`] and says the stream failed.
    fn sink_failed(&mut self, e: io::Error) -> StateError {
        self.failed = Some(e);
        StateError::Interrupted {
            device: self.order.schema.name.to_string(),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        if let Err(e) = self.sink.write(bytes) {
            return Err(self.sink_failed(e));
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn open_sink(&mut self, len: u64) -> Result<(), StateError> {
        if let Err(e) = self.sink.begin(len) {
            return Err(self.sink_failed(e));
        }
        self.len = len;
        Ok(())
    }

    /// Writes a whole state, checked and encoded as [`super::encode`] does.
    pub fn write_state(&mut self, state: &DeviceState) -> Result<(), StateError> {
        if !self.order.is_fresh() {
            return Err(malformed(
                self.order.schema,
                "a whole state written after other bytes of it",
            ));
        }
        let bytes = super::encode(self.order.schema, state)?;
        self.open_sink(bytes.len() as u64)?;
        self.put(&bytes)?;
        self.order.phase = Phase::Done;
        Ok(())
    }

    /// Starts a streamed state: `lens` gives the length of every `Bytes` field, by name.
    pub fn begin(&mut self, lens: &[(&str, u64)]) -> Result<(), StateError> {
        let schema = self.order.schema;
        if !self.order.is_fresh() {
            return Err(malformed(schema, "a streamed state begun twice"));
        }
        schema.validate()?;
        no_subsections(schema)?;
        let is_bytes = |f: &FieldSchema| matches!(f.kind, FieldKind::Bytes { .. });
        if let Some((name, _)) = lens.iter().find(|(n, _)| {
            !self
                .order
                .fields
                .iter()
                .any(|f| f.name == *n && is_bytes(f))
        }) {
            return Err(field_err(
                schema,
                name,
                "given a length but is not a bytes field",
            ));
        }
        let mut total = 1u64; // the subsection count
        let mut declared = Vec::with_capacity(self.order.fields.len());
        for f in &self.order.fields {
            let FieldKind::Bytes { max_len } = f.kind else {
                declared.push(None);
                total += f.kind.max_encoded_len();
                continue;
            };
            let mut given = lens.iter().filter(|(n, _)| *n == f.name);
            let Some(&(_, len)) = given.next() else {
                return Err(field_err(schema, f.name, "no length given for it"));
            };
            if given.next().is_some() {
                return Err(field_err(schema, f.name, "length given more than once"));
            }
            if len > u64::from(max_len) {
                return Err(field_err(
                    schema,
                    f.name,
                    format!("{len} bytes, more than its maximum of {max_len}"),
                ));
            }
            declared.push(Some(len));
            total += 4 + len;
        }
        self.lens = declared;
        self.open_sink(total)?;
        self.order.start();
        Ok(())
    }

    /// Writes the next field whole.
    pub fn field(&mut self, name: &str, value: &Value) -> Result<(), StateError> {
        let schema = self.order.schema;
        let (i, f) = self.order.next(name)?;
        check_value(f.kind, value).map_err(|r| field_err(schema, name, r))?;
        if let (Some(len), Value::Bytes(b)) = (self.lens[i], value) {
            if b.len() as u64 != len {
                return Err(field_err(
                    schema,
                    name,
                    format!("{} bytes, {len} were declared", b.len()),
                ));
            }
        }
        let mut out = Vec::new();
        put_fields(&mut out, &[(f.kind, value)]);
        self.put(&out)?;
        self.order.past(i, 0);
        Ok(())
    }

    pub fn u64(&mut self, name: &str, value: u64) -> Result<(), StateError> {
        self.field(name, &Value::U64(value))
    }

    /// Opens the next field, a `Bytes` field, for [`Self::chunk`]s that add up to the
    /// length declared in [`Self::begin`].
    pub fn open_bytes(&mut self, name: &str) -> Result<(), StateError> {
        let (i, _) = self.order.next(name)?;
        let Some(len) = self.lens[i] else {
            return Err(field_err(
                self.order.schema,
                name,
                "opened for chunks but is not a bytes field",
            ));
        };
        // `begin` bounded the length by a u32 `max_len`.
        self.put(&(len as u32).to_le_bytes())?;
        self.order.past(i, len);
        Ok(())
    }

    /// The next bytes of the open `Bytes` field.
    pub fn chunk(&mut self, data: &[u8]) -> Result<(), StateError> {
        self.order.chunk(data.len())?;
        self.put(data)
    }

    /// Ends a streamed state after its last field.
    pub fn finish(&mut self) -> Result<(), StateError> {
        self.order.check_end()?;
        self.put(&[0])?;
        debug_assert_eq!(self.written, self.len);
        self.order.phase = Phase::Done;
        Ok(())
    }

    /// Whether the whole state was written.
    pub fn is_done(&self) -> bool {
        self.order.is_done()
    }

    /// The sink's error that stopped the writer, if one did.
    pub fn take_io_error(&mut self) -> Option<io::Error> {
        self.failed.take()
    }
}

/// Reads one device's state, which a peer sent at `version`, from `len` untrusted bytes.
pub struct StateReader<'a> {
    /// Over every field of the schema: those the sent version lacks read as zero.
    order: Order,
    version: u32,
    src: &'a mut dyn io::Read,
    len: u64,
    pos: u64,
    failed: Option<io::Error>,
}

impl std::fmt::Debug for StateReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateReader")
            .field("device", &self.order.schema.name)
            .field("version", &self.version)
            .field("phase", &self.order.phase)
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
            order: Order::new(schema, u32::MAX, "read"),
            version,
            src,
            len,
            pos: 0,
            failed: None,
        }
    }

    pub fn schema(&self) -> &'static StateSchema {
        self.order.schema
    }

    /// The version the peer wrote, as [`DeviceState::version`] says it after a decode.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Reads exactly `buf.len()` bytes, never past the state's end.
    fn take(&mut self, buf: &mut [u8], what: &str) -> Result<(), StateError> {
        let left = self.len - self.pos;
        if buf.len() as u64 > left {
            return Err(malformed(
                self.order.schema,
                format!(
                    "truncated at offset {}: {what} needs {} bytes, {left} remain",
                    self.pos,
                    buf.len()
                ),
            ));
        }
        if let Err(e) = self.src.read_exact(buf) {
            self.failed = Some(e);
            return Err(StateError::Interrupted {
                device: self.order.schema.name.to_string(),
            });
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Reads the whole state and decodes it as [`super::decode`] does.
    pub fn read_state(&mut self) -> Result<DeviceState, StateError> {
        let schema = self.order.schema;
        if !self.order.is_fresh() {
            return Err(malformed(schema, "read whole after parts of it were read"));
        }
        let max = schema.max_encoded_len();
        if self.len > max {
            return Err(malformed(
                schema,
                format!(
                    "{} bytes, more than this schema's maximum of {max}",
                    self.len
                ),
            ));
        }
        let mut bytes = vec![0u8; self.len as usize];
        self.take(&mut bytes, "the state")?;
        let st = super::decode(schema, self.version, &bytes)?;
        // Done only once it decoded: a device that drops the error has not loaded it.
        self.order.phase = Phase::Done;
        Ok(st)
    }

    /// Checks the version and the schema before the first field.
    fn begin(&mut self) -> Result<(), StateError> {
        let schema = self.order.schema;
        schema.validate()?;
        no_subsections(schema)?;
        let device = schema.name.to_string();
        if self.version > schema.version {
            return Err(StateError::TooNew {
                device,
                version: self.version,
                max: schema.version,
            });
        }
        if self.version < schema.min_version {
            return Err(StateError::TooOld {
                device,
                version: self.version,
                min: schema.min_version,
            });
        }
        self.order.start();
        Ok(())
    }

    fn next(&mut self, name: &str) -> Result<(usize, &'static FieldSchema), StateError> {
        if self.order.is_fresh() {
            self.begin()?;
        }
        self.order.next(name)
    }

    /// Reads the next field whole; a field the sent version lacks reads as
    /// [`Value::zero`], as [`super::decode`] fills it.
    pub fn field(&mut self, name: &str) -> Result<Value, StateError> {
        let (i, f) = self.next(name)?;
        self.order.past(i, 0);
        if f.since > self.version {
            return Ok(Value::zero(f.kind));
        }
        let at = self.pos as usize;
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
        read_value(&mut Reader::at(&bytes, at), f.kind)
            .map_err(|r| field_err(self.order.schema, f.name, r))
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
        let left = self.len - self.pos;
        let schema = self.order.schema;
        if len > max_len {
            return Err(field_err(
                schema,
                f.name,
                format!("length {len} at offset {at} is above its maximum of {max_len}"),
            ));
        }
        if u64::from(len) > left {
            return Err(field_err(
                schema,
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
        let (i, f) = self.next(name)?;
        if !matches!(f.kind, FieldKind::Bytes { .. }) {
            return Err(field_err(
                self.order.schema,
                name,
                "opened for chunks but is not a bytes field",
            ));
        }
        let len = if f.since > self.version {
            0
        } else {
            self.bytes_len(f)?
        };
        self.order.past(i, len);
        Ok(len)
    }

    /// Fills `buf` with the next bytes of the open `Bytes` field.
    pub fn chunk(&mut self, buf: &mut [u8]) -> Result<(), StateError> {
        self.order.chunk(buf.len())?;
        self.take(buf, "bytes")
    }

    /// Ends a streamed state: every field read, no subsections, nothing left over.
    pub fn finish(&mut self) -> Result<(), StateError> {
        if self.order.is_fresh() {
            // A state without fields.
            self.begin()?;
        }
        self.order.check_end()?;
        let schema = self.order.schema;
        let mut count = [0u8; 1];
        self.take(&mut count, "the subsection count")?;
        if count[0] != 0 {
            return Err(malformed(
                schema,
                format!(
                    "{} subsections in a state that streams without any",
                    count[0]
                ),
            ));
        }
        if self.pos != self.len {
            return Err(malformed(
                schema,
                format!(
                    "{} trailing bytes at offset {}",
                    self.len - self.pos,
                    self.pos
                ),
            ));
        }
        self.order.phase = Phase::Done;
        Ok(())
    }

    /// Whether the whole state was read.
    pub fn is_done(&self) -> bool {
        self.order.is_done()
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
    malformed(schema, what)
}
