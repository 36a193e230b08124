//! Device precopy and the per-device switchover acknowledgement, in process: two soft
//! VMs with accelerators and the real engine on both sides over loopback TCP.
//!
//! The heart of it is the seed thread's question (`shared/000_b3b278e6b9876b84.txt`):
//! whether a device can precopy depends on the host, not only on the release, so two
//! hosts of one release can disagree, device by device. Every combination must either
//! complete, with memory and device state verified, or be refused before RAM moves; none
//! may wait for a message the other side will never send. [`the_no_hang_matrix`] runs all
//! of them for two accelerators on both machine types, and the tests after it break the
//! rule on purpose to show the checks that guard it can fail.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ferry_migration::compat::Config;
use ferry_migration::engine::vm::MigratableVm;
use ferry_migration::engine::{
    self, error_chain, DestinationIdentity, DeviceStats, Faults, HandoverPoint, MigrationError,
    MigrationInfo, MigrationMonitor, MigrationParams, MigrationStatus, SourceIdentity,
};
use ferry_vmm::devices::accel::{AccelConfig, MigState};
use ferry_vmm::guest::GuestVm;
use ferry_vmm::machine;
use ferry_vmm::soft::{SoftConfig, SoftVm};
use ferry_vmm::transport::{Listener, MigrationUri};

const MIB: u64 = 1 << 20;
/// No cell of the matrix may take longer (they take a fraction of a second).
const CELL_BOUND: Duration = Duration::from_secs(20);

/// A machine type's configuration, as `ferry run --machine NAME` has it.
fn config(machine: &str) -> Config {
    machine::registry().configure(machine, &[]).unwrap()
}

fn source_id(c: &Config) -> SourceIdentity {
    SourceIdentity {
        release: machine::RELEASE.into(),
        machine: c.machine().into(),
        wire_props: c.wire_properties(),
        compat_pinned: c.compat_pinned_wire_properties(),
    }
}

fn dest_id(c: &Config) -> DestinationIdentity {
    DestinationIdentity {
        release: machine::RELEASE.into(),
        machine: c.machine().into(),
        known_machines: machine::machine_names(),
        wire_props: c.wire_properties(),
        compat_pinned: c.compat_pinned_wire_properties(),
    }
}

fn params(c: &Config) -> MigrationParams {
    MigrationParams {
        verify_full: true,
        ..MigrationParams::from_config(c).unwrap()
    }
}

/// Two accelerators of different drivers: `x` with 4 MiB, `y` with 2 MiB, each with
/// its host's precopy switch.
fn accels(x: bool, y: bool) -> Vec<AccelConfig> {
    vec![
        AccelConfig {
            size: 4 * MIB,
            driver: "x".into(),
            precopy: x,
        },
        AccelConfig {
            size: 2 * MIB,
            driver: "y".into(),
            precopy: y,
        },
    ]
}

fn vm(incoming: bool, accels: Vec<AccelConfig>) -> Arc<SoftVm> {
    Arc::new(
        SoftVm::create(&SoftConfig {
            mem_size: 32 * MIB,
            dirty_size: 2 * MIB,
            incoming,
            console_every: 50,
            accels,
            ..SoftConfig::default()
        })
        .unwrap(),
    )
}

