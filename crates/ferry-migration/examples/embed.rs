//! Embedding the engine: a tiny VMM that live-migrates itself between two threads of
//! one process, through `ferry-migration`'s public API only
//! (`cargo run -p ferry-migration --example embed`).
//!
//! **The VM side** ([`ferry_migration::engine::vm`]). [`GuestRam`], an `unsafe` trait,
//! says where guest RAM lives: here 4 MiB of page-aligned heap, one block. [`DirtyLog`]
//! says which pages were written: here a bitmap the vCPU sets a bit in after each store;
//! `harvest` moves bits into the engine's map, `restore` puts back those of a failed
//! attempt. [`MigratableVm`] adds pause and resume, and saves and loads vCPUs and devices
//! as [`DeviceState`]s that versioned [`StateSchema`]s describe: here one vCPU thread,
//! whose one register is a counter it stores into pages, and one `ticker` device.
//!
//! **The transport side** ([`ferry_migration::engine::transport`]). The source's
//! [`Connector`] is asked for the main channel, then for each data channel; the
//! destination's [`Acceptor`] hands over whatever connects, and the engine sorts it by its
//! header. Here there is no address: `connect` makes a `UnixStream` pair (already a
//! `MigrationStream`), keeps one end and gives the acceptor the other.
//!
//! **The sequence.** The destination VM is created paused, with the source's RAM layout
//! and devices, and a thread calls [`engine::receive`]; another calls [`engine::migrate`]
//! for the running source. The engine sends RAM in passes while the vCPU writes, pauses
//! the source, sends the last dirty pages and the device and vCPU state; the destination
//! loads them, checks the memory digest and only then resumes the guest. `migrate`
//! returns with the source stopped, `receive` with the guest running there.
//!
//! **Threads.** Every [`MigratableVm`] call comes on the thread that called `migrate` or
//! `receive`. The engine adds, at the source, `ferry-return-path` (reads the
//! destination's answers) and a `ferry-send-N` per data channel (they read guest RAM);
//! at the destination, `ferry-doorman` (calls `Acceptor::accept`), a short `ferry-door`
//! per connection (reads its header) and a `ferry-recv-N` per data channel (they write
//! guest RAM).

use std::error::Error;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::engine::vm::{DeviceInfo, DirtyLog, GuestRam, MigratableVm, RamBlock};
use ferry_migration::engine::{self, error_chain, vm::VmError, Acceptor, Channel, Connector};
use ferry_migration::engine::{DestinationIdentity, HandoverPoint, Incoming, MigrationInfo};
use ferry_migration::engine::{MigrationMonitor, MigrationParams, MigrationStatus};
use ferry_migration::engine::{SourceIdentity, StreamRole};
use ferry_migration::state::{
    self, DeviceState, FieldKind, FieldSchema, StateReader, StateSchema, StateWriter, Value,
};
use ferry_migration::PAGE_SIZE;

const RAM_PAGES: usize = 1024; // 4 MiB
const HOT_PAGES: u64 = 256; // the vCPU's working set: it keeps rewriting these pages

const fn field(name: &'static str, kind: FieldKind, since: u32) -> FieldSchema {
    FieldSchema { name, kind, since }
}

static VCPU: StateSchema = StateSchema {
    name: "embed-vcpu",
    version: 1,
    min_version: 1,
    fields: &[field("counter", FieldKind::U64, 1)],
    subsections: &[],
};

/// Version 2 added `name`. A version-1 stream still loads, with the name empty: a new
/// field's zero value must mean what the older version did (it had no name).
static TICKER: StateSchema = StateSchema {
    name: "embed-ticker",
    version: 2,
    min_version: 1,
    fields: &[
        field("ticks", FieldKind::U64, 1),
        field("name", FieldKind::Bytes { max_len: 32 }, 2),
    ],
    subsections: &[],
};

/// One page of guest RAM, page-aligned, as atomics: the vCPU's stores are safe Rust while
/// the engine reads and writes the same bytes through raw pointers.
#[repr(C, align(4096))]
struct Page([AtomicU64; PAGE_SIZE / 8]);
const _: () = assert!(std::mem::size_of::<Page>() == PAGE_SIZE);

struct Ram {
    pages: Box<[Page]>,
    blocks: [RamBlock; 1],
}

