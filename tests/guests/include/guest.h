/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Shared declarations for the Manifold test guests.
 *
 * Everything here compiles for both -m32 (PVH entry, paging off) and -m64
 * (bzImage / ELF64 entry, long mode, first 4 GiB identity-mapped).
 * Guest kernel code must stay plain integer code: see tests/guests/README.md.
 */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed int s32;
typedef signed long long s64;
typedef unsigned long uptr; /* pointer-sized */
typedef unsigned long usize;

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define NORETURN __attribute__((noreturn))

/* ---- port I/O, MMIO, CPU helpers --------------------------------------- */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u8 mmio_read8(uptr addr) { return *(volatile u8 *)addr; }
static inline u16 mmio_read16(uptr addr) { return *(volatile u16 *)addr; }
static inline u32 mmio_read32(uptr addr) { return *(volatile u32 *)addr; }
static inline void mmio_write8(uptr addr, u8 v) { *(volatile u8 *)addr = v; }
static inline void mmio_write16(uptr addr, u16 v) { *(volatile u16 *)addr = v; }
static inline void mmio_write32(uptr addr, u32 v) { *(volatile u32 *)addr = v; }

/*
 * A pointer to a fixed physical address (paging off or identity-mapped).
 * Hides the constant from gcc, which otherwise warns about addresses in the
 * first page as if they were NULL + offset.
 */
static inline volatile void *phys(uptr addr)
{
	__asm__("" : "+r"(addr));
	return (volatile void *)addr;
}

static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }
static inline void cli(void) { __asm__ volatile("cli" : : : "memory"); }
static inline void sti(void) { __asm__ volatile("sti" : : : "memory"); }
/* sti; hlt: the interrupt shadow of sti makes the pair atomic. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" : : : "memory"); }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* Spin `n` times (a short delay; every instruction may cost ~1 us here). */
void delay_loop(u32 n);

/* ---- string helpers (also what gcc may call implicitly) ----------------- */

void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
void *memmove(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
usize strnlen(const char *s, usize max);

/* ---- COM1 output (polled) ------------------------------------------------ */

#define COM1 0x3F8
#define UART_RBR 0 /* receive buffer (read, DLAB=0) */
#define UART_THR 0 /* transmit holding (write, DLAB=0) */
#define UART_IER 1
#define UART_IIR 2
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_LSR_DR 0x01
#define UART_LSR_THRE 0x20

void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, usize n);
void serial_puts(const char *s);

/*
 * Minimal printf to COM1: %s %c %d %u %x %p %%, length modifiers l and ll,
 * '0' flag and field width (e.g. %02u), precision for %s (%.*s, %.10s).
 */
void print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Wait for a byte on COM1 and drop it (the host saying "go on"). */
void serial_wait_byte(void);

/* u64 / 10 without libgcc (32-bit builds have no __udivdi3 of their own). */
u64 udivmod64(u64 n, u32 d, u32 *rem);

/* ---- exit ----------------------------------------------------------------- */

#define DEBUG_EXIT_PORT 0xF4
/* Write `v` to the debug-exit port (the VMM exits with (v << 1) | 1), then halt. */
void debug_exit(u8 v) NORETURN;
void halt_forever(void) NORETURN;

/* ---- boot information ---------------------------------------------------- */

#define E820_RAM 1
#define E820_MAX 128

struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
};

struct boot_info {
	const char *kind;    /* "pvh", "bzimage", "elf64" */
	const char *cmdline; /* NUL-terminated, "" if none */
	u64 ram_bytes;       /* sum of e820 type-1 entries */
	u64 initrd_addr;     /* 0 if none */
	u64 initrd_size;
	u64 rsdp_addr;       /* ACPI RSDP from the boot parameters, 0 if none */
	u32 nr_e820;
	struct e820_entry e820[E820_MAX];
};

/* Filled by the entry code before guest_main runs. */
extern struct boot_info boot_info;

/*
 * Each guest provides this. Its return value is written to the debug-exit port.
 */
int guest_main(struct boot_info *bi);

