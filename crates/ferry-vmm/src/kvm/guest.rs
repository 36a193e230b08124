//! The guest programs: a few bytes of 64-bit code that run at CPL 3.
//!
//! Encoded by hand so that building ferry needs no assembler. There are two: [`CODE`],
//! the workload as fast as it runs, and [`PACED`], the same workload reporting to the
//! VMM every [`CHUNK`] pages so that the VMM can hold it to a dirty rate, and able to
//! run over an empty range (an idle guest). Both are in every guest's low slot; a vCPU
//! starts in the one its configuration needs ([`Program::for_workload`]), and the
//! VMM tells them apart by `rip`. What differs between vCPUs is held in registers the
//! VMM sets before the first entry and that the code never changes:
//!
//! | register | meaning |
//! |---|---|
//! | `rsi` | guest-physical (= virtual, identity map) address of the vCPU's range |
//! | `r8`  | number of 4 KiB pages in the range (at least 1; 0 for an idle [`PACED`] vCPU) |
//! | `rbx` | address of the vCPU's control page; the pass counter is the `u64` at `[rbx]` |
//! | `r9`  | I/O port of the vCPU, [`port`]`(index)` |
//! | `rsp` | the top of the control page, for the `call`s |
//!
//! ```text
//!   0  top:    mov  rdi, rsi            ; start of the range
//!   3          mov  rcx, r8             ; pages left
//!   6  page:   inc  byte [rdi]          ; byte 0 of the page
//!   8          add  rdi, 4096
//!  15          dec  rcx
//!  18          jnz  page
//!  20          inc  qword [rbx]         ; pass counter, after the whole range is written
//!  23          mov  rax, [rbx]
//!  26          mov  edx, r9d
//!  29          out  dx, al              ; one exit to the VMM per pass
//!  30          test eax, 1023           ; a console line every 1024 passes
//!  35          jnz  top
//!  37          lea  rdi, [rbx + 0x800]  ; the line is built backwards, ending here
//!  44          mov  r10, rdi
//!  47          dec  rdi
//!  50          mov  byte [rdi], 10      ; "\n"
//!  53          call digits              ; the pass, in decimal
//!  58          sub  rdi, 6
//!  62          mov  dword [rdi], " pas"
//!  68          mov  word [rdi + 4], "s "
//!  74          mov  eax, r9d
//!  77          sub  eax, 0x10           ; PORT_BASE: the vCPU index
//!  80          call digits
//!  85          sub  rdi, 4
//!  89          mov  dword [rdi], "vcpu"
//!  95          mov  edx, 0x3f8          ; COM1
//! 100  emit:   mov  al, [rdi]           ; "vcpu0 pass 1024\n", one byte per exit
//! 102          out  dx, al
//! 103          inc  rdi
//! 106          cmp  rdi, r10
//! 109          jne  emit
//! 111          jmp  top
//! 113  digits: mov  ecx, 10             ; rax in decimal, written backwards below rdi
//! 118  dloop:  xor  edx, edx
//! 120          div  rcx
//! 123          add  dl, '0'
//! 126          dec  rdi
//! 129          mov  [rdi], dl
//! 131          test rax, rax
//! 134          jnz  dloop
//! 136          ret
//! 137
//! ```
//!
//! So between passes every page of the range holds the low byte of the pass counter;
//! during a pass a prefix of the range is one ahead of it. [`pages_ahead`] says how long
//! that prefix is from the registers, and the VMM checks it against memory. Printing
//! happens after the counter caught up, so it is "between passes" for that check; the
//! line is built in the control page (which migrates with the guest), so a line cut by a
//! migration is finished on the destination.
//!
//! [`CODE`] is what every release so far runs by default, byte for byte: a guest moves
//! between releases with its code in its RAM, and the destination reads the guest's
//! position from these offsets, so it must not change. The paced program is new code
//! beside it, not an edit of it.
//!
//! # The paced program
//!
//! Used for `--dirty-rate` and for an idle guest (`--dirty 0`). Pacing needs a clock.
//! The guest could read one: `rdtsc` runs at CPL 3 under PVM (CR4.TSD is clear; tried
//! on these hosts). But it would have to be told the TSC's frequency, and it could only
//! wait by spinning, keeping a host core busy for the whole pause, on hosts with two.
//! The VMM has a clock, and sleeping there costs nothing: so after every
//! [`CHUNK`] pages, and at the end of a pass, the guest writes the number of pages it
//! wrote since its last report to its port as a 16-bit `out`, and the vCPU thread, in
//! that exit, sleeps until the pages written so far are due at the rate (see
//! `vcpu.rs`). An idle vCPU reports 0 pages once per pass; the VMM holds each of those
//! for [`IDLE_PASS`], so an idle guest counts about 100 passes a second, costs no CPU,
//! and dirties nothing but its control page. The rate is not in the VMM's
//! configuration but in the guest (its control page, [`super::layout::rate_gpa`]), so
//! it moves with the guest in a migration.
//!
//! ```text
//!   0  top:    mov  rdi, rsi            ; start of the range
//!   3          mov  rcx, r8             ; pages left in the pass
//!   6  chunk:  xor  eax, eax            ; pages written since the last report
//!   8          test rcx, rcx
//!  11          jz   report              ; nothing left (an idle vCPU: nothing at all)
//!  13  page:   inc  byte [rdi]          ; byte 0 of the page
//!  15          add  rdi, 4096
//!  22          inc  eax
//!  24          dec  rcx
//!  27          jz   report              ; the end of the pass
//!  29          cmp  eax, 64             ; CHUNK
//!  32          jne  page
//!  34  report: mov  edx, r9d
//!  37          out  dx, ax              ; the report: the VMM paces here
//!  39          test rcx, rcx
//!  42          jnz  chunk
//!  44          inc  qword [rbx]         ; pass counter, after the whole range is written
//!  47          mov  rax, [rbx]
//!  50          mov  edx, r9d
//!  53          out  dx, al              ; one pass exit, as in CODE
//!  54          test eax, 1023
//!  59          jnz  top
//!  61          ...                      ; the console line, as CODE's 37..111
//! 135          jmp  top                 ; (rel32: top is out of rel8's reach here)
//! 140  digits: ...                      ; as CODE's 113..137
//! 164
//! ```

