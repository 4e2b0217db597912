/* SPDX-License-Identifier: Apache-2.0 */
/*
 * smp: finds the MP table, counts the processors, and starts every AP with
 * INIT, SIPI, SIPI through the local APIC, as Linux does. Each AP runs the
 * real-mode trampoline (arch/smp-trampoline.S). Proves the MP table and the
 * in-kernel local APICs' INIT/SIPI handling.
 */
#include "guest.h"

#define TRAMP_BASE 0x8000u /* SIPI vector 0x08 */
#define ICR_BUSY (1u << 12)
#define WAIT_SPINS 5000000u /* bounded wait for the APs (counts, not time) */

extern const u8 tramp_start[], tramp_end[], tramp_count[];

static volatile u32 *ap_counter(void)
{
	return (volatile u32 *)(uptr)(TRAMP_BASE + (u32)(tramp_count - tramp_start));
}

static int icr_wait_idle(void)
{
	for (u32 i = 0; i < 100000; i++) {
		if (!(lapic_read(LAPIC_ICR_LO) & ICR_BUSY))
			return 0;
		cpu_relax();
	}
	return -1;
}

static int send_ipi(u32 apic_id, u32 lo)
{
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, lo);
	return icr_wait_idle();
}

static int wake_ap(u32 apic_id)
{
	int err = 0;
	err |= send_ipi(apic_id, 0x0000C500); /* INIT, level, assert */
	err |= send_ipi(apic_id, 0x00008500); /* INIT, level, de-assert */
	delay_loop(100);                      /* "10 ms" on real hardware */
	for (int i = 0; i < 2; i++) {
		err |= send_ipi(apic_id, 0x00000600 | (TRAMP_BASE >> 12)); /* STARTUP */
		delay_loop(10); /* "200 us" */
	}
	if (err)
		print("ICR stuck busy for APIC id %u\n", apic_id);
	return err;
}

int guest_main(struct boot_info *bi)
{
	(void)bi;
	struct mp_info mp;
	if (mp_find(&mp) < 0)
		return 1;
	print("cpus: %u\n", mp.ncpus);
	if (mp.lapic_addr != LAPIC_BASE)
		print("note: MP table local APIC at %x\n", mp.lapic_addr);

	memcpy((void *)(uptr)TRAMP_BASE, tramp_start, (usize)(tramp_end - tramp_start));
	*ap_counter() = 0;

	/* Software-enable the local APIC (spurious vector 0xFF). */
	lapic_write(LAPIC_SVR, 0x1FF);
	u32 self = lapic_id();
	u32 aps = 0;
	for (u32 i = 0; i < mp.ncpus; i++) {
		if (mp.apic_id[i] == self)
			continue;
		wake_ap(mp.apic_id[i]);
		aps++;
	}

	u32 spins = 0;
	while (*ap_counter() < aps && spins++ < WAIT_SPINS)
		cpu_relax();
	if (*ap_counter() < aps) {
		print("timeout\n");
		return 1;
	}
	print("all %u cpus online\n", mp.ncpus);
	return 0;
}
