//! Message layouts. See the module docs of [`crate::wire`] for the sequence.

use super::codec::{Reader, WireError, Writer};
use super::multifd::{Compression, MAX_CHANNELS};
use crate::PAGE_SIZE;

/// First bytes of every migration stream.
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// The framing and message layout this release speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Protocol versions this release can receive.
pub const SUPPORTED_PROTOCOL_VERSIONS: &[u32] = &[1];
/// Most pages in one RAM batch (512 KiB of data, as QEMU's multifd packets).
pub const MAX_BATCH_PAGES: usize = 128;
/// Bound of a human-readable reason (refusal, load failure, abort).
pub const MAX_REASON_LEN: usize = 4096;
/// Bound of any name on the wire (machine type, device, RAM block, property).
pub const MAX_NAME_LEN: usize = 128;
/// Bound of a property value's text.
pub const MAX_VALUE_LEN: usize = 256;
/// Bounds of the hello's lists.
pub const MAX_PROPS: usize = 512;
pub const MAX_RAM_BLOCKS: usize = 64;
pub const MAX_DEVICES: usize = 1024;
pub const MAX_VCPUS: u32 = 4096;
/// Largest device-state frame any device may send; each device is further bounded by
/// its own schema on the destination.
pub const MAX_DEVICE_STATE_LEN: u32 = 1 << 30;
/// Largest device precopy record frame; each device is further bounded by its precopy
/// schema on the destination.
pub const MAX_PRECOPY_RECORD_LEN: u32 = 16 << 20;

/// The 16 bytes that open a stream, fixed for every protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    pub version: u32,
}

impl StreamHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(Self::LEN as u32).to_le_bytes());
        b
    }

    /// Checks the magic and the header length; the version is returned as sent, for the
    /// caller to accept or refuse.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "stream header");
        let magic: [u8; 8] = r.bytes(8)?.try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = r.u32()?;
        let len = r.u32()?;
        if len as usize != Self::LEN {
            return Err(WireError::BadValue {
                what: "stream header length",
                value: len.into(),
            });
        }
        Ok(Self { version })
    }
}

/// Kinds of frame. Tags below 0x80 travel from source to destination, tags from 0x80 on
/// the return path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameTag {
    Hello = 0x01,
    RamBatch = 0x02,
    PassEnd = 0x03,
    DeviceState = 0x04,
    VcpuState = 0x05,
    EndOfStream = 0x06,
    Abort = 0x07,
    MultifdSync = 0x08,
    DevicePrecopy = 0x09,
    PrecopyInitDone = 0x0a,
    StateDigest = 0x0b,
    Keepalive = 0x0c,
    PopulatedExtents = 0x0d,
    Accept = 0x81,
    Refuse = 0x82,
    LoadFailed = 0x83,
    Completed = 0x84,
    ChannelsReady = 0x85,
    DevicePlan = 0x86,
    SwitchoverAck = 0x87,
    KeepaliveReturn = 0x88,
}

impl FrameTag {
    pub fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            0x01 => Self::Hello,
            0x02 => Self::RamBatch,
            0x03 => Self::PassEnd,
            0x04 => Self::DeviceState,
            0x05 => Self::VcpuState,
            0x06 => Self::EndOfStream,
            0x07 => Self::Abort,
            0x08 => Self::MultifdSync,
            0x09 => Self::DevicePrecopy,
            0x0a => Self::PrecopyInitDone,
            0x0b => Self::StateDigest,
            0x0c => Self::Keepalive,
            0x0d => Self::PopulatedExtents,
            0x81 => Self::Accept,
            0x82 => Self::Refuse,
            0x83 => Self::LoadFailed,
            0x84 => Self::Completed,
            0x85 => Self::ChannelsReady,
            0x86 => Self::DevicePlan,
            0x87 => Self::SwitchoverAck,
            0x88 => Self::KeepaliveReturn,
            _ => return Err(WireError::UnknownFrame(v)),
        })
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_len(self) -> u32 {
        match self {
            Self::Hello => 1 << 20,
            Self::RamBatch => (RamBatchHeader::LEN + MAX_BATCH_PAGES * (8 + PAGE_SIZE)) as u32,
            Self::PassEnd => PassEnd::LEN as u32,
            Self::DeviceState => MAX_DEVICE_STATE_LEN,
            Self::VcpuState => 1 << 20,
            Self::EndOfStream => EndOfStream::LEN as u32,
            Self::Abort | Self::Refuse | Self::LoadFailed => (MAX_REASON_LEN + 16) as u32,
            Self::Accept => 1024,
            Self::Completed => Completed::LEN as u32,
            Self::MultifdSync => MultifdSync::LEN as u32,
            Self::ChannelsReady => ChannelsReady::LEN as u32,
            Self::DevicePrecopy => MAX_PRECOPY_RECORD_LEN,
            Self::PrecopyInitDone | Self::SwitchoverAck => DeviceRef::MAX_LEN as u32,
            Self::StateDigest => StateDigest::LEN as u32,
            Self::DevicePlan => DevicePlan::MAX_LEN as u32,
            Self::Keepalive | Self::KeepaliveReturn => Keepalive::LEN as u32,
            Self::PopulatedExtents => PopulatedExtents::MAX_LEN as u32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::RamBatch => "RAM batch",
            Self::PassEnd => "pass end",
            Self::DeviceState => "device state",
            Self::VcpuState => "vCPU state",
            Self::EndOfStream => "end of stream",
            Self::Abort => "abort",
            Self::Accept => "accept",
            Self::Refuse => "refuse",
            Self::LoadFailed => "load failed",
            Self::Completed => "completed",
            Self::MultifdSync => "multifd sync",
            Self::ChannelsReady => "channels ready",
            Self::DevicePrecopy => "device precopy record",
            Self::PrecopyInitDone => "precopy initial data sent",
            Self::StateDigest => "state digest",
            Self::DevicePlan => "device plan",
            Self::SwitchoverAck => "switchover acknowledgement",
            Self::Keepalive | Self::KeepaliveReturn => "keepalive",
            Self::PopulatedExtents => "populated extents",
        }
    }
}

