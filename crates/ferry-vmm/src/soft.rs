//! The soft backend: a VM without a hypervisor, for tests and machines without KVM.
//!
//! Guest RAM is anonymous memory. Each "soft vCPU" is a thread that runs the reference
//! workload: each pass it increments byte 0 of every 4 KiB page of its own range (vCPU
//! `i`'s follows vCPU `i - 1`'s), optionally at a limited rate, and records each page it
//! writes in a [`DirtyBitmap`] (the VM's dirty log). Its registers are the pass counter
//! and its position in the range; they are its vCPU state, so at the destination it
//! carries on exactly where it stopped. A vCPU may instead compute
//! ([`VcpuWork::Compute`]): a fixed amount of work per pass that writes no guest RAM.
//!
//! Memory correctness can then be checked exactly: with a vCPU stopped at pass `p`,
//! position `i`, pages of its range before `i` hold `p + 1` and the others `p` (modulo
//! 256).
//!
//! # Throttle
//!
//! [`MigratableVm::set_vcpu_throttle`] is carried out in the vCPU threads, after each
//! chunk of 64 pages or compute pass ([`SoftThrottle`]): a CPU throttle holds each
//! thread its share of every 10 ms; a dirty-limit paces a thread whose own count of the
//! pages it writes runs ahead of the limit, and leaves the others alone. The soft vCPU
//! is its own writer, so its dirty rate is exact, not sampled.
//!
//! A small console device (`soft-console`) keeps the last lines the workload printed,
//! to show device state moving with the guest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::engine::vm::{
    DeviceInfo, DevicePending, DirtyLog, GuestRam, MigratableVm, VcpuThrottle, VcpuThrottleStats,
    VmError,
};
use ferry_migration::state::{
    DeviceState, FieldKind, FieldSchema, StateReader, StateSchema, StateWriter, SubsectionSchema,
    SubsectionState, Value,
};
use ferry_migration::PAGE_SIZE;

use crate::devices::accel::{AccelConfig, Accels};
use crate::guest::{GuestReport, GuestVm, VcpuWork};
use crate::memory::HostRam;
use crate::throttle::{self, SoftThrottle, ThrottleSetting, VcpuCounters};

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
    subsections: &[SOFT_COMPUTE],
};

/// Marks a vCPU that computes instead of writing a range ([`VcpuWork::Compute`]). It
/// carries nothing; a release without computing vCPUs refuses it by name instead of
/// taking the vCPU for an idle one.
pub const SOFT_COMPUTE: SubsectionSchema = SubsectionSchema {
    name: "soft-vcpu/compute",
    version: 1,
    fields: &[],
    needed_when: "the vCPU computes instead of dirtying a range (ferry run --vcpu-dirty compute)",
};

/// Iterations of a computing vCPU's pass: a few tens of microseconds.
const COMPUTE_ITERATIONS: u64 = 50_000;

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
    /// vCPUs, each a thread.
    pub vcpus: usize,
    /// Bytes each vCPU's workload dirties each pass, vCPU 0 at the start of RAM and each
    /// other after the one before; 0 for an idle guest.
    pub dirty_size: u64,
    /// Each vCPU's work, one per vCPU, instead of `dirty_size` for all; empty for none.
    pub vcpu_work: Vec<VcpuWork>,
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
            vcpus: 1,
            dirty_size: 16 << 20,
            vcpu_work: Vec::new(),
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
    /// Computes instead of writing its range (which is then empty).
    compute: bool,
}

