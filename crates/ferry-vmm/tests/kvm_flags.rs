//! `ferry run`'s workload flags on the KVM backend, as a user runs them: `--dirty 0` (an
//! idle guest), `--dirty-rate` (a paced guest) and `--fill`, each shown to do what it
//! says by what a migration of the guest sends or by the guest's own progress, and each
//! guest migrated and found intact. The flag combinations that would do nothing are
//! refused by name.
//!
//! Tests that start VMs run one at a time ([`common::serial`]). Each prints
//! `skipped: ...` and passes when /dev/kvm is not usable.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ferry_vmm::qmp::QmpClient;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// A small KVM guest whose every migration the destination checks page by page.
const KVM: &[&str] = &[
    "--backend",
    "kvm",
    "--mem",
    "128M",
    "-global",
    "migration.verify-full=on",
];

/// Time to see a paced guest's rate in its pass counter.
const RATE_WINDOW: Duration = Duration::from_millis(1500);

fn cat<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    [a, b].concat()
}

/// Migrates `src` to the waiting destination at `uri` with `ferry migrate --json` and
/// checks it completed with memory verified in full; returns the command's final object.
fn migrate(src: &Vm, dst: &Vm, uri: &str, extra: &[&str]) -> Value {
    let mut args = vec!["migrate", "--qmp", src.qmp_path(), uri, "--json"];
    args.extend(extra);
    let out = ferry(&args, MIGRATE_TIMEOUT);
    let ctx = format!("{out}{}{}", src.ctx(), dst.ctx());
    assert!(out.status.success(), "ferry migrate failed\n{ctx}");
    let last = out.last_json();
    assert_eq!(last["status"], "completed", "{ctx}");
    assert_eq!(last["verified"], "digest+full", "{ctx}");
    last
}

