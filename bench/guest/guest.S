/*
 * The benchmark guest for QEMU: ferry's KVM guest workload as a multiboot image.
 *
 * `qemu-system-x86_64 -kernel guest.elf -append "dirty=SIZE fill=SIZE"` loads this 32-bit
 * multiboot ELF. The firmware's loader enters it in 32-bit protected mode without paging,
 * which KVM's PVM backend runs through its instruction emulator; so the CPL-0 part does as
 * little as it can (no loops) before it is in long mode at CPL 3, where the PVM backend runs
 * code natively:
 *
 *   entry32 (CPL 0, 32-bit): load the GDT, CR3 (static page tables), PAE, EFER.LME, paging
 *   entry64 (CPL 0, 64-bit): load the IDT and TSS, iretq to CPL 3
 *   user    (CPL 3, 64-bit): read the command line from the multiboot information, say what
 *           it will do on COM1, fill the fill range once with pseudo-random non-zero bytes,
 *           then either loop over the dirty range for ever or park the vCPU
 *
 * The loop is ferry's (crates/ferry-vmm/src/kvm/guest.rs): increment byte 0 of every 4 KiB
 * page of the range, bump a pass counter, one `out` per pass. Here the `out` writes one '.'
 * to COM1, so the serial output counts the passes. A vCPU with nothing to dirty parks at
 * CPL 0 in `hlt` with interrupts off, so an idle guest costs no CPU.
 *
 * Paced, as ferry's `--dirty-rate` (with "rate=PAGES_PER_S tsc=HZ"): after every 64 pages,
 * and at the end of a pass (counted as 64), the loop waits until the pages written so far
 * are due at the rate, reading the clock with `rdtsc` (CPL 3 may: CR4.TSD is clear) at the
 * TSC frequency it is told; behind the rate it does not wait, as ferry's pacer. Unlike
 * ferry's guest, whose VMM sleeps in the report's exit, it waits by spinning (`pause`), so
 * a paced vCPU keeps a host core busy.
 *
 * Memory (guest-physical = virtual, identity-mapped with 2 MiB pages over the first 4 GiB):
 *   [1 MiB, ...)   this image: code, GDT, IDT, TSS, page tables, stacks
 *   after it       QEMU's multiboot information and command line
 *   RANGE_BASE     the dirty range, then the fill range (they must fit below the first hole)
 *
 * COM1 output, in order:
 *   "ferry-bench-guest dirty=BYTES fill=BYTES ram=BYTES rate=PAGES_PER_S\n"
 *   "filled\n"                      once the fill range is written (only with fill > 0)
 *   "loop\n" then '.' per pass      with dirty > 0
 *   "idle\n"                        with dirty = 0, then nothing
 *   "error: ...\n"                  bad command line or ranges that do not fit; then parks
 *   "!fault VECTOR at RIP\n"       an exception at any level; then parks
 *
 * Sizes on the command line: decimal bytes with an optional K, M or G suffix (powers of 2).
 * bench/compare.py builds it at run time; by hand:
 *   gcc -m32 -c bench/guest/guest.S -o guest.o
 *   ld -m elf_i386 -n -T bench/guest/guest.ld guest.o -o guest.elf
 *   qemu-system-x86_64 -accel kvm -cpu host -m 1G -nodefaults -display none \
 *       -serial stdio -kernel guest.elf -append "dirty=100M"
 */

#define LOAD_ADDR   0x100000
#define RANGE_BASE  0x1000000   /* 16 MiB: clear of the image and the multiboot data */
#define COM1        0x3f8

/* Addresses that must be split into fields (descriptors, gates) are computed from label
 * differences inside this one section, which the assembler resolves itself. */
#define ABS(x)      ((x) - image_start + LOAD_ADDR)

#define SEL_KCODE   0x08
#define SEL_KDATA   0x10
#define SEL_UCODE   (0x18 | 3)
#define SEL_UDATA   (0x20 | 3)
#define SEL_TSS     0x28

#define MB_MAGIC    0x1badb002
#define MB_FLAGS    0x00000002   /* memory information wanted */

