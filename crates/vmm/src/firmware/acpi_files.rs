//! ACPI tables handed to firmware through fw_cfg, as QEMU does: the RSDP in `etc/acpi/rsdp`,
//! every other table in one blob `etc/acpi/tables`, and a linker/loader script
//! (`etc/table-loader`) that has the firmware place both, turn the pointers between tables into
//! addresses and fix the checksums. SeaBIOS and OVMF then publish the RSDP themselves.
//!
//! The input is the tables as laid out for a direct kernel boot (absolute addresses, the RSDP
//! first): the blob keeps their relative layout, and each pointer field an ACPI table can hold
//! (RSDP -> RSDT/XSDT, RSDT/XSDT entries, FADT -> FACS/DSDT) becomes an offset into the blob plus
//! an ADD_POINTER command.

use devices::legacy::FwCfg;
use devices::legacy::fw_cfg::{AllocZone, TableLoader};

use super::FirmwareError;

pub const RSDP_FILE: &str = "etc/acpi/rsdp";
pub const TABLES_FILE: &str = "etc/acpi/tables";
pub const LOADER_FILE: &str = "etc/table-loader";

/// Alignment asked for the tables blob (QEMU asks 64) and the RSDP (16, as the spec requires).
const TABLES_ALIGN: u32 = 64;
const RSDP_ALIGN: u32 = 16;
/// Bytes of an ACPI table header: signature, length, revision, checksum at 9, ...
const HEADER_LEN: usize = 36;
const RSDP_V1_LEN: usize = 20;
const RSDP_V2_LEN: usize = 36;

fn layout_err(what: String) -> FirmwareError {
    FirmwareError::AcpiLayout(what)
}

/// Where the pointer fields are in a table with this signature: (offset, size).
fn pointer_fields(signature: &[u8], len: usize) -> Vec<(usize, usize)> {
    match signature {
        // FIRMWARE_CTRL, DSDT, X_FIRMWARE_CTRL, X_DSDT.
        b"FACP" => [(36, 4), (40, 4), (132, 8), (140, 8)]
            .into_iter()
            .filter(|(off, size)| off + size <= len)
            .collect(),
        b"XSDT" => (HEADER_LEN..len).step_by(8).map(|off| (off, 8)).collect(),
        b"RSDT" => (HEADER_LEN..len).step_by(4).map(|off| (off, 4)).collect(),
        _ => Vec::new(),
    }
}

fn read_le(bytes: &[u8], off: usize, size: usize) -> Option<u64> {
    let field = bytes.get(off..off + size)?;
    let mut v = [0u8; 8];
    v[..size].copy_from_slice(field);
    Some(u64::from_le_bytes(v))
}

fn write_le(bytes: &mut [u8], off: usize, size: usize, value: u64) {
    bytes[off..off + size].copy_from_slice(&value.to_le_bytes()[..size]);
}

/// A u32 loader argument; every offset here is within a blob the builder made (tens of KiB).
fn arg(v: usize) -> Result<u32, FirmwareError> {
    u32::try_from(v).map_err(|_| layout_err(format!("offset {v:#x} does not fit in 32 bits")))
}