/// The program, see the module docs for the assembly.
pub const CODE: [u8; 137] = [
    0x48, 0x89, 0xf7, // mov rdi, rsi
    0x4c, 0x89, 0xc1, // mov rcx, r8
    0xfe, 0x07, // inc byte [rdi]
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 0x1000
    0x48, 0xff, 0xc9, // dec rcx
    0x75, 0xf2, // jnz page (rel8 -14)
    0x48, 0xff, 0x03, // inc qword [rbx]
    0x48, 0x8b, 0x03, // mov rax, [rbx]
    0x44, 0x89, 0xca, // mov edx, r9d
    0xee, // out dx, al
    0xa9, 0xff, 0x03, 0x00, 0x00, // test eax, 0x3ff
    0x75, 0xdb, // jnz top (rel8 -37)
    0x48, 0x8d, 0xbb, 0x00, 0x08, 0x00, 0x00, // lea rdi, [rbx + 0x800]
    0x49, 0x89, 0xfa, // mov r10, rdi
    0x48, 0xff, 0xcf, // dec rdi
    0xc6, 0x07, 0x0a, // mov byte [rdi], 10
    0xe8, 0x37, 0x00, 0x00, 0x00, // call digits (rel32 +55)
    0x48, 0x83, 0xef, 0x06, // sub rdi, 6
    0xc7, 0x07, 0x20, 0x70, 0x61, 0x73, // mov dword [rdi], " pas"
    0x66, 0xc7, 0x47, 0x04, 0x73, 0x20, // mov word [rdi + 4], "s "
    0x44, 0x89, 0xc8, // mov eax, r9d
    0x83, 0xe8, 0x10, // sub eax, 0x10
    0xe8, 0x1c, 0x00, 0x00, 0x00, // call digits (rel32 +28)
    0x48, 0x83, 0xef, 0x04, // sub rdi, 4
    0xc7, 0x07, 0x76, 0x63, 0x70, 0x75, // mov dword [rdi], "vcpu"
    0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
    0x8a, 0x07, // mov al, [rdi]
    0xee, // out dx, al
    0x48, 0xff, 0xc7, // inc rdi
    0x4c, 0x39, 0xd7, // cmp rdi, r10
    0x75, 0xf5, // jne emit (rel8 -11)
    0xeb, 0x8f, // jmp top (rel8 -113)
    0xb9, 0x0a, 0x00, 0x00, 0x00, // mov ecx, 10
    0x31, 0xd2, // xor edx, edx
    0x48, 0xf7, 0xf1, // div rcx
    0x80, 0xc2, 0x30, // add dl, '0'
    0x48, 0xff, 0xcf, // dec rdi
    0x88, 0x17, // mov [rdi], dl
    0x48, 0x85, 0xc0, // test rax, rax
    0x75, 0xee, // jnz dloop (rel8 -18)
    0xc3, // ret
];

