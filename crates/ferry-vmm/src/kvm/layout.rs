//! Guest-physical layout and the CPU state of the first entry.
//!
//! ```text
//! slot 0 "ram-low", [0, 2 MiB)
//!   0x0000_0800  the fill: guest address and length of the range `--fill` wrote (two
//!                u64s; zero without one), read back to verify it after a migration
//!   0x0000_1000  GDT (null, kernel code/data, user code/data, 64-bit TSS descriptor)
//!   0x0000_1100  TSS with an I/O bitmap granting the workload's ports and COM1
//!   0x0000_2000  PML4
//!   0x0000_3000  PDPT
//!   0x0000_4000  guest program (see `guest.rs`)
//!   0x0000_4100  the paced guest program
//!   0x0000_4200  the computing guest program
//!   0x0001_0000  control page of vCPU i at + i * 4 KiB (pass counter at +0, dirty rate
//!                in pages per second at +8 for the paced program, console line buffer
//!                below +0x800, stack below +0x1000)
//!   0x0010_0000  page directories: one for GiB 0, one per GiB of the RAM slot
//! hole [2 MiB, 4 GiB): LAPIC/IOAPIC pages of the in-kernel irqchip live up there
//! slot 1 "ram", [4 GiB, 4 GiB + mem_size): RAM under test; vCPU i dirties
//!   [4 GiB + i * dirty_size, 4 GiB + (i + 1) * dirty_size), and the fill follows
//!   the last vCPU's range
//! ```
//!
//! Everything is identity-mapped with 2 MiB pages, user-accessible and writable.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use super::guest;
use crate::devices::serial;

pub const LOW_SIZE: u64 = 2 << 20;
pub const RAM_GPA: u64 = 4 << 30;
pub const GDT_GPA: u64 = 0x1000;
pub const TSS_GPA: u64 = 0x1100;
pub const PML4_GPA: u64 = 0x2000;
pub const PDPT_GPA: u64 = 0x3000;
pub const FILL_INFO_GPA: u64 = 0x0800;
pub const CODE_GPA: u64 = 0x4000;
pub const PACED_GPA: u64 = 0x4100;
pub const COMPUTE_GPA: u64 = 0x4200;
pub const CONTROL_GPA: u64 = 0x1_0000;
pub const PD_GPA: u64 = 0x10_0000;

/// Bounded by the I/O bitmap (ports `0x10..0x51`); the control pages would fit 240.
pub const MAX_VCPUS: usize = 64;
/// One page directory per GiB of RAM, in the 1 MiB below the end of the low slot, minus
/// the one for GiB 0.
pub const MAX_RAM: u64 = ((LOW_SIZE - PD_GPA) / 4096 - 1) << 30;

const SEL_USER_CODE: u16 = 0x18 | 3;
const SEL_USER_DATA: u16 = 0x20 | 3;
const SEL_TSS: u16 = 0x28;
const GDT_ENTRIES: usize = 7;
/// The I/O bitmap follows the 0x68 bytes of the 64-bit TSS; it covers ports 0-1023 (up to
/// COM1's) and ends with the all-ones byte the CPU requires.
const IO_BITMAP_OFFSET: usize = 0x68;
const IO_BITMAP_PORTS: usize = 1024;
const TSS_LIMIT: u32 = (IO_BITMAP_OFFSET + IO_BITMAP_PORTS / 8) as u32;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is always set; IOPL=3 lets CPL-3 code use `out`. IF stays clear.
pub const RFLAGS: u64 = 0x2 | (3 << 12);

/// Address of vCPU `index`'s control page.
pub fn control_gpa(index: usize) -> u64 {
    CONTROL_GPA + index as u64 * 4096
}

/// Address of vCPU `index`'s pass counter.
pub fn pass_gpa(index: usize) -> u64 {
    control_gpa(index)
}

/// Address of vCPU `index`'s dirty rate (pages per second; 0: unpaced), which the VMM
/// reads when the paced program reports.
pub fn rate_gpa(index: usize) -> u64 {
    control_gpa(index) + 8
}

