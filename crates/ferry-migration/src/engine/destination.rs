//! The incoming side of a migration.
//!
//! Every byte from the source is untrusted: lengths are bounded by the wire layer and by
//! each device's schema before anything is allocated, page indices are checked against
//! the RAM block, and the guest is resumed only when every device and vCPU has loaded
//! exactly once and the memory digest matches. Any failure is reported to the source
//! on the return path with its reason, and the guest stays stopped.
//!
//! Pages are read from the socket straight into guest memory. A zero page is a flag; it
//! is written only when the page was written earlier in this migration (or the backend
//! reports it populated), so fresh memory the guest never touched stays untouched.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bitmap::DirtyBitmap;
use super::digest::PageDigest;
use super::error::{error_chain, MigrationError};
use super::incoming::{Candidate, DoorConfig, Doorman, Incoming, Stray};
use super::liveness::{KeepaliveSender, Liveness, LEGACY_LIMIT};
use super::memory::GuestMemory;
use super::multifd::{ChannelCounters, RecvConfig, RecvSet};
use super::pages::{record, Lander, Side};
use super::params::MigrationParams;
use super::populate::Populator;
use super::stats::{
    ChannelStats, DeviceStats, Handover, HandoverPoint, MigrationEvent, MigrationInfo,
    MigrationMonitor, MigrationStatus, MultifdStats, STOP_COPY_ACK_OFF,
};
use super::stream::{read_exact, read_frame_header, read_payload, write_frame, Hashed, StateHash};
use super::transport::Channel;
use super::vm::{DeviceInfo, MigratableVm, RamBlock};
use crate::compat::wire_mismatches;
use crate::state::{self, StateReader};
use crate::wire::{
    decode_reason, encode_reason, Accept, Annotations, ChannelsReady, Completed, Compression,
    DeviceMode, DevicePlan, DeviceRef, DeviceStateHeader, EndOfStream, FrameHeader, FrameTag,
    Hello, Keepalive, MultifdSync, PassEnd, PopulatedExtents, RamBatchHeader, Refuse, RefuseCause,
    StateDigest, StopCopyWhy, VcpuStateHeader, WireError, MAX_BATCH_PAGES,
};
use crate::PAGE_SIZE;

const PEER: &str = "source";
/// How long the data channels the hello announced may take to connect.
const CHANNEL_WAIT: Duration = Duration::from_secs(10);
/// How long a destination waits, after `Completed`, for a source that does not keep the
/// switchover commitment (0.1.0) to abort before it takes the guest as its own (see
/// `Dest::hand_over`). Such a source sends its abort at once when a cancel beats
/// `Completed` into its queue, and never after, so the abort, if any, is already on
/// its way when `Completed` leaves: a round trip and some scheduling slack cover it.
const RELEASE_GRACE: Duration = Duration::from_millis(200);

/// Who the destination is, to check a source's hello against.
#[derive(Debug, Clone)]
pub struct DestinationIdentity {
    pub release: String,
    /// The machine type this VM was created with (resolved).
    pub machine: String,
    /// Every machine type this release knows.
    pub known_machines: Vec<String>,
    /// `(driver.property, value)` of every wire property.
    pub wire_props: Vec<(String, String)>,
    /// The wire properties whose value comes from the machine type's compat tables.
    pub compat_pinned: Vec<String>,
}

/// Receives a migration into `vm`, which must not be running: on one connection, or on
/// a listener where the main channel and any data channels connect (see
/// [`Incoming`]). On success the guest runs here (or stays stopped, if it was stopped
/// at the source); on failure it does not run, and the source has been told why.
pub fn receive(
    vm: &dyn MigratableVm,
    id: &DestinationIdentity,
    params: &MigrationParams,
    incoming: impl Into<Incoming>,
    monitor: &MigrationMonitor,
) -> Result<MigrationInfo, MigrationError> {
    let mut door = Doorman::new(
        incoming.into(),
        DoorConfig {
            handshake_timeout: params.handshake_timeout,
            release: id.release.clone(),
        },
    );
    // Strays show in `query-migrate` as they are turned away, also while the
    // destination still waits for its source.
    let watch = door.stray_watch();
    let known = std::cell::Cell::new(0u64);
    let waiting = || {
        if let Some((total, strays)) = watch.since(known.get()) {
            known.set(total);
            show_strays(monitor, total, &strays);
        }
        monitor.is_cancelled()
    };
    let devices = vm.devices();
    // What this side will do, stated as the source states it.
    let stated = DestinationIdentity {
        wire_props: params.stated_wire_properties(&id.wire_props),
        ..id.clone()
    };
    // Candidates until one is taken: a refused or malformed hello (another VM's, a
    // probe) is turned away and the wait goes on; only a source that was accepted can
    // make this migration fail.
    let (cand, hello, annotations) = loop {
        let cand = match door.next_candidate(&waiting) {
            Ok(c) => c,
            Err(e) => {
                report_strays(monitor, &door);
                monitor.update(|i| i.error_desc = Some(error_chain(&e)));
                monitor.set_status(if matches!(e, MigrationError::Cancelled) {
                    MigrationStatus::Cancelled
                } else {
                    MigrationStatus::Failed
                });
                return Err(e);
            }
        };
        match judge(&cand, vm, &devices, &stated, door.takes_channels()) {
            Ok((hello, annotations)) => break (cand, hello, annotations),
            Err(refusal) => {
                tracing::warn!(peer = %cand.peer, cause = %refusal.cause, reason = %refusal.reason, "refused an incoming migration");
                let frame = Refuse {
                    cause: refusal.cause,
                    reason: refusal.to_peer.clone(),
                }
                .encode();
                let e = MigrationError::Incompatible {
                    cause: refusal.cause,
                    reason: refusal.reason,
                };
                let waits = door.waits_on();
                if waits {
                    // Listed before the source is told, so that `query-migrate` here
                    // shows the refusal to anyone who heard of it from the source.
                    door.refused(cand.peer, error_chain(&e));
                    report_strays(monitor, &door);
                }
                let _ = write_frame(&cand.ch, FrameTag::Refuse, &frame, PEER, "refuse");
                cand.ch.shutdown();
                if !waits {
                    monitor.update(|i| i.error_desc = Some(error_chain(&e)));
                    monitor.set_status(MigrationStatus::Failed);
                    return Err(e);
                }
            }
        }
    };
    door.taken();
    let Candidate { mut ch, .. } = cand;
    let start = Instant::now();
    monitor.set_status(MigrationStatus::Setup);
    if let Ok(c) = ch.try_clone() {
        monitor.attach_channel(c);
    }
    // A source that sends keepalives gets this side's liveness limit; one that does
    // not (0.1.0, 0.2.0) falls silent for as long as its own work takes.
    let live = match annotations.liveness_ms {
        Some(_) => Liveness::with_keepalives(params.liveness_timeout),
        None => Liveness::new(LEGACY_LIMIT),
    };
    let _ = ch.watch(&live, "the main channel", 2 * params.liveness_timeout);
    let ram = vm.ram();
    let blocks = ram.blocks().to_vec();
    let mut dst = Dest {
        vm,
        params,
        monitor,
        ch,
        written: Arc::new(blocks.iter().map(|b| DirtyBitmap::new(b.pages())).collect()),
        digest: None,
        devices,
        device_loaded: Vec::new(),
        vcpu_loaded: vec![false; vm.vcpu_count()],
        hello: None,
        entries: Vec::with_capacity(MAX_BATCH_PAGES),
        entry_buf: Vec::with_capacity(MAX_BATCH_PAGES * 8),
        normal: Vec::with_capacity(MAX_BATCH_PAGES),
        zero: Vec::with_capacity(MAX_BATCH_PAGES),
        batch_pages: Vec::with_capacity(MAX_BATCH_PAGES),
        mem: Arc::new(GuestMemory::new(Arc::clone(&ram))),
        lander: None,
        pages_received: 0,
        pages_written: 0,
        state_load: Duration::ZERO,
        blocks,
        start,
        recv: None,
        recv_reported: ChannelCounters::default(),
        syncs: 0,
        syncs_this_pass: 0,
        channels_done: false,
        annotations,
        precopy: Vec::new(),
        device_stats: Vec::new(),
        state_hash: params.state_digest.then(StateHash::new),
        state_digest: None,
        live,
        keepalive: None,
        populate: None,
        populate_ends: vec![0; ram.blocks().len()],
        passes_ended: 0,
    };
    dst.device_loaded = vec![false; dst.devices.len()];
    dst.precopy = vec![DestPrecopy::default(); dst.devices.len()];
    let mut r = dst.run(&stated, hello, &mut door);
    dst.keepalive.take();
    dst.stop_populate();
    if let Err(e) = &r {
        // A data channel's failure is what woke the main channel: report that, unless
        // the main channel had its own say (an abort, a refusal, a bad frame).
        if matches!(
            e,
            MigrationError::PeerClosed { .. } | MigrationError::Io { .. }
        ) {
            if let Some(ce) = dst.recv.as_ref().and_then(RecvSet::error) {
                r = Err(ce);
            }
        }
    }
    if let Some(mut recv) = dst.recv.take() {
        recv.shutdown();
    }
    if r.is_err() {
        for (i, p) in dst.precopy.iter().enumerate() {
            if p.planned {
                vm.precopy_abandon(i);
            }
        }
    }
    report_strays(monitor, &door);
    door.close();
    monitor.detach_channel();
    monitor.update(|i| i.total_time = start.elapsed().as_millis() as u64);
    match r {
        Ok(()) => {
            monitor.set_status(MigrationStatus::Completed);
            Ok(monitor.info())
        }
        Err(e) => {
            // Tell the source why, unless it is gone or already knows.
            if !matches!(
                e,
                MigrationError::PeerClosed { .. }
                    | MigrationError::Incompatible { .. }
                    | MigrationError::SourceAborted(_)
            ) {
                let _ = write_frame(
                    &dst.ch,
                    FrameTag::LoadFailed,
                    &encode_reason(&error_chain(&e)),
                    PEER,
                    "load failed",
                );
            }
            dst.ch.shutdown();
            monitor.update(|i| i.error_desc = Some(error_chain(&e)));
            monitor.set_status(if monitor.is_cancelled() {
                MigrationStatus::Cancelled
            } else {
                MigrationStatus::Failed
            });
            tracing::info!(error = %error_chain(&e), "incoming migration failed; the guest was not started");
            Err(e)
        }
    }
}

