//! Config files and the command-line flags that override them.
//!
//! A config file holds a [`VmConfig`] with the same keys as its serde model, as TOML, or as JSON
//! when its name ends in `.json`. Unknown keys are refused. Every key may be left out; the kernel
//! (or firmware) must then come from `--kernel` (or `--firmware`). Relative paths are taken from
//! the current directory.
//!
//! ```toml
//! serial = "tty"              # or "off", or { file = "/tmp/console.log" }
//! console = "off"             # virtio-console (hvc0): "off", "tty" or { file = "PATH" }
//! on_reboot = "exit"          # or "restart"
//! iommu = true                # a virtio-iommu (--iommu); devices opt in with iommu = true
//! console_iommu = true        # the virtio-console behind it (--console tty,iommu=on)
//!
//! [payload]
//! kernel = "/boot/vmlinux"
//! initramfs = "/boot/initrd.img"
//! cmdline = "console=ttyS0 reboot=k panic=1"
//! # or, instead of the three above: firmware = "/usr/share/seabios/bios.bin"
//!
//! [cpus]
//! boot = 2
//!
//! [memory]
//! size = "1G"                 # or a number of bytes: 1073741824
//!
//! [[disks]]                   # repeatable: one virtio-blk device each
//! path = "/var/disk.img"
//! readonly = true             # direct = true, serial = "ID", iommu = true, vfs = 4 also
//!
//! [[nets]]                    # repeatable: one virtio-net device each
//! tap = "tap0"
//! mac = "52:54:00:12:34:56"   # optional
//!
//! [rng]                       # virtio-rng; src = "/dev/urandom" to read a file instead
//!
//! [vsock]
//! cid = 3
//! socket = "/run/vm.vsock"
//! ```

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::{
    ConsoleConfig, CpusConfig, DiskConfig, InvalidConfig, MemoryConfig, NetConfig, OnReboot,
    RngConfig, SerialConfig, VmConfig, VsockConfig,
};

/// Larger than any sensible config file; stops `--config /dev/zero` from eating memory.
const MAX_FILE_SIZE: u64 = 1 << 20;

/// Why a config could not be loaded or built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Config file {} is larger than 1 MiB", path.display())]
    TooLarge { path: PathBuf },
    #[error("Invalid config file {}: line {line}, column {column}: {message}", path.display())]
    Toml {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("Invalid config file {}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("Invalid config file {}: {}", path.display(), source.field())]
    Value {
        path: PathBuf,
        #[source]
        source: InvalidConfig,
    },
    #[error(transparent)]
    Invalid(#[from] InvalidConfig),
}

/// Settings given on the command line. Each one that is set replaces the config file's value
/// for that field, and only that field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub firmware: Option<PathBuf>,
    pub cpus: Option<CpusConfig>,
    pub memory: Option<MemoryConfig>,
    pub serial: Option<SerialConfig>,
    pub on_reboot: Option<OnReboot>,
    /// Replace the file's disks (if any flag gave one).
    pub disks: Option<Vec<DiskConfig>>,
    /// Replace the file's NICs (if any flag gave one).
    pub nets: Option<Vec<NetConfig>>,
    pub rng: Option<RngConfig>,
    pub console: Option<ConsoleConfig>,
    pub vsock: Option<VsockConfig>,
    /// `iommu=` of `--console`.
    pub console_iommu: Option<bool>,
    /// `--iommu`: create the virtio-iommu.
    pub iommu: Option<bool>,
}

impl VmConfig {
    /// Replaces every field that `overrides` sets.
    pub fn apply(&mut self, overrides: Overrides) {
        let Overrides {
            kernel,
            initramfs,
            cmdline,
            firmware,
            cpus,
            memory,
            serial,
            on_reboot,
            disks,
            nets,
            rng,
            console,
            vsock,
            console_iommu,
            iommu,
        } = overrides;
        if let Some(kernel) = kernel {
            self.payload.kernel = kernel;
        }
        if initramfs.is_some() {
            self.payload.initramfs = initramfs;
        }
        if cmdline.is_some() {
            self.payload.cmdline = cmdline;
        }
        if firmware.is_some() {
            self.payload.firmware = firmware;
        }
        if let Some(cpus) = cpus {
            self.cpus = cpus;
        }
        if let Some(memory) = memory {
            self.memory = memory;
        }
        if let Some(serial) = serial {
            self.serial = serial;
        }
        if let Some(on_reboot) = on_reboot {
            self.on_reboot = on_reboot;
        }
        if let Some(disks) = disks {
            self.disks = disks;
        }
        if let Some(nets) = nets {
            self.nets = nets;
        }
        if rng.is_some() {
            self.rng = rng;
        }
        if let Some(console) = console {
            self.console = console;
        }
        if vsock.is_some() {
            self.vsock = vsock;
        }
        if let Some(console_iommu) = console_iommu {
            self.console_iommu = console_iommu;
        }
        if let Some(iommu) = iommu {
            self.iommu = iommu;
        }
    }
}

/// The VM config from an optional config file overridden by command-line settings, checked.
pub fn build(file: Option<&Path>, overrides: Overrides) -> Result<VmConfig, ConfigError> {
    let mut config = match file {
        Some(path) => load(path)?,
        None => VmConfig::default(),
    };
    config.apply(overrides);
    config.validate()?;
    Ok(config)
}

/// Reads and parses the config file at `path` (see [`parse`]).
pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    File::open(path)
        .and_then(|f| f.take(MAX_FILE_SIZE + 1).read_to_string(&mut text))
        .map_err(read_err)?;
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
        });
    }
    parse(path, &text)
}

/// Parses `text` as JSON if `path` ends in `.json`, as TOML otherwise, and checks its values. The
/// kernel may be missing: the command line can give it.
pub fn parse(path: &Path, text: &str) -> Result<VmConfig, ConfigError> {
    let is_json = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
    let config: VmConfig = if is_json {
        serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: path.to_owned(),
            source,
        })?
    } else {
        toml::from_str(text).map_err(|e| {
            // toml's own Display draws the offending line over several lines; keep it to one.
            let (line, column) = e
                .span()
                .map_or((0, 0), |span| line_column(text, span.start));
            ConfigError::Toml {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim_end().replace('\n', " "),
            }
        })?
    };
    config
        .validate_values()
        .map_err(|source| ConfigError::Value {
            path: path.to_owned(),
            source,
        })?;
    Ok(config)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
serial = { file = "/tmp/console.log" }
console = { file = "/tmp/hvc0.log" }
on_reboot = "restart"

[payload]
kernel = "/boot/vmlinux"
initramfs = "/boot/initrd.img"
cmdline = "console=ttyS0"

[cpus]
boot = 4

[memory]
size = "1G"

[[disks]]
path = "/var/disk.img"
readonly = true
serial = "d0"

[[nets]]
tap = "tap0"
mac = "52:54:00:12:34:56"

[[nets]]
tap = "tap1"

[rng]

