/* SPDX-License-Identifier: Apache-2.0 */
/*
 * blk: a virtio-blk driver over PCI, the way Linux's drives it. Enumerates
 * bus 0 through ECAM, sizes and assigns BAR 0 itself, enables memory decode
 * and bus mastering, walks the capability list for the virtio structures and
 * MSI-X, points MSI-X vector 0 at the local APIC, negotiates VERSION_1, sets
 * up one queue and waits for each request's interrupt.
 *
 * Disk 0 (read-write, serial from the command line): write a pattern to
 * sector PATTERN_SECTOR, read it back, compare, FLUSH, GET_ID. Disk 1
 * (readonly=on): a write must fail with IOERR, a read must work.
 * Prints one line per check and returns 0 only if every check passed.
 */
#include "guest.h"

#define ECAM_BASE 0xE0000000u
#define BAR_BASE 0xC0000000u /* first BAR we assign; 64 KiB apart */
#define MSI_VECTOR 0x40
#define SPURIOUS_VECTOR 0xFF
#define PATTERN_SECTOR 5
#define QSIZE 8

/* virtio-pci capability types and common config registers (virtio 1.2, 4.1.4). */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR 3
#define CAP_DEVICE 4
#define C_DFSEL 0x00
#define C_DF 0x04
#define C_GFSEL 0x08
#define C_GF 0x0c
#define C_MSIX 0x10
#define C_STATUS 0x14
#define C_QSEL 0x16
#define C_QSIZE 0x18
#define C_QVEC 0x1a
#define C_QENABLE 0x1c
#define C_QNOFF 0x1e
#define C_QDESC 0x20
#define C_QDRIVER 0x28
#define C_QDEVICE 0x30
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define NO_VECTOR 0xFFFF

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vq {
	struct desc desc[QSIZE];
	u16 avail_flags, avail_idx, avail_ring[QSIZE], used_event;
	u8 pad[4096 - 16 * QSIZE - 6 - 2 * QSIZE];
	u16 used_flags, used_idx;
	struct {
		u32 id, len;
	} used_ring[QSIZE];
} __attribute__((aligned(4096)));

struct dev {
	uptr cfg;    /* ECAM base of the function */
	uptr common, notify, isr, device;
	u16 used_seen;
	struct vq *vq;
};

static struct vq queues[2];
static struct {
	u32 type, reserved;
	u64 sector;
} __attribute__((aligned(16))) hdr;
static u8 data[512] __attribute__((aligned(512)));
static u8 back[512] __attribute__((aligned(512)));
static volatile u8 status_byte;
static volatile u32 irqs;
static int failures;

static inline u8 rd8(uptr a) { return *(volatile u8 *)a; }
static inline u16 rd16(uptr a) { return *(volatile u16 *)a; }
static inline void wr8(uptr a, u8 v) { *(volatile u8 *)a = v; }
static inline void wr16(uptr a, u16 v) { *(volatile u16 *)a = v; }
#define rd32 mmio_read32
#define wr32 mmio_write32

static void msi_isr(struct int_frame *f)
{
	(void)f;
	irqs++;
	lapic_eoi();
}

static void spurious_isr(struct int_frame *f) { (void)f; }

static void check(int ok, const char *what)
{
	print("%s: %s\n", what, ok ? "ok" : "FAILED");
	if (!ok)
		failures++;
}

