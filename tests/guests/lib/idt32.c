/* SPDX-License-Identifier: Apache-2.0 */
/* 32-bit IDT: 256 stubs (arch/isr32.S) calling interrupt_dispatch(). */
#include "guest.h"

#ifndef __x86_64__
struct idt_gate {
	u16 off_lo;
	u16 sel;
	u8 zero;
	u8 type;
	u16 off_hi;
} __attribute__((packed));

extern const u8 isr_stubs[]; /* 256 stubs, 16 bytes apart */

static struct idt_gate idt[256] __attribute__((aligned(8)));
static irq_handler_t handlers[256];

void interrupt_dispatch(struct int_frame *f);
void interrupt_dispatch(struct int_frame *f)
{
	u32 v = f->vector & 0xFF;
	if (handlers[v]) {
		handlers[v](f);
		return;
	}
	print("\nunexpected interrupt %u (error %x) at eip %x\n", v, f->error, f->eip);
	debug_exit(2);
}

void idt_set_handler(u8 vector, irq_handler_t h)
{
	handlers[vector] = h;
}

void idt_init(void)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	for (u32 i = 0; i < 256; i++) {
		uptr off = (uptr)(isr_stubs + 16 * i);
		idt[i].off_lo = (u16)off;
		idt[i].sel = cs;
		idt[i].zero = 0;
		idt[i].type = 0x8E; /* present, DPL 0, 32-bit interrupt gate */
		idt[i].off_hi = (u16)(off >> 16);
	}
	struct {
		u16 limit;
		u32 base;
	} __attribute__((packed)) idtr = { sizeof(idt) - 1, (u32)(uptr)idt };
	__asm__ volatile("lidt %0" : : "m"(idtr));
}
#endif