/// The 8 bytes before every payload: tag, three zero bytes, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub tag: FrameTag,
    pub len: u32,
}

impl FrameHeader {
    pub const LEN: usize = 8;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.tag as u8;
        b[4..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes and bounds a frame header: an unknown tag, nonzero reserved bytes or a
    /// length over the tag's limit are refused before any payload is read.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let tag = FrameTag::from_u8(b[0])?;
        if b[1..4] != [0, 0, 0] {
            return Err(WireError::BadValue {
                what: "frame header reserved bytes",
                value: u64::from(u32::from_le_bytes([b[1], b[2], b[3], 0])),
            });
        }
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        if len > tag.max_len() {
            return Err(WireError::TooLong {
                what: tag.name(),
                len: len.into(),
                max: tag.max_len().into(),
            });
        }
        Ok(Self { tag, len })
    }
}

/// A RAM block as the source describes it; the destination's must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRamBlock {
    pub name: String,
    pub gpa: u64,
    pub size: u64,
}

/// A device state the source will send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloDevice {
    pub name: String,
    pub instance: u32,
    pub version: u32,
}

/// Everything the destination needs to accept or refuse before any RAM moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Identifies this migration; later channels of the same migration carry it too.
    pub session_id: u64,
    /// The source's release, for messages.
    pub release: String,
    /// The resolved machine type (never an alias).
    pub machine: String,
    pub page_size: u32,
    /// [`Hello::FLAG_FULL_VERIFY`] and future flags.
    pub flags: u32,
    /// `(driver.property, value)` of every property that changes the wire or the guest.
    pub wire_props: Vec<(String, String)>,
    /// The wire properties whose value comes from the machine type's compat tables: the
    /// value an older release has without knowing the property, so a peer that does not
    /// know it still agrees.
    pub compat_pinned: Vec<String>,
    pub ram_blocks: Vec<HelloRamBlock>,
    pub vcpu_count: u32,
    pub vcpu_state: String,
    pub vcpu_version: u32,
    pub devices: Vec<HelloDevice>,
    /// Data channels the source will open after the accept; 0 sends pages on the main
    /// channel.
    pub channels: u16,
    /// How page data is compressed on the data channels.
    pub compression: Compression,
}

impl Hello {
    /// The source will also send a digest of all of guest memory at switchover.
    pub const FLAG_FULL_VERIFY: u32 = 1;
    const KNOWN_FLAGS: u32 = Self::FLAG_FULL_VERIFY;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.session_id)
            .str16(&self.release, MAX_NAME_LEN)
            .str16(&self.machine, MAX_NAME_LEN)
            .u32(self.page_size)
            .u32(self.flags)
            .u16(self.wire_props.len() as u16);
        for (k, v) in &self.wire_props {
            w.str16(k, MAX_NAME_LEN).str16(v, MAX_VALUE_LEN);
        }
        w.u16(self.compat_pinned.len() as u16);
        for k in &self.compat_pinned {
            w.str16(k, MAX_NAME_LEN);
        }
        w.u16(self.ram_blocks.len() as u16);
        for b in &self.ram_blocks {
            w.str16(&b.name, MAX_NAME_LEN).u64(b.gpa).u64(b.size);
        }
        w.u32(self.vcpu_count)
            .str16(&self.vcpu_state, MAX_NAME_LEN)
            .u32(self.vcpu_version)
            .u16(self.devices.len() as u16);
        for d in &self.devices {
            w.str16(&d.name, MAX_NAME_LEN)
                .u32(d.instance)
                .u32(d.version);
        }
        w.u16(self.channels).u8(self.compression.code());
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "hello");
        let session_id = r.u64()?;
        let release = r.str16(MAX_NAME_LEN)?;
        let machine = r.str16(MAX_NAME_LEN)?;
        let page_size = r.u32()?;
        let flags = r.u32()?;
        if flags & !Self::KNOWN_FLAGS != 0 {
            return Err(WireError::BadValue {
                what: "hello flags",
                value: flags.into(),
            });
        }
        let n = r.u16()?;
        let n = r.count(n.into(), MAX_PROPS, 4)?;
        let mut wire_props = Vec::with_capacity(n);
        for _ in 0..n {
            wire_props.push((r.str16(MAX_NAME_LEN)?, r.str16(MAX_VALUE_LEN)?));
        }
        let n = r.u16()?;
        let n = r.count(n.into(), MAX_PROPS, 2)?;
        let mut compat_pinned = Vec::with_capacity(n);
        for _ in 0..n {
            compat_pinned.push(r.str16(MAX_NAME_LEN)?);
        }
        let n = r.u16()?;
        let n = r.count(n.into(), MAX_RAM_BLOCKS, 18)?;
        let mut ram_blocks = Vec::with_capacity(n);
        for _ in 0..n {
            ram_blocks.push(HelloRamBlock {
                name: r.str16(MAX_NAME_LEN)?,
                gpa: r.u64()?,
                size: r.u64()?,
            });
        }
        let vcpu_count = r.u32()?;
        if vcpu_count > MAX_VCPUS {
            return Err(WireError::TooLong {
                what: "hello vCPU count",
                len: vcpu_count.into(),
                max: MAX_VCPUS.into(),
            });
        }
        let vcpu_state = r.str16(MAX_NAME_LEN)?;
        let vcpu_version = r.u32()?;
        let n = r.u16()?;
        let n = r.count(n.into(), MAX_DEVICES, 10)?;
        let mut devices = Vec::with_capacity(n);
        for _ in 0..n {
            devices.push(HelloDevice {
                name: r.str16(MAX_NAME_LEN)?,
                instance: r.u32()?,
                version: r.u32()?,
            });
        }
        let channels = r.u16()?;
        if channels > MAX_CHANNELS {
            return Err(WireError::TooLong {
                what: "hello channel count",
                len: channels.into(),
                max: MAX_CHANNELS.into(),
            });
        }
        let compression = Compression::from_code(r.u8()?);
        r.finish()?;
        Ok(Self {
            session_id,
            release,
            machine,
            page_size,
            flags,
            wire_props,
            compat_pinned,
            ram_blocks,
            vcpu_count,
            vcpu_state,
            vcpu_version,
            devices,
            channels,
            compression,
        })
    }
}

