//! The `migration` pseudo-device: the migration's own properties.
//!
//! As in QEMU, migration is configured like a device so that machine types can carry
//! compat entries for it and users can override it with `-global migration.prop=value`.
//! Properties marked `wire` change what travels on the stream: both sides must hold the
//! same value, and the hello carries them so the destination can check before any RAM
//! moves.

use std::time::Duration;

use crate::compat::{CompatError, Config, DriverDef, PropDef, PropKind};
use crate::wire::{Compression, MAX_CHANNELS};

/// Driver name of the migration pseudo-device.
pub const MIGRATION: &str = "migration";

/// The migration pseudo-device's properties, with the newest release's defaults.
pub static MIGRATION_DRIVER: DriverDef = DriverDef {
    name: MIGRATION,
    doc: "the migration itself, configured like a device",
    props: &[
        PropDef {
            name: "downtime-limit",
            kind: PropKind::U64 {
                min: 1,
                max: 600_000,
            },
            default: "300",
            wire: false,
            doc: "longest pause of the guest the source aims for at switchover, in milliseconds",
        },
        PropDef {
            name: "max-bandwidth",
            kind: PropKind::Size {
                min: 0,
                max: u64::MAX,
            },
            default: "0",
            wire: false,
            doc: "cap on the bytes per second the source sends; 0 means no cap",
        },
        PropDef {
            name: "digest",
            kind: PropKind::Bool,
            default: "on",
            wire: true,
            doc: "carry an incremental digest of guest memory that the destination checks before it resumes",
        },
        PropDef {
            name: "verify-full",
            kind: PropKind::Bool,
            default: "off",
            wire: false,
            doc: "also hash all of guest memory on both sides at switchover (costs downtime in proportion to RAM)",
        },
        PropDef {
            name: "multifd-channels",
            kind: PropKind::U64 {
                min: 0,
                max: MAX_CHANNELS as u64,
            },
            default: "2",
            wire: false,
            doc: "data channels that carry guest pages besides the main channel; 0 sends pages on the main channel (the hello tells the destination, which follows)",
        },
        PropDef {
            name: "multifd-compression",
            kind: PropKind::Enum(&["none", "zstd"]),
            default: "none",
            wire: false,
            doc: "compression of page data on the data channels (the hello tells the destination, which refuses a method it lacks)",
        },
        PropDef {
            name: "multifd-flush-after-each-section",
            kind: PropKind::Bool,
            default: "off",
            wire: true,
            doc: "sync the data channels after every section of sending (about 100 ms), as release 0.1 did, instead of once per pass over memory; QEMU's property of the same name",
        },
        PropDef {
            name: "switchover-ack",
            kind: PropKind::Bool,
            default: "on",
            wire: true,
            doc: "move the state of devices both hosts can precopy while the guest runs, and switch over only once the destination has acknowledged each of them; QEMU's capability of the same name, negotiated per device",
        },
        PropDef {
            name: "state-digest",
            kind: PropKind::Bool,
            default: "on",
            wire: true,
            doc: "carry a digest of every device and vCPU state as sent, which the destination checks before it resumes",
        },
        PropDef {
            name: "x-ferry-populate-ahead",
            kind: PropKind::Bool,
            default: "on",
            wire: true,
            doc: "the source says where guest memory is populated before the first pass, and the destination faults that memory in on a thread of its own ahead of the pages rather than page by page as they land; the destination's memory then matches the source's, zero pages included",
        },
        PropDef {
            name: "handshake-timeout",
            kind: PropKind::U64 {
                min: 100,
                max: 600_000,
            },
            default: "5000",
            wire: false,
            doc: "destination: milliseconds a new connection has to send its header and, for a migration stream, its whole hello; one that has not is closed, and holds nothing a real source needs meanwhile",
        },
        PropDef {
            name: "liveness-timeout",
            kind: PropKind::U64 {
                min: 500,
                max: 600_000,
            },
            default: "5000",
            wire: false,
            doc: "milliseconds of silence on every channel after which either side takes its peer or the link for dead and fails the migration (the source keeps its guest); keepalives keep an idle but healthy link alive, and a peer without them (0.1.0, 0.2.0) is allowed 120 s",
        },
        PropDef {
            name: "auto-converge",
            kind: PropKind::Bool,
            default: "off",
            wire: false,
            doc: "QEMU's auto-converge capability: when the guest dirties memory faster than the source sends it, throttle every vCPU (cpu-throttle-*), more each time it stays so",
        },
        PropDef {
            name: "cpu-throttle-initial",
            kind: PropKind::U64 { min: 1, max: 99 },
            default: "20",
            wire: false,
            doc: "auto-converge: the share of each 10 ms a vCPU sleeps at the first throttle, percent",
        },
        PropDef {
            name: "cpu-throttle-increment",
            kind: PropKind::U64 { min: 1, max: 99 },
            default: "10",
            wire: false,
            doc: "auto-converge: how much more, percent, each later throttle step takes",
        },
        PropDef {
            name: "cpu-throttle-tailslow",
            kind: PropKind::Bool,
            default: "off",
            wire: false,
            doc: "auto-converge: step by as much of the increment as the dirty rate's overshoot calls for, not by all of it",
        },
        PropDef {
            name: "max-cpu-throttle",
            kind: PropKind::U64 { min: 1, max: 99 },
            default: "99",
            wire: false,
            doc: "auto-converge: the most a vCPU is throttled, percent",
        },
        PropDef {
            name: "throttle-trigger-threshold",
            kind: PropKind::U64 { min: 1, max: 100 },
            default: "50",
            wire: false,
            doc: "a pass in which the guest dirtied more than this percent of what the pass sent counts toward a throttle step (two such passes make one)",
        },
        PropDef {
            name: "dirty-limit",
            kind: PropKind::Bool,
            default: "off",
            wire: false,
            doc: "QEMU 8.1's dirty-limit capability: when the guest dirties memory faster than the source sends it, slow only the vCPUs that dirty more than vcpu-dirty-limit (conflicts with auto-converge)",
        },
        PropDef {
            name: "vcpu-dirty-limit",
            kind: PropKind::U64 { min: 1, max: 1_000_000 },
            default: "1",
            wire: false,
            doc: "dirty-limit: the most a vCPU may dirty, MB/s",
        },
        PropDef {
            name: "x-vcpu-dirty-limit-period",
            kind: PropKind::U64 { min: 1, max: 1000 },
            default: "1000",
            wire: false,
            doc: "dirty-limit: the period over which a vCPU's dirty rate is measured, ms",
        },
        PropDef {
            name: "x-ferry-timeout",
            kind: PropKind::U64 { min: 0, max: 31_536_000 },
            default: "0",
            wire: false,
            doc: "seconds a migration may run before x-ferry-timeout-strategy decides; 0: x-ferry-timeout-per-gib of RAM, at least 300 s",
        },
        PropDef {
            name: "x-ferry-timeout-per-gib",
            kind: PropKind::U64 { min: 1, max: 86_400 },
            default: "150",
            wire: false,
            doc: "with x-ferry-timeout 0: seconds of timeout per GiB of guest RAM (KubeVirt's completionTimeoutPerGiB)",
        },
        PropDef {
            name: "x-ferry-timeout-strategy",
            kind: PropKind::Enum(&["cancel", "switchover"]),
            default: "cancel",
            wire: false,
            doc: "past the timeout, a migration that does not fit the downtime limit is cancelled (the guest runs on here), or switched over if its downtime is at most x-ferry-switchover-ceiling",
        },
        PropDef {
            name: "x-ferry-switchover-ceiling",
            kind: PropKind::U64 { min: 1, max: 600_000 },
            default: "2000",
            wire: false,
            doc: "with x-ferry-timeout-strategy=switchover: the longest downtime accepted past the timeout, ms",
        },
        PropDef {
            name: "multifd-zstd-level",
            kind: PropKind::U64 { min: 1, max: 19 },
            default: "1",
            wire: false,
            doc: "zstd level when multifd-compression=zstd; higher packs tighter and costs the source more CPU",
        },
    ],
};

