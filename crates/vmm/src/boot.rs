//! Loading a kernel (ELF with or without a PVH note, or bzImage), its initramfs and command line,
//! and writing the boot parameters its protocol expects.

mod bzimage;

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{
    self, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::cpu::BootEntry;
use crate::layout::{
    self, CMDLINE, CMDLINE_MAX, EBDA_START, HIMEM_START, PVH_MEMMAP, PVH_MODLIST, ZERO_PAGE,
};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Cannot open kernel {0}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    #[error("Kernel {0} is neither an ELF nor a bzImage: {1}")]
    KernelFormat(PathBuf, loader::Error),
    #[error("Cannot load kernel {0} into guest memory: {1}")]
    LoadKernel(PathBuf, loader::Error),
    #[error("Cannot read kernel {0}")]
    ReadKernel(PathBuf, #[source] std::io::Error),
    #[error("Kernel {0}: {1}")]
    BzImage(PathBuf, bzimage::BzImageError),
    #[error("Kernel {0}: the decompressed payload does not load: {1}")]
    LoadVmlinux(PathBuf, loader::Error),
    #[error("Cannot open initramfs {0}")]
    OpenInitramfs(PathBuf, #[source] std::io::Error),
    #[error("Initramfs {0} ({1} bytes) does not fit in guest memory below {2:#x}")]
    InitramfsTooLarge(PathBuf, u64, u64),
    #[error("Cannot load initramfs {0}")]
    LoadInitramfs(PathBuf, #[source] vm_memory::GuestMemoryError),
    #[error("Invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("Cannot write the kernel command line: {0}")]
    WriteCmdline(loader::Error),
    #[error("Cannot write boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

impl BootError {
    /// Errors caused by what the user gave us rather than by the host.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, BootError::WriteCmdline(_) | BootError::BootParams(_))
    }
}

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Highest address an initramfs may end at when the kernel does not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE: u64 = 0x1000;

/// What the boot vCPU needs from the loaded payload.
#[derive(Debug)]
pub struct LoadedPayload {
    pub entry: BootEntry,
}

/// Guest memory map as (start, size, e820 type).
fn memory_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in layout::ram_ranges(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START {
            size
        } else {
            start + size
        };
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// A kernel in guest memory and how to enter it.
struct LoadedKernel {
    result: KernelLoaderResult,
    /// 64-bit entry point for the Linux boot protocol (unused with a PVH entry).
    entry: u64,
}

fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenKernel(path.into(), e))?;
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut file, himem) {
        Ok(result) => {
            let entry = result.kernel_load.raw_value();
            Ok(LoadedKernel { result, entry })
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            if let Some(kernel) = load_decompressed(mem, path, &mut file)? {
                return Ok(kernel);
            }
            let result = BzImage::load(mem, None, &mut file, himem).map_err(|e| match e {
                loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage) => {
                    BootError::KernelFormat(path.into(), e)
                }
                e => BootError::LoadKernel(path.into(), e),
            })?;
            // The 64-bit entry of a bzImage is 0x200 into its protected-mode code.
            let entry = result.kernel_load.raw_value() + 0x200;
            Ok(LoadedKernel { result, entry })
        }
        Err(e) => Err(BootError::LoadKernel(path.into(), e)),
    }
}

/// A bzImage whose payload we can decompress is loaded as its vmlinux ELF (see
/// [`bzimage`]): `None` if `file` is not a bzImage or its compression is not one we know, so
/// that the caller loads it whole and the guest decompresses it.
///
/// The ELF's segments go to their physical addresses (LOAD_PHYSICAL_ADDR, where the kernel was
/// linked to run), and the kernel is entered at its ELF entry (`startup_64`) with the bzImage's
/// setup header in the zero page: what the bzImage's decompressor does, minus its KASLR. No
/// `nokaslr` is needed for that: the kernel learns it was not randomised from
/// `loadflags.KASLR_FLAG`, which only the decompressor sets. A PVH note in the ELF is ignored so
/// that the boot protocol stays the one the bzImage asks for.
fn load_decompressed(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
) -> Result<Option<LoadedKernel>, BootError> {
    let read_err = |e| BootError::ReadKernel(path.into(), e);
    let mut image = Vec::new();
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    file.read_to_end(&mut image).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if bzimage::header(&image).is_none() {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let decompressed = match bzimage::decompress(&image) {
        Ok(d) => d,
        Err(e @ bzimage::BzImageError::UnknownCompression(_)) => {
            tracing::info!("{e}: the kernel decompresses itself in the guest");
            return Ok(None);
        }
        Err(e) => return Err(BootError::BzImage(path.into(), e)),
    };
    drop(image);
    let himem = Some(GuestAddress(HIMEM_START));
    let mut result = Elf::load(mem, None, &mut Cursor::new(&decompressed.vmlinux), himem)
        .map_err(|e| BootError::LoadVmlinux(path.into(), e))?;
    let entry = result.kernel_load.raw_value();
    tracing::info!(
        compression = %decompressed.compression,
        bytes = decompressed.vmlinux.len(),
        ms = started.elapsed().as_millis() as u64,
        entry = format_args!("{entry:#x}"),
        "bzImage payload decompressed on the host; entering vmlinux directly"
    );
    result.setup_header = Some(decompressed.header);
    result.pvh_boot_cap = PvhBootCapability::PvhEntryNotPresent;
    Ok(Some(LoadedKernel { result, entry }))
}

/// The words of `extra` that `given` does not already have (by parameter name, so that a user's
/// own `clearcpuid=...` is kept as it is).
fn host_words<'a>(given: &str, extra: &'a str) -> Vec<&'a str> {
    let name = |w: &str| w.split('=').next().unwrap_or(w).to_owned();
    let have: Vec<String> = given.split_whitespace().map(name).collect();
    extra
        .split_whitespace()
        .filter(|w| !have.contains(&name(w)))
        .collect()
}