/// Hello annotations: what a source tells the destination in its hello beyond 0.1's
/// fields, without changing the hello's layout.
///
/// The hello's layout is frozen by release 0.1.0, whose decoder refuses trailing bytes
/// and unknown flags. What 0.1.0 does tolerate is a wire property it does not know that
/// the source lists among its compat-pinned properties: it takes such a property for
/// the value an older release has without knowing it, and ignores it. Annotations use
/// exactly that: entries of `wire_props` whose names start with [`ANNOTATION_PREFIX`],
/// each also listed in `compat_pinned`. A release that knows annotations takes them out
/// of the property list before comparing properties and acts on them; one that does not
/// (0.1.0) ignores them, which each annotation below is designed to allow. They are
/// bounded as every wire property is (name 128 bytes, value 256, 512 entries in all).
///
/// * [`SWITCHOVER_COMMIT`] `=on`: the source keeps the switchover commitment. Once its
///   end of stream is out it never runs the guest again unless the destination's answer
///   is a load failure, so the destination may resume the guest as soon as it has
///   loaded. Without it (release 0.1.0 resumed its guest when cancelled after the end
///   of stream) the destination answers `Completed` first and resumes only once the
///   source has let go without aborting (it closed, or a short grace passed).
/// * `x-hello.device/NAME/INSTANCE/KEY=VALUE` ([`device_config_entry`]): one item of a
///   device's configuration (an accelerator's memory size). A destination that knows
///   annotations refuses a source whose devices are configured differently, naming the
///   device and both values, before any RAM moves. A release without them finds out at
///   device load, as 0.1.0 does.
/// * `x-hello.precopy/NAME/INSTANCE=SCHEMA:VERSION` ([`precopy_offer_entry`]): the
///   source's host can move this device's state while the guest runs (VFIO's
///   `VFIO_MIGRATION_PRE_COPY`), in records of precopy schema `SCHEMA` at `VERSION`.
///   Sent only with `migration.switchover-ack=on`, which both sides must share; the
///   destination answers every hello that has it on with a [`DevicePlan`].
/// * [`LIVENESS`] `=MS`: the source sends [`Keepalive`] frames while it has nothing
///   else to say and takes them on the return path, and gives up on a destination
///   silent for `MS` milliseconds once it has seen one. A destination that knows
///   keepalives sends its first right after its answer to the hello (and the device
///   plan), then one whenever it is quiet for a quarter of the smaller of the two
///   limits; the source sends none before it has seen one. A destination that does not
///   (0.1.0, 0.2.0) sends none, so neither does the source, and the stream is theirs.
pub const ANNOTATION_PREFIX: &str = "x-hello.";
/// See [`ANNOTATION_PREFIX`].
pub const SWITCHOVER_COMMIT: &str = "x-hello.switchover-commit";
/// See [`ANNOTATION_PREFIX`].
pub const LIVENESS: &str = "x-hello.liveness";
const DEVICE_CONFIG_PREFIX: &str = "x-hello.device/";
const PRECOPY_PREFIX: &str = "x-hello.precopy/";

/// The annotation name of a device's precopy offer.
pub fn precopy_offer_entry(device: &str, instance: u32) -> String {
    format!("{PRECOPY_PREFIX}{device}/{instance}")
}

/// A source host's offer to precopy one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrecopyOffer {
    pub device: String,
    pub instance: u32,
    /// The precopy record schema's name and the version the source writes.
    pub schema: String,
    pub version: u32,
}

/// The annotation name of one item of a device's configuration.
pub fn device_config_entry(device: &str, instance: u32, key: &str) -> String {
    format!("{DEVICE_CONFIG_PREFIX}{device}/{instance}/{key}")
}

/// The annotations of a hello, taken apart from its wire properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Annotations {
    pub switchover_commit: bool,
    /// `(device, instance, key, value)`, in the order sent.
    pub device_config: Vec<(String, u32, String, String)>,
    /// The devices the source's host can precopy.
    pub precopy: Vec<PrecopyOffer>,
    /// The source's liveness limit in milliseconds, if it sends keepalives.
    pub liveness_ms: Option<u32>,
    /// Annotations this release does not know: ignored, as 0.1.0 ignores all of them.
    pub unknown: Vec<String>,
}

impl Annotations {
    /// Splits `wire_props` into real wire properties and annotations.
    pub fn split(wire_props: &[(String, String)]) -> (Vec<(String, String)>, Self) {
        let mut props = Vec::with_capacity(wire_props.len());
        let mut a = Self::default();
        for (k, v) in wire_props {
            if !k.starts_with(ANNOTATION_PREFIX) {
                props.push((k.clone(), v.clone()));
            } else if k == SWITCHOVER_COMMIT {
                a.switchover_commit = v == "on";
            } else if k == LIVENESS {
                match v.parse::<u32>() {
                    Ok(ms) if ms > 0 => a.liveness_ms = Some(ms),
                    _ => a.unknown.push(k.clone()),
                }
            } else if let Some(rest) = k.strip_prefix(DEVICE_CONFIG_PREFIX) {
                let mut parts = rest.splitn(3, '/');
                match (
                    parts.next(),
                    parts.next().and_then(|i| i.parse::<u32>().ok()),
                    parts.next(),
                ) {
                    (Some(dev), Some(inst), Some(key)) if !dev.is_empty() && !key.is_empty() => a
                        .device_config
                        .push((dev.into(), inst, key.into(), v.clone())),
                    _ => a.unknown.push(k.clone()),
                }
            } else if let Some(rest) = k.strip_prefix(PRECOPY_PREFIX) {
                let target = rest
                    .split_once('/')
                    .and_then(|(d, i)| Some((d, i.parse::<u32>().ok()?)));
                let record = v
                    .split_once(':')
                    .and_then(|(n, ver)| Some((n, ver.parse::<u32>().ok()?)));
                match (target, record) {
                    (Some((dev, instance)), Some((schema, version)))
                        if !dev.is_empty() && !schema.is_empty() =>
                    {
                        a.precopy.push(PrecopyOffer {
                            device: dev.into(),
                            instance,
                            schema: schema.into(),
                            version,
                        })
                    }
                    _ => a.unknown.push(k.clone()),
                }
            } else {
                a.unknown.push(k.clone());
            }
        }
        (props, a)
    }