/* PVH: parse struct hvm_start_info at physical address `paddr`. */
void bootinfo_from_pvh(struct boot_info *bi, uptr paddr);
/* Linux boot protocol: parse struct boot_params (the "zero page"). */
void bootinfo_from_zero_page(struct boot_info *bi, uptr paddr);

/*
 * Find `key=` as a whole word in the command line; return a pointer to the
 * value (after '='), or NULL.
 */
const char *cmdline_find(const char *cmdline, const char *key);
/* Parse a decimal (or 0x-prefixed hex) number; *ok = 0 on no digits. */
u64 parse_u64(const char *s, int *ok);
/* A list of decimal numbers separated by dots ("4.2.7") into out[0..max); returns how many. */
u32 parse_list(const char *s, u32 *out, u32 max);

/* Sum of `n` bytes at `p`, wrapping at 2^32 (word-at-a-time, few instructions/byte). */
u32 byte_sum(const u8 *p, u64 n);

/* ---- Intel MP table (MP spec 1.4) ---------------------------------------- */

#define MP_MAX_CPUS 64

struct mp_info {
	uptr fps_addr;   /* floating pointer structure */
	uptr table_addr; /* configuration table (0 = default configuration) */
	u32 lapic_addr;
	u32 ncpus;       /* enabled processor entries */
	u8 apic_id[MP_MAX_CPUS];
	u8 is_bsp[MP_MAX_CPUS];
	u32 nioapics;
	u8 ioapic_id;
	u32 ioapic_addr;
	u32 nbuses;
	u32 nioints; /* I/O interrupt assignment entries */
	u32 nlints;  /* local interrupt assignment entries */
};

/* Returns 0 on success, or a negative error (message printed). */
int mp_find(struct mp_info *mp);

/* ---- local APIC / I/O APIC ----------------------------------------------- */

#define LAPIC_BASE 0xFEE00000u
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0B0
#define LAPIC_SVR 0x0F0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360

#define IOAPIC_BASE 0xFEC00000u

static inline u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
static inline void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }
static inline u32 lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

void ioapic_write(u32 reg, u32 v);
u32 ioapic_read(u32 reg);
/* Mask every input of both 8259 PICs (after remapping them to 0x20-0x2F). */
void pic_disable(void);

/* ---- interrupts (32-bit builds only) ------------------------------------- */

struct int_frame {
	u32 edi, esi, ebp, esp_unused, ebx, edx, ecx, eax; /* pusha */
	u32 vector, error;
	u32 eip, cs, eflags;
};

typedef void (*irq_handler_t)(struct int_frame *f);

/* Load an IDT with stubs for all 256 vectors; unhandled vectors print and exit(2). */
void idt_init(void);
void idt_set_handler(u8 vector, irq_handler_t h);

/* ---- PCI Express through ECAM (lib/pci.c, 32-bit builds) ---------------- */

#define PCI_ECAM_BASE 0xE0000000u  /* bus 0 if ACPI has no MCFG; 1 MiB per bus */
#define PCI_MMIO32_BASE 0xC0000000u /* where the guest places the BARs it assigns */
#define PCI_MMIO32_END 0xE0000000u
#define PCI_COMMAND 0x04
#define PCI_CMD_MEM 0x2
#define PCI_CMD_MASTER 0x4
#define PCI_CAP_PTR 0x34
#define PCI_CAP_VENDOR 0x09
#define PCI_CAP_MSIX 0x11

/* ECAM of bus 0: from the ACPI MCFG table (as Linux finds it), else PCI_ECAM_BASE. */
extern uptr pci_ecam;
/* Configuration space of bus 0, device `dev`, function `fn` (after pci_scan). */
static inline uptr pci_cfg(u32 dev, u32 fn) { return pci_ecam + (dev << 15) + (fn << 12); }

/*
 * Find ECAM through ACPI (RSDP from the boot parameters or the BIOS areas,
 * XSDT or RSDT, MCFG), then walk bus 0: print one line per function, turn memory and I/O
 * decode off on every function but bridges (nothing decodes until the
 * guest assigns it, so no firmware placement can overlap ours) and remember
 * them. Idempotent.
 */
