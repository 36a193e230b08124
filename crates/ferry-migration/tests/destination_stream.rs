//! The destination's handling of a whole migration stream, against hostile input.
//!
//! A real source migrates a tiny VM through a recording proxy into a real destination.
//! The recorded forward stream is then replayed, cut short, corrupted byte by byte and
//! spliced with hostile frames into fresh destinations. Whatever it is sent, a destination
//! must end with an error that names the problem, quickly, without allocating in
//! proportion to a length it was told, and without resuming a guest whose state did not
//! load completely or whose memory differs from the source's.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ferry_migration::engine::vm::MigratableVm;
use ferry_migration::engine::{
    self, error_chain, Channel, DestinationIdentity, MigrationError, MigrationInfo,
    MigrationMonitor, MigrationParams, MigrationStatus,
};
use ferry_migration::state::{encode, DeviceState, Value};
use ferry_migration::wire::{
    decode_reason, encode_reason, Accept, Completed, DeviceStateHeader, EndOfStream, FrameHeader,
    FrameTag, PassEnd, PopulatedExtents, RamBatchHeader, Refuse, RefuseCause, StreamHeader,
    VcpuStateHeader, ANNOTATION_PREFIX, MAX_DEVICE_STATE_LEN,
};
use ferry_migration::PAGE_SIZE;

// ---------------------------------------------------------------------------------------
// Allocation tracking: the largest single allocation each thread made since it last asked.

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only
// records sizes in a thread-local `Cell`, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// No single allocation a destination makes for these streams may exceed this. Its own
/// buffers are a few KiB (a batch's entries and iovecs, the page digest of 640 pages);
/// the hostile frames below claim lengths from 1 MiB to 4 GiB.
const ALLOC_BOUND: usize = 64 << 10;

/// How long any one replay may take, however hostile its stream.
const REPLAY_BOUND: Duration = Duration::from_secs(5);

/// Runs a test body on its own thread and fails the test if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let _ = tx.send(body());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            h.join().expect("test thread");
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the body returned without sending"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test did not finish within {limit:?}"),
    }
}

const LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The recording.

/// Guest memory before the migration starts: data pages, a full batch's worth of pages
/// the guest wrote zeros to (sent as zero entries), pages scattered to the ends of blocks.
fn initial_writes() -> Vec<GuestWrite> {
    let mut w = Vec::new();
    for p in 0..40 {
        w.push((0, p, Some(1000 + p as u64)));
    }
    for p in 40..140 {
        w.push((0, p, None));
    }
    w.push((0, 300, Some(1300)));
    w.push((0, 511, Some(1511)));
    for p in 0..8 {
        w.push((1, p, Some(2000 + p as u64)));
    }
    w.push((1, 127, Some(2127)));
    w
}

/// The guest rewrites pages during passes 0 and 1 (one of them twice, one to zeros, one
/// never touched before) and a few more as it stops, so the stream has four passes,
/// pages sent twice and a final pass with a zero page.
fn script() -> Script {
    Script {
        on_harvest: vec![
            vec![
                (0, 3, Some(3003)),
                (0, 4, Some(3004)),
                (1, 2, Some(3102)),
                (0, 10, None),
                (0, 450, Some(3450)),
            ],
            vec![(0, 3, Some(4003)), (1, 100, Some(4100))],
        ],
        on_pause: vec![(1, 7, Some(5107)), (0, 4, None), (0, 41, Some(5041))],
    }
}

/// The source never thinks it converged while pages are dirty, so every scripted write
/// gets a pass of its own.
fn source_params() -> MigrationParams {
    MigrationParams {
        downtime_limit: Duration::from_nanos(1),
        // This file replays the main channel alone: pages travel on it.
        multifd_channels: 0,
        ..wire_0_1(MigrationParams::default())
    }
}

struct Recording {
    /// The forward stream, source to destination, byte for byte.
    stream: Vec<u8>,
    frames: Vec<Span>,
    source_ram: Vec<Vec<u8>>,
    source: MigrationInfo,
    destination: MigrationInfo,
    /// What the recording's own destination loaded.
    loaded: Record,
    resumed: bool,
}

impl Recording {
    fn first(&self, tag: FrameTag) -> Span {
        *self
            .frames
            .iter()
            .find(|f| f.tag == tag)
            .unwrap_or_else(|| panic!("no {} frame", tag.name()))
    }

    fn all(&self, tag: FrameTag) -> Vec<Span> {
        self.frames
            .iter()
            .filter(|f| f.tag == tag)
            .copied()
            .collect()
    }

    fn bytes(&self, s: Span) -> &[u8] {
        &self.stream[s.start..s.end()]
    }

    /// Stream header, hello, and every RAM batch and pass end: all but the state.
    fn ram_part(&self) -> &[u8] {
        &self.stream[..self.first(FrameTag::DeviceState).start]
    }

    fn device_frames(&self) -> Vec<u8> {
        self.all(FrameTag::DeviceState)
            .into_iter()
            .flat_map(|s| self.bytes(s).to_vec())
            .collect()
    }

    fn vcpu_frame(&self) -> &[u8] {
        self.bytes(self.first(FrameTag::VcpuState))
    }

    fn eos_frame(&self) -> &[u8] {
        self.bytes(self.first(FrameTag::EndOfStream))
    }

    fn eos(&self) -> EndOfStream {
        EndOfStream::decode(&self.stream[self.first(FrameTag::EndOfStream).payload()]).unwrap()
    }
}

fn socket_path() -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "ferry-streamfuzz-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