    /// Writes these annotations into a hello: each entry into `wire_props` and its name
    /// into `compat_pinned`, so that a release without annotations ignores them.
    pub fn apply(&self, hello: &mut Hello) {
        let mut add = |k: String, v: String| {
            hello.compat_pinned.push(k.clone());
            hello.wire_props.push((k, v));
        };
        if self.switchover_commit {
            add(SWITCHOVER_COMMIT.into(), "on".into());
        }
        if let Some(ms) = self.liveness_ms {
            add(LIVENESS.into(), ms.to_string());
        }
        for (dev, inst, key, value) in &self.device_config {
            add(device_config_entry(dev, *inst, key), value.clone());
        }
        for o in &self.precopy {
            add(
                precopy_offer_entry(&o.device, o.instance),
                format!("{}:{}", o.schema, o.version),
            );
        }
    }

    /// The source's precopy offer for one device, if it made one.
    pub fn precopy_offer(&self, name: &str, instance: u32) -> Option<&PrecopyOffer> {
        self.precopy
            .iter()
            .find(|o| o.device == name && o.instance == instance)
    }

    /// The configuration the source stated for one device, if it stated any.
    pub fn device(&self, name: &str, instance: u32) -> Vec<(&str, &str)> {
        self.device_config
            .iter()
            .filter(|(d, i, _, _)| d == name && *i == instance)
            .map(|(_, _, k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// The destination's yes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    pub release: String,
}

impl Accept {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.str16(&self.release, MAX_NAME_LEN);
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "accept");
        let release = r.str16(MAX_NAME_LEN)?;
        r.finish()?;
        Ok(Self { release })
    }
}

/// Why a destination refused a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseCause {
    ProtocolVersion,
    UnknownMachine,
    MachineMismatch,
    UnknownDevice,
    MissingDevice,
    DeviceVersion,
    PropertyMismatch,
    RamLayout,
    VcpuMismatch,
    Busy,
    /// The destination cannot take the data channels or compression the source asks for.
    Channels,
    /// A device is configured differently on the two sides (its hello annotations).
    DeviceConfig,
    /// The hello does not decode.
    BadHello,
    /// The two sides' transport security differs (TLS against plaintext) or the peer's
    /// credentials are not allowed in. Sent by the transport, before any hello is read.
    Security,
    /// A cause this release does not know (sent by a newer peer).
    Other(u16),
}

impl RefuseCause {
    pub fn code(self) -> u16 {
        match self {
            Self::ProtocolVersion => 1,
            Self::UnknownMachine => 2,
            Self::MachineMismatch => 3,
            Self::UnknownDevice => 4,
            Self::MissingDevice => 5,
            Self::DeviceVersion => 6,
            Self::PropertyMismatch => 7,
            Self::RamLayout => 8,
            Self::VcpuMismatch => 9,
            Self::Busy => 10,
            Self::Channels => 11,
            Self::DeviceConfig => 12,
            Self::BadHello => 13,
            Self::Security => 14,
            Self::Other(c) => c,
        }
    }

    pub fn from_code(c: u16) -> Self {
        match c {
            1 => Self::ProtocolVersion,
            2 => Self::UnknownMachine,
            3 => Self::MachineMismatch,
            4 => Self::UnknownDevice,
            5 => Self::MissingDevice,
            6 => Self::DeviceVersion,
            7 => Self::PropertyMismatch,
            8 => Self::RamLayout,
            9 => Self::VcpuMismatch,
            10 => Self::Busy,
            11 => Self::Channels,
            12 => Self::DeviceConfig,
            13 => Self::BadHello,
            14 => Self::Security,
            c => Self::Other(c),
        }
    }
}

impl std::fmt::Display for RefuseCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::ProtocolVersion => "protocol version",
            Self::UnknownMachine => "unknown machine type",
            Self::MachineMismatch => "machine type mismatch",
            Self::UnknownDevice => "unknown device",
            Self::MissingDevice => "missing device",
            Self::DeviceVersion => "device state version",
            Self::PropertyMismatch => "property mismatch",
            Self::RamLayout => "RAM layout",
            Self::VcpuMismatch => "vCPU mismatch",
            Self::Busy => "busy",
            Self::Channels => "data channels",
            Self::DeviceConfig => "device configuration",
            Self::BadHello => "malformed hello",
            Self::Security => "transport security",
            Self::Other(c) => return write!(f, "cause {c}"),
        };
        f.write_str(s)
    }
}

/// A refusal (in answer to a hello) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    pub cause: RefuseCause,
    pub reason: String,
}

/// A text message: [`FrameTag::Abort`] from the source or [`FrameTag::LoadFailed`] from
/// the destination, or the text of a [`Refuse`].
pub fn encode_reason(reason: &str) -> Vec<u8> {
    let mut w = Writer::new();
    w.str16(reason, MAX_REASON_LEN);
    w.buf
}

pub fn decode_reason(b: &[u8], what: &'static str) -> Result<String, WireError> {
    let mut r = Reader::new(b, what);
    let s = r.str16(MAX_REASON_LEN)?;
    r.finish()?;
    Ok(s)
}

impl Refuse {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(self.cause.code()).str16(&self.reason, MAX_REASON_LEN);
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "refuse");
        let cause = RefuseCause::from_code(r.u16()?);
        let reason = r.str16(MAX_REASON_LEN)?;
        r.finish()?;
        Ok(Self { cause, reason })
    }
}

/// Fixed part of a RAM batch; followed by `count` u64 page entries and then the data of
/// every entry without [`RamBatchHeader::ZERO`], in entry order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamBatchHeader {
    pub block: u32,
    pub count: u32,
}

