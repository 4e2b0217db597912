//! The data model shared by the command line, the config file and (later) the REST API and
//! snapshots. Plain data: parsing and validation live here, nothing runs.
//!
//! - [`option`]: the `key=value,key=value` syntax of command-line options.
//! - [`size`]: byte sizes such as `512M`.
//! - [`config`]: config files (TOML or JSON) and command-line overrides.

pub mod config;
pub mod devices;
pub mod disk;
pub mod option;
pub mod size;

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use config::{ConfigError, Overrides};
pub use devices::{ConsoleConfig, MacAddr, NetConfig, RngConfig, VsockConfig};
pub use disk::DiskConfig;
pub use option::{OptionError, OptionList};

use option::Number;
use size::{ByteSize, display_size};

/// Most vCPUs a VM may have: x86 APIC IDs are 8 bits and 0xff is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;
/// Least guest RAM accepted: below this a Linux guest cannot boot.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Most guest RAM accepted.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Guest RAM is mapped in whole pages.
pub const MEMORY_ALIGN: u64 = 4 << 10;

/// Everything needed to build and run one VM.
///
/// Every field has a default so that a config file may give only some of them; the one without a
/// usable default, the kernel or firmware, is checked by [`VmConfig::validate`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub payload: PayloadConfig,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default)]
    pub on_reboot: OnReboot,
    /// virtio-blk disks, in PCI slot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, in PCI slot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// A virtio-rng device, if present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    /// A virtio-console device, unless off.
    #[serde(default, skip_serializing_if = "ConsoleConfig::is_off")]
    pub console: ConsoleConfig,
    /// A virtio-vsock device, if present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// The virtio-console is behind the virtio-iommu (`--console tty,iommu=on`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub console_iommu: bool,
    /// A virtio-iommu in front of the devices that ask for it (`iommu=on`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub iommu: bool,
}

/// What the VM boots: a kernel (with an optional initramfs and command line), or a firmware
/// image. Not both: a firmware boots from a disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// bzImage or ELF (PVH note or 64-bit entry). Empty means not given yet: a config file may
    /// leave it to `--kernel`.
    #[serde(default)]
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// A BIOS image (SeaBIOS `bios.bin`, ...): mapped so that it ends at 4 GiB, entered at the
    /// reset vector in real mode.
    #[serde(default)]
    pub firmware: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs started at boot, 1 to [`MAX_VCPUS`].
    pub boot: u8,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self { boot: 1 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Guest RAM in bytes: [`MIN_MEMORY`] to [`MAX_MEMORY`], a multiple of [`MEMORY_ALIGN`]. A
    /// config file may also write it as a string with a suffix (`"512M"`).
    #[serde(deserialize_with = "size::deserialize")]
    pub size: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self { size: 512 << 20 }
    }
}

/// Where COM1 goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialConfig {
    /// Output to stdout, stdin to the guest (raw mode when stdin is a terminal).
    #[default]
    Tty,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// The UART exists but goes nowhere.
    Off,
}

/// What a guest-requested reset does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReboot {
    /// manifold exits with status 0.
    #[default]
    Exit,
    /// The VM is rebuilt and booted again.
    Restart,
}

