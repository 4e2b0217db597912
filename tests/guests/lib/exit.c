/* SPDX-License-Identifier: Apache-2.0 */
#include "guest.h"

void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt" : : : "memory");
}

void debug_exit(u8 v)
{
	outb(DEBUG_EXIT_PORT, v);
	halt_forever();
}
