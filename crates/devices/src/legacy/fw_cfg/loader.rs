//! QEMU's BIOS linker/loader script (`etc/table-loader`): how firmware places the ACPI tables
//! that fw_cfg hands it as files, patches the pointers between them and fixes their checksums.
//!
//! Each command is 128 bytes, little-endian: a u32 command, then its arguments, zero-padded.
//! File names are 56-byte NUL-terminated strings.
//! - ALLOCATE (1): `file`, `align` (u32), `zone` (u8: 1 anywhere in RAM, 2 in the F segment).
//! - ADD_POINTER (2): `dest_file`, `src_file`, `offset` (u32), `size` (u8: 1, 2, 4 or 8): add
//!   the address where `src_file` was placed to the `size`-byte little-endian value at `offset`
//!   in `dest_file`.
//! - ADD_CHECKSUM (3): `file`, `offset` (u32), `start` (u32), `length` (u32): set the byte at
//!   `offset` so that bytes `start..start+length` sum to zero.

use super::{FILE_NAME_MAX, FwCfgError};

const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
const ENTRY_LEN: usize = 128;
const NAME_LEN: usize = FILE_NAME_MAX + 1;

/// Where ALLOCATE asks the firmware to place a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocZone {
    /// Anywhere in RAM (SeaBIOS: high memory).
    High = 1,
    /// In the F segment, below 1 MiB (where the RSDP must be found by a scan).
    FSeg = 2,
}

/// Builds an `etc/table-loader` file, one command at a time.
#[derive(Clone, Debug, Default)]
pub struct TableLoader {
    bytes: Vec<u8>,
}

impl TableLoader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Place `file` at an `align`-aligned address (a power of two) in `zone`.
    pub fn allocate(&mut self, file: &str, align: u32, zone: AllocZone) -> Result<(), FwCfgError> {
        let mut e = entry(CMD_ALLOCATE);
        put_name(&mut e, 4, file)?;
        e[60..64].copy_from_slice(&align.to_le_bytes());
        e[64] = zone as u8;
        self.bytes.extend_from_slice(&e);
        Ok(())
    }

    /// Add the address of `src_file` to the `size`-byte field at `offset` in `dest_file`.
    pub fn add_pointer(
        &mut self,
        dest_file: &str,
        src_file: &str,
        offset: u32,
        size: u8,
    ) -> Result<(), FwCfgError> {
        let mut e = entry(CMD_ADD_POINTER);
        put_name(&mut e, 4, dest_file)?;
        put_name(&mut e, 4 + NAME_LEN, src_file)?;
        e[116..120].copy_from_slice(&offset.to_le_bytes());
        e[120] = size;
        self.bytes.extend_from_slice(&e);
        Ok(())
    }

    /// Make bytes `start..start+length` of `file` sum to zero through the byte at `offset`.
    pub fn add_checksum(
        &mut self,
        file: &str,
        offset: u32,
        start: u32,
        length: u32,
    ) -> Result<(), FwCfgError> {
        let mut e = entry(CMD_ADD_CHECKSUM);
        put_name(&mut e, 4, file)?;
        e[60..64].copy_from_slice(&offset.to_le_bytes());
        e[64..68].copy_from_slice(&start.to_le_bytes());
        e[68..72].copy_from_slice(&length.to_le_bytes());
        self.bytes.extend_from_slice(&e);
        Ok(())
    }

    /// The script, to add as the fw_cfg file `etc/table-loader`.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

fn entry(command: u32) -> [u8; ENTRY_LEN] {
    let mut e = [0u8; ENTRY_LEN];
    e[0..4].copy_from_slice(&command.to_le_bytes());
    e
}

fn put_name(e: &mut [u8; ENTRY_LEN], at: usize, name: &str) -> Result<(), FwCfgError> {
    if name.is_empty() || name.len() > FILE_NAME_MAX || name.contains('\0') {
        return Err(FwCfgError::FileName(name.to_owned()));
    }
    e[at..at + name.len()].copy_from_slice(name.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_layout() {
        let mut l = TableLoader::new();
        l.allocate("etc/acpi/rsdp", 16, AllocZone::FSeg)
            .expect("allocate");
        l.add_pointer("etc/acpi/rsdp", "etc/acpi/tables", 24, 8)
            .expect("pointer");
        l.add_checksum("etc/acpi/tables", 9, 0, 36)
            .expect("checksum");
        let b = l.into_bytes();
        assert_eq!(b.len(), 3 * 128);

        let a = &b[0..128];
        assert_eq!(a[0..4], [1, 0, 0, 0]);
        assert_eq!(&a[4..17], b"etc/acpi/rsdp");
        assert!(a[17..60].iter().all(|&x| x == 0));
        assert_eq!(a[60..64], [16, 0, 0, 0]);
        assert_eq!(a[64], 2);
        assert!(a[65..].iter().all(|&x| x == 0));

        let p = &b[128..256];
        assert_eq!(p[0..4], [2, 0, 0, 0]);
        assert_eq!(&p[4..17], b"etc/acpi/rsdp");
        assert_eq!(&p[60..75], b"etc/acpi/tables");
        assert!(p[75..116].iter().all(|&x| x == 0));
        assert_eq!(p[116..120], [24, 0, 0, 0]);
        assert_eq!(p[120], 8);
        assert!(p[121..].iter().all(|&x| x == 0));

        let c = &b[256..384];
        assert_eq!(c[0..4], [3, 0, 0, 0]);
        assert_eq!(&c[4..19], b"etc/acpi/tables");
        assert_eq!(c[60..64], [9, 0, 0, 0]);
        assert_eq!(c[64..68], [0, 0, 0, 0]);
        assert_eq!(c[68..72], [36, 0, 0, 0]);
        assert!(c[72..].iter().all(|&x| x == 0));
    }

    #[test]
    fn bad_names_refused() {
        let mut l = TableLoader::new();
        let long = "n".repeat(56);
        assert!(l.allocate(&long, 16, AllocZone::High).is_err());
        assert!(l.add_pointer("a", "", 0, 4).is_err());
        assert!(l.add_checksum("a\0", 0, 0, 1).is_err());
        assert!(l.into_bytes().is_empty());
        let mut l = TableLoader::new();
        l.allocate(&long[..55], 16, AllocZone::High)
            .expect("55 bytes fit");
        let b = l.into_bytes();
        assert_eq!((b[58], b[59]), (b'n', 0));
    }
}