/* Page table entry bits: present, writable, user, accessed, dirty (set up front so the
 * CPU never writes the tables), 2 MiB page. */
#define PT_TABLE    0x27
#define PT_HUGE     0xe7

/* The 64-bit TSS, then the I/O permission bitmap for ports 0..1023 and its terminating
 * all-ones byte. PVM ignores IOPL for user mode, so the bitmap is what lets CPL 3 reach
 * COM1. */
#define IO_BITMAP_OFF 0x68
#define TSS_LIMIT   (IO_BITMAP_OFF + 1024 / 8)

    .section .image, "awx"
    .globl image_start
image_start:

/* ---------------------------------------------------------------- multiboot header */
    .p2align 2
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

/* ---------------------------------------------------------------- CPL 0, 32-bit */
    .code32
    .globl entry32
entry32:
    cli
    movl %ebx, mb_info              /* multiboot information (eax = 0x2badb002) */
    lgdt gdt_ptr
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax                /* PAE, OSFXSR, OSXMMEXCPT */
    movl %eax, %cr4
    movl $0xc0000080, %ecx          /* EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0x9fffffff, %eax          /* caches on: clear CD, NW */
    orl $0x80010023, %eax           /* PG, WP, NE, MP, PE */
    movl %eax, %cr0
    ljmp $SEL_KCODE, $entry64

/* ---------------------------------------------------------------- CPL 0, 64-bit */
    .code64
entry64:
    movl $stack0_top, %esp
    lidt idt_ptr(%rip)
    movw $SEL_TSS, %ax
    ltr %ax
    pushq $SEL_UDATA
    pushq $ABS(stack3_top)
    pushq $0x3002                   /* IOPL 3 (for CPUs that honour it), IF clear */
    pushq $SEL_UCODE
    pushq $ABS(user)
    iretq

/* Any exception: "!fault VECTOR at RIP\n" on COM1, then park. One 16-byte stub per
 * vector pushes a zero where the CPU pushes no error code, then the vector. */
    .p2align 4
fault_stubs:
    .set v, 0
    .rept 32
    .if (v == 8) || (v >= 10 && v <= 14) || (v == 17) || (v == 21) || (v == 29) || (v == 30)
    nop
    nop
    .else
    pushq $0
    .endif
    pushq $v
    jmp fault
    .p2align 4
    .set v, v + 1
    .endr
fault:
    leaq park_request(%rip), %rax   /* the idle guest asking to park: not a fault */
    cmpq %rax, 16(%rsp)
    je park
    leaq msg_fault(%rip), %rsi
    call kputs
    movq (%rsp), %rax               /* vector */
    call kputu
    leaq msg_at(%rip), %rsi
    call kputs
    movq 16(%rsp), %rax             /* rip */
    call kputu
    movb $'\n', %al
    movw $COM1, %dx
    outb %al, %dx
    jmp park

kputs:
    movw $COM1, %dx
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  ret

/* kputu: rax in decimal, at CPL 0. */
kputu:
    leaq numbuf_end(%rip), %rdi
    movl $10, %ecx
1:  xorl %edx, %edx
    divq %rcx
    addb $'0', %dl
    decq %rdi
    movb %dl, (%rdi)
    testq %rax, %rax
    jnz 1b
    movq %rdi, %rsi
    jmp kputs

/* The end of a fault, or an idle guest: halt for good. */
park:
    cli
    hlt
    jmp park

/* ---------------------------------------------------------------- CPL 3, 64-bit */
user:
    /* The command line, if the loader passed one (flags bit 2). */
    movl mb_info(%rip), %ebx
    movl 0(%rbx), %eax
    testl $4, %eax
    jz 9f
    movl 16(%rbx), %esi
    call parse_cmdline
    testq %rax, %rax
    jnz bad_cmdline
