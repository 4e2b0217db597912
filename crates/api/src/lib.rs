//! The data model shared by the command line, the config file and (later) the REST API and
//! snapshots. Plain data: parsing and validation live here, nothing runs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything needed to build and run one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default)]
    pub on_reboot: OnReboot,
}

/// What the VM boots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// bzImage or ELF (PVH note or 64-bit entry).
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs started at boot.
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
    /// Guest RAM in bytes.
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
