//! QEMU's firmware configuration device (fw_cfg), x86 I/O port interface, as SeaBIOS, OVMF and
//! Linux's `qemu_fw_cfg` driver use it (QEMU's `docs/specs/fw_cfg.rst`).
//!
//! Ports, relative to the base (0x510 on a PC):
//! - 0 (16-bit write, little-endian): select an item; the read offset goes back to 0.
//! - 0 or 1 (8-bit read): the next byte of the selected item; 0 past its end.
//! - 4..12: DMA address, big-endian, written as two 32-bit halves (high at 4, low at 8); the write
//!   of the low half starts the transfer. Reads give the signature "QEMU CFG".
//!
//! A DMA transfer is described in guest memory by a big-endian `{ u32 control; u32 length;
//! u64 address; }`. The device reads it, does the work and writes the control word back: 0 on
//! success, [`DMA_CTL_ERROR`] on failure (a bad address, a write). Every access goes through the
//! device's [`DmaSpace`] and is range-checked before it touches memory, so nothing the guest
//! writes can make it panic or reach outside what that space allows.
//!
//! Items are either legacy keys ([`key`]) or named files listed in the directory at
//! [`key::FILE_DIR`]: a big-endian count, then 64-byte entries `{ u32 size; u16 select;
//! u16 reserved; char name[56]; }`, big-endian too.

mod loader;

use std::collections::BTreeMap;

use crate::bus::BusDevice;
use crate::virtio::dma::{DmaSnapshot, DmaSpace};

pub use loader::{AllocZone, TableLoader};

/// Legacy item keys (QEMU's `FW_CFG_*`). Values are little-endian.
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Feature bits: [`super::ID_TRADITIONAL`], [`super::ID_DMA`].
    pub const ID: u16 = 0x01;
    pub const UUID: u16 = 0x02;
    /// RAM size in bytes, u64.
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    /// vCPUs present at boot, u16.
    pub const NB_CPUS: u16 = 0x05;
    pub const NUMA: u16 = 0x0d;
    pub const BOOT_MENU: u16 = 0x0e;
    /// Most vCPUs the machine can have, u16.
    pub const MAX_CPUS: u16 = 0x0f;
    /// The file directory.
    pub const FILE_DIR: u16 = 0x19;
    /// The first key given to a file.
    pub const FILE_FIRST: u16 = 0x20;
    /// Set in keys of architecture-specific items.
    pub const ARCH_LOCAL: u16 = 0x8000;
    /// Whether ISA IRQ 0 is wired to I/O APIC pin 2 (u32, x86).
    pub const IRQ0_OVERRIDE: u16 = ARCH_LOCAL + 2;
}

/// Item ID bits: the port interface and the DMA interface are there.
pub const ID_TRADITIONAL: u32 = 1 << 0;
pub const ID_DMA: u32 = 1 << 1;

/// DMA control bits.
pub const DMA_CTL_ERROR: u32 = 1 << 0;
pub const DMA_CTL_READ: u32 = 1 << 1;
pub const DMA_CTL_SKIP: u32 = 1 << 2;
pub const DMA_CTL_SELECT: u32 = 1 << 3;
pub const DMA_CTL_WRITE: u32 = 1 << 4;

/// Longest file name, without its terminating NUL.
pub const FILE_NAME_MAX: usize = 55;
/// Files the directory holds at most (QEMU's default for current machines).
pub const MAX_FILES: usize = 0x1000;
/// Ports the device answers on (selector/data, a gap, DMA address).
pub const PORT_LEN: u64 = 12;

/// The bit in a key that QEMU once used to mark writes; selecting ignores it.
const KEY_WRITE: u16 = 0x4000;
const DMA_SIGNATURE: &[u8; 8] = b"QEMU CFG";
const DMA_ACCESS_LEN: usize = 16;
const FILE_ENTRY_LEN: usize = 64;

/// Why an item or file was refused. The builder's mistakes, never the guest's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    #[error("fw_cfg file name `{0}` is empty, too long (55 bytes at most) or holds a NUL")]
    FileName(String),
    #[error("fw_cfg file `{0}` is already there")]
    DuplicateFile(String),
    #[error("fw_cfg holds at most {MAX_FILES} files")]
    TooManyFiles,
    #[error("fw_cfg item of {0} bytes does not fit in 32 bits")]
    TooLarge(usize),
    #[error("fw_cfg key {0:#x} is the device's own or a file's")]
    ReservedKey(u16),
}

/// The fw_cfg device. Give it a DMA space, then items and files.
pub struct FwCfg {
    dma: DmaSpace,
    /// Key (without the write bit) -> contents.
    items: BTreeMap<u16, Vec<u8>>,
    /// File names in directory order; file `i` has key `FILE_FIRST + i`.
    files: Vec<String>,
    selected: u16,
    offset: usize,
    /// High half of the DMA address, kept until the low half is written.
    dma_high: u32,
}

impl FwCfg {
    /// A device with its signature, its ID (port and DMA interfaces) and an empty directory.
    /// `dma` is where DMA requests read and write (identity: guest physical addresses).
    pub fn new(dma: DmaSpace) -> Self {
        let mut items = BTreeMap::new();
        items.insert(key::SIGNATURE, b"QEMU".to_vec());
        items.insert(key::ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        items.insert(key::FILE_DIR, 0u32.to_be_bytes().to_vec());
        Self {
            dma,
            items,
            files: Vec::new(),
            selected: key::SIGNATURE,
            offset: 0,
            dma_high: 0,
        }
    }

    /// Set a legacy item (a value of [`key`] other than the signature, ID and directory).
    pub fn set_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        let entry = key & !key::ARCH_LOCAL;
        if key & KEY_WRITE != 0
            || matches!(key, key::SIGNATURE | key::ID | key::FILE_DIR)
            || (key & key::ARCH_LOCAL == 0 && entry >= key::FILE_FIRST)
        {
            return Err(FwCfgError::ReservedKey(key));
        }
        check_len(&data)?;
        self.items.insert(key, data);
        Ok(())
    }

