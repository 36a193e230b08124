//! ferry's reference VMM.
pub mod kvm;
