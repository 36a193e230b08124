//! In-process migrations of the soft guest over loopback TCP: the engine's bulk tests,
//! including the failure cases. Both sides are real engine code over real sockets; only
//! the hypervisor is replaced by the soft backend.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ferry_migration::engine::vm::{
    DeviceInfo, DevicePending, DirtyLog, GuestRam, MigratableVm, VmError,
};
use ferry_migration::engine::{
    self, error_chain, Acceptor, Channel, Connector, DestinationIdentity, Faults, Handover,
    Incoming, MigrationError, MigrationInfo, MigrationMonitor, MigrationParams, MigrationStatus,
    MigrationStream, SourceIdentity, StreamRole,
};
use ferry_migration::state::{DeviceState, StateReader, StateSchema, StateWriter};
use ferry_migration::wire::{
    ChannelHeader, Compression, FrameHeader, FrameTag, RamBatchHeader, RefuseCause, StreamHeader,
    CHANNEL_VERSION,
};
use ferry_vmm::guest::GuestVm;
use ferry_vmm::soft::{SoftConfig, SoftVm, SOFT_CONSOLE_SCHEMA};
use ferry_vmm::transport::{Listener, MigrationUri};

const MACHINE: &str = "ferry-0.1";

fn wire_props(digest: bool) -> Vec<(String, String)> {
    vec![(
        "migration.digest".into(),
        if digest { "on" } else { "off" }.into(),
    )]
}

fn source_id() -> SourceIdentity {
    SourceIdentity {
        release: "test".into(),
        machine: MACHINE.into(),
        wire_props: wire_props(true),
        compat_pinned: Vec::new(),
    }
}

fn dest_id() -> DestinationIdentity {
    DestinationIdentity {
        release: "test".into(),
        machine: MACHINE.into(),
        known_machines: vec![MACHINE.into()],
        wire_props: wire_props(true),
        compat_pinned: Vec::new(),
    }
}

fn params() -> MigrationParams {
    MigrationParams {
        verify_full: true,
        ..MigrationParams::default()
    }
}

/// Pages on the main channel, and 0.1's frames only (no device plan, no state digest):
/// for the fake destinations and proxies below, which speak the main channel and answer
/// a hello with an accept, as release 0.1.0 does.
fn main_only(p: MigrationParams) -> MigrationParams {
    MigrationParams {
        multifd_channels: 0,
        switchover_ack: false,
        state_digest: false,
        ..p
    }
}

fn soft(incoming: bool, mem: u64, dirty: u64) -> Arc<SoftVm> {
    Arc::new(
        SoftVm::create(&SoftConfig {
            mem_size: mem,
            dirty_size: dirty,
            incoming,
            console_every: 50,
            ..SoftConfig::default()
        })
        .unwrap(),
    )
}

/// A source built from `cfg` whose guest has made `passes` passes, and an incoming VM of
/// the same shape to receive it.
fn soft_pair(cfg: &SoftConfig, passes: u64) -> (Arc<SoftVm>, Arc<SoftVm>) {
    let src = Arc::new(SoftVm::create(cfg).unwrap());
    wait_passes(&src, passes);
    let dst = Arc::new(
        SoftVm::create(&SoftConfig {
            incoming: true,
            ..cfg.clone()
        })
        .unwrap(),
    );
    (src, dst)
}

/// A destination receiving one migration in a thread.
struct Dest {
    uri: MigrationUri,
    handle: thread::JoinHandle<Result<MigrationInfo, MigrationError>>,
    monitor: Arc<MigrationMonitor>,
}

impl Dest {
    /// A destination that turned a hello away goes on waiting for a source it can take;
    /// this stops the wait and returns what it turned away.
    fn stop_waiting(self) -> Vec<String> {
        let _ = self.monitor.cancel();
        let r = self.handle.join().unwrap();
        assert!(
            matches!(r, Err(MigrationError::Cancelled)),
            "the destination did not go on waiting: {r:?}"
        );
        self.monitor
            .info()
            .multifd
            .map(|m| m.strays)
            .unwrap_or_default()
    }

    /// Waits until the destination has turned `n` connections away.
    fn wait_strays(&self, n: usize) {
        let t = Instant::now();
        while self.monitor.info().multifd.map_or(0, |m| m.strays.len()) < n {
            assert!(t.elapsed() < Duration::from_secs(20), "no stray recorded");
            thread::sleep(Duration::from_millis(5));
        }
    }
}

fn spawn_dest(vm: Arc<dyn MigratableVm>, id: DestinationIdentity, params: MigrationParams) -> Dest {
    spawn_faulty_dest(vm, id, params, Faults::NONE)
}

/// A destination with deliberate faults.
fn spawn_faulty_dest(
    vm: Arc<dyn MigratableVm>,
    id: DestinationIdentity,
    params: MigrationParams,
    faults: Faults,
) -> Dest {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = l.local_uri().unwrap();
    let monitor = Arc::new(MigrationMonitor::new());
    let m = Arc::clone(&monitor);
    let handle = thread::spawn(move || {
        m.set_faults(faults);
        engine::receive(vm.as_ref(), &id, &params, l, &m)
    });
    Dest {
        uri,
        handle,
        monitor,
    }
}