    /// Add a named file; returns its key.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() > FILE_NAME_MAX || name.contains('\0') {
            return Err(FwCfgError::FileName(name.to_owned()));
        }
        if self.files.iter().any(|f| f == name) {
            return Err(FwCfgError::DuplicateFile(name.to_owned()));
        }
        check_len(&data)?;
        let select = u16::try_from(self.files.len())
            .ok()
            .filter(|_| self.files.len() < MAX_FILES)
            .and_then(|i| key::FILE_FIRST.checked_add(i))
            .ok_or(FwCfgError::TooManyFiles)?;
        self.items.insert(select, data);
        self.files.push(name.to_owned());
        self.rebuild_dir();
        Ok(select)
    }

    /// The contents of the file called `name`.
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        let i = self.files.iter().position(|f| f == name)?;
        let select = key::FILE_FIRST + u16::try_from(i).ok()?;
        self.items.get(&select).map(Vec::as_slice)
    }

    fn rebuild_dir(&mut self) {
        let mut dir = Vec::with_capacity(4 + self.files.len() * FILE_ENTRY_LEN);
        // Both fit: add_file bounds the count and each size.
        dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for (i, name) in self.files.iter().enumerate() {
            let select = key::FILE_FIRST + i as u16;
            let size = self.items.get(&select).map_or(0, Vec::len) as u32;
            let mut entry = [0u8; FILE_ENTRY_LEN];
            entry[0..4].copy_from_slice(&size.to_be_bytes());
            entry[4..6].copy_from_slice(&select.to_be_bytes());
            entry[8..8 + name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&entry);
        }
        self.items.insert(key::FILE_DIR, dir);
    }

    fn select(&mut self, key: u16) {
        self.selected = key & !KEY_WRITE;
        self.offset = 0;
    }

    /// The selected item; an unknown key reads as empty (so as zeroes).
    fn current(&self) -> &[u8] {
        self.items.get(&self.selected).map_or(&[], Vec::as_slice)
    }

    fn read_data(&mut self) -> u8 {
        let b = self.current().get(self.offset).copied();
        match b {
            Some(b) => {
                self.offset += 1;
                b
            }
            None => 0,
        }
    }

    /// Run the DMA request whose descriptor is at guest physical `addr`.
    fn dma(&mut self, addr: u64) {
        let mem = self.dma.snapshot();
        let mut access = [0u8; DMA_ACCESS_LEN];
        let status = if mem.read(addr, &mut access).is_err() {
            DMA_CTL_ERROR
        } else {
            let be32 = |at: usize| u32::from_be_bytes([0, 1, 2, 3].map(|i| access[at + i]));
            let control = be32(0);
            let length = be32(4);
            let address = u64::from(be32(8)) << 32 | u64::from(be32(12));
            if control & DMA_CTL_SELECT != 0 {
                self.select((control >> 16) as u16);
            }
            if control & DMA_CTL_READ != 0 {
                self.dma_read(&mem, address, length)
            } else if control & DMA_CTL_WRITE != 0 {
                // No item is writable.
                tracing::debug!("fw_cfg: DMA write to key {:#x} refused", self.selected);
                DMA_CTL_ERROR
            } else if control & DMA_CTL_SKIP != 0 {
                self.skip(length);
                0
            } else {
                0
            }
        };
        if status != 0 {
            tracing::debug!(addr, "fw_cfg: DMA request failed");
        }
        // Nothing to report to if the descriptor itself is not in guest memory.
        let _ = mem.write(addr, &status.to_be_bytes());
    }

    /// Copy `length` bytes of the selected item to guest `address`, zeroes past its end.
    fn dma_read(&mut self, mem: &DmaSnapshot, address: u64, length: u32) -> u32 {
        let length = length as usize;
        let start = self.offset.min(self.current().len());
        let n = length.min(self.current().len() - start);
        if mem
            .write(address, &self.current()[start..start + n])
            .is_err()
        {
            return DMA_CTL_ERROR;
        }
        self.offset = start + n;
        const ZEROES: [u8; 4096] = [0; 4096];
        let mut done = n;
        while done < length {
            let chunk = (length - done).min(ZEROES.len());
            let at = address.checked_add(done as u64);
            match at.map(|a| mem.write(a, &ZEROES[..chunk])) {
                Some(Ok(())) => done += chunk,
                _ => return DMA_CTL_ERROR,
            }
        }
        0
    }

    fn skip(&mut self, length: u32) {
        let len = self.current().len();
        self.offset = self.offset.saturating_add(length as usize).min(len);
    }
}

fn check_len(data: &[u8]) -> Result<(), FwCfgError> {
    u32::try_from(data.len())
        .map(|_| ())
        .map_err(|_| FwCfgError::TooLarge(data.len()))
}

