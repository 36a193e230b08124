//! ferry's migration engine, independent of any VMM and of KVM.
//!
//! Layers, top to bottom (each only calls the one below it):
//!
//! * [`engine`]: the source and destination state machines, passes, convergence,
//!   switchover and the statistics a user reads. It talks to a VM only through the
//!   traits in [`engine::vm`].
//! * [`compat`] and [`state`]: typed properties, machine types with their compat
//!   tables, and versioned device state with its codec. No I/O.
//! * [`wire`]: every byte format on the migration stream and the return path.
//!   Decoders bound every length before allocating and never panic.

pub mod compat;
pub mod engine;
pub mod state;
/// A conformance kit for `MigratableVm` implementations, and a reference VM that passes it.
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

/// Size of a guest page as the migration stream counts it.
pub const PAGE_SIZE: usize = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