/// A config value out of range. [`InvalidConfig::field`] names the config key concerned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidConfig {
    #[error("{0} vCPUs requested: a VM has 1 to {MAX_VCPUS}")]
    Cpus(u64),
    #[error(
        "{} of memory is below the {} needed to boot",
        display_size(*.0),
        display_size(MIN_MEMORY)
    )]
    MemoryTooSmall(u64),
    #[error(
        "{} of memory is above the {} maximum",
        display_size(*.0),
        display_size(MAX_MEMORY)
    )]
    MemoryTooLarge(u64),
    #[error("{} of memory is not a multiple of 4 KiB", display_size(*.0))]
    MemoryUnaligned(u64),
    #[error(
        "No kernel or firmware given: use --kernel PATH or --firmware PATH, or set \
         payload.kernel or payload.firmware in the config file"
    )]
    NoKernel,
    #[error("A kernel and a firmware were both given: boot one or the other")]
    KernelAndFirmware,
    #[error("{0} needs a kernel: a firmware boots without one")]
    NeedsKernel(&'static str),
    #[error("Empty path")]
    EmptyPath(&'static str),
    #[error("The kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("A disk serial is {0} bytes long; at most 20 fit")]
    DiskSerial(usize),
    #[error("Tap name {0:?} is empty, longer than 15 bytes or holds a NUL or a slash")]
    TapName(String),
    #[error("Guest CID {0} is reserved or out of range (3 to 4294967294)")]
    VsockCid(u64),
    #[error("A socket path is {0} bytes long; at most 107 fit")]
    SocketPathTooLong(usize),
    #[error("iommu=on needs the virtio-iommu: add --iommu (or iommu = true)")]
    NoIommu(&'static str),
    #[error("{1} VFs asked for: an SR-IOV PF has 0 to {MAX_VFS}")]
    Vfs(&'static str, u64),
}

/// The most VFs a PF may have (`vfs=`): its TotalVFs. VF i is at the PF's routing id + 1 + i
/// (First VF Offset 1, VF Stride 1), and with ARI a bus holds function numbers 0..=255.
pub const MAX_VFS: u16 = 255;

impl InvalidConfig {
    /// The config key at fault, as written in a config file.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Cpus(_) => "cpus.boot",
            Self::MemoryTooSmall(_) | Self::MemoryTooLarge(_) | Self::MemoryUnaligned(_) => {
                "memory.size"
            }
            Self::NoKernel => "payload.kernel",
            Self::KernelAndFirmware => "payload.firmware",
            Self::NeedsKernel(field) => field,
            Self::EmptyPath(field) => field,
            Self::CmdlineNul => "payload.cmdline",
            Self::DiskSerial(_) => "disks.serial",
            Self::TapName(_) => "nets.tap",
            Self::VsockCid(_) => "vsock.cid",
            Self::SocketPathTooLong(_) => "vsock.socket",
            Self::NoIommu(field) => field,
            Self::Vfs(field, _) => field,
        }
    }
}

impl VmConfig {
    /// Checks every value, and that a kernel or a firmware (not both) was given.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        self.validate_values()?;
        let payload = &self.payload;
        let kernel = !payload.kernel.as_os_str().is_empty();
        match (kernel, payload.firmware.is_some()) {
            (false, false) => Err(InvalidConfig::NoKernel),
            (true, true) => Err(InvalidConfig::KernelAndFirmware),
            (false, true) if payload.initramfs.is_some() => {
                Err(InvalidConfig::NeedsKernel("payload.initramfs"))
            }
            (false, true) if payload.cmdline.is_some() => {
                Err(InvalidConfig::NeedsKernel("payload.cmdline"))
            }
            _ => Ok(()),
        }
    }

    /// Checks every value, but allows the kernel to be missing (a config file may leave it to the
    /// command line).
    pub fn validate_values(&self) -> Result<(), InvalidConfig> {
        self.cpus.validate()?;
        self.memory.validate()?;
        if self
            .payload
            .initramfs
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(InvalidConfig::EmptyPath("payload.initramfs"));
        }
        if self
            .payload
            .firmware
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(InvalidConfig::EmptyPath("payload.firmware"));
        }
        if self
            .payload
            .cmdline
            .as_ref()
            .is_some_and(|c| c.contains('\0'))
        {
            return Err(InvalidConfig::CmdlineNul);
        }
        if matches!(&self.serial, SerialConfig::File(p) if p.as_os_str().is_empty()) {
            return Err(InvalidConfig::EmptyPath("serial.file"));
        }
        for disk in &self.disks {
            disk.validate()?;
        }
        for net in &self.nets {
            net.validate()?;
        }
        if let Some(rng) = &self.rng {
            rng.validate()?;
        }
        self.console.validate()?;
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        // Refused rather than creating the IOMMU implicitly: a device behind an IOMMU changes
        // what the guest must do (map before DMA), so the user says so once.
        if !self.iommu {
            let behind = [
                ("disks.iommu", self.disks.iter().any(|d| d.iommu)),
                ("nets.iommu", self.nets.iter().any(|n| n.iommu)),
                ("rng.iommu", self.rng.as_ref().is_some_and(|r| r.iommu)),
                ("vsock.iommu", self.vsock.as_ref().is_some_and(|v| v.iommu)),
                ("console_iommu", self.console_iommu),
            ];
            if let Some((field, _)) = behind.iter().find(|(_, on)| *on) {
                return Err(InvalidConfig::NoIommu(field));
            }
        }
        Ok(())
    }
}

impl CpusConfig {
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if (1..=MAX_VCPUS).contains(&self.boot) {
            Ok(())
        } else {
            Err(InvalidConfig::Cpus(u64::from(self.boot)))
        }
    }
}

impl MemoryConfig {
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let size = self.size;
        if size < MIN_MEMORY {
            Err(InvalidConfig::MemoryTooSmall(size))
        } else if size > MAX_MEMORY {
            Err(InvalidConfig::MemoryTooLarge(size))
        } else if size % MEMORY_ALIGN != 0 {
            Err(InvalidConfig::MemoryUnaligned(size))
        } else {
            Ok(())
        }
    }
}

/// `--cpus boot=N`.
impl FromStr for CpusConfig {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let opts = OptionList::parse("--cpus", s, &["boot"])?;
        let mut cpus = Self::default();
        if let (Some(raw), Some(Number(n))) = (opts.raw("boot")?, opts.get("boot")?) {
            // Range-check before narrowing so that 300 is "out of range", not "not a u8".
            cpus.boot = u8::try_from(n)
                .ok()
                .filter(|b| (1..=MAX_VCPUS).contains(b))
                .ok_or_else(|| opts.invalid("boot", raw, InvalidConfig::Cpus(n)))?;
        }
        Ok(cpus)
    }
}

/// `--memory size=SIZE`.
impl FromStr for MemoryConfig {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let opts = OptionList::parse("--memory", s, &["size"])?;
        let mut memory = Self::default();
        if let (Some(raw), Some(ByteSize(size))) = (opts.raw("size")?, opts.get("size")?) {
            memory.size = size;
            memory
                .validate()
                .map_err(|e| opts.invalid("size", raw, e))?;
        }
        Ok(memory)
    }
}

/// `--serial tty|file=PATH|off` (`null` is taken as `off`: the UART exists, output is dropped).
impl FromStr for SerialConfig {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const OPTION: &str = "--serial";
        // The keys are alternatives: name the syntax rather than list keys.
        let one_of = || OptionError::OneOf {
            option: OPTION,
            expected: "tty, off or file=PATH",
            input: s.to_owned(),
        };
        let opts =
            OptionList::parse(OPTION, s, &["tty", "off", "null", "file"]).map_err(|e| match e {
                OptionError::UnknownKey { .. } => one_of(),
                e => e,
            })?;
        if opts.len() != 1 {
            return Err(one_of());
        }
        if opts.flag("tty")? {
            Ok(Self::Tty)
        } else if opts.flag("off")? || opts.flag("null")? {
            Ok(Self::Off)
        } else {
            let path: PathBuf = opts.required("file")?;
            if path.as_os_str().is_empty() {
                return Err(opts.invalid("file", "", InvalidConfig::EmptyPath("serial.file")));
            }
            Ok(Self::File(path))
        }
    }
}

