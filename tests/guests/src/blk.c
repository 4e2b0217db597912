/* SPDX-License-Identifier: Apache-2.0 */
/*
 * blk: a virtio-blk driver over PCI, the way Linux's drives it (through
 * lib/pci.c and lib/virtio.c): enumerates bus 0 through ECAM, sizes and
 * assigns BAR 0 itself, enables memory decode and bus mastering, walks the
 * capability list for the virtio structures and MSI-X, points MSI-X vector 0
 * at the local APIC, negotiates VERSION_1, sets up one queue and waits for
 * each request's interrupt.
 *
 * Disk 0 (read-write, serial from the command line): write a pattern to
 * sector PATTERN_SECTOR, read it back, compare, FLUSH, GET_ID. Disk 1
 * (readonly=on): a write must fail with IOERR, a read must work.
 * Prints one line per check and returns 0 only if every check passed.
 */
#include "guest.h"

#define PATTERN_SECTOR 5
#define QSIZE 8

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

static struct {
	u32 type, reserved;
	u64 sector;
} __attribute__((aligned(16))) hdr;
static u8 data[512] __attribute__((aligned(512)));
static u8 back[512] __attribute__((aligned(512)));
static volatile u8 status_byte;
static int failures;

static void check(int ok, const char *what)
{
	print("%s: %s\n", what, ok ? "ok" : "FAILED");
	if (!ok)
		failures++;
}

/*
 * One request: header, optional data (device-readable for OUT), status. Waits for the chain
 * to be used and for the queue's MSI-X interrupt.
 */
static u8 request(struct virtio_dev *d, u32 type, u64 sector, u8 *buf, u32 len)
{
	struct virtq *q = &d->q[0];
	hdr.type = type;
	hdr.sector = sector;
	status_byte = 0xEE;
	struct vbuf b[3] = {
		{ &hdr, 16, 0 },
		{ buf, len, type != T_OUT },
		{ (void *)&status_byte, 1, 1 },
	};
	if (!len)
		b[1] = b[2];
	u32 before = virtio_vector_irqs(q->vector);
	if (virtq_xfer(q, b, len ? 3 : 2) < 0)
		return 0xFF;
	cli();
	while (q->vector && virtio_vector_irqs(q->vector) == before) {
		sti_hlt();
		cli();
	}
	sti();
	return status_byte;
}

static int setup(struct virtio_dev *d, u32 nth)
{
	if (virtio_init(d, VIRTIO_ID_BLOCK, nth) || virtio_negotiate(d, 0) ||
	    virtio_queue_init(d, 0, QSIZE, 1))
		return -1;
	virtio_driver_ok(d);
	return 0;
}

int guest_main(struct boot_info *bi)
{
	virtio_irq_init();

	/* Expected GET_ID string: the command line's first word. */
	const char *serial = bi->cmdline;
	u32 serial_len = 0;
	while (serial[serial_len] && serial[serial_len] != ' ' && serial_len < 20)
		serial_len++;

	static struct virtio_dev devs[2];
	u32 n = 0;
	while (n < 2 && pci_find(VIRTIO_VENDOR, VIRTIO_DEVICE_ID(VIRTIO_ID_BLOCK), n))
		n++;
	print("virtio-blk functions: %u\n", n);
	if (n != 2)
		return 1;
	for (u32 i = 0; i < n; i++)
		if (setup(&devs[i], i))
			return 1;

	struct virtio_dev *rw = &devs[0], *ro = &devs[1];
	print("capacity: %u sectors\n", virtio_cfg32(rw, 0));
	for (u32 i = 0; i < 512; i++)
		data[i] = (u8)(i * 7 + 3);
	check(request(rw, T_OUT, PATTERN_SECTOR, data, 512) == 0, "write");
	check(request(rw, T_IN, PATTERN_SECTOR, back, 512) == 0, "read");
	check(memcmp(data, back, 512) == 0, "compare");
	check(request(rw, T_FLUSH, 0, NULL, 0) == 0, "flush");
	memset(back, 0, 32);
	check(request(rw, T_GET_ID, 0, back, 20) == 0 && memcmp(back, serial, serial_len) == 0 &&
		      (serial_len == 20 || back[serial_len] == 0),
	      "get-id");
	print("id: %.20s\n", (const char *)back);

	/* VIRTIO_BLK_F_RO is feature bit 5. */
	check((ro->offered & (1u << 5)) != 0, "read-only feature");
	check(request(ro, T_OUT, 0, data, 512) == 1, "read-only write refused");
	check(request(ro, T_IN, 0, back, 512) == 0, "read-only read");
	print("interrupts: %u\n", virtio_irqs);

	/* reads=N: N more one-sector reads, one kick each (for counting exits per request). */
	const char *reads = cmdline_find(bi->cmdline, "reads");
	if (reads) {
		int ok = 0;
		u64 nreads = parse_u64(reads, &ok);
		u32 good = 0;
		for (u64 i = 0; ok && i < nreads; i++)
			good += request(rw, T_IN, PATTERN_SECTOR, back, 512) == 0;
		print("reads: %u of %u\n", good, (u32)nreads);
		check(good == nreads, "reads");
	}
	print("blk %s\n", failures ? "FAILED" : "passed");
	return failures ? 1 : 0;
}
