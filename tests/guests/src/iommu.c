/* SPDX-License-Identifier: Apache-2.0 */
/*
 * iommu: two virtio-blk disks behind the virtio-iommu, programmed as Linux's
 * virtio_iommu driver does. Finds the VIOT and prints its nodes, brings up
 * the IOMMU (config, features), PROBEs disk A (reserved MSI region), ATTACHes
 * disk A to domain 1 and disk B to domain 2, MAPs each domain's view of guest
 * memory at IOVA = GPA + an offset of its own, then drives the disks with
 * rings and buffers at those IOVAs:
 *
 *   - disk A: write a pattern to sector 5 and read it back through IOVAs;
 *   - UNMAP a buffer, read into it: IOERR and a fault event (printed);
 *   - a read into a read-only mapping (a device write): IOERR and a fault;
 *   - disk B writes sector 9 from disk A's buffer IOVA: not in domain 2,
 *     so IOERR and a fault, and nothing reaches disk B.
 *
 * Buffers sit at fixed GPAs above the image (BUF_GPA) so that each has a
 * mapping of its own; everything below 8 MiB (image, rings, stack) is one
 * mapping per domain.
 */
#include "viommu.h"

#define QSIZE 8
#define T_IN 0
#define T_OUT 1

#define MAP_R VIOMMU_MAP_R
#define MAP_W VIOMMU_MAP_W
#define PROBE_SIZE_MAX 512

#define LOW_SIZE 0x800000u            /* image, rings, stack: one mapping */
#define BUF_GPA 0x800000u             /* 4 KiB buffers from here, one mapping each */
#define OFF_A 0x40000000ull           /* domain 1: IOVA = GPA + OFF_A */
#define OFF_B 0x10000000ull           /* domain 2 */
#define BUF(i) ((u8 *)(uptr)(BUF_GPA + (i) * 0x1000u))

static struct virtio_dev iommu, disk[2];
static int failures;

static void check(int ok, const char *what)
{
	print("%s: %s\n", what, ok ? "ok" : "FAILED");
	if (!ok)
		failures++;
}

/* ---- the IOMMU's request and event queues ---------------------------------- */

static u8 props[PROBE_SIZE_MAX];
static u8 events[4][24] __attribute__((aligned(8)));
static u8 head_slot[QSIZE];

static u8 attach(u32 domain, u32 endpoint) { return viommu_attach(&iommu, domain, endpoint); }

static u8 map(u32 domain, u64 iova, u64 gpa, u64 len, u32 flags)
{
	return viommu_map(&iommu, domain, iova, gpa, len, flags);
}

static u8 unmap(u32 domain, u64 iova, u64 len) { return viommu_unmap(&iommu, domain, iova, len); }

static void post_event(u32 i)
{
	struct vbuf b = { events[i], 24, 1 };
	int head = virtq_add(&iommu.q[1], &b, 1);
	if (head >= 0)
		head_slot[head % QSIZE] = (u8)i;
	virtq_kick(&iommu.q[1]);
}

/* Wait for the next fault event, print it and post its buffer again; 0 if none came. */
static int fault_event(u32 *endpoint, u64 *addr)
{
	u32 len;
	int id = -1;
	/* Polled: a fault is delivered from the VMM's event loop, soon after the request. */
	for (u32 spin = 0; spin < 200000 && id < 0; spin++)
		id = virtq_get(&iommu.q[1], &len);
	if (id < 0)
		return 0;
	u32 slot = head_slot[id % QSIZE];
	u32 flags;
	memcpy(&flags, &events[slot][4], 4);
	memcpy(endpoint, &events[slot][8], 4);
	memcpy(addr, &events[slot][16], 8);
	print("fault: reason %u flags %x endpoint %x address %llx\n", events[slot][0], flags,
	      *endpoint, *addr);
	post_event(slot);
	return 1;
}

/* ---- virtio-blk ---------------------------------------------------------- */

static struct {
	u32 type, reserved;
	u64 sector;
} __attribute__((aligned(16))) hdr;
static volatile u8 status_byte;

static u8 blk(struct virtio_dev *d, u32 type, u64 sector, u8 *buf)
{
	hdr.type = type;
	hdr.sector = sector;
	status_byte = 0xEE;
	struct vbuf b[3] = {
		{ &hdr, 16, 0 },
		{ buf, 512, type != T_OUT },
		{ (void *)&status_byte, 1, 1 },
	};
	if (virtq_xfer(&d->q[0], b, 3) < 0)
		return 0xFF;
	return status_byte;
}

/* ---- ACPI VIOT ------------------------------------------------------------- */

static u32 viot_endpoints(u16 iommu_bdf)
{
	uptr viot = acpi_find_table((uptr)boot_info.rsdp_addr, "VIOT");
	if (!viot) {
		print("no VIOT\n");
		return 0;
	}
	u16 count = *(u16 *)(viot + 36), off = *(u16 *)(viot + 38);
	u32 len = ((struct acpi_header *)viot)->length, ranges = 0;
	print("viot: %u nodes\n", count);
	for (u16 i = 0; i < count && off + 4u <= len; i++) {
		u8 type = *(u8 *)(viot + off);
		u16 nlen = *(u16 *)(viot + off + 2);
		if (type == 3)
			print("viot: virtio-pci iommu at %x%s\n", *(u16 *)(viot + off + 6),
			      *(u16 *)(viot + off + 6) == iommu_bdf ? " (found)" : "");
		if (type == 1) {
			ranges++;
			print("viot: endpoints %x-%x id %x -> node %u\n", *(u16 *)(viot + off + 12),
			      *(u16 *)(viot + off + 14), *(u32 *)(viot + off + 4),
			      *(u16 *)(viot + off + 16));
		}
		if (nlen < 4)
			break;
		off = (u16)(off + nlen);
	}
	return ranges;
}

int guest_main(struct boot_info *bi)
{
	(void)bi;
	virtio_irq_init();

	if (viommu_init(&iommu, QSIZE))
		return 1;
	for (u32 i = 0; i < 4; i++)
		post_event(i);
	u64 mask = ((u64)virtio_cfg32(&iommu, 4) << 32) | virtio_cfg32(&iommu, 0);
	u32 probe_size = virtio_cfg32(&iommu, 32);
	print("iommu: page_size_mask %llx input %llx-%llx domains %u-%u probe_size %u\n", mask,
	      ((u64)virtio_cfg32(&iommu, 12) << 32) | virtio_cfg32(&iommu, 8),
	      ((u64)virtio_cfg32(&iommu, 20) << 32) | virtio_cfg32(&iommu, 16),
	      virtio_cfg32(&iommu, 24), virtio_cfg32(&iommu, 28), probe_size);

	for (u32 i = 0; i < 2; i++)
		if (virtio_init(&disk[i], VIRTIO_ID_BLOCK, i))
			return 1;
	u16 a = virtio_bdf(&disk[0]), b = virtio_bdf(&disk[1]);
	print("iommu at %x, disks at %x and %x\n", virtio_bdf(&iommu), a, b);
	check(viot_endpoints(virtio_bdf(&iommu)) >= 1, "viot");

	/* PROBE disk A: properties, then the tail. */
	if (probe_size > PROBE_SIZE_MAX)
		probe_size = PROBE_SIZE_MAX;
	check(viommu_probe(&iommu, a, props, probe_size) == 0, "probe");
	for (u32 at = 0; at + 4 <= probe_size;) {
		u16 type = *(u16 *)&props[at] & 0xfff, plen = *(u16 *)&props[at + 2];
		if (!type)
			break;
		if (type == 1 && plen >= 20)
			print("probe: reserved subtype %u %llx-%llx\n", props[at + 4],
			      *(u64 *)&props[at + 8], *(u64 *)&props[at + 16]);
		at += 4u + plen;
	}

	/* Domains, mappings: disk A at GPA + OFF_A, disk B at GPA + OFF_B. */
	check(attach(1, a) == 0 && attach(2, b) == 0, "attach");
	check(map(1, OFF_A, 0, LOW_SIZE, MAP_R | MAP_W) == 0 &&
		      map(1, OFF_A + BUF_GPA, BUF_GPA, 0x1000, MAP_R | MAP_W) == 0 &&
		      map(1, OFF_A + BUF_GPA + 0x1000, BUF_GPA + 0x1000, 0x1000, MAP_R | MAP_W) == 0 &&
		      map(1, OFF_A + BUF_GPA + 0x2000, BUF_GPA + 0x2000, 0x1000, MAP_R) == 0 &&
		      map(2, OFF_B, 0, LOW_SIZE, MAP_R | MAP_W) == 0,
	      "map");

	disk[0].iova_off = OFF_A;
	disk[1].iova_off = OFF_B;
	for (u32 i = 0; i < 2; i++) {
		check((disk[i].offered & VIRTIO_F_ACCESS_PLATFORM) != 0, "access-platform offered");
		if (virtio_negotiate(&disk[i], 0) || virtio_queue_init(&disk[i], 0, QSIZE, 1))
			return 1;
		virtio_driver_ok(&disk[i]);
	}

	u8 *data = BUF(0), *gone = BUF(1), *ro = BUF(2);
	for (u32 i = 0; i < 512; i++)
		data[i] = (u8)(i * 13 + 1);
	check(blk(&disk[0], T_OUT, 5, data) == 0, "write through iova");
	memset(gone, 0, 512);
	check(blk(&disk[0], T_IN, 5, gone) == 0 && memcmp(gone, data, 512) == 0,
	      "read through iova");

	u32 ep;
	u64 addr;
	check(unmap(1, OFF_A + BUF_GPA + 0x1000, 0x1000) == 0, "unmap");
	memset(gone, 0x5a, 512);
	check(blk(&disk[0], T_IN, 5, gone) == 1 && gone[0] == 0x5a, "read into unmapped refused");
	check(fault_event(&ep, &addr) && ep == a && addr == OFF_A + BUF_GPA + 0x1000,
	      "unmapped fault event");

	memset(ro, 0x33, 512);
	check(blk(&disk[0], T_IN, 5, ro) == 1 && ro[0] == 0x33, "read into read-only refused");
	check(fault_event(&ep, &addr) && ep == a && addr == OFF_A + BUF_GPA + 0x2000,
	      "read-only fault event");

	/* Disk B given disk A's buffer IOVA (a pointer that is never dereferenced here): outside
	 * domain 2. */
	check(blk(&disk[1], T_OUT, 9, (u8 *)(uptr)(OFF_A + BUF_GPA - OFF_B)) == 1,
	      "cross-domain write refused");
	check(fault_event(&ep, &addr) && ep == b && addr == OFF_A + BUF_GPA,
	      "cross-domain fault event");

	print("iommu %s\n", failures ? "FAILED" : "passed");
	return failures ? 1 : 0;
}