struct Dest<'a> {
    vm: &'a dyn MigratableVm,
    params: &'a MigrationParams,
    monitor: &'a MigrationMonitor,
    ch: Channel,
    blocks: Vec<RamBlock>,
    /// Pages that may hold non-zero bytes: populated before we started, or written by us.
    written: Arc<Vec<DirtyBitmap>>,
    digest: Option<Arc<PageDigest>>,
    devices: Vec<DeviceInfo>,
    device_loaded: Vec<bool>,
    vcpu_loaded: Vec<bool>,
    hello: Option<Hello>,
    entries: Vec<(u64, bool)>,
    entry_buf: Vec<u8>,
    /// The data and the zero pages of the batch being read.
    normal: Vec<u64>,
    zero: Vec<u64>,
    mem: Arc<GuestMemory>,
    /// Puts main-channel batches into guest memory (set up once the digest exists).
    lander: Option<Lander>,
    /// The page indices of the batch being read, sorted, to find one named twice.
    batch_pages: Vec<u64>,
    pages_received: u64,
    pages_written: u64,
    state_load: Duration,
    start: Instant,
    /// The data channels' receivers, when pages travel on them.
    recv: Option<RecvSet>,
    recv_reported: ChannelCounters,
    syncs: u64,
    /// Syncs since the last pass end: one at most when the sync is once per pass.
    syncs_this_pass: u64,
    /// The data channels' last sync has completed: every page is in.
    channels_done: bool,
    /// What the source's hello said beyond its properties.
    annotations: Annotations,
    /// Per device of `devices`: its precopy progress here.
    precopy: Vec<DestPrecopy>,
    device_stats: Vec<DeviceStats>,
    /// The digest of device and vCPU state read, with `migration.state-digest`.
    state_hash: Option<StateHash>,
    /// The source's state digest, once its frame has come.
    state_digest: Option<StateDigest>,
    /// The source's last sign of life, over every channel.
    live: Arc<Liveness>,
    /// Keepalives on the return path, for a source that takes them.
    keepalive: Option<KeepaliveSender>,
    /// The thread that faults memory in ahead of the pages, once the source has said
    /// where its memory is (`migration.x-ferry-populate-ahead`).
    populate: Option<Populator>,
    /// Per block, the end of the extents announced so far: the next must start there
    /// or beyond.
    populate_ends: Vec<u64>,
    /// Pass ends received.
    passes_ended: u32,
}

/// One device's precopy, at the destination.
#[derive(Debug, Clone, Copy, Default)]
struct DestPrecopy {
    /// The plan says precopy, and `precopy_begin` was called (`precopy_abandon` is
    /// owed on failure).
    planned: bool,
    /// The source said its initial data is all sent; it was acknowledged.
    init_done: bool,
}

