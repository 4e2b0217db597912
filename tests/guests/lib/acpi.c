/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ACPI as an OS meets it: the RSDP from the boot parameters or a scan of the
 * BIOS areas, checksummed tables, the XSDT's list, the FADT's DSDT pointer.
 * Only tables below 4 GiB are reachable (paging off or the 4 GiB identity map).
 */
#include "guest.h"

/* A sanity bound on a table's length before summing it (ours are a few KiB). */
#define ACPI_MAX_TABLE 0x100000u
#define RSDP_V1_LEN 20
#define RSDP_REVISION 15
#define RSDP_LENGTH 20
#define RSDP_XSDT 24
#define FADT_DSDT 40
#define FADT_X_DSDT 140

static u32 rd32(uptr p) { return *(const volatile u32 *)p; }
static u64 rd64(uptr p) { return rd32(p) | ((u64)rd32(p + 4) << 32); }
static u8 sum8(uptr p, u32 n) { return (u8)byte_sum((const u8 *)p, n); }

/* A 64-bit table address this guest can reach, else 0. */
static uptr reach(u64 addr)
{
	return addr && addr < 0x100000000ull - ACPI_MAX_TABLE ? (uptr)addr : 0;
}

int acpi_rsdp_valid(uptr p)
{
	if (memcmp((const void *)p, "RSD PTR ", 8) || sum8(p, RSDP_V1_LEN))
		return 0;
	if (*(const volatile u8 *)(p + RSDP_REVISION) >= 2) {
		u32 len = rd32(p + RSDP_LENGTH);
		if (len < 36 || len > 4096 || sum8(p, len))
			return 0;
	}
	return 1;
}

static uptr scan(uptr base, u32 len)
{
	for (uptr p = base; p + 36 <= base + len; p += 16)
		if (acpi_rsdp_valid(p))
			return p;
	return 0;
}

uptr acpi_scan_rsdp(void)
{
	/* ACPI 6.5, 5.2.5.1: the first KiB of the EBDA, then 0xE0000..0xFFFFF. */
	uptr ebda = (uptr)*(volatile u16 *)phys(0x40E) << 4;
	uptr p = 0;
	if (ebda >= 0x80000 && ebda < 0xA0000)
		p = scan(ebda, 1024);
	if (!p)
		p = scan(0xE0000, 0x20000);
	return p;
}

int acpi_table_valid(uptr p)
{
	if (!p)
		return 0;
	u32 len = rd32(p + 4);
	return len >= sizeof(struct acpi_header) && len <= ACPI_MAX_TABLE && !sum8(p, len);
}

uptr acpi_xsdt(uptr rsdp)
{
	if (*(const volatile u8 *)(rsdp + RSDP_REVISION) < 2)
		return 0;
	uptr x = reach(rd64(rsdp + RSDP_XSDT));
	if (!x || memcmp((const void *)x, "XSDT", 4) || !acpi_table_valid(x))
		return 0;
	return x;
}

u32 acpi_xsdt_count(uptr xsdt)
{
	return (rd32(xsdt + 4) - sizeof(struct acpi_header)) / 8;
}

uptr acpi_xsdt_entry(uptr xsdt, u32 i)
{
	return reach(rd64(xsdt + sizeof(struct acpi_header) + 8 * i));
}

uptr acpi_find_table(uptr rsdp, const char *sig)
{
	uptr xsdt = acpi_xsdt(rsdp);
	if (!xsdt)
		return 0;
	for (u32 i = 0; i < acpi_xsdt_count(xsdt); i++) {
		uptr t = acpi_xsdt_entry(xsdt, i);
		if (t && !memcmp((const void *)t, sig, 4) && acpi_table_valid(t))
			return t;
	}
	return 0;
}

uptr acpi_fadt_dsdt(uptr fadt)
{
	uptr d = 0;
	if (rd32(fadt + 4) >= FADT_X_DSDT + 8)
		d = reach(rd64(fadt + FADT_X_DSDT));
	if (!d)
		d = rd32(fadt + FADT_DSDT);
	if (!d || memcmp((const void *)d, "DSDT", 4) || !acpi_table_valid(d))
		return 0;
	return d;
}