void pci_scan(void);
/* The `nth` function (0-based) with this vendor and device id, or 0. */
uptr pci_find(u16 vendor, u16 device, u32 nth);
/*
 * Size memory BAR `bar` (32 or 64-bit) with decode off, place it at the next
 * naturally aligned free address from PCI_MMIO32_BASE, write it back.
 * Returns its address (0 on failure); *size gets its size.
 */
uptr pci_assign_bar(uptr cfg, u32 bar, u32 *size);
/* `size` bytes of the MMIO window at an `align`ed address (a power of two), or 0. */
uptr pci_alloc_mmio(u32 size, u32 align);
/* Offset of the next capability with `id` after offset `after` (0: from the start), or 0. */
u8 pci_find_cap(uptr cfg, u8 id, u8 after);
/* Turn on memory decode and bus mastering. */
void pci_enable(uptr cfg);

/*
 * MSI-X of a function whose BARs are at bars[0..5] (0 = not assigned):
 * pci_msix_init finds the capability and table, masks nothing, enables
 * MSI-X and returns the table size (0 if there is none);
 * pci_msix_route points table entry `entry` at this CPU's local APIC with
 * vector `vector`, unmasked.
 */
struct msix {
	uptr cfg;
	u8 cap;
	u32 size;
	uptr table;
};
int pci_msix_init(struct msix *m, uptr cfg, const uptr bars[6]);
void pci_msix_route(struct msix *m, u32 entry, u8 vector);

/* ---- SR-IOV PF behind a root port (lib/sriov.c, 32-bit builds) ---------- */

/* SR-IOV capability registers (PCIe base spec 9.3.3) and Control bits. */
#define SRIOV_CTRL 0x08
#define SRIOV_TOTAL 0x0e
#define SRIOV_NUM 0x10
#define SRIOV_OFFSET 0x14
#define SRIOV_STRIDE 0x16
#define SRIOV_VF_DID 0x1a
#define SRIOV_PGSUP 0x1c
#define SRIOV_PGSIZE 0x20
#define SRIOV_BAR0 0x24
#define SRIOV_CTRL_VFE 0x1
#define SRIOV_CTRL_MSE 0x8
#define SRIOV_CTRL_ARI 0x10

struct sriov {
	uptr port;          /* the root port's configuration space */
	u8 port_pcie;       /* its PCIe capability */
	u32 bus;            /* the port's secondary bus; the PF is function 0 there */
	uptr pf;            /* the PF's configuration space */
	u32 ari, cap;       /* ARI and SR-IOV extended capabilities (ari 0: none) */
	u16 total, vf_did;  /* TotalVFs, VF Device ID */
	u32 vf_size;        /* VF BAR 0, per VF */
	uptr aperture;      /* where VF 0's BAR 0 goes */
	u16 num, off, stride;
};
/* ECAM address of routing id `rid` (bus << 8 | devfn). */
uptr sriov_cfg(u32 rid);
/*
 * Find the root port on bus 0, give it secondary bus `bus`, find the PF at
 * bus:00.0 and its SR-IOV capability, turn on ARI forwarding (when the PF has
 * ARI) and ARI Capable Hierarchy, 4 KiB System Page Size. 0, or -1 with a line printed.
 */
int sriov_find(struct sriov *s, u32 bus);
/* The SR-IOV guests' command line: bus=B (the port's secondary bus, default 1) and vfs=N,M,...
 * (VFs per enable cycle, default one cycle of 2). Nonzero when malformed. */
int sriov_args(const char *cmdline, u32 *bus, u32 *counts, u32 max, u32 *ncycles);
/* Size VF BAR 0, place an aperture for `max_vfs` after the PF's BAR `pf_bar`, open the
 * port's memory window over both. 0, or -1 with a line printed. */