impl Dest<'_> {
    /// The migration of an accepted hello (`id` states this side's parameters).
    fn run(
        &mut self,
        id: &DestinationIdentity,
        hello: Hello,
        door: &mut Doorman,
    ) -> Result<(), MigrationError> {
        self.monitor
            .update(|i| i.session = Some(format!("{:016x}", hello.session_id)));
        if hello.channels > 0 {
            door.expect(hello.session_id, hello.channels, self.ch.peer_identity());
        }
        write_frame(
            &self.ch,
            FrameTag::Accept,
            &Accept {
                release: id.release.clone(),
            }
            .encode(),
            PEER,
            "accept",
        )?;
        tracing::info!(source = %hello.release, machine = %hello.machine, "accepted an incoming migration");
        self.plan_devices(&hello)?;
        self.start_keepalives()?;
        for (b, bm) in self.written.iter().enumerate() {
            self.vm.ram().populated(b, bm);
        }
        if self.params.digest {
            self.digest = Some(Arc::new(PageDigest::new(
                &self.blocks.iter().map(RamBlock::pages).collect::<Vec<_>>(),
            )));
        }
        self.lander = Some(Lander::new(
            Arc::clone(&self.mem),
            Arc::clone(&self.written),
            self.digest.clone(),
        ));
        if hello.channels > 0 {
            self.bind_channels(&hello, door)?;
        }
        let total: u64 = self.blocks.iter().map(|b| b.size).sum();
        self.monitor.update(|i| {
            i.setup_time = self.start.elapsed().as_millis() as u64;
            i.ram.total = total;
            i.ram.page_size = PAGE_SIZE as u64;
        });
        self.hello = Some(hello);
        self.monitor.set_status(MigrationStatus::Active);

        loop {
            if self.monitor.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let fh = read_frame_header(&mut self.ch, PEER, "the migration stream")?;
            match fh.tag {
                FrameTag::RamBatch if self.recv.is_some() => {
                    return Err(MigrationError::Protocol(
                        "a RAM batch on the main channel while data channels carry the pages"
                            .into(),
                    ))
                }
                FrameTag::RamBatch => self.ram_batch(fh)?,
                FrameTag::Keepalive => {
                    Keepalive::decode(&read_payload(&mut self.ch, fh.len, PEER, "keepalive")?)?;
                }
                FrameTag::MultifdSync => {
                    let s = MultifdSync::decode(&read_payload(
                        &mut self.ch,
                        fh.len,
                        PEER,
                        "multifd sync",
                    )?)?;
                    self.sync(s)?;
                }
                FrameTag::PassEnd => {
                    let p =
                        PassEnd::decode(&read_payload(&mut self.ch, fh.len, PEER, "pass end")?)?;
                    self.syncs_this_pass = 0;
                    self.passes_ended += 1;
                    self.monitor.update(|i| i.ram.dirty_sync_count += 1);
                    if let Some(p) = &self.populate {
                        self.report_populate(p);
                    }
                    self.monitor.emit(&MigrationEvent::Pass(p.pass));
                }
                FrameTag::PopulatedExtents => self.populated_extents(fh)?,
                FrameTag::DeviceState => self.device_state(fh)?,
                FrameTag::DevicePrecopy => self.device_precopy(fh)?,
                FrameTag::PrecopyInitDone => {
                    let r = DeviceRef::decode(
                        &read_payload(&mut self.ch, fh.len, PEER, "device precopy")?,
                        "precopy initial data sent",
                    )?;
                    self.init_done(&r)?;
                }
                FrameTag::StateDigest => {
                    let d = StateDigest::decode(&read_payload(
                        &mut self.ch,
                        fh.len,
                        PEER,
                        "state digest",
                    )?)?;
                    if self.state_hash.is_none() || self.state_digest.is_some() {
                        return Err(MigrationError::Protocol(
                            "a state digest, but migration.state-digest is off or one came already"
                                .into(),
                        ));
                    }
                    self.state_digest = Some(d);
                }
                FrameTag::VcpuState => self.vcpu_state(fh)?,
                FrameTag::EndOfStream => {
                    let eos = EndOfStream::decode(&read_payload(
                        &mut self.ch,
                        fh.len,
                        PEER,
                        "end of stream",
                    )?)?;
                    self.monitor.probe(HandoverPoint::EndOfStreamReceived);
                    // Every page is in: what is left to populate would only compete
                    // with the load.
                    self.stop_populate();
                    // Wind the channels down before the guest may resume, so that once
                    // the source hears `Completed` nothing of this migration is left.
                    if let Some(mut r) = self.recv.take() {
                        if let Some(e) = r.error() {
                            return Err(e);
                        }
                        r.shutdown();
                    }
                    door.shut();
                    return self.finish(eos);
                }
                FrameTag::Abort => {
                    let r = decode_reason(
                        &read_payload(&mut self.ch, fh.len, PEER, "abort")?,
                        "abort",
                    )?;
                    return Err(MigrationError::SourceAborted(r));
                }
                t => {
                    return Err(WireError::UnexpectedFrame {
                        tag: t as u8,
                        expected: "RAM, state or end of stream",
                    }
                    .into())
                }
            }
        }
    }

    /// Where the source's memory is populated: queued for the populating thread,
    /// started at the first such frame. Only before the first pass ends, and only with
    /// the property on (the hello said so too, or it was refused).
    fn populated_extents(&mut self, fh: FrameHeader) -> Result<(), MigrationError> {
        let payload = read_payload(&mut self.ch, fh.len, PEER, "populated extents")?;
        if !self.params.populate_ahead || self.passes_ended > 0 {
            return Err(WireError::UnexpectedFrame {
                tag: fh.tag as u8,
                expected: if self.params.populate_ahead {
                    "no populated extents after the first pass"
                } else {
                    "no populated extents: migration.x-ferry-populate-ahead is off"
                },
            }
            .into());
        }
        let pages: Vec<u64> = self.blocks.iter().map(|b| b.pages() as u64).collect();
        let e = PopulatedExtents::decode(&payload, &pages, &self.populate_ends)?;
        let block = e.block as usize;
        if let Some(end) = e.end() {
            self.populate_ends[block] = end;
        }
        if self.populate.is_none() {
            match Populator::start(self.vm.ram()) {
                Ok(p) => self.populate = Some(p),
                Err(err) => {
                    // Not worth failing a migration for: the pages fault in as they land.
                    tracing::warn!(error = %err, "cannot start the populating thread");
                    return Ok(());
                }
            }
        }
        if let Some(p) = self.populate.as_mut() {
            p.add(block, &e.extents);
        }
        Ok(())
    }

    /// Stops the populating thread, if there is one, and reports what it did.
    fn stop_populate(&mut self) {
        if let Some(mut p) = self.populate.take() {
            p.stop();
            self.report_populate(&p);
        }
    }

    /// Puts the populating thread's progress into `query-migrate`.
    fn report_populate(&self, p: &Populator) {
        let (announced, ahead) = p.progress();
        tracing::debug!(announced, ahead, "populate-ahead progress");
        self.monitor.update(|i| {
            i.ram.x_ferry_populate_announced = announced;
            i.ram.x_ferry_populated_ahead = ahead;
        });
    }

    /// For a source that takes keepalives: the first one at once, which tells the
    /// source this side sends them, then one whenever the return path is quiet.
    fn start_keepalives(&mut self) -> Result<(), MigrationError> {
        let Some(source_ms) = self.annotations.liveness_ms else {
            return Ok(());
        };
        let own = self.params.liveness_timeout;
        write_frame(
            &self.ch,
            FrameTag::KeepaliveReturn,
            &Keepalive {
                limit_ms: own.as_millis().min(u32::MAX as u128) as u32,
            }
            .encode(),
            PEER,
            "keepalive",
        )?;
        if self.monitor.faults().mute_keepalive {
            tracing::warn!("test fault: no keepalives after the first");
            return Ok(());
        }
        let ch = self
            .ch
            .try_clone()
            .map_err(|e| MigrationError::io(PEER, "setup", e))?;
        self.keepalive = Some(
            KeepaliveSender::start(
                ch,
                FrameTag::KeepaliveReturn,
                own,
                Arc::new(AtomicU64::new(source_ms.into())),
            )
            .map_err(|e| MigrationError::io(PEER, "setup", e))?,
        );
        Ok(())
    }

    /// Takes the data channels the hello announced from the doorman, starts their
    /// receivers and tells the source they are bound.
    fn bind_channels(&mut self, hello: &Hello, door: &mut Doorman) -> Result<(), MigrationError> {
        let n = hello.channels;
        let wait = self.monitor.faults().channel_wait.unwrap_or(CHANNEL_WAIT);
        let monitor = self.monitor;
        let chans = door.channels(wait, &|| monitor.is_cancelled())?;
        for c in &chans {
            if let Ok(c) = c.try_clone() {
                self.monitor.attach_channel(c);
            }
        }
        self.recv = Some(RecvSet::start(
            chans,
            &self.ch,
            &RecvConfig {
                mem: Arc::clone(&self.mem),
                written: Arc::clone(&self.written),
                digest: self.digest.clone(),
                zstd: hello.compression == Compression::Zstd,
                delay: self.monitor.faults().delay_channel,
                live: Arc::clone(&self.live),
                link_limit: 2 * self.params.liveness_timeout,
            },
        )?);
        write_frame(
            &self.ch,
            FrameTag::ChannelsReady,
            &ChannelsReady { count: n }.encode(),
            PEER,
            "channels ready",
        )?;
        self.monitor.update(|i| {
            i.multifd = Some(MultifdStats {
                channels: n,
                compression: hello.compression.name(),
                ..MultifdStats::default()
            })
        });
        tracing::info!(channels = n, compression = %hello.compression.name(), "data channels bound");
        Ok(())
    }

    /// A sync frame on the main channel: waits for every data channel to reach it.
    fn sync(&mut self, s: MultifdSync) -> Result<(), MigrationError> {
        let Some(recv) = self.recv.as_ref() else {
            return Err(MigrationError::Protocol(
                "a multifd sync, but the hello announced no data channels".into(),
            ));
        };
        if self.channels_done {
            return Err(MigrationError::Protocol(
                "a multifd sync after the last one".into(),
            ));
        }
        self.syncs_this_pass += 1;
        if !self.params.multifd_flush_after_each_section && self.syncs_this_pass > 1 {
            return Err(MigrationError::Protocol(format!(
                "multifd sync {} is the second in one pass, but migration.multifd-flush-after-each-section is off: the data channels sync once per pass",
                s.seq
            )));
        }
        let monitor = self.monitor;
        recv.sync(s.seq, s.last, &|| monitor.is_cancelled(), &self.live)?;
        self.syncs += 1;
        self.channels_done = s.last;
        let (t, written) = recv.totals();
        let r = self.recv_reported;
        let d = ChannelCounters {
            packets: t.packets - r.packets,
            pages: t.pages - r.pages,
            zero: t.zero - r.zero,
            bytes: t.bytes - r.bytes,
            raw_bytes: t.raw_bytes - r.raw_bytes,
        };
        self.recv_reported = t;
        self.pages_received += d.pages;
        record(self.monitor, &d, true, Side::Destination);
        let per = recv.counters();
        let syncs = self.syncs;
        self.monitor.update(|i| {
            if let Some(m) = i.multifd.as_mut() {
                m.syncs = syncs;
                m.raw_bytes = t.raw_bytes;
                m.wire_bytes = t.bytes;
                m.per_channel = per.iter().map(ChannelStats::from).collect();
            }
        });
        if s.last {
            self.pages_written += written;
        }
        Ok(())
    }

    fn ram_batch(&mut self, fh: FrameHeader) -> Result<(), MigrationError> {
        let mut hb = [0u8; RamBatchHeader::LEN];
        read_exact(&mut self.ch, &mut hb, PEER, "RAM transfer")?;
        let bh = RamBatchHeader::decode(&hb, fh.len)?;
        let block = bh.block as usize;
        let Some(info) = self.blocks.get(block) else {
            return Err(WireError::BadValue {
                what: "RAM batch block index",
                value: bh.block.into(),
            }
            .into());
        };
        let block_pages = info.pages() as u64;
        self.entry_buf.resize(bh.count as usize * 8, 0);
        read_exact(&mut self.ch, &mut self.entry_buf, PEER, "RAM transfer")?;
        bh.decode_entries(&self.entry_buf, fh.len, block_pages, &mut self.entries)?;
        // The data pages are scattered into memory before the zero pages are applied, so a
        // page named twice (data, zero, data) would end zeroed although the batch's last
        // word on it is data. A source sends each page at most once per batch.
        self.batch_pages.clear();
        self.batch_pages
            .extend(self.entries.iter().map(|&(page, _)| page));
        self.batch_pages.sort_unstable();
        if let Some(w) = self.batch_pages.windows(2).find(|w| w[0] == w[1]) {
            return Err(MigrationError::PageTwice {
                block: block as u32,
                page: w[0],
            });
        }
        self.normal.clear();
        self.zero.clear();
        for &(page, zero) in &self.entries {
            if zero {
                self.zero.push(page);
            } else {
                self.normal.push(page);
            }
        }
        let lander = self.lander.as_mut().expect("set up after the accept");
        lander.read_data(&self.ch, block, &self.normal)?;
        self.pages_written += lander.settle(block, &self.normal, &self.zero);
        let d = ChannelCounters {
            packets: 1,
            pages: self.entries.len() as u64,
            zero: self.zero.len() as u64,
            bytes: u64::from(fh.len) + FrameHeader::LEN as u64,
            raw_bytes: (self.normal.len() * PAGE_SIZE) as u64,
        };
        self.pages_received += d.pages;
        record(self.monitor, &d, false, Side::Destination);
        Ok(())
    }

    /// Reads the header of a device's state frame or precopy record (the device's name,
    /// instance and version) without trusting the frame's length. Returns the device's
    /// index, the version and the length of the state bytes that follow. The header goes
    /// into the state digest.
    fn device_header(
        &mut self,
        fh: FrameHeader,
        what: &'static str,
    ) -> Result<(usize, u32, u32), MigrationError> {
        let mut prefix = [0u8; DeviceStateHeader::PREFIX_LEN];
        read_exact(&mut self.ch, &mut prefix, PEER, what)?;
        let mut rest = vec![0u8; DeviceStateHeader::rest_len(prefix, fh.len)?];
        read_exact(&mut self.ch, &mut rest, PEER, what)?;
        if let Some(h) = self.state_hash.as_mut() {
            h.frame();
            h.update(&prefix);
            h.update(&rest);
        }
        let (h, state_len) = DeviceStateHeader::decode_parts(prefix, &rest, fh.len)?;
        let Some(idx) = self
            .devices
            .iter()
            .position(|d| d.name == h.name && d.instance == h.instance)
        else {
            return Err(MigrationError::UnannouncedState {
                what: format!("device {} instance {}", h.name, h.instance),
            });
        };
        Ok((idx, h.version, state_len))
    }

    fn device_name(&self, idx: usize) -> String {
        format!(
            "device {} instance {}",
            self.devices[idx].name, self.devices[idx].instance
        )
    }

    /// A device's final state: the device reads it straight off the stream, checked as
    /// it goes.
    fn device_state(&mut self, fh: FrameHeader) -> Result<(), MigrationError> {
        let (idx, version, state_len) = self.device_header(fh, "device state")?;
        let schema = self.devices[idx].schema;
        let max = schema.max_encoded_len();
        if state_len as u64 > max {
            return Err(WireError::TooLong {
                what: "device state",
                len: state_len as u64,
                max,
            }
            .into());
        }
        if std::mem::replace(&mut self.device_loaded[idx], true) {
            return Err(MigrationError::StateTwice {
                what: self.device_name(idx),
            });
        }
        let p = self.precopy[idx];
        if p.planned && !p.init_done {
            return Err(MigrationError::Protocol(format!(
                "the final state of {}, which moves in precopy, came before its initial precopy data was all sent",
                self.device_name(idx)
            )));
        }
        let t = Instant::now();
        let mut input = Hashed {
            inner: &mut self.ch,
            hash: self.state_hash.as_mut(),
        };
        let mut r = StateReader::new(schema, version, &mut input, u64::from(state_len));
        let loaded = self.vm.load_device(idx, &mut r);
        if let Some(e) = r.take_io_error() {
            return Err(MigrationError::io(PEER, "device state", e));
        }
        let done = r.is_done();
        loaded?;
        if !done {
            return Err(state::stream::incomplete(
                schema,
                "its load returned before the whole state was read",
            )
            .into());
        }
        self.state_load += t.elapsed();
        self.device_stats[idx].stop_copy_bytes = u64::from(fh.len);
        Ok(())
    }

    /// One precopy record of a device whose plan is precopy.
    fn device_precopy(&mut self, fh: FrameHeader) -> Result<(), MigrationError> {
        let (idx, version, state_len) = self.device_header(fh, "device precopy")?;
        let schema = match self.devices[idx].precopy {
            Some(s) if self.precopy[idx].planned => s,
            _ => {
                return Err(MigrationError::Protocol(format!(
                    "a precopy record of {}, which moves as stop-copy in this migration",
                    self.device_name(idx)
                )))
            }
        };
        if self.device_loaded[idx] {
            return Err(MigrationError::Protocol(format!(
                "a precopy record of {} after its final state",
                self.device_name(idx)
            )));
        }
        let max = schema.max_encoded_len();
        if state_len as u64 > max {
            return Err(WireError::TooLong {
                what: "device precopy record",
                len: state_len as u64,
                max,
            }
            .into());
        }
        let mut input = Hashed {
            inner: &mut self.ch,
            hash: self.state_hash.as_mut(),
        };
        let mut r = StateReader::new(schema, version, &mut input, u64::from(state_len));
        let loaded = self.vm.load_precopy(idx, &mut r);
        if let Some(e) = r.take_io_error() {
            return Err(MigrationError::io(PEER, "device precopy", e));
        }
        let done = r.is_done();
        loaded?;
        if !done {
            return Err(state::stream::incomplete(
                schema,
                "its precopy load returned before the whole record was read",
            )
            .into());
        }
        let st = &mut self.device_stats[idx];
        st.precopy_records += 1;
        if self.precopy[idx].init_done {
            // After the acknowledgement, records are what changed since.
            st.final_precopy_bytes += u64::from(fh.len);
        } else {
            st.precopy_bytes += u64::from(fh.len);
        }
        Ok(())
    }

    /// The source's word that a device's initial precopy data is all sent: it has all
    /// loaded (records are loaded as they come), so the device is acknowledged.
    fn init_done(&mut self, r: &DeviceRef) -> Result<(), MigrationError> {
        let Some(idx) = self
            .devices
            .iter()
            .position(|d| d.name == r.name && d.instance == r.instance)
        else {
            return Err(MigrationError::UnannouncedState {
                what: format!("device {r}"),
            });
        };
        let p = &mut self.precopy[idx];
        if !p.planned || p.init_done {
            return Err(MigrationError::Protocol(format!(
                "the source says the initial precopy data of device {r} is sent, {}",
                if p.planned {
                    "for the second time"
                } else {
                    "but it moves as stop-copy in this migration"
                }
            )));
        }
        p.init_done = true;
        match self.monitor.faults().delay_ack {
            Some(Duration::MAX) => return Ok(()),
            Some(d) => self.delayed_ack(r.clone(), d)?,
            None => write_frame(
                &self.ch,
                FrameTag::SwitchoverAck,
                &r.encode(),
                PEER,
                "switchover acknowledgement",
            )?,
        }
        self.device_stats[idx].acked_ms = Some(self.start.elapsed().as_millis() as u64);
        self.report_devices();
        tracing::info!(device = %r, "acknowledged the device's precopy data");
        Ok(())
    }

    /// Answers the hello's precopy offers with the plan, when switchover-ack is on
    /// (both sides have it: the hello's properties agree), and readies the devices
    /// that will precopy.
    fn plan_devices(&mut self, hello: &Hello) -> Result<(), MigrationError> {
        self.device_stats = self
            .devices
            .iter()
            .map(|d| DeviceStats {
                name: d.name.clone(),
                instance: d.instance,
                mode: "stop-copy".into(),
                precopy_capable: d.precopy.is_some(),
                reason: (!self.params.switchover_ack && d.precopy.is_some())
                    .then(|| STOP_COPY_ACK_OFF.into()),
                ..DeviceStats::default()
            })
            .collect();
        if !self.params.switchover_ack {
            self.report_devices();
            return Ok(());
        }
        let mut modes = Vec::with_capacity(hello.devices.len());
        for hd in &hello.devices {
            let idx = self
                .devices
                .iter()
                .position(|d| d.name == hd.name && d.instance == hd.instance)
                .expect("the hello's devices were checked against this VM's");
            let offer = self.annotations.precopy_offer(&hd.name, hd.instance);
            let mode = match (offer, self.devices[idx].precopy) {
                (Some(o), Some(s))
                    if o.schema == s.name && (s.min_version..=s.version).contains(&o.version) =>
                {
                    DeviceMode::Precopy
                }
                (Some(_), Some(_)) => DeviceMode::StopCopy(StopCopyWhy::RecordFormat),
                (Some(_), None) => DeviceMode::StopCopy(StopCopyWhy::DestinationHost),
                (None, Some(_)) => DeviceMode::StopCopy(StopCopyWhy::SourceHost),
                (None, None) => DeviceMode::StopCopy(StopCopyWhy::NeitherHost),
            };
            let st = &mut self.device_stats[idx];
            match mode {
                DeviceMode::Precopy => st.mode = "precopy".into(),
                DeviceMode::StopCopy(why) => st.reason = Some(why.to_string()),
            }
            modes.push(mode);
        }
        write_frame(
            &self.ch,
            FrameTag::DevicePlan,
            &DevicePlan {
                modes: modes.clone(),
            }
            .encode(),
            PEER,
            "device plan",
        )?;
        for (hd, mode) in hello.devices.iter().zip(&modes) {
            if *mode != DeviceMode::Precopy {
                continue;
            }
            let idx = self
                .devices
                .iter()
                .position(|d| d.name == hd.name && d.instance == hd.instance)
                .expect("checked above");
            self.vm.precopy_begin(idx)?;
            self.precopy[idx].planned = true;
        }
        self.report_devices();
        Ok(())
    }

    /// Test fault: the acknowledgement goes out after `d`, from a thread of its own.
    fn delayed_ack(&self, r: DeviceRef, d: Duration) -> Result<(), MigrationError> {
        let ch = self
            .ch
            .try_clone()
            .map_err(|e| MigrationError::io(PEER, "switchover acknowledgement", e))?;
        std::thread::spawn(move || {
            std::thread::sleep(d);
            let _ = write_frame(
                &ch,
                FrameTag::SwitchoverAck,
                &r.encode(),
                PEER,
                "switchover acknowledgement",
            );
        });
        Ok(())
    }

    fn report_devices(&self) {
        let stats = self.device_stats.clone();
        self.monitor.update(|i| i.devices = stats);
    }

    fn vcpu_state(&mut self, fh: FrameHeader) -> Result<(), MigrationError> {
        VcpuStateHeader::check_frame_len(fh.len)?;
        let mut hb = [0u8; VcpuStateHeader::LEN];
        read_exact(&mut self.ch, &mut hb, PEER, "vCPU state")?;
        let (h, state_len) = VcpuStateHeader::decode_fixed(&hb, fh.len)?;
        let (index, version, state_len) = (h.index as usize, h.version, state_len as usize);
        let schema = self.vm.vcpu_schema();
        if index >= self.vcpu_loaded.len() {
            return Err(WireError::BadValue {
                what: "vCPU index",
                value: index as u64,
            }
            .into());
        }
        let max = schema.max_encoded_len();
        if state_len as u64 > max {
            return Err(WireError::TooLong {
                what: "vCPU state",
                len: state_len as u64,
                max,
            }
            .into());
        }
        if std::mem::replace(&mut self.vcpu_loaded[index], true) {
            return Err(MigrationError::StateTwice {
                what: format!("vCPU {index}"),
            });
        }
        let bytes = read_payload(&mut self.ch, state_len as u32, PEER, "vCPU state")?;
        if let Some(h) = self.state_hash.as_mut() {
            h.frame();
            h.update(&hb);
            h.update(&bytes);
        }
        let t = Instant::now();
        let st = state::decode(schema, version, &bytes)?;
        self.vm.load_vcpu(index, st)?;
        self.state_load += t.elapsed();
        Ok(())
    }

    fn finish(&mut self, eos: EndOfStream) -> Result<(), MigrationError> {
        let t = Instant::now();
        let channels = self.hello.as_ref().map_or(0, |h| h.channels);
        if channels > 0 && !self.channels_done {
            return Err(MigrationError::Protocol(
                "the stream ended before the data channels' last sync".into(),
            ));
        }
        if let Some(i) = self.device_loaded.iter().position(|l| !l) {
            let d = &self.devices[i];
            return Err(MigrationError::StateMissing {
                what: format!("device {} instance {}", d.name, d.instance),
            });
        }
        if let Some(i) = self.vcpu_loaded.iter().position(|l| !l) {
            return Err(MigrationError::StateMissing {
                what: format!("vCPU {i}"),
            });
        }
        if eos.pages_sent != self.pages_received {
            return Err(MigrationError::Verify(format!(
                "the source sent {} pages, {} arrived",
                eos.pages_sent, self.pages_received
            )));
        }
        let state_verified = match (&self.state_hash, self.state_digest) {
            (Some(mine), Some(theirs)) => {
                let mine = mine.value();
                if mine != theirs {
                    return Err(MigrationError::Verify(format!(
                        "device and vCPU state digest differs: source {:#018x} over {} frames, destination {:#018x} over {}",
                        theirs.digest, theirs.frames, mine.digest, mine.frames
                    )));
                }
                "digest"
            }
            (Some(_), None) => return Err(MigrationError::Protocol(
                "the stream ended without the state digest that migration.state-digest=on promises"
                    .into(),
            )),
            (None, _) => "none",
        };
        self.monitor
            .update(|i| i.state_verified = Some(state_verified.to_string()));
        let mut verified = Vec::new();
        match (self.digest.as_ref(), eos.digest) {
            (Some(mine), Some(theirs)) => {
                if mine.value() != theirs {
                    return Err(MigrationError::Verify(format!(
                        "guest memory digest differs: source {theirs:#018x}, destination {:#018x}",
                        mine.value()
                    )));
                }
                verified.push("digest");
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(MigrationError::Protocol(
                    "the end of stream carries no digest".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(MigrationError::Protocol(
                    "the end of stream carries an unexpected digest".into(),
                ))
            }
        }
        let wants_full = self
            .hello
            .as_ref()
            .is_some_and(|h| h.flags & Hello::FLAG_FULL_VERIFY != 0);
        match (wants_full, eos.full_digest) {
            (true, Some(theirs)) => {
                let mine = self.mem.full_digest();
                if mine != theirs {
                    return Err(MigrationError::Verify(format!(
                        "full memory digest differs: source {theirs:#018x}, destination {mine:#018x}"
                    )));
                }
                verified.push("full");
            }
            (false, None) => {}
            _ => {
                return Err(MigrationError::Protocol(
                    "the end of stream does not match the full verification the hello announced"
                        .into(),
                ))
            }
        }
        self.monitor.probe(HandoverPoint::Verified);
        self.hand_over(&eos, t)?;
        let verified = if verified.is_empty() {
            "none".to_string()
        } else {
            verified.join("+")
        };
        self.monitor.update(|i| {
            i.verified = Some(verified);
            i.downtime = None;
        });
        Ok(())
    }
}

impl Dest<'_> {
    /// Takes the guest over once everything loaded and verified. A cancel at this side
    /// taken before this point wins: the load fails and the source, told so, resumes.
    ///
    /// A source that keeps the switchover commitment (its hello says so) never runs the
    /// guest again after its end of stream unless told the load failed, so the guest
    /// resumes here at once and `Completed` follows. A source that does not (release
    /// 0.1.0, which resumed its guest when cancelled after the end of stream) hears
    /// `Completed` first, and the guest resumes here only once that source has let go:
    /// it closes the connection, or [`RELEASE_GRACE`] passes without an abort (0.1.0
    /// keeps its connection open after `Completed`, and aborts only if a cancel beat
    /// `Completed`). If it aborts, it has taken the guest back, and the guest does not
    /// start here. A broken link also counts as letting go: 0.1.0 keeps its guest
    /// stopped then, and a guest must run somewhere. The cost: up to `RELEASE_GRACE`
    /// more downtime when the source is 0.1.0, none otherwise.
    fn hand_over(&mut self, eos: &EndOfStream, t: Instant) -> Result<(), MigrationError> {
        if let Some(d) = self.monitor.faults().delay_completion {
            std::thread::sleep(d);
        }
        // The answer is the last frame: no keepalive after it.
        if let Some(k) = self.keepalive.take() {
            k.stop();
        }
        self.monitor.commit()?;
        let done = |t: Instant, s: &Self| Completed {
            resume_us: t.elapsed().as_micros() as u64,
            state_load_us: s.state_load.as_micros() as u64,
            pages_written: s.pages_written,
        };
        if self.annotations.switchover_commit {
            if eos.resume {
                self.vm.resume()?;
            }
            self.monitor.set_handover(Handover::Destination);
            self.monitor.probe(HandoverPoint::Resumed);
            // The guest runs here now; if this last message is lost the source cannot
            // know, and keeps its copy stopped, in doubt (see the wire docs).
            if let Err(e) = write_frame(
                &self.ch,
                FrameTag::Completed,
                &done(t, self).encode(),
                PEER,
                "completion",
            ) {
                tracing::warn!(error = %error_chain(&e), "the guest runs here but the source did not hear so");
            }
            self.monitor.probe(HandoverPoint::CompletedSent);
            return Ok(());
        }
        let sent = write_frame(
            &self.ch,
            FrameTag::Completed,
            &done(t, self).encode(),
            PEER,
            "completion",
        );
        self.monitor.probe(HandoverPoint::CompletedSent);
        if sent.is_ok() {
            self.await_release()?;
        }
        if eos.resume {
            self.vm.resume()?;
        }
        self.monitor.set_handover(Handover::Destination);
        self.monitor.probe(HandoverPoint::Resumed);
        Ok(())
    }

    /// Waits for a source without the commitment to close the connection after
    /// `Completed`; an abort means it took the guest back.
    fn await_release(&mut self) -> Result<(), MigrationError> {
        self.ch.unwatch();
        let _ = self.ch.set_read_timeout(Some(RELEASE_GRACE));
        let fh = match read_frame_header(&mut self.ch, PEER, "the source to let go of the guest") {
            Ok(fh) => fh,
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "the source let go of the guest");
                return Ok(());
            }
        };
        if fh.tag == FrameTag::Abort {
            let why = read_payload(&mut self.ch, fh.len, PEER, "abort")
                .ok()
                .and_then(|p| decode_reason(&p, "abort").ok())
                .unwrap_or_default();
            self.monitor.set_handover(Handover::Source);
            return Err(MigrationError::SourceAborted(format!(
                "the source took the guest back after the switchover, so it was not started here ({why})"
            )));
        }
        tracing::warn!(
            frame = fh.tag.name(),
            "the source sent more after completion; taking that as letting go"
        );
        Ok(())
    }
}

