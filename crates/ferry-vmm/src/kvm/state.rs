//! vCPU and VM state as versioned device states.
//!
//! Each KVM struct travels as one field holding its in-memory bytes (`Array` of exactly
//! `size_of` the struct, or `Bytes` for lists), converted with zerocopy (kvm-bindings'
//! `serde` feature derives it, and its own serde impls send the same bytes). That is
//! honest only between hosts whose kernels lay the structs out alike: same architecture
//! and a KVM uAPI that has not changed them. x86-64 KVM has kept these structs stable for
//! a decade (new state comes in new ioctls, or in fields that were padding and are
//! flagged), and the fixed lengths in the schema make a layout change fail the load
//! instead of misreading it. A field-by-field schema would survive a layout change and
//! would let a checker compare releases field by field; it is the obvious version 2.

use std::mem::size_of;

use ferry_migration::state::{
    DeviceState, FieldKind, FieldSchema, StateError, StateSchema, SubsectionSchema,
    SubsectionState, Value,
};
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::{guest, KvmError};

const fn array<T>(name: &'static str) -> FieldSchema {
    FieldSchema {
        name,
        kind: FieldKind::Array {
            len: size_of::<T>() as u32,
        },
        since: 1,
    }
}

const fn word(name: &'static str) -> FieldSchema {
    FieldSchema {
        name,
        kind: FieldKind::U32,
        since: 1,
    }
}

/// Most MSRs a state may carry (KVM's own limit per `KVM_GET_MSRS` call, times four).
const MAX_MSRS: usize = 4 * KVM_MAX_MSR_ENTRIES;

/// One vCPU: registers, FPU/SSE/AVX state, local APIC, pending events, MSRs.
pub static VCPU_SCHEMA: StateSchema = StateSchema {
    name: "kvm-vcpu",
    version: 1,
    min_version: 1,
    fields: &[
        array::<kvm_regs>("regs"),
        array::<kvm_sregs>("sregs"),
        // The 4 KiB legacy `kvm_xsave` area; see `check_xsave_size`.
        array::<kvm_xsave>("xsave"),
        array::<kvm_xcrs>("xcrs"),
        array::<kvm_debugregs>("debugregs"),
        array::<kvm_lapic_state>("lapic"),
        array::<kvm_vcpu_events>("vcpu_events"),
        word("mp_state"),
        // `kvm_msr_entry` values, 16 bytes each (index, reserved, data).
        FieldSchema {
            name: "msrs",
            kind: FieldKind::Bytes {
                max_len: (MAX_MSRS * size_of::<kvm_msr_entry>()) as u32,
            },
            since: 1,
        },
        // 0 when the source could not tell (unstable TSC).
        word("tsc_khz"),
    ],
    subsections: &[PACED_PROGRAM, COMPUTE_PROGRAM],
};

/// Marks a vCPU that runs the paced guest program (`guest.rs`). It carries nothing: the
/// program is in guest RAM and the rate in the control page. It is there so that a
/// release without that program, whose vCPU threads would stop the guest at its first
/// report, refuses the vCPU by name while the source can still resume it.
pub const PACED_PROGRAM: SubsectionSchema = SubsectionSchema {
    name: "kvm-vcpu/paced-program",
    version: 1,
    fields: &[],
    needed_when: "the vCPU runs the paced guest program (ferry run --dirty-rate, or --dirty 0 \
                  on KVM)",
};

/// Marks a vCPU that runs the computing guest program (`guest.rs`), for the same reason
/// as [`PACED_PROGRAM`].
pub const COMPUTE_PROGRAM: SubsectionSchema = SubsectionSchema {
    name: "kvm-vcpu/compute-program",
    version: 1,
    fields: &[],
    needed_when: "the vCPU runs the computing guest program (ferry run --vcpu-dirty compute)",
};

/// VM-wide KVM state: the kvmclock and the in-kernel PICs and IOAPIC.
pub static VM_SCHEMA: StateSchema = StateSchema {
    name: "kvm-vm",
    version: 1,
    min_version: 1,
    fields: &[
        array::<kvm_clock_data>("clock"),
        array::<kvm_irqchip>("pic_master"),
        array::<kvm_irqchip>("pic_slave"),
        array::<kvm_irqchip>("ioapic"),
    ],
    subsections: &[],
};

/// The size KVM wants for `KVM_GET_XSAVE2` must fit the legacy 4 KiB area. It does unless
/// the process asked for dynamic xstate features (AMX) with `arch_prctl`, which ferry
/// never does; this makes that assumption, on which the `set_xsave` below relies, checked.
pub fn check_xsave_size(vm: &VmFd) -> Result<(), KvmError> {
    let size = vm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    if size as usize > size_of::<kvm_xsave>() {
        return Err(KvmError::Unsupported(format!(
            "KVM's xsave area is {size} bytes, larger than the 4096 this VMM saves"
        )));
    }
    Ok(())
}

