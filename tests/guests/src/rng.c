/* SPDX-License-Identifier: Apache-2.0 */
/*
 * rng: a virtio-rng driver over PCI (lib/virtio.c): ECAM, BAR, MSI-X,
 * VERSION_1, one request queue. Asks twice for 64 bytes, each request
 * completed by its MSI-X interrupt, prints both in hex and checks that each
 * came whole, is not all zeros and that the two differ.
 */
#include "guest.h"

#define N 64

static u8 buf[2][N];

int guest_main(struct boot_info *bi)
{
	(void)bi;
	static struct virtio_dev d;
	virtio_irq_init();
	if (virtio_init(&d, VIRTIO_ID_RNG, 0) || virtio_negotiate(&d, 0) ||
	    virtio_queue_init(&d, 0, 4, 1))
		return 1;
	virtio_driver_ok(&d);
	int ok = 1;
	for (u32 i = 0; i < 2; i++) {
		struct vbuf b = { buf[i], N, 1 };
		int len = virtq_xfer(&d.q[0], &b, 1);
		print("request %u: %d bytes\n", i, len);
		if (len != N)
			ok = 0;
		print_hex(i ? "rng 1: " : "rng 0: ", buf[i], N);
		u32 nonzero = 0;
		for (u32 k = 0; k < N; k++)
			nonzero |= buf[i][k];
		if (!nonzero) {
			print("all zeros\n");
			ok = 0;
		}
	}
	if (memcmp(buf[0], buf[1], N) == 0) {
		print("the two requests are the same\n");
		ok = 0;
	}
	print("interrupts: %u\n", virtio_irqs);
	print("rng %s\n", ok ? "ok" : "FAILED");
	return ok ? 0 : 1;
}
