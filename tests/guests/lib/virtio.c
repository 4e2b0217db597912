/* SPDX-License-Identifier: Apache-2.0 */
/*
 * virtio over PCI, modern transport (virtio 1.2, 4.1), driven as Linux's
 * virtio_pci does: BARs, vendor capabilities, MSI-X, the status dance of
 * 3.1.1, split rings in guest memory, notification through the notify
 * capability, completion by MSI-X interrupt (or polling).
 */
#include "guest.h"

#ifndef __x86_64__
/* virtio-pci capability types and common configuration registers (4.1.4). */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR 3
#define CAP_DEVICE 4
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
#define C_QNOFF 0x1e
#define C_QDESC 0x20
#define C_QDRIVER 0x28
#define C_QDEVICE 0x30
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define NO_VECTOR 0xFFFF
#define SPURIOUS_VECTOR 0xFF

#define MAX_RINGS 12

volatile u32 virtio_irqs;
static volatile u32 vec_irqs[VIRTIO_IRQ_MAX];
static u8 next_vector = VIRTIO_IRQ_BASE;

/*
 * Two pages per queue: descriptors at 0, available ring at 1 KiB, used ring at
 * 2 KiB; then the indirect tables, 64 bytes per head.
 */
static u8 rings[MAX_RINGS][2][4096] __attribute__((aligned(4096)));
static u32 nrings;

static void msi_isr(struct int_frame *f)
{
	virtio_irqs++;
	vec_irqs[(f->vector - VIRTIO_IRQ_BASE) & (VIRTIO_IRQ_MAX - 1)]++;
	lapic_eoi();
}

static void spurious_isr(struct int_frame *f) { (void)f; }

int virtio_poll;

void virtio_irq_init(void)
{
	const char *poll = cmdline_find(boot_info.cmdline, "poll");
	if (poll && poll[0] == '1') {
		virtio_poll = 1;
		print("virtio: polling, no interrupts\n");
	}
	idt_init();
	for (u32 v = 0; v < VIRTIO_IRQ_MAX; v++)
		idt_set_handler((u8)(VIRTIO_IRQ_BASE + v), msi_isr);
	idt_set_handler(SPURIOUS_VECTOR, spurious_isr);
	pic_disable();
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
}

u32 virtio_vector_irqs(u8 vector)
{
	return vec_irqs[(vector - VIRTIO_IRQ_BASE) & (VIRTIO_IRQ_MAX - 1)];
}

int virtio_init(struct virtio_dev *d, u32 type, u32 nth)
{
	uptr c = pci_find(VIRTIO_VENDOR, (u16)VIRTIO_DEVICE_ID(type), nth);
	if (!c) {
		print("virtio device type %u not found\n", type);
		return -1;
	}
	return virtio_init_at(d, c, NULL);
}

static u32 kept_rings;
static u8 kept_vector = VIRTIO_IRQ_BASE;

void virtio_keep(void)
{
	kept_rings = nrings;
	kept_vector = next_vector;
}

void virtio_release_all(void)
{
	nrings = kept_rings;
	next_vector = kept_vector;
}

