/* SPDX-License-Identifier: Apache-2.0 */
/*
 * pio-loop: n byte writes to port 0x80 in a tight loop (exit round-trip
 * benchmark). n comes from the command line (n=200000 by default).
 */
#include "guest.h"

int guest_main(struct boot_info *bi)
{
	u32 n = 200000;
	const char *v = cmdline_find(bi->cmdline, "n");
	if (v) {
		int ok;
		u64 x = parse_u64(v, &ok);
		if (!ok || x > 0xFFFFFFFFull) {
			print("bad n=%.20s\n", v);
			return 1;
		}
		n = (u32)x;
	}
	print("start\n");
	if (n) {
		u32 count = n;
		__asm__ volatile("1: outb %%al, $0x80\n\t"
				 "decl %0\n\t"
				 "jnz 1b"
				 : "+r"(count)
				 : "a"(0x55)
				 : "memory");
	}
	print("done %u\n", n);
	return 0;
}
