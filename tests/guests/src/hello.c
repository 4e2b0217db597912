/* SPDX-License-Identifier: Apache-2.0 */
/*
 * hello: the boot-protocol guest. Built three ways from this one file:
 * hello-pvh.elf (-m32, PVH), hello.bzImage and hello64.elf (-m64, 64-bit
 * Linux boot protocol). Proves that the VMM loaded the image, entered it in
 * the right mode with the right boot-info pointer, and passed the command
 * line, the e820 map and (optionally) an initramfs.
 */
#include "guest.h"

#define CMDLINE_MAX 4096

int guest_main(struct boot_info *bi)
{
	print("Hello from Manifold (%s)\n", bi->kind);
	print("cmdline: %.*s\n", CMDLINE_MAX, bi->cmdline);
	print("memory: %llu KiB\n", bi->ram_bytes >> 10);
	if (bi->initrd_size) {
		if (bi->initrd_addr + bi->initrd_size > 0x100000000ull) {
			print("initramfs: %llu bytes, above 4 GiB\n", bi->initrd_size);
			return 1;
		}
		u32 sum = byte_sum((const u8 *)(uptr)bi->initrd_addr, bi->initrd_size);
		print("initramfs: %llu bytes, sum %u\n", bi->initrd_size, sum);
	}
	return 0;
}