/// Why a hello is refused, as this side logs it and the peer is told.
///
/// What a refusal reveals follows the order of the checks: a peer learns this VM's RAM
/// layout, vCPUs and devices only once its hello has named this VM's machine type and
/// agreed on every wire property, that is once it looks like a source of this very VM
/// (which it then needs, to start a matching destination). A probe or another VM's
/// source learns the release's machine types, and no more.
struct Refusal {
    cause: RefuseCause,
    reason: String,
    to_peer: String,
}

impl Refusal {
    fn same(cause: RefuseCause, reason: String) -> Self {
        Self {
            cause,
            to_peer: reason.clone(),
            reason,
        }
    }
}

impl From<(RefuseCause, String)> for Refusal {
    fn from((cause, reason): (RefuseCause, String)) -> Self {
        Self::same(cause, reason)
    }
}

/// Judges a candidate's hello: everything the destination must refuse before any RAM
/// moves. Returns the hello, without its annotations, and the annotations.
fn judge(
    cand: &Candidate,
    vm: &dyn MigratableVm,
    devices: &[DeviceInfo],
    id: &DestinationIdentity,
    takes_channels: bool,
) -> Result<(Hello, Annotations), Refusal> {
    let mut hello = Hello::decode(&cand.hello).map_err(|e| {
        Refusal::same(
            RefuseCause::BadHello,
            format!("the hello does not decode: {e}"),
        )
    })?;
    let (props, annotations) = Annotations::split(&hello.wire_props);
    hello.wire_props = props;
    if !annotations.unknown.is_empty() {
        tracing::info!(unknown = ?annotations.unknown, "ignoring hello annotations this release does not know");
    }
    check_hello(&hello, vm, devices, id).map_err(Refusal::from)?;
    check_device_config(&annotations, devices)
        .map_err(|r| Refusal::same(RefuseCause::DeviceConfig, r))?;
    check_channels(&hello, takes_channels, id)
        .map_err(|r| Refusal::same(RefuseCause::Channels, r))?;
    Ok((hello, annotations))
}