fn wait_passes(vm: &SoftVm, n: u64) {
    let t = Instant::now();
    while vm.report().passes[0] < n {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "guest made no progress"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn assert_guest_intact(vm: &SoftVm) {
    let (checked, bad) = vm.verify().unwrap();
    assert!(checked > 0);
    assert_eq!(
        bad, 0,
        "{bad} of {checked} pages do not hold the pass value"
    );
}

#[test]
fn live_migration_carries_on_at_the_destination() {
    let src = soft(false, 64 << 20, 8 << 20);
    wait_passes(&src, 100);
    let dst = soft(true, 64 << 20, 8 << 20);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    let m = MigrationMonitor::new();
    let info = engine::migrate(src.as_ref(), &source_id(), &params(), &d.uri, &m).unwrap();
    d.handle.join().unwrap().unwrap();

    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(info.verified.as_deref(), Some("digest+full"));
    assert!(info.downtime.is_some());
    assert!(info.ram.normal > 0 && info.ram.transferred > 0);
    assert!(
        !src.is_running(),
        "the source must stay stopped after success"
    );
    let at_stop = src.report().passes[0];
    wait_passes(&dst, at_stop + 20);
    assert_guest_intact(&dst);
    assert!(
        dst.console_tail().contains("pass 50"),
        "console state did not move"
    );
}

/// With `migration.x-ferry-populate-ahead` (on by default) the destination hears where
/// the source's memory is populated, its 8 MiB range and the little else the guest
/// wrote, not the rest of its 256 MiB, and the guest arrives intact; with the property
/// off on both sides nothing is announced.
#[test]
fn the_destination_hears_where_memory_is_populated_and_nothing_else() {
    for on in [true, false] {
        let p = MigrationParams {
            populate_ahead: on,
            ..params()
        };
        let src = soft(false, 256 << 20, 8 << 20);
        wait_passes(&src, 3);
        let dst = soft(true, 256 << 20, 8 << 20);
        let d = spawn_dest(dst.clone(), dest_id(), p.clone());
        let m = MigrationMonitor::new();
        engine::migrate(src.as_ref(), &source_id(), &p, &d.uri, &m).unwrap();
        let info = d.handle.join().unwrap().unwrap();
        let (announced, ahead) = (
            info.ram.x_ferry_populate_announced,
            info.ram.x_ferry_populated_ahead,
        );
        if on {
            assert!(
                (8 << 20..9 << 20).contains(&announced),
                "announced {announced} bytes for an 8 MiB range in 256 MiB"
            );
            assert!(ahead <= announced, "{ahead} populated of {announced}");
        } else {
            assert_eq!((announced, ahead), (0, 0));
        }
        let at_stop = src.report().passes[0];
        wait_passes(&dst, at_stop + 2);
        assert_guest_intact(&dst);
    }
}

#[test]
fn idle_guest_memory_never_touched_is_not_sent() {
    let src = soft(false, 256 << 20, 0);
    let dst = soft(true, 256 << 20, 0);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    let m = MigrationMonitor::new();
    let info = engine::migrate(src.as_ref(), &source_id(), &params(), &d.uri, &m).unwrap();
    d.handle.join().unwrap().unwrap();
    assert!(
        info.ram.normal + info.ram.duplicate < 16,
        "an idle guest sent {} pages",
        info.ram.normal + info.ram.duplicate
    );
}

#[test]
fn a_killed_destination_leaves_the_source_running_and_a_retry_succeeds() {
    let src = soft(false, 64 << 20, 8 << 20);
    wait_passes(&src, 10);
    // A destination that accepts, takes the first RAM batch, then dies mid-transfer.
    let (uri, killer) = fake_destination(FrameTag::RamBatch, false);
    let m = MigrationMonitor::new();
    let err =
        engine::migrate(src.as_ref(), &source_id(), &main_only(params()), &uri, &m).unwrap_err();
    killer.join().unwrap();
    assert!(
        matches!(
            err,
            MigrationError::PeerClosed { .. } | MigrationError::Io { .. }
        ),
        "{err}"
    );
    assert_eq!(m.status(), MigrationStatus::Failed);
    assert!(m.info().error_desc.unwrap().contains("destination"));
    assert!(src.is_running(), "the source must keep running");
    let before = src.report().passes[0];
    wait_passes(&src, before + 5);

    let dst = soft(true, 64 << 20, 8 << 20);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    engine::migrate(
        src.as_ref(),
        &source_id(),
        &params(),
        &d.uri,
        &MigrationMonitor::new(),
    )
    .unwrap();
    d.handle.join().unwrap().unwrap();
    assert_guest_intact(&dst);
}

/// Plays a destination that accepts, reads frames until `until`, then reports a load
/// failure.
fn failing_destination(until: FrameTag) -> (MigrationUri, thread::JoinHandle<()>) {
    fake_destination(until, true)
}

/// Plays a destination that accepts and reads frames until `until`; then it reports a
/// load failure when `report` is set, or just disappears.
fn fake_destination(until: FrameTag, report: bool) -> (MigrationUri, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri: MigrationUri = format!("tcp:{}", l.local_addr().unwrap()).parse().unwrap();
    let t = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hdr = [0u8; StreamHeader::LEN];
        s.read_exact(&mut hdr).unwrap();
        let acc = ferry_migration::wire::Accept {
            release: "x".into(),
        }
        .encode();
        let mut accepted = false;
        loop {
            let mut h = [0u8; FrameHeader::LEN];
            s.read_exact(&mut h).unwrap();
            let fh = FrameHeader::decode(&h).unwrap();
            let mut p = vec![0u8; fh.len as usize];
            s.read_exact(&mut p).unwrap();
            if !accepted {
                s.write_all(
                    &FrameHeader {
                        tag: FrameTag::Accept,
                        len: acc.len() as u32,
                    }
                    .encode(),
                )
                .unwrap();
                s.write_all(&acc).unwrap();
                accepted = true;
            }
            if fh.tag == until {
                break;
            }
        }
        if !report {
            return;
        }
        let why = ferry_migration::wire::encode_reason("test destination gives up");
        s.write_all(
            &FrameHeader {
                tag: FrameTag::LoadFailed,
                len: why.len() as u32,
            }
            .encode(),
        )
        .unwrap();
        s.write_all(&why).unwrap();
    });
    (uri, t)
}

#[test]
fn harvested_dirty_bits_are_put_back_after_a_failure() {
    let src = soft(false, 64 << 20, 8 << 20);
    wait_passes(&src, 3);
    src.pause().unwrap();
    // The paused guest's log holds its whole range; the attempt harvests all of it.
    let before = src.dirty_pages_pending();
    assert_eq!(before, 2048);
    let (uri, t) = failing_destination(FrameTag::EndOfStream);
    let m = MigrationMonitor::new();
    let err =
        engine::migrate(src.as_ref(), &source_id(), &main_only(params()), &uri, &m).unwrap_err();
    t.join().unwrap();
    assert!(
        matches!(&err, MigrationError::LoadFailed(r) if r.contains("gives up")),
        "{err}"
    );
    assert!(
        m.info().ram.dirty_sync_count >= 1,
        "the attempt never harvested"
    );
    assert_eq!(
        src.dirty_pages_pending(),
        before,
        "harvested dirty bits were lost"
    );
    assert!(
        !src.is_running(),
        "a paused source stays paused after a failure"
    );
}

#[test]
fn a_destination_lost_after_the_end_of_stream_leaves_the_guest_stopped_not_twice_running() {
    let src = soft(false, 32 << 20, 4 << 20);
    wait_passes(&src, 3);
    let (uri, t) = fake_destination(FrameTag::EndOfStream, false);
    let m = MigrationMonitor::new();
    let err =
        engine::migrate(src.as_ref(), &source_id(), &main_only(params()), &uri, &m).unwrap_err();
    t.join().unwrap();
    assert!(
        matches!(&err, MigrationError::HandoverInDoubt { source } if matches!(**source, MigrationError::PeerClosed { .. })),
        "{err}"
    );
    assert_eq!(m.handover(), Handover::InDoubt);
    assert!(
        !src.is_running(),
        "the destination may run the guest: the source must not resume it on its own"
    );
    // The same loss long before the end of stream (more RAM than socket buffers hold):
    // the guest is still ours and runs on.
    let big = soft(false, 64 << 20, 48 << 20);
    wait_passes(&big, 2);
    let (uri, t) = fake_destination(FrameTag::Hello, false);
    let err =
        engine::migrate(big.as_ref(), &source_id(), &main_only(params()), &uri, &m).unwrap_err();
    t.join().unwrap();
    assert!(matches!(err, MigrationError::PeerClosed { .. }), "{err}");
    assert!(big.is_running());
}