fn passes_of(info: &Value) -> &Vec<Value> {
    info["passes"]
        .as_array()
        .unwrap_or_else(|| panic!("no passes in {info}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// The destination's guest runs on past where the source's stopped.
fn carries_on(s: &mut QmpClient, d: &mut QmpClient) {
    assert_eq!(run_state(s), "postmigrate");
    let at_stop = passes(s);
    wait_passes_beyond(d, &at_stop, "destination");
    assert_eq!(run_state(d), "running");
}

/// Pages a second vCPU 0 of the guest writes, from its pass counter over `window`, for
/// a range of `range_pages`.
fn pages_per_sec(c: &mut QmpClient, range_pages: u64, window: Duration) -> f64 {
    let (p0, t0) = (passes(c)[0], Instant::now());
    thread::sleep(window);
    let (p1, t1) = (passes(c)[0], Instant::now());
    (p1 - p0) as f64 * range_pages as f64 / (t1 - t0).as_secs_f64()
}

/// An idle guest migrates: `(pass 0, the final pass, the ram counters)` of the
/// migration and the destination's `x-ferry-verify`.
fn migrate_idle(name: &str, fill: &str) -> (Value, Value, Value, Value) {
    let dir = TestDir::new(name);
    let mut src = Vm::start(&dir, "source", &cat(KVM, &["--dirty", "0", "--fill", fill]));
    let mut dst = Vm::incoming(&dir, "destination", &cat(KVM, &["--dirty", "0"]));
    let uri = dst.uri();
    let mut s = src.qmp();
    assert_eq!(run_state(&mut s), "running", "{}", src.ctx());
    // Idle, and still running: its passes go on.
    assert_guest_progresses(&mut s, "source");
    let info = migrate(&src, &dst, &uri, &[]);
    let mut d = dst.qmp();
    carries_on(&mut s, &mut d);
    let verify = exec(&mut d, "x-ferry-verify", Value::Null);
    assert_eq!(u(&verify, "pages-wrong"), 0, "{verify}");
    let p = passes_of(&info);
    let last = p.last().unwrap().clone();
    assert_eq!(last["final-pass"], true, "{info}");
    (p[0].clone(), last, info["ram"].clone(), verify)
}

#[test]
fn kvm_idle_guest_counts_passes_and_migrates_in_one_pass() {
    if !kvm_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    let (first, last, ram, verify) = migrate_idle("kvm-idle", "0");
    println!(
        "idle: pass 0 {} pages, {} dirty after it; final pass {} pages; {} bytes of data",
        u(&first, "pages"),
        u(&first, "dirty-after"),
        u(&last, "pages"),
        u(&ram, "normal-bytes")
    );
    // Pass 0 sends what the guest ever touched (its low slot: tables, code, its control
    // page); after it, the guest dirties its pass counter's page and nothing else.
    assert!(u(&first, "dirty-after") <= 8, "pass 0: {first}");
    assert!(u(&last, "pages") <= 8, "the final pass: {last}");
    assert!(u(&ram, "normal-bytes") < MIB, "{ram}");
    assert_eq!(u(&verify, "pages-checked"), 0, "nothing to check: {verify}");
}

#[test]
fn kvm_fill_is_sent_in_the_first_pass_and_checked_after_migration() {
    if !kvm_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    let fill = 32 * MIB;
    let (bare, _, _, _) = migrate_idle("kvm-fill-none", "0");
    let (first, last, ram, verify) = migrate_idle("kvm-fill", "32M");
    // The fill is non-zero data, so it all goes with its data, in pass 0, and once
    // (with the low-slot page that says where it is).
    let sent = |p: &Value| (u(p, "pages") - u(p, "zero-pages")) * PAGE;
    let (with, without) = (sent(&first), sent(&bare));
    println!("pass 0 sent {with} bytes with --fill 32M, {without} without");
    assert!(
        with >= without + fill && with <= without + fill + 4 * PAGE,
        "pass 0 sent {with} bytes of data with the fill, {without} without: {first}"
    );
    assert!(u(&ram, "normal-bytes") >= fill, "{ram}");
    assert!(u(&last, "pages") <= 8, "the final pass: {last}");
    // The destination checked every page of the fill against the data written there.
    assert_eq!(u(&verify, "pages-checked"), fill / PAGE, "{verify}");
}

#[test]
fn kvm_dirty_rate_paces_the_guest_and_moves_with_it() {
    if !kvm_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    let dir = TestDir::new("kvm-rate");
    let (range, rate) = (2 * MIB / PAGE, 4000.0);
    let guest = cat(KVM, &["--dirty", "2M"]);

    // Unpaced, the same guest runs as fast as the host lets it.
    let mut fast = Vm::start(&dir, "unpaced", &guest);
    let mut f = fast.qmp();
    assert_guest_progresses(&mut f, "unpaced");
    let unpaced = pages_per_sec(&mut f, range, Duration::from_millis(500));
    fast.kill();

    let mut src = Vm::start(&dir, "source", &cat(&guest, &["--dirty-rate", "4000"]));
    let mut dst = Vm::incoming(&dir, "destination", &guest);
    let uri = dst.uri();
    let mut s = src.qmp();
    assert_guest_progresses(&mut s, "source");
    let paced = pages_per_sec(&mut s, range, RATE_WINDOW);
    println!("unpaced {unpaced:.0} pages/s; --dirty-rate 4000: {paced:.0} pages/s");
    assert!(
        paced > rate * 0.6 && paced < rate * 1.4,
        "--dirty-rate 4000 wrote {paced:.0} pages/s{}",
        src.ctx()
    );
    assert!(
        unpaced > paced * 5.0,
        "unpaced {unpaced:.0} pages/s is not clearly faster than paced {paced:.0}"
    );

    let info = migrate(&src, &dst, &uri, &[]);
    // Each pass after the first sends what the guest wrote meanwhile: at 4000 pages a
    // second, far less than its whole range.
    let p = passes_of(&info);
    let last = p.last().unwrap();
    assert!(u(last, "pages") < range, "the final pass: {last}");
    let mut d = dst.qmp();
    carries_on(&mut s, &mut d);
    // The rate came with the guest: the destination was not told it.
    let there = pages_per_sec(&mut d, range, RATE_WINDOW);
    println!("at the destination: {there:.0} pages/s");
    assert!(
        there > rate * 0.6 && there < rate * 1.4,
        "the destination's guest wrote {there:.0} pages/s{}",
        dst.ctx()
    );
    assert_guest_intact(&mut d, "destination");
    let verify = exec(&mut d, "x-ferry-verify", Value::Null);
    assert_eq!(u(&verify, "pages-checked"), range, "{verify}");
}

#[test]
fn kvm_workload_flags_that_cannot_be_honoured_are_refused_by_name() {
    if !kvm_or_skip() {
        return;
    }
    let refused = |args: &[&str], want: &str| {
        let out = ferry(&cat(&["run", "--backend", "kvm"], args), MIGRATE_TIMEOUT);
        assert!(!out.status.success(), "{out}");
        assert!(out.stderr.contains(want), "wanted {want:?}\n{out}");
    };
    refused(
        &["--dirty", "0", "--dirty-rate", "100"],
        "--dirty-rate 100 paces the pages the guest dirties, and --dirty 0",
    );
    refused(
        &["--fill", "8M", "--incoming", "tcp:127.0.0.1:0"],
        "--fill is not supported with --incoming",
    );
    refused(
        &["--dirty-rate", "100", "--incoming", "tcp:127.0.0.1:0"],
        "--dirty-rate is not supported with --incoming",
    );
    refused(
        &[
            "--mem", "64M", "--vcpus", "2", "--dirty", "16M", "--fill", "40M",
        ],
        "(--fill 40.0 MiB) do not fit in guest RAM (--mem 64.0 MiB)",
    );
    refused(
        &["--fill", "1000"],
        "--fill 1000) must be a multiple of 4 KiB",
    );

    let help = ferry(&["run", "--help"], MIGRATE_TIMEOUT);
    assert!(help.status.success(), "{help}");
    for says in [
        "on KVM its vCPUs still count passes",
        "soft: the vCPU thread sleeps between chunks of 64 pages; KVM: the guest reports",
        "the same data on both backends",
    ] {
        assert!(help.stdout.contains(says), "--help lacks {says:?}\n{help}");
    }
}
