//! Convergence: whether a migration is getting anywhere, what the source does about it,
//! and when it stops trying.
//!
//! After every pass the source hands [`Converge::after_pass`] what the pass moved and
//! what the guest dirtied meanwhile, and gets back its verdict:
//!
//! * **Stall detection.** A migration converges when the switchover it would take now
//!   fits the downtime limit, or the memory still to move keeps shrinking. One whose
//!   remainder stopped shrinking for [`STALL_PASSES`] passes while the switchover does
//!   not fit is *stalled*, and the verdict says so in words, with the figures (the
//!   guest's dirty rate, the link's rate, the downtime a switchover would cost).
//! * **Throttling, as QEMU's.** A pass in which the guest dirtied more than
//!   `throttle-trigger-threshold` percent of what the pass sent counts as one whose
//!   dirty rate is high; every second such pass steps the throttle. A pass longer
//!   than [`SYNC_PERIOD`] is judged period by period as well ([`Converge::after_period`]),
//!   so a slow link does not slow the throttle down with it. With
//!   `auto-converge` the step is the CPU throttle (`cpu-throttle-initial` the first
//!   time, then `cpu-throttle-increment` or, with `cpu-throttle-tailslow`, as much of it
//!   as the overshoot calls for, up to `max-cpu-throttle`); with `dirty-limit` the first
//!   step puts every vCPU under `vcpu-dirty-limit`, which slows only the vCPUs that
//!   write. The VMM carries the throttle out ([`super::vm::MigratableVm::set_vcpu_throttle`]).
//! * **A bounded outcome.** Past the migration's timeout (`x-ferry-timeout`, or
//!   `x-ferry-timeout-per-gib` of RAM) the strategy decides: `cancel` fails the migration
//!   with the stall's figures (the guest runs on at the source), `switchover` switches
//!   over if the downtime it would cost is at most `x-ferry-switchover-ceiling`, and
//!   fails as `cancel` does otherwise. Nothing runs for ever by default.
//!
//! The policy is a pure function of the figures it is given, so it is tested without a
//! VM ([`tests`]).

use std::time::{Duration, Instant};

use super::params::{human_bytes, MigrationParams, TimeoutStrategy};
use super::vm::VcpuThrottle;

/// Within a pass longer than this, the source harvests the dirty log and judges the
/// period as it judges a pass, so the throttle keeps stepping during long passes (a
/// pass over a slow link can take minutes). QEMU (since 9.2) syncs its dirty bitmap on
/// the same period while auto-converge throttles, for the same reason.
pub const SYNC_PERIOD: Duration = Duration::from_secs(5);

/// Passes without the remainder shrinking before a migration counts as stalled.
pub const STALL_PASSES: u32 = 3;

/// The remainder must fall below this share of the smallest seen so far to count as
/// shrinking (noise of a few pages is not progress).
const SHRINK: f64 = 0.95;

/// What a pass did, as the policy needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PassFigures {
    /// Bytes the pass put on the wire.
    pub sent: u64,
    /// Bytes of guest memory dirtied during the pass (what the next pass must send).
    pub dirtied: u64,
    /// How long the pass took.
    pub secs: f64,
    /// The downtime a switchover now would cost, in seconds (may be infinite).
    pub expected: f64,
    /// The downtime limit, in seconds.
    pub limit: f64,
    /// The link's rate, bytes per second (the best a pass of some size reached).
    pub link_rate: f64,
}

/// The policy's verdict after a pass.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Verdict {
    pub converging: bool,
    /// In words, with the figures, when not converging.
    pub why: Option<String>,
    /// A throttle to set now, if it changed.
    pub throttle: Option<VcpuThrottle>,
    /// The timeout passed: what to do.
    pub timeout: Option<TimeoutAction>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TimeoutAction {
    /// Fail with this message; the guest runs on at the source.
    Cancel(String),
    /// Switch over now and accept the downtime.
    Switchover,
}

