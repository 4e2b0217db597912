//! The virtio devices besides disks, with their flags (Cloud Hypervisor's spelling):
//!
//! - `--rng [src=PATH][,iommu=on]`: virtio-rng.
//! - `--console off|tty|file=PATH[,iommu=on]`: virtio-console (`hvc0` in a Linux guest).
//! - `--net tap=NAME[,mac=MAC][,iommu=on][,vfs=N]`: virtio-net on a tap, repeatable; with `vfs=`
//!   an SR-IOV PF whose VFs are ports of an embedded switch with the tap as uplink.
//! - `--vsock cid=N,socket=PATH[,iommu=on]`: virtio-vsock with its host side on a Unix socket.
//!
//! `iommu=on` puts the device behind the virtio-iommu, which `--iommu` creates (without it the
//! configuration is refused).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::option::{Number, Toggle};
use crate::{InvalidConfig, OptionError, OptionList};

/// Longest tap name (`IFNAMSIZ` less the NUL).
pub const TAP_NAME_MAX: usize = 15;
/// Longest Unix socket path (`sun_path` less the NUL).
pub const SOCKET_PATH_MAX: usize = 107;
/// Guest CIDs: 0-2 name the hypervisor, loopback and the host; `u32::MAX` is "any".
pub const MIN_GUEST_CID: u64 = 3;
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// A virtio-rng device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Read random bytes from this file (`/dev/urandom`, ...) instead of the host's `getrandom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<PathBuf>,
    /// Behind the virtio-iommu.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub iommu: bool,
}

impl RngConfig {
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        match &self.src {
            Some(src) if src.as_os_str().is_empty() => Err(InvalidConfig::EmptyPath("rng.src")),
            _ => Ok(()),
        }
    }
}

/// `--rng` alone (an empty value) or `--rng [src=PATH][,iommu=on]`.
impl FromStr for RngConfig {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(Self::default());
        }
        let opts = OptionList::parse("--rng", s, &["src", "iommu"])?;
        let rng = Self {
            src: opts.get("src")?,
            iommu: opts.get::<Toggle>("iommu")?.unwrap_or_default().0,
        };
        rng.validate().map_err(|e| opts.invalid("src", "", e))?;
        Ok(rng)
    }
}

/// Where the virtio-console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleConfig {
    /// No virtio-console device.
    #[default]
    Off,
    /// Output to stdout; stdin goes to this console instead of the UART.
    Tty,
    /// Output appended to a file; no input.
    File(PathBuf),
}

impl ConsoleConfig {
    pub fn is_off(&self) -> bool {
        *self == Self::Off
    }

    pub fn validate(&self) -> Result<(), InvalidConfig> {
        match self {
            Self::File(p) if p.as_os_str().is_empty() => {
                Err(InvalidConfig::EmptyPath("console.file"))
            }
            _ => Ok(()),
        }
    }
}

/// `--console off|tty|file=PATH`.
impl FromStr for ConsoleConfig {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_console(s, false).map(|(console, _)| console)
    }
}

/// `--console off|tty|file=PATH` or `tty,iommu=on` / `file=PATH,iommu=on`: the console and
/// whether it goes behind the virtio-iommu.
pub fn parse_console_flag(s: &str) -> Result<(ConsoleConfig, bool), OptionError> {
    parse_console(s, true)
}

fn parse_console(s: &str, with_iommu: bool) -> Result<(ConsoleConfig, bool), OptionError> {
    const OPTION: &str = "--console";
    let one_of = || OptionError::OneOf {
        option: OPTION,
        expected: "off, tty or file=PATH",
        input: s.to_owned(),
    };
    let keys: &[&str] = if with_iommu {
        &["off", "tty", "file", "iommu"]
    } else {
        &["off", "tty", "file"]
    };
    let opts = OptionList::parse(OPTION, s, keys).map_err(|e| match e {
        OptionError::UnknownKey { .. } => one_of(),
        e => e,
    })?;
    let iommu = opts.get::<Toggle>("iommu")?;
    if opts.len() != 1 + usize::from(iommu.is_some()) {
        return Err(one_of());
    }
    let iommu = iommu.unwrap_or_default().0;
    let console = if opts.flag("off")? {
        // No device to put behind anything.
        if iommu {
            return Err(one_of());
        }
        ConsoleConfig::Off
    } else if opts.flag("tty")? {
        ConsoleConfig::Tty
    } else {
        let console = ConsoleConfig::File(opts.required("file")?);
        console
            .validate()
            .map_err(|e| opts.invalid("file", "", e))?;
        console
    };
    Ok((console, iommu))
}

/// A unicast MAC address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SHAPE: &str = "Expected six hex bytes separated by colons (52:54:00:12:34:56)";
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or(SHAPE)?;
            // from_str_radix alone would take a sign.
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(SHAPE);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| SHAPE)?;
        }
        if parts.next().is_some() {
            return Err(SHAPE);
        }
        // The I/G bit: a NIC's own address cannot be a group address.
        if mac[0] & 1 != 0 {
            return Err("A multicast address cannot be a NIC's address");
        }
        Ok(Self(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl TryFrom<String> for MacAddr {
    type Error = &'static str;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(mac: MacAddr) -> Self {
        mac.to_string()
    }
}

/// One virtio-net device on a tap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap interface: opened if it exists, created if it does not (needs CAP_NET_ADMIN).
    pub tap: String,
    /// The guest's MAC address; without one the guest driver makes one up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Behind the virtio-iommu.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub iommu: bool,
    /// SR-IOV: the NIC is a PF behind a root port offering this many VFs, each a virtio-net
    /// function on a port of an embedded switch whose uplink is the tap (0: a plain NIC).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vfs: u16,
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

impl NetConfig {
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let name = self.tap.as_bytes();
        if name.is_empty() || name.len() > TAP_NAME_MAX || name.contains(&0) || name.contains(&b'/')
        {
            return Err(InvalidConfig::TapName(self.tap.clone()));
        }
        if self.vfs > crate::MAX_VFS {
            return Err(InvalidConfig::Vfs("nets.vfs", self.vfs.into()));
        }
        Ok(())
    }
}

/// `--net tap=NAME[,mac=MAC][,iommu=on][,vfs=N]`.
impl FromStr for NetConfig {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let opts = OptionList::parse("--net", s, &["tap", "mac", "iommu", "vfs"])?;
        let mut net = Self {
            tap: opts.required("tap")?,
            mac: opts.get("mac")?,
            iommu: opts.get::<Toggle>("iommu")?.unwrap_or_default().0,
            vfs: 0,
        };
        net.validate()
            .map_err(|e| opts.invalid("tap", &net.tap, e))?;
        if let Some(raw) = opts.raw("vfs")? {
            let n: u64 = opts.get::<u64>("vfs")?.unwrap_or(0);
            net.vfs = u16::try_from(n)
                .ok()
                .filter(|&n| n <= crate::MAX_VFS)
                .ok_or_else(|| opts.invalid("vfs", raw, InvalidConfig::Vfs("nets.vfs", n)))?;
        }
        Ok(net)
    }
}

/// The virtio-vsock device: the guest's CID and the Unix socket host programs connect to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id, [`MIN_GUEST_CID`] to [`MAX_GUEST_CID`].
    pub cid: u64,
    /// Created by manifold (a stale socket is replaced) and removed when the VM ends.
    pub socket: PathBuf,
    /// Behind the virtio-iommu.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub iommu: bool,
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.cid) {
            return Err(InvalidConfig::VsockCid(self.cid));
        }
        let len = self.socket.as_os_str().len();
        if len == 0 {
            return Err(InvalidConfig::EmptyPath("vsock.socket"));
        }
        if len > SOCKET_PATH_MAX {
            return Err(InvalidConfig::SocketPathTooLong(len));
        }
        Ok(())
    }
}

