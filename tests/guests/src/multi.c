/* SPDX-License-Identifier: Apache-2.0 */
/*
 * multi: several kinds of virtio device in one VM, as a Linux guest would
 * see them: every function on bus 0 gets its own BAR and its own MSI-X
 * vectors, and each device works beside the others. Expects one virtio-blk
 * (sector 0 starts with the command line's first word), virtio-rng,
 * virtio-console and virtio-vsock; a virtio-net is used if present (MAC
 * read, link status). Prints one line per device and "multi ok".
 */
#include "guest.h"

static int failures;

static void check(int ok, const char *what)
{
	print("%s: %s\n", what, ok ? "ok" : "FAILED");
	if (!ok)
		failures++;
}

static int up(struct virtio_dev *d, u32 type, u32 nqueues)
{
	if (virtio_init(d, type, 0) || virtio_negotiate(d, 0))
		return -1;
	for (u16 q = 0; q < nqueues; q++)
		if (virtio_queue_init(d, q, 4, 1))
			return -1;
	virtio_driver_ok(d);
	return 0;
}

int guest_main(struct boot_info *bi)
{
	static struct virtio_dev blk, rng, con, vs, net;
	virtio_irq_init();

	/* virtio-blk: read sector 0. */
	static struct {
		u32 type, reserved;
		u64 sector;
	} hdr;
	static u8 sector[512];
	static volatile u8 status = 0xEE;
	if (up(&blk, VIRTIO_ID_BLOCK, 1))
		return 1;
	struct vbuf rq[3] = { { &hdr, 16, 0 }, { sector, 512, 1 }, { (void *)&status, 1, 1 } };
	int len = virtq_xfer(&blk.q[0], rq, 3);
	u32 wl = 0;
	while (bi->cmdline[wl] && bi->cmdline[wl] != ' ')
		wl++;
	check(len == 513 && status == 0 && wl && memcmp(sector, bi->cmdline, wl) == 0,
	      "blk sector 0 read");

	/* virtio-rng: 16 bytes. */
	static u8 random[16];
	if (up(&rng, VIRTIO_ID_RNG, 1))
		return 1;
	struct vbuf rb = { random, sizeof(random), 1 };
	u32 nonzero = 0;
	len = virtq_xfer(&rng.q[0], &rb, 1);
	for (u32 i = 0; i < sizeof(random); i++)
		nonzero |= random[i];
	check(len == 16 && nonzero, "rng 16 bytes");

	/* virtio-console: one line out. */
	static const char line[] = "multi hvc0\n";
	if (up(&con, VIRTIO_ID_CONSOLE, 2))
		return 1;
	struct vbuf cb = { (void *)line, sizeof(line) - 1, 0 };
	check(virtq_xfer(&con.q[1], &cb, 1) >= 0, "console line sent");

	/* virtio-vsock: its CID, three queues live. */
	if (up(&vs, VIRTIO_ID_VSOCK, 3))
		return 1;
	print("vsock cid %u\n", virtio_cfg32(&vs, 0));

	/* virtio-net, if there is one. */
	if (pci_find(VIRTIO_VENDOR, VIRTIO_DEVICE_ID(VIRTIO_ID_NET), 0)) {
		if (up(&net, VIRTIO_ID_NET, 2))
			return 1;
		print("net mac %02x:%02x:%02x:%02x:%02x:%02x\n", virtio_cfg8(&net, 0),
		      virtio_cfg8(&net, 1), virtio_cfg8(&net, 2), virtio_cfg8(&net, 3),
		      virtio_cfg8(&net, 4), virtio_cfg8(&net, 5));
	}

	/* Four BARs, none overlapping: each device answered at its own. */
	check(blk.bars[0] != rng.bars[0] && rng.bars[0] != con.bars[0] &&
		      con.bars[0] != vs.bars[0] && vs.bars[0] != blk.bars[0],
	      "distinct BARs");
	print("interrupts: %u\n", virtio_irqs);
	print("multi %s\n", failures ? "FAILED" : "ok");
	return failures ? 1 : 0;
}
