//! ferry as a user drives it: `ferry run` processes talking QMP on unix sockets, and
//! `ferry migrate` / `ferry demo` / `ferry run` invocations checked by their exit status,
//! their output and what the VMs say over QMP afterwards.
//!
//! Every process a test starts is killed when the test ends, pass or fail, and every
//! wait has a time limit. Tests that start VMs run one at a time (see
//! [`common::serial`]). KVM tests print `skipped: ...` and pass when /dev/kvm is not
//! usable.

mod common;

use std::time::Duration;

use common::*;
use ferry_vmm::qmp::QmpClient;
use serde_json::Value;

/// A soft guest small enough to migrate in well under a second.
const SOFT: &[&str] = &["--backend", "soft", "--mem", "256M", "--dirty", "32M"];
const KVM: &[&str] = &["--backend", "kvm", "--mem", "256M", "--dirty", "32M"];
const KVM_2: &[&str] = &[
    "--backend",
    "kvm",
    "--vcpus",
    "2",
    "--mem",
    "256M",
    "--dirty",
    "16M",
];

/// Slow enough that a 32 MiB first pass takes over a second.
const SLOW: &str = "20M";

fn cat<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    [a, b].concat()
}

fn err_desc(v: &Value) -> String {
    v["error-desc"].as_str().unwrap_or_default().to_string()
}

/// Runs `ferry migrate --qmp SRC URI --json EXTRA` to a waiting destination and checks
/// what a user expects of a successful live migration: exit 0, `completed` with the
/// digest verified, the source `postmigrate` with its guest stopped, the destination
/// `running` with its guest carrying on past where the source stopped and every dirtied
/// page intact.
fn migrate_and_check(
    src: &mut Vm,
    s: &mut QmpClient,
    dst: &mut Vm,
    uri: &str,
    extra: &[&str],
    verified: &str,
) {
    let mut d = dst.qmp();
    assert_eq!(run_state(&mut d), "inmigrate", "{}", dst.ctx());
    let mut args = vec!["migrate", "--qmp", src.qmp_path(), uri, "--json"];
    args.extend(extra);
    let out = ferry(&args, MIGRATE_TIMEOUT);
    let ctx = format!("{out}{}{}", src.ctx(), dst.ctx());
    assert!(out.status.success(), "ferry migrate failed\n{ctx}");
    let last = out.last_json();
    assert_eq!(last["status"], "completed", "{ctx}");
    let v = last["verified"].as_str().unwrap_or_default();
    assert!(
        v.split('+').any(|x| x == "digest"),
        "verified {v:?} lacks the digest\n{ctx}"
    );
    assert_eq!(v, verified, "{ctx}");
    assert!(
        last["ram"]["transferred"].as_u64().unwrap_or(0) > 0,
        "{ctx}"
    );

    assert_eq!(run_state(s), "postmigrate", "{ctx}");
    let src_final = passes(s);
    let beyond = wait_passes_beyond(&mut d, &src_final, "destination");
    wait_passes_beyond(&mut d, &beyond, "destination");
    assert_guest_intact(&mut d, "destination");
    assert_eq!(run_state(&mut d), "running", "{}", dst.ctx());
    assert_eq!(
        passes(s),
        src_final,
        "the source's guest ran after it migrated away{ctx}"
    );
    // The source's own record of it agrees with the command's.
    let q = query_migrate(s);
    assert_eq!(q["status"], "completed", "{q}");
}

/// A source and a waiting destination with the same arguments, the source's guest
/// already making progress.
fn pair(dir: &TestDir, vm: &[&str], src_extra: &[&str]) -> (Vm, QmpClient, Vm, String) {
    let mut src = Vm::start(dir, "source", &cat(vm, src_extra));
    let dst = Vm::incoming(dir, "destination", vm);
    let uri = dst.uri();
    let mut s = src.qmp();
    assert_eq!(run_state(&mut s), "running", "{}", src.ctx());
    assert_guest_progresses(&mut s, "source");
    (src, s, dst, uri)
}

