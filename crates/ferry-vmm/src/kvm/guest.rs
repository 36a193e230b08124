//! The guest program: a few bytes of 64-bit code that run at CPL 3.
//!
//! Encoded by hand so that building ferry needs no assembler. Every vCPU runs the same
//! code; what differs is held in registers the VMM sets before the first entry and that
//! the code never changes:
//!
//! | register | meaning |
//! |---|---|
//! | `rsi` | guest-physical (= virtual, identity map) address of the vCPU's range |
//! | `r8`  | number of 4 KiB pages in the range (at least 1) |
//! | `rbx` | address of the vCPU's control page; the pass counter is the `u64` at `[rbx]` |
//! | `dx`  | I/O port of the vCPU, [`port`]`(index)` |
//!
//! ```text
//!  0  top:   mov  rdi, rsi          ; start of the range
//!  3         mov  rcx, r8           ; pages left
//!  6  page:  inc  byte [rdi]        ; byte 0 of the page
//!  8         add  rdi, 4096
//! 15         dec  rcx
//! 18         jnz  page
//! 20         inc  qword [rbx]       ; pass counter, after the whole range is written
//! 23         mov  rax, [rbx]
//! 26         out  dx, al            ; one exit to the VMM per pass
//! 27         jmp  top
//! 29
//! ```
//!
//! So between passes every page of the range holds the low byte of the pass counter;
//! during a pass a prefix of the range is one ahead of it. [`pages_ahead`] says how long
//! that prefix is from the registers, and the VMM checks it against memory.

/// The program, see the module docs for the assembly.
pub const CODE: [u8; 29] = [
    0x48, 0x89, 0xf7, // mov rdi, rsi
    0x4c, 0x89, 0xc1, // mov rcx, r8
    0xfe, 0x07, // inc byte [rdi]
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 0x1000
    0x48, 0xff, 0xc9, // dec rcx
    0x75, 0xf2, // jnz page (rel8 -14)
    0x48, 0xff, 0x03, // inc qword [rbx]
    0x48, 0x8b, 0x03, // mov rax, [rbx]
    0xee, // out dx, al
    0xeb, 0xe3, // jmp top (rel8 -29)
];

/// Offsets of the instructions in [`CODE`] that the position logic relies on.
pub const TOP: u64 = 0;
pub const MOV_RCX: u64 = 3;
pub const PAGE: u64 = 6;
pub const ADD_RDI: u64 = 8;
pub const DEC_RCX: u64 = 15;
pub const JNZ: u64 = 18;
pub const INC_PASS: u64 = 20;
pub const LOAD_PASS: u64 = 23;
pub const OUT: u64 = 26;
pub const JMP: u64 = 27;

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
/// [rbx]`, after which none is.
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
        LOAD_PASS | OUT | JMP => 0,
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
        LOAD_PASS | OUT => pass as u8,
        _ => pass.wrapping_add(1) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The instructions in order with their encoded length, as a disassembler reports
    /// them (`objdump -D -b binary -mi386:x86-64`).
    const LENGTHS: [(u64, &str); 10] = [
        (3, "mov rdi, rsi"),
        (3, "mov rcx, r8"),
        (2, "inc byte [rdi]"),
        (7, "add rdi, 0x1000"),
        (3, "dec rcx"),
        (2, "jnz page"),
        (3, "inc qword [rbx]"),
        (3, "mov rax, [rbx]"),
        (1, "out dx, al"),
        (2, "jmp top"),
    ];

    #[test]
    fn kvm_guest_code_offsets_match_the_instruction_lengths() {
        let mut offsets = Vec::new();
        let mut at = 0;
        for (len, _) in LENGTHS {
            offsets.push(at);
            at += len;
        }
        assert_eq!(at, CODE.len() as u64);
        assert_eq!(
            offsets,
            [TOP, MOV_RCX, PAGE, ADD_RDI, DEC_RCX, JNZ, INC_PASS, LOAD_PASS, OUT, JMP]
        );
    }

    #[test]
    fn kvm_guest_code_jumps_land_on_their_labels() {
        let rel = |at: u64| CODE[at as usize + 1] as i8 as i64;
        assert_eq!(CODE[JNZ as usize], 0x75);
        assert_eq!(JNZ as i64 + 2 + rel(JNZ), PAGE as i64);
        assert_eq!(CODE[JMP as usize], 0xeb);
        assert_eq!(JMP as i64 + 2 + rel(JMP), TOP as i64);
        assert_eq!(
            &CODE[ADD_RDI as usize + 3..DEC_RCX as usize],
            &4096u32.to_le_bytes()
        );
        assert_eq!(CODE[OUT as usize], 0xee);
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
        assert!(pages_ahead(7, rsi, rsi, 4).is_err());
        assert!(pages_ahead(ADD_RDI, rsi + 4 * 4096, rsi, 4).is_err());
        assert!(pages_ahead(PAGE, rsi - 4096, rsi, 4).is_err());
        assert_eq!(next_out(OUT, 7), 7);
        assert_eq!(next_out(JMP, 255), 0);
    }
}