#[test]
fn a_cancel_leaves_the_source_running_and_a_retry_succeeds() {
    let src = soft(false, 64 << 20, 8 << 20);
    wait_passes(&src, 10);
    let dst = soft(true, 64 << 20, 8 << 20);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    let m = Arc::new(MigrationMonitor::new());
    let slow = MigrationParams {
        max_bandwidth: 4 << 20,
        ..params()
    };
    let m2 = Arc::clone(&m);
    let canceller = thread::spawn(move || {
        while m2.status() != MigrationStatus::Active {
            thread::sleep(Duration::from_millis(2));
        }
        thread::sleep(Duration::from_millis(300));
        m2.cancel().expect("a cancel during the passes is taken");
    });
    let err = engine::migrate(src.as_ref(), &source_id(), &slow, &d.uri, &m).unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(err, MigrationError::Cancelled), "{err}");
    assert_eq!(m.status(), MigrationStatus::Cancelled);
    let derr = d.handle.join().unwrap().unwrap_err();
    assert!(
        derr.to_string().contains("cancel"),
        "destination saw: {derr}"
    );
    assert!(
        !dst.is_running(),
        "the destination must not resume a partial guest"
    );
    assert!(src.is_running());

    let dst2 = soft(true, 64 << 20, 8 << 20);
    let d2 = spawn_dest(dst2.clone(), dest_id(), params());
    engine::migrate(
        src.as_ref(),
        &source_id(),
        &params(),
        &d2.uri,
        &MigrationMonitor::new(),
    )
    .unwrap();
    d2.handle.join().unwrap().unwrap();
    assert_guest_intact(&dst2);
}

fn refused(
    src: &dyn MigratableVm,
    dst: Arc<dyn MigratableVm>,
    id: DestinationIdentity,
) -> (RefuseCause, String, MigrationInfo) {
    refused_by(src, dst, id, params())
}

/// As [`refused`], with the destination's own parameters.
fn refused_by(
    src: &dyn MigratableVm,
    dst: Arc<dyn MigratableVm>,
    id: DestinationIdentity,
    dest_params: MigrationParams,
) -> (RefuseCause, String, MigrationInfo) {
    let d = spawn_dest(dst, id, dest_params);
    let m = MigrationMonitor::new();
    let err = engine::migrate(src, &source_id(), &params(), &d.uri, &m).unwrap_err();
    // The destination turned the hello away and went on waiting for a source it can
    // take, naming what it refused.
    let strays = d.stop_waiting();
    assert!(
        strays
            .iter()
            .any(|s| s.contains("refused the incoming migration")),
        "{strays:?}"
    );
    assert!(src.is_running());
    match err {
        MigrationError::Refused { cause, reason } => (cause, reason, m.info()),
        e => panic!("expected a refusal, got {e}"),
    }
}

#[test]
fn an_unknown_machine_type_is_refused_before_any_ram_moves() {
    let src = soft(false, 32 << 20, 1 << 20);
    let id = DestinationIdentity {
        known_machines: vec!["ferry-0.0".into()],
        machine: "ferry-0.0".into(),
        ..dest_id()
    };
    let (cause, reason, info) = refused(src.as_ref(), soft(true, 32 << 20, 1 << 20), id);
    assert_eq!(cause, RefuseCause::UnknownMachine);
    assert!(reason.contains("ferry-0.1"), "{reason}");
    assert_eq!(info.ram.transferred, 0);
}

#[test]
fn a_wire_property_mismatch_is_refused_naming_both_values() {
    let src = soft(false, 32 << 20, 1 << 20);
    // A destination configured with the digest off, as `-global migration.digest=off`
    // makes it: its identity and its parameters say so.
    let id = DestinationIdentity {
        wire_props: wire_props(false),
        ..dest_id()
    };
    let dest_params = MigrationParams {
        digest: false,
        ..params()
    };
    let (cause, reason, info) =
        refused_by(src.as_ref(), soft(true, 32 << 20, 1 << 20), id, dest_params);
    assert_eq!(cause, RefuseCause::PropertyMismatch);
    assert!(
        reason.contains("migration.digest") && reason.contains("on") && reason.contains("off"),
        "{reason}"
    );
    assert_eq!(info.ram.transferred, 0);
}

#[test]
fn a_different_ram_size_is_refused_in_human_units() {
    let src = soft(false, 32 << 20, 1 << 20);
    let (cause, reason, _) = refused(src.as_ref(), soft(true, 64 << 20, 1 << 20), dest_id());
    assert_eq!(cause, RefuseCause::RamLayout);
    assert!(
        reason.contains("32.0 MiB") && reason.contains("64.0 MiB"),
        "{reason}"
    );
}

/// A soft VM whose console claims a state version range this release cannot load, or
/// a configuration of its own.
struct NewerConsole {
    inner: Arc<SoftVm>,
    schema: &'static StateSchema,
    config: Vec<(String, String)>,
    /// What the console claims to have left for the switchover, in bytes.
    stop_copy: u64,
}

impl MigratableVm for NewerConsole {
    fn ram(&self) -> Arc<dyn GuestRam> {
        self.inner.ram()
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        self.inner.dirty_log()
    }
    fn vcpu_count(&self) -> usize {
        self.inner.vcpu_count()
    }
    fn vcpu_schema(&self) -> &'static StateSchema {
        self.inner.vcpu_schema()
    }
    fn devices(&self) -> Vec<DeviceInfo> {
        vec![DeviceInfo {
            name: "soft-console".into(),
            instance: 0,
            schema: self.schema,
            config: self.config.clone(),
            precopy: None,
        }]
    }
    fn pause(&self) -> Result<(), VmError> {
        self.inner.pause()
    }
    fn resume(&self) -> Result<(), VmError> {
        self.inner.resume()
    }
    fn is_running(&self) -> bool {
        self.inner.is_running()
    }
    fn save_vcpu(&self, i: usize) -> Result<DeviceState, VmError> {
        self.inner.save_vcpu(i)
    }
    fn load_vcpu(&self, i: usize, s: DeviceState) -> Result<(), VmError> {
        self.inner.load_vcpu(i, s)
    }
    fn save_device(&self, i: usize, out: &mut StateWriter<'_>) -> Result<(), VmError> {
        self.inner.save_device(i, out)
    }
    fn load_device(&self, i: usize, input: &mut StateReader<'_>) -> Result<(), VmError> {
        self.inner.load_device(i, input)
    }
    fn device_pending(&self, _: usize) -> DevicePending {
        DevicePending::stop_copy(self.stop_copy)
    }
}

#[test]
fn a_device_state_version_the_destination_cannot_load_is_refused_naming_the_device() {
    static V3_ONLY: StateSchema = StateSchema {
        version: 3,
        min_version: 3,
        ..SOFT_CONSOLE_SCHEMA
    };
    let src = soft(false, 32 << 20, 1 << 20);
    let dst = Arc::new(NewerConsole {
        inner: soft(true, 32 << 20, 1 << 20),
        schema: &V3_ONLY,
        config: Vec::new(),
        stop_copy: 0,
    });
    let (cause, reason, info) = refused(src.as_ref(), dst, dest_id());
    assert_eq!(cause, RefuseCause::DeviceVersion);
    assert!(
        reason.contains("soft-console") && reason.contains("version 1"),
        "{reason}"
    );
    assert_eq!(info.ram.transferred, 0);
}

