//! The soft backend: a VM without a hypervisor, for tests and machines without KVM.
//!
//! Guest RAM is anonymous memory. One "soft vCPU" thread runs the reference workload:
//! each pass it increments byte 0 of every 4 KiB page of its range, optionally at a
//! limited rate, and records each page it writes in a [`DirtyBitmap`] (its dirty log).
//! Its registers are the pass counter and its position in the range; they are its vCPU
//! state, so at the destination it carries on exactly where it stopped.
//!
//! Memory correctness can then be checked exactly: with the vCPU stopped at pass `p`,
//! position `i`, pages before `i` hold `p + 1` and the others `p` (modulo 256).
//!
//! A small console device (`soft-console`) keeps the last lines the workload printed,
//! to show device state moving with the guest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::engine::vm::{
    DeviceInfo, DevicePending, DirtyLog, GuestRam, MigratableVm, VmError,
};
use ferry_migration::state::{
    DeviceState, FieldKind, FieldSchema, StateReader, StateSchema, StateWriter, Value,
};
use ferry_migration::PAGE_SIZE;

use crate::devices::accel::{AccelConfig, Accels};
use crate::guest::{GuestReport, GuestVm};
use crate::memory::HostRam;

/// State of the soft vCPU.
pub static SOFT_VCPU_SCHEMA: StateSchema = StateSchema {
    name: "soft-vcpu",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "pass",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "position",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "range-start",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "range-pages",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "rate",
            kind: FieldKind::U64,
            since: 1,
        },
    ],
    subsections: &[],
};

/// Longest console tail kept and migrated.
const CONSOLE_TAIL: usize = 4096;

/// State of the console device.
pub static SOFT_CONSOLE_SCHEMA: StateSchema = StateSchema {
    name: "soft-console",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "bytes-written",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "tail",
            kind: FieldKind::Bytes {
                max_len: CONSOLE_TAIL as u32,
            },
            since: 1,
        },
    ],
    subsections: &[],
};

/// How to build a soft VM.
#[derive(Debug, Clone)]
pub struct SoftConfig {
    pub mem_size: u64,
    /// Bytes at the start of RAM the workload dirties each pass; 0 for an idle guest.
    pub dirty_size: u64,
    /// Pages per second the workload writes; 0 for as fast as it can.
    pub dirty_rate: u64,
    /// Bytes of pseudo-random data written once after the dirty range.
    pub fill: u64,
    /// Create stopped, to receive a migration.
    pub incoming: bool,
    /// Create stopped (the guest's memory is set up, its vCPU waits for a resume).
    pub paused: bool,
    /// Print a console line every this many passes.
    pub console_every: u64,
    /// Accelerators ([`crate::devices::accel`]), in order.
    pub accels: Vec<AccelConfig>,
}