/// Add the three files for `tables`, each (signature, address, bytes), one of them "RSDP".
pub fn add_acpi_tables(fw: &mut FwCfg, tables: &[(&str, u64, &[u8])]) -> Result<(), FirmwareError> {
    let (_, _, rsdp) = tables
        .iter()
        .find(|(name, ..)| *name == "RSDP")
        .ok_or_else(|| layout_err("no RSDP".into()))?;
    let mut rsdp = rsdp.to_vec();
    let mut rest: Vec<_> = tables.iter().filter(|(name, ..)| *name != "RSDP").collect();
    rest.sort_by_key(|(_, addr, _)| *addr);
    let base = rest.first().map_or(0, |(_, addr, _)| *addr);

    // The blob: every table at its offset from the first, gaps zeroed.
    let mut blob = Vec::new();
    let mut offsets = Vec::with_capacity(rest.len());
    for (name, addr, bytes) in &rest {
        let off = usize::try_from(addr - base)
            .ok()
            .filter(|off| *off >= blob.len() && bytes.len() >= HEADER_LEN)
            .ok_or_else(|| layout_err(format!("{name} overlaps another table or is too short")))?;
        blob.resize(off, 0);
        blob.extend_from_slice(bytes);
        offsets.push(off);
    }
    let end = base + blob.len() as u64;

    let mut loader = TableLoader::new();
    loader.allocate(RSDP_FILE, RSDP_ALIGN, AllocZone::FSeg)?;
    loader.allocate(TABLES_FILE, TABLES_ALIGN, AllocZone::High)?;
    // Point a field of `file` at the blob: keep only the offset, the loader adds the address.
    let mut relocate = |bytes: &mut [u8], file: &str, at: usize, size: usize| {
        let value = read_le(bytes, at, size).unwrap_or(0);
        if value == 0 {
            return Ok(());
        }
        if !(base..end).contains(&value) {
            return Err(layout_err(format!(
                "{file}+{at:#x} points at {value:#x}, outside the tables"
            )));
        }
        write_le(bytes, at, size, value - base);
        loader.add_pointer(file, TABLES_FILE, arg(at)?, size as u8)?;
        Ok::<(), FirmwareError>(())
    };

    if rsdp.len() < RSDP_V1_LEN {
        return Err(layout_err("RSDP too short".into()));
    }
    relocate(&mut rsdp, RSDP_FILE, 16, 4)?;
    if rsdp.len() >= RSDP_V2_LEN {
        relocate(&mut rsdp, RSDP_FILE, 24, 8)?;
    }
    for &off in &offsets {
        let len = read_le(&blob, off + 4, 4).unwrap_or(0) as usize;
        let signature = blob[off..off + 4].to_vec();
        for (at, size) in pointer_fields(&signature, len) {
            relocate(&mut blob, TABLES_FILE, off + at, size)?;
        }
    }

    // Checksums last, over the patched bytes; the RSDP's 20-byte one before its extended one.
    loader.add_checksum(RSDP_FILE, 8, 0, arg(RSDP_V1_LEN)?)?;
    if rsdp.len() >= RSDP_V2_LEN {
        loader.add_checksum(RSDP_FILE, 32, 0, arg(RSDP_V2_LEN)?)?;
    }
    for &off in &offsets {
        let len = read_le(&blob, off + 4, 4).unwrap_or(0);
        loader.add_checksum(TABLES_FILE, arg(off + 9)?, arg(off)?, len as u32)?;
    }

    fw.add_file(RSDP_FILE, rsdp)?;
    fw.add_file(TABLES_FILE, blob)?;
    fw.add_file(LOADER_FILE, loader.into_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use devices::virtio::DmaSpace;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    fn checksum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// A table with a valid header and checksum, `len` bytes long.
    fn table(signature: &[u8; 4], len: usize) -> Vec<u8> {
        let mut t = vec![0u8; len];
        t[0..4].copy_from_slice(signature);
        t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        t[8] = 1;
        t[9] = 0u8.wrapping_sub(checksum(&t));
        t
    }

    fn fix(t: &mut [u8], at: usize, len: usize) {
        t[at] = 0;
        t[at] = 0u8.wrapping_sub(checksum(&t[..len]));
    }

    /// What a direct boot would write at 0xE0000: RSDP, DSDT, FADT, XSDT.
    fn direct_tables() -> Vec<(&'static str, u64, Vec<u8>)> {
        let (dsdt_at, fadt_at, xsdt_at): (u64, u64, u64) = (0xe0040, 0xe0080, 0xe0200);
        let mut dsdt = table(b"DSDT", 40);
        dsdt[36..40].copy_from_slice(b"AML!");
        fix(&mut dsdt, 9, 40);
        let mut fadt = table(b"FACP", 276);
        fadt[40..44].copy_from_slice(&(dsdt_at as u32).to_le_bytes());
        fadt[140..148].copy_from_slice(&dsdt_at.to_le_bytes());
        fix(&mut fadt, 9, 276);
        let mut xsdt = table(b"XSDT", 44);
        xsdt[36..44].copy_from_slice(&fadt_at.to_le_bytes());
        fix(&mut xsdt, 9, 44);
        let mut rsdp = vec![0u8; 36];
        rsdp[0..8].copy_from_slice(b"RSD PTR ");
        rsdp[15] = 2;
        rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
        rsdp[24..32].copy_from_slice(&xsdt_at.to_le_bytes());
        fix(&mut rsdp, 8, 20);
        fix(&mut rsdp, 32, 36);
        vec![
            ("RSDP", 0xe0000, rsdp),
            ("XSDT", xsdt_at, xsdt),
            ("DSDT", dsdt_at, dsdt),
            ("FACP", fadt_at, fadt),
        ]
    }

    fn fw_with(tables: &[(&'static str, u64, Vec<u8>)]) -> Result<FwCfg, FirmwareError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let mut fw = FwCfg::new(DmaSpace::identity(mem));
        let list: Vec<_> = tables
            .iter()
            .map(|(n, a, b)| (*n, *a, b.as_slice()))
            .collect();
        add_acpi_tables(&mut fw, &list)?;
        Ok(fw)
    }

    fn name(field: &[u8]) -> String {
        let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        String::from_utf8_lossy(&field[..end]).into_owned()
    }

    /// Run the loader script as SeaBIOS's romfile_loader does, placing files at `addrs`.
    fn run_loader(fw: &FwCfg, addrs: &[(&str, u64)]) -> HashMap<String, (u64, Vec<u8>)> {
        let mut files: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
        let script = fw.file(LOADER_FILE).expect("loader");
        assert_eq!(script.len() % 128, 0);
        for cmd in script.chunks(128) {
            let u32_at = |at: usize| u32::from_le_bytes(cmd[at..at + 4].try_into().expect("4"));
            match u32_at(0) {
                1 => {
                    let file = name(&cmd[4..60]);
                    let addr = addrs.iter().find(|(n, _)| *n == file).expect("addr").1;
                    assert_eq!(addr % u64::from(u32_at(60)), 0, "alignment of {file}");
                    let data = fw.file(&file).expect("allocated file").to_vec();
                    files.insert(file, (addr, data));
                }
                2 => {
                    let (dest, src) = (name(&cmd[4..60]), name(&cmd[60..116]));
                    let (off, size) = (u32_at(116) as usize, cmd[120] as usize);
                    let src_addr = files[&src].0;
                    let d = &mut files.get_mut(&dest).expect("dest").1;
                    let v = read_le(d, off, size).expect("in range") + src_addr;
                    write_le(d, off, size, v);
                }
                3 => {
                    let file = name(&cmd[4..60]);
                    let (off, start, len) = (
                        u32_at(60) as usize,
                        u32_at(64) as usize,
                        u32_at(68) as usize,
                    );
                    let d = &mut files.get_mut(&file).expect("file").1;
                    d[off] = d[off].wrapping_sub(checksum(&d[start..start + len]));
                }
                c => panic!("unknown command {c}"),
            }
        }
        files
    }

    #[test]
    fn loader_relinks_tables_at_new_addresses() {
        let fw = fw_with(&direct_tables()).expect("files");
        let tables_addr = 0x1fff_0000u64;
        let files = run_loader(&fw, &[(RSDP_FILE, 0xf5a80), (TABLES_FILE, tables_addr)]);
        let (_, rsdp) = &files[RSDP_FILE];
        let (_, blob) = &files[TABLES_FILE];
        assert_eq!(checksum(&rsdp[..20]), 0);
        assert_eq!(checksum(&rsdp[..36]), 0);
        // Follow RSDP -> XSDT -> FADT -> DSDT through guest addresses.
        let at = |addr: u64| (addr - tables_addr) as usize;
        let xsdt = at(read_le(rsdp, 24, 8).expect("xsdt"));
        assert_eq!(&blob[xsdt..xsdt + 4], b"XSDT");
        let fadt = at(read_le(blob, xsdt + 36, 8).expect("entry"));
        assert_eq!(&blob[fadt..fadt + 4], b"FACP");
        let dsdt = at(read_le(blob, fadt + 140, 8).expect("x_dsdt"));
        assert_eq!(at(read_le(blob, fadt + 40, 4).expect("dsdt")), dsdt);
        assert_eq!(&blob[dsdt + 36..dsdt + 40], b"AML!");
        // No FACS (hardware-reduced): its pointers stay zero.
        assert_eq!(read_le(blob, fadt + 36, 4), Some(0));
        for t in [xsdt, fadt, dsdt] {
            let len = read_le(blob, t + 4, 4).expect("len") as usize;
            assert_eq!(checksum(&blob[t..t + len]), 0, "table at {t:#x}");
        }
        // The blob keeps the direct layout: DSDT first, XSDT 0x1C0 after it.
        assert_eq!((dsdt, fadt, xsdt), (0, 0x40, 0x1c0));
        // The RSDT pointer of the RSDP was zero and stays so.
        assert_eq!(read_le(rsdp, 16, 4), Some(0));
    }

    #[test]
    fn bad_layouts_refused() {
        let mut t = direct_tables();
        t.retain(|(n, ..)| *n != "RSDP");
        assert!(matches!(fw_with(&t), Err(FirmwareError::AcpiLayout(_))));

        let mut t = direct_tables();
        t[2].1 = 0xe0070; // DSDT (40 bytes) runs into the FADT at 0xe0080
        assert!(matches!(fw_with(&t), Err(FirmwareError::AcpiLayout(_))));

        let mut t = direct_tables();
        t[1].2[36..44].copy_from_slice(&0xdead_0000u64.to_le_bytes());
        assert!(matches!(fw_with(&t), Err(FirmwareError::AcpiLayout(_))));
    }
}
