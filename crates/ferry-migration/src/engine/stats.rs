//! What a user sees of a migration: status, counters, per-pass figures, downtime.
//!
//! Names follow QEMU's `query-migrate` where the meaning is the same, so management
//! software reads them without translation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::transport::Channel;

/// The life of one migration, as QEMU names its states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MigrationStatus {
    #[default]
    None,
    Setup,
    Active,
    /// The guest is stopped and the last of its state is moving.
    Device,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
}

impl MigrationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::Device => "device",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// Who may run the guest, as this side of the migration knows it. The handover is the
/// small state machine of the wire docs ("Who runs the guest"): the source owns the
/// guest until it commits by sending the end of stream; then only the destination's
/// answer moves it on.
///
/// ```text
///  source: Source ──(end of stream sent)──> Committed ──Completed──> Destination
///                                              │  └──LoadFailed──> Source (resumed)
///                                              └──silence, broken link──> InDoubt
///  destination: Source ──(state loaded, verified, resumed)──> Destination
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Handover {
    /// The source owns the guest: a cancel is honoured and the source resumes it.
    #[default]
    Source,
    /// The end of stream went out: the destination decides. Nothing the user does at
    /// the source resumes the guest until the destination's answer says it did not.
    Committed,
    /// The end of stream went out and no answer came: the destination may be running
    /// the guest. The source keeps it stopped until someone who checked the
    /// destination takes it back.
    InDoubt,
    /// The destination runs (or holds) the guest; the source never will again.
    Destination,
}

impl Handover {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Committed => "committed",
            Self::InDoubt => "in-doubt",
            Self::Destination => "destination",
        }
    }
}

/// Why a cancel was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CancelRefused {
    #[error(
        "the switchover is committed: the end of stream has gone to the destination, which \
         may already be running the guest, so this side cannot take it back; the migration \
         completes, or fails and resumes the guest here, on the destination's answer"
    )]
    Committed,
    #[error(
        "the guest was handed to the destination and no answer came back, so it may be \
         running there; nothing is left to cancel"
    )]
    InDoubt,
    #[error("the guest already runs at the destination; nothing is left to cancel")]
    Completed,
}

/// RAM counters, named as in QEMU's `query-migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes put on the wire for RAM, headers included.
    pub transferred: u64,
    /// Bytes of dirty pages still to send (as of the last harvest).
    pub remaining: u64,
    /// Size of guest RAM.
    pub total: u64,
    /// Zero pages, sent as a flag.
    pub duplicate: u64,
    /// Pages sent with their data.
    pub normal: u64,
    pub normal_bytes: u64,
    /// Passes over memory whose dirty log was harvested.
    pub dirty_sync_count: u64,
    /// Pages dirtied per second during the last pass.
    pub dirty_pages_rate: u64,
    /// Throughput of the last pass, megabits per second.
    pub mbps: f64,
    pub page_size: u64,
    /// Bytes on the data channels (headers and possibly compressed data), part of
    /// `transferred`; 0 when pages travel on the main channel.
    pub multifd_bytes: u64,
    /// Destination, with `migration.x-ferry-populate-ahead`: bytes of guest memory the
    /// source said were populated, and of those, the bytes faulted in ahead of the
    /// pages so far.
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub x_ferry_populate_announced: u64,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub x_ferry_populated_ahead: u64,
}

/// One pass over guest memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
#[serde(rename_all = "kebab-case")]
pub struct PassStats {
    pub pass: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub duration_ms: f64,
    pub throughput_bytes_per_sec: f64,
    /// Pages found dirty when the pass ended.
    pub dirty_after: u64,
    pub expected_downtime_ms: f64,
    /// True for the pass made with the guest stopped.
    pub final_pass: bool,
    /// The CPU throttle in force during the pass, percent (auto-converge).
    #[serde(skip_serializing_if = "is_zero_u8")]
    pub cpu_throttle_percent: u8,
    /// The dirty limit was in force during the pass.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dirty_limited: bool,
    /// Time the vCPUs were held back by a throttle during the pass, the most of any
    /// one vCPU, in microseconds.
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub throttle_us: u64,
}

