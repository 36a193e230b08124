//! The destination's whole stream handling (`engine::receive`) on arbitrary bytes, after a
//! fixed stream header and a hello it accepts, into the small test VM of
//! `crates/ferry-migration/tests/common` (one vCPU, a UART with a subsection, a timer, two
//! RAM blocks of 32 and 8 pages).
//!
//! Input: a mode byte, then the rest. Mode bit 0 picks how the rest is read:
//!
//! * clear: raw bytes, fed as they are after the hello;
//! * set: a program of frames the target builds with the wire encoders, mostly valid, so
//!   the fuzzer reaches the end of stream with state loaded and a matching digest. Each op
//!   starts with a byte choosing a RAM batch (block, entries, page seeds, length error),
//!   a pass end, a device or vCPU state (valid, relabelled, raw or with a byte flipped), an
//!   end of stream (flags, digest, page count exact or not), an abort, a return-path frame,
//!   raw bytes, a frame header with any tag and length, or populated extents (a block, in
//!   range or not, and extents that lie inside it or not).
//!
//! A program that does not send an end of stream ends as an honest source would, with
//! valid state for every device and vCPU it did not send and an exact end of stream; mode
//! bit 3 cuts the stream where the program ends instead. Mode bit 1 makes the hello
//! announce full verification; bit 2 turns the digest off on both sides; bit 4 turns
//! `migration.x-ferry-populate-ahead` on on both sides.
//!
//! Checks, beyond no panic and no hang: the VM was resumed at most once and only after
//! every device and vCPU loaded exactly once, with no load after it; a failed receive left
//! it stopped. In program mode, a completed migration left guest memory exactly as the
//! program wrote it whenever the end of stream carried the program's own digest (or the
//! stream held nothing but the program's frames), and a stream holding a RAM batch the
//! destination must refuse (block or page out of range, a page named twice, wrong length),
//! or populated extents it must refuse (property off, after a pass end, a block it lacks,
//! extents outside the block, empty or not ascending), never completed. Valid extents
//! change no page: memory is still exactly as the program wrote it.

#![no_main]

#[path = "../../crates/ferry-migration/tests/common/mod.rs"]
mod common;

use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use common::*;
use ferry_migration::engine::digest::{content_hash, full_digest, PageDigest};
use ferry_migration::engine::vm::MigratableVm;
use ferry_migration::engine::{self, Channel, MigrationMonitor, MigrationParams};
use ferry_migration::state::{encode, DeviceState, StateSchema, SubsectionState, Value};
use ferry_migration::wire::{
    encode_reason, DeviceStateHeader, EndOfStream, FrameTag, PassEnd, PopulatedExtents,
    RamBatchHeader, VcpuStateHeader,
};
use ferry_migration::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

/// Largest stream a program builds; RAM batches carry up to 32 KiB each.
const MAX_STREAM: usize = 256 << 10;

fuzz_target!(init: ignore_sigpipe(), |data: &[u8]| run(data));

extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}

/// libFuzzer's `main` is not Rust's, so SIGPIPE still kills the process. A feeder thread
/// writing after the destination gave up and shut the socket must get `EPIPE` instead.
fn ignore_sigpipe() {
    const SIGPIPE: i32 = 13;
    const SIG_IGN: usize = 1;
    // SAFETY: installs the standard "ignore" disposition before any thread runs.
    unsafe { signal(SIGPIPE, SIG_IGN) };
}

/// Input bytes as a stream of numbers; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the program sent, as an honest source would account for it.
struct Model {
    mem: Vec<Vec<u8>>,
    digest: PageDigest,
    pages_sent: u64,
    /// A RAM batch the destination must refuse went out: a block or page out of range, a
    /// page named twice, a length that does not match.
    poisoned: bool,
    /// Bytes the program does not understand went out (raw bytes, arbitrary headers): the
    /// destination may read frames the model knows nothing about.
    opaque: bool,
    /// The digest the end of stream carried, if one was sent.
    eos_digest: Option<Option<u64>>,
    /// The program sent a frame for the UART, the timer, vCPU 0.
    sent: [bool; 3],
    /// Both sides have `migration.x-ferry-populate-ahead` on.
    populate_on: bool,
    /// A pass end went out: extents after it are refused.
    pass_ended: bool,
    /// Per block, the end of the extents sent so far.
    populate_ends: [u64; 2],
}