9:
    /* RAM below the first hole: 1 MiB + mem_upper KiB (flags bit 0). */
    movl 0(%rbx), %eax
    testl $1, %eax
    jz no_meminfo
    movl 8(%rbx), %eax
    shlq $10, %rax
    addq $0x100000, %rax
    movq %rax, ram_low(%rip)

    leaq msg_hello(%rip), %rsi
    call puts
    movq dirty_bytes(%rip), %rax
    call putu
    leaq msg_fill(%rip), %rsi
    call puts
    movq fill_bytes(%rip), %rax
    call putu
    leaq msg_ram(%rip), %rsi
    call puts
    movq ram_low(%rip), %rax
    call putu
    leaq msg_rate(%rip), %rsi
    call puts
    movq rate_pages(%rip), %rax
    call putu
    movb $'\n', %al
    call putc

    /* Both ranges must be whole pages and fit in that RAM. */
    movq dirty_bytes(%rip), %rax
    orq fill_bytes(%rip), %rax
    testl $0xfff, %eax
    jnz bad_size
    movq $RANGE_BASE, %rax
    addq dirty_bytes(%rip), %rax
    jc too_big
    addq fill_bytes(%rip), %rax
    jc too_big
    cmpq ram_low(%rip), %rax
    ja too_big

    /* Fill [RANGE_BASE + dirty, + fill) with xorshift64 output, never zero (as ferry's
     * VMM fills its guest's RAM for --fill). */
    movq fill_bytes(%rip), %rcx
    shrq $3, %rcx
    jz 2f
    movq $RANGE_BASE, %rdi
    addq dirty_bytes(%rip), %rdi
    movabsq $0x9e3779b97f4a7c15, %rax
    xorq dirty_bytes(%rip), %rax
1:  movq %rax, %rdx
    shlq $13, %rdx
    xorq %rdx, %rax
    movq %rax, %rdx
    shrq $7, %rdx
    xorq %rdx, %rax
    movq %rax, %rdx
    shlq $17, %rdx
    xorq %rdx, %rax
    movq %rax, %rdx
    orq $1, %rdx
    movq %rdx, (%rdi)
    addq $8, %rdi
    decq %rcx
    jnz 1b
    leaq msg_filled(%rip), %rsi
    call puts
2:
    movq dirty_bytes(%rip), %r8
    shrq $12, %r8
    jz idle
    leaq msg_loop(%rip), %rsi
    call puts

    /* The workload: the same instructions as ferry's guest, with COM1 as the port. */
    movq $RANGE_BASE, %rsi
    leaq pass_count(%rip), %rbx
    movl $COM1, %r9d
    movq rate_pages(%rip), %rcx
    testq %rcx, %rcx
    jz top
    movq tsc_hz(%rip), %rax
    testq %rax, %rax
    jz top
    /* r10 = TSC cycles per 64 pages at the rate; r11 = when the pages so far are due. */
    shlq $6, %rax
    xorl %edx, %edx
    divq %rcx
    movq %rax, %r10
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %r11
ptop:
    movq %rsi, %rdi
    movq %r8, %rcx
pchunk:
    movl $64, %r12d
ppage:
    incb (%rdi)
    addq $4096, %rdi
    decq %rcx
    jz pend
    decl %r12d
    jnz ppage
    call pwait
    jmp pchunk
pend:
    call pwait
    incq (%rbx)
    movb $'.', %al
    movl %r9d, %edx
    outb %al, %dx
    jmp ptop

/* pwait: 64 more pages are due r10 cycles after the last; spin until then. */
pwait:
    addq %r10, %r11
1:  rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    cmpq %r11, %rax
    jae 2f
    pause
    jmp 1b
2:  ret

top:
    movq %rsi, %rdi
    movq %r8, %rcx
page:
    incb (%rdi)
    addq $4096, %rdi
    decq %rcx
    jnz page
    incq (%rbx)
    movb $'.', %al
    movl %r9d, %edx
    outb %al, %dx
    jmp top

idle:
    leaq msg_idle(%rip), %rsi
    call puts
    jmp park_request

bad_cmdline:
    leaq msg_bad_cmdline(%rip), %rsi
    jmp die
no_meminfo:
    leaq msg_no_meminfo(%rip), %rsi
    jmp die
bad_size:
    leaq msg_bad_size(%rip), %rsi
    jmp die
