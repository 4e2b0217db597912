/* SPDX-License-Identifier: Apache-2.0 */
/*
 * PCI Express as a Linux driver meets it: bus 0 through ECAM, memory BARs
 * sized and placed by the guest, capabilities, MSI-X to the local APIC.
 */
#include "guest.h"

#ifndef __x86_64__
#define MAX_FUNCS 32

static uptr funcs[MAX_FUNCS];
static u32 nfuncs;
static int scanned;
static uptr next_mmio = PCI_MMIO32_BASE;
uptr pci_ecam = PCI_ECAM_BASE;

/* The MCFG table through the XSDT, or through the RSDT of a revision-0 RSDP; 0 if none. */
static uptr find_mcfg(void)
{
	uptr rsdp = boot_info.rsdp_addr && boot_info.rsdp_addr < 0x100000000ull
			    ? (uptr)boot_info.rsdp_addr
			    : 0;
	if (!rsdp || !acpi_rsdp_valid(rsdp))
		rsdp = acpi_scan_rsdp();
	if (!rsdp)
		return 0;
	uptr t = acpi_find_table(rsdp, "MCFG");
	if (t)
		return t;
	uptr rsdt = mmio_read32(rsdp + 16);
	if (!rsdt || !acpi_table_valid(rsdt) || memcmp((const void *)rsdt, "RSDT", 4))
		return 0;
	u32 n = (mmio_read32(rsdt + 4) - 36) / 4;
	for (u32 i = 0; i < n; i++) {
		t = mmio_read32(rsdt + 36 + 4 * i);
		if (t && acpi_table_valid(t) && !memcmp((const void *)t, "MCFG", 4))
			return t;
	}
	return 0;
}

void pci_scan(void)
{
	if (scanned)
		return;
	scanned = 1;
	/* MCFG: 44-byte header, then entries of base (8), segment (2), first and last bus. */
	uptr mcfg = find_mcfg();
	u32 entries = mcfg ? (mmio_read32(mcfg + 4) - 44) / 16 : 0;
	int found = 0;
	for (u32 i = 0; i < entries && !found; i++) {
		uptr e = mcfg + 44 + 16 * i;
		u32 hi = mmio_read32(e + 4);
		if (mmio_read16(e + 8) == 0 && mmio_read8(e + 10) == 0 && hi == 0) {
			pci_ecam = mmio_read32(e);
			found = 1;
		}
	}
	print("pci ecam at %x (%s)\n", (u32)pci_ecam, found ? "MCFG" : "no MCFG, default");
	for (u32 dev = 0; dev < 32; dev++) {
		u32 nfn = 1;
		for (u32 fn = 0; fn < nfn; fn++) {
			uptr c = pci_cfg(dev, fn);
			u32 id = mmio_read32(c);
			if ((id & 0xFFFF) == 0xFFFF)
				continue;
			if (fn == 0 && (mmio_read8(c + 0x0E) & 0x80))
				nfn = 8; /* multi-function device */
			u32 class = mmio_read32(c + 0x08) >> 8;
			print("pci 00:%02x.%u %04x:%04x class %06x\n", dev, fn, id & 0xFFFF, id >> 16,
			      class);
			if ((class >> 16) == 0x06)
				continue; /* bridges (host, ISA/LPC, PCI) keep decoding */
			mmio_write16(c + PCI_COMMAND, 0);
			if (nfuncs < MAX_FUNCS)
				funcs[nfuncs++] = c;
		}
	}
}

uptr pci_find(u16 vendor, u16 device, u32 nth)
{
	pci_scan();
	u32 want = ((u32)device << 16) | vendor;
	for (u32 i = 0; i < nfuncs; i++)
		if (mmio_read32(funcs[i]) == want && nth-- == 0)
			return funcs[i];
	return 0;
}