/// QEMU's `etc/e820` table from (address, length, type) entries: 20 bytes each, little-endian.
pub fn e820_table(entries: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 20);
    for (addr, len, kind) in entries {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
    }
    out
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            // QEMU answers data reads at the selector port too.
            (0 | 1, 1) => data[0] = self.read_data(),
            (4..12, _) => {
                for (i, b) in data.iter_mut().enumerate() {
                    let at = (offset - 4) as usize + i;
                    *b = DMA_SIGNATURE.get(at).copied().unwrap_or(0xff);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[lo, hi]) => self.select(u16::from_le_bytes([lo, hi])),
            (4, &[a, b, c, d]) => self.dma_high = u32::from_be_bytes([a, b, c, d]),
            (8, &[a, b, c, d]) => {
                let addr =
                    u64::from(self.dma_high) << 32 | u64::from(u32::from_be_bytes([a, b, c, d]));
                self.dma_high = 0;
                self.dma(addr);
            }
            (4, &[a, b, c, d, e, f, g, h]) => {
                self.dma_high = 0;
                self.dma(u64::from_be_bytes([a, b, c, d, e, f, g, h]));
            }
            // Data writes are ignored, as in QEMU since 2.4.
            _ => tracing::trace!(offset, len = data.len(), "fw_cfg: write ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::testutil::{XorShift, fuzz, read1};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MEM: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory")
    }

    fn select(d: &mut FwCfg, key: u16) {
        d.write(0, &key.to_le_bytes());
    }

    fn read_n(d: &mut FwCfg, n: usize) -> Vec<u8> {
        (0..n).map(|_| read1(d, 1)).collect()
    }

    /// Write a DMA descriptor at `at` and start it through the two halves of the address.
    fn dma(d: &mut FwCfg, m: &GuestMemoryMmap, at: u64, control: u32, length: u32, addr: u64) {
        let mut access = Vec::new();
        access.extend_from_slice(&control.to_be_bytes());
        access.extend_from_slice(&length.to_be_bytes());
        access.extend_from_slice(&addr.to_be_bytes());
        m.write_slice(&access, GuestAddress(at))
            .expect("descriptor");
        start_dma(d, at);
    }

    fn start_dma(d: &mut FwCfg, at: u64) {
        d.write(4, &((at >> 32) as u32).to_be_bytes());
        d.write(8, &(at as u32).to_be_bytes());
    }

    fn control(m: &GuestMemoryMmap, at: u64) -> u32 {
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(at)).expect("control");
        u32::from_be_bytes(b)
    }

    fn guest(m: &GuestMemoryMmap, at: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        m.read_slice(&mut b, GuestAddress(at)).expect("read");
        b
    }

    #[test]
    fn signature_and_id_through_ports() {
        let mut d = FwCfg::new(DmaSpace::identity(mem()));
        // Key 0 is selected at reset.
        assert_eq!(read_n(&mut d, 4), b"QEMU");
        // Past the end: zeroes.
        assert_eq!(read_n(&mut d, 2), [0, 0]);
        select(&mut d, key::SIGNATURE);
        // Byte reads at the selector port read data too.
        assert_eq!(read1(&mut d, 0), b'Q');
        assert_eq!(read1(&mut d, 1), b'E');
        select(&mut d, key::ID);
        assert_eq!(read_n(&mut d, 4), [3, 0, 0, 0]);
        // The write bit is ignored when selecting.
        select(&mut d, key::ID | KEY_WRITE);
        assert_eq!(read_n(&mut d, 4), [3, 0, 0, 0]);
        // Unknown keys read as zeroes.
        select(&mut d, 0x1234);
        assert_eq!(read_n(&mut d, 3), [0, 0, 0]);
        // Wider reads of the data port and the gap read all-ones.
        let mut w = [0u8; 2];
        d.read(1, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        assert_eq!(read1(&mut d, 2), 0xff);
        assert_eq!(read1(&mut d, 3), 0xff);
    }

    #[test]
    fn dma_register_reads_signature() {
        let mut d = FwCfg::new(DmaSpace::identity(mem()));
        let mut sig = [0u8; 4];
        d.read(4, &mut sig);
        assert_eq!(&sig, b"QEMU");
        d.read(8, &mut sig);
        assert_eq!(&sig, b" CFG");
        let mut past = [0u8; 4];
        d.read(10, &mut past);
        assert_eq!(past, [b'F', b'G', 0xff, 0xff]);
    }

    #[test]
    fn legacy_items_and_reserved_keys() {
        let mut d = FwCfg::new(DmaSpace::identity(mem()));
        d.set_item(key::NB_CPUS, 2u16.to_le_bytes().to_vec())
            .expect("nb cpus");
        d.set_item(key::IRQ0_OVERRIDE, 0u32.to_le_bytes().to_vec())
            .expect("irq0");
        select(&mut d, key::NB_CPUS);
        assert_eq!(read_n(&mut d, 2), [2, 0]);
        for k in [
            key::SIGNATURE,
            key::ID,
            key::FILE_DIR,
            key::FILE_FIRST,
            0x3fff,
            0x4005,
        ] {
            assert_eq!(
                d.set_item(k, vec![1]),
                Err(FwCfgError::ReservedKey(k)),
                "{k:#x}"
            );
        }
    }

    #[test]
    fn file_directory_layout() {
        let mut d = FwCfg::new(DmaSpace::identity(mem()));
        assert_eq!(d.add_file("etc/e820", vec![1; 40]), Ok(0x20));
        assert_eq!(d.add_file("bootorder", b"/x\n".to_vec()), Ok(0x21));
        assert_eq!(
            d.add_file("etc/e820", vec![]),
            Err(FwCfgError::DuplicateFile("etc/e820".into()))
        );
        let long = "x".repeat(56);
        assert_eq!(
            d.add_file(&long, vec![]),
            Err(FwCfgError::FileName(long.clone()))
        );
        assert!(d.add_file(&long[..55], vec![]).is_ok());
        assert!(d.add_file("", vec![]).is_err());
        assert!(d.add_file("a\0b", vec![]).is_err());

        select(&mut d, key::FILE_DIR);
        let dir = read_n(&mut d, 4 + 3 * 64);
        assert_eq!(dir[0..4], [0, 0, 0, 3]);
        let e0 = &dir[4..68];
        assert_eq!(e0[0..4], [0, 0, 0, 40]);
        assert_eq!(e0[4..6], [0x00, 0x20]);
        assert_eq!(e0[6..8], [0, 0]);
        assert_eq!(&e0[8..16], b"etc/e820");
        assert!(e0[16..].iter().all(|&b| b == 0));
        let e1 = &dir[68..132];
        assert_eq!(e1[0..4], [0, 0, 0, 3]);
        assert_eq!(e1[4..6], [0x00, 0x21]);
        assert_eq!(&e1[8..17], b"bootorder");
        let e2 = &dir[132..196];
        assert_eq!(e2[8..63], long.as_bytes()[..55]);
        // The name keeps its terminating NUL.
        assert_eq!(e2[63], 0);

        select(&mut d, 0x21);
        assert_eq!(read_n(&mut d, 4), [b'/', b'x', b'\n', 0]);
        assert_eq!(d.file("bootorder"), Some(&b"/x\n"[..]));
        assert_eq!(d.file("missing"), None);
    }

    #[test]
    fn dma_read_select_and_skip() {
        let m = mem();
        let mut d = FwCfg::new(DmaSpace::identity(m.clone()));
        let data: Vec<u8> = (0..100).collect();
        let k = d.add_file("etc/test", data.clone()).expect("file");
        m.write_slice(&[0xaa; 128], GuestAddress(0x2000))
            .expect("fill");

        // Select + read 10 bytes.
        let ctl = (u32::from(k) << 16) | DMA_CTL_SELECT | DMA_CTL_READ;
        dma(&mut d, &m, 0x1000, ctl, 10, 0x2000);
        assert_eq!(control(&m, 0x1000), 0);
        assert_eq!(guest(&m, 0x2000, 11), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xaa]);

        // Skip 80, then read 20: 10 bytes of data, then zeroes, and the offset stays at the end.
        dma(&mut d, &m, 0x1000, DMA_CTL_SKIP, 80, 0);
        assert_eq!(control(&m, 0x1000), 0);
        dma(&mut d, &m, 0x1000, DMA_CTL_READ, 20, 0x2000);
        assert_eq!(control(&m, 0x1000), 0);
        let got = guest(&m, 0x2000, 21);
        assert_eq!(got[..10], data[90..]);
        assert_eq!(got[10..20], [0; 10]);
        assert_eq!(got[20], 0xaa);
        // The port interface continues from the same offset.
        assert_eq!(read1(&mut d, 1), 0);

        // The descriptor's address may be above 4 GiB only through the high half; here the
        // high half is cleared after each transfer, so a lone low write means below 4 GiB.
        d.write(4, &1u32.to_be_bytes());
        d.write(8, &0x1000u32.to_be_bytes());
        // 0x1_0000_1000 is not guest memory: nothing to report to, nothing written.
        assert_eq!(control(&m, 0x1000), 0);

        // Select without read: only the selection (and the offset reset).
        dma(
            &mut d,
            &m,
            0x1000,
            (u32::from(key::SIGNATURE) << 16) | DMA_CTL_SELECT,
            4,
            0x2000,
        );
        assert_eq!(control(&m, 0x1000), 0);
        assert_eq!(read_n(&mut d, 4), b"QEMU");

        // A single 8-byte write of the address works too.
        m.write_slice(&[0; 16], GuestAddress(0x1100))
            .expect("clear");
        let mut access = Vec::new();
        access.extend_from_slice(
            &((u32::from(key::ID) << 16) | DMA_CTL_SELECT | DMA_CTL_READ).to_be_bytes(),
        );
        access.extend_from_slice(&4u32.to_be_bytes());
        access.extend_from_slice(&0x3000u64.to_be_bytes());
        m.write_slice(&access, GuestAddress(0x1100))
            .expect("descriptor");
        d.write(4, &0x1100u64.to_be_bytes());
        assert_eq!(control(&m, 0x1100), 0);
        assert_eq!(guest(&m, 0x3000, 4), [3, 0, 0, 0]);
    }

    #[test]
    fn dma_errors() {
        let m = mem();
        let mut d = FwCfg::new(DmaSpace::identity(m.clone()));
        d.add_file("etc/test", vec![7; 16]).expect("file");
        let read = (0x20 << 16) | DMA_CTL_SELECT | DMA_CTL_READ;

        // Destination outside guest memory.
        dma(&mut d, &m, 0x1000, read, 16, MEM - 8);
        assert_eq!(control(&m, 0x1000), DMA_CTL_ERROR);
        dma(&mut d, &m, 0x1000, read, 16, u64::MAX - 3);
        assert_eq!(control(&m, 0x1000), DMA_CTL_ERROR);
        // Zero fill running off the end of memory.
        dma(&mut d, &m, 0x1000, read, u32::MAX, MEM - 0x100);
        assert_eq!(control(&m, 0x1000), DMA_CTL_ERROR);
        // Zero fill whose address wraps.
        dma(&mut d, &m, 0x1000, read, 0x100, u64::MAX - 0x8);
        assert_eq!(control(&m, 0x1000), DMA_CTL_ERROR);

        // Writes are refused, and change nothing.
        m.write_slice(&[9; 16], GuestAddress(0x2000)).expect("fill");
        dma(
            &mut d,
            &m,
            0x1000,
            (0x20 << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE,
            16,
            0x2000,
        );
        assert_eq!(control(&m, 0x1000), DMA_CTL_ERROR);
        assert_eq!(d.file("etc/test"), Some(&[7u8; 16][..]));

        // A descriptor straddling the end of memory: no status can be written.
        start_dma(&mut d, MEM - 8);
        start_dma(&mut d, u64::MAX);

        // Unknown control bits alone: nothing done, success.
        dma(&mut d, &m, 0x1000, 1 << 5, 16, 0x2000);
        assert_eq!(control(&m, 0x1000), 0);
    }

    #[test]
    fn e820_encoding() {
        let t = e820_table(&[(0, 0x9fc00, 1), (0xfeff_c000, 0x4000, 2)]);
        assert_eq!(t.len(), 40);
        assert_eq!(t[0..8], [0; 8]);
        assert_eq!(t[8..16], 0x9fc00u64.to_le_bytes());
        assert_eq!(t[16..20], [1, 0, 0, 0]);
        assert_eq!(t[20..28], 0xfeff_c000u64.to_le_bytes());
        assert_eq!(t[28..36], 0x4000u64.to_le_bytes());
        assert_eq!(t[36..40], [2, 0, 0, 0]);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let m = mem();
        let mut d = FwCfg::new(DmaSpace::identity(m.clone()));
        d.add_file("etc/test", vec![1; 300]).expect("file");
        fuzz(&mut d, 0x510, PORT_LEN + 2, 20_000);
        // Random DMA descriptors, some in memory and some not.
        let mut rng = XorShift(0xf00d);
        for _ in 0..2_000 {
            let at = if rng.below(4) == 0 {
                rng.next()
            } else {
                rng.below(MEM)
            };
            let mut desc = rng.next().to_be_bytes().to_vec();
            let addr = if rng.below(2) == 0 {
                rng.next()
            } else {
                rng.below(MEM)
            };
            desc[4..8].copy_from_slice(&(rng.below(0x2000) as u32).to_be_bytes());
            desc.extend_from_slice(&addr.to_be_bytes());
            let _ = m.write_slice(&desc, GuestAddress(at));
            start_dma(&mut d, at);
        }
    }
}