/// Copies `from` to `to` until `from` ends, keeping a copy when `keep` is given, then
/// closes the writing half of `to`.
fn pump(mut from: UnixStream, mut to: UnixStream, mut keep: Option<&mut Vec<u8>>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(k) = keep.as_deref_mut() {
                    k.extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Migrates a source VM into a destination through a proxy that records the forward
/// stream.
fn record() -> Recording {
    record_with(source_params(), destination_params(), true)
}

/// [`record`] with the source's and the destination's parameters, and a source whose
/// populated scan is exact or not.
fn record_with(src_params: MigrationParams, dst_params: MigrationParams, exact: bool) -> Recording {
    let src = TestVm::source(TEST_LAYOUT, &initial_writes(), script());
    src.test_ram().set_populated_exact(exact);
    let dst = Arc::new(TestVm::destination(TEST_LAYOUT));
    let path = socket_path();
    let listener = UnixListener::bind(&path).unwrap();
    let dst2 = Arc::clone(&dst);
    let proxy = thread::spawn(move || {
        let (from_source, _) = listener.accept().unwrap();
        let (dest_end, proxy_end) = UnixStream::pair().unwrap();
        let dest = thread::spawn(move || {
            engine::receive(
                dst2.as_ref(),
                &destination_identity(),
                &dst_params,
                Channel::new(dest_end),
                &MigrationMonitor::new(),
            )
        });
        let back = {
            let (from, to) = (
                proxy_end.try_clone().unwrap(),
                from_source.try_clone().unwrap(),
            );
            thread::spawn(move || pump(from, to, None))
        };
        let mut stream = Vec::new();
        pump(from_source, proxy_end, Some(&mut stream));
        back.join().unwrap();
        (stream, dest.join().unwrap())
    });
    let source = engine::migrate(
        &src,
        &source_identity(),
        &src_params,
        &Dial::Unix(path.clone()),
        &MigrationMonitor::new(),
    );
    let (stream, destination) = proxy.join().unwrap();
    let _ = std::fs::remove_file(&path);
    let source =
        source.unwrap_or_else(|e| panic!("the recorded migration failed: {}", error_chain(&e)));
    let destination = destination
        .unwrap_or_else(|e| panic!("the recording's destination failed: {}", error_chain(&e)));
    dst.check_invariants().unwrap();
    assert!(!src.is_running(), "a migrated source stays stopped");
    Recording {
        frames: frames(&stream),
        stream,
        source_ram: src.test_ram().contents(),
        source,
        destination,
        loaded: dst.record(),
        resumed: dst.resumed(),
    }
}

fn recording() -> &'static Recording {
    static R: OnceLock<Recording> = OnceLock::new();
    R.get_or_init(record)
}

// ---------------------------------------------------------------------------------------
// Replaying into a fresh destination.

struct Outcome {
    result: Result<MigrationInfo, MigrationError>,
    vm: TestVm,
    /// What the destination wrote on the return path.
    back: Vec<u8>,
    elapsed: Duration,
    largest_alloc: usize,
}

impl Outcome {
    fn error(&self) -> String {
        match &self.result {
            Ok(_) => "no error".into(),
            Err(e) => error_chain(e),
        }
    }

    /// The return-path frames but keepalives, in order.
    fn replies(&self) -> Vec<(FrameTag, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + FrameHeader::LEN <= self.back.len() {
            let fh = FrameHeader::decode(self.back[at..at + FrameHeader::LEN].try_into().unwrap())
                .expect("the destination writes well-formed frames");
            at += FrameHeader::LEN;
            let end = at + fh.len as usize;
            assert!(end <= self.back.len(), "return path cut inside a frame");
            // Keepalives come at their own pace; the answers are what is checked.
            if fh.tag != FrameTag::KeepaliveReturn {
                out.push((fh.tag, self.back[at..end].to_vec()));
            }
            at = end;
        }
        assert_eq!(at, self.back.len(), "stray bytes on the return path");
        out
    }
}

/// Feeds `stream` into a fresh destination over a socket pair and drains its answers.
fn replay(stream: &[u8]) -> Outcome {
    replay_with(stream, true)
}

/// [`replay`] into a destination whose `migration.digest` is `digest`.
fn replay_with(stream: &[u8], digest: bool) -> Outcome {
    replay_params(
        stream,
        MigrationParams {
            digest,
            ..destination_params()
        },
    )
}

/// [`replay`] into a destination with `params`.
fn replay_params(stream: &[u8], params: MigrationParams) -> Outcome {
    let id = DestinationIdentity {
        wire_props: vec![(
            "migration.digest".into(),
            if params.digest { "on" } else { "off" }.into(),
        )],
        ..destination_identity()
    };
    let vm = TestVm::destination(TEST_LAYOUT);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut feeder = ours.try_clone().unwrap();
    let bytes = stream.to_vec();
    let feed = thread::spawn(move || {
        // The destination may give up and close early: the rest is not wanted.
        let _ = feeder.write_all(&bytes);
        let _ = feeder.shutdown(Shutdown::Write);
    });
    let drain = thread::spawn(move || {
        let mut ours = ours;
        let mut back = Vec::new();
        let _ = ours.read_to_end(&mut back);
        back
    });
    let monitor = MigrationMonitor::new();
    LARGEST.with(|l| l.set(0));
    let t = Instant::now();
    let result = engine::receive(&vm, &id, &params, Channel::new(theirs), &monitor);
    let elapsed = t.elapsed();
    let largest_alloc = LARGEST.with(Cell::get);
    feed.join().unwrap();
    let back = drain.join().unwrap();
    if let Err(e) = vm.check_invariants() {
        panic!("destination broke an invariant: {e}");
    }
    match &result {
        Ok(_) => assert_eq!(monitor.status(), MigrationStatus::Completed),
        Err(_) => {
            assert_eq!(monitor.status(), MigrationStatus::Failed);
            assert!(!vm.resumed(), "resumed although receive failed");
        }
    }
    assert!(
        elapsed < REPLAY_BOUND,
        "the destination took {elapsed:?} over {} bytes",
        stream.len()
    );
    assert!(
        largest_alloc < ALLOC_BOUND,
        "the destination allocated {largest_alloc} bytes at once"
    );
    Outcome {
        result,
        vm,
        back,
        elapsed,
        largest_alloc,
    }
}

/// The stream must fail naming `needle`, leave the guest stopped, and, unless the source
/// is gone or already knows, tell the source the same reason on the return path.
fn assert_refused(stream: &[u8], needle: &str) -> Outcome {
    check_refused(replay(stream), needle)
}

fn check_refused(o: Outcome, needle: &str) -> Outcome {
    let err = o.error();
    assert!(
        o.result.is_err(),
        "accepted a stream that should fail with {needle:?}"
    );
    assert!(err.contains(needle), "expected {needle:?}, got: {err}");
    assert!(!o.vm.resumed());
    assert!(!o.vm.is_running());
    let replies = o.replies();
    assert_eq!(
        replies.first().map(|r| r.0),
        Some(FrameTag::Accept),
        "every stream here gets past the hello"
    );
    let told = !matches!(
        o.result,
        Err(MigrationError::PeerClosed { .. } | MigrationError::SourceAborted(_))
    );
    if told {
        let (tag, payload) = replies.last().unwrap();
        assert_eq!(*tag, FrameTag::LoadFailed, "the source was not told: {err}");
        let reason = decode_reason(payload, "load failed").unwrap();
        assert!(reason.contains(needle), "the source was told {reason:?}");
    } else {
        assert_eq!(replies.len(), 1, "nothing after the accept");
    }
    o
}

fn splice(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------------------
// The baseline and the fuzz target's prefix.

#[test]
fn the_recorded_migration_completes_and_resumes_with_the_sources_memory() {
    within(LIMIT, || {
        let r = recording();
        assert_eq!(r.source.status, MigrationStatus::Completed);
        assert_eq!(r.destination.status, MigrationStatus::Completed);
        assert_eq!(r.destination.verified.as_deref(), Some("digest"));
        assert!(r.resumed, "the destination did not resume the guest");
        assert_eq!(
            r.loaded.vcpus[0].as_ref().map(|s| &s.fields),
            Some(&source_vcpu_state().fields)
        );
        for (got, want) in r.loaded.devices.iter().zip(source_device_states()) {
            let got = got.as_ref().expect("device loaded");
            assert_eq!(got.fields, want.fields);
            assert_eq!(got.subsections, want.subsections);
        }
        // The stream covers what the replays below rely on.
        let tags: Vec<FrameTag> = r.frames.iter().map(|f| f.tag).collect();
        assert_eq!(tags[0], FrameTag::Hello);
        assert_eq!(r.all(FrameTag::PassEnd).len(), 4, "four passes: {tags:?}");
        assert_eq!(
            &tags[tags.len() - 4..],
            [
                FrameTag::DeviceState,
                FrameTag::DeviceState,
                FrameTag::VcpuState,
                FrameTag::EndOfStream
            ]
        );
        let counts: Vec<u32> = r
            .all(FrameTag::RamBatch)
            .iter()
            .map(|s| u32::from_le_bytes(r.stream[s.start + 12..s.start + 16].try_into().unwrap()))
            .collect();
        assert!(counts.contains(&128), "no full batch: {counts:?}");
        assert!(
            r.source.ram.duplicate > 100,
            "zero pages: {}",
            r.source.ram.duplicate
        );
        assert_eq!(
            r.eos().pages_sent,
            r.source.ram.normal + r.source.ram.duplicate
        );
        assert!(r.eos().resume);
    });
}

#[test]
fn the_recorded_stream_replays_into_a_fresh_destination() {
    within(LIMIT, || {
        let r = recording();
        let o = replay(&r.stream);
        if let Err(e) = &o.result {
            panic!("replay failed: {}", error_chain(e));
        }
        assert!(o.vm.resumed() && o.vm.is_running());
        assert_eq!(o.vm.test_ram().contents(), r.source_ram, "memory differs");
        let replies = o.replies();
        let tags: Vec<FrameTag> = replies.iter().map(|r| r.0).collect();
        assert_eq!(tags, [FrameTag::Accept, FrameTag::Completed]);
        let done = Completed::decode(&replies[1].1).unwrap();
        assert!(done.pages_written > 0);
        eprintln!(
            "replay: {} bytes in {:?}, largest allocation {} bytes",
            r.stream.len(),
            o.elapsed,
            o.largest_alloc
        );
    });
}

/// The fuzz target builds its prefix with the wire encoders instead of recording it;
/// apart from the session id, it must be what a real source sends.
#[test]
fn the_built_prefix_matches_the_recorded_one_but_for_the_session_id() {
    within(LIMIT, || {
        let r = recording();
        let hello = r.first(FrameTag::Hello);
        let recorded = &r.stream[..hello.end()];
        let built = stream_prefix(&common::hello(TEST_LAYOUT, false));
        assert_eq!(built.len(), recorded.len());
        let id = hello.payload().start..hello.payload().start + 8;
        for (i, (a, b)) in built.iter().zip(recorded).enumerate() {
            assert!(
                a == b || id.contains(&i),
                "byte {i} differs: {a:#04x} vs {b:#04x}"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// (b) Truncation.

#[test]
fn every_truncation_fails_without_resuming() {
    within(LIMIT, || {
        let r = recording();
        let mut cuts = vec![
            0,
            1,
            StreamHeader::LEN - 1,
            StreamHeader::LEN,
            r.stream.len() - 1,
        ];
        for f in &r.frames {
            let p = f.payload();
            cuts.extend([
                f.start,
                f.start + 1,
                f.start + FrameHeader::LEN - 1,
                p.start,
                p.start + f.len / 2,
                f.end() - 1,
            ]);
            if f.tag == FrameTag::RamBatch {
                // Inside the entries, and at the first and the last page of data.
                let entries =
                    8 * u32::from_le_bytes(r.stream[p.start + 4..p.start + 8].try_into().unwrap())
                        as usize;
                cuts.extend([
                    p.start + 8 + entries / 2,
                    p.start + 8 + entries,
                    p.start + 8 + entries + 1,
                ]);
                if f.len > 8 + entries {
                    cuts.extend([p.start + 8 + entries + PAGE_SIZE, f.end() - PAGE_SIZE]);
                }
            }
        }
        cuts.retain(|&c| c < r.stream.len());
        cuts.sort_unstable();
        cuts.dedup();
        for &cut in &cuts {
            let o = replay(&r.stream[..cut]);
            match &o.result {
                Err(MigrationError::PeerClosed { peer: "source", .. }) => {}
                Err(e) => panic!(
                    "cut at {cut}: expected the source to be seen gone, got: {}",
                    error_chain(e)
                ),
                Ok(_) => panic!("cut at {cut} of {}: accepted", r.stream.len()),
            }
            assert!(!o.vm.resumed(), "cut at {cut}: resumed");
            assert!(
                !o.replies().iter().any(|(t, _)| *t == FrameTag::Completed),
                "cut at {cut}: completed"
            );
        }
        eprintln!("{} truncations, all refused", cuts.len());
    });
}

// ---------------------------------------------------------------------------------------
// (c) Single-byte corruption.

/// Names the part of the recorded stream that byte `at` belongs to.
struct Map {
    parts: Vec<(usize, &'static str)>,
}

impl Map {
    fn new(r: &Recording) -> Self {
        let mut parts = vec![(0, "stream header")];
        let s = &r.stream;
        for f in &r.frames {
            let p = f.payload().start;
            parts.push((f.start, "frame header"));
            match f.tag {
                FrameTag::Hello => hello_parts(&s[p..f.end()], p, &mut parts),
                FrameTag::RamBatch => {
                    let count = u32::from_le_bytes(s[p + 4..p + 8].try_into().unwrap()) as usize;
                    parts.push((p, "RAM batch header"));
                    parts.push((p + 8, "RAM batch entries"));
                    if f.len > 8 + 8 * count {
                        parts.push((p + 8 + 8 * count, "page data"));
                    }
                }
                FrameTag::PassEnd => parts.push((p, "pass end")),
                FrameTag::DeviceState => {
                    let n = u16::from_le_bytes(s[p..p + 2].try_into().unwrap()) as usize;
                    parts.push((p, "device state name"));
                    parts.push((p + 2 + n, "device state instance"));
                    parts.push((p + 6 + n, "device state version"));
                    parts.push((p + 10 + n, "device state body"));
                }
                FrameTag::VcpuState => {
                    parts.push((p, "vCPU index"));
                    parts.push((p + 4, "vCPU state version"));
                    parts.push((p + 8, "vCPU state body"));
                }
                FrameTag::EndOfStream => {
                    parts.push((p, "end of stream flags"));
                    parts.push((p + 1, "end of stream digest"));
                    parts.push((p + 9, "end of stream full digest"));
                    parts.push((p + 17, "end of stream page count"));
                }
                t => panic!("unexpected {} in the recording", t.name()),
            }
        }
        Self { parts }
    }

    fn part(&self, at: usize) -> &'static str {
        let i = self.parts.partition_point(|&(start, _)| start <= at);
        self.parts[i - 1].1
    }
}

/// The hello's fields, walking its encoding.
fn hello_parts(h: &[u8], base: usize, parts: &mut Vec<(usize, &'static str)>) {
    let mut at = 0;
    let u16_at = |at: usize| u16::from_le_bytes(h[at..at + 2].try_into().unwrap()) as usize;
    let mut field = |at: &mut usize, len: usize, name: &'static str| {
        parts.push((base + *at, name));
        *at += len;
    };
    field(&mut at, 8, "hello session id");
    let n = u16_at(at);
    field(&mut at, 2 + n, "hello release");
    let n = u16_at(at);
    field(&mut at, 2 + n, "hello machine");
    field(&mut at, 4, "hello page size");
    field(&mut at, 4, "hello flags");
    let props = u16_at(at);
    field(&mut at, 2, "hello wire properties");
    let annotation = |at: usize| h[at + 2..].starts_with(ANNOTATION_PREFIX.as_bytes());
    for _ in 0..props {
        let k = u16_at(at);
        let v = u16_at(at + 2 + k);
        let part = if annotation(at) {
            "hello annotations"
        } else {
            "hello wire properties"
        };
        field(&mut at, 4 + k + v, part);
    }
    let pinned = u16_at(at);
    field(&mut at, 2, "hello compat-pinned properties");
    for _ in 0..pinned {
        let k = u16_at(at);
        let part = if annotation(at) {
            "hello annotations"
        } else {
            "hello compat-pinned properties"
        };
        field(&mut at, 2 + k, part);
    }
    let blocks = u16_at(at);
    field(&mut at, 2, "hello RAM blocks");
    for _ in 0..blocks {
        let n = u16_at(at);
        field(&mut at, 2 + n + 16, "hello RAM blocks");
    }
    field(&mut at, 4, "hello vCPU count");
    let n = u16_at(at);
    field(&mut at, 2 + n, "hello vCPU kind");
    field(&mut at, 4, "hello vCPU version");
    let devices = u16_at(at);
    field(&mut at, 2, "hello device count");
    for _ in 0..devices {
        let n = u16_at(at);
        field(&mut at, 2 + n, "hello device name");
        field(&mut at, 4, "hello device instance");
        field(&mut at, 4, "hello device version");
    }
    field(&mut at, 2, "hello channel count");
    field(&mut at, 1, "hello compression");
    assert_eq!(at, h.len(), "hello walk");
}

/// Parts of the stream a corruption may hit and still end in a completed migration,
/// with why the destination cannot notice.
const UNCHECKED: &[(&str, &str)] = &[
    (
        "hello session id",
        "names the migration for later channels; one channel here",
    ),
    (
        "hello release",
        "the source's release, used in messages only",
    ),
    (
        "hello vCPU version",
        "checked against the loadable range only; each state frame carries its own version",
    ),
    (
        "hello device version",
        "checked against the loadable range only; each state frame carries its own version",
    ),
    (
        "hello annotations",
        "advisory: a corrupted switchover-commit annotation that still decodes reads as a \
         source without the commitment, and the destination then waits for the source to let \
         go of the guest before it resumes it (0.1.0's handover), which is as safe",
    ),
    ("pass end", "pass number and page count are for statistics"),
    (
        "RAM batch entries",
        "a page index turned into one its batch does not name, where both pages are sent \
         again later: the misdirected write is overwritten (checked below, both ways)",
    ),
    (
        "page data",
        "of a page sent again later: the corrupted copy is overwritten (checked below, \
         both ways)",
    ),
    (
        "end of stream full digest",
        "not read when the flags carry no full digest",
    ),
    (
        "end of stream flags",
        "the resume bit: the guest arrives stopped instead of running",
    ),
    (
        "device state body",
        "device state carries no checksum: a field value that still decodes loads as sent",
    ),
    (
        "vCPU state body",
        "vCPU state carries no checksum: a field value that still decodes loads as sent",
    ),
];

/// One page entry of the recording, in the order the destination applies them.
struct Sent {
    /// Offset of the batch's frame.
    batch: usize,
    /// Offset of the entry.
    entry_at: usize,
    /// Offset of the page's data, unless it is a zero page.
    data_at: Option<usize>,
    block: u32,
    entry: u64,
}

fn sends(r: &Recording) -> Vec<Sent> {
    let mut out = Vec::new();
    for f in r.all(FrameTag::RamBatch) {
        let p = f.payload().start;
        let block = u32::from_le_bytes(r.stream[p..p + 4].try_into().unwrap());
        let count = u32::from_le_bytes(r.stream[p + 4..p + 8].try_into().unwrap()) as usize;
        let mut data = p + 8 + 8 * count;
        for i in 0..count {
            let at = p + 8 + 8 * i;
            let entry = u64::from_le_bytes(r.stream[at..at + 8].try_into().unwrap());
            let zero = entry & RamBatchHeader::ZERO != 0;
            out.push(Sent {
                batch: f.start,
                entry_at: at,
                data_at: (!zero).then_some(data),
                block,
                entry,
            });
            if !zero {
                data += PAGE_SIZE;
            }
        }
    }
    out
}

/// Whether `page` of `block` is sent again after entry `k`.
fn sent_after(sends: &[Sent], k: usize, block: u32, page: u64) -> bool {
    sends[k + 1..]
        .iter()
        .any(|s| s.block == block && s.entry & RamBatchHeader::PAGE_MASK == page)
}

/// Whether flipping `mask` into the entry byte at `at` only misdirects a write that later
/// batches overwrite: it turns the page index into one its batch does not name already,
/// and both pages are sent again after it.
fn entry_superseded(sends: &[Sent], at: usize, mask: u8) -> bool {
    let k = sends.partition_point(|s| s.entry_at + 8 <= at);
    let s = &sends[k];
    let bad = s.entry ^ (u64::from(mask) << (8 * (at - s.entry_at)));
    let page = |e: u64| e & RamBatchHeader::PAGE_MASK;
    let in_batch = sends
        .iter()
        .any(|o| o.batch == s.batch && page(o.entry) == page(bad));
    bad & !RamBatchHeader::PAGE_MASK == s.entry & !RamBatchHeader::PAGE_MASK
        && !in_batch
        && sent_after(sends, k, s.block, page(s.entry))
        && sent_after(sends, k, s.block, page(bad))
}

/// Whether the page whose data holds byte `at` is sent again later, so a corrupted copy
/// of it is overwritten.
fn data_superseded(sends: &[Sent], at: usize) -> bool {
    let k = sends
        .iter()
        .position(|s| s.data_at.is_some_and(|d| (d..d + PAGE_SIZE).contains(&at)))
        .expect("a byte of page data");
    let s = &sends[k];
    sent_after(sends, k, s.block, s.entry & RamBatchHeader::PAGE_MASK)
}

/// A small deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn single_byte_corruptions_never_resume_with_wrong_memory() {
    within(Duration::from_secs(60), || {
        let r = recording();
        let map = Map::new(r);
        let mut rng = Rng(0x5eed);
        // Every byte that is not page data gets a bit flip (a different bit from byte to
        // byte); the hello, pass ends, state and end of stream, where single bits decide
        // the most, get all eight. Page data gets a sample: the first and last byte of
        // every page and one in between, each with a random mask.
        let mut cases: Vec<(usize, u8)> = Vec::new();
        let state_start = r.first(FrameTag::DeviceState).start;
        for at in 0..r.stream.len() {
            let part = map.part(at);
            if part == "page data" {
                continue;
            }
            if at >= state_start || part.starts_with("hello") || part == "pass end" {
                cases.extend((0..8).map(|b| (at, 1u8 << b)));
            } else {
                cases.push((at, 1u8 << (at % 8)));
            }
        }
        for f in r.all(FrameTag::RamBatch) {
            let p = f.payload();
            let count =
                u32::from_le_bytes(r.stream[p.start + 4..p.start + 8].try_into().unwrap()) as usize;
            let data = p.start + 8 + 8 * count;
            for page in (data..p.end).step_by(PAGE_SIZE) {
                let mid = page + 1 + (rng.next() as usize % (PAGE_SIZE - 2));
                for at in [page, mid, page + PAGE_SIZE - 1] {
                    cases.push((at, (rng.next() as u8) | 1));
                }
            }
        }

        let mut accepted: std::collections::BTreeMap<&str, usize> = Default::default();
        let mut refused: std::collections::BTreeMap<&str, usize> = Default::default();
        let mut stream = r.stream.clone();
        let second_device = r.all(FrameTag::DeviceState)[1].start;
        let sends = sends(r);
        for &(at, mask) in &cases {
            stream[at] ^= mask;
            let o = replay(&stream);
            stream[at] ^= mask;
            let part = map.part(at);
            // Where a corrupted copy is overwritten later the migration must complete, and
            // where it is not it must fail.
            let harmless = match part {
                "page data" => Some(data_superseded(&sends, at)),
                "RAM batch entries" => Some(entry_superseded(&sends, at, mask)),
                _ => None,
            };
            if let Some(h) = harmless {
                assert_eq!(
                    o.result.is_ok(),
                    h,
                    "{part} at {at} ^ {mask:#04x}: {}",
                    o.error()
                );
            }
            match &o.result {
                Err(e) => {
                    *refused.entry(part).or_default() += 1;
                    if part == "page data" {
                        assert!(
                            matches!(e, MigrationError::Verify(m) if m.contains("guest memory digest differs")),
                            "page data at {at} ^ {mask:#04x}: {}",
                            error_chain(e)
                        );
                    }
                }
                Ok(_) => {
                    *accepted.entry(part).or_default() += 1;
                    assert!(
                        UNCHECKED.iter().any(|(p, _)| *p == part),
                        "a corruption of the {part} at {at} ^ {mask:#04x} was accepted"
                    );
                    assert_eq!(
                        o.vm.test_ram().contents(),
                        r.source_ram,
                        "{part} at {at} ^ {mask:#04x}: completed with memory that differs"
                    );
                    assert_eq!(
                        o.vm.resumed(),
                        !(part == "end of stream flags" && mask == 4),
                        "{part} at {at} ^ {mask:#04x}"
                    );
                    let got = o.vm.record();
                    if part == "device state body" {
                        let dev = usize::from(at > second_device);
                        let loaded = got.devices[dev].as_ref().unwrap();
                        let sent = &source_device_states()[dev];
                        assert!(
                            loaded.fields != sent.fields || loaded.subsections != sent.subsections,
                            "byte {at} ^ {mask:#04x} changed nothing"
                        );
                    }
                    if part == "vCPU state body" {
                        let loaded = got.vcpus[0].as_ref().unwrap();
                        assert_ne!(loaded.fields, source_vcpu_state().fields, "byte {at}");
                    }
                }
            }
        }
        eprintln!("{} corruptions; refused by part: {refused:?}", cases.len());
        eprintln!("completed anyway, by part (memory always equal): {accepted:?}");
    });
}

// ---------------------------------------------------------------------------------------
// (d) Hostile frames.

fn batch(block: u32, entries: &[(u64, bool)], data: &[[u8; PAGE_SIZE]]) -> Vec<u8> {
    let mut p = RamBatchHeader {
        block,
        count: entries.len() as u32,
    }
    .encode()
    .to_vec();
    for &(page, zero) in entries {
        p.extend_from_slice(&(page | if zero { RamBatchHeader::ZERO } else { 0 }).to_le_bytes());
    }
    for d in data {
        p.extend_from_slice(d);
    }
    frame(FrameTag::RamBatch, &p)
}

fn device_frame(name: &str, instance: u32, version: u32, state: &[u8]) -> Vec<u8> {
    frame(
        FrameTag::DeviceState,
        &DeviceStateHeader {
            name: name.into(),
            instance,
            version,
        }
        .encode(state),
    )
}

fn timer_state(state: &DeviceState) -> Vec<u8> {
    encode(&TIMER_SCHEMA, state).unwrap()
}

#[test]
fn a_device_state_claiming_a_huge_length_is_refused_before_reading_it() {
    within(LIMIT, || {
        let r = recording();
        let head = DeviceStateHeader {
            name: "test-uart".into(),
            instance: 0,
            version: 1,
        }
        .encode(&[0xAB; 64]);
        let huge = raw_frame(FrameTag::DeviceState as u8, MAX_DEVICE_STATE_LEN, &head);
        let claimed = MAX_DEVICE_STATE_LEN as usize - (2 + "test-uart".len() + 8);
        // `replay` checks that no allocation came near the claim.
        assert_refused(
            &splice(&[r.ram_part(), &huge]),
            &format!(
                "device state: {claimed} is over the limit of {}",
                UART_SCHEMA.max_encoded_len()
            ),
        );
        // The same claim from a device the hello never announced.
        let head = DeviceStateHeader {
            name: "test-nic".into(),
            instance: 0,
            version: 1,
        }
        .encode(&[]);
        assert_refused(
            &splice(&[r.ram_part(), &raw_frame(4, MAX_DEVICE_STATE_LEN, &head)]),
            "state for device test-nic instance 0, which the hello did not announce",
        );
        // Past the frame limit itself.
        assert_refused(
            &splice(&[r.ram_part(), &raw_frame(4, u32::MAX, &head)]),
            "device state: 4294967295 is over the limit of 1073741824",
        );
        // A vCPU state at its frame limit.
        let v = VcpuStateHeader {
            index: 0,
            version: 2,
        }
        .encode(&[0; 16]);
        assert_refused(
            &splice(&[r.ram_part(), &raw_frame(5, 1 << 20, &v)]),
            &format!(
                "vCPU state: {} is over the limit of {}",
                (1 << 20) - 8,
                VCPU_SCHEMA.max_encoded_len()
            ),
        );
        // A name length past the bound, and a frame too short for its own name.
        assert_refused(
            &splice(&[r.ram_part(), &raw_frame(4, 300, &[0xff, 0x7f])]),
            "device state name: 32767 is over the limit of 128",
        );
        assert_refused(
            &splice(&[r.ram_part(), &raw_frame(4, 6, &head)]),
            "device state: truncated",
        );
    });
}

#[test]
fn state_for_an_unknown_device_is_refused() {
    within(LIMIT, || {
        let r = recording();
        assert_refused(
            &splice(&[r.ram_part(), &device_frame("test-nic", 0, 1, &[0; 8])]),
            "state for device test-nic instance 0, which the hello did not announce",
        );
        // A known device under another instance number is another device.
        let timer = timer_state(&source_device_states()[1]);
        assert_refused(
            &splice(&[r.ram_part(), &device_frame("test-timer", 0, 2, &timer)]),
            "state for device test-timer instance 0, which the hello did not announce",
        );
        assert_refused(
            &splice(&[r.ram_part(), &device_frame("test-timer", 3, 3, &timer)]),
            "device test-timer: state version 3 is newer than this release can load (at most 2)",
        );
    });
}

#[test]
fn a_duplicate_vcpu_or_device_state_is_refused() {
    within(LIMIT, || {
        let r = recording();
        let devices = r.device_frames();
        assert_refused(
            &splice(&[
                r.ram_part(),
                &devices,
                r.vcpu_frame(),
                r.vcpu_frame(),
                r.eos_frame(),
            ]),
            "vCPU 0 sent twice",
        );
        let uart = r.bytes(r.first(FrameTag::DeviceState)).to_vec();
        assert_refused(
            &splice(&[r.ram_part(), &devices, &uart, r.vcpu_frame(), r.eos_frame()]),
            "device test-uart instance 0 sent twice",
        );
        // A second state that would load fine is refused all the same.
        let other = DeviceState::new()
            .with("period_ns", Value::U64(7))
            .with("enabled", Value::Bool(false))
            .with("id", Value::Bytes(vec![1; 8]))
            .with("deadline_ns", Value::U64(0));
        assert_refused(
            &splice(&[
                r.ram_part(),
                &devices,
                &device_frame("test-timer", 3, 2, &timer_state(&other)),
            ]),
            "device test-timer instance 3 sent twice",
        );
        let mut vcpu1 = r.vcpu_frame().to_vec();
        vcpu1[FrameHeader::LEN] = 1;
        assert_refused(
            &splice(&[r.ram_part(), &devices, &vcpu1]),
            "vCPU index: invalid value 1",
        );
    });
}

#[test]
fn a_ram_batch_outside_guest_memory_is_refused() {
    within(LIMIT, || {
        let r = recording();
        let ram0 = TEST_LAYOUT[0].2 as u64;
        let ram1 = TEST_LAYOUT[1].2 as u64;
        let page = page_pattern(99);
        for (b, why) in [
            (
                batch(0, &[(ram0, true)], &[]),
                format!("RAM batch page index: invalid value {ram0}"),
            ),
            (
                batch(1, &[(0, true), (ram1, false)], &[page]),
                format!("RAM batch page index: invalid value {ram1}"),
            ),
            (
                batch(0, &[(RamBatchHeader::PAGE_MASK, false)], &[page]),
                format!(
                    "RAM batch page index: invalid value {}",
                    RamBatchHeader::PAGE_MASK
                ),
            ),
            (
                batch(2, &[(0, true)], &[]),
                "RAM batch block index: invalid value 2".into(),
            ),
            (
                batch(u32::MAX, &[(0, false)], &[page]),
                format!("RAM batch block index: invalid value {}", u32::MAX),
            ),
            (
                batch(0, &[(1 << 48, false)], &[page]),
                format!("RAM batch entry flags: invalid value {}", 1u64 << 48),
            ),
            // Two data entries with one page of data.
            (
                batch(0, &[(1, false), (2, false)], &[page]),
                format!("RAM batch length: invalid value {}", 8 + 16 + PAGE_SIZE),
            ),
        ] {
            let o = assert_refused(
                &splice(&[r.ram_part(), &b, &r.stream[r.ram_part().len()..]]),
                &why,
            );
            // Nothing of the hostile batch reached memory.
            let mem = o.vm.test_ram().contents();
            assert!(
                !mem.iter()
                    .any(|block| block.windows(16).step_by(16).any(|w| w == &page[..16])),
                "{why}: page data landed in guest memory"
            );
        }
        // A batch that claims more data pages than it has entries.
        let mut p = RamBatchHeader { block: 0, count: 1 }.encode().to_vec();
        p.extend_from_slice(&5u64.to_le_bytes());
        assert_refused(
            &splice(&[r.ram_part(), &raw_frame(2, (16 + 2 * PAGE_SIZE) as u32, &p)]),
            "RAM batch length",
        );
        // And one that claims more entries than a batch may hold.
        let p = RamBatchHeader {
            block: 0,
            count: 129,
        }
        .encode();
        assert_refused(
            &splice(&[r.ram_part(), &raw_frame(2, 8 + 129 * 8, &p)]),
            "RAM batch page count: 129 is over the limit of 128",
        );
    });
}

#[test]
fn an_end_of_stream_before_all_state_is_refused() {
    within(LIMIT, || {
        let r = recording();
        assert_refused(
            &splice(&[r.ram_part(), r.eos_frame()]),
            "the stream ended without state for device test-uart instance 0",
        );
        let timer = r.all(FrameTag::DeviceState)[1];
        assert_refused(
            &splice(&[r.ram_part(), r.bytes(timer), r.vcpu_frame(), r.eos_frame()]),
            "the stream ended without state for device test-uart instance 0",
        );
        assert_refused(
            &splice(&[r.ram_part(), &r.device_frames(), r.eos_frame()]),
            "the stream ended without state for vCPU 0",
        );
        // Only the header and hello, then the end.
        let hello_end = r.first(FrameTag::Hello).end();
        assert_refused(
            &splice(&[&r.stream[..hello_end], r.eos_frame()]),
            "the stream ended without state for device test-uart instance 0",
        );
    });
}

#[test]
fn an_end_of_stream_that_does_not_match_what_arrived_is_refused() {
    within(LIMIT, || {
        let r = recording();
        let state = splice(&[&r.device_frames(), r.vcpu_frame()]);
        let eos = r.eos();
        let with = |e: EndOfStream| frame(FrameTag::EndOfStream, &e.encode());
        assert_refused(
            &splice(&[
                r.ram_part(),
                &state,
                &with(EndOfStream {
                    digest: eos.digest.map(|d| d ^ 1),
                    ..eos
                }),
            ]),
            "guest memory digest differs",
        );
        assert_refused(
            &splice(&[
                r.ram_part(),
                &state,
                &with(EndOfStream {
                    pages_sent: eos.pages_sent + 1,
                    ..eos
                }),
            ]),
            &format!(
                "the source sent {} pages, {} arrived",
                eos.pages_sent + 1,
                eos.pages_sent
            ),
        );
        assert_refused(
            &splice(&[
                r.ram_part(),
                &state,
                &with(EndOfStream {
                    digest: None,
                    ..eos
                }),
            ]),
            "the end of stream carries no digest",
        );
        assert_refused(
            &splice(&[
                r.ram_part(),
                &state,
                &with(EndOfStream {
                    full_digest: Some(0),
                    ..eos
                }),
            ]),
            "the end of stream does not match the full verification the hello announced",
        );
        // One page sent again with other bytes, between the passes and the state.
        let ram1 = TEST_LAYOUT[1].2 as u64;
        assert_refused(
            &splice(&[
                r.ram_part(),
                &batch(1, &[(ram1 - 1, false)], &[page_pattern(7)]),
                &state,
                r.eos_frame(),
            ]),
            "the source sent",
        );
        // The same, without changing the page count: the digest catches it.
        let cut = r.all(FrameTag::PassEnd)[0].end();
        let mut tampered = r.stream[..cut].to_vec();
        let first = r.first(FrameTag::RamBatch).payload().start;
        let count = u32::from_le_bytes(r.stream[first + 4..first + 8].try_into().unwrap());
        let data = first + 8 + 8 * count as usize;
        tampered[data + 100] ^= 0x40;
        assert_refused(
            &splice(&[&tampered, &r.stream[cut..]]),
            "guest memory digest differs",
        );
    });
}

#[test]
fn return_path_frames_sent_forward_are_refused() {
    within(LIMIT, || {
        let r = recording();
        let accept = Accept {
            release: "x".into(),
        }
        .encode();
        let refuse = Refuse {
            cause: RefuseCause::Busy,
            reason: "no".into(),
        }
        .encode();
        let done = Completed {
            resume_us: 1,
            state_load_us: 1,
            pages_written: 1,
        }
        .encode();
        for (tag, payload) in [
            (FrameTag::Accept, accept),
            (FrameTag::Refuse, refuse),
            (FrameTag::LoadFailed, encode_reason("x")),
            (FrameTag::Completed, done),
        ] {
            // Right after the hello, and in place of the end of stream.
            let f = frame(tag, &payload);
            let why = format!(
                "frame type {:#04x} is not allowed here (expected RAM, state or end of stream)",
                tag as u8
            );
            let hello_end = r.first(FrameTag::Hello).end();
            assert_refused(
                &splice(&[&r.stream[..hello_end], &f, &r.stream[hello_end..]]),
                &why,
            );
            let eos = r.first(FrameTag::EndOfStream).start;
            assert_refused(&splice(&[&r.stream[..eos], &f]), &why);
        }
        // A second hello is no better.
        let hello = r.bytes(r.first(FrameTag::Hello)).to_vec();
        assert_refused(
            &splice(&[r.ram_part(), &hello]),
            "frame type 0x01 is not allowed here",
        );
    });
}

#[test]
fn malformed_frame_headers_are_refused() {
    within(LIMIT, || {
        let r = recording();
        assert_refused(
            &splice(&[r.ram_part(), &raw_frame(0x55, 0, &[])]),
            "unknown frame type 0x55",
        );
        let mut f = frame(FrameTag::PassEnd, &PassEnd { pass: 9, pages: 0 }.encode());
        f[2] = 1;
        assert_refused(&splice(&[r.ram_part(), &f]), "frame header reserved bytes");
        assert_refused(
            &splice(&[r.ram_part(), &raw_frame(3, 13, &[0; 13])]),
            "pass end: 13 is over the limit of 12",
        );
        assert_refused(
            &splice(&[r.ram_part(), &raw_frame(3, 4, &[0; 4])]),
            "pass end: truncated",
        );
        let mut eos = r.eos_frame().to_vec();
        eos[FrameHeader::LEN] |= 0x80;
        assert_refused(
            &splice(&[r.ram_part(), &r.device_frames(), r.vcpu_frame(), &eos]),
            "end of stream flags: invalid value",
        );
    });
}

#[test]
fn state_that_decodes_but_does_not_load_is_refused() {
    within(LIMIT, || {
        let r = recording();
        let broken = DeviceState::new()
            .with("period_ns", Value::U64(0))
            .with("enabled", Value::Bool(true))
            .with("id", Value::Bytes(vec![0; 8]))
            .with("deadline_ns", Value::U64(0));
        let uart = r.bytes(r.first(FrameTag::DeviceState));
        assert_refused(
            &splice(&[
                r.ram_part(),
                uart,
                &device_frame("test-timer", 3, 2, &timer_state(&broken)),
                r.vcpu_frame(),
                r.eos_frame(),
            ]),
            "test-timer: enabled with a zero period",
        );
        // State bytes that do not decode: a bool that is neither 0 nor 1.
        let mut bytes = timer_state(&source_device_states()[1]);
        bytes[8] = 2;
        assert_refused(
            &splice(&[
                r.ram_part(),
                uart,
                &device_frame("test-timer", 3, 2, &bytes),
            ]),
            "field enabled: bool byte 2 at offset 8 is neither 0 nor 1",
        );
    });
}

#[test]
fn a_source_abort_ends_the_migration_without_resuming() {
    within(LIMIT, || {
        let r = recording();
        let abort = frame(FrameTag::Abort, &encode_reason("operator cancelled"));
        let eos = r.first(FrameTag::EndOfStream).start;
        assert_refused(
            &splice(&[&r.stream[..eos], &abort, r.eos_frame()]),
            "source aborted the migration: operator cancelled",
        );
    });
}

#[test]
fn a_bad_stream_header_is_refused_before_anything_else() {
    within(LIMIT, || {
        let r = recording();
        let mut s = r.stream.clone();
        s[0] = b'Q';
        let o = replay(&s);
        assert!(
            o.error().contains("not a ferry migration stream"),
            "{}",
            o.error()
        );
        assert!(o.replies().iter().all(|(t, _)| *t == FrameTag::LoadFailed));
        let mut s = r.stream.clone();
        s[8] = 2;
        let o = replay(&s);
        assert!(
            matches!(
                &o.result,
                Err(MigrationError::Incompatible {
                    cause: RefuseCause::ProtocolVersion,
                    ..
                })
            ),
            "{}",
            o.error()
        );
        let replies = o.replies();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].0, FrameTag::Refuse);
        assert!(!o.vm.resumed());
    });
}

/// The destination scatters a batch's data pages into memory first and applies its zero
/// pages afterwards, so a batch naming a page twice, as data, zero, then data again,
/// would end with the page zeroed although the stream's last word on it was data. With
/// the digest off nothing else would notice; no source sends a page twice in a batch.
#[test]
fn a_ram_batch_naming_a_page_twice_is_refused() {
    within(LIMIT, || {
        let r = recording();
        let mut hello = common::hello(TEST_LAYOUT, false);
        hello.wire_props = MigrationParams {
            digest: false,
            ..destination_params()
        }
        .stated_wire_properties(&[]);
        let (a, b) = (page_pattern(1), page_pattern(2));
        let twice = batch(0, &[(5, false), (5, true), (5, false)], &[a, b]);
        let eos = frame(
            FrameTag::EndOfStream,
            &EndOfStream {
                digest: None,
                full_digest: None,
                pages_sent: 3,
                resume: true,
            }
            .encode(),
        );
        let state = splice(&[&r.device_frames(), r.vcpu_frame()]);
        let o = replay_with(
            &splice(&[&stream_prefix(&hello), &twice, &state, &eos]),
            false,
        );
        if o.result.is_ok() {
            let mut page = [0u8; PAGE_SIZE];
            o.vm.test_ram().read_page(0, 5, &mut page);
            assert!(page == b, "completed with page 5 not as the stream left it");
        }
        check_refused(o, "a RAM batch of block 0 names page 5 twice");
        // With the digest on, for the same reason rather than a digest mismatch at the end.
        assert_refused(
            &splice(&[r.ram_part(), &twice, &state, r.eos_frame()]),
            "a RAM batch of block 0 names page 5 twice",
        );
        // Zero pages named twice are refused all the same.
        assert_refused(
            &splice(&[r.ram_part(), &batch(1, &[(9, true), (9, true)], &[])]),
            "a RAM batch of block 1 names page 9 twice",
        );
    });
}

// ---------------------------------------------------------------------------------------
// Populated extents (migration.x-ferry-populate-ahead).

/// The recorded stream with a hello that has `migration.x-ferry-populate-ahead` on and
/// `extents` (frames) after it, or after the first pass end with `late`.
fn with_extents(r: &Recording, extents: &[u8], late: bool) -> Vec<u8> {
    let mut hello = common::hello(TEST_LAYOUT, false);
    hello.wire_props = populate_params().stated_wire_properties(&[]);
    let body = &r.stream[r.first(FrameTag::Hello).end()..];
    let at = if late {
        r.first(FrameTag::PassEnd).end() - r.first(FrameTag::Hello).end()
    } else {
        0
    };
    splice(&[&stream_prefix(&hello), &body[..at], extents, &body[at..]])
}

fn populate_params() -> MigrationParams {
    MigrationParams {
        populate_ahead: true,
        ..destination_params()
    }
}

fn extents_frame(block: u16, extents: &[(u64, u64)]) -> Vec<u8> {
    frame(
        FrameTag::PopulatedExtents,
        &PopulatedExtents {
            block,
            extents: extents.to_vec(),
        }
        .encode(),
    )
}

/// Extents that lie inside guest memory are taken (and change no page: the guest's
/// memory is the source's); extents that name a block or pages the destination does
/// not have, that go back, that come after the first pass, or that come when the
/// property is off fail the migration naming the cause, without resuming.
#[test]
fn populated_extents_are_checked_and_change_no_page() {
    within(LIMIT, || {
        let r = recording();
        let all = splice(&[
            &extents_frame(0, &[(0, 100), (200, 312)]),
            &extents_frame(0, &[(600, 0)][..0]),
            &extents_frame(1, &[(0, 128)]),
        ]);
        let o = replay_params(&with_extents(r, &all, false), populate_params());
        let info = o.result.as_ref().unwrap_or_else(|e| {
            panic!(
                "extents inside guest memory were refused: {}",
                error_chain(e)
            )
        });
        assert!(o.vm.resumed());
        assert!(
            o.vm.test_ram().contents() == r.source_ram,
            "guest memory differs from the source's after populating"
        );
        assert_eq!(
            info.ram.x_ferry_populate_announced,
            (100 + 312 + 128) * PAGE_SIZE as u64
        );
        assert!(info.ram.x_ferry_populated_ahead <= info.ram.x_ferry_populate_announced);

        for (extents, late, says) in [
            (extents_frame(2, &[(0, 1)]), false, "RAM block index"),
            (
                extents_frame(1, &[(100, 29)]),
                false,
                "past the block's end",
            ),
            (extents_frame(0, &[(5, 0)]), false, "empty extent"),
            (
                splice(&[&extents_frame(0, &[(10, 5)]), &extents_frame(0, &[(12, 1)])]),
                false,
                "does not ascend",
            ),
            (extents_frame(0, &[(0, 1)]), true, "after the first pass"),
        ] {
            check_refused(
                replay_params(&with_extents(r, &extents, late), populate_params()),
                says,
            );
        }
        // A destination with the property off takes no extents (a source that sends
        // them with the property off in its hello breaks the wire).
        let mut hello = common::hello(TEST_LAYOUT, false);
        hello.wire_props = destination_params().stated_wire_properties(&[]);
        let body = &r.stream[r.first(FrameTag::Hello).end()..];
        assert_refused(
            &splice(&[&stream_prefix(&hello), &extents_frame(0, &[(0, 1)]), body]),
            "x-ferry-populate-ahead is off",
        );
    });
}

/// The source announces where memory is populated only when its scan was exact: the
/// pages the guest holds (initial_writes: block 0 pages 0-139, 300 and 511, block 1
/// pages 0-7 and 127), runs closer than 16 pages merged; after a scan that could not
/// tell (and marked every page), nothing, so a destination never populates all of RAM
/// on its word.
#[test]
fn the_source_announces_populated_memory_only_after_an_exact_scan() {
    within(LIMIT, || {
        for exact in [true, false] {
            let r = record_with(
                MigrationParams {
                    populate_ahead: true,
                    ..source_params()
                },
                populate_params(),
                exact,
            );
            let mut got: Vec<(u16, Vec<(u64, u64)>)> = Vec::new();
            for f in r.all(FrameTag::PopulatedExtents) {
                let e =
                    PopulatedExtents::decode(&r.stream[f.payload()], &[512, 128], &[0, 0]).unwrap();
                got.push((e.block, e.extents));
            }
            let announced = r.destination.ram.x_ferry_populate_announced;
            if exact {
                assert_eq!(
                    got,
                    [
                        (0, vec![(0, 140), (300, 1), (511, 1)]),
                        (1, vec![(0, 8), (127, 1)])
                    ]
                );
                assert_eq!(announced, 151 * PAGE_SIZE as u64);
            } else {
                assert_eq!(got, []);
                assert_eq!(announced, 0);
            }
            assert!(r.resumed);
            assert!(r.destination.ram.x_ferry_populated_ahead <= announced);
        }
    });
}
