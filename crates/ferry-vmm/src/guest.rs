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

/// What one vCPU's workload does each pass (`ferry run --vcpu-dirty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuWork {
    /// Writes byte 0 of every 4 KiB page of its own range of this many bytes; 0 is an
    /// idle vCPU (as `--dirty 0`).
    Dirty(u64),
    /// Computes: a fixed amount of work per pass that writes no guest RAM but its pass
    /// counter. A vCPU that a dirty-limit must leave alone.
    Compute,
}

impl VcpuWork {
    /// Bytes of RAM under test the vCPU dirties (its range; 0 for none).
    pub fn dirty_size(self) -> u64 {
        match self {
            Self::Dirty(size) => size,
            Self::Compute => 0,
        }
    }

    /// `SIZE` or `compute`, one vCPU of `--vcpu-dirty`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "compute" => Ok(Self::Compute),
            size => ferry_migration::compat::parse_size(size)
                .map(Self::Dirty)
                .map_err(|e| format!("{s:?} is neither a size nor `compute` ({e})")),
        }
    }

    /// Each vCPU's work: `work` when given (one per vCPU), else `dirty_size` for all.
    pub fn per_vcpu(work: &[VcpuWork], vcpus: usize, dirty_size: u64) -> Vec<VcpuWork> {
        if work.is_empty() {
            vec![Self::Dirty(dirty_size); vcpus]
        } else {
            work.to_vec()
        }
    }
}