/// The convergence policy of one migration.
#[derive(Debug)]
pub(crate) struct Converge {
    high_passes: u32,
    cpu_percent: u8,
    dirty_limit_on: bool,
    /// The dirty limit last set, to tell a change of its parameters.
    dirty_limit_set: Option<VcpuThrottle>,
    smallest_dirtied: Option<u64>,
    flat_passes: u32,
    /// What the last pass moved (none before the first pass ended).
    last: Option<PassFigures>,
    start: Instant,
    timeout: Duration,
}

impl Converge {
    /// A policy for a migration of `ram_bytes` of guest memory, started now.
    pub(crate) fn new(p: &MigrationParams, ram_bytes: u64) -> Self {
        Self {
            high_passes: 0,
            cpu_percent: 0,
            dirty_limit_on: false,
            dirty_limit_set: None,
            smallest_dirtied: None,
            flat_passes: 0,
            last: None,
            start: Instant::now(),
            timeout: p.timeout_for(ram_bytes),
        }
    }

    /// The CPU throttle in force, percent (0: none).
    pub(crate) fn cpu_percent(&self) -> u8 {
        self.cpu_percent
    }

    pub(crate) fn dirty_limit_on(&self) -> bool {
        self.dirty_limit_on
    }

    /// Whether a pass has ended (periods are judged from the second pass on).
    pub(crate) fn passed(&self) -> bool {
        self.last.is_some()
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The verdict after a pass, under the parameters in force now (they may change
    /// while the migration runs).
    pub(crate) fn after_pass(&mut self, p: &MigrationParams, f: &PassFigures) -> Verdict {
        self.after_pass_at(p, f, self.start.elapsed())
    }

    pub(crate) fn after_pass_at(
        &mut self,
        p: &MigrationParams,
        f: &PassFigures,
        elapsed: Duration,
    ) -> Verdict {
        let fits = f.expected <= f.limit;
        let shrinking = match self.smallest_dirtied {
            Some(s) => (f.dirtied as f64) < s as f64 * SHRINK,
            None => true,
        };
        self.smallest_dirtied = Some(
            self.smallest_dirtied
                .map_or(f.dirtied, |s| s.min(f.dirtied)),
        );
        if fits || shrinking {
            self.flat_passes = 0;
        } else {
            self.flat_passes += 1;
        }
        let converging = fits || self.flat_passes < STALL_PASSES;
        let why = (!converging).then(|| stall_message(f));

        self.last = Some(*f);
        let retuned = self.retune(p);
        let throttle = if fits {
            retuned
        } else {
            self.trigger(p, f.sent, f.dirtied).or(retuned)
        };

        let timeout = (elapsed >= self.timeout && !fits).then(|| match p.timeout_strategy {
            TimeoutStrategy::Switchover if f.expected <= p.switchover_ceiling.as_secs_f64() => {
                TimeoutAction::Switchover
            }
            _ => TimeoutAction::Cancel(self.cancel_message(p, f)),
        });
        Verdict {
            converging,
            why,
            throttle,
            timeout,
        }
    }

    /// Why the timeout cancels, with the stall's figures and what to change.
    fn cancel_message(&self, p: &MigrationParams, f: &PassFigures) -> String {
        let over = match p.timeout_strategy {
            TimeoutStrategy::Switchover => format!(
                "; the switchover would need {:.1} s, over x-ferry-switchover-ceiling ({} ms)",
                f.expected,
                p.switchover_ceiling.as_millis()
            ),
            TimeoutStrategy::Cancel => String::new(),
        };
        let advice = if p.dirty_limit {
            "Lower vcpu-dirty-limit"
        } else if p.auto_converge {
            "Raise cpu-throttle-initial or cpu-throttle-increment, or use dirty-limit"
        } else {
            "Turn on auto-converge or dirty-limit"
        };
        format!(
            "the migration did not converge within its timeout of {} s ({}{over}); \
             the guest runs on here. {advice}, raise downtime-limit or \
             max-bandwidth, or set x-ferry-timeout-strategy=switchover",
            self.timeout.as_secs(),
            stall_message(f)
        )
    }

    /// The verdict on a period within a long pass ([`SYNC_PERIOD`] of it, its dirty log
    /// harvested at the period's end): the throttle may step, as after a pass, and the
    /// timeout cancels. Nothing is judged before the first pass ended, nor while the
    /// last pass's switchover fitted (the pass underway then is one of the last).
    /// Switching over on the timeout waits for the pass's end.
    pub(crate) fn after_period(&mut self, p: &MigrationParams, sent: u64, dirtied: u64) -> Verdict {
        self.after_period_at(p, sent, dirtied, self.start.elapsed())
    }

    pub(crate) fn after_period_at(
        &mut self,
        p: &MigrationParams,
        sent: u64,
        dirtied: u64,
        elapsed: Duration,
    ) -> Verdict {
        let mut v = Verdict {
            converging: true,
            why: None,
            throttle: None,
            timeout: None,
        };
        let Some(last) = self.last else {
            return v;
        };
        if last.expected <= last.limit {
            return v;
        }
        v.converging = self.flat_passes < STALL_PASSES;
        v.why = (!v.converging).then(|| stall_message(&last));
        let retuned = self.retune(p);
        v.throttle = self.trigger(p, sent, dirtied).or(retuned);
        if elapsed >= self.timeout && p.timeout_strategy == TimeoutStrategy::Cancel {
            v.timeout = Some(TimeoutAction::Cancel(self.cancel_message(p, &last)));
        }
        v
    }

    /// QEMU's trigger: the guest dirtied more than `throttle-trigger-threshold` percent
    /// of what was sent, in two passes or periods (not necessarily in a row), steps the
    /// throttle.
    fn trigger(&mut self, p: &MigrationParams, sent: u64, dirtied: u64) -> Option<VcpuThrottle> {
        let threshold = sent as f64 * f64::from(p.throttle_trigger_threshold) / 100.0;
        if !(p.auto_converge || p.dirty_limit) || dirtied as f64 <= threshold {
            return None;
        }
        self.high_passes += 1;
        if self.high_passes < 2 {
            return None;
        }
        self.high_passes = 0;
        self.step(p, dirtied as f64, threshold)
    }

    /// A throttle in force whose parameters changed while the migration runs takes
    /// them at once: a new dirty limit or period, a lower `max-cpu-throttle`.
    fn retune(&mut self, p: &MigrationParams) -> Option<VcpuThrottle> {
        if self.dirty_limit_on {
            let want = dirty_limit(p);
            if Some(want) != self.dirty_limit_set {
                self.dirty_limit_set = Some(want);
                return Some(want);
            }
        } else if self.cpu_percent > p.max_cpu_throttle {
            self.cpu_percent = p.max_cpu_throttle;
            return Some(VcpuThrottle::Cpu {
                percent: self.cpu_percent,
            });
        }
        None
    }

    /// One step of the throttle; `None` when it is already as hard as it goes.
    fn step(&mut self, p: &MigrationParams, dirtied: f64, threshold: f64) -> Option<VcpuThrottle> {
        if p.dirty_limit {
            if self.dirty_limit_on {
                return None;
            }
            self.dirty_limit_on = true;
            let t = dirty_limit(p);
            self.dirty_limit_set = Some(t);
            return Some(t);
        }
        let max = p.max_cpu_throttle;
        let next = if self.cpu_percent == 0 {
            p.cpu_throttle_initial.min(max)
        } else {
            let inc = if p.cpu_throttle_tailslow {
                // As much of the increment as the overshoot calls for: the share of
                // CPU the guest keeps, scaled by how far the dirtying overshot.
                let cpu_now = f64::from(100 - self.cpu_percent);
                let ideal = cpu_now * (threshold / dirtied.max(1.0));
                ((cpu_now - ideal).max(1.0) as u8).min(p.cpu_throttle_increment)
            } else {
                p.cpu_throttle_increment
            };
            self.cpu_percent.saturating_add(inc).min(max)
        };
        if next == self.cpu_percent {
            return None;
        }
        self.cpu_percent = next;
        Some(VcpuThrottle::Cpu { percent: next })
    }
}

fn dirty_limit(p: &MigrationParams) -> VcpuThrottle {
    VcpuThrottle::DirtyLimit {
        bytes_per_sec: p.vcpu_dirty_limit_mbps * 1_000_000,
        period: p.vcpu_dirty_limit_period,
    }
}

/// "guest dirties 11.5 MiB/s, link moves 11.7 MiB/s: at this rate the switchover needs
/// 8.7 s (downtime-limit 300 ms)". The guest's rate is of distinct pages left dirty per
/// second of the pass, what the next pass must carry: a guest that rewrites the same
/// pages faster shows no higher figure, as it costs the migration no more.
fn stall_message(f: &PassFigures) -> String {
    let rate = |b: f64| format!("{}/s", human_bytes(b.max(0.0) as u64));
    let dirty_rate = f.dirtied as f64 / f.secs.max(1e-6);
    let needs = if f.expected.is_finite() {
        format!("{:.1} s", f.expected)
    } else {
        "longer than any limit".into()
    };
    format!(
        "guest dirties {} of distinct pages, link moves {}: at this rate the switchover \
         needs {needs} (downtime-limit {} ms)",
        rate(dirty_rate),
        rate(f.link_rate),
        (f.limit * 1e3).round() as u64
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(dirtied: u64, expected: f64) -> PassFigures {
        PassFigures {
            sent: 100 << 20,
            dirtied,
            secs: 1.0,
            expected,
            limit: 0.3,
            link_rate: 100.0 * 1024.0 * 1024.0,
        }
    }

    fn params() -> MigrationParams {
        MigrationParams::default()
    }

    #[test]
    fn a_shrinking_remainder_converges_and_a_flat_one_stalls_with_figures() {
        let p = params();
        let mut c = Converge::new(&p, 1 << 30);
        for d in [80u64, 60, 40] {
            let v = c.after_pass_at(&p, &figures(d << 20, 2.0), Duration::ZERO);
            assert!(v.converging && v.why.is_none(), "{v:?}");
        }
        let mut last = None;
        for _ in 0..STALL_PASSES {
            last = Some(c.after_pass_at(&p, &figures(40 << 20, 2.0), Duration::ZERO));
        }
        let v = last.unwrap();
        assert!(!v.converging);
        let why = v.why.unwrap();
        assert!(
            why.contains("guest dirties 40.0 MiB/s of distinct pages"),
            "{why}"
        );
        assert!(why.contains("link moves 100.0 MiB/s"), "{why}");
        assert!(why.contains("needs 2.0 s (downtime-limit 300 ms)"), "{why}");
        // Fitting the limit is converging, whatever the trend.
        let v = c.after_pass_at(&p, &figures(40 << 20, 0.2), Duration::ZERO);
        assert!(v.converging);
    }

    #[test]
    fn auto_converge_steps_as_qemu_does() {
        let mut p = params();
        p.auto_converge = true;
        let mut c = Converge::new(&p, 1 << 30);
        let high = figures(90 << 20, 5.0); // 90% of what was sent: over the 50% threshold
        let mut steps = Vec::new();
        for _ in 0..20 {
            if let Some(VcpuThrottle::Cpu { percent }) =
                c.after_pass_at(&p, &high, Duration::ZERO).throttle
            {
                steps.push(percent);
            }
        }
        // Every second high pass: 20, then +10 each time, up to max-cpu-throttle (99).
        assert_eq!(steps, [20, 30, 40, 50, 60, 70, 80, 90, 99]);
        // A low dirty rate never throttles.
        let mut c = Converge::new(&p, 1 << 30);
        for _ in 0..10 {
            assert!(c
                .after_pass_at(&p, &figures(10 << 20, 5.0), Duration::ZERO)
                .throttle
                .is_none());
        }
        // Nor does a pass whose switchover fits.
        for _ in 0..10 {
            assert!(c
                .after_pass_at(&p, &figures(90 << 20, 0.1), Duration::ZERO)
                .throttle
                .is_none());
        }
    }

    #[test]
    fn periods_of_a_long_pass_step_the_throttle_between_passes() {
        let mut p = params();
        p.auto_converge = true;
        let mut c = Converge::new(&p, 1 << 30);
        let high = figures(90 << 20, 5.0);
        // Nothing is judged before the first pass ended.
        let v = c.after_period_at(&p, 10 << 20, 9 << 20, Duration::ZERO);
        assert_eq!(v.throttle, None);
        c.after_pass_at(&p, &high, Duration::ZERO);
        // One high pass, then periods of 5 s in which the guest dirtied 90% of what
        // went out: the second high one steps, and so on every second.
        let mut steps = Vec::new();
        for _ in 0..7 {
            if let Some(VcpuThrottle::Cpu { percent }) = c
                .after_period_at(&p, 60 << 20, 54 << 20, Duration::ZERO)
                .throttle
            {
                steps.push(percent);
            }
        }
        assert_eq!(steps, [20, 30, 40, 50]);
        // A period in which the guest dirtied little does not count.
        let v = c.after_period_at(&p, 60 << 20, 6 << 20, Duration::ZERO);
        assert_eq!(v.throttle, None);
        assert_eq!(c.cpu_percent(), 50);
        // Once a pass fitted the limit, the pass after it is one of the last: its
        // periods are left alone.
        c.after_pass_at(&p, &figures(90 << 20, 0.1), Duration::ZERO);
        for _ in 0..4 {
            let v = c.after_period_at(&p, 60 << 20, 54 << 20, Duration::ZERO);
            assert_eq!(v.throttle, None);
        }
    }

    #[test]
    fn the_timeout_cancels_within_a_long_pass_but_a_switchover_waits_for_its_end() {
        let mut p = params();
        p.timeout = Some(Duration::from_secs(10));
        let mut c = Converge::new(&p, 1 << 30);
        let f = figures(40 << 20, 2.0);
        c.after_pass_at(&p, &f, Duration::from_secs(1));
        let at = |c: &mut Converge, p: &MigrationParams, secs| {
            c.after_period_at(p, 1 << 20, 1 << 20, Duration::from_secs(secs))
                .timeout
        };
        assert_eq!(at(&mut c, &p, 9), None);
        match at(&mut c, &p, 10) {
            Some(TimeoutAction::Cancel(m)) => {
                assert!(m.contains("within its timeout of 10 s"), "{m}");
                assert!(m.contains("guest dirties 40.0 MiB/s"), "{m}");
            }
            v => panic!("{v:?}"),
        }
        p.timeout_strategy = TimeoutStrategy::Switchover;
        p.switchover_ceiling = Duration::from_secs(3);
        assert_eq!(at(&mut c, &p, 10), None);
    }

    #[test]
    fn tailslow_steps_by_the_overshoot_and_max_caps() {
        let mut p = params();
        p.auto_converge = true;
        p.cpu_throttle_tailslow = true;
        p.max_cpu_throttle = 45;
        let mut c = Converge::new(&p, 1 << 30);
        // Dirtied 55% of sent against a 50% threshold: a small overshoot.
        let f = figures(55 << 20, 5.0);
        let mut steps = Vec::new();
        for _ in 0..12 {
            if let Some(VcpuThrottle::Cpu { percent }) =
                c.after_pass_at(&p, &f, Duration::ZERO).throttle
            {
                steps.push(percent);
            }
        }
        assert_eq!(steps[0], 20);
        // 80% CPU kept; ideal 80 * 50/55 = 72.7: a step of 7, not the increment's 10.
        assert_eq!(steps[1], 27);
        assert_eq!(*steps.last().unwrap(), 45, "{steps:?}");
    }

    #[test]
    fn dirty_limit_is_set_once_with_the_parameters() {
        let mut p = params();
        p.dirty_limit = true;
        p.vcpu_dirty_limit_mbps = 5;
        let mut c = Converge::new(&p, 1 << 30);
        let high = figures(90 << 20, 5.0);
        let set: Vec<_> = (0..8)
            .filter_map(|_| c.after_pass_at(&p, &high, Duration::ZERO).throttle)
            .collect();
        assert_eq!(
            set,
            [VcpuThrottle::DirtyLimit {
                bytes_per_sec: 5_000_000,
                period: Duration::from_millis(1000)
            }]
        );
        assert!(c.dirty_limit_on());
        // A new limit while it runs is taken at the next pass, once.
        p.vcpu_dirty_limit_mbps = 2;
        let low = figures(10 << 20, 5.0);
        assert_eq!(
            c.after_pass_at(&p, &low, Duration::ZERO).throttle,
            Some(VcpuThrottle::DirtyLimit {
                bytes_per_sec: 2_000_000,
                period: Duration::from_millis(1000)
            })
        );
        assert_eq!(c.after_pass_at(&p, &low, Duration::ZERO).throttle, None);
    }

    #[test]
    fn a_lower_max_cpu_throttle_applies_at_the_next_pass() {
        let mut p = params();
        p.auto_converge = true;
        p.cpu_throttle_initial = 60;
        let mut c = Converge::new(&p, 1 << 30);
        let high = figures(90 << 20, 5.0);
        c.after_pass_at(&p, &high, Duration::ZERO);
        assert_eq!(
            c.after_pass_at(&p, &high, Duration::ZERO).throttle,
            Some(VcpuThrottle::Cpu { percent: 60 })
        );
        p.max_cpu_throttle = 40;
        assert_eq!(
            c.after_pass_at(&p, &figures(10 << 20, 5.0), Duration::ZERO)
                .throttle,
            Some(VcpuThrottle::Cpu { percent: 40 })
        );
    }

    #[test]
    fn the_timeout_cancels_or_switches_over_under_the_ceiling() {
        let mut p = params();
        p.timeout = Some(Duration::from_secs(10));
        let mut c = Converge::new(&p, 1 << 30);
        let f = figures(40 << 20, 2.0);
        assert_eq!(
            c.after_pass_at(&p, &f, Duration::from_secs(9)).timeout,
            None
        );
        match c.after_pass_at(&p, &f, Duration::from_secs(10)).timeout {
            Some(TimeoutAction::Cancel(m)) => {
                assert!(
                    m.contains("did not converge within its timeout of 10 s"),
                    "{m}"
                );
                assert!(m.contains("guest dirties"), "{m}");
                assert!(m.contains("Turn on auto-converge or dirty-limit"), "{m}");
            }
            v => panic!("{v:?}"),
        }
        // The advice fits what is already on.
        let mut on = p.clone();
        on.auto_converge = true;
        let mut c2 = Converge::new(&on, 1 << 30);
        match c2.after_pass_at(&on, &f, Duration::from_secs(10)).timeout {
            Some(TimeoutAction::Cancel(m)) => {
                assert!(m.contains("Raise cpu-throttle-initial"), "{m}");
                assert!(!m.contains("Turn on auto-converge"), "{m}");
            }
            v => panic!("{v:?}"),
        }
        p.timeout_strategy = TimeoutStrategy::Switchover;
        p.switchover_ceiling = Duration::from_secs(3);
        assert_eq!(
            c.after_pass_at(&p, &f, Duration::from_secs(10)).timeout,
            Some(TimeoutAction::Switchover)
        );
        p.switchover_ceiling = Duration::from_secs(1);
        match c.after_pass_at(&p, &f, Duration::from_secs(10)).timeout {
            Some(TimeoutAction::Cancel(m)) => assert!(
                m.contains("over x-ferry-switchover-ceiling (1000 ms)"),
                "{m}"
            ),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn the_default_timeout_grows_with_ram() {
        let p = params();
        assert_eq!(Converge::new(&p, 0).timeout(), Duration::from_secs(300));
        assert_eq!(
            Converge::new(&p, 4 << 30).timeout(),
            Duration::from_secs(600)
        );
        assert_eq!(
            Converge::new(&p, 16 << 30).timeout(),
            Duration::from_secs(2400)
        );
    }
}
