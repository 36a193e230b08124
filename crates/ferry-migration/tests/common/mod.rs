//! A tiny VM for driving the engine in tests, and helpers to read and build migration
//! streams byte by byte.
//!
//! Shared by `tests/destination_stream.rs`, `tests/compat_matrix.rs` and the fuzz targets
//! (which include this file with `#[path]`), so it uses nothing but `std` and
//! `ferry-migration` with its `testing` feature (its RAM is the kit's `HeapRam`). Each user
//! needs a different part of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::engine::vm::{DeviceInfo, DirtyLog, GuestRam, MigratableVm, VmError};
use ferry_migration::engine::{
    Channel, Connector, DestinationIdentity, MigrationParams, SourceIdentity, StreamRole,
};
use ferry_migration::state::{
    DeviceState, FieldKind, FieldSchema, StateReader, StateSchema, StateWriter, SubsectionSchema,
    SubsectionState, Value,
};
use ferry_migration::testing::HeapRam;
use ferry_migration::wire::{
    FrameHeader, FrameTag, Hello, HelloDevice, HelloRamBlock, StreamHeader, PROTOCOL_VERSION,
};
use ferry_migration::PAGE_SIZE;

pub const MACHINE: &str = "ferry-test-1";
pub const RELEASE: &str = "streamfuzz";

/// The one vCPU's state. Version 2 added `tsc`; version 1 streams still load.
pub static VCPU_SCHEMA: StateSchema = StateSchema {
    name: "test-vcpu",
    version: 2,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "rip",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "rsp",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "rflags",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "gprs",
            kind: FieldKind::Array { len: 64 },
            since: 1,
        },
        FieldSchema {
            name: "tsc",
            kind: FieldKind::U64,
            since: 2,
        },
    ],
    subsections: &[],
};

/// A serial port with a subsection for an interrupt that is pending at save time.
pub static UART_SCHEMA: StateSchema = StateSchema {
    name: "test-uart",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "ier",
            kind: FieldKind::U8,
            since: 1,
        },
        FieldSchema {
            name: "lcr",
            kind: FieldKind::U8,
            since: 1,
        },
        FieldSchema {
            name: "rx",
            kind: FieldKind::Bytes { max_len: 16 },
            since: 1,
        },
    ],
    subsections: &[SubsectionSchema {
        name: "test-uart/irq",
        version: 1,
        fields: &[
            FieldSchema {
                name: "line",
                kind: FieldKind::U32,
                since: 1,
            },
            FieldSchema {
                name: "level",
                kind: FieldKind::Bool,
                since: 1,
            },
        ],
        needed_when: "an interrupt is pending when the device is saved",
    }],
};

/// A timer. Its load refuses a running timer with a zero period, so a state that decodes
/// can still fail to load.
pub static TIMER_SCHEMA: StateSchema = StateSchema {
    name: "test-timer",
    version: 2,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "period_ns",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "enabled",
            kind: FieldKind::Bool,
            since: 1,
        },
        FieldSchema {
            name: "id",
            kind: FieldKind::Array { len: 8 },
            since: 1,
        },
        FieldSchema {
            name: "deadline_ns",
            kind: FieldKind::U64,
            since: 2,
        },
    ],
    subsections: &[],
};

/// The devices of every test VM, in [`MigratableVm::devices`] order.
pub fn device_infos() -> Vec<DeviceInfo> {
    vec![
        DeviceInfo {
            name: UART_SCHEMA.name.into(),
            instance: 0,
            schema: &UART_SCHEMA,
            config: Vec::new(),
            precopy: None,
        },
        DeviceInfo {
            name: TIMER_SCHEMA.name.into(),
            instance: 3,
            schema: &TIMER_SCHEMA,
            config: Vec::new(),
            precopy: None,
        },
    ]
}

/// RAM blocks as `(name, guest-physical address, pages)`.
pub type RamLayout = &'static [(&'static str, u64, usize)];

/// The layout the tests migrate: 2 MiB and 512 KiB.
pub const TEST_LAYOUT: RamLayout = &[("ram0", 0, 512), ("ram1", 1 << 32, 128)];
/// A smaller layout for the fuzz target, where every execution builds a VM.
pub const FUZZ_LAYOUT: RamLayout = &[("ram0", 0, 32), ("ram1", 1 << 32, 8)];

/// Guest RAM of the test VM: the testing kit's heap RAM.
pub type TestRam = HeapRam;

/// A write the source's guest makes during the migration: `(block, page, content seed)`;
/// `None` zeroes the page.
pub type GuestWrite = (usize, usize, Option<u64>);

