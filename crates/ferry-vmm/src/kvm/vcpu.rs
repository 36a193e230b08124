//! vCPU threads and the pause protocol.
//!
//! Each running vCPU has a thread that owns its `VcpuFd` (`KVM_RUN` needs `&mut`) for as
//! long as it runs. Pausing is:
//!
//! 1. set the VM's stop flag;
//! 2. send the kick signal (`SIGRTMIN`) to every vCPU thread. Its handler sets
//!    `immediate_exit` in that thread's `kvm_run` page through a thread-local pointer, so
//!    a thread inside `KVM_RUN` comes back with `EINTR`, and a thread about to enter it
//!    comes back at once;
//! 3. each thread sees the flag, re-enters `KVM_RUN` once with `immediate_exit` set so
//!    KVM completes an I/O exit the VMM has just handled (on VMX/SVM the `out` is only
//!    retired on the next entry; saving state before that would replay it), and ends;
//! 4. `pause` joins every thread, so when it returns no vCPU is in `KVM_RUN`.
//!
//! The races: a thread clears `immediate_exit` *before* it looks at the flag, and the
//! flag is set before the signal is sent, so a kick is either seen in the flag or left in
//! `immediate_exit` for the next entry; it is never lost. A signal that arrives before the
//! thread published its pointer finds none and does nothing, but then the flag check
//! that follows sees the stop. `resume` starts fresh threads.
//!
//! # Pacing
//!
//! The paced guest program (`guest.rs`) reports every 64 pages it writes with a 16-bit
//! `out` to its port. The thread keeps a [`Pacer`]: the pages reported since it started
//! against the vCPU's rate (read from the guest's control page at each report, so a
//! migrated guest keeps its rate), and sleeps in the exit until they are due, as the soft
//! backend's vCPU does between its chunks. A guest slower than its rate is not held
//! back, and catches up (as fast as it can) when it can. The sleep is cut in slices of
//! [`PACE_SLICE`] with the stop flag checked between them, so a pause waits at most that
//! much longer for a sleeping vCPU; the `out` is retired on the next entry as any other.
//!
//! # Throttle
//!
//! A throttled vCPU must be held even when its guest never exits on its own (the
//! classic program exits once per pass, which under dirty logging can be a few hundred
//! milliseconds). So while a throttle is set, a throttle thread per VM ticks every
//! [`CPU_THROTTLE_PERIOD`] (10 ms, QEMU's timeslice): for each vCPU to hold it stores
//! the hold (its share of the period) in the vCPU's slot and sends it the kick signal.
//! The vCPU comes out of `KVM_RUN` with `EINTR` as for a pause, takes the hold and
//! sleeps it (in [`PACE_SLICE`]s, so a pause still waits little), then re-enters. A
//! CPU throttle holds every vCPU `percent` of each period. A dirty-limit reaps the
//! dirty rings every `period`, takes each vCPU's rate from its own ring, and sets the
//! share of the period the vCPU may run ([`crate::throttle::next_run_fraction`]); a
//! vCPU under the limit runs unheld. Cost: one signal, one exit and one re-entry per
//! held vCPU per 10 ms (tens of microseconds, well under 1%), and none when no
//! throttle is set.
//!
//! A vCPU whose dirty ring is full exits with `KVM_EXIT_DIRTY_RING_FULL`; its thread
//! reaps the rings (`dirty.rs`) and re-enters.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_migration::engine::vm::{VcpuThrottle, CPU_THROTTLE_PERIOD};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

use super::dirty::KvmDirtyLog;
use super::layout::{pass_gpa, rate_gpa};
use super::memory::KvmRam;
use super::{guest, ring, KvmError};
use crate::devices::IoBus;
use crate::throttle::{next_run_fraction, VcpuCounters};

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread runs, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread local without destructor is a plain TLS load: no
    // allocation or lock, so it is async-signal-safe.
    if let Ok(p) = IMMEDIATE_EXIT.try_with(Cell::get) {
        if !p.is_null() {
            // SAFETY: the pointer is published only while this thread owns the vCPU and
            // its kvm_run mapping, and cleared before it lets go of them.
            unsafe { p.write_volatile(1) };
        }
    }
}

/// The signal that kicks vCPU threads out of `KVM_RUN`. Reserved for that in ferry.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno()))
        .map_err(|errno| KvmError::KickSignal {
            source: kvm_ioctls::Error::new(errno),
        })
}

