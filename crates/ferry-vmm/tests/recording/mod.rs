//! A migration of a soft guest with a precopy-capable accelerator on machine type
//! `ferry-0.2` (pages on the main channel), recorded once as the bytes its source
//! wrote, and replays of those bytes, changed or not, into fresh destinations: shared by
//! `tests/precopy_stream.rs` and the `precopy_stream` fuzz target.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use ferry_migration::compat::Config;
use ferry_migration::engine::{
    self, error_chain, Channel, Connector, DestinationIdentity, MigrationError, MigrationInfo,
    MigrationMonitor, MigrationParams, SourceIdentity, StreamRole,
};
use ferry_migration::wire::{DeviceStateHeader, FrameHeader, FrameTag, StreamHeader};
use ferry_vmm::devices::accel::AccelConfig;
use ferry_vmm::guest::GuestVm;
use ferry_vmm::machine;
use ferry_vmm::soft::{SoftConfig, SoftVm};

pub const MIB: u64 = 1 << 20;
pub const ACCEL: u64 = 4 * MIB;

pub fn config() -> Config {
    machine::registry().configure("ferry-0.2", &[]).unwrap()
}

pub fn params() -> MigrationParams {
    MigrationParams {
        multifd_channels: 0,
        ..MigrationParams::from_config(&config()).unwrap()
    }
}

pub fn vm(incoming: bool, precopy: bool) -> Arc<SoftVm> {
    Arc::new(
        SoftVm::create(&SoftConfig {
            mem_size: 16 * MIB,
            dirty_size: MIB,
            incoming,
            console_every: 50,
            accels: vec![AccelConfig::new(ACCEL, precopy)],
            ..SoftConfig::default()
        })
        .unwrap(),
    )
}

pub fn dest_id() -> DestinationIdentity {
    let c = config();
    DestinationIdentity {
        release: machine::RELEASE.into(),
        machine: c.machine().into(),
        known_machines: machine::machine_names(),
        wire_props: c.wire_properties(),
        compat_pinned: c.compat_pinned_wire_properties(),
    }
}

/// A connector whose main stream goes through a tap: what the source writes is kept,
/// and passed on to `dest`; what comes back is passed to the source.
pub struct Tap {
    dest: Mutex<Option<UnixStream>>,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Connector for Tap {
    fn connect(&self, role: StreamRole) -> std::io::Result<Channel> {
        assert_eq!(role, StreamRole::Main, "the recording has no data channels");
        let dest = self.dest.lock().unwrap().take().expect("one connection");
        let (ours, theirs) = UnixStream::pair()?;
        let (mut from_src, mut to_dst) = (ours.try_clone()?, dest.try_clone()?);
        let seen = Arc::clone(&self.seen);
        thread::spawn(move || {
            let mut b = vec![0u8; 1 << 16];
            while let Ok(n) = from_src.read(&mut b) {
                if n == 0 || to_dst.write_all(&b[..n]).is_err() {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&b[..n]);
            }
            let _ = to_dst.shutdown(Shutdown::Write);
        });
        let (mut from_dst, mut to_src) = (dest, ours);
        thread::spawn(move || {
            let mut b = vec![0u8; 1 << 16];
            while let Ok(n) = from_dst.read(&mut b) {
                if n == 0 || to_src.write_all(&b[..n]).is_err() {
                    break;
                }
            }
            let _ = to_src.shutdown(Shutdown::Write);
        });
        Ok(Channel::new(theirs))
    }

    fn describe(&self) -> String {
        "a tap".into()
    }
}

/// One frame of the recording.
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: FrameTag,
    pub bytes: Vec<u8>,
}

impl Frame {
    pub fn payload(&self) -> &[u8] {
        &self.bytes[FrameHeader::LEN..]
    }

    /// The device a device-state or precopy frame is for.
    pub fn device(&self) -> String {
        let p = self.payload();
        let (h, _) = DeviceStateHeader::decode(p).unwrap();
        format!("{}/{}", h.name, h.instance)
    }
}

