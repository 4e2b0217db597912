use std::path::PathBuf;
use std::process::Command;

use super::*;

const MEM: u64 = 1 << 30;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn tables(num_cpus: u8) -> Vec<Table> {
    build(num_cpus, MEM, None).expect("ACPI tables")
}

fn find<'a>(tables: &'a [Table], name: &str) -> &'a Table {
    tables
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no {name} table"))
}

fn find_at(tables: &[Table], addr: u64) -> &Table {
    tables
        .iter()
        .find(|t| t.addr == addr)
        .unwrap_or_else(|| panic!("no table at {addr:#x}"))
}

/// MADT structures as (type, bytes).
fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut entries = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let len = usize::from(madt[off + 1]);
        assert!(len >= 2, "MADT entry at {off} has length {len}");
        entries.push((madt[off], &madt[off..off + len]));
        off += len;
    }
    assert_eq!(off, madt.len());
    entries
}

#[test]
fn tables_checksum_and_fit_in_the_acpi_area() {
    let t = tables(4);
    let names: Vec<_> = t.iter().map(|t| t.name).collect();
    assert_eq!(names, ["RSDP", "DSDT", "FACP", "APIC", "MCFG", "XSDT"]);
    let rsdp = &t[0].bytes;
    assert_eq!(t[0].addr, layout::ACPI_START);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp.len(), 36);
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(u32_at(rsdp, 20), 36, "length");

    let mut end = t[0].addr + 36;
    for table in &t[1..] {
        assert_eq!(&table.bytes[..4], table.name.as_bytes());
        assert_eq!(u32_at(&table.bytes, 4) as usize, table.bytes.len());
        assert_eq!(sum(&table.bytes), 0, "{} checksum", table.name);
        assert_eq!(table.addr % TABLE_ALIGN, 0);
        assert!(
            table.addr >= end,
            "{} overlaps the table before",
            table.name
        );
        end = table.addr + table.bytes.len() as u64;
    }
    assert!(end <= layout::ACPI_END);
}

#[test]
fn rsdp_leads_to_every_table() {
    let t = tables(2);
    let xsdt_addr = u64_at(&t[0].bytes, 24);
    let xsdt = &find_at(&t, xsdt_addr).bytes;
    assert_eq!(&xsdt[..4], b"XSDT");
    let listed: Vec<&str> = xsdt[36..]
        .chunks(8)
        .map(|e| find_at(&t, u64::from_le_bytes(e.try_into().expect("8 bytes"))).name)
        .collect();
    assert_eq!(listed, ["FACP", "APIC", "MCFG"]);
    let fadt = &find(&t, "FACP").bytes;
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer unused");
    assert_eq!(find_at(&t, u64_at(fadt, 140)).name, "DSDT");
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let t = tables(1);
    let fadt = &find(&t, "FACP").bytes;
    assert_eq!(fadt.len(), 276, "FADT of ACPI 6.5");
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // GAS: space 1 (I/O), 8 bits wide, offset 0, byte access, address.
    let io8 = |off: usize, port: u64| {
        assert_eq!(&fadt[off..off + 4], &[1, 8, 0, 1], "GAS at {off}");
        assert_eq!(u64_at(fadt, off + 4), port, "GAS at {off}");
    };
    io8(116, layout::ACPI_SLEEP_PORT + AcpiSleep::RESET_OFFSET);
    assert_eq!(fadt[128], AcpiSleep::RESET_VALUE);
    io8(244, layout::ACPI_SLEEP_PORT + AcpiSleep::SLEEP_OFFSET);
    io8(256, layout::ACPI_SLEEP_PORT + AcpiSleep::SLEEP_OFFSET);
    assert_eq!(u16_at(fadt, 109), IAPC_BOOT_ARCH_NO_VGA);
    assert_eq!(&fadt[268..276], b"MANIFOLD");
}

