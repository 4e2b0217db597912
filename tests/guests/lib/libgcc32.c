/* SPDX-License-Identifier: Apache-2.0 */
/*
 * 64-bit division helpers that gcc calls in 32-bit code. The guests avoid
 * 64-bit division, but these keep an accidental one from breaking the link
 * (no 32-bit libgcc is installed on the build machines).
 */
#include "guest.h"

#ifndef __x86_64__
static u64 udivmod(u64 n, u64 d, u64 *rem)
{
	u64 q = 0, r = 0;
	if (!d) {
		/* Divide by zero: behave like the hardware. */
		__asm__ volatile("ud2");
	}
	for (int i = 63; i >= 0; i--) {
		r = (r << 1) | ((n >> i) & 1);
		if (r >= d) {
			r -= d;
			q |= 1ull << i;
		}
	}
	if (rem)
		*rem = r;
	return q;
}

u64 __udivdi3(u64 n, u64 d);
u64 __umoddi3(u64 n, u64 d);
u64 __udivdi3(u64 n, u64 d) { return udivmod(n, d, NULL); }
u64 __umoddi3(u64 n, u64 d)
{
	u64 r;
	udivmod(n, d, &r);
	return r;
}
#endif