/// What the doorman turned away so far, into `query-migrate`.
fn report_strays(monitor: &MigrationMonitor, door: &Doorman) {
    let strays = door.strays();
    if !strays.is_empty() {
        show_strays(monitor, door.strays_total(), &strays);
    }
}

/// The most recent strays, after a line that counts the older ones when the list
/// had to forget some.
fn show_strays(monitor: &MigrationMonitor, total: u64, strays: &[Stray]) {
    monitor.update(|i| {
        let m = i.multifd.get_or_insert_with(MultifdStats::default);
        let older = total.saturating_sub(strays.len() as u64);
        m.strays = (older > 0)
            .then(|| format!("{older} connections turned away before these"))
            .into_iter()
            .chain(strays.iter().map(|s| format!("{}: {}", s.peer, s.reason)))
            .collect();
    });
}

/// The source's device configuration against this side's: every difference, named.
/// A source that states none (0.1.0) is not checked here; its device load says.
fn check_device_config(ann: &Annotations, devices: &[DeviceInfo]) -> Result<(), String> {
    if !ann.switchover_commit && ann.device_config.is_empty() {
        return Ok(());
    }
    let mut diffs = Vec::new();
    for d in devices {
        let theirs = ann.device(&d.name, d.instance);
        for (k, mine) in &d.config {
            match theirs.iter().find(|(tk, _)| tk == k) {
                Some((_, tv)) if tv == mine => {}
                Some((_, tv)) => diffs.push(format!(
                    "device {} instance {}: {k} is {tv} on the source and {mine} here",
                    d.name, d.instance
                )),
                None => diffs.push(format!(
                    "device {} instance {}: {k} is {mine} here and not set on the source",
                    d.name, d.instance
                )),
            }
        }
        for (tk, tv) in &theirs {
            if !d.config.iter().any(|(k, _)| k == tk) {
                diffs.push(format!(
                    "device {} instance {}: {tk} is {tv} on the source and not set here",
                    d.name, d.instance
                ));
            }
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}; start the destination with the source's device configuration",
            diffs.join("; ")
        ))
    }
}

