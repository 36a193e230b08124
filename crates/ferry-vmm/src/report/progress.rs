//! The guest's own progress around a migration: how fast its workload ran before the
//! migration, while it migrated and after, at the destination.
//!
//! A migration's speed is only half its cost; the other half is what the guest loses
//! while it moves: auto-converge and the dirty limit slow its vCPUs, and page tracking
//! costs it some speed even without them. `ferry migrate` reads the guest's pass
//! counters (`x-ferry-guest`) as it polls `query-migrate`, and this module turns those
//! readings into rates: passes per second over each interval between two readings, and
//! one figure for each of before, during and after.
//!
//! Times are milliseconds from the migration's start (the reading taken just before the
//! `migrate` command), negative for the baseline before it.

use serde_json::{json, Value};

/// One reading of the guest's pass counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Milliseconds from the migration's start; negative in the baseline.
    pub t_ms: f64,
    /// The guest's pass counters, summed over its vCPUs.
    pub passes: u64,
    /// The CPU throttle auto-converge had set at the time, percent.
    pub throttle_pct: u8,
    /// The dirty limit was on at the time.
    pub dirty_limited: bool,
}

/// Where an interval between two readings lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the migration started (the baseline).
    Before,
    /// While it migrated, at the source.
    During,
    /// After it, at the destination.
    After,
}

/// The guest's rate over the time between two readings of the same VM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub from_ms: f64,
    pub to_ms: f64,
    /// Passes per second over the interval.
    pub rate: f64,
    /// The throttle at the interval's end.
    pub throttle_pct: u8,
    pub dirty_limited: bool,
    pub phase: Phase,
}

/// The guest's pass counters read before, during and after a migration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestProgress {
    /// Readings at the source before the migration, oldest first; the last one is the
    /// migration's start.
    pub before: Vec<Sample>,
    /// Readings at the source from the migration's start (the same reading as the last
    /// of `before`, when there is a baseline) until it ended.
    pub during: Vec<Sample>,
    /// How long the guest ran at the source during the migration, ms: a completed
    /// migration's total time less its downtime. None: the time between the first and
    /// the last reading (the guest never stopped for good).
    pub live_ms: Option<f64>,
    /// Readings at the destination after the migration.
    pub after: Vec<Sample>,
    /// Why the guest was not measured at all, when it was not.
    pub unmeasured: Option<String>,
    /// Why there is no baseline, when there is none.
    pub before_note: Option<String>,
    /// Why there are no readings after, when there are none.
    pub after_note: Option<String>,
}

/// Passes per second from the first to the last of `s`.
fn rate(s: &[Sample]) -> Option<f64> {
    let (first, last) = (s.first()?, s.last()?);
    let ms = last.t_ms - first.t_ms;
    (ms > 0.0).then(|| last.passes.saturating_sub(first.passes) as f64 * 1e3 / ms)
}

impl GuestProgress {
    /// Passes per second in the baseline.
    pub fn before_rate(&self) -> Option<f64> {
        rate(&self.before)
    }

    /// Passes per second while the guest ran at the source during the migration.
    pub fn during_rate(&self) -> Option<f64> {
        let (first, last) = (self.during.first()?, self.during.last()?);
        if self.during.len() < 2 {
            return None;
        }
        let ms = self.live_ms.unwrap_or(last.t_ms - first.t_ms);
        (ms > 0.0).then(|| last.passes.saturating_sub(first.passes) as f64 * 1e3 / ms)
    }

    /// Passes per second at the destination after the migration.
    pub fn after_rate(&self) -> Option<f64> {
        rate(&self.after)
    }

    /// The rate during the migration as a percentage of the rate before: what the
    /// guest kept of its speed.
    pub fn during_share(&self) -> Option<f64> {
        let before = self.before_rate().filter(|b| *b > 0.0)?;
        Some(self.during_rate()? / before * 100.0)
    }

    /// When the migration ended on the readings' time axis (its last reading).
    pub fn end_ms(&self) -> f64 {
        self.during.last().map_or(0.0, |s| s.t_ms)
    }