/// The paced program, see the module docs for the assembly.
pub const PACED: [u8; 164] = [
    0x48, 0x89, 0xf7, // mov rdi, rsi
    0x4c, 0x89, 0xc1, // mov rcx, r8
    0x31, 0xc0, // xor eax, eax
    0x48, 0x85, 0xc9, // test rcx, rcx
    0x74, 0x15, // jz report (rel8 +21)
    0xfe, 0x07, // inc byte [rdi]
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 0x1000
    0xff, 0xc0, // inc eax
    0x48, 0xff, 0xc9, // dec rcx
    0x74, 0x05, // jz report (rel8 +5)
    0x83, 0xf8, 0x40, // cmp eax, 64
    0x75, 0xeb, // jne page (rel8 -21)
    0x44, 0x89, 0xca, // mov edx, r9d
    0x66, 0xef, // out dx, ax
    0x48, 0x85, 0xc9, // test rcx, rcx
    0x75, 0xda, // jnz chunk (rel8 -38)
    0x48, 0xff, 0x03, // inc qword [rbx]
    0x48, 0x8b, 0x03, // mov rax, [rbx]
    0x44, 0x89, 0xca, // mov edx, r9d
    0xee, // out dx, al
    0xa9, 0xff, 0x03, 0x00, 0x00, // test eax, 0x3ff
    0x75, 0xc3, // jnz top (rel8 -61)
    0x48, 0x8d, 0xbb, 0x00, 0x08, 0x00, 0x00, // lea rdi, [rbx + 0x800]
    0x49, 0x89, 0xfa, // mov r10, rdi
    0x48, 0xff, 0xcf, // dec rdi
    0xc6, 0x07, 0x0a, // mov byte [rdi], 10
    0xe8, 0x3a, 0x00, 0x00, 0x00, // call digits (rel32 +58)
    0x48, 0x83, 0xef, 0x06, // sub rdi, 6
    0xc7, 0x07, 0x20, 0x70, 0x61, 0x73, // mov dword [rdi], " pas"
    0x66, 0xc7, 0x47, 0x04, 0x73, 0x20, // mov word [rdi + 4], "s "
    0x44, 0x89, 0xc8, // mov eax, r9d
    0x83, 0xe8, 0x10, // sub eax, 0x10
    0xe8, 0x1f, 0x00, 0x00, 0x00, // call digits (rel32 +31)
    0x48, 0x83, 0xef, 0x04, // sub rdi, 4
    0xc7, 0x07, 0x76, 0x63, 0x70, 0x75, // mov dword [rdi], "vcpu"
    0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
    0x8a, 0x07, // mov al, [rdi]
    0xee, // out dx, al
    0x48, 0xff, 0xc7, // inc rdi
    0x4c, 0x39, 0xd7, // cmp rdi, r10
    0x75, 0xf5, // jne emit (rel8 -11)
    0xe9, 0x74, 0xff, 0xff, 0xff, // jmp top (rel32 -140)
    0xb9, 0x0a, 0x00, 0x00, 0x00, // mov ecx, 10
    0x31, 0xd2, // xor edx, edx
    0x48, 0xf7, 0xf1, // div rcx
    0x80, 0xc2, 0x30, // add dl, '0'
    0x48, 0xff, 0xcf, // dec rdi
    0x88, 0x17, // mov [rdi], dl
    0x48, 0x85, 0xc0, // test rax, rax
    0x75, 0xee, // jnz dloop (rel8 -18)
    0xc3, // ret
];

/// The computing program ([`Program::Compute`], `ferry run --vcpu-dirty compute`): a
/// fixed spin per pass that writes no RAM but its pass counter, and one exit per pass as
/// in [`CODE`]. It has no range (`r8` is 0) and prints nothing.
///
/// ```text
///   0  top:    mov  ecx, COMPUTE_SPIN   ; iterations of the spin
///   5  spin:   dec  ecx
///   7          jnz  spin
///   9          inc  qword [rbx]         ; pass counter
///  12          mov  rax, [rbx]
///  15          mov  edx, r9d
///  18          out  dx, al              ; one exit to the VMM per pass
///  19          jmp  top
///  21
/// ```
pub const COMPUTE: [u8; 21] = [
    0xb9, 0x00, 0x00, 0x10, 0x00, // mov ecx, 0x100000
    0xff, 0xc9, // dec ecx
    0x75, 0xfc, // jnz spin (rel8 -4)
    0x48, 0xff, 0x03, // inc qword [rbx]
    0x48, 0x8b, 0x03, // mov rax, [rbx]
    0x44, 0x89, 0xca, // mov edx, r9d
    0xee, // out dx, al
    0xeb, 0xeb, // jmp top (rel8 -21)
];

/// Iterations of [`COMPUTE`]'s spin per pass (about a millisecond at native speed), the
/// immediate of its first instruction.
#[cfg(test)]
pub const COMPUTE_SPIN: u32 = 1 << 20;

/// Offsets of the instructions in [`COMPUTE`].
pub mod compute {
    pub const LOAD_PASS: u64 = 12;
    pub const MOV_PORT: u64 = 15;
    pub const OUT: u64 = 18;
    pub const INSTRUCTIONS: [u64; 8] = [0, 5, 7, 9, 12, 15, 18, 19];
}

/// Pages the paced program writes between two reports (the `cmp eax, 64`).
pub const CHUNK: u64 = 64;

/// How long the VMM holds an idle vCPU's report: one pass of an idle guest.
pub const IDLE_PASS: std::time::Duration = std::time::Duration::from_millis(10);