fn is_zero_u8(v: &u8) -> bool {
    *v == 0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// Whether a migration is getting anywhere (see `engine::converge`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
#[serde(rename_all = "kebab-case")]
pub struct ConvergenceInfo {
    pub converging: bool,
    /// In words, with the figures, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// Seconds after which the timeout strategy decides.
    pub timeout: u64,
    /// Past the timeout, the source switched over at the downtime it cost
    /// (`x-ferry-timeout-strategy=switchover`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forced_switchover: bool,
    /// A throttle was wanted and the VMM could not carry it out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_error: Option<String>,
}

/// Where the downtime went.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
#[serde(rename_all = "kebab-case")]
pub struct DowntimeBreakdown {
    /// Stopping vCPUs and devices.
    pub stop_ms: f64,
    pub final_pass_ms: f64,
    pub devices_ms: f64,
    pub vcpus_ms: f64,
    /// Hashing all of memory (only with full verification).
    pub verify_ms: f64,
    /// From the end of stream to the destination's confirmation.
    pub switchover_ms: f64,
    /// The destination's own figure for loading state and resuming.
    pub destination_resume_ms: f64,
}

/// Everything `query-migrate` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    pub total_time: u64,
    pub setup_time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    pub expected_downtime: u64,
    pub ram: RamStats,
    pub passes: Vec<PassStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_breakdown: Option<DowntimeBreakdown>,
    /// How the destination checked memory: `digest`, `digest+full` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<String>,
    /// The migration's session id (hex), the same on both sides, for matching logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Data channels, when pages travel on them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd: Option<MultifdStats>,
    /// Who may run the guest (see [`Handover`]).
    pub handover: Handover,
    /// How each device's state moved (or moves), in the hello's order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceStats>,
    /// How the destination checked device and vCPU state: `digest` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_verified: Option<String>,
    /// Source: the CPU throttle auto-converge has set, percent (QEMU's
    /// `cpu-throttle-percentage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<u8>,
    /// Source, with dirty-limit: the most time a vCPU was held back in the last pass,
    /// in microseconds (QEMU's `dirty-limit-throttle-time-per-round`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_limit_throttle_time_per_round: Option<u64>,
    /// Source: whether the migration converges, and why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub convergence: Option<ConvergenceInfo>,
}

/// Why every device moves as stop-copy when `migration.switchover-ack` is off, as both
/// sides report it.
pub(crate) const STOP_COPY_ACK_OFF: &str =
    "migration.switchover-ack is off (the machine type or -global), so no device precopies";

/// How one device's state moves.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceStats {
    pub name: String,
    pub instance: u32,
    /// `precopy` (records while the guest runs, acknowledged by the destination before
    /// the switchover) or `stop-copy` (all of it at the switchover).
    pub mode: String,
    /// Why a device moves as stop-copy, when either host could have precopied it or
    /// the machine type rules precopy out ("the destination host cannot precopy it").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether this host can precopy the device.
    pub precopy_capable: bool,
    /// Bytes of precopy records sent (source) or loaded (destination), with the guest
    /// running, and after it stopped.
    pub precopy_bytes: u64,
    pub precopy_records: u64,
    pub final_precopy_bytes: u64,
    /// Bytes of the device's state frame at the switchover.
    pub stop_copy_bytes: u64,
    /// Milliseconds from the start of the migration to the destination's
    /// acknowledgement (source) or to sending it (destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_ms: Option<u64>,
    /// The source's estimate of what the device still has to send at the switchover.
    pub pending_stop_copy: u64,
}

impl DeviceStats {
    /// `accel1: precopy, acknowledged after 120 ms` or `accel1: stop-copy: the
    /// destination host cannot precopy it`, for summaries.
    pub fn describe(&self) -> String {
        let who = if self.instance == 0 {
            self.name.clone()
        } else {
            format!("{}{}", self.name, self.instance)
        };
        match (self.mode.as_str(), &self.reason) {
            ("precopy", _) => match self.acked_ms {
                Some(ms) => format!("{who}: precopy, acknowledged after {ms} ms"),
                None => format!("{who}: precopy, not acknowledged yet"),
            },
            (mode, Some(r)) => format!("{who}: {mode}: {r}"),
            (mode, None) => format!("{who}: {mode}"),
        }
    }
}

