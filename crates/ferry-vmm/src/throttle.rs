//! The vCPU throttle ([`MigratableVm::set_vcpu_throttle`]) as both backends keep it.
//!
//! The engine picks the throttle; the VMM holds vCPU threads back, in the threads
//! themselves (a sleep between guest work), and counts what that cost each vCPU. Two
//! kinds, as QEMU's:
//!
//! - **CPU throttle** (auto-converge): every vCPU sleeps `percent` of each
//!   [`CPU_THROTTLE_PERIOD`] (10 ms) and runs the rest, whatever it does.
//! - **Dirty-limit**: each vCPU's dirty rate is measured; only a vCPU that dirties
//!   faster than the limit is slowed, to the limit. The soft backend's vCPUs are the
//!   writers and pace themselves page by page ([`SoftThrottle`]); on KVM the rate comes
//!   from each vCPU's dirty ring and a controller sets the share of time the vCPU sleeps
//!   ([`next_run_fraction`], see `kvm/throttle.rs`).
//!
//! [`MigratableVm::set_vcpu_throttle`]: ferry_migration::engine::vm::MigratableVm::set_vcpu_throttle

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_migration::engine::vm::{VcpuThrottle, VcpuThrottleStats, VmError, CPU_THROTTLE_PERIOD};
use ferry_migration::PAGE_SIZE;

/// How long a dirty rate is measured over when no dirty-limit says (and the shortest a
/// KVM measurement is taken over).
pub const RATE_WINDOW: Duration = Duration::from_millis(250);

/// Refuses a throttle that cannot be carried out, naming what is wrong.
pub fn check(throttle: VcpuThrottle) -> Result<(), VmError> {
    match throttle {
        VcpuThrottle::Cpu { percent } if !(1..=99).contains(&percent) => Err(VmError::Failed(
            format!("a CPU throttle of {percent}%: it must be between 1 and 99"),
        )),
        VcpuThrottle::DirtyLimit {
            bytes_per_sec,
            period,
        } if bytes_per_sec == 0 || period.is_zero() => Err(VmError::Failed(format!(
            "a dirty limit of {bytes_per_sec} bytes/s over {period:?}: both must be non-zero"
        ))),
        _ => Ok(()),
    }
}

/// What throttling cost one vCPU, and its dirty rate as last measured.
#[derive(Debug)]
pub struct VcpuCounters {
    throttled_ns: AtomicU64,
    /// Bytes per second; `u64::MAX` while not measured.
    dirty_rate: AtomicU64,
}

impl Default for VcpuCounters {
    fn default() -> Self {
        Self {
            throttled_ns: AtomicU64::new(0),
            dirty_rate: AtomicU64::new(u64::MAX),
        }
    }
}

