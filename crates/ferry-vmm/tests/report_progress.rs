//! `ferry migrate` measures what a migration costs the guest: its pass rate before the
//! migration, while it migrates and after, at the destination, in the summary, in the
//! JSON object and in the HTML report.

mod common;

use common::*;

/// A soft guest small enough to migrate in well under a second.
const SOFT: &[&str] = &["--backend", "soft", "--mem", "256M", "--dirty", "32M"];

#[test]
fn the_guest_progress_before_during_and_after_is_reported() {
    let _one_at_a_time = serial();
    let dir = TestDir::new("guest-progress");
    let mut src = Vm::start(&dir, "source", SOFT);
    let dst = Vm::incoming(&dir, "destination", SOFT);
    let uri = dst.uri();
    let mut s = src.qmp();
    assert_guest_progresses(&mut s, "source");
    let report = dir.join("report.html");
    let report = report.to_str().expect("utf-8 temp path");
    let out = ferry(
        &[
            "migrate",
            "--qmp",
            src.qmp_path(),
            &uri,
            "--report",
            report,
            "--dest-qmp",
            dst.qmp_path(),
            "--json",
        ],
        MIGRATE_TIMEOUT,
    );
    let ctx = format!("{out}{}{}", src.ctx(), dst.ctx());
    assert!(out.status.success(), "ferry migrate failed\n{ctx}");
    let last = out.last_json();
    assert_eq!(last["status"], "completed", "{ctx}");
    let g = &last["guest-progress"];
    for phase in ["before", "during", "after"] {
        let rate = g[phase].as_f64().unwrap_or(0.0);
        assert!(rate > 0.0, "no {phase} rate in {g}\n{ctx}");
    }
    let share = g["during-share"].as_f64().unwrap_or(-1.0);
    assert!(share > 0.0, "{g}");
    let samples = g["samples"].as_array().expect("samples");
    // About ten readings in the one-second baseline, ten after, some during.
    assert!(samples.len() >= 15, "{g}");
    let times: Vec<i64> = samples.iter().map(|s| s[0].as_i64().unwrap()).collect();
    assert!(times[0] < 0, "the baseline comes first: {g}");
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{g}");
    let end = g["migration-ms"].as_i64().unwrap();
    assert!(
        *times.last().unwrap() > end,
        "the destination comes last: {g}"
    );
    assert!(g.get("after-note").is_none(), "{g}");

    let html = std::fs::read_to_string(report).expect("the report was written");
    assert!(html.contains(r#"<h2 id="guest-progress">"#), "{ctx}");
    assert!(
        html.contains("aria-label=\"guest pass rate and vCPU throttle over time\""),
        "{ctx}"
    );
    assert!(
        html.contains("After, at the destination, it made "),
        "{ctx}"
    );
}
