/* SPDX-License-Identifier: Apache-2.0 */
/* reset: i8042 CPU reset (0xFE to port 0x64). Proves the VMM resets/stops the VM. */
#include "guest.h"

int guest_main(struct boot_info *bi)
{
	(void)bi;
	print("resetting\n");
	outb(0x64, 0xFE);
	/* A reset need not take effect on the very next instruction. */
	delay_loop(20000);
	print("reset failed\n");
	return 1;
}
