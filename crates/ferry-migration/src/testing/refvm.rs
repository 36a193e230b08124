//! [`RefVm`]: an in-memory VM that keeps the whole contract, as a model for embedders and
//! a VM for tests.
//!
//! Guest RAM is [`REF_LAYOUT`]: page-aligned zeroed heap blocks. The "guest" is one thread
//! that, while the VM runs, takes a step every [`RefVm::STEP`]: it writes its step counter
//! into the first 8 bytes of the page at its cursor (walking every page of every block in
//! turn) and pokes the one device, a counter. Its registers (`steps`, `cursor`) are the
//! vCPU state; the counter's ticks and the page it saw written last are the device state.
//!
//! How it keeps the contract:
//!
//! * Every write to guest RAM goes through [`RefVm::write`], which copies the bytes, then
//!   marks the pages touched (for `populated`) and, while logging, dirty. Marking after the
//!   copy means a harvest that takes the bit also sees the data.
//! * The guest takes each step with the machine lock held, and `pause` clears `run` under
//!   that lock: once `pause` has the lock no step is half done, and no step starts again
//!   until `resume`. `pause` can therefore return without waiting for the thread.
//! * `harvest` swaps the bitmap's words out ([`DirtyBitmap::drain_into`]), so a page the
//!   guest marks during a harvest is either in it or left for the next; `restore` ORs the
//!   pages back.
//! * `populated` marks pages ever written through `write` and, for the pages the engine
//!   writes through `host_ptr` on a destination, any page with a non-zero byte.
//! * Saves and loads refuse a running VM, loads refuse states whose version their schema
//!   cannot load, and an incoming VM refuses to resume before its vCPU and device loaded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{HeapRam, Role};
use crate::engine::bitmap::DirtyBitmap;
use crate::engine::vm::{DeviceInfo, DirtyLog, GuestRam, MigratableVm, VmError};
use crate::state::{
    DeviceState, FieldKind, FieldSchema, StateReader, StateSchema, StateWriter, Value,
};
use crate::PAGE_SIZE;

/// The RAM blocks of a [`RefVm`] as `(name, guest-physical address, pages)`: 64 KiB low,
/// 192 KiB above 4 GiB.
pub const REF_LAYOUT: &[(&str, u64, usize)] = &[("ram-low", 0, 16), ("ram-high", 1 << 32, 48)];

/// The guest's registers.
pub static REF_VCPU_SCHEMA: StateSchema = StateSchema {
    name: "ref-vcpu",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "steps",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "cursor",
            kind: FieldKind::U64,
            since: 1,
        },
    ],
    subsections: &[],
};

/// The counter device. Version 2 added `last-write`; version 1 streams still load.
pub static REF_COUNTER_SCHEMA: StateSchema = StateSchema {
    name: "ref-counter",
    version: 2,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "ticks",
            kind: FieldKind::U64,
            since: 1,
        },
        // 1 + the guest page number of the guest's last write; 0 = not known, which is
        // what loading a version 1 stream gives.
        FieldSchema {
            name: "last-write",
            kind: FieldKind::U64,
            since: 2,
        },
    ],
    subsections: &[],
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Cpu {
    steps: u64,
    cursor: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counter {
    ticks: u64,
    /// The guest page number (`gpa / PAGE_SIZE`) of the last write, if known.
    last_write: Option<u64>,
}

/// Everything the guest thread and the VMM share, behind one lock.
#[derive(Debug, Default)]
struct Machine {
    run: bool,
    exit: bool,
    cpu: Cpu,
    counter: Counter,
    /// An incoming VM still waiting for its vCPU or device state.
    vcpu_missing: bool,
    device_missing: bool,
}

struct Inner {
    ram: Arc<HeapRam>,
    dirty: Vec<DirtyBitmap>,
    logging: AtomicBool,
    machine: Mutex<Machine>,
    wake: Condvar,
}

impl Inner {
    fn machine(&self) -> MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), VmError> {
        // The pages are marked dirty after the copy, so a harvest that takes the bit also
        // sees the data.
        let (block, pages) = self.ram.write(gpa, bytes)?;
        if self.logging.load(Ordering::SeqCst) {
            for page in pages {
                self.dirty[block].set(page);
            }
        }
        Ok(())
    }

    /// One step of the guest, made with the machine lock held.
    fn step(&self, m: &mut Machine) {
        let total = self.ram.total_pages();
        let (block, page) = self.ram.nth_page(m.cpu.cursor % total);
        let gpa = self.ram.blocks()[block].gpa + (page * PAGE_SIZE) as u64;
        m.cpu.steps += 1;
        self.write(gpa, &m.cpu.steps.to_le_bytes())
            .expect("the cursor stays inside guest RAM");
        m.cpu.cursor = (m.cpu.cursor + 1) % total;
        m.counter.ticks += 1;
        m.counter.last_write = Some(gpa / PAGE_SIZE as u64);
    }
}

