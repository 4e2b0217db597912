/* SPDX-License-Identifier: Apache-2.0 */
/* String helpers; gcc may also emit calls to memset/memcpy on its own. */
#include "guest.h"

void *memset(void *d, int c, usize n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, usize n)
{
	u8 *dp = d;
	const u8 *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memmove(void *d, const void *s, usize n)
{
	u8 *dp = d;
	const u8 *sp = s;
	if (dp <= sp || dp >= sp + n)
		return memcpy(d, s, n);
	while (n--)
		dp[n] = sp[n];
	return d;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

usize strlen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

usize strnlen(const char *s, usize max)
{
	usize n = 0;
	while (n < max && s[n])
		n++;
	return n;
}

void delay_loop(u32 n)
{
	while (n--)
		cpu_relax();
}