/// What the source's guest does while it is migrated, so the stream has several passes,
/// pages sent more than once, pages that became zero and a non-empty final pass.
#[derive(Debug, Default, Clone)]
pub struct Script {
    /// Writes made just before harvest round `i` (0-based) looks at the log.
    pub on_harvest: Vec<Vec<GuestWrite>>,
    /// Writes made as the guest stops, picked up by the final pass.
    pub on_pause: Vec<GuestWrite>,
}

/// What a destination did with what it received.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub vcpu_loads: Vec<u32>,
    pub device_loads: Vec<u32>,
    pub vcpus: Vec<Option<DeviceState>>,
    pub devices: Vec<Option<DeviceState>>,
    pub resumes: u32,
    /// `resume` came before every device and vCPU had loaded exactly once.
    pub resumed_incomplete: bool,
    /// A load came after `resume`.
    pub loaded_after_resume: bool,
}

/// The tiny VM: heap RAM, one vCPU, a UART and a timer.
pub struct TestVm {
    ram: Arc<TestRam>,
    logging: AtomicBool,
    dirty: Vec<DirtyBitmap>,
    running: AtomicBool,
    script: Mutex<(usize, Script)>,
    vcpu: DeviceState,
    devices: Vec<DeviceState>,
    record: Mutex<Record>,
}

impl TestVm {
    /// A paused VM with zeroed RAM, as a destination is created.
    pub fn destination(layout: RamLayout) -> Self {
        Self::new(layout, false, Script::default())
    }

    /// A running VM whose guest has made the `initial` writes, with the device states of
    /// [`source_vcpu_state`] and [`source_device_states`].
    pub fn source(layout: RamLayout, initial: &[GuestWrite], script: Script) -> Self {
        let vm = Self::new(layout, true, script);
        for &w in initial {
            vm.guest_write(w);
        }
        vm
    }

    fn new(layout: RamLayout, running: bool, script: Script) -> Self {
        let ram = TestRam::new(layout);
        let dirty = ram
            .blocks()
            .iter()
            .map(|b| DirtyBitmap::new(b.pages()))
            .collect();
        let n = device_infos().len();
        Self {
            ram: Arc::new(ram),
            logging: AtomicBool::new(false),
            dirty,
            running: AtomicBool::new(running),
            script: Mutex::new((0, script)),
            vcpu: source_vcpu_state(),
            devices: source_device_states(),
            record: Mutex::new(Record {
                vcpu_loads: vec![0; 1],
                device_loads: vec![0; n],
                vcpus: vec![None; 1],
                devices: vec![None; n],
                ..Record::default()
            }),
        }
    }

    pub fn test_ram(&self) -> &TestRam {
        &self.ram
    }

    /// A guest store: writes the page and logs it dirty if tracking is on.
    pub fn guest_write(&self, (block, page, seed): GuestWrite) {
        match seed {
            Some(s) => self.ram.write_page(block, page, Some(&page_pattern(s))),
            None => self.ram.write_page(block, page, None),
        }
        if self.logging.load(Ordering::SeqCst) {
            self.dirty[block].set(page);
        }
    }

    pub fn record(&self) -> Record {
        self.record.lock().unwrap().clone()
    }

    pub fn resumed(&self) -> bool {
        self.record.lock().unwrap().resumes > 0
    }

    /// What must hold of a destination whatever it was sent: at most one resume, and only
    /// after every device and vCPU loaded exactly once, with nothing loaded afterwards.
    pub fn check_invariants(&self) -> Result<(), String> {
        let r = self.record.lock().unwrap();
        if r.resumes > 1 {
            return Err(format!("resumed {} times", r.resumes));
        }
        if r.resumed_incomplete {
            return Err(format!(
                "resumed with vCPU loads {:?} and device loads {:?}",
                r.vcpu_loads, r.device_loads
            ));
        }
        if r.loaded_after_resume {
            return Err("state loaded after the guest was resumed".into());
        }
        Ok(())
    }

    fn note_load(&self, r: &mut Record) {
        if r.resumes > 0 {
            r.loaded_after_resume = true;
        }
    }
}

impl DirtyLog for TestVm {
    fn start(&self) -> Result<(), VmError> {
        self.logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn stop(&self) {
        self.logging.store(false, Ordering::SeqCst);
    }

    fn harvest(&self, block: usize, into: &DirtyBitmap) -> Result<(), VmError> {
        if block == 0 {
            // The guest writes between two harvest rounds.
            let writes = {
                let mut s = self.script.lock().unwrap();
                let round = s.0;
                s.0 += 1;
                s.1.on_harvest.get(round).cloned().unwrap_or_default()
            };
            for w in writes {
                self.guest_write(w);
            }
        }
        self.dirty[block].drain_into(into);
        Ok(())
    }

    fn restore(&self, block: usize, pages: &DirtyBitmap) {
        self.dirty[block].or_from(pages);
    }
}

impl MigratableVm for TestVm {
    fn ram(&self) -> Arc<dyn GuestRam> {
        self.ram.clone()
    }