/// The migration's parameters, read from a VM's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationParams {
    pub downtime_limit: Duration,
    /// Bytes per second; 0 means no cap.
    pub max_bandwidth: u64,
    pub digest: bool,
    pub verify_full: bool,
    /// Data channels; 0 puts pages on the main channel.
    pub multifd_channels: u16,
    pub multifd_compression: Compression,
    pub multifd_zstd_level: i32,
    /// Sync the data channels after every section (0.1's rule) rather than once per
    /// pass over memory. A wire property: the hello carries it.
    pub multifd_flush_after_each_section: bool,
    /// Precopy the devices both hosts can precopy, and switch over only once the
    /// destination has acknowledged each one. A wire property.
    pub switchover_ack: bool,
    /// A digest of every device and vCPU state, checked before the guest resumes. A
    /// wire property.
    pub state_digest: bool,
    /// The source sends where memory is populated before pass 0, and the destination
    /// faults it in ahead of the pages. A wire property.
    pub populate_ahead: bool,
    /// Destination: how long a new connection has to send its header and hello.
    pub handshake_timeout: Duration,
    /// How long either side lets its peer be silent before it fails the migration.
    pub liveness_timeout: Duration,
    /// Throttle every vCPU when the guest dirties faster than the link (QEMU's
    /// auto-converge), with the `cpu_throttle_*` steps.
    pub auto_converge: bool,
    pub cpu_throttle_initial: u8,
    pub cpu_throttle_increment: u8,
    pub cpu_throttle_tailslow: bool,
    pub max_cpu_throttle: u8,
    /// Percent of a pass's bytes the guest must dirty for the pass to count toward a
    /// throttle step.
    pub throttle_trigger_threshold: u8,
    /// Slow only the vCPUs that dirty more than `vcpu_dirty_limit_mbps` (QEMU's
    /// dirty-limit).
    pub dirty_limit: bool,
    pub vcpu_dirty_limit_mbps: u64,
    pub vcpu_dirty_limit_period: Duration,
    /// The migration's timeout; `None`: `timeout_per_gib` of RAM, at least 300 s.
    pub timeout: Option<Duration>,
    pub timeout_per_gib: Duration,
    pub timeout_strategy: TimeoutStrategy,
    /// With [`TimeoutStrategy::Switchover`]: the longest downtime accepted.
    pub switchover_ceiling: Duration,
}

/// What happens to a migration still running at its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutStrategy {
    /// It fails; the guest runs on at the source.
    Cancel,
    /// It switches over if the downtime fits the ceiling, and fails otherwise.
    Switchover,
}

impl Default for MigrationParams {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: 0,
            digest: true,
            verify_full: false,
            multifd_channels: 2,
            multifd_compression: Compression::None,
            multifd_zstd_level: 1,
            multifd_flush_after_each_section: false,
            switchover_ack: true,
            state_digest: true,
            populate_ahead: true,
            handshake_timeout: Duration::from_secs(5),
            liveness_timeout: Duration::from_secs(5),
            auto_converge: false,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            cpu_throttle_tailslow: false,
            max_cpu_throttle: 99,
            throttle_trigger_threshold: 50,
            dirty_limit: false,
            vcpu_dirty_limit_mbps: 1,
            vcpu_dirty_limit_period: Duration::from_millis(1000),
            timeout: None,
            timeout_per_gib: Duration::from_secs(150),
            timeout_strategy: TimeoutStrategy::Cancel,
            switchover_ceiling: Duration::from_secs(2),
        }
    }
}

impl MigrationParams {
    pub fn from_config(cfg: &Config) -> Result<Self, CompatError> {
        Ok(Self {
            downtime_limit: Duration::from_millis(cfg.u64(MIGRATION, "downtime-limit")?),
            max_bandwidth: cfg.u64(MIGRATION, "max-bandwidth")?,
            digest: cfg.bool(MIGRATION, "digest")?,
            verify_full: cfg.bool(MIGRATION, "verify-full")?,
            multifd_channels: cfg.u64(MIGRATION, "multifd-channels")? as u16,
            multifd_compression: match cfg.enum_str(MIGRATION, "multifd-compression")? {
                "zstd" => Compression::Zstd,
                _ => Compression::None,
            },
            multifd_zstd_level: cfg.u64(MIGRATION, "multifd-zstd-level")? as i32,
            multifd_flush_after_each_section: cfg
                .bool(MIGRATION, "multifd-flush-after-each-section")?,
            switchover_ack: cfg.bool(MIGRATION, "switchover-ack")?,
            state_digest: cfg.bool(MIGRATION, "state-digest")?,
            populate_ahead: cfg.bool(MIGRATION, "x-ferry-populate-ahead")?,
            handshake_timeout: Duration::from_millis(cfg.u64(MIGRATION, "handshake-timeout")?),
            liveness_timeout: Duration::from_millis(cfg.u64(MIGRATION, "liveness-timeout")?),
            auto_converge: cfg.bool(MIGRATION, "auto-converge")?,
            cpu_throttle_initial: cfg.u64(MIGRATION, "cpu-throttle-initial")? as u8,
            cpu_throttle_increment: cfg.u64(MIGRATION, "cpu-throttle-increment")? as u8,
            cpu_throttle_tailslow: cfg.bool(MIGRATION, "cpu-throttle-tailslow")?,
            max_cpu_throttle: cfg.u64(MIGRATION, "max-cpu-throttle")? as u8,
            throttle_trigger_threshold: cfg.u64(MIGRATION, "throttle-trigger-threshold")? as u8,
            dirty_limit: cfg.bool(MIGRATION, "dirty-limit")?,
            vcpu_dirty_limit_mbps: cfg.u64(MIGRATION, "vcpu-dirty-limit")?,
            vcpu_dirty_limit_period: Duration::from_millis(
                cfg.u64(MIGRATION, "x-vcpu-dirty-limit-period")?,
            ),
            timeout: match cfg.u64(MIGRATION, "x-ferry-timeout")? {
                0 => None,
                s => Some(Duration::from_secs(s)),
            },
            timeout_per_gib: Duration::from_secs(cfg.u64(MIGRATION, "x-ferry-timeout-per-gib")?),
            timeout_strategy: match cfg.enum_str(MIGRATION, "x-ferry-timeout-strategy")? {
                "switchover" => TimeoutStrategy::Switchover,
                _ => TimeoutStrategy::Cancel,
            },
            switchover_ceiling: Duration::from_millis(
                cfg.u64(MIGRATION, "x-ferry-switchover-ceiling")?,
            ),
        })
    }