fn guest_loop(inner: &Inner) {
    let mut m = inner.machine();
    loop {
        if m.exit {
            return;
        }
        if !m.run {
            m = inner.wake.wait(m).unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        inner.step(&mut m);
        drop(m);
        thread::sleep(RefVm::STEP);
        m = inner.machine();
    }
}

/// The reference VM (see the module docs of [`crate::testing`] and of this file).
pub struct RefVm {
    inner: Arc<Inner>,
    guest: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RefVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.inner.machine();
        f.debug_struct("RefVm")
            .field("running", &m.run)
            .field("steps", &m.cpu.steps)
            .finish_non_exhaustive()
    }
}

fn check_version(schema: &StateSchema, st: &DeviceState) -> Result<(), VmError> {
    if (schema.min_version..=schema.version).contains(&st.version) {
        Ok(())
    } else {
        Err(VmError::Failed(format!(
            "{}: cannot load a state at version {} (loads {}..={})",
            schema.name, st.version, schema.min_version, schema.version
        )))
    }
}

impl RefVm {
    /// Time between two guest steps.
    pub const STEP: Duration = Duration::from_micros(200);

    /// A source (running, its guest stepping) or an incoming VM (paused, RAM zero, waiting
    /// for its vCPU and device state), with [`REF_LAYOUT`].
    pub fn new(role: Role) -> Self {
        let ram = HeapRam::new(REF_LAYOUT);
        let dirty = ram
            .blocks()
            .iter()
            .map(|b| DirtyBitmap::new(b.pages()))
            .collect();
        let incoming = role == Role::Incoming;
        let inner = Arc::new(Inner {
            ram: Arc::new(ram),
            dirty,
            logging: AtomicBool::new(false),
            machine: Mutex::new(Machine {
                run: !incoming,
                vcpu_missing: incoming,
                device_missing: incoming,
                ..Machine::default()
            }),
            wake: Condvar::new(),
        });
        let for_guest = Arc::clone(&inner);
        let guest = thread::Builder::new()
            .name("ref-vm-guest".into())
            .spawn(move || guest_loop(&for_guest))
            .expect("spawning the RefVm guest thread");
        Self {
            inner,
            guest: Some(guest),
        }
    }

    /// Writes guest memory, as the guest or a device would: the pages are marked touched
    /// and, while the dirty log is on, dirty.
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), VmError> {
        self.inner.write(gpa, bytes)
    }

    /// Reads guest memory.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), VmError> {
        self.inner.ram.read(gpa, out)
    }

    /// Steps the guest has taken.
    pub fn steps(&self) -> u64 {
        self.inner.machine().cpu.steps
    }

    fn paused(&self, what: &str) -> Result<MutexGuard<'_, Machine>, VmError> {
        let m = self.inner.machine();
        if m.run {
            return Err(VmError::Failed(format!(
                "{what}: the VM is running; pause it first"
            )));
        }
        Ok(m)
    }
}

impl Drop for RefVm {
    fn drop(&mut self) {
        {
            let mut m = self.inner.machine();
            m.exit = true;
            m.run = false;
        }
        self.inner.wake.notify_all();
        if let Some(t) = self.guest.take() {
            let _ = t.join();
        }
    }
}

