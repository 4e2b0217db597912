/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Real-mode AP trampoline for smp-pvh.elf. The BSP copies tramp_start ..
 * tramp_end to a page below 1 MiB and sends INIT, SIPI, SIPI with that
 * page's number as the vector; each AP starts here at CS:IP = page:0.
 *
 * The AP reads its APIC id (CPUID leaf 1, EBX[31:24]), takes the spinlock,
 * prints "AP <id> online", increments the counter, releases the lock and
 * halts. Position-independent inside its segment: only offsets from
 * tramp_start are used. Whoever holds the lock owns the shared stack at the
 * top of the page.
 */
#define OFF(x) x - tramp_start
#define COM1 0x3f8

	.section .text16, "ax"
	.code16
	.globl tramp_start, tramp_end, tramp_lock, tramp_count
tramp_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds

	movl $1, %eax
	cpuid
	shrl $24, %ebx			/* %bl = initial APIC id */

	/* Spinlock: test-and-test-and-set with xchg (implicitly locked). */
1:	movb $1, %al
	xchgb %al, OFF(tramp_lock)
	testb %al, %al
	jz 3f
2:	pause
	cmpb $0, OFF(tramp_lock)
	jne 2b
	jmp 1b

3:	movw %cs, %ax
	movw %ax, %ss
	movw $0x1000, %sp		/* top of the trampoline page */

	movw $OFF(msg_ap), %si
	call puts16
	movb %bl, %al
	call putdec16
	movw $OFF(msg_online), %si
	call puts16

	lock incl OFF(tramp_count)
	movb $0, OFF(tramp_lock)	/* release */

4:	cli
	hlt
	jmp 4b

/* Print the NUL-terminated string at %ds:%si. */
puts16:
	lodsb
	testb %al, %al
	jz 1f
	call putc16
	jmp puts16
1:	ret

/* Print %al (0-255) in decimal. */
putdec16:
	xorb %ch, %ch			/* digit count */
	movb $10, %cl
1:	xorb %ah, %ah
	divb %cl			/* %al = quotient, %ah = remainder */
	pushw %ax
	incb %ch
	testb %al, %al
	jnz 1b
2:	popw %ax
	movb %ah, %al
	addb $'0', %al
	call putc16
	decb %ch
	jnz 2b
	ret

/* Print %al on COM1 once the transmit holding register is empty. */
putc16:
	pushw %dx
	pushw %ax
	movw $(COM1 + 5), %dx
1:	inb %dx, %al
	testb $0x20, %al
	jz 1b
	popw %ax
	movw $COM1, %dx
	outb %al, %dx
	popw %dx
	ret

msg_ap:
	.asciz "AP "
msg_online:
	.asciz " online\n"
	.p2align 2
tramp_lock:
	.long 0
tramp_count:
	.long 0
tramp_end:
/* ld/pvh.ld asserts that the trampoline leaves room for the stack. */