/* Size and assign BAR 0 (64-bit memory), turn on decode and mastering, find the structures. */
static int setup_pci(struct dev *d, uptr bar)
{
	uptr c = d->cfg;
	wr16(c + 0x04, 0); /* decode off while sizing, as Linux does */
	wr32(c + 0x10, 0xFFFFFFFF);
	wr32(c + 0x14, 0xFFFFFFFF);
	u32 lo = rd32(c + 0x10);
	u32 size = ~(lo & ~0xFu) + 1;
	if ((lo & 0x6) != 0x4 || size == 0 || size > 0x10000) {
		print("bad BAR 0: %x\n", lo);
		return -1;
	}
	wr32(c + 0x10, (u32)bar);
	wr32(c + 0x14, 0);
	wr16(c + 0x04, 0x6); /* memory decode, bus master */
	print("BAR 0: %u bytes at %x\n", size, (u32)bar);

	u32 msix = 0;
	for (u8 p = rd8(c + 0x34); p; p = rd8(c + p + 1)) {
		u8 id = rd8(c + p);
		if (id == 0x11) {
			msix = p;
		} else if (id == 0x09) {
			uptr at = bar + rd32(c + p + 8);
			switch (rd8(c + p + 3)) {
			case CAP_COMMON: d->common = at; break;
			case CAP_NOTIFY: d->notify = at; break;
			case CAP_ISR: d->isr = at; break;
			case CAP_DEVICE: d->device = at; break;
			}
		}
	}
	if (!msix || !d->common || !d->notify || !d->isr || !d->device) {
		print("capabilities missing\n");
		return -1;
	}
	/* Notify address of queue 0: notify_off (read below) times the multiplier. */
	u32 mult = 0;
	for (u8 p = rd8(c + 0x34); p; p = rd8(c + p + 1))
		if (rd8(c + p) == 0x09 && rd8(c + p + 3) == CAP_NOTIFY)
			mult = rd32(c + p + 16);

	/* MSI-X vector 0 -> this CPU's local APIC, unmasked; then enable MSI-X. */
	u32 table = rd32(c + msix + 4);
	uptr entry = bar + (table & ~7u);
	wr32(entry + 0, 0xFEE00000u | (lapic_id() << 12));
	wr32(entry + 4, 0);
	wr32(entry + 8, MSI_VECTOR);
	wr32(entry + 12, 0);
	wr16(c + msix + 2, rd16(c + msix + 2) | 0x8000);

	/* Virtio initialisation (virtio 1.2, 3.1.1). */
	uptr cc = d->common;
	wr8(cc + C_STATUS, 0);
	wr8(cc + C_STATUS, S_ACK | S_DRIVER);
	wr32(cc + C_DFSEL, 1);
	if (!(rd32(cc + C_DF) & 1)) {
		print("no VERSION_1\n");
		return -1;
	}
	wr32(cc + C_GFSEL, 0);
	wr32(cc + C_GF, 0);
	wr32(cc + C_GFSEL, 1);
	wr32(cc + C_GF, 1); /* VERSION_1 only */
	wr8(cc + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(rd8(cc + C_STATUS) & S_FEATURES_OK)) {
		print("FEATURES_OK refused\n");
		return -1;
	}
	wr16(cc + C_MSIX, NO_VECTOR);
	wr16(cc + C_QSEL, 0);
	wr16(cc + C_QSIZE, QSIZE);
	wr32(cc + C_QDESC, (u32)(uptr)d->vq->desc);
	wr32(cc + C_QDESC + 4, 0);
	wr32(cc + C_QDRIVER, (u32)(uptr)&d->vq->avail_flags);
	wr32(cc + C_QDRIVER + 4, 0);
	wr32(cc + C_QDEVICE, (u32)(uptr)&d->vq->used_flags);
	wr32(cc + C_QDEVICE + 4, 0);
	wr16(cc + C_QVEC, 0);
	if (rd16(cc + C_QVEC) != 0) {
		print("queue vector refused\n");
		return -1;
	}
	d->notify += rd16(cc + C_QNOFF) * mult;
	wr16(cc + C_QENABLE, 1);
	wr8(cc + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	return 0;
}

/* One request: header, optional data (device-readable for OUT), status. Waits for its interrupt. */
static u8 request(struct dev *d, u32 type, u64 sector, u8 *buf, u32 len)
{
	struct vq *q = d->vq;
	hdr.type = type;
	hdr.sector = sector;
	status_byte = 0xEE;
	q->desc[0] = (struct desc){ (uptr)&hdr, 16, 1, 1 };
	q->desc[1] = (struct desc){ (uptr)buf, len, (u16)(type == T_OUT ? 1 : 3), 2 };
	q->desc[2] = (struct desc){ (uptr)&status_byte, 1, 2, 0 };
	if (!len)
		q->desc[0].next = 2;
	q->avail_ring[q->avail_idx % QSIZE] = 0;
	barrier();
	q->avail_idx++;
	barrier();
	u32 before = irqs;
	wr16(d->notify, 0);
	cli();
	while (*(volatile u16 *)&q->used_idx == d->used_seen || irqs == before) {
		sti_hlt();
		cli();
	}
	d->used_seen++;
	return status_byte;
}

int guest_main(struct boot_info *bi)
{
	idt_init();
	idt_set_handler(MSI_VECTOR, msi_isr);
	idt_set_handler(SPURIOUS_VECTOR, spurious_isr);
	pic_disable();
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);

	/* Expected GET_ID string: the command line's first word. */
	const char *serial = bi->cmdline;
	u32 serial_len = 0;
	while (serial[serial_len] && serial[serial_len] != ' ' && serial_len < 20)
		serial_len++;

	static struct dev devs[2];
	u32 n = 0;
	for (u32 slot = 0; slot < 32 && n < 2; slot++) {
		uptr cfg = ECAM_BASE + (slot << 15);
		if (rd32(cfg) == 0x10421AF4) {
			devs[n].cfg = cfg;
			devs[n].vq = &queues[n];
			wr16(cfg + 0x04, 0); /* nothing decodes until we assign it */
			n++;
		}
	}
	print("virtio-blk functions: %u\n", n);
	if (n != 2)
		return 1;
	for (u32 i = 0; i < n; i++)
		if (setup_pci(&devs[i], BAR_BASE + 0x10000 * i))
			return 1;

	struct dev *rw = &devs[0], *ro = &devs[1];
	print("capacity: %u sectors\n", rd32(rw->device));
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
	wr32(ro->common + C_DFSEL, 0);
	check((rd32(ro->common + C_DF) & (1u << 5)) != 0, "read-only feature");
	check(request(ro, T_OUT, 0, data, 512) == 1, "read-only write refused");
	check(request(ro, T_IN, 0, back, 512) == 0, "read-only read");
	print("interrupts: %u\n", irqs);
	print("blk %s\n", failures ? "FAILED" : "passed");
	return failures ? 1 : 0;
}
