//! What a user sees of a migration: status, counters, per-pass figures, downtime.
//!
//! Names follow QEMU's `query-migrate` where the meaning is the same, so management
//! software reads them without translation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::transport::Channel;

/// The life of one migration, as QEMU names its states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
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
pub enum MigrationEvent {
    Status(MigrationStatus),
    Pass(u32),
}

/// How long a cancelled migration may take to wind down on its own.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

type Listener = Box<dyn Fn(&MigrationEvent) + Send + Sync>;

/// Shared between the migration thread and whoever watches or cancels it.
#[derive(Default)]
pub struct MigrationMonitor {
    info: Mutex<MigrationInfo>,
    cancel: AtomicBool,
    /// Counts migrations watched, so a late cancel watchdog never touches a newer one.
    generation: AtomicU64,
    /// A downtime limit set while the migration runs (ms; 0 = the migration's own).
    downtime_limit_ms: AtomicU64,
    channels: Mutex<Vec<Channel>>,
    listener: Mutex<Option<Listener>>,
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

    pub fn set_status(&self, s: MigrationStatus) {
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

    /// Resets for a new migration, keeping the listener.
    pub fn reset(&self) {
        *self.info.lock().unwrap() = MigrationInfo::default();
        self.cancel.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.downtime_limit_ms.store(0, Ordering::SeqCst);
        self.channels.lock().unwrap().clear();
    }

    /// Asks the migration to stop. The migration thread notices within one batch and
    /// tells the peer why; if it is stuck on a socket that does not move, the socket is
    /// shut after [`CANCEL_GRACE`] to wake it.
    pub fn cancel(self: &Arc<Self>) {
        self.cancel.store(true, Ordering::SeqCst);
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

    /// Registers a socket of the migration, to be shut if a cancel gets stuck.
    pub(crate) fn attach_channel(&self, ch: Channel) {
        self.channels.lock().unwrap().push(ch);
    }

    pub(crate) fn detach_channel(&self) {
        self.channels.lock().unwrap().clear();
    }
}