/// What the data channels did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
#[serde(rename_all = "kebab-case")]
pub struct MultifdStats {
    pub channels: u16,
    /// `none` or `zstd`.
    pub compression: String,
    /// Sync points passed (section syncs and the final one).
    pub syncs: u64,
    /// Per channel, in index order.
    pub per_channel: Vec<ChannelStats>,
    /// Page bytes before compression, and on the wire, over all channels.
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    /// Connections to the migration address that were turned away (destination).
    pub strays: Vec<String>,
}

/// One data channel's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
#[serde(rename_all = "kebab-case")]
pub struct ChannelStats {
    pub packets: u64,
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
}

/// Something worth telling a control client about.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MigrationEvent {
    Status(MigrationStatus),
    Pass(u32),
    /// Who may run the guest changed.
    Handover(Handover),
    /// Source: the migration stopped converging, or converges again (`why` says why
    /// not, with the figures).
    Convergence {
        converging: bool,
        why: Option<String>,
    },
}

/// The moments of the handover, from the final pass on, at which a
/// [`MigrationMonitor::set_probe`] hook is called: where fault tests cut in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandoverPoint {
    /// Source: the guest is stopped, the final pass is about to start.
    GuestStopped,
    /// Source: the final pass, with the data channels' last sync, has gone out.
    FinalPassSent,
    /// Source: the state of device `i` has gone out.
    DeviceStateSent(usize),
    /// Source: the state of vCPU `i` has gone out.
    VcpuStateSent(usize),
    /// Source: everything but the end of stream has gone out.
    BeforeEndOfStream,
    /// Source: the end of stream has gone out (committed).
    EndOfStreamSent,
    /// Source: the destination's answer arrived and was read.
    AnswerReceived,
    /// Destination: the end of stream arrived.
    EndOfStreamReceived,
    /// Destination: every state loaded and the digests matched; the guest is about to
    /// be resumed.
    Verified,
    /// Destination: the guest runs here; `Completed` is about to go out.
    Resumed,
    /// Destination: `Completed` has gone out.
    CompletedSent,
}

/// How long a cancelled migration may take to wind down on its own.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

type Listener = Box<dyn Fn(&MigrationEvent) + Send + Sync>;
type Probe = Arc<dyn Fn(HandoverPoint) + Send + Sync>;

/// Shared between the migration thread and whoever watches or cancels it.
#[derive(Default)]
pub struct MigrationMonitor {
    info: Mutex<MigrationInfo>,
    cancel: AtomicBool,
    /// Counts migrations watched, so a late cancel watchdog never touches a newer one.
    generation: AtomicU64,
    /// A downtime limit set while the migration runs (ms; 0 = the migration's own).
    downtime_limit_ms: AtomicU64,
    /// A bandwidth cap set while the migration runs (bytes/s + 1; 0 = the migration's
    /// own).
    max_bandwidth: AtomicU64,
    /// Parameters changed while the migration runs, taken at its next pass.
    live_params: Mutex<Option<super::MigrationParams>>,
    channels: Mutex<Vec<Channel>>,
    listener: Mutex<Option<Listener>>,
    /// Taken by a cancel and by the commit, so that exactly one of them wins.
    handover: Mutex<Handover>,
    probe: Mutex<Option<Probe>>,
    #[cfg(feature = "testing")]
    faults: Mutex<super::Faults>,
}

impl std::fmt::Debug for MigrationMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationMonitor")
            .field("info", &self.info)
            .field("cancel", &self.cancel)
            .finish_non_exhaustive()
    }
}