fn bytes_of<T: IntoBytes + Immutable>(t: &T) -> Value {
    Value::Bytes(t.as_bytes().to_vec())
}

fn vcpu_err(index: usize, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Vcpu {
        index,
        ioctl,
        source,
    }
}

fn vm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::VmIoctl { ioctl, source }
}

/// Saves vCPU `index`, which must not be running and must have completed any I/O exit.
pub fn save_vcpu(index: usize, fd: &VcpuFd, msr_indices: &[u32]) -> Result<DeviceState, KvmError> {
    let e = |ioctl| vcpu_err(index, ioctl);
    let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    let events = fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
    let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let msrs = get_msrs(index, fd, msr_indices)?;
    let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
    let msr_bytes: Vec<u8> = msrs.iter().flat_map(|m| m.as_bytes().to_vec()).collect();
    let mut state = DeviceState {
        version: VCPU_SCHEMA.version,
        ..DeviceState::new()
    };
    match guest::Program::at(regs.rip) {
        Some((guest::Program::Paced, _)) => {
            state = state.with_subsection(SubsectionState::new(PACED_PROGRAM.name));
        }
        Some((guest::Program::Compute, _)) => {
            state = state.with_subsection(SubsectionState::new(COMPUTE_PROGRAM.name));
        }
        _ => {}
    }
    Ok(state
        .with("regs", bytes_of(&regs))
        .with("sregs", bytes_of(&sregs))
        .with("xsave", Value::Bytes(xsave.region.as_bytes().to_vec()))
        .with("xcrs", bytes_of(&xcrs))
        .with("debugregs", bytes_of(&debugregs))
        .with("lapic", bytes_of(&lapic))
        .with("vcpu_events", bytes_of(&events))
        .with("mp_state", Value::U32(mp_state.mp_state))
        .with("msrs", Value::Bytes(msr_bytes))
        .with("tsc_khz", Value::U32(tsc_khz)))
}

