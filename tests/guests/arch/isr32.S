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
	 * A plain iret. On hosts whose KVM emulates kernel-mode code, KVM's
	 * emulator cannot execute iret outside real mode; Manifold completes it
	 * in userspace (crates/vmm/src/complete), so this guest also proves that.
	 */
	iret