fn wait_passes(vm: &SoftVm, n: u64) {
    let t = Instant::now();
    while vm.report().passes[0] < n {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "guest made no progress"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// What one migration gave on both sides.
struct Run {
    source: Result<MigrationInfo, MigrationError>,
    destination: Result<MigrationInfo, MigrationError>,
    took: Duration,
}

/// Migrates `src` into `dst` with the given identities, parameters and faults, and a
/// watchdog that cancels both sides past [`CELL_BOUND`].
#[allow(clippy::too_many_arguments)]
fn migrate(
    src: &Arc<SoftVm>,
    dst: &Arc<SoftVm>,
    sid: &SourceIdentity,
    sp: &MigrationParams,
    did: &DestinationIdentity,
    dp: &MigrationParams,
    source_faults: Faults,
    dest_faults: Faults,
) -> Run {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri: MigrationUri = l.local_uri().unwrap();
    let dm = Arc::new(MigrationMonitor::new());
    dm.set_faults(dest_faults);
    let (dvm, did2, dp2, dm2) = (Arc::clone(dst), did.clone(), dp.clone(), Arc::clone(&dm));
    let dest = thread::spawn(move || engine::receive(dvm.as_ref(), &did2, &dp2, l, &dm2));
    let sm = Arc::new(MigrationMonitor::new());
    sm.set_faults(source_faults);
    let done = Arc::new(Mutex::new(false));
    let (sm2, dm3, done2) = (Arc::clone(&sm), Arc::clone(&dm), Arc::clone(&done));
    let watchdog = thread::spawn(move || {
        let t = Instant::now();
        while !*done2.lock().unwrap() {
            if t.elapsed() > CELL_BOUND {
                let _ = sm2.cancel();
                let _ = dm3.cancel();
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    let t = Instant::now();
    let source = engine::migrate(src.as_ref(), sid, sp, &uri, &sm);
    let destination = dest.join().unwrap();
    let took = t.elapsed();
    *done.lock().unwrap() = true;
    watchdog.join().unwrap();
    Run {
        source,
        destination,
        took,
    }
}

fn device(info: &MigrationInfo, instance: u32) -> &DeviceStats {
    info.devices
        .iter()
        .find(|d| d.name == "accel" && d.instance == instance)
        .unwrap_or_else(|| panic!("no accel {instance} in {:?}", info.devices))
}

/// The guest carries on at the destination with its memory, and each accelerator runs
/// there with the memory its source saved.
fn assert_arrived_whole(src: &SoftVm, dst: &SoftVm) -> Result<(), String> {
    let at_stop = src.report().passes[0];
    let t = Instant::now();
    while dst.report().passes[0] < at_stop + 5 {
        if t.elapsed() > Duration::from_secs(10) {
            return Err("the guest does not run on at the destination".into());
        }
        thread::sleep(Duration::from_millis(2));
    }
    let (checked, bad) = dst.verify().map_err(|e| error_chain(&e))?;
    if checked == 0 || bad != 0 {
        return Err(format!("{bad} of {checked} pages wrong at the destination"));
    }
    for (i, (s, d)) in src.accels().iter().zip(dst.accels().iter()).enumerate() {
        let (si, di) = (s.info(), d.info());
        if si.saved_digest.is_none() || di.loaded_digest != si.saved_digest {
            return Err(format!(
                "accelerator {i}: saved {:?} at the source, loaded {:?} here",
                si.saved_digest, di.loaded_digest
            ));
        }
        if d.state() != MigState::Running || s.state() != MigState::Stop {
            return Err(format!(
                "accelerator {i}: {} at the source, {} here",
                s.state(),
                d.state()
            ));
        }
    }
    dst.pause().map_err(|e| error_chain(&e))?;
    for (i, d) in dst.accels().iter().enumerate() {
        d.check_pattern()
            .map_err(|e| format!("accelerator {i}: {e}"))?;
    }
    dst.resume().map_err(|e| error_chain(&e))?;
    Ok(())
}

/// A sound migration of `src` into `dst` on `machine`, without faults: both sides
/// complete and the guest and its accelerators arrive whole. Returns the source's info.
fn migrate_whole(src: &Arc<SoftVm>, dst: &Arc<SoftVm>, machine: &str) -> MigrationInfo {
    let c = config(machine);
    let p = params(&c);
    let r = migrate(
        src,
        dst,
        &source_id(&c),
        &p,
        &dest_id(&c),
        &p,
        Faults::NONE,
        Faults::NONE,
    );
    let info = r.source.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    r.destination
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_arrived_whole(src, dst).unwrap();
    info
}

/// How a device should move: precopy where the machine type allows it and both hosts
/// can, stop-copy otherwise, with the reason a user reads.
fn expected(ack_on: bool, src: bool, dst: bool) -> (&'static str, Option<&'static str>) {
    match (ack_on, src, dst) {
        (true, true, true) => ("precopy", None),
        (true, true, false) => ("stop-copy", Some("the destination host cannot precopy it")),
        (true, false, true) => ("stop-copy", Some("the source host cannot precopy it")),
        (true, false, false) => ("stop-copy", Some("neither host can precopy it")),
        (false, true, _) => ("stop-copy", Some("migration.switchover-ack is off")),
        (false, false, _) => ("stop-copy", Some("the source host cannot precopy it")),
    }
}

/// Every combination of machine type and, for each of two accelerators, source host
/// precopy and destination host precopy: 2 x 16 cells, each completing with memory,
/// device memory and device state verified, each device moving as the negotiation says
/// and saying why, none past a bounded time. (The cells across releases, with the real
/// 0.1.0 binary, are in `cross_release.rs`.)
#[test]
fn the_no_hang_matrix() {
    let mut table = Vec::new();
    let mut failed = Vec::new();
    for machine in ["ferry-0.1", "ferry-0.2"] {
        let c = config(machine);
        let p = params(&c);
        for bits in 0..16u8 {
            let (sx, dx, sy, dy) = (bits & 8 != 0, bits & 4 != 0, bits & 2 != 0, bits & 1 != 0);
            let name = format!(
                "{machine}, accel x precopy src {} dst {}, accel y precopy src {} dst {}",
                on(sx),
                on(dx),
                on(sy),
                on(dy)
            );
            let src = vm(false, accels(sx, sy));
            wait_passes(&src, 20);
            let dst = vm(true, accels(dx, dy));
            let r = migrate(
                &src,
                &dst,
                &source_id(&c),
                &p,
                &dest_id(&c),
                &p,
                Faults::NONE,
                Faults::NONE,
            );
            let check = || -> Result<String, String> {
                let s = r
                    .source
                    .as_ref()
                    .map_err(|e| format!("source: {}", error_chain(e)))?;
                let d = r
                    .destination
                    .as_ref()
                    .map_err(|e| format!("destination: {}", error_chain(e)))?;
                if s.status != MigrationStatus::Completed
                    || s.verified.as_deref() != Some("digest+full")
                {
                    return Err(format!("source {:?}, verified {:?}", s.status, s.verified));
                }
                let state = if machine == "ferry-0.2" {
                    "digest"
                } else {
                    "none"
                };
                if s.state_verified.as_deref() != Some(state)
                    || d.state_verified.as_deref() != Some(state)
                {
                    return Err(format!(
                        "state verified {:?} / {:?}, not {state}",
                        s.state_verified, d.state_verified
                    ));
                }
                let ack_on = machine == "ferry-0.2";
                let mut modes = Vec::new();
                for (i, (hs, hd)) in [(sx, dx), (sy, dy)].into_iter().enumerate() {
                    let (mode, why) = expected(ack_on, hs, hd);
                    for (side, info) in [("source", s), ("destination", d)] {
                        let dev = device(info, i as u32);
                        if dev.mode != mode {
                            return Err(format!(
                                "{side}: accel {i} moved as {}, not {mode}",
                                dev.mode
                            ));
                        }
                        // The destination says why from its own view; with switchover-ack
                        // off it does not hear the source's offers.
                        if side == "source" || ack_on {
                            let reason_ok = match why {
                                None => dev.reason.is_none(),
                                Some(w) => dev.reason.as_deref().is_some_and(|r| r.starts_with(w)),
                            };
                            if !reason_ok {
                                return Err(format!(
                                    "{side}: accel {i}: reason {:?}, not {why:?}",
                                    dev.reason
                                ));
                            }
                        }
                    }
                    let dev = device(s, i as u32);
                    if mode == "precopy" {
                        let size = [4 * MIB, 2 * MIB][i];
                        if dev.acked_ms.is_none() || dev.precopy_bytes < size {
                            return Err(format!(
                                "accel {i}: precopy without its data or acknowledgement: {dev:?}"
                            ));
                        }
                        if dev.stop_copy_bytes > MIB {
                            return Err(format!(
                                "accel {i}: {} bytes at stop-copy after precopy",
                                dev.stop_copy_bytes
                            ));
                        }
                    } else if dev.precopy_bytes != 0 || dev.acked_ms.is_some() {
                        return Err(format!(
                            "accel {i}: stop-copy with precopy traffic: {dev:?}"
                        ));
                    }
                    modes.push(mode);
                }
                assert_arrived_whole(&src, &dst)?;
                Ok(format!(
                    "{} / {}, downtime {} ms",
                    modes[0],
                    modes[1],
                    s.downtime.unwrap_or(0)
                ))
            };
            let outcome = check();
            if r.took > CELL_BOUND {
                failed.push(format!("{name}: took {:?}", r.took));
            }
            match &outcome {
                Ok(what) => table.push(format!(
                    "| {name} | completed: {what} | {:.0} ms |",
                    r.took.as_secs_f64() * 1e3
                )),
                Err(e) => {
                    table.push(format!(
                        "| {name} | FAILED: {e} | {:.0} ms |",
                        r.took.as_secs_f64() * 1e3
                    ));
                    failed.push(format!("{name}: {e}"));
                }
            }
        }
    }
    println!(
        "| cell | outcome | time |\n|---|---|---|\n{}",
        table.join("\n")
    );
    assert!(
        failed.is_empty(),
        "{} cells failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// A 32 MiB accelerator that its device thread keeps rewriting: with precopy nearly all
/// of its memory moves while the guest runs, and the downtime carries only what it
/// changed since; as stop-copy all of it waits for the downtime.
#[test]
fn precopy_takes_a_devices_memory_out_of_the_downtime() {
    let mut moved = Vec::new();
    for precopy in [true, false] {
        let big = vec![AccelConfig::new(32 * MIB, precopy)];
        let src = vm(false, big.clone());
        wait_passes(&src, 20);
        let s = migrate_whole(&src, &vm(true, big), "ferry-0.2");
        let d = device(&s, 0).clone();
        assert_eq!(d.mode, if precopy { "precopy" } else { "stop-copy" });
        moved.push(d);
    }
    let (pre, stop) = (&moved[0], &moved[1]);
    assert!(pre.precopy_bytes >= 32 * MIB, "{pre:?}");
    assert!(
        pre.stop_copy_bytes + pre.final_precopy_bytes < 4 * MIB,
        "precopy left {} bytes for the downtime",
        pre.stop_copy_bytes + pre.final_precopy_bytes
    );
    assert!(stop.stop_copy_bytes >= 32 * MIB, "{stop:?}");
    assert_eq!(stop.precopy_bytes, 0);
}

/// The source stops the guest only once every device in precopy is acknowledged: with
/// the destination holding its acknowledgement back, the guest stops after it arrives.
/// Broken on purpose (switch over without waiting), the same run stops the guest before.
#[test]
fn the_guest_stops_only_after_every_acknowledgement() {
    let c = config("ferry-0.2");
    let p = params(&c);
    for broken in [false, true] {
        let src = vm(false, accels(true, true));
        wait_passes(&src, 20);
        let dst = vm(true, accels(true, true));
        let stopped_unacked = Arc::new(Mutex::new(None));
        let r = {
            let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
            let uri = l.local_uri().unwrap();
            let dm = MigrationMonitor::new();
            dm.set_faults(Faults {
                delay_ack: Some(Duration::from_millis(400)),
                ..Faults::NONE
            });
            let (dvm, did, dp) = (Arc::clone(&dst), dest_id(&c), p.clone());
            let dest = thread::spawn(move || engine::receive(dvm.as_ref(), &did, &dp, l, &dm));
            let sm = Arc::new(MigrationMonitor::new());
            sm.set_faults(Faults {
                switch_without_ack: broken,
                ..Faults::NONE
            });
            let (sm2, seen) = (Arc::clone(&sm), Arc::clone(&stopped_unacked));
            sm.set_probe(move |pt| {
                if pt == HandoverPoint::GuestStopped {
                    let unacked = sm2
                        .info()
                        .devices
                        .iter()
                        .filter(|d| d.mode == "precopy" && d.acked_ms.is_none())
                        .count();
                    *seen.lock().unwrap() = Some(unacked);
                }
            });
            let s = engine::migrate(src.as_ref(), &source_id(&c), &p, &uri, &sm);
            (s, dest.join().unwrap())
        };
        let unacked = stopped_unacked.lock().unwrap().expect("the guest stopped");
        if broken {
            assert!(
                unacked > 0,
                "the broken rule waited anyway: the test shows nothing"
            );
        } else {
            let s = r.0.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
            r.1.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
            assert_eq!(
                unacked, 0,
                "the guest stopped before every acknowledgement came"
            );
            assert!(device(&s, 0).acked_ms.unwrap() >= 400, "{:?}", s.devices);
            assert_arrived_whole(&src, &dst).unwrap();
        }
    }
}

/// A destination that never acknowledges cannot hold the source forever: it fails,
/// naming the device, the guest and its accelerators run on at the source, and a retry
/// to a sound destination completes.
#[test]
fn a_missing_acknowledgement_fails_in_bounded_time_and_a_retry_completes() {
    let c = config("ferry-0.2");
    let p = params(&c);
    let src = vm(false, accels(true, false));
    wait_passes(&src, 20);
    let dst = vm(true, accels(true, false));
    let r = migrate(
        &src,
        &dst,
        &source_id(&c),
        &p,
        &dest_id(&c),
        &p,
        Faults {
            ack_timeout: Some(Duration::from_millis(500)),
            ..Faults::NONE
        },
        Faults {
            delay_ack: Some(Duration::MAX),
            ..Faults::NONE
        },
    );
    let e = r.source.unwrap_err();
    assert!(
        matches!(&e, MigrationError::NoAck { device, .. } if device == "accel instance 0"),
        "{}",
        error_chain(&e)
    );
    assert!(r.took < Duration::from_secs(10), "{:?}", r.took);
    let de = r.destination.unwrap_err();
    assert!(
        error_chain(&de).contains("acknowledge"),
        "{}",
        error_chain(&de)
    );
    assert!(src.is_running() && !dst.is_running());
    for a in src.accels().iter() {
        assert_eq!(
            a.state(),
            MigState::Running,
            "left in precopy after the failure"
        );
    }
    let before = src.accels().get(0).unwrap().info().generation;
    thread::sleep(Duration::from_millis(100));
    assert!(src.accels().get(0).unwrap().info().generation > before);

    migrate_whole(&src, &vm(true, accels(true, false)), "ferry-0.2");
}

/// A cancel while a device precopies leaves the source whole (guest and accelerators
/// running, out of PRE_COPY), the destination's device not runnable, and a retry
/// completes.
#[test]
fn a_cancel_during_device_precopy_leaves_the_source_whole() {
    let c = config("ferry-0.2");
    let p = MigrationParams {
        // Slow enough that the cancel lands while the accelerator's data moves.
        max_bandwidth: 16 * MIB,
        ..params(&c)
    };
    let src = vm(false, vec![AccelConfig::new(16 * MIB, true)]);
    wait_passes(&src, 20);
    let dst = vm(true, vec![AccelConfig::new(16 * MIB, true)]);
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = l.local_uri().unwrap();
    let (dvm, did, dp) = (Arc::clone(&dst), dest_id(&c), p.clone());
    let dest = thread::spawn(move || {
        engine::receive(dvm.as_ref(), &did, &dp, l, &MigrationMonitor::new())
    });
    let sm = Arc::new(MigrationMonitor::new());
    let sm2 = Arc::clone(&sm);
    let (src2, sid) = (Arc::clone(&src), source_id(&c));
    let mig = thread::spawn(move || engine::migrate(src2.as_ref(), &sid, &p, &uri, &sm2));
    let t = Instant::now();
    while src.accels().get(0).unwrap().state() != MigState::PreCopy {
        assert!(t.elapsed() < Duration::from_secs(10), "never in PRE_COPY");
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(50));
    sm.cancel().unwrap();
    let e = mig.join().unwrap().unwrap_err();
    assert!(
        matches!(e, MigrationError::Cancelled),
        "{}",
        error_chain(&e)
    );
    assert!(dest.join().unwrap().is_err());
    assert!(src.is_running());
    assert_eq!(src.accels().get(0).unwrap().state(), MigState::Running);
    assert_eq!(dst.accels().get(0).unwrap().state(), MigState::Stop);
    assert!(
        dst.resume().is_err(),
        "a destination without a whole state ran"
    );

    let dst2 = vm(true, vec![AccelConfig::new(16 * MIB, true)]);
    migrate_whole(&src, &dst2, "ferry-0.2");
}

/// A byte of vCPU state flipped in flight, in a value that still decodes: the state
/// digest stops the destination from resuming, and the source resumes. Without the
/// digest (ferry-0.1's wire) the same damage lands unseen: the guest resumes at the
/// destination with a pass counter 2^63 off.
#[test]
fn the_state_digest_catches_a_flipped_byte_of_state() {
    for machine in ["ferry-0.2", "ferry-0.1"] {
        let c = config(machine);
        let p = params(&c);
        let src = vm(false, Vec::new());
        wait_passes(&src, 20);
        let dst = vm(true, Vec::new());
        let r = migrate(
            &src,
            &dst,
            &source_id(&c),
            &p,
            &dest_id(&c),
            &p,
            Faults {
                damage_vcpu_state: true,
                ..Faults::NONE
            },
            Faults::NONE,
        );
        if machine == "ferry-0.2" {
            let de = r.destination.unwrap_err();
            assert!(
                matches!(&de, MigrationError::Verify(m) if m.contains("state digest differs")),
                "{}",
                error_chain(&de)
            );
            let se = r.source.unwrap_err();
            assert!(
                error_chain(&se).contains("state digest differs"),
                "{}",
                error_chain(&se)
            );
            assert!(src.is_running() && !dst.is_running());
        } else {
            r.source.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
            r.destination
                .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
            let at_stop = src.report().passes[0];
            let there = dst.report().passes[0];
            assert!(
                there > at_stop + (1 << 62),
                "without the digest the damage should land: {there} at the destination, {at_stop} at the source"
            );
        }
    }
}
