/* SPDX-License-Identifier: Apache-2.0 */
#include "guest.h"

void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(IOAPIC_BASE + 0x00, reg); /* IOREGSEL */
	mmio_write32(IOAPIC_BASE + 0x10, v);   /* IOWIN */
}

u32 ioapic_read(u32 reg)
{
	mmio_write32(IOAPIC_BASE + 0x00, reg);
	return mmio_read32(IOAPIC_BASE + 0x10);
}

void pic_disable(void)
{
	/* Remap to vectors 0x20-0x2F (out of the exception range), then mask all. */
	outb(0x20, 0x11); /* ICW1: edge, cascade, ICW4 */
	outb(0xA0, 0x11);
	outb(0x21, 0x20); /* ICW2: vector base */
	outb(0xA1, 0x28);
	outb(0x21, 0x04); /* ICW3: slave on IRQ2 */
	outb(0xA1, 0x02);
	outb(0x21, 0x01); /* ICW4: 8086 mode */
	outb(0xA1, 0x01);
	outb(0x21, 0xFF); /* OCW1: mask all */
	outb(0xA1, 0xFF);
}
