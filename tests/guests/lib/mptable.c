/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Intel MultiProcessor Specification 1.4: find the floating pointer structure
 * and walk the base configuration table.
 */
#include "guest.h"

struct mp_fps {
	char sig[4]; /* "_MP_" */
	u32 table;   /* physical address of the configuration table */
	u8 length;   /* in 16-byte units (1) */
	u8 spec_rev; /* 1 or 4 */
	u8 checksum;
	u8 feature[5]; /* feature[0] != 0: default configuration number */
} __attribute__((packed));

struct mp_table_hdr {
	char sig[4]; /* "PCMP" */
	u16 length;  /* base table length */
	u8 spec_rev;
	u8 checksum;
	char oem[8];
	char product[12];
	u32 oem_table;
	u16 oem_table_size;
	u16 entry_count;
	u32 lapic_addr;
	u16 ext_length;
	u8 ext_checksum;
	u8 reserved;
} __attribute__((packed));

static u8 checksum(const u8 *p, usize n)
{
	u8 sum = 0;
	while (n--)
		sum += *p++;
	return sum;
}

static uptr scan(uptr base, usize len)
{
	for (uptr p = base; p + 16 <= base + len; p += 16) {
		const struct mp_fps *f = (const void *)p;
		if (memcmp(f->sig, "_MP_", 4) || f->length != 1)
			continue;
		if (checksum((const u8 *)p, 16)) {
			print("mptable: bad floating pointer checksum at %p\n", (void *)p);
			continue;
		}
		if (f->spec_rev != 1 && f->spec_rev != 4)
			print("mptable: unusual spec revision %u\n", f->spec_rev);
		return p;
	}
	return 0;
}

static uptr find_fps(void)
{
	/* BIOS data area: EBDA segment at 0x40E, base memory size (KiB) at 0x413. */
	uptr ebda = (uptr)*(volatile u16 *)phys(0x40E) << 4;
	uptr basemem = (uptr)*(volatile u16 *)phys(0x413) << 10;
	uptr p = 0;

	if (ebda >= 0x80000 && ebda < 0xA0000)
		p = scan(ebda, 1024);
	if (!p) {
		if (basemem < 0x80000 || basemem > 0xA0000)
			basemem = 0xA0000; /* BDA not filled in: assume 640 KiB */
		p = scan(basemem - 1024, 1024);
	}
	if (!p)
		p = scan(0xF0000, 0x10000);
	return p;
}

int mp_find(struct mp_info *mp)
{
	memset(mp, 0, sizeof(*mp));
	mp->fps_addr = find_fps();
	if (!mp->fps_addr) {
		print("mptable: no floating pointer structure found\n");
		return -1;
	}
	const struct mp_fps *f = (const void *)mp->fps_addr;
	if (f->feature[0] || !f->table) {
		/* Default configurations (MP spec chapter 5): two processors, ids 0 and 1. */
		mp->lapic_addr = LAPIC_BASE;
		mp->ncpus = 2;
		mp->apic_id[0] = 0;
		mp->is_bsp[0] = 1;
		mp->apic_id[1] = 1;
		mp->nioapics = 1;
		mp->ioapic_addr = IOAPIC_BASE;
		mp->ioapic_id = 2;
		return 0;
	}
	if (f->table >= 0xFFFFFFF0u) {
		print("mptable: bad table address %x\n", f->table);
		return -1;
	}
	mp->table_addr = f->table;
	const struct mp_table_hdr *h = (const void *)mp->table_addr;
	if (memcmp(h->sig, "PCMP", 4)) {
		print("mptable: bad configuration table signature\n");
		return -1;
	}
	if (h->length < sizeof(*h) || checksum((const u8 *)h, h->length)) {
		print("mptable: bad configuration table checksum or length\n");
		return -1;
	}
	mp->lapic_addr = h->lapic_addr;

	const u8 *e = (const u8 *)h + sizeof(*h);
	const u8 *end = (const u8 *)h + h->length;
	for (u32 i = 0; i < h->entry_count && e < end; i++) {
		switch (e[0]) {
		case 0: /* processor, 20 bytes: id, version, flags (bit 0 enabled, bit 1 BSP) */
			if ((e[3] & 1) && mp->ncpus < MP_MAX_CPUS) {
				mp->apic_id[mp->ncpus] = e[1];
				mp->is_bsp[mp->ncpus] = (e[3] >> 1) & 1;
				mp->ncpus++;
			}
			e += 20;
			break;
		case 1: /* bus */
			mp->nbuses++;
			e += 8;
			break;
		case 2: /* I/O APIC: id, version, flags, address */
			if (e[3] & 1) {
				if (!mp->nioapics) {
					mp->ioapic_id = e[1];
					mp->ioapic_addr = *(const u32 *)(e + 4);
				}
				mp->nioapics++;
			}
			e += 8;
			break;
		case 3: /* I/O interrupt assignment */
			mp->nioints++;
			e += 8;
			break;
		case 4: /* local interrupt assignment */
			mp->nlints++;
			e += 8;
			break;
		default:
			print("mptable: unknown entry type %u\n", e[0]);
			return -1;
		}
	}
	return 0;
}
