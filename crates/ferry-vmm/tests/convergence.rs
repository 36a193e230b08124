//! Convergence, in process: a soft guest that dirties memory faster than a capped link
//! moves it, and the real engine on both sides over loopback TCP.
//!
//! A migration that cannot converge must say so while it runs (in words, with the
//! figures) and end at its timeout: cancelled with the source running, or switched over
//! at the downtime it costs when the strategy accepts it. A bandwidth cap changed while
//! a migration runs takes effect at once.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::engine::{dest_id, source_id};
use ferry_migration::compat::Config;
use ferry_migration::engine::vm::MigratableVm;
use ferry_migration::engine::{
    self, error_chain, MigrationError, MigrationInfo, MigrationMonitor, MigrationParams,
    MigrationStatus, TimeoutStrategy,
};
use ferry_vmm::guest::GuestVm;
use ferry_vmm::machine;
use ferry_vmm::soft::{SoftConfig, SoftVm};
use ferry_vmm::transport::{Listener, MigrationUri};

const MIB: u64 = 1 << 20;

fn config() -> Config {
    machine::registry().configure("ferry-0.3", &[]).unwrap()
}

/// A guest that dirties 8 MiB per pass of its own, many times a second, over a link
/// capped at 8 MiB/s: each migration pass leaves 8 MiB dirty, a second's worth, against
/// a 300 ms downtime limit. It never converges on its own.
fn stalling_params() -> MigrationParams {
    MigrationParams {
        max_bandwidth: 8 * MIB,
        multifd_channels: 2,
        ..MigrationParams::from_config(&config()).unwrap()
    }
}

fn vm(incoming: bool) -> Arc<SoftVm> {
    let vm = Arc::new(
        SoftVm::create(&SoftConfig {
            mem_size: 32 * MIB,
            dirty_size: 8 * MIB,
            incoming,
            console_every: 50,
            ..SoftConfig::default()
        })
        .unwrap(),
    );
    // A source guest that has written its range a few times: the pages are there to
    // move, and the workload is at speed.
    let t = Instant::now();
    while !incoming && vm.report().passes.iter().any(|&p| p < 3) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the guest made no progress"
        );
        thread::sleep(Duration::from_millis(2));
    }
    vm
}

struct Run {
    source: Result<MigrationInfo, MigrationError>,
    destination: Result<MigrationInfo, MigrationError>,
    took: Duration,
    /// What `query-migrate` showed while the migration ran: the last convergence
    /// verdict that said it was not converging.
    stall_seen: Option<String>,
}

