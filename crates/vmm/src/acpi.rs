//! ACPI tables, built with the `acpi_tables` crate: how a guest finds its processors, interrupt
//! controllers, PCI Express configuration space and windows, the serial port and the way to power
//! off, on a hardware-reduced ACPI platform (no PM1 blocks, no SCI, no GPEs: sleep and reset
//! through the registers of [`devices::legacy::AcpiSleep`]), as Cloud Hypervisor does.
//!
//! Layout in `layout::ACPI_START..layout::ACPI_END`: the RSDP first (at a 16-byte boundary of
//! 0xE0000..0xFFFFF, where a guest without boot parameters scans for it), then DSDT, FADT, MADT,
//! MCFG, the VIOT when there is a virtio-iommu, and the XSDT that lists the tables after the DSDT. Every address and port the tables describe comes
//! from `layout.rs`, the I/O APIC id from `mptable.rs`, so the MP table and the MADT agree.

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable, EISAName, Name, Path};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use devices::legacy::AcpiSleep;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::iommu::IommuTopology;
use crate::layout;
use crate::mptable;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("Cannot describe {0} vCPUs in the MADT")]
    BadCpuCount(u8),
    #[error("ACPI tables need {size:#x} bytes, more than the {room:#x} bytes reserved for them")]
    TooLarge { size: u64, room: u64 },
    #[error("Cannot write the ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Where the RSDP is: the start of the ACPI area, so a scan of 0xE0000..0xFFFFF finds it too.
pub const RSDP_ADDR: u64 = layout::ACPI_START;

const OEM_ID: [u8; 6] = *b"MNFOLD";
const OEM_TABLE_ID: [u8; 8] = *b"MANIFOLD";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2 or later makes AML integers 64-bit, which the 64-bit PCI window needs.
const DSDT_REVISION: u8 = 6;
/// MADT revision of ACPI 6.5.
const MADT_REVISION: u8 = 5;
/// Tables start at 8-byte boundaries (nothing requires it; it keeps hex dumps readable).
const TABLE_ALIGN: u64 = 8;

/// PCI segment group of the one host bridge.
const PCI_SEGMENT: u16 = 0;
/// PCI Express ECAM gives each bus 1 MiB (32 devices x 8 functions x 4 KiB).
const ECAM_BUS_SIZE: u64 = 1 << 20;
/// The last bus the ECAM window reaches (255 for 256 MiB).
const PCI_LAST_BUS: u8 = {
    let buses = layout::PCI_ECAM_SIZE / ECAM_BUS_SIZE;
    assert!(buses >= 1 && buses <= 256 && layout::PCI_ECAM_SIZE % ECAM_BUS_SIZE == 0);
    (buses - 1) as u8
};

// The fixed resources the tables describe in 16 or 32-bit fields; checked once here so the
// narrowing below cannot lose bits.
const _: () = {
    assert!(layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE <= 1 << 32);
    assert!(layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE <= 1 << 32);
    assert!(layout::LAPIC_ADDR < 1 << 32 && layout::IOAPIC_ADDR < 1 << 32);
    assert!(layout::COM1_PORT + layout::COM1_LEN <= 1 << 16 && layout::COM1_LEN < 1 << 8);
    assert!(layout::PCI_CONFIG_IO_PORT + layout::PCI_CONFIG_IO_LEN <= 1 << 16);
    assert!(layout::PCI_CONFIG_IO_LEN < 1 << 8);
    assert!(layout::ACPI_SLEEP_PORT + AcpiSleep::LEN <= 1 << 16);
    assert!(RSDP_ADDR % 16 == 0);
};

/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel irqchip emulates them).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure types.
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags: polarity and trigger mode "conform to the bus" (ISA: active high, edge).
const MPS_INTI_CONFORMS: u16 = 0;
/// Local APIC NMI structure: this processor UID means all processors.
const ALL_PROCESSORS: u8 = 0xff;
/// LINT1 carries NMI, as the MP table and `cpu.rs` set it up.
const NMI_LINT: u8 = 1;
/// FADT IAPC_BOOT_ARCH: VGA not present (do not probe its ports). The 8042 bit stays clear:
/// the i8042 here resets the machine but has no keyboard and no IRQ 1 line.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;

