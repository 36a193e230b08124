//! One data channel's bytes, end to end: a real destination (`engine::receive` on a unix
//! listener) into the small test VM of `crates/ferry-migration/tests/common` (two RAM
//! blocks of 32 and 8 pages), with the input as everything that follows the channel's
//! header.
//!
//! Each run binds a listener in a directory of the process's own, then plays an honest
//! source around the input: the main channel sends the stream header and a hello
//! announcing one data channel (with or without zstd), waits for the accept, and the data
//! channel connects with a valid `ChannelHeader` of the hello's session, sends the input
//! and closes. The main channel then announces, as `MultifdSync` frames, every sync packet
//! the input holds up to its last one, sends every device and vCPU state and an end of
//! stream whose digest and page count are those of the input's pages, and closes. So a
//! destination that applies the input as the format says completes, and any other ends
//! quickly with an error, never at a timeout.
//!
//! Input: a mode byte, then the rest.
//!
//! * bit 0: the hello negotiates zstd;
//! * bit 1: the rest is a program of packets the target builds with the wire encoders,
//!   mostly valid (pages of any block, zero or not, compressed or not, in and out of range;
//!   syncs in order or not; raw bytes; a byte flipped); otherwise the rest is the
//!   channel's bytes as they are;
//! * bit 3: a program that sends no last sync is not given one;
//! * bits 4 to 6 all set: the first 32 bytes of the rest replace the channel header, so the
//!   doorman sees any header (the destination then waits 100 ms for a channel the header
//!   does not bind, and the usual 10 s for one it does).
//!
//! Checks, beyond no panic and no hang: the target replays the channel's bytes with the
//! wire decoders and the receiver's rules (a packet number above the previous one, syncs
//! numbered from 1 without gaps, a block of the layout, offsets in it and each page once,
//! compressed data that unpacks to exactly its pages, every byte there up to the last
//! sync). The destination completes exactly when that replay reaches the last sync and
//! the header binds; then guest memory is exactly what the replay wrote, and the guest runs.
//! A failed receive leaves it stopped.

#![no_main]

#[path = "../../crates/ferry-migration/tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::*;
use ferry_migration::engine::digest::{content_hash, zero_page_hash, PageDigest};
use ferry_migration::engine::vm::MigratableVm;
use ferry_migration::engine::{self, Faults, Incoming, MigrationMonitor};
use ferry_migration::state::encode;
use ferry_migration::wire::{
    ChannelHeader, Compression, DeviceStateHeader, EndOfStream, FrameHeader, FrameTag, MultifdSync,
    PacketHeader, VcpuStateHeader, CHANNEL_VERSION, MAX_PACKET_PAGES,
};
use ferry_migration::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

/// Largest channel stream a program builds.
const MAX_STREAM: usize = 256 << 10;
/// How long the destination waits for a data channel whose header does not bind; one that
/// binds gets the engine's default wait, so a slow machine never fails a valid channel.
const STRAY_WAIT: Duration = Duration::from_millis(100);

/// Where this process binds its listener; made and removed by every run.
static DIR: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(init: init(), |data: &[u8]| run(data));

extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}

