/* SPDX-License-Identifier: Apache-2.0 */
/*
 * C entry points, called from the assembly heads with a stack set up:
 *   32-bit: pvh_entry(hvm_start_info paddr)  (arch/pvh-head.S)
 *   64-bit: lm_entry(boot_params paddr)       (arch/head64.S)
 */
#include "guest.h"

#ifdef __x86_64__
extern const char boot_kind[]; /* "bzimage" or "elf64", from head64.S */

void lm_entry(uptr zero_page);
void lm_entry(uptr zero_page)
{
	serial_init();
	boot_info.kind = boot_kind;
	bootinfo_from_zero_page(&boot_info, zero_page);
	debug_exit((u8)guest_main(&boot_info));
}
#else
void pvh_entry(uptr start_info);
void pvh_entry(uptr start_info)
{
	serial_init();
	boot_info.kind = "pvh";
	bootinfo_from_pvh(&boot_info, start_info);
	debug_exit((u8)guest_main(&boot_info));
}
#endif
