/* SPDX-License-Identifier: Apache-2.0 */
/*
 * 256 interrupt stubs, 16 bytes apart (idt32.c computes their addresses).
 * Each pushes a dummy error code when the CPU does not, then the vector.
 * Handlers run with interrupts off and must not enable them.
 */
	.text
	.code32
	.globl isr_stubs
	.p2align 4
isr_stubs:
	.set vec, 0
	.rept 256
	.p2align 4
	.if vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30
	pushl $vec
	.else
	pushl $0
	pushl $vec
	.endif
	jmp isr_common
	.set vec, vec + 1
	.endr

isr_common:
	pushal
	cld
	pushl %esp		/* struct int_frame * */
	call interrupt_dispatch
	addl $4, %esp
	popal
	addl $8, %esp		/* vector, error code; left: EIP, CS, EFLAGS */

	/*
	 * Return without iret: KVM's instruction emulator, which runs all guest
	 * kernel code on our development hosts, does not implement iret outside
	 * real mode (the vCPU stops with an emulation failure). Between code at
	 * the same privilege level iret only restores EFLAGS and returns to
	 * CS:EIP with CS unchanged, so do that by hand. Only interrupts taken
	 * with IF=1 return (the dispatcher ends the guest on anything else):
	 * restore EFLAGS with IF clear, then "sti; ret", whose interrupt shadow
	 * keeps a new interrupt from arriving before the ret.
	 */
	pushl %eax		/* [eax][eip][cs][eflags] */
	movl 4(%esp), %eax
	xchgl %eax, 12(%esp)	/* [eax][eip][cs][eip], %eax = eflags */
	andl $~0x200, %eax
	movl %eax, 8(%esp)	/* [eax][eip][eflags & ~IF][eip] */
	popl %eax
	addl $4, %esp		/* [eflags & ~IF][eip] */
	popfl
	sti
	ret