/// `--on-reboot exit|restart`.
impl FromStr for OnReboot {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exit" => Ok(Self::Exit),
            "restart" => Ok(Self::Restart),
            _ => Err(OptionError::OneOf {
                option: "--on-reboot",
                expected: "exit or restart",
                input: s.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_option() {
        assert_eq!("boot=1".parse(), Ok(CpusConfig { boot: 1 }));
        assert_eq!("boot=254".parse(), Ok(CpusConfig { boot: 254 }));
        for bad in [
            "boot=0",
            "boot=255",
            "boot=300",
            "boot=99999999999999999999",
        ] {
            let err = bad.parse::<CpusConfig>().expect_err(bad);
            assert!(
                err.to_string().starts_with("--cpus: Invalid boot="),
                "{err}"
            );
        }
        assert_eq!(
            "boot=0".parse::<CpusConfig>().expect_err("0").to_string(),
            "--cpus: Invalid boot=0: 0 vCPUs requested: a VM has 1 to 254"
        );
        assert_eq!(
            "boot=two"
                .parse::<CpusConfig>()
                .expect_err("nan")
                .to_string(),
            "--cpus: Invalid boot=two: Expected a whole number"
        );
        assert_eq!(
            "boot=2,max=4"
                .parse::<CpusConfig>()
                .expect_err("max")
                .to_string(),
            "--cpus: Unknown key `max` (expected boot)"
        );
        assert!(matches!(
            "2".parse::<CpusConfig>(),
            Err(OptionError::UnknownKey { .. })
        ));
        assert!(matches!(
            "boot".parse::<CpusConfig>(),
            Err(OptionError::MissingValue { .. })
        ));
    }

    #[test]
    fn memory_option() {
        assert_eq!("size=512M".parse(), Ok(MemoryConfig { size: 512 << 20 }));
        assert_eq!("size=16M".parse(), Ok(MemoryConfig { size: 16 << 20 }));
        assert_eq!("size=1024G".parse(), Ok(MemoryConfig { size: 1 << 40 }));
        assert_eq!("size=16777216".parse(), Ok(MemoryConfig { size: 16 << 20 }));
        let msg = |s: &str| s.parse::<MemoryConfig>().expect_err(s).to_string();
        assert_eq!(
            msg("size=1K"),
            "--memory: Invalid size=1K: 1 KiB of memory is below the 16 MiB needed to boot"
        );
        assert_eq!(
            msg("size=1025G"),
            "--memory: Invalid size=1025G: 1025 GiB of memory is above the 1 TiB maximum"
        );
        assert_eq!(
            msg("size=16777217"),
            "--memory: Invalid size=16777217: 16777217 bytes of memory is not a multiple of 4 KiB"
        );
        assert_eq!(
            msg("size=12Q"),
            "--memory: Invalid size=12Q: Unknown size suffix `Q` (expected K, M or G, or a plain \
             number of bytes)"
        );
        assert_eq!(
            msg("size=99999999999G"),
            "--memory: Invalid size=99999999999G: Size does not fit in 64 bits"
        );
        assert_eq!(
            msg("size=1G,shared=on"),
            "--memory: Unknown key `shared` (expected size)"
        );
    }

    #[test]
    fn serial_option() {
        assert_eq!("tty".parse(), Ok(SerialConfig::Tty));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!("null".parse(), Ok(SerialConfig::Off));
        assert_eq!(
            "file=/tmp/a,b".parse::<SerialConfig>().expect_err("comma"),
            OptionError::OneOf {
                option: "--serial",
                expected: "tty, off or file=PATH",
                input: "file=/tmp/a,b".into(),
            }
        );
        assert_eq!(
            "file=\"/tmp/a,b\"".parse(),
            Ok(SerialConfig::File("/tmp/a,b".into()))
        );
        assert_eq!(
            "file=/tmp/console.log".parse(),
            Ok(SerialConfig::File("/tmp/console.log".into()))
        );
        let msg = |s: &str| s.parse::<SerialConfig>().expect_err(s).to_string();
        assert_eq!(
            msg("bogus"),
            "--serial: Expected one of tty, off or file=PATH, got `bogus`"
        );
        assert_eq!(
            msg("tty,off"),
            "--serial: Expected one of tty, off or file=PATH, got `tty,off`"
        );
        assert_eq!(msg("file"), "--serial: `file` needs a value (file=...)");
        assert_eq!(msg("tty=1"), "--serial: `tty` takes no value");
        assert_eq!(msg("file="), "--serial: Invalid file=: Empty path");
        assert_eq!(msg(""), "--serial: Empty value");
    }

    #[test]
    fn on_reboot_option() {
        assert_eq!("exit".parse(), Ok(OnReboot::Exit));
        assert_eq!("restart".parse(), Ok(OnReboot::Restart));
        assert_eq!(
            "reboot".parse::<OnReboot>().expect_err("bad").to_string(),
            "--on-reboot: Expected one of exit or restart, got `reboot`"
        );
    }

    #[test]
    fn validation() {
        let mut config = VmConfig::default();
        assert_eq!(config.validate_values(), Ok(()));
        assert_eq!(config.validate(), Err(InvalidConfig::NoKernel));
        config.payload.kernel = "/vmlinux".into();
        assert_eq!(config.validate(), Ok(()));

        let mut bad = config.clone();
        bad.cpus.boot = 0;
        assert_eq!(bad.validate().map_err(|e| e.field()), Err("cpus.boot"));
        bad.cpus.boot = 255;
        assert_eq!(bad.validate(), Err(InvalidConfig::Cpus(255)));

        let mut bad = config.clone();
        bad.memory.size = (1 << 40) + 4096;
        assert_eq!(bad.validate().map_err(|e| e.field()), Err("memory.size"));

        let mut bad = config.clone();
        bad.payload.initramfs = Some(PathBuf::new());
        assert_eq!(
            bad.validate().map_err(|e| e.field()),
            Err("payload.initramfs")
        );

        let mut bad = config.clone();
        bad.payload.cmdline = Some("a\0b".into());
        assert_eq!(bad.validate(), Err(InvalidConfig::CmdlineNul));

        let mut bad = config.clone();
        bad.serial = SerialConfig::File(PathBuf::new());
        assert_eq!(bad.validate().map_err(|e| e.field()), Err("serial.file"));

        // A firmware instead of a kernel, alone.
        let mut bad = config;
        bad.payload.firmware = Some("/bios.bin".into());
        assert_eq!(bad.validate(), Err(InvalidConfig::KernelAndFirmware));
        bad.payload.kernel = PathBuf::new();
        assert_eq!(bad.validate(), Ok(()));
        bad.payload.cmdline = Some("quiet".into());
        assert_eq!(
            bad.validate().map_err(|e| e.field()),
            Err("payload.cmdline")
        );
        bad.payload.initramfs = Some("/initrd".into());
        assert_eq!(
            bad.validate(),
            Err(InvalidConfig::NeedsKernel("payload.initramfs"))
        );
        bad.payload.firmware = Some(PathBuf::new());
        assert_eq!(
            bad.validate_values().map_err(|e| e.field()),
            Err("payload.firmware")
        );
    }
}
