//! ferry's reference VMM: guests on the soft backend (and KVM), their devices, the
//! machine types this release ships, and the `ferry` command's building blocks.

pub mod guest;
pub mod memory;
pub mod pagemap;
pub mod soft;
pub mod machine;
pub mod vmm;