/// Offsets of the instructions in [`PACED`] that the position logic relies on.
pub mod paced {
    pub const TOP: u64 = 0;
    pub const MOV_RCX: u64 = 3;
    pub const CHUNK: u64 = 6;
    pub const ADD_RDI: u64 = 15;
    pub const INC_PASS: u64 = 44;
    pub const LOAD_PASS: u64 = 47;
    pub const MOV_PORT: u64 = 50;
    pub const OUT: u64 = 53;

    /// Where every instruction of [`super::PACED`] starts, in order.
    pub const INSTRUCTIONS: [u64; 51] = [
        0, 3, 6, 8, 11, 13, 15, 22, 24, 27, 29, 32, 34, 37, 39, 42, 44, 47, 50, 53, 54, 59, 61, 68,
        71, 74, 77, 82, 86, 92, 98, 101, 104, 109, 113, 119, 124, 126, 127, 130, 133, 135, 140,
        145, 147, 150, 153, 156, 158, 161, 163,
    ];
}

/// Which of the two programs a vCPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// [`CODE`]: as fast as it runs, one exit per pass.
    Classic,
    /// [`PACED`]: a report to the VMM every [`CHUNK`] pages.
    Paced,
    /// [`COMPUTE`]: no range, a spin per pass.
    Compute,
}

impl Program {
    /// The program a vCPU with `pages` in its range and a dirty rate of `rate` pages per
    /// second (0: unpaced) runs. An unpaced, non-idle vCPU runs [`CODE`], as every
    /// release before the paced program did, so that such guests stay what they were.
    pub fn for_workload(pages: u64, rate: u64) -> Self {
        if pages > 0 && rate == 0 {
            Self::Classic
        } else {
            Self::Paced
        }
    }

    pub fn code(self) -> &'static [u8] {
        match self {
            Self::Classic => &CODE,
            Self::Paced => &PACED,
            Self::Compute => &COMPUTE,
        }
    }

    /// Where the program starts in guest memory.
    pub fn gpa(self) -> u64 {
        match self {
            Self::Classic => super::layout::CODE_GPA,
            Self::Paced => super::layout::PACED_GPA,
            Self::Compute => super::layout::COMPUTE_GPA,
        }
    }

    /// The program `rip` is in, and its offset there.
    pub fn at(rip: u64) -> Option<(Self, u64)> {
        [Self::Classic, Self::Paced, Self::Compute]
            .into_iter()
            .find_map(|p| {
                let off = rip.checked_sub(p.gpa())?;
                (off < p.code().len() as u64).then_some((p, off))
            })
    }

    /// [`pages_ahead`] for this program.
    pub fn pages_ahead(self, rip_off: u64, rdi: u64, rsi: u64, pages: u64) -> Result<u64, String> {
        match self {
            Self::Classic => pages_ahead(rip_off, rdi, rsi, pages),
            Self::Paced => paced_pages_ahead(rip_off, rdi, rsi, pages),
            Self::Compute if compute::INSTRUCTIONS.contains(&rip_off) => Ok(0),
            Self::Compute => Err(format!(
                "rip at offset {rip_off} of the computing program, not an instruction"
            )),
        }
    }

    /// [`next_out`] for this program.
    pub fn next_out(self, rip_off: u64, pass: u64) -> u8 {
        match self {
            Self::Classic => next_out(rip_off, pass),
            Self::Paced => match rip_off {
                paced::LOAD_PASS | paced::MOV_PORT | paced::OUT => pass as u8,
                _ => pass.wrapping_add(1) as u8,
            },
            Self::Compute => match rip_off {
                compute::LOAD_PASS | compute::MOV_PORT | compute::OUT => pass as u8,
                _ => pass.wrapping_add(1) as u8,
            },
        }
    }
}

/// [`pages_ahead`] in [`PACED`]: from `chunk` to the counter's `inc`, `rdi` walks the
/// range (one page further at the `add` that follows a page's `inc`); before it, and
/// once the counter caught up, no page is ahead.
fn paced_pages_ahead(rip_off: u64, rdi: u64, rsi: u64, pages: u64) -> Result<u64, String> {
    if !paced::INSTRUCTIONS.contains(&rip_off) {
        return Err(format!(
            "rip at offset {rip_off} of the paced program, not an instruction"
        ));
    }
    let walked = || -> Result<u64, String> {
        let off = rdi.checked_sub(rsi).ok_or("rdi below the range start")?;
        if off % 4096 != 0 {
            return Err(format!("rdi {rdi:#x} is not on a page boundary"));
        }
        Ok(off / 4096)
    };
    let done = match rip_off {
        paced::TOP | paced::MOV_RCX => 0,
        paced::ADD_RDI => walked()? + 1,
        o if (paced::CHUNK..=paced::INC_PASS).contains(&o) => walked()?,
        _ => 0,
    };
    if done > pages {
        return Err(format!("{done} pages done, the range has {pages}"));
    }
    Ok(done)
}