impl RamBatchHeader {
    pub const LEN: usize = 8;
    /// Entry flag: the page is all zeros and has no data in the batch.
    pub const ZERO: u64 = 1 << 63;
    /// Entry bits that hold the page index within the block.
    pub const PAGE_MASK: u64 = (1 << 48) - 1;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&self.block.to_le_bytes());
        b[4..].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Decodes a batch's fixed part and checks that the frame length holds exactly the
    /// entries it announces plus some whole pages.
    pub fn decode(b: &[u8; Self::LEN], frame_len: u32) -> Result<Self, WireError> {
        let block = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let count = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        if count as usize > MAX_BATCH_PAGES {
            return Err(WireError::TooLong {
                what: "RAM batch page count",
                len: count.into(),
                max: MAX_BATCH_PAGES as u64,
            });
        }
        let fixed = Self::LEN as u64 + 8 * u64::from(count);
        if u64::from(frame_len) < fixed {
            return Err(WireError::Truncated {
                what: "RAM batch",
                offset: frame_len as usize,
                needed: (fixed - u64::from(frame_len)) as usize,
            });
        }
        let data = u64::from(frame_len) - fixed;
        let page = PAGE_SIZE as u64;
        if data % page != 0 || data / page > u64::from(count) {
            return Err(WireError::BadValue {
                what: "RAM batch length",
                value: frame_len.into(),
            });
        }
        Ok(Self { block, count })
    }

    /// Decodes the entries, returning `(page index, is_zero)` pairs through `out` and
    /// checking every index against `block_pages` and the data length against the frame.
    pub fn decode_entries(
        &self,
        b: &[u8],
        frame_len: u32,
        block_pages: u64,
        out: &mut Vec<(u64, bool)>,
    ) -> Result<usize, WireError> {
        out.clear();
        let mut r = Reader::new(b, "RAM batch entries");
        let mut data_pages = 0usize;
        for _ in 0..self.count {
            let e = r.u64()?;
            if e & !(Self::ZERO | Self::PAGE_MASK) != 0 {
                return Err(WireError::BadValue {
                    what: "RAM batch entry flags",
                    value: e,
                });
            }
            let page = e & Self::PAGE_MASK;
            if page >= block_pages {
                return Err(WireError::BadValue {
                    what: "RAM batch page index",
                    value: page,
                });
            }
            let zero = e & Self::ZERO != 0;
            if !zero {
                data_pages += 1;
            }
            out.push((page, zero));
        }
        r.finish()?;
        let expect = Self::LEN as u64 + 8 * u64::from(self.count) + (data_pages * PAGE_SIZE) as u64;
        if expect != u64::from(frame_len) {
            return Err(WireError::BadValue {
                what: "RAM batch length",
                value: frame_len.into(),
            });
        }
        Ok(data_pages)
    }

    pub fn entry(page: u64, zero: bool) -> u64 {
        debug_assert!(page <= Self::PAGE_MASK);
        page | if zero { Self::ZERO } else { 0 }
    }
}

/// Where one RAM block of the source's guest holds memory, sent before pass 0 with
/// `migration.x-ferry-populate-ahead` on, so that the destination can fault that memory
/// in on a thread of its own while the pages are still on their way (see
/// `engine::populate`). A hint: it changes no page, and the destination checks it as it
/// checks everything else (the block exists, every extent lies inside it, extents
/// ascend without overlapping), failing the migration on a frame that breaks a rule.
///
/// Payload: block index (u16), extent count (u32), then per extent its first page and
/// its length in pages (u64 each). A block with more extents than one frame holds
/// ([`Self::MAX_EXTENTS`]) takes several frames, each ascending after the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopulatedExtents {
    pub block: u16,
    /// `(first page, pages)`, ascending, none empty, none overlapping.
    pub extents: Vec<(u64, u64)>,
}

impl PopulatedExtents {
    /// Extents in one frame: 1 MiB of them.
    pub const MAX_EXTENTS: usize = 1 << 16;
    pub const MAX_LEN: usize = 6 + Self::MAX_EXTENTS * 16;

    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.extents.len() <= Self::MAX_EXTENTS);
        let mut w = Writer::new();
        w.u16(self.block).u32(self.extents.len() as u32);
        for &(first, pages) in &self.extents {
            w.u64(first).u64(pages);
        }
        w.buf
    }

    /// Decodes and checks the frame's own rules; `block_pages` gives the pages of each
    /// of the destination's blocks, and `ends` for each block the page its extents must
    /// start at or beyond (the end of its previous frame, 0 before its first).
    pub fn decode(b: &[u8], block_pages: &[u64], ends: &[u64]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "populated extents");
        let block = r.u16()?;
        let Some(&pages_in_block) = block_pages.get(block as usize) else {
            return Err(WireError::BadValue {
                what: "populated extents: RAM block index",
                value: block.into(),
            });
        };
        let n = r.u32()? as usize;
        if n > Self::MAX_EXTENTS {
            return Err(WireError::TooLong {
                what: "populated extents",
                len: n as u64,
                max: Self::MAX_EXTENTS as u64,
            });
        }
        let mut extents = Vec::with_capacity(n.min(b.len() / 16));
        let mut next = ends.get(block as usize).copied().unwrap_or(0);
        for _ in 0..n {
            let (first, pages) = (r.u64()?, r.u64()?);
            if first < next {
                return Err(WireError::BadValue {
                    what: "populated extents: an extent that does not ascend (first page)",
                    value: first,
                });
            }
            let end = first
                .checked_add(pages)
                .filter(|&e| pages > 0 && e <= pages_in_block);
            let Some(end) = end else {
                return Err(WireError::BadValue {
                    what: "populated extents: an empty extent or one past the block's end (pages)",
                    value: pages,
                });
            };
            extents.push((first, pages));
            next = end;
        }
        r.finish()?;
        Ok(Self { block, extents })
    }

    /// The page after the last extent, if there is one.
    pub fn end(&self) -> Option<u64> {
        self.extents.last().map(|&(f, p)| f + p)
    }
}

/// Marks the end of a pass over guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassEnd {
    pub pass: u32,
    pub pages: u64,
}

impl PassEnd {
    pub const LEN: usize = 12;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(self.pass).u64(self.pages);
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "pass end");
        let v = Self {
            pass: r.u32()?,
            pages: r.u64()?,
        };
        r.finish()?;
        Ok(v)
    }
}

