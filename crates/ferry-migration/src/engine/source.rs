//! The outgoing side of a migration.
//!
//! ```text
//!  setup ──> active (pass 0, 1, … until converged) ──> device (guest stopped) ──> completed
//!    │            │                                        │
//!    └────────────┴──────── any error or cancel ───────────┴──> failed | cancelled
//!                           (guest resumed if we stopped it, harvested dirty bits put back)
//! ```
//!
//! Convergence: after each pass (and a round of device precopy records, for the devices
//! the destination's plan precopies) the dirty log is harvested and the pages still to
//! send are divided by the rate at which that pass sent pages (pages, not wire bytes, so
//! that zero pages and compression do not skew it); every device's stop-copy estimate is
//! added at the link's rate. When that expected downtime fits the `downtime-limit` and
//! every precopying device has been acknowledged by the destination, the guest is
//! stopped and the final pass, the devices' last precopy records, device and vCPU state
//! follow. With RAM done and only an acknowledgement or a limit missing, the source
//! waits (a section at a time, watching the return path) rather than spins; an
//! acknowledgement that does not come within 30 s of the device's initial data fails
//! the migration, naming the device. Nothing is retried: a failure ends the attempt
//! cleanly (devices leave precopy, harvested pages go back), and a new migration can
//! start at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bitmap::DirtyBitmap;
use super::converge::{Converge, PassFigures, TimeoutAction, Verdict, SYNC_PERIOD};
use super::digest::PageDigest;
use super::error::{error_chain, MigrationError};
use super::liveness::{KeepaliveSender, Liveness, Stalled, LEGACY_LIMIT};
use super::memory::GuestMemory;
use super::multifd::{ChannelCounters, SendConfig, SendSet, SECTION};
use super::pages::{record, Classifier, MainLane, Picker, Side, BATCH_PAGES};
use super::params::{human_bytes, MigrationParams};
use super::stats::{
    ChannelStats, ConvergenceInfo, DeviceStats, DowntimeBreakdown, Handover, HandoverPoint,
    MigrationEvent, MigrationInfo, MigrationMonitor, MigrationStatus, MultifdStats, PassStats,
    STOP_COPY_ACK_OFF,
};
use super::stream::{
    read_frame_header, read_payload, write_frame, write_frame_after, DeviceFrame, StateHash,
};
use super::transport::{Channel, Connector, StreamRole};
use super::vm::{DeviceInfo, GuestRam, MigratableVm, RamBlock, VcpuThrottle};
use crate::state::{self, StateWriter};
use crate::wire::{
    decode_reason, encode_reason, Accept, Annotations, ChannelHeader, ChannelsReady, Completed,
    DeviceMode, DevicePlan, DeviceRef, DeviceStateHeader, EndOfStream, FrameTag, Hello,
    HelloDevice, HelloRamBlock, Keepalive, MultifdSync, PassEnd, PopulatedExtents, PrecopyOffer,
    Refuse, StopCopyWhy, StreamHeader, VcpuStateHeader, CHANNEL_VERSION, PROTOCOL_VERSION,
};
use crate::PAGE_SIZE;

const PEER: &str = "destination";
/// How long the destination may take to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take to load state and resume after the end of stream.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(120);
/// Passes after convergence while each still shrinks what the downtime must carry.
const MAX_EXTRA_PASSES: u32 = 3;

/// Populated runs of memory closer than this many pages (64 KiB) are announced to the
/// destination as one extent.
const POPULATE_GAP: u64 = 16;
/// How long the destination may take to bind the data channels (it waits 10 s for them
/// itself and then says which one is missing).
const CHANNELS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take to acknowledge a device once the device's initial
/// precopy data has gone out (it acknowledges as soon as that data has loaded).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes a device may write in precopy records after the guest stopped beyond what it
/// said it had left: past that, it is taken to be stuck producing data.
const FINAL_PRECOPY_SLACK: u64 = 64 << 20;

/// Who the source is, as its hello states it.
#[derive(Debug, Clone)]
pub struct SourceIdentity {
    pub release: String,
    /// The resolved machine type.
    pub machine: String,
    /// `(driver.property, value)` of every wire property.
    pub wire_props: Vec<(String, String)>,
    /// The wire properties whose value comes from the machine type's compat tables.
    pub compat_pinned: Vec<String>,
}

/// Migrates `vm` to `uri`. On success the VM is left stopped (its guest now runs at the
/// destination); on any failure before the switchover commits, it runs as before and
/// the error says why. After the commit (the end of stream has gone out) it runs again
/// only if the destination answers that it failed to load; if no answer comes, it stays
/// stopped, the error is [`MigrationError::HandoverInDoubt`] and the monitor's
/// [`Handover`] says [`Handover::InDoubt`].
pub fn migrate(
    vm: &dyn MigratableVm,
    id: &SourceIdentity,
    params: &MigrationParams,
    transport: &dyn Connector,
    monitor: &MigrationMonitor,
) -> Result<MigrationInfo, MigrationError> {
    let start = Instant::now();
    monitor.set_status(MigrationStatus::Setup);
    let was_running = vm.is_running();
    let ram = vm.ram();
    let blocks = ram.blocks().to_vec();
    let ram_bytes: u64 = blocks.iter().map(|b| b.size).sum();
    if let Some(why) = params.conflict() {
        let e = MigrationError::InvalidParams(why);
        monitor.update(|i| i.error_desc = Some(error_chain(&e)));
        monitor.set_status(MigrationStatus::Failed);
        return Err(e);
    }
    let mut src = Source {
        vm,
        ram: Arc::clone(&ram),
        params,
        monitor,
        pending: blocks.iter().map(|b| DirtyBitmap::new(b.pages())).collect(),
        harvested: blocks.iter().map(|b| DirtyBitmap::new(b.pages())).collect(),
        fresh: blocks.iter().map(|b| DirtyBitmap::new(b.pages())).collect(),
        digest: params.digest.then(|| {
            Arc::new(PageDigest::new(
                &blocks.iter().map(RamBlock::pages).collect::<Vec<_>>(),
            ))
        }),
        blocks,
        ch: None,
        rp: None,
        start,
        paused_by_us: false,
        logging: false,
        link_bw: 0.0,
        pages_sent: 0,
        main_lane: None,
        mem: Arc::new(GuestMemory::new(Arc::clone(&ram))),
        mfd: None,
        syncs: 0,
        session: session_id(),
        devices: Vec::new(),
        state_hash: params.state_digest.then(StateHash::new),
        throttle: Throttle::new(params.max_bandwidth),
        live: Liveness::new(LEGACY_LIMIT),
        peer_keepalive: Arc::new(AtomicU64::new(0)),
        keepalive: None,
        converge: Converge::new(params, ram_bytes),
        throttled: false,
        throttle_seen: Vec::new(),
        converging: true,
    };
    monitor.update(|i| i.session = Some(format!("{:016x}", src.session)));
    let result = src.run(id, transport);
    if src.throttled {
        // The guest runs at full speed again, here or at the destination.
        if let Err(e) = vm.set_vcpu_throttle(VcpuThrottle::None) {
            tracing::warn!(error = %e, "could not lift the vCPU throttle");
        }
    }
    match result {
        Ok(()) => {
            monitor.set_handover(Handover::Destination);
            // Closing at once tells a destination that waits for it (one that does not
            // know the source keeps the commitment) that the guest is its own.
            if let Some(ch) = src.ch.take() {
                ch.shutdown();
            }
            if let Some(mut m) = src.mfd.take() {
                m.shutdown(false);
            }
            src.vm.dirty_log().stop();
            monitor.detach_channel();
            monitor.update(|i| i.total_time = start.elapsed().as_millis() as u64);
            monitor.set_status(MigrationStatus::Completed);
            Ok(monitor.info())
        }
        Err(e) => {
            let committed = monitor.handover() == Handover::Committed;
            let e = if committed {
                src.explain(e)
            } else if monitor.is_cancelled() && !matches!(e, MigrationError::Refused { .. }) {
                MigrationError::Cancelled
            } else {
                src.explain(e)
            };
            let e = src.abandon(e, was_running);
            monitor.detach_channel();
            monitor.update(|i| {
                i.total_time = start.elapsed().as_millis() as u64;
                i.error_desc = Some(error_chain(&e));
            });
            monitor.set_status(if matches!(e, MigrationError::Cancelled) {
                MigrationStatus::Cancelled
            } else {
                MigrationStatus::Failed
            });
            Err(e)
        }
    }
}

