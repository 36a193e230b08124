//! The conformance kit of `ferry_migration::testing` on both backends: every check of the
//! `MigratableVm` contract, on a small soft VM and on a small KVM VM (which prints
//! `skipped: ...` and passes when KVM is not usable here).

use std::sync::Arc;
use std::time::Instant;

use ferry_migration::engine::error_chain;
use ferry_migration::engine::vm::MigratableVm;
use ferry_migration::testing::{checks, conformance, Role};
use ferry_vmm::devices::accel::AccelConfig;
use ferry_vmm::kvm::{kvm_usable, KvmConfig, KvmVm};
use ferry_vmm::soft::{SoftConfig, SoftVm};

const MIB: u64 = 1 << 20;

fn soft(role: Role) -> Arc<dyn MigratableVm> {
    let cfg = SoftConfig {
        mem_size: 16 * MIB,
        vcpus: 1,
        dirty_size: MIB,
        vcpu_work: Vec::new(),
        dirty_rate: 0,
        // Data the workload never rewrites, for the populated check.
        fill: MIB,
        incoming: role == Role::Incoming,
        paused: false,
        console_every: 16,
        // An accelerator whose host can precopy it: at stop-copy it is the same device.
        accels: vec![AccelConfig::new(MIB, true)],
    };
    Arc::new(SoftVm::create(&cfg).unwrap_or_else(|e| panic!("{}", error_chain(&e))))
}

fn kvm(role: Role) -> Arc<dyn MigratableVm> {
    let cfg = KvmConfig {
        mem_size: 16 * MIB,
        vcpus: 2,
        dirty_size: MIB,
        vcpu_work: Vec::new(),
        dirty_rate: 0,
        fill: 0,
        incoming: role == Role::Incoming,
        accels: vec![AccelConfig::new(MIB, false)],
        dirty_ring: true,
    };
    let vm = KvmVm::create(&cfg).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    if role == Role::Source {
        vm.start().unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    }
    Arc::new(vm)
}

#[test]
fn the_soft_backend_keeps_the_vm_contract() {
    let t = Instant::now();
    let report = conformance(&soft).unwrap_or_else(|f| panic!("soft backend: {f}"));
    println!("soft backend: {report}");
    assert_eq!(report.passed, checks::ALL);
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
}

#[test]
fn the_kvm_backend_keeps_the_vm_contract() {
    if let Err(e) = kvm_usable() {
        println!(
            "skipped: the_kvm_backend_keeps_the_vm_contract: {}",
            error_chain(&e)
        );
        return;
    }
    let t = Instant::now();
    let report = conformance(&kvm).unwrap_or_else(|f| panic!("KVM backend: {f}"));
    println!("KVM backend: {report}");
    assert_eq!(report.passed, checks::ALL);
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
}
