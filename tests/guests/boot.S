/* Entry paths of the kvmig test guest.
 *
 *  _start32: Multiboot v1 entry (QEMU -kernel, kvmig's ELF32 loader): 32-bit protected mode,
 *            paging off. Code here is emulated on kvm-pvm, so it only builds a boot identity
 *            map of 0..4 GiB (2048 stores) and enters long mode.
 *  _start64: kvmig's 64-bit loader: already in long mode, RDI = multiboot info.
 *  trampoline_start..end: AP entry, copied to TRAMPOLINE_PA; real mode -> long mode.
 * All of them end in C (bsp_main / ap_main) at CPL0, which then iretq's to CPL3. */

#define KSTACK_SIZE 8192
#define TRAMPOLINE_PA 0x8000
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, want mem_* and mmap */
#define TRAMP(sym) (TRAMPOLINE_PA + ((sym) - trampoline_start))

  .section .multiboot, "a"
  .align 4
  .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

/* GDT: selectors 0x08/0x10 match the 64-bit entry contract; 0x18 is 32-bit code for the boot
 * and AP paths; 0x23/0x2b are user data/code; TSS descriptors follow, 16 bytes per vCPU. */
  .section .data
  .align 16
  .globl gdt, gdt_tss
gdt:
  .quad 0
  .quad 0x00af9a000000ffff /* 0x08 kernel code, 64-bit */
  .quad 0x00cf92000000ffff /* 0x10 kernel data */
  .quad 0x00cf9a000000ffff /* 0x18 kernel code, 32-bit */
  .quad 0x00cff2000000ffff /* 0x20 user data (DPL3) */
  .quad 0x00affa000000ffff /* 0x28 user code, 64-bit (DPL3) */
gdt_tss:
  .fill 2 * 32, 8, 0       /* 0x30 + 16 * vcpu: TSS, filled by kernel.c */
gdt_end:
  .align 8
  .globl gdt_ptr
gdt_ptr:
  .word gdt_end - gdt - 1
  .quad gdt

  .section .bss
  .align 4096
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd:   .skip 4 * 4096
  .align 16
  .globl kstacks
kstacks: .skip 32 * KSTACK_SIZE

  .section .text
  .code32
  .globl _start32
_start32:
  cli
  cld
  xor %esi, %esi
  cmp $0x2BADB002, %eax
  jne 1f
  mov %ebx, %esi            /* multiboot info; 0 tells bsp_main the magic was wrong */
1:
  lgdt gdt_ptr
  ljmp $0x18, $2f
2:
  mov $0x10, %eax
  mov %eax, %ds
  mov %eax, %es
  mov %eax, %ss
  mov %eax, %fs
  mov %eax, %gs
  mov $(kstacks + KSTACK_SIZE), %esp
  /* Boot identity map of 0..4 GiB; bss is zero, so only present entries are written.
   * kernel.c replaces it with the real map. Every instruction here is emulated on kvm-pvm,
   * so 1 GiB pages (4 stores) when CPUID 0x80000001:EDX[26] has them, else 2 MiB (2048). */
  movl $(boot_pdpt + 3), boot_pml4
  mov $0x80000000, %eax
  cpuid
  cmp $0x80000001, %eax
  jb 8f
  mov $0x80000001, %eax
  cpuid
  bt $26, %edx
  jnc 8f
  mov $0x83, %eax           /* P, RW, PS */
  xor %ecx, %ecx
9:
  mov %eax, boot_pdpt(, %ecx, 8)
  add $0x40000000, %eax
  inc %ecx
  cmp $4, %ecx
  jb 9b
  jmp 10f
8:
  mov $(boot_pd + 3), %eax
  xor %ecx, %ecx
3:
  mov %eax, boot_pdpt(, %ecx, 8)
  add $4096, %eax
  inc %ecx
  cmp $4, %ecx
  jb 3b
  mov $0x83, %eax
  xor %ecx, %ecx
4:
  mov %eax, boot_pd(, %ecx, 8)
  add $0x200000, %eax
  inc %ecx
  cmp $2048, %ecx
  jb 4b
10:
  mov $boot_pml4, %eax
  mov %eax, %cr3
  mov %cr4, %eax
  or $0x20, %eax            /* PAE */
  mov %eax, %cr4
  mov $0xC0000080, %ecx     /* EFER.LME */
  rdmsr
  or $0x100, %eax
  wrmsr
  mov %cr0, %eax
  and $0x9fffffff, %eax     /* caches on (clear CD, NW) */
  or $0x80000001, %eax      /* PG, PE */
  mov %eax, %cr0
  ljmp $0x08, $from32

  .code64
from32:
  mov %esi, %edi
  jmp common64

  .globl _start64
_start64:
  cli
  cld