/// MADT Interrupt Source Override (type 2): ISA IRQ `source` arrives at GSI `gsi`.
struct InterruptSourceOverride {
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(MADT_INTERRUPT_OVERRIDE);
        sink.byte(10); // length
        sink.byte(0); // bus: ISA
        sink.byte(self.source);
        sink.dword(self.gsi);
        sink.word(self.flags);
    }
}

/// MADT Local APIC NMI (type 4): which LINT pin of which processors carries NMI.
struct LocalApicNmi {
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(MADT_LOCAL_APIC_NMI);
        sink.byte(6); // length
        sink.byte(self.processor_uid);
        sink.word(self.flags);
        sink.byte(self.lint);
    }
}

/// One table as placed in guest memory.
#[derive(Debug)]
pub struct Table {
    /// The signature ("RSDP" for the root pointer, whose own is "RSD PTR ").
    pub name: &'static str,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// Places tables one after the other from a start address.
struct Placer {
    tables: Vec<Table>,
    next: u64,
}

impl Placer {
    fn place(&mut self, name: &'static str, bytes: Vec<u8>) -> u64 {
        let addr = self.next;
        self.next = (addr + bytes.len() as u64).next_multiple_of(TABLE_ALIGN);
        self.tables.push(Table { name, addr, bytes });
        addr
    }
}

/// An 8-bit I/O port register, the way the FADT names the sleep and reset registers.
fn io_register(port: u64) -> GAS {
    GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// AML already serialized, to nest in further objects.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Serialize at once: the crate's objects borrow their children, so building and serializing
/// in one expression keeps the temporaries alive long enough.
fn raw(aml: &dyn Aml) -> Raw {
    Raw(to_bytes(aml))
}

/// The DSDT: the PCI Express host bridge and its windows, a motherboard device reserving the
/// ECAM window, COM1, and the S5 sleep state.
fn dsdt(mem_size: u64) -> Vec<u8> {
    let ecam_base = layout::PCI_ECAM_START;
    let mmio32_end = layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1;
    let (mmio64_start, mmio64_size) = layout::pci_mmio64(mem_size);
    let cf8 = layout::PCI_CONFIG_IO_PORT as u16;
    let pci0_crs = raw(&aml::ResourceTemplate::new(vec![
        &AddressSpace::new_bus_number(0u16, u16::from(PCI_LAST_BUS)),
        &aml::IO::new(cf8, cf8, 1, layout::PCI_CONFIG_IO_LEN as u8),
        &AddressSpace::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            layout::PCI_MMIO32_START as u32,
            mmio32_end as u32,
            None,
        ),
        &AddressSpace::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            mmio64_start,
            mmio64_start + mmio64_size - 1,
            None,
        ),
    ]));
    let pci0 = raw(&aml::Device::new(
        "PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_SEG".into(), &PCI_SEGMENT),
            &Name::new("_BBN".into(), &aml::ZERO),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CBA".into(), &ecam_base),
            &Name::new("_CRS".into(), &pci0_crs),
        ],
    ));

    // Linux uses the MCFG's ECAM window only if firmware reserves it: in e820 or, as here, in the
    // _CRS of a motherboard resource device. Without it, Linux falls back to port 0xCF8 and loses
    // the extended configuration space (SR-IOV and every other extended capability).
    let mbrd = raw(&aml::Device::new(
        "MBRD".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    true,
                    ecam_base as u32,
                    layout::PCI_ECAM_SIZE as u32,
                )]),
            ),
        ],
    ));

    let com1_port = layout::COM1_PORT as u16;
    let com1 = raw(&aml::Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(com1_port, com1_port, 1, layout::COM1_LEN as u8),
                    // Consumer, edge-triggered, active high, exclusive: an ISA interrupt.
                    &aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ),
                ]),
            ),
        ],
    ));

    let sb = raw(&aml::Scope::new("\\_SB_".into(), vec![&pci0, &mbrd, &com1]));
    // \_S5_: {SLP_TYPa, SLP_TYPb}; a hardware-reduced platform has one sleep control register,
    // which takes the first.
    let s5 = raw(&Name::new(
        Path::new("\\_S5_"),
        &aml::Package::new(vec![&AcpiSleep::SLP_TYP_S5, &AcpiSleep::SLP_TYP_S5]),
    ));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&sb.0);
    dsdt.append_slice(&s5.0);
    dsdt.as_slice().to_vec()
}