impl Ram {
    /// Zeroed RAM; a source's "firmware" fills it with a pattern.
    fn new(firmware: bool) -> Self {
        let word = |p: usize, w: usize| u64::from(firmware) * ((p << 16 | w) as u64 ^ 0xb007);
        let page = |p| Page(std::array::from_fn(|w| AtomicU64::new(word(p, w))));
        let pages = (0..RAM_PAGES).map(page).collect();
        let (name, size) = ("ram0".to_string(), (RAM_PAGES * PAGE_SIZE) as u64);
        let blocks = [RamBlock { name, gpa: 0, size }];
        Self { pages, blocks }
    }

    /// A copy of all of RAM; only while nothing writes it (vCPU paused, engine done).
    fn copy(&self) -> Vec<u8> {
        let mut v = vec![0; RAM_PAGES * PAGE_SIZE];
        // SAFETY: all of `pages` into a distinct buffer of the same size, with no writer.
        unsafe { std::ptr::copy_nonoverlapping(self.host_ptr(0), v.as_mut_ptr(), v.len()) };
        v
    }
}

// SAFETY: `host_ptr(0)` is the start of `pages`, one heap allocation of exactly
// `blocks()[0].size` bytes, readable and writable through the pointer (atomics are
// interior-mutable), that never moves and is freed only when the Ram drops; the engine
// keeps the Ram alive through the `Arc` that `MigratableVm::ram` gives it.
unsafe impl GuestRam for Ram {
    fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }
    fn host_ptr(&self, _block: usize) -> *mut u8 {
        self.pages.as_ptr().cast::<u8>().cast_mut()
    }
    // `populated` keeps its default, every page: the first pass sends all of them.
}

#[derive(Default)]
struct RunState {
    wanted: bool,
    off: bool,
}

struct Vm {
    ram: Arc<Ram>,
    /// The dirty log: one bit per page, set by the vCPU after each store.
    dirty: Vec<AtomicU64>,
    counter: AtomicU64,
    ticks: AtomicU64,
    name: Mutex<String>,
    /// The vCPU stores only while it holds this with `wanted` set.
    run: Mutex<RunState>,
    cv: Condvar,
}

impl Vm {
    /// A VM created paused.
    fn new(name: &str, firmware: bool) -> Self {
        Self {
            ram: Arc::new(Ram::new(firmware)),
            dirty: (0..RAM_PAGES / 64).map(|_| AtomicU64::new(0)).collect(),
            counter: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            name: Mutex::new(name.into()),
            run: Mutex::default(),
            cv: Condvar::new(),
        }
    }

    /// The vCPU thread, until `power_off`: bursts of 64 stores of its counter into the
    /// hot pages, each page marked dirty after its store, and a tick after each burst.
    fn vcpu(&self) {
        loop {
            let r = self.run.lock().unwrap();
            let r = self.cv.wait_while(r, |r| !r.wanted && !r.off).unwrap();
            if r.off {
                return;
            }
            for _ in 0..64 {
                let c = self.counter.fetch_add(1, SeqCst) + 1;
                let page = (c % HOT_PAGES) as usize;
                self.ram.pages[page].0[0].store(c, SeqCst);
                self.dirty[page / 64].fetch_or(1 << (page % 64), SeqCst);
            }
            self.ticks.fetch_add(1, SeqCst);
            drop(r);
            thread::sleep(Duration::from_micros(200));
        }
    }

    fn power_off(&self) {
        self.run.lock().unwrap().off = true;
        self.cv.notify_all();
    }

    /// RAM, the vCPU's state and the ticker's. Only while the VM is paused.
    fn snapshot(&self) -> Result<(Vec<u8>, DeviceState, Vec<u8>), VmError> {
        let ticker = state::save_to_vec(&TICKER, |w| self.save_device(0, w))?;
        Ok((self.ram.copy(), self.save_vcpu(0)?, ticker))
    }
}

