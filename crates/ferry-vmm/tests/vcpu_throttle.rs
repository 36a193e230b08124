//! The vCPU throttle the engine asks of a VMM (`MigratableVm::set_vcpu_throttle`), on
//! both backends, in process: a CPU throttle of 50% roughly halves every vCPU's pass
//! rate and lifting it gives the rate back; a dirty-limit brings a writing vCPU's dirty
//! rate down near the limit and leaves a computing vCPU's pass rate alone; the stats
//! say what it cost and what was measured. Bands are loose: the host has two cores and
//! other work. The KVM tests print `skipped: ...` and pass when KVM is not usable here.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_migration::engine::vm::{MigratableVm, VcpuThrottle, VcpuThrottleStats};
use ferry_vmm::guest::{GuestVm, VcpuWork};
use ferry_vmm::kvm::{kvm_usable, KvmConfig, KvmVm};
use ferry_vmm::soft::{SoftConfig, SoftVm};

const MIB: u64 = 1 << 20;

/// One VM at a time: each keeps both cores busy.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn kvm_here(test: &str) -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            println!("skipped: {test}: {e}");
            false
        }
    }
}

fn soft_vm(work: Vec<VcpuWork>) -> SoftVm {
    SoftVm::create(&SoftConfig {
        mem_size: 256 * MIB,
        vcpus: work.len(),
        vcpu_work: work,
        ..SoftConfig::default()
    })
    .unwrap()
}

fn kvm_vm(work: Vec<VcpuWork>) -> KvmVm {
    let vm = KvmVm::create(&KvmConfig {
        mem_size: 512 * MIB,
        vcpus: work.len(),
        dirty_size: 0,
        vcpu_work: work,
        dirty_rate: 0,
        fill: 0,
        incoming: false,
        accels: Vec::new(),
        dirty_ring: true,
    })
    .unwrap();
    vm.start().unwrap();
    vm
}

/// Each vCPU's passes per second over `window`.
fn pass_rates(vm: &dyn GuestVm, window: Duration) -> Vec<f64> {
    let before = vm.report().passes;
    let t = Instant::now();
    std::thread::sleep(window);
    let after = vm.report().passes;
    let secs = t.elapsed().as_secs_f64();
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b) as f64 / secs)
        .collect()
}

fn throttled(vm: &dyn GuestVm) -> Vec<Duration> {
    vm.vcpu_throttle_stats()
        .iter()
        .map(|s| s.throttled)
        .collect()
}

/// The CPU throttle: 50% about halves each vCPU's pass rate, the time held is about
/// half the time throttled, and `None` gives the rate back. Full speed and throttled
/// are measured in turns, so that the host's other work weighs on both alike.
fn cpu_throttle_halves_and_lifts(vm: &dyn GuestVm) {
    let window = Duration::from_millis(400);
    let n = vm.vcpu_count();
    std::thread::sleep(Duration::from_millis(200));
    let (mut base, mut slow) = (vec![0.0; n], vec![0.0; n]);
    let mut held = vec![Duration::ZERO; n];
    let mut elapsed = Duration::ZERO;
    for _ in 0..3 {
        for (b, r) in base.iter_mut().zip(pass_rates(vm, window)) {
            *b += r / 3.0;
        }
        vm.set_vcpu_throttle(VcpuThrottle::Cpu { percent: 50 })
            .unwrap();
        let held_before = throttled(vm);
        let t = Instant::now();
        for (s, r) in slow.iter_mut().zip(pass_rates(vm, window)) {
            *s += r / 3.0;
        }
        elapsed += t.elapsed();
        for (h, (a, b)) in held.iter_mut().zip(throttled(vm).iter().zip(&held_before)) {
            *h += *a - *b;
        }
        vm.set_vcpu_throttle(VcpuThrottle::None).unwrap();
    }
    // Lifted: no vCPU is held any more.
    let held_lifted = throttled(vm);
    let back = pass_rates(vm, window);
    let held_after: Vec<Duration> = throttled(vm)
        .iter()
        .zip(&held_lifted)
        .map(|(a, b)| *a - *b)
        .collect();
    println!(
        "{}: passes/s {base:.0?} -> at 50% {slow:.0?} -> lifted {back:.0?}; held {held:?} of {elapsed:?}",
        vm.backend()
    );
    for i in 0..n {
        // The held share is what the throttle controls, and it is exact. The pass rate
        // is not asserted: on two cores shared with other work a vCPU thread gets a
        // fraction of a core anyway, and one held half the time may lose little (a
        // migration that converges only under auto-converge shows the effect end to
        // end, in the convergence tests).
        let share = held[i].as_secs_f64() / elapsed.as_secs_f64();
        assert!(
            (0.3..=0.75).contains(&share),
            "vCPU {i}: held {:?} of {elapsed:?}",
            held[i]
        );
        assert!(
            held_after[i] < Duration::from_millis(20),
            "vCPU {i}: still held {:?} after the throttle was lifted",
            held_after[i]
        );
        assert!(back[i] > 0.0, "vCPU {i} stopped after lifting");
    }
}