int virtio_init_at(struct virtio_dev *d, uptr c, const uptr *bars)
{
	memset(d, 0, sizeof(*d));
	d->cfg = c;
	if (bars)
		memcpy(d->bars, bars, sizeof(d->bars));
	/* Size and place every memory BAR (absent ones read back 0). */
	for (u32 b = 0; b < 6 && !bars; b++) {
		u32 v = mmio_read32(c + 0x10 + 4 * b);
		if (v & 1)
			continue; /* I/O */
		u32 size;
		d->bars[b] = pci_assign_bar(c, b, &size);
		if (d->bars[b])
			print("BAR %u: %u bytes at %x\n", b, size, (u32)d->bars[b]);
		if ((v & 0x7) == 0x4)
			b++; /* the upper half of a 64-bit BAR */
	}
	for (u8 p = pci_find_cap(c, PCI_CAP_VENDOR, 0); p; p = pci_find_cap(c, PCI_CAP_VENDOR, p)) {
		u8 bar = mmio_read8(c + p + 4);
		if (bar > 5 || !d->bars[bar])
			continue;
		uptr at = d->bars[bar] + mmio_read32(c + p + 8);
		switch (mmio_read8(c + p + 3)) {
		case CAP_COMMON: if (!d->common) d->common = at; break;
		case CAP_NOTIFY:
			if (!d->notify) {
				d->notify = at;
				d->notify_mult = mmio_read32(c + p + 16);
			}
			break;
		case CAP_ISR: if (!d->isr) d->isr = at; break;
		case CAP_DEVICE: if (!d->device) d->device = at; break;
		}
	}
	if (!d->common || !d->notify || !d->isr || !d->device) {
		print("virtio capabilities missing\n");
		return -1;
	}
	pci_enable(c); /* decode on first: the MSI-X table is in a BAR */
	if (pci_msix_init(&d->msix, c, d->bars) <= 0) {
		print("no MSI-X\n");
		return -1;
	}

	/* Reset, then ACKNOWLEDGE and DRIVER (3.1.1). */
	uptr cc = d->common;
	mmio_write8(cc + C_STATUS, 0);
	while (mmio_read8(cc + C_STATUS) != 0)
		cpu_relax();
	mmio_write8(cc + C_STATUS, S_ACK);
	mmio_write8(cc + C_STATUS, S_ACK | S_DRIVER);
	mmio_write32(cc + C_DFSEL, 0);
	u32 lo = mmio_read32(cc + C_DF);
	mmio_write32(cc + C_DFSEL, 1);
	u32 hi = mmio_read32(cc + C_DF);
	d->offered = ((u64)hi << 32) | lo;
	mmio_write16(cc + C_MSIX, NO_VECTOR);
	return 0;
}

int virtio_negotiate(struct virtio_dev *d, u64 want)
{
	uptr cc = d->common;
	if (!(d->offered & VIRTIO_F_VERSION_1)) {
		print("no VERSION_1\n");
		return -1;
	}
	const char *plain = cmdline_find(boot_info.cmdline, "plain");
	u64 driver = plain && plain[0] == '1' ? VIRTIO_F_VERSION_1 : VIRTIO_F_DRIVER;
	d->features = d->offered & (want | driver);
	print("features: offered %x:%08x accepted %x:%08x\n", (u32)(d->offered >> 32),
	      (u32)d->offered, (u32)(d->features >> 32), (u32)d->features);
	mmio_write32(cc + C_GFSEL, 0);
	mmio_write32(cc + C_GF, (u32)d->features);
	mmio_write32(cc + C_GFSEL, 1);
	mmio_write32(cc + C_GF, (u32)(d->features >> 32));
	mmio_write8(cc + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(mmio_read8(cc + C_STATUS) & S_FEATURES_OK)) {
		print("FEATURES_OK refused\n");
		return -1;
	}
	return 0;
}

