//! The outgoing side of a migration.
//!
//! ```text
//!  setup ──> active (pass 0, 1, … until converged) ──> device (guest stopped) ──> completed
//!    │            │                                        │
//!    └────────────┴──────── any error or cancel ───────────┴──> failed | cancelled
//!                           (guest resumed if we stopped it, harvested dirty bits put back)
//! ```
//!
//! Convergence: after each pass the dirty log is harvested and the pages still to send
//! are divided by the rate at which that pass sent pages (pages, not wire bytes, so that
//! zero pages and compression do not skew it). When that expected downtime fits the
//! `downtime-limit`, the guest is stopped and the final pass, device and vCPU state
//! follow. Nothing is retried: a failure ends the attempt cleanly, and a new
//! migration can start at once.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bitmap::DirtyBitmap;
use super::digest::PageDigest;
use super::error::{error_chain, MigrationError};
use super::memory::GuestMemory;
use super::multifd::{ChannelCounters, SendConfig, SendSet, SECTION};
use super::pages::{record, Classifier, MainLane, Picker, Side, BATCH_PAGES};
use super::params::MigrationParams;
use super::stats::{
    ChannelStats, DowntimeBreakdown, Handover, HandoverPoint, MigrationEvent, MigrationInfo,
    MigrationMonitor, MigrationStatus, MultifdStats, PassStats,
};
use super::stream::{read_frame_header, read_payload, write_frame, write_frame_after, DeviceFrame};
use super::transport::{Channel, Connector, StreamRole};
use super::vm::{DeviceInfo, GuestRam, MigratableVm, RamBlock};
use crate::state::{self, StateWriter};
use crate::wire::{
    decode_reason, encode_reason, Accept, Annotations, ChannelHeader, ChannelsReady, Completed,
    DeviceStateHeader, EndOfStream, FrameTag, Hello, HelloDevice, HelloRamBlock, MultifdSync,
    PassEnd, Refuse, StreamHeader, VcpuStateHeader, CHANNEL_VERSION, PROTOCOL_VERSION,
};
use crate::PAGE_SIZE;