/// The bytes the low slot starts with: `(gpa, bytes)` pieces.
pub fn low_slot_image(mem_size: u64) -> Vec<(u64, Vec<u8>)> {
    let mut gdt = [0u64; GDT_ENTRIES];
    gdt[1] = 0x00af_9b00_0000_ffff; // kernel code, 64-bit
    gdt[2] = 0x00cf_9300_0000_ffff; // kernel data
    gdt[3] = 0x00af_fb00_0000_ffff; // user code, 64-bit, DPL 3
    gdt[4] = 0x00cf_f300_0000_ffff; // user data, DPL 3
                                    // 64-bit TSS descriptor, busy (type 0xb).
    gdt[5] = TSS_LIMIT as u64
        | ((TSS_GPA & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((TSS_GPA >> 24) & 0xff) << 56);
    gdt[6] = TSS_GPA >> 32;

    let table = PTE_PRESENT | PTE_WRITE | PTE_USER;
    let mut pml4 = vec![0u64; 512];
    pml4[0] = PDPT_GPA | table;
    let mut pdpt = vec![0u64; 512];
    let mut pieces = Vec::new();
    // GiB 0: one 2 MiB page for the low slot.
    pdpt[0] = PD_GPA | table;
    let mut pd0 = vec![0u64; 512];
    pd0[0] = table | PTE_HUGE;
    pieces.push((PD_GPA, words(&pd0)));
    let ram_end = RAM_GPA + mem_size.next_multiple_of(2 << 20);
    for (k, gib) in (RAM_GPA >> 30..ram_end.div_ceil(1 << 30)).enumerate() {
        let pd_gpa = PD_GPA + (k as u64 + 1) * 4096;
        pdpt[gib as usize] = pd_gpa | table;
        let pd: Vec<u64> = (0..512u64)
            .map(|j| (gib << 30) | (j << 21))
            .map(|addr| {
                if addr < ram_end {
                    addr | table | PTE_HUGE
                } else {
                    0
                }
            })
            .collect();
        pieces.push((pd_gpa, words(&pd)));
    }
    pieces.push((GDT_GPA, words(&gdt)));
    pieces.push((TSS_GPA, tss()));
    pieces.push((PML4_GPA, words(&pml4)));
    pieces.push((PDPT_GPA, words(&pdpt)));
    pieces.push((CODE_GPA, guest::CODE.to_vec()));
    pieces.push((PACED_GPA, guest::PACED.to_vec()));
    pieces.push((COMPUTE_GPA, guest::COMPUTE.to_vec()));
    pieces
}

/// The TSS and its I/O permission bitmap.
///
/// With IOPL=3 in RFLAGS a CPU lets CPL-3 code use any port without looking at the
/// bitmap. KVM's PVM backend does not keep IOPL for user mode (the guest runs with
/// IOPL=0 whatever RFLAGS was set to) and its emulator then checks the bitmap, so the
/// bitmap grants the workload's ports and the serial console's, and only those. The
/// paced program's reports are 16-bit, so the port after the last vCPU's is granted
/// too.
fn tss() -> Vec<u8> {
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[0x66..0x68].copy_from_slice(&(IO_BITMAP_OFFSET as u16).to_le_bytes());
    let bitmap = &mut tss[IO_BITMAP_OFFSET..];
    bitmap.fill(0xff); // denied, and the terminating byte the CPU wants
    let workload = guest::PORT_BASE as usize..guest::PORT_BASE as usize + MAX_VCPUS + 1;
    let console = serial::COM1 as usize..(serial::COM1 + serial::PORTS) as usize;
    for port in workload.chain(console) {
        bitmap[port / 8] &= !(1 << (port % 8));
    }
    tss
}

fn words(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Long mode, paging on, every segment a flat DPL-3 one: the CPU is at CPL 3 from the
/// first instruction. `template` is the vCPU's reset state (it carries `apic_base`).
pub fn initial_sregs(template: &kvm_sregs) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: SEL_USER_CODE,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: SEL_USER_DATA,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    let tr = kvm_segment {
        base: TSS_GPA,
        limit: TSS_LIMIT,
        selector: SEL_TSS,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    let ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    kvm_sregs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr,
        ldt,
        gdt: kvm_dtable {
            base: GDT_GPA,
            limit: (GDT_ENTRIES * 8 - 1) as u16,
            ..Default::default()
        },
        idt: kvm_dtable::default(),
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        cr2: 0,
        cr3: PML4_GPA,
        cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        cr8: 0,
        efer: EFER_LME | EFER_LMA,
        apic_base: template.apic_base,
        interrupt_bitmap: [0; 4],
    }
}

/// The registers of vCPU `index` at its first entry, in `program`, with its range of
/// `pages` at `range_gpa`.
pub fn initial_regs(index: usize, range_gpa: u64, pages: u64, program: guest::Program) -> kvm_regs {
    kvm_regs {
        rip: program.gpa(),
        rflags: RFLAGS,
        rsp: control_gpa(index) + 4096,
        rsi: range_gpa,
        r8: pages,
        rbx: pass_gpa(index),
        r9: guest::port(index) as u64,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_layout_pieces_fit_the_low_slot_without_overlap() {
        let mut pieces: Vec<(u64, u64)> = low_slot_image(MAX_RAM)
            .iter()
            .map(|(gpa, b)| (*gpa, *gpa + b.len() as u64))
            .collect();
        pieces.sort();
        for w in pieces.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
        assert!(pieces.last().unwrap().1 <= LOW_SIZE);
        assert!(control_gpa(MAX_VCPUS - 1) + 4096 <= PD_GPA);
        assert!(CODE_GPA + guest::CODE.len() as u64 <= PACED_GPA);
        assert!(PACED_GPA + guest::PACED.len() as u64 <= COMPUTE_GPA);
        assert!(COMPUTE_GPA + guest::COMPUTE.len() as u64 <= CONTROL_GPA);
        const { assert!(FILL_INFO_GPA + 16 <= GDT_GPA) };
        assert!(guest::port(MAX_VCPUS - 1) + 1 < IO_BITMAP_PORTS as u16);
        assert!(serial::COM1 + serial::PORTS <= IO_BITMAP_PORTS as u16);
        assert!(TSS_GPA + (TSS_LIMIT as u64) < PML4_GPA);
    }

    #[test]
    fn kvm_layout_io_bitmap_grants_the_workload_and_com1_only() {
        let tss = tss();
        let bitmap = &tss[IO_BITMAP_OFFSET..];
        let granted = |port: usize| bitmap[port / 8] & (1 << (port % 8)) == 0;
        let ports: Vec<usize> = (0..IO_BITMAP_PORTS).filter(|&p| granted(p)).collect();
        let mut want: Vec<usize> = (0x10..0x10 + MAX_VCPUS + 1).collect();
        want.extend(0x3f8..0x400);
        assert_eq!(ports, want);
        assert_eq!(*bitmap.last().unwrap(), 0xff);
        assert_eq!(bitmap.len(), IO_BITMAP_PORTS / 8 + 1);
    }

    #[test]
    fn kvm_layout_maps_the_whole_ram_slot() {
        let mem = 3 << 30 | 2 << 20;
        let image = low_slot_image(mem);
        let pdpt = image.iter().find(|(g, _)| *g == PDPT_GPA).unwrap();
        let entry = |i: usize| u64::from_le_bytes(pdpt.1[i * 8..i * 8 + 8].try_into().unwrap());
        assert_ne!(entry(0), 0);
        assert_eq!(entry(3), 0);
        for gib in 4..8 {
            assert_ne!(entry(gib), 0, "GiB {gib}");
        }
        assert_eq!(entry(8), 0);
        // The last PD maps exactly the 2 MiB past 7 GiB.
        let last = image.iter().find(|(g, _)| *g == PD_GPA + 4 * 4096).unwrap();
        let pde = |i: usize| u64::from_le_bytes(last.1[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(pde(0) & !0xfff, 7 << 30);
        assert_eq!(pde(1), 0);
    }
}