/// Fixed part of a device-state frame; the state bytes follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStateHeader {
    pub name: String,
    pub instance: u32,
    pub version: u32,
}

impl DeviceStateHeader {
    pub fn encode(&self, state: &[u8]) -> Vec<u8> {
        let mut w = Writer::new();
        w.str16(&self.name, MAX_NAME_LEN)
            .u32(self.instance)
            .u32(self.version)
            .bytes(state);
        w.buf
    }

    /// Returns the header and the state bytes.
    pub fn decode(b: &[u8]) -> Result<(Self, &[u8]), WireError> {
        let mut r = Reader::new(b, "device state");
        let h = Self {
            name: r.str16(MAX_NAME_LEN)?,
            instance: r.u32()?,
            version: r.u32()?,
        };
        let rest = r.bytes(r.remaining())?;
        Ok((h, rest))
    }

    /// Bytes a reader takes first: the name's length.
    pub const PREFIX_LEN: usize = 2;

    /// For a reader that does not hold the whole frame (a device's state may be large):
    /// from the first [`Self::PREFIX_LEN`] bytes of a frame of `frame_len` bytes, how many
    /// header bytes follow (the name, the instance and the version). Refuses a name over
    /// its bound or a header longer than the frame.
    pub fn rest_len(prefix: [u8; Self::PREFIX_LEN], frame_len: u32) -> Result<usize, WireError> {
        let name_len = u16::from_le_bytes(prefix) as usize;
        if name_len > MAX_NAME_LEN {
            return Err(WireError::TooLong {
                what: "device state name",
                len: name_len as u64,
                max: MAX_NAME_LEN as u64,
            });
        }
        let fixed = Self::PREFIX_LEN + name_len + 8;
        if fixed > frame_len as usize {
            return Err(WireError::Truncated {
                what: "device state",
                offset: frame_len as usize,
                needed: fixed - frame_len as usize,
            });
        }
        Ok(name_len + 8)
    }

    /// Decodes the header from its prefix and the [`Self::rest_len`] bytes after it;
    /// returns it with the length of the state bytes that follow in the frame.
    pub fn decode_parts(
        prefix: [u8; Self::PREFIX_LEN],
        rest: &[u8],
        frame_len: u32,
    ) -> Result<(Self, u32), WireError> {
        let need = Self::rest_len(prefix, frame_len)?;
        if rest.len() != need {
            return Err(WireError::Truncated {
                what: "device state header",
                offset: rest.len(),
                needed: need.saturating_sub(rest.len()),
            });
        }
        let mut b = Vec::with_capacity(Self::PREFIX_LEN + rest.len());
        b.extend_from_slice(&prefix);
        b.extend_from_slice(rest);
        let (h, state) = Self::decode(&b)?;
        debug_assert!(state.is_empty());
        Ok((h, frame_len - (Self::PREFIX_LEN + need) as u32))
    }
}

/// Fixed part of a vCPU-state frame; the state bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuStateHeader {
    pub index: u32,
    pub version: u32,
}

impl VcpuStateHeader {
    pub fn encode(&self, state: &[u8]) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(self.index).u32(self.version).bytes(state);
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<(Self, &[u8]), WireError> {
        let mut r = Reader::new(b, "vCPU state");
        let h = Self {
            index: r.u32()?,
            version: r.u32()?,
        };
        let rest = r.bytes(r.remaining())?;
        Ok((h, rest))
    }

    /// The header's size: index and version.
    pub const LEN: usize = 8;

    /// For a reader that does not hold the whole frame: decodes the header from the
    /// frame's first [`Self::LEN`] bytes and returns it with the length of the state
    /// bytes that follow. `frame_len` must be at least the header (checked by
    /// [`Self::check_frame_len`] before those bytes are read).
    pub fn decode_fixed(b: &[u8; Self::LEN], frame_len: u32) -> Result<(Self, u32), WireError> {
        Self::check_frame_len(frame_len)?;
        let (h, _) = Self::decode(b)?;
        Ok((h, frame_len - Self::LEN as u32))
    }

    /// Refuses a vCPU-state frame too short to hold its header.
    pub fn check_frame_len(frame_len: u32) -> Result<(), WireError> {
        if (frame_len as usize) < Self::LEN {
            return Err(WireError::Truncated {
                what: "vCPU state",
                offset: frame_len as usize,
                needed: Self::LEN - frame_len as usize,
            });
        }
        Ok(())
    }
}

/// The last frame of a stream: what the destination must have to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndOfStream {
    /// Sum of the per-page terms of every page as last sent (see `engine::digest`).
    pub digest: Option<u64>,
    /// Digest of all of guest memory at switchover, when full verification was asked.
    pub full_digest: Option<u64>,
    /// Pages (zero or not) sent over the whole migration.
    pub pages_sent: u64,
    /// The guest was running at the source: resume it at the destination. A guest the
    /// user had stopped arrives stopped.
    pub resume: bool,
}

impl EndOfStream {
    const DIGEST: u8 = 1;
    const FULL_DIGEST: u8 = 2;
    const RESUME: u8 = 4;

    pub const LEN: usize = 25;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        let mut flags = 0;
        if self.digest.is_some() {
            flags |= Self::DIGEST;
        }
        if self.full_digest.is_some() {
            flags |= Self::FULL_DIGEST;
        }
        if self.resume {
            flags |= Self::RESUME;
        }
        w.u8(flags)
            .u64(self.digest.unwrap_or(0))
            .u64(self.full_digest.unwrap_or(0))
            .u64(self.pages_sent);
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "end of stream");
        let flags = r.u8()?;
        if flags & !(Self::DIGEST | Self::FULL_DIGEST | Self::RESUME) != 0 {
            return Err(WireError::BadValue {
                what: "end of stream flags",
                value: flags.into(),
            });
        }
        let digest = r.u64()?;
        let full = r.u64()?;
        let pages_sent = r.u64()?;
        r.finish()?;
        Ok(Self {
            digest: (flags & Self::DIGEST != 0).then_some(digest),
            full_digest: (flags & Self::FULL_DIGEST != 0).then_some(full),
            pages_sent,
            resume: flags & Self::RESUME != 0,
        })
    }
}

