//! Data channels (multifd): the source's sender threads and the destination's receiver
//! threads, and the sync barrier between them.
//!
//! # Source
//!
//! The migration thread walks the dirty bitmap and hands each run of up to
//! [`MAX_PACKET_PAGES`] pages of one block to a sender thread, the first whose queue has
//! room, starting after the one used last. A sender reads its pages itself: it tells
//! zero pages from data pages, compresses if asked, writes header, offsets and pages
//! with one `writev` straight from guest memory, then hashes the data pages for the
//! digest (see [`Classifier`] for why after).
//!
//! # Destination
//!
//! One receiver thread per channel reads packets, checks every field against the RAM
//! layout before touching memory, and reads page data straight into guest memory (or
//! decompresses into a buffer and copies). A zero page is written only if the page may
//! hold data (populated before, or written in this migration): fresh memory stays
//! untouched.
//!
//! # The sync barrier
//!
//! A sync is numbered. The source puts a sync packet with the number on every channel,
//! after every page packet of the round, then a [`MultifdSync`] frame with the same
//! number on the main channel. A receiver that reads the sync packet reports it and
//! applies nothing more until the destination's main thread, having read the main
//! channel's sync frame, has seen every channel report that number and releases them
//! all. So every page sent before a sync is in guest memory before any page sent after
//! it is applied, whichever channel each travelled on.
//!
//! Where the source puts syncs is the protocol's rule (see [`crate::wire`]): at the end
//! of every pass, and with `migration.multifd-flush-after-each-section=on` (0.1's rule)
//! also after every section (about [`SECTION`] of sending). A page is sent at most once
//! per pass, so no two copies of a page are ever in the same round.
//!
//! [`MultifdSync`]: crate::wire::MultifdSync

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::bitmap::DirtyBitmap;
use super::digest::PageDigest;
use super::error::MigrationError;
use super::liveness::{Liveness, Stalled};
use super::memory::GuestMemory;
use super::pages::{Batch, Classifier, Lander, PageWriter};
use super::stats::ChannelStats;
use super::transport::Channel;
use crate::wire::{Compression, PacketHeader, WireError, MAX_PACKET_PAGES};
use crate::PAGE_SIZE;

/// The engine's unit of sending between two syncs, under 0.1's rule.
pub const SECTION: Duration = Duration::from_millis(100);
/// Jobs a sender may have waiting besides the one it is writing.
const QUEUE_DEPTH: usize = 2;
/// How often a waiting thread looks for cancel or a failed peer thread.
const POLL: Duration = Duration::from_millis(50);

/// What a channel moved, for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelCounters {
    pub packets: u64,
    pub pages: u64,
    pub zero: u64,
    /// Bytes on the wire: headers, offsets and (possibly compressed) data.
    pub bytes: u64,
    /// Bytes of page data before compression.
    pub raw_bytes: u64,
}

impl ChannelCounters {
    fn add(&mut self, o: &Self) {
        self.packets += o.packets;
        self.pages += o.pages;
        self.zero += o.zero;
        self.bytes += o.bytes;
        self.raw_bytes += o.raw_bytes;
    }
}

impl From<&ChannelCounters> for ChannelStats {
    fn from(c: &ChannelCounters) -> Self {
        Self {
            packets: c.packets,
            pages: c.pages,
            zero_pages: c.zero,
            bytes: c.bytes,
        }
    }
}

fn channel_error(index: u16, e: MigrationError) -> MigrationError {
    match e {
        e @ MigrationError::Channel { .. } => e,
        e => MigrationError::Channel {
            index,
            source: Box::new(e),
        },
    }
}

// ---------------------------------------------------------------------------------------
// Source
// ---------------------------------------------------------------------------------------

enum Job {
    Pages {
        packet: u64,
        block: usize,
        pages: Vec<u64>,
    },
    Sync {
        packet: u64,
        seq: u64,
        last: bool,
    },
}

#[derive(Default)]
struct LaneState {
    jobs: VecDeque<Job>,
    queued: u64,
    done: u64,
    counters: ChannelCounters,
}

