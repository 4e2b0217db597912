/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Boot information: PVH struct hvm_start_info and Linux struct boot_params,
 * reduced to what the guests print (command line, e820 RAM, initramfs).
 */
#include "guest.h"

struct boot_info boot_info;

/* xen/include/public/arch-x86/hvm/start_info.h */
#define HVM_START_MAGIC 0x336ec578u
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	/* version >= 1 */
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};
struct hvm_modlist_entry {
	u64 paddr;
	u64 size;
	u64 cmdline_paddr;
	u64 reserved;
};
struct hvm_memmap_table_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

/* struct boot_params offsets (Documentation/arch/x86/zero-page.rst) */
#define BP_ACPI_RSDP_ADDR 0x070
#define BP_EXT_RAMDISK_IMAGE 0x0C0
#define BP_EXT_RAMDISK_SIZE 0x0C4
#define BP_EXT_CMD_LINE_PTR 0x0C8
#define BP_E820_ENTRIES 0x1E8
#define BP_HDR_RAMDISK_IMAGE 0x218
#define BP_HDR_RAMDISK_SIZE 0x21C
#define BP_HDR_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2D0 /* 128 packed entries of 20 bytes */

static const char empty[] = "";

/* Addresses a 32-bit guest with paging off (or the 4 GiB identity map) can reach. */
static int reachable(u64 addr, u64 size)
{
	return addr + size >= addr && addr + size <= 0x100000000ull;
}

static void add_e820(struct boot_info *bi, u64 addr, u64 size, u32 type)
{
	if (bi->nr_e820 < E820_MAX) {
		struct e820_entry *e = &bi->e820[bi->nr_e820++];
		e->addr = addr;
		e->size = size;
		e->type = type;
	}
	if (type == E820_RAM)
		bi->ram_bytes += size;
}

void bootinfo_from_pvh(struct boot_info *bi, uptr paddr)
{
	const struct hvm_start_info *si = (const void *)paddr;

	bi->cmdline = empty;
	if (!paddr || si->magic != HVM_START_MAGIC) {
		print("warning: bad hvm_start_info at %p\n", (void *)paddr);
		return;
	}
	bi->rsdp_addr = si->rsdp_paddr;
	if (si->cmdline_paddr && reachable(si->cmdline_paddr, 1))
		bi->cmdline = (const char *)(uptr)si->cmdline_paddr;
	if (si->nr_modules && si->modlist_paddr && reachable(si->modlist_paddr, 32)) {
		const struct hvm_modlist_entry *m = (const void *)(uptr)si->modlist_paddr;
		bi->initrd_addr = m->paddr;
		bi->initrd_size = m->size;
	}
	if (si->version >= 1 && si->memmap_paddr && reachable(si->memmap_paddr, 24)) {
		const struct hvm_memmap_table_entry *e = (const void *)(uptr)si->memmap_paddr;
		for (u32 i = 0; i < si->memmap_entries; i++)
			add_e820(bi, e[i].addr, e[i].size, e[i].type);
	}
}

static u32 rd32(uptr p) { return *(const volatile u32 *)p; }
static u64 rd64(uptr p) { return rd32(p) | ((u64)rd32(p + 4) << 32); }

void bootinfo_from_zero_page(struct boot_info *bi, uptr bp)
{
	bi->cmdline = empty;
	if (!bp) {
		print("warning: no boot_params\n");
		return;
	}
	u64 cmd = rd32(bp + BP_HDR_CMD_LINE_PTR) | ((u64)rd32(bp + BP_EXT_CMD_LINE_PTR) << 32);
	if (cmd && reachable(cmd, 1))
		bi->cmdline = (const char *)(uptr)cmd;
	bi->initrd_addr = rd32(bp + BP_HDR_RAMDISK_IMAGE) | ((u64)rd32(bp + BP_EXT_RAMDISK_IMAGE) << 32);
	bi->initrd_size = rd32(bp + BP_HDR_RAMDISK_SIZE) | ((u64)rd32(bp + BP_EXT_RAMDISK_SIZE) << 32);
	bi->rsdp_addr = rd64(bp + BP_ACPI_RSDP_ADDR);
	u32 n = *(const volatile u8 *)(bp + BP_E820_ENTRIES);
	if (n > E820_MAX)
		n = E820_MAX;
	for (u32 i = 0; i < n; i++) {
		uptr e = bp + BP_E820_TABLE + 20 * i;
		add_e820(bi, rd64(e), rd64(e + 8), rd32(e + 16));
	}
}

const char *cmdline_find(const char *cmdline, const char *key)
{
	usize klen = strlen(key);
	const char *p = cmdline;
	while (p && *p) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		if (!memcmp(p, key, klen) && p[klen] == '=')
			return p + klen + 1;
		while (*p && *p != ' ' && *p != '\t' && *p != '\n')
			p++;
	}
	return NULL;
}

u64 parse_u64(const char *s, int *ok)
{
	u64 v = 0;
	u32 base = 10;
	int digits = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (;; s++) {
		u32 d;
		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			break;
		v = v * base + d;
		digits++;
	}
	if (ok)
		*ok = digits > 0;
	return v;
}

u32 byte_sum(const u8 *p, u64 n)
{
	u32 total = 0;
	while (n && ((uptr)p & (sizeof(uptr) - 1))) {
		total += *p++;
		n--;
	}
	/*
	 * Word at a time: split each word into two sets of 16-bit lanes holding one
	 * byte each and add them up; 128 words at most before a lane could overflow.
	 */
	const uptr lanes = (uptr)-1 / 0xFFFF; /* 0x0001..0001 per 16-bit lane */
	const uptr mask8 = lanes * 0xFF;      /* 0x00FF00FF... */
	const uptr *w = (const uptr *)p;
	while (n >= sizeof(uptr)) {
		uptr acc = 0;
		for (u32 k = 0; k < 128 && n >= sizeof(uptr); k++, n -= sizeof(uptr)) {
			uptr x = *w++;
			acc += (x & mask8) + ((x >> 8) & mask8);
		}
		/* Fold the 16-bit lanes. */
		for (u32 shift = 16; shift < 8 * sizeof(uptr); shift += 16)
			total += (u32)((acc >> shift) & 0xFFFF);
		total += (u32)(acc & 0xFFFF);
	}
	p = (const u8 *)w;
	while (n--)
		total += *p++;
	return total;
}

u32 parse_list(const char *s, u32 *out, u32 max)
{
	u32 n = 0, v = 0, digits = 0;
	for (;; s++) {
		if (*s >= '0' && *s <= '9') {
			v = v * 10 + (u32)(*s - '0');
			digits++;
			continue;
		}
		if (digits && n < max)
			out[n++] = v;
		v = digits = 0;
		if (*s != '.')
			return n;
	}
}