    /// The rate over every interval between two readings of the same VM: the source's
    /// from the first baseline reading to the migration's end, then the destination's.
    pub fn intervals(&self) -> Vec<Interval> {
        let mut source: Vec<Sample> = self.before.clone();
        let skip = usize::from(
            matches!((source.last(), self.during.first()), (Some(a), Some(b)) if a == b),
        );
        source.extend(self.during.iter().skip(skip));
        let mut out = Vec::new();
        let mut add = |s: &[Sample], phase: &dyn Fn(f64) -> Phase| {
            for w in s.windows(2) {
                let ms = w[1].t_ms - w[0].t_ms;
                if ms <= 0.0 {
                    continue;
                }
                out.push(Interval {
                    from_ms: w[0].t_ms,
                    to_ms: w[1].t_ms,
                    rate: w[1].passes.saturating_sub(w[0].passes) as f64 * 1e3 / ms,
                    throttle_pct: w[1].throttle_pct,
                    dirty_limited: w[1].dirty_limited,
                    phase: phase(w[1].t_ms),
                });
            }
        };
        add(&source, &|t| {
            if t <= 0.0 {
                Phase::Before
            } else {
                Phase::During
            }
        });
        add(&self.after, &|_| Phase::After);
        out
    }

    /// The figures as `ferry migrate --json` gives them under `guest-progress`.
    pub fn to_json(&self) -> Value {
        let r = |v: Option<f64>| v.map(|v| (v * 10.0).round() / 10.0);
        let samples: Vec<Value> = self
            .intervals()
            .iter()
            .map(|i| {
                json!([
                    i.to_ms.round() as i64,
                    (i.rate * 10.0).round() / 10.0,
                    i.throttle_pct,
                    i.dirty_limited
                ])
            })
            .collect();
        let mut v = json!({
            "before": r(self.before_rate()),
            "during": r(self.during_rate()),
            "during-share": r(self.during_share()),
            "after": r(self.after_rate()),
            "migration-ms": self.end_ms().round() as i64,
            "samples": samples,
        });
        for (key, note) in [
            ("not-measured", self.unmeasured.as_ref()),
            ("before-note", self.before_note.as_ref()),
            ("after-note", self.after_note.as_ref()),
        ] {
            if let Some(n) = note {
                v[key] = json!(n);
            }
        }
        v
    }

    /// `412 passes/s before, 188/s during (46% of before), 405/s after`, or what was
    /// not measured and why.
    pub fn summary_line(&self) -> String {
        if let Some(why) = &self.unmeasured {
            return format!("not measured: {why}");
        }
        let mut parts = Vec::new();
        let mut unit = " passes/s";
        let mut figure = |rate: Option<f64>, what: &str, note: Option<&String>| match rate {
            Some(v) => {
                let s = format!("{}{unit} {what}", fmt_passes(v));
                unit = "/s";
                s
            }
            None => format!(
                "{what}: not measured{}",
                note.map(|n| format!(" ({n})")).unwrap_or_default()
            ),
        };
        parts.push(figure(
            self.before_rate(),
            "before",
            self.before_note.as_ref(),
        ));
        let mut during = figure(self.during_rate(), "during", None);
        if let Some(share) = self.during_share() {
            during.push_str(&format!(" ({share:.0}% of before)"));
        }
        parts.push(during);
        parts.push(figure(self.after_rate(), "after", self.after_note.as_ref()));
        parts.join(", ")
    }
}

