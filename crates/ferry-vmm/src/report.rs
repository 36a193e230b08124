//! `ferry migrate --report`: one self-contained HTML page about a finished migration.
//!
//! [`render`] turns the `query-migrate` figures ([`MigrationInfo`]) into a page a person
//! can read at a glance: a few sentences on why the migration took as long as it did,
//! the summary figures, a timeline of the passes on one time axis (what each sent, at
//! what throughput, how many dirty pages it left and the downtime that would have cost),
//! the guest's own pass rate before, during and after the migration over the throttle
//! (see [`progress`]), where the downtime went, and every pass in a table.
//!
//! The page has no scripts and loads nothing: CSS and inline SVG only, so it can be
//! mailed, attached to a ticket or opened from an archive years later.
//!
//! # Where the timeline's times come from
//!
//! `query-migrate` gives the setup time, each pass's duration, the total time and the
//! downtime with its breakdown, not start times. The timeline lays the live passes end
//! to end after setup and spreads what is left before the downtime evenly over the
//! gaps between them: that time goes to harvesting the dirty log after each pass. The
//! downtime ends the timeline, with the final pass inside it after the stop.

pub mod progress;

use std::fmt::Write;

use ferry_migration::engine::stats::{DowntimeBreakdown, PassStats};
use ferry_migration::engine::{human_bytes, MigrationInfo, MigrationStatus};

use progress::{fmt_passes, GuestProgress, Phase};

/// What the page says besides the `query-migrate` figures; all optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportContext {
    /// Where the guest went: the `migrate` URI.
    pub uri: Option<String>,
    /// The downtime limit the source aimed for, ms.
    pub downtime_limit_ms: Option<u64>,
    /// The bandwidth cap, bytes per second (0 = none).
    pub max_bandwidth: Option<u64>,
    /// When the migration ended, as text.
    pub finished_at: Option<String>,
    /// The guest's pass rate before, during and after the migration.
    pub guest: Option<GuestProgress>,
}

/// Width of the SVG drawings, in user units (they scale to the page).
const WIDTH: f64 = 1100.0;
/// Left margin of the timeline, for the lane titles.
const LEFT: f64 = 170.0;
const RIGHT: f64 = 24.0;

const C_SETUP: &str = "#94a3b8";
const C_PASS: [&str; 2] = ["#2563eb", "#60a5fa"];
const C_DOWN: &str = "#dc2626";
const C_GAP: &str = "#e2e8f0";
const C_DIRTY: &str = "#d97706";
const C_LIMIT: &str = "#dc2626";
const C_WITHIN: &str = "#16a34a";

/// The downtime's parts, in the order they happen, with colour and meaning.
const PARTS: [(&str, &str, &str); 7] = [
    ("stop", "#f59e0b", "stopping the guest's vCPUs and devices"),
    (
        "final pass",
        "#dc2626",
        "sending the pages dirtied since the last live pass",
    ),
    ("devices", "#7c3aed", "saving and sending device state"),
    ("vCPUs", "#db2777", "saving and sending vCPU state"),
    (
        "verify",
        "#0d9488",
        "hashing all of guest memory (full verification)",
    ),
    (
        "wire & wait",
        "#64748b",
        "end of stream on the wire until the destination's confirmation, less its own work",
    ),
    (
        "destination check & resume",
        "#16a34a",
        "the destination checking the digests and resuming the guest",
    ),
];

/// Escapes text for HTML and SVG, in element content and in quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `0.40 ms`, `4.2 ms`, `187 ms`, `2.41 s`, `12.3 s`, `739 s`.
pub fn fmt_ms(ms: f64) -> String {
    let ms = if ms.is_finite() { ms.max(0.0) } else { 0.0 };
    if ms < 1.0 {
        format!("{ms:.2} ms")
    } else if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 10_000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if ms < 100_000.0 {
        format!("{:.1} s", ms / 1e3)
    } else if ms < 120_000.0 {
        format!("{:.0} s", ms / 1e3)
    } else {
        let s = (ms / 1e3).round() as u64;
        format!("{} min {} s", s / 60, s % 60)
    }
}

/// `262144` → `262,144`.
fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_rate(bytes_per_sec: f64) -> String {
    if !bytes_per_sec.is_finite() || bytes_per_sec <= 0.0 {
        return "0 B/s".into();
    }
    format!("{}/s", human_bytes(bytes_per_sec as u64))
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        (part / whole * 100.0).clamp(0.0, 100.0)
    } else {
        0.0
    }
}

/// A number safe to print into SVG coordinates.
fn n(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "0".into()
    }
}

/// Rough width of `text` at the 12px sans-serif the drawings use.
fn text_width(text: &str) -> f64 {
    text.chars().count() as f64 * 6.6
}

/// The same for the bold labels inside bars.
fn bold_width(text: &str) -> f64 {
    text.chars().count() as f64 * 7.4
}

fn breakdown_parts(b: &DowntimeBreakdown) -> [f64; 7] {
    let resume = b
        .destination_resume_ms
        .max(0.0)
        .min(b.switchover_ms.max(0.0));
    [
        b.stop_ms,
        b.final_pass_ms,
        b.devices_ms,
        b.vcpus_ms,
        b.verify_ms,
        b.switchover_ms - resume,
        resume,
    ]
    .map(|v| if v.is_finite() { v.max(0.0) } else { 0.0 })
}

/// Where each piece sits on the timeline, in ms from the start.
struct Layout {
    total: f64,
    setup: f64,
    /// `(start, pass)` for every pass, the final one included.
    passes: Vec<(f64, PassStats)>,
    /// Start and length of the downtime, when the guest switched over.
    downtime: Option<(f64, f64)>,
    /// Time between live passes (harvesting the dirty log), all of it.
    gaps: f64,
}

impl Layout {
    fn new(info: &MigrationInfo) -> Self {
        let live: Vec<&PassStats> = info.passes.iter().filter(|p| !p.final_pass).collect();
        let live_ms: f64 = live.iter().map(|p| p.duration_ms.max(0.0)).sum();
        let setup = info.setup_time as f64;
        let down_ms = match (&info.downtime_breakdown, info.downtime) {
            (Some(b), _) => Some(breakdown_parts(b).iter().sum::<f64>()),
            (None, Some(d)) => Some(d as f64),
            _ => None,
        };
        let total = (info.total_time as f64).max(setup + live_ms + down_ms.unwrap_or(0.0));
        let live_end = total - down_ms.unwrap_or(0.0);
        let gaps = (live_end - setup - live_ms).max(0.0);
        let gap = if live.is_empty() {
            0.0
        } else {
            gaps / live.len() as f64
        };
        let mut passes = Vec::new();
        let mut t = setup;
        for p in &live {
            passes.push((t, (*p).clone()));
            t += p.duration_ms.max(0.0) + gap;
        }
        let downtime = down_ms.map(|d| (total - d, d));
        if let Some((start, _)) = downtime {
            let stop = info
                .downtime_breakdown
                .as_ref()
                .map_or(0.0, |b| b.stop_ms.max(0.0));
            for p in info.passes.iter().filter(|p| p.final_pass) {
                passes.push((start + stop, p.clone()));
            }
        }
        Layout {
            total: total.max(1.0),
            setup,
            passes,
            downtime,
            gaps,
        }
    }

    fn x(&self, t: f64) -> f64 {
        LEFT + (t / self.total).clamp(0.0, 1.0) * (WIDTH - LEFT - RIGHT)
    }

    fn w(&self, ms: f64) -> f64 {
        (ms.max(0.0) / self.total) * (WIDTH - LEFT - RIGHT)
    }
}