impl DirtyLog for Vm {
    // Always on: bits set before `start` only make a page go twice.
    fn start(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn stop(&self) {}
    fn harvest(&self, _block: usize, into: &DirtyBitmap) -> Result<(), VmError> {
        for (i, w) in self.dirty.iter().enumerate() {
            into.or_word(i, w.swap(0, SeqCst));
        }
        Ok(())
    }
    fn restore(&self, _block: usize, pages: &DirtyBitmap) {
        for (i, w) in self.dirty.iter().enumerate() {
            w.fetch_or(pages.word(i), SeqCst);
        }
    }
}

impl MigratableVm for Vm {
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
        &VCPU
    }
    fn devices(&self) -> Vec<DeviceInfo> {
        vec![DeviceInfo {
            name: TICKER.name.into(),
            instance: 0,
            schema: &TICKER,
            config: Vec::new(), // settings both sides must share; checked before RAM moves
            precopy: None,      // this host cannot move its state while the guest runs
        }]
    }
    /// Taking the lock waits out a burst under way; none starts until `resume`.
    fn pause(&self) -> Result<(), VmError> {
        self.run.lock().unwrap().wanted = false;
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        self.run.lock().unwrap().wanted = true;
        self.cv.notify_all();
        Ok(())
    }
    fn is_running(&self) -> bool {
        self.run.lock().unwrap().wanted
    }
    fn save_vcpu(&self, _index: usize) -> Result<DeviceState, VmError> {
        let counter = Value::U64(self.counter.load(SeqCst));
        Ok(DeviceState::new().with("counter", counter))
    }
    fn load_vcpu(&self, _index: usize, state: DeviceState) -> Result<(), VmError> {
        self.counter.store(state.get_u64("counter")?, SeqCst);
        Ok(())
    }
    fn save_device(&self, _index: usize, out: &mut StateWriter<'_>) -> Result<(), VmError> {
        let ticks = Value::U64(self.ticks.load(SeqCst));
        let name = Value::Bytes(self.name.lock().unwrap().clone().into_bytes());
        out.write_state(&DeviceState::new().with("ticks", ticks).with("name", name))?;
        Ok(())
    }
    fn load_device(&self, _index: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        let state = input.read_state()?;
        let name = String::from_utf8_lossy(state.get_bytes("name")?).into_owned();
        self.ticks.store(state.get_u64("ticks")?, SeqCst);
        *self.name.lock().unwrap() = name;
        Ok(())
    }
}

struct PairConnector(Sender<(UnixStream, String)>, UnixStream);

impl Connector for PairConnector {
    fn connect(&self, role: StreamRole) -> io::Result<Channel> {
        let (ours, theirs) = UnixStream::pair()?;
        let gone = |_| io::Error::new(io::ErrorKind::ConnectionRefused, "no destination");
        self.0.send((theirs, format!("{role:?}"))).map_err(gone)?;
        (&self.1).write_all(&[1])?; // ring the bell
        Ok(Channel::new(ours))
    }
    fn describe(&self) -> String {
        "in-process socket pairs".into()
    }
}

struct PairAcceptor(Receiver<(UnixStream, String)>, UnixStream);

impl Acceptor for PairAcceptor {
    fn accept(&self, within: Duration) -> io::Result<Option<(Channel, String)>> {
        match self.0.recv_timeout(within) {
            Ok((stream, peer)) => {
                (&self.1).read_exact(&mut [0])?; // the ring that announced it
                Ok(Some((Channel::new(stream), peer)))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(io::ErrorKind::NotConnected.into()),
        }
    }
    /// Readable while a connection waits. Without it the engine calls `accept` in 50 ms
    /// rounds, and stopping it at the switchover can add a round to the downtime.
    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.1.as_raw_fd())
    }
}

/// What [`run`] found: the source's account of the migration, and the checks.
#[derive(Debug, Clone)]
pub struct Summary {
    pub info: MigrationInfo,
    /// Pages that differ between the stopped source and the destination as it resumed.
    pub pages_differing: usize,
    /// The vCPU's and the ticker's state arrived as the source saved them.
    pub state_arrived: bool,
    /// The guest runs at the destination only, carrying on from where the source stopped.
    pub guest_continued: bool,
    pub ticker: DeviceState,
}

/// Migrates a running guest from one VM to another in this process, and checks it.
pub fn run() -> Result<Summary, String> {
    migrate_in_process().map_err(|e| e.to_string())
}

