//! The KVM backend of the reference VMM.

pub mod pagemap;