/// A 1-2-5 step giving about `target` ticks over `0..max`.
fn tick_step(max: f64, target: f64) -> f64 {
    let raw = (max / target).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if raw <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_tick(ms: f64, step: f64) -> String {
    if step >= 1000.0 {
        let s = ms / 1e3;
        if (s - s.round()).abs() < 1e-9 {
            format!("{s:.0} s")
        } else {
            format!("{s:.1} s")
        }
    } else if step >= 1.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// The downtime as `query-migrate` reports it (whole ms), for text; the timeline and
/// the bar use the breakdown's finer sum.
fn shown_downtime(info: &MigrationInfo, layout: &Layout) -> Option<f64> {
    info.downtime
        .map(|d| d as f64)
        .or(layout.downtime.map(|(_, d)| d))
}

/// The sentences at the top: where the time went and why.
fn findings(info: &MigrationInfo, ctx: &ReportContext, layout: &Layout) -> Vec<String> {
    let mut out = Vec::new();
    let live: Vec<&PassStats> = info.passes.iter().filter(|p| !p.final_pass).collect();
    let live_ms: f64 = live.iter().map(|p| p.duration_ms).sum();
    let page = if info.ram.page_size > 0 {
        info.ram.page_size
    } else {
        ferry_migration::PAGE_SIZE as u64
    };
    let total = layout.total;
    let mut split = format!(
        "It took {} in all: {} of setup, {} for {} live pass{} with the guest running",
        fmt_ms(total),
        fmt_ms(layout.setup),
        fmt_ms(live_ms),
        live.len(),
        if live.len() == 1 { "" } else { "es" },
    );
    if layout.gaps >= total * 0.02 {
        let _ = write!(
            split,
            " (plus {} harvesting the dirty log between them)",
            fmt_ms(layout.gaps)
        );
    }
    match shown_downtime(info, layout) {
        Some(d) => {
            let _ = write!(split, ", and {} of downtime with it stopped.", fmt_ms(d));
        }
        None => split.push('.'),
    }
    out.push(split);

    if let Some(p0) = live.first() {
        let mut s = format!(
            "Pass 0, the first copy of all populated memory, sent {} pages ({}) in {} at {}: {:.0}% of the total time",
            fmt_count(p0.pages),
            human_bytes(p0.bytes),
            fmt_ms(p0.duration_ms),
            fmt_rate(p0.throughput_bytes_per_sec),
            pct(p0.duration_ms, total)
        );
        let later = info.passes[1..]
            .iter()
            .map(|p| p.throughput_bytes_per_sec)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        if later > 2.0 * p0.throughput_bytes_per_sec {
            let _ = write!(
                s,
                "; later passes moved data faster (up to {})",
                fmt_rate(later)
            );
        }
        s.push('.');
        out.push(s);
    }

    let limit = ctx
        .downtime_limit_ms
        .map(|l| format!(" ({} limit)", fmt_ms(l as f64)))
        .unwrap_or_default();
    if live.len() >= 2 {
        let first = live[0].dirty_after;
        let last = live[live.len() - 1];
        // Pages written twice in a pass count once, so this is a floor.
        let dirty_rate = (last.dirty_after * page) as f64 / (last.duration_ms / 1e3).max(1e-6);
        let rates = format!(
            "in pass {} the guest dirtied at least {} while {} went out",
            last.pass,
            fmt_rate(dirty_rate),
            fmt_rate(last.throughput_bytes_per_sec)
        );
        if last.dirty_after as f64 >= first as f64 * 0.8 {
            out.push(format!(
                "The passes did not shrink the dirty set: {} pages were dirty after pass 0 and {} after pass {} ({rates}). The guest rewrites its working set faster than a pass sends it, so more passes cannot help; only a higher downtime limit, more bandwidth or a slower guest can.",
                fmt_count(first),
                fmt_count(last.dirty_after),
                last.pass
            ));
        } else {
            out.push(format!(
                "Each pass left fewer dirty pages: {} after pass 0, {} after pass {} ({rates}).",
                fmt_count(first),
                fmt_count(last.dirty_after),
                last.pass
            ));
        }
    }
    if let Some(last) = live.last() {
        if info.status == MigrationStatus::Completed {
            out.push(format!(
                "The source stopped the guest after pass {} because stopping then was expected to cost {} of downtime{limit}.",
                last.pass,
                fmt_ms(last.expected_downtime_ms)
            ));
        } else {
            let best = live
                .iter()
                .map(|p| p.expected_downtime_ms)
                .fold(f64::INFINITY, f64::min);
            out.push(format!(
                "It never switched over: the lowest expected downtime after a pass was {}{limit}.",
                fmt_ms(best)
            ));
        }
    }

    if let (Some(b), Some(d)) = (&info.downtime_breakdown, shown_downtime(info, layout)) {
        let parts = breakdown_parts(b);
        let sum: f64 = parts.iter().sum();
        let (i, v) = parts
            .iter()
            .copied()
            .enumerate()
            .fold((0, f64::MIN), |m, (i, v)| if v > m.1 { (i, v) } else { m });
        let mut s = format!(
            "Of the {} downtime, the {} took the most: {} ({:.1}%), {}",
            fmt_ms(d),
            PARTS[i].0,
            fmt_ms(v),
            pct(v, sum),
            PARTS[i].2
        );
        if i == 1 {
            if let Some(f) = info.passes.iter().find(|p| p.final_pass) {
                let _ = write!(
                    s,
                    " ({} pages, {})",
                    fmt_count(f.pages),
                    human_bytes(f.bytes)
                );
            }
        }
        s.push('.');
        out.push(s);
    }

    if let Some(p0) = info.passes.first() {
        let again = info.ram.transferred.saturating_sub(p0.bytes);
        if again > p0.bytes / 20 {
            out.push(format!(
                "{} went over the wire: {} in the first copy and {} more re-sending pages the guest wrote again while it ran (guest RAM: {}).",
                human_bytes(info.ram.transferred),
                human_bytes(p0.bytes),
                human_bytes(again),
                human_bytes(info.ram.total)
            ));
        }
    }
    match (info.status, &info.error_desc) {
        (MigrationStatus::Cancelled, _) => out.push(format!(
            "It was cancelled after {} pass{}.",
            info.passes.len(),
            if info.passes.len() == 1 { "" } else { "es" }
        )),
        (MigrationStatus::Failed, Some(e)) => out.push(format!("It failed: {e}.")),
        (MigrationStatus::Failed, None) => out.push("It failed.".into()),
        _ => {}
    }
    out
}

fn card(out: &mut String, label: &str, value: &str, note: &str) {
    let _ = write!(
        out,
        r#"<div class="card"><div class="label">{}</div><div class="value">{}</div><div class="note">{}</div></div>"#,
        escape(label),
        escape(value),
        escape(note)
    );
}

fn summary(info: &MigrationInfo, ctx: &ReportContext, layout: &Layout) -> String {
    let mut s = String::from(r#"<div class="cards">"#);
    card(
        &mut s,
        "total time",
        &fmt_ms(info.total_time as f64),
        &format!("setup {}", fmt_ms(info.setup_time as f64)),
    );
    match info.downtime {
        Some(d) => card(
            &mut s,
            "downtime",
            &fmt_ms(d as f64),
            &ctx.downtime_limit_ms
                .map(|l| format!("limit {}", fmt_ms(l as f64)))
                .unwrap_or_else(|| "guest stopped".into()),
        ),
        None => card(&mut s, "downtime", "none", "the guest did not switch over"),
    }
    let secs = (layout.total / 1e3).max(1e-3);
    card(
        &mut s,
        "transferred",
        &human_bytes(info.ram.transferred),
        &format!(
            "{} average; guest RAM {}",
            fmt_rate(info.ram.transferred as f64 / secs),
            human_bytes(info.ram.total)
        ),
    );
    let finals = info.passes.iter().filter(|p| p.final_pass).count();
    card(
        &mut s,
        "passes",
        &info.passes.len().to_string(),
        &format!(
            "{} live, {} with the guest stopped",
            info.passes.len() - finals,
            finals
        ),
    );
    card(
        &mut s,
        "pages",
        &fmt_count(info.ram.normal),
        &format!(
            "with data; {} zero pages sent as a flag",
            fmt_count(info.ram.duplicate)
        ),
    );
    let (verified, how) = match info.verified.as_deref() {
        Some("digest+full") => ("digest+full", "incremental digest and a full hash matched"),
        Some("digest") => ("digest", "incremental digest of every page sent matched"),
        Some("full") => ("full", "a full hash of guest memory matched"),
        Some(other) => (other, "memory was not checked"),
        None => ("—", "the migration did not get that far"),
    };
    card(&mut s, "verification", verified, how);
    s.push_str("</div>");
    s
}

/// The title of a timeline lane `y..y+h`, with up to two short lines under it.
fn lane_title(svg: &mut String, y: f64, h: f64, title: &str, sub: &[&str]) {
    let x = LEFT - 12.0;
    let top = y + h / 2.0 + 4.0 - 7.0 * sub.len() as f64;
    let _ = write!(
        svg,
        r#"<text x="{x}" y="{}" class="lane">{}</text>"#,
        n(top),
        escape(title)
    );
    for (i, line) in sub.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{}" class="sub">{}</text>"#,
            n(top + 14.0 * (i + 1) as f64),
            escape(line)
        );
    }
}

fn timeline(info: &MigrationInfo, ctx: &ReportContext, l: &Layout) -> String {
    const PHASE_H: f64 = 30.0;
    const BAR_H: f64 = 80.0;
    const GAP: f64 = 22.0;
    let top = 10.0;
    let y_phase = top;
    let y_sent = y_phase + PHASE_H + GAP;
    let y_tput = y_sent + BAR_H + GAP;
    let y_dirty = y_tput + BAR_H + GAP;
    let y_exp = y_dirty + BAR_H + GAP;
    let y_axis = y_exp + BAR_H + 8.0;
    let height = y_axis + 30.0;
    let many = l.passes.len() > 24;
    // Alternating shades tell neighbouring passes apart; with many passes they only
    // make noise, and the tooltips and the table say which pass is which.
    let shade = |i: usize| if many { C_PASS[0] } else { C_PASS[i % 2] };

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg viewBox="0 0 {WIDTH} {}" role="img" aria-label="timeline of the migration's passes">"#,
        n(height)
    );

    // Grid and time axis.
    let step = tick_step(l.total, 10.0);
    let mut t = 0.0;
    while t <= l.total + step * 1e-6 {
        let x = l.x(t);
        let _ = write!(
            svg,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" class="grid"/><text x="{0}" y="{3}" class="tick" text-anchor="middle">{4}</text>"##,
            n(x),
            n(top),
            n(y_axis),
            n(y_axis + 16.0),
            escape(&fmt_tick(t, step))
        );
        t += step;
    }
    let _ = write!(
        svg,
        r#"<line x1="{LEFT}" y1="{y}" x2="{x2}" y2="{y}" class="axis"/>"#,
        y = n(y_axis),
        x2 = WIDTH - RIGHT
    );

    // Phases.
    lane_title(&mut svg, y_phase, PHASE_H, "phase", &[]);
    let _ = write!(
        svg,
        r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{C_GAP}"><title>between passes: harvesting the dirty log</title></rect>"#,
        n(l.x(0.0)),
        n(y_phase),
        n(l.w(l.total)),
        n(PHASE_H)
    );
    let phase = |svg: &mut String,
                 start: f64,
                 len: f64,
                 color: &str,
                 labels: &[&str],
                 tip: &str| {
        let w = l.w(len).max(1.0);
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{color}"><title>{}</title></rect>"#,
            n(l.x(start)),
            n(y_phase),
            n(w),
            n(PHASE_H),
            escape(tip)
        );
        if let Some(label) = labels.iter().find(|t| bold_width(t) + 8.0 <= w) {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" class="inbar" text-anchor="middle">{}</text>"#,
                n(l.x(start) + w / 2.0),
                n(y_phase + PHASE_H / 2.0 + 4.0),
                escape(label)
            );
        }
    };
    if l.setup > 0.0 {
        phase(
            &mut svg,
            0.0,
            l.setup,
            C_SETUP,
            &["setup"],
            &format!("setup: {}", fmt_ms(l.setup)),
        );
    }
    for (i, (start, p)) in l.passes.iter().enumerate() {
        if p.final_pass {
            continue;
        }
        phase(
            &mut svg,
            *start,
            p.duration_ms,
            shade(i),
            &[&format!("pass {}", p.pass), &p.pass.to_string()],
            &format!("pass {}: {}", p.pass, fmt_ms(p.duration_ms)),
        );
    }
    if let Some((start, d)) = l.downtime {
        let shown = fmt_ms(shown_downtime(info, l).unwrap_or(d));
        phase(
            &mut svg,
            start,
            d,
            C_DOWN,
            &[&format!("downtime {shown}"), "downtime", "down"],
            &format!("downtime: {shown} (guest stopped)"),
        );
    }

    // Bytes sent per pass.
    let max_bytes = l
        .passes
        .iter()
        .map(|(_, p)| p.bytes)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    lane_title(
        &mut svg,
        y_sent,
        BAR_H,
        "sent per pass",
        &[
            "bytes on the wire",
            &format!("max {}", human_bytes(max_bytes as u64)),
        ],
    );
    for (i, (start, p)) in l.passes.iter().enumerate() {
        let h = (p.bytes as f64 / max_bytes * BAR_H).max(if p.bytes > 0 { 1.0 } else { 0.0 });
        let w = l.w(p.duration_ms).max(1.5);
        let color = if p.final_pass { C_DOWN } else { shade(i) };
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{color}"><title>pass {}{}: {} pages, {} in {}</title></rect>"#,
            n(l.x(*start)),
            n(y_sent + BAR_H - h),
            n(w),
            n(h),
            p.pass,
            if p.final_pass { " (guest stopped)" } else { "" },
            fmt_count(p.pages),
            human_bytes(p.bytes),
            fmt_ms(p.duration_ms)
        );
        let label = human_bytes(p.bytes);
        if !many && text_width(&label) <= w + 16.0 {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" class="val" text-anchor="middle">{}</text>"#,
                n(l.x(*start) + w / 2.0),
                n(y_sent + BAR_H - h - 4.0),
                escape(&label)
            );
        }
    }

    // Throughput per pass.
    let max_tput = l
        .passes
        .iter()
        .map(|(_, p)| p.throughput_bytes_per_sec)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1.0);
    lane_title(
        &mut svg,
        y_tput,
        BAR_H,
        "throughput",
        &["of each pass", &format!("max {}", fmt_rate(max_tput))],
    );
    if let Some(bw) = ctx.max_bandwidth.filter(|b| *b > 0) {
        let y = y_tput + BAR_H - (bw as f64 / max_tput).min(1.0) * BAR_H;
        limit_line(&mut svg, y, &format!("cap {}", fmt_rate(bw as f64)));
    }
    for (i, (start, p)) in l.passes.iter().enumerate() {
        let v = if p.throughput_bytes_per_sec.is_finite() {
            p.throughput_bytes_per_sec
        } else {
            0.0
        };
        let h = v / max_tput * BAR_H;
        let w = l.w(p.duration_ms).max(1.5);
        let color = if p.final_pass { C_DOWN } else { shade(i) };
        let _ = write!(
            svg,
            r#"<g><title>pass {pass}: {rate}</title><rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{color}" fill-opacity="0.35"/><line x1="{x}" y1="{y}" x2="{x2}" y2="{y}" stroke="{color}" stroke-width="2.5"/></g>"#,
            pass = p.pass,
            rate = escape(&fmt_rate(v)),
            x = n(l.x(*start)),
            y = n(y_tput + BAR_H - h),
            w = n(w),
            h = n(h),
            x2 = n(l.x(*start) + w),
        );
        let label = fmt_rate(v);
        if !many && text_width(&label) <= w + 16.0 {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" class="val" text-anchor="middle">{}</text>"#,
                n(l.x(*start) + w / 2.0),
                n(y_tput + BAR_H - h - 5.0),
                escape(&label)
            );
        }
    }

    // Dirty pages left after each pass, and what stopping then would have cost.
    let ends: Vec<(f64, &PassStats)> = l
        .passes
        .iter()
        .map(|(s, p)| (s + p.duration_ms.max(0.0), p))
        .collect();
    let max_dirty = ends
        .iter()
        .map(|(_, p)| p.dirty_after)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    lane_title(
        &mut svg,
        y_dirty,
        BAR_H,
        "dirty pages left",
        &[
            "after each pass",
            &format!("max {}", fmt_count(max_dirty as u64)),
        ],
    );
    let pts: Vec<(f64, f64)> = ends
        .iter()
        .map(|(t, p)| {
            (
                l.x(*t),
                y_dirty + BAR_H - p.dirty_after as f64 / max_dirty * BAR_H,
            )
        })
        .collect();
    polyline(&mut svg, &pts, C_DIRTY);
    for (i, ((_, p), (x, y))) in ends.iter().zip(&pts).enumerate() {
        let _ = write!(
            svg,
            r#"<circle cx="{}" cy="{}" r="{}" fill="{C_DIRTY}"><title>after pass {}: {} dirty pages ({})</title></circle>"#,
            n(*x),
            n(*y),
            if many { 2.0 } else { 4.0 },
            p.pass,
            fmt_count(p.dirty_after),
            human_bytes(p.dirty_after * info.ram.page_size.max(1))
        );
        if !many && label_fits(&pts, i) {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" class="val" text-anchor="middle">{}</text>"#,
                n(*x),
                n(y - 8.0),
                escape(&fmt_count(p.dirty_after))
            );
        }
    }

    let live: Vec<&(f64, &PassStats)> = ends.iter().filter(|(_, p)| !p.final_pass).collect();
    let limit = ctx.downtime_limit_ms.map(|v| v as f64);
    let max_exp = live
        .iter()
        .map(|(_, p)| p.expected_downtime_ms)
        .filter(|v| v.is_finite())
        .fold(limit.unwrap_or(0.0) * 1.15, f64::max)
        .max(1.0);
    lane_title(
        &mut svg,
        y_exp,
        BAR_H,
        "expected downtime",
        &["if stopped after it", &format!("max {}", fmt_ms(max_exp))],
    );
    if let Some(lim) = limit {
        let y = y_exp + BAR_H - (lim / max_exp).min(1.0) * BAR_H;
        limit_line(&mut svg, y, &format!("limit {}", fmt_ms(lim)));
    }
    let epts: Vec<(f64, f64)> = live
        .iter()
        .map(|(t, p)| {
            let v = if p.expected_downtime_ms.is_finite() {
                p.expected_downtime_ms.min(max_exp)
            } else {
                max_exp
            };
            (l.x(*t), y_exp + BAR_H - v / max_exp * BAR_H)
        })
        .collect();
    polyline(&mut svg, &epts, "#475569");
    for (i, ((_, p), (x, y))) in live.iter().zip(&epts).enumerate() {
        let over = limit.is_some_and(|lim| p.expected_downtime_ms > lim);
        let _ = write!(
            svg,
            r#"<circle cx="{}" cy="{}" r="{}" fill="{}"><title>after pass {}: {} expected</title></circle>"#,
            n(*x),
            n(*y),
            if many { 2.0 } else { 4.0 },
            if over { C_LIMIT } else { C_WITHIN },
            p.pass,
            escape(&fmt_ms(p.expected_downtime_ms))
        );
        if !many && label_fits(&epts, i) {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" class="val" text-anchor="middle">{}</text>"#,
                n(*x),
                n(y - 8.0),
                escape(&fmt_ms(p.expected_downtime_ms))
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

const C_BEFORE: &str = "#64748b";
const C_DURING: &str = "#2563eb";
const C_AFTER: &str = "#16a34a";
const C_THROTTLE: &str = "#d97706";
const C_DLIMIT: &str = "#7c3aed";

fn phase_color(p: Phase) -> &'static str {
    match p {
        Phase::Before => C_BEFORE,
        Phase::During => C_DURING,
        Phase::After => C_AFTER,
    }
}

/// `(given --dest-qmp)` from a note, or nothing.
fn note(n: Option<&String>) -> String {
    n.map(|n| format!(" ({n})")).unwrap_or_default()
}

/// A time on the guest chart's axis: `-0.90 s`, `0.10 s`, `12.3 s`.
fn fmt_at(ms: f64) -> String {
    let s = if ms.is_finite() { ms / 1e3 } else { 0.0 } + 0.0;
    if s.abs() < 10.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

/// The guest's rates in a few sentences.
fn guest_words(g: &GuestProgress, info: &MigrationInfo) -> String {
    let mut s = match g.before_rate() {
        Some(b) => format!(
            "Before the migration the guest's workload made {} passes/s.",
            fmt_passes(b)
        ),
        None => format!(
            "The guest's rate before the migration was not measured{}.",
            note(g.before_note.as_ref())
        ),
    };
    match g.during_rate() {
        Some(d) => {
            let _ = write!(
                s,
                " While it migrated it made {}/s in the time it ran at the source",
                fmt_passes(d)
            );
            if let Some(share) = g.during_share() {
                let _ = write!(s, ", {share:.0}% of that");
            }
            let iv = g.intervals();
            let peak = iv
                .iter()
                .map(|i| i.throttle_pct)
                .chain(info.passes.iter().map(|p| p.cpu_throttle_percent))
                .max()
                .unwrap_or(0);
            let limited =
                iv.iter().any(|i| i.dirty_limited) || info.passes.iter().any(|p| p.dirty_limited);
            if peak > 0 {
                let _ = write!(s, ", with auto-converge throttling its vCPUs up to {peak}%");
            }
            if limited {
                s.push_str(", with the dirty limit holding back vCPUs that dirtied too fast");
            }
            s.push('.');
        }
        None => s.push_str(" Its rate during the migration was not measured (too few readings)."),
    }
    match g.after_rate() {
        Some(a) => {
            let _ = write!(
                s,
                " After, at the destination, it made {}/s.",
                fmt_passes(a)
            );
        }
        None => {
            let _ = write!(
                s,
                " Its rate after the migration was not measured{}.",
                note(g.after_note.as_ref())
            );
        }
    }
    s
}

/// The guest's pass rate from the baseline through the migration and after, over the
/// throttle on the same time axis, with the figures in words above it.
fn guest_section(info: &MigrationInfo, ctx: &ReportContext) -> String {
    let Some(g) = &ctx.guest else {
        return r#"<p class="muted">Not measured: this report was made without readings of the guest's pass counters.</p>"#.into();
    };
    if let Some(why) = &g.unmeasured {
        return format!(r#"<p class="muted">Not measured: {}.</p>"#, escape(why));
    }
    let mut out = format!("<p>{}</p>", escape(&guest_words(g, info)));
    let iv = g.intervals();
    if iv.is_empty() {
        out.push_str(r#"<p class="muted">Too few readings of the guest for a chart.</p>"#);
        return out;
    }
    out.push_str(&guest_chart(g, info, &iv));
    let _ = write!(
        out,
        r#"<p class="key"><span><span class="swatch" style="background:{C_BEFORE}"></span> before the migration</span><span><span class="swatch" style="background:{C_DURING}"></span> while it migrated, at the source</span><span><span class="swatch" style="background:{C_DOWN}"></span> guest stopped (downtime)</span><span><span class="swatch" style="background:{C_AFTER}"></span> after, at the destination</span><span><span class="swatch" style="background:{C_THROTTLE}"></span> auto-converge throttle</span><span><span class="swatch" style="background:{C_DLIMIT};opacity:.35"></span> dirty limit on</span><span>- - - the rate before</span></p>"#
    );
    out
}

fn guest_chart(g: &GuestProgress, info: &MigrationInfo, iv: &[progress::Interval]) -> String {
    const BAND_H: f64 = 24.0;
    const RATE_H: f64 = 120.0;
    const THR_H: f64 = 50.0;
    const GAP: f64 = 20.0;
    let top = 10.0;
    let y_band = top;
    let y_rate = y_band + BAND_H + GAP;
    let y_thr = y_rate + RATE_H + GAP;
    let y_axis = y_thr + THR_H + 8.0;
    let height = y_axis + 30.0;

    let end = g.end_ms();
    let t0 = iv.first().map_or(0.0, |i| i.from_ms).min(0.0);
    let t1 = iv.last().map_or(0.0, |i| i.to_ms).max(end);
    let span = (t1 - t0).max(1.0);
    let x = |t: f64| LEFT + ((t - t0) / span).clamp(0.0, 1.0) * (WIDTH - LEFT - RIGHT);

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg viewBox="0 0 {WIDTH} {}" role="img" aria-label="guest pass rate and vCPU throttle over time">"#,
        n(height)
    );

    // Grid and time axis, 0 at the migration's start.
    let step = tick_step(span, 10.0);
    let mut t = (t0 / step).ceil() * step + 0.0;
    while t <= t1 + step * 1e-6 {
        let _ = write!(
            svg,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" class="grid"/><text x="{0}" y="{3}" class="tick" text-anchor="middle">{4}</text>"##,
            n(x(t)),
            n(top),
            n(y_axis),
            n(y_axis + 16.0),
            escape(&fmt_tick(t + 0.0, step))
        );
        t += step;
    }
    let _ = write!(
        svg,
        r#"<line x1="{LEFT}" y1="{y}" x2="{x2}" y2="{y}" class="axis"/>"#,
        y = n(y_axis),
        x2 = WIDTH - RIGHT
    );

    // When: before, migrating, stopped, after.
    lane_title(&mut svg, y_band, BAND_H, "phase", &[]);
    let band = |svg: &mut String, from: f64, to: f64, color: &str, label: &str, tip: &str| {
        if to <= from {
            return;
        }
        let w = (x(to) - x(from)).max(1.0);
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{color}"><title>{}</title></rect>"#,
            n(x(from)),
            n(y_band),
            n(w),
            n(BAND_H),
            escape(tip)
        );
        if bold_width(label) + 8.0 <= w {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" class="inbar" text-anchor="middle">{}</text>"#,
                n(x(from) + w / 2.0),
                n(y_band + BAND_H / 2.0 + 4.0),
                escape(label)
            );
        }
    };
    band(
        &mut svg,
        t0,
        0.0,
        C_BEFORE,
        "before",
        &format!("before the migration: {}", fmt_ms(-t0)),
    );
    let stop = match (info.status, g.live_ms, info.downtime) {
        (MigrationStatus::Completed, Some(live), Some(d)) => Some((live, live + d as f64)),
        _ => None,
    };
    band(
        &mut svg,
        0.0,
        stop.map_or(end, |(s, _)| s),
        C_DURING,
        "migrating",
        "migrating, the guest running at the source",
    );
    if let Some((from, to)) = stop {
        band(
            &mut svg,
            from,
            to.min(t1),
            C_DOWN,
            "stopped",
            &format!("the guest stopped: {} of downtime", fmt_ms(to - from)),
        );
    }
    if let (Some(first), Some(last)) = (g.after.first(), g.after.last()) {
        band(
            &mut svg,
            first.t_ms,
            last.t_ms,
            C_AFTER,
            "after, at the destination",
            "after the migration, at the destination",
        );
    }

    // The pass rate over each interval between readings.
    let before = g.before_rate();
    let max_rate = iv
        .iter()
        .map(|i| i.rate)
        .chain(before)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    lane_title(
        &mut svg,
        y_rate,
        RATE_H,
        "guest pass rate",
        &[
            "passes per second",
            &format!("max {}/s", fmt_passes(max_rate / 1.1)),
        ],
    );
    let ry = |v: f64| y_rate + RATE_H - (v.max(0.0) / max_rate).min(1.0) * RATE_H;
    for i in iv {
        let c = phase_color(i.phase);
        let (x1, x2) = (x(i.from_ms), x(i.to_ms));
        let y = ry(i.rate);
        let _ = write!(
            svg,
            r#"<g><title>{from} to {to}: {rate} passes/s{thr}</title><rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{c}" fill-opacity="0.3"/><line x1="{x}" y1="{y}" x2="{x2}" y2="{y}" stroke="{c}" stroke-width="2"/></g>"#,
            from = fmt_at(i.from_ms),
            to = fmt_at(i.to_ms),
            rate = fmt_passes(i.rate),
            thr = match (i.throttle_pct, i.dirty_limited) {
                (0, false) => String::new(),
                (0, true) => ", dirty limit on".into(),
                (p, false) => format!(", vCPUs throttled {p}%"),
                (p, true) => format!(", vCPUs throttled {p}%, dirty limit on"),
            },
            x = n(x1),
            y = n(y),
            w = n((x2 - x1).max(0.5)),
            h = n(y_rate + RATE_H - y),
            x2 = n(x2),
        );
    }
    if let Some(b) = before.filter(|b| *b > 0.0) {
        let y = n(ry(b));
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{y}" x2="{x2}" y2="{y}" stroke="#475569" stroke-width="1.5" stroke-dasharray="5 4"/><text x="{tx}" y="{ty}" class="val" text-anchor="end">before {b}/s</text>"##,
            x2 = WIDTH - RIGHT,
            tx = WIDTH - RIGHT - 4.0,
            ty = n(ry(b) - 4.0),
            b = fmt_passes(b)
        );
    }

    // The throttle on the same axis: auto-converge's percent, the dirty limit shaded.
    lane_title(
        &mut svg,
        y_thr,
        THR_H,
        "vCPU throttle",
        &["auto-converge, 0-100%"],
    );
    let _ = write!(
        svg,
        r#"<rect x="{LEFT}" y="{}" width="{}" height="{}" fill="none" class="grid"/>"#,
        n(y_thr),
        n(WIDTH - LEFT - RIGHT),
        n(THR_H)
    );
    let mut any = false;
    for i in iv {
        let (x1, x2) = (x(i.from_ms), x(i.to_ms));
        let w = n((x2 - x1).max(0.5));
        if i.dirty_limited {
            any = true;
            let _ = write!(
                svg,
                r#"<rect x="{}" y="{}" width="{w}" height="{}" fill="{C_DLIMIT}" fill-opacity="0.3"><title>dirty limit on</title></rect>"#,
                n(x1),
                n(y_thr),
                n(THR_H)
            );
        }
        if i.throttle_pct > 0 {
            any = true;
            let h = f64::from(i.throttle_pct.min(100)) / 100.0 * THR_H;
            let _ = write!(
                svg,
                r#"<rect x="{}" y="{}" width="{w}" height="{}" fill="{C_THROTTLE}" class="throttle"><title>vCPUs throttled {}%</title></rect>"#,
                n(x1),
                n(y_thr + THR_H - h),
                n(h),
                i.throttle_pct
            );
        }
    }
    if !any {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" class="tick" text-anchor="middle">no throttle</text>"#,
            n(LEFT + (WIDTH - LEFT - RIGHT) / 2.0),
            n(y_thr + THR_H / 2.0 + 4.0)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A dashed horizontal line across the plot with `label` at its left end, where pass
/// 0 keeps the lanes clear of points.
fn limit_line(svg: &mut String, y: f64, label: &str) {
    let _ = write!(
        svg,
        r#"<line x1="{LEFT}" y1="{y}" x2="{x2}" y2="{y}" class="limit"/><text x="{tx}" y="{ty}" class="limtext">{label}</text>"#,
        y = n(y),
        x2 = WIDTH - RIGHT,
        tx = LEFT + 4.0,
        ty = n(y - 4.0),
        label = escape(label)
    );
}

/// Whether point `i`'s label keeps clear of its neighbours' (about 60 units apart).
fn label_fits(pts: &[(f64, f64)], i: usize) -> bool {
    let x = pts[i].0;
    let clear = |j: usize| (pts[j].0 - x).abs() >= 60.0;
    (i == 0 || clear(i - 1)) && (i + 1 >= pts.len() || clear(i + 1))
}

fn polyline(svg: &mut String, pts: &[(f64, f64)], color: &str) {
    if pts.len() < 2 {
        return;
    }
    let p: Vec<String> = pts
        .iter()
        .map(|(x, y)| format!("{},{}", n(*x), n(*y)))
        .collect();
    let _ = write!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"/>"#,
        p.join(" ")
    );
}

fn downtime_section(info: &MigrationInfo, ctx: &ReportContext) -> String {
    let Some(b) = &info.downtime_breakdown else {
        return format!(
            r#"<p class="muted">No downtime: the migration ended {} before the source stopped the guest, so the guest kept running at the source.</p>"#,
            escape(info.status.as_str())
        );
    };
    let parts = breakdown_parts(b);
    let sum: f64 = parts.iter().sum::<f64>().max(1e-9);
    let bar_w = WIDTH - 2.0 * RIGHT;
    let limit = ctx.downtime_limit_ms.map(|v| v as f64);
    // The scale shows the limit too when it is near, so the bar reads against it.
    let scale = match limit {
        Some(lim) if lim <= sum * 2.0 => sum.max(lim),
        _ => sum,
    };
    let mut svg = format!(
        r#"<svg viewBox="0 0 {WIDTH} 78" role="img" aria-label="where the downtime went">"#
    );
    let mut x = RIGHT;
    for (i, v) in parts.iter().enumerate() {
        let w = v / scale * bar_w;
        let (name, color, what) = PARTS[i];
        let _ = write!(
            svg,
            r#"<rect x="{}" y="10" width="{}" height="40" fill="{color}"><title>{}: {} ({:.1}%), {}</title></rect>"#,
            n(x),
            n(w),
            escape(name),
            escape(&fmt_ms(*v)),
            pct(*v, sum),
            escape(what)
        );
        let label = format!("{name} {}", fmt_ms(*v));
        if bold_width(&label) + 10.0 <= w {
            let _ = write!(
                svg,
                r#"<text x="{}" y="34" class="inbar" text-anchor="middle">{}</text>"#,
                n(x + w / 2.0),
                escape(&label)
            );
        }
        x += w;
    }
    if let Some(lim) = limit.filter(|l| *l <= scale) {
        let lx = RIGHT + lim / scale * bar_w;
        let _ = write!(
            svg,
            r#"<line x1="{x}" y1="4" x2="{x}" y2="56" class="limit"/><text x="{tx}" y="70" class="limtext" text-anchor="end">limit {lim}</text>"#,
            x = n(lx),
            tx = n(lx.max(RIGHT + 70.0)),
            lim = escape(&fmt_ms(lim))
        );
    }
    let shown = info.downtime.map_or(sum, |d| d as f64);
    let end = match limit {
        Some(lim) if lim > scale => format!("{} of a {} limit", fmt_ms(shown), fmt_ms(lim)),
        _ => fmt_ms(shown),
    };
    let _ = write!(
        svg,
        r#"<text x="{}" y="70" class="tick">0</text><text x="{}" y="70" class="tick" text-anchor="end">{}</text></svg>"#,
        RIGHT,
        n(RIGHT + sum / scale * bar_w),
        escape(&end)
    );
    let mut table = String::from(
        r#"<table class="legend"><tr><th></th><th>part</th><th class="num">time</th><th class="num">share</th><th>what it is</th></tr>"#,
    );
    for (i, v) in parts.iter().enumerate() {
        let (name, color, what) = PARTS[i];
        let _ = write!(
            table,
            r#"<tr><td><span class="swatch" style="background:{color}"></span></td><td>{}</td><td class="num">{}</td><td class="num">{:.1}%</td><td>{}</td></tr>"#,
            escape(name),
            escape(&fmt_ms(*v)),
            pct(*v, sum),
            escape(what)
        );
    }
    table.push_str("</table>");
    format!("{svg}{table}")
}

/// How each device's state moved, and why a device that a host could precopy did not.
fn device_table(info: &MigrationInfo) -> String {
    let mut t = String::from(
        r#"<table class="devices"><tr><th>device</th><th>moved as</th><th>why</th><th class="num">precopy records</th><th class="num">before the switchover</th><th class="num">after it</th><th class="num">acknowledged</th></tr>"#,
    );
    for d in &info.devices {
        let who = if d.instance == 0 {
            d.name.clone()
        } else {
            format!("{}{}", d.name, d.instance)
        };
        let after = d.final_precopy_bytes + d.stop_copy_bytes;
        let _ = write!(
            t,
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td></tr>"#,
            escape(&who),
            escape(&d.mode),
            escape(d.reason.as_deref().unwrap_or("")),
            fmt_count(d.precopy_records),
            escape(&human_bytes(d.precopy_bytes)),
            escape(&human_bytes(after)),
            d.acked_ms
                .map_or_else(|| "—".to_string(), |ms| escape(&fmt_ms(ms as f64))),
        );
    }
    t.push_str("</table>");
    t
}

/// What held the guest back in a pass: `20%`, `dirty limit, held 3.2 ms`, or `—`.
fn pass_throttle(p: &PassStats) -> String {
    let mut parts = Vec::new();
    if p.cpu_throttle_percent > 0 {
        parts.push(format!("{}%", p.cpu_throttle_percent));
    }
    if p.dirty_limited {
        parts.push("dirty limit".to_string());
    }
    if p.throttle_us > 0 {
        parts.push(format!("held {}", fmt_ms(p.throttle_us as f64 / 1e3)));
    }
    if parts.is_empty() {
        "—".into()
    } else {
        parts.join(", ")
    }
}

fn pass_table(l: &Layout) -> String {
    let mut t = String::new();
    let open = if l.passes.len() <= 40 { " open" } else { "" };
    let throttled = l
        .passes
        .iter()
        .any(|(_, p)| p.cpu_throttle_percent > 0 || p.dirty_limited || p.throttle_us > 0);
    let _ = write!(
        t,
        r#"<details{open}><summary>every pass ({})</summary><table class="passes"><tr><th class="num">pass</th><th>guest</th><th class="num">start</th><th class="num">duration</th><th class="num">pages</th><th class="num">zero pages</th><th class="num">sent</th><th class="num">throughput</th><th class="num">dirty after</th><th class="num">expected downtime</th>{}</tr>"#,
        l.passes.len(),
        if throttled {
            r#"<th title="auto-converge's CPU throttle, the dirty limit, and the most time one vCPU was held back">throttle</th>"#
        } else {
            ""
        }
    );
    for (start, p) in &l.passes {
        let throttle = if throttled {
            format!("<td>{}</td>", escape(&pass_throttle(p)))
        } else {
            String::new()
        };
        let _ = write!(
            t,
            r#"<tr{}><td class="num">{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td>{throttle}</tr>"#,
            if p.final_pass {
                r#" class="final""#
            } else {
                ""
            },
            p.pass,
            if p.final_pass { "stopped" } else { "running" },
            escape(&fmt_ms(*start)),
            escape(&fmt_ms(p.duration_ms)),
            fmt_count(p.pages),
            fmt_count(p.zero_pages),
            escape(&human_bytes(p.bytes)),
            escape(&fmt_rate(p.throughput_bytes_per_sec)),
            fmt_count(p.dirty_after),
            if p.final_pass {
                "—".to_string()
            } else {
                escape(&fmt_ms(p.expected_downtime_ms))
            }
        );
    }
    t.push_str("</table></details>");
    t
}

const STYLE: &str = r#"
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: #0f172a; background: #f8fafc; margin: 0; }
main { max-width: 1140px; margin: 0 auto; padding: 20px 20px 40px; }
h1 { font-size: 22px; margin: 0 0 2px; }
h2 { font-size: 16px; margin: 26px 0 8px; }
.meta { color: #475569; margin: 0 0 14px; }
.status { display: inline-block; padding: 1px 9px; border-radius: 10px; color: #fff; font-weight: 600;
  font-size: 13px; vertical-align: 3px; margin-left: 6px; }
.status.completed { background: #16a34a; } .status.failed { background: #dc2626; }
.status.other { background: #64748b; }
.why { background: #fff; border: 1px solid #e2e8f0; border-left: 4px solid #2563eb; border-radius: 6px;
  padding: 10px 16px 10px 34px; margin: 0; }
.why li { margin: 3px 0; }
.cards { display: grid; grid-template-columns: repeat(6, 1fr); gap: 10px; margin-top: 14px; }
.card { background: #fff; border: 1px solid #e2e8f0; border-radius: 6px; padding: 8px 12px; }
.card .label { color: #64748b; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 20px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .note { color: #475569; font-size: 12px; }
.panel { background: #fff; border: 1px solid #e2e8f0; border-radius: 6px; padding: 8px 10px; }
svg { width: 100%; height: auto; display: block; font-family: inherit; }
svg .lane { font-size: 13px; font-weight: 600; text-anchor: end; fill: #0f172a; }
svg .sub { font-size: 11px; text-anchor: end; fill: #64748b; }
svg .tick { font-size: 11px; fill: #64748b; }
svg .val { font-size: 11px; fill: #1e293b; }
svg .inbar { font-size: 12px; fill: #fff; font-weight: 600; }
svg .grid { stroke: #e2e8f0; stroke-width: 1; }
svg .axis { stroke: #94a3b8; stroke-width: 1; }
svg .limit { stroke: #dc2626; stroke-width: 1.5; stroke-dasharray: 5 4; }
svg .limtext { font-size: 11px; fill: #dc2626; font-weight: 600; paint-order: stroke;
  stroke: #fff; stroke-width: 3px; }
svg .val { paint-order: stroke; stroke: #fff; stroke-width: 3px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e2e8f0; text-align: left; }
th { color: #475569; font-weight: 600; font-size: 12px; }
.num { text-align: right; }
tr.final td { color: #b91c1c; }
.legend { margin-top: 6px; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px; }
.swatch.dot { border-radius: 6px; }
.key { color: #475569; font-size: 12px; margin: 6px 0 0; }
.key > span { margin-right: 14px; white-space: nowrap; display: inline-block; }
details summary { cursor: pointer; color: #2563eb; margin: 4px 0; }
.muted { color: #64748b; }
footer { color: #94a3b8; font-size: 12px; margin-top: 28px; }
@media (max-width: 900px) { .cards { grid-template-columns: repeat(3, 1fr); } }
"#;

/// The whole page for one migration.
pub fn render(info: &MigrationInfo, ctx: &ReportContext) -> String {
    let layout = Layout::new(info);
    let status = info.status.as_str();
    let status_class = match info.status {
        MigrationStatus::Completed => "completed",
        MigrationStatus::Failed => "failed",
        _ => "other",
    };
    let mut meta = Vec::new();
    if let Some(u) = &ctx.uri {
        meta.push(format!("to {u}"));
    }
    if let Some(t) = &ctx.finished_at {
        meta.push(format!("ended {t}"));
    }
    if let Some(l) = ctx.downtime_limit_ms {
        meta.push(format!("downtime limit {}", fmt_ms(l as f64)));
    }
    match ctx.max_bandwidth {
        Some(0) => meta.push("no bandwidth cap".into()),
        Some(b) => meta.push(format!("bandwidth cap {}", fmt_rate(b as f64))),
        None => {}
    }
    meta.push(format!("guest RAM {}", human_bytes(info.ram.total)));

    let mut h = String::with_capacity(32 * 1024);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    let _ = write!(
        h,
        "<title>ferry migration {}{}</title><style>{STYLE}</style></head><body><main>",
        escape(status),
        ctx.uri
            .as_deref()
            .map(|u| format!(" to {}", escape(u)))
            .unwrap_or_default()
    );
    let _ = write!(
        h,
        r#"<h1>Migration report <span class="status {status_class}">{}</span></h1><p class="meta">{}</p>"#,
        escape(status),
        escape(&meta.join(" · "))
    );
    h.push_str(r#"<h2>Why it took this long</h2><ul class="why">"#);
    for f in findings(info, ctx, &layout) {
        let _ = write!(h, "<li>{}</li>", escape(&f));
    }
    h.push_str("</ul>");
    h.push_str(&summary(info, ctx, &layout));

    h.push_str(r#"<h2>Timeline</h2><div class="panel">"#);
    h.push_str(&timeline(info, ctx, &layout));
    let _ = write!(
        h,
        r#"<p class="key"><span><span class="swatch" style="background:{C_SETUP}"></span> setup</span><span><span class="swatch" style="background:{}"></span><span class="swatch" style="background:{}"></span> live passes (guest running)</span><span><span class="swatch" style="background:{C_DOWN}"></span> downtime and final pass (guest stopped)</span><span><span class="swatch" style="background:{C_GAP}"></span> between passes: harvesting the dirty log</span><span><span class="swatch" style="background:{C_DIRTY}"></span> dirty pages left</span><span><span class="swatch dot" style="background:{C_LIMIT}"></span> expected downtime over the limit, <span class="swatch dot" style="background:{C_WITHIN}"></span> within it</span></p></div>"#,
        C_PASS[0], C_PASS[1]
    );

    h.push_str(r#"<h2 id="guest-progress">The guest's progress</h2><div class="panel">"#);
    h.push_str(&guest_section(info, ctx));
    h.push_str("</div>");

    h.push_str("<h2>Where the downtime went</h2><div class=\"panel\">");
    h.push_str(&downtime_section(info, ctx));
    h.push_str("</div>");

    if !info.devices.is_empty() {
        h.push_str("<h2>Devices</h2>");
        h.push_str(&device_table(info));
    }

    h.push_str("<h2>Passes</h2>");
    h.push_str(&pass_table(&layout));

    let _ = writeln!(
        h,
        "<footer>ferry {} · figures from query-migrate; start times are laid out from the pass durations (see the ferry-vmm report module).</footer></main></body></html>",
        env!("CARGO_PKG_VERSION")
    );
    h
}

/// `SystemTime` as `YYYY-MM-DD HH:MM:SS UTC`, for [`ReportContext::finished_at`].
pub fn utc_timestamp(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_migration::engine::stats::RamStats;

    fn pass(pass: u32, pages: u64, ms: f64, dirty_after: u64, final_pass: bool) -> PassStats {
        let bytes = pages * 4108;
        PassStats {
            pass,
            pages,
            zero_pages: 0,
            bytes,
            duration_ms: ms,
            throughput_bytes_per_sec: bytes as f64 / (ms / 1e3),
            dirty_after,
            expected_downtime_ms: if final_pass {
                0.0
            } else {
                dirty_after as f64 * 4096.0 / (bytes as f64 / ms)
            },
            final_pass,
            ..PassStats::default()
        }
    }

    fn completed() -> MigrationInfo {
        MigrationInfo {
            status: MigrationStatus::Completed,
            total_time: 5230,
            setup_time: 14,
            downtime: Some(1234),
            expected_downtime: 900,
            ram: RamStats {
                transferred: 3 << 30,
                total: 4 << 30,
                duplicate: 13_645,
                normal: 786_432,
                page_size: 4096,
                ..RamStats::default()
            },
            passes: vec![
                pass(0, 262_144, 2100.0, 262_144, false),
                pass(1, 262_144, 1500.0, 250_000, false),
                pass(2, 250_000, 1300.0, 240_000, false),
                pass(3, 240_000, 1200.0, 0, true),
            ],
            downtime_breakdown: Some(DowntimeBreakdown {
                stop_ms: 0.4,
                final_pass_ms: 1200.0,
                devices_ms: 0.05,
                vcpus_ms: 0.2,
                verify_ms: 0.0,
                switchover_ms: 33.0,
                destination_resume_ms: 30.4,
            }),
            verified: Some("digest".into()),
            ..MigrationInfo::default()
        }
    }

    fn ctx() -> ReportContext {
        ReportContext {
            uri: Some("tcp:127.0.0.1:4444".into()),
            downtime_limit_ms: Some(2000),
            max_bandwidth: Some(0),
            finished_at: Some("2025-01-01 00:00:00 UTC".into()),
            guest: None,
        }
    }

    #[test]
    fn the_page_is_self_contained() {
        let h = render(&completed(), &ctx());
        assert!(h.starts_with("<!DOCTYPE html>"));
        assert!(h.trim_end().ends_with("</html>"));
        for external in ["<script", "src=", "href=", "@import", "url("] {
            assert!(!h.contains(external), "the page must not load {external}");
        }
        assert!(h.contains("<svg"));
        for broken in ["NaN", ">inf", "\"inf", "-inf"] {
            assert!(!h.contains(broken), "no broken numbers: {broken}");
        }
    }

    #[test]
    fn every_pass_is_on_the_page() {
        let info = completed();
        let h = render(&info, &ctx());
        for p in &info.passes {
            assert!(
                h.contains(&format!("<td class=\"num\">{}</td><td>", p.pass)),
                "pass {} has no table row",
                p.pass
            );
            assert!(
                h.contains(&format!("<title>pass {}", p.pass)),
                "pass {} is not on the timeline",
                p.pass
            );
            assert!(h.contains(&fmt_count(p.pages)));
        }
        assert!(h.contains("every pass (4)"));
        assert!(h.contains("stopped"), "the final pass is marked");
    }

    #[test]
    fn every_device_and_how_it_moved_is_on_the_page() {
        use ferry_migration::engine::DeviceStats;
        let mut info = completed();
        info.devices = vec![
            DeviceStats {
                name: "accel".into(),
                mode: "precopy".into(),
                precopy_capable: true,
                precopy_records: 260,
                precopy_bytes: 260 << 20,
                stop_copy_bytes: 45,
                acked_ms: Some(418),
                ..DeviceStats::default()
            },
            DeviceStats {
                name: "accel".into(),
                instance: 1,
                mode: "stop-copy".into(),
                reason: Some("the destination host cannot precopy it".into()),
                stop_copy_bytes: 64 << 20,
                ..DeviceStats::default()
            },
        ];
        let h = render(&info, &ctx());
        assert!(h.contains("<h2>Devices</h2>"));
        for want in [
            "<td>accel</td><td>precopy</td>",
            "260.0 MiB",
            "418 ms",
            "<td>accel1</td><td>stop-copy</td><td>the destination host cannot precopy it</td>",
            "64.0 MiB",
        ] {
            assert!(h.contains(want), "{want} missing");
        }
        assert!(!render(&completed(), &ctx()).contains("<h2>Devices</h2>"));
    }

    #[test]
    fn the_downtime_breakdown_is_on_the_page() {
        let h = render(&completed(), &ctx());
        for (name, _, what) in PARTS {
            assert!(h.contains(&escape(name)), "{name} missing");
            assert!(h.contains(&escape(what)));
        }
        assert!(h.contains("the final pass took the most"));
        assert!(h.contains("1.20 s"), "the final pass's time");
        // The switchover is split into the destination's own work and the rest.
        assert!(h.contains("<td class=\"num\">30 ms</td>"));
        assert!(h.contains("<td class=\"num\">2.6 ms</td>"));
        assert!(h.contains("limit 2.00 s"));
    }

    #[test]
    fn the_summary_figures_are_on_the_page() {
        let h = render(&completed(), &ctx());
        for s in [
            "5.23 s",
            "setup 14 ms",
            "1.23 s",
            "3.0 GiB",
            "786,432",
            "13,645",
            "digest",
            "tcp:127.0.0.1:4444",
        ] {
            assert!(h.contains(s), "{s} missing");
        }
    }

    #[test]
    fn it_says_why() {
        let h = render(&completed(), &ctx());
        assert!(h.contains("did not shrink the dirty set"), "{h}");
        assert!(h.contains("stopped the guest after pass 2"));

        let mut shrinking = completed();
        shrinking.passes[1].dirty_after = 1000;
        shrinking.passes[2].dirty_after = 10;
        let h = render(&shrinking, &ctx());
        assert!(h.contains("Each pass left fewer dirty pages"));
    }

    #[test]
    fn text_is_escaped() {
        let mut info = completed();
        info.status = MigrationStatus::Failed;
        info.error_desc = Some("<script>alert('x')</script> & \"more\"".into());
        let c = ReportContext {
            uri: Some("unix:/tmp/<b>.sock".into()),
            ..ctx()
        };
        let h = render(&info, &c);
        assert!(!h.contains("<script>"));
        assert!(!h.contains("<b>"));
        assert!(
            h.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;more&quot;")
        );
        assert!(h.contains("unix:/tmp/&lt;b&gt;.sock"));
        assert_eq!(escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
    }

    #[test]
    fn a_migration_that_never_switched_over() {
        let mut info = completed();
        info.status = MigrationStatus::Cancelled;
        info.error_desc = Some("migration cancelled".into());
        info.downtime = None;
        info.downtime_breakdown = None;
        info.passes.pop();
        let h = render(&info, &ctx());
        assert!(h.contains("never switched over"));
        assert!(h.contains("No downtime"));
        assert!(!h.contains("NaN"));
    }

    #[test]
    fn empty_and_many_passes_render() {
        let h = render(&MigrationInfo::default(), &ReportContext::default());
        assert!(h.contains("</html>") && !h.contains("NaN"));

        let mut info = completed();
        info.passes = (0..400)
            .map(|i| pass(i, 262_144, 1500.0, 262_144, false))
            .collect();
        info.total_time = 600_000;
        let h = render(&info, &ctx());
        assert!(h.contains("every pass (400)"));
        assert!(
            h.contains("<details><summary>"),
            "a long table starts folded"
        );
    }

    fn with_guest(g: GuestProgress) -> ReportContext {
        ReportContext {
            guest: Some(g),
            ..ctx()
        }
    }

    #[test]
    fn the_guest_progress_chart_shows_the_throttle() {
        let h = render(&completed(), &with_guest(progress::tests::throttled()));
        assert!(h.contains(r#"<h2 id="guest-progress">"#));
        assert!(h.contains("aria-label=\"guest pass rate and vCPU throttle over time\""));
        assert!(
            h.contains("made 400 passes/s."),
            "the rate before, in words"
        );
        assert!(h.contains("200/s in the time it ran at the source, 50% of that"));
        assert!(h.contains("throttling its vCPUs up to 40%"));
        assert!(h.contains("After, at the destination, it made 400/s."));
        // The throttle steps with the rate, 20% then 40%.
        assert_eq!(h.matches(r#"class="throttle""#).count(), 20);
        assert!(h.contains("<title>vCPUs throttled 20%</title>"));
        assert!(h.contains("<title>vCPUs throttled 40%</title>"));
        assert!(h.contains("0.00 s to 0.10 s: 200 passes/s, vCPUs throttled 20%"));
        assert!(h.contains("before 400/s"), "the baseline is drawn across");
        assert!(h.contains(">after, at the destination<"));
        assert!(h.contains(">-1000 ms<"), "the axis starts in the baseline");
        assert!(h.contains(">0 ms<") && !h.contains("-0 ms"));
        assert!(!h.contains("no throttle"));
        for broken in ["NaN", "inf"] {
            assert!(!h.contains(broken), "{broken}");
        }
    }

    #[test]
    fn a_dirty_limit_is_shaded() {
        let mut g = progress::tests::throttled();
        for s in &mut g.during {
            s.throttle_pct = 0;
            s.dirty_limited = s.t_ms >= 500.0;
        }
        let h = render(&completed(), &with_guest(g));
        assert!(h.contains("<title>dirty limit on</title>"));
        assert!(h.contains("with the dirty limit holding back vCPUs"));
        assert!(!h.contains(r#"class="throttle""#));
    }

    #[test]
    fn what_was_not_measured_is_said() {
        let g = GuestProgress {
            after: Vec::new(),
            after_note: Some("give --dest-qmp".into()),
            ..progress::tests::throttled()
        };
        let h = render(&completed(), &with_guest(g));
        assert!(h.contains("Its rate after the migration was not measured (give --dest-qmp)."));
        assert!(!h.contains(">after, at the destination<"));

        let g = GuestProgress {
            unmeasured: Some("the VM does not report its guest's passes".into()),
            ..GuestProgress::default()
        };
        let h = render(&completed(), &with_guest(g));
        assert!(h.contains("Not measured: the VM does not report"));
        let h = render(&completed(), &ctx());
        assert!(h.contains("Not measured: this report was made without readings"));
        // No throttle, no column for it.
        assert!(!h.contains(">throttle</th>"));
    }

    #[test]
    fn the_pass_table_shows_each_pass_throttle() {
        let mut info = completed();
        info.passes[1].cpu_throttle_percent = 20;
        info.passes[2].cpu_throttle_percent = 30;
        info.passes[2].dirty_limited = true;
        info.passes[2].throttle_us = 3200;
        let h = render(&info, &ctx());
        assert!(h.contains(">throttle</th>"));
        assert!(h.contains("<td>20%</td>"));
        assert!(h.contains("<td>30%, dirty limit, held 3.2 ms</td>"));
        assert_eq!(h.matches("<td>—</td>").count(), 2, "passes 0 and 3");
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_ms(0.4), "0.40 ms");
        assert_eq!(fmt_ms(4.25), "4.2 ms");
        assert_eq!(fmt_ms(187.2), "187 ms");
        assert_eq!(fmt_ms(2413.0), "2.41 s");
        assert_eq!(fmt_ms(738_984.0), "12 min 19 s");
        assert_eq!(fmt_ms(f64::NAN), "0.00 ms");
        assert_eq!(fmt_count(0), "0");
        assert_eq!(fmt_count(1234567), "1,234,567");
        assert_eq!(tick_step(5230.0, 10.0), 1000.0);
        assert_eq!(tick_step(267.0, 10.0), 50.0);
        assert_eq!(
            utc_timestamp(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)),
            "2023-11-14 22:13:20 UTC"
        );
    }
}