/// A multifd sync point on the main channel: every data channel has sent a sync
/// packet with this sequence number, and the destination applies no page that follows
/// it on any channel until every channel has reached it (see [`crate::wire`]). `last`
/// closes the data channels: the final pass is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultifdSync {
    pub seq: u64,
    pub last: bool,
}

impl MultifdSync {
    pub const LEN: usize = 9;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.seq).bool(self.last);
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "multifd sync");
        let v = Self {
            seq: r.u64()?,
            last: r.bool()?,
        };
        r.finish()?;
        if v.seq == 0 {
            return Err(WireError::BadValue {
                what: "multifd sync number",
                value: 0,
            });
        }
        Ok(v)
    }
}

/// Return path: every data channel the hello announced is bound to this migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelsReady {
    pub count: u16,
}

impl ChannelsReady {
    pub const LEN: usize = 2;

    pub fn encode(&self) -> Vec<u8> {
        self.count.to_le_bytes().to_vec()
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "channels ready");
        let count = r.u16()?;
        r.finish()?;
        Ok(Self { count })
    }
}

/// A keepalive, either way ([`FrameTag::Keepalive`] from the source,
/// [`FrameTag::KeepaliveReturn`] from the destination): "still here", and the silence
/// its sender allows, so the other side knows how often to send its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub limit_ms: u32,
}

impl Keepalive {
    pub const LEN: usize = 4;

    pub fn encode(&self) -> Vec<u8> {
        self.limit_ms.to_le_bytes().to_vec()
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "keepalive");
        let limit_ms = r.u32()?;
        r.finish()?;
        Ok(Self { limit_ms })
    }
}

/// One device of the hello's list, by name and instance: what
/// [`FrameTag::PrecopyInitDone`] (source to destination: the device's initial precopy
/// data is all sent) and [`FrameTag::SwitchoverAck`] (destination to source: it has all
/// loaded, so the switchover may come) carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRef {
    pub name: String,
    pub instance: u32,
}

impl DeviceRef {
    pub const MAX_LEN: usize = 2 + MAX_NAME_LEN + 4;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.str16(&self.name, MAX_NAME_LEN).u32(self.instance);
        w.buf
    }

    pub fn decode(b: &[u8], what: &'static str) -> Result<Self, WireError> {
        let mut r = Reader::new(b, what);
        let v = Self {
            name: r.str16(MAX_NAME_LEN)?,
            instance: r.u32()?,
        };
        r.finish()?;
        Ok(v)
    }
}

impl std::fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} instance {}", self.name, self.instance)
    }
}

/// Why a device's state moves at the switchover only, as a [`DevicePlan`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopCopyWhy {
    /// The source's host cannot precopy the device (no hello offer).
    SourceHost,
    /// The destination's host cannot precopy it.
    DestinationHost,
    /// Neither host can.
    NeitherHost,
    /// Both hosts can, but the destination cannot load the precopy records the source
    /// writes (another record format or version).
    RecordFormat,
    /// A reason this release does not know (sent by a newer peer).
    Other(u8),
}

impl StopCopyWhy {
    pub fn code(self) -> u8 {
        match self {
            Self::SourceHost => 1,
            Self::DestinationHost => 2,
            Self::NeitherHost => 3,
            Self::RecordFormat => 4,
            Self::Other(c) => c,
        }
    }

    pub fn from_code(c: u8) -> Self {
        match c {
            1 => Self::SourceHost,
            2 => Self::DestinationHost,
            3 => Self::NeitherHost,
            4 => Self::RecordFormat,
            c => Self::Other(c),
        }
    }
}

impl std::fmt::Display for StopCopyWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SourceHost => f.write_str("the source host cannot precopy it"),
            Self::DestinationHost => f.write_str("the destination host cannot precopy it"),
            Self::NeitherHost => f.write_str("neither host can precopy it"),
            Self::RecordFormat => {
                f.write_str("the destination cannot load the precopy records the source writes")
            }
            Self::Other(c) => write!(f, "reason {c}"),
        }
    }
}

/// How one device's state moves in this migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMode {
    /// Precopy records while the guest runs, the rest at the switchover; the destination
    /// acknowledges the device once its initial data has loaded, and the source does
    /// not stop the guest before it has.
    Precopy,
    /// All of its state at the switchover.
    StopCopy(StopCopyWhy),
}

/// Return path, after [`Accept`] when `migration.switchover-ack` is on: how each device
/// of the hello's list moves, in the hello's order. The destination decides, from the
/// source's offers (hello annotations) and its own host; the source then waits for the
/// acknowledgement of exactly the devices marked [`DeviceMode::Precopy`], so neither
/// side waits for a message the other will never send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    pub modes: Vec<DeviceMode>,
}

impl DevicePlan {
    pub const MAX_LEN: usize = 2 + 2 * MAX_DEVICES;
    const PRECOPY: u8 = 1;
    const STOP_COPY: u8 = 0;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(self.modes.len() as u16);
        for m in &self.modes {
            match m {
                DeviceMode::Precopy => w.u8(Self::PRECOPY).u8(0),
                DeviceMode::StopCopy(why) => w.u8(Self::STOP_COPY).u8(why.code()),
            };
        }
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "device plan");
        let n = r.u16()?;
        let n = r.count(n.into(), MAX_DEVICES, 2)?;
        let mut modes = Vec::with_capacity(n);
        for _ in 0..n {
            let mode = r.u8()?;
            let why = r.u8()?;
            modes.push(match (mode, why) {
                (Self::PRECOPY, 0) => DeviceMode::Precopy,
                (Self::STOP_COPY, 0) => {
                    return Err(WireError::BadValue {
                        what: "device plan stop-copy reason",
                        value: 0,
                    })
                }
                (Self::STOP_COPY, why) => DeviceMode::StopCopy(StopCopyWhy::from_code(why)),
                (m, _) => {
                    return Err(WireError::BadValue {
                        what: "device plan mode",
                        value: m.into(),
                    })
                }
            });
        }
        r.finish()?;
        Ok(Self { modes })
    }
}

