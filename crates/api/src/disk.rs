//! `--disk path=IMG[,readonly=on][,direct=on][,serial=ID][,iommu=on]`: a virtio-blk disk on a raw
//! image.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::option::Toggle;
use crate::{InvalidConfig, OptionError, OptionList};

/// Longest serial (the virtio-blk GET_ID string is 20 bytes).
pub const DISK_SERIAL_MAX: usize = 20;

/// One virtio-blk disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A raw image file (or host block device).
    pub path: PathBuf,
    /// The guest may not write: the image is opened read-only and writes fail with IOERR.
    #[serde(default)]
    pub readonly: bool,
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default)]
    pub direct: bool,
    /// What the guest reads with GET_ID; by default derived from the image's inode.
    #[serde(default)]
    pub serial: Option<String>,
    /// Behind the virtio-iommu (`--iommu`): every DMA is translated through the guest's mappings.
    #[serde(default)]
    pub iommu: bool,
    /// SR-IOV: the disk is a PF behind a root port offering this many VFs, each a virtio-blk
    /// disk of its own on an equal part of the image (0: a plain disk).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vfs: u16,
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

impl DiskConfig {
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.path.as_os_str().is_empty() {
            return Err(InvalidConfig::EmptyPath("disks.path"));
        }
        if let Some(serial) = &self.serial {
            if serial.len() > DISK_SERIAL_MAX {
                return Err(InvalidConfig::DiskSerial(serial.len()));
            }
        }
        if self.vfs > crate::MAX_VFS {
            return Err(InvalidConfig::Vfs("disks.vfs", self.vfs.into()));
        }
        Ok(())
    }
}

impl FromStr for DiskConfig {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let opts = OptionList::parse(
            "--disk",
            s,
            &["path", "readonly", "direct", "serial", "iommu", "vfs"],
        )?;
        let path: PathBuf = opts.required("path")?;
        if path.as_os_str().is_empty() {
            return Err(opts.invalid("path", "", InvalidConfig::EmptyPath("disks.path")));
        }
        let disk = Self {
            path,
            readonly: opts.get::<Toggle>("readonly")?.unwrap_or_default().0,
            direct: opts.get::<Toggle>("direct")?.unwrap_or_default().0,
            serial: opts.raw("serial")?.map(str::to_owned),
            iommu: opts.get::<Toggle>("iommu")?.unwrap_or_default().0,
            vfs: 0,
        };
        if let Some(serial) = &disk.serial {
            disk.validate()
                .map_err(|e| opts.invalid("serial", serial, e))?;
        }
        let mut disk = disk;
        if let Some(raw) = opts.raw("vfs")? {
            let n: u64 = opts.get::<u64>("vfs")?.unwrap_or(0);
            disk.vfs = u16::try_from(n)
                .ok()
                .filter(|&n| n <= crate::MAX_VFS)
                .ok_or_else(|| opts.invalid("vfs", raw, InvalidConfig::Vfs("disks.vfs", n)))?;
        }
        Ok(disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_disk() {
        let d: DiskConfig = "path=/img".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img".into(),
                ..Default::default()
            }
        );
        let d: DiskConfig = "path=\"/a,b.img\",readonly=on,direct=true,serial=disk-1"
            .parse()
            .unwrap();
        assert_eq!(d.path, PathBuf::from("/a,b.img"));
        assert!(d.readonly && d.direct);
        assert_eq!(d.serial.as_deref(), Some("disk-1"));
        let d: DiskConfig = "readonly=off,path=/x".parse().unwrap();
        assert!(!d.readonly);
        let d: DiskConfig = "path=/x,iommu=on".parse().unwrap();
        assert!(d.iommu);
        let d: DiskConfig = "path=/x,vfs=255".parse().unwrap();
        assert_eq!(d.vfs, 255);
        for bad in ["path=/x,vfs=256", "path=/x,vfs=-1", "path=/x,vfs=many"] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
        let err = "path=/x,vfs=300"
            .parse::<DiskConfig>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("0 to 255"), "{err}");
    }

    #[test]
    fn bad_disks() {
        let err = |s: &str| s.parse::<DiskConfig>().unwrap_err().to_string();
        assert_eq!(err(""), "--disk: Empty value");
        assert_eq!(err("readonly=on"), "--disk: `path` is required (path=...)");
        assert!(err("path=/x,readonly=maybe").contains("Invalid readonly=maybe"));
        assert!(err("path=/x,ro=on").contains("Unknown key `ro`"));
        assert!(err("path=/x,iommu=yes").contains("Invalid iommu=yes"));
        assert!(err("path=").contains("Invalid path="));
        assert!(err("path=/x,serial=123456789012345678901").contains("21 bytes"));
        assert!(err("path=/x,path=/y").contains("given twice"));
        assert!(
            "path=/x,serial=12345678901234567890"
                .parse::<DiskConfig>()
                .is_ok()
        );
    }
}
