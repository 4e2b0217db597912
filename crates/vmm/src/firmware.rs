//! Firmware boot: a BIOS image (SeaBIOS, ...) mapped read-only so that it ends at 4 GiB, its
//! last 256 KiB copied into RAM below 1 MiB, and the fw_cfg items it reads.
//!
//! Below 1 MiB QEMU maps only the last 128 KiB, read-only (`isa-bios`); SeaBIOS then turns
//! 0xC0000..0x100000 into RAM through the i440FX/Q35 PAM registers and copies its whole image
//! (up to 256 KiB, which it is linked to run at 0x100000 - size) there from the top of 4 GiB.
//! We have no PAM registers: SeaBIOS says "Unable to unlock ram - bridge not found", copies
//! nothing and goes on, relying on the area being RAM. So the VMM does that copy itself, into
//! ordinary writable RAM.
//! The vCPU starts where KVM puts it at reset: real mode, CS 0xF000 with base 0xFFFF_0000,
//! IP 0xFFF0, so the first instruction is 16 bytes below 4 GiB, in the read-only mapping.

mod acpi_files;

pub use acpi_files::{LOADER_FILE, RSDP_FILE, TABLES_FILE, add_acpi_tables};

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use devices::legacy::FwCfg;
use devices::legacy::fw_cfg::{self, FwCfgError, key};
use devices::virtio::DmaSpace;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{self, FIRMWARE_END, HIMEM_START, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::vm::{Vm, VmError};

/// Largest image: the area below 4 GiB left free above the KVM TSS.
pub const FIRMWARE_MAX: u64 = 16 << 20;
/// Images are whole multiples of this (as QEMU requires of `-bios`).
pub const FIRMWARE_ALIGN: u64 = 64 << 10;
/// How much of the end of the image is copied below 1 MiB: a whole SeaBIOS image (128 or
/// 256 KiB); for larger images (OVMF) more than QEMU's 128 KiB `isa-bios` alias, which is
/// harmless as the area is RAM the firmware owns.
pub const LOW_COPY_MAX: u64 = 256 << 10;

/// The port SeaBIOS's serial console (`etc/sercon-port`) writes to: COM1.
const SERCON_PORT: u16 = 0x3f8;
/// `etc/boot-fail-wait`: with no bootable device, wait for ever rather than reboot (QEMU's
/// default, `-boot reboot-timeout=-1`).
const BOOT_FAIL_WAIT_FOREVER: u32 = u32::MAX;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("Cannot read firmware {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Firmware {0} is {1} bytes: it must be a non-zero multiple of 64 KiB, at most 16 MiB")]
    Size(PathBuf, u64),
    #[error("Cannot map the firmware")]
    Map(#[source] VmError),
    #[error("Cannot copy the firmware below 1 MiB")]
    Copy(#[source] vm_memory::GuestMemoryError),
    #[error("Cannot set up fw_cfg")]
    FwCfg(#[from] FwCfgError),
    #[error("Cannot hand the ACPI tables to the firmware: {0}")]
    AcpiLayout(String),
}

impl FirmwareError {
    /// Errors caused by the image the user gave rather than by the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Self::Read(..) | Self::Size(..))
    }
}

/// Read the image at `path`, checking its size before reading it all.
pub fn read_image(path: &Path) -> Result<Vec<u8>, FirmwareError> {
    let read_err = |e| FirmwareError::Read(path.to_owned(), e);
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    check_size(path, size)?;
    let mut image = Vec::with_capacity(size as usize);
    // A file that grows while we read it must not get past the limit either.
    file.take(FIRMWARE_MAX + 1)
        .read_to_end(&mut image)
        .map_err(read_err)?;
    check_size(path, image.len() as u64)?;
    Ok(image)
}

fn check_size(path: &Path, size: u64) -> Result<(), FirmwareError> {
    if size == 0 || size > FIRMWARE_MAX || size % FIRMWARE_ALIGN != 0 {
        return Err(FirmwareError::Size(path.to_owned(), size));
    }
    Ok(())
}

/// Map `image` read-only so that it ends at 4 GiB and copy its end below 1 MiB.
pub fn install(vm: &mut Vm, image: &[u8]) -> Result<(), FirmwareError> {
    let len = image.len() as u64;
    vm.map_rom(FIRMWARE_END - len, image)
        .map_err(FirmwareError::Map)?;
    let low = len.min(LOW_COPY_MAX) as usize;
    vm.memory()
        .write_slice(
            &image[image.len() - low..],
            GuestAddress(HIMEM_START - low as u64),
        )
        .map_err(FirmwareError::Copy)
}

/// The e820 map firmware starts from (QEMU's `etc/e820`): RAM, the pages KVM keeps for its TSS
/// and identity map, and the image itself. SeaBIOS adds its own reservations below 1 MiB.
fn e820(mem_size: u64, image_len: u64) -> Vec<(u64, u64, u32)> {
    let mut map: Vec<_> = layout::ram_ranges(mem_size)
        .into_iter()
        .map(|(start, size)| (start, size, E820_RAM))
        .collect();
    let kvm_end = KVM_TSS_ADDR + 3 * 0x1000;
    map.push((
        KVM_IDENTITY_MAP_ADDR,
        kvm_end - KVM_IDENTITY_MAP_ADDR,
        E820_RESERVED,
    ));
    map.push((FIRMWARE_END - image_len, image_len, E820_RESERVED));
    map
}

/// A fw_cfg device with what SeaBIOS reads at boot: memory size and map, vCPU counts, the serial
/// console and what to do when nothing boots. The builder adds more files: ACPI tables with
/// [`add_acpi_tables`], others (boot order) with [`FwCfg::add_file`].
pub fn fw_cfg(
    dma: DmaSpace,
    config: &api::VmConfig,
    image_len: u64,
) -> Result<FwCfg, FirmwareError> {
    let mut fw = FwCfg::new(dma);
    let cpus = u16::from(config.cpus.boot);
    let items = [
        (key::RAM_SIZE, config.memory.size.to_le_bytes().to_vec()),
        (key::NB_CPUS, cpus.to_le_bytes().to_vec()),
        (key::MAX_CPUS, cpus.to_le_bytes().to_vec()),
        // ISA IRQ 0 reaches I/O APIC pin 0 (KVM's default routing), not pin 2.
        (key::IRQ0_OVERRIDE, 0u32.to_le_bytes().to_vec()),
    ];
    for (k, v) in items {
        fw.set_item(k, v)?;
    }
    let files = [
        (
            "etc/e820",
            fw_cfg::e820_table(&e820(config.memory.size, image_len)),
        ),
        ("etc/boot-cpus", cpus.to_le_bytes().to_vec()),
        ("etc/sercon-port", SERCON_PORT.to_le_bytes().to_vec()),
        (
            "etc/boot-fail-wait",
            BOOT_FAIL_WAIT_FOREVER.to_le_bytes().to_vec(),
        ),
    ];
    for (name, data) in files {
        fw.add_file(name, data)?;
    }
    Ok(fw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn temp(name: &str, len: usize) -> PathBuf {
        let p = std::env::temp_dir().join(format!("manifold-fw-{}-{name}", std::process::id()));
        std::fs::write(&p, vec![0x90; len]).expect("write image");
        p
    }

    #[test]
    fn image_sizes() {
        for (name, len, ok) in [
            ("128k", 128 << 10, true),
            ("64k", 64 << 10, true),
            ("16m", 16 << 20, true),
            ("empty", 0, false),
            ("odd", (128 << 10) + 1, false),
            ("4k", 4 << 10, false),
            ("too-big", (16 << 20) + (64 << 10), false),
        ] {
            let p = temp(name, len);
            let r = read_image(&p);
            std::fs::remove_file(&p).expect("remove");
            match r {
                Ok(image) => assert!(ok && image.len() == len, "{name}"),
                Err(e) => {
                    assert!(!ok, "{name}: {e}");
                    assert!(matches!(e, FirmwareError::Size(_, l) if l == len as u64));
                    assert!(e.is_bad_input());
                }
            }
        }
        let missing = read_image(Path::new("/nonexistent/bios.bin")).expect_err("missing");
        assert!(matches!(missing, FirmwareError::Read(..)) && missing.is_bad_input());
    }

    #[test]
    fn e820_map() {
        let m = e820(5 << 30, 256 << 10);
        assert_eq!(
            m,
            vec![
                (0, 3 << 30, E820_RAM),
                (1 << 32, 2 << 30, E820_RAM),
                (0xfeff_c000, 0x4000, E820_RESERVED),
                (0xfffc_0000, 0x4_0000, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn items_seabios_reads() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let mut config = api::VmConfig::default();
        config.cpus.boot = 3;
        let fw = fw_cfg(DmaSpace::identity(mem), &config, 128 << 10).expect("fw_cfg");
        assert_eq!(fw.file("etc/boot-cpus"), Some(&[3u8, 0][..]));
        assert_eq!(fw.file("etc/sercon-port"), Some(&[0xf8u8, 0x03][..]));
        assert_eq!(fw.file("etc/boot-fail-wait"), Some(&[0xffu8; 4][..]));
        let e820 = fw.file("etc/e820").expect("e820");
        assert_eq!(e820.len(), 3 * 20);
        assert_eq!(e820[8..16], (512u64 << 20).to_le_bytes());
    }
}
