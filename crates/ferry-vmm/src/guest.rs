//! What the VMM, its control socket and its tests ask of a running guest, whatever the
//! backend.

use ferry_migration::engine::vm::{MigratableVm, VmError};

use crate::devices::accel::Accels;

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

    /// The VM's accelerators.
    fn accels(&self) -> &Accels;
}

impl GuestVm for crate::kvm::KvmVm {
    fn backend(&self) -> &'static str {
        "kvm"
    }

    fn report(&self) -> GuestReport {
        GuestReport {
            passes: self.passes(),
            running: self.running(),
            console_tail: self.serial().tail_text(),
        }
    }

    fn accels(&self) -> &Accels {
        crate::kvm::KvmVm::accels(self)
    }

    fn verify(&self) -> Result<(u64, u64), VmError> {
        let was = self.running();
        if was {
            self.pause()?;
        }
        let r = self.check_pattern();
        if was {
            self.resume()?;
        }
        r.map(|pages| (pages, 0)).map_err(VmError::Failed)
    }
}