impl DirtyLog for RefVm {
    fn start(&self) -> Result<(), VmError> {
        self.inner.logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn stop(&self) {
        self.inner.logging.store(false, Ordering::SeqCst);
    }

    fn harvest(&self, block: usize, into: &DirtyBitmap) -> Result<(), VmError> {
        let dirty = self
            .inner
            .dirty
            .get(block)
            .ok_or_else(|| VmError::Failed(format!("no RAM block {block}")))?;
        if into.pages() != dirty.pages() {
            return Err(VmError::Failed(format!(
                "a bitmap of {} pages for block {block} of {}",
                into.pages(),
                dirty.pages()
            )));
        }
        dirty.drain_into(into);
        Ok(())
    }

    fn restore(&self, block: usize, pages: &DirtyBitmap) {
        if let Some(dirty) = self.inner.dirty.get(block) {
            if dirty.pages() == pages.pages() {
                dirty.or_from(pages);
            }
        }
    }
}

impl MigratableVm for RefVm {
    fn ram(&self) -> Arc<dyn GuestRam> {
        self.inner.ram.clone()
    }

    fn dirty_log(&self) -> &dyn DirtyLog {
        self
    }

    fn vcpu_count(&self) -> usize {
        1
    }

    fn vcpu_schema(&self) -> &'static StateSchema {
        &REF_VCPU_SCHEMA
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        vec![DeviceInfo {
            name: REF_COUNTER_SCHEMA.name.into(),
            instance: 0,
            schema: &REF_COUNTER_SCHEMA,
            config: vec![("step-us".into(), RefVm::STEP.as_micros().to_string())],
            precopy: None,
        }]
    }

    fn pause(&self) -> Result<(), VmError> {
        // Taking the lock waits out a step in progress; the guest takes no other until
        // `run` is set again.
        self.inner.machine().run = false;
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        let mut m = self.inner.machine();
        if m.vcpu_missing || m.device_missing {
            return Err(VmError::Failed(
                "an incoming VM resumes only after its vCPU and device state loaded".into(),
            ));
        }
        m.run = true;
        drop(m);
        self.inner.wake.notify_all();
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.inner.machine().run
    }

    fn save_vcpu(&self, index: usize) -> Result<DeviceState, VmError> {
        let m = self.paused("save vCPU")?;
        if index != 0 {
            return Err(VmError::Failed(format!("no vCPU {index}")));
        }
        Ok(DeviceState {
            version: REF_VCPU_SCHEMA.version,
            ..DeviceState::new()
        }
        .with("steps", Value::U64(m.cpu.steps))
        .with("cursor", Value::U64(m.cpu.cursor)))
    }

    fn load_vcpu(&self, index: usize, st: DeviceState) -> Result<(), VmError> {
        let mut m = self.paused("load vCPU")?;
        if index != 0 {
            return Err(VmError::Failed(format!("no vCPU {index}")));
        }
        check_version(&REF_VCPU_SCHEMA, &st)?;
        let cpu = Cpu {
            steps: st.get_u64("steps")?,
            cursor: st.get_u64("cursor")?,
        };
        let total = self.inner.ram.total_pages();
        if cpu.cursor >= total {
            return Err(VmError::Failed(format!(
                "ref-vcpu: cursor {} beyond the {total} pages of guest RAM",
                cpu.cursor
            )));
        }
        m.cpu = cpu;
        m.vcpu_missing = false;
        Ok(())
    }

    fn save_device(&self, index: usize, out: &mut StateWriter<'_>) -> Result<(), VmError> {
        let m = self.paused("save device")?;
        if index != 0 {
            return Err(VmError::Failed(format!("no device {index}")));
        }
        // Field by field, as a device with large state streams it.
        out.begin(&[])?;
        out.u64("ticks", m.counter.ticks)?;
        out.u64("last-write", m.counter.last_write.map_or(0, |p| p + 1))?;
        out.finish()?;
        Ok(())
    }

    fn load_device(&self, index: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        let mut m = self.paused("load device")?;
        if index != 0 {
            return Err(VmError::Failed(format!("no device {index}")));
        }
        let ticks = input.u64("ticks")?;
        // Version 1 did not send it: the zero the reader fills in means "not known".
        let last_write = match input.u64("last-write")? {
            0 => None,
            p => Some(p - 1),
        };
        input.finish()?;
        m.counter = Counter { ticks, last_write };
        m.device_missing = false;
        Ok(())
    }
}
