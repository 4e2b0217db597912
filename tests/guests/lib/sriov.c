/* SPDX-License-Identifier: Apache-2.0 */
/*
 * SR-IOV enabling the way Linux's PCI core does it (drivers/pci/iov.c), for
 * a PF at function 0 of the bus behind a PCIe root port on bus 0: bus
 * numbers, ARI forwarding, ARI Capable Hierarchy, System Page Size, VF BAR 0
 * sizing and placement, the port's memory window, NumVFs, VF Enable and VF
 * MSE, VF routing ids.
 */
#include "guest.h"

uptr sriov_cfg(u32 rid) { return pci_ecam + ((uptr)rid << 12); }

/* The extended capability `id` of the function at `c`, or 0. */
static u32 find_ext(uptr c, u16 id)
{
	u32 at = 0x100;
	for (u32 n = 0; at >= 0x100 && at < 0x1000 && n < 64; n++) {
		u32 h = mmio_read32(c + at);
		if (h == 0 || h == 0xFFFFFFFF)
			return 0;
		if ((h & 0xFFFF) == id)
			return at;
		at = h >> 20;
	}
	return 0;
}

static u16 ctrl_base(struct sriov *s) { return s->ari ? SRIOV_CTRL_ARI : 0; }

int sriov_find(struct sriov *s, u32 bus)
{
	memset(s, 0, sizeof(*s));
	s->bus = bus;
	/* The root port: a PCI-to-PCI bridge (class 0604) with a PCIe capability of type 4. */
	for (u32 dev = 0; dev < 32 && !s->port; dev++) {
		uptr c = pci_cfg(dev, 0);
		if ((mmio_read32(c + 0x08) >> 8) != 0x060400)
			continue;
		u8 pcie = pci_find_cap(c, 0x10, 0);
		if (pcie && ((mmio_read16(c + pcie + 2) >> 4) & 0xF) == 4) {
			s->port = c;
			s->port_pcie = pcie;
		}
	}
	if (!s->port) {
		print("no root port\n");
		return -1;
	}
	/* Bus numbers (primary 0); the memory window once the BARs behind it are placed. */
	mmio_write32(s->port + 0x18, (bus << 16) | (bus << 8));
	s->pf = sriov_cfg(bus << 8);
	s->ari = find_ext(s->pf, 0x000E);
	s->cap = find_ext(s->pf, 0x0010);
	if (!s->cap) {
		print("pf %02x:00.0: no SR-IOV capability\n", bus);
		return -1;
	}
	if (s->ari)
		mmio_write16(s->port + s->port_pcie + 0x28,
			     mmio_read16(s->port + s->port_pcie + 0x28) | (1 << 5));
	s->total = mmio_read16(s->pf + s->cap + SRIOV_TOTAL);
	s->vf_did = mmio_read16(s->pf + s->cap + SRIOV_VF_DID);
	mmio_write16(s->pf + s->cap + SRIOV_CTRL, ctrl_base(s));
	mmio_write32(s->pf + s->cap + SRIOV_PGSIZE, 1);
	return 0;
}

int sriov_place(struct sriov *s, uptr pf_bar, u32 max_vfs)
{
	/* Size VF BAR 0 (64-bit memory) as Linux does: all-ones, read back; it is per VF. */
	uptr bar = s->pf + s->cap + SRIOV_BAR0;
	mmio_write32(bar, 0xFFFFFFFF);
	mmio_write32(bar + 4, 0xFFFFFFFF);
	u32 lo = mmio_read32(bar), hi = mmio_read32(bar + 4);
	s->vf_size = ~(lo & ~0xFu) + 1;
	if ((lo & 0x6) != 0x4 || hi != 0xFFFFFFFF || !s->vf_size) {
		print("VF BAR 0 reads %x %x\n", lo, hi);
		return -1;
	}
	/* The aperture for `max_vfs`, then the port's window over the PF's BAR and the
	 * aperture (1 MiB granular), as Linux sizes bridge windows. */
	s->aperture = pci_alloc_mmio(max_vfs * s->vf_size, s->vf_size);
	if (!s->aperture || !pf_bar || s->aperture < pf_bar) {
		print("no room for the VF BARs\n");
		return -1;
	}
	uptr wbase = pf_bar & ~0xFFFFFu, wlast = (s->aperture + max_vfs * s->vf_size - 1) | 0xFFFFF;
	mmio_write32(s->port + 0x20, ((wbase >> 16) & 0xFFF0) | (wlast & 0xFFF00000));
	mmio_write16(s->port + PCI_COMMAND, PCI_CMD_MEM | PCI_CMD_MASTER);
	return 0;
}

void sriov_enable(struct sriov *s, u32 n)
{
	mmio_write16(s->pf + s->cap + SRIOV_NUM, (u16)n);
	s->num = (u16)n;
	s->off = mmio_read16(s->pf + s->cap + SRIOV_OFFSET);
	s->stride = mmio_read16(s->pf + s->cap + SRIOV_STRIDE);
	uptr bar = s->pf + s->cap + SRIOV_BAR0;
	mmio_write32(bar, (u32)s->aperture);
	mmio_write32(bar + 4, 0);
	mmio_write16(s->pf + s->cap + SRIOV_CTRL, ctrl_base(s) | SRIOV_CTRL_VFE | SRIOV_CTRL_MSE);
}

u32 sriov_vf_rid(struct sriov *s, u32 i) { return (s->bus << 8) + s->off + i * s->stride; }

uptr sriov_vf_bar(struct sriov *s, u32 i) { return s->aperture + i * s->vf_size; }

void sriov_disable(struct sriov *s)
{
	mmio_write16(s->pf + s->cap + SRIOV_CTRL, ctrl_base(s));
}

int sriov_args(const char *cmdline, u32 *bus, u32 *counts, u32 max, u32 *ncycles)
{
	const char *arg = cmdline_find(cmdline, "bus");
	int ok = 1;
	*bus = arg ? (u32)parse_u64(arg, &ok) : 1;
	counts[0] = 2;
	*ncycles = 1;
	arg = cmdline_find(cmdline, "vfs");
	if (arg)
		*ncycles = parse_list(arg, counts, max);
	return !ok || *bus == 0 || *bus > 255 || *ncycles == 0;
}