/// `1994`, `412`, `37.5`, `0.8`: whole passes from 100 on, a decimal below.
pub fn fmt_passes(v: f64) -> String {
    if !v.is_finite() || v <= 0.0 {
        "0".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn s(t_ms: f64, passes: u64, throttle_pct: u8) -> Sample {
        Sample {
            t_ms,
            passes,
            throttle_pct,
            dirty_limited: false,
        }
    }

    /// 400 passes/s for a second before; 200/s for 2 s during, throttled 20% then 40%,
    /// the last 100 ms of it stopped; 400/s at the destination.
    pub(crate) fn throttled() -> GuestProgress {
        let before: Vec<Sample> = (0..=10u32)
            .map(|i| s(-1000.0 + 100.0 * f64::from(i), 40 * u64::from(i), 0))
            .collect();
        let mut during = vec![before[10]];
        for i in 1..=19u32 {
            let pct = if i < 10 { 20 } else { 40 };
            during.push(s(100.0 * f64::from(i), 400 + 20 * u64::from(i), pct));
        }
        // The guest stopped at 1.9 s; the migration ended at 2 s.
        during.push(s(2000.0, 780, 40));
        let after = (0..=10u32)
            .map(|i| s(2200.0 + 100.0 * f64::from(i), 780 + 40 * u64::from(i), 0))
            .collect();
        GuestProgress {
            before,
            during,
            live_ms: Some(1900.0),
            after,
            ..GuestProgress::default()
        }
    }

    #[test]
    fn the_rates_and_the_share() {
        let g = throttled();
        assert_eq!(g.before_rate(), Some(400.0));
        assert_eq!(g.during_rate(), Some(200.0), "380 passes in 1.9 s running");
        assert_eq!(g.during_share(), Some(50.0));
        assert_eq!(g.after_rate(), Some(400.0));
        assert_eq!(g.end_ms(), 2000.0);
        assert_eq!(
            g.summary_line(),
            "400 passes/s before, 200/s during (50% of before), 400/s after"
        );
        // Without the running time the readings' own span counts.
        let g = GuestProgress {
            live_ms: None,
            ..throttled()
        };
        assert_eq!(g.during_rate(), Some(190.0));
    }

    #[test]
    fn what_was_not_measured_says_so() {
        let g = GuestProgress {
            after: Vec::new(),
            after_note: Some("give --dest-qmp".into()),
            ..throttled()
        };
        assert_eq!(g.after_rate(), None);
        assert_eq!(
            g.summary_line(),
            "400 passes/s before, 200/s during (50% of before), after: not measured (give --dest-qmp)"
        );
        let g = GuestProgress {
            before: Vec::new(),
            before_note: Some("--baseline 0".into()),
            ..g
        };
        assert_eq!(g.during_share(), None);
        assert_eq!(
            g.summary_line(),
            "before: not measured (--baseline 0), 200 passes/s during, after: not measured (give --dest-qmp)"
        );
        let none = GuestProgress {
            unmeasured: Some("the VM does not report its guest's passes".into()),
            ..GuestProgress::default()
        };
        assert_eq!(
            none.summary_line(),
            "not measured: the VM does not report its guest's passes"
        );
        assert_eq!(
            none.to_json()["not-measured"],
            "the VM does not report its guest's passes"
        );
        assert!(none.to_json()["before"].is_null());
    }

    #[test]
    fn intervals_follow_the_throttle() {
        let g = throttled();
        let iv = g.intervals();
        // 10 before, 20 during (the shared start reading counts once), 10 after.
        assert_eq!(iv.len(), 40);
        assert!(iv[..10]
            .iter()
            .all(|i| i.phase == Phase::Before && i.rate == 400.0));
        assert_eq!(iv[10].phase, Phase::During);
        assert_eq!((iv[10].rate, iv[10].throttle_pct), (200.0, 20));
        assert_eq!(iv[19].throttle_pct, 40);
        assert!(iv[30..].iter().all(|i| i.phase == Phase::After));
        let j = g.to_json();
        assert_eq!(j["before"], 400.0);
        assert_eq!(j["during"], 200.0);
        assert_eq!(j["during-share"], 50.0);
        assert_eq!(j["after"], 400.0);
        assert_eq!(j["migration-ms"], 2000);
        assert_eq!(j["samples"][10], json!([100, 200.0, 20, false]));
        assert_eq!(j["samples"].as_array().unwrap().len(), 40);
        assert!(j.get("after-note").is_none());
    }

    #[test]
    fn passes_format() {
        assert_eq!(fmt_passes(1994.4), "1994");
        assert_eq!(fmt_passes(37.46), "37.5");
        assert_eq!(fmt_passes(f64::NAN), "0");
    }
}