/// The last frame before [`EndOfStream`] when `migration.state-digest` is on: a digest
/// of every device-state, precopy-record and vCPU-state frame's payload, in stream
/// order, which the destination recomputes as it reads them and checks before it
/// resumes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateDigest {
    /// xxh3-64 of the payloads, one after another.
    pub digest: u64,
    /// How many frames went into it.
    pub frames: u64,
}

impl StateDigest {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.digest).u64(self.frames);
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "state digest");
        let v = Self {
            digest: r.u64()?,
            frames: r.u64()?,
        };
        r.finish()?;
        Ok(v)
    }
}

/// The destination runs the guest now; what its side cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// From receiving the end of stream to the guest running, in microseconds.
    pub resume_us: u64,
    /// Microseconds spent loading device and vCPU state.
    pub state_load_us: u64,
    /// Pages written into guest memory.
    pub pages_written: u64,
}

impl Completed {
    pub const LEN: usize = 24;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.resume_us)
            .u64(self.state_load_us)
            .u64(self.pages_written);
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "completed");
        let v = Self {
            resume_us: r.u64()?,
            state_load_us: r.u64()?,
            pages_written: r.u64()?,
        };
        r.finish()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            session_id: 0x1122_3344_5566_7788,
            release: "0.1.0".into(),
            machine: "ferry-0.1".into(),
            page_size: 4096,
            flags: Hello::FLAG_FULL_VERIFY,
            wire_props: vec![("migration.digest".into(), "on".into())],
            compat_pinned: vec!["migration.digest".into()],
            ram_blocks: vec![HelloRamBlock {
                name: "ram".into(),
                gpa: 0,
                size: 1 << 30,
            }],
            vcpu_count: 2,
            vcpu_state: "soft-vcpu".into(),
            vcpu_version: 1,
            devices: vec![HelloDevice {
                name: "soft-console".into(),
                instance: 0,
                version: 1,
            }],
            channels: 4,
            compression: Compression::Zstd,
        }
    }

    #[test]
    fn stream_header_is_sixteen_fixed_bytes() {
        let b = StreamHeader { version: 1 }.encode();
        assert_eq!(&b[..8], b"FERRYMIG");
        assert_eq!(b[8..], [1, 0, 0, 0, 16, 0, 0, 0]);
        assert_eq!(StreamHeader::decode(&b).unwrap().version, 1);
    }

    #[test]
    fn stream_header_refuses_other_magic() {
        let mut b = StreamHeader { version: 1 }.encode();
        b[0] = b'Q';
        assert!(matches!(
            StreamHeader::decode(&b),
            Err(WireError::BadMagic(_))
        ));
    }

    #[test]
    fn frame_header_bounds_length_per_tag() {
        let h = FrameHeader {
            tag: FrameTag::PassEnd,
            len: 13,
        };
        assert!(matches!(
            FrameHeader::decode(&h.encode()),
            Err(WireError::TooLong { .. })
        ));
        let mut b = h.encode();
        b[0] = 0x55;
        assert_eq!(FrameHeader::decode(&b), Err(WireError::UnknownFrame(0x55)));
    }

    #[test]
    fn hello_round_trips_and_refuses_every_truncation() {
        let h = hello();
        let b = h.encode();
        assert_eq!(Hello::decode(&b).unwrap(), h);
        for n in 0..b.len() {
            assert!(Hello::decode(&b[..n]).is_err(), "truncated at {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            Hello::decode(&long),
            Err(WireError::Trailing { .. })
        ));
    }

    #[test]
    fn ram_batch_entries_are_checked_against_block_and_frame() {
        let hdr = RamBatchHeader { block: 0, count: 2 };
        let mut e = Vec::new();
        e.extend_from_slice(&RamBatchHeader::entry(5, false).to_le_bytes());
        e.extend_from_slice(&RamBatchHeader::entry(6, true).to_le_bytes());
        let len = (8 + 16 + PAGE_SIZE) as u32;
        let mut out = Vec::new();
        assert_eq!(hdr.decode_entries(&e, len, 10, &mut out).unwrap(), 1);
        assert_eq!(out, vec![(5, false), (6, true)]);
        assert!(
            hdr.decode_entries(&e, len, 6, &mut out).is_err(),
            "index out of block"
        );
        assert!(
            hdr.decode_entries(&e, len + 1, 10, &mut out).is_err(),
            "length mismatch"
        );
        let over = RamBatchHeader {
            block: 0,
            count: MAX_BATCH_PAGES as u32 + 1,
        };
        assert!(RamBatchHeader::decode(&over.encode(), u32::MAX).is_err());
    }

    #[test]
    fn ram_batch_header_refuses_lengths_that_are_not_whole_pages_of_its_entries() {
        let hdr = RamBatchHeader { block: 0, count: 2 };
        let fixed = (8 + 16) as u32;
        let page = PAGE_SIZE as u32;
        for ok in [fixed, fixed + page, fixed + 2 * page] {
            assert_eq!(RamBatchHeader::decode(&hdr.encode(), ok), Ok(hdr), "{ok}");
        }
        for bad in [
            fixed + 1,
            fixed + page - 1,
            fixed + page + 8,
            fixed + 3 * page,
        ] {
            assert!(
                RamBatchHeader::decode(&hdr.encode(), bad).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn unknown_refuse_causes_survive_as_other() {
        let r = Refuse {
            cause: RefuseCause::Other(999),
            reason: "newer".into(),
        };
        assert_eq!(Refuse::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn end_of_stream_round_trips_optional_digests() {
        for e in [
            EndOfStream {
                digest: Some(7),
                full_digest: None,
                pages_sent: 9,
                resume: true,
            },
            EndOfStream {
                digest: None,
                full_digest: Some(1),
                pages_sent: 0,
                resume: false,
            },
        ] {
            let b = e.encode();
            assert_eq!(b.len(), EndOfStream::LEN);
            assert_eq!(EndOfStream::decode(&b).unwrap(), e);
        }
    }
}