#[test]
fn a_device_configured_differently_is_refused_before_ram_moves_naming_both_values() {
    let configured = |incoming: bool, size: Option<&str>| NewerConsole {
        inner: soft(incoming, 32 << 20, 1 << 20),
        schema: &SOFT_CONSOLE_SCHEMA,
        config: size
            .map(|s| vec![("size".to_string(), s.to_string())])
            .unwrap_or_default(),
        stop_copy: 0,
    };
    let src = configured(false, Some("64M"));
    let (cause, reason, info) = refused(&src, Arc::new(configured(true, Some("128M"))), dest_id());
    assert_eq!(cause, RefuseCause::DeviceConfig);
    assert!(
        reason.contains("device soft-console instance 0")
            && reason.contains("size is 64M on the source and 128M here"),
        "{reason}"
    );
    assert_eq!(info.ram.transferred, 0, "refused before RAM moved");
    // Configured on one side only, either way round.
    let (cause, reason, _) = refused(&src, Arc::new(configured(true, None)), dest_id());
    assert_eq!(cause, RefuseCause::DeviceConfig);
    assert!(
        reason.contains("size is 64M on the source and not set here"),
        "{reason}"
    );
    let bare = configured(false, None);
    let (cause, reason, _) = refused(&bare, Arc::new(configured(true, Some("128M"))), dest_id());
    assert_eq!(cause, RefuseCause::DeviceConfig);
    assert!(
        reason.contains("size is 128M here and not set on the source"),
        "{reason}"
    );
    // The same configuration migrates.
    let d = spawn_dest(Arc::new(configured(true, Some("64M"))), dest_id(), params());
    let m = MigrationMonitor::new();
    engine::migrate(&src, &source_id(), &params(), &d.uri, &m)
        .unwrap_or_else(|e| panic!("{}", engine::error_chain(&e)));
    d.handle.join().unwrap().unwrap();
}

#[test]
fn device_state_too_large_for_the_limit_holds_the_switchover_until_the_limit_allows_it() {
    // A device that says 64 GiB must move with the guest stopped: at any link this
    // machine has, that is seconds, far over the 300 ms limit, however small RAM is.
    let src = NewerConsole {
        inner: soft(false, 32 << 20, 1 << 20),
        schema: &SOFT_CONSOLE_SCHEMA,
        config: Vec::new(),
        stop_copy: 64 << 30,
    };
    wait_passes(&src.inner, 3);
    let dst = soft(true, 32 << 20, 1 << 20);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    let m = Arc::new(MigrationMonitor::new());
    let src = Arc::new(src);
    let migration = {
        let (src, m, uri) = (src.clone(), m.clone(), d.uri.clone());
        thread::spawn(move || engine::migrate(src.as_ref(), &source_id(), &params(), &uri, &m))
    };
    // Passes go on, the guest keeps running, and the expected downtime counts the
    // device's bytes.
    let t = Instant::now();
    while m.info().passes.len() < 5 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no passes: {:?}",
            m.info()
        );
        thread::sleep(Duration::from_millis(5));
    }
    let info = m.info();
    assert_eq!(info.status, MigrationStatus::Active, "{info:?}");
    assert!(
        src.is_running(),
        "the guest stopped before the state fits the limit"
    );
    assert!(
        info.expected_downtime > 1000,
        "expected downtime {} ms leaves out the device's 64 GiB",
        info.expected_downtime
    );
    // A limit that allows it lets the switchover happen.
    m.set_downtime_limit(Duration::from_secs(3600));
    let done = migration
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{}", engine::error_chain(&e)));
    assert_eq!(done.status, MigrationStatus::Completed);
    d.handle.join().unwrap().unwrap();
}

/// Relays a migration, flipping one byte of page data in every RAM batch, to show that
/// the digest catches pages the destination got wrong.
fn corrupting_proxy(to: MigrationUri) -> (MigrationUri, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri: MigrationUri = format!("tcp:{}", l.local_addr().unwrap()).parse().unwrap();
    let MigrationUri::Tcp(addr) = to else {
        unreachable!()
    };
    let h = thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        let mut b = TcpStream::connect(addr).unwrap();
        // Return path: copy as is.
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
            let _ = a2.shutdown(std::net::Shutdown::Both);
        });
        let mut hdr = [0u8; StreamHeader::LEN];
        a.read_exact(&mut hdr).unwrap();
        b.write_all(&hdr).unwrap();
        loop {
            let mut h = [0u8; FrameHeader::LEN];
            if a.read_exact(&mut h).is_err() {
                break;
            }
            let fh = FrameHeader::decode(&h).unwrap();
            let mut p = vec![0u8; fh.len as usize];
            if a.read_exact(&mut p).is_err() {
                break;
            }
            if fh.tag == FrameTag::RamBatch {
                let count = u32::from_le_bytes(p[4..8].try_into().unwrap()) as usize;
                let data = RamBatchHeader::LEN + 8 * count;
                if p.len() > data + 100 {
                    p[data + 100] ^= 0x5a;
                }
            }
            // The destination hangs up once it has seen the damage; stop relaying then.
            if b.write_all(&h).and_then(|()| b.write_all(&p)).is_err() {
                break;
            }
        }
        let _ = b.shutdown(std::net::Shutdown::Write);
        back.join().unwrap();
    });
    (uri, h)
}

#[test]
fn a_page_damaged_in_flight_fails_the_digest_and_the_destination_does_not_resume() {
    let src = soft(false, 32 << 20, 4 << 20);
    wait_passes(&src, 3);
    src.pause().unwrap();
    // A paused guest: the damaged page is never sent again, so only the digest can see it.
    let dst = soft(true, 32 << 20, 4 << 20);
    let p = MigrationParams {
        verify_full: false,
        ..main_only(params())
    };
    let d = spawn_dest(dst.clone(), dest_id(), p.clone());
    let (via, proxy) = corrupting_proxy(d.uri.clone());
    let m = MigrationMonitor::new();
    let err = engine::migrate(src.as_ref(), &source_id(), &p, &via, &m).unwrap_err();
    let derr = d.handle.join().unwrap().unwrap_err();
    proxy.join().unwrap();
    assert!(
        matches!(derr, MigrationError::Verify(_)),
        "destination: {derr}"
    );
    assert!(err.to_string().contains("digest"), "source: {err}");
    assert!(
        !dst.is_running(),
        "a guest whose memory is wrong must not run"
    );
    assert!(
        !src.is_running(),
        "the source was paused before and stays so"
    );
}

/// A stream of ferry's magic that goes wrong in its header or hello frame is turned
/// away with a reason, and the destination goes on waiting.
#[test]
fn malformed_streams_are_refused_with_a_reason() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("version", {
            let mut b = StreamHeader { version: 99 }.encode().to_vec();
            b.extend_from_slice(&[0; 8]);
            b
        }),
        ("hello length", {
            let mut b = StreamHeader { version: 1 }.encode().to_vec();
            b.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f]);
            b
        }),
        ("frame type", {
            let mut b = StreamHeader { version: 1 }.encode().to_vec();
            b.extend_from_slice(&[0x66, 0, 0, 0, 0, 0, 0, 0]);
            b
        }),
    ];
    for (what, bytes) in cases {
        let dst = soft(true, 16 << 20, 0);
        let d = spawn_dest(dst.clone(), dest_id(), params());
        let MigrationUri::Tcp(addr) = &d.uri else {
            unreachable!()
        };
        let mut s = TcpStream::connect(addr).unwrap();
        // The destination may hang up as soon as it has seen enough: that is fine.
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // It turns the stream away with a reason and goes on waiting.
        d.wait_strays(1);
        let strays = d.stop_waiting();
        let text = strays.join("; ");
        assert!(!text.is_empty(), "{what}");
        assert!(!dst.is_running(), "{what}: resumed a guest from garbage");
        eprintln!("{what}: {text}");
    }
}