/// What the return-path reader hands the migration thread.
enum RpEvent {
    Frame(FrameTag, Vec<u8>),
    Closed(MigrationError),
}

struct Source<'a> {
    vm: &'a dyn MigratableVm,
    ram: Arc<dyn GuestRam>,
    params: &'a MigrationParams,
    monitor: &'a MigrationMonitor,
    blocks: Vec<RamBlock>,
    /// Pages still to send, per block.
    pending: Vec<DirtyBitmap>,
    /// Every page this attempt took from the dirty log, to put back on failure.
    harvested: Vec<DirtyBitmap>,
    /// Per block, what one harvest took from the dirty log; empty between harvests.
    fresh: Vec<DirtyBitmap>,
    digest: Option<Arc<PageDigest>>,
    ch: Option<Channel>,
    rp: Option<Receiver<RpEvent>>,
    start: Instant,
    paused_by_us: bool,
    logging: bool,
    /// The best throughput a sizeable pass reached, bytes per second: what device
    /// state is expected to move at.
    link_bw: f64,
    pages_sent: u64,
    /// The main connection as a lane, when pages travel on it.
    main_lane: Option<MainLane>,
    mem: Arc<GuestMemory>,
    /// The data channels, when pages travel on them.
    mfd: Option<SendSet>,
    /// Sync points sent.
    syncs: u64,
    session: u64,
    /// The VM's devices, and how each one's state moves.
    devices: Vec<SourceDevice>,
    /// The digest of device and vCPU state sent, with `migration.state-digest`.
    state_hash: Option<StateHash>,
    /// `max-bandwidth` over everything the source sends while the guest runs: pages and
    /// device precopy records.
    throttle: Throttle,
    /// The destination's last sign of life, over every channel.
    live: Arc<Liveness>,
    /// The destination's liveness limit in milliseconds once it has sent a keepalive
    /// (0 before: then it sends none, and neither does this side).
    peer_keepalive: Arc<AtomicU64>,
    keepalive: Option<KeepaliveSender>,
    /// Whether the migration converges, and what it does when it does not.
    converge: Converge,
    /// A vCPU throttle was set, and is lifted when the migration ends.
    throttled: bool,
    /// Per vCPU, the throttled time reported at the end of the previous pass.
    throttle_seen: Vec<Duration>,
    /// The convergence verdict last reported, to tell a change.
    converging: bool,
}

/// One device of the migration, at the source.
struct SourceDevice {
    info: DeviceInfo,
    /// Its state moves in precopy records (the destination's plan says so).
    precopy: bool,
    /// `precopy_begin` was called: `precopy_abandon` is owed on failure.
    begun: bool,
    /// When its initial data was all sent (and the destination told).
    init_sent: Option<Instant>,
    /// When the destination acknowledged it.
    acked: Option<Instant>,
    stats: DeviceStats,
}

/// Figures of one pass.
#[derive(Default)]
struct PassCount {
    pages: u64,
    zero: u64,
    bytes: u64,
}