/// Migrates with `p`; `during` runs on the source's monitor once it is active.
fn migrate(
    p: &MigrationParams,
    during: impl FnOnce(&MigrationMonitor) + Send + 'static,
) -> (Run, Arc<SoftVm>, Arc<SoftVm>) {
    let c = config();
    let (src, dst) = (vm(false), vm(true));
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri: MigrationUri = l.local_uri().unwrap();
    let dm = Arc::new(MigrationMonitor::new());
    let (dvm, did, dp, dm2) = (Arc::clone(&dst), dest_id(&c), p.clone(), Arc::clone(&dm));
    let dest = thread::spawn(move || engine::receive(dvm.as_ref(), &did, &dp, l, &dm2));
    let sm = Arc::new(MigrationMonitor::new());
    let (svm, sid, sp, sm2) = (Arc::clone(&src), source_id(&c), p.clone(), Arc::clone(&sm));
    let t = Instant::now();
    let source = thread::spawn(move || engine::migrate(svm.as_ref(), &sid, &sp, &uri, &sm2));
    let sm3 = Arc::clone(&sm);
    let helper = thread::spawn(move || {
        let t = Instant::now();
        while sm3.info().status != MigrationStatus::Active && t.elapsed() < Duration::from_secs(10)
        {
            thread::sleep(Duration::from_millis(5));
        }
        during(&sm3);
    });
    let mut stall_seen = None;
    let bound = Instant::now() + Duration::from_secs(40);
    while !source.is_finished() {
        if let Some(why) = sm.info().convergence.and_then(|c| c.why) {
            stall_seen = Some(why);
        }
        if Instant::now() > bound {
            let _ = sm.cancel();
            let _ = dm.cancel();
            panic!("the migration did not end within 40 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let source = source.join().unwrap();
    let took = t.elapsed();
    if source.is_err() {
        let _ = dm.cancel();
    }
    let destination = dest.join().unwrap();
    helper.join().unwrap();
    (
        Run {
            source,
            destination,
            took,
            stall_seen,
        },
        src,
        dst,
    )
}

/// Without help the guest never converges: the source says so with the figures while it
/// runs, and at the timeout cancels, the guest running on at the source, untouched at
/// the destination.
#[test]
fn a_migration_that_cannot_converge_says_why_and_ends_at_its_timeout() {
    let p = MigrationParams {
        timeout: Some(Duration::from_secs(6)),
        ..stalling_params()
    };
    let (r, src, dst) = migrate(&p, |_| {});
    let e = r.source.expect_err("a stalling migration completed");
    let m = error_chain(&e);
    assert!(matches!(e, MigrationError::NotConverging(_)), "{m}");
    assert!(
        m.contains("did not converge within its timeout of 6 s"),
        "{m}"
    );
    assert!(
        m.contains("guest dirties") && m.contains("link moves"),
        "{m}"
    );
    let seen = r
        .stall_seen
        .expect("query-migrate never said it was not converging");
    assert!(
        seen.contains("guest dirties") && seen.contains("at this rate the switchover needs"),
        "{seen}"
    );
    assert!(
        r.took >= Duration::from_secs(6) && r.took < Duration::from_secs(15),
        "{:?}",
        r.took
    );
    assert!(src.is_running(), "the source's guest stopped");
    assert!(!dst.is_running());
    assert!(r.destination.is_err());
}

/// With `x-ferry-timeout-strategy=switchover` and a ceiling above what the switchover
/// costs, the timeout switches over instead, and the guest arrives whole.
#[test]
fn the_switchover_strategy_accepts_the_downtime_under_its_ceiling() {
    let p = MigrationParams {
        timeout: Some(Duration::from_secs(3)),
        timeout_strategy: TimeoutStrategy::Switchover,
        switchover_ceiling: Duration::from_secs(5),
        ..stalling_params()
    };
    let (r, src, dst) = migrate(&p, |_| {});
    let info = r.source.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    r.destination
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert!(
        info.convergence
            .as_ref()
            .is_some_and(|c| c.forced_switchover),
        "{info:?}"
    );
    let downtime = info.downtime.unwrap();
    assert!(
        downtime > 300,
        "a forced switchover costs more than the limit: {downtime} ms"
    );
    assert!(!src.is_running() && dst.is_running());
}

/// A bandwidth cap lifted while the migration runs takes effect at once: the same
/// migration that would take minutes at 256 KiB/s completes in seconds.
#[test]
fn max_bandwidth_changed_in_flight_takes_effect_at_once() {
    let p = MigrationParams {
        max_bandwidth: 256 << 10,
        ..stalling_params()
    };
    let (r, _src, dst) = migrate(&p, |m| {
        thread::sleep(Duration::from_millis(500));
        m.set_max_bandwidth(0);
    });
    r.source.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert!(r.took < Duration::from_secs(15), "{:?}", r.took);
    assert!(dst.is_running());
}

/// A throttle parameter changed while the migration runs takes effect at the next pass:
/// a dirty limit set too high to help (the migration stalls), then lowered in flight, and
/// the migration converges.
#[test]
fn a_dirty_limit_lowered_in_flight_takes_effect_at_the_next_pass() {
    let p = MigrationParams {
        dirty_limit: true,
        vcpu_dirty_limit_mbps: 100_000,
        ..stalling_params()
    };
    let lowered = MigrationParams {
        vcpu_dirty_limit_mbps: 1,
        ..p.clone()
    };
    let (r, src, dst) = migrate(&p, move |m| {
        // Until it has said it does not converge, the high limit stands.
        let t = Instant::now();
        while m.info().convergence.is_none_or(|c| c.converging) {
            assert!(t.elapsed() < Duration::from_secs(20), "never stalled");
            thread::sleep(Duration::from_millis(20));
        }
        m.set_live_params(lowered);
    });
    let info = r.source.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert!(r.stall_seen.is_some(), "it never said it stalled first");
    assert!(
        info.passes.iter().any(|p| p.dirty_limited),
        "the dirty limit never came on: {:?}",
        info.passes
    );
    assert!(!src.is_running() && dst.is_running());
}

/// A pass that takes longer than the policy's period is judged period by period: over a
/// link slow enough that one pass of the guest's range takes about 8 s, auto-converge's
/// first step comes within the second pass, not at its end (QEMU's rule applied to pass
/// ends alone would wait two whole passes).
#[test]
fn a_long_pass_steps_the_throttle_before_it_ends() {
    let p = MigrationParams {
        max_bandwidth: MIB,
        auto_converge: true,
        ..stalling_params()
    };
    let (r, src, dst) = migrate(&p, |m| {
        let t = Instant::now();
        loop {
            let info = m.info();
            assert!(
                info.passes.len() < 2,
                "the second pass ended before the throttle stepped: {:?}",
                info.passes
            );
            if info.cpu_throttle_percentage.is_some_and(|c| c > 0) {
                println!(
                    "throttle {:?} % after {:.1} s, {} pass(es) done",
                    info.cpu_throttle_percentage,
                    t.elapsed().as_secs_f64(),
                    info.passes.len()
                );
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "never stepped");
            thread::sleep(Duration::from_millis(20));
        }
        // Done: the cap lifted, the migration completes.
        m.set_max_bandwidth(0);
    });
    r.source.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    r.destination
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert!(!src.is_running() && dst.is_running());
}
