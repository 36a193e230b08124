//! Liveness, in process: two soft VMs and the real engine on both sides over loopback
//! TCP, with a relay between them that can freeze the link (it stops moving bytes, as a
//! cable pulled out or a host that hangs would, without closing anything).
//!
//! A dead peer or link must end the migration on both sides within
//! `migration.liveness-timeout`, with a message that names the channel and the time it
//! waited; an idle but healthy one must not (keepalives bridge the quiet stretches), and
//! a destination that stops sending keepalives is taken for dead, which shows they are
//! what keeps a quiet link alive.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::engine::{dest_id, source_id};
use ferry_migration::compat::Config;
use ferry_migration::engine::vm::MigratableVm;
use ferry_migration::engine::{
    self, error_chain, Faults, MigrationError, MigrationInfo, MigrationMonitor, MigrationParams,
    MigrationStatus,
};
use ferry_vmm::guest::GuestVm;
use ferry_vmm::machine;
use ferry_vmm::soft::{SoftConfig, SoftVm};
use ferry_vmm::transport::{Listener, MigrationUri};

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_millis(1000);

fn config() -> Config {
    machine::registry().configure("ferry-0.3", &[]).unwrap()
}

fn params(channels: u16) -> MigrationParams {
    MigrationParams {
        liveness_timeout: LIMIT,
        multifd_channels: channels,
        ..MigrationParams::from_config(&config()).unwrap()
    }
}

fn vm(incoming: bool, dirty: u64) -> Arc<SoftVm> {
    let vm = Arc::new(
        SoftVm::create(&SoftConfig {
            mem_size: 64 * MIB,
            dirty_size: dirty,
            incoming,
            console_every: 50,
            ..SoftConfig::default()
        })
        .unwrap(),
    );
    // A source guest that has written its range: its pages are there to move.
    let t = Instant::now();
    while !incoming && vm.report().passes.iter().any(|&p| p < 2) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the guest made no progress"
        );
        thread::sleep(Duration::from_millis(2));
    }
    vm
}