/// The data channels and compression the hello asks for, against what this side can do.
fn check_channels(
    hello: &Hello,
    takes_channels: bool,
    id: &DestinationIdentity,
) -> Result<(), String> {
    if hello.channels > 0 && !takes_channels {
        return Err(format!(
            "the source opens {} data channels, but this destination was handed a single connection; migrate with multifd-channels=0",
            hello.channels
        ));
    }
    if let Compression::Other(_) = hello.compression {
        return Err(format!(
            "the source compresses pages with {}, which release {} does not know (it knows none and zstd); set migration.multifd-compression to one of those on the source",
            hello.compression.name(),
            id.release
        ));
    }
    if hello.compression != Compression::None && hello.channels == 0 {
        return Err(
            "the source asks for compression without data channels; compression applies to data channels only".into(),
        );
    }
    Ok(())
}

/// Everything the destination must refuse before any RAM moves. Returns the cause and a
/// reason that says what to do.
fn check_hello(
    hello: &Hello,
    vm: &dyn MigratableVm,
    devices: &[DeviceInfo],
    id: &DestinationIdentity,
) -> Result<(), (RefuseCause, String)> {
    if !id.known_machines.contains(&hello.machine) {
        return Err((
            RefuseCause::UnknownMachine,
            format!(
                "machine type {} is unknown to release {} (it knows {}); migrate to a release that has {}, or start the source on a machine type both releases know",
                hello.machine,
                id.release,
                id.known_machines.join(", "),
                hello.machine
            ),
        ));
    }
    if hello.machine != id.machine {
        return Err((
            RefuseCause::MachineMismatch,
            format!(
                "the source runs machine type {} but this destination was started with {}; start the destination with --machine {}",
                hello.machine, id.machine, hello.machine
            ),
        ));
    }
    if hello.page_size as usize != PAGE_SIZE {
        return Err((
            RefuseCause::RamLayout,
            format!(
                "the source uses {}-byte pages, this release {PAGE_SIZE}",
                hello.page_size
            ),
        ));
    }
    let mismatches = compare_props(id, hello);
    if !mismatches.is_empty() {
        return Err((RefuseCause::PropertyMismatch, mismatches.join("; ")));
    }
    let ram = vm.ram();
    let mine = ram.blocks();
    if mine.len() != hello.ram_blocks.len()
        || mine
            .iter()
            .zip(&hello.ram_blocks)
            .any(|(a, b)| a.name != b.name || a.gpa != b.gpa || a.size != b.size)
    {
        let show = |v: Vec<(String, u64, u64)>| {
            v.iter()
                .map(|(n, g, s)| format!("{n} {} at {g:#x}", super::human_bytes(*s)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err((
            RefuseCause::RamLayout,
            format!(
                "RAM differs: source has [{}], destination has [{}]; start the destination with the source's --mem",
                show(hello.ram_blocks.iter().map(|b| (b.name.clone(), b.gpa, b.size)).collect()),
                show(mine.iter().map(|b| (b.name.clone(), b.gpa, b.size)).collect()),
            ),
        ));
    }
    let vs = vm.vcpu_schema();
    if hello.vcpu_count as usize != vm.vcpu_count() || hello.vcpu_state != vs.name {
        return Err((
            RefuseCause::VcpuMismatch,
            format!(
                "the source has {} vCPUs of kind {}, this destination {} of kind {}; start the destination with the source's backend and vCPU count",
                hello.vcpu_count,
                hello.vcpu_state,
                vm.vcpu_count(),
                vs.name
            ),
        ));
    }
    if hello.vcpu_version > vs.version || hello.vcpu_version < vs.min_version {
        return Err((
            RefuseCause::DeviceVersion,
            format!(
                "vCPU state {} version {} cannot be loaded by release {} (it loads versions {} to {})",
                vs.name, hello.vcpu_version, id.release, vs.min_version, vs.version
            ),
        ));
    }
    for d in &hello.devices {
        let Some(local) = devices
            .iter()
            .find(|l| l.name == d.name && l.instance == d.instance)
        else {
            return Err((
                RefuseCause::UnknownDevice,
                format!(
                    "device {} instance {} of the source does not exist here; start the destination with the same devices",
                    d.name, d.instance
                ),
            ));
        };
        let s = local.schema;
        if d.version > s.version || d.version < s.min_version {
            return Err((
                RefuseCause::DeviceVersion,
                format!(
                    "device {} state version {} cannot be loaded by release {} (it loads versions {} to {}); migrate to a release that can, or start the source on an older machine type",
                    d.name, d.version, id.release, s.min_version, s.version
                ),
            ));
        }
    }
    for l in devices {
        if !hello
            .devices
            .iter()
            .any(|d| d.name == l.name && d.instance == l.instance)
        {
            return Err((
                RefuseCause::MissingDevice,
                format!(
                    "device {} instance {} exists here but the source does not send it; start the destination with the source's devices",
                    l.name, l.instance
                ),
            ));
        }
    }
    Ok(())
}

/// Every wire property on which the two sides differ, with what to do about it.
///
/// A property only one side knows is fine when that side's value comes from the machine
/// type's compat tables: the compat entry restores exactly what the older release does
/// without the property (the seed's rule). Set by default or `-global`, it is a mismatch.
fn compare_props(id: &DestinationIdentity, hello: &Hello) -> Vec<String> {
    wire_mismatches(&id.wire_props, &hello.wire_props)
        .into_iter()
        .filter_map(|m| match (m.peer, m.local) {
            (Some(theirs), Some(mine)) => Some(format!(
                "property {} is {theirs} on the source and {mine} here; give both sides the same -global {}=...",
                m.property, m.property
            )),
            (Some(_), None) if hello.compat_pinned.contains(&m.property) => None,
            (Some(theirs), None) => Some(format!(
                "property {}={theirs} of the source is unknown to this release and not its machine type's compat value; drop the -global that sets it, or migrate to a release that knows it",
                m.property
            )),
            (None, Some(_)) if id.compat_pinned.contains(&m.property) => None,
            (None, Some(mine)) => Some(format!(
                "property {}={mine} here is unknown to the source's release and not this machine type's compat value; drop the -global that sets it, or start both sides on an older machine type",
                m.property
            )),
            (None, None) => Some(format!("property {} differs", m.property)),
        })
        .collect()
}