/// What the VMM counts per vCPU.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// `out` exits to the vCPU's own port seen (one per pass of the guest).
    pub exits: AtomicU64,
    /// `out` values that did not follow the previous one, or disagreed with the counter
    /// in guest memory, and reports of the paced program of more than a chunk.
    pub out_errors: AtomicU64,
    /// Reports of the paced program seen.
    pub reports: AtomicU64,
    /// Pages those reports counted.
    pub reported_pages: AtomicU64,
    /// Time the thread held the vCPU to its rate, in microseconds.
    pub paced_us: AtomicU64,
}

/// The longest a vCPU thread sleeps without looking at the stop flag.
pub const PACE_SLICE: Duration = Duration::from_millis(2);

/// Holds a vCPU to a dirty rate: how long to wait after each report (pure, so tested on
/// its own).
#[derive(Debug, Clone)]
pub struct Pacer {
    started: Instant,
    pages: u64,
}

impl Pacer {
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            pages: 0,
        }
    }

    /// The vCPU was held by a throttle for `d`: the schedule moves on by as much, so a
    /// paced guest does not make up afterwards for time it did not run (its rate is
    /// work per time run, as a real guest's is, and a throttle slows it).
    pub fn held(&mut self, d: Duration) {
        self.started += d;
    }

    /// How long to hold the vCPU, at `now`, after it reported `pages` more pages at
    /// `rate` pages per second: until all it reported since this pacer started is due.
    /// A report of no pages is an idle pass, held [`guest::IDLE_PASS`]; rate 0 is
    /// unpaced.
    pub fn wait(&mut self, pages: u64, rate: u64, now: Instant) -> Duration {
        if pages == 0 {
            return guest::IDLE_PASS;
        }
        self.pages += pages;
        if rate == 0 {
            return Duration::ZERO;
        }
        let due = self.started + Duration::from_secs_f64(self.pages as f64 / rate as f64);
        due.saturating_duration_since(now)
    }
}

/// Sleeps `d`, or less if `stop` is set meanwhile.
fn hold(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(left.min(PACE_SLICE));
    }
}

/// A vCPU's fd; its thread holds the lock while it runs.
type Slot = Arc<Mutex<VcpuFd>>;
/// A vCPU thread; it ends with the reason it stopped by itself, if it did.
type VcpuThread = JoinHandle<Result<(), KvmError>>;
type Threads = Arc<Mutex<Vec<Option<VcpuThread>>>>;

/// What the throttle thread tells each vCPU thread, and what holding cost it.
#[derive(Default)]
pub struct VcpuHold {
    /// Nanoseconds to sleep at the next kick (taken by the vCPU thread).
    hold_ns: AtomicU64,
    /// Dirty-limit: the share of each period the vCPU may run, in 1/1000.
    run_permille: AtomicU32,
    pub counters: VcpuCounters,
}

/// The throttle thread of a VM, while a throttle is set.
struct Ticker {
    quit: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

pub struct Vcpus {
    fds: Vec<Slot>,
    /// Running threads; the lock also serialises pause and resume.
    threads: Threads,
    stop: Arc<AtomicBool>,
    running: AtomicBool,
    pub stats: Arc<[VcpuStats]>,
    pub holds: Arc<[VcpuHold]>,
    ticker: Mutex<Option<Ticker>>,
    ram: Arc<KvmRam>,
    dirty: Arc<KvmDirtyLog>,
    /// The devices behind port I/O exits other than the pass reports.
    io: Arc<IoBus>,
}

impl Vcpus {
    pub fn new(
        fds: Vec<VcpuFd>,
        ram: Arc<KvmRam>,
        dirty: Arc<KvmDirtyLog>,
        io: Arc<IoBus>,
    ) -> Result<Self, KvmError> {
        install_kick_handler()?;
        let n = fds.len();
        Ok(Self {
            fds: fds.into_iter().map(|fd| Arc::new(Mutex::new(fd))).collect(),
            threads: Arc::new(Mutex::new((0..n).map(|_| None).collect())),
            stop: Arc::new(AtomicBool::new(true)),
            running: AtomicBool::new(false),
            stats: (0..n).map(|_| VcpuStats::default()).collect(),
            holds: (0..n).map(|_| VcpuHold::default()).collect(),
            ticker: Mutex::new(None),
            ram,
            dirty,
            io,
        })
    }

