/* SPDX-License-Identifier: Apache-2.0 */
/*
 * PVH entry (32-bit protected mode, paging off, EBX = struct hvm_start_info).
 *
 * The PVH ABI leaves the GDT undefined, so load our own before touching any
 * segment register, zero .bss, set up a stack and call pvh_entry(ebx).
 */

/* XEN_ELFNOTE_PHYS32_ENTRY: namesz 4, descsz 4, type 18, "Xen\0", entry. */
	.section .note.Xen, "a", @note
	.p2align 2
	.long 4
	.long 4
	.long 18
	.asciz "Xen"
	.long pvh_start

	.section .head.text, "ax"
	.code32
	.globl pvh_start
pvh_start:
	cli
	cld
	lgdt gdt_desc
	ljmp $0x08, $1f
1:	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl $stack_top, %esp

	/* Zero .bss (the stack is in .stack and not cleared). */
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	shrl $2, %ecx
	xorl %eax, %eax
	rep stosl

	pushl $0		/* no return address worth following */
	pushl %ebx		/* argument: hvm_start_info */
	call pvh_entry
2:	cli
	hlt
	jmp 2b

	.section .rodata
	.p2align 3
gdt:
	.quad 0				/* null */
	.quad 0x00cf9a000000ffff	/* 0x08: 32-bit code, flat */
	.quad 0x00cf92000000ffff	/* 0x10: data, flat */
gdt_end:
	.p2align 1
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.section .stack, "aw", @nobits
	.p2align 4
	.space 16384
	.globl stack_top
stack_top:
