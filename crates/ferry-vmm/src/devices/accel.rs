//! An accelerator-like device standing in for a VFIO device: device-side memory that the
//! VMM cannot track page by page, changed by the device while it runs, migrated through
//! the VFIO migration v2 state machine, with or without its PRE_COPY state.
//!
//! # The device
//!
//! `size` bytes of device memory (a non-zero multiple of 4 KiB, at most
//! [`ACCEL_MAX_SIZE`]) and a device thread that, while the device runs (RUNNING or
//! PRE_COPY), rewrites [`CHUNKS_PER_TICK`] 4 KiB chunks every millisecond (about
//! 64 MiB/s), in order, with a counter pattern: every `u64` of chunk `c` in generation
//! `g` holds `g << 32 | c` (generation 0 is the all-zero memory the device starts with).
//! At any moment the chunks below `cursor` hold generation `generation + 1` and the
//! others `generation`, which [`Accel::check_pattern`] verifies. Like a real device's,
//! these writes are not in any dirty log of the VMM's: the device itself must say what
//! it changed.
//!
//! A VM may have several ([`Accels`]), each with a `driver` name (standing for the host
//! kernel driver that binds it, part of its configuration, so both sides must agree)
//! and a host capability `precopy` (standing for that driver's
//! `VFIO_MIGRATION_PRE_COPY` flag): `--accel SIZE,driver=NAME,precopy=on|off`
//! ([`AccelConfig`]). Whether a device can precopy is a property of the host, not of
//! the release, which is the case the switchover acknowledgement is negotiated per
//! device for.
//!
//! # Migration states (VFIO migration uAPI v2)
//!
//! ```text
//!             RUNNING <------> PRE_COPY           (PRE_COPY arcs: precopy=on only)
//!               ^  |              |
//!               |  v              v
//!  RESUMING <-> STOP <-------- STOP_COPY          any failed arc -> ERROR
//!                    --------->
//! ```
//!
//! | arc | what the device does |
//! |---|---|
//! | RUNNING -> STOP | stops and joins the device thread: the memory is frozen |
//! | STOP -> RUNNING | starts the device thread where it stopped |
//! | RUNNING -> PRE_COPY | starts tracking the chunks it rewrites; the thread runs on |
//! | PRE_COPY -> RUNNING | stops tracking |
//! | PRE_COPY -> STOP_COPY | stops the thread; what is left to send stays tracked |
//! | STOP -> STOP_COPY | opens the saving session (source, without precopy) |
//! | STOP_COPY -> STOP | ends it, after the state was read out |
//! | STOP -> RESUMING | opens the resuming session (destination) |
//! | RESUMING -> STOP | checks and installs the written state; a failed check ends in ERROR |
//!
//! [`Accel::set_state`] takes exactly these arcs, and the PRE_COPY ones only on a host
//! that can precopy the device (as a VFIO device without `VFIO_MIGRATION_PRE_COPY`
//! refuses them). Asking for the current state is a no-op, as in VFIO; any other
//! request is [`AccelError::InvalidTransition`], naming both states. ERROR is left by
//! nothing: VFIO's way out is a device reset, and a device that failed to load belongs
//! to a destination that never runs its guest.
//!
//! # How it migrates
//!
//! **Stop-copy** (a host without precopy, a peer or machine type without
//! switchover-ack): as QEMU drives a VFIO device without precopy support. The VM's pause
//! moves it RUNNING -> STOP; the source's save goes STOP -> STOP_COPY, streams the whole
//! state ([`ACCEL_SCHEMA`], memory included), and goes back to STOP (so a failed
//! migration can resume the device); the destination's load goes STOP -> RESUMING ->
//! STOP. This is exactly release 0.1's state.
//!
//! **Precopy** (both hosts can, and the peers agreed): the engine's `precopy_begin`
//! moves it RUNNING -> PRE_COPY; from then on it reports its initial bytes (the part
//! of memory its first sweep has not sent yet) and dirty bytes (chunks rewritten after
//! they were sent), and each `save_precopy` writes one record ([`ACCEL_PRECOPY_SCHEMA`]:
//! an offset and up to [`STREAM_CHUNK`] bytes of memory): first the sweep, then the
//! dirty runs. The VM's pause moves it PRE_COPY -> STOP_COPY; the records still pending
//! follow, and the final save writes [`ACCEL_SCHEMA`] with its `memory` field empty (the
//! records carried it), going to STOP. On the destination `precopy_begin` opens
//! RESUMING, records are written into the device's memory as they come, and the final
//! load installs the registers. A state with an empty `memory` is loaded only after
//! precopy, and a whole one only without, so a stream that mixes the two is refused.
//!
//! After precopy the `checksum` field is not a hash of all of memory (hashing 256 MiB
//! on each side would cost the downtime tens of milliseconds) but the device's own
//! incremental digest of what its records carried, as the engine's memory digest is for
//! RAM: each 4 KiB chunk contributes a term bound to its position, re-sending a chunk
//! replaces its term, and both sides keep the sum as records go out and come in. Equal
//! sums mean the destination applied exactly the last copy of every chunk the source
//! sent; that the source sent every chunk it rewrote is the tracking's job, which the
//! tests check against the device thread's pattern (and show failing with the tracking
//! broken on purpose).
//!
//! The records and the final state are read from and written to the device's memory
//! under its lock: the device thread waits at most one record (1 MiB, well under a
//! millisecond over loopback) and a chunk is never torn.
//!
//! # State
//!
//! [`ACCEL_SCHEMA`]: the device's registers, its memory (whole, or empty after
//! precopy) and an xxh3-64 checksum of the memory that the destination recomputes before
//! it accepts the state. The schema is static, so the memory field's `max_len` is
//! [`ACCEL_MAX_SIZE`], and a device larger than that cannot be configured.

use std::io;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_migration::engine::digest::{content_hash, PageDigest};
use ferry_migration::engine::vm::{DeviceInfo, DevicePending};
use ferry_migration::state::{
    FieldKind, FieldSchema, StateError, StateReader, StateSchema, StateWriter,
};
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

/// The largest device memory. A device's whole state travels in one device-state frame
/// of at most `wire::MAX_DEVICE_STATE_LEN` (1 GiB) bytes and the memory field's length
/// is a `u32`; half of that keeps the limit a power of two well inside the frame (the
/// state streams, so the limit is not about copies in memory).
pub const ACCEL_MAX_SIZE: u64 = 512 << 20;
/// The device memory of `ferry run --accel` given without a size.
pub const ACCEL_DEFAULT_SIZE: u64 = 256 << 20;
/// The driver of `ferry run --accel` given without one.
pub const ACCEL_DEFAULT_DRIVER: &str = "ferry-accel";
/// The unit the device thread rewrites, and tracks.
pub const CHUNK: usize = 4096;
/// The pieces the memory streams in during a migration, and the largest precopy
/// record: large enough that each is one vectored write of its own, small enough to
/// say "no second copy" truthfully.
pub const STREAM_CHUNK: usize = 1 << 20;
/// Chunks rewritten per [`TICK`].
pub const CHUNKS_PER_TICK: usize = 16;
/// The device thread's period.
pub const TICK: Duration = Duration::from_millis(1);
/// The state's bytes besides the memory: four u64 fields, the memory's length and the
/// subsection count.
const REGS_LEN: u64 = 8 * 4 + 4 + 1;

/// The accelerator's migratable state.
pub static ACCEL_SCHEMA: StateSchema = StateSchema {
    name: "accel",
    version: 1,
    min_version: 1,
    fields: &[
        // Bytes of device memory; the destination must have the same.
        FieldSchema {
            name: "size",
            kind: FieldKind::U64,
            since: 1,
        },
        // The device thread's registers: the generation it completed and the next chunk.
        FieldSchema {
            name: "generation",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "cursor",
            kind: FieldKind::U64,
            since: 1,
        },
        // All of the device memory, `size` bytes; empty after precopy, whose records
        // carried it.
        FieldSchema {
            name: "memory",
            kind: FieldKind::Bytes {
                max_len: ACCEL_MAX_SIZE as u32,
            },
            since: 1,
        },
        // xxh3-64 of all of the device memory; after precopy, the digest of the chunks
        // its records carried (see the module docs).
        FieldSchema {
            name: "checksum",
            kind: FieldKind::U64,
            since: 1,
        },
    ],
    subsections: &[],
};

/// One precopy record of the accelerator: a run of whole chunks of its memory.
pub static ACCEL_PRECOPY_SCHEMA: StateSchema = StateSchema {
    name: "accel-precopy",
    version: 1,
    min_version: 1,
    fields: &[
        // Byte offset of the run in device memory, a multiple of 4 KiB.
        FieldSchema {
            name: "offset",
            kind: FieldKind::U64,
            since: 1,
        },
        // Whole chunks, at most 1 MiB.
        FieldSchema {
            name: "data",
            kind: FieldKind::Bytes {
                max_len: STREAM_CHUNK as u32,
            },
            since: 1,
        },
    ],
    subsections: &[],
};

/// A state of the VFIO migration v2 state machine (values as in `linux/vfio.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    PreCopy = 6,
}

impl MigState {
    /// Every state this device has.
    pub const ALL: [MigState; 6] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::PreCopy,
    ];

    /// The state's name in `linux/vfio.h` (without `VFIO_DEVICE_STATE_`).
    pub fn as_str(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::PreCopy => "PRE_COPY",
        }
    }

    /// Whether `self -> to` is one of the single arcs of a device that supports
    /// PRE_COPY (see the module docs); a device without it has those not involving
    /// PRE_COPY.
    pub fn has_arc_to(self, to: MigState) -> bool {
        use MigState::*;
        matches!(
            (self, to),
            (Running, Stop)
                | (Stop, Running)
                | (Stop, StopCopy)
                | (StopCopy, Stop)
                | (Stop, Resuming)
                | (Resuming, Stop)
                | (Running, PreCopy)
                | (PreCopy, Running)
                | (PreCopy, StopCopy)
        )
    }

    /// Whether the device thread runs in this state.
    fn runs(self) -> bool {
        matches!(self, MigState::Running | MigState::PreCopy)
    }
}

impl std::fmt::Display for MigState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Error)]
pub enum AccelError {
    #[error(
        "accel: device memory of {size} bytes; it must be a non-zero multiple of 4 KiB of at most {} MiB",
        ACCEL_MAX_SIZE >> 20
    )]
    Size { size: u64 },
    #[error("accel: invalid transition {from} -> {to}")]
    InvalidTransition { from: MigState, to: MigState },
    #[error("accel: this host cannot precopy the device (driver {driver}, precopy=off)")]
    NoPrecopy { driver: String },
    #[error("accel: this incoming device has no state loaded, so it cannot run")]
    NotLoaded,
    #[error("accel: starting its device thread")]
    Thread(#[source] io::Error),
    #[error("accel: moving its state")]
    State(#[from] StateError),
    #[error("accel: the source's device has {sent} bytes of memory, this one {here}; give the destination the same --accel size")]
    SizeMismatch { sent: u64, here: u64 },
    #[error("accel: the state holds {len} bytes of memory, its size says {size}")]
    MemoryLength { len: usize, size: u64 },
    #[error("accel: cursor at chunk {cursor}, the memory has {chunks} chunks")]
    Cursor { cursor: u64, chunks: u64 },
    #[error("accel: memory checksum {computed:#018x} does not match the source's {sent:#018x}")]
    Checksum { sent: u64, computed: u64 },
    #[error("accel: a precopy record of {len} bytes at offset {offset} does not fit whole chunks of its {size}-byte memory")]
    Record { offset: u64, len: u64, size: u64 },
    #[error("accel: the final state came while {pending} bytes of precopy data were still unsent")]
    PrecopyPending { pending: u64 },
}

/// How one accelerator is configured: `--accel SIZE[,driver=NAME][,precopy=on|off]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelConfig {
    /// Bytes of device memory.
    pub size: u64,
    /// The host driver's name; both sides of a migration must have the same.
    pub driver: String,
    /// Whether this host's driver can precopy the device (VFIO's
    /// `VFIO_MIGRATION_PRE_COPY`): a property of the host, so the two sides may differ.
    pub precopy: bool,
}

impl Default for AccelConfig {
    fn default() -> Self {
        Self {
            size: ACCEL_DEFAULT_SIZE,
            driver: ACCEL_DEFAULT_DRIVER.into(),
            precopy: true,
        }
    }
}

impl AccelConfig {
    /// A device of `size` bytes, default driver, precopy as given.
    pub fn new(size: u64, precopy: bool) -> Self {
        Self {
            size,
            precopy,
            ..Self::default()
        }
    }
}

impl FromStr for AccelConfig {
    type Err = String;

    /// `SIZE`, `SIZE,driver=NAME,precopy=off`, `driver=NAME` (default size), in any
    /// order after the size.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut cfg = AccelConfig::default();
        for (i, part) in s.split(',').enumerate() {
            match part.split_once('=') {
                Some(("driver", v)) => {
                    if v.is_empty()
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    {
                        return Err(format!(
                            "accelerator driver {v:?}: use letters, digits, '-', '_' and '.'"
                        ));
                    }
                    cfg.driver = v.into();
                }
                Some(("precopy", v)) => {
                    cfg.precopy = match v {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(format!("accelerator precopy={v:?}: use on or off")),
                    }
                }
                Some(("size", v)) => cfg.size = parse_accel_size(v)?,
                Some((k, _)) => {
                    return Err(format!(
                        "accelerator option {k:?}: the options are size, driver and precopy"
                    ))
                }
                None if i == 0 => cfg.size = parse_accel_size(part)?,
                None => {
                    return Err(format!(
                        "accelerator option {part:?}: expected SIZE[,driver=NAME][,precopy=on|off]"
                    ))
                }
            }
        }
        Ok(cfg)
    }
}

fn parse_accel_size(v: &str) -> Result<u64, String> {
    ferry_migration::compat::parse_size(v).map_err(|e| format!("accelerator size {v:?}: {e}"))
}

impl std::fmt::Display for AccelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{},driver={},precopy={}",
            exact_size(self.size),
            self.driver,
            if self.precopy { "on" } else { "off" }
        )
    }
}

/// What `x-ferry-accel` reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AccelInfo {
    /// The migration state, as in `linux/vfio.h`.
    pub state: &'static str,
    pub size: u64,
    pub driver: String,
    /// Whether this host can precopy it.
    pub precopy: bool,
    /// xxh3-64 of the device memory now, as 16 hex digits.
    pub digest: String,
    pub generation: u64,
    pub cursor: u64,
    /// The checksum of the last state read out at stop-copy (a source's), if any.
    pub saved_digest: Option<String>,
    /// The checksum of the last state loaded (a destination's), verified against its
    /// memory before the device could run again, if any.
    pub loaded_digest: Option<String>,
}

fn hex(digest: u64) -> String {
    format!("{digest:016x}")
}