/// Reads every MSR of `indices`, skipping (and logging) any KVM refuses to read.
fn get_msrs(index: usize, fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("batch within KVM_MAX_MSR_ENTRIES");
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(vcpu_err(index, "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        if n < batch.len() {
            tracing::debug!(
                vcpu = index,
                msr = format_args!("{:#x}", batch[n]),
                "MSR not readable, not migrated"
            );
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

/// A state field of exactly `size_of::<T>()` bytes, as a `T`.
fn field<T: FromBytes>(device: &str, state: &DeviceState, name: &str) -> Result<T, StateError> {
    let bad = |reason: String| StateError::Field {
        device: device.into(),
        field: name.into(),
        reason,
    };
    match state.get(name) {
        Some(Value::Bytes(b)) => T::read_from_bytes(b)
            .map_err(|_| bad(format!("{} bytes, expected {}", b.len(), size_of::<T>()))),
        Some(other) => Err(bad(format!("expected bytes, found {other:?}"))),
        None => Err(bad("missing".into())),
    }
}

fn field_u32(device: &str, state: &DeviceState, name: &str) -> Result<u32, StateError> {
    match state.get(name) {
        Some(Value::U32(v)) => Ok(*v),
        other => Err(StateError::Field {
            device: device.into(),
            field: name.into(),
            reason: format!("expected a u32, found {other:?}"),
        }),
    }
}

fn msr_entries(state: &DeviceState) -> Result<Vec<kvm_msr_entry>, StateError> {
    let bad = |reason: String| StateError::Field {
        device: VCPU_SCHEMA.name.into(),
        field: "msrs".into(),
        reason,
    };
    let Some(Value::Bytes(b)) = state.get("msrs") else {
        return Err(bad("missing or not bytes".into()));
    };
    if b.len() % size_of::<kvm_msr_entry>() != 0 || b.len() / size_of::<kvm_msr_entry>() > MAX_MSRS
    {
        return Err(bad(format!(
            "{} bytes is not a list of at most {MAX_MSRS} 16-byte entries",
            b.len()
        )));
    }
    Ok(b.chunks_exact(size_of::<kvm_msr_entry>())
        .map(|c| kvm_msr_entry::read_from_bytes(c).expect("chunk of the entry's size"))
        .collect())
}

/// Loads vCPU `index`, which must not be running. Every field is checked before the
/// first ioctl, so a malformed state changes nothing.
pub fn load_vcpu(index: usize, fd: &VcpuFd, state: &DeviceState) -> Result<(), KvmError> {
    let dev = VCPU_SCHEMA.name;
    let regs: kvm_regs = field(dev, state, "regs")?;
    let sregs: kvm_sregs = field(dev, state, "sregs")?;
    let xsave: kvm_xsave = field(dev, state, "xsave")?;
    let xcrs: kvm_xcrs = field(dev, state, "xcrs")?;
    let debugregs: kvm_debugregs = field(dev, state, "debugregs")?;
    let lapic: kvm_lapic_state = field(dev, state, "lapic")?;
    let events: kvm_vcpu_events = field(dev, state, "vcpu_events")?;
    let mp_state = kvm_mp_state {
        mp_state: field_u32(dev, state, "mp_state")?,
    };
    let msrs = msr_entries(state)?;
    let tsc_khz = field_u32(dev, state, "tsc_khz")?;

    let e = |ioctl| vcpu_err(index, ioctl);
    // The TSC rate first: MSR_IA32_TSC below is interpreted at it.
    if tsc_khz != 0 && fd.get_tsc_khz().ok() != Some(tsc_khz) {
        fd.set_tsc_khz(tsc_khz).map_err(e("KVM_SET_TSC_KHZ"))?;
    }
    fd.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
    fd.set_regs(&regs).map_err(e("KVM_SET_REGS"))?;
    // SAFETY: `check_xsave_size` ran when this VM was created: KVM's xsave area is at most
    // the 4096 bytes of `kvm_xsave`, so the kernel reads no further than the struct.
    unsafe { fd.set_xsave(&xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&xcrs).map_err(e("KVM_SET_XCRS"))?;
    set_msrs(index, fd, &msrs)?;
    fd.set_mp_state(mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    fd.set_lapic(&lapic).map_err(e("KVM_SET_LAPIC"))?;
    fd.set_vcpu_events(&events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    fd.set_debug_regs(&debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    Ok(())
}

/// `KVM_SET_MSRS` stops at the first MSR it rejects and returns how many it set; carry on
/// past each rejected one, then report them all.
fn set_msrs(index: usize, fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), KvmError> {
    let mut rejected = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let msrs = Msrs::from_entries(batch).expect("batch within KVM_MAX_MSR_ENTRIES");
        let n = fd
            .set_msrs(&msrs)
            .map_err(vcpu_err(index, "KVM_SET_MSRS"))?;
        if n < batch.len() {
            rejected.push(batch[n].index);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    if rejected.is_empty() {
        Ok(())
    } else {
        Err(KvmError::MsrsRejected {
            index,
            msrs: rejected,
        })
    }
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "pic_master"),
    (KVM_IRQCHIP_PIC_SLAVE, "pic_slave"),
    (KVM_IRQCHIP_IOAPIC, "ioapic"),
];

/// Saves the VM-wide state; vCPUs must be paused.
pub fn save_vm(vm: &VmFd) -> Result<DeviceState, KvmError> {
    let clock = vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?;
    let mut state = DeviceState {
        version: VM_SCHEMA.version,
        ..DeviceState::new()
    }
    .with("clock", bytes_of(&clock));
    for (chip_id, name) in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(vm_err("KVM_GET_IRQCHIP"))?;
        state = state.with(name, bytes_of(&chip));
    }
    Ok(state)
}

/// Loads the VM-wide state into a VM whose vCPUs do not run.
pub fn load_vm(vm: &VmFd, state: &DeviceState) -> Result<(), KvmError> {
    let dev = VM_SCHEMA.name;
    let clock: kvm_clock_data = field(dev, state, "clock")?;
    let mut chips = Vec::new();
    for (chip_id, name) in CHIPS {
        let chip: kvm_irqchip = field(dev, state, name)?;
        if chip.chip_id != chip_id {
            return Err(StateError::Field {
                device: dev.into(),
                field: name.into(),
                reason: format!("holds chip {}, expected {chip_id}", chip.chip_id),
            }
            .into());
        }
        chips.push(chip);
    }
    for chip in &chips {
        vm.set_irqchip(chip).map_err(vm_err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_state_schemas_have_fixed_struct_sizes() {
        let len = |name| match VCPU_SCHEMA
            .fields
            .iter()
            .find(|f| f.name == name)
            .unwrap()
            .kind
        {
            FieldKind::Array { len } => len,
            other => panic!("{other:?}"),
        };
        assert_eq!(len("regs"), 144);
        assert_eq!(len("sregs"), 312);
        assert_eq!(len("xsave"), 4096);
        assert_eq!(len("lapic"), 1024);
        assert_eq!(VM_SCHEMA.fields.len(), 4);
    }

    #[test]
    fn kvm_state_rejects_a_short_field_before_touching_kvm() {
        let state = DeviceState::new().with("regs", Value::Bytes(vec![0; 10]));
        let err = field::<kvm_regs>("kvm-vcpu", &state, "regs").unwrap_err();
        assert!(
            matches!(err, StateError::Field { ref field, .. } if field == "regs"),
            "{err}"
        );
        let state = DeviceState::new().with("msrs", Value::Bytes(vec![0; 17]));
        assert!(msr_entries(&state).is_err());
    }
}