    /// The timeout of a migration of `ram_bytes` of guest memory.
    pub fn timeout_for(&self, ram_bytes: u64) -> Duration {
        self.timeout.unwrap_or_else(|| {
            let gib = ram_bytes as f64 / (1u64 << 30) as f64;
            self.timeout_per_gib
                .mul_f64(gib)
                .max(Duration::from_secs(300))
        })
    }

    /// Why these parameters cannot run together.
    pub fn conflict(&self) -> Option<String> {
        (self.auto_converge && self.dirty_limit).then(|| {
            "dirty-limit and auto-converge cannot both be on: each throttles the guest its \
             own way; turn one of them off"
                .to_string()
        })
    }

    /// `("migration.property", value)` of every parameter that changes the wire, as the
    /// hello states them. The engine puts these into the hello itself (and compares them
    /// on the destination), over whatever an identity's list says for the same property,
    /// so the hello always states what this migration will do: a parameter changed after
    /// the VM was configured (QMP's `digest`) cannot leave a stale value in it.
    pub fn wire_properties(&self) -> Vec<(String, String)> {
        let on = |b: bool| if b { "on" } else { "off" }.to_string();
        vec![
            (format!("{MIGRATION}.digest"), on(self.digest)),
            (
                format!("{MIGRATION}.multifd-flush-after-each-section"),
                on(self.multifd_flush_after_each_section),
            ),
            (
                format!("{MIGRATION}.switchover-ack"),
                on(self.switchover_ack),
            ),
            (format!("{MIGRATION}.state-digest"), on(self.state_digest)),
            (
                format!("{MIGRATION}.x-ferry-populate-ahead"),
                on(self.populate_ahead),
            ),
        ]
    }

    /// `wire` with [`Self::wire_properties`] in place of its entries for the same
    /// properties, sorted.
    pub fn stated_wire_properties(&self, wire: &[(String, String)]) -> Vec<(String, String)> {
        let mine = self.wire_properties();
        let mut out: Vec<(String, String)> = wire
            .iter()
            .filter(|(k, _)| !mine.iter().any(|(m, _)| m == k))
            .cloned()
            .collect();
        out.extend(mine);
        out.sort();
        out
    }
}

/// `1536` → `1.5 KiB`: sizes as people read them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_reads_naturally() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(4 << 30), "4.0 GiB");
    }
}
