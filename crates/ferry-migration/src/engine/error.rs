//! Why a migration did not complete.

use std::io;

use thiserror::Error;

use super::liveness::Stalled;
use super::vm::VmError;
use crate::state::StateError;
use crate::wire::{RefuseCause, WireError};

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MigrationError {
    #[error("cannot connect to {uri}")]
    Connect {
        uri: String,
        #[source]
        source: io::Error,
    },
    #[error("{peer} closed the connection during {phase}")]
    PeerClosed {
        peer: &'static str,
        phase: &'static str,
    },
    #[error("I/O error during {phase}")]
    Io {
        phase: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no answer from the {peer}{} while waiting for {waiting_for}", for_secs(*secs))]
    Timeout {
        peer: &'static str,
        waiting_for: &'static str,
        secs: u64,
    },
    /// Nothing came from the peer on any channel for `migration.liveness-timeout`.
    #[error("the {peer} went silent while waiting for {waiting_for}: {stalled}")]
    Silent {
        peer: &'static str,
        waiting_for: &'static str,
        stalled: Box<Stalled>,
    },
    /// The kernel gave up on a TCP connection: the peer's host acknowledged nothing,
    /// not even keepalive probes, for the connection's `TCP_USER_TIMEOUT`.
    #[error("the link to the {peer} is down: its host acknowledged nothing for the connection's timeout (TCP_USER_TIMEOUT, twice migration.liveness-timeout) while waiting for {waiting_for}")]
    LinkDown {
        peer: &'static str,
        waiting_for: &'static str,
    },
    #[error("destination refused the migration ({cause}): {reason}")]
    Refused { cause: RefuseCause, reason: String },
    /// Destination side: the source's hello asks for something this side cannot do.
    #[error("refused the incoming migration ({cause}): {reason}")]
    Incompatible { cause: RefuseCause, reason: String },
    #[error("destination failed to load the migration: {0}")]
    LoadFailed(String),
    #[error("source aborted the migration: {0}")]
    SourceAborted(String),
    #[error("malformed migration stream")]
    Wire(#[from] WireError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("memory verification failed: {0}")]
    Verify(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("migration cancelled")]
    Cancelled,
    /// Source: the migration did not converge in time (see `engine::converge`).
    #[error("{0}")]
    NotConverging(String),
    #[error("invalid migration parameters: {0}")]
    InvalidParams(String),
    /// Something went wrong on one data channel.
    #[error("data channel {index}")]
    Channel {
        index: u16,
        #[source]
        source: Box<MigrationError>,
    },
    #[error("data channel {missing} of {count} did not connect within {secs} s")]
    ChannelsMissing {
        missing: String,
        count: u16,
        secs: f64,
    },
    #[error("a migration is already running")]
    Busy,
    /// Source: a device's initial precopy data went out and the destination did not
    /// acknowledge it in time.
    #[error("the destination did not acknowledge device {device} within {secs} s of the end of its initial precopy data")]
    NoAck { device: String, secs: u64 },
    /// Destination: the stream carries state the hello did not announce.
    #[error("state for {what}, which the hello did not announce")]
    UnannouncedState { what: String },
    /// Destination: one device's or vCPU's state came twice.
    #[error("state for {what} sent twice")]
    StateTwice { what: String },
    /// Destination: the stream ended without one device's or vCPU's state.
    #[error("the stream ended without state for {what}")]
    StateMissing { what: String },
    /// Destination: a RAM batch named a page twice.
    #[error("a RAM batch of block {block} names page {page} twice")]
    PageTwice { block: u32, page: u64 },
    /// Source: the end of stream went out and the destination's answer did not come
    /// back. The destination may be running the guest, so the source keeps it stopped.
    #[error(
        "the guest was handed to the destination (the end of stream went out) and no answer \
         came back, so the destination may be running it; the guest stays stopped here: check \
         the destination, and take the guest back here only if it does not run it"
    )]
    HandoverInDoubt {
        #[source]
        source: Box<MigrationError>,
    },
}