impl Default for SoftConfig {
    fn default() -> Self {
        Self {
            mem_size: 256 << 20,
            dirty_size: 16 << 20,
            dirty_rate: 0,
            fill: 0,
            incoming: false,
            paused: false,
            console_every: 1000,
            accels: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Regs {
    pass: u64,
    position: u64,
    range_start: u64,
    range_pages: u64,
    rate: u64,
}

#[derive(Debug, Default)]
struct Ctl {
    run: bool,
    parked: bool,
    exit: bool,
}

#[derive(Debug, Default)]
struct Console {
    written: u64,
    tail: Vec<u8>,
}

impl Console {
    fn write(&mut self, s: &str) {
        self.written += s.len() as u64;
        self.tail.extend_from_slice(s.as_bytes());
        if self.tail.len() > CONSOLE_TAIL {
            let cut = self.tail.len() - CONSOLE_TAIL;
            self.tail.drain(..cut);
        }
    }
}

struct Shared {
    ram: Arc<HostRam>,
    dirty: DirtyBitmap,
    regs: Mutex<Regs>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    stop: AtomicBool,
    /// The pass counter, published at every pass while the vCPU runs.
    pass_now: AtomicU64,
    console: Mutex<Console>,
    console_every: u64,
}

/// A VM on the soft backend.
pub struct SoftVm {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    accels: Accels,
}

impl std::fmt::Debug for SoftVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftVm")
            .field("regs", &self.regs())
            .finish_non_exhaustive()
    }
}

impl SoftVm {
    pub fn create(cfg: &SoftConfig) -> Result<Self, VmError> {
        if cfg.mem_size == 0 || cfg.mem_size % PAGE_SIZE as u64 != 0 {
            return Err(VmError::Failed(format!(
                "guest memory size {} is not a positive multiple of {PAGE_SIZE}",
                cfg.mem_size
            )));
        }
        if cfg.dirty_size + cfg.fill > cfg.mem_size {
            return Err(VmError::Failed(format!(
                "the dirtied range ({}) and the filled range ({}) do not fit in guest memory ({})",
                ferry_migration::engine::human_bytes(cfg.dirty_size),
                ferry_migration::engine::human_bytes(cfg.fill),
                ferry_migration::engine::human_bytes(cfg.mem_size)
            )));
        }
        let accels =
            Accels::new(&cfg.accels, cfg.incoming).map_err(|e| VmError::Failed(e.to_string()))?;
        let ram = Arc::new(HostRam::new(&[("ram", 0, cfg.mem_size)])?);
        let pages = (cfg.mem_size / PAGE_SIZE as u64) as usize;
        let regs = Regs {
            pass: 0,
            position: 0,
            range_start: 0,
            range_pages: cfg.dirty_size / PAGE_SIZE as u64,
            rate: cfg.dirty_rate,
        };
        if cfg.fill > 0 && !cfg.incoming {
            ram.fill_random(0, cfg.dirty_size, cfg.fill);
        }
        let shared = Arc::new(Shared {
            ram,
            dirty: DirtyBitmap::new(pages),
            regs: Mutex::new(regs),
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(true),
            pass_now: AtomicU64::new(0),
            console: Mutex::new(Console::default()),
            console_every: cfg.console_every.max(1),
        });
        let s2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("soft-vcpu0".into())
            .spawn(move || vcpu_thread(&s2))
            .map_err(|e| VmError::Io {
                op: "starting the soft vCPU thread",
                source: e,
            })?;
        let vm = Self {
            shared,
            thread: Mutex::new(Some(thread)),
            accels,
        };
        if !cfg.incoming && !cfg.paused {
            vm.resume()?;
        }
        Ok(vm)
    }

    fn regs(&self) -> Regs {
        *self.shared.regs.lock().unwrap()
    }

    /// Device `index` of [`MigratableVm::devices`] as an accelerator (1 and up).
    fn accel(&self, index: usize) -> Result<&crate::devices::accel::Accel, VmError> {
        index
            .checked_sub(1)
            .and_then(|i| self.accels.get(i))
            .ok_or_else(|| VmError::Failed(format!("the soft VM has no device {index}")))
    }

    /// Pages in the dirty log not yet harvested.
    pub fn dirty_pages_pending(&self) -> usize {
        self.shared.dirty.count()
    }

    /// The console's recent output.
    pub fn console_tail(&self) -> String {
        String::from_utf8_lossy(&self.shared.console.lock().unwrap().tail).into_owned()
    }

