/* SPDX-License-Identifier: Apache-2.0 */
/* idle: prints "ready" and halts with interrupts off, forever (memory benchmark). */
#include "guest.h"

int guest_main(struct boot_info *bi)
{
	(void)bi;
	print("ready\n");
	halt_forever();
}
