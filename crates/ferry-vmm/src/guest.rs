//! What the VMM, its control socket and its tests ask of a running guest, whatever the
//! backend.

use ferry_migration::engine::vm::{MigratableVm, VmError};

/// A snapshot of the guest workload's progress.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GuestReport {
    /// Completed passes of each vCPU's workload.
    pub passes: Vec<u64>,
    pub running: bool,
    /// The console's recent output.
    pub console_tail: String,
}

/// A VM of the reference VMM.
pub trait GuestVm: MigratableVm {
    /// `soft` or `kvm`.
    fn backend(&self) -> &'static str;

    fn report(&self) -> GuestReport;

    /// Checks every page the workload dirties against its registers, briefly stopping
    /// the guest if it runs. Returns `(pages checked, pages wrong)`.
    fn verify(&self) -> Result<(u64, u64), VmError>;

    /// Pages in the backend's dirty log not yet harvested.
    fn dirty_pages_pending(&self) -> usize;
}