fn live_migration(name: &str, vm: &[&str], src_extra: &[&str], verified: &str) {
    let _one_at_a_time = serial();
    let dir = TestDir::new(name);
    let (mut src, mut s, mut dst, uri) = pair(&dir, vm, src_extra);
    migrate_and_check(&mut src, &mut s, &mut dst, &uri, &[], verified);
    // Both processes leave cleanly on `quit`.
    let mut d = dst.qmp();
    for (vm, c) in [(&mut src, &mut s), (&mut dst, &mut d)] {
        let _ = c.execute("quit", Value::Null);
        let st = vm.wait_exit(Duration::from_secs(10));
        assert!(
            st.is_some_and(|s| s.success()),
            "{} exited with {st:?} after quit{}",
            vm.name,
            vm.ctx()
        );
    }
}

#[test]
fn live_migration_soft() {
    live_migration(
        "live-soft",
        SOFT,
        &["-global", "migration.verify-full=on"],
        "digest+full",
    );
}

#[test]
fn live_migration_kvm() {
    if !kvm_or_skip() {
        return;
    }
    live_migration("live-kvm", KVM, &[], "digest");
}

#[test]
fn live_migration_kvm_two_vcpus() {
    if !kvm_or_skip() {
        return;
    }
    live_migration("live-kvm-2", KVM_2, &[], "digest");
}

/// Waits until the source's migration is active and has moved some RAM.
fn wait_ram_moving(s: &mut QmpClient) -> Value {
    wait_for(
        Duration::from_secs(20),
        || "the migration to move RAM".to_string(),
        || {
            let q = query_migrate(s);
            let moving =
                q["status"] == "active" && q["ram"]["transferred"].as_u64().unwrap_or(0) > 1 << 20;
            moving.then_some(q)
        },
    )
}

/// The destination dies (SIGKILL) mid-migration: `ferry migrate` fails naming the
/// destination, the source's guest never stopped and is intact, and the next migration
/// to a fresh destination succeeds.
fn destination_killed(name: &str, vm: &[&str]) {
    let _one_at_a_time = serial();
    let dir = TestDir::new(name);
    let (mut src, mut s, mut dst, uri) = pair(&dir, vm, &[]);
    let mig = spawn_ferry(&[
        "migrate",
        "--qmp",
        src.qmp_path(),
        &uri,
        "--json",
        "--max-bandwidth",
        SLOW,
    ]);
    let during = wait_ram_moving(&mut s);
    assert_eq!(
        during["passes"].as_array().map_or(0, Vec::len),
        0,
        "first pass already over; the bandwidth cap did not hold: {during}"
    );
    dst.kill();
    let out = mig.finish(MIGRATE_TIMEOUT);
    let ctx = format!("{out}{}{}", src.ctx(), dst.ctx());
    assert!(!out.status.success(), "ferry migrate succeeded\n{ctx}");
    let last = out.last_json();
    assert_eq!(last["status"], "failed", "{ctx}");
    let e = err_desc(&last);
    assert!(
        e.contains("destination") || e.contains(&uri),
        "the error does not name the destination: {e:?}\n{ctx}"
    );

    assert_eq!(run_state(&mut s), "running", "{ctx}");
    assert_guest_progresses(&mut s, "source");
    assert_guest_intact(&mut s, "source");
    assert_eq!(query_migrate(&mut s)["status"], "failed");

    let mut dst2 = Vm::incoming(&dir, "destination2", vm);
    let uri2 = dst2.uri();
    migrate_and_check(
        &mut src,
        &mut s,
        &mut dst2,
        &uri2,
        &["--max-bandwidth", "0"],
        "digest",
    );
}

#[test]
fn destination_killed_mid_migration_soft() {
    destination_killed("killed-soft", SOFT);
}

#[test]
fn destination_killed_mid_migration_kvm() {
    if !kvm_or_skip() {
        return;
    }
    destination_killed("killed-kvm", KVM);
}