/// Averages the dirty rates the stats report over `samples` windows of `period`.
fn sample_rates(vm: &dyn GuestVm, period: Duration, samples: u32) -> Vec<f64> {
    let mut sum = vec![0.0; vm.vcpu_count()];
    for _ in 0..samples {
        std::thread::sleep(period);
        for (s, st) in sum.iter_mut().zip(vm.vcpu_throttle_stats()) {
            *s += st.dirty_rate.expect("a measured dirty rate") as f64;
        }
    }
    sum.iter().map(|s| s / f64::from(samples)).collect()
}

#[test]
fn soft_cpu_throttle_halves_each_vcpus_pass_rate() {
    let _one = serial();
    let vm = soft_vm(vec![VcpuWork::Dirty(4 * MIB), VcpuWork::Compute]);
    cpu_throttle_halves_and_lifts(&vm);
}

#[test]
fn kvm_cpu_throttle_halves_each_vcpus_pass_rate() {
    if !kvm_here("kvm_cpu_throttle_halves_each_vcpus_pass_rate") {
        return;
    }
    let _one = serial();
    // The writer exits once per pass, the computing vCPU once a millisecond: holding
    // them relies on the throttle thread's kicks either way.
    let vm = kvm_vm(vec![VcpuWork::Dirty(64 * MIB), VcpuWork::Compute]);
    cpu_throttle_halves_and_lifts(&vm);
    vm.stop().unwrap();
    vm.check_pattern().unwrap();
    assert_eq!(vm.out_errors(), [0, 0]);
}

#[test]
fn soft_dirty_limit_slows_the_writer_only() {
    let _one = serial();
    let range = 16 * MIB;
    let vm = soft_vm(vec![VcpuWork::Dirty(range), VcpuWork::Compute]);
    let period = Duration::from_millis(200);
    std::thread::sleep(Duration::from_millis(300));
    let base = pass_rates(&vm, Duration::from_secs(1));
    let base_rates = vm.vcpu_throttle_stats();
    let limit = 64 * MIB;
    vm.set_vcpu_throttle(VcpuThrottle::DirtyLimit {
        bytes_per_sec: limit,
        period,
    })
    .unwrap();
    std::thread::sleep(period * 2);
    let t = Instant::now();
    let limited = pass_rates(&vm, Duration::from_secs(2));
    let elapsed = t.elapsed();
    let rates = sample_rates(&vm, period, 3);
    let stats = vm.vcpu_throttle_stats();
    vm.set_vcpu_throttle(VcpuThrottle::None).unwrap();
    // What the writer wrote, from its passes: a pass is its whole range.
    let written = limited[0] * range as f64;
    println!(
        "soft: passes/s {base:.0?} -> limited {limited:.0?}; dirty rates before {:?}, \
         limited {rates:.0?} for a limit of {limit}; writer wrote {written:.0} B/s; {stats:?}",
        base_rates.iter().map(|s| s.dirty_rate).collect::<Vec<_>>()
    );
    assert!(
        base_rates[0].dirty_rate.unwrap() > 4 * limit,
        "{base_rates:?}"
    );
    assert!(
        (0.7..=1.15).contains(&(rates[0] / limit as f64)),
        "writer at {:.0} B/s for a limit of {limit}",
        rates[0]
    );
    assert!(
        (0.6..=1.3).contains(&(written / rates[0])),
        "passes say {written:.0} B/s, the stats {:.0}",
        rates[0]
    );
    assert_eq!(rates[1], 0.0);
    assert!(
        limited[1] > 0.9 * base[1],
        "computing vCPU: {:.0} passes/s limited, {:.0} before",
        limited[1],
        base[1]
    );
    assert!(stats[0].throttled > elapsed / 2, "{stats:?}");
    assert_eq!(stats[1].throttled, Duration::ZERO);
}

