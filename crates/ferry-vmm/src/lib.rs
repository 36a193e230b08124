//! ferry's reference VMM.

pub mod qmp;
