/* SPDX-License-Identifier: Apache-2.0 */
/*
 * rng: a virtio-rng driver over PCI (lib/virtio.c): ECAM, BAR, MSI-X,
 * VERSION_1, one request queue. Asks twice for 64 bytes, each request
 * completed by its MSI-X interrupt, prints both in hex and checks that each
 * came whole, is not all zeros and that the two differ. With "bad=1" it
 * then posts chains a broken driver might (buffers beyond RAM or on a BAR, a
 * descriptor loop, nothing writable, a next index out of range, a good buffer
 * followed by a bad one) and checks each comes back with only the bytes that
 * reached memory counted, and that a good request still works.
 */
#include "guest.h"

#define N 64

static u8 buf[2][N];

/* One chain of descriptors written by hand at 0..n-1; the bytes the device said it wrote. */
static u32 raw(struct virtq *q, const struct vring_desc *ds, u32 n)
{
	for (u32 i = 0; i < n; i++)
		q->desc[i] = ds[i];
	u32 len = 0xEEEEEEEE;
	int id = virtq_put_raw(q, 0, &len);
	if (id != 0)
		print("used id %d, not 0\n", id);
	return len;
}

/*
 * What a broken or hostile driver might post. Each chain must come back (used, with only the
 * bytes that reached guest memory counted) and the device must go on serving good requests.
 */
static int bad_chains(struct virtq *q)
{
	static u8 small[16];
	const u16 W = VRING_DESC_F_WRITE, NW = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
	struct {
		const char *what;
		struct vring_desc d[2];
		u32 n, want;
	} cases[] = {
		{ "beyond RAM", { { 0x200000000ull, N, W, 0 } }, 1, 0 },
		{ "on a BAR", { { PCI_MMIO32_BASE, N, W, 0 } }, 1, 0 },
		{ "loop", { { (uptr)small, 8, NW, 1 }, { (uptr)small + 8, 8, NW, 0 } }, 2, 0 },
		{ "readable only", { { (uptr)small, 16, 0, 0 } }, 1, 0 },
		{ "next out of range", { { (uptr)small, 16, NW, 200 } }, 1, 0 },
		{ "second buffer beyond RAM", { { (uptr)small, 16, NW, 1 }, { 0x200000000ull, N, W, 0 } },
		  2, 16 },
	};
	int fails = 0;
	for (u32 i = 0; i < ARRAY_SIZE(cases); i++) {
		u32 len = raw(q, cases[i].d, cases[i].n);
		int good = len == cases[i].want;
		print("bad chain, %s: %u bytes: %s\n", cases[i].what, len, good ? "ok" : "FAILED");
		fails += !good;
	}
	virtq_reset_free(q);
	static u8 after[N];
	struct vbuf b = { after, N, 1 };
	int len = virtq_xfer(q, &b, 1);
	u32 nonzero = 0;
	for (u32 k = 0; k < N; k++)
		nonzero |= after[k];
	int good = len == N && nonzero;
	print("after the bad chains: %d bytes: %s\n", len, good ? "ok" : "FAILED");
	fails += !good;
	return fails;
}

int guest_main(struct boot_info *bi)
{
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
	const char *bad = cmdline_find(bi->cmdline, "bad");
	if (bad && bad[0] == '1' && bad_chains(&d.q[0]))
		ok = 0;
	print("interrupts: %u\n", virtio_irqs);
	print("rng %s\n", ok ? "ok" : "FAILED");
	return ok ? 0 : 1;
}