/// A TCP relay between source and destination whose link can be frozen: while frozen
/// it moves no byte either way and closes nothing.
struct Relay {
    uri: MigrationUri,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(to: std::net::SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let uri: MigrationUri = format!("tcp:{}", l.local_addr().unwrap()).parse().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (Arc::clone(&frozen), Arc::clone(&stop));
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((a, _)) => {
                        let b = TcpStream::connect(to).unwrap();
                        for (from, into) in
                            [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                        {
                            let (f, s) = (Arc::clone(&f), Arc::clone(&s));
                            thread::spawn(move || pump(from, into, &f, &s));
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { uri, frozen, stop }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pump(mut from: TcpStream, mut into: TcpStream, frozen: &AtomicBool, stop: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        if frozen.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    let _ = into.shutdown(Shutdown::Write);
}

struct Run {
    source: Result<MigrationInfo, MigrationError>,
    destination: Result<MigrationInfo, MigrationError>,
    /// From the freeze (or the start, without one) to the source's end.
    source_took: Duration,
    destination_took: Duration,
}

/// Migrates `src` into `dst` through a relay; `freeze_after` freezes the link once the
/// source has been active that long.
fn migrate(
    src: &Arc<SoftVm>,
    dst: &Arc<SoftVm>,
    p: &MigrationParams,
    source_faults: Faults,
    dest_faults: Faults,
    freeze_after: Option<Duration>,
) -> Run {
    let c = config();
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = match l.local_uri().unwrap() {
        MigrationUri::Tcp(a) => a
            .parse::<std::net::SocketAddr>()
            .unwrap_or_else(|_| panic!("{a}")),
        u => panic!("{u}"),
    };
    let relay = Relay::start(addr);
    let dm = Arc::new(MigrationMonitor::new());
    dm.set_faults(dest_faults);
    let (dvm, did, dp, dm2) = (Arc::clone(dst), dest_id(&c), p.clone(), Arc::clone(&dm));
    let dest = thread::spawn(move || {
        let r = engine::receive(dvm.as_ref(), &did, &dp, l, &dm2);
        (r, Instant::now())
    });
    let sm = Arc::new(MigrationMonitor::new());
    sm.set_faults(source_faults);
    let mut t0 = Instant::now();
    let (svm, sid, sp, sm2, uri) = (
        Arc::clone(src),
        source_id(&c),
        p.clone(),
        Arc::clone(&sm),
        relay.uri.clone(),
    );
    let source = thread::spawn(move || {
        let r = engine::migrate(svm.as_ref(), &sid, &sp, &uri, &sm2);
        (r, Instant::now())
    });
    if let Some(after) = freeze_after {
        let t = Instant::now();
        while sm.info().status != MigrationStatus::Active {
            assert!(t.elapsed() < Duration::from_secs(30), "never became active");
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(after);
        relay.freeze();
        t0 = Instant::now();
    }
    // Nothing here may take long: a hang is a failure, not a wait.
    let bound = Instant::now() + Duration::from_secs(30);
    while !(source.is_finished() && dest.is_finished()) {
        if Instant::now() > bound {
            let (si, di) = (sm.info(), dm.info());
            let _ = sm.cancel();
            let _ = dm.cancel();
            panic!(
                "the migration did not end within 30 s: source {:?} ({:?}), destination {:?} ({:?})",
                si.status, si.error_desc, di.status, di.error_desc
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    let (source, s_end) = source.join().unwrap();
    let (destination, d_end) = dest.join().unwrap();
    Run {
        source,
        destination,
        source_took: s_end - t0,
        destination_took: d_end - t0,
    }
}

/// The error is (or wraps) the engine's verdict that the peer went silent.
fn silent(e: &MigrationError) -> bool {
    match e {
        MigrationError::Silent { .. } => true,
        MigrationError::Channel { source, .. } | MigrationError::HandoverInDoubt { source } => {
            silent(source)
        }
        _ => false,
    }
}

/// A frozen link ends the migration on both sides within the limit (plus polling and
/// scheduling slack), each naming what it waited for and for how long; the source's
/// guest runs on and the destination's never starts. With data channels, as pages
/// move on them.
#[test]
fn a_frozen_link_fails_both_sides_in_bounded_time() {
    for channels in [0u16, 2] {
        let src = vm(false, 32 * MIB);
        let dst = vm(true, 32 * MIB);
        let p = MigrationParams {
            // The first pass takes seconds: the freeze, not the switchover, ends it.
            max_bandwidth: 16 * MIB,
            ..params(channels)
        };
        let r = migrate(
            &src,
            &dst,
            &p,
            Faults::NONE,
            Faults::NONE,
            Some(Duration::from_millis(300)),
        );
        let se = r
            .source
            .expect_err("the source completed over a frozen link");
        let de = r
            .destination
            .expect_err("the destination completed over a frozen link");
        let (sm, dm) = (error_chain(&se), error_chain(&de));
        eprintln!(
            "{channels} channels: source after {:?}: {sm}\n  destination after {:?}: {dm}",
            r.source_took, r.destination_took
        );
        assert!(silent(&se), "source: {sm}");
        assert!(silent(&de), "destination: {dm}");
        assert!(sm.contains("the destination went silent"), "{sm}");
        assert!(dm.contains("the source went silent"), "{dm}");
        // The message tells the time it really waited, not "0 s".
        assert!(sm.contains("nothing came on any channel for 1."), "{sm}");
        // Not at once (the link was healthy a moment before), and not long after
        // the limit: the source's writes fill the socket buffers first, and each
        // blocked call looks at the silence every 200 ms.
        for took in [r.source_took, r.destination_took] {
            assert!(
                took + Duration::from_millis(500) >= LIMIT && took < LIMIT + Duration::from_secs(3),
                "{took:?}"
            );
        }
        assert!(src.is_running(), "the source's guest stopped");
        assert!(!dst.is_running(), "the destination started the guest");
    }
}

/// A destination quiet for three times the limit (a slow load after the end of stream)
/// but sending keepalives is alive: the migration completes.
#[test]
fn keepalives_carry_a_quiet_destination_past_the_limit() {
    let src = vm(false, 2 * MIB);
    let dst = vm(true, 2 * MIB);
    let r = migrate(
        &src,
        &dst,
        &params(2),
        Faults::NONE,
        Faults {
            delay_completion: Some(3 * LIMIT),
            ..Faults::NONE
        },
        None,
    );
    let s = r.source.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    r.destination
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!(s.status, MigrationStatus::Completed);
    assert!(r.source_took >= 3 * LIMIT, "{:?}", r.source_took);
    assert!(dst.is_running());
}

/// The same quiet destination with its keepalives muted after the first: the source
/// takes it for dead within the limit. What keeps a quiet link alive is the keepalives.
#[test]
fn a_destination_that_stops_its_keepalives_is_taken_for_dead() {
    let src = vm(false, 2 * MIB);
    let dst = vm(true, 2 * MIB);
    let r = migrate(
        &src,
        &dst,
        &params(2),
        Faults::NONE,
        Faults {
            delay_completion: Some(3 * LIMIT),
            mute_keepalive: true,
            ..Faults::NONE
        },
        None,
    );
    let e = r.source.expect_err("completed without keepalives");
    let m = error_chain(&e);
    assert!(silent(&e), "{m}");
    assert!(m.contains("the return path waited"), "{m}");
    assert!(r.source_took < 3 * LIMIT, "{:?}", r.source_took);
}

/// A source that states no keepalives (as releases before 0.3) is given the old,
/// long limit: the same quiet destination does not fail it.
#[test]
fn a_peer_without_keepalives_keeps_the_long_limit() {
    let src = vm(false, 2 * MIB);
    let dst = vm(true, 2 * MIB);
    let r = migrate(
        &src,
        &dst,
        &params(0),
        Faults {
            no_keepalive: true,
            ..Faults::NONE
        },
        Faults {
            delay_completion: Some(2 * LIMIT),
            ..Faults::NONE
        },
        None,
    );
    r.source.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    r.destination
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
}