#[test]
fn madt_lists_every_cpu_and_the_ioapic_of_the_mp_table() {
    for n in [1u8, 3, 8, 254] {
        let t = build(n, MEM, None).expect("tables");
        let madt = &find(&t, "APIC").bytes;
        assert_eq!(u32_at(madt, 36), layout::LAPIC_ADDR as u32);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
        let entries = madt_entries(madt);
        let lapics: Vec<_> = entries.iter().filter(|e| e.0 == 0).collect();
        assert_eq!(lapics.len(), usize::from(n));
        for (i, (_, e)) in lapics.iter().enumerate() {
            assert_eq!(e.len(), 8);
            assert_eq!(usize::from(e[2]), i, "processor UID");
            assert_eq!(usize::from(e[3]), i, "APIC id");
            assert_eq!(u32_at(e, 4), 1, "enabled");
        }
        let ioapics: Vec<_> = entries.iter().filter(|e| e.0 == 1).collect();
        assert_eq!(ioapics.len(), 1);
        let io = ioapics[0].1;
        assert_eq!(io[2], mptable::ioapic_id(n));
        assert_eq!(u32_at(io, 4), layout::IOAPIC_ADDR as u32);
        assert_eq!(u32_at(io, 8), 0, "GSI base");
        let overrides: Vec<_> = entries.iter().filter(|e| e.0 == 2).collect();
        assert_eq!(overrides.len(), 1);
        let o = overrides[0].1;
        assert_eq!((o[2], u32::from(o[3])), (0, layout::COM1_IRQ), "ISA IRQ 4");
        assert_eq!((u32_at(o, 4), u16_at(o, 8)), (layout::COM1_IRQ, 0));
        let nmis: Vec<_> = entries.iter().filter(|e| e.0 == 4).collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!(nmis[0].1, &[4, 6, 0xff, 0, 0, 1]);
    }
}

#[test]
fn mcfg_covers_the_ecam_window() {
    let t = tables(1);
    let mcfg = &find(&t, "MCFG").bytes;
    assert_eq!(mcfg.len(), 44 + 16);
    assert_eq!(u64_at(mcfg, 44), layout::PCI_ECAM_START);
    assert_eq!(u16_at(mcfg, 52), 0, "segment");
    assert_eq!((mcfg[54], mcfg[55]), (0, 255));
    let buses = u64::from(mcfg[55]) - u64::from(mcfg[54]) + 1;
    assert_eq!(buses * ECAM_BUS_SIZE, layout::PCI_ECAM_SIZE);
}

/// The first element of the package named `name` in `aml`, if it is a byte constant.
fn first_package_byte(aml: &[u8], name: &[u8; 4]) -> Option<u8> {
    let at = aml.windows(4).position(|w| w == name)?;
    let pkg = &aml[at + 4..];
    assert_eq!(pkg[0], 0x12, "PackageOp");
    let len_bytes = usize::from(pkg[1] >> 6);
    let elements = &pkg[2 + len_bytes + 1..];
    match elements[0] {
        0x00 => Some(0),
        0x01 => Some(1),
        0x0a => Some(elements[1]),
        _ => None,
    }
}

#[test]
fn dsdt_names_s5_the_host_bridge_and_com1() {
    let t = tables(1);
    let dsdt = &find(&t, "DSDT").bytes;
    assert_eq!(
        first_package_byte(dsdt, b"_S5_"),
        Some(AcpiSleep::SLP_TYP_S5)
    );
    let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    for name in ["PCI0", "MBRD", "COM1", "_CBA", "_SEG", "_BBN", "_CRS"] {
        assert!(contains(name.as_bytes()), "{name}");
    }
    for eisa in ["PNP0A08", "PNP0A03", "PNP0C02", "PNP0501"] {
        assert!(contains(&to_bytes(&EISAName::new(eisa))), "{eisa}");
    }
    // _CBA: the ECAM base as a DWord constant.
    let mut cba = b"_CBA\x0c".to_vec();
    cba.extend_from_slice(&(layout::PCI_ECAM_START as u32).to_le_bytes());
    assert!(contains(&cba));
}

#[test]
fn cpu_counts() {
    assert!(matches!(
        build(0, MEM, None),
        Err(AcpiError::BadCpuCount(0))
    ));
    assert!(matches!(
        build(255, MEM, None),
        Err(AcpiError::BadCpuCount(255))
    ));
    let t = build(254, MEM, None).expect("254 vCPUs fit");
    let last = t.iter().map(|t| t.addr + t.bytes.len() as u64).max();
    assert!(last.is_some_and(|end| end <= layout::ACPI_END));
}