/// The FADT of a hardware-reduced platform: sleep control and status in one port, the reset
/// register in the next, the DSDT through its 64-bit pointer.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature buttons: a hardware-reduced platform has none.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let sleep = layout::ACPI_SLEEP_PORT + AcpiSleep::SLEEP_OFFSET;
    fadt.sleep_control_reg = io_register(sleep);
    fadt.sleep_status_reg = io_register(sleep);
    fadt.reset_reg = io_register(layout::ACPI_SLEEP_PORT + AcpiSleep::RESET_OFFSET);
    fadt.reset_value = AcpiSleep::RESET_VALUE;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_NO_VGA.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(OEM_TABLE_ID).into();
    to_bytes(&fadt.finalize())
}

/// The MADT: one local APIC per vCPU (APIC id = processor UID = vCPU index, as in the MP table),
/// the I/O APIC, the interrupt source overrides and NMI on LINT1.
fn madt(num_cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, layout::LAPIC_ADDR as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut body = Vec::new();
    for id in 0..num_cpus {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(mptable::ioapic_id(num_cpus), layout::IOAPIC_ADDR as u32, 0)
        .to_aml_bytes(&mut body);
    // KVM's default routing sends ISA IRQ n to I/O APIC pin n, which is also what ACPI assumes
    // for an ISA IRQ without an override, so no override is needed to say where IRQs go. Linux
    // on a hardware-reduced platform, though, has no legacy PIC and so no ISA IRQs at all except
    // those an override names: COM1's override is what lets a driver that knows only "IRQ 4"
    // (the 8250 driver's built-in ports) get its interrupt, as on Cloud Hypervisor. There is
    // deliberately none for IRQ 0: Linux takes an override whose source equals the FADT's
    // SCI_INT (0 on a hardware-reduced FADT) for the SCI's and would make it level-triggered,
    // active low. IRQ 9 (the SCI on a PC) needs none either: there is no SCI here.
    InterruptSourceOverride {
        source: layout::COM1_IRQ as u8,
        gsi: layout::COM1_IRQ,
        flags: MPS_INTI_CONFORMS,
    }
    .to_aml_bytes(&mut body);
    LocalApicNmi {
        processor_uid: ALL_PROCESSORS,
        flags: MPS_INTI_CONFORMS,
        lint: NMI_LINT,
    }
    .to_aml_bytes(&mut body);
    madt.append_slice(&body);
    madt.as_slice().to_vec()
}

/// The MCFG: one ECAM window for segment 0, buses 0 to the last the window reaches.
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_START, PCI_SEGMENT, 0, PCI_LAST_BUS);
    to_bytes(&mcfg)
}

/// VIOT node types (ACPI 6.5, 5.2.32; virtio 1.2 5.13.2 points there).
const VIOT_PCI_RANGE: u8 = 1;
const VIOT_VIRTIO_PCI: u8 = 3;
/// Bytes of the VIOT header (after the SDT header: node count, node offset, 8 reserved).
const VIOT_HEADER_LEN: u16 = 48;
const VIOT_PCI_RANGE_LEN: u16 = 24;
const VIOT_VIRTIO_PCI_LEN: u16 = 16;

/// The VIOT: the virtio-iommu as a virtio-pci node, then one PCI range node per run of
/// consecutive endpoint BDFs, each naming the IOMMU node as its output. The endpoint id the guest
/// derives (`endpoint_start + bdf - bdf_start`) is the requester id, which is what the device
/// model keys its endpoints by.
fn viot(topology: &IommuTopology) -> Vec<u8> {
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for bdf in &topology.endpoints {
        let raw = bdf.raw();
        // The next function, or function 0 of the next slot: only functions that exist sit in
        // between (the builder uses function 0 only), so a range names nothing else.
        let next_slot = ranges.last().and_then(|(_, end)| (end | 7).checked_add(1));
        match ranges.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(raw) || next_slot == Some(raw) => {
                *end = raw
            }
            _ => ranges.push((raw, raw)),
        }
    }
    let mut viot = Sdt::new(*b"VIOT", 36, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    // Node count (fits: at most 256 functions on bus 0), offset of the first node, reserved.
    body.extend_from_slice(&(ranges.len() as u16 + 1).to_le_bytes());
    body.extend_from_slice(&VIOT_HEADER_LEN.to_le_bytes());
    body.extend_from_slice(&[0; 8]);
    let iommu_node = VIOT_HEADER_LEN;
    body.extend_from_slice(&[VIOT_VIRTIO_PCI, 0]);
    body.extend_from_slice(&VIOT_VIRTIO_PCI_LEN.to_le_bytes());
    body.extend_from_slice(&PCI_SEGMENT.to_le_bytes());
    body.extend_from_slice(&topology.iommu.raw().to_le_bytes());
    body.extend_from_slice(&[0; 8]);
    for (start, end) in ranges {
        body.extend_from_slice(&[VIOT_PCI_RANGE, 0]);
        body.extend_from_slice(&VIOT_PCI_RANGE_LEN.to_le_bytes());
        // Endpoint id of the first function: segment << 16 | BDF.
        body.extend_from_slice(&(u32::from(PCI_SEGMENT) << 16 | u32::from(start)).to_le_bytes());
        body.extend_from_slice(&PCI_SEGMENT.to_le_bytes());
        body.extend_from_slice(&PCI_SEGMENT.to_le_bytes());
        body.extend_from_slice(&start.to_le_bytes());
        body.extend_from_slice(&end.to_le_bytes());
        body.extend_from_slice(&iommu_node.to_le_bytes());
        body.extend_from_slice(&[0; 6]);
    }
    viot.append_slice(&body);
    viot.as_slice().to_vec()
}

/// Build every table for `num_cpus` vCPUs and `mem_size` bytes of RAM (and the VIOT for
/// `iommu`), placed from [`RSDP_ADDR`]; checked to fit below `layout::ACPI_END`.
pub fn build(
    num_cpus: u8,
    mem_size: u64,
    iommu: Option<&IommuTopology>,
) -> Result<Vec<Table>, AcpiError> {
    // APIC ids are the vCPU indices and the I/O APIC takes the next one; 0xFF is broadcast.
    if num_cpus == 0 || num_cpus == 0xff {
        return Err(AcpiError::BadCpuCount(num_cpus));
    }
    let mut placer = Placer {
        tables: Vec::new(),
        next: (RSDP_ADDR + Rsdp::len() as u64).next_multiple_of(TABLE_ALIGN),
    };
    let dsdt_addr = placer.place("DSDT", dsdt(mem_size));
    let fadt_addr = placer.place("FACP", fadt(dsdt_addr));
    let madt_addr = placer.place("APIC", madt(num_cpus));
    let mcfg_addr = placer.place("MCFG", mcfg());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    if let Some(topology) = iommu {
        xsdt.add_entry(placer.place("VIOT", viot(topology)));
    }
    let xsdt_addr = placer.place("XSDT", to_bytes(&xsdt));
    let rsdp = Table {
        name: "RSDP",
        addr: RSDP_ADDR,
        bytes: to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
    };
    placer.tables.insert(0, rsdp);

    let room = layout::ACPI_END - layout::ACPI_START;
    let size = placer.next - layout::ACPI_START;
    if size > room {
        return Err(AcpiError::TooLarge { size, room });
    }
    Ok(placer.tables)
}

/// Write the ACPI tables into guest memory. The area is reserved in the e820 map.
pub fn setup(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    mem_size: u64,
    iommu: Option<&IommuTopology>,
) -> Result<(), AcpiError> {
    for table in build(num_cpus, mem_size, iommu)? {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