/// What a device in precopy has still to send: the first sweep's progress and the
/// chunks rewritten after they were sent, and the digest of what its records carried.
#[derive(Debug)]
struct Track {
    /// Chunks below this were sent by the first sweep.
    swept: u64,
    /// One bit per chunk rewritten since it was last sent.
    dirty: Vec<u64>,
    dirty_count: u64,
    sent: PageDigest,
    /// Test switch: forget rewritten chunks, as a device whose tracking is broken would.
    #[cfg(test)]
    lose_dirty: bool,
}

impl Track {
    fn new(chunks: u64) -> Self {
        Self {
            swept: 0,
            dirty: vec![0; chunks.div_ceil(64) as usize],
            dirty_count: 0,
            sent: PageDigest::new(&[chunks as usize]),
            #[cfg(test)]
            lose_dirty: false,
        }
    }

    fn mark(&mut self, chunk: u64) {
        #[cfg(test)]
        if self.lose_dirty {
            return;
        }
        let (w, b) = ((chunk / 64) as usize, chunk % 64);
        if self.dirty[w] & (1 << b) == 0 {
            self.dirty[w] |= 1 << b;
            self.dirty_count += 1;
        }
    }

    /// Takes the first run of dirty chunks, at most `max` long: `(first, count)`.
    fn take_run(&mut self, max: u64) -> Option<(u64, u64)> {
        let w = self.dirty.iter().position(|&w| w != 0)?;
        let first = w as u64 * 64 + u64::from(self.dirty[w].trailing_zeros());
        let mut n = 0;
        while n < max {
            let c = first + n;
            let (w, b) = ((c / 64) as usize, c % 64);
            if w >= self.dirty.len() || self.dirty[w] & (1 << b) == 0 {
                break;
            }
            self.dirty[w] &= !(1 << b);
            n += 1;
        }
        self.dirty_count -= n;
        Some((first, n))
    }
}

/// The device memory and the device thread's registers.
#[derive(Debug)]
struct Memory {
    bytes: Vec<u8>,
    generation: u64,
    cursor: u64,
    /// Set while the device is in precopy (PRE_COPY, and STOP_COPY after it).
    track: Option<Track>,
    /// A destination's device taking precopy records: the digest of what they carried.
    received: Option<PageDigest>,
}

/// The value of every `u64` of chunk `chunk` in generation `generation`.
fn word(generation: u64, chunk: u64) -> u64 {
    if generation == 0 {
        0
    } else {
        generation << 32 | chunk
    }
}

impl Memory {
    fn chunks(&self) -> u64 {
        (self.bytes.len() / CHUNK) as u64
    }

    /// The device thread's work: the next `n` chunks in the next generation.
    fn advance(&mut self, n: usize) {
        for _ in 0..n {
            let w = word(self.generation + 1, self.cursor).to_le_bytes();
            let start = self.cursor as usize * CHUNK;
            for dst in self.bytes[start..start + CHUNK].chunks_exact_mut(8) {
                dst.copy_from_slice(&w);
            }
            // A chunk the first sweep has not reached yet goes with the sweep as it is
            // then; one it has passed must go again.
            if let Some(t) = self.track.as_mut() {
                if self.cursor < t.swept {
                    t.mark(self.cursor);
                }
            }
            self.cursor += 1;
            if self.cursor == self.chunks() {
                self.cursor = 0;
                self.generation += 1;
            }
        }
    }

    fn pending(&self) -> DevicePending {
        let size = self.bytes.len() as u64;
        match &self.track {
            Some(t) => {
                let initial = (self.chunks() - t.swept) * CHUNK as u64;
                let dirty = t.dirty_count * CHUNK as u64;
                DevicePending::precopy(initial, dirty, initial + dirty + REGS_LEN)
            }
            None => DevicePending::stop_copy(size + REGS_LEN),
        }
    }
}