int virtio_queue_init(struct virtio_dev *d, u16 index, u16 size, int irq)
{
	uptr cc = d->common;
	if (index >= VIRTIO_MAX_QUEUES || nrings >= MAX_RINGS || size > VIRTQ_MAX_SIZE) {
		print("queue %u: out of ring space\n", index);
		return -1;
	}
	mmio_write16(cc + C_QSEL, index);
	u16 max = mmio_read16(cc + C_QSIZE);
	if (max == 0) {
		print("queue %u: not available\n", index);
		return -1;
	}
	if (size > max)
		size = max;
	struct virtq *q = &d->q[index];
	u8 *page = rings[nrings][0];
	memset(rings[nrings], 0, sizeof(rings[nrings])); /* reused after virtio_release_all */
	q->tables = (struct vring_desc(*)[VIRTQ_INDIRECT_MAX])rings[nrings][1];
	nrings++;
	q->index = index;
	q->size = size;
	q->desc = (struct vring_desc *)page;
	q->avail = (struct vring_avail *)(page + 1024);
	q->used = (struct vring_used *)(page + 2048);
	for (u16 i = 0; i < size; i++)
		q->desc[i].next = (u16)(i + 1);
	q->free_head = 0;
	q->num_free = size;
	q->last_used = 0;
	q->kicked = 0;
	q->notifies = 0;
	q->event_idx = (d->features & VIRTIO_F_EVENT_IDX) != 0;
	q->indirect = (d->features & VIRTIO_F_INDIRECT_DESC) != 0;
	q->iova_off = d->iova_off;
	u64 desc = (uptr)q->desc + q->iova_off, avail = (uptr)q->avail + q->iova_off;
	u64 used = (uptr)q->used + q->iova_off;
	mmio_write16(cc + C_QSIZE, size);
	mmio_write32(cc + C_QDESC, (u32)desc);
	mmio_write32(cc + C_QDESC + 4, (u32)(desc >> 32));
	mmio_write32(cc + C_QDRIVER, (u32)avail);
	mmio_write32(cc + C_QDRIVER + 4, (u32)(avail >> 32));
	mmio_write32(cc + C_QDEVICE, (u32)used);
	mmio_write32(cc + C_QDEVICE + 4, (u32)(used >> 32));
	q->vector = 0;
	if (irq && !virtio_poll) {
		if (index >= d->msix.size || next_vector >= VIRTIO_IRQ_BASE + VIRTIO_IRQ_MAX) {
			print("queue %u: no MSI-X vector\n", index);
			return -1;
		}
		q->vector = next_vector++;
		pci_msix_route(&d->msix, index, q->vector);
		mmio_write16(cc + C_QVEC, index);
		if (mmio_read16(cc + C_QVEC) != index) {
			print("queue %u: vector refused\n", index);
			return -1;
		}
	} else {
		mmio_write16(cc + C_QVEC, NO_VECTOR);
	}
	q->notify = d->notify + mmio_read16(cc + C_QNOFF) * d->notify_mult;
	mmio_write16(cc + C_QENABLE, 1);
	return 0;
}