/// A connection that is not a ferry stream at all (another magic, a header cut short)
/// is turned away at the door: the destination goes on waiting, and the real source
/// that connects next migrates as if nothing had happened.
#[test]
fn connections_that_are_not_migrations_do_not_disturb_the_destination() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "magic",
            b"QEVM\0\0\0\x03garbage!".to_vec(),
            "not a ferry migration connection",
        ),
        (
            "truncated",
            b"FERRYMIG\x01\0".to_vec(),
            "short stream header",
        ),
        ("silence", Vec::new(), "no header"),
    ];
    for (what, bytes, reason) in cases {
        let src = soft(false, 16 << 20, 1 << 20);
        let dst = soft(true, 16 << 20, 1 << 20);
        let d = spawn_dest(dst.clone(), dest_id(), params());
        let MigrationUri::Tcp(addr) = &d.uri else {
            unreachable!()
        };
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let info = engine::migrate(
            src.as_ref(),
            &source_id(),
            &params(),
            &d.uri,
            &MigrationMonitor::new(),
        )
        .unwrap_or_else(|e| panic!("{what}: {}", ferry_migration::engine::error_chain(&e)));
        assert_eq!(info.status, MigrationStatus::Completed, "{what}");
        let dinfo = d.handle.join().unwrap().unwrap();
        let strays = dinfo.multifd.map(|m| m.strays).unwrap_or_default();
        assert_eq!(strays.len(), 1, "{what}: {strays:?}");
        assert!(strays[0].contains(reason), "{what}: {strays:?}");
        wait_passes(&dst, 3);
        assert_guest_intact(&dst);
    }
}

// ---------------------------------------------------------------------------------------
// Data channels (multifd)

fn with_channels(channels: u16, compression: Compression) -> MigrationParams {
    MigrationParams {
        multifd_channels: channels,
        multifd_compression: compression,
        ..params()
    }
}

/// A 64 MiB guest dirtying 8 MiB, with 4 MiB of incompressible data so that zstd sees
/// both kinds of page.
fn mixed_pages_guest() -> SoftConfig {
    SoftConfig {
        mem_size: 64 << 20,
        dirty_size: 8 << 20,
        fill: 4 << 20,
        console_every: 50,
        ..SoftConfig::default()
    }
}

/// A stream that hides its socket, as a TLS stream would: the engine must copy pages
/// through buffers of its own instead of `writev`/`readv` on guest memory.
struct NoFd(Channel);

impl MigrationStream for NoFd {
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_clone()?.read(buf)
    }
    fn write(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.try_clone()?.write(buf)
    }
    fn try_clone(&self) -> std::io::Result<Box<dyn MigrationStream>> {
        Ok(Box::new(NoFd(self.0.try_clone()?)))
    }
    fn shutdown(&self, how: std::net::Shutdown) {
        match how {
            std::net::Shutdown::Read => self.0.shutdown_read(),
            _ => self.0.shutdown(),
        }
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.0.set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.0.set_write_timeout(t)
    }
}

/// The source's side of an embedder's transport: connections to `uri`, fd hidden.
struct NoFdConnector(MigrationUri);

impl Connector for NoFdConnector {
    fn connect(&self, role: StreamRole) -> std::io::Result<Channel> {
        Ok(Channel::new(NoFd(self.0.connect(role)?)))
    }
    fn describe(&self) -> String {
        format!("{} (no fd)", self.0)
    }
}

/// The destination's side: a listener whose connections hide their fd, and which
/// offers nothing to poll.
struct NoFdAcceptor(Listener);

impl Acceptor for NoFdAcceptor {
    fn accept(&self, within: Duration) -> std::io::Result<Option<(Channel, String)>> {
        Ok(Acceptor::accept(&self.0, within)?.map(|(ch, peer)| (Channel::new(NoFd(ch)), peer)))
    }
}

#[test]
fn a_transport_of_the_embedders_without_a_socket_fd_migrates_intact() {
    for (channels, compression) in [
        (0, Compression::None),
        (2, Compression::None),
        (2, Compression::Zstd),
    ] {
        let what = format!("{channels} channels, {}, no fd", compression.name());
        let (src, dst) = soft_pair(&mixed_pages_guest(), 20);
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let uri = l.local_uri().unwrap();
        let d = {
            let dst = dst.clone();
            thread::spawn(move || {
                let m = MigrationMonitor::new();
                engine::receive(
                    dst.as_ref(),
                    &dest_id(),
                    &params(),
                    Incoming::acceptor(NoFdAcceptor(l)),
                    &m,
                )
            })
        };
        let info = engine::migrate(
            src.as_ref(),
            &source_id(),
            &with_channels(channels, compression),
            &NoFdConnector(uri),
            &MigrationMonitor::new(),
        )
        .unwrap_or_else(|e| panic!("{what}: {}", engine::error_chain(&e)));
        d.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: {}", engine::error_chain(&e)));
        assert_eq!(info.verified.as_deref(), Some("digest+full"), "{what}");
        assert!(info.ram.normal > 0, "{what}: no page with data moved");
        let at_stop = src.report().passes[0];
        wait_passes(&dst, at_stop + 5);
        assert_guest_intact(&dst);
    }
}