impl Model {
    fn new() -> Self {
        Self {
            mem: FUZZ_LAYOUT
                .iter()
                .map(|&(_, _, pages)| vec![0; pages * PAGE_SIZE])
                .collect(),
            digest: PageDigest::new(&FUZZ_LAYOUT.iter().map(|l| l.2).collect::<Vec<_>>()),
            pages_sent: 0,
            poisoned: false,
            opaque: false,
            eos_digest: None,
            sent: [false; 3],
            populate_on: false,
            pass_ended: false,
            populate_ends: [0; 2],
        }
    }

    fn full_digest(&self) -> u64 {
        let pages: Vec<usize> = FUZZ_LAYOUT.iter().map(|l| l.2).collect();
        full_digest(&pages, |b, p| {
            Some(content_hash(
                &self.mem[b][p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            ))
        })
    }
}

fn ram_batch(inp: &mut Input, m: &mut Model) -> Vec<u8> {
    let block = u32::from(inp.u8() % 3);
    let count = inp.u8() % 9;
    let pages = FUZZ_LAYOUT.get(block as usize).map_or(1, |l| l.2);
    let mut entries = Vec::new();
    let mut data = Vec::new();
    let mut refused = block as usize >= FUZZ_LAYOUT.len();
    for _ in 0..count {
        let page = usize::from(inp.u8()) % (pages + 1);
        let zero = inp.u8() & 1 == 1;
        // Out of the block, or named twice in the batch.
        refused |= page >= pages || entries.iter().any(|e: &(usize, usize, _)| e.1 == page);
        let content = if zero {
            None
        } else {
            let c = page_pattern(u64::from(inp.u8()));
            data.extend_from_slice(&c);
            Some(c)
        };
        entries.push((block as usize, page, content));
    }
    let f = inp.u8();
    let fudge = if f >= 0xf0 {
        i32::from(f & 0x0f) - 8
    } else {
        0
    };

    let mut payload = RamBatchHeader {
        block,
        count: u32::from(count),
    }
    .encode()
    .to_vec();
    for &(_, page, content) in &entries {
        payload.extend_from_slice(
            &RamBatchHeader::entry(page as u64, content.is_none()).to_le_bytes(),
        );
    }
    payload.extend_from_slice(&data);
    let len = (payload.len() as i64 + i64::from(fudge)).max(0) as usize;
    payload.resize(len, 0);

    if refused || fudge != 0 {
        m.poisoned = true;
    } else {
        for (b, page, content) in entries {
            let slot = &mut m.mem[b][page * PAGE_SIZE..(page + 1) * PAGE_SIZE];
            match content {
                Some(c) => slot.copy_from_slice(&c),
                None => slot.fill(0),
            }
            m.digest.update(b, page, content_hash(slot));
        }
        m.pages_sent += u64::from(count);
    }
    frame(FrameTag::RamBatch, &payload)
}

fn uart_state(inp: &mut Input) -> DeviceState {
    let rx_len = usize::from(inp.u8() % 17);
    let mut s = DeviceState::new()
        .with("ier", Value::U8(inp.u8()))
        .with("lcr", Value::U8(inp.u8()))
        .with("rx", Value::Bytes(inp.bytes(rx_len)));
    if inp.u8() & 1 == 1 {
        s = s.with_subsection(
            SubsectionState::new("test-uart/irq")
                .with("line", Value::U32(inp.u32()))
                .with("level", Value::Bool(inp.u8() & 1 == 1)),
        );
    }
    s
}

fn timer_state(inp: &mut Input) -> DeviceState {
    DeviceState::new()
        .with("period_ns", Value::U64(u64::from(inp.u8())))
        .with("enabled", Value::Bool(inp.u8() & 1 == 1))
        .with("id", Value::Bytes(inp.bytes(8)))
        .with("deadline_ns", Value::U64(inp.u64()))
}

fn vcpu_state(inp: &mut Input) -> DeviceState {
    DeviceState::new()
        .with("rip", Value::U64(inp.u64()))
        .with("rsp", Value::U64(inp.u64()))
        .with("rflags", Value::U64(u64::from(inp.u8())))
        .with("gprs", Value::Bytes(inp.bytes(64)))
        .with("tsc", Value::U64(inp.u64()))
}

/// The version a state frame claims and its bytes: valid, relabelled, raw or flipped.
fn state_bytes(
    inp: &mut Input,
    schema: &StateSchema,
    state: impl FnOnce(&mut Input) -> DeviceState,
) -> (u32, Vec<u8>) {
    let how = inp.u8();
    let version = match (how >> 2) & 3 {
        0 | 1 => schema.version,
        2 => schema.min_version,
        _ => schema.version + 1,
    };
    let bytes = match how & 3 {
        0 | 1 => encode(schema, &state(inp)).expect("a state the schema accepts"),
        2 => {
            let n = usize::from(inp.u8() % 96);
            inp.bytes(n)
        }
        _ => {
            let mut b = encode(schema, &state(inp)).expect("a state the schema accepts");
            let at = usize::from(inp.u8()) % b.len();
            b[at] ^= inp.u8() | 1;
            b
        }
    };
    (version, bytes)
}

fn device_state(inp: &mut Input, m: &mut Model) -> Vec<u8> {
    let which = inp.u8() % 3;
    if which < 2 {
        m.sent[usize::from(which)] = true;
    }
    let (name, instance, (version, bytes)) = match which {
        0 => ("test-uart", 0, state_bytes(inp, &UART_SCHEMA, uart_state)),
        1 => (
            "test-timer",
            3,
            state_bytes(inp, &TIMER_SCHEMA, timer_state),
        ),
        _ => ("test-nic", 0, state_bytes(inp, &TIMER_SCHEMA, timer_state)),
    };
    frame(
        FrameTag::DeviceState,
        &DeviceStateHeader {
            name: name.into(),
            instance,
            version,
        }
        .encode(&bytes),
    )
}

fn vcpu_frame(inp: &mut Input, m: &mut Model) -> Vec<u8> {
    let index = u32::from(inp.u8() % 2);
    m.sent[2] |= index == 0;
    let (version, bytes) = state_bytes(inp, &VCPU_SCHEMA, vcpu_state);
    frame(
        FrameTag::VcpuState,
        &VcpuStateHeader { index, version }.encode(&bytes),
    )
}

fn end_of_stream(inp: &mut Input, m: &mut Model, digest_on: bool, full: bool) -> Vec<u8> {
    let flags = inp.u8();
    let exact = flags & 0x80 == 0;
    let digest = if exact { digest_on } else { flags & 1 == 1 };
    let with_full = if exact { full } else { flags & 2 == 2 };
    let eos = EndOfStream {
        digest: digest.then(|| {
            if flags & 0x40 == 0 {
                m.digest.value()
            } else {
                inp.u64()
            }
        }),
        full_digest: with_full.then(|| {
            if flags & 0x20 == 0 {
                m.full_digest()
            } else {
                inp.u64()
            }
        }),
        pages_sent: if flags & 0x10 == 0 {
            m.pages_sent
        } else {
            m.pages_sent
                .wrapping_add(u64::from(inp.u8() % 16))
                .wrapping_sub(8)
        },
        resume: flags & 4 == 0,
    };
    m.eos_digest = Some(eos.digest);
    let mut p = eos.encode();
    if flags & 0x0f == 0x08 {
        // A flag this release does not know.
        p[0] |= 0x08;
    }
    frame(FrameTag::EndOfStream, &p)
}

/// A populated-extents frame: block 0, 1 or 2 (which the destination lacks), up to three
/// extents from gaps and lengths that may run past the block or go back; poisons the
/// model when the destination must refuse it.
fn populated_extents(inp: &mut Input, m: &mut Model) -> Vec<u8> {
    let block = inp.u8() % 3;
    let mut extents = Vec::new();
    let mut at = if block < 2 {
        m.populate_ends[usize::from(block)]
    } else {
        0
    };
    let mut valid = m.populate_on && !m.pass_ended && block < 2;
    for _ in 0..inp.u8() % 4 {
        let back = inp.u8() % 8 == 0;
        let first = if back {
            at.saturating_sub(1 + u64::from(inp.u8() % 4))
        } else {
            at + u64::from(inp.u8() % 12)
        };
        let pages = u64::from(inp.u8() % 12);
        let limit = FUZZ_LAYOUT
            .get(usize::from(block))
            .map_or(0, |l| l.2 as u64);
        valid &= first >= at && pages > 0 && first + pages <= limit;
        extents.push((first, pages));
        at = first + pages;
    }
    if valid && block < 2 {
        m.populate_ends[usize::from(block)] = at;
    } else if !valid {
        m.poisoned = true;
    }
    frame(
        FrameTag::PopulatedExtents,
        &PopulatedExtents {
            block: u16::from(block),
            extents,
        }
        .encode(),
    )
}

/// Builds the frames of a program; stops after an end of stream. A program that sends
/// none ends as an honest source would, unless `cut`: with the state it did not send and
/// an end of stream that matches what it sent.
fn program(inp: &mut Input, m: &mut Model, digest_on: bool, full: bool, cut: bool) -> Vec<u8> {
    let mut s = Vec::new();
    while !inp.is_empty() && s.len() < MAX_STREAM {
        let f = match inp.u8() % 13 {
            0..=2 => ram_batch(inp, m),
            3 => {
                m.pass_ended = true;
                frame(
                    FrameTag::PassEnd,
                    &PassEnd {
                        pass: u32::from(inp.u8()),
                        pages: inp.u64(),
                    }
                    .encode(),
                )
            }
            12 => populated_extents(inp, m),
            4 | 5 => device_state(inp, m),
            6 => vcpu_frame(inp, m),
            7 => {
                s.extend(end_of_stream(inp, m, digest_on, full));
                break;
            }
            8 => {
                let n = usize::from(inp.u8() % 64);
                frame(
                    FrameTag::Abort,
                    &encode_reason(&String::from_utf8_lossy(&inp.bytes(n))),
                )
            }
            9 => {
                let tag = 0x81 + inp.u8() % 4;
                let n = usize::from(inp.u8() % 32);
                let p = inp.bytes(n);
                raw_frame(tag, p.len() as u32, &p)
            }
            10 => {
                m.opaque = true;
                let n = usize::from(inp.u8() % 32);
                inp.bytes(n)
            }
            _ => {
                m.opaque = true;
                let tag = inp.u8();
                let len = inp.u32();
                let n = usize::from(inp.u8() % 32);
                raw_frame(tag, len, &inp.bytes(n))
            }
        };
        s.extend(f);
    }
    if m.eos_digest.is_none() && !cut {
        let states = source_device_states();
        if !m.sent[0] {
            let b = encode(&UART_SCHEMA, &states[0]).unwrap();
            s.extend(frame(
                FrameTag::DeviceState,
                &DeviceStateHeader {
                    name: "test-uart".into(),
                    instance: 0,
                    version: UART_SCHEMA.version,
                }
                .encode(&b),
            ));
        }
        if !m.sent[1] {
            let b = encode(&TIMER_SCHEMA, &states[1]).unwrap();
            s.extend(frame(
                FrameTag::DeviceState,
                &DeviceStateHeader {
                    name: "test-timer".into(),
                    instance: 3,
                    version: TIMER_SCHEMA.version,
                }
                .encode(&b),
            ));
        }
        if !m.sent[2] {
            let b = encode(&VCPU_SCHEMA, &source_vcpu_state()).unwrap();
            s.extend(frame(
                FrameTag::VcpuState,
                &VcpuStateHeader {
                    index: 0,
                    version: VCPU_SCHEMA.version,
                }
                .encode(&b),
            ));
        }
        // Flags 0: the exact end of stream, resuming.
        s.extend(end_of_stream(&mut Input(&[]), m, digest_on, full));
    }
    s
}

/// Writes as much of `bytes` as the socket takes now; the rest goes from a thread.
fn feed(ours: &UnixStream, bytes: Vec<u8>) -> Option<std::thread::JoinHandle<()>> {
    ours.set_nonblocking(true).unwrap();
    let mut w = ours;
    let mut at = 0;
    while at < bytes.len() {
        match w.write(&bytes[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("feeding the socket: {e}"),
        }
    }
    ours.set_nonblocking(false).unwrap();
    if at == bytes.len() {
        let _ = ours.shutdown(Shutdown::Write);
        return None;
    }
    let mut rest = ours.try_clone().unwrap();
    Some(std::thread::spawn(move || {
        // The destination may stop reading at any point: the rest is not wanted.
        let _ = rest.write_all(&bytes[at..]);
        let _ = rest.shutdown(Shutdown::Write);
    }))
}

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let structured = mode & 1 == 1;
    let full = mode & 2 == 2;
    let digest_on = mode & 4 == 0;
    let cut = mode & 8 == 8;
    let populate_on = mode & 16 == 16;

    let params = MigrationParams {
        digest: digest_on,
        populate_ahead: populate_on,
        ..wire_0_1(MigrationParams::default())
    };
    // What a source with these parameters states, so that fuzzing gets past the hello.
    let digest_prop = params.stated_wire_properties(&[]);
    let mut h = hello(FUZZ_LAYOUT, full);
    h.wire_props = digest_prop.clone();
    let mut stream = stream_prefix(&h);
    let mut model = Model::new();
    model.populate_on = populate_on;
    if structured {
        stream.extend(program(&mut Input(rest), &mut model, digest_on, full, cut));
    } else {
        stream.extend_from_slice(rest);
    }

    let vm = TestVm::destination(FUZZ_LAYOUT);
    let id = engine::DestinationIdentity {
        wire_props: digest_prop,
        ..destination_identity()
    };
    let (ours, theirs) = UnixStream::pair().unwrap();
    let feeder = feed(&ours, stream);
    let result = engine::receive(
        &vm,
        &id,
        &params,
        Channel::new(theirs),
        &MigrationMonitor::new(),
    );
    drop(ours);
    if let Some(f) = feeder {
        f.join().unwrap();
    }

    if let Err(e) = vm.check_invariants() {
        panic!("{e}");
    }
    match &result {
        Err(_) => assert!(
            !vm.resumed() && !vm.is_running(),
            "failed but the guest runs"
        ),
        Ok(_) if structured => {
            assert!(
                !(model.poisoned && !model.opaque),
                "completed a stream with a RAM batch it must refuse"
            );
            let own_digest = digest_on && model.eos_digest == Some(Some(model.digest.value()));
            if own_digest || (!model.opaque && !model.poisoned) {
                let mem = vm.test_ram().contents();
                for (b, (got, want)) in mem.iter().zip(&model.mem).enumerate() {
                    if got != want {
                        let page = got
                            .chunks(PAGE_SIZE)
                            .zip(want.chunks(PAGE_SIZE))
                            .position(|(g, w)| g != w)
                            .unwrap();
                        panic!("completed with block {b} page {page} not as sent");
                    }
                }
            }
        }
        Ok(_) => {}
    }
}
