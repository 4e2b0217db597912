/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The setup area ("real-mode kernel") of hello.bzImage: boot sector, Linux
 * setup header (boot protocol 2.12) and a small real-mode setup routine.
 *
 * Loaders that use the 64-bit boot protocol (Manifold, via linux-loader) only
 * read the header: they load the protected-mode part (everything after the
 * setup sectors) at code32_start / pref_address = 1 MiB and enter it at
 * +0x200 in long mode. Loaders that run the setup code (QEMU -kernel) jump to
 * offset 0x200 here in real mode; the code below then does what Linux's setup
 * does, in brief: build a zero page (header copy + BIOS e820 map), enable A20,
 * switch to protected mode and jump to code32_start (startup_32, head64.S)
 * with ESI = zero page.
 *
 * Linked at address 0 (offsets in the setup segment); the linker script
 * provides _setup_sects, _syssize and _init_size. The .org lines pin the
 * header fields to their offsets in Documentation/arch/x86/boot.rst.
 */

#define BP_OFF		0x4000	/* zero page, in the setup segment */
#define STACK_TOP	0x3ff0
#define SMAP		0x534d4150

	.section .setup, "ax"
	.code16
	.globl bootsect
bootsect:
	/* Booted as a boot sector: not supported, just halt. */
	cli
1:	hlt
	jmp 1b

	.org 0x1f1
hdr:
setup_sects:		.byte _setup_sects
root_flags:		.word 0
	.org 0x1f4			/* layout check: gas fails if already past */
syssize:		.long _syssize
ram_size:		.word 0
vid_mode:		.word 0xffff	/* normal VGA */
root_dev:		.word 0
	.org 0x1fe			/* layout check: gas fails if already past */
boot_flag:		.word 0xaa55
	/* offset 0x200: real-mode entry (a 2-byte jump) */
jump:			.byte 0xeb, start_of_setup - header
	.org 0x202			/* layout check: gas fails if already past */
header:			.ascii "HdrS"
	.org 0x206			/* layout check: gas fails if already past */
version:		.word 0x020c	/* boot protocol 2.12 */
realmode_swtch:		.long 0
start_sys_seg:		.word 0x1000
kernel_version:		.word version_str - 0x200
type_of_loader:		.byte 0
	.org 0x211			/* layout check: gas fails if already past */
loadflags:		.byte 0x01	/* LOADED_HIGH */
setup_move_size:	.word 0x8000
	.org 0x214			/* layout check: gas fails if already past */
code32_start:		.long 0x100000
	.org 0x218			/* layout check: gas fails if already past */
ramdisk_image:		.long 0
ramdisk_size:		.long 0
bootsect_kludge:	.long 0
heap_end_ptr:		.word 0
ext_loader_ver:		.byte 0
ext_loader_type:	.byte 0
	.org 0x228			/* layout check: gas fails if already past */
cmd_line_ptr:		.long 0
	.org 0x22c			/* layout check: gas fails if already past */
initrd_addr_max:	.long 0x7fffffff
	.org 0x230			/* layout check: gas fails if already past */
kernel_alignment:	.long 0x100000	/* not relocatable: load at pref_address */
relocatable_kernel:	.byte 0
min_alignment:		.byte 20
	.org 0x236			/* layout check: gas fails if already past */
xloadflags:		.word 0x0001	/* XLF_KERNEL_64: 64-bit entry at +0x200 */
	.org 0x238			/* layout check: gas fails if already past */
cmdline_size:		.long 2047
hardware_subarch:	.long 0
hardware_subarch_data:	.quad 0
payload_offset:		.long 0
payload_length:		.long 0
	.org 0x250			/* layout check: gas fails if already past */
setup_data:		.quad 0
	.org 0x258			/* layout check: gas fails if already past */
pref_address:		.quad 0x100000
	.org 0x260			/* layout check: gas fails if already past */
init_size:		.long _init_size
handover_offset:	.long 0
	.org 0x268			/* layout check: gas fails if already past */
kernel_info_offset:	.long 0
hdr_end:

start_of_setup:
	cli
	cld
	/* Our segment starts 0x200 bytes before the entry point. */
	movw %cs, %ax
	subw $0x20, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw $STACK_TOP, %sp

	/* Zero page: cleared, then the (loader-updated) setup header copied in. */
	movw $BP_OFF, %di
	xorw %ax, %ax
	movw $2048, %cx
	rep stosw
	movw $hdr, %si
	movw $(BP_OFF + 0x1f1), %di
	movw $(hdr_end - hdr), %cx
	rep movsb

	/* e820 map from the BIOS (INT 15h, AX=E820h) */
	xorl %ebx, %ebx
	xorw %bp, %bp
	movw $(BP_OFF + 0x2d0), %di
1:	movl $0xe820, %eax
	movl $SMAP, %edx
	movl $20, %ecx
	int $0x15
	jc 2f
	cmpl $SMAP, %eax
	jne 2f
	addw $20, %di
	incw %bp
	cmpw $128, %bp
	jae 2f
	testl %ebx, %ebx
	jnz 1b
2:	movw %bp, %ax
	movb %al, BP_OFF + 0x1e8	/* e820_entries */

	/* Fast A20 */
	inb $0x92, %al
	orb $0x02, %al
	andb $0xfe, %al
	outb %al, $0x92

	/* Linear addresses: %eax = segment base, %esi = zero page, %ebx = entry */
	cli
	xorl %eax, %eax
	movw %ds, %ax
	shll $4, %eax
	leal BP_OFF(%eax), %esi
	movl code32_start, %ebx
	addl %eax, gdt_desc + 2
	movl $in_pm32, %edx
	addl %eax, %edx
	movl %edx, pm32_ptr
	lgdtl gdt_desc
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl *pm32_ptr

	.code32
in_pm32:
	/* Boot protocol: CS = 0x10, DS = ES = SS = 0x18, ESI = boot_params. */
	movl $0x18, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %fs
	movl %eax, %gs
	movl %eax, %ss
	xorl %ebp, %ebp
	xorl %edi, %edi
	jmp *%ebx

	.p2align 3
gdt:
	.quad 0
	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x10: 32-bit code, flat */
	.quad 0x00cf92000000ffff	/* 0x18: data, flat */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt		/* + segment base, patched at run time */
pm32_ptr:
	.long 0			/* in_pm32 linear address, patched */
	.word 0x10
version_str:
	.asciz "manifold-test-guest hello"
setup_end:
/* ld/bzimage.ld asserts that this ends below the stack and zero page. */