#[derive(Debug, Default)]
struct Ctl {
    run: bool,
    /// vCPU threads waiting to run.
    parked: usize,
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

struct SoftVcpu {
    regs: Mutex<Regs>,
    /// The pass counter, published at every pass while the vCPU runs.
    pass_now: AtomicU64,
    throttle: VcpuCounters,
}

struct Shared {
    ram: Arc<HostRam>,
    dirty: DirtyBitmap,
    vcpus: Vec<SoftVcpu>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    stop: AtomicBool,
    throttle: ThrottleSetting,
    console: Mutex<Console>,
    console_every: u64,
}

/// A VM on the soft backend.
pub struct SoftVm {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    accels: Accels,
}

impl std::fmt::Debug for SoftVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftVm")
            .field(
                "regs",
                &(0..self.shared.vcpus.len())
                    .map(|i| self.regs(i))
                    .collect::<Vec<_>>(),
            )
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
        let work = VcpuWork::per_vcpu(&cfg.vcpu_work, cfg.vcpus, cfg.dirty_size);
        if cfg.vcpus == 0 || work.len() != cfg.vcpus {
            return Err(VmError::Failed(format!(
                "{} vCPUs with work given for {}",
                cfg.vcpus,
                work.len()
            )));
        }
        if let Some(size) = work
            .iter()
            .map(|w| w.dirty_size())
            .find(|s| s % PAGE_SIZE as u64 != 0)
        {
            return Err(VmError::Failed(format!(
                "a vCPU's dirtied range ({size}) is not a multiple of {PAGE_SIZE}"
            )));
        }
        let dirty_total: u64 = work.iter().map(|w| w.dirty_size()).sum();
        if dirty_total + cfg.fill > cfg.mem_size {
            return Err(VmError::Failed(format!(
                "the dirtied ranges ({}) and the filled range ({}) do not fit in guest memory ({})",
                ferry_migration::engine::human_bytes(dirty_total),
                ferry_migration::engine::human_bytes(cfg.fill),
                ferry_migration::engine::human_bytes(cfg.mem_size)
            )));
        }
        let accels =
            Accels::new(&cfg.accels, cfg.incoming).map_err(|e| VmError::Failed(e.to_string()))?;
        let ram = Arc::new(HostRam::new(&[("ram", 0, cfg.mem_size)])?);
        let pages = (cfg.mem_size / PAGE_SIZE as u64) as usize;
        let mut start = 0;
        let vcpus = work
            .iter()
            .map(|w| {
                let range_pages = w.dirty_size() / PAGE_SIZE as u64;
                let regs = Regs {
                    pass: 0,
                    position: 0,
                    range_start: start,
                    range_pages,
                    rate: cfg.dirty_rate,
                    compute: *w == VcpuWork::Compute,
                };
                start += range_pages;
                SoftVcpu {
                    regs: Mutex::new(regs),
                    pass_now: AtomicU64::new(0),
                    throttle: VcpuCounters::default(),
                }
            })
            .collect();
        if cfg.fill > 0 && !cfg.incoming {
            ram.fill_random(0, dirty_total, cfg.fill);
        }
        let shared = Arc::new(Shared {
            ram,
            dirty: DirtyBitmap::new(pages),
            vcpus,
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(true),
            throttle: ThrottleSetting::default(),
            console: Mutex::new(Console::default()),
            console_every: cfg.console_every.max(1),
        });
        let vm = Self {
            shared,
            threads: Mutex::new(Vec::new()),
            accels,
        };
        for index in 0..cfg.vcpus {
            let s2 = Arc::clone(&vm.shared);
            let thread = std::thread::Builder::new()
                .name(format!("soft-vcpu{index}"))
                .spawn(move || vcpu_thread(&s2, index))
                .map_err(|e| VmError::Io {
                    op: "starting a soft vCPU thread",
                    source: e,
                })?;
            vm.threads.lock().unwrap().push(thread);
        }
        if !cfg.incoming && !cfg.paused {
            vm.resume()?;
        }
        Ok(vm)
    }

    fn regs(&self, index: usize) -> Regs {
        *self.shared.vcpus[index].regs.lock().unwrap()
    }

    fn vcpu(&self, index: usize) -> Result<&SoftVcpu, VmError> {
        self.shared.vcpus.get(index).ok_or_else(|| {
            VmError::Failed(format!(
                "the soft VM has {} vCPUs, no vCPU {index}",
                self.shared.vcpus.len()
            ))
        })
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

    /// The pass counter of every vCPU.
    pub fn passes(&self) -> Vec<u64> {
        self.shared
            .vcpus
            .iter()
            .map(|v| v.pass_now.load(Ordering::Relaxed))
            .collect()
    }

    /// Checks every page of the workloads' ranges against the vCPUs' registers. The VM
    /// must be paused.
    fn check_pattern(&self) -> (u64, u64) {
        let base = self.shared.ram.host_ptr(0);
        let (mut checked, mut bad) = (0, 0);
        for v in 0..self.shared.vcpus.len() {
            let r = self.regs(v);
            for i in 0..r.range_pages {
                let want = (r.pass + u64::from(i < r.position)) as u8;
                let page = (r.range_start + i) as usize;
                // SAFETY: the page is inside the mapping and the vCPU is parked.
                let got = unsafe { std::ptr::read_volatile(base.add(page * PAGE_SIZE)) };
                if got != want {
                    bad += 1;
                }
            }
            checked += r.range_pages;
        }
        (checked, bad)
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
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

/// One pass of a computing vCPU: work the optimiser cannot drop, touching no guest RAM.
fn compute_pass(seed: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..COMPUTE_ITERATIONS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x)
}

/// Sleeps `d` in slices, less if the VM is being stopped; returns the time slept.
fn hold(d: Duration, stop: &AtomicBool) -> Duration {
    let t = Instant::now();
    let until = t + d;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.load(Ordering::Relaxed) {
            return t.elapsed();
        }
        std::thread::sleep(left.min(Duration::from_millis(2)));
    }
}