/// What the device thread shares with the device.
#[derive(Debug)]
struct Shared {
    mem: Mutex<Memory>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Shared {
    fn mem(&self) -> MutexGuard<'_, Memory> {
        // Every update of `Memory` leaves it consistent chunk by chunk.
        self.mem.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
struct Ctl {
    state: MigState,
    thread: Option<JoinHandle<()>>,
    /// An incoming device before its first successful load.
    needs_state: bool,
    /// A destination's device receiving precopy records.
    incoming_precopy: bool,
    last_saved: Option<u64>,
    last_loaded: Option<u64>,
}

/// The accelerator (see the module docs).
#[derive(Debug)]
pub struct Accel {
    size: u64,
    driver: String,
    /// This host can precopy it.
    precopy: bool,
    ctl: Mutex<Ctl>,
    shared: Arc<Shared>,
}

impl Accel {
    /// A device of `size` bytes in STOP, on a host that cannot precopy it (release
    /// 0.1's device). An `incoming` one waits for a migrated state before it may run.
    pub fn new(size: u64, incoming: bool) -> Result<Self, AccelError> {
        Self::with_config(&AccelConfig::new(size, false), incoming)
    }

    /// A device as `cfg` says, in STOP.
    pub fn with_config(cfg: &AccelConfig, incoming: bool) -> Result<Self, AccelError> {
        let size = cfg.size;
        if size == 0 || size % CHUNK as u64 != 0 || size > ACCEL_MAX_SIZE {
            return Err(AccelError::Size { size });
        }
        Ok(Self {
            size,
            driver: cfg.driver.clone(),
            precopy: cfg.precopy,
            ctl: Mutex::new(Ctl {
                state: MigState::Stop,
                thread: None,
                needs_state: incoming,
                incoming_precopy: false,
                last_saved: None,
                last_loaded: None,
            }),
            shared: Arc::new(Shared {
                mem: Mutex::new(Memory {
                    bytes: vec![0; size as usize],
                    generation: 0,
                    cursor: 0,
                    track: None,
                    received: None,
                }),
                stop: Mutex::new(true),
                wake: Condvar::new(),
            }),
        })
    }

    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether this host can precopy the device.
    pub fn can_precopy(&self) -> bool {
        self.precopy
    }

    /// What must match between the two sides of a migration: the driver and the
    /// memory size, exact, in the form `--accel` takes them. The host's precopy
    /// capability is not among them: the two hosts may differ there.
    pub fn config(&self) -> Vec<(String, String)> {
        vec![
            ("driver".into(), self.driver.clone()),
            ("size".into(), exact_size(self.size)),
        ]
    }

    pub fn state(&self) -> MigState {
        self.ctl().state
    }

    /// Whether the device thread exists (it should exactly in RUNNING and PRE_COPY).
    pub fn thread_running(&self) -> bool {
        self.ctl().thread.is_some()
    }

    /// Moves the device to `to` along one arc; see the module docs.
    pub fn set_state(&self, to: MigState) -> Result<(), AccelError> {
        let mut ctl = self.ctl();
        self.step(&mut ctl, to)
    }

    fn step(&self, ctl: &mut Ctl, to: MigState) -> Result<(), AccelError> {
        let from = ctl.state;
        if from == to {
            return Ok(());
        }
        if !from.has_arc_to(to) {
            return Err(AccelError::InvalidTransition { from, to });
        }
        if (from == MigState::PreCopy || to == MigState::PreCopy) && !self.precopy {
            return Err(AccelError::InvalidTransition { from, to });
        }
        if to == MigState::Running && ctl.needs_state {
            return Err(AccelError::NotLoaded);
        }
        if to.runs() && !from.runs() {
            ctl.thread = Some(self.spawn()?);
        } else if from.runs() && !to.runs() {
            self.join(ctl);
        }
        match (from, to) {
            (MigState::Running, MigState::PreCopy) => {
                let mut mem = self.shared.mem();
                let chunks = mem.chunks();
                mem.track = Some(Track::new(chunks));
            }
            (MigState::PreCopy, MigState::Running) | (MigState::StopCopy, MigState::Stop) => {
                self.shared.mem().track = None;
            }
            _ => {}
        }
        ctl.state = to;
        Ok(())
    }

    fn spawn(&self) -> Result<JoinHandle<()>, AccelError> {
        *self
            .shared
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = false;
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("accel".into())
            .spawn(move || device_thread(&shared))
            .map_err(AccelError::Thread)
    }

    fn join(&self, ctl: &mut Ctl) {
        *self
            .shared
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_all();
        if let Some(t) = ctl.thread.take() {
            if t.join().is_err() {
                tracing::warn!("accel: the device thread panicked");
            }
        }
    }

    /// The VM stops: RUNNING -> STOP, or PRE_COPY -> STOP_COPY (what precopy has left
    /// stays tracked for the switchover).
    pub fn pause(&self) -> Result<(), AccelError> {
        let mut ctl = self.ctl();
        match ctl.state {
            MigState::PreCopy => self.step(&mut ctl, MigState::StopCopy),
            MigState::Running => self.step(&mut ctl, MigState::Stop),
            _ => Ok(()),
        }
    }

    /// The VM runs: to RUNNING, from STOP, or from a precopy stopped at STOP_COPY. A
    /// device that runs already (RUNNING, or PRE_COPY) is left as it is.
    pub fn run(&self) -> Result<(), AccelError> {
        let mut ctl = self.ctl();
        match ctl.state {
            MigState::Running | MigState::PreCopy => return Ok(()),
            MigState::StopCopy => self.step(&mut ctl, MigState::Stop)?,
            _ => {}
        }
        self.step(&mut ctl, MigState::Running)
    }

    /// What the device has left to send (see [`DevicePending`]).
    pub fn pending(&self) -> DevicePending {
        self.shared.mem().pending()
    }

    /// Source: precopy was agreed; RUNNING -> PRE_COPY. Destination: STOP ->
    /// RESUMING, to take records.
    pub fn precopy_begin(&self) -> Result<(), AccelError> {
        if !self.precopy {
            return Err(AccelError::NoPrecopy {
                driver: self.driver.clone(),
            });
        }
        let mut ctl = self.ctl();
        if ctl.needs_state {
            self.step(&mut ctl, MigState::Resuming)?;
            ctl.incoming_precopy = true;
            let chunks = self.size / CHUNK as u64;
            self.shared.mem().received = Some(PageDigest::new(&[chunks as usize]));
            return Ok(());
        }
        self.step(&mut ctl, MigState::PreCopy)
    }

    /// A migration that began precopy ended without a switchover: the source's device
    /// stops tracking (PRE_COPY -> RUNNING, STOP_COPY -> STOP), the destination's ends
    /// its resuming session without a state (it still cannot run).
    pub fn precopy_abandon(&self) {
        let mut ctl = self.ctl();
        let back = match ctl.state {
            MigState::PreCopy => Some(MigState::Running),
            MigState::StopCopy => Some(MigState::Stop),
            MigState::Resuming if ctl.incoming_precopy => Some(MigState::Stop),
            _ => None,
        };
        ctl.incoming_precopy = false;
        self.shared.mem().received = None;
        if let Some(to) = back {
            if let Err(e) = self.step(&mut ctl, to) {
                tracing::warn!(error = %e, "accel: leaving precopy");
            }
        }
    }

    /// Source, in PRE_COPY or STOP_COPY after it: writes the next precopy record (the
    /// first sweep's next run of memory, then a run of rewritten chunks) into `out`.
    /// `Ok(false)`, with nothing written, when nothing is pending.
    pub fn save_precopy(&self, out: &mut StateWriter<'_>) -> Result<bool, AccelError> {
        let ctl = self.ctl();
        if !matches!(ctl.state, MigState::PreCopy | MigState::StopCopy) {
            return Err(AccelError::InvalidTransition {
                from: ctl.state,
                to: MigState::PreCopy,
            });
        }
        let mut mem = self.shared.mem();
        let chunks = mem.chunks();
        let per_record = (STREAM_CHUNK / CHUNK) as u64;
        let Some(t) = mem.track.as_mut() else {
            return Err(AccelError::InvalidTransition {
                from: ctl.state,
                to: MigState::PreCopy,
            });
        };
        let run = if t.swept < chunks {
            let first = t.swept;
            let n = per_record.min(chunks - first);
            t.swept += n;
            (first, n)
        } else {
            match t.take_run(per_record) {
                Some(run) => run,
                None => return Ok(false),
            }
        };
        let (first, n) = run;
        let (start, len) = (first as usize * CHUNK, n as usize * CHUNK);
        out.begin(&[("data", len as u64)])?;
        out.u64("offset", start as u64)?;
        out.open_bytes("data")?;
        out.chunk(&mem.bytes[start..start + len])?;
        out.finish()?;
        let mem = &mut *mem;
        let t = mem.track.as_mut().expect("checked above");
        for c in first..first + n {
            let at = c as usize * CHUNK;
            t.sent
                .update(0, c as usize, content_hash(&mem.bytes[at..at + CHUNK]));
        }
        Ok(true)
    }

    /// Destination, after `precopy_begin`: writes one record into the device's memory.
    pub fn load_precopy(&self, input: &mut StateReader<'_>) -> Result<(), AccelError> {
        let ctl = self.ctl();
        if !(ctl.state == MigState::Resuming && ctl.incoming_precopy) {
            return Err(AccelError::InvalidTransition {
                from: ctl.state,
                to: MigState::Resuming,
            });
        }
        let offset = input.u64("offset")?;
        // The reader has bounded the length by the field's maximum and the frame.
        let len = input.open_bytes("data")?;
        if offset % CHUNK as u64 != 0
            || len % CHUNK as u64 != 0
            || offset.checked_add(len).is_none_or(|end| end > self.size)
        {
            return Err(AccelError::Record {
                offset,
                len,
                size: self.size,
            });
        }
        let mut mem = self.shared.mem();
        let (start, end) = (offset as usize, (offset + len) as usize);
        for piece in mem.bytes[start..end].chunks_mut(STREAM_CHUNK) {
            input.chunk(piece)?;
        }
        input.finish()?;
        let mem = &mut *mem;
        let Some(d) = mem.received.as_ref() else {
            return Err(AccelError::InvalidTransition {
                from: ctl.state,
                to: MigState::Resuming,
            });
        };
        for at in (start..end).step_by(CHUNK) {
            d.update(0, at / CHUNK, content_hash(&mem.bytes[at..at + CHUNK]));
        }
        Ok(())
    }

    /// The source's final state: stop-copy (STOP -> STOP_COPY, streams the whole state
    /// into `out`, -> STOP, also when the stream failed, so that the source can resume
    /// the device), or after precopy (in STOP_COPY with nothing pending: the registers,
    /// an empty memory and the checksum, -> STOP).
    ///
    /// The memory goes in [`STREAM_CHUNK`] pieces straight from the device's buffer into
    /// the writer (and from there into the socket): no copy of it is made.
    pub fn save(&self, out: &mut StateWriter<'_>) -> Result<(), AccelError> {
        let mut ctl = self.ctl();
        let after_precopy = ctl.state == MigState::StopCopy;
        if !after_precopy {
            self.step(&mut ctl, MigState::StopCopy)?;
        }
        let saved = {
            let mem = self.shared.mem();
            let pending = mem.pending();
            if after_precopy && pending.precopy > 0 {
                Err(AccelError::PrecopyPending {
                    pending: pending.precopy,
                })
            } else {
                // After precopy, the digest of what the records carried; otherwise all
                // of memory, as release 0.1 wrote it.
                let checksum = match (&mem.track, after_precopy) {
                    (Some(t), true) => t.sent.value(),
                    _ => xxh3_64(&mem.bytes),
                };
                Self::stream_out(self.size, &mem, !after_precopy, checksum, out).map(|()| checksum)
            }
        };
        self.step(&mut ctl, MigState::Stop)?;
        ctl.last_saved = Some(saved?);
        Ok(())
    }

    fn stream_out(
        size: u64,
        mem: &Memory,
        with_memory: bool,
        checksum: u64,
        out: &mut StateWriter<'_>,
    ) -> Result<(), AccelError> {
        let memory_len = if with_memory { size } else { 0 };
        out.begin(&[("memory", memory_len)])?;
        out.u64("size", size)?;
        out.u64("generation", mem.generation)?;
        out.u64("cursor", mem.cursor)?;
        out.open_bytes("memory")?;
        if with_memory {
            for piece in mem.bytes.chunks(STREAM_CHUNK) {
                out.chunk(piece)?;
            }
        }
        out.u64("checksum", checksum)?;
        out.finish()?;
        Ok(())
    }

    /// The destination's final load: without precopy STOP -> RESUMING, reads the whole
    /// state into fresh memory, checks it and installs it; after precopy (already
    /// RESUMING, its memory built by the records) reads the registers and an empty
    /// memory and checks the checksum against what the records built. Then -> STOP. A
    /// state that fails a check leaves the device in ERROR.
    ///
    /// Without precopy the fresh buffer is the only copy: it is zeroed lazily by the
    /// allocator and filled straight from the stream, and the memory it replaces, never
    /// touched on an incoming device, was never resident.
    pub fn load(&self, input: &mut StateReader<'_>) -> Result<(), AccelError> {
        let mut ctl = self.ctl();
        let after_precopy = ctl.incoming_precopy;
        if !after_precopy {
            self.step(&mut ctl, MigState::Resuming)?;
        }
        let read = if after_precopy {
            let received = self.shared.mem().received.as_ref().map(PageDigest::value);
            match received {
                Some(digest) => self.read_state(input, Some(digest)),
                None => Err(AccelError::InvalidTransition {
                    from: ctl.state,
                    to: MigState::Stop,
                }),
            }
        } else {
            self.read_state(input, None)
        };
        ctl.incoming_precopy = false;
        match read {
            Ok((regs, bytes, checksum)) => {
                let mut mem = self.shared.mem();
                if let Some(bytes) = bytes {
                    mem.bytes = bytes;
                }
                mem.received = None;
                (mem.generation, mem.cursor) = regs;
                drop(mem);
                ctl.needs_state = false;
                ctl.last_loaded = Some(checksum);
                self.step(&mut ctl, MigState::Stop)
            }
            Err(e) => {
                ctl.state = MigState::Error;
                Err(e)
            }
        }
    }

    /// Reads a final state: after precopy (`received`, the digest of what the records
    /// carried) the memory field must be empty and the checksum is that digest;
    /// without, the memory comes whole, its checksum is its xxh3, and it is returned.
    #[allow(clippy::type_complexity)]
    fn read_state(
        &self,
        input: &mut StateReader<'_>,
        received: Option<u64>,
    ) -> Result<((u64, u64), Option<Vec<u8>>, u64), AccelError> {
        let size = input.u64("size")?;
        if size != self.size {
            return Err(AccelError::SizeMismatch {
                sent: size,
                here: self.size,
            });
        }
        let generation = input.u64("generation")?;
        let cursor = input.u64("cursor")?;
        let chunks = size / CHUNK as u64;
        if cursor >= chunks {
            return Err(AccelError::Cursor { cursor, chunks });
        }
        // The reader has bounded the length by the field's maximum and the frame.
        let len = input.open_bytes("memory")?;
        let expect = if received.is_some() { 0 } else { size };
        if len != expect {
            return Err(AccelError::MemoryLength {
                len: len as usize,
                size: expect,
            });
        }
        let bytes = if received.is_none() {
            let mut bytes = vec![0u8; size as usize];
            for piece in bytes.chunks_mut(STREAM_CHUNK) {
                input.chunk(piece)?;
            }
            Some(bytes)
        } else {
            None
        };
        let sent = input.u64("checksum")?;
        input.finish()?;
        let computed = match (received, &bytes) {
            (Some(digest), _) => digest,
            (None, Some(b)) => xxh3_64(b),
            (None, None) => unreachable!("the memory came whole"),
        };
        if computed != sent {
            return Err(AccelError::Checksum { sent, computed });
        }
        Ok(((generation, cursor), bytes, computed))
    }

    /// The state name, size and memory digest; hashing holds the device thread off for
    /// the time it takes (tens of ms for 256 MiB).
    pub fn info(&self) -> AccelInfo {
        let (state, saved, loaded) = {
            let ctl = self.ctl();
            (ctl.state, ctl.last_saved, ctl.last_loaded)
        };
        let mem = self.shared.mem();
        AccelInfo {
            state: state.as_str(),
            size: self.size,
            driver: self.driver.clone(),
            precopy: self.precopy,
            digest: hex(xxh3_64(&mem.bytes)),
            generation: mem.generation,
            cursor: mem.cursor,
            saved_digest: saved.map(hex),
            loaded_digest: loaded.map(hex),
        }
    }

    /// Checks that the memory holds what the device thread wrote: chunks below the
    /// cursor at `generation + 1`, the rest at `generation`.
    pub fn check_pattern(&self) -> Result<(), String> {
        let mem = self.shared.mem();
        let mut wrong = 0u64;
        let mut first = None;
        for (c, chunk) in mem.bytes.chunks_exact(CHUNK).enumerate() {
            let c = c as u64;
            let g = if c < mem.cursor {
                mem.generation + 1
            } else {
                mem.generation
            };
            let want = word(g, c).to_le_bytes();
            if chunk.chunks_exact(8).any(|w| w != want) {
                wrong += 1;
                first.get_or_insert(c);
            }
        }
        match first {
            None => Ok(()),
            Some(c) => Err(format!(
                "accel: {wrong} chunks do not hold their pattern (first: chunk {c}; generation {}, cursor {})",
                mem.generation, mem.cursor
            )),
        }
    }
}

impl Drop for Accel {
    fn drop(&mut self) {
        let mut ctl = self.ctl();
        self.join(&mut ctl);
    }
}

fn device_thread(shared: &Shared) {
    let mut next = Instant::now();
    loop {
        let stop = shared.stop.lock().unwrap_or_else(PoisonError::into_inner);
        let timeout = next.saturating_duration_since(Instant::now());
        let (stop, _) = shared
            .wake
            .wait_timeout_while(stop, timeout, |stop| !*stop)
            .unwrap_or_else(PoisonError::into_inner);
        if *stop {
            return;
        }
        drop(stop);
        shared.mem().advance(CHUNKS_PER_TICK);
        // A steady rate: after a stall, carry on from now rather than catch up in a burst.
        next = (next + TICK).max(Instant::now());
    }
}

/// The accelerators of one VM, in `--accel` order: accelerator `i` is state `accel`
/// instance `i`. Both backends hold one and route the engine's device calls for them
/// here, so the device is the same on either.
#[derive(Debug, Default)]
pub struct Accels {
    devices: Vec<Accel>,
}

impl Accels {
    pub fn new(cfgs: &[AccelConfig], incoming: bool) -> Result<Self, AccelError> {
        Ok(Self {
            devices: cfgs
                .iter()
                .map(|c| Accel::with_config(c, incoming))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn get(&self, instance: usize) -> Option<&Accel> {
        self.devices.get(instance)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Accel> {
        self.devices.iter()
    }

    /// The engine's view of each, in order.
    pub fn device_infos(&self) -> Vec<DeviceInfo> {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, a)| DeviceInfo {
                name: ACCEL_SCHEMA.name.into(),
                instance: i as u32,
                schema: &ACCEL_SCHEMA,
                config: a.config(),
                precopy: a.can_precopy().then_some(&ACCEL_PRECOPY_SCHEMA),
            })
            .collect()
    }

    /// The VM runs: every accelerator to RUNNING. If one cannot, those started stop
    /// again.
    pub fn run(&self) -> Result<(), AccelError> {
        for (i, a) in self.devices.iter().enumerate() {
            if let Err(e) = a.run() {
                for b in &self.devices[..i] {
                    let _ = b.pause();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// The VM stops: every accelerator stops changing its memory.
    pub fn pause(&self) -> Result<(), AccelError> {
        let mut first = Ok(());
        for a in &self.devices {
            let r = a.pause();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// `268435456` → `256M`: the largest unit that divides the size exactly, as `--accel`
/// takes it, so two different sizes never read the same.
pub fn exact_size(n: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n % (1u64 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn exact_sizes_read_back_exactly() {
        assert_eq!(super::exact_size(256 << 20), "256M");
        assert_eq!(super::exact_size(1 << 30), "1G");
        assert_eq!(super::exact_size((1 << 30) + 4096), "1048580K");
        assert_eq!(super::exact_size(1000), "1000");
        assert_eq!(super::exact_size(0), "0");
    }

    use super::*;
    use ferry_migration::engine::error_chain;
    use ferry_migration::state::StateReader;
    use ferry_migration::state::{
        decode, encode, load_from_slice, save_to_vec, DeviceState, StateSink, Value,
    };
    use ferry_migration::wire::MAX_DEVICE_STATE_LEN;
    use MigState::*;

    /// The device's stop-copy, streamed into memory.
    fn save(a: &Accel) -> Result<Vec<u8>, AccelError> {
        save_to_vec(&ACCEL_SCHEMA, |w| a.save(w))
    }

    fn load(a: &Accel, bytes: &[u8]) -> Result<(), AccelError> {
        load_from_slice(&ACCEL_SCHEMA, ACCEL_SCHEMA.version, bytes, |r| a.load(r))
    }

    /// A saved state as values, to change one of them.
    fn values(bytes: &[u8]) -> DeviceState {
        decode(&ACCEL_SCHEMA, ACCEL_SCHEMA.version, bytes).unwrap()
    }

    fn bytes(st: &DeviceState) -> Vec<u8> {
        encode(&ACCEL_SCHEMA, st).unwrap()
    }

    const SMALL: u64 = 64 * CHUNK as u64;

    /// Waits until the device thread has written at least `n` more chunks.
    fn wait_chunks(a: &Accel, n: u64) {
        let pos = |a: &Accel| {
            let m = a.shared.mem();
            m.generation * m.chunks() + m.cursor
        };
        let start = pos(a);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pos(a) < start + n {
            assert!(
                Instant::now() < deadline,
                "the device thread made no progress"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn set_field(st: &mut DeviceState, name: &str, value: Value) {
        let field = st.fields.iter_mut().find(|(n, _)| n == name).unwrap();
        field.1 = value;
    }

    /// A device in `state`, reached by valid arcs (ERROR by a failed load), on a host
    /// that can precopy it or not.
    fn device_in(state: MigState, precopy: bool) -> Accel {
        let a = Accel::with_config(&AccelConfig::new(SMALL, precopy), false).unwrap();
        match state {
            Stop => {}
            Running => a.set_state(Running).unwrap(),
            StopCopy => a.set_state(StopCopy).unwrap(),
            Resuming => a.set_state(Resuming).unwrap(),
            PreCopy => {
                a.set_state(Running).unwrap();
                a.set_state(PreCopy).unwrap();
            }
            Error => {
                let mut st = values(&save(&a).unwrap());
                let sum = st.get_u64("checksum").unwrap();
                set_field(&mut st, "checksum", Value::U64(!sum));
                assert!(load(&a, &bytes(&st)).is_err());
            }
        }
        assert_eq!(a.state(), state);
        a
    }

    /// The arcs a device takes, checked from every state it can reach to every state.
    fn arcs_taken(precopy: bool) -> Vec<(MigState, MigState)> {
        let mut valid = Vec::new();
        for from in MigState::ALL {
            if from == PreCopy && !precopy {
                continue;
            }
            for to in MigState::ALL {
                let a = device_in(from, precopy);
                let allowed =
                    from.has_arc_to(to) && (precopy || (from != PreCopy && to != PreCopy));
                match a.set_state(to) {
                    Ok(()) => {
                        assert!(from == to || allowed, "{from} -> {to} taken");
                        if from != to {
                            valid.push((from, to));
                        }
                        assert_eq!(a.state(), to);
                    }
                    Err(e) => {
                        assert!(!allowed && from != to, "{from} -> {to}: {e}");
                        assert!(
                            matches!(e, AccelError::InvalidTransition { from: f, to: t } if f == from && t == to),
                            "{e}"
                        );
                        assert_eq!(
                            e.to_string(),
                            format!("accel: invalid transition {from} -> {to}")
                        );
                        assert_eq!(a.state(), from, "a refused transition moved the device");
                    }
                }
                assert_eq!(
                    a.thread_running(),
                    matches!(a.state(), Running | PreCopy),
                    "{from} -> {to}: device thread in {}",
                    a.state()
                );
            }
        }
        valid.sort_by_key(|&(f, t)| (f as u8, t as u8));
        valid
    }

    #[test]
    fn accel_takes_every_single_arc_and_refuses_every_other_transition() {
        // A host without precopy: release 0.1's device, the same six arcs.
        assert_eq!(
            arcs_taken(false),
            [
                (Stop, Running),
                (Stop, StopCopy),
                (Stop, Resuming),
                (Running, Stop),
                (StopCopy, Stop),
                (Resuming, Stop),
            ]
        );
        // A host with precopy adds VFIO's three PRE_COPY arcs.
        assert_eq!(
            arcs_taken(true),
            [
                (Stop, Running),
                (Stop, StopCopy),
                (Stop, Resuming),
                (Running, Stop),
                (Running, PreCopy),
                (StopCopy, Stop),
                (Resuming, Stop),
                (PreCopy, Running),
                (PreCopy, StopCopy),
            ]
        );
        assert_eq!(
            AccelError::InvalidTransition {
                from: Running,
                to: StopCopy
            }
            .to_string(),
            "accel: invalid transition RUNNING -> STOP_COPY"
        );
    }

    /// A precopy migration of a running device, in memory: records while it runs, the
    /// pause, the rest, the final state. Returns the destination device.
    fn precopy_migrate(src: &Accel, lose_dirty: bool) -> Result<Accel, AccelError> {
        let dst = Accel::with_config(&AccelConfig::new(src.size(), true), true).unwrap();
        src.precopy_begin()?;
        dst.precopy_begin()?;
        if lose_dirty {
            src.shared.mem().track.as_mut().unwrap().lose_dirty = true;
        }
        let move_records = |until_empty: bool| -> Result<(), AccelError> {
            loop {
                let mut rec = Vec::new();
                let mut w = StateWriter::new(&ACCEL_PRECOPY_SCHEMA, &mut rec);
                if !src.save_precopy(&mut w)? {
                    return Ok(());
                }
                load_precopy(&dst, &rec)?;
                if !until_empty {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        // The sweep and a few rounds of what the running device rewrites.
        for _ in 0..5 {
            move_records(false)?;
            std::thread::sleep(Duration::from_millis(5));
        }
        src.pause()?;
        assert_eq!(src.state(), StopCopy);
        move_records(true)?;
        assert_eq!(src.pending().precopy, 0);
        let fin = save(src)?;
        assert_eq!(src.state(), Stop);
        // The final state carries no memory: the records did.
        assert_eq!(values(&fin).get_bytes("memory").unwrap().len(), 0);
        load(&dst, &fin)?;
        Ok(dst)
    }

    fn load_precopy(a: &Accel, bytes: &[u8]) -> Result<(), AccelError> {
        load_from_slice(&ACCEL_PRECOPY_SCHEMA, 1, bytes, |r| a.load_precopy(r))
    }

    #[test]
    fn precopy_of_a_running_device_arrives_whole_and_a_lost_rewrite_shows() {
        let src = Accel::with_config(&AccelConfig::new(SMALL, true), false).unwrap();
        src.set_state(Running).unwrap();
        wait_chunks(&src, 10);
        let dst = precopy_migrate(&src, false).unwrap();
        assert_eq!(dst.state(), Stop);
        dst.check_pattern().unwrap();
        let (s, d) = (src.info(), dst.info());
        assert_eq!(
            (d.digest, d.generation, d.cursor),
            (s.digest, s.generation, s.cursor)
        );
        assert_eq!(d.loaded_digest, s.saved_digest);
        dst.set_state(Running).unwrap();
        wait_chunks(&dst, 10);

        // The same with the tracking broken on purpose: chunks the device rewrote after
        // the sweep never go again, and the destination holds stale memory, which the
        // pattern shows (the digest cannot: it covers what was sent).
        let src = Accel::with_config(&AccelConfig::new(SMALL, true), false).unwrap();
        src.set_state(Running).unwrap();
        wait_chunks(&src, 10);
        let dst = precopy_migrate(&src, true).unwrap();
        let e = dst.check_pattern().unwrap_err();
        assert!(e.contains("do not hold their pattern"), "{e}");
    }

    #[test]
    fn a_precopy_host_switch_governs_the_precopy_arcs_and_a_record_must_fit() {
        let off = Accel::with_config(&AccelConfig::new(SMALL, false), false).unwrap();
        off.set_state(Running).unwrap();
        assert!(matches!(
            off.precopy_begin(),
            Err(AccelError::NoPrecopy { .. })
        ));
        assert_eq!(off.state(), Running);
        // A record to a device not resuming precopy, and records out of its memory.
        let dst = Accel::with_config(&AccelConfig::new(SMALL, true), true).unwrap();
        let rec = |offset: u64, len: usize| {
            save_to_vec(&ACCEL_PRECOPY_SCHEMA, |w| -> Result<(), AccelError> {
                w.begin(&[("data", len as u64)])?;
                w.u64("offset", offset)?;
                w.open_bytes("data")?;
                w.chunk(&vec![7; len])?;
                w.finish()?;
                Ok(())
            })
            .unwrap()
        };
        assert!(matches!(
            load_precopy(&dst, &rec(0, CHUNK)),
            Err(AccelError::InvalidTransition { .. })
        ));
        dst.precopy_begin().unwrap();
        for (offset, len) in [
            (SMALL, CHUNK),
            (SMALL - CHUNK as u64, 2 * CHUNK),
            (1, CHUNK),
            (0, 100),
        ] {
            assert!(
                matches!(
                    load_precopy(&dst, &rec(offset, len)),
                    Err(AccelError::Record { .. })
                ),
                "{offset}+{len}"
            );
        }
        load_precopy(&dst, &rec(SMALL - CHUNK as u64, CHUNK)).unwrap();
        // A whole-memory state after precopy is refused, and so is a final state whose
        // digest is not what the records carried.
        let whole = {
            let a = Accel::new(SMALL, false).unwrap();
            save(&a).unwrap()
        };
        let e = load(&dst, &whole).unwrap_err();
        assert!(matches!(e, AccelError::MemoryLength { size: 0, .. }), "{e}");
        assert_eq!(dst.state(), Error);
    }

    #[test]
    fn accel_memory_changes_only_while_running() {
        let a = Accel::new(SMALL, false).unwrap();
        let frozen = a.info().digest;
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(a.info().digest, frozen, "memory changed in STOP");
        a.set_state(Running).unwrap();
        wait_chunks(&a, 3 * SMALL / CHUNK as u64);
        a.set_state(Stop).unwrap();
        let stopped = a.info();
        assert_ne!(stopped.digest, frozen);
        assert!(stopped.generation >= 3, "{stopped:?}");
        a.check_pattern().unwrap();
        a.set_state(StopCopy).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            a.info(),
            AccelInfo {
                state: "STOP_COPY",
                ..stopped
            }
        );
    }

    #[test]
    fn accel_state_round_trips_and_the_destination_carries_on() {
        let src = Accel::new(SMALL, false).unwrap();
        src.set_state(Running).unwrap();
        wait_chunks(&src, 100);
        // Saving needs STOP first.
        assert!(matches!(
            save(&src),
            Err(AccelError::InvalidTransition {
                from: Running,
                to: StopCopy
            })
        ));
        src.set_state(Stop).unwrap();
        let streamed = save(&src).unwrap();
        assert_eq!(src.state(), Stop);
        // The streamed state is the state the codec writes for the same values.
        let saved = values(&streamed);
        assert_eq!(bytes(&saved), streamed);
        assert_eq!(streamed.len() as u64, 8 * 4 + 4 + SMALL + 1);

        let dst = Accel::new(SMALL, true).unwrap();
        assert!(matches!(dst.set_state(Running), Err(AccelError::NotLoaded)));
        load(&dst, &streamed).unwrap();
        assert_eq!(dst.state(), Stop);
        let (s, d) = (src.info(), dst.info());
        assert_eq!(s.saved_digest.as_ref(), Some(&s.digest));
        assert_eq!(d.loaded_digest.as_ref(), Some(&s.digest));
        assert_eq!(
            (d.digest.as_str(), d.generation, d.cursor),
            (s.digest.as_str(), s.generation, s.cursor)
        );
        assert_eq!(
            saved.get_u64("checksum").unwrap(),
            u64::from_str_radix(&s.digest, 16).unwrap()
        );
        dst.check_pattern().unwrap();

        dst.set_state(Running).unwrap();
        wait_chunks(&dst, 10);
        dst.set_state(Stop).unwrap();
        dst.check_pattern().unwrap();
        assert_ne!(dst.info().digest, s.digest);
        // The source stays frozen after it was read.
        assert_eq!(src.info(), s);
        // A failed migration resumes the source.
        src.set_state(Running).unwrap();
        src.set_state(Stop).unwrap();
    }

    #[test]
    fn accel_refuses_a_state_whose_checksum_or_size_is_wrong() {
        let src = Accel::new(SMALL, false).unwrap();
        src.set_state(Running).unwrap();
        wait_chunks(&src, 10);
        src.set_state(Stop).unwrap();
        let saved = values(&save(&src).unwrap());
        let fresh = || Accel::new(SMALL, true).unwrap();

        let mut flipped = saved.clone();
        let mut memory = saved.get_bytes("memory").unwrap().to_vec();
        memory[SMALL as usize / 2] ^= 1;
        set_field(&mut flipped, "memory", Value::Bytes(memory));
        let dst = fresh();
        let before = dst.info().digest;
        let err = load(&dst, &bytes(&flipped)).unwrap_err();
        assert!(matches!(err, AccelError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
        assert_eq!(dst.state(), Error);
        assert_eq!(dst.info().digest, before, "a refused state was installed");
        assert!(matches!(
            dst.set_state(Running),
            Err(AccelError::InvalidTransition { from: Error, .. })
        ));

        let err = load(&Accel::new(2 * SMALL, true).unwrap(), &bytes(&saved)).unwrap_err();
        assert!(
            matches!(err, AccelError::SizeMismatch { sent, here } if sent == SMALL && here == 2 * SMALL),
            "{err}"
        );

        let mut past = saved.clone();
        set_field(&mut past, "cursor", Value::U64(SMALL / CHUNK as u64));
        assert!(matches!(
            load(&fresh(), &bytes(&past)),
            Err(AccelError::Cursor { .. })
        ));

        // Memory of another length than the size says, and a state cut short.
        let mut other = saved.clone();
        set_field(&mut other, "memory", Value::Bytes(vec![0; CHUNK]));
        assert!(matches!(
            load(&fresh(), &bytes(&other)),
            Err(AccelError::MemoryLength { len, .. }) if len == CHUNK
        ));
        let whole = bytes(&saved);
        for cut in [1, 9, CHUNK] {
            let err = load(&fresh(), &whole[..whole.len() - cut]).unwrap_err();
            assert!(matches!(err, AccelError::State(_)), "cut {cut}: {err}");
            assert!(
                error_chain(&err).contains("truncated"),
                "{}",
                error_chain(&err)
            );
        }
    }

    /// A sink whose stream breaks after `left` bytes.
    struct Breaks {
        left: usize,
    }

    impl StateSink for Breaks {
        fn begin(&mut self, _len: u64) -> io::Result<()> {
            Ok(())
        }

        fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
            if bytes.len() > self.left {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            self.left -= bytes.len();
            Ok(())
        }
    }

    #[test]
    fn accel_save_cut_by_the_stream_leaves_the_device_able_to_run() {
        let a = Accel::new(SMALL, false).unwrap();
        let mut sink = Breaks {
            left: SMALL as usize / 2,
        };
        let mut w = StateWriter::new(&ACCEL_SCHEMA, &mut sink);
        let err = a.save(&mut w).unwrap_err();
        assert!(
            matches!(err, AccelError::State(StateError::Interrupted { .. })),
            "{err}"
        );
        assert_eq!(
            w.take_io_error().map(|e| e.kind()),
            Some(io::ErrorKind::BrokenPipe)
        );
        // Back in STOP: a failed migration resumes the device.
        assert_eq!(a.state(), Stop);
        a.set_state(Running).unwrap();
        assert!(a.thread_running());
        a.set_state(Stop).unwrap();
        assert_eq!(a.info().saved_digest, None, "a save that failed counted");
    }

    #[test]
    fn accel_size_is_checked_against_the_schema_maximum() {
        for size in [0, 100, ACCEL_MAX_SIZE + CHUNK as u64] {
            assert!(
                matches!(Accel::new(size, false), Err(AccelError::Size { size: s }) if s == size)
            );
        }
        assert_eq!(
            Accel::new(ACCEL_DEFAULT_SIZE, false).unwrap().size(),
            ACCEL_DEFAULT_SIZE
        );
        ACCEL_SCHEMA.validate().unwrap();
        // The largest state, with the frame's name, instance and version, fits a frame.
        let header = 2 + ACCEL_SCHEMA.name.len() as u64 + 8;
        assert!(ACCEL_SCHEMA.max_encoded_len() + header <= u64::from(MAX_DEVICE_STATE_LEN));
        assert!(ACCEL_MAX_SIZE <= u64::from(u32::MAX));
    }

    /// A fresh `len`-byte buffer advised to use transparent huge pages, so that first
    /// touches fault 2 MiB at a time.
    fn huge_buffer(len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = Vec::with_capacity(len);
        let p = v.as_mut_ptr() as usize;
        let start = p.next_multiple_of(4096);
        let advised = (p + len).saturating_sub(start) & !4095;
        // SAFETY: advice on whole pages inside the allocation `v` owns; it changes no
        // contents and no mapping.
        unsafe { libc::madvise(start as *mut libc::c_void, advised, libc::MADV_HUGEPAGE) };
        v
    }

    /// Not a test: prints what each step of the accelerator's stop-copy costs, next to
    /// copies measured in the same run. Run with
    /// `cargo test -p ferry-vmm --release accel_measure -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn accel_measure_stop_copy_cost() {
        use std::hint::black_box;
        use std::io::{Read, Write};
        let size = ACCEL_DEFAULT_SIZE;
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        let a = Accel::new(size, false).unwrap();
        {
            let mut m = a.shared.mem();
            let n = m.chunks() as usize;
            m.advance(n + 7);
        }
        let mut touched = vec![1u8; size as usize];
        for round in 0..3 {
            let mem = a.shared.mem();
            let t = Instant::now();
            touched.copy_from_slice(&mem.bytes);
            black_box(&touched);
            let touched_ms = ms(t);
            let t = Instant::now();
            black_box(mem.bytes.clone());
            let fresh_ms = ms(t);
            let t = Instant::now();
            let mut huge = huge_buffer(mem.bytes.len());
            huge.extend_from_slice(&mem.bytes);
            black_box(huge);
            let huge_ms = ms(t);
            let t = Instant::now();
            black_box(xxh3_64(&mem.bytes));
            let hash_ms = ms(t);
            drop(mem);

            // The stop-copy as a migration does it: streamed from the device's memory
            // into loopback TCP, and on the other end from the socket into a device.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let len = 8 * 4 + 4 + size + 1;
            let rx = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let d = Accel::new(size, true).unwrap();
                let t = Instant::now();
                let mut r = StateReader::new(&ACCEL_SCHEMA, 1, &mut s, len);
                d.load(&mut r).unwrap();
                assert!(r.is_done());
                ms(t)
            });
            struct Tcp(std::net::TcpStream);
            impl StateSink for Tcp {
                fn begin(&mut self, _: u64) -> io::Result<()> {
                    Ok(())
                }
                fn write(&mut self, b: &[u8]) -> io::Result<()> {
                    self.0.write_all(b)
                }
            }
            let mut sink = Tcp(std::net::TcpStream::connect(addr).unwrap());
            let t = Instant::now();
            a.save(&mut StateWriter::new(&ACCEL_SCHEMA, &mut sink))
                .unwrap();
            let save_ms = ms(t);
            let load_ms = rx.join().unwrap();
            // Plain loopback TCP of the same bytes into a fresh buffer, for reference.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let rx = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut v = vec![0u8; len as usize];
                s.read_exact(&mut v).unwrap();
                v.len()
            });
            let t = Instant::now();
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            for piece in touched.chunks(STREAM_CHUNK) {
                c.write_all(piece).unwrap();
            }
            c.write_all(&[0; 37]).unwrap();
            rx.join().unwrap();
            let tcp_ms = ms(t);
            println!(
                "round {round}, {} MiB | copy into touched memory {touched_ms:.0} ms, into fresh \
                 memory {fresh_ms:.0} ms, into fresh THP-advised memory {huge_ms:.0} ms, xxh3 \
                 {hash_ms:.0} ms | streamed save into loopback TCP {save_ms:.0} ms, streamed load \
                 from it {load_ms:.0} ms | loopback TCP of as many bytes into a fresh buffer {tcp_ms:.0} ms",
                size >> 20
            );
        }
    }
}