impl VcpuCounters {
    pub fn add_throttled(&self, d: Duration) {
        self.throttled_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        self.dirty_rate
            .store(bytes_per_sec.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn rate(&self) -> Option<u64> {
        match self.dirty_rate.load(Ordering::Relaxed) {
            u64::MAX => None,
            r => Some(r),
        }
    }

    pub fn stats(&self) -> VcpuThrottleStats {
        VcpuThrottleStats {
            throttled: Duration::from_nanos(self.throttled_ns.load(Ordering::Relaxed)),
            dirty_rate: self.rate(),
        }
    }
}

/// The throttle a VM is under, with a generation so that a vCPU thread notices a change
/// with one atomic load.
#[derive(Debug)]
pub struct ThrottleSetting {
    mode: Mutex<VcpuThrottle>,
    generation: AtomicU64,
}

impl Default for ThrottleSetting {
    fn default() -> Self {
        Self {
            mode: Mutex::new(VcpuThrottle::None),
            generation: AtomicU64::new(0),
        }
    }
}

impl ThrottleSetting {
    pub fn set(&self, throttle: VcpuThrottle) {
        *self.mode.lock().expect("throttle lock") = throttle;
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn get(&self) -> VcpuThrottle {
        *self.mode.lock().expect("throttle lock")
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// The window a rate is measured over under `throttle`.
pub fn rate_window(throttle: VcpuThrottle) -> Duration {
    match throttle {
        VcpuThrottle::DirtyLimit { period, .. } => period,
        _ => RATE_WINDOW,
    }
}

/// A soft vCPU's throttle: called after each piece of guest work with the pages it
/// wrote, it measures the vCPU's dirty rate and says how long to hold the vCPU now.
#[derive(Debug)]
pub struct SoftThrottle {
    generation: u64,
    mode: VcpuThrottle,
    /// CPU throttle: when the vCPU last started running.
    run_start: Instant,
    /// Dirty-limit: the current window and the pages written in it.
    limit_start: Instant,
    limit_pages: u64,
    /// Rate measurement.
    rate_start: Instant,
    rate_pages: u64,
}

impl SoftThrottle {
    pub fn new(now: Instant) -> Self {
        Self {
            generation: u64::MAX,
            mode: VcpuThrottle::None,
            run_start: now,
            limit_start: now,
            limit_pages: 0,
            rate_start: now,
            rate_pages: 0,
        }
    }

    /// After the vCPU wrote `pages` (0 for work that writes nothing), at `now`: records
    /// them, publishes its rate in `counters` at the end of each window, and returns how
    /// long to hold it. Call [`SoftThrottle::resumed`] after holding it.
    pub fn account(
        &mut self,
        pages: u64,
        setting: &ThrottleSetting,
        counters: &VcpuCounters,
        now: Instant,
    ) -> Duration {
        let generation = setting.generation();
        if generation != self.generation {
            self.generation = generation;
            self.mode = setting.get();
            self.run_start = now;
            self.limit_start = now;
            self.limit_pages = 0;
        }
        self.rate_pages += pages;
        let measured = now.saturating_duration_since(self.rate_start);
        if measured >= rate_window(self.mode) {
            let bytes = self.rate_pages * PAGE_SIZE as u64;
            counters.set_rate(Some((bytes as f64 / measured.as_secs_f64()) as u64));
            self.rate_start = now;
            self.rate_pages = 0;
        }
        match self.mode {
            VcpuThrottle::Cpu { percent } => {
                // Hold in proportion to the time run since the last hold, so the share
                // is exact however late this check comes (a thread that ran 2.5 ms
                // at 99% is held 247.5 ms, not one period's 9.9 ms).
                let p = u32::from(percent.min(99));
                let run = CPU_THROTTLE_PERIOD * (100 - p) / 100;
                let ran = now.saturating_duration_since(self.run_start);
                if ran >= run {
                    ran * p / (100 - p)
                } else {
                    Duration::ZERO
                }
            }
            VcpuThrottle::DirtyLimit {
                bytes_per_sec,
                period,
            } => {
                // Pages are due at the limit from the start of the window; a window
                // starts afresh each period, so a vCPU that was idle gets no burst.
                if now.saturating_duration_since(self.limit_start) >= period {
                    self.limit_start = now;
                    self.limit_pages = 0;
                }
                self.limit_pages += pages;
                let due = self.limit_start
                    + Duration::from_secs_f64(
                        (self.limit_pages * PAGE_SIZE as u64) as f64 / bytes_per_sec as f64,
                    );
                due.saturating_duration_since(now)
            }
            _ => Duration::ZERO,
        }
    }

    /// The vCPU runs again after a hold.
    pub fn resumed(&mut self, now: Instant) {
        self.run_start = now;
    }
}

/// Dirty-limit control on a vCPU that is not its own writer (KVM): it ran `run` (0 to 1)
/// of the last period and dirtied `rate` bytes/s then; the share of the next period it
/// may run so that it dirties `limit` bytes/s, if dirtying goes with running time.
///
/// The steps are lopsided, as a limit that must hold calls for: down by the whole ratio
/// (at most sixteenfold a period), so a writer is held near the limit within a period
/// or two of the limit coming on; up damped (the square root of the ratio, at most 1.5
/// times a period; twice for a period without a write), because a vCPU that runs less
/// leaves the host's cores to the others and dirties faster while it runs, and an
/// eager step up overshoots: the limit was seen exceeded two- to fivefold with a
/// symmetric fourfold step. A vCPU that never writes is never held.
pub fn next_run_fraction(run: f64, rate: u64, limit: u64) -> f64 {
    const MIN_RUN: f64 = 0.005;
    if rate == 0 {
        return (run * 2.0).clamp(MIN_RUN, 1.0);
    }
    let ratio = limit as f64 / rate as f64;
    let target = if ratio < 1.0 {
        (run * ratio).max(run / 16.0)
    } else {
        (run * ratio.sqrt()).min(run * 1.5)
    };
    target.clamp(MIN_RUN, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn throttle_check_refuses_what_cannot_be_done() {
        assert!(check(VcpuThrottle::Cpu { percent: 0 }).is_err());
        assert!(check(VcpuThrottle::Cpu { percent: 100 }).is_err());
        assert!(check(VcpuThrottle::Cpu { percent: 99 }).is_ok());
        assert!(check(VcpuThrottle::DirtyLimit {
            bytes_per_sec: 0,
            period: MS
        })
        .is_err());
        assert!(check(VcpuThrottle::None).is_ok());
    }

    #[test]
    fn soft_cpu_throttle_holds_its_share_of_each_period() {
        let (setting, counters) = (ThrottleSetting::default(), VcpuCounters::default());
        setting.set(VcpuThrottle::Cpu { percent: 30 });
        let t0 = Instant::now();
        let mut t = SoftThrottle::new(t0);
        assert_eq!(t.account(64, &setting, &counters, t0), Duration::ZERO);
        assert_eq!(
            t.account(64, &setting, &counters, t0 + 6 * MS),
            Duration::ZERO
        );
        // 7 ms of 10 run: hold 3.
        assert_eq!(t.account(64, &setting, &counters, t0 + 7 * MS), 3 * MS);
        t.resumed(t0 + 10 * MS);
        assert_eq!(
            t.account(64, &setting, &counters, t0 + 12 * MS),
            Duration::ZERO
        );
        setting.set(VcpuThrottle::None);
        assert_eq!(
            t.account(64, &setting, &counters, t0 + 40 * MS),
            Duration::ZERO
        );
    }

    #[test]
    fn soft_dirty_limit_holds_only_a_vcpu_over_it() {
        let (setting, counters) = (ThrottleSetting::default(), VcpuCounters::default());
        // 100 pages a second.
        setting.set(VcpuThrottle::DirtyLimit {
            bytes_per_sec: 100 * 4096,
            period: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        let mut t = SoftThrottle::new(t0);
        // 50 pages at once are due 0.5 s into the window.
        assert_eq!(t.account(50, &setting, &counters, t0), 500 * MS);
        // No writes: nothing to hold.
        let mut idle = SoftThrottle::new(t0);
        assert_eq!(idle.account(0, &setting, &counters, t0), Duration::ZERO);
        // Slower than the limit: no hold.
        assert_eq!(
            t.account(10, &setting, &counters, t0 + 900 * MS),
            Duration::ZERO
        );
        // A new window forgets the old.
        assert_eq!(t.account(10, &setting, &counters, t0 + 1000 * MS), 100 * MS);
        // The rate of the first window (60 pages in 1 s) was published.
        assert_eq!(counters.rate(), Some(70 * 4096));
    }

    #[test]
    fn next_run_fraction_moves_toward_the_limit_in_bounded_steps() {
        // Down by the whole ratio, at most sixteenfold.
        assert!((next_run_fraction(1.0, 200, 100) - 0.5).abs() < 1e-9);
        assert!((next_run_fraction(1.0, 1600, 100) - 1.0 / 16.0).abs() < 1e-9);
        assert!((next_run_fraction(1.0, 100 << 20, 1 << 20) - 1.0 / 16.0).abs() < 1e-9);
        // Up by the square root, at most 1.5 times.
        assert!((next_run_fraction(0.25, 100, 121) - 0.25 * 1.1).abs() < 1e-9);
        assert!((next_run_fraction(0.125, 100, 1600) - 0.1875).abs() < 1e-9);
        assert!(next_run_fraction(0.5, 90, 100) > 0.5);
        assert_eq!(next_run_fraction(0.5, 100, 100), 0.5);
        // A period without a write doubles the share; one that never writes runs free.
        assert!((next_run_fraction(0.1, 0, 100) - 0.2).abs() < 1e-9);
        assert_eq!(next_run_fraction(1.0, 0, 100), 1.0);
        assert_eq!(next_run_fraction(0.005, 1 << 40, 1), 0.005);
    }
}
