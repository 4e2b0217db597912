/* SPDX-License-Identifier: Apache-2.0 */
/*
 * echo: interrupt-driven serial echo. COM1's receive interrupt goes through
 * I/O APIC pin 4 to the local APIC; the ISR drains RBR and echoes each byte.
 * The main loop only halts: every echoed byte proves an interrupt arrived.
 * Ctrl-D (0x04) ends it with "echo done: <bytes> bytes, <irqs> interrupts",
 * where <bytes> counts every byte received, the Ctrl-D included.
 */
#include "guest.h"

#define UART_VECTOR 0x24
#define SPURIOUS_VECTOR 0xFF
#define UART_IRQ_PIN 4

static volatile u32 irqs, bytes, done;

static void uart_isr(struct int_frame *f)
{
	(void)f;
	irqs++;
	while (!done && (inb(COM1 + UART_LSR) & UART_LSR_DR)) {
		u8 c = inb(COM1 + UART_RBR);
		bytes++;
		if (c == 0x04) {
			done = 1;
			break;
		}
		serial_putc((char)c);
	}
	lapic_eoi();
}

static void spurious_isr(struct int_frame *f)
{
	(void)f; /* no EOI for spurious interrupts */
}

int guest_main(struct boot_info *bi)
{
	(void)bi;
	idt_init();
	idt_set_handler(UART_VECTOR, uart_isr);
	idt_set_handler(SPURIOUS_VECTOR, spurious_isr);

	pic_disable();
	u32 self = lapic_id();
	lapic_write(LAPIC_LVT_LINT0, 1u << 16); /* masked: no ExtINT from the PIC */
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR); /* software enable */

	/* Redirection entry for pin 4: fixed, physical, active high, edge, unmasked. */
	ioapic_write(0x10 + 2 * UART_IRQ_PIN + 1, self << 24);
	ioapic_write(0x10 + 2 * UART_IRQ_PIN, UART_VECTOR);

	/* UART: receive-data-available interrupt; OUT2 gates the IRQ line on a PC. */
	outb(COM1 + UART_MCR, 0x0B); /* DTR, RTS, OUT2 */
	outb(COM1 + UART_IER, 0x01);

	print("echo ready\n");
	cli();
	while (!done) {
		sti_hlt(); /* an interrupt wakes us; the ISR runs before cli */
		cli();
	}
	print("\necho done: %u bytes, %u interrupts\n", bytes, irqs);
	return 0;
}
