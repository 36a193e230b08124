//! ferry's reference VMM: guests on KVM or the soft backend, their devices, the machine
//! types this release ships, its QMP control socket, and the `ferry` command's building
//! blocks.

pub mod control;
pub mod devices;
pub mod guest;
pub mod kvm;
pub mod machine;
pub mod memory;
pub mod pagemap;
pub mod qmp;
pub mod report;
pub mod soft;
pub mod throttle;
pub mod tls;
pub mod transport;
pub mod vmm;