too_big:
    leaq msg_too_big(%rip), %rsi
die:
    call puts
/* `hlt` at CPL 3 faults (#GP); the handler sees where from and parks the vCPU. (`int` from
 * CPL 3 would be the usual way, but KVM's PVM backend answers it with #UD.) */
park_request:
    hlt

/* parse_cmdline: rsi = NUL-terminated "word key=SIZE ..." (the first word, the image's
 * name, and unknown keys are skipped). Sets dirty_bytes, fill_bytes, rate_pages and tsc_hz. rax = 0, or 1 for
 * a value that is not a size. */
parse_cmdline:
    pushq %rbx
next_word:
    movb (%rsi), %al
    testb %al, %al
    jz parsed
    cmpb $' ', %al
    jne 1f
    incq %rsi
    jmp next_word
1:  leaq key_dirty(%rip), %rdi
    leaq dirty_bytes(%rip), %rbx
    call match_key
    jz value
    leaq key_fill(%rip), %rdi
    leaq fill_bytes(%rip), %rbx
    call match_key
    jz value
    leaq key_rate(%rip), %rdi
    leaq rate_pages(%rip), %rbx
    call match_key
    jz value
    leaq key_tsc(%rip), %rdi
    leaq tsc_hz(%rip), %rbx
    call match_key
    jz value
skip_word:
    movb (%rsi), %al
    testb %al, %al
    jz parsed
    cmpb $' ', %al
    je next_word
    incq %rsi
    jmp skip_word
value:
    call parse_size
    testq %rdx, %rdx
    jnz 2f
    movq %rax, (%rbx)
    jmp next_word
2:  movl $1, %eax
    popq %rbx
    ret
parsed:
    xorl %eax, %eax
    popq %rbx
    ret

/* match_key: ZF set and rsi past the key if the word at rsi starts with the NUL-terminated
 * key at rdi (which ends in '='); rsi unchanged otherwise. */
match_key:
    movq %rsi, %rcx
1:  movb (%rdi), %al
    testb %al, %al
    jz 2f
    cmpb (%rcx), %al
    jne 3f
    incq %rdi
    incq %rcx
    jmp 1b
2:  movq %rcx, %rsi                 /* matched: ZF is set from the test above */
    ret
3:  testq %rsp, %rsp                /* no match: ZF clear */
    ret

/* parse_size: decimal digits at rsi, then optional K/M/G, then a space or NUL.
 * rax = the value, rdx = 0; rdx = 1 if malformed. rsi past the value. */
parse_size:
    xorl %eax, %eax
    xorl %ecx, %ecx                 /* digits seen */
1:  movzbl (%rsi), %edx
    subl $'0', %edx
    cmpl $9, %edx
    ja 2f
    imulq $10, %rax
    addq %rdx, %rax
    incq %rsi
    incl %ecx
    jmp 1b
2:  testl %ecx, %ecx
    jz 8f
    movb (%rsi), %dl
    movl $10, %ecx
    cmpb $'K', %dl
    je 3f
    movl $20, %ecx
    cmpb $'M', %dl
    je 3f
    movl $30, %ecx
    cmpb $'G', %dl
    je 3f
    jmp 4f
3:  shlq %cl, %rax
    incq %rsi
4:  movb (%rsi), %dl
    testb %dl, %dl
    jz 5f
    cmpb $' ', %dl
    jne 8f
5:  xorl %edx, %edx
    ret
8:  movl $1, %edx
    ret

/* puts: the NUL-terminated string at rsi to COM1. */
puts:
    movb (%rsi), %al
    testb %al, %al
    jz 1f
    call putc
    incq %rsi
    jmp puts
1:  ret

putc:
    movw $COM1, %dx
    outb %al, %dx
    ret

/* putu: rax in decimal. */
putu:
    leaq numbuf_end(%rip), %rdi
    movl $10, %ecx
1:  xorl %edx, %edx
    divq %rcx
    addb $'0', %dl
    decq %rdi
    movb %dl, (%rdi)
    testq %rax, %rax
    jnz 1b
    movq %rdi, %rsi
    jmp puts