/// Offsets of the instructions in [`CODE`] that the position logic relies on.
pub const TOP: u64 = 0;
pub const MOV_RCX: u64 = 3;
pub const PAGE: u64 = 6;
pub const ADD_RDI: u64 = 8;
pub const DEC_RCX: u64 = 15;
pub const JNZ: u64 = 18;
pub const INC_PASS: u64 = 20;
pub const LOAD_PASS: u64 = 23;
pub const MOV_PORT: u64 = 26;
pub const OUT: u64 = 29;
/// The first instruction after the pass's `out`; from here to the end of [`CODE`] the
/// vCPU decides whether to print and prints.
pub const TEST_PRINT: u64 = 30;

/// Where every instruction of [`CODE`] starts, in order.
pub const INSTRUCTIONS: [u64; 41] = [
    0, 3, 6, 8, 15, 18, 20, 23, 26, 29, 30, 35, 37, 44, 47, 50, 53, 58, 62, 68, 74, 77, 80, 85, 89,
    95, 100, 102, 103, 106, 109, 111, 113, 118, 120, 123, 126, 129, 131, 134, 136,
];

/// A console line every this many passes (a power of two: the code tests the low bits).
pub const PRINT_EVERY: u64 = 1024;

/// The first I/O port; vCPU `i` writes to `PORT_BASE + i`.
pub const PORT_BASE: u16 = 0x10;

pub fn port(index: usize) -> u16 {
    PORT_BASE + index as u16
}

/// How many pages at the start of the range are one pass ahead of the counter, for a vCPU
/// stopped at code offset `rip_off` with `rdi` and `rsi` as in its registers.
///
/// Inside the page loop the pages below `rdi` are done (and page `rdi` too once its `inc`
/// has run); after the loop all of them are, until the counter catches up at `inc qword
/// [rbx]`, after which none is, through the `out` and the printing that follow.
pub fn pages_ahead(rip_off: u64, rdi: u64, rsi: u64, pages: u64) -> Result<u64, String> {
    let walked = || -> Result<u64, String> {
        let off = rdi.checked_sub(rsi).ok_or("rdi below the range start")?;
        if off % 4096 != 0 {
            return Err(format!("rdi {rdi:#x} is not on a page boundary"));
        }
        Ok(off / 4096)
    };
    let done = match rip_off {
        TOP | MOV_RCX => 0,
        PAGE | DEC_RCX | JNZ => walked()?,
        ADD_RDI => walked()? + 1,
        INC_PASS => pages,
        LOAD_PASS | MOV_PORT | OUT => 0,
        o if o >= TEST_PRINT && INSTRUCTIONS.contains(&o) => 0,
        other => {
            return Err(format!(
                "rip at code offset {other}, not an instruction of the loop"
            ))
        }
    };
    if done > pages {
        return Err(format!("{done} pages done, the range has {pages}"));
    }
    Ok(done)
}