    /// Sets the throttle (checked by the caller): stops the throttle thread, and starts
    /// one for anything but `None`.
    pub fn set_throttle(&self, throttle: VcpuThrottle) -> Result<(), KvmError> {
        let mut ticker = self.ticker.lock().expect("throttle thread lock");
        if let Some(t) = ticker.take() {
            t.quit.store(true, Ordering::SeqCst);
            let _ = t.handle.join();
        }
        for h in self.holds.iter() {
            h.hold_ns.store(0, Ordering::Relaxed);
            h.run_permille.store(1000, Ordering::Relaxed);
        }
        if throttle == VcpuThrottle::None {
            return Ok(());
        }
        let quit = Arc::new(AtomicBool::new(false));
        let (q, threads, holds, dirty) = (
            quit.clone(),
            self.threads.clone(),
            self.holds.clone(),
            self.dirty.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || throttle_thread(throttle, &q, &threads, &holds, &dirty))
            .map_err(|source| KvmError::ThrottleThread { source })?;
        *ticker = Some(Ticker { quit, handle });
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// vCPU `index`'s fd, while no thread runs it.
    pub fn parked(&self, index: usize) -> Result<ParkedVcpu<'_>, KvmError> {
        let slot = self.fds.get(index).ok_or(KvmError::NoVcpu(index))?;
        if self.is_running() {
            return Err(KvmError::Running);
        }
        match slot.try_lock() {
            Ok(guard) => Ok(ParkedVcpu(guard)),
            // A vCPU thread panicked holding it; the fd itself is fine.
            Err(TryLockError::Poisoned(p)) => Ok(ParkedVcpu(p.into_inner())),
            Err(TryLockError::WouldBlock) => Err(KvmError::Running),
        }
    }

    /// Starts a thread per vCPU. Does nothing if they run.
    pub fn resume(&self) -> Result<(), KvmError> {
        let mut threads = self.threads.lock().expect("vCPU threads lock");
        if self.is_running() {
            return Ok(());
        }
        self.stop.store(false, Ordering::SeqCst);
        for index in 0..self.fds.len() {
            let ctx = VcpuContext {
                index,
                stop: self.stop.clone(),
                stats: self.stats.clone(),
                holds: self.holds.clone(),
                ram: self.ram.clone(),
                dirty: self.dirty.clone(),
                io: self.io.clone(),
            };
            let slot = self.fds[index].clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || run_vcpu(&slot, &ctx));
            match spawned {
                Ok(handle) => threads[index] = Some(handle),
                Err(source) => {
                    // The fd stayed in its slot (the closure was not run); stop the others.
                    let _ = self.stop_threads(&mut threads);
                    return Err(KvmError::Thread { index, source });
                }
            }
        }
        self.running.store(true, Ordering::Release);
        Ok(())
    }

    /// Stops every vCPU thread; returns when none is in `KVM_RUN`. An error says that a
    /// vCPU had stopped by itself (the guest failed) before the pause; all are stopped
    /// either way.
    pub fn pause(&self) -> Result<(), KvmError> {
        let mut threads = self.threads.lock().expect("vCPU threads lock");
        if !self.is_running() {
            return Ok(());
        }
        let result = self.stop_threads(&mut threads);
        self.running.store(false, Ordering::Release);
        result
    }

    fn stop_threads(&self, threads: &mut [Option<VcpuThread>]) -> Result<(), KvmError> {
        self.stop.store(true, Ordering::SeqCst);
        for handle in threads.iter().flatten() {
            // ESRCH when the thread already ended (its guest failed); the join says why.
            let _ = handle.kill(kick_signal());
        }
        let mut first_err = None;
        for (index, handle) in threads.iter_mut().enumerate() {
            let Some(handle) = handle.take() else {
                continue;
            };
            let outcome = handle.join().unwrap_or(Err(KvmError::VcpuPanicked(index)));
            if let Err(err) = outcome {
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        let _ = self.set_throttle(VcpuThrottle::None);
        if let Err(err) = self.pause() {
            tracing::warn!(err = %super::chain(&err), "vCPU stopped with an error");
        }
    }
}

/// A vCPU fd borrowed while its vCPU is paused.
pub struct ParkedVcpu<'a>(MutexGuard<'a, VcpuFd>);

impl std::ops::Deref for ParkedVcpu<'_> {
    type Target = VcpuFd;
    fn deref(&self) -> &VcpuFd {
        &self.0
    }
}

