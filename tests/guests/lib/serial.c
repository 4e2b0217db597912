/* SPDX-License-Identifier: Apache-2.0 */
/* COM1 output by polling the line status register, and a small printf. */
#include "guest.h"

void serial_init(void)
{
	outb(COM1 + UART_IER, 0x00);  /* no interrupts */
	outb(COM1 + UART_LCR, 0x80);  /* DLAB on */
	outb(COM1 + UART_RBR, 0x01);  /* divisor latch low: 115200 baud */
	outb(COM1 + UART_IER, 0x00);  /* divisor latch high */
	outb(COM1 + UART_LCR, 0x03);  /* 8N1, DLAB off */
	outb(COM1 + UART_MCR, 0x03);  /* DTR, RTS */
}

void serial_putc(char c)
{
	/* Bounded: a missing UART reads as 0xFF (THRE set) anyway. */
	for (u32 spins = 0; spins < 100000; spins++) {
		if (inb(COM1 + UART_LSR) & UART_LSR_THRE)
			break;
		cpu_relax();
	}
	outb(COM1 + UART_THR, (u8)c);
}

void serial_write(const char *s, usize n)
{
	while (n--)
		serial_putc(*s++);
}

void serial_puts(const char *s)
{
	while (*s)
		serial_putc(*s++);
}

u64 udivmod64(u64 n, u32 d, u32 *rem)
{
#ifdef __x86_64__
	if (rem)
		*rem = (u32)(n % d);
	return n / d;
#else
	/* Two 64/32 divisions with the hardware `div`; neither can overflow. */
	u32 hi = (u32)(n >> 32), lo = (u32)n, qhi, qlo, r;
	qhi = hi / d;
	r = hi % d;
	__asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "rm"(d));
	if (rem)
		*rem = r;
	return ((u64)qhi << 32) | qlo;
#endif
}

static void emit_padded(const char *s, usize len, int width, char pad)
{
	while (width > (int)len) {
		serial_putc(pad);
		width--;
	}
	serial_write(s, len);
}

static void emit_number(u64 v, u32 base, int neg, int width, char pad)
{
	char buf[24];
	int i = sizeof(buf);
	do {
		u32 digit;
		v = udivmod64(v, base, &digit);
		buf[--i] = (char)(digit < 10 ? '0' + digit : 'a' + digit - 10);
	} while (v);
	if (neg)
		buf[--i] = '-';
	emit_padded(buf + i, sizeof(buf) - i, width, pad);
}

void print(const char *fmt, ...)
{
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			serial_putc(*fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, prec = -1, lng = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		if (*fmt == '.') {
			fmt++;
			if (*fmt == '*') {
				prec = __builtin_va_arg(ap, int);
				fmt++;
			} else {
				prec = 0;
				while (*fmt >= '0' && *fmt <= '9')
					prec = prec * 10 + (*fmt++ - '0');
			}
		}
		while (*fmt == 'l') {
			lng++;
			fmt++;
		}
		u64 v;
		switch (*fmt) {
		case 's': {
			const char *s = __builtin_va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			usize len = prec >= 0 ? strnlen(s, (usize)prec) : strlen(s);
			emit_padded(s, len, width, ' ');
			break;
		}
		case 'c':
			serial_putc((char)__builtin_va_arg(ap, int));
			break;
		case 'd': {
			s64 sv;
			if (lng >= 2)
				sv = __builtin_va_arg(ap, long long);
			else if (lng == 1)
				sv = __builtin_va_arg(ap, long);
			else
				sv = __builtin_va_arg(ap, int);
			emit_number(sv < 0 ? (u64)-sv : (u64)sv, 10, sv < 0, width, pad);
			break;
		}
		case 'u':
		case 'x':
			if (lng >= 2)
				v = __builtin_va_arg(ap, unsigned long long);
			else if (lng == 1)
				v = __builtin_va_arg(ap, unsigned long);
			else
				v = __builtin_va_arg(ap, unsigned int);
			emit_number(v, *fmt == 'x' ? 16 : 10, 0, width, pad);
			break;
		case 'p':
			serial_puts("0x");
			emit_number((uptr)__builtin_va_arg(ap, void *), 16, 0, width, pad);
			break;
		case '%':
			serial_putc('%');
			break;
		case '\0':
			fmt--;
			break;
		default:
			serial_putc('%');
			serial_putc(*fmt);
			break;
		}
	}
	__builtin_va_end(ap);
}

void serial_wait_byte(void)
{
	while (!(inb(COM1 + UART_LSR) & UART_LSR_DR))
		cpu_relax();
	(void)inb(COM1 + UART_RBR);
}