int sriov_place(struct sriov *s, uptr pf_bar, u32 max_vfs);
/* NumVFs = n, VF BAR 0 = aperture, VF Enable and VF MSE on; reads offset and stride. */
void sriov_enable(struct sriov *s, u32 n);
u32 sriov_vf_rid(struct sriov *s, u32 i);
uptr sriov_vf_bar(struct sriov *s, u32 i);
/* VF Enable and VF MSE off. */
void sriov_disable(struct sriov *s);

/* ---- virtio over PCI, modern transport (lib/virtio.c, 32-bit builds) ---- */

#define VIRTIO_VENDOR 0x1AF4
#define VIRTIO_DEVICE_ID(type) (0x1040 + (type))
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19
#define VIRTIO_F_INDIRECT_DESC (1ull << 28)
#define VIRTIO_F_EVENT_IDX (1ull << 29)
#define VIRTIO_F_VERSION_1 (1ull << 32)
#define VIRTIO_F_ACCESS_PLATFORM (1ull << 33)
/* What virtio_negotiate accepts besides a device's own features, as Linux does. */
#define VIRTIO_F_DRIVER (VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | \
			 VIRTIO_F_ACCESS_PLATFORM)

#define VIRTQ_MAX_SIZE 64 /* a ring of this size fits one 4 KiB page */
#define VIRTIO_MAX_QUEUES 4
#define VIRTIO_IRQ_BASE 0x40 /* CPU vectors handed to queues, one each */
#define VIRTIO_IRQ_MAX 16

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VIRTQ_INDIRECT_MAX 4 /* descriptors in one indirect table */

struct vring_avail {
	u16 flags;
	u16 idx;
	u16 ring[VIRTQ_MAX_SIZE];
};

struct vring_used {
	u16 flags;
	u16 idx;
	struct {
		u32 id, len;
	} ring[VIRTQ_MAX_SIZE];
};

struct virtq {
	u16 index, size;
	u16 free_head, num_free;
	u16 last_used;
	u16 kicked;     /* avail idx at the last notification */
	u8 vector;      /* CPU vector of its MSI-X entry, 0 = none (polled) */
	u8 event_idx;   /* VIRTIO_F_EVENT_IDX: used_event / avail_event */
	u8 indirect;    /* VIRTIO_F_INDIRECT_DESC: chains of 2+ buffers in a table */
	uptr notify;    /* its notification register */
	u32 notifies;   /* notifications written (event idx may spare some) */
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	struct vring_desc (*tables)[VIRTQ_INDIRECT_MAX]; /* one indirect table per head */
	u64 iova_off;   /* added to every address the device is given (behind an IOMMU) */
};

struct virtio_dev {
	uptr cfg;       /* ECAM address of the function */
	uptr bars[6];
	uptr common, notify, isr, device;
	u32 notify_mult;
	struct msix msix;
	u64 offered, features;
	struct virtq q[VIRTIO_MAX_QUEUES];
	u64 iova_off;   /* set after virtio_init: the queues' rings and buffers are at GPA + this */
};

/* One buffer of a chain; `write` = device-writable. */
struct vbuf {
	void *addr;
	u32 len;
	int write;
};

/*
 * Load the IDT, mask the 8259s, enable the local APIC and count MSI-X
 * interrupts of vectors VIRTIO_IRQ_BASE..+VIRTIO_IRQ_MAX. Call once, first.
 * With "poll=1" on the command line, queues get no MSI-X vector and waits
 * poll the used ring (virtio_poll = 1): what runs under a KVM that cannot
 * return from an interrupt (QEMU on the development hosts).
 */
void virtio_irq_init(void);
extern int virtio_poll;
/* Interrupts received so far: all, or on one CPU vector. */
extern volatile u32 virtio_irqs;
u32 virtio_vector_irqs(u8 vector);

/*
 * Find the `nth` virtio function of device type `type` on bus 0, assign its
 * BARs, find the virtio structures and MSI-X, enable it, reset the device and
 * set ACKNOWLEDGE | DRIVER; d->offered holds the device's features.
 * Returns 0, or -1 with a line printed.
 */