impl Source<'_> {
    fn ch(&self) -> &Channel {
        self.ch.as_ref().expect("connected")
    }

    /// Streams device `i`'s state into one device-state frame as the device writes it.
    fn save_device(&mut self, i: usize) -> Result<(), MigrationError> {
        let d = &self.devices[i].info;
        let mut frame = DeviceFrame::new(
            self.ch.as_ref().expect("connected"),
            FrameTag::DeviceState,
            DeviceStateHeader {
                name: d.name.clone(),
                instance: d.instance,
                version: d.schema.version,
            },
            self.state_hash.as_mut(),
        );
        let mut w = StateWriter::new(d.schema, &mut frame);
        let saved = self.vm.save_device(i, &mut w);
        // A failed write is the link's fault, whatever the device made of it.
        if let Some(e) = w.take_io_error() {
            return Err(MigrationError::io(PEER, "device state", e));
        }
        let done = w.is_done();
        saved?;
        if !done {
            return Err(state::stream::incomplete(
                d.schema,
                "its save returned before the whole state was written",
            )
            .into());
        }
        frame
            .flush()
            .map_err(|e| MigrationError::io(PEER, "device state", e))?;
        self.devices[i].stats.stop_copy_bytes = frame.payload_len();
        Ok(())
    }

    /// Streams device `i`'s next precopy record into one frame; returns the payload
    /// bytes sent, 0 when the device had nothing to send.
    fn save_precopy(&mut self, i: usize) -> Result<u64, MigrationError> {
        let d = &self.devices[i].info;
        let schema = d.precopy.expect("planned for precopy only when it can");
        let mut frame = DeviceFrame::new(
            self.ch.as_ref().expect("connected"),
            FrameTag::DevicePrecopy,
            DeviceStateHeader {
                name: d.name.clone(),
                instance: d.instance,
                version: schema.version,
            },
            self.state_hash.as_mut(),
        );
        let mut w = StateWriter::new(schema, &mut frame);
        let saved = self.vm.save_precopy(i, &mut w);
        if let Some(e) = w.take_io_error() {
            return Err(MigrationError::io(PEER, "device precopy", e));
        }
        let done = w.is_done();
        let wrote = saved?;
        let began = frame.payload_len() > 0;
        if !wrote {
            if began {
                return Err(state::stream::incomplete(
                    schema,
                    "its precopy save said it wrote nothing after it began a record",
                )
                .into());
            }
            return Ok(0);
        }
        if !done {
            return Err(state::stream::incomplete(
                schema,
                "its precopy save returned before the whole record was written",
            )
            .into());
        }
        frame
            .flush()
            .map_err(|e| MigrationError::io(PEER, "device precopy", e))?;
        Ok(frame.payload_len())
    }

    /// One round of device precopy: each device in precopy sends records up to what it
    /// had pending when the round began (so a device that changes its state as fast as
    /// it sends cannot hold the round), and once its initial data is all out the
    /// destination is told, so it can acknowledge the device. The `final_round`, with
    /// the guest stopped, sends everything the devices have left.
    fn precopy_round(&mut self, final_round: bool) -> Result<(), MigrationError> {
        for i in 0..self.devices.len() {
            if !self.devices[i].precopy {
                continue;
            }
            let pending = self.vm.device_pending(i);
            let budget = if final_round {
                pending
                    .precopy
                    .max(pending.stop_copy)
                    .saturating_add(FINAL_PRECOPY_SLACK)
            } else {
                pending.precopy
            };
            let mut sent = 0u64;
            while sent < budget || final_round {
                let n = self.save_precopy(i)?;
                if n == 0 {
                    break;
                }
                sent += n;
                if !final_round {
                    let (ch, live) = (self.ch.as_ref(), &self.live);
                    self.throttle
                        .after(n, self.monitor, &|| peer_lost(ch, live))?;
                }
                let st = &mut self.devices[i].stats;
                st.precopy_records += 1;
                if final_round {
                    st.final_precopy_bytes += n;
                } else {
                    st.precopy_bytes += n;
                }
                if final_round && sent > budget {
                    return Err(MigrationError::Vm(super::vm::VmError::Failed(format!(
                        "device {} instance {} wrote {sent} bytes of precopy records after the guest stopped, more than the {} it had pending: it does not stop changing",
                        self.devices[i].info.name,
                        self.devices[i].info.instance,
                        human_bytes(budget - FINAL_PRECOPY_SLACK)
                    ))));
                }
                if !final_round {
                    self.poll_rp()?;
                }
            }
            if self.devices[i].init_sent.is_none() && self.vm.device_pending(i).initial == 0 {
                let d = &self.devices[i].info;
                let r = DeviceRef {
                    name: d.name.clone(),
                    instance: d.instance,
                };
                write_frame(
                    self.ch(),
                    FrameTag::PrecopyInitDone,
                    &r.encode(),
                    PEER,
                    "device precopy",
                )?;
                self.devices[i].init_sent = Some(Instant::now());
                tracing::debug!(device = %r, "initial precopy data sent");
            }
        }
        Ok(())
    }

    /// Whether every device in precopy has been acknowledged; fails a device whose
    /// acknowledgement is overdue.
    fn all_acked(&self) -> Result<bool, MigrationError> {
        let faults = self.monitor.faults();
        let timeout = faults.ack_timeout.unwrap_or(ACK_TIMEOUT);
        let mut all = true;
        for d in self
            .devices
            .iter()
            .filter(|d| d.precopy && d.acked.is_none())
        {
            all = false;
            if let Some(t) = d.init_sent {
                if t.elapsed() > timeout {
                    return Err(MigrationError::NoAck {
                        device: format!("{} instance {}", d.info.name, d.info.instance),
                        secs: timeout.as_secs_f64().ceil() as u64,
                    });
                }
            }
        }
        Ok(all || faults.switch_without_ack)
    }

    /// Takes a switchover acknowledgement off the return path.
    fn take_ack(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let r = DeviceRef::decode(payload, "switchover acknowledgement")?;
        let Some(d) = self
            .devices
            .iter_mut()
            .find(|d| d.info.name == r.name && d.info.instance == r.instance)
        else {
            return Err(MigrationError::Protocol(format!(
                "the destination acknowledged device {r}, which this migration does not have"
            )));
        };
        if !d.precopy || d.init_sent.is_none() || d.acked.is_some() {
            return Err(MigrationError::Protocol(format!(
                "the destination acknowledged device {r} out of turn (precopy {}, initial data {}, acknowledged before {})",
                d.precopy,
                if d.init_sent.is_some() { "sent" } else { "not sent yet" },
                d.acked.is_some()
            )));
        }
        d.acked = Some(Instant::now());
        d.stats.acked_ms = Some(self.start.elapsed().as_millis() as u64);
        tracing::info!(device = %r, "destination acknowledged the device's precopy data");
        Ok(())
    }

    /// The devices' figures, as `query-migrate` shows them.
    fn report_devices(&mut self) {
        for (i, d) in self.devices.iter_mut().enumerate() {
            d.stats.pending_stop_copy = self.vm.device_pending(i).stop_copy;
        }
        let stats: Vec<DeviceStats> = self.devices.iter().map(|d| d.stats.clone()).collect();
        self.monitor.update(|i| i.devices = stats);
    }

    fn run(
        &mut self,
        id: &SourceIdentity,
        transport: &dyn Connector,
    ) -> Result<(), MigrationError> {
        let mut ch = transport
            .connect(StreamRole::Main)
            .map_err(|e| MigrationError::Connect {
                uri: transport.describe(),
                source: e,
            })?;
        let link_limit = 2 * self.params.liveness_timeout;
        ch.watch(&self.live, "the main channel", link_limit)
            .map_err(|e| MigrationError::io(PEER, "setup", e))?;
        self.monitor.attach_channel(
            ch.try_clone()
                .map_err(|e| MigrationError::io(PEER, "setup", e))?,
        );
        let mut rch = ch
            .try_clone()
            .map_err(|e| MigrationError::io(PEER, "setup", e))?;
        rch.watch(&self.live, "the return path", link_limit)
            .map_err(|e| MigrationError::io(PEER, "setup", e))?;
        let kch = ch
            .try_clone()
            .map_err(|e| MigrationError::io(PEER, "setup", e))?;
        self.ch = Some(ch);
        let (tx, rx) = mpsc::channel();
        let (live, own_limit) = (Arc::clone(&self.live), self.params.liveness_timeout);
        let peer_keepalive = Arc::clone(&self.peer_keepalive);
        std::thread::Builder::new()
            .name("ferry-return-path".into())
            .spawn(move || loop {
                let ev = read_frame_header(&mut rch, PEER, "an answer").and_then(|h| {
                    read_payload(&mut rch, h.len, PEER, "an answer").map(|p| (h.tag, p))
                });
                match ev {
                    // A keepalive is for this thread alone: the destination sends them,
                    // so from now on it gets the short limit and gets ours.
                    Ok((FrameTag::KeepaliveReturn, p)) => match Keepalive::decode(&p) {
                        Ok(k) if k.limit_ms > 0 => {
                            if peer_keepalive.swap(k.limit_ms.into(), Ordering::Relaxed) == 0 {
                                live.set_limit(own_limit);
                            }
                        }
                        Ok(_) => {
                            let _ = tx.send(RpEvent::Closed(MigrationError::Protocol(
                                "a keepalive that allows no silence at all".into(),
                            )));
                            break;
                        }
                        Err(e) => {
                            let _ = tx.send(RpEvent::Closed(e.into()));
                            break;
                        }
                    },
                    Ok((tag, p)) => {
                        if tx.send(RpEvent::Frame(tag, p)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(RpEvent::Closed(e));
                        break;
                    }
                }
            })
            .map_err(|e| MigrationError::io(PEER, "setup", e))?;
        self.rp = Some(rx);

        let total: u64 = self.blocks.iter().map(|b| b.size).sum();
        self.monitor.update(|i| {
            i.ram.total = total;
            i.ram.page_size = PAGE_SIZE as u64;
        });
        self.handshake(id)?;
        if self.monitor.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        self.keepalive = Some(
            KeepaliveSender::start(
                kch,
                FrameTag::Keepalive,
                self.params.liveness_timeout,
                Arc::clone(&self.peer_keepalive),
            )
            .map_err(|e| MigrationError::io(PEER, "setup", e))?,
        );
        if self.params.multifd_channels > 0 {
            self.open_channels(transport)?;
        }

        // Tracking starts before the populated scan, so a page first written after the
        // scan is caught by the log rather than missed by both.
        self.vm.dirty_log().start()?;
        self.logging = true;
        for (b, bm) in self.pending.iter().enumerate() {
            self.ram.populated(b, bm);
        }
        if self.params.populate_ahead && self.ram.populated_is_exact() {
            self.send_populated_extents()?;
        }
        for i in 0..self.devices.len() {
            if self.devices[i].precopy {
                self.vm.precopy_begin(i)?;
                self.devices[i].begun = true;
            }
        }
        self.monitor.update(|i| {
            i.setup_time = self.start.elapsed().as_millis() as u64;
        });
        self.monitor.set_status(MigrationStatus::Active);

        let mut pass = 0u32;
        let mut extra_passes = 0;
        loop {
            let t = Instant::now();
            let c = self.send_pass(pass, false)?;
            // The pass's rate is that of RAM alone: what the final pass will move at.
            let dur = t.elapsed();
            self.precopy_round(false)?;
            self.harvest()?;
            let dirty = self.pending.iter().map(|b| b.count() as u64).sum::<u64>();
            let secs = dur.as_secs_f64().max(1e-6);
            let bw = c.bytes as f64 / secs;
            let remaining = dirty * PAGE_SIZE as u64;
            // The final pass takes as long per page as this one did. Pages, not bytes:
            // zero pages and compressed data put far fewer bytes on the wire than the
            // dirty pages hold, and dividing the one by the rate of the other would
            // overstate the downtime by that ratio (never converging, with zstd).
            let ram_expected = if dirty == 0 {
                0.0
            } else if c.pages > 0 {
                dirty as f64 * secs / c.pages as f64
            } else if self.link_bw > 0.0 {
                // A pass that found nothing to send measured no rate: the link's best
                // stands in, rather than an estimate no limit can ever meet.
                (dirty * PAGE_SIZE as u64) as f64 / self.link_bw
            } else {
                f64::INFINITY
            };
            // Devices' stop-copy state goes at the link's rate: the best a pass of some
            // size has reached (a short pass measures its start-up, not the link).
            if c.bytes >= 4 << 20 || self.link_bw == 0.0 {
                self.link_bw = self.link_bw.max(bw);
            }
            let device_bytes = self.device_stop_copy();
            let device_expected = match device_bytes {
                0 => 0.0,
                b if self.link_bw > 0.0 => b as f64 / self.link_bw,
                _ => f64::INFINITY,
            };
            let expected = ram_expected + device_expected;
            let acked = self.all_acked()?;
            let st = PassStats {
                pass,
                pages: c.pages,
                zero_pages: c.zero,
                bytes: c.bytes,
                duration_ms: secs * 1e3,
                throughput_bytes_per_sec: bw,
                dirty_after: dirty,
                // JSON has no infinity: an unbounded estimate reads as the largest number.
                expected_downtime_ms: if expected.is_finite() {
                    expected * 1e3
                } else {
                    f64::MAX
                },
                final_pass: false,
                cpu_throttle_percent: self.converge.cpu_percent(),
                dirty_limited: self.converge.dirty_limit_on(),
                throttle_us: self.throttle_in_pass(),
            };
            self.report_devices();
            self.monitor.update(|i| {
                i.ram.remaining = remaining;
                i.ram.dirty_sync_count += 1;
                i.ram.dirty_pages_rate = (dirty as f64 / secs) as u64;
                i.ram.mbps = bw * 8.0 / 1e6;
                i.expected_downtime = (expected * 1e3).min(u64::MAX as f64) as u64;
                i.passes.push(st);
                i.total_time = self.start.elapsed().as_millis() as u64;
            });
            self.monitor.emit(&MigrationEvent::Pass(pass));
            tracing::debug!(pass, pages = c.pages, dirty, bw, acked, "pass finished");
            let limit = self
                .monitor
                .downtime_limit()
                .unwrap_or(self.params.downtime_limit);
            let fits = expected <= limit.as_secs_f64();
            let figures = PassFigures {
                sent: c.bytes,
                dirtied: remaining,
                secs,
                expected,
                limit: limit.as_secs_f64(),
                link_rate: self.link_bw,
            };
            if self.converge_after_pass(&figures)? {
                break;
            }
            if dirty == 0 && fits && acked {
                break;
            }
            if dirty == 0 && self.rounds_cannot_help(limit) {
                // RAM is done, but a device's stop-copy state alone does not fit the
                // limit, or a device's acknowledgement is still to come; more passes
                // cannot help, so wait for either (or a cancel) without spinning.
                tracing::info!(
                    device_bytes,
                    expected_ms = expected * 1e3,
                    acked,
                    "waiting for the downtime limit or a device's acknowledgement"
                );
                self.wait_for_change(limit)?;
                pass += 1;
                continue;
            }
            if fits && acked {
                // Converged. Another pass is cheap when what is left is well below what
                // this pass sent: the next pass is shorter, so the guest dirties less
                // during it, and the downtime carries less.
                let shrinking = dirty * 4 < c.pages * 3;
                if !shrinking || extra_passes >= MAX_EXTRA_PASSES {
                    break;
                }
                extra_passes += 1;
            }
            pass += 1;
        }
        self.switchover(pass + 1)
    }

    /// Tells the destination where memory is populated (pass 0's pages), so it can
    /// fault that memory in ahead of them (`engine::populate`). Runs closer than
    /// [`POPULATE_GAP`] pages go as one extent: fewer, longer calls for the destination,
    /// at the price of a few pages populated there that hold nothing here.
    fn send_populated_extents(&mut self) -> Result<(), MigrationError> {
        for (b, bm) in self.pending.iter().enumerate() {
            let mut extents = Vec::new();
            bm.extents(POPULATE_GAP, |first, pages| extents.push((first, pages)));
            for chunk in extents.chunks(PopulatedExtents::MAX_EXTENTS) {
                let frame = PopulatedExtents {
                    block: b as u16,
                    extents: chunk.to_vec(),
                };
                write_frame(
                    self.ch(),
                    FrameTag::PopulatedExtents,
                    &frame.encode(),
                    PEER,
                    "populated extents",
                )?;
            }
        }
        Ok(())
    }

    /// Takes the convergence policy's verdict on the pass just made: reports it, sets
    /// the throttle it wants, and acts on the timeout. `Ok(true)`: switch over now
    /// (the timeout passed and the strategy accepts the downtime).
    fn converge_after_pass(&mut self, f: &PassFigures) -> Result<bool, MigrationError> {
        let live = self.monitor.live_params();
        let p = live.as_ref().unwrap_or(self.params);
        let v = self.converge.after_pass(p, f);
        self.take_verdict(p, &v);
        match v.timeout {
            None => Ok(false),
            Some(TimeoutAction::Cancel(why)) => Err(MigrationError::NotConverging(why)),
            Some(TimeoutAction::Switchover) => {
                tracing::warn!(
                    expected_ms = f.expected * 1e3,
                    "the timeout passed: switching over at the downtime it costs"
                );
                self.monitor.update(|i| {
                    if let Some(c) = i.convergence.as_mut() {
                        c.forced_switchover = true;
                    }
                });
                Ok(true)
            }
        }
    }

    /// Judges the period of a long pass that just ended ([`SYNC_PERIOD`]): harvests the
    /// dirty log (pages dirtied behind the pass's cursor go in the next pass, those
    /// ahead of it in this one, so the pass still sends each page at most once) and
    /// lets the policy step the throttle or cancel on the timeout.
    fn converge_after_period(&mut self, sent: u64) -> Result<(), MigrationError> {
        let dirtied = self.harvest()? * PAGE_SIZE as u64;
        let live = self.monitor.live_params();
        let p = live.as_ref().unwrap_or(self.params);
        let v = self.converge.after_period(p, sent, dirtied);
        tracing::debug!(sent, dirtied, throttle = ?v.throttle, "period of a long pass");
        self.take_verdict(p, &v);
        match v.timeout {
            Some(TimeoutAction::Cancel(why)) => Err(MigrationError::NotConverging(why)),
            _ => Ok(()),
        }
    }

    /// Sets the throttle a verdict wants and reports the verdict.
    fn take_verdict(&mut self, p: &MigrationParams, v: &Verdict) {
        let mut throttle_error = None;
        if let Some(t) = v.throttle {
            match self.vm.set_vcpu_throttle(t) {
                Ok(()) => {
                    self.throttled = true;
                    tracing::info!(throttle = ?t, "throttling the guest so the migration converges");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the migration wants the guest throttled");
                    throttle_error = Some(e.to_string());
                }
            }
        }
        let cpu = self.converge.cpu_percent();
        let limited = self.converge.dirty_limit_on();
        let last_round = self
            .monitor
            .info()
            .passes
            .last()
            .map(|s| s.throttle_us)
            .unwrap_or(0);
        let timeout = self.converge.timeout().as_secs();
        self.monitor.update(|i| {
            i.cpu_throttle_percentage = (p.auto_converge || cpu > 0).then_some(cpu);
            i.dirty_limit_throttle_time_per_round = limited.then_some(last_round);
            let c = i.convergence.get_or_insert_with(ConvergenceInfo::default);
            c.converging = v.converging;
            c.why = v.why.clone();
            c.timeout = timeout;
            if throttle_error.is_some() {
                c.throttle_error = throttle_error;
            }
        });
        if v.converging != self.converging {
            self.converging = v.converging;
            match &v.why {
                Some(why) => tracing::warn!(%why, "the migration is not converging"),
                None => tracing::info!("the migration converges again"),
            }
            self.monitor.emit(&MigrationEvent::Convergence {
                converging: v.converging,
                why: v.why.clone(),
            });
        }
    }

    /// The most time any one vCPU was held back by the throttle since the last call,
    /// in microseconds.
    fn throttle_in_pass(&mut self) -> u64 {
        if !self.throttled {
            return 0;
        }
        let now = self.vm.vcpu_throttle_stats();
        let most = now
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let before = self.throttle_seen.get(i).copied().unwrap_or_default();
                s.throttled.saturating_sub(before)
            })
            .max()
            .unwrap_or_default();
        self.throttle_seen = now.iter().map(|s| s.throttled).collect();
        most.as_micros() as u64
    }

    /// Every device's stop-copy estimate.
    fn device_stop_copy(&self) -> u64 {
        (0..self.devices.len())
            .map(|i| self.vm.device_pending(i).stop_copy)
            .sum()
    }

    /// With RAM done, whether another round of device precopy cannot bring the
    /// switchover closer: every device in precopy has sent its initial data and only
    /// acknowledgements are missing, or the stop-copy devices alone do not fit the
    /// limit. Then the source waits instead of spinning.
    fn rounds_cannot_help(&self, limit: Duration) -> bool {
        let awaiting_ack_only = self.devices.iter().any(|d| d.precopy && d.acked.is_none())
            && self
                .devices
                .iter()
                .all(|d| !d.precopy || d.init_sent.is_some());
        let stop_copy_only: u64 = (0..self.devices.len())
            .filter(|&i| !self.devices[i].precopy)
            .map(|i| self.vm.device_pending(i).stop_copy)
            .sum();
        let too_big = stop_copy_only > 0
            && (self.link_bw <= 0.0 || stop_copy_only as f64 / self.link_bw > limit.as_secs_f64());
        awaiting_ack_only || too_big
    }

    /// Waits up to a section for the downtime limit to change or a device's
    /// acknowledgement to come, watching for cancel and for a destination that gave up.
    fn wait_for_change(&mut self, limit: Duration) -> Result<(), MigrationError> {
        let until = Instant::now() + SECTION;
        let acked = |s: &Self| s.devices.iter().filter(|d| d.acked.is_some()).count();
        let before = acked(self);
        while Instant::now() < until {
            self.poll_rp()?;
            if self.monitor.downtime_limit().is_some_and(|l| l != limit) || acked(self) != before {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn handshake(&mut self, id: &SourceIdentity) -> Result<(), MigrationError> {
        let vm = self.vm;
        let ack = self.params.switchover_ack;
        self.devices = vm
            .devices()
            .into_iter()
            .map(|info| SourceDevice {
                stats: DeviceStats {
                    name: info.name.clone(),
                    instance: info.instance,
                    mode: "stop-copy".into(),
                    precopy_capable: info.precopy.is_some(),
                    // Until the destination's plan says otherwise.
                    reason: match (info.precopy.is_some(), ack) {
                        (false, _) => Some(StopCopyWhy::SourceHost.to_string()),
                        (true, false) => Some(STOP_COPY_ACK_OFF.into()),
                        (true, true) => None,
                    },
                    ..DeviceStats::default()
                },
                info,
                precopy: false,
                begun: false,
                init_sent: None,
                acked: None,
            })
            .collect();
        let mut hello = Hello {
            session_id: self.session,
            release: id.release.clone(),
            machine: id.machine.clone(),
            page_size: PAGE_SIZE as u32,
            flags: if self.params.verify_full {
                Hello::FLAG_FULL_VERIFY
            } else {
                0
            },
            wire_props: self.params.stated_wire_properties(&id.wire_props),
            compat_pinned: id.compat_pinned.clone(),
            ram_blocks: self
                .blocks
                .iter()
                .map(|b| HelloRamBlock {
                    name: b.name.clone(),
                    gpa: b.gpa,
                    size: b.size,
                })
                .collect(),
            vcpu_count: vm.vcpu_count() as u32,
            vcpu_state: vm.vcpu_schema().name.to_string(),
            vcpu_version: vm.vcpu_schema().version,
            devices: self
                .devices
                .iter()
                .map(|d| HelloDevice {
                    name: d.info.name.clone(),
                    instance: d.info.instance,
                    version: d.info.schema.version,
                })
                .collect(),
            channels: self.params.multifd_channels,
            compression: if self.params.multifd_channels > 0 {
                self.params.multifd_compression
            } else {
                crate::wire::Compression::None
            },
        };
        // This source keeps the switchover commitment, states its devices'
        // configuration, and offers to precopy the devices its host can precopy (see
        // `wire::ANNOTATION_PREFIX`).
        Annotations {
            switchover_commit: !self.monitor.faults().legacy_handover,
            liveness_ms: (!self.monitor.faults().no_keepalive).then(|| {
                self.params
                    .liveness_timeout
                    .as_millis()
                    .min(u32::MAX as u128) as u32
            }),
            device_config: self
                .devices
                .iter()
                .flat_map(|d| {
                    let d = &d.info;
                    d.config
                        .iter()
                        .map(|(k, v)| (d.name.clone(), d.instance, k.clone(), v.clone()))
                })
                .collect(),
            precopy: if ack {
                self.devices
                    .iter()
                    .filter_map(|d| {
                        let schema = d.info.precopy?;
                        Some(PrecopyOffer {
                            device: d.info.name.clone(),
                            instance: d.info.instance,
                            schema: schema.name.into(),
                            version: schema.version,
                        })
                    })
                    .collect()
            } else {
                Vec::new()
            },
            unknown: Vec::new(),
        }
        .apply(&mut hello);
        let hdr = StreamHeader {
            version: PROTOCOL_VERSION,
        }
        .encode();
        write_frame_after(
            self.ch(),
            &hdr,
            FrameTag::Hello,
            &hello.encode(),
            PEER,
            "hello",
        )?;
        let (tag, payload) = self.wait_rp("the answer to the hello", HELLO_TIMEOUT)?;
        match tag {
            FrameTag::Accept => {
                let a = Accept::decode(&payload)?;
                tracing::info!(release = %a.release, "destination accepted the migration");
                if ack {
                    // Both sides have switchover-ack on (the hello's properties agree),
                    // so the destination answers with its plan.
                    self.take_plan()?;
                }
                self.report_devices();
                Ok(())
            }
            FrameTag::Refuse => {
                let r = Refuse::decode(&payload)?;
                Err(MigrationError::Refused {
                    cause: r.cause,
                    reason: r.reason,
                })
            }
            t => Err(self.unexpected(t, "accept or refuse", &payload)),
        }
    }

    /// Reads the destination's device plan and takes it: which devices precopy (each one
    /// offered), and why the others do not.
    fn take_plan(&mut self) -> Result<(), MigrationError> {
        let (tag, payload) = self.wait_rp("the destination's device plan", HELLO_TIMEOUT)?;
        if tag != FrameTag::DevicePlan {
            return Err(self.unexpected(tag, "device plan", &payload));
        }
        let plan = DevicePlan::decode(&payload)?;
        if plan.modes.len() != self.devices.len() {
            return Err(MigrationError::Protocol(format!(
                "the destination's device plan covers {} devices, the hello listed {}",
                plan.modes.len(),
                self.devices.len()
            )));
        }
        for (d, mode) in self.devices.iter_mut().zip(&plan.modes) {
            match mode {
                DeviceMode::Precopy if d.info.precopy.is_none() => {
                    return Err(MigrationError::Protocol(format!(
                        "the destination plans precopy for device {} instance {}, which this source did not offer",
                        d.info.name, d.info.instance
                    )))
                }
                DeviceMode::Precopy => {
                    d.precopy = true;
                    d.stats.mode = "precopy".into();
                    d.stats.reason = None;
                }
                DeviceMode::StopCopy(why) => d.stats.reason = Some(why.to_string()),
            }
        }
        Ok(())
    }

    fn unexpected(&self, tag: FrameTag, expected: &str, payload: &[u8]) -> MigrationError {
        if tag == FrameTag::LoadFailed {
            return MigrationError::LoadFailed(
                decode_reason(payload, "load failed").unwrap_or_else(|e| e.to_string()),
            );
        }
        MigrationError::Protocol(format!(
            "destination sent {} while the source expected {expected}",
            tag.name()
        ))
    }

    /// Waits for the next return-path frame, watching for a cancel while the guest is
    /// still the source's (after the commit a cancel cannot be taken, so none is seen).
    fn wait_rp(
        &mut self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(FrameTag, Vec<u8>), MigrationError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.monitor.is_cancelled() && self.monitor.handover() == Handover::Source {
                return Err(MigrationError::Cancelled);
            }
            let rx = self.rp.as_ref().expect("return path");
            match rx.recv_timeout(Duration::from_millis(50)) {
                // An acknowledgement may come at any time after the device's initial
                // data: take it and wait on.
                Ok(RpEvent::Frame(FrameTag::SwitchoverAck, p)) => self.take_ack(&p)?,
                Ok(RpEvent::Frame(t, p)) => return Ok((t, p)),
                Ok(RpEvent::Closed(e)) => {
                    return Err(match e {
                        MigrationError::PeerClosed { peer, .. } => {
                            MigrationError::PeerClosed { peer, phase: what }
                        }
                        e => e,
                    })
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {
                    return Err(MigrationError::Timeout {
                        peer: PEER,
                        waiting_for: what,
                        secs: timeout.as_secs(),
                    })
                }
            }
        }
    }

    /// Checks, without waiting, that the destination has not given up, and takes the
    /// acknowledgements that have come.
    fn poll_rp(&mut self) -> Result<(), MigrationError> {
        loop {
            if self.monitor.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            match self.rp.as_ref().expect("return path").try_recv() {
                Ok(RpEvent::Frame(FrameTag::SwitchoverAck, p)) => self.take_ack(&p)?,
                Ok(RpEvent::Frame(t, p)) => {
                    return Err(self.unexpected(t, "nothing during the transfer", &p))
                }
                Ok(RpEvent::Closed(e)) => return Err(e),
                Err(_) => return Ok(()),
            }
        }
    }

    /// A write failed: the destination's own account of why beats a broken pipe.
    fn explain(&self, e: MigrationError) -> MigrationError {
        if !matches!(
            e.root(),
            MigrationError::PeerClosed { .. } | MigrationError::Io { .. }
        ) {
            return e;
        }
        let Some(rx) = self.rp.as_ref() else { return e };
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(RpEvent::Frame(FrameTag::LoadFailed, p)) => {
                    return MigrationError::LoadFailed(
                        decode_reason(&p, "load failed").unwrap_or_else(|d| d.to_string()),
                    )
                }
                Ok(RpEvent::Frame(..)) => continue,
                _ => break,
            }
        }
        e
    }

    /// Ends a failed attempt: tells the destination, puts back the dirty bits taken,
    /// and lets the guest run again if we stopped it and still own it. Returns the
    /// error to report.
    ///
    /// After the commit the guest is the destination's to start, so the source sends no
    /// abort (the destination decides, not us) and resumes only on a load failure,
    /// which says the destination did not start it. Any other end leaves the guest in
    /// doubt: stopped here, with an error that says what to check.
    fn abandon(&mut self, e: MigrationError, was_running: bool) -> MigrationError {
        let committed = self.monitor.handover() == Handover::Committed;
        if let Some(ch) = self.ch.take() {
            if !committed
                && !matches!(
                    e,
                    MigrationError::PeerClosed { .. } | MigrationError::Refused { .. }
                )
            {
                let _ = write_frame(
                    &ch,
                    FrameTag::Abort,
                    &encode_reason(&error_chain(&e)),
                    PEER,
                    "abort",
                );
            }
            ch.shutdown();
        }
        if let Some(mut m) = self.mfd.take() {
            m.shutdown(true);
        }
        if !committed {
            for (i, d) in self.devices.iter().enumerate() {
                if d.begun {
                    self.vm.precopy_abandon(i);
                }
            }
        }
        if self.logging {
            for (b, bm) in self.harvested.iter().enumerate() {
                self.vm.dirty_log().restore(b, bm);
            }
            self.vm.dirty_log().stop();
        }
        // After the end of stream, silence from the destination does not mean it failed:
        // it may be running the guest already. Resuming here too could run the guest
        // twice, so the guest stays stopped and the error says what to check.
        let in_doubt = committed && !matches!(e, MigrationError::LoadFailed(_));
        if in_doubt {
            self.monitor.set_handover(Handover::InDoubt);
            let e = MigrationError::HandoverInDoubt {
                source: Box::new(e),
            };
            tracing::error!(error = %error_chain(&e), "the guest stays stopped here");
            return e;
        }
        self.monitor.set_handover(Handover::Source);
        if self.paused_by_us && was_running {
            if let Err(re) = self.vm.resume() {
                tracing::error!(error = %error_chain(&re), "could not resume the guest after a failed migration");
            }
        }
        tracing::warn!(error = %error_chain(&e), "migration failed; the guest stays here");
        e
    }

    /// Takes the dirty log into the pending pages; returns how many pages it held.
    fn harvest(&mut self) -> Result<u64, MigrationError> {
        let mut pages = 0;
        for b in 0..self.blocks.len() {
            // Harvest into a map of its own first so the record of what this attempt took
            // from the log is exact; it is left empty for the next harvest.
            let fresh = &self.fresh[b];
            let got = self.vm.dirty_log().harvest(b, fresh);
            pages += fresh.count() as u64;
            self.harvested[b].or_from(fresh);
            fresh.drain_into(&self.pending[b]);
            got?;
        }
        Ok(pages)
    }

    /// Sends every pending page, then a pass end: the one page loop, whichever lane the
    /// pages take. On data channels a sync closes the pass (and, under 0.1's rule,
    /// every section of it); the final pass (guest stopped) ends with the channels' last
    /// sync.
    fn send_pass(&mut self, pass: u32, final_pass: bool) -> Result<PassCount, MigrationError> {
        let mut c = PassCount::default();
        let mut section = Instant::now();
        let (mut period, mut period_sent) = (Instant::now(), 0);
        // Periods are judged from the second pass on (the first sends everything
        // populated, whatever the guest dirties meanwhile): the throttle steps and the
        // timeout holds within a pass that takes minutes.
        let judge_periods = !final_pass && self.converge.passed();
        let mut pages = Vec::with_capacity(BATCH_PAGES);
        for b in 0..self.blocks.len() {
            let mut pick = Picker::default();
            while pick.next(&self.pending[b], &mut pages, BATCH_PAGES) {
                self.send_batch(b, &mut pages, &mut c)?;
                self.poll_rp()?;
                if judge_periods && period.elapsed() >= SYNC_PERIOD {
                    self.converge_after_period(c.bytes - period_sent)?;
                    (period, period_sent) = (Instant::now(), c.bytes);
                }
                // 0.1's rule syncs every section; the newer one only at the pass end
                // below, which is enough: a pass sends each page at most once.
                let per_section = self.params.multifd_flush_after_each_section
                    || self.monitor.faults().sync_every_section;
                if self.mfd.is_some() && per_section && section.elapsed() >= SECTION {
                    self.sync_channels(false)?;
                    section = Instant::now();
                }
            }
        }
        if self.mfd.is_some() {
            self.sync_channels(final_pass)?;
            let monitor = self.monitor;
            self.mfd
                .as_ref()
                .expect("channels")
                .flush(&move || monitor.is_cancelled())?;
            self.fold(&mut c)?;
            self.report_multifd();
        }
        write_frame(
            self.ch(),
            FrameTag::PassEnd,
            &PassEnd {
                pass,
                pages: c.pages,
            }
            .encode(),
            PEER,
            "RAM transfer",
        )?;
        Ok(c)
    }

    /// Hands one batch to its lane: a data channel's sender (which classifies and
    /// encodes it on its own thread), or the main lane, here.
    fn send_batch(
        &mut self,
        block: usize,
        pages: &mut Vec<u64>,
        c: &mut PassCount,
    ) -> Result<(), MigrationError> {
        if let Some(m) = self.mfd.as_mut() {
            let monitor = self.monitor;
            let batch = std::mem::replace(pages, Vec::with_capacity(BATCH_PAGES));
            m.send_pages(block, batch, &move || monitor.is_cancelled())?;
            return self.fold(c);
        }
        let ch = self.ch.as_ref().expect("connected");
        let lane = self.main_lane.get_or_insert_with(|| {
            MainLane::new(Classifier::new(Arc::clone(&self.mem), self.digest.clone()))
        });
        let d = lane.send(ch, block, pages)?;
        self.count(c, &d, false);
        let (ch, live) = (self.ch.as_ref(), &self.live);
        self.throttle
            .after(d.bytes, self.monitor, &|| peer_lost(ch, live))
    }

    /// Takes pages a lane put on the wire into the pass and the statistics.
    fn count(&mut self, c: &mut PassCount, d: &ChannelCounters, on_channels: bool) {
        c.pages += d.pages;
        c.zero += d.zero;
        c.bytes += d.bytes;
        self.pages_sent += d.pages;
        record(self.monitor, d, on_channels, Side::Source);
    }

    /// Connects the data channels, each opening with its header, and waits for the
    /// destination to bind them all.
    fn open_channels(&mut self, transport: &dyn Connector) -> Result<(), MigrationError> {
        let n = self.params.multifd_channels;
        let mut chans = Vec::with_capacity(n as usize);
        for index in 0..n {
            if self.monitor.faults().skip_channel == Some(index) {
                tracing::warn!(channel = index, "test fault: not opening the data channel");
                continue;
            }
            let wrap = |e| MigrationError::Channel {
                index,
                source: Box::new(e),
            };
            let mut ch = transport.connect(StreamRole::Data(index)).map_err(|e| {
                wrap(MigrationError::Connect {
                    uri: transport.describe(),
                    source: e,
                })
            })?;
            ch.watch(
                &self.live,
                format!("data channel {index}"),
                2 * self.params.liveness_timeout,
            )
            .map_err(|e| wrap(MigrationError::io(PEER, "setup", e)))?;
            let hdr = ChannelHeader {
                version: CHANNEL_VERSION,
                session_id: self.session,
                index,
                count: n,
            }
            .encode();
            ch.write_bufs(&[&hdr])
                .map_err(|e| wrap(MigrationError::io(PEER, "channel header", e)))?;
            self.monitor.attach_channel(
                ch.try_clone()
                    .map_err(|e| wrap(MigrationError::io(PEER, "setup", e)))?,
            );
            chans.push(ch);
        }
        self.mfd = Some(SendSet::start(
            chans,
            &SendConfig {
                mem: Arc::clone(&self.mem),
                digest: self.digest.clone(),
                compression: self.params.multifd_compression,
                zstd_level: self.params.multifd_zstd_level,
                close_after: self.monitor.faults().close_channel_after,
            },
        )?);
        let (tag, payload) = self.wait_rp(
            "the destination to bind the data channels",
            CHANNELS_TIMEOUT,
        )?;
        if tag != FrameTag::ChannelsReady {
            return Err(self.unexpected(tag, "channels ready", &payload));
        }
        let r = ChannelsReady::decode(&payload)?;
        if r.count != n {
            return Err(MigrationError::Protocol(format!(
                "destination bound {} data channels, {n} were opened",
                r.count
            )));
        }
        tracing::info!(channels = n, compression = %self.params.multifd_compression.name(), "data channels open");
        self.report_multifd();
        Ok(())
    }

    /// A sync point: a sync packet behind everything queued on every data channel, then
    /// the sync frame on the main channel (see the barrier in `engine::multifd`).
    fn sync_channels(&mut self, last: bool) -> Result<(), MigrationError> {
        if self.monitor.faults().no_sync && !last {
            return Ok(());
        }
        let monitor = self.monitor;
        let seq = self
            .mfd
            .as_mut()
            .expect("channels")
            .sync(last, &move || monitor.is_cancelled())?;
        self.syncs += 1;
        write_frame(
            self.ch(),
            FrameTag::MultifdSync,
            &MultifdSync { seq, last }.encode(),
            PEER,
            "multifd sync",
        )
    }

    /// Takes what the senders moved since last time into the pass and the statistics.
    fn fold(&mut self, c: &mut PassCount) -> Result<(), MigrationError> {
        let m = self.mfd.as_mut().expect("channels");
        m.check()?;
        let d = m.take_progress();
        self.count(c, &d, true);
        let (ch, live) = (self.ch.as_ref(), &self.live);
        self.throttle
            .after(d.bytes, self.monitor, &|| peer_lost(ch, live))
    }

    fn report_multifd(&self) {
        let Some(m) = self.mfd.as_ref() else { return };
        let counters = m.counters();
        let stats = MultifdStats {
            channels: self.params.multifd_channels,
            compression: self.params.multifd_compression.name(),
            syncs: self.syncs,
            raw_bytes: counters.iter().map(|c| c.raw_bytes).sum(),
            wire_bytes: counters.iter().map(|c| c.bytes).sum(),
            per_channel: counters.iter().map(ChannelStats::from).collect(),
            strays: Vec::new(),
        };
        self.monitor.update(|i| i.multifd = Some(stats));
    }

    /// Stops the guest, sends the rest, waits for the destination to run it.
    fn switchover(&mut self, pass: u32) -> Result<(), MigrationError> {
        self.monitor.set_status(MigrationStatus::Device);
        let t_down = Instant::now();
        let mut br = DowntimeBreakdown::default();
        let resume = self.vm.is_running();
        if resume {
            self.vm.pause()?;
            self.paused_by_us = true;
        }
        br.stop_ms = ms(t_down.elapsed());
        self.monitor.probe(HandoverPoint::GuestStopped);

        let t = Instant::now();
        self.harvest()?;
        let c = self.send_pass(pass, true)?;
        br.final_pass_ms = ms(t.elapsed());
        self.monitor.probe(HandoverPoint::FinalPassSent);
        self.monitor.update(|i| {
            i.passes.push(PassStats {
                pass,
                pages: c.pages,
                zero_pages: c.zero,
                bytes: c.bytes,
                duration_ms: br.final_pass_ms,
                throughput_bytes_per_sec: c.bytes as f64 / t.elapsed().as_secs_f64().max(1e-6),
                dirty_after: 0,
                expected_downtime_ms: 0.0,
                final_pass: true,
                cpu_throttle_percent: 0,
                dirty_limited: false,
                throttle_us: 0,
            });
            i.ram.remaining = 0;
        });

        let t = Instant::now();
        // What the devices in precopy still have, then every device's final state.
        self.precopy_round(true)?;
        for i in 0..self.devices.len() {
            self.save_device(i)?;
            self.monitor.probe(HandoverPoint::DeviceStateSent(i));
        }
        br.devices_ms = ms(t.elapsed());
        self.report_devices();

        let t = Instant::now();
        let schema = self.vm.vcpu_schema();
        for i in 0..self.vm.vcpu_count() {
            let st = self.vm.save_vcpu(i)?;
            let bytes = state::encode(schema, &st)?;
            let mut payload = VcpuStateHeader {
                index: i as u32,
                version: schema.version,
            }
            .encode(&bytes);
            if let Some(h) = self.state_hash.as_mut() {
                h.frame();
                h.update(&payload);
            }
            self.monitor.faults().damage_state(&mut payload);
            write_frame(self.ch(), FrameTag::VcpuState, &payload, PEER, "vCPU state")?;
            self.monitor.probe(HandoverPoint::VcpuStateSent(i));
        }
        if let Some(h) = &self.state_hash {
            write_frame(
                self.ch(),
                FrameTag::StateDigest,
                &h.value().encode(),
                PEER,
                "state digest",
            )?;
        }
        br.vcpus_ms = ms(t.elapsed());

        let t = Instant::now();
        let full = self.params.verify_full.then(|| self.mem.full_digest());
        br.verify_ms = ms(t.elapsed());
        let eos = EndOfStream {
            digest: self.digest.as_ref().map(|d| d.value()),
            full_digest: full,
            pages_sent: self.pages_sent,
            resume,
        };
        let t = Instant::now();
        self.monitor.probe(HandoverPoint::BeforeEndOfStream);
        self.poll_rp()?;
        // A destination that has hung up can no longer take the guest: find out before
        // committing, while the guest is still ours to resume.
        if peer_hung_up(self.ch()) {
            return Err(MigrationError::PeerClosed {
                peer: PEER,
                phase: "the switchover, before the end of stream",
            });
        }
        // The commitment: a cancel taken before this point wins and the guest stays
        // here; from this point on the destination's answer decides.
        if !self.monitor.faults().legacy_handover {
            self.monitor.commit()?;
        }
        // Nothing follows the end of stream: a keepalive after it would lie unread at
        // the destination.
        if let Some(k) = self.keepalive.take() {
            k.stop();
        }
        if let Err(e) = write_frame(
            self.ch(),
            FrameTag::EndOfStream,
            &eos.encode(),
            PEER,
            "end of stream",
        ) {
            // The kernel did not take the whole frame, so the rest never left this
            // host and no destination can have decoded it: the guest is still ours.
            self.monitor.set_handover(Handover::Source);
            return Err(e);
        }
        self.monitor.probe(HandoverPoint::EndOfStreamSent);
        let (tag, payload) =
            self.wait_rp("the destination to load and resume", COMPLETION_TIMEOUT)?;
        self.monitor.probe(HandoverPoint::AnswerReceived);
        if tag != FrameTag::Completed {
            return Err(self.unexpected(tag, "completed", &payload));
        }
        let done = Completed::decode(&payload)?;
        br.switchover_ms = ms(t.elapsed());
        br.destination_resume_ms = done.resume_us as f64 / 1e3;
        let downtime = t_down.elapsed();
        let state_digest = self.state_hash.is_some();
        let verified = match (self.params.digest, self.params.verify_full) {
            (true, true) => "digest+full",
            (true, false) => "digest",
            (false, true) => "full",
            (false, false) => "none",
        };
        self.monitor.update(|i| {
            i.downtime = Some(downtime.as_millis() as u64);
            i.downtime_breakdown = Some(br);
            i.verified = Some(verified.to_string());
            i.state_verified = Some(if state_digest { "digest" } else { "none" }.to_string());
        });
        tracing::info!(downtime_ms = ms(downtime), "migration completed");
        Ok(())
    }
}