#[test]
fn live_migrations_over_0_1_2_and_4_channels_with_and_without_zstd_keep_memory_intact() {
    for (channels, compression) in [
        (0, Compression::None),
        (1, Compression::None),
        (2, Compression::None),
        (4, Compression::None),
        (1, Compression::Zstd),
        (4, Compression::Zstd),
    ] {
        let what = format!("{channels} channels, {}", compression.name());
        let (src, dst) = soft_pair(&mixed_pages_guest(), 20);
        // The destination follows the hello: its own channel setting does not matter.
        let d = spawn_dest(dst.clone(), dest_id(), params());
        let p = with_channels(channels, compression);
        let info = engine::migrate(
            src.as_ref(),
            &source_id(),
            &p,
            &d.uri,
            &MigrationMonitor::new(),
        )
        .unwrap_or_else(|e| panic!("{what}: {}", engine::error_chain(&e)));
        let dinfo = d.handle.join().unwrap().unwrap();
        assert_eq!(info.verified.as_deref(), Some("digest+full"), "{what}");
        assert_eq!(
            dinfo.session, info.session,
            "{what}: both sides name the session"
        );
        let at_stop = src.report().passes[0];
        wait_passes(&dst, at_stop + 5);
        assert_guest_intact(&dst);
        if channels == 0 {
            assert!(info.multifd.is_none(), "{what}");
            assert_eq!(info.ram.multifd_bytes, 0, "{what}");
            continue;
        }
        let m = info.multifd.expect("multifd statistics");
        let dm = dinfo.multifd.expect("destination multifd statistics");
        assert_eq!(m.channels, channels, "{what}");
        assert_eq!(dm.channels, channels, "{what}");
        assert_eq!(m.per_channel.len(), channels as usize, "{what}");
        assert!(
            m.per_channel.iter().all(|c| c.pages > 0),
            "{what}: a channel carried no pages: {:?}",
            m.per_channel
        );
        assert_eq!(
            m.wire_bytes, dm.wire_bytes,
            "{what}: bytes sent and received"
        );
        assert_eq!(
            (info.ram.multifd_bytes, dinfo.ram.multifd_bytes),
            (m.wire_bytes, dm.wire_bytes),
            "{what}: QEMU's multifd-bytes is what the data channels carried"
        );
        assert!(
            m.syncs >= 2,
            "{what}: a pass sync and the last one at least"
        );
        if compression == Compression::Zstd {
            assert!(
                m.wire_bytes < m.raw_bytes,
                "{what}: zstd did not shrink anything ({} of {})",
                m.wire_bytes,
                m.raw_bytes
            );
        } else {
            assert!(m.wire_bytes > m.raw_bytes, "{what}: headers and raw pages");
        }
    }
}