int virtio_init(struct virtio_dev *d, u32 type, u32 nth);
/*
 * virtio_init for the function at ECAM address `cfg` (any bus), with its BARs
 * at bars[0..5] as placed elsewhere (an SR-IOV VF's come from its PF's VF
 * BARs), or sized and placed here if `bars` is NULL.
 */
int virtio_init_at(struct virtio_dev *d, uptr cfg, const uptr *bars);
/*
 * Forget the rings and MSI-X vectors of every queue set up since the last
 * virtio_keep() (or since boot): those devices were reset, start over.
 */
void virtio_release_all(void);
void virtio_keep(void);
/*
 * Accept offered & (want | VIRTIO_F_DRIVER), set FEATURES_OK and check it
 * held; prints the features accepted. "plain=1" on the command line accepts
 * only offered & (want | VERSION_1): no event index, no indirect tables.
 */
int virtio_negotiate(struct virtio_dev *d, u64 want);
/*
 * Set up queue `index` with `size` entries (rings in a page of the
 * library's), with its own MSI-X entry (= index) on the next free CPU vector
 * if `irq`, else polled, and enable it.
 */
int virtio_queue_init(struct virtio_dev *d, u16 index, u16 size, int irq);
void virtio_driver_ok(struct virtio_dev *d);
/* Device configuration space. */
static inline u8 virtio_cfg8(struct virtio_dev *d, u32 off) { return mmio_read8(d->device + off); }
static inline u16 virtio_cfg16(struct virtio_dev *d, u32 off) { return mmio_read16(d->device + off); }
static inline u32 virtio_cfg32(struct virtio_dev *d, u32 off) { return mmio_read32(d->device + off); }

/* Chain `n` buffers (device-readable ones first) into the available ring; head id or -1. */
int virtq_add(struct virtq *q, const struct vbuf *b, u32 n);
void virtq_kick(struct virtq *q);
/* The next used chain, if any: its head id (descriptors freed), *len = bytes written. Else -1. */
int virtq_get(struct virtq *q, u32 *len);
/* Wait for the next used chain (halting between MSI-X interrupts, or polling). */
int virtq_wait(struct virtq *q, u32 *len);
/*
 * For bad-input tests: publish `head` of descriptors the caller wrote itself
 * (nothing else in flight), kick, wait for the used entry; returns its id,
 * *len. The free list is the caller's to repair: virtq_reset_free, once
 * every chain is back, makes every descriptor free again.
 */
int virtq_put_raw(struct virtq *q, u16 head, u32 *len);
void virtq_reset_free(struct virtq *q);
/* Add buffers, kick, wait for them: bytes the device wrote, or -1. */
int virtq_xfer(struct virtq *q, const struct vbuf *b, u32 n);
/* Print `n` bytes as hex on one line after `label`. */
void print_hex(const char *label, const u8 *p, u32 n);

/* ---- ACPI (lib/acpi.c) ---------------------------------------------------- */

struct acpi_header {
	char sig[4];
	u32 length;
	u8 revision;
	u8 checksum;
	char oem_id[6];
	char oem_table_id[8];
	u32 oem_revision;
	u32 creator_id;
	u32 creator_revision;
} __attribute__((packed));

/* An RSDP at `p`: signature, checksum, and from revision 2 the extended checksum. */
int acpi_rsdp_valid(uptr p);
/* The RSDP found as an OS without boot parameters finds it (EBDA, then 0xE0000..0xFFFFF), or 0. */
uptr acpi_scan_rsdp(void);
/* A sane length and a zero checksum. */
int acpi_table_valid(uptr p);
/* The RSDP's XSDT if valid and reachable, or 0; its entry count and entries (0 if unreachable). */
uptr acpi_xsdt(uptr rsdp);
u32 acpi_xsdt_count(uptr xsdt);
uptr acpi_xsdt_entry(uptr xsdt, u32 i);
/* A valid table with this signature listed in the XSDT, or 0. */
uptr acpi_find_table(uptr rsdp, const char *sig);
/* The FADT's DSDT (X_DSDT, else DSDT) if valid, or 0. */
uptr acpi_fadt_dsdt(uptr fadt);

#endif /* GUEST_H */