/* ---------------------------------------------------------------- data */
msg_hello:       .asciz "ferry-bench-guest dirty="
msg_fill:        .asciz " fill="
msg_ram:         .asciz " ram="
msg_filled:      .asciz "filled\n"
msg_loop:        .asciz "loop\n"
msg_idle:        .asciz "idle\n"
msg_fault:       .asciz "!fault "
msg_at:          .asciz " at "
msg_bad_cmdline: .asciz "error: the command line takes dirty=SIZE fill=SIZE rate=N tsc=N (bytes, K, M or G)\n"
msg_no_meminfo:  .asciz "error: the loader gave no memory size\n"
msg_bad_size:    .asciz "error: dirty and fill must be multiples of 4 KiB\n"
msg_too_big:     .asciz "error: 16 MiB + dirty + fill is more than the RAM below the first hole\n"
key_dirty:       .asciz "dirty="
key_fill:        .asciz "fill="
key_rate:        .asciz "rate="
key_tsc:         .asciz "tsc="
msg_rate:        .asciz " rate="

numbuf:          .skip 24
numbuf_end:      .byte 0

    .p2align 3
mb_info:         .quad 0
ram_low:         .quad 0
dirty_bytes:     .quad 0
fill_bytes:      .quad 0
rate_pages:      .quad 0
tsc_hz:          .quad 0

gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .p2align 4
idt_ptr:
    .word idt_end - idt - 1
    .long idt, 0

    .p2align 3
gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* kernel code, 64-bit */
    .quad 0x00cf93000000ffff        /* kernel data */
    .quad 0x00affb000000ffff        /* user code, 64-bit, DPL 3 */
    .quad 0x00cff3000000ffff        /* user data, DPL 3 */
    .word TSS_LIMIT                 /* 64-bit TSS, available */
    .word ABS(tss) & 0xffff
    .byte (ABS(tss) >> 16) & 0xff
    .byte 0x89
    .byte 0
    .byte (ABS(tss) >> 24) & 0xff
    .long 0
    .long 0
gdt_end:

/* Interrupt gates for the exceptions, 0-31. */
.macro gate handler, dpl
    .word ABS(\handler) & 0xffff
    .word SEL_KCODE
    .byte 0
    .byte 0x8e | (\dpl << 5)
    .word (ABS(\handler) >> 16) & 0xffff
    .long 0
    .long 0
.endm
    .p2align 4
idt:
    .set v, 0
    .rept 32
    gate fault_stubs+v*16, 0
    .set v, v + 1
    .endr
idt_end:

    .p2align 4
tss:
    .long 0
    .quad ABS(stack0_top)           /* rsp0: where an interrupt from CPL 3 lands */
    .skip IO_BITMAP_OFF - 12 - 2
    .word IO_BITMAP_OFF
io_bitmap:
    .fill (COM1 / 8), 1, 0xff       /* ports below COM1: denied */
    .byte 0x00                      /* COM1 .. COM1 + 7: allowed */
    .fill (1024 / 8 - COM1 / 8 - 1), 1, 0xff
    .byte 0xff                      /* the terminating byte */

/* Page tables: PML4[0] -> PDPT, PDPT[0..3] -> four page directories of 2 MiB pages,
 * identity-mapping [0, 4 GiB). The RAM above the PCI hole is not mapped: the ranges
 * live below it. */
    .p2align 12
pml4:
    .long ABS(pdpt) + PT_TABLE, 0
    .fill 511, 8, 0
pdpt:
    .set i, 0
    .rept 4
    .long ABS(pd) + i * 4096 + PT_TABLE, 0
    .set i, i + 1
    .endr
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 2048
    .long (i << 21) + PT_HUGE, 0
    .set i, i + 1
    .endr

/* The counter of finished passes, on a page of its own like ferry's control page. */
    .p2align 12
pass_count:
    .quad 0
    .p2align 12
stack0:
    .skip 4096
stack0_top:
stack3:
    .skip 4096
stack3_top:
image_end:
