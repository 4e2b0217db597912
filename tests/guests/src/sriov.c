/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sriov: SR-IOV the way Linux's PCI core does it (drivers/pci/iov.c), on a
 * virtio-blk PF (`--disk path=IMG,vfs=N`):
 *
 * - find the PCIe root port on bus 0 (class 0604), program its bus numbers
 *   (secondary = subordinate = "bus=" from the command line, default 1) and
 *   its memory window, turn on ARI Forwarding once the PF shows the ARI
 *   capability;
 * - find the PF at function 0 of that bus and its SR-IOV capability; read
 *   TotalVFs, set ARI Capable Hierarchy and the 4 KiB System Page Size;
 * - per cycle (the "vfs=" list, e.g. vfs=4.2.7): set NumVFs, read First VF
 *   Offset and VF Stride, size VF BAR 0 and place the aperture (NumVFs x
 *   size), set VF Enable and VF MSE, compute each VF's routing id, check its
 *   config space (vendor 0xFFFF, class 018000, nothing past NumVFs) and bring
 *   it up as a virtio-blk device on BAR 0 = aperture + i x size;
 * - each VF writes its own pattern (cycle, VF) to its first and last sector
 *   and reads them back; prints "sriov cycle C written N" and waits for a
 *   byte on COM1 (the host checks the image);
 * - resets every VF, clears VF Enable and VF MSE, checks that the VFs read
 *   as absent and that their old BARs answer all-ones, prints "sriov cycle C
 *   disabled" and waits for a byte (the host counts threads, fds, memory).
 *
 * With "iommu=1" (`--iommu`, `iommu=on` on the disk): the VIOT must name every
 * VF's routing id; each VF is attached to a domain of its own (new each cycle)
 * in which guest memory is mapped at IOVA = GPA + OFF(i), and is driven
 * through those IOVAs; then VF 0 is handed an IOVA of VF 1's domain and must
 * be refused (IOERR) with a fault event naming VF 0's endpoint; and a routing
 * id past NumVFs is no endpoint (ATTACH fails).
 *
 * Ends with "sriov passed" (exit 0) or after a FAILED line (exit 1).
 */
#include "viommu.h"

#define MAX_VFS 8
#define MAX_CYCLES 8

#define T_IN 0
#define T_OUT 1

static struct {
	u32 type, reserved;
	u64 sector;
} __attribute__((aligned(16))) hdr;
static u8 data[512] __attribute__((aligned(512)));
static u8 back[512] __attribute__((aligned(512)));
static volatile u8 status_byte;
static int failures;
static struct virtio_dev vfs[MAX_VFS];
static struct virtio_dev iommu;
static int with_iommu;

#define LOW_SIZE 0x800000u /* image, rings, buffers, stack: one mapping per domain */
#define OFF(i) (0x40000000ull + (u64)(i) * 0x10000000ull)

static u8 events[4][24] __attribute__((aligned(8)));
static u8 head_slot[8];

static void post_event(u32 i)
{
	struct vbuf b = { events[i], 24, 1 };
	int head = virtq_add(&iommu.q[1], &b, 1);
	if (head >= 0)
		head_slot[head % 8] = (u8)i;
	virtq_kick(&iommu.q[1]);
}

/* The next fault event's endpoint and address (posting its buffer again); 0 if none came. */
static int fault_event(u32 *endpoint, u64 *addr)
{
	u32 len;
	int id = -1;
	for (u32 spin = 0; spin < 200000 && id < 0; spin++)
		id = virtq_get(&iommu.q[1], &len);
	if (id < 0)
		return 0;
	u32 slot = head_slot[id % 8];
	memcpy(endpoint, &events[slot][8], 4);
	memcpy(addr, &events[slot][16], 8);
	print("fault: endpoint %x address %llx\n", *endpoint, *addr);
	post_event(slot);
	return 1;
}

/* Whether the VIOT's PCI range nodes cover requester ids [first, last]. */
static int viot_covers(u16 first, u16 last)
{
	uptr viot = acpi_find_table((uptr)boot_info.rsdp_addr, "VIOT");
	if (!viot)
		return 0;
	u16 count = *(u16 *)(viot + 36), off = *(u16 *)(viot + 38);
	u32 len = ((struct acpi_header *)viot)->length;
	for (u32 rid = first; rid <= last; rid++) {
		int found = 0;
		u16 at = off;
		for (u16 i = 0; i < count && at + 16u <= len && !found; i++) {
			u16 nlen = *(u16 *)(viot + at + 2);
			if (*(u8 *)(viot + at) == 1 && rid >= *(u16 *)(viot + at + 12) &&
			    rid <= *(u16 *)(viot + at + 14))
				found = 1;
			if (nlen < 4)
				break;
			at = (u16)(at + nlen);
		}
		if (!found)
			return 0;
	}
	return 1;
}