/// " for N s", or nothing when the wait was a socket's own timeout.
fn for_secs(secs: u64) -> String {
    if secs == 0 {
        String::new()
    } else {
        format!(" for {secs} s")
    }
}

impl MigrationError {
    /// Maps an I/O error on the migration socket: a closed peer reads better than an errno.
    pub(crate) fn io(peer: &'static str, phase: &'static str, e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected => Self::PeerClosed { peer, phase },
            io::ErrorKind::TimedOut => {
                match e.get_ref().and_then(|i| i.downcast_ref::<Stalled>()) {
                    Some(s) => Self::Silent {
                        peer,
                        waiting_for: phase,
                        stalled: Box::new(s.clone()),
                    },
                    None => Self::LinkDown {
                        peer,
                        waiting_for: phase,
                    },
                }
            }
            io::ErrorKind::WouldBlock => Self::Timeout {
                peer,
                waiting_for: phase,
                secs: 0,
            },
            _ => Self::Io { phase, source: e },
        }
    }
}

impl MigrationError {
    /// A copy, for an error that more than one thread reports (io errors keep their kind
    /// and text).
    pub(crate) fn duplicate(&self) -> Self {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            Self::Connect { uri, source } => Self::Connect {
                uri: uri.clone(),
                source: io(source),
            },
            Self::PeerClosed { peer, phase } => Self::PeerClosed { peer, phase },
            Self::Io { phase, source } => Self::Io {
                phase,
                source: io(source),
            },
            Self::Timeout {
                peer,
                waiting_for,
                secs,
            } => Self::Timeout {
                peer,
                waiting_for,
                secs: *secs,
            },
            Self::Silent {
                peer,
                waiting_for,
                stalled,
            } => Self::Silent {
                peer,
                waiting_for,
                stalled: stalled.clone(),
            },
            Self::LinkDown { peer, waiting_for } => Self::LinkDown { peer, waiting_for },
            Self::Refused { cause, reason } => Self::Refused {
                cause: *cause,
                reason: reason.clone(),
            },
            Self::Incompatible { cause, reason } => Self::Incompatible {
                cause: *cause,
                reason: reason.clone(),
            },
            Self::LoadFailed(s) => Self::LoadFailed(s.clone()),
            Self::SourceAborted(s) => Self::SourceAborted(s.clone()),
            Self::Wire(e) => Self::Wire(e.clone()),
            Self::Protocol(s) => Self::Protocol(s.clone()),
            Self::Verify(s) => Self::Verify(s.clone()),
            Self::Cancelled => Self::Cancelled,
            Self::NotConverging(s) => Self::NotConverging(s.clone()),
            Self::InvalidParams(s) => Self::InvalidParams(s.clone()),
            Self::Busy => Self::Busy,
            Self::NoAck { device, secs } => Self::NoAck {
                device: device.clone(),
                secs: *secs,
            },
            Self::UnannouncedState { what } => Self::UnannouncedState { what: what.clone() },
            Self::StateTwice { what } => Self::StateTwice { what: what.clone() },
            Self::StateMissing { what } => Self::StateMissing { what: what.clone() },
            Self::PageTwice { block, page } => Self::PageTwice {
                block: *block,
                page: *page,
            },
            Self::Channel { index, source } => Self::Channel {
                index: *index,
                source: Box::new(source.duplicate()),
            },
            Self::HandoverInDoubt { source } => Self::HandoverInDoubt {
                source: Box::new(source.duplicate()),
            },
            Self::ChannelsMissing {
                missing,
                count,
                secs,
            } => Self::ChannelsMissing {
                missing: missing.clone(),
                count: *count,
                secs: *secs,
            },
            e @ (Self::State(_) | Self::Vm(_)) => Self::Protocol(error_chain(e)),
        }
    }

    /// The error underneath any data-channel wrapping.
    pub fn root(&self) -> &Self {
        match self {
            Self::Channel { source, .. } => source.root(),
            e => e,
        }
    }
}

/// Renders an error with its chain of causes, for messages sent to the peer or a user.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