/// Pages that zstd packs tightly must not make the migration look slower than it is:
/// what a switchover would cost is the time the dirty pages take to send, not their
/// uncompressed size over the compressed bytes' rate. A guest that never stops dirtying
/// memory (so no pass ends with nothing left) converges at once rather than after dozens
/// of passes, or never.
#[test]
fn zstd_on_compressible_pages_converges_while_the_guest_keeps_dirtying() {
    let cfg = SoftConfig {
        mem_size: 64 << 20,
        dirty_size: 16 << 20,
        // As fast as it can: it rewrites all 16 MiB while a pass sends them, and each
        // page holds its pass number, which zstd shrinks ~100-fold.
        dirty_rate: 0,
        console_every: 50,
        ..SoftConfig::default()
    };
    let (src, dst) = soft_pair(&cfg, 2);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    let p = MigrationParams {
        verify_full: false,
        ..with_channels(2, Compression::Zstd)
    };
    let m = Arc::new(MigrationMonitor::new());
    let migration = {
        let (src, m, uri) = (src.clone(), m.clone(), d.uri.clone());
        thread::spawn(move || engine::migrate(src.as_ref(), &source_id(), &p, &uri, &m))
    };
    let started = Instant::now();
    while !migration.is_finished() {
        let info = m.info();
        if info.passes.len() > 10 || started.elapsed() > Duration::from_secs(20) {
            let _ = m.cancel();
            let _ = migration.join();
            let _ = d.handle.join();
            panic!(
                "no switchover after {} passes in {:.1} s: {:#?}",
                info.passes.len(),
                started.elapsed().as_secs_f64(),
                info.passes.iter().rev().take(3).collect::<Vec<_>>()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    let info = migration
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{}", engine::error_chain(&e)));
    d.handle.join().unwrap().unwrap();
    let mfd = info.multifd.as_ref().expect("multifd statistics");
    assert!(
        mfd.wire_bytes * 10 < mfd.raw_bytes,
        "the pages were meant to compress well: {mfd:?}"
    );
    let last_live = info.passes.iter().rev().find(|p| !p.final_pass).unwrap();
    assert!(
        last_live.expected_downtime_ms <= 300.0,
        "switched over expecting {} ms",
        last_live.expected_downtime_ms
    );
    let at_stop = src.report().passes[0];
    wait_passes(&dst, at_stop + 2);
    assert_guest_intact(&dst);
}

#[test]
fn a_data_channel_closed_mid_migration_fails_naming_it_and_a_retry_succeeds() {
    let src = soft(false, 64 << 20, 16 << 20);
    wait_passes(&src, 10);
    let dst = soft(true, 64 << 20, 16 << 20);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    let p = with_channels(2, Compression::None);
    let m = MigrationMonitor::new();
    m.set_faults(Faults {
        close_channel_after: Some((1, 3)),
        ..Faults::NONE
    });
    let err = engine::migrate(src.as_ref(), &source_id(), &p, &d.uri, &m).unwrap_err();
    let text = engine::error_chain(&err);
    assert!(text.contains("data channel 1"), "{text}");
    assert_eq!(m.status(), MigrationStatus::Failed);
    let derr = engine::error_chain(&d.handle.join().unwrap().unwrap_err());
    assert!(derr.contains("data channel 1"), "destination: {derr}");
    assert!(!dst.is_running(), "the destination must not resume");
    assert!(src.is_running(), "the source must keep running");
    let before = src.report().passes[0];
    wait_passes(&src, before + 5);

    let dst = soft(true, 64 << 20, 16 << 20);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    engine::migrate(
        src.as_ref(),
        &source_id(),
        &with_channels(2, Compression::None),
        &d.uri,
        &MigrationMonitor::new(),
    )
    .unwrap();
    d.handle.join().unwrap().unwrap();
    assert_guest_intact(&dst);
}

#[test]
fn a_data_channel_that_never_connects_fails_naming_it_and_a_retry_succeeds() {
    let src = soft(false, 32 << 20, 4 << 20);
    wait_passes(&src, 10);
    let dst = soft(true, 32 << 20, 4 << 20);
    let d = spawn_faulty_dest(
        dst.clone(),
        dest_id(),
        params(),
        Faults {
            channel_wait: Some(Duration::from_millis(500)),
            ..Faults::NONE
        },
    );
    let p = with_channels(3, Compression::None);
    let m = MigrationMonitor::new();
    m.set_faults(Faults {
        skip_channel: Some(1),
        ..Faults::NONE
    });
    let err = engine::migrate(src.as_ref(), &source_id(), &p, &d.uri, &m).unwrap_err();
    let text = engine::error_chain(&err);
    assert!(
        text.contains("data channel 1 of 3 did not connect"),
        "{text}"
    );
    assert_eq!(
        m.info().ram.transferred,
        0,
        "RAM moved without all channels"
    );
    d.handle.join().unwrap().unwrap_err();
    assert!(!dst.is_running());
    assert!(src.is_running(), "the source must keep running");

    let dst = soft(true, 32 << 20, 4 << 20);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    engine::migrate(
        src.as_ref(),
        &source_id(),
        &with_channels(3, Compression::None),
        &d.uri,
        &MigrationMonitor::new(),
    )
    .unwrap();
    d.handle.join().unwrap().unwrap();
    assert_guest_intact(&dst);
}

/// Connects to `addr`, sends `bytes`, and returns whatever comes back before the
/// destination closes (a refusal, or nothing).
fn knock(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    back
}

#[test]
fn stray_connections_are_turned_away_without_disturbing_the_migration() {
    let src = soft(false, 32 << 20, 4 << 20);
    wait_passes(&src, 5);
    let dst = soft(true, 32 << 20, 4 << 20);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    let MigrationUri::Tcp(addr) = d.uri.clone() else {
        unreachable!()
    };
    // Slow enough that the strays arrive while pages move.
    let p = MigrationParams {
        max_bandwidth: 16 << 20,
        ..with_channels(2, Compression::None)
    };
    let m = Arc::new(MigrationMonitor::new());
    let (m2, uri) = (Arc::clone(&m), d.uri.clone());
    let src2 = src.clone();
    let migration =
        thread::spawn(move || engine::migrate(src2.as_ref(), &source_id(), &p, &uri, &m2));
    let t = Instant::now();
    while m.status() != MigrationStatus::Active {
        assert!(t.elapsed() < Duration::from_secs(20), "never went active");
        thread::sleep(Duration::from_millis(2));
    }
    let session = u64::from_str_radix(m.info().session.as_deref().unwrap(), 16).unwrap();
    let header = |session, index, count| {
        let mut b = ChannelHeader {
            version: CHANNEL_VERSION,
            session_id: session,
            index,
            count,
        }
        .encode();
        if index >= count {
            // Encoders never write this; a hostile peer may.
            b[24..26].copy_from_slice(&index.to_le_bytes());
        }
        b.to_vec()
    };
    let strays: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            "not a ferry migration connection",
        ),
        (
            "wrong session",
            header(session ^ 1, 0, 2),
            "not this migration's",
        ),
        (
            "duplicate index",
            header(session, 0, 2),
            "after all channels were bound",
        ),
        (
            "index out of range",
            header(session, 2, 2),
            "bad channel header",
        ),
        (
            "wrong count",
            header(session, 0, 3),
            "after all channels were bound",
        ),
        (
            // A second source is answered once its hello is in: a header alone holds
            // nothing and is only timed out.
            "second main stream",
            {
                let mut b = StreamHeader { version: 1 }.encode().to_vec();
                b.extend_from_slice(
                    &FrameHeader {
                        tag: FrameTag::Hello,
                        len: 4,
                    }
                    .encode(),
                );
                b.extend_from_slice(&[0; 4]);
                b
            },
            "a second migration stream",
        ),
    ];
    for (what, bytes, _) in &strays {
        let back = knock(&addr, bytes);
        if *what == "second main stream" {
            let fh = FrameHeader::decode(&back[..FrameHeader::LEN].try_into().unwrap()).unwrap();
            assert_eq!(fh.tag, FrameTag::Refuse, "{what}");
            let r = ferry_migration::wire::Refuse::decode(&back[FrameHeader::LEN..]).unwrap();
            assert_eq!(r.cause, RefuseCause::Busy);
            assert!(r.reason.contains("already receiving"), "{}", r.reason);
        } else {
            assert!(
                back.is_empty(),
                "{what}: nothing goes back on a data channel"
            );
        }
    }
    assert_eq!(
        m.status(),
        MigrationStatus::Active,
        "the strays disturbed the migration"
    );
    let info = migration.join().unwrap().unwrap();
    assert_eq!(info.status, MigrationStatus::Completed);
    let dinfo = d.handle.join().unwrap().unwrap();
    let seen = dinfo.multifd.unwrap().strays;
    assert_eq!(seen.len(), strays.len(), "{seen:#?}");
    for (what, _, reason) in &strays {
        assert!(
            seen.iter().any(|s| s.contains(reason)),
            "{what}: no stray says {reason:?}: {seen:#?}"
        );
    }
    wait_passes(&dst, src.report().passes[0] + 3);
    assert_guest_intact(&dst);
}

/// The hazard the sync barrier exists for, shown both ways. The guest rewrites the same
/// 768 pages continually and the source makes six passes before it may converge; the
/// destination holds every packet of channel 1 for 20 ms. Without syncs, channel 1
/// falls behind and the older copies it carries land after newer copies of the same
/// pages sent on channels 0 and 2. With them they never do, under either rule: a sync
/// after every section (0.1's, `multifd-flush-after-each-section=on`) or once per pass
/// (0.2's).
#[test]
fn the_sync_barrier_keeps_stale_pages_out_and_a_no_sync_mode_lets_them_in() {
    const RUNS: usize = 10;
    const MAX_NO_SYNC_RUNS: usize = 20;
    let cfg = SoftConfig {
        mem_size: 16 << 20,
        dirty_size: 768 * 4096,
        console_every: 1_000_000,
        ..SoftConfig::default()
    };
    // One migration; returns (source result, destination result, pages wrong at the
    // destination if it resumed).
    let run = |no_sync: bool, digest: bool, per_section: bool| {
        let (src, dst) = soft_pair(&cfg, 50);
        let sid = SourceIdentity {
            wire_props: wire_props(digest),
            ..source_id()
        };
        let did = DestinationIdentity {
            wire_props: wire_props(digest),
            ..dest_id()
        };
        let base = MigrationParams {
            digest,
            verify_full: false,
            multifd_flush_after_each_section: per_section,
            ..with_channels(3, Compression::None)
        };
        let dp = base.clone();
        let delay = Faults {
            delay_channel: Some((1, Duration::from_millis(20))),
            ..Faults::NONE
        };
        let mut sp = base;
        // Pass after pass until the sixth, so old copies pile up behind the slow
        // channel; then a generous limit lets the migration converge.
        sp.downtime_limit = Duration::from_nanos(1);
        let d = spawn_faulty_dest(dst.clone(), did, dp, delay);
        let m = Arc::new(MigrationMonitor::new());
        m.set_faults(Faults {
            no_sync,
            ..Faults::NONE
        });
        let m2 = Arc::clone(&m);
        let release = thread::spawn(move || {
            let t = Instant::now();
            while m2.info().passes.len() < 6
                && !m2.status().is_finished()
                && t.elapsed() < Duration::from_secs(20)
            {
                thread::sleep(Duration::from_millis(1));
            }
            m2.set_downtime_limit(Duration::from_secs(60));
        });
        let s = engine::migrate(src.as_ref(), &sid, &sp, &d.uri, &m);
        release.join().unwrap();
        let r = d.handle.join().unwrap();
        let wrong = dst.is_running().then(|| {
            // Stop the guest so the check sees memory and registers of one moment.
            dst.pause().unwrap();
            dst.verify().unwrap().1
        });
        (s, r, wrong)
    };
    let (mut per_section_bad, mut per_pass_bad) = (0, 0);
    for _ in 0..RUNS {
        for (per_section, bad) in [(true, &mut per_section_bad), (false, &mut per_pass_bad)] {
            let (s, r, wrong) = run(false, true, per_section);
            let ok = s.is_ok() && r.is_ok() && wrong == Some(0);
            *bad += usize::from(!ok);
        }
    }
    // The corruption needs an unlucky order of packets, so the no-sync mode runs until
    // it has been caught both ways (each run is over half likely to corrupt).
    let (mut digest_caught, mut pattern_caught, mut tries) = (0, 0, 0);
    while (digest_caught == 0 || pattern_caught == 0) && tries < MAX_NO_SYNC_RUNS {
        tries += 1;
        // With the digest: the destination refuses to resume.
        let (_, r, wrong) = run(true, true, false);
        if matches!(&r, Err(MigrationError::Verify(m)) if m.contains("digest")) {
            digest_caught += 1;
            assert_eq!(wrong, None, "resumed although the digest failed");
        }
        // Without it, the guest resumes with stale pages, which its pattern shows.
        let (_, _, wrong) = run(true, false, false);
        if wrong.is_some_and(|w| w > 0) {
            pattern_caught += 1;
        }
    }
    eprintln!(
        "sync per section: {per_section_bad}/{RUNS} runs wrong; per pass: {per_pass_bad}/{RUNS}; no sync: digest caught {digest_caught}/{tries}, pattern caught {pattern_caught}/{tries}"
    );
    assert_eq!(
        per_section_bad, 0,
        "the sync after every section let a stale page win"
    );
    assert_eq!(
        per_pass_bad, 0,
        "the sync once per pass let a stale page win"
    );
    assert!(
        digest_caught > 0,
        "the no-sync mode never corrupted: the test cannot show the rule matters"
    );
    assert!(
        pattern_caught > 0,
        "the page pattern never showed a stale page without the digest"
    );
}

/// Converged after pass 0, the source still makes passes while each leaves well under
/// what it sent: the final pass (the downtime) then carries less than pass 0 left.
#[test]
fn passes_go_on_after_convergence_while_they_shrink_the_final_pass() {
    let cfg = SoftConfig {
        mem_size: 128 << 20,
        dirty_size: 32 << 20,
        // Pass 0 sends the data too; the dirty range is what it leaves. The next pass
        // is short, and at 8192 pages a second the guest dirties only a few hundred
        // pages during it.
        fill: 64 << 20,
        dirty_rate: 8192,
        ..SoftConfig::default()
    };
    let (src, dst) = soft_pair(&cfg, 1);
    let d = spawn_dest(dst.clone(), dest_id(), params());
    let p = MigrationParams {
        downtime_limit: Duration::from_secs(5),
        ..params()
    };
    let info = engine::migrate(
        src.as_ref(),
        &source_id(),
        &p,
        &d.uri,
        &MigrationMonitor::new(),
    )
    .unwrap();
    d.handle.join().unwrap().unwrap();
    let passes = &info.passes;
    assert!(passes.len() >= 3, "no pass after convergence: {passes:#?}");
    let after_pass0 = passes[0].dirty_after;
    let last = passes.last().unwrap();
    assert!(last.final_pass);
    assert!(
        last.pages * 2 < after_pass0,
        "the final pass carried {} pages, pass 0 left {after_pass0}",
        last.pages
    );
    assert_guest_intact(&dst);
}

/// The two sync rules on the wire: with the guest paused and the send rate capped so
/// that pass 0 spans several sections, 0.1's rule syncs after each of them and 0.2's
/// once per pass; both deliver every page.
#[test]
fn the_data_channels_sync_after_every_section_or_once_per_pass_as_the_property_says() {
    let cfg = SoftConfig {
        mem_size: 32 << 20,
        dirty_size: 0,
        fill: 12 << 20,
        paused: true,
        ..SoftConfig::default()
    };
    let mut syncs = Vec::new();
    for per_section in [true, false] {
        let (src, dst) = soft_pair(&cfg, 0);
        let p = MigrationParams {
            multifd_flush_after_each_section: per_section,
            // About 0.5 s for pass 0: five sections.
            max_bandwidth: 24 << 20,
            ..with_channels(2, Compression::None)
        };
        let d = spawn_dest(dst.clone(), dest_id(), p.clone());
        let info = engine::migrate(
            src.as_ref(),
            &source_id(),
            &p,
            &d.uri,
            &MigrationMonitor::new(),
        )
        .unwrap();
        let dinfo = d.handle.join().unwrap().unwrap();
        let passes = info.passes.len() as u64;
        let sent = info.multifd.as_ref().unwrap().syncs;
        let received = dinfo.multifd.as_ref().unwrap().syncs;
        assert_eq!(sent, received, "per section {per_section}");
        if per_section {
            assert!(
                sent >= passes + 3,
                "per section: {sent} syncs over {passes} passes"
            );
        } else {
            assert_eq!(
                sent, passes,
                "once per pass: {sent} syncs over {passes} passes"
            );
        }
        assert_eq!(info.verified.as_deref(), Some("digest+full"));
        syncs.push(sent);
    }
    eprintln!("syncs per section / per pass: {syncs:?}");
}

/// `-global migration.multifd-flush-after-each-section=on` on one side only is refused
/// before any RAM moves, naming the property and both values.
#[test]
fn a_sync_rule_set_on_one_side_only_is_refused_naming_it() {
    for (src_rule, dst_rule) in [(true, false), (false, true)] {
        let src = soft(false, 32 << 20, 1 << 20);
        let sp = MigrationParams {
            multifd_flush_after_each_section: src_rule,
            ..params()
        };
        let dp = MigrationParams {
            multifd_flush_after_each_section: dst_rule,
            ..params()
        };
        let d = spawn_dest(soft(true, 32 << 20, 1 << 20), dest_id(), dp);
        let m = MigrationMonitor::new();
        let err = engine::migrate(src.as_ref(), &source_id(), &sp, &d.uri, &m).unwrap_err();
        d.stop_waiting();
        let MigrationError::Refused { cause, reason } = err else {
            panic!("expected a refusal, got {err}");
        };
        assert_eq!(cause, RefuseCause::PropertyMismatch);
        let on_off = |b: bool| if b { "on" } else { "off" };
        assert!(
            reason.contains(&format!(
                "migration.multifd-flush-after-each-section is {} on the source and {} here",
                on_off(src_rule),
                on_off(dst_rule)
            )),
            "{reason}"
        );
        assert_eq!(m.info().ram.transferred, 0);
        assert!(src.is_running());
    }
}

/// A source that states the once-per-pass rule and then syncs every section breaks the
/// protocol: the destination fails it, naming the rule, and the source keeps its guest.
#[test]
fn a_source_that_breaks_the_once_per_pass_rule_is_stopped_by_the_destination() {
    let cfg = SoftConfig {
        mem_size: 32 << 20,
        dirty_size: 1 << 20,
        fill: 12 << 20,
        ..SoftConfig::default()
    };
    let (src, dst) = soft_pair(&cfg, 1);
    let p = MigrationParams {
        max_bandwidth: 24 << 20,
        ..with_channels(2, Compression::None)
    };
    let d = spawn_dest(dst.clone(), dest_id(), p.clone());
    let m = MigrationMonitor::new();
    m.set_faults(Faults {
        sync_every_section: true,
        ..Faults::NONE
    });
    let err = engine::migrate(src.as_ref(), &source_id(), &p, &d.uri, &m).unwrap_err();
    let derr = d.handle.join().unwrap().unwrap_err();
    assert!(
        error_chain(&derr).contains("second in one pass"),
        "{}",
        error_chain(&derr)
    );
    assert!(
        error_chain(&err).contains("second in one pass"),
        "the source was not told why: {}",
        error_chain(&err)
    );
    assert!(src.is_running() && !dst.is_running());
}