fn init() {
    const SIGPIPE: i32 = 13;
    const SIG_IGN: usize = 1;
    // SAFETY: installs the standard "ignore" disposition before any thread runs, so a
    // write to a channel the destination closed fails with EPIPE instead of killing us.
    unsafe { signal(SIGPIPE, SIG_IGN) };
    let dir = std::env::temp_dir().join(format!("ferry-fuzz-data-channel-{}", std::process::id()));
    DIR.set(dir).expect("set once");
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

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A page's bytes: zeros, a run of one byte with a marker (compresses well), or noise.
fn content(seed: u8) -> [u8; PAGE_SIZE] {
    match seed & 3 {
        0 => [0; PAGE_SIZE],
        1 => page_pattern(u64::from(seed >> 2)),
        _ => {
            let mut p = [seed >> 2; PAGE_SIZE];
            p[usize::from(seed) * 16 % PAGE_SIZE] ^= 0x5a;
            p
        }
    }
}

/// What a program has sent so far.
struct Program {
    bytes: Vec<u8>,
    packet: u64,
    sync: u64,
    last: bool,
}

fn page_packet(inp: &mut Input, p: &mut Program, zstd: bool) {
    // Block 2 does not exist; page `pages` is one past the block.
    let block = inp.u8() % 3;
    let pages = FUZZ_LAYOUT.get(usize::from(block)).map_or(8, |l| l.2) as u64;
    let count = 1 + usize::from(inp.u8()) % 8;
    let (mut normal, mut zero, mut data) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..count {
        let page = u64::from(inp.u8()) % (pages + 1);
        let seed = inp.u8();
        if seed == 0xff {
            zero.push(page);
        } else {
            normal.push(page);
            data.extend_from_slice(&content(seed));
        }
    }
    let how = inp.u8();
    let mut flags = 0;
    // Compressed when asked and smaller, or (bit 1) even when it is not.
    if how & 1 == 1 && !data.is_empty() && (zstd || how & 0x80 != 0) {
        let packed = zstd::bulk::compress(&data, 1).expect("zstd");
        if packed.len() < data.len() || how & 2 != 0 {
            flags = PacketHeader::ZSTD;
            data = packed;
        }
    }
    // The next packet number, sometimes with a gap, sometimes the previous one again.
    p.packet = match (how >> 2) & 3 {
        3 => p.packet,
        gap => p.packet + 1 + u64::from(gap),
    };
    let h = PacketHeader {
        flags,
        packet: p.packet,
        sync: 0,
        block: block.into(),
        normal: normal.len() as u32,
        zero: zero.len() as u32,
        data_len: data.len() as u32,
    };
    let mut b = h.encode().to_vec();
    for page in normal.iter().chain(&zero) {
        b.extend_from_slice(&page.to_le_bytes());
    }
    b.extend_from_slice(&data);
    if (how >> 4) & 7 == 7 {
        let at = usize::from(inp.u8()) * 257 % b.len();
        b[at] ^= inp.u8() | 1;
    }
    p.bytes.extend(b);
}

fn sync_packet(p: &mut Program, seq: u64, last: bool) {
    p.packet += 1;
    p.sync = seq;
    p.last |= last;
    let h = PacketHeader {
        flags: PacketHeader::SYNC | if last { PacketHeader::LAST } else { 0 },
        packet: p.packet,
        sync: seq,
        block: 0,
        normal: 0,
        zero: 0,
        data_len: 0,
    };
    p.bytes.extend_from_slice(&h.encode());
}

/// A data channel's bytes, built from a program; stops after a last sync.
fn program(inp: &mut Input, zstd: bool, cut: bool) -> Vec<u8> {
    let mut p = Program {
        bytes: Vec::new(),
        packet: 0,
        sync: 0,
        last: false,
    };
    while !inp.is_empty() && !p.last && p.bytes.len() < MAX_STREAM {
        match inp.u8() % 8 {
            0..=4 => page_packet(inp, &mut p, zstd),
            5 | 6 => {
                let how = inp.u8();
                let seq = if how & 6 == 6 {
                    u64::from(inp.u8())
                } else {
                    p.sync + 1
                };
                sync_packet(&mut p, seq, how & 1 == 1);
            }
            _ => {
                let n = usize::from(inp.u8() % 48);
                p.bytes.extend(inp.bytes(n));
            }
        }
    }
    if !p.last && !cut {
        let next = p.sync + 1;
        sync_packet(&mut p, next, true);
    }
    p.bytes
}

/// The channel's bytes as a receiver applies them, by the format's rules.
struct Replay {
    /// The bytes reach a last sync with every packet before it valid.
    valid: bool,
    /// The sync packets whose headers decode, in order: what the source announces.
    syncs: Vec<MultifdSync>,
    mem: Vec<Vec<u8>>,
    digest: PageDigest,
    pages: u64,
}

fn replay(b: &[u8], zstd: bool) -> Replay {
    let layout: Vec<usize> = FUZZ_LAYOUT.iter().map(|l| l.2).collect();
    let mut r = Replay {
        valid: false,
        syncs: Vec::new(),
        mem: layout.iter().map(|&p| vec![0; p * PAGE_SIZE]).collect(),
        digest: PageDigest::new(&layout),
        pages: 0,
    };
    let mut at = 0;
    let mut take = |n: usize| {
        let s = b.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let (mut last_packet, mut reached) = (0, 0);
    let (mut normal, mut zero, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    let mut unz = zstd::bulk::Decompressor::new().expect("zstd");
    let mut unpacked = Vec::with_capacity(MAX_PACKET_PAGES * PAGE_SIZE);
    loop {
        let Some(hb) = take(PacketHeader::LEN) else {
            return r;
        };
        let Ok(h) = PacketHeader::decode(hb.try_into().expect("40 bytes"), zstd) else {
            return r;
        };
        let last = h.flags & PacketHeader::LAST != 0;
        if h.is_sync() {
            r.syncs.push(MultifdSync { seq: h.sync, last });
        }
        if h.packet <= last_packet {
            return r;
        }
        last_packet = h.packet;
        if h.is_sync() {
            if h.sync != reached + 1 {
                return r;
            }
            reached = h.sync;
            if last {
                r.valid = true;
                return r;
            }
            continue;
        }
        let block = h.block as usize;
        let Some(&block_pages) = layout.get(block) else {
            return r;
        };
        let Some(offsets) = take(h.offsets_len()) else {
            return r;
        };
        if h.decode_offsets(
            offsets,
            block_pages as u64,
            &mut normal,
            &mut zero,
            &mut scratch,
        )
        .is_err()
        {
            return r;
        }
        let Some(data) = take(h.data_len as usize) else {
            return r;
        };
        let data = if h.flags & PacketHeader::ZSTD != 0 {
            unpacked.clear();
            match unz.decompress_to_buffer(data, &mut unpacked) {
                Ok(n) if n == normal.len() * PAGE_SIZE => &unpacked[..],
                _ => return r,
            }
        } else {
            data
        };
        let mem = &mut r.mem[block];
        for (&p, src) in normal.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            let page = &mut mem[p as usize * PAGE_SIZE..][..PAGE_SIZE];
            page.copy_from_slice(src);
            r.digest.update(block, p as usize, content_hash(page));
        }
        for &p in &zero {
            mem[p as usize * PAGE_SIZE..][..PAGE_SIZE].fill(0);
            r.digest.update(block, p as usize, zero_page_hash());
        }
        r.pages += u64::from(h.normal) + u64::from(h.zero);
    }
}

/// The main channel after the accept: the syncs, every state, the end of stream.
fn main_rest(r: &Replay) -> Vec<u8> {
    let mut s = Vec::new();
    for sync in &r.syncs {
        s.extend(frame(FrameTag::MultifdSync, &sync.encode()));
    }
    let states = source_device_states();
    for (i, (name, instance, schema)) in [
        ("test-uart", 0, &UART_SCHEMA),
        ("test-timer", 3, &TIMER_SCHEMA),
    ]
    .into_iter()
    .enumerate()
    {
        let b = encode(schema, &states[i]).expect("a valid state");
        s.extend(frame(
            FrameTag::DeviceState,
            &DeviceStateHeader {
                name: name.into(),
                instance,
                version: schema.version,
            }
            .encode(&b),
        ));
    }
    let b = encode(&VCPU_SCHEMA, &source_vcpu_state()).expect("a valid state");
    s.extend(frame(
        FrameTag::VcpuState,
        &VcpuStateHeader {
            index: 0,
            version: VCPU_SCHEMA.version,
        }
        .encode(&b),
    ));
    let eos = EndOfStream {
        digest: Some(r.digest.value()),
        full_digest: None,
        pages_sent: r.pages,
        resume: true,
    };
    s.extend(frame(FrameTag::EndOfStream, &eos.encode()));
    s
}

/// The source: the main channel up to the accept, the data channel, the rest of the main
/// channel; then it drains the return path until the destination closes it.
fn source(
    path: PathBuf,
    prefix: Vec<u8>,
    header: [u8; ChannelHeader::LEN],
    data: Vec<u8>,
    rest: Vec<u8>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut main = UnixStream::connect(&path).expect("connecting the main channel");
        main.write_all(&prefix).expect("writing the hello");
        let mut fh = [0u8; FrameHeader::LEN];
        main.read_exact(&mut fh).expect("the destination's answer");
        let fh = FrameHeader::decode(&fh).expect("a frame header");
        assert_eq!(fh.tag, FrameTag::Accept, "the hello was not accepted");
        let mut payload = vec![0u8; fh.len as usize];
        main.read_exact(&mut payload).expect("the accept");

        let mut ch = UnixStream::connect(&path).expect("connecting the data channel");
        // The destination may stop reading at any point: the rest is not wanted.
        let writer = thread::spawn(move || {
            let _ = ch.write_all(&header);
            let _ = ch.write_all(&data);
            let _ = ch.shutdown(Shutdown::Write);
        });
        let _ = main.write_all(&rest);
        let _ = main.shutdown(Shutdown::Write);
        let _ = std::io::copy(&mut main, &mut std::io::sink());
        writer.join().expect("the data channel's writer");
    })
}

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let zstd = mode & 1 == 1;
    let structured = mode & 2 == 2;
    let cut = mode & 8 == 8;
    let raw_header = mode & 0x70 == 0x70;

    let mut h = hello(FUZZ_LAYOUT, false);
    h.channels = 1;
    h.compression = if zstd {
        Compression::Zstd
    } else {
        Compression::None
    };
    let mut inp = Input(rest);
    let (header, binds) = if raw_header {
        let b: [u8; ChannelHeader::LEN] = inp.bytes(ChannelHeader::LEN).try_into().expect("32");
        let binds = ChannelHeader::decode(&b).is_ok_and(|c| {
            c.version == CHANNEL_VERSION && c.session_id == h.session_id && c.count == 1
        });
        (b, binds)
    } else {
        let c = ChannelHeader {
            version: CHANNEL_VERSION,
            session_id: h.session_id,
            index: 0,
            count: 1,
        };
        (c.encode(), true)
    };
    let stream = if structured {
        program(&mut inp, zstd, cut)
    } else {
        inp.0.to_vec()
    };
    let r = replay(&stream, zstd);

    let dir = DIR.get().expect("init ran");
    std::fs::create_dir_all(dir).expect("a directory for the listener");
    let path = dir.join("m.sock");
    let listener = Incoming::acceptor(UnixListener::bind(&path).expect("binding"));
    let src = source(path, stream_prefix(&h), header, stream, main_rest(&r));

    let vm = TestVm::destination(FUZZ_LAYOUT);
    let params = destination_params();
    let monitor = MigrationMonitor::new();
    monitor.set_faults(Faults {
        channel_wait: (!binds).then_some(STRAY_WAIT),
        ..Faults::NONE
    });
    let result = engine::receive(&vm, &destination_identity(), &params, listener, &monitor);
    src.join().expect("the source");
    let _ = std::fs::remove_dir_all(dir);

    if let Err(e) = vm.check_invariants() {
        panic!("{e}");
    }
    let expect = binds && r.valid;
    match &result {
        Ok(_) => {
            assert!(
                expect,
                "completed, but the header binds: {binds}, the channel is valid: {}",
                r.valid
            );
            assert!(vm.resumed() && vm.is_running(), "completed but not resumed");
            let mem = vm.test_ram().contents();
            for (b, (got, want)) in mem.iter().zip(&r.mem).enumerate() {
                if got != want {
                    let page = got
                        .chunks(PAGE_SIZE)
                        .zip(want.chunks(PAGE_SIZE))
                        .position(|(g, w)| g != w)
                        .expect("a page differs");
                    panic!("completed with block {b} page {page} not as sent");
                }
            }
        }
        Err(e) => {
            assert!(
                !expect,
                "a valid channel was refused: {}",
                engine::error_chain(e)
            );
            assert!(
                !vm.resumed() && !vm.is_running(),
                "failed but the guest runs"
            );
        }
    }
}