const PEER: &str = "destination";
/// How long the destination may take to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take to load state and resume after the end of stream.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(120);
/// A write that makes no progress for this long means the destination is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Passes after convergence while each still shrinks what the downtime must carry.
const MAX_EXTRA_PASSES: u32 = 3;
/// How long the destination may take to bind the data channels (it waits 10 s for them
/// itself and then says which one is missing).
const CHANNELS_TIMEOUT: Duration = Duration::from_secs(30);

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
    let mut src = Source {
        vm,
        ram: Arc::clone(&ram),
        params,
        monitor,
        pending: blocks.iter().map(|b| DirtyBitmap::new(b.pages())).collect(),
        harvested: blocks.iter().map(|b| DirtyBitmap::new(b.pages())).collect(),
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
    };
    monitor.update(|i| i.session = Some(format!("{:016x}", src.session)));
    let result = src.run(id, transport);
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
    fn save_device(&self, i: usize, d: &DeviceInfo) -> Result<(), MigrationError> {
        let mut frame = DeviceFrame::new(
            self.ch(),
            DeviceStateHeader {
                name: d.name.clone(),
                instance: d.instance,
                version: d.schema.version,
            },
        );
        let mut w = StateWriter::new(d.schema, &mut frame);
        let saved = self.vm.save_device(i, &mut w);
        // A failed write is the link's fault, whatever the device made of it.
        if let Some(e) = w.take_io_error() {
            return Err(MigrationError::io(PEER, "device state", e));
        }
        saved?;
        if !w.is_done() {
            return Err(state::stream::incomplete(
                d.schema,
                "its save returned before the whole state was written",
            )
            .into());
        }
        frame
            .flush()
            .map_err(|e| MigrationError::io(PEER, "device state", e))
    }

    fn run(
        &mut self,
        id: &SourceIdentity,
        transport: &dyn Connector,
    ) -> Result<(), MigrationError> {
        let ch = transport
            .connect(StreamRole::Main)
            .map_err(|e| MigrationError::Connect {
                uri: transport.describe(),
                source: e,
            })?;
        ch.set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(|e| MigrationError::io(PEER, "setup", e))?;
        self.monitor.attach_channel(
            ch.try_clone()
                .map_err(|e| MigrationError::io(PEER, "setup", e))?,
        );
        let mut rch = ch
            .try_clone()
            .map_err(|e| MigrationError::io(PEER, "setup", e))?;
        self.ch = Some(ch);
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("ferry-return-path".into())
            .spawn(move || loop {
                let ev = read_frame_header(&mut rch, PEER, "return path").and_then(|h| {
                    read_payload(&mut rch, h.len, PEER, "return path").map(|p| (h.tag, p))
                });
                match ev {
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
        self.monitor.update(|i| {
            i.setup_time = self.start.elapsed().as_millis() as u64;
        });
        self.monitor.set_status(MigrationStatus::Active);

        let mut pass = 0u32;
        let mut extra_passes = 0;
        loop {
            let t = Instant::now();
            let c = self.send_pass(pass, false)?;
            let dur = t.elapsed();
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
            };
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
            tracing::debug!(pass, pages = c.pages, dirty, bw, "pass finished");
            let limit = self
                .monitor
                .downtime_limit()
                .unwrap_or(self.params.downtime_limit);
            if dirty == 0 && expected <= limit.as_secs_f64() {
                break;
            }
            if dirty == 0 {
                // RAM is done, but a device's stop-copy state alone does not fit the
                // limit; more passes cannot shrink it, so wait for a higher limit (or a
                // cancel) without spinning.
                tracing::info!(
                    device_bytes,
                    expected_ms = expected * 1e3,
                    "device state does not fit the downtime limit"
                );
                self.wait_for_limit(limit)?;
                pass += 1;
                continue;
            }
            if expected <= limit.as_secs_f64() {
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

    /// Every device's stop-copy estimate.
    fn device_stop_copy(&self) -> u64 {
        (0..self.vm.devices().len())
            .map(|i| self.vm.device_pending(i).stop_copy)
            .sum()
    }

    /// Waits up to a section for the downtime limit to change, watching for cancel and
    /// for a destination that gave up.
    fn wait_for_limit(&self, limit: Duration) -> Result<(), MigrationError> {
        let until = Instant::now() + SECTION;
        while Instant::now() < until {
            self.poll_rp()?;
            if self.monitor.downtime_limit().is_some_and(|l| l != limit) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn handshake(&mut self, id: &SourceIdentity) -> Result<(), MigrationError> {
        let vm = self.vm;
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
            devices: vm
                .devices()
                .iter()
                .map(|d| HelloDevice {
                    name: d.name.clone(),
                    instance: d.instance,
                    version: d.schema.version,
                })
                .collect(),
            channels: self.params.multifd_channels,
            compression: if self.params.multifd_channels > 0 {
                self.params.multifd_compression
            } else {
                crate::wire::Compression::None
            },
        };
        // This source keeps the switchover commitment, and states its devices'
        // configuration (see `wire::ANNOTATION_PREFIX`).
        Annotations {
            switchover_commit: !self.monitor.faults().legacy_handover,
            device_config: vm
                .devices()
                .iter()
                .flat_map(|d| {
                    d.config
                        .iter()
                        .map(|(k, v)| (d.name.clone(), d.instance, k.clone(), v.clone()))
                })
                .collect(),
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
        let rx = self.rp.as_ref().expect("return path");
        loop {
            if self.monitor.is_cancelled() && self.monitor.handover() == Handover::Source {
                return Err(MigrationError::Cancelled);
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
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

    /// Checks, without waiting, that the destination has not given up.
    fn poll_rp(&self) -> Result<(), MigrationError> {
        if self.monitor.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        match self.rp.as_ref().expect("return path").try_recv() {
            Ok(RpEvent::Frame(t, p)) => Err(self.unexpected(t, "nothing during the transfer", &p)),
            Ok(RpEvent::Closed(e)) => Err(e),
            Err(_) => Ok(()),
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

    fn harvest(&mut self) -> Result<(), MigrationError> {
        for b in 0..self.blocks.len() {
            // Harvest into a scratch map first so the record of what this attempt took
            // from the log is exact.
            let fresh = DirtyBitmap::new(self.blocks[b].pages());
            self.vm.dirty_log().harvest(b, &fresh)?;
            self.harvested[b].or_from(&fresh);
            self.pending[b].or_from(&fresh);
        }
        Ok(())
    }

    /// Sends every pending page, then a pass end: the one page loop, whichever lane the
    /// pages take. On data channels a sync closes the pass (and, under 0.1's rule,
    /// every section of it); the final pass (guest stopped) ends with the channels' last
    /// sync.
    fn send_pass(&mut self, pass: u32, final_pass: bool) -> Result<PassCount, MigrationError> {
        let mut c = PassCount::default();
        let mut window = Throttle::new(self.params.max_bandwidth);
        let mut section = Instant::now();
        let mut pages = Vec::with_capacity(BATCH_PAGES);
        for b in 0..self.blocks.len() {
            let mut pick = Picker::default();
            while pick.next(&self.pending[b], &mut pages, BATCH_PAGES) {
                self.send_batch(b, &mut pages, &mut c, &mut window)?;
                self.poll_rp()?;
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
            self.fold(&mut c, &mut window)?;
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
        window: &mut Throttle,
    ) -> Result<(), MigrationError> {
        if let Some(m) = self.mfd.as_mut() {
            let monitor = self.monitor;
            let batch = std::mem::replace(pages, Vec::with_capacity(BATCH_PAGES));
            m.send_pages(block, batch, &move || monitor.is_cancelled())?;
            return self.fold(c, window);
        }
        let ch = self.ch.as_ref().expect("connected");
        let lane = self.main_lane.get_or_insert_with(|| {
            MainLane::new(Classifier::new(Arc::clone(&self.mem), self.digest.clone()))
        });
        let d = lane.send(ch, block, pages)?;
        self.count(c, &d, false);
        window.after(d.bytes, self.monitor)
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
            let ch = transport.connect(StreamRole::Data(index)).map_err(|e| {
                wrap(MigrationError::Connect {
                    uri: transport.describe(),
                    source: e,
                })
            })?;
            ch.set_write_timeout(Some(WRITE_TIMEOUT))
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
    fn fold(&mut self, c: &mut PassCount, window: &mut Throttle) -> Result<(), MigrationError> {
        let m = self.mfd.as_mut().expect("channels");
        m.check()?;
        let d = m.take_progress();
        self.count(c, &d, true);
        window.after(d.bytes, self.monitor)
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
            });
            i.ram.remaining = 0;
        });

        let t = Instant::now();
        for (i, d) in self.vm.devices().iter().enumerate() {
            self.save_device(i, d)?;
            self.monitor.probe(HandoverPoint::DeviceStateSent(i));
        }
        br.devices_ms = ms(t.elapsed());

        let t = Instant::now();
        let schema = self.vm.vcpu_schema();
        for i in 0..self.vm.vcpu_count() {
            let st = self.vm.save_vcpu(i)?;
            let bytes = state::encode(schema, &st)?;
            let payload = VcpuStateHeader {
                index: i as u32,
                version: schema.version,
            }
            .encode(&bytes);
            write_frame(self.ch(), FrameTag::VcpuState, &payload, PEER, "vCPU state")?;
            self.monitor.probe(HandoverPoint::VcpuStateSent(i));
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
        });
        tracing::info!(downtime_ms = ms(downtime), "migration completed");
        Ok(())
    }
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

    fn after(&mut self, sent: u64, monitor: &MigrationMonitor) -> Result<(), MigrationError> {
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
            std::thread::sleep((due - el).min(Duration::from_millis(50)));
        }
        if self.start.elapsed() > Duration::from_secs(1) {
            self.start = Instant::now();
            self.bytes = 0;
        }
        Ok(())
    }
}
