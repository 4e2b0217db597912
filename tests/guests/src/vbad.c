/* SPDX-License-Identifier: Apache-2.0 */
/*
 * vbad: a driver that breaks the virtio-pci rules on purpose, on a virtio-rng
 * function, and checks that the transport refuses each mistake the way the
 * spec says and stays usable:
 *  - writes to read-only common-config fields (num_queues, device_feature)
 *    change nothing;
 *  - FEATURES_OK with a feature not offered, or without VERSION_1, does not
 *    stick; DRIVER_OK without FEATURES_OK does not either;
 *  - a queue size that is not a power of two, or above the maximum, is
 *    refused; MSI-X vectors beyond the table read back NO_VECTOR;
 *  - writes past the MSI-X table change nothing that reads back;
 *  - DRIVER_OK with a ring outside RAM sets DEVICE_NEEDS_RESET; a reset
 *    clears it;
 * then moves BAR 0 elsewhere, sets the device up properly and gets 64 random
 * bytes. Prints one line per check, "vbad ok" if all held.
 */
#include "guest.h"

#define C_DFSEL 0x00
#define C_DF 0x04
#define C_GFSEL 0x08
#define C_GF 0x0c
#define C_MSIX 0x10
#define C_NUMQ 0x12
#define C_STATUS 0x14
#define C_QSEL 0x16
#define C_QSIZE 0x18
#define C_QVEC 0x1a
#define C_QENABLE 0x1c
#define C_QDESC 0x20
#define C_QDRIVER 0x28
#define C_QDEVICE 0x30
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define NO_VECTOR 0xFFFF

static int failures;

static void check(int ok, const char *what)
{
	print("%s: %s\n", what, ok ? "ok" : "FAILED");
	if (!ok)
		failures++;
}

static void reset(uptr cc)
{
	mmio_write8(cc + C_STATUS, 0);
	while (mmio_read8(cc + C_STATUS) != 0)
		cpu_relax();
	mmio_write8(cc + C_STATUS, S_ACK | S_DRIVER);
}

/* Write the driver features, try FEATURES_OK: whether it stuck. */
static int features_ok(uptr cc, u64 f)
{
	mmio_write32(cc + C_GFSEL, 0);
	mmio_write32(cc + C_GF, (u32)f);
	mmio_write32(cc + C_GFSEL, 1);
	mmio_write32(cc + C_GF, (u32)(f >> 32));
	mmio_write8(cc + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	return (mmio_read8(cc + C_STATUS) & S_FEATURES_OK) != 0;
}

int guest_main(struct boot_info *bi)
{
	(void)bi;
	static struct virtio_dev d;
	virtio_irq_init();
	if (virtio_init(&d, VIRTIO_ID_RNG, 0))
		return 1;
	uptr cc = d.common;

	u16 numq = mmio_read16(cc + C_NUMQ);
	mmio_write16(cc + C_NUMQ, 7);
	check(mmio_read16(cc + C_NUMQ) == numq && numq == 1, "num_queues is read-only");
	mmio_write32(cc + C_DFSEL, 1);
	u32 df = mmio_read32(cc + C_DF);
	mmio_write32(cc + C_DF, 0);
	check(mmio_read32(cc + C_DF) == df && (df & 1), "device_feature is read-only");

	check(!features_ok(cc, VIRTIO_F_VERSION_1 | 1), "FEATURES_OK refused for a feature not offered");
	reset(cc);
	check(!features_ok(cc, 0), "FEATURES_OK refused without VERSION_1");
	reset(cc);
	mmio_write8(cc + C_STATUS, S_ACK | S_DRIVER | S_DRIVER_OK);
	check(!(mmio_read8(cc + C_STATUS) & S_DRIVER_OK), "DRIVER_OK refused without FEATURES_OK");
	reset(cc);
	check(features_ok(cc, VIRTIO_F_VERSION_1), "FEATURES_OK with VERSION_1");

	mmio_write16(cc + C_QSEL, 0);
	u16 max = mmio_read16(cc + C_QSIZE);
	mmio_write16(cc + C_QSIZE, 3);
	check(mmio_read16(cc + C_QSIZE) == max, "queue size 3 refused");
	mmio_write16(cc + C_QSIZE, (u16)(max * 2));
	check(mmio_read16(cc + C_QSIZE) == max, "queue size above the maximum refused");
	mmio_write16(cc + C_QVEC, 100);
	check(mmio_read16(cc + C_QVEC) == NO_VECTOR, "queue vector beyond the table reads NO_VECTOR");
	mmio_write16(cc + C_MSIX, 100);
	check(mmio_read16(cc + C_MSIX) == NO_VECTOR, "config vector beyond the table reads NO_VECTOR");
	uptr past = d.msix.table + 16 * (d.msix.size + 10);
	mmio_write32(past + 8, 0xDEADBEEF);
	check(mmio_read32(past + 8) != 0xDEADBEEF, "write past the MSI-X table ignored");

	/* Rings beyond RAM (the guest has 64 MiB; 8 GiB is nothing). */
	mmio_write16(cc + C_QSIZE, 4);
	mmio_write32(cc + C_QDESC, 0);
	mmio_write32(cc + C_QDESC + 4, 2);
	mmio_write32(cc + C_QDRIVER, 0x1000);
	mmio_write32(cc + C_QDRIVER + 4, 2);
	mmio_write32(cc + C_QDEVICE, 0x2000);
	mmio_write32(cc + C_QDEVICE + 4, 2);
	mmio_write16(cc + C_QENABLE, 1);
	mmio_write8(cc + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	u8 st = mmio_read8(cc + C_STATUS);
	print("status with rings beyond RAM: %x\n", st);
	check((st & S_NEEDS_RESET) != 0, "rings beyond RAM: DEVICE_NEEDS_RESET");
	mmio_write8(cc + C_STATUS, 0);
	while (mmio_read8(cc + C_STATUS) != 0)
		cpu_relax();
	check(!(mmio_read8(cc + C_STATUS) & S_NEEDS_RESET), "reset clears DEVICE_NEEDS_RESET");

	/* Start again from scratch: BAR 0 placed somewhere else, a proper setup, one request. */
	u32 old_bar = (u32)d.bars[0];
	if (virtio_init(&d, VIRTIO_ID_RNG, 0) || virtio_negotiate(&d, 0) ||
	    virtio_queue_init(&d, 0, 4, 1))
		return 1;
	virtio_driver_ok(&d);
	check(d.bars[0] != old_bar, "BAR 0 moved");
	static u8 buf[64];
	struct vbuf b = { buf, sizeof(buf), 1 };
	u32 nonzero = 0;
	int len = virtq_xfer(&d.q[0], &b, 1);
	for (u32 k = 0; k < sizeof(buf); k++)
		nonzero |= buf[k];
	check(len == 64 && nonzero, "request after all that");
	print("vbad %s\n", failures ? "FAILED" : "ok");
	return failures ? 1 : 0;
}