fn vcpu_thread(s: &Shared, index: usize) {
    let base = s.ram.host_ptr(0);
    let vcpu = &s.vcpus[index];
    loop {
        // Park until told to run.
        let mut regs = {
            let mut c = s.ctl.lock().unwrap();
            c.parked += 1;
            s.cv.notify_all();
            while !c.run && !c.exit {
                c = s.cv.wait(c).unwrap();
            }
            if c.exit {
                return;
            }
            c.parked -= 1;
            *vcpu.regs.lock().unwrap()
        };
        let started = Instant::now();
        let mut throttle = SoftThrottle::new(started);
        let mut done = 0u64;
        let mut held = Duration::ZERO;
        while !s.stop.load(Ordering::Relaxed) {
            let pages = if regs.compute {
                compute_pass(regs.pass);
                regs.pass += 1;
                vcpu.pass_now.store(regs.pass, Ordering::Relaxed);
                0
            } else if regs.range_pages == 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            } else {
                for _ in 0..64 {
                    let page = (regs.range_start + regs.position) as usize;
                    // SAFETY: page < range_start + range_pages <= pages of the block, so
                    // the byte is inside the mapping, which lives as long as `s`.
                    unsafe {
                        let p = base.add(page * PAGE_SIZE);
                        std::ptr::write_volatile(p, std::ptr::read_volatile(p).wrapping_add(1));
                    }
                    s.dirty.set(page);
                    regs.position += 1;
                    if regs.position == regs.range_pages {
                        regs.position = 0;
                        regs.pass += 1;
                        vcpu.pass_now.store(regs.pass, Ordering::Relaxed);
                        if index == 0 && regs.pass % s.console_every == 0 {
                            s.console
                                .lock()
                                .unwrap()
                                .write(&format!("pass {}\n", regs.pass));
                        }
                    }
                    done += 1;
                }
                64
            };
            let wait = throttle.account(pages, &s.throttle, &vcpu.throttle, Instant::now());
            if !wait.is_zero() {
                let h = hold(wait, &s.stop);
                vcpu.throttle.add_throttled(h);
                // A paced workload's rate is work per time run: time held by a throttle
                // is not made up afterwards, as a real guest's is not.
                held += h;
                throttle.resumed(Instant::now());
            }
            if regs.rate > 0 && pages > 0 {
                let due = Duration::from_secs_f64(done as f64 / regs.rate as f64);
                let el = started.elapsed().saturating_sub(held);
                if due > el {
                    std::thread::sleep((due - el).min(Duration::from_millis(20)));
                }
            }
        }
        *vcpu.regs.lock().unwrap() = regs;
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
        self.shared.vcpus.len()
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
        while c.parked < self.shared.vcpus.len() {
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
        // Wait for a previous stop to settle so the threads reload the registers.
        while c.parked < self.shared.vcpus.len() {
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
        let r = self.vcpu(index).map(|v| *v.regs.lock().unwrap())?;
        let mut st = DeviceState::new();
        if r.compute {
            st = st.with_subsection(SubsectionState::new(SOFT_COMPUTE.name));
        }
        Ok(st
            .with("pass", Value::U64(r.pass))
            .with("position", Value::U64(r.position))
            .with("range-start", Value::U64(r.range_start))
            .with("range-pages", Value::U64(r.range_pages))
            .with("rate", Value::U64(r.rate)))
    }

    fn load_vcpu(&self, index: usize, st: DeviceState) -> Result<(), VmError> {
        let vcpu = self.vcpu(index)?;
        let r = Regs {
            pass: st.get_u64("pass")?,
            position: st.get_u64("position")?,
            range_start: st.get_u64("range-start")?,
            range_pages: st.get_u64("range-pages")?,
            rate: st.get_u64("rate")?,
            compute: st.subsection(SOFT_COMPUTE.name).is_some(),
        };
        let pages = self.shared.ram.blocks()[0].pages() as u64;
        if r.range_start
            .checked_add(r.range_pages)
            .is_none_or(|end| end > pages)
            || (r.range_pages > 0 && r.position >= r.range_pages)
            || (r.compute && r.range_pages > 0)
        {
            return Err(VmError::Failed(format!(
                "soft vCPU state out of range: pages {}+{} at position {} in a guest of {pages} pages",
                r.range_start, r.range_pages, r.position
            )));
        }
        *vcpu.regs.lock().unwrap() = r;
        vcpu.pass_now.store(r.pass, Ordering::Relaxed);
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

    fn set_vcpu_throttle(&self, throttle: VcpuThrottle) -> Result<(), VmError> {
        throttle::check(throttle)?;
        self.shared.throttle.set(throttle);
        Ok(())
    }

    fn vcpu_throttle_stats(&self) -> Vec<VcpuThrottleStats> {
        self.shared
            .vcpus
            .iter()
            .map(|v| v.throttle.stats())
            .collect()
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
            passes: self.passes(),
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