[vsock]
cid = 42
socket = "/run/vm.vsock"
"#;

    fn full() -> VmConfig {
        VmConfig {
            payload: crate::PayloadConfig {
                kernel: "/boot/vmlinux".into(),
                initramfs: Some("/boot/initrd.img".into()),
                cmdline: Some("console=ttyS0".into()),
                firmware: None,
            },
            cpus: CpusConfig { boot: 4 },
            memory: MemoryConfig { size: 1 << 30 },
            serial: SerialConfig::File("/tmp/console.log".into()),
            on_reboot: OnReboot::Restart,
            disks: vec![DiskConfig {
                path: "/var/disk.img".into(),
                readonly: true,
                direct: false,
                serial: Some("d0".into()),
                iommu: false,
                vfs: 0,
            }],
            nets: vec![
                NetConfig {
                    tap: "tap0".into(),
                    mac: Some(crate::MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])),
                    iommu: false,
                    vfs: 0,
                },
                NetConfig {
                    tap: "tap1".into(),
                    mac: None,
                    iommu: false,
                    vfs: 0,
                },
            ],
            rng: Some(RngConfig::default()),
            console: ConsoleConfig::File("/tmp/hvc0.log".into()),
            vsock: Some(VsockConfig {
                cid: 42,
                socket: "/run/vm.vsock".into(),
                iommu: false,
            }),
            console_iommu: false,
            iommu: false,
        }
    }

    fn toml(text: &str) -> Result<VmConfig, ConfigError> {
        parse(Path::new("vm.toml"), text)
    }

    fn json(text: &str) -> Result<VmConfig, ConfigError> {
        parse(Path::new("vm.json"), text)
    }

    #[test]
    fn toml_full() {
        assert_eq!(toml(TOML).expect("valid"), full());
    }

    #[test]
    fn json_full_and_round_trip() {
        let text = serde_json::to_string(&full()).expect("serializes");
        assert_eq!(json(&text).expect("valid"), full());
        let text = r#"{"payload": {"kernel": "/k"}, "memory": {"size": 67108864},
                       "serial": "off", "cpus": {"boot": 2}}"#;
        let config = json(text).expect("valid");
        assert_eq!(config.memory.size, 64 << 20);
        assert_eq!(config.serial, SerialConfig::Off);
        assert_eq!(config.cpus.boot, 2);
        // Extension case does not matter.
        assert!(parse(Path::new("VM.JSON"), text).is_ok());
    }

    #[test]
    fn toml_round_trip() {
        let text = toml::to_string(&full()).expect("serializes");
        assert_eq!(toml(&text).expect("valid"), full());
    }

    #[test]
    fn everything_optional() {
        assert_eq!(toml("").expect("empty is valid"), VmConfig::default());
        assert_eq!(json("{}").expect("empty is valid"), VmConfig::default());
        let config = toml("[cpus]\nboot = 2\n").expect("valid");
        assert_eq!(config.cpus.boot, 2);
        assert_eq!(config.payload.kernel, PathBuf::new());
    }

    #[test]
    fn toml_unknown_keys() {
        let err = toml("kernel = \"/k\"\n").expect_err("top-level kernel");
        assert!(
            err.to_string().starts_with(
                "Invalid config file vm.toml: line 1, column 1: unknown field `kernel`"
            ),
            "{err}"
        );
        let err = toml("[payload]\nkernel = \"/k\"\nimage = \"/i\"\n").expect_err("nested");
        let msg = err.to_string();
        assert!(
            msg.contains("line 3, column 1: unknown field `image`"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        let err = toml("[cpus]\nboot = 1\nmax = 2\n").expect_err("cpus.max");
        assert!(err.to_string().contains("unknown field `max`"), "{err}");
        let err = toml("serial = \"pty\"\n").expect_err("variant");
        assert!(err.to_string().contains("unknown variant `pty`"), "{err}");
    }

    #[test]
    fn json_unknown_keys() {
        let err = json(r#"{"payload": {"kernel": "/k", "image": "/i"}}"#).expect_err("nested");
        let ConfigError::Json { source, .. } = &err else {
            panic!("wrong error {err:?}");
        };
        assert!(
            source.to_string().contains("unknown field `image`"),
            "{source}"
        );
        assert!(json(r#"{"vcpus": 1}"#).is_err());
    }

    #[test]
    fn malformed() {
        assert!(matches!(
            toml("[payload\n"),
            Err(ConfigError::Toml { line: 1, .. })
        ));
        assert!(matches!(json("{"), Err(ConfigError::Json { .. })));
        // TOML written to a .json file is refused as JSON.
        assert!(matches!(json(TOML), Err(ConfigError::Json { .. })));
    }

    #[test]
    fn values_checked() {
        let err = toml("[cpus]\nboot = 0\n").expect_err("0 vCPUs");
        assert_eq!(err.to_string(), "Invalid config file vm.toml: cpus.boot");
        assert!(matches!(
            err,
            ConfigError::Value {
                source: InvalidConfig::Cpus(0),
                ..
            }
        ));
        let err = toml("[cpus]\nboot = 300\n").expect_err("300 vCPUs");
        assert!(matches!(err, ConfigError::Toml { line: 2, .. }), "{err}");
        let err = toml("[memory]\nsize = \"12Q\"\n").expect_err("bad suffix");
        assert!(err.to_string().contains("Unknown size suffix `Q`"), "{err}");
        let err = toml("[memory]\nsize = -1\n").expect_err("negative");
        assert!(matches!(err, ConfigError::Toml { .. }), "{err}");
        let err = toml("[memory]\nsize = 1024\n").expect_err("too small");
        assert!(matches!(
            err,
            ConfigError::Value {
                source: InvalidConfig::MemoryTooSmall(1024),
                ..
            }
        ));
        let err = json(r#"{"memory": {"size": "2048G"}}"#).expect_err("too large");
        assert!(matches!(
            err,
            ConfigError::Value {
                source: InvalidConfig::MemoryTooLarge(_),
                ..
            }
        ));
    }

    #[test]
    fn overrides_replace_field_by_field() {
        let mut config = toml(TOML).expect("valid");
        config.apply(Overrides {
            cpus: Some(CpusConfig { boot: 2 }),
            cmdline: Some("quiet".into()),
            ..Overrides::default()
        });
        let mut expected = full();
        expected.cpus.boot = 2;
        expected.payload.cmdline = Some("quiet".into());
        assert_eq!(config, expected);

        // No overrides: the file wins.
        let mut config = toml(TOML).expect("valid");
        config.apply(Overrides::default());
        assert_eq!(config, full());

        // Every override.
        let mut config = toml(TOML).expect("valid");
        config.apply(Overrides {
            kernel: Some("/k2".into()),
            initramfs: Some("/i2".into()),
            cmdline: Some("c2".into()),
            firmware: Some("/f2".into()),
            cpus: Some(CpusConfig { boot: 8 }),
            memory: Some(MemoryConfig { size: 64 << 20 }),
            serial: Some(SerialConfig::Tty),
            on_reboot: Some(OnReboot::Exit),
            disks: Some(vec![]),
            nets: Some(vec![]),
            rng: Some(RngConfig {
                src: Some("/dev/urandom".into()),
                iommu: false,
            }),
            console: Some(ConsoleConfig::Tty),
            vsock: Some(VsockConfig {
                cid: 3,
                socket: "/v".into(),
                iommu: false,
            }),
            console_iommu: Some(true),
            iommu: Some(true),
        });
        assert!(config.iommu && config.console_iommu);
        assert_eq!(config.payload.kernel, PathBuf::from("/k2"));
        assert_eq!(config.payload.initramfs, Some("/i2".into()));
        assert_eq!(config.payload.cmdline.as_deref(), Some("c2"));
        assert_eq!(config.payload.firmware, Some("/f2".into()));
        assert_eq!(config.cpus.boot, 8);
        assert_eq!(config.memory.size, 64 << 20);
        assert_eq!(config.serial, SerialConfig::Tty);
        assert_eq!(config.on_reboot, OnReboot::Exit);
        assert!(config.disks.is_empty());
        assert!(config.nets.is_empty());
        assert_eq!(config.rng.and_then(|r| r.src), Some("/dev/urandom".into()));
        assert_eq!(config.console, ConsoleConfig::Tty);
        assert_eq!(config.vsock.map(|v| v.cid), Some(3));
    }

    #[test]
    fn device_values_checked() {
        let err = toml("[vsock]\ncid = 2\nsocket = \"/v\"\n").expect_err("cid 2");
        assert_eq!(err.to_string(), "Invalid config file vm.toml: vsock.cid");
        let err = toml("[[nets]]\ntap = \"\"\n").expect_err("empty tap");
        assert_eq!(err.to_string(), "Invalid config file vm.toml: nets.tap");
        let err = toml("[[nets]]\ntap = \"t\"\nmac = \"01:00:00:00:00:00\"\n").expect_err("mac");
        assert!(err.to_string().contains("multicast"), "{err}");
        let err = toml("[rng]\nsource = \"/x\"\n").expect_err("unknown");
        assert!(err.to_string().contains("unknown field `source`"), "{err}");
        let err = toml("console = \"pty\"\n").expect_err("variant");
        assert!(err.to_string().contains("unknown variant `pty`"), "{err}");
    }

    #[test]
    fn build_needs_a_kernel() {
        let err = build(None, Overrides::default()).expect_err("no kernel");
        assert!(matches!(err, ConfigError::Invalid(InvalidConfig::NoKernel)));
        let config = build(
            None,
            Overrides {
                kernel: Some("/k".into()),
                ..Overrides::default()
            },
        )
        .expect("valid");
        assert_eq!(
            config,
            VmConfig {
                payload: crate::PayloadConfig {
                    kernel: "/k".into(),
                    ..Default::default()
                },
                ..Default::default()
            }
        );
    }

    #[test]
    fn build_from_files() {
        let dir = std::env::temp_dir().join(format!("manifold-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("vm.toml");
        std::fs::write(&file, "[cpus]\nboot = 3\n").expect("write");
        // The file lacks a kernel; the command line gives it.
        let config = build(
            Some(&file),
            Overrides {
                kernel: Some("/k".into()),
                ..Overrides::default()
            },
        )
        .expect("valid");
        assert_eq!(config.cpus.boot, 3);
        assert_eq!(config.payload.kernel, PathBuf::from("/k"));
        assert!(matches!(
            build(Some(&file), Overrides::default()),
            Err(ConfigError::Invalid(InvalidConfig::NoKernel))
        ));

        let missing = dir.join("missing.toml");
        let err = load(&missing).expect_err("missing");
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(matches!(load(&dir), Err(ConfigError::Read { .. })));

        let big = dir.join("big.toml");
        std::fs::write(&big, vec![b'#'; (MAX_FILE_SIZE + 1) as usize]).expect("write");
        assert!(matches!(load(&big), Err(ConfigError::TooLarge { .. })));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn line_columns() {
        assert_eq!(line_column("abc", 0), (1, 1));
        assert_eq!(line_column("abc\ndef", 5), (2, 2));
        assert_eq!(line_column("é\nx", 3), (2, 1));
        assert_eq!(line_column("éx", 2), (1, 2));
        assert_eq!(line_column("ab", 99), (1, 3));
    }
}