/// The value of the next `out` of a vCPU stopped at `rip_off` whose counter reads `pass`.
pub fn next_out(rip_off: u64, pass: u64) -> u8 {
    match rip_off {
        LOAD_PASS | MOV_PORT | OUT => pass as u8,
        _ => pass.wrapping_add(1) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::COM1;

    /// The paced program's report and its first instruction after the pass's `out`.
    const PACED_REPORT_OUT: u64 = 37;
    const PACED_TEST_PRINT: u64 = 54;

    /// The console `out`, and the decimal conversion's entry.
    const EMIT_OUT: u64 = 102;
    const DIGITS: u64 = 113;

    /// The instructions in order with their encoded length, as a disassembler reports
    /// them (`objdump -D -b binary -mi386:x86-64 -M intel`).
    const LENGTHS: [(u64, &str); 41] = [
        (3, "mov rdi, rsi"),
        (3, "mov rcx, r8"),
        (2, "inc byte [rdi]"),
        (7, "add rdi, 0x1000"),
        (3, "dec rcx"),
        (2, "jnz page"),
        (3, "inc qword [rbx]"),
        (3, "mov rax, [rbx]"),
        (3, "mov edx, r9d"),
        (1, "out dx, al"),
        (5, "test eax, 0x3ff"),
        (2, "jnz top"),
        (7, "lea rdi, [rbx + 0x800]"),
        (3, "mov r10, rdi"),
        (3, "dec rdi"),
        (3, "mov byte [rdi], 10"),
        (5, "call digits"),
        (4, "sub rdi, 6"),
        (6, "mov dword [rdi], 0x73617020"),
        (6, "mov word [rdi + 4], 0x2073"),
        (3, "mov eax, r9d"),
        (3, "sub eax, 0x10"),
        (5, "call digits"),
        (4, "sub rdi, 4"),
        (6, "mov dword [rdi], 0x75706376"),
        (5, "mov edx, 0x3f8"),
        (2, "mov al, [rdi]"),
        (1, "out dx, al"),
        (3, "inc rdi"),
        (3, "cmp rdi, r10"),
        (2, "jne emit"),
        (2, "jmp top"),
        (5, "mov ecx, 10"),
        (2, "xor edx, edx"),
        (3, "div rcx"),
        (3, "add dl, 0x30"),
        (3, "dec rdi"),
        (2, "mov [rdi], dl"),
        (3, "test rax, rax"),
        (2, "jnz dloop"),
        (1, "ret"),
    ];

    fn at(off: u64) -> usize {
        off as usize
    }

    /// Where a jump or call at `off` lands: rel8 after a one-byte opcode, or rel32
    /// after `call`.
    fn target(off: u64) -> u64 {
        let i = at(off);
        match CODE[i] {
            0x75 | 0xeb => (off as i64 + 2 + CODE[i + 1] as i8 as i64) as u64,
            0xe8 => {
                let rel = i32::from_le_bytes(CODE[i + 1..i + 5].try_into().unwrap());
                (off as i64 + 5 + rel as i64) as u64
            }
            other => panic!("no jump at {off}: opcode {other:#x}"),
        }
    }

    /// [`target`] in [`PACED`], which also has `jz` and a rel32 `jmp`.
    fn paced_target(off: u64) -> u64 {
        let i = at(off);
        match PACED[i] {
            0x74 | 0x75 => (off as i64 + 2 + PACED[i + 1] as i8 as i64) as u64,
            0xe8 | 0xe9 => {
                let rel = i32::from_le_bytes(PACED[i + 1..i + 5].try_into().unwrap());
                (off as i64 + 5 + rel as i64) as u64
            }
            other => panic!("no jump at {off}: opcode {other:#x}"),
        }
    }

    /// [`PACED`]'s instructions as `objdump -M intel` reads them, with their length.
    const PACED_LENGTHS: [(u64, &str); 51] = [
        (3, "mov rdi, rsi"),
        (3, "mov rcx, r8"),
        (2, "xor eax, eax"),
        (3, "test rcx, rcx"),
        (2, "jz report"),
        (2, "inc byte [rdi]"),
        (7, "add rdi, 0x1000"),
        (2, "inc eax"),
        (3, "dec rcx"),
        (2, "jz report"),
        (3, "cmp eax, 0x40"),
        (2, "jne page"),
        (3, "mov edx, r9d"),
        (2, "out dx, ax"),
        (3, "test rcx, rcx"),
        (2, "jnz chunk"),
        (3, "inc qword [rbx]"),
        (3, "mov rax, [rbx]"),
        (3, "mov edx, r9d"),
        (1, "out dx, al"),
        (5, "test eax, 0x3ff"),
        (2, "jnz top"),
        (7, "lea rdi, [rbx + 0x800]"),
        (3, "mov r10, rdi"),
        (3, "dec rdi"),
        (3, "mov byte [rdi], 10"),
        (5, "call digits"),
        (4, "sub rdi, 6"),
        (6, "mov dword [rdi], 0x73617020"),
        (6, "mov word [rdi + 4], 0x2073"),
        (3, "mov eax, r9d"),
        (3, "sub eax, 0x10"),
        (5, "call digits"),
        (4, "sub rdi, 4"),
        (6, "mov dword [rdi], 0x75706376"),
        (5, "mov edx, 0x3f8"),
        (2, "mov al, [rdi]"),
        (1, "out dx, al"),
        (3, "inc rdi"),
        (3, "cmp rdi, r10"),
        (2, "jne emit"),
        (5, "jmp top"),
        (5, "mov ecx, 10"),
        (2, "xor edx, edx"),
        (3, "div rcx"),
        (3, "add dl, 0x30"),
        (3, "dec rdi"),
        (2, "mov [rdi], dl"),
        (3, "test rax, rax"),
        (2, "jnz dloop"),
        (1, "ret"),
    ];

    #[test]
    fn kvm_paced_code_offsets_jumps_and_constants() {
        let mut offsets = Vec::new();
        let mut end = 0;
        for (len, _) in PACED_LENGTHS {
            offsets.push(end);
            end += len;
        }
        assert_eq!(end, PACED.len() as u64);
        assert_eq!(offsets, paced::INSTRUCTIONS);
        let name = |off: u64| PACED_LENGTHS[at_index(off)].1;
        assert_eq!(name(PACED_REPORT_OUT), "out dx, ax");
        assert_eq!(name(paced::OUT), "out dx, al");
        assert_eq!(name(paced::INC_PASS), "inc qword [rbx]");
        assert_eq!(name(paced::LOAD_PASS), "mov rax, [rbx]");
        assert_eq!(name(paced::ADD_RDI), "add rdi, 0x1000");
        assert_eq!(name(PACED_TEST_PRINT), "test eax, 0x3ff");
        // The jumps: into the chunk loop, back to the top, to the shared tail's labels.
        assert_eq!(paced_target(11), 34);
        assert_eq!(paced_target(27), 34);
        assert_eq!(paced_target(32), 13);
        assert_eq!(paced_target(42), paced::CHUNK);
        assert_eq!(paced_target(59), paced::TOP);
        assert_eq!(paced_target(77), 140);
        assert_eq!(paced_target(104), 140);
        assert_eq!(paced_target(133), 124);
        assert_eq!(paced_target(135), paced::TOP);
        assert_eq!(paced_target(161), 145);
        // The same loop body, pass exit and console line as CODE; the chunk size.
        assert_eq!(PACED[13..22], CODE[6..15]);
        assert_eq!(PACED[44..59], CODE[20..35]);
        assert_eq!(PACED[61..77], CODE[37..53]);
        assert_eq!(PACED[82..104], CODE[58..80]);
        assert_eq!(PACED[109..135], CODE[85..111]);
        assert_eq!(PACED[140..], CODE[113..]);
        assert_eq!(PACED[31] as u64, CHUNK);
    }

    fn at_index(off: u64) -> usize {
        paced::INSTRUCTIONS.iter().position(|&o| o == off).unwrap()
    }

    #[test]
    fn kvm_paced_position_follows_the_loop() {
        let rsi = 0x1_0000_0000;
        let p = Program::Paced;
        assert_eq!(p.pages_ahead(paced::TOP, 0x1_07f0, rsi, 100), Ok(0));
        assert_eq!(
            p.pages_ahead(paced::CHUNK, rsi + 64 * 4096, rsi, 100),
            Ok(64)
        );
        assert_eq!(p.pages_ahead(13, rsi + 3 * 4096, rsi, 100), Ok(3));
        assert_eq!(
            p.pages_ahead(paced::ADD_RDI, rsi + 3 * 4096, rsi, 100),
            Ok(4)
        );
        assert_eq!(p.pages_ahead(22, rsi + 4 * 4096, rsi, 100), Ok(4));
        assert_eq!(
            p.pages_ahead(PACED_REPORT_OUT, rsi + 100 * 4096, rsi, 100),
            Ok(100)
        );
        assert_eq!(
            p.pages_ahead(paced::INC_PASS, rsi + 100 * 4096, rsi, 100),
            Ok(100)
        );
        assert_eq!(p.pages_ahead(paced::OUT, rsi + 100 * 4096, rsi, 100), Ok(0));
        assert_eq!(p.pages_ahead(140, 0x1_07f0, rsi, 100), Ok(0));
        // An idle vCPU: nothing is ever ahead.
        assert_eq!(p.pages_ahead(PACED_REPORT_OUT, rsi, rsi, 0), Ok(0));
        assert_eq!(p.pages_ahead(paced::INC_PASS, rsi, rsi, 0), Ok(0));
        assert!(p.pages_ahead(14, rsi, rsi, 100).is_err());
        assert!(p.pages_ahead(PACED.len() as u64, rsi, rsi, 100).is_err());
        assert!(p
            .pages_ahead(paced::ADD_RDI, rsi + 100 * 4096, rsi, 100)
            .is_err());
        assert!(p.pages_ahead(22, rsi + 4096 + 8, rsi, 100).is_err());
        assert_eq!(p.next_out(paced::OUT, 7), 7);
        assert_eq!(p.next_out(paced::LOAD_PASS, 7), 7);
        assert_eq!(p.next_out(PACED_REPORT_OUT, 7), 8);
        assert_eq!(p.next_out(PACED_TEST_PRINT, 255), 0);
    }

    #[test]
    fn kvm_guest_program_is_found_by_rip_and_chosen_by_the_workload() {
        use crate::kvm::layout::{CODE_GPA, PACED_GPA};
        assert_eq!(Program::at(CODE_GPA), Some((Program::Classic, 0)));
        assert_eq!(Program::at(CODE_GPA + 136), Some((Program::Classic, 136)));
        assert_eq!(Program::at(CODE_GPA + 137), None);
        assert_eq!(Program::at(PACED_GPA + 53), Some((Program::Paced, 53)));
        assert_eq!(Program::at(PACED_GPA + 164), None);
        assert_eq!(Program::at(0), None);
        assert_eq!(Program::for_workload(16, 0), Program::Classic);
        assert_eq!(Program::for_workload(16, 1000), Program::Paced);
        assert_eq!(Program::for_workload(0, 0), Program::Paced);
        assert_eq!(
            Program::at(crate::kvm::layout::COMPUTE_GPA + 18),
            Some((Program::Compute, compute::OUT))
        );
        // The spin count is the immediate of the first instruction, and the jumps land
        // on instructions.
        assert_eq!(COMPUTE[1..5], COMPUTE_SPIN.to_le_bytes());
        assert_eq!(9 + (COMPUTE[8] as i8 as i64), 5);
        assert_eq!(21 + (COMPUTE[20] as i8 as i64), 0);
        assert_eq!(Program::Compute.next_out(compute::OUT, 7), 7);
        assert_eq!(Program::Compute.next_out(0, 7), 8);
        assert_eq!(Program::Compute.pages_ahead(19, 0, 0, 0), Ok(0));
        assert!(Program::Compute.pages_ahead(6, 0, 0, 0).is_err());
    }

    #[test]
    fn kvm_guest_code_offsets_match_the_instruction_lengths() {
        let mut offsets = Vec::new();
        let mut end = 0;
        for (len, _) in LENGTHS {
            offsets.push(end);
            end += len;
        }
        assert_eq!(end, CODE.len() as u64);
        assert_eq!(offsets, INSTRUCTIONS);
        for named in [
            TOP, MOV_RCX, PAGE, ADD_RDI, DEC_RCX, JNZ, INC_PASS, LOAD_PASS, MOV_PORT, OUT,
            TEST_PRINT, EMIT_OUT, DIGITS,
        ] {
            assert!(INSTRUCTIONS.contains(&named), "{named}");
        }
        assert_eq!(
            LENGTHS[INSTRUCTIONS.iter().position(|&o| o == OUT).unwrap()].1,
            "out dx, al"
        );
        assert_eq!(
            LENGTHS[INSTRUCTIONS.iter().position(|&o| o == EMIT_OUT).unwrap()].1,
            "out dx, al"
        );
    }

    #[test]
    fn kvm_guest_code_jumps_land_on_their_labels() {
        assert_eq!(target(JNZ), PAGE);
        assert_eq!(target(35), TOP);
        assert_eq!(target(53), DIGITS);
        assert_eq!(target(80), DIGITS);
        assert_eq!(target(109), 100);
        assert_eq!(target(111), TOP);
        assert_eq!(target(134), 118);
        assert_eq!(&CODE[at(ADD_RDI) + 3..at(DEC_RCX)], &4096u32.to_le_bytes());
        assert_eq!(CODE[at(OUT)], 0xee);
        assert_eq!(CODE[at(EMIT_OUT)], 0xee);
        assert_eq!(*CODE.last().unwrap(), 0xc3);
    }

    #[test]
    fn kvm_guest_code_holds_the_constants_the_vmm_relies_on() {
        // The print mask, the vCPU index's port base, the console port.
        assert_eq!(
            u32::from_le_bytes(
                CODE[at(TEST_PRINT) + 1..at(TEST_PRINT) + 5]
                    .try_into()
                    .unwrap()
            ),
            (PRINT_EVERY - 1) as u32
        );
        assert!(PRINT_EVERY.is_power_of_two());
        assert_eq!(CODE[79], PORT_BASE as u8);
        assert_eq!(&CODE[96..98], &COM1.to_le_bytes());
        // The line: "vcpu", index, " pass ", pass, "\n", in a buffer that ends half-way
        // into the control page, clear of the counter below and the stack above.
        assert_eq!(&CODE[91..95], b"vcpu");
        assert_eq!(&CODE[64..68], b" pas");
        assert_eq!(&CODE[72..74], b"s ");
        assert_eq!(CODE[52], b'\n');
        assert_eq!(&CODE[40..44], &0x800u32.to_le_bytes());
    }

    #[test]
    fn kvm_guest_position_follows_the_loop() {
        let rsi = 0x1_0000_0000;
        assert_eq!(pages_ahead(TOP, 0, rsi, 4), Ok(0));
        assert_eq!(pages_ahead(PAGE, rsi + 2 * 4096, rsi, 4), Ok(2));
        assert_eq!(pages_ahead(ADD_RDI, rsi + 2 * 4096, rsi, 4), Ok(3));
        assert_eq!(pages_ahead(JNZ, rsi + 4 * 4096, rsi, 4), Ok(4));
        assert_eq!(pages_ahead(INC_PASS, rsi + 4 * 4096, rsi, 4), Ok(4));
        assert_eq!(pages_ahead(OUT, rsi + 4 * 4096, rsi, 4), Ok(0));
        // Printing: rdi points into the line buffer, not the range.
        assert_eq!(pages_ahead(EMIT_OUT, 0x1_07f0, rsi, 4), Ok(0));
        assert_eq!(pages_ahead(DIGITS, 0x1_07f0, rsi, 4), Ok(0));
        assert!(pages_ahead(7, rsi, rsi, 4).is_err());
        assert!(pages_ahead(101, rsi, rsi, 4).is_err());
        assert!(pages_ahead(CODE.len() as u64, rsi, rsi, 4).is_err());
        assert!(pages_ahead(ADD_RDI, rsi + 4 * 4096, rsi, 4).is_err());
        assert!(pages_ahead(PAGE, rsi - 4096, rsi, 4).is_err());
        assert_eq!(next_out(OUT, 7), 7);
        assert_eq!(next_out(MOV_PORT, 7), 7);
        assert_eq!(next_out(TEST_PRINT, 255), 0);
        assert_eq!(next_out(EMIT_OUT, 1023), 0);
    }
}