uptr pci_assign_bar(uptr cfg, u32 bar, u32 *size)
{
	uptr reg = cfg + 0x10 + 4 * bar;
	u16 cmd = mmio_read16(cfg + PCI_COMMAND);
	mmio_write16(cfg + PCI_COMMAND, cmd & ~(PCI_CMD_MEM | 1)); /* decode off while sizing */
	u32 orig = mmio_read32(reg);
	int is64 = (orig & 0x7) == 0x4;
	u32 orig_hi = is64 ? mmio_read32(reg + 4) : 0;
	mmio_write32(reg, 0xFFFFFFFF);
	u32 lo = mmio_read32(reg);
	u32 hi = 0xFFFFFFFF;
	if (is64) {
		mmio_write32(reg + 4, 0xFFFFFFFF);
		hi = mmio_read32(reg + 4);
	}
	*size = 0;
	if ((lo & 1) || (lo & ~0xFu) == 0 || hi != 0xFFFFFFFF) {
		/* I/O, absent, or 4 GiB or more: not ours to place. */
		mmio_write32(reg, orig);
		if (is64)
			mmio_write32(reg + 4, orig_hi);
		mmio_write16(cfg + PCI_COMMAND, cmd);
		if (lo & ~0xFu)
			print("BAR %u: not a small memory BAR (%x)\n", bar, lo);
		return 0;
	}
	u32 sz = ~(lo & ~0xFu) + 1;
	uptr at = (next_mmio + sz - 1) & ~(uptr)(sz - 1);
	if (at + sz > PCI_MMIO32_END || at < next_mmio) {
		print("BAR %u: no room for %u bytes\n", bar, sz);
		return 0;
	}
	next_mmio = at + sz;
	mmio_write32(reg, (u32)at);
	if (is64)
		mmio_write32(reg + 4, 0);
	mmio_write16(cfg + PCI_COMMAND, cmd);
	*size = sz;
	return at;
}

uptr pci_alloc_mmio(u32 size, u32 align)
{
	uptr at = (next_mmio + align - 1) & ~(uptr)(align - 1);
	if (at < next_mmio || at + size > PCI_MMIO32_END || at + size < at)
		return 0;
	next_mmio = at + size;
	return at;
}

u8 pci_find_cap(uptr cfg, u8 id, u8 after)
{
	if (!(mmio_read16(cfg + 0x06) & 0x10)) /* status: capability list */
		return 0;
	u8 p = after ? mmio_read8(cfg + after + 1) : mmio_read8(cfg + PCI_CAP_PTR);
	for (u32 n = 0; p && n < 48; n++, p = mmio_read8(cfg + p + 1))
		if (mmio_read8(cfg + p) == id)
			return p;
	return 0;
}

void pci_enable(uptr cfg)
{
	mmio_write16(cfg + PCI_COMMAND, mmio_read16(cfg + PCI_COMMAND) | PCI_CMD_MEM | PCI_CMD_MASTER);
}

int pci_msix_init(struct msix *m, uptr cfg, const uptr bars[6])
{
	m->cfg = cfg;
	m->cap = pci_find_cap(cfg, PCI_CAP_MSIX, 0);
	m->size = 0;
	if (!m->cap)
		return 0;
	u32 t = mmio_read32(cfg + m->cap + 4);
	if ((t & 7) > 5 || !bars[t & 7])
		return 0;
	m->table = bars[t & 7] + (t & ~7u);
	m->size = (mmio_read16(cfg + m->cap + 2) & 0x7FF) + 1;
	/* Every entry masked (their reset state) until routed; then enable, function unmasked. */
	for (u32 i = 0; i < m->size; i++)
		mmio_write32(m->table + 16 * i + 12, 1);
	mmio_write16(cfg + m->cap + 2, (mmio_read16(cfg + m->cap + 2) & ~0x4000) | 0x8000);
	return (int)m->size;
}

void pci_msix_route(struct msix *m, u32 entry, u8 vector)
{
	uptr e = m->table + 16 * entry;
	mmio_write32(e + 0, 0xFEE00000u | (lapic_id() << 12));
	mmio_write32(e + 4, 0);
	mmio_write32(e + 8, vector);
	mmio_write32(e + 12, 0);
}
#endif