#[test]
fn kvm_dirty_limit_slows_the_writer_only() {
    if !kvm_here("kvm_dirty_limit_slows_the_writer_only") {
        return;
    }
    let _one = serial();
    // A range the writer cannot cover in a period even at full speed under logging
    // (about 100 k write faults a second here), so every write it makes is a ring entry.
    let vm = kvm_vm(vec![VcpuWork::Dirty(256 * MIB), VcpuWork::Compute]);
    let period = Duration::from_millis(200);
    // Logging and measuring, nothing held: a limit no vCPU reaches.
    vm.set_vcpu_throttle(VcpuThrottle::DirtyLimit {
        bytes_per_sec: 1 << 40,
        period,
    })
    .unwrap();
    std::thread::sleep(period * 2);
    let base = pass_rates(&vm, Duration::from_secs(1));
    let base_rates = sample_rates(&vm, period, 3);
    let limit = 16 * MIB;
    vm.set_vcpu_throttle(VcpuThrottle::DirtyLimit {
        bytes_per_sec: limit,
        period,
    })
    .unwrap();
    // The controller closes in on the limit in a few periods.
    std::thread::sleep(period * 8);
    let held_before = throttled(&vm);
    let limited = pass_rates(&vm, Duration::from_secs(1));
    let rates = sample_rates(&vm, period, 5);
    let stats: Vec<VcpuThrottleStats> = vm.vcpu_throttle_stats();
    vm.set_vcpu_throttle(VcpuThrottle::None).unwrap();
    // Lifted: logging stops, so the rates are no longer measured.
    assert!(vm
        .vcpu_throttle_stats()
        .iter()
        .all(|s| s.dirty_rate.is_none()));
    // The computing vCPU's own pace moves with the machine's load (1100-3200 passes/s
    // seen here while other builds ran, and 0.81 of the slower of its before and after
    // figures within one quiet run), so it is measured on both sides of the limited
    // window and held to half the slower of the two: a limit that held it as it holds
    // the writer (about 85 % of the time here) would leave it near 15 %. That the limit
    // never holds it is checked exactly below (its throttled time stays zero).
    std::thread::sleep(period);
    let after = pass_rates(&vm, Duration::from_secs(1));
    println!(
        "kvm: passes/s {base:.0?} -> limited {limited:.0?} -> lifted {after:.0?}; dirty rates \
         {base_rates:.0?} -> {rates:.0?} for a limit of {limit}; {stats:?}"
    );
    assert!(base_rates[0] > 1.5 * limit as f64, "{base_rates:?}");
    assert!(
        (0.5..=1.5).contains(&(rates[0] / limit as f64)),
        "writer at {:.0} B/s for a limit of {limit}",
        rates[0]
    );
    // The computing vCPU dirties its pass counter's page only.
    assert!(rates[1] < limit as f64 / 20.0, "{rates:?}");
    let unlimited = base[1].min(after[1]);
    assert!(
        limited[1] > 0.5 * unlimited,
        "computing vCPU: {:.0} passes/s limited, {:.0} before and {:.0} after",
        limited[1],
        base[1],
        after[1]
    );
    assert!(stats[0].throttled > held_before[0], "{stats:?}");
    assert_eq!(stats[1].throttled, Duration::ZERO, "{stats:?}");
    vm.stop().unwrap();
    vm.check_pattern().unwrap();
    assert_eq!(vm.out_errors(), [0, 0]);
}

#[test]
fn kvm_dirty_limit_is_refused_without_the_ring() {
    if !kvm_here("kvm_dirty_limit_is_refused_without_the_ring") {
        return;
    }
    let vm = KvmVm::create(&KvmConfig {
        mem_size: 64 * MIB,
        vcpus: 1,
        dirty_size: MIB,
        vcpu_work: Vec::new(),
        dirty_rate: 0,
        fill: 0,
        incoming: false,
        accels: Vec::new(),
        dirty_ring: false,
    })
    .unwrap();
    let e = vm
        .set_vcpu_throttle(VcpuThrottle::DirtyLimit {
            bytes_per_sec: MIB,
            period: Duration::from_secs(1),
        })
        .unwrap_err();
    assert!(e.to_string().contains("--dirty-ring off"), "{e}");
    // The CPU throttle needs no ring.
    vm.set_vcpu_throttle(VcpuThrottle::Cpu { percent: 20 })
        .unwrap();
    vm.set_vcpu_throttle(VcpuThrottle::None).unwrap();
}