    /// Checks every page of the workload's range against the vCPU's registers. The VM
    /// must be paused.
    fn check_pattern(&self) -> (u64, u64) {
        let r = self.regs();
        let base = self.shared.ram.host_ptr(0);
        let mut bad = 0;
        for i in 0..r.range_pages {
            let want = (r.pass + u64::from(i < r.position)) as u8;
            let page = (r.range_start + i) as usize;
            // SAFETY: the page is inside the mapping and the vCPU is parked.
            let got = unsafe { std::ptr::read_volatile(base.add(page * PAGE_SIZE)) };
            if got != want {
                bad += 1;
            }
        }
        (r.range_pages, bad)
    }
}

impl Drop for SoftVm {
    fn drop(&mut self) {
        {
            let mut c = self.shared.ctl.lock().unwrap();
            c.exit = true;
            c.run = false;
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

fn vcpu_thread(s: &Shared) {
    let base = s.ram.host_ptr(0);
    loop {
        // Park until told to run.
        let mut regs = {
            let mut c = s.ctl.lock().unwrap();
            while !c.run && !c.exit {
                c.parked = true;
                s.cv.notify_all();
                c = s.cv.wait(c).unwrap();
            }
            if c.exit {
                c.parked = true;
                s.cv.notify_all();
                return;
            }
            c.parked = false;
            *s.regs.lock().unwrap()
        };
        let started = Instant::now();
        let mut done = 0u64;
        while !s.stop.load(Ordering::Relaxed) {
            if regs.range_pages == 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            for _ in 0..64 {
                let page = (regs.range_start + regs.position) as usize;
                // SAFETY: page < range_start + range_pages <= pages of the block, so the
                // byte is inside the mapping, which lives as long as `s`.
                unsafe {
                    let p = base.add(page * PAGE_SIZE);
                    std::ptr::write_volatile(p, std::ptr::read_volatile(p).wrapping_add(1));
                }
                s.dirty.set(page);
                regs.position += 1;
                if regs.position == regs.range_pages {
                    regs.position = 0;
                    regs.pass += 1;
                    s.pass_now.store(regs.pass, Ordering::Relaxed);
                    if regs.pass % s.console_every == 0 {
                        s.console
                            .lock()
                            .unwrap()
                            .write(&format!("pass {}\n", regs.pass));
                    }
                }
                done += 1;
            }
            if regs.rate > 0 {
                let due = Duration::from_secs_f64(done as f64 / regs.rate as f64);
                let el = started.elapsed();
                if due > el {
                    std::thread::sleep((due - el).min(Duration::from_millis(20)));
                }
            }
        }
        *s.regs.lock().unwrap() = regs;
        let mut c = s.ctl.lock().unwrap();
        if !c.run {
            c.parked = true;
            s.cv.notify_all();
        }
    }
}

impl DirtyLog for SoftVm {
    fn start(&self) -> Result<(), VmError> {
        // The workload always records its writes; a bit set before tracking started
        // only costs one extra copy of a page.
        Ok(())
    }

    fn stop(&self) {}

    fn harvest(&self, block: usize, into: &DirtyBitmap) -> Result<(), VmError> {
        debug_assert_eq!(block, 0);
        self.shared.dirty.drain_into(into);
        Ok(())
    }

    fn restore(&self, block: usize, pages: &DirtyBitmap) {
        debug_assert_eq!(block, 0);
        self.shared.dirty.or_from(pages);
    }
}

impl MigratableVm for SoftVm {
    fn ram(&self) -> Arc<dyn GuestRam> {
        self.shared.ram.clone()
    }

    fn dirty_log(&self) -> &dyn DirtyLog {
        self
    }

    fn vcpu_count(&self) -> usize {
        1
    }

    fn vcpu_schema(&self) -> &'static StateSchema {
        &SOFT_VCPU_SCHEMA
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        let mut d = vec![DeviceInfo {
            name: SOFT_CONSOLE_SCHEMA.name.to_string(),
            instance: 0,
            schema: &SOFT_CONSOLE_SCHEMA,
            config: Vec::new(),
            precopy: None,
        }];
        d.extend(self.accels.device_infos());
        d
    }

    fn pause(&self) -> Result<(), VmError> {
        let mut c = self.shared.ctl.lock().unwrap();
        c.run = false;
        self.shared.stop.store(true, Ordering::SeqCst);
        while !c.parked {
            c = self.shared.cv.wait(c).unwrap();
        }
        drop(c);
        self.accels.pause().map_err(accel_err)
    }

    fn resume(&self) -> Result<(), VmError> {
        let mut c = self.shared.ctl.lock().unwrap();
        if c.run {
            return Ok(());
        }
        self.accels.run().map_err(accel_err)?;
        // Wait for a previous stop to settle so the thread reloads the registers.
        while !c.parked {
            c = self.shared.cv.wait(c).unwrap();
        }
        c.run = true;
        self.shared.stop.store(false, Ordering::SeqCst);
        self.shared.cv.notify_all();
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.shared.ctl.lock().unwrap().run
    }

    fn save_vcpu(&self, index: usize) -> Result<DeviceState, VmError> {
        debug_assert_eq!(index, 0);
        let r = self.regs();
        Ok(DeviceState::new()
            .with("pass", Value::U64(r.pass))
            .with("position", Value::U64(r.position))
            .with("range-start", Value::U64(r.range_start))
            .with("range-pages", Value::U64(r.range_pages))
            .with("rate", Value::U64(r.rate)))
    }

    fn load_vcpu(&self, index: usize, st: DeviceState) -> Result<(), VmError> {
        if index != 0 {
            return Err(VmError::Failed(format!(
                "the soft backend has one vCPU, not {}",
                index + 1
            )));
        }
        let r = Regs {
            pass: st.get_u64("pass")?,
            position: st.get_u64("position")?,
            range_start: st.get_u64("range-start")?,
            range_pages: st.get_u64("range-pages")?,
            rate: st.get_u64("rate")?,
        };
        let pages = self.shared.ram.blocks()[0].pages() as u64;
        if r.range_start
            .checked_add(r.range_pages)
            .is_none_or(|end| end > pages)
            || (r.range_pages > 0 && r.position >= r.range_pages)
        {
            return Err(VmError::Failed(format!(
                "soft vCPU state out of range: pages {}+{} at position {} in a guest of {pages} pages",
                r.range_start, r.range_pages, r.position
            )));
        }
        *self.shared.regs.lock().unwrap() = r;
        self.shared.pass_now.store(r.pass, Ordering::Relaxed);
        Ok(())
    }

    fn save_device(&self, index: usize, out: &mut StateWriter<'_>) -> Result<(), VmError> {
        if index > 0 {
            return self.accel(index)?.save(out).map_err(accel_err);
        }
        let c = self.shared.console.lock().unwrap();
        out.write_state(
            &DeviceState::new()
                .with("bytes-written", Value::U64(c.written))
                .with("tail", Value::Bytes(c.tail.clone())),
        )?;
        Ok(())
    }

    fn load_device(&self, index: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        if index > 0 {
            return self.accel(index)?.load(input).map_err(accel_err);
        }
        let st = input.read_state()?;
        let mut c = self.shared.console.lock().unwrap();
        c.written = st.get_u64("bytes-written")?;
        c.tail = st.get_bytes("tail")?.to_vec();
        Ok(())
    }

    fn device_pending(&self, index: usize) -> DevicePending {
        match self.accels.get(index.wrapping_sub(1)) {
            Some(a) if index > 0 => a.pending(),
            _ => DevicePending::default(),
        }
    }

    fn precopy_begin(&self, index: usize) -> Result<(), VmError> {
        self.accel(index)?.precopy_begin().map_err(accel_err)
    }

    fn save_precopy(&self, index: usize, out: &mut StateWriter<'_>) -> Result<bool, VmError> {
        self.accel(index)?.save_precopy(out).map_err(accel_err)
    }

    fn load_precopy(&self, index: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        self.accel(index)?.load_precopy(input).map_err(accel_err)
    }

    fn precopy_abandon(&self, index: usize) {
        if let Ok(a) = self.accel(index) {
            a.precopy_abandon();
        }
    }
}

fn accel_err(e: crate::devices::accel::AccelError) -> VmError {
    VmError::Failed(ferry_migration::engine::error_chain(&e))
}

impl GuestVm for SoftVm {
    fn backend(&self) -> &'static str {
        "soft"
    }

    fn accels(&self) -> &Accels {
        &self.accels
    }

    fn report(&self) -> GuestReport {
        GuestReport {
            passes: vec![self.shared.pass_now.load(Ordering::Relaxed)],
            running: self.is_running(),
            console_tail: self.console_tail(),
        }
    }

    fn verify(&self) -> Result<(u64, u64), VmError> {
        let was = self.is_running();
        if was {
            self.pause()?;
        }
        let r = self.check_pattern();
        if was {
            self.resume()?;
        }
        Ok(r)
    }
}