static void check(int ok, const char *what, u32 n)
{
	if (!ok) {
		print("%s %u: FAILED\n", what, n);
		failures++;
	}
}

/* The pattern VF `vf` writes in cycle `cycle`: "MFVF", cycle, vf, then bytes of both. */
static void pattern(u8 *p, u32 cycle, u32 vf)
{
	for (u32 i = 0; i < 512; i++)
		p[i] = (u8)(i * 13 + cycle * 7 + vf * 31 + 1);
	memcpy(p, "MFVF", 4);
	p[4] = (u8)cycle;
	p[5] = (u8)vf;
}

static u8 request(struct virtio_dev *d, u32 type, u64 sector, u8 *buf)
{
	struct virtq *q = &d->q[0];
	hdr.type = type;
	hdr.sector = sector;
	status_byte = 0xEE;
	struct vbuf b[3] = {
		{ &hdr, 16, 0 },
		{ buf, 512, type != T_OUT },
		{ (void *)&status_byte, 1, 1 },
	};
	u32 len;
	if (virtq_add(q, b, 3) < 0)
		return 0xFF;
	virtq_kick(q);
	if (virtq_wait(q, &len) < 0)
		return 0xFE;
	return status_byte;
}

int guest_main(struct boot_info *bi)
{
	virtio_irq_init();
	pci_scan();

	u32 bus, counts[MAX_CYCLES], ncycles;
	if (sriov_args(bi->cmdline, &bus, counts, MAX_CYCLES, &ncycles)) {
		print("bad command line\n");
		return 1;
	}
	const char *arg = cmdline_find(bi->cmdline, "iommu");
	with_iommu = arg && arg[0] == '1';
	if (with_iommu) {
		if (viommu_init(&iommu, 8))
			return 1;
		for (u32 i = 0; i < 4; i++)
			post_event(i);
		print("iommu at %x\n", virtio_bdf(&iommu));
	}

	/* Root port bus numbers and ARI forwarding, the PF's SR-IOV capability, ARI Capable
	 * Hierarchy and System Page Size (lib/sriov.c). */
	static struct sriov sr;
	if (sriov_find(&sr, bus))
		return 1;
	print("root port at 00:%02x.0, ARI forwarding %s\n", (u32)((sr.port - pci_ecam) >> 15),
	      (mmio_read32(sr.port + sr.port_pcie + 0x24) & (1 << 5)) ? "supported" : "missing");
	uptr pf = sr.pf;
	u32 id = mmio_read32(pf);
	print("pf %02x:00.0 %04x:%04x\n", bus, id & 0xFFFF, id >> 16);
	if (id != ((VIRTIO_DEVICE_ID(VIRTIO_ID_BLOCK) << 16) | VIRTIO_VENDOR))
		return 1;
	print("pf ari at %x, sr-iov at %x\n", sr.ari, sr.cap);
	u16 total = sr.total;
	print("TotalVFs %u, VF device id %04x, page sizes %x\n", total, sr.vf_did,
	      mmio_read32(pf + sr.cap + SRIOV_PGSUP));

	/* The PF itself: a virtio-blk device like any other, offering VIRTIO_F_SR_IOV (bit 37). */
	static struct virtio_dev pfdev;
	if (virtio_init_at(&pfdev, pf, NULL))
		return 1;
	print("pf offers SR_IOV: %s\n", (pfdev.offered >> 37) & 1 ? "yes" : "no");
	check((pfdev.offered >> 37) & 1, "pf feature SR_IOV", 37);
	mmio_write8(pfdev.common + 0x14, 0); /* reset: the PF's own queues are not used */
	virtio_keep(); /* the IOMMU's rings stay; the VFs' are set up again each cycle */
	if (with_iommu)
		check(viot_covers((u16)(bus << 8), (u16)((bus << 8) + total)), "VIOT covers the VFs",
		      total);

	/* VF BAR 0 sized, an aperture for the most VFs a cycle may ask for, the port's window. */
	if (sriov_place(&sr, pfdev.bars[0], MAX_VFS))
		return 1;
	uptr aperture = sr.aperture;
	u32 vf_size = sr.vf_size;

	for (u32 cycle = 0; cycle < ncycles; cycle++) {
		u32 n = counts[cycle];
		if (n > total || n > MAX_VFS) {
			print("cycle %u: %u VFs is too many\n", cycle, n);
			return 1;
		}
		sriov_enable(&sr, n);
		u16 off = sr.off, stride = sr.stride;
		u32 size = vf_size;
		print("cycle %u: NumVFs %u, offset %u, stride %u, VF BAR %u bytes at %x\n", cycle, n,
		      off, stride, size, (u32)aperture);

		u32 pf_rid = bus << 8;
		for (u32 i = 0; i < n; i++) {
			u32 rid = pf_rid + off + i * stride;
			uptr c = sriov_cfg(rid);
			check(mmio_read32(c) == 0xFFFFFFFF, "VF ids read 0xFFFF", i);
			check((mmio_read32(c + 0x08) >> 8) == 0x018000, "VF class", i);
			uptr bars[6] = { aperture + i * vf_size, 0, 0, 0, 0, 0 };
			struct virtio_dev *d = &vfs[i];
			if (virtio_init_at(d, c, bars))
				return 1;
			if (with_iommu) {
				/* A domain of its own (new each cycle): guest memory at IOVA = GPA +
				 * OFF(i), for this VF only. */
				u32 domain = cycle * MAX_VFS + i + 1;
				check(viommu_attach(&iommu, domain, rid) == 0, "VF attached", i);
				check(viommu_map(&iommu, domain, OFF(i), 0, LOW_SIZE,
						 VIOMMU_MAP_R | VIOMMU_MAP_W) == 0,
				      "VF domain mapped", i);
				check((d->offered & VIRTIO_F_ACCESS_PLATFORM) != 0, "ACCESS_PLATFORM", i);
				d->iova_off = OFF(i);
			}
			if (virtio_negotiate(d, 0) || virtio_queue_init(d, 0, 8, 1)) {
				print("VF %u (%02x:%02x.%u) does not come up\n", i, rid >> 8, (rid >> 3) & 31,
				      rid & 7);
				return 1;
			}
			virtio_driver_ok(d);
		}
		/* One past NumVFs: absent. */
		check(mmio_read32(sriov_cfg(pf_rid + off + n * stride) + 0x08) == 0xFFFFFFFF,
		      "no VF past NumVFs", n);

		u32 sectors = 0;
		for (u32 i = 0; i < n; i++) {
			struct virtio_dev *d = &vfs[i];
			u32 cap = virtio_cfg32(d, 0);
			if (i == 0)
				sectors = cap;
			check(cap == sectors && virtio_cfg32(d, 4) == 0, "VF capacity", i);
			pattern(data, cycle, i);
			u64 last = (u64)cap - 1;
			check(request(d, T_OUT, 0, data) == 0, "write first sector", i);
			check(request(d, T_OUT, last, data) == 0, "write last sector", i);
			check(request(d, T_OUT, last + 1, data) == 1, "write past the end refused", i);
			memset(back, 0, 512);
			check(request(d, T_IN, 0, back) == 0 && !memcmp(back, data, 512), "read back", i);
		}
		if (with_iommu && n >= 2) {
			/* VF 0 handed an address of VF 1's domain: not mapped for it. */
			u32 ep;
			u64 addr, want = OFF(1) + (uptr)data;
			check(request(&vfs[0], T_OUT, 0, (u8 *)(uptr)(want - OFF(0))) == 1,
			      "VF 0 refused VF 1's memory", 0);
			check(fault_event(&ep, &addr) && ep == pf_rid + off && addr == want,
			      "fault names VF 0", 0);
			/* A routing id past NumVFs is no endpoint. */
			check(viommu_attach(&iommu, 100, pf_rid + off + n * stride) != 0,
			      "no endpoint past NumVFs", n);
			print("sriov cycle %u isolation ok\n", cycle);
		}
		print("sriov cycle %u written %u, %u sectors each\n", cycle, n, sectors);
		serial_wait_byte();

		/* Drivers go (reset), then VF Enable and VF MSE off, as pci_disable_sriov does. */
		for (u32 i = 0; i < n; i++)
			mmio_write8(vfs[i].common + 0x14, 0);
		virtio_release_all();
		sriov_disable(&sr);
		for (u32 i = 0; i < n; i++) {
			check(mmio_read32(sriov_cfg(pf_rid + off + i * stride) + 0x08) == 0xFFFFFFFF,
			      "VF gone", i);
			check(mmio_read32(aperture + i * vf_size) == 0xFFFFFFFF, "VF BAR gone", i);
		}
		print("sriov cycle %u disabled\n", cycle);
		serial_wait_byte();
	}
	if (failures)
		return 1;
	print("sriov passed\n");
	return 0;
}
