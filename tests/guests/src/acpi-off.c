/* SPDX-License-Identifier: Apache-2.0 */
/*
 * acpi-off: finds the ACPI tables as an OS does and powers the machine off
 * through them. The RSDP must be the same from the boot parameters
 * (hvm_start_info.rsdp_paddr, or the zero page's acpi_rsdp_addr) and from a
 * scan of the BIOS areas; every table must checksum. Prints
 *   acpi: rsdp at <addr>
 *   acpi: XSDT <signature of each XSDT entry> DSDT
 *   acpi cpus: <enabled local APICs in the MADT>
 *   acpi ioapic: id <id> at <addr>      (checked against the MP table)
 *   acpi ecam: <base> segment <s> buses <first>-<last>
 *   acpi s5: slp_typ <SLP_TYPa of \_S5_>
 *   acpi: poweroff
 * then writes SLP_TYP | SLP_EN to the FADT's sleep control register. If the
 * machine is still running after that, "poweroff failed" (V=1).
 */
#include "guest.h"

#define FADT_FLAGS 112
#define FADT_HW_REDUCED (1u << 20)
#define FADT_SLEEP_CONTROL 244
#define FADT_SLEEP_STATUS 256
#define FADT_MIN_LEN 268
#define GAS_SYSTEM_IO 1
#define SLP_TYP_SHIFT 2
#define SLP_TYP_MASK 0x1C
#define SLP_EN 0x20
#define WAK_STS 0x80
#define AML_NAME_OP 0x08
#define AML_ROOT_CHAR '\\'
#define AML_PACKAGE_OP 0x12
#define AML_ZERO_OP 0x00
#define AML_ONE_OP 0x01
#define AML_BYTE_PREFIX 0x0A

static u8 rd8(uptr p) { return *(const volatile u8 *)p; }
static u16 rd16(uptr p) { return *(const volatile u16 *)p; }
static u32 rd32(uptr p) { return *(const volatile u32 *)p; }
static u64 rd64(uptr p) { return rd32(p) | ((u64)rd32(p + 4) << 32); }

/* Enabled processors and the (first) I/O APIC of the MADT. */
static int madt_walk(uptr madt, u32 *cpus, u32 *ioapic_id, u32 *ioapic_addr)
{
	uptr end = madt + rd32(madt + 4);
	*cpus = 0;
	*ioapic_addr = 0;
	for (uptr e = madt + 44; e + 2 <= end;) {
		u32 len = rd8(e + 1);
		if (len < 2 || e + len > end) {
			print("acpi: bad MADT entry at %x\n", (u32)e);
			return -1;
		}
		switch (rd8(e)) {
		case 0: /* processor local APIC: flags bit 0 = enabled */
			if (len >= 8 && (rd32(e + 4) & 1))
				(*cpus)++;
			break;
		case 1: /* I/O APIC */
			if (len >= 12 && !*ioapic_addr) {
				*ioapic_id = rd8(e + 2);
				*ioapic_addr = rd32(e + 4);
			}
			break;
		case 9: /* processor local x2APIC */
			if (len >= 16 && (rd32(e + 8) & 1))
				(*cpus)++;
			break;
		}
		e += len;
	}
	return 0;
}

/*
 * SLP_TYPa of \_S5_: Name (\_S5_, Package (n) { SLP_TYPa, ... }) in the
 * DSDT's AML, the way a tiny OS finds it without an interpreter.
 */
static int find_s5(uptr dsdt, u8 *slp_typ)
{
	const u8 *aml = (const u8 *)dsdt;
	u32 len = rd32(dsdt + 4);
	for (u32 i = sizeof(struct acpi_header) + 1; i + 8 <= len; i++) {
		if (memcmp(aml + i, "_S5_", 4))
			continue;
		if (aml[i - 1] != AML_NAME_OP &&
		    !(aml[i - 1] == AML_ROOT_CHAR && aml[i - 2] == AML_NAME_OP))
			continue;
		u32 j = i + 4;
		if (aml[j++] != AML_PACKAGE_OP)
			continue;
		j += 1 + (aml[j] >> 6); /* PkgLength: lead byte + bytes it announces */
		j++;                    /* NumElements */
		if (j + 2 > len)
			break;
		switch (aml[j]) {
		case AML_ZERO_OP:
			*slp_typ = 0;
			return 0;
		case AML_ONE_OP:
			*slp_typ = 1;
			return 0;
		case AML_BYTE_PREFIX:
			*slp_typ = aml[j + 1];
			return 0;
		}
		print("acpi: \\_S5_ starts with opcode %x\n", aml[j]);
		return -1;
	}
	print("acpi: no \\_S5_ package in the DSDT\n");
	return -1;
}