void virtio_driver_ok(struct virtio_dev *d)
{
	mmio_write8(d->common + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* used_event (after the available ring) and avail_event (after the used ring). */
static inline volatile u16 *used_event(struct virtq *q) { return &q->avail->ring[0] + q->size; }
static inline volatile u16 *avail_event(struct virtq *q)
{
	return (volatile u16 *)((uptr)q->used + 4 + 8 * q->size);
}

/* A full barrier: stores before it are visible before loads after it (x86 may reorder those). */
static inline void mb(void) { __asm__ volatile("lock; orl $0, (%%esp)" : : : "memory", "cc"); }

static void fill(struct vring_desc *dd, const struct vbuf *b, u32 n, u16 first_next, u64 off)
{
	for (u32 k = 0; k < n; k++) {
		dd[k].addr = (u64)(uptr)b[k].addr + off;
		dd[k].len = b[k].len;
		dd[k].flags = (u16)((b[k].write ? VRING_DESC_F_WRITE : 0) | (k + 1 < n ? VRING_DESC_F_NEXT : 0));
		if (first_next)
			dd[k].next = (u16)(k + 1);
	}
}

int virtq_add(struct virtq *q, const struct vbuf *b, u32 n)
{
	if (n == 0)
		return -1;
	u16 head = q->free_head;
	if (q->indirect && n > 1 && n <= VIRTQ_INDIRECT_MAX && q->num_free >= 1) {
		/* One descriptor pointing at a table of its own (indexed by the head). */
		struct vring_desc *t = q->tables[head];
		fill(t, b, n, 1, q->iova_off);
		q->desc[head].addr = (u64)(uptr)t + q->iova_off;
		q->desc[head].len = n * sizeof(struct vring_desc);
		q->desc[head].flags = VRING_DESC_F_INDIRECT;
		q->free_head = q->desc[head].next;
		q->num_free--;
	} else {
		if (n > q->num_free)
			return -1;
		u16 i = head;
		for (u32 k = 0; k < n; k++) {
			u16 next = q->desc[i].next;
			fill(&q->desc[i], &b[k], 1, 0, q->iova_off);
			if (k + 1 < n)
				q->desc[i].flags |= VRING_DESC_F_NEXT;
			i = next;
		}
		q->free_head = i;
		q->num_free = (u16)(q->num_free - n);
	}
	q->avail->ring[q->avail->idx % q->size] = head;
	barrier();
	q->avail->idx++;
	barrier();
	return head;
}

void virtq_kick(struct virtq *q)
{
	u16 new = q->avail->idx, old = q->kicked;
	q->kicked = new;
	mb(); /* the new avail idx before reading avail_event */
	/* With an event index, notify only if the device asked to hear of an entry in (old, new]. */
	if (q->event_idx && (u16)(new - *avail_event(q) - 1) >= (u16)(new - old))
		return;
	q->notifies++;
	mmio_write16(q->notify, q->index);
}

/* Take the next used entry, if any: its id (0xFFFFFFFF if none), *len. Frees nothing. */
static u32 take_used(struct virtq *q, u32 *len)
{
	barrier();
	if (*(volatile u16 *)&q->used->idx == q->last_used)
		return 0xFFFFFFFF;
	barrier();
	u16 slot = q->last_used % q->size;
	u32 id = q->used->ring[slot].id;
	if (len)
		*len = q->used->ring[slot].len;
	q->last_used++;
	/* Interrupt at the next used entry (the device reads used_event after adding one). */
	if (q->event_idx)
		*used_event(q) = q->last_used;
	return id;
}

int virtq_put_raw(struct virtq *q, u16 head, u32 *len)
{
	q->avail->ring[q->avail->idx % q->size] = head;
	barrier();
	q->avail->idx++;
	virtq_kick(q);
	for (;;) {
		cli();
		u32 id = take_used(q, len);
		if (id != 0xFFFFFFFF) {
			sti();
			return (int)id;
		}
		if (q->vector)
			sti_hlt();
		else
			sti();
	}
}

void virtq_reset_free(struct virtq *q)
{
	for (u16 i = 0; i < q->size; i++)
		q->desc[i].next = (u16)(i + 1);
	q->free_head = 0;
	q->num_free = q->size;
}

int virtq_get(struct virtq *q, u32 *len)
{
	u32 id = take_used(q, len);
	if (id >= q->size)
		return -1;
	/* Give the chain's descriptors back to the free list (one if indirect). */
	u16 i = (u16)id, n = 1;
	while (!(q->desc[i].flags & VRING_DESC_F_INDIRECT) && (q->desc[i].flags & VRING_DESC_F_NEXT) &&
	       n < q->size) {
		i = q->desc[i].next;
		n++;
	}
	q->desc[i].next = q->free_head;
	q->free_head = (u16)id;
	q->num_free = (u16)(q->num_free + n);
	return (int)id;
}

int virtq_wait(struct virtq *q, u32 *len)
{
	for (;;) {
		cli();
		int id = virtq_get(q, len);
		if (id >= 0) {
			sti();
			return id;
		}
		if (q->event_idx) {
			/* Ask for an interrupt at the next entry, then look again (it may be there). */
			*used_event(q) = q->last_used;
			mb();
			id = virtq_get(q, len);
			if (id >= 0) {
				sti();
				return id;
			}
		}
		if (q->vector)
			sti_hlt(); /* an interrupt pending since cli wakes the hlt */
		else
			sti();
	}
}

int virtq_xfer(struct virtq *q, const struct vbuf *b, u32 n)
{
	int head = virtq_add(q, b, n);
	if (head < 0)
		return -1;
	virtq_kick(q);
	u32 len;
	int id = virtq_wait(q, &len);
	return id == head ? (int)len : -1;
}

void print_hex(const char *label, const u8 *p, u32 n)
{
	static const char digits[] = "0123456789abcdef";
	serial_puts(label);
	for (u32 i = 0; i < n; i++) {
		serial_putc(digits[p[i] >> 4]);
		serial_putc(digits[p[i] & 15]);
	}
	serial_putc('\n');
}
#endif
