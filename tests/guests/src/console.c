/* SPDX-License-Identifier: Apache-2.0 */
/*
 * console: a virtio-console driver over PCI (lib/virtio.c), one port, no
 * MULTIPORT: receiveq 0, transmitq 1, both on MSI-X. Sends
 * "hello from hvc0\n" through the transmit queue and prints "console sent"
 * on COM1. With "read=1" on the command line it then posts receive buffers
 * and collects what arrives until a '\n', and prints
 * "console got: <line>" on COM1.
 */
#include "guest.h"

#define RXBUFS 4
#define RXLEN 32

static const char hello[] = "hello from hvc0\n";
static u8 rx[RXBUFS][RXLEN];
static char line[600];

int guest_main(struct boot_info *bi)
{
	static struct virtio_dev d;
	virtio_irq_init();
	if (virtio_init(&d, VIRTIO_ID_CONSOLE, 0) || virtio_negotiate(&d, 0) ||
	    virtio_queue_init(&d, 0, 8, 1) || virtio_queue_init(&d, 1, 8, 1))
		return 1;
	virtio_driver_ok(&d);

	struct vbuf out = { (void *)hello, sizeof(hello) - 1, 0 };
	int r = virtq_xfer(&d.q[1], &out, 1);
	if (r < 0) {
		print("transmit failed\n");
		return 1;
	}
	print("console sent\n");

	const char *read = cmdline_find(bi->cmdline, "read");
	if (!read || read[0] != '1')
		return 0;

	struct virtq *q = &d.q[0];
	for (u32 i = 0; i < RXBUFS; i++) {
		struct vbuf b = { rx[i], RXLEN, 1 };
		virtq_add(q, &b, 1);
	}
	virtq_kick(q);
	print("console reading\n");
	u32 n = 0;
	for (;;) {
		u32 len;
		int id = virtq_wait(q, &len);
		u8 *p = (u8 *)(uptr)q->desc[id].addr;
		int done = 0;
		for (u32 k = 0; k < len && k < RXLEN; k++) {
			if (p[k] == '\n' || p[k] == '\r') {
				done = 1;
				break;
			}
			if (n < sizeof(line) - 1)
				line[n++] = (char)p[k];
		}
		if (done)
			break;
		struct vbuf b = { p, RXLEN, 1 };
		virtq_add(q, &b, 1);
		virtq_kick(q);
	}
	line[n] = 0;
	print("console got: %s\n", line);
	print("interrupts: %u\n", virtio_irqs);
	return 0;
}