/* An 8-bit I/O port register named by a generic address structure at `gas`. */
static int io_register(uptr gas, u16 *port)
{
	u64 addr = rd64(gas + 4);
	if (rd8(gas) != GAS_SYSTEM_IO || rd8(gas + 1) != 8 || addr > 0xFFFF) {
		print("acpi: sleep register is not an 8-bit I/O port (space %u, %u bits)\n", rd8(gas),
		      rd8(gas + 1));
		return -1;
	}
	*port = (u16)addr;
	return 0;
}

int guest_main(struct boot_info *bi)
{
	uptr scanned = acpi_scan_rsdp();
	if (!bi->rsdp_addr || bi->rsdp_addr != scanned) {
		print("acpi: boot parameters say rsdp %llx, the scan found %x\n", bi->rsdp_addr,
		      (u32)scanned);
		return 1;
	}
	uptr rsdp = scanned;
	print("acpi: rsdp at %x\n", (u32)rsdp);
	uptr xsdt = acpi_xsdt(rsdp);
	if (!xsdt) {
		print("acpi: no valid XSDT\n");
		return 1;
	}

	uptr fadt = 0, madt = 0, mcfg = 0;
	print("acpi: XSDT");
	for (u32 i = 0; i < acpi_xsdt_count(xsdt); i++) {
		uptr t = acpi_xsdt_entry(xsdt, i);
		if (!acpi_table_valid(t)) {
			print("\nacpi: XSDT entry %u at %x is not a valid table\n", i, (u32)t);
			return 1;
		}
		print(" %.4s", (const char *)t);
		if (!memcmp((const void *)t, "FACP", 4))
			fadt = t;
		else if (!memcmp((const void *)t, "APIC", 4))
			madt = t;
		else if (!memcmp((const void *)t, "MCFG", 4))
			mcfg = t;
	}
	uptr dsdt = fadt ? acpi_fadt_dsdt(fadt) : 0;
	print("%s\n", dsdt ? " DSDT" : "");
	if (!fadt || !madt || !mcfg || !dsdt) {
		print("acpi: FACP, APIC, MCFG or DSDT missing or invalid\n");
		return 1;
	}

	u32 cpus, ioapic_id = 0, ioapic_addr;
	if (madt_walk(madt, &cpus, &ioapic_id, &ioapic_addr) < 0)
		return 1;
	print("acpi cpus: %u\n", cpus);
	print("acpi ioapic: id %u at %x\n", ioapic_id, ioapic_addr);
	struct mp_info mp;
	if (mp_find(&mp) < 0)
		return 1;
	if (mp.ncpus != cpus || mp.ioapic_id != ioapic_id || mp.ioapic_addr != ioapic_addr) {
		print("acpi: the MP table says %u cpus, I/O APIC id %u at %x\n", mp.ncpus,
		      mp.ioapic_id, mp.ioapic_addr);
		return 1;
	}

	if (rd32(mcfg + 4) < 44 + 16) {
		print("acpi: MCFG has no ECAM entry\n");
		return 1;
	}
	print("acpi ecam: %llx segment %u buses %u-%u\n", rd64(mcfg + 44), rd16(mcfg + 52),
	      rd8(mcfg + 54), rd8(mcfg + 55));

	u8 slp_typ;
	if (find_s5(dsdt, &slp_typ) < 0)
		return 1;
	print("acpi s5: slp_typ %u\n", slp_typ);

	u16 control, status;
	if (rd32(fadt + 4) < FADT_MIN_LEN || !(rd32(fadt + FADT_FLAGS) & FADT_HW_REDUCED)) {
		print("acpi: the FADT is not hardware-reduced\n");
		return 1;
	}
	if (io_register(fadt + FADT_SLEEP_CONTROL, &control) < 0 ||
	    io_register(fadt + FADT_SLEEP_STATUS, &status) < 0)
		return 1;
	print("acpi: poweroff\n");
	/* What Linux's acpi_hw_extended_sleep does: clear WAK_STS, then SLP_TYP | SLP_EN. */
	outb(status, WAK_STS);
	outb(control, (u8)(((slp_typ << SLP_TYP_SHIFT) & SLP_TYP_MASK) | SLP_EN));
	/* A power-off need not take effect on the very next instruction. */
	delay_loop(20000);
	print("poweroff failed\n");
	return 1;
}
