//! The guest physical address map and the fixed ports, in one place. Nothing else in the VMM
//! spells an address.

/// Real-mode interrupt vector table and BIOS data area: left zero.
pub const BOOT_GDT: u64 = 0x500;
pub const BOOT_IDT: u64 = 0x520;
/// Linux zero page (`struct boot_params`) or PVH `hvm_start_info`.
pub const ZERO_PAGE: u64 = 0x7000;
/// PVH memory map table (follows `hvm_start_info` in its own page).
pub const PVH_MEMMAP: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST: u64 = 0x6f00;
/// Initial stack of a 64-bit boot (grows down from here).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-map page tables for a 64-bit boot: PML4, PDPT, then 4 page directories.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
/// Extended BIOS data area up to the end of base memory: reserved in e820.
pub const EBDA_START: u64 = 0x9_fc00;
/// The legacy BIOS area; the MP table lives at its start.
pub const BIOS_START: u64 = 0xf_0000;
pub const MPTABLE_START: u64 = BIOS_START;
/// Where kernels expect to be loaded and where high memory starts.
pub const HIMEM_START: u64 = 0x10_0000;

/// ACPI tables: the RSDP (found by scanning 0xE0000..0x100000) and the tables after it.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = MPTABLE_START;

/// The 32-bit MMIO hole: RAM below it, devices in it, the rest of RAM above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The PCI 32-bit memory window (BARs below 4 GiB).
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express ECAM: 1 MiB per bus, buses 0..=255.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// Platform MMIO (beyond PCI) from here to the I/O APIC.
pub const PLATFORM_MMIO_START: u64 = 0xf000_0000;
/// The PCI 64-bit memory window starts at the first 1 GiB boundary above RAM and is this big.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// A BIOS image ends at 4 GiB; the last 128 KiB are also visible below 1 MiB.
pub const FIRMWARE_END: u64 = MMIO_HOLE_END;
/// First GSI handed out for MSI routes (0..24 are the I/O APIC's pins).
pub const MSI_GSI_START: u32 = 24;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the VMX TSS and one for the identity map, inside the hole and
/// below the firmware (which may take up to 16 MiB under 4 GiB).
pub const KVM_TSS_ADDR: u64 = 0xfeff_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;

/// Fixed ports of the PC platform.
pub const COM1_PORT: u64 = 0x3f8;
/// A 16550 UART has eight registers.
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u64 = 0x60;
pub const I8042_CMD_PORT: u64 = 0x64;
pub const CMOS_PORT: u64 = 0x70;
pub const POST_PORT: u64 = 0x80;
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// PCI configuration mechanism #1 (address at 0xCF8, data at 0xCFC..0xCFF).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// QEMU fw_cfg: selector (16-bit) at 0x510, data at 0x511, DMA address at 0x514..0x51C.
pub const FW_CFG_PORT: u64 = 0x510;
pub const FW_CFG_LEN: u64 = 0xc;
/// QEMU's debug console (`isa-debugcon`), where SeaBIOS writes its log.
pub const DEBUGCON_PORT: u64 = 0x402;
/// ACPI hardware-reduced sleep control (write) and status (read) registers; the reset
/// register is the next port (`devices::legacy::AcpiSleep`).
pub const ACPI_SLEEP_PORT: u64 = 0x600;

/// The PCI 64-bit window for `mem_size` bytes of RAM: (start, size).
pub fn pci_mmio64(mem_size: u64) -> (u64, u64) {
    let ram_end = ram_ranges(mem_size)
        .last()
        .map_or(0, |(start, size)| start + size)
        .max(MMIO_HOLE_END);
    let start = ram_end.div_ceil(PCI_MMIO64_ALIGN) * PCI_MMIO64_ALIGN;
    (start, PCI_MMIO64_SIZE)
}

/// Guest RAM as (start, size) ranges for `size` bytes of memory.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((MMIO_HOLE_END, size - low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_split_around_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(
            ram_ranges(5 << 30),
            vec![(0, 3 << 30), (MMIO_HOLE_END, 2 << 30)]
        );
    }
}
