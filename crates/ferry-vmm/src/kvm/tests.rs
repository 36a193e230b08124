//! Tests against the host's `/dev/kvm`; each one prints `skipped: ...` and passes when
//! KVM is not usable here.

use std::time::{Duration, Instant};

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::engine::vm::{DirtyLog, GuestRam};
use ferry_migration::PAGE_SIZE;

use super::*;

const MIB: u64 = 1 << 20;

fn kvm_here(test: &str) -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            println!("skipped: {test}: {}", chain(&e));
            false
        }
    }
}

fn vm(mem_mib: u64, vcpus: usize, dirty_mib: u64, incoming: bool) -> KvmVm {
    let cfg = KvmConfig {
        mem_size: mem_mib * MIB,
        vcpus,
        dirty_size: dirty_mib * MIB,
        incoming,
    };
    KvmVm::create(&cfg).unwrap_or_else(|e| panic!("{}", chain(&e)))
}

/// Waits until every vCPU has made `more` passes beyond `from` (one count per vCPU).
fn wait_passes(vm: &KvmVm, from: &[u64], more: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.passes().iter().zip(from).any(|(&p, &f)| p < f + more) {
        if Instant::now() > deadline {
            let stopped = vm.stop().map_err(|e| chain(&e));
            panic!(
                "passes stuck at {:?}, waiting for {more} beyond {from:?}; vCPUs: {stopped:?}",
                vm.passes()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn pages_set(b: &DirtyBitmap) -> Vec<usize> {
    (0..b.pages()).filter(|&p| b.is_set(p)).collect()
}

#[test]
fn kvm_guest_runs_and_passes_advance() {
    if !kvm_here("kvm_guest_runs_and_passes_advance") {
        return;
    }
    let vm = vm(64, 2, 8, false);
    assert_eq!(vm.passes(), [0, 0]);
    vm.check_pattern().unwrap();
    vm.start().unwrap();
    wait_passes(&vm, &[0, 0], 20);
    vm.stop().unwrap();
    vm.check_pattern().unwrap();
    let (passes, exits) = (vm.passes(), vm.exits());
    assert_eq!(vm.out_errors(), [0, 0]);
    // Each pass ends in one `out`; a pause can fall between the counter and the `out`.
    for i in 0..2 {
        assert!(
            exits[i] == passes[i] || exits[i] + 1 == passes[i],
            "vCPU {i}: {exits:?} exits, {passes:?} passes"
        );
    }
}

#[test]
fn kvm_pause_stops_the_guest_and_resume_carries_on() {
    if !kvm_here("kvm_pause_stops_the_guest_and_resume_carries_on") {
        return;
    }
    let vm = vm(64, 2, 4, false);
    vm.start().unwrap();
    wait_passes(&vm, &[0, 0], 1);
    let mut pauses = Vec::new();
    for round in 0..20 {
        // Vary where in a pass the pause lands.
        std::thread::sleep(Duration::from_micros(300 + 700 * round));
        let t = Instant::now();
        vm.stop().unwrap();
        pauses.push(t.elapsed());
        assert!(!vm.running());
        let before = vm.passes();
        vm.check_pattern()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(vm.passes(), before, "round {round}: guest ran while paused");
        vm.start().unwrap();
        wait_passes(&vm, &before, 1);
    }
    vm.stop().unwrap();
    assert_eq!(vm.out_errors(), [0, 0]);
    pauses.sort();
    println!(
        "pause latency: median {:?}, max {:?}",
        pauses[pauses.len() / 2],
        pauses.last().unwrap()
    );
}

#[test]
fn kvm_dirty_log_reports_the_guest_range_and_nothing_else() {
    if !kvm_here("kvm_dirty_log_reports_the_guest_range_and_nothing_else") {
        return;
    }
    let (vcpus, dirty) = (2, 2);
    let vm = vm(64, vcpus, dirty, false);
    let log = vm.dirty();
    let ram = &vm.ram;
    let bitmaps: Vec<DirtyBitmap> = ram
        .blocks()
        .iter()
        .map(|b| DirtyBitmap::new(b.pages()))
        .collect();
    assert!(matches!(
        vm.dirty().harvest_with_cost(RAM_BLOCK, &bitmaps[RAM_BLOCK]),
        Err(KvmError::NotLogging)
    ));
    vm.start().unwrap();
    log.start().unwrap();
    // Once the guest has completed a whole pass after a harvest, the next harvest holds
    // exactly its range in `ram` and its control page in `ram-low`.
    let harvest = || {
        for (b, map) in bitmaps.iter().enumerate() {
            map.clear_all();
            log.harvest(b, map).unwrap();
        }
    };
    for _ in 0..3 {
        harvest();
        wait_passes(&vm, &vm.passes(), 2);
    }
    harvest();
    let per_vcpu = (dirty * MIB) as usize / PAGE_SIZE;
    let expected_ram: Vec<usize> = (0..vcpus * per_vcpu).collect();
    assert_eq!(pages_set(&bitmaps[RAM_BLOCK]), expected_ram);
    let control: Vec<usize> = (0..vcpus)
        .map(|i| (layout::control_gpa(i) / 4096) as usize)
        .collect();
    assert_eq!(pages_set(&bitmaps[LOW_BLOCK]), control);

    // Pages the VMM writes, and pages put back after a failed send, come out too.
    vm.write_guest(layout::RAM_GPA + 40 * MIB, &[1, 2, 3])
        .unwrap();
    let failed = DirtyBitmap::new(bitmaps[RAM_BLOCK].pages());
    failed.set(12_000);
    log.restore(RAM_BLOCK, &failed);
    harvest();
    let got = pages_set(&bitmaps[RAM_BLOCK]);
    let extra = [12_000, 40 * MIB as usize / PAGE_SIZE];
    assert!(extra.iter().all(|p| got.contains(p)), "{got:?}");
    assert!(
        got.iter()
            .all(|p| *p < vcpus * per_vcpu || extra.contains(p)),
        "{got:?}"
    );

    log.stop();
    assert!(vm
        .dirty()
        .harvest_with_cost(RAM_BLOCK, &bitmaps[RAM_BLOCK])
        .is_err());
    vm.stop().unwrap();
    vm.check_pattern().unwrap();
}

#[test]
fn kvm_rejects_bad_configs() {
    if !kvm_here("kvm_rejects_bad_configs") {
        return;
    }
    let bad = |mem_size, vcpus, dirty_size| {
        let cfg = KvmConfig {
            mem_size,
            vcpus,
            dirty_size,
            incoming: false,
        };
        matches!(KvmVm::create(&cfg), Err(KvmError::Config(_)))
    };
    assert!(bad(64 * MIB, 2, 48 * MIB));
    assert!(bad(64 * MIB, 0, MIB));
    assert!(bad(64 * MIB, 1, 100));
    assert!(bad(0, 1, MIB));
}

#[test]
fn kvm_unusable_error_names_dev_kvm_and_errno() {
    let err = KvmError::Unusable {
        what: "open",
        errno: libc::ENOENT,
    };
    let msg = err.to_string();
    assert!(
        msg.contains("/dev/kvm") && msg.contains("os error 2") && !msg.contains('\n'),
        "{msg}"
    );
}
