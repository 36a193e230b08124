//! The migration engine: source and destination state machines.
//!
//! The engine drives a VM only through [`vm`]'s traits and moves bytes only through
//! [`crate::wire`]'s formats over streams the embedder hands it ([`transport`]): it
//! never dials or listens on its own. Inside, one page pipeline (`engine::pages`) serves both
//! lanes, and guest memory is touched only through `engine::memory`.

pub mod bitmap;
pub mod converge;
pub mod destination;
pub mod digest;
pub mod error;
mod faults;
mod incoming;
mod iov;
pub mod liveness;
mod memory;
pub mod multifd;
mod pages;
pub mod params;
mod populate;
pub mod source;
pub mod stats;
mod stream;
pub mod transport;
pub mod vm;
mod zeroed;

pub use destination::{receive, DestinationIdentity};
pub use error::{error_chain, MigrationError};
pub use faults::Faults;
pub use incoming::{Incoming, Stray};
pub use params::{human_bytes, MigrationParams, TimeoutStrategy, MIGRATION, MIGRATION_DRIVER};
pub use source::{migrate, SourceIdentity};
pub use stats::{
    CancelRefused, ConvergenceInfo, DeviceStats, Handover, HandoverPoint, MigrationEvent,
    MigrationInfo, MigrationMonitor, MigrationStatus,
};
pub use transport::{Acceptor, Channel, Connector, MigrationStream, StreamRole};
