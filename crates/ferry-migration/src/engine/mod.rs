//! The migration engine: source and destination state machines.

pub mod bitmap;
pub mod vm;