impl MigrationMonitor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `f` for every status change and every finished pass.
    pub fn set_listener(&self, f: impl Fn(&MigrationEvent) + Send + Sync + 'static) {
        *self.listener.lock().unwrap() = Some(Box::new(f));
    }

    pub fn info(&self) -> MigrationInfo {
        self.info.lock().unwrap().clone()
    }

    pub fn status(&self) -> MigrationStatus {
        self.info.lock().unwrap().status
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.info.lock().unwrap());
    }

    /// Resets for a new migration and reports it in `setup` at once, before the
    /// migration's thread runs: QEMU's `migrate` returns with the migration in setup,
    /// never `none`, and a status query right after it must agree.
    pub fn begin(&self) {
        self.reset();
        self.set_status(MigrationStatus::Setup);
    }

    /// Sets the status as if a migration had reached it: for tests of what a control
    /// layer shows in each state. Test builds only; the engine alone moves the status.
    #[cfg(feature = "testing")]
    pub fn force_status(&self, s: MigrationStatus) {
        self.set_status(s);
    }

    pub(crate) fn set_status(&self, s: MigrationStatus) {
        {
            let mut i = self.info.lock().unwrap();
            if i.status == s {
                return;
            }
            i.status = s;
        }
        self.emit(&MigrationEvent::Status(s));
    }

    pub(crate) fn emit(&self, e: &MigrationEvent) {
        if let Some(l) = self.listener.lock().unwrap().as_ref() {
            l(e);
        }
    }

    /// Resets for a new migration, keeping the listener and the probe.
    pub fn reset(&self) {
        *self.info.lock().unwrap() = MigrationInfo::default();
        *self.handover.lock().unwrap() = Handover::Source;
        self.cancel.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.downtime_limit_ms.store(0, Ordering::SeqCst);
        self.max_bandwidth.store(0, Ordering::SeqCst);
        *self.live_params.lock().unwrap() = None;
        self.channels.lock().unwrap().clear();
    }

    /// Asks the migration to stop. The migration thread notices within one batch and
    /// tells the peer why; if it is stuck on a socket that does not move, the socket is
    /// shut after [`CANCEL_GRACE`] to wake it.
    ///
    /// A cancel taken here is always honoured: the source will not commit to the
    /// switchover after it, and the guest stays (or runs again) at the source. Once the
    /// source has committed, the cancel is refused and says why; the destination's
    /// answer ends the migration.
    pub fn cancel(self: &Arc<Self>) -> Result<(), CancelRefused> {
        {
            let h = self.handover.lock().unwrap();
            match *h {
                Handover::Source => {}
                Handover::Committed => return Err(CancelRefused::Committed),
                Handover::InDoubt => return Err(CancelRefused::InDoubt),
                Handover::Destination => return Err(CancelRefused::Completed),
            }
            self.cancel.store(true, Ordering::SeqCst);
        }
        let changed = {
            let mut i = self.info.lock().unwrap();
            let running = matches!(
                i.status,
                MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Device
            );
            if running {
                i.status = MigrationStatus::Cancelling;
            }
            running
        };
        if changed {
            self.emit(&MigrationEvent::Status(MigrationStatus::Cancelling));
        }
        self.arm_cancel_watchdog();
        Ok(())
    }

    /// A deliberately broken cancel, as release 0.1.0 had it: taken at any moment,
    /// even after the source committed, so that the source then resumes a guest the
    /// destination may already run. Only for tests that show the handover tests catch
    /// that defect; nothing else may call it.
    #[doc(hidden)]
    pub fn cancel_ignoring_handover(self: &Arc<Self>) {
        self.cancel.store(true, Ordering::SeqCst);
        *self.handover.lock().unwrap() = Handover::Source;
        self.arm_cancel_watchdog();
    }

    fn arm_cancel_watchdog(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let generation = self.generation.load(Ordering::SeqCst);
        let _ = std::thread::Builder::new()
            .name("ferry-cancel".into())
            .spawn(move || {
                std::thread::sleep(CANCEL_GRACE);
                if let Some(m) = me.upgrade() {
                    let chs = m.channels.lock().unwrap();
                    if m.generation.load(Ordering::SeqCst) == generation {
                        for ch in chs.iter() {
                            ch.shutdown();
                        }
                    }
                }
            });
    }

    /// Changes the downtime limit of the running migration (QEMU applies
    /// `migrate-set-parameters` to a migration in flight too).
    pub fn set_downtime_limit(&self, limit: Duration) {
        self.downtime_limit_ms
            .store((limit.as_millis() as u64).max(1), Ordering::SeqCst);
    }

    /// Changes the bandwidth cap of the running migration at once (bytes per second,
    /// 0 for none).
    pub fn set_max_bandwidth(&self, bytes_per_sec: u64) {
        self.max_bandwidth
            .store(bytes_per_sec.saturating_add(1), Ordering::SeqCst);
    }

    /// The bandwidth cap set while running, if any.
    pub fn max_bandwidth(&self) -> Option<u64> {
        match self.max_bandwidth.load(Ordering::SeqCst) {
            0 => None,
            v => Some(v - 1),
        }
    }

    /// Hands the running migration new parameters; it takes those that may change in
    /// flight (the convergence ones) at its next pass.
    pub fn set_live_params(&self, p: super::MigrationParams) {
        *self.live_params.lock().unwrap() = Some(p);
    }

    pub(crate) fn live_params(&self) -> Option<super::MigrationParams> {
        self.live_params.lock().unwrap().clone()
    }

    /// The downtime limit set while running, if any.
    pub fn downtime_limit(&self) -> Option<Duration> {
        match self.downtime_limit_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Who may run the guest.
    pub fn handover(&self) -> Handover {
        *self.handover.lock().unwrap()
    }

    /// Takes the guest from `Source` to `Committed` unless a cancel came first: the
    /// one place where a cancel and the switchover are decided against each other.
    pub(crate) fn commit(&self) -> Result<(), super::MigrationError> {
        {
            let mut h = self.handover.lock().unwrap();
            if self.is_cancelled() {
                return Err(super::MigrationError::Cancelled);
            }
            *h = Handover::Committed;
        }
        self.publish_handover(Handover::Committed);
        Ok(())
    }

    pub(crate) fn set_handover(&self, to: Handover) {
        {
            let mut h = self.handover.lock().unwrap();
            if *h == to {
                return;
            }
            *h = to;
        }
        self.publish_handover(to);
    }

    fn publish_handover(&self, to: Handover) {
        self.update(|i| i.handover = to);
        self.emit(&MigrationEvent::Handover(to));
    }

    /// Calls `f` at every [`HandoverPoint`] the migration passes, on the migration's
    /// thread, before it goes on: a seam for fault tests (cancel, kill, cut a link at
    /// an exact point). Costs one lock per point when unset.
    pub fn set_probe(&self, f: impl Fn(HandoverPoint) + Send + Sync + 'static) {
        *self.probe.lock().unwrap() = Some(Arc::new(f));
    }

    /// Breaks the next migrations watched by this monitor on purpose (kept across
    /// [`reset`](Self::reset)). Test builds only.
    #[cfg(feature = "testing")]
    pub fn set_faults(&self, f: super::Faults) {
        *self.faults.lock().unwrap() = f;
    }

    /// The faults in force: [`Faults::NONE`](super::Faults::NONE) outside tests.
    #[inline]
    pub(crate) fn faults(&self) -> super::Faults {
        #[cfg(feature = "testing")]
        return *self.faults.lock().unwrap();
        #[cfg(not(feature = "testing"))]
        super::Faults::NONE
    }

    pub(crate) fn probe(&self, at: HandoverPoint) {
        let p = self.probe.lock().unwrap().clone();
        if let Some(p) = p {
            p(at);
        }
    }

    /// Shuts every socket of the migration at once, as a dead link or a killed peer
    /// would leave them: the migration thread then fails on its next read or write.
    pub fn sever(&self) {
        for ch in self.channels.lock().unwrap().iter() {
            ch.shutdown();
        }
    }

    /// Registers a socket of the migration, to be shut if a cancel gets stuck.
    pub(crate) fn attach_channel(&self, ch: Channel) {
        self.channels.lock().unwrap().push(ch);
    }

    pub(crate) fn detach_channel(&self) {
        self.channels.lock().unwrap().clear();
    }
}