/// What a vCPU thread works with.
struct VcpuContext {
    index: usize,
    stop: Arc<AtomicBool>,
    stats: Arc<[VcpuStats]>,
    holds: Arc<[VcpuHold]>,
    ram: Arc<KvmRam>,
    dirty: Arc<KvmDirtyLog>,
    io: Arc<IoBus>,
}

impl VcpuContext {
    /// Sleeps the hold the throttle thread left for this vCPU, if any; returns how
    /// long it held.
    fn take_hold(&self) -> Duration {
        let hold = &self.holds[self.index];
        let ns = hold.hold_ns.swap(0, Ordering::Relaxed);
        if ns == 0 {
            return Duration::ZERO;
        }
        let t = Instant::now();
        self::hold(Duration::from_nanos(ns), &self.stop);
        let held = t.elapsed();
        hold.counters.add_throttled(held);
        held
    }
}

fn run_vcpu(slot: &Slot, ctx: &VcpuContext) -> Result<(), KvmError> {
    let index = ctx.index;
    let ram = &*ctx.ram;
    let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
    let fd = &mut *guard;
    // Threads inherit the spawner's mask; the kick must get through.
    let _ = unblock_signal(kick_signal());
    let regs = fd.get_regs().map_err(|source| KvmError::Vcpu {
        index,
        ioctl: "KVM_GET_REGS",
        source,
    })?;
    let pass = ram.read_u64(pass_gpa(index));
    let mut expected = match guest::Program::at(regs.rip) {
        Some((program, off)) => program.next_out(off, pass),
        None => pass.wrapping_add(1) as u8,
    };

    fd.set_kvm_immediate_exit(0);
    IMMEDIATE_EXIT.with(|c| c.set(ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit)));
    let result = run_loop(ctx, fd, &mut expected);
    // Complete a pending I/O exit so the saved state is past it (see module docs).
    fd.set_kvm_immediate_exit(1);
    let completed = match fd.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(KvmError::Vcpu {
            index,
            ioctl: "KVM_RUN (completing I/O)",
            source,
        }),
        Ok(exit) => Err(KvmError::GuestStopped {
            index,
            reason: format!("{exit:?} while completing I/O"),
        }),
    };
    IMMEDIATE_EXIT.with(|c| c.set(ptr::null_mut()));
    fd.set_kvm_immediate_exit(0);
    result.and(completed)
}

fn run_loop(ctx: &VcpuContext, fd: &mut VcpuFd, expected: &mut u8) -> Result<(), KvmError> {
    let index = ctx.index;
    let (stop, stats, ram, io) = (&*ctx.stop, &ctx.stats[index], &*ctx.ram, &*ctx.io);
    let port = guest::port(index);
    let mut pacer = Pacer::new(Instant::now());
    while !stop.load(Ordering::SeqCst) {
        pacer.held(ctx.take_hold());
        match fd.run() {
            Ok(VcpuExit::IoOut(p, &[lo, hi])) if p == port => {
                let pages = u64::from(u16::from_le_bytes([lo, hi]));
                stats.reports.fetch_add(1, Ordering::Relaxed);
                stats.reported_pages.fetch_add(pages, Ordering::Relaxed);
                if pages > guest::CHUNK {
                    stats.out_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(index, pages, "guest reported more than a chunk");
                }
                let wait = pacer.wait(pages, ram.read_u64(rate_gpa(index)), Instant::now());
                if !wait.is_zero() {
                    let t = Instant::now();
                    hold(wait, stop);
                    stats
                        .paced_us
                        .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
            }
            Ok(VcpuExit::IoOut(p, data)) if p == port && data.len() == 1 => {
                let value = data[0];
                stats.exits.fetch_add(1, Ordering::Relaxed);
                let pass = ram.read_u64(pass_gpa(index));
                if value != *expected || value != pass as u8 {
                    stats.out_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        index,
                        value,
                        expected = *expected,
                        pass,
                        "guest out of sequence"
                    );
                }
                *expected = value.wrapping_add(1);
            }
            // The serial console, as the guest prints. The data of an `in` goes back to
            // the guest on the next KVM_RUN, as an `out` is retired then.
            Ok(VcpuExit::IoOut(p, data)) if p != port && io.claims(p) => {
                io.write(p, data);
            }
            Ok(VcpuExit::IoIn(p, data)) if io.claims(p) => {
                io.read(p, data);
            }
            Ok(VcpuExit::Unsupported(ring::EXIT_DIRTY_RING_FULL)) => {
                ctx.dirty.reap()?;
            }
            Ok(exit) => {
                let reason = format!("{exit:?}");
                let regs = fd.get_regs().unwrap_or_default();
                let reason = format!("{reason} at rip {:#x}, rflags {:#x}", regs.rip, regs.rflags);
                return Err(KvmError::GuestStopped { index, reason });
            }
            // The kick (or another signal): clear it before the flag check, so a kick
            // that lands after the check stays in immediate_exit.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0)
            }
            Err(source) => {
                return Err(KvmError::Vcpu {
                    index,
                    ioctl: "KVM_RUN",
                    source,
                })
            }
        }
    }
    Ok(())
}