/// Place the initramfs page-aligned at the top of low memory, below `addr_max`.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenInitramfs(path.into(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::OpenInitramfs(path.into(), e))?
        .len();
    let low_end = layout::ram_ranges(mem.last_addr().raw_value() + 1)[0].1;
    let top = low_end.min(addr_max.saturating_add(1));
    let too_large = || BootError::InitramfsTooLarge(path.into(), size, top);
    let start = top.checked_sub(size).ok_or_else(too_large)? & !(PAGE - 1);
    if start < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|e| BootError::LoadInitramfs(path.into(), e))?;
    Ok((start, size))
}

/// Load the payload of `config` into `mem` and write its boot parameters.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    config: &api::PayloadConfig,
) -> Result<LoadedPayload, BootError> {
    let LoadedKernel {
        result: kernel,
        entry,
    } = load_kernel(mem, &config.kernel)?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(BootError::Cmdline)?;
    let given = config.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
    cmdline.insert_str(given).map_err(BootError::Cmdline)?;
    // A bzImage is Linux: on a host that hands instructions back it must keep away from what
    // cannot be completed (see `host`).
    if kernel.setup_header.is_some()
        && let Some(extra) = crate::host::linux_cmdline_additions()
    {
        let missing = host_words(given, extra);
        if !missing.is_empty() {
            cmdline
                .insert_str(missing.join(" "))
                .map_err(BootError::Cmdline)?;
            tracing::info!(
                "this host's KVM hands guest instructions back: added `{}` to the kernel command \
                 line ({}=1 to leave it as given)",
                missing.join(" "),
                crate::host::OPT_OUT_ENV
            );
        }
    }
    loader::load_cmdline(mem, GuestAddress(CMDLINE), &cmdline).map_err(BootError::WriteCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);

    let initrd_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let initramfs = config
        .initramfs
        .as_deref()
        .map(|p| load_initramfs(mem, p, kernel.kernel_end, initrd_max))
        .transpose()?;

    let map = memory_map(mem_size);
    if let PvhBootCapability::PvhEntryPresent(entry) = kernel.pvh_boot_cap {
        write_pvh(mem, &map, initramfs)?;
        return Ok(LoadedPayload {
            entry: BootEntry::Pvh {
                entry: entry.raw_value(),
                start_info: ZERO_PAGE,
            },
        });
    }

    let mut params = boot_params::default();
    match kernel.setup_header {
        // A bzImage (whole or decompressed here): keep its header.
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448;
            params.hdr.kernel_alignment = 0x100_0000;
        }
    }
    // "Undefined" boot loader: the kernel must not assume any particular one.
    params.hdr.type_of_loader = 0xff;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((start, size)) = initramfs {
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = crate::acpi::RSDP_ADDR;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(BootError::BootParams)?;
    Ok(LoadedPayload {
        entry: BootEntry::Linux64 {
            entry,
            zero_page: ZERO_PAGE,
        },
    })
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
    initramfs: Option<(u64, u64)>,
) -> Result<(), BootError> {
    const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
    let memmap: Vec<_> = map
        .iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: crate::acpi::RSDP_ADDR,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(ZERO_PAGE));
    if let Some((paddr, size)) = initramfs {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST;
        params = BootParams::new(&start_info, GuestAddress(ZERO_PAGE));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST),
        );
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_words_skip_what_is_given() {
        let extra = "noxsave clearcpuid=ssse3";
        assert_eq!(
            host_words("console=ttyS0", extra),
            ["noxsave", "clearcpuid=ssse3"]
        );
        assert_eq!(
            host_words("noxsave clearcpuid=cx16", extra),
            Vec::<&str>::new()
        );
        assert_eq!(host_words("quiet noxsave", extra), ["clearcpuid=ssse3"]);
    }

    #[test]
    fn memory_map_shapes() {
        let m = memory_map(128 << 20);
        assert_eq!(
            m,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        let m = memory_map(5 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(m[3], (1 << 32, 2 << 30, E820_RAM));
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (5 << 30) - (HIMEM_START - EBDA_START));
    }
}