/// `--vsock cid=N,socket=PATH[,iommu=on]`.
impl FromStr for VsockConfig {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let opts = OptionList::parse("--vsock", s, &["cid", "socket", "iommu"])?;
        let Number(cid) = opts.required("cid")?;
        let vsock = Self {
            cid,
            socket: opts.required("socket")?,
            iommu: opts.get::<Toggle>("iommu")?.unwrap_or_default().0,
        };
        vsock.validate().map_err(|e| match e {
            InvalidConfig::VsockCid(_) => opts.invalid("cid", &cid.to_string(), e),
            e => opts.invalid("socket", &vsock.socket.to_string_lossy(), e),
        })?;
        Ok(vsock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: FromStr<Err = OptionError> + fmt::Debug>(s: &str) -> String {
        s.parse::<T>().expect_err(s).to_string()
    }

    #[test]
    fn rng() {
        assert_eq!("".parse(), Ok(RngConfig::default()));
        assert_eq!(
            "src=/dev/urandom".parse(),
            Ok(RngConfig {
                src: Some("/dev/urandom".into()),
                iommu: false,
            })
        );
        assert_eq!(
            "iommu=on".parse(),
            Ok(RngConfig {
                src: None,
                iommu: true,
            })
        );
        assert!(err::<RngConfig>("iommu=2").contains("Invalid iommu=2"));
        assert_eq!(err::<RngConfig>("src="), "--rng: Invalid src=: Empty path");
        assert_eq!(
            err::<RngConfig>("file=/x"),
            "--rng: Unknown key `file` (expected src, iommu)"
        );
        assert_eq!(
            err::<RngConfig>("src"),
            "--rng: `src` needs a value (src=...)"
        );
    }

    #[test]
    fn console_flag() {
        assert_eq!(parse_console_flag("tty"), Ok((ConsoleConfig::Tty, false)));
        assert_eq!(
            parse_console_flag("tty,iommu=on"),
            Ok((ConsoleConfig::Tty, true))
        );
        assert_eq!(
            parse_console_flag("iommu=on,file=/x"),
            Ok((ConsoleConfig::File("/x".into()), true))
        );
        for bad in [
            "off,iommu=on",
            "iommu=on",
            "tty,iommu=maybe",
            "tty,off,iommu=on",
        ] {
            assert!(parse_console_flag(bad).is_err(), "{bad}");
        }
        // The config-file form has its own key (console_iommu).
        assert!("tty,iommu=on".parse::<ConsoleConfig>().is_err());
    }

    #[test]
    fn console() {
        assert_eq!("off".parse(), Ok(ConsoleConfig::Off));
        assert_eq!("tty".parse(), Ok(ConsoleConfig::Tty));
        assert_eq!(
            "file=/tmp/hvc0.log".parse(),
            Ok(ConsoleConfig::File("/tmp/hvc0.log".into()))
        );
        assert_eq!(
            err::<ConsoleConfig>("pty"),
            "--console: Expected one of off, tty or file=PATH, got `pty`"
        );
        assert_eq!(
            err::<ConsoleConfig>("tty,off"),
            "--console: Expected one of off, tty or file=PATH, got `tty,off`"
        );
        assert_eq!(
            err::<ConsoleConfig>("file="),
            "--console: Invalid file=: Empty path"
        );
        assert_eq!(
            err::<ConsoleConfig>("tty=1"),
            "--console: `tty` takes no value"
        );
        assert_eq!(err::<ConsoleConfig>(""), "--console: Empty value");
    }

    #[test]
    fn macs() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "52:54:00:ab:cd:0g",
            "52-54-00-ab-cd-0f",
            "5:54:00:ab:cd:0f0",
            "+2:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err("A multicast address cannot be a NIC's address")
        );
    }

    #[test]
    fn net() {
        assert_eq!(
            "tap=tap0".parse(),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: None,
                iommu: false,
                vfs: 0,
            })
        );
        let net: NetConfig = "tap=t,vfs=8".parse().unwrap();
        assert_eq!(net.vfs, 8);
        assert_eq!("tap=t,vfs=255".parse::<NetConfig>().unwrap().vfs, 255);
        for bad in [
            "tap=t,vfs=256",
            "tap=t,vfs=-1",
            "tap=t,vfs=many",
            "tap=t,vfs",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
        assert!(err::<NetConfig>("tap=t,vfs=300").contains("0 to 255"));
        let net: NetConfig = "mac=52:54:00:00:00:01,tap=vm-net".parse().unwrap();
        assert_eq!(net.mac, Some(MacAddr([0x52, 0x54, 0, 0, 0, 1])));
        assert_eq!(
            err::<NetConfig>("mac=52:54:00:00:00:01"),
            "--net: `tap` is required (tap=...)"
        );
        assert!(
            err::<NetConfig>("tap=t,mac=zz").starts_with("--net: Invalid mac=zz: Expected six")
        );
        assert_eq!(
            err::<NetConfig>("tap=sixteen-bytes-xx"),
            "--net: Invalid tap=sixteen-bytes-xx: Tap name \"sixteen-bytes-xx\" is empty, longer \
             than 15 bytes or holds a NUL or a slash"
        );
        assert!(err::<NetConfig>("tap=").starts_with("--net: Invalid tap=: Tap name"));
        assert!(err::<NetConfig>("tap=t,ip=1.2.3.4").contains("Unknown key `ip`"));
    }

    #[test]
    fn vsock() {
        assert_eq!(
            "cid=3,socket=/run/v.sock".parse(),
            Ok(VsockConfig {
                cid: 3,
                socket: "/run/v.sock".into(),
                iommu: false,
            })
        );
        assert_eq!(
            err::<VsockConfig>("cid=2,socket=/v"),
            "--vsock: Invalid cid=2: Guest CID 2 is reserved or out of range (3 to 4294967294)"
        );
        assert!(err::<VsockConfig>("cid=4294967295,socket=/v").contains("Invalid cid=4294967295"));
        assert_eq!(
            err::<VsockConfig>("cid=x,socket=/v"),
            "--vsock: Invalid cid=x: Expected a whole number"
        );
        assert_eq!(
            err::<VsockConfig>("cid=3"),
            "--vsock: `socket` is required (socket=...)"
        );
        assert_eq!(
            err::<VsockConfig>("socket=/v"),
            "--vsock: `cid` is required (cid=...)"
        );
        assert_eq!(
            err::<VsockConfig>("cid=3,socket="),
            "--vsock: Invalid socket=: Empty path"
        );
        let long = format!("cid=3,socket=/{}", "a".repeat(107));
        assert!(err::<VsockConfig>(&long).contains("108 bytes long"));
    }
}