fn migrate_in_process() -> Result<Summary, Box<dyn Error>> {
    // Who each side is, checked against the other before RAM moves. With machine types,
    // params and wire properties come from a `compat::Config`, as in ferry-vmm.
    let params = MigrationParams::default(); // 2 data channels, digest on
    let (release, machine) = ("1.0".to_string(), "embed-1.0".to_string());
    let src_id = SourceIdentity {
        release: release.clone(),
        machine: machine.clone(),
        wire_props: Vec::new(),
        compat_pinned: Vec::new(),
    };
    let dst_id = DestinationIdentity {
        release,
        known_machines: vec![machine.clone()],
        machine,
        wire_props: Vec::new(),
        compat_pinned: Vec::new(),
    };

    // Two VMs, both created paused, and the transport between them.
    let (src, dst) = (Vm::new("ticker0", true), Arc::new(Vm::new("", false)));
    let ((to, from), (ring, bell)) = (mpsc::channel(), UnixStream::pair()?);
    let connector = PairConnector(to, ring);
    let incoming = Incoming::acceptor(PairAcceptor(from, bell));

    // The destination just before it resumes: the engine calls this probe on its thread
    // at each handover point, and resumes after `Verified`.
    let (src_mon, dst_mon) = (MigrationMonitor::new(), MigrationMonitor::new());
    let at_resume = Arc::new(Mutex::new(None));
    let (slot, vm) = (Arc::clone(&at_resume), Arc::clone(&dst));
    dst_mon.set_probe(move |p| {
        if p == HandoverPoint::Verified {
            *slot.lock().unwrap() = Some(vm.snapshot());
        }
    });

    // Both vCPUs, then both sides of the migration, each on a thread of its own.
    let (s, d) = (&src, dst.as_ref());
    let (out, inc, counter_after) = thread::scope(|sc| {
        sc.spawn(|| s.vcpu());
        sc.spawn(|| d.vcpu());
        let _ = s.resume();
        thread::sleep(Duration::from_millis(20)); // the guest runs a little first
        let rx = sc.spawn(|| engine::receive(d, &dst_id, &params, incoming, &dst_mon));
        let tx = sc.spawn(|| engine::migrate(s, &src_id, &params, &connector, &src_mon));
        let (out, inc) = (tx.join(), rx.join());
        thread::sleep(Duration::from_millis(10)); // the guest runs a little there
        let counter = d.counter.load(SeqCst);
        s.power_off();
        d.power_off();
        (out, inc, counter)
    });
    let out = out.map_err(|_| "the source's migration thread panicked")?;
    let info = out.map_err(|e| format!("source: {}", error_chain(&e)))?;
    let inc = inc.map_err(|_| "the destination's migration thread panicked")?;
    inc.map_err(|e| format!("destination: {}", error_chain(&e)))?;

    // The source stays stopped: its RAM is what it had at the switchover.
    let before = s.snapshot()?;
    let after = at_resume.lock().unwrap().take().ok_or("no snapshot")??;
    let (b, a) = (before.0.chunks(PAGE_SIZE), after.0.chunks(PAGE_SIZE));
    let resumed_at = after.1.get_u64("counter")?;
    Ok(Summary {
        info,
        pages_differing: b.zip(a).filter(|(b, a)| b != a).count(),
        state_arrived: (&before.1, &before.2) == (&after.1, &after.2),
        guest_continued: !s.is_running() && d.is_running() && counter_after > resumed_at,
        ticker: state::decode(&TICKER, TICKER.version, &after.2)?,
    })
}

fn main() {
    let s = run().unwrap_or_else(|e| {
        eprintln!("embed: {e}");
        std::process::exit(1);
    });
    let i = &s.info;
    let (differ, arrived, on) = (s.pages_differing, s.state_arrived, s.guest_continued);
    let (status, total, passes) = (i.status.as_str(), i.total_time, i.passes.len());
    let (pages, zero, downtime) = (i.ram.normal, i.ram.duplicate, i.downtime.unwrap_or(0));
    let verified = i.verified.as_deref().unwrap_or("-");
    let ticks = s.ticker.get_u64("ticks").unwrap_or_default();
    println!("migration {status} in {total} ms, {passes} passes");
    println!("  pages sent: {pages} with data, {zero} zero; downtime {downtime} ms");
    println!("  verified:   {verified} by the engine; {differ} pages differ at the switchover");
    println!("  ticker:     {ticks} ticks; state arrived: {arrived}");
    println!("  guest carries on at the destination: {on}");
    if !(i.status == MigrationStatus::Completed && differ == 0 && arrived && on) {
        std::process::exit(1);
    }
}