#[test]
fn setup_writes_the_tables_where_they_are_placed() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
    setup(&mem, 2, MEM, None).expect("setup");
    for table in tables(2) {
        let mut back = vec![0u8; table.bytes.len()];
        mem.read_slice(&mut back, GuestAddress(table.addr))
            .expect("read back");
        assert_eq!(back, table.bytes, "{}", table.name);
    }
    let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
    assert!(matches!(
        setup(&small, 1, MEM, None),
        Err(AcpiError::Write(_))
    ));
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("manifold-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("MANIFOLD_KEEP_ACPI").is_some() {
            eprintln!(
                "ACPI tables and their disassembly kept in {}",
                self.0.display()
            );
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Real consumers: ACPICA's disassembler (Debian's acpica-tools, installed by scripts/setup)
/// must take every table without an error or warning and read back what we meant, and its AML
/// interpreter must load the DSDT and evaluate the objects a guest uses.
#[test]
fn iasl_disassembles_every_table() {
    let dir = TempDir::new("acpi-iasl");
    let t = build(3, 5 << 30, Some(&topology())).expect("tables");
    // iasl takes no RSDP on its own (its signature is not a name segment): checked above.
    for table in t.iter().filter(|t| t.name != "RSDP") {
        let dat = dir.0.join(format!("{}.dat", table.name.to_lowercase()));
        std::fs::write(&dat, &table.bytes).expect("write table");
        let out = Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .current_dir(&dir.0)
            .output()
            .expect("run iasl (install acpica-tools: scripts/setup)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {text}", table.name);
        // iasl before 20210604 (Debian 11's) knows no VIOT and decodes only its header; the
        // node layout is checked by `viot_names_the_iommu_and_its_endpoint_ranges`.
        let text = text.replace(
            "Unknown ACPI table signature [VIOT], decoding ACPI table header only",
            "",
        );
        for bad in ["Error", "Warning", "Invalid", "Unknown"] {
            assert!(!text.contains(bad), "{}: {text}", table.name);
        }
    }
    // And back: each disassembly must compile again without a warning or remark (iasl's
    // compiler checks more than its disassembler, such as a device with both _HID and _ADR).
    for table in t.iter().filter(|t| t.name != "RSDP") {
        let name = table.name.to_lowercase();
        let out = Command::new("iasl")
            .args(["-p", &format!("again-{name}"), &format!("{name}.dsl")])
            .current_dir(&dir.0)
            .output()
            .expect("run iasl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {text}", table.name);
        assert!(
            text.contains("0 Errors, 0 Warnings, 0 Remarks"),
            "{}: {text}",
            table.name
        );
    }
    let dsl = |name: &str| {
        std::fs::read_to_string(dir.0.join(format!("{name}.dsl"))).expect("disassembly")
    };
    let dsdt = dsl("dsdt");
    let (mmio64, size64) = layout::pci_mmio64(5 << 30);
    for want in [
        "Device (PCI0)".to_string(),
        "EisaId (\"PNP0A08\")".into(),
        "EisaId (\"PNP0A03\")".into(),
        "EisaId (\"PNP0501\")".into(),
        "EisaId (\"PNP0C02\")".into(),
        format!("Name (_CBA, 0x{:08X})", layout::PCI_ECAM_START),
        format!("0x{:08X},", layout::PCI_MMIO32_START),
        format!("0x{:016X},", mmio64),
        format!("0x{:016X},", mmio64 + size64 - 1),
        "0x00FF,".into(),
        "IO (Decode16,".into(),
        format!("0x{:04X},", layout::COM1_PORT),
        format!("0x{:04X},", layout::PCI_CONFIG_IO_PORT),
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )".into(),
        "Name (\\_S5, Package (0x02)".into(),
    ] {
        assert!(dsdt.contains(&want), "DSDT lacks {want:?}:\n{dsdt}");
    }
    let madt = dsl("apic");
    assert_eq!(
        madt.matches("Subtable Type : 00 [Processor Local APIC]")
            .count(),
        3
    );
    assert!(
        madt.contains("Subtable Type : 04 [Local APIC NMI]"),
        "{madt}"
    );
    let facp = dsl("facp");
    for want in [
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        &format!("Address : {:016X}", layout::ACPI_SLEEP_PORT),
    ] {
        assert!(facp.contains(want), "FADT lacks {want:?}:\n{facp}");
    }
    let mcfg = dsl("mcfg");
    assert!(
        mcfg.contains(&format!("Base Address : {:016X}", layout::PCI_ECAM_START)),
        "{mcfg}"
    );

    // ACPICA with our FADT (hardware-reduced: no FACS, no GPE blocks) and DSDT: evaluate what a
    // guest reads, then go through its S5 sequence, which must take the extended (sleep control
    // register) path with SLP_TYP from \_S5_.
    let exec = Command::new("acpiexec")
        .arg("-b")
        .arg("evaluate \\_S5; evaluate \\_SB.PCI0._CBA; evaluate \\_SB.PCI0._SEG; sleep 5")
        .args(["facp.dat", "dsdt.dat", "apic.dat", "mcfg.dat"])
        .current_dir(&dir.0)
        .output()
        .expect("run acpiexec (install acpica-tools: scripts/setup)");
    let text =
        String::from_utf8_lossy(&exec.stdout).into_owned() + &String::from_utf8_lossy(&exec.stderr);
    assert!(exec.status.success(), "{text}");
    let s5 = format!("[Integer] = {:016X}", AcpiSleep::SLP_TYP_S5);
    let cba = format!("[Integer] = {:016X}", layout::PCI_ECAM_START);
    let slp_typ = format!(
        "Sleep-A: {:02X}, Sleep-B: {:02X}",
        AcpiSleep::SLP_TYP_S5,
        AcpiSleep::SLP_TYP_S5
    );
    assert!(
        text.lines()
            .any(|l| l.contains("ACPI: FACP") && l.contains("MNFOLD")),
        "acpiexec did not take our FADT:\n{text}"
    );
    for want in [
        "1 ACPI AML tables successfully acquired and loaded",
        "[Package] Contains 2 Elements:",
        &s5,
        &cba,
        &slp_typ,
        "HwExtendedSleep",
        "No outstanding allocations",
    ] {
        assert!(text.contains(want), "acpiexec: no {want:?}:\n{text}");
    }
    assert!(!text.contains("General Purpose Events"), "{text}");
    assert!(!text.contains("Error") && !text.contains("AE_"), "{text}");
}

