/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fault: an undefined instruction with an empty IDT, so the #UD cannot be delivered: a triple
 * fault. Proves the VMM ends the VM with a non-zero status and a register dump.
 */
#include "guest.h"

int guest_main(struct boot_info *bi)
{
	struct {
		u16 limit;
		u32 base;
	} __attribute__((packed)) empty = { 0, 0 };

	(void)bi;
	print("faulting\n");
	__asm__ volatile("lidt %0\n\tmovl $0xfa017, %%eax\n\tud2" : : "m"(empty) : "eax");
	print("fault survived\n");
	return 1;
}