common64:
  lgdt gdt_ptr(%rip)
  mov $0x10, %eax
  mov %eax, %ds
  mov %eax, %es
  mov %eax, %ss
  mov %eax, %fs
  mov %eax, %gs
  lea kstacks + KSTACK_SIZE(%rip), %rsp
  pushq $0x08
  lea 5f(%rip), %rax
  push %rax
  lretq
5:
  call bsp_main
6:
  hlt
  jmp 6b

/* AP entry in long mode, on the boot GDT loaded by the trampoline. */
ap_entry64:
  mov $0x10, %eax
  mov %eax, %ds
  mov %eax, %es
  mov %eax, %ss
  mov %eax, %fs
  mov %eax, %gs
  mov $1, %eax
  lock xadd %eax, ap_next(%rip)
  mov %eax, %edi            /* vCPU index, 1..N-1 in start order */
  mov %rdi, %rax
  shl $13, %rax             /* * KSTACK_SIZE */
  lea kstacks + KSTACK_SIZE(%rax), %rsp
  call ap_main
7:
  hlt
  jmp 7b

/* enter_user(rip, rsp, arg): iretq to CPL3 with IOPL=3 (port I/O allowed), IF=0. */
  .globl enter_user
enter_user:
  mov $0x23, %eax
  mov %eax, %ds
  mov %eax, %es
  mov %eax, %fs
  mov %eax, %gs
  pushq $0x23
  push %rsi
  pushq $0x3002
  pushq $0x2b
  push %rdi
  mov %rdx, %rdi
  iretq

/* Exception stubs: push a zero error code where the CPU does not, then the vector. */
  .macro isr vec
isr_\vec:
  .if (\vec == 8) || (\vec >= 10 && \vec <= 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
  .else
  pushq $0
  .endif
  pushq $\vec
  jmp isr_common
  .endm
  .altmacro
  .set i, 0
  .rept 32
  isr %i
  .set i, i + 1
  .endr
/* Saves the registers C may clobber (struct trap_frame in kernel.c); trap_handler either
 * returns (handled: resume) or ends the VM. RSP is 16-byte aligned here: the CPU aligns it
 * before pushing the frame, and 16 pushed words keep it so. */
isr_common:
  push %rax
  push %rcx
  push %rdx
  push %rsi
  push %rdi
  push %r8
  push %r9
  push %r10
  push %r11
  mov %rsp, %rdi
  call trap_handler
  pop %r11
  pop %r10
  pop %r9
  pop %r8
  pop %rdi
  pop %rsi
  pop %rdx
  pop %rcx
  pop %rax
  add $16, %rsp
  iretq

/* The console system call (see console.c): RDI = bytes, RSI = length. It stays on the
 * caller's stack: kernel and user share memory here and nothing interrupts (IF=0), and the
 * guest is built with -mno-red-zone. */
  .globl syscall_entry
syscall_entry:
  push %rcx                 /* user RIP */
  push %r11                 /* user RFLAGS */
  call console_syscall
  pop %r11
  pop %rcx
  /* iretq rather than sysretq: kvm-pvm raises #GP on this sysretq, iretq works everywhere. */
  mov %rsp, %rax
  pushq $0x23
  push %rax
  push %r11
  pushq $0x2b
  push %rcx
  iretq

  .section .rodata
  .align 8
  .globl isr_table
  .macro isr_addr vec
  .quad isr_\vec
  .endm
isr_table:
  .set i, 0
  .rept 32
  isr_addr %i
  .set i, i + 1
  .endr

  .section .data
  .align 4
ap_next: .long 1

/* AP trampoline: position-dependent on TRAMPOLINE_PA (SIPI vector 0x08), copied there by
 * kernel.c, which also fills in trampoline_cr3. */
  .section .text
  .code16
  .globl trampoline_start, trampoline_end, trampoline_cr3
trampoline_start:
  cli
  cld
  xor %ax, %ax
  mov %ax, %ds
  lgdtl TRAMP(tramp_gdt_ptr)
  mov %cr0, %eax
  and $0x9fffffff, %eax     /* INIT leaves CD/NW set: turn caches on */
  or $1, %eax
  mov %eax, %cr0
  ljmpl $0x18, $TRAMP(tramp_pm32)
  .code32
tramp_pm32:
  mov $0x10, %eax
  mov %eax, %ds
  mov %eax, %es
  mov %eax, %ss
  mov %cr4, %eax
  or $0x20, %eax
  mov %eax, %cr4
  mov TRAMP(trampoline_cr3), %eax
  mov %eax, %cr3
  mov $0xC0000080, %ecx
  rdmsr
  or $0x100, %eax
  wrmsr
  mov %cr0, %eax
  or $0x80000001, %eax
  mov %eax, %cr0
  ljmp $0x08, $ap_entry64
  .align 4
trampoline_cr3: .long 0
tramp_gdt_ptr:
  .word gdt_end - gdt - 1
  .long gdt
trampoline_end:
  .code64
  .section .note.GNU-stack, "", @progbits