/// The IOMMU at 00:01.0; endpoints 00:02.0, 00:03.0 (one range) and 00:05.0 (another).
fn topology() -> IommuTopology {
    use devices::pci::Bdf;
    IommuTopology {
        iommu: Bdf::new(0, 1, 0),
        endpoints: vec![Bdf::new(0, 2, 0), Bdf::new(0, 3, 0), Bdf::new(0, 5, 0)],
    }
}

#[test]
fn viot_names_the_iommu_and_its_endpoint_ranges() {
    let t = build(2, MEM, Some(&topology())).expect("tables");
    let viot = &find(&t, "VIOT").bytes;
    assert_eq!(sum(viot), 0);
    let xsdt = &find(&t, "XSDT").bytes;
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(xsdt, o))
        .collect();
    assert!(entries.contains(&find(&t, "VIOT").addr), "VIOT in the XSDT");
    assert_eq!(u16_at(viot, 36), 3, "node count");
    assert_eq!(u16_at(viot, 38), 48, "node offset");
    // The virtio-pci IOMMU node.
    assert_eq!((viot[48], u16_at(viot, 50)), (3, 16));
    assert_eq!((u16_at(viot, 52), u16_at(viot, 54)), (0, 0x08));
    // PCI range nodes: endpoint id = BDF, output = the IOMMU node.
    let range = |off: usize| {
        assert_eq!((viot[off], u16_at(viot, off + 2)), (1, 24));
        (
            u32_at(viot, off + 4),
            u16_at(viot, off + 12),
            u16_at(viot, off + 14),
            u16_at(viot, off + 16),
        )
    };
    assert_eq!(range(64), (0x10, 0x10, 0x18, 48));
    assert_eq!(range(88), (0x28, 0x28, 0x28, 48));
    assert_eq!(viot.len(), 112);
    // Without an IOMMU there is no VIOT.
    assert!(tables(2).iter().all(|t| t.name != "VIOT"));
}