    fn dirty_log(&self) -> &dyn DirtyLog {
        self
    }

    fn vcpu_count(&self) -> usize {
        1
    }

    fn vcpu_schema(&self) -> &'static StateSchema {
        &VCPU_SCHEMA
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        device_infos()
    }

    fn pause(&self) -> Result<(), VmError> {
        let writes = self.script.lock().unwrap().1.on_pause.clone();
        for w in writes {
            self.guest_write(w);
        }
        self.running.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        let mut r = self.record.lock().unwrap();
        r.resumes += 1;
        if r.vcpu_loads.iter().chain(&r.device_loads).any(|&n| n != 1) {
            r.resumed_incomplete = true;
        }
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    fn save_vcpu(&self, index: usize) -> Result<DeviceState, VmError> {
        assert_eq!(index, 0);
        Ok(self.vcpu.clone())
    }

    fn load_vcpu(&self, index: usize, state: DeviceState) -> Result<(), VmError> {
        let mut r = self.record.lock().unwrap();
        self.note_load(&mut r);
        // The engine must have bounded the index by `vcpu_count`.
        r.vcpu_loads[index] += 1;
        state.get_u64("rip")?;
        state.get_bytes("gprs")?;
        r.vcpus[index] = Some(state);
        Ok(())
    }

    fn save_device(&self, index: usize, out: &mut StateWriter<'_>) -> Result<(), VmError> {
        out.write_state(&self.devices[index])?;
        Ok(())
    }

    fn load_device(&self, index: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        let state = input.read_state()?;
        let mut r = self.record.lock().unwrap();
        self.note_load(&mut r);
        r.device_loads[index] += 1;
        match index {
            0 => {
                state.get_u8("lcr")?;
                if let Some(irq) = state.subsection("test-uart/irq") {
                    irq.get_u32("line")?;
                }
            }
            _ => {
                if state.get_bool("enabled")? && state.get_u64("period_ns")? == 0 {
                    return Err(VmError::Failed(
                        "test-timer: enabled with a zero period".into(),
                    ));
                }
            }
        }
        r.devices[index] = Some(state);
        Ok(())
    }
}

/// A page of bytes that differ from every other seed's page and from byte to byte.
pub fn page_pattern(seed: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in p.chunks_exact_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    p
}

pub fn source_vcpu_state() -> DeviceState {
    DeviceState::new()
        .with("rip", Value::U64(0xffff_ffff_8100_0000))
        .with("rsp", Value::U64(0x7ffc_0000_1000))
        .with("rflags", Value::U64(0x202))
        .with("gprs", Value::Bytes((0..64).collect()))
        .with("tsc", Value::U64(123_456_789))
}

pub fn source_device_states() -> Vec<DeviceState> {
    vec![
        DeviceState::new()
            .with("ier", Value::U8(0x0f))
            .with("lcr", Value::U8(0x03))
            .with("rx", Value::Bytes(b"ok\n".to_vec()))
            .with_subsection(
                SubsectionState::new("test-uart/irq")
                    .with("line", Value::U32(4))
                    .with("level", Value::Bool(true)),
            ),
        DeviceState::new()
            .with("period_ns", Value::U64(1_000_000))
            .with("enabled", Value::Bool(true))
            .with("id", Value::Bytes(b"timer-03".to_vec()))
            .with("deadline_ns", Value::U64(42_000_000)),
    ]
}

/// The parameters of the wire these tests record and replay: machine type ferry-0.1's,
/// which release 0.1.0 speaks (a multifd sync after every section, no device precopy,
/// no state digest), with everything else at its default. The frames 0.2 adds are
/// exercised where a device can precopy: ferry-vmm's in-process and two-process tests.
pub fn wire_0_1(p: MigrationParams) -> MigrationParams {
    MigrationParams {
        multifd_flush_after_each_section: true,
        switchover_ack: false,
        state_digest: false,
        populate_ahead: false,
        ..p
    }
}

/// What a source with the parameters of [`wire_0_1`] states in its hello.
pub fn wire_props() -> Vec<(String, String)> {
    wire_0_1(MigrationParams::default()).stated_wire_properties(&[])
}

pub fn source_identity() -> SourceIdentity {
    SourceIdentity {
        release: RELEASE.into(),
        machine: MACHINE.into(),
        wire_props: wire_props(),
        compat_pinned: Vec::new(),
    }
}

pub fn destination_identity() -> DestinationIdentity {
    DestinationIdentity {
        release: RELEASE.into(),
        machine: MACHINE.into(),
        known_machines: vec!["ferry-test-0".into(), MACHINE.into()],
        wire_props: wire_props(),
        compat_pinned: Vec::new(),
    }
}

/// The destination's parameters: [`wire_0_1`]'s, digest on.
pub fn destination_params() -> MigrationParams {
    wire_0_1(MigrationParams::default())
}

/// The hello a source of `layout` sends.
pub fn hello(layout: RamLayout, full_verify: bool) -> Hello {
    let mut h = Hello {
        session_id: 0x5eed_0000_0000_0001,
        release: RELEASE.into(),
        machine: MACHINE.into(),
        page_size: PAGE_SIZE as u32,
        flags: if full_verify {
            Hello::FLAG_FULL_VERIFY
        } else {
            0
        },
        wire_props: wire_props(),
        compat_pinned: Vec::new(),
        ram_blocks: layout
            .iter()
            .map(|&(name, gpa, pages)| HelloRamBlock {
                name: name.into(),
                gpa,
                size: (pages * PAGE_SIZE) as u64,
            })
            .collect(),
        vcpu_count: 1,
        vcpu_state: VCPU_SCHEMA.name.into(),
        vcpu_version: VCPU_SCHEMA.version,
        channels: 0,
        compression: ferry_migration::wire::Compression::None,
        devices: device_infos()
            .iter()
            .map(|d| HelloDevice {
                name: d.name.clone(),
                instance: d.instance,
                version: d.schema.version,
            })
            .collect(),
    };
    // As the engine's source: it keeps the switchover commitment and sends keepalives
    // (with migration.liveness-timeout's default).
    ferry_migration::wire::Annotations {
        switchover_commit: true,
        liveness_ms: Some(5000),
        ..Default::default()
    }
    .apply(&mut h);
    h
}

/// The stream header and a hello frame: what precedes RAM on every stream.
pub fn stream_prefix(hello: &Hello) -> Vec<u8> {
    let mut s = StreamHeader {
        version: PROTOCOL_VERSION,
    }
    .encode()
    .to_vec();
    s.extend(frame(FrameTag::Hello, &hello.encode()));
    s
}

/// A frame: header and payload.
pub fn frame(tag: FrameTag, payload: &[u8]) -> Vec<u8> {
    raw_frame(tag as u8, payload.len() as u32, payload)
}

/// A frame header with any tag and any length claim, then `payload` (which need not be
/// as long as the claim).
pub fn raw_frame(tag: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(FrameHeader::LEN + payload.len());
    f.push(tag);
    f.extend_from_slice(&[0, 0, 0]);
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Where one frame sits in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Offset of the frame header.
    pub start: usize,
    pub tag: FrameTag,
    pub len: usize,
}

impl Span {
    pub fn payload(&self) -> std::ops::Range<usize> {
        self.start + FrameHeader::LEN..self.end()
    }

    pub fn end(&self) -> usize {
        self.start + FrameHeader::LEN + self.len
    }
}

/// Splits a well-formed stream (header first) into its frames.
pub fn frames(stream: &[u8]) -> Vec<Span> {
    let mut out = Vec::new();
    let mut at = StreamHeader::LEN;
    while at < stream.len() {
        let h: &[u8; FrameHeader::LEN] = stream[at..at + FrameHeader::LEN]
            .try_into()
            .expect("a whole frame header");
        let fh = FrameHeader::decode(h).expect("a recorded frame header decodes");
        let span = Span {
            start: at,
            tag: fh.tag,
            len: fh.len as usize,
        };
        assert!(
            span.end() <= stream.len(),
            "frame at {at} runs past the end"
        );
        out.push(span);
        at = span.end();
    }
    out
}

/// The tests' connector, as an embedder writes its own: dials a TCP address or a unix
/// path (the engine never dials by itself).
#[derive(Debug, Clone)]
pub enum Dial {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl Connector for Dial {
    fn connect(&self, _: StreamRole) -> std::io::Result<Channel> {
        match self {
            Dial::Tcp(a) => {
                let s =
                    std::net::TcpStream::connect_timeout(a, std::time::Duration::from_secs(10))?;
                s.set_nodelay(true)?;
                Ok(Channel::new(s))
            }
            Dial::Unix(p) => Ok(Channel::new(std::os::unix::net::UnixStream::connect(p)?)),
        }
    }

    fn describe(&self) -> String {
        match self {
            Dial::Tcp(a) => format!("tcp:{a}"),
            Dial::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}
