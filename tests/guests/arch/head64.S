/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Heads of the 64-bit guests (hello.bzImage and hello64.elf).
 *
 * The linker scripts put startup_32 at load address + 0 (code32_start, the
 * 32-bit boot protocol entry) and startup_64 at load address + 0x200 (the
 * 64-bit boot protocol entry that Manifold uses).
 *
 * startup_64: long mode, identity-mapped, RSI = struct boot_params.
 * startup_32: flat 32-bit protected mode, paging off, ESI = struct boot_params
 *   (how QEMU, via the real-mode setup in bzsetup.S, and 32-bit loaders enter).
 *   Builds a 4 GiB identity map with 2 MiB pages and switches to long mode.
 */

#ifndef BOOT_KIND
#error "BOOT_KIND must be defined (\"bzimage\" or \"elf64\")"
#endif

#define GDT_CODE64 0x10		/* same selectors as Linux's __BOOT_CS/__BOOT_DS */
#define GDT_DATA 0x18

	.section .head32, "ax"
	.code32
	.globl startup_32
startup_32:
	cli
	cld
	lgdt gdt_desc
	movl $GDT_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs

	/* Clear the 6 page-table pages: PML4, PDPT, 4 page directories. */
	movl $pgtables, %edi
	movl $(6 * 4096 / 4), %ecx
	xorl %eax, %eax
	rep stosl

	/* PML4[0] -> PDPT; PDPT[0..3] -> PD0..PD3 */
	movl $pgtables, %ebx
	leal 0x1000 + 0x3(%ebx), %eax
	movl %eax, 0(%ebx)
	leal 0x2000 + 0x3(%ebx), %eax
	movl $4, %ecx
	leal 0x1000(%ebx), %edi
1:	movl %eax, (%edi)
	addl $0x1000, %eax
	addl $8, %edi
	decl %ecx
	jnz 1b

	/* PD entries: 2048 x 2 MiB pages (present, writable, PS) */
	leal 0x2000(%ebx), %edi
	movl $0x83, %eax
	movl $2048, %ecx
2:	movl %eax, (%edi)
	addl $0x200000, %eax
	addl $8, %edi
	decl %ecx
	jnz 2b

	/* PAE, CR3, EFER.LME, paging */
	movl %cr4, %eax
	orl $0x20, %eax
	movl %eax, %cr4
	movl %ebx, %cr3
	movl $0xC0000080, %ecx
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax
	movl %eax, %cr0
	/* ESI (boot_params) carries over into RSI. */
	ljmp $GDT_CODE64, $startup_64

	.section .head.text, "ax"
	.code64
	.globl startup_64
startup_64:
	cli
	cld
	/* Own GDT: the loader's may live in memory we do not know about. */
	lgdt gdt_desc(%rip)
	movl $GDT_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	leaq stack_top(%rip), %rsp
	pushq $GDT_CODE64
	leaq 1f(%rip), %rax
	pushq %rax
	lretq
1:
	/* Zero .bss (not .pgtables, which may be live, nor .stack). */
	movq %rsi, %r12
	leaq __bss_start(%rip), %rdi
	leaq __bss_end(%rip), %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq

	movq %r12, %rdi		/* argument: boot_params */
	pushq $0		/* fake return address; keeps %rsp 16-byte aligned at entry */
	jmp lm_entry

	.section .rodata
	.globl boot_kind
boot_kind:
	.asciz BOOT_KIND

	.p2align 3
gdt:
	.quad 0				/* 0x00 null */
	.quad 0				/* 0x08 unused */
	.quad 0x00af9a000000ffff	/* 0x10: 64-bit code */
	.quad 0x00cf92000000ffff	/* 0x18: data, flat */
	.quad 0x00cf9a000000ffff	/* 0x20: 32-bit code, flat */
gdt_end:
	.p2align 1
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

	.section .pgtables, "aw", @nobits
	.p2align 12
pgtables:
	.space 6 * 4096

	.section .stack, "aw", @nobits
	.p2align 4
	.space 16384
	.globl stack_top
stack_top:
