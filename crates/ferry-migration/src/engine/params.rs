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
    /// Destination: how long a new connection has to send its header and hello.
    pub handshake_timeout: Duration,
    /// How long either side lets its peer be silent before it fails the migration.
    pub liveness_timeout: Duration,
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
            handshake_timeout: Duration::from_secs(5),
            liveness_timeout: Duration::from_secs(5),
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
            handshake_timeout: Duration::from_millis(cfg.u64(MIGRATION, "handshake-timeout")?),
            liveness_timeout: Duration::from_millis(cfg.u64(MIGRATION, "liveness-timeout")?),
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
