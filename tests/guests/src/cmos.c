/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cmos: reads the RTC (honouring register B's binary/BCD and 12/24-hour
 * modes) and the NVRAM memory-size bytes that firmware and old kernels use.
 */
#include "guest.h"

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71

static u8 cmos_read(u8 reg)
{
	outb(CMOS_INDEX, reg); /* bit 7 clear: NMI stays enabled, as Linux does */
	return inb(CMOS_DATA);
}

static u32 bcd(u8 v) { return (v >> 4) * 10 + (v & 0x0F); }

struct rtc {
	u8 sec, min, hour, day, mon, year, cent;
};

static void rtc_raw(struct rtc *t)
{
	/* Wait for the end of an update cycle (bounded; UIP is set ~2 ms a second). */
	for (u32 i = 0; i < 100000 && (cmos_read(0x0A) & 0x80); i++)
		cpu_relax();
	t->sec = cmos_read(0x00);
	t->min = cmos_read(0x02);
	t->hour = cmos_read(0x04);
	t->day = cmos_read(0x07);
	t->mon = cmos_read(0x08);
	t->year = cmos_read(0x09);
	t->cent = cmos_read(0x32);
}

int guest_main(struct boot_info *bi)
{
	(void)bi;
	struct rtc a, b;
	/* Read until two consecutive reads agree (no update in between). */
	rtc_raw(&a);
	for (int tries = 0; tries < 10; tries++) {
		rtc_raw(&b);
		if (!memcmp(&a, &b, sizeof(a)))
			break;
		a = b;
	}
	u8 regb = cmos_read(0x0B);
	int binary = regb & 0x04, h24 = regb & 0x02;
	int pm = a.hour & 0x80;
	u32 sec = a.sec, min = a.min, hour = a.hour & 0x7F, day = a.day, mon = a.mon,
	    year = a.year, cent = a.cent;
	if (!binary) {
		sec = bcd((u8)sec);
		min = bcd((u8)min);
		hour = bcd((u8)hour);
		day = bcd((u8)day);
		mon = bcd((u8)mon);
		year = bcd((u8)year);
		cent = bcd((u8)cent);
	}
	if (!h24)
		hour = (hour % 12) + (pm ? 12 : 0);
	if (cent < 19 || cent > 99)
		cent = year < 70 ? 20 : 19; /* no usable century byte */
	print("rtc: %04u-%02u-%02u %02u:%02u:%02u\n", cent * 100 + year, mon, day, hour, min, sec);

	u32 ext = cmos_read(0x30) | (u32)cmos_read(0x31) << 8;
	u32 above16m = cmos_read(0x34) | (u32)cmos_read(0x35) << 8;
	u32 above4g = cmos_read(0x5B) | (u32)cmos_read(0x5C) << 8 | (u32)cmos_read(0x5D) << 16;
	print("cmos ext mem: %u KiB\n", ext);
	print("cmos mem above 16M: %u\n", above16m);
	print("cmos mem above 4G: %u\n", above4g);
	return 0;
}