#[derive(Default)]
struct SendState {
    lanes: Vec<LaneState>,
    error: Option<MigrationError>,
    stop: bool,
}

struct SendShared {
    st: Mutex<SendState>,
    /// Senders wait here for jobs.
    work: Condvar,
    /// The migration thread waits here for room, drained queues or an error.
    progress: Condvar,
}

/// What every sender needs.
#[derive(Clone)]
pub(crate) struct SendConfig {
    pub mem: Arc<GuestMemory>,
    pub digest: Option<Arc<PageDigest>>,
    pub compression: Compression,
    pub zstd_level: i32,
    /// Test fault: close this channel after this many packets.
    pub close_after: Option<(u16, u64)>,
}

/// The source's data channels and their sender threads.
pub(crate) struct SendSet {
    shared: Arc<SendShared>,
    threads: Vec<JoinHandle<()>>,
    /// Clones of the sockets, to wake blocked senders on shutdown.
    sockets: Vec<Channel>,
    next: usize,
    packet: u64,
    seq: u64,
    /// Counters already reported by [`SendSet::take_progress`].
    reported: ChannelCounters,
}

impl SendSet {
    /// Starts one sender per connected channel (`channels[i]` is channel `i`).
    pub fn start(channels: Vec<Channel>, cfg: &SendConfig) -> Result<Self, MigrationError> {
        let n = channels.len();
        let shared = Arc::new(SendShared {
            st: Mutex::new(SendState {
                lanes: (0..n).map(|_| LaneState::default()).collect(),
                ..SendState::default()
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
        });
        let mut set = Self {
            shared,
            threads: Vec::with_capacity(n),
            sockets: Vec::with_capacity(n),
            next: 0,
            packet: 0,
            seq: 0,
            reported: ChannelCounters::default(),
        };
        for (i, ch) in channels.into_iter().enumerate() {
            let index = i as u16;
            set.sockets.push(
                ch.try_clone()
                    .map_err(|e| channel_error(index, MigrationError::io(PEER, "setup", e)))?,
            );
            let mut sender = Sender::new(index, ch, cfg.clone())?;
            let shared = Arc::clone(&set.shared);
            let t = std::thread::Builder::new()
                .name(format!("ferry-send-{i}"))
                .spawn(move || sender.run(&shared))
                .map_err(|e| MigrationError::io(PEER, "setup", e))?;
            set.threads.push(t);
        }
        Ok(set)
    }

    pub fn channels(&self) -> usize {
        self.sockets.len()
    }

    fn lock(&self) -> MutexGuard<'_, SendState> {
        self.shared.st.lock().unwrap()
    }

    /// Queues a packet of `pages` (indices into `block`) on the first channel with room.
    pub fn send_pages(
        &mut self,
        block: usize,
        pages: Vec<u64>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), MigrationError> {
        debug_assert!(!pages.is_empty() && pages.len() <= MAX_PACKET_PAGES);
        self.packet += 1;
        let job = Job::Pages {
            packet: self.packet,
            block,
            pages,
        };
        let n = self.channels();
        let shared = Arc::clone(&self.shared);
        let mut st = shared.st.lock().unwrap();
        loop {
            check(&st, cancelled)?;
            if let Some(i) = (0..n)
                .map(|k| (self.next + k) % n)
                .find(|&i| st.lanes[i].jobs.len() < QUEUE_DEPTH)
            {
                st.lanes[i].jobs.push_back(job);
                st.lanes[i].queued += 1;
                self.next = (i + 1) % n;
                drop(st);
                shared.work.notify_all();
                return Ok(());
            }
            st = shared.progress.wait_timeout(st, POLL).unwrap().0;
        }
    }

    /// Puts sync packet `seq` behind everything queued on every channel; returns `seq`.
    /// `last` makes it the channels' final packet.
    pub fn sync(
        &mut self,
        last: bool,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<u64, MigrationError> {
        self.seq += 1;
        let seq = self.seq;
        let shared = Arc::clone(&self.shared);
        let mut st = shared.st.lock().unwrap();
        for i in 0..self.channels() {
            loop {
                check(&st, cancelled)?;
                if st.lanes[i].jobs.len() < QUEUE_DEPTH {
                    break;
                }
                st = shared.progress.wait_timeout(st, POLL).unwrap().0;
            }
            self.packet += 1;
            st.lanes[i].jobs.push_back(Job::Sync {
                packet: self.packet,
                seq,
                last,
            });
            st.lanes[i].queued += 1;
            shared.work.notify_all();
        }
        Ok(seq)
    }

    /// Waits until every queued packet is on the wire.
    pub fn flush(&self, cancelled: &dyn Fn() -> bool) -> Result<(), MigrationError> {
        let mut st = self.lock();
        loop {
            check(&st, cancelled)?;
            if st.lanes.iter().all(|l| l.done == l.queued) {
                return Ok(());
            }
            st = self.shared.progress.wait_timeout(st, POLL).unwrap().0;
        }
    }

    /// The first error a sender hit, if any.
    pub fn check(&self) -> Result<(), MigrationError> {
        check(&self.lock(), &|| false)
    }

    /// Counters of each channel so far.
    pub fn counters(&self) -> Vec<ChannelCounters> {
        self.lock().lanes.iter().map(|l| l.counters).collect()
    }

    /// What all channels moved since the previous call.
    pub fn take_progress(&mut self) -> ChannelCounters {
        let mut total = ChannelCounters::default();
        for c in self.counters() {
            total.add(&c);
        }
        let d = ChannelCounters {
            packets: total.packets - self.reported.packets,
            pages: total.pages - self.reported.pages,
            zero: total.zero - self.reported.zero,
            bytes: total.bytes - self.reported.bytes,
            raw_bytes: total.raw_bytes - self.reported.raw_bytes,
        };
        self.reported = total;
        d
    }

    /// Stops the senders, closing the sockets first if `abort` (a failed migration)
    /// so no sender stays blocked on a peer that is not reading.
    pub fn shutdown(&mut self, abort: bool) {
        {
            let mut st = self.lock();
            st.stop = true;
            if abort {
                for l in &mut st.lanes {
                    l.jobs.clear();
                }
            }
        }
        self.shared.work.notify_all();
        if abort {
            for s in &self.sockets {
                s.shutdown();
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for s in &self.sockets {
            s.shutdown();
        }
    }
}

impl Drop for SendSet {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown(true);
        }
    }
}

fn check(st: &SendState, cancelled: &dyn Fn() -> bool) -> Result<(), MigrationError> {
    if let Some(e) = &st.error {
        return Err(e.duplicate());
    }
    if cancelled() {
        return Err(MigrationError::Cancelled);
    }
    Ok(())
}

const PEER: &str = "destination";

/// One sender thread's own state.
struct Sender {
    index: u16,
    ch: Channel,
    cfg: SendConfig,
    classifier: Classifier,
    batch: Batch,
    /// Packet header and offsets, contiguous.
    head: Vec<u8>,
    out: PageWriter,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Pages gathered for the compressor, and its output.
    gather: Vec<u8>,
    packed: Vec<u8>,
    sent_packets: u64,
}

impl Sender {
    fn new(index: u16, ch: Channel, cfg: SendConfig) -> Result<Self, MigrationError> {
        let zstd = match cfg.compression {
            Compression::Zstd => Some(
                zstd::bulk::Compressor::new(cfg.zstd_level)
                    .map_err(|e| MigrationError::Protocol(format!("zstd: {e}")))?,
            ),
            _ => None,
        };
        Ok(Self {
            index,
            ch,
            classifier: Classifier::new(Arc::clone(&cfg.mem), cfg.digest.clone()),
            batch: Batch::default(),
            cfg,
            head: Vec::with_capacity(PacketHeader::LEN + MAX_PACKET_PAGES * 8),
            out: PageWriter::default(),
            zstd,
            gather: Vec::new(),
            packed: Vec::new(),
            sent_packets: 0,
        })
    }

    fn run(&mut self, shared: &SendShared) {
        loop {
            let job = {
                let mut st = shared.st.lock().unwrap();
                loop {
                    if st.stop && st.lanes[self.index as usize].jobs.is_empty() {
                        return;
                    }
                    if let Some(j) = st.lanes[self.index as usize].jobs.pop_front() {
                        break j;
                    }
                    st = shared.work.wait(st).unwrap();
                }
            };
            let r = match job {
                Job::Pages {
                    packet,
                    block,
                    pages,
                } => self.send_pages(packet, block, &pages),
                Job::Sync { packet, seq, last } => self.send_sync(packet, seq, last),
            };
            let mut st = shared.st.lock().unwrap();
            let lane = &mut st.lanes[self.index as usize];
            lane.done += 1;
            let failed = match r {
                Ok(c) => {
                    lane.counters.add(&c);
                    false
                }
                Err(e) => {
                    if st.error.is_none() {
                        st.error = Some(channel_error(self.index, e));
                    }
                    true
                }
            };
            drop(st);
            shared.progress.notify_all();
            if failed {
                return;
            }
            self.sent_packets += 1;
            if let Some((i, n)) = self.cfg.close_after {
                if i == self.index && self.sent_packets == n {
                    tracing::warn!(channel = i, "test fault: closing the data channel");
                    self.ch.shutdown();
                }
            }
        }
    }

    fn send_sync(
        &mut self,
        packet: u64,
        seq: u64,
        last: bool,
    ) -> Result<ChannelCounters, MigrationError> {
        let h = PacketHeader {
            flags: PacketHeader::SYNC | if last { PacketHeader::LAST } else { 0 },
            packet,
            sync: seq,
            block: 0,
            normal: 0,
            zero: 0,
            data_len: 0,
        }
        .encode();
        self.ch
            .write_bufs(&[&h])
            .map_err(|e| MigrationError::io(PEER, "multifd sync", e))?;
        Ok(ChannelCounters {
            packets: 1,
            bytes: PacketHeader::LEN as u64,
            ..ChannelCounters::default()
        })
    }

    fn send_pages(
        &mut self,
        packet: u64,
        block: usize,
        pages: &[u64],
    ) -> Result<ChannelCounters, MigrationError> {
        self.classifier.classify(block, pages, &mut self.batch);
        let b = &self.batch;
        let raw = b.normal.len() * PAGE_SIZE;
        let mut flags = 0;
        let mut data_len = raw;
        if let (Some(z), true) = (self.zstd.as_mut(), raw > 0) {
            self.gather.resize(raw, 0);
            for (k, &p) in b.normal.iter().enumerate() {
                self.cfg.mem.copy_page(
                    block,
                    p,
                    &mut self.gather[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
                );
            }
            self.packed.clear();
            self.packed.reserve(zstd::zstd_safe::compress_bound(raw));
            let n = z
                .compress_to_buffer(&self.gather, &mut self.packed)
                .map_err(|e| MigrationError::Protocol(format!("zstd compression failed: {e}")))?;
            if n < raw {
                flags = PacketHeader::ZSTD;
                data_len = n;
            }
        }
        let h = PacketHeader {
            flags,
            packet,
            sync: 0,
            block: block as u32,
            normal: b.normal.len() as u32,
            zero: b.zero.len() as u32,
            data_len: data_len as u32,
        };
        self.head.clear();
        self.head.extend_from_slice(&h.encode());
        for p in b.normal.iter().chain(&b.zero) {
            self.head.extend_from_slice(&p.to_le_bytes());
        }
        let sent = if flags & PacketHeader::ZSTD != 0 {
            self.ch.write_bufs(&[&self.head, &self.packed[..data_len]])
        } else {
            self.out
                .send(&self.ch, &self.cfg.mem, &self.head, block, &b.normal)
        };
        sent.map_err(|e| MigrationError::io(PEER, "RAM transfer", e))?;
        self.classifier.sent(b);
        Ok(ChannelCounters {
            packets: 1,
            pages: pages.len() as u64,
            zero: b.zero.len() as u64,
            bytes: (self.head.len() + data_len) as u64,
            raw_bytes: raw as u64,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Destination
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct RecvState {
    /// The last sync number each channel has reached.
    reached: Vec<u64>,
    /// Channels that read their last packet.
    finished: Vec<bool>,
    /// Syncs up to this number are complete: receivers may go past them.
    released: u64,
    error: Option<MigrationError>,
    abort: bool,
    counters: Vec<ChannelCounters>,
    pages_written: u64,
}

struct RecvShared {
    st: Mutex<RecvState>,
    cv: Condvar,
    /// A clone of the main channel: a receiver that fails shuts its reading side, so the
    /// main thread, blocked on the next frame, wakes and reports the channel's error.
    wake: Channel,
}

/// What every receiver needs.
#[derive(Clone)]
pub(crate) struct RecvConfig {
    pub mem: Arc<GuestMemory>,
    pub written: Arc<Vec<DirtyBitmap>>,
    pub digest: Option<Arc<PageDigest>>,
    pub zstd: bool,
    /// Test fault: hold every page packet of this channel this long.
    pub delay: Option<(u16, Duration)>,
    /// The source's last sign of life, over every channel.
    pub live: Arc<Liveness>,
    /// How long the transport may let a link go unacknowledged.
    pub link_limit: Duration,
}

/// The destination's data channels and their receiver threads.
pub(crate) struct RecvSet {
    shared: Arc<RecvShared>,
    threads: Vec<JoinHandle<()>>,
    sockets: Vec<Channel>,
}

impl RecvSet {
    /// Starts one receiver per bound channel (`channels[i]` is channel `i`).
    pub fn start(
        channels: Vec<Channel>,
        main: &Channel,
        cfg: &RecvConfig,
    ) -> Result<Self, MigrationError> {
        let n = channels.len();
        let shared = Arc::new(RecvShared {
            st: Mutex::new(RecvState {
                reached: vec![0; n],
                finished: vec![false; n],
                counters: vec![ChannelCounters::default(); n],
                ..RecvState::default()
            }),
            cv: Condvar::new(),
            wake: main
                .try_clone()
                .map_err(|e| MigrationError::io("source", "setup", e))?,
        });
        let mut set = Self {
            shared,
            threads: Vec::with_capacity(n),
            sockets: Vec::with_capacity(n),
        };
        for (i, mut ch) in channels.into_iter().enumerate() {
            let index = i as u16;
            ch.watch(&cfg.live, format!("data channel {i}"), cfg.link_limit)
                .map_err(|e| MigrationError::io("source", "setup", e))?;
            set.sockets.push(
                ch.try_clone()
                    .map_err(|e| MigrationError::io("source", "setup", e))?,
            );
            let mut r = Receiver::new(index, ch, cfg.clone());
            let shared = Arc::clone(&set.shared);
            let t = std::thread::Builder::new()
                .name(format!("ferry-recv-{i}"))
                .spawn(move || {
                    let res = r.run(&shared);
                    let mut st = shared.st.lock().unwrap();
                    if let Err(e) = res {
                        if st.error.is_none() && !st.abort {
                            st.error = Some(channel_error(index, e));
                            drop(st);
                            shared.wake.shutdown_read();
                        }
                    }
                    shared.cv.notify_all();
                })
                .map_err(|e| MigrationError::io("source", "setup", e))?;
            set.threads.push(t);
        }
        Ok(set)
    }

    /// The error a receiver hit, if any.
    pub fn error(&self) -> Option<MigrationError> {
        self.shared
            .st
            .lock()
            .unwrap()
            .error
            .as_ref()
            .map(MigrationError::duplicate)
    }

    /// The main channel read sync `seq`: waits until every channel has reached it, then
    /// lets them go on (or, for the last sync, checks that every channel is done).
    pub fn sync(
        &self,
        seq: u64,
        last: bool,
        cancelled: &dyn Fn() -> bool,
        live: &Liveness,
    ) -> Result<(), MigrationError> {
        let mut st = self.shared.st.lock().unwrap();
        if seq != st.released + 1 {
            return Err(MigrationError::Protocol(format!(
                "multifd sync {seq} on the main channel after sync {}",
                st.released
            )));
        }
        let since = Instant::now();
        loop {
            if let Some(e) = &st.error {
                return Err(e.duplicate());
            }
            if cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let all = st.reached.iter().all(|&r| r == seq);
            if all && (!last || st.finished.iter().all(|&f| f)) {
                break;
            }
            if let Some(i) = st.finished.iter().position(|&f| f) {
                if !last || st.reached[i] != seq {
                    return Err(MigrationError::Protocol(format!(
                        "data channel {i} ended at sync {} before sync {seq}",
                        st.reached[i]
                    )));
                }
            }
            // Channels still moving pages are alive however long they take; only a
            // source silent on every channel for the limit ends the wait.
            if live.silence() >= live.limit() {
                let slow: Vec<String> = st
                    .reached
                    .iter()
                    .enumerate()
                    .filter(|(_, &r)| r != seq)
                    .map(|(i, _)| i.to_string())
                    .collect();
                return Err(MigrationError::Silent {
                    peer: "source",
                    waiting_for: "multifd sync",
                    stalled: Box::new(Stalled {
                        channel: format!("the main channel (for data channel {})", slow.join(", ")),
                        waited: since.elapsed(),
                        silence: live.silence(),
                        limit: live.limit(),
                        by_kernel: false,
                    }),
                });
            }
            st = self.shared.cv.wait_timeout(st, POLL).unwrap().0;
        }
        st.released = seq;
        drop(st);
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Totals over all channels.
    pub fn totals(&self) -> (ChannelCounters, u64) {
        let st = self.shared.st.lock().unwrap();
        let mut t = ChannelCounters::default();
        for c in &st.counters {
            t.add(c);
        }
        (t, st.pages_written)
    }

    pub fn counters(&self) -> Vec<ChannelCounters> {
        self.shared.st.lock().unwrap().counters.clone()
    }

    /// Stops every receiver (closing the sockets) and waits for them.
    pub fn shutdown(&mut self) {
        self.shared.st.lock().unwrap().abort = true;
        self.shared.cv.notify_all();
        for s in &self.sockets {
            s.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RecvSet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One receiver thread's own state.
struct Receiver {
    index: u16,
    ch: Channel,
    cfg: RecvConfig,
    offsets: Vec<u8>,
    normal: Vec<u64>,
    zero: Vec<u64>,
    scratch: Vec<u64>,
    lander: Lander,
    packed: Vec<u8>,
    unpacked: Vec<u8>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    last_packet: u64,
    block_pages: Vec<u64>,
}

impl Receiver {
    fn new(index: u16, ch: Channel, cfg: RecvConfig) -> Self {
        let block_pages = (0..cfg.mem.block_count())
            .map(|b| cfg.mem.block_pages(b).unwrap_or(0) as u64)
            .collect();
        Self {
            index,
            ch,
            zstd: cfg
                .zstd
                .then(|| zstd::bulk::Decompressor::new().ok())
                .flatten(),
            lander: Lander::new(
                Arc::clone(&cfg.mem),
                Arc::clone(&cfg.written),
                cfg.digest.clone(),
            ),
            cfg,
            offsets: Vec::with_capacity(MAX_PACKET_PAGES * 8),
            normal: Vec::with_capacity(MAX_PACKET_PAGES),
            zero: Vec::with_capacity(MAX_PACKET_PAGES),
            scratch: Vec::with_capacity(MAX_PACKET_PAGES),
            packed: Vec::new(),
            unpacked: Vec::new(),
            last_packet: 0,
            block_pages,
        }
    }

    fn read(&mut self, buf: &mut [u8], phase: &'static str) -> Result<(), MigrationError> {
        std::io::Read::read_exact(&mut self.ch, buf)
            .map_err(|e| MigrationError::io("source", phase, e))
    }

    fn run(&mut self, shared: &RecvShared) -> Result<(), MigrationError> {
        if self.cfg.zstd && self.zstd.is_none() {
            return Err(MigrationError::Protocol(
                "cannot create a zstd decompressor".into(),
            ));
        }
        loop {
            let mut hb = [0u8; PacketHeader::LEN];
            self.read(&mut hb, "RAM transfer")?;
            let h = PacketHeader::decode(&hb, self.cfg.zstd)?;
            if h.packet <= self.last_packet {
                return Err(WireError::BadValue {
                    what: "packet number (not above the channel's previous one)",
                    value: h.packet,
                }
                .into());
            }
            self.last_packet = h.packet;
            if h.is_sync() {
                let last = h.flags & PacketHeader::LAST != 0;
                let mut st = shared.st.lock().unwrap();
                let i = self.index as usize;
                if h.sync != st.reached[i] + 1 {
                    return Err(MigrationError::Protocol(format!(
                        "sync {} after sync {}",
                        h.sync, st.reached[i]
                    )));
                }
                st.reached[i] = h.sync;
                st.counters[i].packets += 1;
                st.counters[i].bytes += PacketHeader::LEN as u64;
                if last {
                    st.finished[i] = true;
                    drop(st);
                    shared.cv.notify_all();
                    return Ok(());
                }
                shared.cv.notify_all();
                while st.released < h.sync {
                    if st.abort || st.error.is_some() {
                        return Ok(());
                    }
                    st = shared.cv.wait_timeout(st, POLL).unwrap().0;
                }
                continue;
            }
            if let Some((ch, d)) = self.cfg.delay {
                if ch == self.index {
                    std::thread::sleep(d);
                }
            }
            let c = self.apply(&h)?;
            let mut st = shared.st.lock().unwrap();
            st.counters[self.index as usize].add(&c.0);
            st.pages_written += c.1;
        }
    }

    /// Reads one page packet's offsets and data into guest memory.
    fn apply(&mut self, h: &PacketHeader) -> Result<(ChannelCounters, u64), MigrationError> {
        let block = h.block as usize;
        let Some(&block_pages) = self.block_pages.get(block) else {
            return Err(WireError::BadValue {
                what: "packet block index",
                value: h.block.into(),
            }
            .into());
        };
        let mut offsets = std::mem::take(&mut self.offsets);
        offsets.resize(h.offsets_len(), 0);
        self.read(&mut offsets, "RAM transfer")?;
        let r = h.decode_offsets(
            &offsets,
            block_pages,
            &mut self.normal,
            &mut self.zero,
            &mut self.scratch,
        );
        self.offsets = offsets;
        r?;
        if h.flags & PacketHeader::ZSTD != 0 {
            let raw = self.normal.len() * PAGE_SIZE;
            let mut packed = std::mem::take(&mut self.packed);
            packed.resize(h.data_len as usize, 0);
            let r = self.read(&mut packed, "RAM transfer");
            self.packed = packed;
            r?;
            self.unpacked.clear();
            self.unpacked.reserve(raw);
            let z = self.zstd.as_mut().expect("checked at start");
            let n = z
                .decompress_to_buffer(&self.packed, &mut self.unpacked)
                .map_err(|e| {
                    MigrationError::Protocol(format!("packet {}: bad zstd data: {e}", h.packet))
                })?;
            if n != raw {
                return Err(MigrationError::Protocol(format!(
                    "packet {}: zstd data holds {n} bytes for {} pages",
                    h.packet,
                    self.normal.len()
                )));
            }
            self.lander.store_data(block, &self.normal, &self.unpacked);
        } else {
            self.lander.read_data(&self.ch, block, &self.normal)?;
        }
        let pages_written = self.lander.settle(block, &self.normal, &self.zero);
        Ok((
            ChannelCounters {
                packets: 1,
                pages: (self.normal.len() + self.zero.len()) as u64,
                zero: self.zero.len() as u64,
                bytes: (PacketHeader::LEN + h.offsets_len() + h.data_len as usize) as u64,
                raw_bytes: (self.normal.len() * PAGE_SIZE) as u64,
            },
            pages_written,
        ))
    }
}