pub struct Recording {
    pub header: Vec<u8>,
    pub frames: Vec<Frame>,
}

impl Recording {
    pub fn stream(&self, frames: &[Frame]) -> Vec<u8> {
        let mut s = self.header.clone();
        for f in frames {
            s.extend_from_slice(&f.bytes);
        }
        s
    }

    pub fn whole(&self) -> Vec<u8> {
        self.stream(&self.frames)
    }

    pub fn index(&self, tag: FrameTag) -> Vec<usize> {
        (0..self.frames.len())
            .filter(|&i| self.frames[i].tag == tag)
            .collect()
    }
}

pub fn record() -> Recording {
    let src = vm(false, true);
    let t = Instant::now();
    while src.report().passes[0] < 20 {
        assert!(t.elapsed() < Duration::from_secs(10));
        thread::sleep(Duration::from_millis(2));
    }
    let dst = vm(true, true);
    let (a, b) = UnixStream::pair().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tap = Tap {
        dest: Mutex::new(Some(a)),
        seen: Arc::clone(&seen),
    };
    let dvm = Arc::clone(&dst);
    let dest = thread::spawn(move || {
        engine::receive(
            dvm.as_ref(),
            &dest_id(),
            &params(),
            Channel::new(b),
            &MigrationMonitor::new(),
        )
    });
    let c = config();
    let sid = SourceIdentity {
        release: machine::RELEASE.into(),
        machine: c.machine().into(),
        wire_props: c.wire_properties(),
        compat_pinned: c.compat_pinned_wire_properties(),
    };
    let info = engine::migrate(
        src.as_ref(),
        &sid,
        &params(),
        &tap,
        &MigrationMonitor::new(),
    )
    .unwrap_or_else(|e| panic!("the recorded migration failed: {}", error_chain(&e)));
    dest.join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the recording's destination failed: {}", error_chain(&e)));
    assert_eq!(info.devices[1].mode, "precopy", "{:?}", info.devices);
    thread::sleep(Duration::from_millis(50));
    let bytes = seen.lock().unwrap().clone();
    let header = bytes[..StreamHeader::LEN].to_vec();
    let mut frames = Vec::new();
    let mut at = StreamHeader::LEN;
    while at < bytes.len() {
        let fh = FrameHeader::decode(bytes[at..at + FrameHeader::LEN].try_into().unwrap()).unwrap();
        let end = at + FrameHeader::LEN + fh.len as usize;
        frames.push(Frame {
            tag: fh.tag,
            bytes: bytes[at..end].to_vec(),
        });
        at = end;
    }
    Recording { header, frames }
}

pub fn recording() -> &'static Recording {
    static R: OnceLock<Recording> = OnceLock::new();
    R.get_or_init(record)
}

/// What a replay gave.
pub struct Outcome {
    pub result: Result<MigrationInfo, MigrationError>,
    pub vm: Arc<SoftVm>,
}

/// Feeds `stream` into a fresh destination (whose host can precopy the accelerator, or
/// not) and drains its answers.
pub fn replay(stream: &[u8], precopy: bool) -> Outcome {
    let dst = vm(true, precopy);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut feeder = ours.try_clone().unwrap();
    let bytes = stream.to_vec();
    let feed = thread::spawn(move || {
        let _ = feeder.write_all(&bytes);
        let _ = feeder.shutdown(Shutdown::Write);
    });
    let drain = thread::spawn(move || {
        let mut ours = ours;
        let mut back = Vec::new();
        let _ = ours.read_to_end(&mut back);
    });
    let t = Instant::now();
    let result = engine::receive(
        dst.as_ref(),
        &dest_id(),
        &params(),
        Channel::new(theirs),
        &MigrationMonitor::new(),
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    feed.join().unwrap();
    drain.join().unwrap();
    Outcome { result, vm: dst }
}
