//! Deliberate faults, for tests that prove what the engine's safety rules prevent.
//!
//! They are not migration parameters: nothing a user configures can reach them. Tests
//! set them on the [`MigrationMonitor`](super::MigrationMonitor) of a migration with
//! `set_faults`, which exists only with the crate's `testing` feature. Without it the
//! engine reads [`Faults::NONE`], a constant, so every check of a fault folds away.

use std::time::Duration;

/// Test-only fault injection. Each switch breaks one thing on purpose, so that a test
/// can show the check guarding it fails when it is broken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Source: send no section syncs (the final flush still happens, or the destination
    /// could not know the pages are complete). Lets an old copy of a page that travels
    /// on a slow channel land after a newer copy: the hazard the sync rule exists for.
    pub no_sync: bool,
    /// Source: sync after every section whatever `multifd-flush-after-each-section`
    /// says, breaking the once-per-pass rule the hello stated.
    pub sync_every_section: bool,
    /// Destination: hold each packet of this data channel for this long before applying
    /// it, as a congested link would.
    pub delay_channel: Option<(u16, Duration)>,
    /// Source: do not open this data channel at all.
    pub skip_channel: Option<u16>,
    /// Source: close this data channel after sending this many packets on it.
    pub close_channel_after: Option<(u16, u64)>,
    /// Destination: how long to wait for the data channels to connect (default 10 s).
    pub channel_wait: Option<Duration>,
    /// Source: hand over as release 0.1.0 did: state no switchover commitment in the
    /// hello and never commit, so a cancel after the end of stream is taken and the
    /// guest resumed here. For tests of a new destination against such a source.
    pub legacy_handover: bool,
    /// Source: flip the top bit of the first field of every vCPU's state after it went
    /// into the state digest, as a link or a buffer that corrupts a byte would. The
    /// state still decodes (for the soft vCPU it is the pass counter), so only the
    /// state digest can tell.
    pub damage_vcpu_state: bool,
    /// Destination: hold every switchover acknowledgement this long (`Duration::MAX`:
    /// never send one), as a device slow to load its precopy data would.
    pub delay_ack: Option<Duration>,
    /// Source: how long to wait for an acknowledgement (30 s otherwise).
    pub ack_timeout: Option<Duration>,
    /// Source: switch over once the rest fits the downtime limit, acknowledged or not:
    /// the rule switchover-ack exists for, broken.
    pub switch_without_ack: bool,
    /// Destination: send the first keepalive (so the source takes it for a peer that
    /// sends them) and no more: the rule keepalives exist for, broken.
    pub mute_keepalive: bool,
    /// Destination: hold the answer to the end of stream this long, as a slow load or
    /// verification would: a quiet stretch for keepalives to bridge.
    pub delay_completion: Option<Duration>,
    /// Source: state no keepalives in the hello, as releases before 0.3 did.
    pub no_keepalive: bool,
}

impl Faults {
    /// No fault: what every migration outside tests runs with.
    pub const NONE: Self = Self {
        no_sync: false,
        sync_every_section: false,
        delay_channel: None,
        skip_channel: None,
        close_channel_after: None,
        channel_wait: None,
        legacy_handover: false,
        damage_vcpu_state: false,
        delay_ack: None,
        ack_timeout: None,
        switch_without_ack: false,
        mute_keepalive: false,
        delay_completion: None,
        no_keepalive: false,
    };

    /// Applies `damage_vcpu_state` to a vCPU-state frame's payload.
    pub(crate) fn damage_state(&self, payload: &mut [u8]) {
        let at = crate::wire::VcpuStateHeader::LEN + 7;
        if self.damage_vcpu_state && payload.len() > at {
            payload[at] ^= 0x80;
        }
    }
}