/// Whether the destination is gone, for a source that `max-bandwidth` holds back (and
/// so writes nothing that could find out): it closed the main channel, or nothing came
/// from it on any channel for the liveness limit.
fn peer_lost(ch: Option<&Channel>, live: &Liveness) -> Option<MigrationError> {
    if ch.is_some_and(peer_hung_up) {
        return Some(MigrationError::PeerClosed {
            peer: PEER,
            phase: "a pause for max-bandwidth",
        });
    }
    let (silence, limit) = (live.silence(), live.limit());
    (silence >= limit).then(|| MigrationError::Silent {
        peer: PEER,
        waiting_for: "RAM transfer",
        stalled: Box::new(Stalled {
            channel: "the source, held back by max-bandwidth,".into(),
            waited: silence,
            silence,
            limit,
            by_kernel: false,
        }),
    })
}

/// Whether the peer has closed or reset the connection, without reading from it.
fn peer_hung_up(ch: &Channel) -> bool {
    // A stream that is not a plain socket cannot be asked; its next read will say.
    let Some(fd) = ch.raw_fd() else {
        return false;
    };
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A number that identifies this migration to the destination's channels: random, so
/// a channel of another migration (or a guess) does not match it.
fn session_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: the buffer is 8 writable bytes for the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 8 {
        return u64::from_le_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    super::digest::page_term(t, u64::from(std::process::id()))
}

/// Holds the send rate under `max-bandwidth`, in windows of about a second.
struct Throttle {
    bw: u64,
    start: Instant,
    bytes: u64,
}

impl Throttle {
    fn new(bw: u64) -> Self {
        Self {
            bw,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Holds the source back until `sent` more bytes fit the cap, watching for a
    /// cancel and, as nothing is written meanwhile, for a destination that is gone.
    fn after(
        &mut self,
        sent: u64,
        monitor: &MigrationMonitor,
        lost: &dyn Fn() -> Option<MigrationError>,
    ) -> Result<(), MigrationError> {
        // A cap changed while the migration runs takes effect at once.
        if let Some(bw) = monitor.max_bandwidth() {
            if bw != self.bw {
                *self = Self::new(bw);
            }
        }
        if self.bw == 0 {
            return Ok(());
        }
        self.bytes += sent;
        loop {
            let due = Duration::from_secs_f64(self.bytes as f64 / self.bw as f64);
            let el = self.start.elapsed();
            if el >= due {
                break;
            }
            if monitor.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            if let Some(e) = lost() {
                return Err(e);
            }
            std::thread::sleep((due - el).min(Duration::from_millis(50)));
        }
        if self.start.elapsed() > Duration::from_secs(1) {
            self.start = Instant::now();
            self.bytes = 0;
        }
        Ok(())
    }
}