/// The throttle thread (see the module docs): every [`CPU_THROTTLE_PERIOD`], hands each
/// vCPU to hold its hold and kicks it; under a dirty-limit, every `period` it reaps the
/// rings and sets each vCPU's share from its rate.
fn throttle_thread(
    throttle: VcpuThrottle,
    quit: &AtomicBool,
    threads: &Mutex<Vec<Option<VcpuThread>>>,
    holds: &[VcpuHold],
    dirty: &KvmDirtyLog,
) {
    let mut next_tick = Instant::now() + CPU_THROTTLE_PERIOD;
    let mut next_control = Instant::now();
    while !quit.load(Ordering::SeqCst) {
        let now = Instant::now();
        if let VcpuThrottle::DirtyLimit {
            bytes_per_sec,
            period,
        } = throttle
        {
            if now >= next_control {
                next_control = now + period;
                if let Err(err) = dirty.reap() {
                    tracing::warn!(err = %super::chain(&err), "reaping the dirty rings");
                }
                for (h, rate) in holds.iter().zip(dirty.rates()) {
                    let run = f64::from(h.run_permille.load(Ordering::Relaxed)) / 1000.0;
                    let next = match rate {
                        Some(rate) => next_run_fraction(run, rate, bytes_per_sec),
                        None => 1.0,
                    };
                    h.run_permille
                        .store((next * 1000.0).round() as u32, Ordering::Relaxed);
                }
            }
        }
        let mut kick = Vec::new();
        for (i, h) in holds.iter().enumerate() {
            let held_permille = match throttle {
                VcpuThrottle::Cpu { percent } => u32::from(percent) * 10,
                _ => 1000 - h.run_permille.load(Ordering::Relaxed).min(1000),
            };
            if held_permille > 0 {
                let ns = CPU_THROTTLE_PERIOD.as_nanos() as u64 * u64::from(held_permille) / 1000;
                h.hold_ns.store(ns, Ordering::Relaxed);
                kick.push(i);
            }
        }
        if !kick.is_empty() {
            let threads = threads.lock().expect("vCPU threads lock");
            for i in kick {
                if let Some(Some(t)) = threads.get(i) {
                    let _ = t.kill(kick_signal());
                }
            }
        }
        let now = Instant::now();
        std::thread::sleep(next_tick.saturating_duration_since(now));
        next_tick = next_tick.max(now) + CPU_THROTTLE_PERIOD;
    }
}

#[cfg(test)]
mod pacer_tests {
    use super::*;

    #[test]
    fn kvm_pacer_holds_reports_to_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        // 64 pages at 1000 pages/s are due 64 ms after the start.
        assert_eq!(p.wait(64, 1000, t0), Duration::from_millis(64));
        // Reported late: less to wait; the debt is the total, not the last chunk.
        assert_eq!(
            p.wait(64, 1000, t0 + Duration::from_millis(100)),
            Duration::from_millis(28)
        );
        // Behind the rate: no wait, until the reports are ahead of it again.
        assert_eq!(
            p.wait(64, 1000, t0 + Duration::from_secs(1)),
            Duration::ZERO
        );
        assert_eq!(
            p.wait(64 * 20, 1000, t0 + Duration::from_secs(1)),
            Duration::from_millis(472)
        );
        // An idle pass is held on its own and counts no pages.
        assert_eq!(
            p.wait(0, 1000, t0 + Duration::from_secs(5)),
            guest::IDLE_PASS
        );
        assert_eq!(p.wait(8, 0, t0), Duration::ZERO);
    }

    #[test]
    fn kvm_pacer_holds_an_idle_pass_whatever_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        for rate in [0, 1, 1_000_000] {
            assert_eq!(p.wait(0, rate, t0), guest::IDLE_PASS);
        }
        assert_eq!(p.wait(1, 1_000_000, t0), Duration::from_micros(1));
    }
}
